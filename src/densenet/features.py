"""`create_model(name, features_only=True)`: a backbone that returns the feature maps of its stages.

As timm's: the model without its classifier, whose forward returns a list of tensors (the stages
`out_indices` selects, all by default) and whose `feature_info.channels()` / `.reduction()` describe
them. Parameter names are the full model's (no prefix), so its checkpoints load into it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .models.common import FeatureInfo


class FeatureListNet(nn.Module):
    """The stages of `model` (a DenseNet or ResNet of this package) selected by `out_indices`."""

    def __init__(self, model: nn.Module, out_indices: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        if not hasattr(model, "forward_stages"):
            raise ValueError(f"features_only: {type(model).__name__} has no stages to return")
        n = len(model.stage_channels)
        if out_indices is None:
            out_indices = tuple(range(n))
        try:
            idx = tuple(int(i) for i in out_indices)
        except (TypeError, ValueError):
            raise ValueError(f"out_indices must be stage indices (0 to {n - 1}), got {out_indices!r}") from None
        if not idx or any(not -n <= i < n for i in idx):
            raise ValueError(f"out_indices {out_indices!r}: this network has {n} stages, indices 0 to {n - 1} "
                             f"(or -1 for the last)")
        self.out_indices = tuple(i % n for i in idx)
        model.reset_classifier(0)  # no head: its parameters would be trained by nobody
        for name, child in model.named_children():
            self.add_module(name, child)  # the same modules: names (and state-dict keys) unchanged
        self.__dict__["_model"] = model  # not a submodule: its children are registered above
        info = model.feature_info
        self.feature_info = FeatureInfo(info[i] for i in self.out_indices)
        self.model_name = getattr(model, "model_name", type(model).__name__)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def train(self, mode: bool = True) -> FeatureListNet:
        super().train(mode)
        self._model.training = mode
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = self._model.forward_stages(x)
        return [stages[i] for i in self.out_indices]


__all__ = ["FeatureListNet"]
