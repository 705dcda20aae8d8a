"""A model saved by this package: its file format, the one writer of it, and the reader that rebuilds
the model from the file alone.

    model.safetensors    the state dict, with string metadata (JSON where not a plain string):
        format           "densenet.model/1"
        model            the registered name: create_model(model, **model_args) rebuilds the network
        model_args       the options given to create_model
        classes          the class names, one per output (optional)
        preprocessing    source, mean, std, channels, image_size, ... (optional)
        config           the training configuration (optional)

Every such file is written by `write_model_file`, with metadata from `model_metadata`: `save_model`
(a model in hand) and the training checkpoints (train/checkpoint.py) alike, so what one writes the
other reads. `load_model` refuses any other file (torchvision's files load with
`create_model(name, pretrained=PATH)`, weights.py).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .utils.validate import needing, parse_json
from .runs import CheckpointError, resolve_checkpoint
from .weights import convert_state_dict, describe_mismatch, read_state_dict, warn_non_finite

FORMAT = "densenet.model/1"


def model_metadata(model_name: str, model_args: dict, classes: list[str] | None = None,
                   preprocessing: dict | None = None, config: dict | None = None) -> dict[str, str]:
    """The metadata of a model file: what rebuilds the model, and what the optional fields give."""
    meta = {"format": FORMAT, "model": model_name, "model_args": json.dumps(model_args)}
    for key, value in (("classes", classes), ("preprocessing", preprocessing), ("config", config)):
        if value is not None:
            meta[key] = json.dumps(value)
    return meta


def write_model_file(path: str | Path, model: nn.Module, meta: Mapping[str, str]) -> Path:
    """The model's state dict as safetensors with `meta` (from `model_metadata`), written atomically:
    a crash leaves the previous file intact."""
    from safetensors.torch import save_file

    from .utils.atomic import atomic_write

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(meta))
    return path


def save_model(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """A model built by `create_model` (or `load_model`) as a file `load_model` rebuilds it from.
    `metadata` may give `model_args` (default: the model's own), `classes`, `preprocessing`, `config`
    and further keys (stored as JSON)."""
    extra = dict(metadata or {})
    name = extra.pop("model", None) or getattr(model, "model_name", None)
    args = extra.pop("model_args", getattr(model, "model_args", None))
    if not name or not isinstance(args, dict):
        raise ValueError("save_model needs a model built by densenet.create_model or densenet.load (its "
                         "registered name and arguments rebuild it), or metadata giving model and model_args")
    meta = model_metadata(name, args)
    for k, v in extra.items():  # classes, preprocessing, config, ...: JSON unless given as text
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return write_model_file(path, model, meta)


def load_model(path: str | Path, map_location: str | torch.device = "cpu",
               which: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A model trained by this package, rebuilt from its checkpoint alone (a run directory or a
    model.safetensors file): (model in eval mode, info) where info holds `model`, `model_args`,
    `classes`, `preprocessing`, `checkpoint` (the `densenet.runs.Checkpoint` read: a run directory's
    protocol checkpoint, or `which`, best or last) and, when saved, the training `config`."""
    from .registry import create_model

    checkpoint = resolve_checkpoint(path, which)
    sd, meta = read_state_dict(checkpoint.file)
    if meta.get("format") != FORMAT or "model_args" not in meta:
        raise CheckpointError(f"{path} is not a checkpoint written by this package (no model metadata); "
                              f"for a torchvision file use densenet.create_model(name, pretrained=PATH)")
    info: dict[str, Any] = {"model": meta["model"], "checkpoint": checkpoint}
    for key in ("model_args", "classes", "preprocessing", "config"):
        if key in meta:
            try:
                info[key] = parse_json(meta[key], f"{path}: its metadata {key}")
            except ValueError as e:
                raise CheckpointError(str(e)) from None
    if not isinstance(info["model_args"], dict) or not all(isinstance(k, str) for k in info["model_args"]):
        raise CheckpointError(f"{path}: its metadata model_args must be a table of option: value, "
                              f"got {info['model_args']!r}"[:300])
    if "config" in info and not isinstance(info["config"], dict):
        raise CheckpointError(f"{path}: its metadata config must be a table of settings")
    try:
        model = create_model(info["model"], **info["model_args"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its metadata names a model that cannot be built ({e})"[:400]) from None
    sd = convert_state_dict(sd)
    problem = describe_mismatch(model.state_dict(), sd)
    if problem:
        raise CheckpointError(f"{path}: weights do not fit {info['model']} {info['model_args']}: {problem}")
    model.load_state_dict(sd)
    check_info(info, model, path)
    warn_non_finite(sd, str(path))
    if "preprocessing" in info:
        from .pretrained import cfg_from_preprocessing

        model.pretrained_cfg = cfg_from_preprocessing(info["model"], info["preprocessing"],
                                                      len(info.get("classes") or []))
    return model.to(map_location).eval(), info


def _outputs(model: nn.Module) -> int | None:
    weight = model.state_dict().get(getattr(model, "classifier_name", "classifier") + ".weight")
    return int(weight.shape[0]) if weight is not None else None


def check_info(info: dict[str, Any], model: nn.Module, path) -> None:
    """Raise CheckpointError unless the class names and the preprocessing in a checkpoint's metadata
    are complete and fit the model: one line naming the field, instead of a failure far away."""
    need = needing(f"{path}: its metadata ", error=CheckpointError, limit=400)

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if "classes" in info:
        classes, n = info["classes"], _outputs(model)
        need(isinstance(classes, list) and all(isinstance(c, str) for c in classes),
             f"classes must be a list of names, got {classes!r}")
        need(n is None or len(classes) == n, f"lists {len(classes)} class names for the model's {n} outputs")
    pre = info.get("preprocessing")
    if pre is None:
        return
    need(isinstance(pre, dict), f"preprocessing must be a table, got {pre!r}")
    missing = [k for k in ("source", "mean", "std", "channels", "image_size") if k not in pre]
    need(not missing, f"preprocessing lacks {', '.join(missing)}")
    need(pre["source"] in ("memory", "stream"), f"preprocessing source must be memory or stream, got {pre['source']!r}")
    need(integer(pre["channels"], 1, 4), f"preprocessing channels must be 1 to 4, got {pre['channels']!r}")
    c = pre["channels"]
    conv = model.state_dict().get(getattr(model, "first_conv_name", "features.conv0") + ".weight")
    need(conv is None or conv.shape[1] == c, f"preprocessing gives {c} channels to a model that takes "
                                             f"{None if conv is None else conv.shape[1]}")
    for key in ("mean", "std"):
        v = pre[key]
        need(isinstance(v, list) and len(v) == c and all(map(number, v)),
             f"preprocessing {key} must be {c} finite numbers, got {v!r}")
    need(all(s > 0 for s in pre["std"]), f"preprocessing std must be positive, got {pre['std']!r}")
    size = pre["image_size"]
    need(isinstance(size, list) and len(size) == 2 and all(integer(v, 1, 8192) for v in size),
         f"preprocessing image_size must be [height, width], each 1 to 8192, got {size!r}")
    need(pre.get("resize") is None or integer(pre["resize"], 1, 16384),
         f"preprocessing resize must be 1 to 16384, got {pre.get('resize')!r}")
    need(pre.get("augment") is None or isinstance(pre["augment"], str),
         f"preprocessing augment must be a name, got {pre.get('augment')!r}")
