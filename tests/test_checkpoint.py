"""densenet.train.checkpoint: a run directory's files. A directory holding another run's files is not
adopted; cleanup deletes only the checkpoints the run wrote, and a checkpoint name taken by a foreign
directory is not overwritten; the state a resume reads is checked (damaged, it is one line naming the
cause, and nothing is emptied); a torn last metrics line is dropped, a damaged one named; a full disk
leaves `last` at the complete checkpoint."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from densenet.runs import CheckpointError
from densenet.train import fit
from densenet.train.checkpoint import RunDir

from helpers import cfg, cli, copy_run, one_line_error, rewrite_safetensors


# --- cleanup deletes only what the run wrote -----------------------------------------------------------


def test_a_directory_holding_another_runs_files_is_not_adopted(tiny, tmp_path):
    proj = tmp_path / "proj"
    (proj / "ckpt" / "model_v1").mkdir(parents=True)
    (proj / "ckpt" / "model_v1" / "weights.bin").write_bytes(b"precious")
    (proj / "config.json").write_text('{"mine": true}')
    code, err = cli("train", "--dataset", "folder", "--data", tiny["folder"], "--depth", "10", "--growth-rate", "6",
                    "--epochs", "1", "--batch-size", "8", "--val-size", "3", "--no-progress", "--out", proj)
    one_line_error(code, err, "already holds", "ckpt", "config.json")
    assert (proj / "ckpt" / "model_v1" / "weights.bin").read_bytes() == b"precious"
    assert json.loads((proj / "config.json").read_text()) == {"mine": True}


def test_checkpoint_cleanup_deletes_only_what_the_run_wrote(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    first = os.readlink(run / "last").split("/")[-1]
    shutil.copytree(run / "ckpt" / first, run / "ckpt" / "epoch1_backup")  # cp -a ckpt/000003 ckpt/epoch1_backup
    shutil.copytree(run / "ckpt" / first, run / "ckpt" / "999999")  # our name pattern, not our record
    (run / "ckpt" / "notes.txt").write_text("keep me")
    fit(cfg(tiny["folder"], None, epochs=3, val_size=3), resume=str(run))
    names = sorted(p.name for p in (run / "ckpt").iterdir())
    assert "epoch1_backup" in names and "999999" in names and "notes.txt" in names
    assert first not in names or first == os.readlink(run / "best").split("/")[-1]
    assert set(json.loads((run / "written.json").read_text())["checkpoints"]) <= set(names)


def test_a_checkpoint_name_taken_by_a_foreign_directory_is_not_overwritten(tiny, tmp_path):
    run = RunDir(tmp_path / "run")
    run.start_new()
    (run.path / "ckpt" / "000007").mkdir(parents=True)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="000007 exists and was not written by this run"):
        run.save(7, model, torch.optim.SGD(model.parameters(), 0.1), {}, {"epoch": 1, "step": 0})
    # a directory another process makes between the record and the mkdir: refused, and not recorded
    record = run._record

    def record_then_race(names):
        record(names)
        (run.path / "ckpt" / "000008").mkdir(exist_ok=True)

    run._record = record_then_race
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        run.save(8, model, torch.optim.SGD(model.parameters(), 0.1), {}, {"epoch": 1, "step": 0})
    assert "000008" not in run.written() and (run.path / "ckpt" / "000008").is_dir()


# --- state and metrics are checked when read -----------------------------------------------------------


@pytest.mark.parametrize("edit, needle", [
    (lambda t, m: m.update(train=json.dumps({**json.loads(m["train"]), "epoch": "two"})), "epoch must be a whole"),
    (lambda t, m: m.update(train=json.dumps({**json.loads(m["train"]), "epoch": -5})), "epoch must be a whole"),
    (lambda t, m: m.update(train=json.dumps({**json.loads(m["train"]), "epoch": 99})), "epoch 99, step 0 lies outside"),
    (lambda t, m: m.update(train=json.dumps({**json.loads(m["train"]), "step": 1e6})), "step must be a whole"),
    (lambda t, m: m.update(train=json.dumps({**json.loads(m["train"]), "step": 10 ** 6})), "is damaged"),
    (lambda t, m: m.pop("optimizer"), "no optimizer state"),
    (lambda t, m: t.pop("rng.cpu"), "no random-number state"),
    (lambda t, m: m.update(train="{"), "not JSON"),
], ids=["epoch-two", "epoch-minus-5", "epoch-99", "step-float", "step-huge", "no-optimizer", "no-rng", "torn-json"])
def test_damaged_state_files_are_one_line_errors(tiny, tmp_path, edit, needle):
    run = copy_run(tiny, tmp_path / "run")
    rewrite_safetensors(run / "last" / "state.safetensors", edit)
    before = (run / "metrics.jsonl").read_text()
    code, err = cli("train", "--resume", run, "--epochs", "1")
    one_line_error(code, err, needle)
    assert (run / "metrics.jsonl").read_text() == before  # nothing emptied


def test_a_torn_last_metrics_line_is_dropped_a_damaged_one_named(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.1, "train_lo')  # a crash while the line was written
    fit(cfg(tiny["folder"], None, epochs=2), resume=str(run))
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    run2 = copy_run(tiny, tmp_path / "run2")
    (run2 / "metrics.jsonl").write_text("garbage\n" + (run2 / "metrics.jsonl").read_text())
    one_line_error(*cli("train", "--resume", run2, "--epochs", "2"), f"{run2 / 'metrics.jsonl'} line 1 is damaged")


# --- a full disk ---------------------------------------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint(tiny, tmp_path, monkeypatch):
    import densenet.train.checkpoint as ck

    run = copy_run(tiny, tmp_path / "run")
    before = os.readlink(run / "last")
    real = ck.save_file

    def full(tensors, filename, metadata=None):
        if filename.endswith(".tmp") and "state" in filename:
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                               "message: \"No space left on device\" })")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full)
    code, err = cli("train", "--resume", run, "--epochs", "2")
    one_line_error(code, err, "could not write checkpoint", "No space left on device",
                   f"still names the complete checkpoint {before.split('/')[-1]}")
    assert os.readlink(run / "last") == before
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [before.split("/")[-1]]  # the partial one removed
