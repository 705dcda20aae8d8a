"""Named variants: one row per network of the papers' tables, `create_model` and `list_models`.

A variant is data: its builder's defaults plus what the paper reports about it (parameter count,
multiply-adds). Overrides use the paper's names: `depth`, `growth_rate`, `bottleneck`, `compression`,
`drop_rate`, `in_channels`, `memory_efficient`, ...
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from .models.densenet import IMAGENET_BLOCKS, DenseNet, DenseNetConfig, cifar_block_config


@dataclass(frozen=True)
class ModelEntry:
    """A registered network and what its paper says about it."""

    name: str
    family: str  # groups `densenet models`
    builder: Callable[..., nn.Module]  # builder(**overrides) -> model
    input_size: tuple[int, int, int]  # (C, H, W) the paper evaluates it at
    num_classes: int  # the paper's classifier size, used for the published counts
    paper_params: int | None = None  # exact count where the rules give one
    paper_gmacs: float | None = None  # multiply-adds per image at input_size, x10^9
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(family: str | None = None) -> list[str]:
    """Registered names, in registration order (the papers' table order)."""
    return [n for n, e in _REGISTRY.items() if family is None or e.family == family]


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} `densenet models` lists the "
                         f"{len(_REGISTRY)} registered names.") from None


def create_model(name: str, *, pretrained: str | None = None, reset_classifier: bool = False,
                 **overrides: Any) -> nn.Module:
    """Build a registered network. `pretrained` is a checkpoint path (torchvision's or this package's);
    `reset_classifier=True` loads everything but the classifier (fine-tuning to other classes)."""
    entry = get_entry(name)
    overrides.setdefault("num_classes", entry.num_classes)
    model = entry.builder(**overrides)
    model.model_name = name
    if pretrained is not None:
        from .weights import load_pretrained

        load_pretrained(model, pretrained, reset_classifier=reset_classifier)
    return model


def _make_config(cls, where: str, **kwargs: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options are "
                         f"{', '.join(sorted(names | {'depth'}))}")
    return cls(**kwargs)


# --- DenseNet on CIFAR/SVHN (Table 2) ---------------------------------------------------------------

def densenet_cifar(depth: int = 100, growth_rate: int = 12, bottleneck: bool = True,
                   compression: float = 0.5, **kwargs: Any) -> DenseNet:
    """A 3-block CIFAR/SVHN DenseNet given by its depth L: n = (L - 4) / 3, or (L - 4) / 6 with bottlenecks."""
    if "block_config" in kwargs:
        raise ValueError("give either depth or block_config, not both (depth sets the blocks)")
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"densenet (CIFAR): depth must be an integer, got {depth!r}")
    blocks = cifar_block_config(depth, bool(bottleneck))
    return DenseNet(_make_config(DenseNetConfig, "densenet (CIFAR)", growth_rate=growth_rate,
                                 block_config=blocks, bottleneck=bottleneck, compression=compression,
                                 stem="cifar", **kwargs))


def densenet_imagenet(depth: int | None = 121, growth_rate: int = 32, **kwargs: Any) -> DenseNet:
    """A 4-block ImageNet DenseNet-BC (Table 1); depth picks the block sizes of 121/169/201/264."""
    if "block_config" not in kwargs:
        if not isinstance(depth, int) or depth not in IMAGENET_BLOCKS:
            raise ValueError(f"depth {depth} is not one of the ImageNet DenseNets: valid depths are "
                             f"{', '.join(map(str, IMAGENET_BLOCKS))}, or give block_config")
        kwargs["block_config"] = IMAGENET_BLOCKS[depth]
    kwargs.setdefault("bottleneck", True)
    kwargs.setdefault("compression", 0.5)
    return DenseNet(_make_config(DenseNetConfig, "densenet (ImageNet)", growth_rate=growth_rate,
                                 stem="imagenet", **kwargs))


def _cifar_entry(name, depth, k, bc, params, gmacs, label):
    def build(**kw):
        kw.setdefault("depth", depth)
        kw.setdefault("growth_rate", k)
        kw.setdefault("bottleneck", bc)
        kw.setdefault("compression", 0.5 if bc else 1.0)
        return densenet_cifar(**kw)

    register_model(ModelEntry(name, "DenseNet (CIFAR/SVHN)", build, (3, 32, 32), 10, params, gmacs,
                              f"{label} (L={depth}, k={k}), Table 2"))


_cifar_entry("densenet_40_k12", 40, 12, False, 1_019_722, 0.265, "DenseNet")
_cifar_entry("densenet_100_k12", 100, 12, False, 6_979_642, 1.770, "DenseNet")
_cifar_entry("densenet_100_k24", 100, 24, False, 27_249_082, 6.889, "DenseNet")
_cifar_entry("densenet_bc_100_k12", 100, 12, True, 769_162, 0.288, "DenseNet-BC")
_cifar_entry("densenet_bc_250_k24", 250, 24, True, 15_324_406, 5.419, "DenseNet-BC")
_cifar_entry("densenet_bc_190_k40", 190, 40, True, 25_624_430, 9.302, "DenseNet-BC")


def _imagenet_entry(name, depth, k, params, gmacs, blocks=None):
    def build(**kw):
        if blocks is not None:
            kw.setdefault("block_config", blocks)
            kw.setdefault("depth", None)
        else:
            kw.setdefault("depth", depth)
        kw.setdefault("growth_rate", k)
        return densenet_imagenet(**kw)

    register_model(ModelEntry(name, "DenseNet (ImageNet)", build, (3, 224, 224), 1000, params, gmacs,
                              f"DenseNet-BC-{name[8:]} (k={k}), Table 1"))


_imagenet_entry("densenet121", 121, 32, 7_978_856, 2.834)
_imagenet_entry("densenet169", 169, 32, 14_149_480, 3.360)
_imagenet_entry("densenet201", 201, 32, 20_013_928, 4.291)
_imagenet_entry("densenet264", 264, 32, 33_337_704, 5.752)
_imagenet_entry("densenet161", 161, 48, 28_681_000, 7.728, blocks=(6, 12, 36, 24))
