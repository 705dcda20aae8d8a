"""densenet.analysis.plots (`densenet plot`): labels that do not overlap, a warning when a run was not
trained in the setting drawn, a one-epoch curve drawn as a point, a lone run drawn on a readable range,
a dataset without published points named on the figure, and the FLOPs figure saying multiply-adds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import densenet


def _fake_run(root: Path, name: str, model: str, dataset: str, epochs: int, size=32, classes=10, **args):
    from densenet.saved_model import save_model

    d = root / name
    (d / "best").mkdir(parents=True)
    m = densenet.create_model(model, num_classes=classes, **args)
    pre = {"source": "memory", "mean": [0.5] * 3, "std": [0.2] * 3, "channels": 3, "image_size": [size, size]}
    save_model(m, d / "best" / "model.safetensors", {"model_args": {"num_classes": classes, **args},
                                                      "preprocessing": pre, "classes": [str(i) for i in range(classes)]})
    (d / "config.json").write_text(json.dumps({"dataset": dataset, "augment": "cifar"}))
    rows = [{"epoch": e + 1, "lr": 0.1, "train_loss": 2.0 - e * 0.1, "train_error": 80.0 - e, "val_loss": 2.1,
             "val_top1_error": 70.0 - e} for e in range(epochs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_plot_labels_do_not_overlap_and_a_setting_mismatch_warns(tmp_path, capsys):
    from densenet.analysis import plots

    one = _fake_run(tmp_path, "one", "densenet_bc_100_k12", "cifar10", 1, depth=16, growth_rate=4)
    runs = [plots.read_run(one)]
    import matplotlib.pyplot as plt

    for x in ("params", "macs"):
        f = plots.efficiency_figure(runs, x, "C10+")
        r = f.canvas.get_renderer()
        boxes = [(t.get_text(), t.get_window_extent(r)) for t in f.axes[0].texts]
        dense = [t for t, _ in boxes if t.startswith(("bc-", "40-", "100-"))]
        assert len(dense) == 6, dense  # the six Table 2 DenseNets with a C10+ result
        assert len(boxes) == 6 + len(plots.baseline_points("C10+", x))  # and the baselines published beside
        for i, (ta, a) in enumerate(boxes):
            for tb, b in boxes[i + 1:]:
                assert not a.overlaps(b), (x, ta, tb)
        plt.close(f)
    digits = _fake_run(tmp_path, "dig", "densenet_bc_100_k12", "digits", 2, size=8, depth=16, growth_rate=4)
    small_folder = _fake_run(tmp_path, "fold", "densenet_bc_100_k12", "folder", 2, size=12, classes=3, depth=16,
                             growth_rate=4)
    c10_folder = _fake_run(tmp_path, "c10", "densenet_bc_100_k12", "folder", 2, depth=16, growth_rate=4)
    plots.plot_runs([digits, small_folder, c10_folder], tmp_path / "figs", "C10+")
    err = capsys.readouterr().err
    assert "--setting C10+ draws the paper's C10+ results, but dig was trained on digits, not cifar10" in err
    assert "fold was trained on 12x12 images of 3 classes, not C10+'s 32x32 images of 10" in err
    assert "c10 " not in err and err.count("warning") == 2


def test_one_epoch_curve_is_a_point(tmp_path):
    import matplotlib.pyplot as plt

    from densenet.analysis import plots

    one = _fake_run(tmp_path, "one", "densenet_bc_100_k12", "cifar10", 1, depth=16, growth_rate=4)
    captured = {}
    real_close = plt.close
    plt.close = lambda fig=None: captured.setdefault("fig", fig)
    try:
        plots.plot_curves([plots.read_run(one)], tmp_path / "curves.png")
    finally:
        plt.close = real_close
    fig = captured["fig"]
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    assert len(lines) == 4 and all(len(ln.get_xdata()) == 1 and ln.get_marker() == "o" for ln in lines)
    real_close(fig)


def test_one_run_gets_a_readable_range_and_a_dataset_without_paper_points_says_so(tmp_path):
    """Issue 23: one digits run was drawn on 1.06 .. 1.16 % with no paper points and no word why."""
    import math

    import matplotlib.pyplot as plt

    from densenet.analysis import plots

    d = _fake_run(tmp_path, "dig", "densenet_bc_100_k12", "digits", 2, size=8, depth=16, growth_rate=4)
    (d / "summary.json").write_text(json.dumps({"test_top1_error": 1.11}))
    run = plots.read_run(d)
    for x, rx in (("params", run.params), ("macs", run.macs / 1e9)):
        fig = plots.efficiency_figure([run], x)
        ax = fig.axes[0]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert ax.get_xscale() == "log" and x1 / x0 >= 10 - 1e-9  # at least a decade ...
        assert math.log(rx / x0) == pytest.approx(math.log(x1 / rx))  # ... with the point in its middle
        assert (y0, y1) == pytest.approx((0.555, 1.665))  # +-50 %, not matplotlib's +-5 %
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["dig (test)", "no published points for digits"], legend
        assert not ax.texts  # no paper labels: none drawn
        plt.close(fig)
    # a lone point near the ends stays within 0 .. 100 %; a spread of points keeps all of them inside
    assert plots._ensure_range([1e5], [69.0])[1] == pytest.approx((34.5, 100.0))
    assert plots._ensure_range([1e5], [0.0])[1] == pytest.approx((0.0, 0.5))
    (x0, x1), (y0, y1) = plots._ensure_range([1e5, 2e5, 3e7], [3.5, 7.0, 68.0])
    assert x0 < 1e5 and x1 > 3e7 and y0 < 3.5 and y1 > 68.0
    assert plots._ensure_range([], []) is None


def test_flops_figure_says_multiply_adds_in_title_and_axis(tmp_path):
    """The paper's Figure 3 says FLOPs and counts multiply-adds: the figure says so, in one term,
    draws GFLOPs, and keeps the file name error_vs_flops.png; a CIFAR run needs no missing-points note."""
    import matplotlib.pyplot as plt

    from densenet.analysis import plots
    from densenet.registry import get_entry

    d = _fake_run(tmp_path, "c10", "densenet_bc_100_k12", "cifar10", 2, depth=16, growth_rate=4)
    run = plots.read_run(d)
    fig = plots.efficiency_figure([run], "macs")
    ax = fig.axes[0]
    assert ax.get_title() == "Error vs. FLOPs (multiply-adds, as the paper counts them)"
    assert ax.get_xlabel() == "GFLOPs (multiply-adds)"
    offsets = [(float(a), float(b)) for c in ax.collections for a, b in c.get_offsets()]
    assert (pytest.approx(run.macs / 1e9), pytest.approx(69.0)) in offsets  # the run, in GFLOPs
    assert (pytest.approx(get_entry("densenet_bc_100_k12").paper_gmacs), pytest.approx(4.51)) in offsets
    assert not any("no published points" in t.get_text() for t in ax.get_legend().get_texts())
    plt.close(fig)
    fig = plots.efficiency_figure([run], "params")
    assert (fig.axes[0].get_title(), fig.axes[0].get_xlabel()) == ("Error vs. parameters", "parameters")
    plt.close(fig)
    names = [p.name for p in plots.plot_runs([d], tmp_path / "figs")]
    assert names == ["curves.png", "error_vs_params.png", "error_vs_flops.png"]
