"""torchvision's API for the ImageNet DenseNets: `densenet121(*, weights=None, progress=True, **kwargs)`
and its siblings, each with its Weights enum (`DenseNet121_Weights.IMAGENET1K_V1`, `.DEFAULT`).

A builder returns what `densenet.create_model(name, weights=weights, **kwargs)` returns: this package's
DenseNet, whose state dict is torchvision's key for key. `weights` is torchvision's argument: None, a
member of the network's enum (this module's or torchvision's own, `torchvision.models.DenseNet121_Weights`),
its name ("IMAGENET1K_V1", "DenseNet121_Weights.IMAGENET1K_V1") or "DEFAULT". The file is torchvision's
and is found where torchvision caches it (`torch.hub.get_dir()/checkpoints`), as `pretrained=True` finds
it: this package downloads nothing, so where the file is not there an error says how to fetch it once,
and `progress` (which would show a download) is accepted for torchvision's signature and has nothing
to show. A member of another network's enum is a ValueError (torchvision raises TypeError, and
KeyError for an unknown name).

Each enum member is a `torchvision.models.Weights`: `.url` (torchvision's file), `.transforms()` (the
evaluation preprocessing of `pretrained_cfg`: resize 256, centre crop 224, ImageNet mean/std, bilinear;
torchvision's ImageClassification preset, so it takes PIL images and uint8 tensors alike) and `.meta`
(torchvision's fields: the 1000 ImageNet categories, `min_size`, `num_params` (the registry's exact
count), `_metrics` (torchvision's measured ImageNet-1K accuracy of these weights), `_ops` (the registry's
GMACs), ...; and `paper`: the DenseNet paper's own Table 3 errors where it reports the network).
DenseNet-264 has no published weights: its builder takes weights=None only.
"""

import math
from functools import partial
from typing import Any

from torchvision.models import DenseNet121_Weights as _TVDenseNet121_Weights
from torchvision.models import Weights, WeightsEnum
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from ..paper import TABLE1
from ..registry import create_model, get_entry, pretrained_cfg
from .densenet import DenseNet

# The 1000 ImageNet-1K class names, in the classifier's order: torchvision's list (its weights' meta)
_IMAGENET_CATEGORIES: list[str] = list(_TVDenseNet121_Weights.IMAGENET1K_V1.meta["categories"])


class _ImageNetWeights(WeightsEnum):
    """torchvision's WeightsEnum; `verify` also takes torchvision's own member of the same enum, and says
    what is wrong with a ValueError."""

    @classmethod
    def verify(cls, obj: Any) -> Any:
        if obj is None or isinstance(obj, cls):
            return obj
        if isinstance(obj, str):
            key = obj[len(cls.__name__) + 1:] if obj.startswith(cls.__name__ + ".") else obj
            if key in cls.__members__:
                return cls[key]
            raise ValueError(f"weights={obj!r}: {cls.__name__} has {', '.join(cls.__members__)} (or None: no "
                             f"weights)")
        if isinstance(obj, WeightsEnum) and type(obj).__name__ == cls.__name__ and obj.name in cls.__members__ \
                and cls[obj.name].url == obj.url:  # torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
            return cls[obj.name]
        raise ValueError(f"Invalid Weight class provided; expected {cls.__name__} but received "
                         f"{obj.__class__.__name__}.")


def _imagenet_v1(name: str, acc1: float, acc5: float, file_size: float) -> Weights:
    """torchvision's IMAGENET1K_V1 weights of a registered network: its file, the evaluation
    preprocessing of the network's pretrained_cfg, and the meta torchvision publishes with the file
    (accuracy measured by torchvision; counts from the registry; file size in MB), with the paper's."""
    entry, cfg = get_entry(name), pretrained_cfg(name)
    crop = cfg["input_size"][-1]
    meta: dict[str, Any] = {
        "min_size": (29, 29),  # the smallest input whose last transition still leaves 1x1 maps
        "categories": _IMAGENET_CATEGORIES,
        "recipe": "https://github.com/pytorch/vision/pull/116",
        "_docs": "These weights are ported from LuaTorch.",
        "num_params": entry.paper_params,
        "_metrics": {"ImageNet-1K": {"acc@1": acc1, "acc@5": acc5}},
        "_ops": entry.paper_gmacs,
        "_file_size": file_size,
    }
    if name in TABLE1:
        meta["paper"] = {"source": "Huang et al., CVPR 2017, Table 3: ImageNet validation error (%), single "
                                   "224x224 centre crop and 10-crop",
                         "errors": dict(TABLE1[name])}
    transforms = partial(ImageClassification, crop_size=crop, resize_size=math.floor(crop / cfg["crop_pct"]),
                         mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                         interpolation=InterpolationMode(cfg["interpolation"]))
    return Weights(url=cfg["url"], transforms=transforms, meta=meta)


class DenseNet121_Weights(_ImageNetWeights):
    IMAGENET1K_V1 = _imagenet_v1("densenet121", 74.434, 91.972, 30.845)
    DEFAULT = IMAGENET1K_V1


class DenseNet161_Weights(_ImageNetWeights):
    IMAGENET1K_V1 = _imagenet_v1("densenet161", 77.138, 93.560, 110.369)
    DEFAULT = IMAGENET1K_V1


class DenseNet169_Weights(_ImageNetWeights):
    IMAGENET1K_V1 = _imagenet_v1("densenet169", 75.600, 92.806, 54.708)
    DEFAULT = IMAGENET1K_V1


class DenseNet201_Weights(_ImageNetWeights):
    IMAGENET1K_V1 = _imagenet_v1("densenet201", 76.896, 93.370, 77.373)
    DEFAULT = IMAGENET1K_V1


def _build(name: str, enum: type[_ImageNetWeights] | None, weights: Any, kwargs: dict[str, Any]) -> DenseNet:
    if enum is not None:
        weights = enum.verify(weights)
    return create_model(name, weights=weights, **kwargs)


def densenet121(*, weights: DenseNet121_Weights | str | None = None, progress: bool = True,
                **kwargs: Any) -> DenseNet:
    """DenseNet-BC-121 (k=32), Table 1, as torchvision.models.densenet121: `weights` (None,
    DenseNet121_Weights.IMAGENET1K_V1 / .DEFAULT or their names) from torch's hub cache; `kwargs` are
    create_model's (num_classes, drop_rate, memory_efficient, ...). `progress`: nothing is downloaded."""
    return _build("densenet121", DenseNet121_Weights, weights, kwargs)


def densenet161(*, weights: DenseNet161_Weights | str | None = None, progress: bool = True,
                **kwargs: Any) -> DenseNet:
    """DenseNet-BC-161 (k=48, blocks 6-12-36-24), as torchvision.models.densenet161; see densenet121."""
    return _build("densenet161", DenseNet161_Weights, weights, kwargs)


def densenet169(*, weights: DenseNet169_Weights | str | None = None, progress: bool = True,
                **kwargs: Any) -> DenseNet:
    """DenseNet-BC-169 (k=32), Table 1, as torchvision.models.densenet169; see densenet121."""
    return _build("densenet169", DenseNet169_Weights, weights, kwargs)


def densenet201(*, weights: DenseNet201_Weights | str | None = None, progress: bool = True,
                **kwargs: Any) -> DenseNet:
    """DenseNet-BC-201 (k=32), Table 1, as torchvision.models.densenet201; see densenet121."""
    return _build("densenet201", DenseNet201_Weights, weights, kwargs)


def densenet264(*, weights: None = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-BC-264 (k=32), Table 1 (torchvision has none): no weights are published for it, so
    `weights` is None (anything else is a ValueError that says so); see densenet121."""
    return _build("densenet264", None, weights, kwargs)


__all__ = ["DenseNet121_Weights", "DenseNet161_Weights", "DenseNet169_Weights", "DenseNet201_Weights",
           "densenet121", "densenet161", "densenet169", "densenet201", "densenet264"]
