"""What a newcomer hits first: ten-crop defined for every image size (or refused), BN re-estimation
(`eval --recalibrate-bn`), `eval` naming what it evaluated, files readable as the umask allows."""
from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import torch

import densenet
from densenet.cli import main
from densenet.data import ImageSet, Normalization
from densenet.train import TrainConfig, fit
from densenet.train.engine import evaluation_batches
from densenet.train.recalibrate import recalibrate_bn

SMALL = {"depth": 10, "growth_rate": 6}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The first run's recipe in miniature: digits, no augmentation, dropout 0.2 (the paper's rule)."""
    out = tmp_path_factory.mktemp("newcomer") / "digits"
    fit(TrainConfig(model="densenet_bc_100_k12", model_args=SMALL, dataset="digits", epochs=1, batch_size=32,
                    train_subset=128, val_size=32, augment="none", drop_rate=0.2, progress=False,
                    tensorboard=False, out=str(out)))
    return out


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# --- ten-crop -------------------------------------------------------------------------------------------

def test_ten_crop_crops_are_the_training_shifts_at_any_size():
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    norm = Normalization((0.5,), (0.25,))
    pre = {"source": "memory", "mean": [0.5], "std": [0.25], "channels": 1, "image_size": [8, 8], "augment": "cifar"}
    (x, y), = list(evaluation_batches(ImageSet(images, torch.arange(3)), pre, 8, "cpu", ten_crop=True))
    ref = norm(images)
    assert x.shape == (10, 3, 1, 8, 8) and y.tolist() == [0, 1, 2]
    assert torch.equal(x[4], ref)  # the centre crop of the 4-pixel padded image is the image
    assert torch.equal(x[0][..., 4:, 4:], ref[..., :4, :4]) and (x[0][..., :4, :] == 0).all()  # top-left shift
    assert torch.equal(x[3][..., :4, :4], ref[..., 4:, 4:])  # bottom-right shift
    assert all(torch.equal(x[i + 5], x[i].flip(-1)) for i in range(5))  # and their mirror images
    # WRN's reflect-padded crops: the ten crops are reflected shifts too
    (x, _), = list(evaluation_batches(ImageSet(images, torch.arange(3)), {**pre, "augment": "cifar-reflect"}, 8,
                                      "cpu", ten_crop=True))
    assert torch.equal(x[4], ref) and torch.equal(x[0][..., 4:, 4:], ref[..., :4, :4])
    assert torch.equal(x[0][..., 3, 4:], ref[..., 1, :4])  # row -1 mirrors row 1


def test_ten_crop_is_refused_for_a_model_trained_without_random_crops(digits_run, capsys):
    code, out, err = run_main(capsys, "eval", digits_run, "--ten-crop")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "trained without random crops (augment 'none')" in err
    assert "Evaluate without --ten-crop" in err
    pre = {"mean": [0.5], "std": [0.25], "augment": "flip"}
    with pytest.raises(ValueError, match="augment 'flip'"):
        evaluation_batches(ImageSet(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2)), pre, 2, "cpu",
                           ten_crop=True)


# --- BN re-estimation ------------------------------------------------------------------------------------

def _no_dropout(model):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "drop_rate"):
            mod.drop_rate = 0.0
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m


@pytest.mark.parametrize("fused", [True, False])
def test_recalibrated_statistics_are_the_datas_with_dropout_off(fused):
    """After re-estimation on one batch, eval mode computes what training mode without dropout computes
    on that batch (up to BN's unbiased running variance: n/(n-1), n = 64 * 8 * 8 values per channel)."""
    model = densenet.create_model("densenet_bc_100_k12", drop_rate=0.2, fused=fused, num_classes=5, **SMALL)
    x = torch.randn(64, 3, 8, 8) * 2 + 1
    with torch.no_grad():
        model.train()(torch.randn(64, 3, 8, 8))  # running statistics from other data, with dropout
        expected = _no_dropout(model).train()(x)
        stale = model.eval()(x)
        assert recalibrate_bn(model, [(x, None)]) == 64
        got = model(x)
    assert not model.training
    assert (stale - expected).abs().max() > 0.1  # the statistics training left are far off
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_recalibration_averages_over_batches_and_stops_at_max_images():
    model = densenet.create_model("densenet_bc_100_k12", num_classes=5, **SMALL)
    batches = [(torch.randn(16, 3, 8, 8) + i, None) for i in range(4)]
    assert recalibrate_bn(model, batches, max_images=40) == 40  # 16 + 16 + 8
    first_bn = model.features.denseblock1.denselayer1.norm1
    # batch means averaged with weights 1/3 each: (m1 + m2 + m3) / 3, where m3 is over 8 images
    with torch.no_grad():
        m = [model.features.conv0(b).mean((0, 2, 3)) for b in (batches[0][0], batches[1][0], batches[2][0][:8])]
    torch.testing.assert_close(first_bn.running_mean, sum(m) / 3, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one image"):
        recalibrate_bn(model, batches, max_images=0)


def test_eval_recalibrate_bn_and_says_what_it_evaluated(digits_run, capsys):
    files = {p: p.read_bytes() for p in digits_run.rglob("*.safetensors")}
    code, out, err = run_main(capsys, "eval", digits_run, "--split", "val", "--recalibrate-bn", "100", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["recalibrated_bn_images"] == 100 and r["epoch"] == 1 and r["images"] == 32
    # the protocol's checkpoint: digits, like CIFAR, reports the final epoch (last/)
    assert r["checkpoint"].endswith("last/model.safetensors") and r["model"] == "densenet_bc_100_k12"
    assert {p: p.read_bytes() for p in files} == files  # the checkpoint is not changed
    code, out, _ = run_main(capsys, "eval", "--checkpoint", digits_run, "--split", "val", "--recalibrate-bn", "100")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(f"checkpoint {digits_run}/last/model.safetensors (densenet_bc_100_k12, epoch 1; "
                               f"the protocol's: test_on final); BN statistics re-estimated on 100 training images")
    assert f"top-1 error {r['top1_error']:.2f}%" in lines[1]  # the same numbers: the sample is seeded


@pytest.mark.parametrize("argv, match", [
    ([], "which checkpoint"),
    (["{run}", "--checkpoint", "{run}/last"], "two checkpoints"),
    (["{run}", "--recalibrate-bn", "0"], "--recalibrate-bn takes"),
])
def test_eval_usage_errors(digits_run, capsys, argv, match):
    code, _, err = run_main(capsys, "eval", *[a.format(run=digits_run) for a in argv])
    assert code == 2 and match in err and err.count("\n") == 1


# --- file modes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, mask):
    from densenet.utils.atomic import write_text_atomic

    old = os.umask(mask)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:  # what open() gives, for comparison
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "b.json").stat().st_mode)


def test_run_files_and_exports_are_readable_by_others_under_umask_022(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        fit(TrainConfig(model="densenet_bc_100_k12", model_args=SMALL, dataset="digits", epochs=1, batch_size=32,
                        train_subset=64, val_size=32, progress=False, tensorboard=False, out=str(out)))
        assert main(["export", str(out), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    finally:
        os.umask(old)
    files = [p for p in [*out.rglob("*"), tmp_path / "m.pt"] if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    assert {"config.json", "metrics.jsonl", "model.safetensors", "state.safetensors", "m.pt"} <= names
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {str(p): "0o644" for p in files}


# --- the distribution name -------------------------------------------------------------------------------

def test_distribution_name_is_ours_everywhere():
    """`densenet` (and `densenet-pytorch`) on PyPI are other projects: every install hint names this
    package's distribution, densenet-paper; the import name and the command stay `densenet`."""
    import re

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "densenet-paper" and project["scripts"] == {"densenet": "densenet.cli:main"}
    texts = {p: p.read_text() for p in [root / "README.md", *sorted((root / "src").rglob("*.py"))]}
    hints = [(p.name, m) for p, t in texts.items() for m in re.findall(r"pip install[^\n`]*", t)]
    assert hints
    for where, hint in hints:  # a package-name install hint: `pip install NAME[extra]`, never `densenet[...]`
        assert not re.search(r"(?<![\w-])densenet(?!-paper)[\[\s'\"]|(?<![\w-])densenet$", hint), (where, hint)


# --- logs ------------------------------------------------------------------------------------------------

class FakeWriter:
    def __init__(self):
        self.scalars, self.hparams, self.closed = {}, None, False

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_hparams(self, hparams, metrics, run_name=None):
        self.hparams = (hparams, metrics)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_logs_csv_grouped_tensorboard_tags_hparams_and_clean_lr(tmp_path, monkeypatch):
    from densenet.train import logs

    writers = []
    monkeypatch.setattr(logs, "summary_writer", lambda d: writers.append(FakeWriter()) or writers[-1])
    out = tmp_path / "run"
    fit(TrainConfig(model="densenet_bc_100_k12", model_args=SMALL, dataset="digits", epochs=3, milestones=(1, 2),
                    batch_size=32, train_subset=64, val_size=32, progress=False, out=str(out)))
    text = (out / "metrics.jsonl").read_text()
    rows = [json.loads(r) for r in text.splitlines()]
    assert [r["lr"] for r in rows] == [0.1, 0.01, 0.001] and '"lr": 0.001,' in text  # not 0.0010000000000000002
    import csv

    with open(out / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in table] == [0.1, 0.01, 0.001] and list(table[0]) == list(rows[0])
    assert [float(r["val_top1_error"]) for r in table] == [r["val_top1_error"] for r in rows]
    (w,) = writers
    assert {"train/loss", "train/error", "train/lr", "val/top1_error", "val/loss", "test/top1_error"} <= set(w.scalars)
    assert not any("_" in t.split("/")[0] or "/" not in t for t in w.scalars)
    assert w.scalars["train/lr"] == [(1, 0.1), (2, 0.01), (3, 0.001)]
    hp, metrics = w.hparams
    assert hp["model"] == "densenet_bc_100_k12" and hp["epochs"] == 3 and hp["model_args"] == json.dumps(SMALL)
    assert set(metrics) == {"hparam/val/top1_error", "hparam/test/top1_error", "hparam/train/loss"} and w.closed


def test_missing_tensorboard_is_said_once(monkeypatch, capsys, tmp_path):
    import sys

    from densenet.train import logs

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    monkeypatch.setattr(logs, "_TB_MISSING_SAID", False)
    assert logs.summary_writer(tmp_path) is None and logs.summary_writer(tmp_path) is None
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1 and "--no-tensorboard" in err
    assert "densenet-paper[tensorboard]" in err


# --- the first run's recipe --------------------------------------------------------------------------------

def test_first_run_recipe_has_no_dropout_and_the_papers_datasets_keep_their_rule():
    c = TrainConfig().resolve()
    assert (c.dataset, c.augment, c.drop_rate, c.epochs) == ("digits", "none", 0.0, 30)
    assert TrainConfig(drop_rate=0.2).resolve().drop_rate == 0.2  # still a choice
    assert TrainConfig(dataset="svhn").resolve().drop_rate == 0.2
    assert TrainConfig(dataset="cifar10", augment="none").resolve().drop_rate == 0.2


# --- consistency ---------------------------------------------------------------------------------------------

def test_every_train_option_has_help_and_shows_its_default(capsys):
    from densenet.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.option_strings and action.help is not argparse_suppress():
            assert action.help, action.option_strings
    text = train.format_help().split("options:", 1)[1]
    for flag, default in [("--lr LR", "the recipe's: 0.1"), ("--momentum MOMENTUM", "the recipe's: 0.9"),
                          ("--seed SEED", "0")]:
        block = text.split(flag, 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default}" in " ".join(block.split()), flag
    assert "300 CIFAR" in text.split("--epochs EPOCHS", 1)[1].split("\n  --", 1)[0]


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def test_models_table_shows_the_published_gmacs(capsys):
    code, out, _ = run_main(capsys, "models", "resnet50", "resnext50_32x4d", "densenet_bc_100_k12")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("resnet", "resnext", "dense"))}
    assert code == 0
    assert rows["resnet50"][3:5] == ["4.089", "3.8"]  # measured with torchvision's layout; He 2015 prints 3.8
    assert rows["resnext50_32x4d"][3:5] == ["4.230", "4.2"]
    assert rows["densenet_bc_100_k12"][4] == "-"  # the paper prints no FLOPs for the CIFAR networks
    code, out, _ = run_main(capsys, "models", "resnet50", "--json")
    (r,) = json.loads(out)
    assert r["published_gmacs"] == 3.8 and r["paper_gmacs"] == 4.089


def test_download_without_a_network_says_what_and_how(tmp_path, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, _, err = run_main(capsys, "train", "--dataset", "cifar10", "--data", tmp_path / "c", "--download")
    assert code == 2 and err.count("\n") == 1, err
    assert "could not fetch CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err
    assert f"unpack it in {tmp_path / 'c'} (giving {tmp_path / 'c' / 'cifar-10-batches-py'}/)" in err
    assert "without --download" in err


# --- figures -----------------------------------------------------------------------------------------------

def test_reuse_names_the_trained_network_and_warns_when_barely_trained(digits_run, tmp_path, capsys):
    code, out, err = run_main(capsys, "reuse", digits_run, "--out", tmp_path / "reuse.png")
    assert code == 0 and (tmp_path / "reuse.png").is_file()
    assert "warning: this checkpoint was saved after 1 epoch" in err and "initialisation" in err
    from densenet.analysis.reuse import network_name

    assert network_name(densenet.create_model("densenet_bc_100_k12", depth=40)) == "DenseNet-BC (L=40, k=12)"
    assert network_name(densenet.create_model("densenet_40_k12")) == "DenseNet (L=40, k=12)"
    assert network_name(densenet.create_model("densenet121")) == "DenseNet-BC (L=121, k=32)"
    assert network_name(densenet.create_model("densenet_bc_100_k12", compression=1.0)) == "DenseNet-B (L=100, k=12)"


def test_reuse_figure_panels_do_not_overlap_and_the_framed_column_says_how_it_is_scaled():
    from densenet.analysis.reuse import feature_reuse, network_name, reuse_figure

    model = densenet.create_model("densenet_bc_100_k12", depth=40)
    fig = reuse_figure(feature_reuse(model), f"Feature reuse: {network_name(model)}")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"][:3]
    assert len(axes) == 3
    for left, right in zip(axes, axes[1:]):
        frame = left.get_window_extent(r)
        for artist in [right.yaxis.label, *right.get_yticklabels()]:
            box = artist.get_window_extent(r)
            assert box.x1 < frame.x0 or box.x0 > frame.x1 or not artist.get_text(), artist.get_text()
    texts = [t.get_text() for t in fig.texts]
    assert any("scaled to its own maximum" in t for t in texts)
    assert fig._suptitle.get_text() == "Feature reuse: DenseNet-BC (L=40, k=12)"


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
