"""Deep residual networks (He, Zhang, Ren, Sun 2015), their plain counterparts, stochastic depth
(Huang, Sun, Liu, Sedra, Weinberger 2016) and ResNeXt (Xie, Girshick, Dollar, Tu, He 2017).

Every network here is a `ResNet` of residual.py with original units (conv-BN-ReLU-conv-BN, addition,
ReLU); a name is a depth and a few options:
- ImageNet (He 2015 Table 1): 7x7/2 stem, 4 stages of 64/128/256/512 maps (x4 with bottlenecks),
  projection shortcuts where the shape changes (option B), as torchvision, whose weights load.
  torchvision puts a bottleneck's stride on its 3x3 convolution ("ResNet v1.5", 4.09 GMACs for
  ResNet-50); He 2015's own models put it on the first 1x1 (`stride_in_1x1=True`, 3.86 GMACs, the
  paper's "3.8 x 10^9 FLOPs").
- CIFAR (He 2015 sec. 4.2): 3x3 stem with 16 maps, 3 stages of n units with 16/32/64 maps, 6n + 2
  layers, zero-padding identity shortcuts (option A). `stochastic_depth=p_L` drops units in training.
- ResNeXt: bottleneck units whose 3x3 convolution has C groups of d channels (C x d at 64 planes).
"""
from __future__ import annotations

from typing import Any

from .common import config_from_options
from .residual import ResNet, ResNetConfig, blocks_per_stage, no_dropout

# He 2015 Table 1: (bottleneck units?, units per stage) of the ImageNet networks
IMAGENET_LAYERS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
                   101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}

_PAPER_NAMES = ("depth", "cardinality", "bottleneck_width")


def _imagenet_layers(depth: int, where: str, bottleneck_only: bool = False) -> tuple[bool, tuple[int, ...]]:
    valid = [d for d, (b, _) in IMAGENET_LAYERS.items() if b or not bottleneck_only]
    if depth not in valid:
        raise ValueError(f"{where}: depth {depth} is not one of He 2015's ImageNet networks: valid depths are "
                         f"{', '.join(map(str, valid))}, or give layers=(...)")
    return IMAGENET_LAYERS[depth]


def _imagenet(where: str, **kwargs: Any) -> ResNet:
    kwargs.setdefault("planes", (64, 128, 256, 512))
    kwargs.setdefault("stem", "imagenet")
    kwargs.setdefault("stem_width", 64)
    kwargs.setdefault("shortcut", "B")
    return ResNet(config_from_options(ResNetConfig, where, _PAPER_NAMES, **kwargs))


def resnet_imagenet(depth: int = 50, **kwargs: Any) -> ResNet:
    """ResNet-18/34/50/101/152 (He 2015 Table 1); `residual=False` gives the plain network."""
    where = "resnet (ImageNet)"
    no_dropout(where, kwargs)
    if "layers" not in kwargs:
        kwargs["bottleneck"], kwargs["layers"] = _imagenet_layers(int(depth), where)
    return _imagenet(where, **kwargs)


def resnext_imagenet(depth: int = 50, cardinality: int = 32, bottleneck_width: int = 4, **kwargs: Any) -> ResNet:
    """ResNeXt-50/101 (C x d) on ImageNet (Xie 2017 Table 1): ResNet-50/101 with grouped 3x3 convolutions."""
    where = "resnext (ImageNet)"
    no_dropout(where, kwargs)
    _no_groups(where, kwargs)
    if "layers" not in kwargs:
        _, kwargs["layers"] = _imagenet_layers(int(depth), where, bottleneck_only=True)
    return _imagenet(where, bottleneck=True, groups=cardinality, width_per_group=bottleneck_width, **kwargs)


def _no_groups(where: str, kwargs: dict) -> None:
    for k in ("groups", "width_per_group", "bottleneck"):
        if k in kwargs:
            raise ValueError(f"{where}: give cardinality (C) and bottleneck_width (d) rather than {k}")


def resnet_cifar(depth: int = 20, **kwargs: Any) -> ResNet:
    """The CIFAR ResNets of He 2015 sec. 4.2 (L = 6n + 2); `residual=False` gives the plain network,
    `stochastic_depth=0.5` Huang 2016's ResNet with stochastic depth (p_L = 0.5)."""
    where = "resnet (CIFAR)"
    no_dropout(where, kwargs)
    if "layers" not in kwargs:
        n = blocks_per_stage(int(depth), 2, 2, "a CIFAR ResNet")
        kwargs["layers"] = (n, n, n)
    kwargs.setdefault("planes", (16, 32, 64))
    kwargs.setdefault("stem_width", 16)
    kwargs.setdefault("shortcut", "A")
    return ResNet(config_from_options(ResNetConfig, where, _PAPER_NAMES, **kwargs))


def resnext_cifar(depth: int = 29, cardinality: int = 8, bottleneck_width: int = 64, **kwargs: Any) -> ResNet:
    """ResNeXt-29 (C x d) on CIFAR (Xie 2017 sec. 5.3): 3x3 stem of 64 maps, 3 stages of bottleneck units
    with 256/512/1024 output maps (L = 9n + 2) and C x d, 2 C x d, 4 C x d in the grouped 3x3 convolutions."""
    where = "resnext (CIFAR)"
    no_dropout(where, kwargs)
    if "layers" not in kwargs:
        n = blocks_per_stage(int(depth), 3, 2, "a CIFAR ResNeXt")
        kwargs["layers"] = (n, n, n)
    _no_groups(where, kwargs)
    kwargs.setdefault("planes", (64, 128, 256))
    kwargs.setdefault("stem_width", 64)
    kwargs.setdefault("shortcut", "B")
    return ResNet(config_from_options(ResNetConfig, where, _PAPER_NAMES, bottleneck=True, groups=cardinality,
                                            width_per_group=bottleneck_width, **kwargs))


__all__ = ["IMAGENET_LAYERS", "resnet_cifar", "resnet_imagenet", "resnext_cifar", "resnext_imagenet"]
