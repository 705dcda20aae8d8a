"""Small pieces every model family shares: building a config from options, the input check, the
authors' initialisation, dropout with layout-independent masks, the stage and head API of a backbone.

Nothing here depends on a model family: DenseNet (densenet.py, with its fused path in _fused.py) and
the residual networks (resnet.py) both import from here, never from each other."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

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
    images smaller than `min_size` (the network downsamples by `reduction`)."""
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


def init_weights(model: nn.Module) -> None:
    """The authors' initialisation: convolutions N(0, sqrt(2 / (kh*kw*out_channels))) (He, fan-out);
    BN weight 1, bias 0; linear bias 0 (weight keeps PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    which is Torch7's default too). The same He (fan-out) rule as He 2015, 2016 and the WRN code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
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
    """The stages of a backbone whose first stage sits behind a stem of stride 4 ("imagenet") or 1
    ("cifar", `config.stem`) and whose every later stage halves the resolution: `reduction`,
    `stage_strides` and `feature_info`. A network lists its stages' output channels in
    `stage_channels` and names the module of each stage's output in `stage_module(i)`."""

    stage_channels: list[int]

    def stage_module(self, i: int) -> str:
        raise NotImplementedError

    @property
    def reduction(self) -> int:
        """Downsampling of the last stage's output."""
        return self.stage_strides[-1]

    @property
    def stage_strides(self) -> list[int]:
        """Downsampling of each stage's output: the ImageNet stem's 4 (else 1), x2 per later stage."""
        first = 4 if self.config.stem == "imagenet" else 1
        return [first * 2 ** i for i in range(len(self.stage_channels))]

    @property
    def feature_info(self) -> FeatureInfo:
        """What `forward_stages` returns, as timm describes backbones: channels, stride, module."""
        return FeatureInfo({"num_chs": c, "reduction": r, "index": i, "module": self.stage_module(i)}
                           for i, (c, r) in enumerate(zip(self.stage_channels, self.stage_strides)))


class ClassifierMixin:
    """timm's head API for a network whose linear classifier is the attribute `classifier_name`, whose
    global average pooling is the attribute `pool_name` and whose pooled features have `num_features`
    channels: `forward_head(x)`, `get_classifier()`, `reset_classifier(n)` (n = 0: no classifier, the
    model returns its pooled features) and `num_classes`."""

    classifier_name = "classifier"
    pool_name = "pool"

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = getattr(self, self.pool_name)(x).flatten(1)  # flatten(1), never squeeze(): batch size 1 keeps its dimension
        return x if pre_logits else getattr(self, self.classifier_name)(x)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised classifier for `num_classes` classes (0: none), on the device and
        in the dtype of the model. Pooling is always the paper's global average (`global_pool="avg"`)."""
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"global_pool {global_pool!r}: these networks use global average pooling "
                             f"(the paper's); only 'avg' is available")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        ref = next(self.parameters())
        if num_classes:
            head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if ref.device.type != "meta":
                nn.init.zeros_(head.bias)
        else:
            head = nn.Identity()
        setattr(self, self.classifier_name, head)


__all__ = ["ClassifierMixin", "FeatureInfo", "StagesMixin", "check_image_batch", "config_from_options", "dropout",
           "init_weights"]
