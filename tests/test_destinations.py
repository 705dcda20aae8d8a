"""Every writer refuses a destination that exists and is not a regular file (utils/atomic.py's
`check_destination`): a FIFO, a device, a socket or a directory is never replaced by a file, as root
too, and nothing is written before the refusal."""
from __future__ import annotations

import os
import shutil
import socket
import stat

import pytest

from densenet.cli import main
from densenet.utils.atomic import atomic_write, check_destination, write_text_atomic


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
