"""What the command line calls, checked without it: the library functions that `densenet` subcommands
use validate their own arguments (ValueError with the message the command prints), and read the
command's options as settings; an error reads as one line with its exit status (utils/errors.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from densenet.evaluation import evaluate_checkpoint
from densenet.grid.command import parse_data_options, run_grid, status
from densenet.train.config import TrainConfig, help_with_default, settings_from_options
from densenet.utils.errors import UsageError, one_line, printable, report


@pytest.mark.parametrize("kw, message", [
    ({"batch_size": 0}, "--batch-size must be >= 1 and --workers >= 0, got 0 and 4"),
    ({"workers": -1}, "--batch-size must be >= 1 and --workers >= 0, got 256 and -1"),
    ({"recalibrate_bn": 0}, "--recalibrate-bn takes a number of training images >= 1, got 0"),
])
def test_evaluate_checkpoint_checks_its_arguments_before_reading(tmp_path, kw, message):
    with pytest.raises(ValueError) as e:
        evaluate_checkpoint(tmp_path / "missing", **kw)  # the file is never looked at
    assert str(e.value) == message


@pytest.mark.parametrize("kw, message", [
    ({"out": None}, "--out DIR is required: the grid directory (one run directory per cell); "
                    "--dry-run lists the cells without one"),
    ({"epochs": 0}, "--epochs must be >= 1 and --budget in (0, 1]"),
    ({"budget": 1.5}, "--epochs must be >= 1 and --budget in (0, 1]"),
    ({"seeds": 0}, "--seeds must be >= 1"),
])
def test_run_grid_checks_its_arguments_before_running(tmp_path, kw, message):
    args = {"out": tmp_path / "grid", **kw}
    with pytest.raises(ValueError) as e:
        run_grid("table2", args.pop("out"), launch_options=None, dry_run=False, **args)  # checked first
    assert str(e.value) == message
    assert not (tmp_path / "grid").exists()


def test_data_options_and_status_arguments(tmp_path):
    assert parse_data_options(["cifar10=~/data/c", " svhn =/d=x"]) == {
        "cifar10": str(Path("~/data/c").expanduser()), "svhn": "/d=x"}
    with pytest.raises(ValueError, match=r"^--data takes DATASET=PATH, got 'cifar10'$"):
        parse_data_options(["cifar10"])
    with pytest.raises(ValueError, match=r"^status table2 needs --out DIR, the grid directory$"):
        status("table2", None)
    with pytest.raises(ValueError, match=r"^status needs the grid directory: densenet reproduce status DIR$"):
        status(None, None)
    with pytest.raises(ValueError, match="is not a directory"):
        status(None, tmp_path / "none")


def test_settings_from_options_gathers_the_model_options():
    got = settings_from_options({"epochs": 2, "m_depth": 40, "m_bottleneck": False,
                                 "model_arg": ["block_config=6,12", "drop_rate = 0.2"]})
    assert got == {"epochs": 2, "model_args": {"depth": 40, "bottleneck": False, "block_config": [6, 12],
                                               "drop_rate": 0.2}}
    assert settings_from_options({"seed": 1}) == {"seed": 1}  # no model option: no model_args
    with pytest.raises(ValueError, match=r"^--model-arg takes KEY=VALUE, got 'depth'$"):
        settings_from_options({"model_arg": ["depth"]})
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert help_with_default(fields["seed"]).endswith("(default: 0)")


def test_an_error_reads_as_one_line_with_its_exit_status():
    assert report("eval", UsageError("which checkpoint?")) == ("densenet eval: error: which checkpoint?", 2)
    assert report("train", ValueError("bad\nvalue")) == ("densenet train: error: bad value", 2)
    line, code = report("train", MemoryError())
    assert code == 2 and line.startswith("densenet train: error: out of memory (MemoryError)")
    line, code = report("train", KeyError("surprise"))
    assert code == 1 and "internal error (KeyError: 'surprise')" in line and "--debug" in line
    assert report("train", KeyError("x"), interrupted=True) == ("densenet: interrupted (then KeyError)", 130)
    assert printable("a\nb\x1b") == "a\\nb\\x1b" and one_line(OSError("")) == "OSError"


def test_reproduce_reports_a_missing_out_first(capsys):
    """The grid's own checks come before the launcher and --data options are read: one mistake is
    reported the same whatever else is on the line."""
    from densenet.cli import main

    assert main(["reproduce", "table2", "--data", "bad"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["reproduce", "table2", "--out", "x", "--seeds", "0", "--data", "bad"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
