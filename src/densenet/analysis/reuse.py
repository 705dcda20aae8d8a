"""Feature reuse (Figure 5 of the paper): how strongly each layer reads each earlier layer's maps.

For every dense block, every layer l that reads the block's concatenated maps (its first convolution),
and every source s (0: the block's input; s >= 1: the k maps layer s produced), the value is the L1
norm of the weights of l that read the maps of s, divided by the number of those maps. The transition
after the block (the classification layer after the last one) reads all sources and is the extra
column on the right.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class BlockReuse:
    block: int  # 1-based
    target_names: list[str]  # "1" ... "n", then "T1" (transition) or "C" (classifier)
    values: list[list[float]]  # [source s][target column]; NaN where the target does not read s


def _source_slices(k0: int, k: int, n: int) -> list[slice]:
    return [slice(0, k0)] + [slice(k0 + (s - 1) * k, k0 + s * k) for s in range(1, n + 1)]


def _norm_per_map(weight: torch.Tensor, channels: slice) -> float:
    w = weight[:, channels]
    return w.abs().sum().item() / (channels.stop - channels.start)


@torch.no_grad()
def feature_reuse(model: nn.Module) -> list[BlockReuse]:
    from ..models.densenet import DenseBlock, DenseNet

    if not isinstance(model, DenseNet):
        raise ValueError(f"feature reuse is defined for DenseNets, not {type(model).__name__}")
    k = model.config.growth_rate
    children = list(model.features.named_children())
    out = []
    for i, (name, block) in enumerate(children):
        if not isinstance(block, DenseBlock):
            continue
        layers = list(block.values())
        n, k0 = len(layers), layers[0].conv1.in_channels
        sources = _source_slices(k0, k, n)
        values = [[math.nan] * (n + 1) for _ in range(n + 1)]
        for l, layer in enumerate(layers, start=1):  # layer l reads sources 0 .. l-1
            for s in range(l):
                values[s][l - 1] = _norm_per_map(layer.conv1.weight, sources[s])
        nxt = next((c for n_, c in children[i + 1:] if n_.startswith("transition")), None)
        last = block is [c for _, c in children if isinstance(c, DenseBlock)][-1]
        reader = model.classifier.weight if last else nxt.conv.weight
        for s in range(n + 1):
            values[s][n] = _norm_per_map(reader, sources[s])
        number = len(out) + 1
        out.append(BlockReuse(number, [str(j) for j in range(1, n + 1)] + ["C" if last else f"T{number}"], values))
    return out


def network_name(model: nn.Module) -> str:
    """The paper's name of a DenseNet from its structure, e.g. "DenseNet-BC (L=40, k=12)": L counts the
    stem convolution, every convolution of the dense layers, the transitions and the classifier."""
    cfg = model.config
    variant = "DenseNet" + ("-" + ("B" if cfg.bottleneck else "") + ("C" if cfg.compression < 1 else "")
                            if cfg.bottleneck or cfg.compression < 1 else "")
    depth = 1 + sum(cfg.block_config) * (2 if cfg.bottleneck else 1) + len(cfg.block_config)
    return f"{variant} (L={depth}, k={cfg.growth_rate})"


BARELY_TRAINED_EPOCHS = 10


def training_note(epoch: int | None) -> str | None:
    """A warning for a checkpoint saved after fewer than BARELY_TRAINED_EPOCHS epochs, or None."""
    if epoch is None or epoch >= BARELY_TRAINED_EPOCHS:
        return None
    return (f"this checkpoint was saved after {epoch} epoch{'s' * (epoch != 1)}: its weights are still close to "
            f"their random initialisation (He normal: every source gets about the same |w|), so the heatmap "
            f"shows mostly initialisation, not learned feature reuse (the paper's is after 300 epochs)")


def save_reuse(blocks: list[BlockReuse], out: str | Path, title: str = "") -> list[Path]:
    """The heatmap (PNG, or any format matplotlib writes) and its numbers beside it (.csv, .json)."""
    from matplotlib.backend_bases import FigureCanvasBase

    from ..train.checkpoint import refuse_run_file
    from ..utils.atomic import atomic_write, check_destination, write_text_atomic

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FigureCanvasBase.get_supported_filetypes():  # checked before anything is written
        raise ValueError(f"--out {out}: matplotlib does not write {fmt or 'files without an extension'}; "
                         f"use .png, .pdf or .svg")
    csv_path, json_path = out.with_suffix(".csv"), out.with_suffix(".json")
    for path in (out, csv_path, json_path):  # the figure and its numbers beside it
        refuse_run_file(path, "--out")
        check_destination(path, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [(b.block, s, b.target_names[t], v) for b in blocks for s, row in enumerate(b.values)
            for t, v in enumerate(row) if not math.isnan(v)]
    with atomic_write(csv_path, "--out") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "source", "target", "l1_per_input_map"])
        w.writerows(rows)
    numbers = [{"block": b.block, "targets": b.target_names, "sources": list(range(len(b.values))),
                "values": [[None if math.isnan(v) else v for v in r] for r in b.values]} for b in blocks]
    write_text_atomic(json_path, json.dumps(numbers, indent=1), "--out")
    _plot(blocks, out, title)
    return [out, csv_path, json_path]


def _plot(blocks: list[BlockReuse], out: Path, title: str) -> None:
    from .plots import save_figure

    save_figure(reuse_figure(blocks, title), out, bbox_inches="tight", pad_inches=0.1)


FRAMED_NOTE = ("framed column: the transition (T) or classifier (C) after the block, scaled to its own maximum "
               "(other layers' weights have another magnitude); raw numbers in the .csv")
NOTE_FONTSIZE = 9  # points: readable beside the 10-point tick labels

# The figure's size, in inches, from its number of panels (one square heatmap per dense block, side by
# side, then the colour bar): each panel's slot is as wide as the heatmap and its labels and ticks, so
# that the square panels fill their slots and the canvas holds no empty band.
PANEL = 2.9  # the heatmap's side
PANEL_LABELS = 0.75  # left of each heatmap: its y label and tick labels
COLORBAR = 0.85  # the colour bar, its ticks and its label
TITLES = 0.75  # above the heatmaps: the figure's title and the panels' titles
XLABELS = 0.55  # below the heatmaps: tick labels and the x label
NOTE_LINE = 0.2  # one line of the note


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """`text` in lines that fit `width_in` inches at `fontsize` points (about 0.5 em a character)."""
    import textwrap

    return textwrap.fill(text, max(30, int(width_in * 72 / (0.5 * fontsize))))


def reuse_figure(blocks: list[BlockReuse], title: str = ""):
    """The matplotlib figure of Figure 5: one square panel per dense block side by side, the colour bar
    on the right, the note on the framed column below; the canvas is sized to the number of panels and
    laid out by matplotlib's constrained layout, so that no panel's labels reach the previous panel's
    framed column and no band of it is left empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    width = len(blocks) * (PANEL + PANEL_LABELS) + COLORBAR
    note = _wrap(FRAMED_NOTE, width - 0.4, NOTE_FONTSIZE)
    height = PANEL + TITLES * (1 if title else 0.6) + XLABELS + NOTE_LINE * (note.count("\n") + 1) + 0.15
    fig, axes = plt.subplots(1, len(blocks), figsize=(width, height), squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.04, wspace=0.04)
    for ax, b in zip(axes[0], blocks):
        v = np.array(b.values, dtype=float)
        # the block's layers on one scale (the block's maximum = 1); the extra column on its own, since
        # a classifier's weights have another magnitude than convolutions' (the raw numbers are in the CSV)
        v[:, :-1] /= np.nanmax(v[:, :-1])
        v[:, -1] /= np.nanmax(v[:, -1])
        im = ax.imshow(np.ma.masked_invalid(v), cmap="jet", vmin=0, vmax=1, origin="upper",
                       interpolation="nearest", aspect="equal")
        n = v.shape[1]
        ax.add_patch(Rectangle((n - 1.5, -0.5), 1, v.shape[0], fill=False, edgecolor="black", linewidth=2))
        ticks = list(range(0, n, max(1, n // 6)))
        ax.set_xticks(ticks + [n - 1])
        ax.set_xticklabels([b.target_names[t] for t in ticks] + [b.target_names[-1]])
        ax.set_yticks(list(range(0, v.shape[0], max(1, n // 6))))
        ax.set_xlabel("target layer (ℓ)")
        ax.set_ylabel("source layer (s)")
        ax.set_title(f"Dense block {b.block}")
        ax.set_facecolor("white")
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.5 / width, aspect=18, label="mean |w| per input map (max = 1)")
    if title:
        fig.suptitle(title)
    # a figure x label: the constrained layout keeps room for it below the panels (a free fig.text would
    # be laid over them, or off the canvas)
    fig.supxlabel(note, fontsize=NOTE_FONTSIZE)
    return fig
