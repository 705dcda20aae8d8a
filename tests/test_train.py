"""Training: the paper's recipe, exact resume, checkpoints that survive kill -9, Ctrl-C and NaN,
torchrun with 2 processes, and `densenet eval`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import densenet
from densenet.data.loader import Batches
from densenet.train import TrainConfig, TrainingStopped, fit
from densenet.saved_model import load_model
from densenet.train.engine import make_optimizer
from densenet.weights import read_state_dict

from helpers import ENV, ROOT, cfg, copy_run, make_folder


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "shapes", per_class=24, test_per_class=6, size=12)


def small(folder, out, **kw):
    base = dict(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 6}, dataset="folder",
                data=str(folder), epochs=2, batch_size=16, val_size=9, progress=False, tensorboard=False,
                out=str(out) if out else None)
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir, name="last"):
    return read_state_dict(Path(run_dir) / name / "model.safetensors")[0]


# --- the recipe ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, epochs, batch, milestones, val, augment, drop", [
    ("cifar10", 300, 64, (149, 224), 5000, "cifar", 0.0),
    ("cifar100", 300, 64, (149, 224), 5000, "cifar", 0.0),
    ("svhn", 40, 64, (19, 29), 6000, "none", 0.2),
    ("imagenet", 90, 256, (30, 60), 0, "imagenet", 0.0),
])
def test_recipe_defaults_are_the_papers(dataset, epochs, batch, milestones, val, augment, drop):
    c = TrainConfig(dataset=dataset).resolve()
    assert (c.epochs, c.batch_size, c.milestones, c.val_size, c.augment, c.drop_rate) == \
        (epochs, batch, milestones, val, augment, drop)
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay, c.lr_gamma) == (0.1, 0.9, True, 1e-4, 0.1)
    # C10 (no augmentation): dropout 0.2, as the paper
    assert TrainConfig(dataset="cifar10", augment="none").resolve().drop_rate == 0.2


def test_optimizer_and_step_schedule():
    cfg = TrainConfig(dataset="cifar10").resolve()
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(cfg, model)
    g = opt.param_groups[0]
    assert (g["momentum"], g["nesterov"], g["dampening"], g["weight_decay"]) == (0.9, True, 0.0, 1e-4)
    lrs = [sched.apply(e, 0, 1) for e in range(300)]
    assert lrs[:149] == [0.1] * 149  # epochs 1-149 (1-indexed); train.lua: decay once epoch >= 0.5 * 300
    assert all(abs(v - 0.01) < 1e-12 for v in lrs[149:224]) and all(abs(v - 0.001) < 1e-12 for v in lrs[224:])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_config_file_and_validation(tmp_path):
    from densenet.train.config import read_config_file

    f = tmp_path / "c.toml"
    f.write_text('dataset = "cifar10"\nepochs = 3\n[model_args]\ndepth = 40\n')
    cfg = TrainConfig.from_dict(read_config_file(f))
    assert cfg.epochs == 3 and cfg.model_args == {"depth": 40}
    y = tmp_path / "c.yaml"
    y.write_text("dataset: svhn\nlr: 0.05\n")
    assert TrainConfig.from_dict(read_config_file(y)).lr == 0.05
    with pytest.raises(ValueError, match="unknown setting.*epoch\\b"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig(amp="fp8")


# --- a run, resumed exactly ----------------------------------------------------------------------------

def test_run_writes_checkpoints_metrics_and_summary(folder, tmp_path):
    s = fit(small(folder, tmp_path / "run"))
    run = tmp_path / "run"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "val_top1_error", "val_top5_error", "images_per_s", "data_wait_frac"} <= rows[0].keys()
    assert s["test_images"] == 18 and 0 <= s["test_top1_error"] <= 100
    assert (run / "last").is_symlink() and (run / "best").is_symlink()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["milestones"] == [1.0, 1.0] and cfg["drop_rate"] == 0.0
    _, meta = read_state_dict(run / "last" / "model.safetensors")
    assert json.loads(meta["classes"]) == ["circle", "square", "stripes"]
    assert json.loads(meta["model_args"])["num_classes"] == 3


def _interrupt_at(monkeypatch, epoch, step):
    """Deliver SIGINT to this process while it trains `step` of `epoch`, as a user's Ctrl-C would."""
    original = Batches.iterate

    def iterate(self, ep=0, start=0):
        for i, batch in enumerate(original(self, ep, start), start):
            if self.shuffle and ep == epoch and i == step:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(Batches, "iterate", iterate)


@pytest.mark.slow
@pytest.mark.parametrize("epoch, step", [(0, 1), (1, 0)], ids=["mid-epoch", "epoch-boundary"])
def test_interrupted_and_resumed_run_ends_bitwise_identical(folder, tmp_path, monkeypatch, epoch, step):
    fit(small(folder, tmp_path / "straight", drop_rate=0.1))
    _interrupt_at(monkeypatch, epoch, step)
    with pytest.raises(TrainingStopped) as e:
        fit(small(folder, tmp_path / "broken", drop_rate=0.1))
    assert e.value.exit_code == 130 and "--resume" in str(e.value)
    monkeypatch.undo()
    fit(small(folder, tmp_path / "broken", drop_rate=0.1), resume=str(tmp_path / "broken"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    def metrics(run):  # what is a function of the data and the weights (not of the clock)
        keys = ("epoch", "lr", "train_loss", "train_error", "val_loss", "val_top1_error", "val_top5_error")
        return [{k: json.loads(r)[k] for k in keys} for r in (run / "metrics.jsonl").read_text().splitlines()]

    assert [r["epoch"] for r in metrics(tmp_path / "broken")] == [1, 2]
    assert metrics(tmp_path / "broken") == metrics(tmp_path / "straight")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(small(folder, run, epochs=1))
    good = weights(run)
    original = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: original(*a, **k) * float("nan"))
    with pytest.raises(TrainingStopped, match="the loss became nan at epoch 2, step 1") as e:
        fit(small(folder, run, epochs=2), resume=str(run))
    assert e.value.exit_code == 3
    after = weights(run)
    assert all(torch.equal(good[k], after[k]) for k in good)


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    import safetensors.torch as st
    calls = {"n": 0}
    real = st.save_file
    def dying_save(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == int(sys.argv[2]):  # die half-way through writing this file, like kill -9
            with open(filename, "wb") as f:
                f.write(b"\\x00" * 1000)
                f.flush()
            os.kill(os.getpid(), 9)
        return real(tensors, filename, metadata=metadata)
    st.save_file = dying_save  # before the package is imported: every writer of a checkpoint file uses it
    from densenet.train import TrainConfig, fit
    cfg = TrainConfig.from_dict(__import__("json").loads(sys.argv[1]))
    fit(cfg)
""")


@pytest.mark.slow
@pytest.mark.parametrize("die_at", [3, 4], ids=["writing-weights", "writing-state"])
def test_kill_9_during_checkpoint_write_leaves_last_checkpoint_loadable(folder, tmp_path, die_at):
    run = tmp_path / "run"
    cfg = small(folder, run, epochs=3).to_dict()
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg), str(die_at)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    # two files per checkpoint: the process died while writing the second epoch's checkpoint
    assert os.readlink(run / "last").endswith("000004")  # epoch 1 (4 steps) is still `last`
    w, _ = read_state_dict(run / "last" / "model.safetensors")
    assert w
    s = fit(small(folder, run, epochs=3), resume=str(run))  # and the run resumes from it
    assert s["epochs"] == 3


def test_crafted_state_file_is_refused(folder, tmp_path):
    run = tmp_path / "run"
    fit(small(folder, run, epochs=1))
    state = run / "last" / "state.safetensors"
    os.chmod(state, 0o644)
    state.write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/densenet_pwned_state'\ntR.")
    with pytest.raises(Exception, match="not a readable training state"):
        fit(small(folder, run, epochs=2), resume=str(run))
    assert not os.path.exists("/tmp/densenet_pwned_state")


# --- torchrun ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_with_gloo_agree_with_one(folder, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): each process takes half of every global batch.
    One process that splits each batch into the same two halves (--accumulate 2, so that BN sees the
    same micro-batches; SyncBN runs only on GPUs) ends with the same weights after two epochs."""
    args = ["train", "--model", "densenet_bc_100_k12", "--depth", "10", "--growth-rate", "6",
            "--dataset", "folder", "--data", str(folder), "--epochs", "2", "--batch-size", "16",
            "--val-size", "8", "--no-progress", "--no-tensorboard", "--drop-rate", "0"]  # 64 = 4 whole batches
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "densenet.cli"] + args + ["--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = subprocess.run([sys.executable, "-m", "densenet.cli"] + args + ["--out", str(tmp_path / "one"),
                                                                          "--accumulate", "2"],
                        env=ENV, capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    for k in a:
        if "running_" in k or "num_batches" in k:  # DDP keeps rank 0's statistics of its own halves
            continue
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5, msg=k)
    assert "val error" in r.stderr and r.stderr.count("done:") == 1  # one summary, from rank 0


# --- the command line ----------------------------------------------------------------------------------

def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "densenet.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_eval_on_a_test_split_never_seen_in_training(folder, tmp_path):
    run = tmp_path / "run"
    fit(small(folder, run, epochs=2))
    r = run_cli("eval", "--checkpoint", str(run), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 18 and 0 <= out["top1_error"] <= 100 and 0 <= out["top5_error"] <= out["top1_error"]
    # the same numbers from the library
    model, info = load_model(run / "best")
    assert info["preprocessing"]["source"] == "memory"
    v = run_cli("eval", "--checkpoint", str(run / "last" / "model.safetensors"), "--split", "val", "--json",
                "--ten-crop")
    assert v.returncode == 0, v.stderr
    assert json.loads(v.stdout)["images"] == 9


@pytest.mark.parametrize("args, match", [
    (["train", "--dataset", "cifar10", "--data", "{tmp}/empty"], "CIFAR-10 not found in .*--download"),
    (["train", "--dataset", "cifar10"], "needs --data PATH"),
    (["train", "--model", "densenet12"], "unknown model 'densenet12'"),
    (["train", "--amp", "fp8"], "amp must be none, bf16 or fp16"),
    (["train", "--resume", "{tmp}/empty"], "is not a run directory"),
    (["eval", "--checkpoint", "{tmp}/nothing"], "does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, args, match):
    import re

    (tmp_path / "empty").mkdir()
    r = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(match, r.stderr), r.stderr


@pytest.mark.slow
def test_cifar10_archive_trains_through_folder(cifar_archive, tmp_path):
    """The real CIFAR-10 images, from the archive, through the folder path: a few steps run and
    the held-out validation split is the paper's 5,000 images."""
    s = fit(TrainConfig(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 4},
                        dataset="folder", data=str(cifar_archive), epochs=1, train_subset=256,
                        batch_size=64, progress=False, tensorboard=False, out=str(tmp_path / "c10")))
    assert s["epochs"] == 1 and "val_top1_error" in s
    cfg = json.loads((tmp_path / "c10" / "config.json").read_text())
    assert cfg["val_size"] == 5000 and cfg["augment"] == "auto"


@pytest.mark.slow
def test_streamed_folder_with_imagenet_preprocessing(folder, tmp_path):
    """The ImageNet path (random-resized crops streamed through worker processes; evaluation by a
    resize and a centre crop, or ten crops) on a small folder."""
    run = tmp_path / "stream"
    s = fit(small(folder, run, dataset="imagenet", image_size=8, resize=10, workers=0, epochs=1))
    assert s["test_images"] == 18
    _, info = load_model(run / "last")
    assert info["preprocessing"] == {**info["preprocessing"], "source": "stream", "image_size": [8, 8], "resize": 10}
    r = run_cli("eval", "--checkpoint", str(run), "--ten-crop", "--json", "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images"] == 18


def test_bf16_autocast_and_channels_last_on_cpu(folder, tmp_path):
    """bf16 autocast with channels_last trains the same network as float32 does, to bf16's accuracy (a
    non-finite loss would already have stopped the run)."""
    s = fit(small(folder, None, amp="bf16", channels_last=True, epochs=1))
    torch.manual_seed(0)
    ref = fit(small(folder, None, epochs=1))
    assert s["train_loss"] == pytest.approx(ref["train_loss"], rel=0.05)
    assert 0 <= s["val_top1_error"] <= 100


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.*")), ids=lambda p: p.name)
def test_shipped_recipe_files_parse_and_match_the_paper(path):
    from densenet.train.config import read_config_file

    cfg = TrainConfig.from_dict(read_config_file(path)).resolve()
    assert cfg.lr == 0.1 and cfg.momentum == 0.9 and cfg.nesterov and cfg.weight_decay == 1e-4
    # the Lua rule: the first decayed epoch (1-indexed) is the first >= 50% and >= 75% of the run
    assert cfg.milestones == (cfg.epochs * 0.5 - 1, cfg.epochs * 0.75 - 1) or cfg.milestones == (30.0, 60.0)
    # a config that names a published number trains as the paper did; model selection says so in its name
    if "model_selection" not in path.name and cfg.dataset.startswith("cifar"):
        assert cfg.val_size == 0 and cfg.test_on == "final"
    assert densenet.get_entry(cfg.model)


def test_a_new_run_never_overwrites_an_old_one(folder, tmp_path):
    run = tmp_path / "run"
    fit(small(folder, run, epochs=1))
    before = weights(run)
    with pytest.raises(ValueError, match="already holds a run: continue it with --resume"):
        fit(small(folder, run, epochs=1, seed=3))
    assert all(torch.equal(before[k], v) for k, v in weights(run).items())


@pytest.mark.slow
def test_best_validation_model_is_tested_where_the_paper_does(folder, tmp_path, monkeypatch):
    """SVHN: the paper tests the model of lowest validation error, not the final one."""
    import dataclasses

    from densenet import recipes

    monkeypatch.setitem(recipes.DATASET_RECIPES, "folder",
                        dataclasses.replace(recipes.DATASET_RECIPES["folder"], test_on="best"))
    assert recipes.recipe_for("densenet_40_k12", "svhn").test_on == "best"
    run = tmp_path / "run"
    s = fit(small(folder, run, epochs=3, lr=0.5))
    assert s["test_weights"] == f"best validation error (epoch {s['best']['epoch']})"
    r = run_cli("eval", "--checkpoint", str(run / "best"), "--split", "test", "--json")
    assert json.loads(r.stdout)["top1_error"] == pytest.approx(s["test_top1_error"])


def test_reproduce_cells_follow_the_papers_protocol(tmp_path):
    """CIFAR with its test set: the reported run trains on all 50,000 images (no hold-out);
    SVHN: 6,000 held out, the best model tested; CIFAR-10 as a folder without test/: validation."""
    from densenet.grid.reproduce import Cell, cell_config

    data = {"cifar10": str(tmp_path / "cifar"), "svhn": str(tmp_path / "svhn")}
    c10 = cell_config(Cell("densenet_40_k12", "C10+", 0), data, None, None, tmp_path)
    assert (c10.dataset, c10.val_size, c10.augment, c10.epochs, c10.milestones) == ("cifar10", 0, "cifar", 300, (149, 224))
    svhn = cell_config(Cell("densenet_40_k12", "SVHN", 0), data, None, 0.1, tmp_path)
    assert (svhn.val_size, svhn.drop_rate, svhn.epochs) == (6000, 0.2, 4)
    folder = make_folder(tmp_path / "c10folder", per_class=1, test_per_class=0)
    f = cell_config(Cell("densenet_40_k12", "C10", 0), {"cifar10": str(folder)}, 2, None, tmp_path)
    assert (f.dataset, f.val_size, f.drop_rate) == ("folder", 5000, 0.2)


def _train_compiled_cli(folder, run, *extra):
    from densenet.cli import main

    return main(["train", "--model", "densenet_bc_100_k12", "--model-arg", "depth=10", "--model-arg",
                 "growth_rate=6", "--dataset", "folder", "--data", str(folder), "--epochs", "1", "--batch-size",
                 "16", "--val-size", "8", "--no-progress", "--no-tensorboard", "--compile", "--out", str(run),
                 *extra])


def test_compile_trains_end_to_end(folder, tmp_path, monkeypatch):
    """`densenet train --compile`: the compiled network in the loop (Dynamo and AOTAutograd; inductor's
    code generation is the slow test below), weights saved without torch.compile's `_orig_mod.` prefix,
    and they load into an uncompiled model."""
    real = torch.compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or real(m, backend="aot_eager"))
    run = tmp_path / "run"
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):  # no recompiling (put back on exit)
        assert _train_compiled_cli(folder, run) == 0 and compiled
    assert not any(k.startswith("_orig_mod") for k in weights(run))
    summary = json.loads((run / "summary.json").read_text())
    # the compiled step computes the eager step's numbers (aot_eager: the same operations, traced)
    monkeypatch.setattr(torch, "compile", real)
    torch.manual_seed(0)
    eager = tmp_path / "eager"
    assert _train_compiled_cli(folder, eager, "--no-compile") == 0
    assert summary["train_loss"] == pytest.approx(json.loads((eager / "summary.json").read_text())["train_loss"],
                                                  rel=1e-4)
    model, _ = load_model(run / "last")  # loads (strictly) into an uncompiled model
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 12, 12))).all()


@pytest.mark.slow
def test_compile_with_inductor_end_to_end(folder, tmp_path):
    r = run_cli("train", "--model", "densenet_bc_100_k12", "--model-arg", "depth=10", "--dataset", "folder",
                "--data", str(folder), "--epochs", "1", "--batch-size", "16", "--val-size", "9", "--no-progress",
                "--no-tensorboard", "--compile", "--out", str(tmp_path / "run"), timeout=1200)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 1


# --- a broken model is never saved as good -------------------------------------------------------------


def poison_at(monkeypatch, epoch: int):
    """Make BN running variances infinite during `epoch` (0-based), the loss staying finite: what
    --lr 50 did."""
    from densenet.train.engine import Trainer

    original = Trainer._train_epoch

    def train_epoch(self, state, *a, **k):
        out = original(self, state, *a, **k)
        if state.epoch == epoch:  # the RunState: the epoch just trained
            bn = next(m for m in state.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return out

    monkeypatch.setattr(Trainer, "_train_epoch", train_epoch)


def test_non_finite_buffers_are_never_saved_as_last_or_best(tiny, tmp_path, monkeypatch):
    run = copy_run(tiny, tmp_path / "run")
    before = os.readlink(run / "last")
    poison_at(monkeypatch, 1)
    with pytest.raises(TrainingStopped) as e:
        fit(cfg(tiny["folder"], None, epochs=2), resume=str(run))
    assert e.value.exit_code == 3
    assert "non-finite at the end of epoch 2" in str(e.value) and "running_var" in str(e.value)
    assert f"the last good checkpoint is kept ({run / 'last'} -> {before.split('/')[-1]})" in str(e.value)
    assert os.readlink(run / "last") == before and os.readlink(run / "best") == before
    w = load_file(str(run / "last" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_no_false_claim_of_a_good_checkpoint_when_none_exists(tiny, tmp_path, monkeypatch):
    poison_at(monkeypatch, 0)
    with pytest.raises(TrainingStopped, match="no checkpoint was saved yet") as e:
        fit(cfg(tiny["folder"], tmp_path / "run"))
    assert "last good" not in str(e.value) and not (tmp_path / "run" / "last").exists()
    monkeypatch.undo()
    original = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: original(*a, **k) * float("inf"))
    with pytest.raises(TrainingStopped, match="the loss became inf .* no checkpoint was saved yet"):
        fit(cfg(tiny["folder"], tmp_path / "run2"))
