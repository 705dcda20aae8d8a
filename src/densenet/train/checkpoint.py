"""Run directories and checkpoints that never lose work and never execute code.

    RUN/config.json                the resolved configuration
    RUN/metrics.jsonl              one JSON object per epoch
    RUN/ckpt/000012/model.safetensors   weights + metadata (model, model_args, classes, preprocessing)
    RUN/ckpt/000012/state.safetensors   optimizer buffers and RNG states + JSON metadata (epoch, step,
                                        optimizer hyper-parameters, running metrics; the lr schedule
                                        is a function of the epoch)
    RUN/last -> ckpt/000012        symbolic links, replaced atomically
    RUN/best -> ckpt/000010
    RUN/written.json               the checkpoint directories this run wrote: the only ones it deletes
    RUN/densenet.lock              held while a process trains in RUN (train/lock.py)

A checkpoint directory is written completely and fsynced before `last` is pointed at it (an atomic
rename of a symbolic link), so a crash or kill -9 at any moment leaves `last` on a complete checkpoint.
Only safetensors and JSON are read back: nothing is unpickled, and what is read is checked (types,
ranges, links that stay inside the run directory) before it is used.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..runs import MODEL_FILE, CheckpointError
from ..saved_model import write_model_file
from ..utils.atomic import _fsync_dir, atomic_write, write_text_atomic
from ..utils.validate import needing, parse_json, read_json
from ..weights import non_finite, read_state_dict

STATE_FILE = "state.safetensors"
RECORD_FILE = "written.json"
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "summary.json", "ckpt", "last", "best", RECORD_FILE,
             "tensorboard")
# what else lives in a run directory while it runs: the run lock (train/lock.py) and, in a grid cell,
# the launcher's files (grid/launchers.py); no output may replace them either
_RUN_OWNED = RUN_FILES + ("densenet.lock", "launch.json", "error.json", "normalization.safetensors")


def refuse_run_file(path: str | Path, what: str) -> None:
    """Raise ValueError where writing `path` would replace a file of a training run's own (its config,
    metrics, summary, checkpoints): an output of export, reuse or save_pretrained must go elsewhere.
    Other names in a run directory (run/reuse.png, run/model.onnx) are fine."""
    p = Path(path).expanduser().absolute()
    p = p.parent.resolve() / p.name  # `last`/`best` links followed, the file itself not
    for run in p.parents:
        if (run / "config.json").is_file() and ((run / "ckpt").is_dir() or (run / "last").exists()):
            part = p.relative_to(run).parts[0]
            if part in _RUN_OWNED:
                raise ValueError(f"{what} {path} would overwrite {run / part}, a file of the training run in "
                                 f"{run}: give another name or folder")
            return
_CKPT_NAME = re.compile(r"^\d{6,}$")


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


def check_train_state(plain: dict, tensors: dict[str, torch.Tensor], where) -> None:
    """Raise CheckpointError unless a state file holds what resuming needs, of the right types."""
    need = needing(f"{where} is damaged: ", "; resume from another checkpoint (copy it to a new run directory) "
                   "or start again", CheckpointError, limit=500)

    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    train = plain.get("train")
    need(isinstance(train, dict), "it holds no training state")
    need(integer(train.get("epoch")) and train["epoch"] >= 0,
         f"its epoch must be a whole number >= 0, got {train.get('epoch')!r}")
    need(integer(train.get("step")) and train["step"] >= 0,
         f"its step must be a whole number >= 0, got {train.get('step')!r}")
    need(train.get("best") is None or isinstance(train["best"], dict), "its best is not a table")
    sums = train.get("sums")
    need(sums is None or isinstance(sums, dict) and all(isinstance(sums.get(k), (int, float))
                                                        for k in ("loss", "correct", "n", "time", "wait")),
         "its running sums are incomplete")
    need(train["step"] == 0 or sums is not None, "a mid-epoch state without its running sums")
    opt = plain.get("optimizer")
    need(isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list),
         "it holds no optimizer state")
    rng = tensors.get("rng.cpu")
    need(rng is not None and rng.dtype == torch.uint8 and rng.dim() == 1, "it holds no random-number state")


class RunDir:
    """The checkpoints of one training run."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    # writing -------------------------------------------------------------------------------------------
    def save(self, counter: int, model: torch.nn.Module, optimizer, meta: dict[str, str],
             train_state: dict[str, Any], extra_tensors: dict[str, torch.Tensor] | None = None,
             best: bool = False) -> Path:
        """Write checkpoint `counter` completely, then point `last` (and `best`) at it."""
        name = f"{counter:06d}"
        target = self.path / "ckpt" / name
        written = self.written()
        if target.exists() or target.is_symlink():
            if name not in written or target.is_symlink():
                raise CheckpointError(f"{target} exists and was not written by this run: move it out of "
                                      f"{self.path / 'ckpt'} (the run only deletes what it wrote)")
            shutil.rmtree(target)
        self._record(written | {name})  # first the record, then the directory: a kill between leaves no orphan
        made = False
        try:
            target.mkdir(parents=True)  # fails if another process made it meanwhile: then it is not ours
            made = True
            write_model_file(target / MODEL_FILE, model, meta)  # the one writer of the model file format
            opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
            tensors = {**opt_tensors, **rng_state(), **(extra_tensors or {})}
            state_meta = {"format": "densenet.state/1", "optimizer": json.dumps(opt_plain),
                          "train": json.dumps(train_state)}
            with atomic_write(target / STATE_FILE) as tmp:
                save_file(tensors, str(tmp), metadata=state_meta)
            _fsync_dir(target)
        except Exception as e:  # disk full, quota, permissions: `last` still names the previous checkpoint
            if made:
                shutil.rmtree(target, ignore_errors=True)
            else:  # another process made it: not ours, so not in the record (no later cleanup deletes it)
                self._record(written - {name})
            last = self.resolve("last")
            raise CheckpointError(f"could not write checkpoint {target} ({type(e).__name__}: {e}); "
                                  + (f"{self.path / 'last'} still names the complete checkpoint {last.name}"
                                     if last else "no checkpoint of this run is complete") + "; free space "
                                  "and continue with --resume" + ("" if last else ", or start again")) from None
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

    # what this run wrote -------------------------------------------------------------------------------
    def written(self) -> set[str]:
        """Names of the checkpoint directories under ckpt/ that this run wrote. A run directory from
        before the record existed: the checkpoints its `last` and `best` name."""
        f = self.path / RECORD_FILE
        try:
            data = json.loads(f.read_text())
            names = data["checkpoints"]
            if not isinstance(names, list):
                raise ValueError("checkpoints is not a list")
            return {n for n in names if isinstance(n, str) and _CKPT_NAME.match(n)}
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, OSError):  # damaged: trust nothing in it, delete nothing more
            pass
        ckpt = (self.path / "ckpt").resolve()
        out = set()
        for link in ("last", "best"):
            try:
                target = self.resolve(link)
            except CheckpointError:
                continue
            if target is not None and target.parent == ckpt and _CKPT_NAME.match(target.name):
                out.add(target.name)
        return out

    def _record(self, names: set[str]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / RECORD_FILE, json.dumps(
            {"format": "densenet.written/1", "checkpoints": sorted(names)}) + "\n")

    def check_new(self) -> None:
        """Refuse a directory that holds another run's files (a directory of a run that never finished
        its first checkpoint may be taken again): checked before any work, claimed by `start_new`."""
        f = self.path / RECORD_FILE
        restart = f.is_file() and not self.written() and self.resolve("last") is None
        if not restart:
            clash = [n for n in RUN_FILES if (self.path / n).exists() or (self.path / n).is_symlink()]
            if clash:
                raise CheckpointError(f"{self.path} already holds {', '.join(clash)}, not written by a run that "
                                      f"can be restarted: give a new --out directory (or --resume {self.path} "
                                      f"if it is a run to continue)")

    def start_new(self) -> None:
        """Claim the directory for a new run, once its data and model are built: a run refused before
        that leaves nothing behind (its lock file goes with it, train/lock.py)."""
        self.check_new()
        self._record(set())

    def _collect_garbage(self) -> None:
        """Delete the checkpoints this run wrote that neither `last` nor `best` names; nothing else."""
        keep = {p.name for p in (self.resolve(name) for name in ("last", "best")) if p is not None}
        written = self.written()
        for name in sorted(written - keep):
            d = self.path / "ckpt" / name
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
        if written - keep:
            self._record(written & keep)

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.json", json.dumps(config, indent=2) + "\n")

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, epochs_done: int) -> None:
        """After a resume, keep only the rows of the epochs the checkpoint has seen. A torn last line
        (a crash while it was written) is dropped; that epoch runs again and writes it again."""
        f = self.path / "metrics.jsonl"
        if not f.is_file():
            return
        lines = [r for r in f.read_text(errors="replace").splitlines() if r.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                row = parse_json(line, f"{f} line {i + 1}", dict)
                epoch = row["epoch"]
                if not isinstance(epoch, int) or isinstance(epoch, bool):
                    raise ValueError("epoch is not an integer")
            except (ValueError, KeyError, TypeError) as e:
                if i == len(lines) - 1:
                    continue
                raise CheckpointError(f"{f} line {i + 1} is damaged ({type(e).__name__}: {e}); delete or "
                                      f"repair that line, then resume again") from None
            if epoch <= epochs_done:
                rows.append(line)
        write_text_atomic(f, "".join(r + "\n" for r in rows))

    # reading -------------------------------------------------------------------------------------------
    def resolve(self, name: str = "last") -> Path | None:
        """The checkpoint directory `name` ("last", "best") points at, or None. A link that leads out of
        the run directory is an error, never followed."""
        link = self.path / name
        if not link.exists():
            return None
        target, root = link.resolve(), self.path.resolve()
        if root not in target.parents:
            raise CheckpointError(f"{link} points outside the run directory (to {target}); a run directory "
                                  f"only reads its own checkpoints: point it at one under {self.path / 'ckpt'}")
        return target

    def load_state(self, name: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """(weights, state tensors, state metadata) of checkpoint `name`."""
        target = self.resolve(name)
        if target is None:
            raise CheckpointError(f"{self.path} has no {name!r} checkpoint to resume from (expected "
                                  f"{self.path / name}/{STATE_FILE}); start a new run with --out instead")
        weights, _ = read_state_dict(target / MODEL_FILE)
        bad = non_finite(weights)
        if bad:  # saving refuses non-finite weights, so these were changed on disk: never resumed from
            raise CheckpointError(f"{target / MODEL_FILE} holds non-finite values ({len(bad)} tensors, e.g. "
                                  f"{', '.join(bad[:3])}): it was damaged after it was saved and is not resumed "
                                  f"from; start again with --out, or restore the file")
        from safetensors import safe_open

        try:
            with safe_open(str(target / STATE_FILE), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(target / STATE_FILE))
        except Exception as e:
            raise CheckpointError(f"{target / STATE_FILE} is not a readable training state ({e})") from None
        if meta.get("format") != "densenet.state/1":
            raise CheckpointError(f"{target / STATE_FILE} is not a densenet training state")
        where = target / STATE_FILE
        try:
            plain = {k: parse_json(v, f"{where}: its metadata {k}") for k, v in meta.items() if k != "format"}
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        check_train_state(plain, tensors, where)
        bad = non_finite({k: v for k, v in tensors.items() if k.startswith("optim.")})
        if bad:
            raise CheckpointError(f"{where} holds non-finite optimizer state ({', '.join(bad[:3])}): it was damaged "
                                  f"after it was saved and is not resumed from; start again with --out")
        try:
            plain["optimizer"] = _unflatten_optimizer(tensors, plain["optimizer"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(f"{where} is damaged: its optimizer state is incomplete "
                                  f"({type(e).__name__}: {e})") from None
        return weights, tensors, plain

    def read_config(self) -> dict:
        f = self.path / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{self.path} is not a run directory: {f} is missing")
        try:
            return read_json(f)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
