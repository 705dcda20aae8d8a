"""Small pieces every model family shares: building a config from options, the input check."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch

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


__all__ = ["check_image_batch", "config_from_options"]
