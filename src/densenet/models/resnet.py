"""The residual network every baseline family is built from (its units, shortcuts and stages), and
the builders of deep residual networks (He, Zhang, Ren, Sun 2015), their plain counterparts, stochastic
depth (Huang, Sun, Liu, Sedra, Weinberger 2016) and ResNeXt (Xie, Girshick, Dollar, Tu, He 2017).
preact.py builds the pre-activation and Wide ResNets from the same class.

A residual unit computes, in the notation of "Identity Mappings in Deep Residual Networks" (He et al.
2016, eq. 1-2),

    y_l = h(x_l) + F(x_l),        x_{l+1} = f(y_l)

with h the shortcut, F the residual branch (two 3x3 convolutions, or the 1x1-3x3-1x1 bottleneck) and
f what follows the addition. The families differ only in data:
- ResNet (He et al. 2015): original units (F = conv-BN-ReLU-conv-BN, f = ReLU); where the shape changes,
  h zero-pads (option A, CIFAR) or projects with a 1x1 convolution (option B, ImageNet). Plain nets
  have no h at all.
- Pre-activation ResNet (He et al. 2016): F = BN-ReLU-conv-BN-ReLU-conv, f = identity; the other orders
  of its Fig. 4 are `UNITS` below, and the shortcut variants of its Fig. 2 / Table 1 are options.
- Stochastic depth (Huang et al. 2016): F is dropped in training with probability 1 - p_l and scaled
  by p_l at test time.
- Wide ResNet (Zagoruyko and Komodakis 2016): pre-activation units k times wider, dropout between
  the convolutions. ResNeXt (Xie et al. 2017): the bottleneck's 3x3 convolution has C groups.

Module names are torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, `fc`), so its
ResNet and ResNeXt checkpoints load unchanged.

The builders at the end of this file make original units (conv-BN-ReLU-conv-BN, addition, ReLU); a name
is a depth and a few options:
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

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..utils.validate import check_types, needing
from .common import ClassifierMixin, StagesMixin, check_image_batch, config_from_options, init_weights

# Fig. 4 of He et al. 2016: where BN and ReLU sit. Per variant, the residual branch F with two weight
# layers (basic unit), with three (bottleneck unit), and f, what follows the addition. bnN belongs to
# convN: after it in the post-activation orders, before it in the pre-activation ones.
UNITS = {
    "original":             ("conv1 bn1 relu conv2 bn2",      "conv1 bn1 relu conv2 bn2 relu conv3 bn3",      "relu"),
    "bn_after_addition":    ("conv1 bn1 relu conv2",          "conv1 bn1 relu conv2 bn2 relu conv3",          "bn_out relu"),
    "relu_before_addition": ("conv1 bn1 relu conv2 bn2 relu", "conv1 bn1 relu conv2 bn2 relu conv3 bn3 relu", ""),
    "relu_preact":          ("relu conv1 bn1 relu conv2 bn2", "relu conv1 bn1 relu conv2 bn2 relu conv3 bn3", ""),
    "full_preact":          ("bn1 relu conv1 bn2 relu conv2", "bn1 relu conv1 bn2 relu conv2 bn3 relu conv3", ""),
}

# Fig. 2 / Table 1 of He et al. 2016: what the shortcut does (on the original units of ResNet-110).
#   identity              y = h(x) + F(x)
#   scaling               y = lambda_h h(x) + lambda_F F(x)        (`scaling`; (0, 1) is a plain net)
#   exclusive_gating      y = (1 - g(x)) h(x) + g(x) F(x)          g(x) = sigmoid(W_g x + b_g), 1x1 conv
#   shortcut_only_gating  y = (1 - g(x)) h(x) + F(x)
#   conv1x1               h is a 1x1 convolution in every unit (option C of He 2015)
#   dropout               h(x) = dropout(x)                        (`shortcut_dropout`, 0.5 in the paper)
SHORTCUT_VARIANTS = ("identity", "scaling", "exclusive_gating", "shortcut_only_gating", "conv1x1", "dropout")

BOTTLENECK_EXPANSION = 4  # a bottleneck unit outputs 4x the width of its 3x3 convolution


@dataclass(frozen=True)
class ResNetConfig:
    """The structure of a residual network, in the papers' terms."""

    layers: tuple[int, ...] = (3, 3, 3)  # residual units per stage (n each: 6n + 2 layers on CIFAR)
    planes: tuple[int, ...] = (16, 32, 64)  # per stage: a basic unit's output, a bottleneck's 3x3 width
    bottleneck: bool = False  # 1x1-3x3-1x1 units (He 2015 Fig. 5 right), output 4 x planes
    groups: int = 1  # C, cardinality (ResNeXt): groups of the bottleneck's 3x3 convolution
    width_per_group: int = 64  # d (ResNeXt): the 3x3 convolution has C * d * planes / 64 maps
    stem: Literal["cifar", "imagenet"] = "cifar"  # 3x3 conv; or 7x7/2 conv, BN, ReLU, 3x3/2 max pool
    stem_width: int = 16  # output maps of the first convolution
    unit: str = "original"  # where BN and ReLU sit (He 2016 Fig. 4): a key of UNITS
    shortcut: Literal["A", "B", "C"] = "A"  # He 2015: where the shape changes, A zero-pads, B projects;
    #                                         C projects in every unit
    residual: bool = True  # False: the plain counterpart (same layers, no shortcuts)
    shortcut_variant: str = "identity"  # He 2016 Table 1: one of SHORTCUT_VARIANTS
    scaling: tuple[float, float] = (0.5, 0.5)  # (lambda on h, lambda on F) for shortcut_variant="scaling"
    gate_bias: float = -6.0  # initial b_g of the gates (Table 1: -6 trains best)
    shortcut_dropout: float = 0.5  # dropout rate on h for shortcut_variant="dropout"
    drop_rate: float = 0.0  # dropout between the convolutions, after the ReLU (Wide ResNet)
    stochastic_depth: float | None = None  # p_L, survival probability of the last unit; None: off
    stride_in_1x1: bool = False  # bottleneck: stride-2 on the first 1x1 (He 2015's Caffe models) instead
    #                              of the 3x3 (torchvision's weights, ResNeXt)
    downsample: Literal["subsample", "avgpool"] = "subsample"  # option A's spatial reduction: every
    #   stride-th pixel (He 2015's code; Stochastic_Depth's 1x1 average pool of stride 2 until 2017), or a
    #   stride x stride average pool (Stochastic_Depth ResidualDrop.lua since 8389752, see ZeroPadShortcut)
    init: Literal["fan_out", "fan_in"] = "fan_out"  # He initialisation of the convolutions (init_weights)
    num_classes: int = 10
    in_channels: int = 3
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        need = needing("ResNetConfig: ")
        check_types(self, "ResNetConfig")  # a list or string from a config file or --model-arg: a clear error
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "planes", tuple(int(p) for p in self.planes))
        object.__setattr__(self, "scaling", tuple(float(s) for s in self.scaling))
        need(len(self.layers) >= 1 and all(n >= 1 for n in self.layers),
             f"layers needs at least one stage of at least one unit, got {self.layers}")
        need(sum(self.layers) <= 10_000, f"at most 10,000 units in all, got {sum(self.layers):,}")  # as DenseNet's
        need(len(self.planes) == len(self.layers) and all(p >= 1 for p in self.planes),
             f"planes needs one positive width per stage ({len(self.layers)}), got {self.planes}")
        need(self.groups >= 1 and self.width_per_group >= 1, "groups (C) and width_per_group (d) must be >= 1")
        need(self.bottleneck or (self.groups == 1 and self.width_per_group == 64),
             "groups (C) and width_per_group (d) apply to bottleneck units only (ResNeXt)")
        need(self.bottleneck or not self.stride_in_1x1, "stride_in_1x1 applies to bottleneck units only")
        need(self.stem in ("cifar", "imagenet"), f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        need(self.stem_width >= 1, f"stem_width must be >= 1, got {self.stem_width}")
        need(self.unit in UNITS, f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        need(self.shortcut in ("A", "B", "C"), f"shortcut must be 'A', 'B' or 'C', got {self.shortcut!r}")
        need(self.shortcut_variant in SHORTCUT_VARIANTS,
             f"shortcut_variant must be one of {', '.join(SHORTCUT_VARIANTS)}, got {self.shortcut_variant!r}")
        need(len(self.scaling) == 2, f"scaling is (lambda on h, lambda on F), got {self.scaling}")
        need(self.residual or (self.shortcut_variant == "identity" and self.stochastic_depth is None),
             "a plain network (residual=False) has no shortcut to vary and no residual branch to drop")
        need(0.0 <= self.shortcut_dropout < 1.0, f"shortcut_dropout must be in [0, 1), got {self.shortcut_dropout}")
        need(0.0 <= self.drop_rate < 1.0, f"drop_rate must be in [0, 1), got {self.drop_rate}")
        need(self.stochastic_depth is None or 0.0 < self.stochastic_depth <= 1.0,
             f"stochastic_depth is p_L, the last unit's survival probability: 0 < p_L <= 1, "
             f"got {self.stochastic_depth}")
        need(self.num_classes >= 0, f"num_classes must be >= 0 (0: no classifier), got {self.num_classes}")
        need(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        if self.residual and self.shortcut == "A" and self.shortcut_variant != "conv1x1":
            c = self.stem_width
            for p in self.planes:
                need(self.out_channels(p) >= c, f"option A zero-pads the shortcut, so a stage cannot narrow "
                                                f"({c} -> {self.out_channels(p)} maps); use shortcut='B'")
                c = self.out_channels(p)

    def out_channels(self, planes: int) -> int:
        return planes * BOTTLENECK_EXPANSION if self.bottleneck else planes

    def inner_width(self, planes: int) -> int:
        """Width of a bottleneck's 3x3 convolution: C * d * planes / 64 (64 per group for plain ResNets)."""
        return int(planes * self.width_per_group / 64) * self.groups

    @property
    def preactivation(self) -> bool:
        """Units that normalise their input rather than their output (He 2016 Fig. 4 d, e)."""
        return not UNITS[self.unit][0].startswith("conv")

    @property
    def num_units(self) -> int:
        return sum(self.layers)

    def survival_probabilities(self) -> list[float]:
        """Stochastic depth's linear decay rule: p_l = 1 - l / L * (1 - p_L), l = 1..L units."""
        if self.stochastic_depth is None:
            return [1.0] * self.num_units
        n = self.num_units
        return [1.0 - l / n * (1.0 - self.stochastic_depth) for l in range(1, n + 1)]


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A of He 2015: keep every stride-th pixel and append zero maps up to `out_channels`
    (as the authors' Torch code, which concatenates x with 0 * x). No parameters.

    `pool=True`: average each stride x stride window instead, as yueatsprograms/Stochastic_Depth
    ResidualDrop.lua:32 since commit 8389752d464ce2769aca94c7c551a1f492e87bca ("Bug in Average Pooling
    layer", 2017-02-11: `nn.SpatialAveragePooling(stride, stride, stride, stride)`), then the same zero
    maps appended after the input's (:36, `nn.Padding(1, nOutChannels - nChannels, 3)`). Before that
    commit, and so for the paper's numbers (camera-ready code 86b5cddd97841d2586ce0047f476eba0568efc95,
    :32), the pool was 1x1 with stride 2: the subsample."""

    def __init__(self, out_channels: int, stride: int, pool: bool = False):
        super().__init__()
        self.out_channels, self.stride, self.pool = out_channels, stride, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool and self.stride > 1:
            # (B, C_in, ceil(H/s), ceil(W/s)): the strided convolution's size; on odd sizes the last window
            # averages the pixels it has (the Lua's pool would not fit there at all)
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        else:
            x = x[:, :, ::self.stride, ::self.stride]  # (B, C_in, ceil(H/s), ceil(W/s))
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))  # (B, C_out, ...)


class ResidualUnit(nn.Module):
    """y = h(x) + F(x), x' = f(y), with F and f in the order of `cfg.unit` (see UNITS).

    A pre-activation unit that changes the shape, or follows conv1, activates its input before the split,
    so that h and F read the same BN-ReLU(x): He 2016 sec. 4.1 ("we adopt the first activation right
    after conv1 and before splitting into two paths") and the authors' code ("both_preact"), as the
    Wide ResNet code.
    """

    def __init__(self, in_channels: int, planes: int, stride: int, cfg: ResNetConfig, first_unit: bool = False):
        super().__init__()
        out = cfg.out_channels(planes)
        if cfg.bottleneck:
            width = cfg.inner_width(planes)
            s1, s3 = (stride, 1) if cfg.stride_in_1x1 else (1, stride)
            convs = [conv1x1(in_channels, width, s1), conv3x3(width, width, s3, cfg.groups), conv1x1(width, out)]
        else:
            convs = [conv3x3(in_channels, planes, stride), conv3x3(planes, out)]
        branch = UNITS[cfg.unit][1 if cfg.bottleneck else 0].split()
        after = UNITS[cfg.unit][2].split()
        if cfg.drop_rate > 0:  # before every convolution but the first: between them, after the ReLU (WRN)
            branch = [o for op in branch for o in (["drop", op] if op in ("conv2", "conv3") else [op])]
            self.drop = nn.Dropout(cfg.drop_rate)
        c = in_channels
        for op in branch + after:  # each BN gets the width of the tensor it normalises
            if op.startswith("conv"):
                conv = convs[int(op[4:]) - 1]
                setattr(self, op, conv)
                c = conv.out_channels
            elif op.startswith("bn"):
                setattr(self, op, nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum))
        self.relu = nn.ReLU()  # not in place: x still feeds the shortcut; hooks see the activations
        reshapes = stride != 1 or in_channels != out
        k = branch.index("conv1")
        self.share_preact = k > 0 and (reshapes or first_unit)
        self.preact_ops = branch[:k] if self.share_preact else []
        self.branch_ops = branch[k:] if self.share_preact else branch
        self.after_ops = after

        self.has_shortcut = cfg.residual
        self.variant = cfg.shortcut_variant
        self.downsample: nn.Module | None = None
        if cfg.residual and (cfg.shortcut == "C" or self.variant == "conv1x1" or (reshapes and cfg.shortcut == "B")):
            proj = [conv1x1(in_channels, out, stride)]
            if not cfg.preactivation:  # post-activation: conv-BN, as F ends in BN; pre-activation: conv only
                proj.append(nn.BatchNorm2d(out, eps=cfg.bn_eps, momentum=cfg.bn_momentum))
            self.downsample = nn.Sequential(*proj)
        elif cfg.residual and reshapes:
            self.downsample = ZeroPadShortcut(out, stride, pool=cfg.downsample == "avgpool")
        if self.variant in ("exclusive_gating", "shortcut_only_gating"):
            self.gate = nn.Conv2d(in_channels, out, 1, stride=stride, bias=True)  # g(x) = sigmoid(W_g x + b_g)
        self.scaling = cfg.scaling
        self.shortcut_dropout = cfg.shortcut_dropout
        self.survival_prob = 1.0  # stochastic depth's p_l, set by the network
        self.out_channels = out

    def _run(self, ops: list[str], x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = getattr(self, op)(x)
        return x

    def residual_scale(self) -> float:
        """Stochastic depth: in training F survives with probability p_l (one draw per mini-batch, from
        the CPU generator: `torch.manual_seed` makes it repeatable); at test time F is scaled by p_l.
        A dropped unit leaves its parameters without gradients: DistributedDataParallel then needs
        find_unused_parameters=True."""
        p = self.survival_prob
        if p >= 1.0:
            return 1.0
        if self.training:
            return 1.0 if torch.rand((), device="cpu").item() < p else 0.0
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x_l: (B, C_in, H, W)
        x = self._run(self.preact_ops, x)  # shared pre-activation: h and F both read it
        scale = self.residual_scale()
        f = self._run(self.branch_ops, x) if scale else None  # F(x_l): (B, C_out, H/s, W/s)
        if f is not None and scale != 1.0:
            f = f * scale  # test time under stochastic depth: p_l F(x_l)
        y = self.merge(x, f)  # y_l = h(x_l) + F(x_l)
        return self._run(self.after_ops, y)  # x_{l+1} = f(y_l)

    def merge(self, x: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        """h(x) + F(x) with He 2016's shortcut variants; f is None where stochastic depth dropped F."""
        if not self.has_shortcut:
            return f  # plain network
        h = x if self.downsample is None else self.downsample(x)
        if self.variant == "dropout":
            h = F.dropout(h, self.shortcut_dropout, self.training)
        elif self.variant == "scaling":
            h, f = self.scaling[0] * h, None if f is None else self.scaling[1] * f
        elif self.variant in ("exclusive_gating", "shortcut_only_gating"):
            g = torch.sigmoid(self.gate(x))
            h = (1 - g) * h
            if self.variant == "exclusive_gating" and f is not None:
                f = g * f
        return h if f is None else h + f


class ResNet(StagesMixin, ClassifierMixin, nn.Module):
    """Stem, stages of residual units (stride 2 at the first unit of every stage but the first),
    then [BN-ReLU for pre-activation units,] global average pooling and a fully connected layer.
    `reduction`, `stage_strides`, `feature_info` and `forward_head` come from common.py."""

    classifier_name = "fc"  # for weights.load_pretrained: torchvision's names
    pool_name = "avgpool"
    first_conv_name = "conv1"

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.config = cfg
        c = cfg.stem_width
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_channels, c, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(cfg.in_channels, c)
        if not cfg.preactivation or cfg.stem == "imagenet":  # He 2015: conv1 is followed by BN-ReLU
            self.bn1 = nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
            self.relu = nn.ReLU()
        if cfg.stem == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stem_channels = c
        self.stage_channels: list[int] = []
        for s, (n, planes) in enumerate(zip(cfg.layers, cfg.planes)):
            units = []
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                units.append(ResidualUnit(c, planes, stride, cfg, first_unit=(s == 0 and i == 0)))
                c = units[-1].out_channels
            self.add_module(f"layer{s + 1}", nn.Sequential(*units))
            self.stage_channels.append(c)
        if cfg.preactivation:  # He 2016: an extra activation after the last addition
            if "bn1" in UNITS[cfg.unit][0]:
                self.bn_final = nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
            self.relu_final = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.num_features = c
        for unit, p in zip(self.units(), cfg.survival_probabilities()):
            unit.survival_prob = p
        if self.conv1.weight.device.type != "meta":  # built to be counted (meta device): nothing to initialise
            init_weights(self, cfg.init)
            for unit in self.units():
                if hasattr(unit, "gate"):
                    nn.init.constant_(unit.gate.bias, cfg.gate_bias)

    def units(self) -> list[ResidualUnit]:
        return [m for m in self.modules() if isinstance(m, ResidualUnit)]

    def check_input(self, x: torch.Tensor) -> None:
        # every downsampling convolution is padded, so any image of at least one pixel goes through
        check_image_batch(x, model=getattr(self, "model_name", "ResNet"), in_channels=self.config.in_channels,
                          min_size=1, reduction=self.reduction, weight=self.conv1.weight)

    @property
    def stem_module(self) -> str:
        """The stem's last module before any pooling: its ReLU, or conv1 (pre-activation CIFAR stems)."""
        return "relu" if hasattr(self, "bn1") else "conv1"

    def stage_module(self, i: int) -> str:
        """The module whose output is stage i of `forward_stages` (the last: after the final activation)."""
        n = len(self.stage_channels)
        if i == n - 1 and hasattr(self, "relu_final"):
            return "relu_final"
        return f"layer{i + 1}"

    def _pyramid(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        """The stem's output, then every stage's (the last after the final activation), up to index `last`."""
        n = len(self.config.layers)
        last = n if last is None else last
        self.check_input(x)
        x = self.conv1(x)
        if hasattr(self, "bn1"):
            x = self.relu(self.bn1(x))
        feats = [x]
        if hasattr(self, "maxpool"):
            x = self.maxpool(x)
        for s in range(min(last, n)):
            x = self._stage(getattr(self, f"layer{s + 1}"), x)
            feats.append(x)
        if last < n:
            return feats
        if hasattr(self, "bn_final"):
            x = self.bn_final(x)
        if hasattr(self, "relu_final"):
            x = self.relu_final(x)
        feats[-1] = x
        return feats

    def _stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad):
            return stage(x)
        for unit in stage:
            x = checkpoint(unit, x, use_reentrant=False, context_fn=partial(_recompute_keeps_bn_stats, unit))
        return x

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: recompute each residual unit in the backward pass instead of keeping its
        activations (the same numbers, less memory; BN's running statistics are updated once, not again
        by the recomputation). Takes effect where gradients flow into the unit."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then each residual unit
        (each stage with `coarse`); the same patterns as timm's ResNet."""
        return {"stem": r"^conv1|bn1|maxpool", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Activated feature maps before pooling: (B, num_features, H/r, W/r)."""
        return self._pyramid(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@contextlib.contextmanager
def _bn_stats_restored(unit: nn.Module):
    """Put back the BN running statistics a recomputation in the backward pass updated a second time."""
    bns = [m for m in unit.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, n) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def _recompute_keeps_bn_stats(unit: nn.Module):
    """checkpoint's context_fn: nothing around the forward, the BN statistics kept around the recomputation."""
    return contextlib.nullcontext(), _bn_stats_restored(unit)


def blocks_per_stage(depth: int, layers_per_unit: int, extra: int, kind: str, stages: int = 3) -> int:
    """n from a CIFAR network's depth L = stages * layers_per_unit * n + extra (6n + 2, 9n + 2, 6n + 4)."""
    step = stages * layers_per_unit
    n, rest = divmod(depth - extra, step)
    if rest or n < 1:
        lower = max(n, 1) * step + extra
        near = f"{lower}, {lower + step}" if depth > lower else f"{lower}"
        raise ValueError(f"depth {depth} cannot be built for {kind} (L = {step}n + {extra}): valid depths "
                         f"are {near} (nearest), and in general {step + extra}, {2 * step + extra}, ...")
    return n


def no_dropout(where: str, kwargs: dict) -> None:
    """He 2015/2016 and ResNeXt train without dropout: refuse a recipe's drop_rate rather than invent one."""
    if "drop_rate" in kwargs:
        raise ValueError(f"{where}: unknown option drop_rate: these networks train without dropout "
                         f"(dropout between the convolutions is the Wide ResNet option, wrn_*)")


# --- Builders: He 2015's ImageNet and CIFAR ResNets (and plain nets), ResNeXt (Xie 2017) --------------

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


__all__ = ["ResNet", "ResNetConfig", "ResidualUnit", "ZeroPadShortcut", "UNITS", "SHORTCUT_VARIANTS",
           "IMAGENET_LAYERS", "blocks_per_stage", "conv1x1", "conv3x3", "resnet_cifar", "resnet_imagenet",
           "resnext_cifar", "resnext_imagenet"]
