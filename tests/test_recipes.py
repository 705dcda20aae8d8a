"""The recipes as the authors ran them (issue 11): the ImageNet augmentation, the Lua schedule, each
family's recipe, the published numbers, the protocol's checkpoint, 10-crop logit sums, SVHN's split and
the new registry rows. Every test checks numbers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import densenet
from densenet.train import TrainConfig

from helpers import make_folder


# --- 1. ImageNet augmentation (fb.resnet.torch datasets/transforms.lua) -----------------------------------

def test_lighting_noise_has_the_pca_covariance():
    from densenet.data.transforms import IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, Lighting

    light, g = Lighting(0.1), torch.Generator().manual_seed(0)
    img = torch.full((3, 1, 1), 0.5)
    shifts = torch.stack([light(img, g).flatten() - 0.5 for _ in range(20_000)])
    vec, val = torch.tensor(IMAGENET_PCA_EIGVEC), torch.tensor(IMAGENET_PCA_EIGVAL)
    expected = vec @ torch.diag((0.1 * val) ** 2) @ vec.T  # Cov(eigvec @ (alpha * eigval)), alpha ~ N(0, 0.1^2)
    assert shifts.mean(0).abs().max() < 3 * math.sqrt(expected.diag().max() / 20_000)
    assert torch.allclose(torch.cov(shifts.T), expected, rtol=0.05, atol=2e-6)
    assert (val[0], vec[0, 0], vec[2, 1]) == (pytest.approx(0.2175), pytest.approx(-0.5675), pytest.approx(-0.6948))


def test_colour_jitter_blends_as_the_lua_without_clamping():
    from densenet.data.transforms import ColorJitter

    g = torch.Generator().manual_seed(1)
    img = torch.rand(3, 6, 6, generator=g) * 0.2 + 0.8
    bright = [ColorJitter(0.4, 0, 0)(img, g) / img for _ in range(2000)]  # a single factor per image
    factors = torch.stack([b.flatten()[0] for b in bright])
    assert all(torch.allclose(b, torch.full_like(b, float(b.flatten()[0])), atol=1e-5) for b in bright[:50])
    assert 0.6 <= factors.min() < 0.62 and 1.38 < factors.max() <= 1.4 and abs(factors.mean() - 1) < 0.02
    assert max(float((ColorJitter(0.4, 0, 0)(img, g)).max()) for _ in range(200)) > 1.0  # not clamped
    grey = lambda x: 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # noqa: E731
    c = ColorJitter(0, 0.4, 0)(img, g)  # contrast keeps the mean grey level
    assert float(grey(c).mean()) == pytest.approx(float(grey(img).mean()), abs=1e-5)
    s = ColorJitter(0, 0, 0.4)(img, g)  # saturation keeps every pixel's grey level
    assert torch.allclose(grey(s), grey(img), atol=1e-5)


def test_random_sized_crop_draws_the_lua_area_and_aspect():
    from densenet.data.transforms import random_sized_crop_params

    g = torch.Generator().manual_seed(2)
    crops = [random_sized_crop_params(300, 400, g) for _ in range(3000)]
    crops = [c for c in crops if c is not None]
    area = torch.tensor([h * w / (300 * 400) for _, _, h, w in crops])
    ratio = torch.tensor([w / h for _, _, h, w in crops])
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.2 < area.median() < 0.6
    assert ((ratio >= 0.74) & (ratio <= 1.36)).all()  # 3/4..4/3, whichever side is swapped
    assert 0.4 < float((ratio > 1).float().mean()) < 0.6
    assert all(0 <= t and t + h <= 300 and 0 <= l and l + w <= 400 for t, l, h, w in crops)


def test_imagenet_train_transform_is_the_whole_fb_pipeline():
    from PIL import Image

    from densenet.data.loader import IMAGENET_MEAN_STD, stream_transform

    tf = stream_transform(True, 16, 18, IMAGENET_MEAN_STD)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["RandomSizedCrop", "ToImage", "ToDtype", "ColorJitter", "Lighting", "Normalize",
                     "RandomHorizontalFlip"]
    torch.manual_seed(0)
    grey = Image.new("RGB", (40, 30), (124, 116, 104))  # the ImageNet mean colour
    x = torch.stack([tf(grey) for _ in range(64)])
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    # jitter and lighting move the mean colour: per-image channel means spread around the mean (0 after normalising)
    means = x.mean((2, 3))
    assert means.mean(0).abs().max() < 0.25 and 0.05 < float(means.std(0).min())


def test_reflection_padded_crops_for_wide_resnets():
    from densenet.data.transforms import random_crop

    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)  # no pixel is 0: a zero-padded crop would show one
    g = torch.Generator().manual_seed(0)
    crops = [random_crop(x, (4, 4), 2, g, "reflect") for _ in range(50)]
    assert all(set(c.flatten().tolist()) <= set(range(1, 17)) for c in crops)  # mirrored pixels, never zeros
    assert any(not torch.equal(c, x) for c in crops)


# --- 3. The schedule is the Lua's -----------------------------------------------------------------------

def _lrs(cfg: TrainConfig) -> list[float]:
    return [cfg.learning_rate(e) for e in range(cfg.epochs)]


def test_lr_at_each_boundary_epoch_is_the_lua_schedule():
    cfg = TrainConfig(model="densenet_bc_100_k12", dataset="cifar10").resolve()
    lrs = _lrs(cfg)  # index = 0-indexed epoch; train.lua: decay when the 1-indexed epoch >= 0.5 * nEpochs
    assert cfg.milestones == (149.0, 224.0)
    assert (lrs[148], lrs[149], lrs[223], lrs[224]) == pytest.approx((0.1, 0.01, 0.01, 0.001))
    for n in (1, 2, 3, 4, 5, 7, 40, 90, 300):  # every length is a valid schedule, starting at the base rate
        c = TrainConfig(model="densenet_bc_100_k12", dataset="cifar10", epochs=n).resolve()
        lua = [0.1 * 0.1 ** (2 if e >= 0.75 * n else 1 if e >= 0.5 * n else 0) for e in range(1, n + 1)]
        got = _lrs(c)
        assert got[0] == 0.1
        if n >= 3:  # from 3 epochs on exactly the Lua; below, no decay falls on the first epoch
            assert got == pytest.approx(lua)
        TrainConfig(**c.to_dict())  # the saved config is valid again (`densenet eval` rebuilds it)
    assert _lrs(TrainConfig(dataset="cifar10", epochs=3).resolve()) == pytest.approx([0.1, 0.01, 0.001])
    assert _lrs(TrainConfig(dataset="cifar10", epochs=1).resolve()) == [0.1]


def test_imagenet_schedule_is_floor_epoch_minus_one_over_30():
    cfg = TrainConfig(model="densenet121", dataset="imagenet").resolve()
    lrs = _lrs(cfg)
    assert lrs == pytest.approx([0.1 * 0.1 ** ((e - 1) // 30) for e in range(1, 91)])


def test_warm_up_and_iteration_milestones_of_he2015():
    cfg = TrainConfig(model="resnet110", dataset="cifar10").resolve()
    assert (cfg.epochs, cfg.iterations, cfg.milestone_unit, cfg.warmup_lr, cfg.warmup_iterations) == \
        (164, 64_000, "iterations", 0.01, 400)  # 64k steps of 391 (50,000 / 128): 164 epochs, as fb.resnet.torch
    steps = 391
    lr = lambda it: cfg.learning_rate(it // steps, it % steps, steps)  # noqa: E731
    assert (lr(0), lr(399), lr(400)) == pytest.approx((0.01, 0.01, 0.1))
    assert (lr(31_999), lr(32_000), lr(47_999), lr(48_000), lr(64_000)) == pytest.approx((0.1, 0.01, 0.01, 0.001, 0.001))
    assert TrainConfig(model="resnet20", dataset="cifar10").resolve().warmup_iterations == 0  # only 110 and 1202
    short = TrainConfig(model="resnet20", dataset="cifar10", epochs=8).resolve()  # a shorter run: same fractions
    assert (short.milestone_unit, short.milestones) == ("epochs", (3.0, 5.0))


def test_iteration_recipe_on_a_folder_counts_epochs_once_loaded(tmp_path):
    from densenet.train import fit

    folder = make_folder(tmp_path / "f", per_class=12, test_per_class=2, size=8)
    cfg = TrainConfig(model="resnet20", dataset="folder", data=str(folder), recipe="resnet-he2015-cifar",
                      iterations=6, batch_size=8, val_size=6, progress=False, tensorboard=False)
    assert cfg.resolve().epochs is None  # unknown size until loaded
    s = fit(cfg)  # 30 images / 8 = 4 steps per epoch: 6 iterations ~ 2 epochs
    assert s["epochs"] == 2
    done = cfg.resolve(train_images=30)
    assert (done.epochs, done.milestone_unit, done.milestones) == (2, "iterations", (32_000.0, 48_000.0))
    assert done.resolve() == done  # resolving again changes nothing (resume, eval)
    mine = TrainConfig(model="resnet20", dataset="folder", milestone_unit="iterations", milestones=(3,),
                       iterations=8, warmup_iterations=0).resolve(train_images=30)
    assert [mine.learning_rate(e, s_, 4) for e in range(2) for s_ in range(4)] == pytest.approx([0.1] * 3 + [0.01] * 5)


# --- 4. Per-family recipes ------------------------------------------------------------------------------

@pytest.mark.parametrize("model, dataset, expect", [
    ("densenet_bc_100_k12", "cifar10", dict(batch_size=64, epochs=300, nesterov=True, weight_decay=1e-4, drop_rate=0.0)),
    ("densenet_40_k12", "svhn", dict(batch_size=64, epochs=40, milestones=(19.0, 29.0), drop_rate=0.2, test_on="best")),
    ("resnet56", "cifar10", dict(batch_size=128, nesterov=False, momentum=0.9, weight_decay=1e-4, epochs=164,
                                 milestones=(32_000.0, 48_000.0), val_size=0, drop_rate=0.0)),
    ("preact_resnet164", "cifar10", dict(batch_size=128, nesterov=False, warmup_lr=0.01, warmup_iterations=400)),
    ("preact_resnet1001", "cifar10", dict(batch_size=64, epochs=200, milestones=(80.0, 121.0), nesterov=True,
                                          warmup_iterations=0)),  # the Torch code: no warm-up
    ("preact_resnet1001", "cifar100", dict(batch_size=128, epochs=164, milestones=(32_000.0, 48_000.0), nesterov=False,
                                           warmup_iterations=400, recipe="preact-resnet1001-c100")),  # He 2016's Caffe
    ("resnet110_stochdepth", "cifar10", dict(batch_size=128, epochs=500, milestones=(249.0, 374.0), nesterov=True,
                                             weight_decay=1e-4, val_size=5000, test_on="best")),
    ("resnet110_stochdepth", "svhn", dict(epochs=50, milestones=(29.0, 34.0), val_size=6000, test_on="best",
                                          val_every_iterations=200, normalize="pixel")),
    ("wrn_28_10", "cifar10", dict(batch_size=128, epochs=200, lr=0.1, lr_gamma=0.2, milestones=(59.0, 119.0, 159.0),
                                  weight_decay=5e-4, nesterov=True, drop_rate=0.0, augment="cifar-reflect",
                                  normalize="zca", reset_momentum_at_decay=True, drop_last=True)),
    ("wrn_16_4", "svhn", dict(epochs=160, lr=0.01, lr_gamma=0.1, milestones=(79.0, 119.0), drop_rate=0.4,
                              weight_decay=5e-4, augment="none")),
    ("resnext29_8x64d", "cifar10", dict(batch_size=128, epochs=300, weight_decay=5e-4, milestones=(147.0, 222.0),
                                        nesterov=True)),
    ("resnet50", "imagenet", dict(batch_size=256, epochs=90, milestones=(30.0, 60.0), nesterov=True)),
    ("resnext50_32x4d", "imagenet", dict(epochs=100, milestones=(30.0, 60.0, 90.0))),
])
def test_each_family_trains_with_its_own_papers_recipe(model, dataset, expect):
    cfg = TrainConfig(model=model, dataset=dataset).resolve()
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert TrainConfig(**cfg.to_dict()).resolve() == cfg  # the saved config resolves to itself (resume, eval)


def test_recipe_optimizer_settings_reach_sgd():
    from densenet.train.engine import build_model, make_optimizer

    cfg = TrainConfig(model="wrn_16_4", dataset="svhn").resolve()
    model, args = build_model(cfg, 10, 3)
    assert args["drop_rate"] == 0.4  # the WRN SVHN script's 0.4, not DenseNet's 0.2
    assert TrainConfig(model="wrn_16_4", dataset="cifar10").resolve().drop_rate == 0.0  # the registry's 0.4 loses
    _, args10 = build_model(TrainConfig(model="wrn_16_4", dataset="cifar10",
                                        model_args={"depth": 10, "widen_factor": 1}).resolve(), 10, 3)
    assert args10["drop_rate"] == 0.0
    opt, _ = make_optimizer(TrainConfig(model="resnet20", dataset="cifar10").resolve(), torch.nn.Linear(2, 2))
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"], g["dampening"]) == (0.1, 0.9, False, 1e-4, 0.0)
    user = TrainConfig(model="wrn_16_4", dataset="svhn", lr=0.05, drop_rate=0.1).resolve()  # the user wins
    assert (user.lr, user.drop_rate) == (0.05, 0.1)


def test_every_recipe_carries_its_sources_and_departures():
    from densenet.recipes import DATASET_RECIPES, NO_PUBLISHED_RECIPE, RECIPES, Source, departures

    for r in [*RECIPES.values(), *DATASET_RECIPES.values()]:
        assert r.sources and all(isinstance(s, Source) for s in r.sources), r.name
        for s in r.sources:
            assert s.paper or (len(s.commit) == 40 and s.url.startswith(f"https://github.com/{s.repository}/blob/"))
    wrn = RECIPES["wrn-cifar"].sources[0]
    assert wrn.text() == ("szagoruyko/wide-residual-networks train.lua:18 @5ed3b72 "
                          "(dataset = './datasets/cifar10_whitened.t7')")
    assert wrn.url.endswith("/5ed3b7293d0b76a2fb8cb80bb6436ac477c1c3f4/train.lua#L18")
    with pytest.raises(ValueError, match="needs a file, lines and a full commit"):
        Source("x", "owner/name", "train.lua", "1", "abc")
    assert any("3x3" in d for d in departures("preact_resnet1001", "cifar10"))  # the stride, from the network
    assert not any(NO_PUBLISHED_RECIPE in d for d in departures("preact_resnet1001", "cifar10"))


def test_cell_sources_and_departures_of_the_issues_cells():
    from densenet.grid.reproduce import Cell, cell_config, cell_departures, cell_sources

    def cell(row, setting):
        c = Cell(row, setting, 0)
        cfg = cell_config(c, {}, None, None, Path("OUT"))
        return cfg, cell_sources(c, cfg), cell_departures(c, cfg)

    cfg, src, dep = cell("preact_resnet1001", "C100+")
    assert cfg.recipe == "preact-resnet1001-c100" and cfg.batch_size == 128 and cfg.warmup_iterations == 400
    assert any("resnet-pre-act.lua:105-107" in s for s in src)
    cfg, src, dep = cell("preact_resnet1001", "C10")  # starred: the DenseNet authors' run
    assert dep[0].startswith("no published recipe: the DenseNet authors' own run")
    cfg, src, dep = cell("resnet1202_stochdepth", "C10+")
    assert "fb.resnet.torch modified" in dep[0]
    cfg, src, dep = cell("wrn_28_10", "C100+")
    assert (cfg.normalize, cfg.drop_last, cfg.reset_momentum_at_decay) == ("zca", True, True)
    assert any("cifar10_whitened.t7" in s for s in src)
    cfg, src, dep = cell("resnet110_stochdepth", "SVHN")
    assert (cfg.milestones, cfg.val_every_iterations, cfg.normalize) == ((29.0, 34.0), 200, "pixel")
    assert any("-N 25" in s for s in src)


def test_validation_every_n_iterations_keeps_the_best_and_resumes_exactly(tmp_path, monkeypatch):
    """val_every_iterations (SD's SVHN cadence) validates across epoch ends, checkpoints each new best at
    once, and a run stopped after a mid-epoch validation resumes bitwise; with WRN's momentum reset and
    dropped partial batch."""
    import os
    import signal

    from densenet.data.loader import Batches
    from densenet.train import TrainingStopped, fit
    from densenet.weights import read_state_dict

    folder = make_folder(tmp_path / "shapes", per_class=24, test_per_class=6, size=12)

    def run(out, **kw):  # 63 training images, batch 16, last partial batch dropped: 3 steps per epoch
        return fit(TrainConfig(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 6},
                               dataset="folder", data=str(folder), epochs=2, batch_size=16, val_size=9,
                               milestones=(1,), drop_last=True, reset_momentum_at_decay=True, val_every_iterations=2,
                               test_on="best", progress=False, tensorboard=False, out=str(out), **kw))

    straight = run(tmp_path / "straight")
    rows = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_iteration"] for r in rows] == [2, 6]  # each epoch's last validation: 2 (mid), 4 (mid), 6 (end)
    assert straight["best"]["iteration"] in (2, 4, 6) and "iteration" in straight["test_weights"]
    original = Batches.iterate

    def iterate(self, ep=0, start=0):  # Ctrl-C in epoch 2, stopping after iteration 5 (the mid-epoch validation at 4 done)
        for i, batch in enumerate(original(self, ep, start), start):
            if self.shuffle and ep == 1 and i == 1:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(Batches, "iterate", iterate)
    with pytest.raises(TrainingStopped):
        run(tmp_path / "broken")
    monkeypatch.undo()
    resumed = fit(TrainConfig.from_dict(json.loads((tmp_path / "broken" / "config.json").read_text())),
                  resume=str(tmp_path / "broken"))
    for name in ("last", "best"):
        a = read_state_dict(tmp_path / "straight" / name / "model.safetensors")[0]
        b = read_state_dict(tmp_path / "broken" / name / "model.safetensors")[0]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["best"] == straight["best"] and resumed["test_top1_error"] == straight["test_top1_error"]


# --- 5. Published numbers -------------------------------------------------------------------------------

SEED_TABLE2 = """\
Network in Network [22]	-	-	10.41	8.81	35.68	-	2.35
All-CNN [32]	-	-	9.08	7.25	-	33.71	-
Deeply Supervised Net [20]	-	-	9.69	7.97	-	34.57	1.92
Highway Network [34]	-	-	-	7.72	-	32.39	-
FractalNet [17]	21	38.6M	10.18	5.22	35.34	23.30	2.01
with Dropout/Drop-path	21	38.6M	7.33	4.60	28.20	23.73	1.87
ResNet [11]	110	1.7M	-	6.61	-	-	-
ResNet (reported by [13])	110	1.7M	13.63	6.41	44.74	27.22	2.01
ResNet with Stochastic Depth [13]	110	1.7M	11.66	5.23	37.80	24.58	1.75
	1202	10.2M	-	4.91	-	-	-
Wide ResNet [42]	16	11.0M	-	4.81	-	22.07	-
	28	36.5M	-	4.17	-	20.50	-
with Dropout	16	2.7M	-	-	-	-	1.64
ResNet (pre-activation) [12]	164	1.7M	11.26*	5.46	35.58*	24.33	-
	1001	10.2M	10.56*	4.62	33.47*	22.71	-
DenseNet (k = 12)	40	1.0M	7.00	5.24	27.55	24.42	1.79
DenseNet (k = 12)	100	7.0M	5.77	4.10	23.79	20.20	1.67
DenseNet (k = 24)	100	27.2M	5.83	3.74	23.42	19.25	1.59
DenseNet-BC (k = 12)	100	0.8M	5.92	4.51	24.15	22.27	1.76
DenseNet-BC (k = 24)	250	15.3M	5.19	3.62	19.64	17.60	1.74
DenseNet-BC (k = 40)	190	25.6M	-	3.46	-	17.18	-
"""  # the seed notes' Table 2 (../shared/papers/densenet-notes-ja.txt), as printed


def test_published_table2_rows_match_the_seed_table():
    from densenet.paper import TABLE2_ROWS, TABLE2_SETTINGS

    lines = SEED_TABLE2.strip("\n").splitlines()
    assert len(lines) == len(TABLE2_ROWS) == 21
    for line, row in zip(lines, TABLE2_ROWS):
        cells = line.split("\t")
        depth, params, errs = cells[1], cells[2], cells[3:]
        assert (row.depth, row.params) == (None if depth == "-" else int(depth), None if params == "-" else params)
        expected = {s: float(e.rstrip("*")) for s, e in zip(TABLE2_SETTINGS, errs) if e != "-"}
        assert row.errors == expected, row.key
        assert set(row.starred) == {s for s, e in zip(TABLE2_SETTINGS, errs) if e.endswith("*")}
        if row.model:
            densenet.get_entry(row.model)  # every trainable row is a registered network


def test_figure3_resnets_are_fb_resnet_torch_single_crop_errors():
    from densenet.paper import RESNET_IMAGENET_FB, RESNEXT_TABLE3

    assert {n: e["top1"] for n, e in RESNET_IMAGENET_FB.items()} == {
        "resnet18": 30.43, "resnet34": 26.73, "resnet50": 24.01, "resnet101": 22.44, "resnet152": 22.16}
    assert RESNET_IMAGENET_FB["resnet50"]["top5_10crop"] == 6.08
    assert [RESNEXT_TABLE3[f"resnext50_{w}"] for w in ("2x40d", "4x24d", "8x14d", "32x4d")] == [23.0, 22.6, 22.3, 22.2]


@pytest.mark.slow
def test_reproduce_dry_run_lists_recipe_and_published_number(capsys, tmp_path):
    from densenet.cli import main

    assert main(["reproduce", "resnet-vs-densenet", "--out", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "recipe densenet-cifar: batch 64, 300 ep, lr 0.1 x0.1 after 149,224 ep" in out
    assert "published 4.51" in out and "published 6.61" in out and "published 4.62" in out
    assert "recipe resnet-he2015-cifar-warmup: batch 128, 64,000 it (164 ep)" in out and "warm-up 0.01x400it" in out
    assert main(["reproduce", "table2-baselines", "--out", str(tmp_path), "--dry-run",
                 "--only", "wrn_16_4", "--only", "resnet110_stochdepth/C10+"]) == 0
    out = capsys.readouterr().out
    assert "recipe wrn-svhn: batch 128, 160 ep, lr 0.01 x0.1 after 79,119 ep" in out and "dropout 0.4" in out
    assert "wd 0.0005" in out and "published 1.64" in out
    assert "recipe stochdepth-cifar: batch 128, 500 ep" in out and "val 5000, test best; published 5.23" in out
    assert main(["reproduce", "table2-baselines", "--dry-run"]) == 0  # no grid directory needed to list
    out = capsys.readouterr().out  # the issue's check: ZCA for WRN, SD's SVHN schedule, a source for every cell
    cells = out.split("\n    network ")[1:]
    assert cells and all("\n    source: " in c for c in cells)
    wrn = [c for c in cells if c.startswith("wrn_16_8") or c.startswith("wrn_28_10")]
    assert len(wrn) == 4 and all("data zca" in c and "momentum reset at each decay" in c for c in wrn)
    sd_svhn = [c for c in cells if "recipe stochdepth-svhn" in c]
    assert len(sd_svhn) == 2 and all("after 29,34 ep" in c and "val 6000 every 200 it" in c for c in sd_svhn)
    assert all(c.split(";")[0].endswith(("resnet152_stochdepth", "resnet152_constdepth")) for c in sd_svhn)  # 152 layers
    assert out.count("departs: no published recipe: the DenseNet authors' own run") == 5  # 4 starred, SD-1202
    assert "pending (no --data" in out and not (tmp_path / "GRID_DIR").exists() and not Path("GRID_DIR").exists()


def test_results_table_puts_baselines_and_other_methods_beside_published(tmp_path):
    from densenet.grid.reproduce import Cell, write_tables

    cell = Cell("wrn_16_8", "C10+", 0)
    cell.path(tmp_path).mkdir(parents=True)
    (cell.path(tmp_path) / "summary.json").write_text(json.dumps({"test_top1_error": 5.0}))
    md, _ = write_tables("table2-baselines", [cell], tmp_path)
    text = md.read_text()
    assert "| wrn_16_8 | 5.00 (4.81, +0.19) |" in text
    assert "| FractalNet with Dropout/Drop-path [17] | 21 | 38.6M | 4.60 |" in text


# --- 6. One reported number: the protocol's checkpoint ----------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from densenet.train import fit

    root = tmp_path_factory.mktemp("proto")
    folder = make_folder(root / "f", per_class=10, test_per_class=3, size=8, val=True)
    run = root / "run"
    s = fit(TrainConfig(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 4}, dataset="folder",
                        data=str(folder), epochs=3, batch_size=10, val_size=6, lr=0.5, progress=False,
                        tensorboard=False, out=str(run)))
    return run, folder, s


def test_eval_uses_the_checkpoint_the_summary_reports(run_dir, capsys):
    from densenet.cli import main
    from densenet.runs import resolve_checkpoint

    run, _, summary = run_dir
    assert summary["test_weights"] == "final epoch"
    assert resolve_checkpoint(run).file == run / "last" / "model.safetensors"  # CIFAR's protocol: the final epoch
    assert resolve_checkpoint(run, "best").file == run / "best" / "model.safetensors"
    assert main(["eval", "--checkpoint", str(run), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["checkpoint"] == str(run / "last" / "model.safetensors") and r["top1_error"] == pytest.approx(summary["test_top1_error"])
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "test_on": "best"}))  # SVHN's protocol: best validation
    try:
        assert resolve_checkpoint(run).file == run / "best" / "model.safetensors"
    finally:
        (run / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--checkpoint", str(run / "last" / "model.safetensors"), "--which", "best"]) == 2


def test_test_split_of_an_imagenet_layout_folder_says_use_val(tmp_path, capsys):
    from densenet.cli import main
    from densenet.train import fit

    folder = tmp_path / "in"
    make_folder(folder, per_class=6, test_per_class=2, size=8, val=True)
    import shutil

    shutil.rmtree(folder / "test")  # train/ and val/ only, as ImageNet
    fit(TrainConfig(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 4}, dataset="folder",
                    data=str(folder), epochs=1, batch_size=6, val_size=0, progress=False, tensorboard=False,
                    out=str(tmp_path / "run")))
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--split", "test"]) == 2
    assert "use --split val" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--split", "val", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6


# --- 7. Smaller items -----------------------------------------------------------------------------------

def test_ten_crop_sums_the_logits_as_the_lua():
    from densenet.train.engine import evaluate

    class Fixed(torch.nn.Module):  # crop 0 is very sure of class 1; crops 1-9 mildly prefer class 0
        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, x):
            out = torch.tensor([[0.0, 30.0]]) if self.i == 0 else torch.tensor([[1.0, 0.0]])
            self.i += 1
            return out.expand(len(x), 2)

    x = torch.zeros(10, 1, 3, 2, 2)
    r = evaluate(Fixed(), [(x, torch.tensor([1]))])
    # summed logits: class 1 (30 against 9); the mean softmax would pick class 0 (0.1 + 0.9 * 0.73 > 0.5)
    assert r["top1_error"] == 0.0
    assert r["loss"] == pytest.approx(-torch.log_softmax(torch.tensor([9.0, 30.0]), 0)[1].item())


def test_svhn_validation_split_is_400_per_class_from_train_and_200_from_extra():
    from densenet.data.sources import svhn_split

    g = torch.Generator().manual_seed(0)
    train_labels = torch.cat([torch.arange(10).repeat(450), torch.randint(0, 10, (100,), generator=g)])
    extra_labels = torch.arange(10).repeat(230)
    labels = torch.cat([train_labels, extra_labels])
    tr, va = svhn_split(labels, len(train_labels), seed=0)
    assert len(va) == 6000 and len(tr) == len(labels) - 6000 and not set(tr.tolist()) & set(va.tolist())
    n = len(train_labels)
    from_train, from_extra = va[va < n], va[va >= n]
    assert torch.bincount(labels[from_train], minlength=10).tolist() == [400] * 10
    assert torch.bincount(labels[from_extra], minlength=10).tolist() == [200] * 10
    assert torch.equal(svhn_split(labels, n, seed=0)[1], va)  # seeded: the same split every run


def test_select_splits_uses_the_svhn_split_for_6000():
    from densenet.data.sources import ImageSet, Splits
    from densenet.train.engine import select_splits

    labels = torch.cat([torch.arange(10).repeat(500), torch.arange(10).repeat(300)])
    splits = Splits(ImageSet(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels), None,
                    [str(i) for i in range(10)], 1, parts=(5000, 3000))
    cfg = TrainConfig(model="densenet_40_k12", dataset="svhn").resolve()
    train, val, _ = select_splits(cfg, splits)
    assert (len(train), len(val)) == (2000, 6000)


def test_option_a_resnets_and_resnext_ablation_are_registered():
    from densenet.analysis.complexity import count_macs, count_params

    with torch.device("meta"):
        nets = {n: densenet.create_model(n) for n in ("resnet18_a", "plain18", "resnet34_a", "plain34")}
    assert count_params(nets["resnet18_a"]) == count_params(nets["plain18"]) == 11_515_688  # no extra parameter
    assert count_params(nets["resnet34_a"]) == count_params(nets["plain34"]) == 21_623_848
    assert densenet.get_entry("resnet18_a").paper_params == 11_515_688
    for depth, gmacs in ((50, 4.089), (101, 7.801)):  # Table 3: preserved complexity (~4.1 / ~7.8 GFLOPs)
        for name in (f"resnext{depth}_2x40d", f"resnext{depth}_4x24d", f"resnext{depth}_8x14d"):
            with torch.device("meta"):
                m = densenet.create_model(name)
            # within 5% of ResNet's multiply-adds (32x4d itself is +3.4%) and 3% of its parameters
            assert abs(count_macs(m, (3, 224, 224)) / 1e9 / gmacs - 1) < 0.05, name
            assert abs(count_params(m) / densenet.get_entry(f"resnet{depth}").paper_params - 1) < 0.03, name


def test_plots_draw_the_baselines_and_figure3_resnets_beside_the_densenets():
    from densenet.analysis.plots import baseline_points, resnet_imagenet_points

    pts = {k: (px, e) for px, e, k in baseline_points("C10+", "params")}
    assert pts["resnet110"] == (densenet.get_entry("resnet110").paper_params, 6.61)
    assert pts["preact_resnet1001"][1] == 4.62 and pts["wrn_28_10"][1] == 4.17
    assert {k for _, _, k in baseline_points("SVHN", "params")} >= {"wrn_16_4", "resnet110_stochdepth"}
    assert resnet_imagenet_points("params") == [(21_797_672, 26.73), (25_557_032, 24.01), (44_549_160, 22.44),
                                                (60_192_808, 22.16)]
    assert [round(m / 1e9, 3) for m, _ in resnet_imagenet_points("macs")] == [3.664, 4.089, 7.801, 11.514]


def test_reproduce_cell_of_an_iteration_recipe_on_the_cifar_folder(tmp_path):
    from densenet.grid.reproduce import Cell, cell_config, describe

    folder = make_folder(tmp_path / "c10", per_class=1, test_per_class=0)
    cell = Cell("resnet110", "C10+", 0)
    cfg = cell_config(cell, {"cifar10": str(folder)}, None, None, tmp_path)
    assert (cfg.dataset, cfg.val_size, cfg.epochs, cfg.milestone_unit) == ("folder", 5000, 182, "iterations")
    assert "64,000 it (182 ep)" in describe(cell, cfg)  # 45,000 images / 128 = 352 steps per epoch
    half = cell_config(cell, {"cifar10": str(folder)}, None, 0.5, tmp_path)
    assert (half.epochs, half.milestones) == (82, (40.0, 61.0))  # half of 164 epochs, decays at 50% and 75%


# --- 8. One recipe resolution, pinned -----------------------------------------------------------------
# Every registered family (a representative each, and the models with their own row in recipes._BY_MODEL)
# on every dataset, with a few user settings, and every grid cell of `densenet reproduce`: the fully
# resolved TrainConfig, recorded from the code before the recipe moved out of DatasetSpec
# (tests/data/resolved_configs.json). Regenerate only for an intended change: python tests/test_recipes.py

PINNED = Path(__file__).parent / "data" / "resolved_configs.json"
PIN_MODELS_BY_ROW = ("resnet110", "resnet1202", "preact_resnet1001")  # a recipe of their own (He 2015/2016)
PIN_SETTINGS = (  # user settings (command line or config file); "_train_images": resolve(train_images=...)
    {}, {"epochs": 8, "milestones": [0.5, 0.75]}, {"epochs": 8}, {"recipe": "dataset"}, {"augment": "none"}, {"warmup_iterations": 400}, {"val_size": 100, "test_on": "best"},
    {"epochs": 8, "lr": 0.05, "batch_size": 32, "milestones": [3, 6]}, {"_train_images": 1000},
)


def _pin_models() -> list[str]:
    """One model per family the package registers (in registration order), and the models of their own row."""
    from densenet.registry import _REGISTRY, list_models

    firsts: dict[str, str] = {}
    for name in list_models():
        entry = _REGISTRY[name]
        if entry.builder.__module__.startswith("densenet."):  # not a network a test registered
            firsts.setdefault(entry.family, name)
    return list(firsts.values()) + [m for m in PIN_MODELS_BY_ROW if m not in firsts.values()]


def _resolved(make) -> dict:
    """What `make()` resolves to (the fields resolve() sets or changes; the others are as given), or its error."""
    try:
        given, cfg = make()
    except ValueError as e:
        return {"error": str(e)}
    before, after = given.to_dict(), cfg.to_dict()
    return {k: v for k, v in after.items() if v != before[k] and k not in ("out", "progress")}


def resolved_cases() -> dict[str, dict]:
    from densenet.data import DATASETS
    from densenet.grid.reproduce import GRIDS, cell_config, grid_cells

    cases: dict[str, dict] = {}
    for model in _pin_models():
        for dataset in DATASETS:
            for settings in PIN_SETTINGS:
                settings = dict(settings)
                n = settings.pop("_train_images", None)

                def make(model=model, dataset=dataset, settings=settings, n=n):
                    cfg = TrainConfig(model=model, dataset=dataset, **settings)
                    return cfg, cfg.resolve(train_images=n)

                key = f"{model} {dataset} " + json.dumps(settings, sort_keys=True) + (f" train_images={n}" if n else "")
                cases[key] = _resolved(make)
    out = Path("OUT")
    for grid in GRIDS:
        for cell in grid_cells(grid, only_published=False):
            for data, epochs, budget in (({"cifar10": "c10", "cifar100": "c100", "svhn": "svhn"}, None, None),
                                         ({"cifar10": "c10", "cifar100": "c100", "svhn": "svhn"}, None, 0.1),
                                         ({"cifar10": "c10", "cifar100": "c100", "svhn": "svhn"}, 2, None),
                                         ({"cifar10": "c10.tar.gz", "cifar100": "c100.tgz"}, None, 0.5)):
                def make(cell=cell, data=data, epochs=epochs, budget=budget):
                    cfg = cell_config(cell, data, epochs, budget, out)
                    return TrainConfig(), cfg  # against the defaults: every setting the cell makes

                key = f"cell {grid} {cell.row} {cell.setting} data={sorted(data.values())} epochs={epochs} budget={budget}"
                cases[key] = _resolved(make)
    return cases


def test_every_family_and_dataset_resolves_as_pinned():
    """The recipe of every family on every dataset, digits and folder included, with user settings winning,
    and every grid cell's config: unchanged by moving the recipe facts out of DatasetSpec into Recipes."""
    from densenet.registry import _REGISTRY

    expected = json.loads(PINNED.read_text())
    got = resolved_cases()
    families = {_REGISTRY[k.split()[0]].family for k in got if not k.startswith("cell ")}
    assert families == {e.family for e in _REGISTRY.values() if e.builder.__module__.startswith("densenet.")}
    assert len(got) > 700 and set(got) == set(expected)
    wrong = [k for k in expected if got[k] != expected[k]]
    assert not wrong, f"{len(wrong)} resolved configs changed, e.g. {wrong[0]}: {got[wrong[0]]} != {expected[wrong[0]]}"


def test_every_dataset_has_a_recipe_and_its_spec_holds_data_facts_only():
    """One resolution: recipes.recipe_for gives every model on every dataset a complete Recipe; DatasetSpec
    holds no recipe fact; each setting's help text is its field's metadata."""
    import dataclasses

    from densenet.data import DATASETS, DatasetSpec
    from densenet.recipes import DATASET_RECIPES, Recipe, recipe_for
    from densenet.train.config import RECIPE_SETTINGS, SETTING_HELP

    assert set(DATASET_RECIPES) == set(DATASETS)
    assert [f.name for f in dataclasses.fields(DatasetSpec)] == ["name", "normalize", "needs_path", "description",
                                                                  "train_images", "extra_images"]
    assert set(RECIPE_SETTINGS) <= {f.name for f in dataclasses.fields(Recipe)}
    for model in _pin_models():
        for dataset in DATASETS:
            for recipe in ("auto", "dataset"):
                rec = recipe_for(model, dataset, recipe)
                assert None not in (rec.augment, rec.val_size, rec.test_on), (model, dataset, recipe)
    digits = recipe_for("densenet_bc_100_k12", "digits")
    assert (digits.epochs, digits.batch_size, digits.milestones, digits.val_size, digits.augment, digits.drop_rate,
            digits.name) == (30, 64, (0.5, 0.75), 300, "none", 0.0, "dataset")
    folder, cifar = recipe_for("densenet_bc_100_k12", "folder"), recipe_for("densenet_bc_100_k12", "cifar10")
    assert (folder.augment, cifar.augment, cifar.name) == ("auto", "cifar", "densenet-cifar")
    assert dataclasses.replace(folder, augment="cifar", source="") == dataclasses.replace(
        recipe_for("densenet_bc_100_k12", "cifar10", "dataset"), source="")
    svhn = recipe_for("densenet_40_k12", "svhn")
    assert (svhn.name, svhn.epochs, svhn.val_size, svhn.test_on, svhn.augment) == ("densenet-svhn", 40, 6000, "best", "none")
    assert recipe_for("resnet20", "svhn").name == "dataset"  # no He 2015 recipe for SVHN: the dataset's
    assert recipe_for("resnet20", "cifar10", "wrn-svhn").drop_rate == 0.4  # a recipe's own rate stays
    assert recipe_for("resnet20", "cifar10", "densenet-cifar").drop_rate == 0.0  # no dropout option: none
    cfg = TrainConfig(model="resnet110", dataset="cifar10", warmup_iterations=100, warmup_lr=0.02).resolve()
    assert (cfg.warmup_iterations, cfg.warmup_lr, cfg.lr) == (100, 0.02, 0.1)
    assert SETTING_HELP == {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    assert "after any warm-up" in SETTING_HELP["lr"] and "96x96" in SETTING_HELP["in_memory"]


if __name__ == "__main__":  # regenerate the pinned configs (an intended change of a recipe)
    PINNED.parent.mkdir(exist_ok=True)
    PINNED.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                                         for k, v in resolved_cases().items()) + "\n}\n")
