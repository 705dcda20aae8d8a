"""Small pieces every model family shares: building a config from options, the input check."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
import torch.nn as nn

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


class ClassifierMixin:
    """timm's head API for a network whose linear classifier is the attribute `classifier_name` and
    whose pooled features have `num_features` channels: `get_classifier()`, `reset_classifier(n)`
    (n = 0: no classifier, the model returns its pooled features) and `num_classes`."""

    classifier_name = "classifier"

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


__all__ = ["ClassifierMixin", "FeatureInfo", "check_image_batch", "config_from_options"]
