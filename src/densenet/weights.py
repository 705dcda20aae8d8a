"""Weights in: torchvision's DenseNet files, DataParallel/DDP files, and this package's own, read as
state dicts and loaded into a model (`load_pretrained`). The package's own model file, which also
rebuilds the model (`save_model`, `load_model`), is saved_model.py's.

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

import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from .runs import CheckpointError, resolve_checkpoint

_OLD_TORCHVISION_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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


def read_state_dict(path: str | Path, which: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint: a .safetensors file, a .pth/.pt file, a checkpoint directory,
    or a run directory (its protocol's checkpoint, or `which`: `densenet.runs.resolve_checkpoint`)."""
    path = resolve_checkpoint(path, which).file
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
