"""Small pieces every model family shares: building a config from options, the input check, the
authors' initialisation, dropout with layout-independent masks, the stage and head API of a backbone.

Nothing here depends on a model family: DenseNet (densenet.py, with its fused path in fused/) and
the residual networks (resnet.py) both import from here, never from each other."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

C = TypeVar("C")


def config_from_options(cls: type[C], where: str, paper_names: tuple[str, ...] = (), **kwargs: Any) -> C:
    """A config dataclass from a builder's keyword options, naming the valid ones (the fields and the
    builder's own `paper_names`, such as depth) when one is unknown."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options are "
                         f"{', '.join(sorted(names | set(paper_names)))}")
    return cls(**kwargs)


def check_image_batch(x: torch.Tensor, *, model: str, in_channels: int, min_size: int, reduction: int,
                      weight: torch.Tensor | None = None) -> None:
    """Raise a clear error for what a network cannot read: not a tensor, not (B, C, H, W), other channel
    counts, integer pixels, another dtype or device than the first layer's `weight` (autocast aside),
    images smaller than `min_size` (the network downsamples by `reduction`). A torch.fx Proxy (symbolic
    tracing, torchvision's create_feature_extractor) has no values to check and passes."""
    if isinstance(x, torch.fx.Proxy):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{model} expects a 4-D batch (B, {in_channels}, H, W), got shape "
                         f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
    if x.shape[1] != in_channels:
        hint = " (channels last? x.permute(0, 3, 1, 2) puts them second)" if x.shape[3] == in_channels else ""
        raise ValueError(f"{model} built for {in_channels} input channels got {x.shape[1]} "
                         f"(shape {tuple(x.shape)}); create the model with in_channels={x.shape[1]}"
                         f" or convert the images{hint}")
    if not x.is_floating_point():
        raise ValueError(f"{model} expects a floating-point tensor, got {x.dtype}; "
                         f"convert with x.float() (and normalise the pixels)")
    if weight is not None and (x.device != weight.device or (x.dtype != weight.dtype and not (
            torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)))):
        raise ValueError(f"{model}'s weights are {weight.dtype} on {weight.device}, the input is {x.dtype} on "
                         f"{x.device}; convert with x.to(next(model.parameters()))")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f"input of {x.shape[2]}x{x.shape[3]} pixels is too small for this network: "
                         f"it downsamples by {reduction}, so inputs need at least {min_size}x{min_size}")


def init_weights(model: nn.Module, mode: str = "fan_out") -> None:
    """The authors' initialisation: convolutions N(0, sqrt(2 / (kh*kw*out_channels))) (He, fan-out);
    BN weight 1, bias 0; linear bias 0 (weight keeps PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    which is Torch7's default too). Fan-out is He 2015/2016's (fb.resnet.torch, resnet-1k-layers,
    liuzhuang13/DenseNet) and the Wide ResNet code's at the time of its paper's numbers:
    szagoruyko/wide-residual-networks models/utils.lua:5 at 0a4c3646f778d5be3fa4ff91424a8f4d9acdb391
    (2016-05-24, the README with 4.17 / 20.5) has `n = v.kW*v.kH*v.nOutputPlane`; it became fan-in
    (`nInputPlane`) only with ea025180fdcd8914845c4711657ba34c6d9c6b38 ("fix MSRA init", 2016-09-08).
    `mode="fan_in"`: N(0, sqrt(2 / (kh*kw*in_channels))), stochastic depth's nninit.kaiming with
    gain 'relu' (yueatsprograms/Stochastic_Depth ResidualDrop.lua:19,25 and main.lua:63 at
    86b5cddd97841d2586ce0047f476eba0568efc95; nninit's kaiming is std = gain * sqrt(1 / fanIn)).

    A consequence to know before comparing outputs: a freshly built network in eval mode normalises
    with the untouched running statistics (mean 0, variance 1), and fan-out scaling grows the
    activations through the dense connections, so a fresh DenseNet-121's eval logits reach ~1e5
    (torchvision's fan-in initialisation: ~1). Training mode, and eval mode once the running
    statistics are estimated (a few training-mode passes), give order-1 outputs. Compare fresh models
    with a tolerance relative to the outputs' scale (tests/test_tracing.py)."""
    if mode not in ("fan_out", "fan_in"):
        raise ValueError(f"init must be fan_out or fan_in, got {mode!r}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout with the mask drawn in NCHW order whatever the memory layout of x, so that a seed
    gives the same masks to the fused (channels_last) and the reference path."""
    if not training or p == 0 or x.is_contiguous():
        return F.dropout(x, p, training)
    return x * F.dropout(torch.ones(x.shape, dtype=x.dtype, device=x.device), p, training)


class FeatureInfo(list):
    """The stages a backbone returns, as timm describes them: a list of {"num_chs", "reduction",
    "module", "index"} dicts that also answers `channels()`, `reduction()` and `module_name()` (all
    stages, or the one at `idx`)."""

    def _get(self, key: str, idx: int | None = None):
        return [d[key] for d in self] if idx is None else self[idx][key]

    def channels(self, idx: int | None = None):
        return self._get("num_chs", idx)

    def reduction(self, idx: int | None = None):
        return self._get("reduction", idx)

    def module_name(self, idx: int | None = None):
        return self._get("module", idx)

    def get_dicts(self) -> list[dict]:
        return [dict(d) for d in self]


class StagesMixin:
    """The feature pyramid of a backbone, as timm describes it: index 0 is the stem's output (stride 2
    after the ImageNet stem's convolution-BN-ReLU, before its max pooling; stride 1 for the CIFAR stem),
    indices 1 to n the n stages (dense blocks, residual stages), each later stage halving the resolution,
    the last taken after the final BN-ReLU. `feature_info`, `forward_intermediates` and features_only
    models index this list, as timm's do; `forward_stages` returns the stages alone (indices 1 to n).

    A network lists its stages' output channels in `stage_channels`, names the stem's last module in
    `stem_module`, the module of each stage's output in `stage_module(i)`, and computes the list, up to
    an index, in `_pyramid(x, last)`."""

    stage_channels: list[int]
    stem_module: str
    stem_channels: int

    def stage_module(self, i: int) -> str:
        raise NotImplementedError

    def _pyramid(self, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def reduction(self) -> int:
        """Downsampling of the last stage's output."""
        return self.stage_strides[-1]

    @property
    def stem_stride(self) -> int:
        return 2 if self.config.stem == "imagenet" else 1

    @property
    def stage_strides(self) -> list[int]:
        """Downsampling of each stage's output: the ImageNet stem's 4 (else 1), x2 per later stage."""
        first = 4 if self.config.stem == "imagenet" else 1
        return [first * 2 ** i for i in range(len(self.stage_channels))]

    @property
    def feature_info(self) -> FeatureInfo:
        """The pyramid as timm describes it: channels, stride and module of the stem (index 0) and of
        every stage (1 to n)."""
        chans = [self.stem_channels, *self.stage_channels]
        strides = [self.stem_stride, *self.stage_strides]
        modules = [self.stem_module, *(self.stage_module(i) for i in range(len(self.stage_channels)))]
        return FeatureInfo({"num_chs": c, "reduction": r, "module": m, "index": i}
                           for i, (c, r, m) in enumerate(zip(chans, strides, modules)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """A feature pyramid for detection or segmentation heads: the output of every stage,
        (B, stage_channels[i], H/stage_strides[i], W/stage_strides[i]); the last after the final
        BN-ReLU, so it equals forward_features(x)."""
        return self._pyramid(x)[1:]

    def feature_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """timm's reading of `indices` over `feature_info`: None all, an int n the last n, a sequence
        those (negative counts from the end); a ValueError names the valid range."""
        n = len(self.stage_channels) + 1
        if indices is None:
            return list(range(n))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 1 <= indices <= n:
                raise ValueError(f"indices={indices}: the last n features, n from 1 to {n}")
            return list(range(n - indices, n))
        try:
            idx = [int(i) for i in indices]
        except (TypeError, ValueError):
            raise ValueError(f"indices must be None, an int or feature indices, got {indices!r}") from None
        if not idx or any(not -n <= i < n for i in idx):
            raise ValueError(f"indices {indices!r}: this network has {n} features (0: the stem, 1 to {n - 1}: "
                             f"its stages), indices 0 to {n - 1} or -1 for the last")
        return [i % n for i in idx]

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's call: the features at `indices` of `feature_info` (see `feature_indices`), and unless
        `intermediates_only`, first the final features (forward_features(x), or with `stop_early` the
        last one computed). `norm` changes nothing: the last feature is already after the final BN-ReLU."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: these networks give NCHW features only")
        take = self.feature_indices(indices)
        feats = self._pyramid(x, max(take) if stop_early else None)
        inter = [feats[i] for i in take]
        return inter if intermediates_only else (feats[-1], inter)


class _AvgMaxPool(nn.Module):
    """timm's "avgmax": the mean of global average and global max pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))


POOLS = {"avg": lambda: nn.AdaptiveAvgPool2d(1), "max": lambda: nn.AdaptiveMaxPool2d(1), "avgmax": _AvgMaxPool,
         "": nn.Identity}


class ClassifierMixin:
    """timm's head API for a network whose linear classifier is the attribute `classifier_name`, whose
    global pooling is the attribute `pool_name` and whose pooled features have `num_features`
    channels: `forward_head(x)`, `get_classifier()`, `reset_classifier(n, global_pool)` (n = 0: no
    classifier, the model returns its pooled features), `set_global_pool`, `num_classes`,
    `head_hidden_size`, `default_cfg`, `no_weight_decay()`.

    Pooling is the paper's global average ("avg") unless changed: "max", "avgmax" (timm's), or ""
    (none: forward returns (B, C, H, W) maps, and a classifier is applied at every position, giving
    (B, num_classes, H, W) class maps)."""

    classifier_name = "classifier"
    pool_name = "pool"
    pool_type = "avg"  # the global pooling, by timm's names (timm's `global_pool` is its pooling module)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: say in one line why it cannot compile these networks
        (Python-level input checks, the fused path's autograd Functions and keyword arguments that
        TorchScript's subset of Python does not cover) and what works instead."""
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__name__}: use torch.jit.trace(model.eval(), "
            f"example_input), torch.export.export(model, (example_input,)), "
            f"or `densenet export --format torchscript|onnx`")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = getattr(self, self.pool_name)(x)
        if self.pool_type:
            x = x.flatten(1)  # flatten(1), never squeeze(): batch size 1 keeps its dimension
        if pre_logits:
            return x
        head = getattr(self, self.classifier_name)
        if not self.pool_type and not isinstance(head, nn.Identity):
            return head(x.movedim(1, -1)).movedim(-1, 1)  # the linear layer at every position
        return head(x)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def head_hidden_size(self) -> int:
        """Channels of the features the classifier reads (timm's name; no hidden layer in these heads)."""
        return self.num_features

    @property
    def default_cfg(self) -> dict:
        """timm's older name of `pretrained_cfg` (set by create_model): input size, mean/std, crop."""
        return self.pretrained_cfg  # an AttributeError, as pretrained_cfg, where not built by create_model

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimizer factory should not decay: none. The paper (and Torch's SGD in the
        authors' code) decays every parameter, BN's and biases included."""
        return set()

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def set_global_pool(self, global_pool: str) -> None:
        """Pool the final maps by "avg" (the paper's), "max", "avgmax", or not at all ("")."""
        if global_pool not in POOLS:
            raise ValueError(f"global_pool {global_pool!r}: choose one of {', '.join(map(repr, POOLS))} "
                             f"('avg' is the paper's; '' returns the unpooled maps)")
        self.pool_type = global_pool
        setattr(self, self.pool_name, POOLS[global_pool]())
        if isinstance(getattr(self, "model_args", None), dict):  # what rebuilds it (create_model, saved files)
            self.model_args["global_pool"] = global_pool

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for `num_classes` classes (0: none), on the device and
        in the dtype of the model; `global_pool` also changes the pooling (see `set_global_pool`)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
        if global_pool is not None:
            self.set_global_pool(global_pool)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        if isinstance(getattr(self, "model_args", None), dict):  # a saved model rebuilds this head
            self.model_args["num_classes"] = num_classes
        ref = next(self.parameters())
        if num_classes:
            head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if ref.device.type != "meta":
                nn.init.zeros_(head.bias)
        else:
            head = nn.Identity()
        setattr(self, self.classifier_name, head)


__all__ = ["POOLS", "ClassifierMixin", "FeatureInfo", "StagesMixin", "check_image_batch", "config_from_options", "dropout",
           "init_weights"]
