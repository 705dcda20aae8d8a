"""Parameters and multiply-adds, counted the way the papers count them.

Multiply-adds (MACs) are those of convolutions and fully connected layers, which is what torchvision's
"GFLOPS" column and He et al.'s "FLOPs" report. They are counted from the aten operations a forward
pass of the reference path runs (torch.utils.flop_counter): the fused dense blocks compute the same
function with fewer multiply-adds (their transitions pool before the 1x1 convolution), and the papers
count the network, not an implementation of it. format_model_table and format_profile lay the figures
out as `densenet models` and `densenet profile` print them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

# Parameters and multiply-adds of every registered variant at its paper's size, counted once by
# write_counts() (tests/test_models.py checks them against a recount), so
# that `densenet models` does not build and count 49 networks at every call.
COUNTS_FILE = Path(__file__).with_name("model_counts.json")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def _count_flops(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1):
    """A flop counter (FlopCounterMode) that has seen one forward pass of the reference path, in evaluation mode."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import reference_path

    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros((batch_size, *input_size), dtype=p.dtype, device=p.device)
        with FlopCounterMode(display=False) as counter, reference_path():
            model(x)
    finally:
        model.train(was_training)
    return counter


def count_macs(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass per image at input (C, H, W)."""
    return _count_flops(model, input_size, batch_size).get_total_flops() // 2 // batch_size


# Multiply-adds (x10^9) as the papers print them, where they print them: He 2015 Table 1 ("FLOPs", which
# are multiply-adds; its plain nets have the same layers), Xie 2017 Table 1 and Fig. 5. The registry's
# paper_gmacs are recomputed by the rules at the registered layout (ResNet-50: 4.089 with torchvision's
# stride on the 3x3, which these weights need); this is what a reader finds in the paper.
PUBLISHED_GMACS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3,
                   "plain18": 1.8, "plain34": 3.6, "resnext50_32x4d": 4.2, "resnext101_32x4d": 7.8}


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
    published_gmacs: float | None = None  # as the paper prints it (PUBLISHED_GMACS), None where it does not

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


def recount(name: str) -> tuple[int, int]:
    """(parameters, multiply-adds per image) of a registered variant at its paper's classifier and input size."""
    from ..registry import create_model, get_entry

    e = get_entry(name)
    with torch.device("meta"):  # counts need shapes only: no memory, no initialisation cost
        model = create_model(name, num_classes=e.num_classes)
    return count_params(model), count_macs(model, e.input_size)


def stored_counts() -> dict[str, tuple[int, int]]:
    """The counts of COUNTS_FILE: name -> (parameters, multiply-adds)."""
    try:
        data = json.loads(COUNTS_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return {name: (int(v["params"]), int(v["macs"])) for name, v in data.items()}


def write_counts(path: Path = COUNTS_FILE) -> dict[str, tuple[int, int]]:
    """Recount every registered variant and store the figures (run after changing a network)."""
    from ..registry import list_models
    from ..utils.atomic import write_text_atomic

    counts = {name: recount(name) for name in list_models()}
    lines = [f'  {json.dumps(n)}: {{"params": {p}, "macs": {m}}}' for n, (p, m) in counts.items()]
    write_text_atomic(path, "{\n" + ",\n".join(lines) + "\n}\n")
    return counts


def model_table(names: list[str] | None = None) -> list[ModelRow]:
    """One row per registered variant, built at the paper's classifier size and input size; the stored
    counts where there are some (variants registered by the user are counted here)."""
    from ..registry import get_entry, list_models

    stored = stored_counts()
    rows = []
    for name in names or list_models():
        e = get_entry(name)
        params, macs = stored[name] if name in stored else recount(name)
        rows.append(ModelRow(name, e.family, e.input_size, e.num_classes, params, macs, e.paper_params,
                             e.paper_gmacs, e.description, e.params_tolerance, PUBLISHED_GMACS.get(name)))
    return rows


def format_model_table(rows: list[ModelRow]) -> str:
    """The table of `densenet models`: one section per family, each row beside the published figures
    (the paper's multiply-adds as printed; ModelRow.as_dict has both)."""
    lines, family = [], None
    header = f"{'model':<24}{'params':>14}{'paper':>14}{'GMACs':>9}{'paper':>9}  {'input':<11}description"
    for r in rows:
        if r.family != family:
            family = r.family
            lines += ["", family, header]
        paper_m = f"{r.published_gmacs:g}" if r.published_gmacs else "-"
        size = "x".join(map(str, r.input_size))
        lines.append(f"{r.name:<24}{r.params:>14,}{r.paper_params_text:>14}{r.macs / 1e9:>9.3f}{paper_m:>9}  "
                     f"{size:<11}{r.description}")
    return "\n".join(lines)


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


def format_profile(results: list[Profile], batch_size: int, stages: bool = False) -> str:
    """The table of `densenet profile`: one row per model (with `stages`, one more per stage), memory in MB
    of float32 activations kept by a training step at `batch_size`."""
    mb = 2 ** 20
    lines = [f"{'model':<22}{'input':<11}{'params':>13}{'paper':>13}{'GMACs':>9}{'paper':>8}"
             f"{'activations':>14}  (training step, batch {batch_size}, float32)"]
    for r in results:
        pp = f"{r.paper_params:,}" if r.paper_params else "-"
        pm = f"{r.paper_gmacs:.3f}" if r.paper_gmacs else "-"
        lines.append(f"{r.model:<22}{'x'.join(map(str, r.input_size)):<11}{r.params:>13,}{pp:>13}"
                     f"{r.macs / 1e9:>9.3f}{pm:>8}{r.activation_bytes / mb:>11.1f} MB")
        if stages:
            lines += [f"  {st.name:<31}{st.params:>13,}{'':>13}{st.macs / 1e9:>9.3f}{'':>8}"
                      f"{st.activation_bytes / mb:>11.1f} MB" for st in r.stages]
    return "\n".join(lines)
