"""densenet.runs: which checkpoint a run directory means, one answer for every reader.

A run whose best and last epochs differ: `eval`, `predict`, `export` and `densenet.load` read the same
checkpoint (the protocol's by default, `--which` otherwise) and each says which, with its epoch."""
from __future__ import annotations

import json
import os

import pytest
import torch

import densenet
from densenet.cli import main
from densenet.runs import CheckpointError, resolve_checkpoint
from densenet.saved_model import load_model

from helpers import cli, copy_run, make_folder, one_line_error, train


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """2 epochs where epoch 1 validates best (validation error 10%, then 50%): best/ is epoch 1, last/ epoch 2."""
    import densenet.train.engine as engine

    root = tmp_path_factory.mktemp("two_epochs")
    folder = make_folder(root / "shapes", per_class=12, test_per_class=2, size=12)
    errors = iter([10.0, 50.0])
    mp = pytest.MonkeyPatch()
    original = engine.evaluate

    def fake(model, batches, *a, **k):
        r = original(model, batches, *a, **k)
        if r["images"] == 9:  # the validation split (val_size 9), not the test split
            r["top1_error"] = next(errors)
        return r

    mp.setattr(engine, "evaluate", fake)
    try:
        run = train(folder, root / "run", epochs=2)
    finally:
        mp.undo()
    return run, folder


def _epoch(run, which):
    return resolve_checkpoint(run, which).epoch


def test_best_and_last_differ(two_epochs):
    run, _ = two_epochs
    assert _epoch(run, "best") == 1 and _epoch(run, "last") == 2
    c = resolve_checkpoint(run)  # the folder recipe's protocol: the final epoch
    assert (c.which, c.epoch) == ("last", 2) and "protocol" in c.why
    assert resolve_checkpoint(run / "best").epoch == 1  # a checkpoint directory itself


@pytest.mark.parametrize("which", [None, "best"])
def test_eval_predict_export_and_load_read_the_same_checkpoint(two_epochs, tmp_path, capsys, which):
    run, folder = two_epochs
    want = resolve_checkpoint(run, which)
    flag = ["--which", which] if which else []
    expected_line = f"checkpoint {want.file} (densenet_bc_100_k12, epoch {want.epoch}; {want.why})"

    assert main(["eval", str(run), "--split", "test", "--json", *flag]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["checkpoint"], r["epoch"]) == (str(want.file), want.epoch)

    image = next((folder / "test").rglob("*.png"))
    assert main(["predict", str(run), str(image), "--json", *flag]) == 0
    out, err = capsys.readouterr()
    assert expected_line in err

    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), *flag]) == 0
    assert expected_line in capsys.readouterr().err

    model, _ = densenet.load(run, which=which)
    assert (model.checkpoint.file, model.checkpoint.epoch) == (want.file, want.epoch)
    weights = densenet.weights.read_state_dict(want.file)[0]
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_which_needs_a_run_directory_and_an_existing_checkpoint(two_epochs, tmp_path):
    run, _ = two_epochs
    with pytest.raises(CheckpointError, match="--which best needs a run directory"):
        resolve_checkpoint(run / "last" / "model.safetensors", "best")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "last").symlink_to(run / "last")
    with pytest.raises(CheckpointError, match="has no best/ checkpoint"):
        resolve_checkpoint(partial, "best")


# --- links that point outside the run directory --------------------------------------------------------


def test_last_pointing_outside_the_run_is_refused(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    elsewhere = copy_run(tiny, tmp_path / "elsewhere")
    (run / "last").unlink()
    (run / "last").symlink_to(os.path.realpath(elsewhere / "last"))
    one_line_error(*cli("train", "--resume", run, "--epochs", "2"), "last points outside the run directory")
    (run / "best").unlink()
    (run / "best").symlink_to(os.path.realpath(elsewhere / "best"))
    with pytest.raises(CheckpointError, match="points outside"):
        load_model(run)
