"""Pre-activation ResNets (He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", 2016)
and Wide ResNets (Zagoruyko and Komodakis 2016), both on CIFAR.

Both are `ResNet`s of resnet.py with full pre-activation units, F = BN-ReLU-conv-BN-ReLU-conv and
nothing after the addition, and a final BN-ReLU before pooling:
- Pre-activation ResNet: ResNet-110 (basic units, L = 6n + 2, zero-padding shortcuts as He 2015's
  ResNet-110), ResNet-164 and -1001 (bottleneck units 16/32/64 wide with 4x expansion, L = 9n + 2,
  1x1 convolution shortcuts where the shape changes, as the authors' code). The authors' code strides a
  bottleneck's first 1x1 convolution: `stride_in_1x1=True` (0.245 / 1.488 GMACs for ResNet-164 / -1001,
  the same parameters); the default strides the 3x3, which gives SPEC.md's 0.248 / 1.491.
  The other units of the paper's Fig. 4 / Table 2 are `unit=` "original", "bn_after_addition",
  "relu_before_addition", "relu_preact"; the shortcuts of Fig. 2 / Table 1 are `shortcut_variant=`
  "scaling" (with `scaling=(lambda_h, lambda_F)`), "exclusive_gating", "shortcut_only_gating" (with
  `gate_bias=b_g`), "conv1x1" and "dropout" (see resnet.py). Table 1 varies the shortcut of the
  original units: preact_resnet110 with unit="original" is He 2015's ResNet-110.
- WRN-d-k: basic pre-activation units k times wider (16k, 32k, 64k maps), (d - 4) / 6 per stage, 1x1
  convolution shortcuts where the shape changes, `drop_rate` between the two convolutions.
"""
from __future__ import annotations

from typing import Any

from .common import config_from_options
from .resnet import ResNet, ResNetConfig, blocks_per_stage, no_dropout


def preact_resnet_cifar(depth: int = 164, bottleneck: bool = True, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-110 (bottleneck=False), -164 and -1001 (He 2016 Tables 2-4)."""
    where = "preact_resnet (CIFAR)"
    no_dropout(where, kwargs)
    if "layers" not in kwargs:
        n = blocks_per_stage(int(depth), 3 if bottleneck else 2, 2,
                             "a pre-activation ResNet with bottleneck units" if bottleneck else
                             "a pre-activation ResNet with basic units")
        kwargs["layers"] = (n, n, n)
    kwargs.setdefault("planes", (16, 32, 64))
    kwargs.setdefault("stem_width", 16)
    kwargs.setdefault("unit", "full_preact")
    kwargs.setdefault("shortcut", "B" if bottleneck else "A")
    return ResNet(config_from_options(ResNetConfig, where, ("depth",), bottleneck=bottleneck, **kwargs))


def wide_resnet(depth: int = 28, widen_factor: int = 10, **kwargs: Any) -> ResNet:
    """WRN-d-k (Zagoruyko and Komodakis 2016): d = depth, k = widen_factor; `drop_rate` between the
    convolutions (0.3 on CIFAR, 0.4 on SVHN in the paper)."""
    where = "wide_resnet (CIFAR)"
    if "layers" not in kwargs:
        n = blocks_per_stage(int(depth), 2, 4, "a Wide ResNet")
        kwargs["layers"] = (n, n, n)
    k = int(widen_factor)
    if k < 1:
        raise ValueError(f"{where}: widen_factor (k) must be >= 1, got {widen_factor}")
    kwargs.setdefault("planes", (16 * k, 32 * k, 64 * k))
    kwargs.setdefault("stem_width", 16)
    kwargs.setdefault("unit", "full_preact")
    kwargs.setdefault("shortcut", "B")
    return ResNet(config_from_options(ResNetConfig, where, ("depth", "widen_factor"), **kwargs))


__all__ = ["preact_resnet_cifar", "wide_resnet"]
