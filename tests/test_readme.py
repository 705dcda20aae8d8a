"""README's commands run as written from a fresh clone, offline.

Every `$ densenet ...` line of README.md parses (no invented or misspelt options); the commands that
need no data run for real as written (models, profile, reproduce --dry-run); the first screen (install
-> trained model -> figure -> exported file) and the Deploy block run for real in a fresh folder, the
training shortened to one epoch on 128 images. --run-slow (or DENSENET_RUN_SLOW=1) also runs the first screen exactly as
written (30 epochs: minutes on 2 CPU cores)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from densenet.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}
SHORT_TRAIN = ["--epochs", "1", "--train-subset", "128", "--depth", "10", "--growth-rate", "6", "--no-progress"]


def console_commands(section: str | None = None) -> list[str]:
    """The `$ ` lines of README's console blocks (continuation lines joined), of one `## ` section or all."""
    text = README
    if section is not None:
        text = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("$ "):
                cmd = line[2:]
                while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
                commands.append(cmd)
            i += 1
    return commands


def densenet_argv(cmd: str) -> list[str] | None:
    """The arguments after `densenet` (or `python -m densenet`, `-m densenet.cli`), or None."""
    argv = shlex.split(cmd, comments=True)
    if argv[:1] == ["densenet"]:
        return argv[1:]
    for i, a in enumerate(argv[:-1]):
        if a == "-m" and argv[i + 1] in ("densenet", "densenet.cli"):
            return argv[i + 2:]
    return None


ALL = [c for c in console_commands() if densenet_argv(c) is not None]


def test_readme_has_the_first_screen_commands():
    first = console_commands("First run: a trained model, a figure and an exported file in a few minutes")
    assert [densenet_argv(c)[0] for c in first] == ["train", "eval", "reuse", "plot", "export"]
    assert len(ALL) >= 25


@pytest.mark.parametrize("cmd", ALL)
def test_every_readme_command_parses(cmd, monkeypatch):
    monkeypatch.setattr(sys, "exit", lambda code=0: (_ for _ in ()).throw(AssertionError(f"exit {code}")))
    build_parser().parse_args(densenet_argv(cmd))  # argparse errors exit: a misspelt option fails here


SLOW = pytest.mark.slow  # minutes on 2 cores: run with --run-slow (tests/conftest.py)
# `models` counts every registered network (covered by test_cli) and the table2 dry run 27 cells: slow
CHEAP = [pytest.param(c, marks=[SLOW]) if densenet_argv(c)[0] == "models" or "table2" in c else c
         for c in ALL if densenet_argv(c)[0] in ("models", "profile") or "--dry-run" in c]


def _run(cmd: str, cwd: Path, shorten: bool, capsys) -> tuple[int, str]:
    """A README line in `cwd`: densenet commands in this process (as `densenet`, without a new
    interpreter's start-up), shell lines (python -c, echo) by the shell, as written."""
    argv = densenet_argv(cmd)
    if argv is None:
        r = subprocess.run(cmd, shell=True, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout + r.stderr
    if shorten and argv[0] == "train":
        argv = argv + SHORT_TRAIN
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main(argv)
    finally:
        os.chdir(old)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


@pytest.mark.parametrize("cmd", CHEAP)
def test_readme_commands_that_need_no_data_run_as_written(cmd, tmp_path, capsys):
    code, out = _run(cmd, tmp_path, False, capsys)
    assert code == 0, out
    assert out.strip()


def _first_screen_then_deploy(tmp_path: Path, shorten: bool, capsys) -> None:
    first = console_commands("First run: a trained model, a figure and an exported file in a few minutes")
    for cmd in first:
        code, out = _run(cmd, tmp_path, shorten, capsys)
        assert code == 0, (cmd, out)
    assert (tmp_path / "runs" / "digits" / "best" / "model.safetensors").is_file()
    assert {"reuse.png", "curves.png", "error_vs_params.png"} <= {p.name for p in (tmp_path / "figs").iterdir()}
    assert (tmp_path / "digits.onnx").stat().st_size > 10_000
    for cmd in console_commands("Deploy"):
        code, out = _run(cmd, tmp_path, shorten, capsys)
        argv = densenet_argv(cmd) or [""]
        failing_image = argv[0] == "predict" and ("corrupt.png" in argv or "." in argv)  # exit status 1, as said
        assert code == (1 if failing_image else 0), (cmd, out)
    assert (tmp_path / "digits.pt").is_file()


def test_first_screen_and_deploy_run_in_a_fresh_folder(tmp_path, capsys):
    _first_screen_then_deploy(tmp_path, shorten=True, capsys=capsys)


@pytest.mark.slow
@SLOW
def test_first_screen_exactly_as_written(tmp_path, capsys):
    _first_screen_then_deploy(tmp_path, shorten=False, capsys=capsys)
