"""Parameters and multiply-adds, counted the way the papers count them.

Multiply-adds (MACs) are those of convolutions and fully connected layers, which is what torchvision's
"GFLOPS" column and He et al.'s "FLOPs" report. They are counted from the aten operations a forward
pass of the reference path runs (torch.utils.flop_counter): the fused dense blocks compute the same
function with fewer multiply-adds (their transitions pool before the 1x1 convolution), and the papers
count the network, not an implementation of it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def _count_flops(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1) -> FlopCounterMode:
    """A flop counter that has seen one forward pass of the reference path, in evaluation mode."""
    was_training = model.training
    fused = {m: m.fused for m in model.modules() if getattr(m, "fused", False) not in (False, None)}
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
        for m, setting in fused.items():
            m.fused = setting
    return counter


def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass per image at input (C, H, W)."""
    return _count_flops(model, input_size, batch_size).get_total_flops() // 2 // batch_size


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
    params_tolerance: int = 0  # 0: paper_params is exact; else the published figure's precision

    @property
    def paper_params_text(self) -> str:
        """The published count as the paper gives it: exact (11,689,512) or as printed (0.27M)."""
        if not self.paper_params:
            return "-"
        if not self.params_tolerance:
            return f"{self.paper_params:,}"
        decimals = max(0, 6 - round(math.log10(2 * self.params_tolerance)))  # tolerance: half a unit, or one
        return f"{self.paper_params / 1e6:.{decimals}f}M"

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
                             count_macs(model, e.input_size), e.paper_params, e.paper_gmacs, e.description,
                             e.params_tolerance))
    return rows


@dataclass
class StageProfile:
    name: str
    params: int
    macs: int  # per image
    activation_bytes: int  # kept for backward, for the whole batch


@dataclass
class Profile:
    model: str
    input_size: tuple[int, int, int]
    batch_size: int
    params: int
    macs: int  # per image
    activation_bytes: int  # kept for backward by a training step at batch_size
    peak_forward_bytes: int
    paper_params: int | None
    paper_gmacs: float | None
    stages: list[StageProfile]

    def as_dict(self) -> dict:
        return asdict(self)


def profile(name: str, input_size: tuple[int, int, int] | None = None, batch_size: int = 64,
            **overrides) -> Profile:
    """Parameters, multiply-adds and training activation memory of a registered model, per stage.
    Everything is measured on the meta device: instant, and possible for any batch size."""
    from ..registry import create_model, get_entry
    from .memory import activation_memory, stages

    entry = get_entry(name)
    size = tuple(input_size or entry.input_size)
    overrides.setdefault("num_classes", entry.num_classes)
    if "in_channels" not in overrides and size[0] != entry.input_size[0]:
        overrides["in_channels"] = size[0]
    with torch.device("meta"):
        model = create_model(name, **overrides)
    counter = _count_flops(model, size)
    flops = counter.get_flop_counts()
    mem = activation_memory(model, size, batch_size)
    prefix = type(model).__name__ + "."
    rows = [StageProfile(n, count_params(m), sum(flops.get(prefix + n, {}).values()) // 2,
                         mem["by_stage"].get(n, 0)) for n, m in stages(model)]
    paper = overrides.keys() <= {"num_classes"} and overrides["num_classes"] == entry.num_classes \
        and size == tuple(entry.input_size)
    return Profile(name, size, batch_size, count_params(model), counter.get_total_flops() // 2,
                   mem["total_bytes"], mem["peak_forward_bytes"], entry.paper_params if paper else None,
                   entry.paper_gmacs if paper else None, rows)
