"""The command line: `densenet models` and the error contract (one line, non-zero exit, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys

import densenet
from densenet.cli import main


def test_models_json_lists_every_variant_with_paper_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == densenet.list_models()
    for r in rows:
        if r["paper_params"]:
            assert abs(r["params"] - r["paper_params"]) <= r["params_tolerance"], r["name"]
        if r["paper_gmacs"]:
            assert abs(r["macs"] / 1e9 - r["paper_gmacs"]) < 0.0006, r["name"]


def test_models_table(capsys):
    assert main(["models", "densenet121", "densenet_bc_100_k12"]) == 0
    out = capsys.readouterr().out
    assert "7,978,856" in out and "769,162" in out and "2.834" in out


def test_unknown_model_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "densenet.cli", "models", "densenet12"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("densenet models: error: unknown model 'densenet12'")


def test_help_and_version_do_not_import_torch():
    code = ("import sys, contextlib, io, densenet.cli as c\n"
            "for argv in (['--version'], ['--help'], ['-h'], []):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        c.main(argv)\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    r = subprocess.run([sys.executable, "-m", "densenet.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "models" in r.stdout and "train" in r.stdout  # every subcommand listed
    r = subprocess.run([sys.executable, "-m", "densenet.cli", "--version"], capture_output=True, text=True)
    assert r.stdout.strip() == f"densenet {densenet.__version__}"
