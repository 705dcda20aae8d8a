"""The paper's analyses: feature reuse (Figure 5) on hand-set weights, per-stage profile and
activation memory, plots from real runs, and reproduction grids that resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import densenet
from densenet.analysis.complexity import profile
from densenet.analysis.memory import activation_memory
from densenet.analysis.reuse import feature_reuse, save_reuse
from densenet.cli import main
from densenet.models.densenet import DenseNet, DenseNetConfig

from helpers import make_folder


def hand_set_densenet():
    """Two blocks of 3 basic layers, k = 2, 4 stem maps, theta = 1, 3 classes. Every weight that
    layer l reads from source s is set to (l + 1) * 10 + s, with a sign that alternates per filter."""
    cfg = DenseNetConfig(growth_rate=2, block_config=(3, 3), bottleneck=False, compression=1.0,
                         num_init_features=4, num_classes=3)
    m = DenseNet(cfg)
    with torch.no_grad():
        for b in (m.features.denseblock1, m.features.denseblock2):
            k0 = b.denselayer1.conv1.in_channels
            for l, layer in enumerate(b.values(), start=1):
                w = layer.conv1.weight
                for s in range(l):
                    lo, hi = (0, k0) if s == 0 else (k0 + 2 * (s - 1), k0 + 2 * s)
                    w[:, lo:hi] = (l + 1) * 10 + s
                w[::2] *= -1
        for reader, k0 in ((m.features.transition1.conv.weight, 4), (m.classifier.weight, 10)):
            for s in range(4):
                lo, hi = (0, k0) if s == 0 else (k0 + 2 * (s - 1), k0 + 2 * s)
                reader[:, lo:hi] = -(100 + s)
    return m


def test_feature_reuse_numbers_on_hand_set_weights():
    blocks = feature_reuse(hand_set_densenet())
    assert [b.target_names for b in blocks] == [["1", "2", "3", "T1"], ["1", "2", "3", "C"]]
    for b in blocks:
        v = b.values
        for l in range(1, 4):
            for s in range(4):
                if s < l:
                    # L1 norm of the weights reading s, divided by the number of maps of s:
                    # 2 filters (k) x 3x3 kernel x |(l+1)*10 + s| per map
                    assert v[s][l - 1] == pytest.approx(2 * 9 * ((l + 1) * 10 + s)), (b.block, s, l)
                else:
                    assert math.isnan(v[s][l - 1])
    # transition: 1x1 convolution with 10 output maps (theta = 1); classifier: 3 classes
    assert [blocks[0].values[s][3] for s in range(4)] == pytest.approx([10 * (100 + s) for s in range(4)])
    assert [blocks[1].values[s][3] for s in range(4)] == pytest.approx([3 * (100 + s) for s in range(4)])


def test_feature_reuse_bottleneck_reads_the_1x1_and_files_are_written(tmp_path):
    m = densenet.create_model("densenet_bc_100_k12", depth=16)
    blocks = feature_reuse(m)
    assert len(blocks) == 3 and len(blocks[0].values) == 3  # n = 2 layers: sources 0, 1, 2
    w = m.features.denseblock1.denselayer2.conv1.weight  # 1x1, reads 24 + 12 maps
    assert blocks[0].values[1][1] == pytest.approx(w[:, 24:36].abs().sum().item() / 12)
    png, csv_path, json_path = save_reuse(blocks, tmp_path / "reuse.png", "test")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 400 and len(np.unique(np.asarray(im.convert("L")))) > 10  # a real picture
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "block,source,target,l1_per_input_map" and len(rows) == 1 + 3 * (3 + 3)
    assert json.loads(json_path.read_text())[0]["targets"] == ["1", "2", "T1"]
    with pytest.raises(ValueError, match="defined for DenseNets"):
        feature_reuse(densenet.create_model("resnet20"))


def test_activation_memory_counts_what_backward_keeps():
    """conv -> ReLU: ReLU keeps its output for backward (B*C*H*W floats); the conv keeps its input,
    which is the caller's (not counted), and its weight (a parameter, not counted)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 2))
    r = activation_memory(net, (3, 16, 16), batch_size=4)
    assert r["by_stage"]["1"] == 4 * 8 * 16 * 16 * 4  # the ReLU's output, which the Linear also keeps
    assert r["total_bytes"] == sum(r["by_stage"].values())


@pytest.mark.slow
def test_profile_memory_efficient_is_linear_in_depth():
    """Doubling the layers per block about doubles the memory-efficient activation memory; the plain
    reference path grows faster (the concatenations are quadratic)."""
    def act(depth, **kw):
        return profile("densenet_bc_100_k12", batch_size=8, depth=depth, **kw).activation_bytes

    eff = [act(d, memory_efficient=True) for d in (52, 100, 196)]
    ref = [act(d, fused=False) for d in (52, 100, 196)]
    assert eff[2] / eff[1] < 2.1 and ref[2] / ref[1] > 2.5
    p = profile("densenet_bc_100_k12", batch_size=8)
    assert p.params == p.paper_params == 769_162 and abs(p.macs / 1e9 - p.paper_gmacs) < 6e-4
    assert sum(s.params for s in p.stages) == p.params and sum(s.macs for s in p.stages) == p.macs
    assert act(100) < act(100, fused=False)


def test_profile_cli_json(capsys):
    assert main(["profile", "densenet121", "densenet_40_k12", "--batch-size", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["params"] for r in rows] == [7_978_856, 1_019_722]
    assert rows[0]["stages"][4]["name"] == "features.denseblock1"
    assert main(["profile", "densenet_40_k12", "--input-size", "1x28x28", "--batch-size", "2"]) == 0
    assert "1x28x28" in capsys.readouterr().out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from densenet.train import TrainConfig, fit

    tmp = tmp_path_factory.mktemp("runs")
    folder = make_folder(tmp / "shapes", per_class=12, test_per_class=3, size=12)
    runs = []
    for name, depth in (("small", 10), ("larger", 16)):
        fit(TrainConfig(model="densenet_bc_100_k12", model_args={"depth": depth, "growth_rate": 4},
                        dataset="folder", data=str(folder), epochs=3, batch_size=12, val_size=6,
                        progress=False, tensorboard=False, out=str(tmp / name)))
        runs.append(tmp / name)
    return runs


def test_plot_cli_writes_three_figures(two_runs, tmp_path, capsys):
    from PIL import Image

    assert main(["plot", *map(str, two_runs), "--out", str(tmp_path / "figs"), "--setting", "C10+"]) == 0
    for name in ("curves.png", "error_vs_params.png", "error_vs_flops.png"):
        with Image.open(tmp_path / "figs" / name) as im:
            assert im.size[0] > 500 and len(np.unique(np.asarray(im.convert("L")))) > 20


def test_reuse_cli(two_runs, tmp_path):
    assert main(["reuse", str(two_runs[1]), "--out", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.csv").is_file() and (tmp_path / "r.json").is_file()


def test_reproduce_grid_runs_skips_and_resumes(tmp_path, monkeypatch, capsys):
    import densenet.train as train

    calls = []

    def fake_fit(cfg, resume=None):
        calls.append((cfg.model, cfg.augment, cfg.epochs, cfg.dataset, resume))
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"val_top1_error": 10.0 + len(calls), "test_top1_error": None}))
        return {}

    monkeypatch.setattr(train, "fit", fake_fit)
    folder = make_folder(tmp_path / "c10", per_class=2, test_per_class=1)
    args = ["reproduce", "table2", "--out", str(tmp_path / "grid"), "--epochs", "2",
            "--data", f"cifar10={folder}", "--only", "densenet_40_k12", "--only", "densenet_bc_100_k12/C10+"]
    assert main(args + ["--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "densenet_40_k12       C10+" in listing and "no --data cifar100=PATH" in listing and not calls
    # a partial cell (it has a checkpoint) is resumed, not restarted
    partial = tmp_path / "grid" / "densenet_bc_100_k12" / "C10+" / "seed0"
    partial.mkdir(parents=True)
    (partial / "last").mkdir()
    assert main(args) == 0
    assert [c[:4] for c in calls] == [("densenet_40_k12", "none", 2, "folder"), ("densenet_40_k12", "cifar", 2, "folder"),
                                      ("densenet_bc_100_k12", "cifar", 2, "folder")]
    assert calls[2][4] == str(partial) and calls[0][4] is None
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "| densenet_40_k12 | 11.00 val (7.00, +4.00) | 12.00 val (5.24, +6.76) | not run (27.55)" in table
    assert main(args) == 0 and len(calls) == 3  # finished cells are skipped
    csv_rows = (tmp_path / "grid" / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("network,setting,measured") and len(csv_rows) == 4
