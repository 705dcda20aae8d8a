"""`create_model(name, features_only=True)`: a backbone that returns the feature maps of its stages.

As timm's: the model without its classifier, whose forward returns a list of tensors (the features
`out_indices` selects from the model's `feature_info`, all by default: index 0 is the stem, 1 to n
the stages) and whose `feature_info.channels()` / `.reduction()` describe them. Parameter names are the full model's (no prefix), so its checkpoints load into it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .models.common import FeatureInfo


class FeatureListNet(nn.Module):
    """The features of `model` (a DenseNet or ResNet of this package) selected by `out_indices`."""

    def __init__(self, model: nn.Module, out_indices: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        if not hasattr(model, "forward_stages"):
            raise ValueError(f"features_only: {type(model).__name__} has no stages to return")
        try:  # timm's reading: None all, an int n the last n features, else the indices given
            self.out_indices = tuple(model.feature_indices(out_indices))
        except ValueError as e:
            raise ValueError(f"out_indices: {e}") from None
        model.reset_classifier(0)  # no head: its parameters would be trained by nobody
        for name, child in model.named_children():
            self.add_module(name, child)  # the same modules: names (and state-dict keys) unchanged
        self.__dict__["_model"] = model  # not a submodule: its children are registered above
        info = model.feature_info
        self.feature_info = FeatureInfo(info[i] for i in self.out_indices)
        self.feature_info.out_indices = self.out_indices
        self.model_name = getattr(model, "model_name", type(model).__name__)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def train(self, mode: bool = True) -> FeatureListNet:
        super().train(mode)
        self._model.training = mode
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._model.forward_intermediates(x, list(self.out_indices), stop_early=True, intermediates_only=True)


__all__ = ["FeatureListNet"]
