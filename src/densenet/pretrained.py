"""Where weights come from, and how a model's inputs must be preprocessed (timm's `pretrained_cfg`).

This package ships no weights and downloads nothing (it works offline). Published weights are
torchvision's ImageNet files for the networks whose layout matches theirs; `pretrained=True` finds
them where torchvision caches them (`torch.hub.get_dir()/checkpoints`), else says where to fetch them
and how to pass the file. CIFAR/SVHN networks have no published PyTorch weights: train one
(`densenet train`) and pass its run directory, or a Hugging Face Hub repository (`hf-hub:org/repo`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CIFAR-10's 50,000 training images, per channel over all pixels in [0, 1] (what `densenet train`
# computes from its own training split; its checkpoint stores the exact figures it used)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

_TV = "https://download.pytorch.org/models/"
# torchvision's IMAGENET1K_V1 files: the layouts of these registry entries are theirs, key for key
TORCHVISION_FILES = {
    "densenet121": "densenet121-a639ec97.pth", "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth", "densenet161": "densenet161-8d451a50.pth",
    "resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth", "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth", "resnext50_32x4d": "resnext50_32x4d-7cdf4587.pth",
}


def has_pretrained(name: str) -> bool:
    return name in TORCHVISION_FILES


def cfg_from_preprocessing(name: str, pre: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """The pretrained_cfg of a model trained by this package, from the preprocessing in its checkpoint."""
    size = [int(v) for v in pre["image_size"]]
    crop_pct = size[0] / pre["resize"] if pre.get("source") == "stream" and pre.get("resize") else 1.0
    return {"architecture": name, "input_size": (int(pre["channels"]), *size), "mean": tuple(pre["mean"]),
            "std": tuple(pre["std"]), "crop_pct": crop_pct, "crop_mode": "center", "interpolation": "bilinear",
            "num_classes": num_classes, "url": None, "file": None, "source": "densenet train", "license": None}


def resolve_data_config(args: dict[str, Any] | None = None, pretrained_cfg: dict[str, Any] | None = None,
                        model=None, use_test_size: bool = False, verbose: bool = False) -> dict[str, Any]:
    """As timm.data.resolve_data_config, with its signature (`resolve_data_config({}, model=m)`):
    {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"} from `args` (where given),
    else the model's pretrained_cfg (or `pretrained_cfg`). A model passed first is taken as the model.
    `use_test_size` and `verbose` are accepted for timm's callers: the test size is the input size here."""
    import torch.nn as nn

    if isinstance(args, nn.Module):  # resolve_data_config(model): the model, not timm's args dict
        args, model = None, args
    if args is not None and not isinstance(args, dict):
        args = vars(args)  # an argparse.Namespace, as timm's scripts pass
    cfg = dict(pretrained_cfg or getattr(model, "pretrained_cfg", None) or {})
    if not cfg:
        raise ValueError("resolve_data_config needs a model built by densenet.create_model/load, or a "
                         "pretrained_cfg dict")
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    out = {k: cfg.get(k) for k in keys}
    out.update({k: v for k, v in (args or {}).items() if k in keys and v is not None})
    return out


def create_transform(input_size, is_training: bool = False, interpolation: str = "bilinear", mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, crop_pct: float = 1.0, crop_mode: str = "center", **_: Any):
    """Preprocessing of a PIL image as a data config says, as timm.data.create_transform.

    is_training=False: resize the shorter side to size / crop_pct, centre-crop `size`, to tensor,
    normalise. `densenet.load` returns the exact transform of a trained checkpoint.
    is_training=True: the paper's training augmentation for the input size: at ImageNet sizes the
    authors' pipeline (fb.resnet.torch: random-sized crop, colour jitter, PCA lighting, flip); at
    CIFAR/SVHN sizes (under 64 pixels) "+" augmentation (normalise, zero-pad 4, random crop, flip).
    timm's other options (auto_augment, re_prob, ...) are accepted and not used."""
    import math

    from torchvision import transforms as T

    size = tuple(input_size[-2:]) if not isinstance(input_size, int) else (input_size, input_size)
    if is_training:
        return _training_transform(size, tuple(mean), tuple(std))
    if crop_mode != "center":
        raise ValueError(f"crop_mode {crop_mode!r}: only 'center' is available")
    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
             "nearest": T.InterpolationMode.NEAREST}
    if interpolation not in modes:
        raise ValueError(f"interpolation {interpolation!r}: one of {', '.join(modes)}")
    scale = math.floor(size[0] / crop_pct)
    return T.Compose([T.Resize(scale, interpolation=modes[interpolation]), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(tuple(mean), tuple(std))])


def _training_transform(size: tuple[int, int], mean: tuple, std: tuple):
    from torchvision import transforms as T

    from .data.transforms import Normalization, imagenet_train_transform

    if size[0] != size[1]:
        raise ValueError(f"is_training=True: the paper's augmentation crops squares, got input size {size}")
    if size[0] >= 64:
        return imagenet_train_transform(size[0], Normalization(mean, std))
    return T.Compose([T.ToTensor(), T.Normalize(mean, std), T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()])


def resolve_pretrained(name: str, pretrained: Any) -> str | None:
    """What `create_model(name, pretrained=...)` loads: None (False/None), a path, or an hf-hub: id.
    True means torchvision's file in torch's hub cache; where it is not there, a ValueError says where
    it comes from and how to pass it."""
    if pretrained is None or pretrained is False:
        return None
    if isinstance(pretrained, Path):
        return str(pretrained)
    if isinstance(pretrained, str):
        if not pretrained.strip():
            raise ValueError("pretrained='' names no file: give a checkpoint path, 'hf-hub:org/repo', True or False")
        return pretrained
    if pretrained is not True:
        raise ValueError(f"pretrained must be False, True, a checkpoint path or 'hf-hub:org/repo', "
                         f"got {pretrained!r}")
    if name not in TORCHVISION_FILES:
        raise ValueError(
            f"{name}: no published PyTorch weights exist for this network (pretrained=True has nothing to "
            f"load). Train it (`densenet train --model {name} --out runs/{name}`) and pass "
            f"pretrained='runs/{name}', or a file (pretrained='model.safetensors'), or weights shared on "
            f"the Hugging Face Hub (pretrained='hf-hub:ORG/REPO'). Networks with torchvision's ImageNet "
            f"weights: {', '.join(TORCHVISION_FILES)}.")
    file = TORCHVISION_FILES[name]
    cached = Path(_hub_dir()) / "checkpoints" / file
    if cached.is_file():
        return str(cached)
    raise ValueError(
        f"{name}: pretrained=True loads torchvision's ImageNet weights, {file}, from torch's cache "
        f"({cached.parent}), where they are not; this package downloads nothing. Fetch the file once "
        f"(python -c \"import torch; torch.hub.download_url_to_file('{_TV + file}', '{cached}')\"; "
        f"torchvision.models.{name}(weights='IMAGENET1K_V1') caches the same file), or pass a copy: "
        f"pretrained='path/to/{file}'.")


def missing_file_hint(path: str | Path) -> str:
    """For a checkpoint path that does not exist: where a torchvision file of that name comes from."""
    name = Path(path).name
    for arch, file in TORCHVISION_FILES.items():
        if name == file:
            return (f"; {file} is torchvision's {arch} ImageNet file: fetch it from {_TV + file} "
                    f"(or run torchvision.models.{arch}(weights='IMAGENET1K_V1') once and pass "
                    f"pretrained=True, which finds it in torch's cache)")
    return ""


def _hub_dir() -> str:
    import torch

    return torch.hub.get_dir()


__all__ = ["TORCHVISION_FILES", "create_transform", "has_pretrained", "resolve_data_config", "resolve_pretrained"]
