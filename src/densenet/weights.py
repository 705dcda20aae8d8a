"""Weights in and out: torchvision's DenseNet files, DataParallel/DDP files, and this package's own.

Every published DenseNet checkpoint is converted to our module names at one place, `convert_state_dict`:
- torchvision's old files name `features.denseblock1.denselayer1.norm.1.weight` what is now
  `...denselayer1.norm1.weight` (the regex below is the one torchvision itself uses);
- DataParallel and DDP prefix every key with `module.` (torch.compile with `_orig_mod.`);
- files older than PyTorch 0.4.1 lack BN's `num_batches_tracked`, which we then leave at its value.

Reading never executes code from the file: safetensors holds only tensors, and `.pth` files are read
with `torch.load(weights_only=True)`, PyTorch's restricted unpickler that builds tensors and plain
containers and refuses everything else.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .utils.validate import needing

_OLD_TORCHVISION_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to do."""


class NonFiniteWeightsWarning(UserWarning):
    """A checkpoint holds NaN or infinite parameters or buffers: its outputs mean nothing."""


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def warn_non_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    bad = non_finite(tensors)
    if bad:
        warnings.warn(f"{where} holds non-finite weights ({len(bad)} tensors, e.g. {', '.join(bad[:3])}): its "
                      f"outputs are meaningless; the training run that wrote it diverged", NonFiniteWeightsWarning,
                      stacklevel=3)


def describe_mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> str | None:
    """None when `sd` fits the state dict `own` key for key and shape for shape; otherwise every
    difference: keys missing, keys unexpected, and each differing key with both shapes."""
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shapes differ: " + "; ".join(shapes))
    if missing:
        parts.append(f"{len(missing)} keys of the model missing from the checkpoint: " + ", ".join(missing))
    if unexpected:
        parts.append(f"{len(unexpected)} keys of the checkpoint the model lacks: " + ", ".join(unexpected))
    return "; ".join(parts) or None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint: a .safetensors file, a .pth/.pt file, or a run directory
    (its `best/` checkpoint, else `last/`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / "best" / MODEL_FILE, path / "last" / MODEL_FILE):
            if candidate.is_file():
                if path.resolve() not in candidate.resolve().parents:
                    raise CheckpointError(f"{candidate.parent} points outside {path} (to "
                                          f"{candidate.parent.resolve()}); give that checkpoint's path instead")
                path = candidate
                break
        else:
            raise CheckpointError(f"no checkpoint in directory {path}: expected {MODEL_FILE}, "
                                  f"best/{MODEL_FILE} or last/{MODEL_FILE} (written by `densenet train --out`)")
    if not path.is_file():
        from .pretrained import missing_file_hint

        raise CheckpointError(f"checkpoint {path} does not exist{missing_file_hint(path)}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} could not be read as a weights-only PyTorch file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Only tensors and plain containers are accepted; a file "
            f"that needs arbitrary code to load is refused on purpose.") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers of training scripts
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), {}


def checkpoint_origin(path: str | Path) -> dict[str, Any]:
    """Which file a checkpoint path names and, for a run's checkpoint, the epoch (and step within the
    next epoch, 0 at an epoch's end) its weights were saved at: {"file", "epoch", "step"}."""
    path = Path(path).expanduser()
    file = path
    if path.is_dir():
        file = next((c for c in (path / MODEL_FILE, path / "best" / MODEL_FILE, path / "last" / MODEL_FILE)
                     if c.is_file()), path)
    out: dict[str, Any] = {"file": str(file), "epoch": None, "step": None}
    state = file.parent / "state.safetensors"
    if state.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(state), framework="pt") as f:
                train = json.loads((f.metadata() or {}).get("train", "{}"))
            out.update(epoch=train.get("epoch"), step=train.get("step"))
        except Exception:  # the weights are what is evaluated; a damaged state file only loses the epoch
            pass
    return out


def convert_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's old key names, and DataParallel/DDP/compile prefixes, to this package's names."""
    out = {}
    for key, value in sd.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        m = _OLD_TORCHVISION_KEY.match(key)
        if m:
            key = m.group(1) + m.group(2)  # norm.1.weight -> norm1.weight
        out[key] = value
    return out


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first convolution trained on RGB, for `in_channels` inputs: grayscale sums the RGB filters
    (a gray image gives the same response as its RGB copy); other counts repeat and rescale them."""
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    reps = -(-in_channels // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def load_pretrained(model: nn.Module, path: str | Path, *, reset_classifier: bool = False) -> nn.Module:
    """Load a checkpoint into `model` in place, or raise CheckpointError naming every mismatch.

    `reset_classifier=True` keeps the model's own (freshly initialised) classifier: the way to fine-tune
    a 1000-class checkpoint to another number of classes.
    """
    sd, _ = read_state_dict(path)
    sd = convert_state_dict(sd)
    own = model.state_dict()
    head = getattr(model, "classifier_name", "classifier")
    if reset_classifier:
        sd = {k: v for k, v in sd.items() if not (k == head or k.startswith(head + "."))}
    first_conv = getattr(model, "first_conv_name", "features.conv0") + ".weight"
    if first_conv in sd and first_conv in own and sd[first_conv].dim() == 4 \
            and sd[first_conv].shape[1] != own[first_conv].shape[1] \
            and sd[first_conv].shape[0] == own[first_conv].shape[0]:
        sd[first_conv] = _adapt_input_conv(sd[first_conv], own[first_conv].shape[1])

    missing = [k for k in own if k not in sd and not (reset_classifier and k.startswith(head + "."))
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = []
        if mismatched:
            lines.append("shapes differ: " + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
        if missing:
            lines.append(f"{len(missing)} model keys missing from the checkpoint, e.g. {', '.join(missing[:4])}")
        if unexpected:
            lines.append(f"{len(unexpected)} checkpoint keys the model lacks, e.g. {', '.join(unexpected[:4])}")
        if mismatched and all(k.split(":")[0].startswith(head + ".") for k in mismatched) and not missing:
            hint = (" Only the classifier differs: pass reset_classifier=True to load everything else "
                    "and train a new classifier.")
        else:
            hint = " Is this checkpoint for the same network? `densenet models` lists the variants."
        raise CheckpointError(f"checkpoint {path} does not fit model "
                              f"{getattr(model, 'model_name', type(model).__name__)}: "
                              + "; ".join(lines) + "." + hint)
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return model


def save_model(model: nn.Module, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Weights as safetensors, with JSON-encoded metadata (model name, config, classes, preprocessing).
    Written atomically: a crash leaves the previous file intact."""
    from safetensors.torch import save_file

    from .utils.atomic import atomic_write

    path = Path(path)
    meta = {"format": "densenet.model/1", "model": getattr(model, "model_name", "")}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A model trained by this package, rebuilt from its checkpoint alone (a run directory or a
    model.safetensors file): (model in eval mode, info) where info holds `model`, `model_args`,
    `classes`, `preprocessing` and, when saved, the training `config`."""
    from .registry import create_model

    sd, meta = read_state_dict(path)
    if meta.get("format") != "densenet.model/1" or "model_args" not in meta:
        raise CheckpointError(f"{path} is not a checkpoint written by this package (no model metadata); "
                              f"for a torchvision file use densenet.create_model(name, pretrained=PATH)")
    info: dict[str, Any] = {"model": meta["model"]}
    for key in ("model_args", "classes", "preprocessing", "config"):
        if key in meta:
            try:
                info[key] = json.loads(meta[key])
            except ValueError as e:
                raise CheckpointError(f"{path}: its metadata {key} is damaged ({e})") from None
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
    need(integer(pre.get("ten_crop_pad", 0), 0, 1024), "preprocessing ten_crop_pad must be 0 to 1024")
