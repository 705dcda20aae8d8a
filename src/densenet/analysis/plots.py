"""Training curves (Figure 4 right) and error against parameters and FLOPs (Figures 3 and 4 left and
middle) from run directories, with the paper's published points beside the user's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..paper import RESNET_IMAGENET_FB, TABLE1, TABLE2, TABLE2_ROWS
from ..utils.validate import number_field, parse_json, read_json


@dataclass
class RunResult:
    """What a run directory says about itself."""

    path: Path
    label: str
    model: str
    dataset: str
    augment: str
    epochs: list[dict]  # metrics.jsonl rows
    params: int
    macs: int
    image_size: tuple[int, ...] = ()  # (C, H, W) the run trained at
    num_classes: int = 0

    @property
    def final_error(self) -> tuple[float, str] | None:
        """(error %, which split): the final epoch's test error where measured, else validation."""
        summary = self.path / "summary.json"
        if summary.is_file():
            err = number_field(read_json(summary), "test_top1_error", summary)
            if err is not None:
                return err, "test"
        if self.epochs and "val_top1_error" in self.epochs[-1]:
            return self.epochs[-1]["val_top1_error"], "val"
        return None

    @property
    def setting(self) -> str | None:
        """The paper's name for the data setting: C10, C10+, C100, C100+, SVHN (None: other)."""
        base = {"cifar10": "C10", "cifar100": "C100", "svhn": "SVHN"}.get(self.dataset)
        if base is None:
            return None
        return base + ("+" if self.augment == "cifar" and base != "SVHN" else "")


def read_run(path: str | Path) -> RunResult:
    import torch

    from ..registry import create_model
    from ..weights import read_state_dict
    from .complexity import count_macs, count_params

    path = Path(path)
    cfg_file, metrics = path / "config.json", path / "metrics.jsonl"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a run directory of `densenet train` (no config.json)")
    cfg = read_json(cfg_file)
    rows = [parse_json(r, f"{metrics} line {i + 1}", dict) for i, r in enumerate(metrics.read_text().splitlines())
            if r.strip()] if metrics.is_file() else []
    _, meta = read_state_dict(path)
    args = parse_json(meta["model_args"], f"{path}: its metadata model_args", dict)
    pre = parse_json(meta["preprocessing"], f"{path}: its metadata preprocessing", dict)
    with torch.device("meta"):
        model = create_model(meta["model"], **args)
    size = (pre["channels"], *pre["image_size"])
    classes = parse_json(meta["classes"], f"{path}: its metadata classes", list) if "classes" in meta else []
    return RunResult(path, path.name, meta["model"], cfg["dataset"], cfg.get("augment") or "", rows,
                     count_params(model), count_macs(model, size), tuple(size), len(classes))


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no screen needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: list[RunResult], out: Path) -> Path:
    """Loss and error against epochs, training (dashed) and validation (solid), one colour per run."""
    plt = _plt()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(runs):
        colour = f"C{i % 10}"
        ep = [row["epoch"] for row in r.epochs]
        mk = {"marker": "o", "markersize": 5} if len(ep) == 1 else {}  # one epoch: a point, not an empty line
        ax_loss.plot(ep, [row["train_loss"] for row in r.epochs], "--", color=colour, label=f"{r.label} train", **mk)
        ax_err.plot(ep, [row["train_error"] for row in r.epochs], "--", color=colour, label=f"{r.label} train", **mk)
        if r.epochs and "val_loss" in r.epochs[0]:
            ax_loss.plot(ep, [row["val_loss"] for row in r.epochs], "-", color=colour, label=f"{r.label} val", **mk)
            ax_err.plot(ep, [row["val_top1_error"] for row in r.epochs], "-", color=colour, label=f"{r.label} val",
                        **mk)
    ax_loss.set(xlabel="epoch", ylabel="loss (cross-entropy)", title="Loss")
    ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", title="Error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    return out


def plot_efficiency(runs: list[RunResult], out: Path, x: str, setting: str | None = None) -> Path:
    """Error against parameters (x="params") or multiply-adds (x="macs", drawn in GFLOPs: the paper's
    "FLOPs" are multiply-adds) for each run, with the paper's published points for the runs' data
    setting (Table 2 on CIFAR/SVHN, Table 1 on ImageNet); `setting` names it where the dataset cannot
    (a folder holding CIFAR-10 images: "C10+"). A dataset the paper has no results for is named on the
    figure; a lone point gets a readable axis range (_ensure_range)."""
    fig = efficiency_figure(runs, x, setting)
    save_figure(fig, out)
    return out


def save_figure(fig, out: Path, **kwargs) -> None:
    """Write the figure atomically (a reader never sees half a PNG; a FIFO, device or directory at `out`
    is refused, not written into) and close it."""
    import matplotlib.pyplot as plt

    from ..utils.atomic import atomic_write

    try:
        with atomic_write(out, "--out") as tmp:
            fig.savefig(tmp, dpi=130, format=out.suffix.lstrip(".").lower() or "png", **kwargs)
    finally:
        plt.close(fig)


def _place_labels(fig, ax, points: list[tuple[float, float, str]]) -> None:
    """Annotate each point with its text at the first of several offsets where the label's box meets no
    label placed before it (the figure's layout is final: boxes are measured as they will be drawn)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    offsets = [(5, 4), (5, -10), (-5, 4), (-5, -10), (5, 13), (5, -19), (-5, 13), (-5, -19), (5, 22), (5, -28)]
    placed = []
    for px, py, text in sorted(points):
        for dx, dy in offsets:
            a = ax.annotate(text, (px, py), fontsize=7, color="gray", xytext=(dx, dy), textcoords="offset points",
                            ha="left" if dx > 0 else "right")
            box = a.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            a.remove()
        else:  # every offset taken: the first one
            a = ax.annotate(text, (px, py), fontsize=7, color="gray", xytext=offsets[0], textcoords="offset points")
            box = a.get_window_extent(renderer)
        placed.append(box)


# The paper's Figure 3 says "FLOPs" but counts multiply-adds (one multiply-add = one "FLOP"): the figure
# says so once, in its title, and uses the one term on its axis.
FLOPS_TITLE = "Error vs. FLOPs (multiply-adds, as the paper counts them)"
FLOPS_XLABEL = "GFLOPs (multiply-adds)"
PARAMS_TITLE = "Error vs. parameters"
PARAMS_XLABEL = "parameters"


def _x_value(x: str, params: float, macs: float) -> float:
    """The x coordinate drawn: parameters as counted, multiply-adds in GFLOPs."""
    return params if x == "params" else macs / 1e9


def _ensure_range(xs: list[float], ys: list[float]) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Axis limits (log x, linear y) for the points drawn: a margin around them, and for a lone point (or
    points close together) a readable range rather than matplotlib's +-5% (a run at 1.11 % error drawn on
    1.06 .. 1.16): x spans at least a decade around them, y at least +-50% of their centre, at least
    +-0.5 percentage points, kept within 0 .. 100 % where the points are. None: nothing drawn."""
    xs = [v for v in xs if v > 0]
    if not xs or not ys:
        return None
    import math

    lo, hi = min(xs), max(xs)
    centre = math.sqrt(lo * hi)
    half = math.sqrt(max(10.0, 2.25 * hi / lo))  # at least a decade; the points well inside it
    xlim = (min(lo / 1.25, centre / half), max(hi * 1.25, centre * half))
    ylo, yhi = min(ys), max(ys)
    mid = (ylo + yhi) / 2
    reach = max(0.5 * abs(mid), 0.5, 0.55 * (yhi - ylo))
    bottom, top = mid - reach, mid + reach
    if bottom < 0 <= ylo:
        bottom = 0.0
    if top > 100 >= yhi:
        top = 100.0
    return xlim, (bottom, top)


def missing_paper_note(runs: list[RunResult], setting: str | None = None) -> str | None:
    """The figure's note for runs on a dataset the paper publishes no results of (None: every run has
    the paper's points beside it)."""
    if setting:
        return None
    missing = sorted({r.dataset for r in runs if r.setting is None and r.dataset != "imagenet"})
    return f"no published points for {', '.join(missing)}" if missing else None


def efficiency_figure(runs: list[RunResult], x: str, setting: str | None = None):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    labels = []
    xs: list[float] = []  # everything drawn, for the axis range
    ys: list[float] = []

    def drawn(px: float | None) -> float | None:  # a published count as drawn: GFLOPs for multiply-adds
        return None if px is None else px if x == "params" else px / 1e9

    settings = {setting} if setting else {r.setting for r in runs if r.setting}
    for s in sorted(settings):  # the paper's DenseNets in this setting
        pts = [(px, e[s], n) for n, e in TABLE2.items()
               if e.get(s) is not None and (px := drawn(_paper_x(n, x))) is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="s", facecolors="none", edgecolors="gray",
                   s=50, label=f"paper, {s}")
        labels += [(px, py, n.replace("densenet_", "").replace("_", "-")) for px, py, n in pts]
        base = [(drawn(px), py, n) for px, py, n in baseline_points(s, x)]
        if base:
            ax.scatter([b[0] for b in base], [b[1] for b in base], marker="^", facecolors="none",
                       edgecolors="tab:brown", s=50, label=f"paper, {s}: baselines")
            labels += [(px, py, n.replace("_", "-")) for px, py, n in base]
        xs += [p[0] for p in pts + base]
        ys += [p[1] for p in pts + base]
    if any(r.dataset == "imagenet" for r in runs):
        pts = [(px, e["top1"]) for n, e in TABLE1.items() if (px := drawn(_paper_x(n, x))) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="gray", mfc="none", label="paper, ImageNet")
        res = [(drawn(px), py) for px, py in resnet_imagenet_points(x)]
        ax.plot([p[0] for p in res], [p[1] for p in res], "o--", color="tab:brown", mfc="none",
                label="ResNets (fb.resnet.torch, Figure 3)")
        xs += [p[0] for p in pts + res]
        ys += [p[1] for p in pts + res]
    for i, r in enumerate(runs):
        err = r.final_error
        if err is None:
            continue
        rx = _x_value(x, r.params, r.macs)
        ax.scatter([rx], [err[0]], color=f"C{i % 10}", s=60, zorder=3, label=f"{r.label} ({err[1]})")
        xs.append(rx)
        ys.append(err[0])
    note = missing_paper_note(runs, setting)
    if note:  # in the legend, where it meets no point: the absence of the paper's points is said, not silent
        ax.plot([], [], " ", label=note)
    ax.set_xscale("log")
    ax.set(xlabel=PARAMS_XLABEL if x == "params" else FLOPS_XLABEL, ylabel="top-1 error (%)",
           title=PARAMS_TITLE if x == "params" else FLOPS_TITLE)
    limits = _ensure_range(xs, ys)
    if limits:
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
    ax.grid(alpha=0.3, which="both")
    legend = ax.legend(fontsize=8)
    if note:
        legend.get_texts()[-1].set(color="dimgray", style="italic")
    fig.tight_layout()
    _place_labels(fig, ax, labels)  # after the layout: the boxes measured are those drawn
    return fig


SETTING_SHAPE = {"C10": ("cifar10", 10), "C10+": ("cifar10", 10), "C100": ("cifar100", 100),
                 "C100+": ("cifar100", 100), "SVHN": ("svhn", 10)}


def setting_mismatch(run: RunResult, setting: str) -> str | None:
    """Why the paper's `setting` points do not belong beside `run` (None: they may): another dataset,
    or a folder of images that are not 32x32 or not of the setting's number of classes."""
    dataset, classes = SETTING_SHAPE[setting]
    if run.dataset not in ("folder", dataset):
        return f"{run.label} was trained on {run.dataset}, not {dataset}"
    if run.dataset == "folder" and (tuple(run.image_size[-2:]) not in ((), (32, 32))
                                    or run.num_classes not in (0, classes)):
        return (f"{run.label} was trained on {'x'.join(map(str, run.image_size[-2:]))} images of {run.num_classes} "
                f"classes, not {setting}'s 32x32 images of {classes}")
    return None


def _paper_x(model: str, x: str) -> float | None:
    """A registered model's published parameters or multiply-adds (None where the paper prints none)."""
    from ..registry import get_entry

    e = get_entry(model)
    if x == "params":
        return e.paper_params
    return e.paper_gmacs * 1e9 if e.paper_gmacs else None


def baseline_points(setting: str, x: str) -> list[tuple[float, float, str]]:
    """Table 2's baselines in `setting` as (parameters or multiply-adds, published error, row key),
    where the registry holds the network's published count."""
    return [(px, r.errors[setting], r.key) for r in TABLE2_ROWS
            if r.model and r.key not in TABLE2 and setting in r.errors and (px := _paper_x(r.model, x)) is not None]


def resnet_imagenet_points(x: str) -> list[tuple[float, float]]:
    """Figure 3's ResNet curve: ResNet-34/50/101/152, fb.resnet.torch's single-crop top-1 errors."""
    return [(_paper_x(n, x), e["top1"]) for n, e in RESNET_IMAGENET_FB.items() if n != "resnet18"]


def plot_runs(paths: list[str | Path], out_dir: str | Path, setting: str | None = None) -> list[Path]:
    import sys

    runs = [read_run(p) for p in paths]
    for r in runs if setting else []:
        why = setting_mismatch(r, setting)
        if why:
            print(f"densenet plot: warning: --setting {setting} draws the paper's {setting} results, but {why}: "
                  f"the comparison means little", file=sys.stderr)
    labels = [r.label for r in runs]
    for r in runs:  # distinct labels when run folders share a name
        if labels.count(r.label) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    from ..utils.atomic import check_destination

    out_dir = Path(out_dir)
    check_destination(out_dir / "curves.png", "--out")  # all three, before any is drawn
    check_destination(out_dir / "error_vs_params.png", "--out")
    check_destination(out_dir / "error_vs_flops.png", "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_curves(runs, out_dir / "curves.png"),
            plot_efficiency(runs, out_dir / "error_vs_params.png", "params", setting),
            plot_efficiency(runs, out_dir / "error_vs_flops.png", "macs", setting)]
