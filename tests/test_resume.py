"""densenet.train.resume: the one rule for what a resumed run may change, from Python and the command line.

The schedule of a run resumed with another length (`--resume RUN --epochs N`) is planned by the recipe's
rule for N when it agrees with the epochs already trained; otherwise a longer run keeps its decays (and
says so) and a shorter one is refused. Each boundary is tested on the digits recipe: 30 epochs decay
after epochs [14, 22]; 8 epochs after [3, 5]; 40 epochs after [19, 29]."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from densenet.train import TrainConfig, fit
from densenet.train.resume import ResumeError, check_settings, plan_schedule
from densenet.weights import read_state_dict

from helpers import cfg, cli, copy_run, make_folder, one_line_error, train


def resolved(**kw) -> TrainConfig:
    return TrainConfig(dataset="digits", **kw).resolve()


SAVED = resolved(epochs=30)


@pytest.mark.parametrize("done, mid_epoch", [(0, False), (2, True), (3, False)])
def test_a_shorter_run_is_replanned_while_it_agrees_with_the_epochs_done(done, mid_epoch):
    cfg, note = plan_schedule(SAVED, resolved(epochs=8) if done == 0 else
                              TrainConfig.from_dict({**SAVED.to_dict(), "epochs": 8}).resolve(),
                              done, mid_epoch, "RUN")
    assert cfg.lr_milestones() == [3, 5] and cfg.epochs == 8
    assert "planned by the recipe's rule for 8 epochs: the rate decays after epochs [3, 5]" in note
    assert "it was [14, 22] for 30 epochs" in note


@pytest.mark.parametrize("done, mid_epoch", [(3, True), (4, False), (20, True)])
def test_a_shorter_run_whose_schedule_the_epochs_done_did_not_follow_is_refused(done, mid_epoch):
    """--epochs 8 after a 30-epoch start: epoch 4 (1-indexed) decays in an 8-epoch schedule; a run that
    trained it at the base rate cannot be continued as an 8-epoch run (it would never decay: refused)."""
    carried = TrainConfig.from_dict({**SAVED.to_dict(), "epochs": 8}).resolve()  # what the command passes
    with pytest.raises(ResumeError, match=r"30-epoch schedule \(decays after epochs \[14, 22\]\); the 8-epoch "
                                          r"schedule by the recipe's rule decays after epochs \[3, 5\].*"
                                          r"--epochs 30"):
        plan_schedule(SAVED, carried, done, mid_epoch, "RUN")


def test_a_longer_run_is_replanned_up_to_its_first_disagreement_then_keeps_its_decays():
    carried = TrainConfig.from_dict({**SAVED.to_dict(), "epochs": 40}).resolve()
    cfg, note = plan_schedule(SAVED, carried, 14, False, "RUN")  # epochs 1-14 at the base rate in both
    assert cfg.lr_milestones() == [19, 29] and "decays after epochs [19, 29]" in note
    cfg, note = plan_schedule(SAVED, carried, 15, False, "RUN")  # epoch 15 decayed in the 30-epoch plan
    assert cfg.lr_milestones() == [14, 22] and cfg.epochs == 40
    assert "those decays stay and epochs 31-40 train at the last rate" in note


def test_same_length_and_schedule_change_nothing():
    assert plan_schedule(SAVED, resolved(epochs=30), 7, True, "RUN") == (resolved(epochs=30), None)


def test_milestones_given_anew_are_taken_as_given_or_refused():
    cfg, note = plan_schedule(SAVED, resolved(epochs=30, milestones=(10, 20)), 5, False, "RUN")
    assert cfg.lr_milestones() == [10, 20] and "planned as given" in note
    with pytest.raises(ResumeError, match="as given decays after epochs \\[10, 20\\]"):
        plan_schedule(SAVED, resolved(epochs=30, milestones=(10, 20)), 12, False, "RUN")


def test_changed_settings_are_refused_by_the_library():
    check_settings(SAVED, resolved(epochs=8, device="cpu", workers=0), "RUN")  # how it runs: allowed
    with pytest.raises(ResumeError, match="its lr is 0.1, 0.05 given; drop --lr"):
        check_settings(SAVED, resolved(epochs=30, lr=0.05), "RUN")
    with pytest.raises(ResumeError, match="its model has depth = .*, 40 given"):
        check_settings(SAVED, resolved(epochs=30, model_args={"depth": 40}), "RUN")


@pytest.mark.slow
def test_a_run_resumed_with_more_epochs_ends_where_a_run_of_that_length_does(tmp_path):
    """1 epoch, then `--resume --epochs 3`: the recipe's 3-epoch schedule agrees with the epoch done, so
    the run is planned again (recorded in config.json) and ends bitwise where a 3-epoch run ends."""
    from densenet.cli import main

    folder = make_folder(tmp_path / "shapes", per_class=12, test_per_class=2, size=12)
    straight = train(folder, tmp_path / "straight", epochs=3)
    short = train(folder, tmp_path / "short", epochs=1)
    assert main(["train", "--resume", str(short), "--epochs", "3", "--no-progress"]) == 0
    saved = json.loads((short / "config.json").read_text())
    assert saved["epochs"] == 3 and saved["milestones"] == [1.0, 2.0]
    a, b = (read_state_dict(r / "last" / "model.safetensors")[0] for r in (straight, short))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [json.loads(line)["lr"] for line in (short / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.1, 0.01, 0.001])


# --- resuming a run directory: changed settings, a finished run ----------------------------------------


def test_resume_refuses_changed_settings_and_a_changed_model(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    config = (run / "config.json").read_text()
    one_line_error(*cli("train", "--resume", run, "--lr", "0.5"), "its lr is 0.1, 0.5 given; drop --lr")
    one_line_error(*cli("train", "--resume", run, "--depth", "16"), "its model has depth = 10, 16 given")
    assert (run / "config.json").read_text() == config
    same = tmp_path / "same.yaml"  # the command that started it, again: its settings resolve to the run's
    same.write_text("dataset: folder\nmilestones: [0.5, 0.75]\nlr: 0.1\nmodel_args: {depth: 10}\n")
    code, err = cli("train", "--resume", run, "--config", same)
    assert code == 0 and "nothing to resume" in err, err
    # the library call: the same rule as the command (train/resume.py)
    with pytest.raises(ResumeError, match="its model has growth_rate = .*4 given"):
        fit(cfg(tiny["folder"], None, epochs=2, model_args={"depth": 10, "growth_rate": 4}), resume=str(run))
    with pytest.raises(ResumeError, match="its lr is 0.1, 0.5 given"):
        fit(cfg(tiny["folder"], None, epochs=2, lr=0.5), resume=str(run))


def test_resuming_a_finished_run_changes_nothing(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "densenet.lock"}
    code, err = cli("train", "--resume", run)
    assert code == 0 and "has finished all 1 epochs: nothing to resume" in err, err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "densenet.lock"}
    assert after == before
