"""DenseNet, DenseNet-B, -C and -BC (Huang, Liu, van der Maaten, Weinberger, CVPR 2017).

Notation of the paper: growth rate k (`growth_rate`), compression theta (`compression`), bottleneck B
(`bottleneck`, width `bn_size * k`). Layer l of a block computes x_l = H_l([x_0, x_1, ..., x_{l-1}]).

Module names follow torchvision (`features.denseblock1.denselayer1.norm1`, `transition1`, `norm5`,
`classifier`), the de facto DenseNet checkpoint format, so published checkpoints load unchanged.

Two implementations of a dense block compute the same function:
- the fused path (default, `fused=True`, see the `fused` package): one feature buffer per block that every
  layer writes its k maps into, batch statistics computed once per feature map and shared by every
  layer (and the transition) that reads it, 1x1 convolutions as matrix products. Exact, leaner, and
  faster than torchvision on the two CPUs measured, though not than its channels_last on every one
  (BENCHMARKS.md); activation memory is linear in depth, and `memory_efficient=True`
  additionally recomputes each layer's bottleneck in the backward pass instead of storing it.
- the reference path (`fused=False`): concatenation per layer, as the paper's equation reads and as
  torchvision computes it; `memory_efficient=True` checkpoints the concat-BN-ReLU-Conv1x1 part.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..utils.validate import check_types, needing
from . import _inference, _torch_compat
from . import fused as _fused
from .common import ClassifierMixin, StagesMixin, check_image_batch, config_from_options, dropout, init_weights

# Table 1 of the paper: layers per dense block of the ImageNet DenseNet-BC networks (k = 32).
IMAGENET_BLOCKS = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32), 201: (6, 12, 48, 32), 264: (6, 12, 64, 48)}


def compressed_channels(m: int, theta: float) -> int:
    """floor(theta * m), in exact arithmetic: float(0.29) * 100 is 28.999..., the paper means 29."""
    return math.floor(Fraction(str(theta)) * m)


@dataclass(frozen=True)
class DenseNetConfig:
    """The structure of a DenseNet, in the paper's terms."""

    growth_rate: int = 12  # k: feature maps each layer adds
    block_config: tuple[int, ...] = (16, 16, 16)  # layers per dense block
    bottleneck: bool = True  # B: BN-ReLU-Conv1x1(bn_size*k) before each 3x3 convolution
    compression: float = 0.5  # theta: a transition after a block of m maps outputs floor(theta*m)
    num_init_features: int | None = None  # stem maps; None: 2k with bottleneck (BC), else 16 (CIFAR)
    bn_size: int = 4  # bottleneck width in multiples of k (4k in the paper)
    drop_rate: float = 0.0  # dropout after every convolution but the first (0.2 without augmentation)
    num_classes: int = 10
    in_channels: int = 3
    stem: Literal["cifar", "imagenet"] = "cifar"  # 3x3 conv; or 7x7/2 conv, BN, ReLU, 3x3/2 max pool
    memory_efficient: bool = False  # recompute each layer's BN-ReLU-Conv input in the backward pass
    # shared feature buffer and shared BN statistics (exact; see fused/); "auto": the path measured
    # faster on the device the model runs on (fused/policy.FUSED_BY_DEVICE): the fused one on the CPU, the
    # reference one on CUDA (not yet measured there; fused=True opts in) and on other devices
    fused: bool | Literal["auto"] = "auto"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        need = needing("DenseNetConfig: ")
        check_types(self, "DenseNetConfig")  # a list or string from a config file: a clear error
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))
        need(isinstance(self.growth_rate, int) and self.growth_rate >= 1,
             f"growth_rate (k) must be a positive integer, got {self.growth_rate!r}")
        need(len(self.block_config) >= 1 and all(n >= 1 for n in self.block_config),
             f"block_config needs at least one block of at least one layer, got {self.block_config}")
        need(0.0 < self.compression <= 1.0, f"compression (theta) must satisfy 0 < theta <= 1, got {self.compression}")
        need(0.0 <= self.drop_rate < 1.0, f"drop_rate must be in [0, 1), got {self.drop_rate}")
        need(self.num_classes >= 0, f"num_classes must be >= 0 (0: no classifier), got {self.num_classes}")
        need(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        need(self.bn_size >= 1, f"bn_size must be >= 1, got {self.bn_size}")
        need(self.stem in ("cifar", "imagenet"), f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        need(self.num_init_features is None or self.num_init_features >= 1,
             f"num_init_features must be >= 1, got {self.num_init_features}")
        # sizes beyond any machine: an error here, not an integer overflow inside PyTorch
        need(sum(self.block_config) <= 10_000, f"at most 10,000 layers in all, got {sum(self.block_config)}")
        widest = max(self.in_channels, self.num_classes, self.bn_size * self.growth_rate,
                     self.init_features + sum(self.block_config) * self.growth_rate)
        need(widest <= 2 ** 20, f"at most 2**20 (1,048,576) channels or classes in any layer, got {widest:,}")
        c = self.init_features
        for n in self.block_config[:-1]:
            c = compressed_channels(c + n * self.growth_rate, self.compression)
            need(c >= 1, f"compression {self.compression} leaves a transition with no output maps")

    @property
    def init_features(self) -> int:
        if self.num_init_features is not None:
            return self.num_init_features
        return 2 * self.growth_rate if (self.bottleneck or self.stem == "imagenet") else 16

    @property
    def min_input_size(self) -> int:
        """Smallest height/width that keeps at least one pixel through every downsampling."""
        size = 1
        while self._out_size(size) < 1:
            size += 1
        return size

    def _out_size(self, h: int) -> int:
        if self.stem == "imagenet":
            h = (h + 2 * 3 - 7) // 2 + 1  # 7x7 conv, stride 2, padding 3
            h = (h + 2 * 1 - 3) // 2 + 1 if h >= 1 else h  # 3x3 max pool, stride 2, padding 1
        for _ in self.block_config[:-1]:
            h //= 2  # 2x2 average pooling in each transition
        return h


def cifar_block_config(depth: int, bottleneck: bool, num_blocks: int = 3) -> tuple[int, ...]:
    """Layers per block of the CIFAR/SVHN networks: L = 3n + 4, or L = 6n + 4 with bottlenecks."""
    convs_per_layer = 2 if bottleneck else 1
    step = num_blocks * convs_per_layer
    n, rest = divmod(depth - (num_blocks + 1), step)
    if rest or n < 1:
        kind = "DenseNet-BC/-B (L = 6n + 4)" if bottleneck else "DenseNet (L = 3n + 4)"
        lower = max(n, 1) * step + num_blocks + 1
        near = f"{lower}, {lower + step}" if depth > lower else f"{lower}"
        raise ValueError(f"depth {depth} cannot be built for {kind}: valid depths are {near} (nearest), "
                         f"and in general {step + num_blocks + 1}, {2 * step + num_blocks + 1}, ... "
                         f"(every {step} layers)")
    return (n,) * num_blocks


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class DenseLayer(nn.Module):
    """H_l: BN-ReLU-Conv3x3(k); with bottleneck, BN-ReLU-Conv1x1(4k) then BN-ReLU-Conv3x3(k).

    Dropout follows each convolution, as in the authors' code (torchvision drops only after the 3x3).
    """

    def __init__(self, in_channels: int, cfg: DenseNetConfig):
        super().__init__()
        k, width = cfg.growth_rate, cfg.bn_size * cfg.growth_rate
        self.norm1 = nn.BatchNorm2d(in_channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv(in_channels, width if cfg.bottleneck else k, 1 if cfg.bottleneck else 3)
        if cfg.bottleneck:
            self.norm2 = nn.BatchNorm2d(width, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = _conv(width, k, 3)
        self.bottleneck = cfg.bottleneck
        self.drop_rate = cfg.drop_rate

    def layer_input(self, *features: torch.Tensor) -> torch.Tensor:
        """BN-ReLU-Conv of the concatenation [x_0, ..., x_{l-1}]: the part memory-efficient mode recomputes."""
        x = torch.cat(features, 1)  # (B, k0 + (l-1)k, H, W)
        return self.conv1(self.relu1(self.norm1(x)))

    def rest(self, y: torch.Tensor) -> torch.Tensor:
        """Dropout after the first convolution, then (bottleneck) BN-ReLU-Conv3x3 and dropout: (B, k, H, W)."""
        y = dropout(y, self.drop_rate, self.training)
        if self.bottleneck:
            y = dropout(self.conv2(self.relu2(self.norm2(y))), self.drop_rate, self.training)
        return y

    def forward(self, features: list[torch.Tensor], memory_efficient: bool = False) -> torch.Tensor:
        if memory_efficient and torch.is_grad_enabled():
            y = checkpoint(self.layer_input, *features, use_reentrant=False,
                           context_fn=lambda: (contextlib.nullcontext(), _restore_bn_buffers(self.norm1)))
        else:
            y = self.layer_input(*features)
        return self.rest(y)


class _restore_bn_buffers:
    """During recomputation, leave BN running statistics as the forward pass left them.

    torchvision, timm and efficient_densenet_pytorch update them a second time here (effective
    momentum 0.19, num_batches_tracked + 2 per step); the authors' Lua code restores them, as we do.
    torch.utils.checkpoint enters this one object at every recomputation (a second backward pass over
    a retained graph recomputes again), so it is a reusable context manager, not a generator's.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        self.buffers = [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]

    def __enter__(self) -> None:
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buf, old in zip(self.buffers, self.saved):
                buf.copy_(old)


class DenseBlock(nn.ModuleDict):
    """num_layers dense layers; returns [x_0, x_1, ..., x_L] concatenated: k0 + L*k maps.

    Besides its layers the block owns two things that are not state (not in its state_dict, not
    copied or pickled with it): the scratch memory of the fused path, kept from one training step to
    the next (`scratch`, a `fused.ScratchPool`; `release_scratch()` frees it, and so does `.eval()`),
    and the eval-mode path's folded tensors (`frozen`, an `_inference.FrozenCache`). Given a
    `hand_over` (`DenseFeatures` gives one), it records there its output and the buffer and
    statistics behind it, for the transition after it."""

    def __init__(self, num_layers: int, in_channels: int, cfg: DenseNetConfig):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * cfg.growth_rate, cfg)
        self.memory_efficient = cfg.memory_efficient
        self.fused = cfg.fused
        self.scratch = _fused.ScratchPool()
        self.frozen = _inference.FrozenCache()

    def release_scratch(self) -> None:
        """Free the scratch memory the fused path keeps between training steps and the eval-mode path's
        workspace (CPU only)."""
        self.scratch.release()
        self.frozen.release_workspace()

    def train(self, mode: bool = True):
        if mode:  # training: the eval-mode path's workspace is not needed
            self.frozen.release_workspace()
        else:  # evaluation and after training: the fused path's scratch memory is not needed
            self.scratch.release()
        return super().train(mode)

    def forward(self, x0: torch.Tensor, hand_over: _fused.HandOver | None = None) -> torch.Tensor:
        layers = list(self.values())
        path = _block_path(self, layers, x0)
        if path == "eval":  # eval mode, no autograd: folded BN, one pixel-major buffer (_inference)
            out, source = _inference.dense_block_forward(self, layers, x0, hand_over is not None and hand_over.lend)
        elif path == "compiled":  # torch.compile: the fused arithmetic, written functionally
            return _fused.dense_block_traceable(layers, x0, self.memory_efficient)
        elif path == "fused":
            out, source = _fused.dense_block_forward(self, layers, x0, self.memory_efficient)
        else:  # the paper's equation, module by module
            features = [x0]
            for layer in layers:
                features.append(layer(features, self.memory_efficient))
            return torch.cat(features, 1)
        return out if hand_over is None else hand_over.give(out, source)


def _block_path(block: DenseBlock, layers: list[DenseLayer], x0: torch.Tensor) -> str:
    """The one place that says how a dense block computes: "reference" (its modules, as fused=False;
    inside `reference_path()` and while tracing with torch.jit or torch.fx), "eval" (eval mode
    without autograd, `_inference`), "fused" (training, or eval with autograd: the `fused` package) or
    "compiled" (the fused path's traceable twin, under torch.compile)."""
    if isinstance(x0, torch.fx.Proxy) or _fused.reference_path_active():
        return "reference"
    if not (_fused.default_fused(x0.device) if block.fused == "auto" else block.fused):
        return "reference"
    if not block.training and _inference.block_applies(block, layers, x0):
        return "eval"
    if not _fused.supported(layers) or _hooked_inside(block):
        return "reference"  # other BN modules, a private torch API missing, or hooks that must run
    return "compiled" if torch.compiler.is_compiling() else "fused"


def _hooked_inside(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook is registered on a module below `module` (a block's layers and
    their modules, a transition's), or for every module: the fused and eval paths call none of those
    modules, so their hooks (Grad-CAM on a convolution, say) need the reference path. (Hooks on a
    DenseBlock or Transition itself run on every path: those are called as modules.)"""
    if _torch_compat.global_forward_hooks_registered():  # (None, unknown: the modules' own hooks decide)
        return True
    return not _inference._no_hooks(m for m in module.modules() if m is not module)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1(floor(theta*m)) [-Dropout] -AvgPool2x2: between two dense blocks.

    Given the block's `hand_over` and that block's untouched output, it computes from the block's
    buffer and batch statistics (shared, not recomputed; `_transition_path`); any other input takes
    the modules below, as nn.Sequential runs them."""

    def __init__(self, in_channels: int, out_channels: int, cfg: DenseNetConfig):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv = _conv(in_channels, out_channels, 1)
        if cfg.drop_rate > 0:
            self.drop = nn.Dropout(cfg.drop_rate)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, hand_over: _fused.HandOver | None = None) -> torch.Tensor:
        # (compiled on its own, `transition.compile()`: no block state to read, the compiler sees its modules)
        source = None if hand_over is None or torch.compiler.is_compiling() else hand_over.source_for(x)
        path = _transition_path(self, x, source)
        if path == "eval":
            return _inference.transition_forward(self, x, source)
        if path == "fused":
            return _fused.transition_forward(self, source, x)
        return super().forward(x)


def _transition_path(transition: Transition, x: torch.Tensor, source) -> str:
    """How a transition computes: "eval" or "fused" from the state its block handed over for x
    (`source`: an `_inference.FrozenOutput` or the fused block's state), else "reference" (its modules)."""
    if source is None:
        return "reference"
    if _hooked_inside(transition):  # hooks on its BN, ReLU, convolution or pooling: call those modules
        return "reference"
    if not transition.training and _inference.transition_applies(transition, x, source):
        return "eval"
    if _fused.transition_supported(transition, source):
        return "fused"
    return "reference"


class DenseFeatures(nn.Sequential):
    """`DenseNet.features`: the stem, the dense blocks joined by transitions, norm5 and relu5, with
    torchvision's names (and so its state-dict keys). It runs its modules in order as nn.Sequential
    does, and hands each dense block's output and state to the transition after it explicitly
    (`step`, a `fused.HandOver` per block and pass). Both are called as modules, so their hooks run;
    an output a hook replaces is computed from the transition's own modules. Eager only: under
    torch.compile the blocks take the fused path's traceable twin and the transitions their modules;
    under torch.jit.trace and torch.fx both are the paper's modules. A block wrapped in another module
    (FSDP, a checkpoint wrapper) is not recognised here: it still runs as itself, but its transition
    computes from its own modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hand_over = None
        for module in self:  # nothing but the next module sees a block's output: it may be lent
            x, hand_over = self.step(module, x, hand_over, lend=True)
        return x

    @staticmethod
    def step(module: nn.Module, x: torch.Tensor, hand_over: _fused.HandOver | None, lend: bool = False):
        """Run one of the features' modules on x: (its output, what it hands the next module). `lend`:
        nothing but the next module keeps a dense block's output (`fused.HandOver.lend`)."""
        if isinstance(module, DenseBlock) and not _traced(x):
            hand_over = _fused.HandOver(lend)  # by keyword: hooks (without with_kwargs) see the input (x,)
            return module(x, hand_over=hand_over), hand_over
        if isinstance(module, Transition) and hand_over is not None:
            return module(x, hand_over=hand_over), None
        return module(x), None


def _traced(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)


class DenseNet(StagesMixin, ClassifierMixin, nn.Module):
    """Stem, dense blocks joined by transitions, then BN-ReLU-global average pool-linear classifier.
    `reduction`, `stage_strides`, `feature_info` and `forward_head` come from common.py."""

    def __init__(self, cfg: DenseNetConfig):
        super().__init__()
        self.config = cfg
        c = cfg.init_features
        self.features = DenseFeatures()
        if cfg.stem == "imagenet":
            self.features.add_module("conv0", _conv(cfg.in_channels, c, 7, stride=2))
            self.features.add_module("norm0", nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum))
            self.features.add_module("relu0", nn.ReLU(inplace=True))
            self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        else:
            self.features.add_module("conv0", _conv(cfg.in_channels, c, 3))
        self.stem_channels = c
        self.stage_channels: list[int] = []
        for i, n in enumerate(cfg.block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, cfg))
            c += n * cfg.growth_rate
            self.stage_channels.append(c)
            if i < len(cfg.block_config) - 1:
                out = compressed_channels(c, cfg.compression)
                self.features.add_module(f"transition{i + 1}", Transition(c, out, cfg))
                c = out
        self.features.add_module("norm5", nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum))
        self.features.add_module("relu5", nn.ReLU())  # a module, not in place: hooks (Grad-CAM) see it
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.num_features = c
        init_weights(self)

    def release_scratch(self) -> None:
        """Free the scratch memory the fused dense blocks keep between training steps (`.eval()` does too)."""
        for m in self.modules():
            if isinstance(m, DenseBlock):
                m.release_scratch()

    def check_input(self, x: torch.Tensor) -> None:
        check_image_batch(x, model="DenseNet", in_channels=self.config.in_channels,
                          min_size=self.config.min_input_size, reduction=self.reduction,
                          weight=self.features.conv0.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Activated feature maps before pooling: (B, num_features, H/r, W/r)."""
        return self._in_input_format(self.features(self._stem_input(x)), x)

    def _in_input_format(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The eval-mode path computes channels_last; the final features come back in the memory format of
        # the input (a copy of the last, smallest maps), so that e.g. .view(B, -1) works as before
        if isinstance(out, torch.fx.Proxy) or self.training or out.is_contiguous() \
                or not out.is_contiguous(memory_format=torch.channels_last):
            return out
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return out
        return out.contiguous()

    def _stem_input(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.config.stem == "imagenet" and not isinstance(x, torch.fx.Proxy) and _inference.stem_applies(self, x):
            # eval on the CPU: the stem in channels_last (its 7x7 convolution, BN and max pooling) hands the
            # first block its input in the block buffer's layout; 1.08x for DenseNet-121 at batch 1 and 32
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def stem_module(self) -> str:
        """The stem's last module before the first block's pooling: relu0 (ImageNet), conv0 (CIFAR)."""
        return "features.relu0" if self.config.stem == "imagenet" else "features.conv0"

    def stage_module(self, i: int) -> str:
        """The module whose output is stage i of `forward_stages` (a dense block; the last: after norm5-relu5)."""
        return f"features.denseblock{i + 1}" if i < len(self.stage_channels) - 1 else "features.relu5"

    def _pyramid(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        """The stem's output, then every dense block's (the last after norm5-relu5), up to index `last`."""
        n = len(self.stage_channels)
        last = n if last is None else last
        inp, x = x, self._stem_input(x)
        stem = self.stem_module.split(".")[-1]
        feats, hand_over = [], None
        for name, module in self.features.named_children():
            x, hand_over = DenseFeatures.step(module, x, hand_over)
            if name == stem or name.startswith("denseblock"):
                feats.append(x)
                if len(feats) > last and len(feats) <= n:  # stop early: not the last block
                    return feats
        feats[-1] = self._in_input_format(x, inp)  # after norm5 and relu5
        return feats

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then each dense layer
        (each dense block and transition with `coarse`); the same patterns as timm's DenseNet."""
        stem = r"^features\.conv[012]|features\.norm[012]|features\.pool[012]"
        if coarse:
            return {"stem": stem, "blocks": r"^features\.(?:denseblock|transition)(\d+)"}
        return {"stem": stem, "blocks": [(r"^features\.denseblock(\d+)\.denselayer(\d+)", None),
                                         (r"^features\.transition(\d+)", (99999,))]}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for `memory_efficient`: recompute each dense layer's concatenation-BN-ReLU-conv1x1
        in the backward pass (the same numbers, less memory)."""
        for m in self.modules():
            if isinstance(m, DenseBlock):
                m.memory_efficient = bool(enable)
        self.config = dataclasses.replace(self.config, memory_efficient=bool(enable))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- Builders: the CIFAR/SVHN networks by depth (Table 2), the ImageNet ones (Table 1) ----------------

def densenet_cifar(depth: int = 100, growth_rate: int = 12, bottleneck: bool = True,
                   compression: float = 0.5, **kwargs: Any) -> DenseNet:
    """A 3-block CIFAR/SVHN DenseNet given by its depth L: n = (L - 4) / 3, or (L - 4) / 6 with bottlenecks."""
    if "block_config" in kwargs:
        raise ValueError("give either depth or block_config, not both (depth sets the blocks)")
    if not isinstance(depth, int) or isinstance(depth, bool):
        raise ValueError(f"densenet (CIFAR): depth must be an integer, got {depth!r}")
    blocks = cifar_block_config(depth, bool(bottleneck))
    return DenseNet(config_from_options(DenseNetConfig, "densenet (CIFAR)", ("depth",), growth_rate=growth_rate,
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
    return DenseNet(config_from_options(DenseNetConfig, "densenet (ImageNet)", ("depth",),
                                        growth_rate=growth_rate, stem="imagenet", **kwargs))


__all__ = ["DenseNet", "DenseNetConfig", "DenseLayer", "DenseBlock", "Transition", "DenseFeatures", "cifar_block_config",
           "compressed_channels", "densenet_cifar", "densenet_imagenet", "IMAGENET_BLOCKS", "init_weights"]
