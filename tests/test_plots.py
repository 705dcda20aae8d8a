"""densenet.analysis.plots (`densenet plot`): labels that do not overlap, a warning when a run was not
trained in the setting drawn, and a one-epoch curve drawn as a point."""
from __future__ import annotations

import json
from pathlib import Path

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
