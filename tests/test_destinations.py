"""Every writer refuses a destination that exists and is not a regular file (utils/atomic.py's
`check_destination`): a FIFO, a device, a socket or a directory is never replaced by a file, as root
too, and nothing is written before the refusal. Nor does any output replace a training run's own files
(train/checkpoint.py's `refuse_run_file`)."""
from __future__ import annotations

import os
import shutil
import socket
import stat

import pytest

from densenet.cli import main
from densenet.utils.atomic import atomic_write, check_destination, write_text_atomic

from helpers import cli, one_line_error


def _fifo(path):
    os.mkfifo(path)
    return path


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


def _is_fifo(path) -> bool:
    return stat.S_ISFIFO(os.lstat(path).st_mode)


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "device"])
def test_check_destination_names_what_is_there(tmp_path, kind):
    p = tmp_path / "out.bin"
    keep = None
    if kind == "fifo":
        _fifo(p)
    elif kind == "socket":
        keep = _socket(p)
    elif kind == "directory":
        p.mkdir()
    else:
        try:
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("making a device node needs root")
    try:
        with pytest.raises(ValueError, match=r"--out .*out\.bin exists and is a (FIFO|socket|directory|character "
                                             r"device).*nothing was written"):
            check_destination(p, "--out")
        with pytest.raises(ValueError, match="not a regular file"), atomic_write(p) as tmp:
            tmp.write_text("never")
        assert not list(tmp_path.glob(".out.bin.*"))  # no temporary file left behind either
        assert not p.is_file()
    finally:
        if keep is not None:
            keep.close()


def test_regular_files_links_to_them_and_new_paths_pass(tmp_path):
    (tmp_path / "real.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    for name in ("real.txt", "link.txt", "new.txt"):
        check_destination(tmp_path / name)
    write_text_atomic(tmp_path / "real.txt", "new")
    assert (tmp_path / "real.txt").read_text() == "new"
    _fifo(tmp_path / "fifo")
    (tmp_path / "to_fifo").symlink_to(tmp_path / "fifo")
    with pytest.raises(ValueError, match="FIFO"):  # a link is followed to what it names
        write_text_atomic(tmp_path / "to_fifo", "x")
    assert _is_fifo(tmp_path / "fifo") and (tmp_path / "to_fifo").is_symlink()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_refuses_a_fifo_before_exporting(tiny_run, tmp_path, capsys, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    out = _fifo(tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt"))
    assert main(["export", str(tiny_run["run"]), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists and is a FIFO (named pipe), not a regular file" in err and err.count("\n") == 1
    assert _is_fifo(out)


def test_save_pretrained_reuse_and_plot_refuse_fifos(tiny_run, tmp_path, capsys):
    from densenet.hub import save_pretrained

    folder = tmp_path / "pretrained"
    folder.mkdir()
    _fifo(folder / "model.safetensors")
    with pytest.raises(ValueError, match="FIFO|not a Hub export"):  # refused either way, before writing
        save_pretrained(tiny_run["run"], folder)
    assert _is_fifo(folder / "model.safetensors")

    heat = _fifo(tmp_path / "reuse.png")
    assert main(["reuse", str(tiny_run["run"]), "--out", str(heat)]) == 2
    assert "reuse.png exists and is a FIFO" in capsys.readouterr().err
    assert _is_fifo(heat) and not (tmp_path / "reuse.csv").exists()  # refused before any of the three

    plots = tmp_path / "plots"
    plots.mkdir()
    _fifo(plots / "error_vs_flops.png")
    assert main(["plot", str(tiny_run["run"]), "--out", str(plots)]) == 2
    assert "error_vs_flops.png exists and is a FIFO" in capsys.readouterr().err
    assert _is_fifo(plots / "error_vs_flops.png") and not (plots / "curves.png").exists()


def test_a_run_directory_whose_config_is_a_fifo_is_refused(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, symlinks=True)
    (run / "metrics.csv").unlink()
    _fifo(run / "metrics.csv")
    from densenet.train.checkpoint import RunDir

    with pytest.raises(ValueError, match="metrics.csv exists and is a FIFO"):
        write_text_atomic(RunDir(run).path / "metrics.csv", "x")
    assert _is_fifo(run / "metrics.csv")


# --- outputs never replace a run's own files -----------------------------------------------------------


def test_outputs_never_overwrite_a_runs_files(tiny_run, tmp_path):
    """export, reuse, save_pretrained and reproduce status write where they are told, except over a
    training run's own files (its checkpoints, config, metrics) or a folder of someone else's."""
    import shutil

    import densenet
    import densenet.hub as hub

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, symlinks=True)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for argv, needle in [
        (["export", run, "--format", "torchscript", "--out", run / "last" / "model.safetensors"], "would overwrite"),
        (["export", run, "--format", "torchscript", "--out", run / "config.json"], "would overwrite"),
        (["export", run, "--format", "torchscript", "--out", run], "is a directory"),
        (["reuse", run, "--out", run / "config.png"], "would overwrite"),  # its numbers: config.json
        (["reuse", run, "--out", run / "metrics.png"], "would overwrite"),  # metrics.csv
        (["reuse", run, "--out", tmp_path / "x.json"], "does not write json"),  # refused before writing
    ]:
        one_line_error(*cli(*argv), needle)
    with pytest.raises(ValueError, match="not a Hub export"):
        hub.save_pretrained(densenet.load(run)[0], run / "last")
    from densenet.train.checkpoint import refuse_run_file

    for name in ("densenet.lock", "launch.json", "error.json"):  # the run lock, a grid cell's files
        with pytest.raises(ValueError, match="would overwrite"):
            refuse_run_file(run / name, "output")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "x.csv").exists()
    code, _ = cli("reuse", run, "--out", run / "reuse.png")  # other names in a run directory are fine
    assert code == 0 and (run / "reuse.json").is_file()

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.md").write_text("mine\n")
    assert cli("reproduce", "status", "table2", "--out", notes)[0] == 0  # not a grid directory: no tables
    assert (notes / "results.md").read_text() == "mine\n"
    (notes / "grid.json").write_text('{"grid": ["table2"], "cells": []}')
    one_line_error(*cli("reproduce", "status", notes), "grid.json is missing or damaged")
    from densenet.grid.status import write_grid

    (notes / "grid.json").write_text('{"grid": "table2", "cells": []}')
    with pytest.raises(ValueError, match="holds the table2 grid"):
        write_grid(notes, "table2-baselines", [])
