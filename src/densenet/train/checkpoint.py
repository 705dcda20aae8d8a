"""Run directories and checkpoints that never lose work and never execute code.

    RUN/config.json                the resolved configuration
    RUN/metrics.jsonl              one JSON object per epoch
    RUN/ckpt/000012/model.safetensors   weights + metadata (model, model_args, classes, preprocessing)
    RUN/ckpt/000012/state.safetensors   optimizer buffers and RNG states + JSON metadata (epoch, step,
                                        optimizer hyper-parameters, running metrics; the lr schedule
                                        is a function of the epoch)
    RUN/last -> ckpt/000012        symbolic links, replaced atomically
    RUN/best -> ckpt/000010

A checkpoint directory is written completely and fsynced before `last` is pointed at it (an atomic
rename of a symbolic link), so a crash or kill -9 at any moment leaves `last` on a complete checkpoint.
Only safetensors and JSON are read back: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..utils.atomic import _fsync_dir, atomic_write, write_text_atomic
from ..weights import CheckpointError, read_state_dict

MODEL_FILE, STATE_FILE = "model.safetensors", "state.safetensors"


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, entry in sd["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
                plain["state"][str(idx)][key] = {"tensor": f"optim.{idx}.{key}"}
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {}
    for idx, entry in plain["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def model_metadata(model_name: str, model_args: dict, classes: list[str], preprocessing: dict,
                   config: dict | None = None) -> dict[str, str]:
    meta = {"format": "densenet.model/1", "model": model_name, "model_args": json.dumps(model_args),
            "classes": json.dumps(classes), "preprocessing": json.dumps(preprocessing)}
    if config is not None:
        meta["config"] = json.dumps(config)
    return meta


class RunDir:
    """The checkpoints of one training run."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    # writing -------------------------------------------------------------------------------------------
    def save(self, counter: int, model: torch.nn.Module, optimizer, meta: dict[str, str],
             train_state: dict[str, Any], extra_tensors: dict[str, torch.Tensor] | None = None,
             best: bool = False) -> Path:
        """Write checkpoint `counter` completely, then point `last` (and `best`) at it."""
        target = self.path / "ckpt" / f"{counter:06d}"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with atomic_write(target / MODEL_FILE) as tmp:
            save_file(weights, str(tmp), metadata=meta)
        opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
        tensors = {**opt_tensors, **rng_state(), **(extra_tensors or {})}
        state_meta = {"format": "densenet.state/1", "optimizer": json.dumps(opt_plain),
                      "train": json.dumps(train_state)}
        with atomic_write(target / STATE_FILE) as tmp:
            save_file(tensors, str(tmp), metadata=state_meta)
        _fsync_dir(target)
        self._point("last", target)
        if best:
            self._point("best", target)
        self._collect_garbage()
        return target

    def _point(self, link: str, target: Path) -> None:
        tmp = self.path / f".{link}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.path), tmp)
        os.replace(tmp, self.path / link)  # atomic: `link` names the old or the new checkpoint, never nothing
        _fsync_dir(self.path)

    def _collect_garbage(self) -> None:
        keep = {self.resolve(name) for name in ("last", "best")}
        for d in (self.path / "ckpt").iterdir():
            if d.resolve() not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.json", json.dumps(config, indent=2) + "\n")

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, epochs_done: int) -> None:
        """After a resume, keep only the rows of the epochs the checkpoint has seen."""
        f = self.path / "metrics.jsonl"
        if f.is_file():
            rows = [r for r in f.read_text().splitlines() if r.strip() and json.loads(r)["epoch"] <= epochs_done]
            write_text_atomic(f, "".join(r + "\n" for r in rows))

    # reading -------------------------------------------------------------------------------------------
    def resolve(self, name: str = "last") -> Path | None:
        link = self.path / name
        return link.resolve() if link.exists() else None

    def load_state(self, name: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """(weights, state tensors, state metadata) of checkpoint `name`."""
        target = self.resolve(name)
        if target is None:
            raise CheckpointError(f"{self.path} has no {name!r} checkpoint to resume from (expected "
                                  f"{self.path / name}/{STATE_FILE}); start a new run with --out instead")
        weights, _ = read_state_dict(target / MODEL_FILE)
        from safetensors import safe_open

        try:
            with safe_open(str(target / STATE_FILE), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(target / STATE_FILE))
        except Exception as e:
            raise CheckpointError(f"{target / STATE_FILE} is not a readable training state ({e})") from None
        if meta.get("format") != "densenet.state/1":
            raise CheckpointError(f"{target / STATE_FILE} is not a densenet training state")
        plain = {k: json.loads(v) for k, v in meta.items() if k != "format"}
        plain["optimizer"] = _unflatten_optimizer(tensors, plain["optimizer"])
        return weights, tensors, plain

    def read_config(self) -> dict:
        f = self.path / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{self.path} is not a run directory: {f} is missing")
        try:
            config = json.loads(f.read_text())
        except ValueError as e:
            raise CheckpointError(f"{f} is damaged: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{f} is damaged: it holds no table of settings")
        return config
