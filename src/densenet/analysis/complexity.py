"""Parameters and multiply-adds, counted the way the papers count them.

Multiply-adds (MACs) are those of convolutions and fully connected layers, which is what torchvision's
"GFLOPS" column and He et al.'s "FLOPs" report. They are counted from the aten operations a forward
pass of the reference path runs (torch.utils.flop_counter): the fused dense blocks compute the same
function with fewer multiply-adds (their transitions pool before the 1x1 convolution), and the papers
count the network, not an implementation of it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass per image at input (C, H, W)."""
    was_training = model.training
    fused = [m for m in model.modules() if getattr(m, "fused", False) is True]
    model.eval()
    try:
        for m in fused:
            m.fused = False
        p = next(model.parameters())
        x = torch.zeros((batch_size, *input_size), dtype=p.dtype, device=p.device)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for m in fused:
            m.fused = True
    return counter.get_total_flops() // 2 // batch_size


@dataclass
class ModelRow:
    name: str
    family: str
    input_size: tuple[int, int, int]
    num_classes: int
    params: int
    macs: int
    paper_params: int | None
    paper_gmacs: float | None
    description: str

    def as_dict(self) -> dict:
        return asdict(self)


def model_table(names: list[str] | None = None) -> list[ModelRow]:
    """One row per registered variant, built at the paper's classifier size and input size."""
    from ..registry import create_model, get_entry, list_models

    rows = []
    for name in names or list_models():
        e = get_entry(name)
        with torch.device("meta"):  # counts need shapes only: no memory, no initialisation cost
            model = create_model(name, num_classes=e.num_classes)
        rows.append(ModelRow(name, e.family, e.input_size, e.num_classes, count_params(model),
                             count_macs(model, e.input_size), e.paper_params, e.paper_gmacs, e.description))
    return rows
