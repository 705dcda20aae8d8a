"""Corrupt bytes are never accepted as data, and a damaged record is named, never a traceback:
archives are read to the end of their compressed stream (gzip's CRC-32 and length), every PNG chunk's
CRC is checked, a resumed checkpoint must be finite, JSON is bounded in depth and checked for type
(utils/validate.py's `parse_json`), and a Ctrl-C inside torch.export is an interruption (exit 130)."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densenet.cli import main
from densenet.data.sources import DataError, _decode, _read_archive, check_png_crcs
from densenet.utils.validate import MAX_JSON_DEPTH, parse_json, read_json


def _png(size: int = 8, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def archive_bytes() -> bytes:
    """A stored (level 0) gzip: a flipped byte changes the data, not the deflate structure, so only the
    CRC can tell."""
    return gzip.compress(_tar({f"d/train/{c}/{i}.png": _png(seed=i) for c in "ab" for i in range(3)}),
                         compresslevel=0, mtime=0)


def test_a_sound_archive_reads(tmp_path, archive_bytes):
    (tmp_path / "ok.tar.gz").write_bytes(archive_bytes)
    assert len(_read_archive(tmp_path / "ok.tar.gz")) == 6


def test_a_flipped_byte_fails_the_gzip_crc(tmp_path, archive_bytes):
    bad = bytearray(archive_bytes)
    at = len(bad) // 2
    bad[at] ^= 0x01
    (tmp_path / "flip.tar.gz").write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"flip\.tar\.gz is damaged: its compressed data fails the integrity "
                                        r"check.*CRC"):
        _read_archive(tmp_path / "flip.tar.gz")


@pytest.mark.parametrize("cut", [4, 8, 20])
def test_a_cut_gzip_trailer_is_an_error(tmp_path, archive_bytes, cut):
    (tmp_path / "cut.tar.gz").write_bytes(archive_bytes[:-cut])
    with pytest.raises(DataError, match=r"cut\.tar\.gz .*(damaged|truncated)"):
        _read_archive(tmp_path / "cut.tar.gz")


def test_a_flipped_byte_through_train_exits_2(tmp_path, archive_bytes, capsys):
    bad = bytearray(archive_bytes)
    bad[len(bad) // 2] ^= 0x01
    (tmp_path / "flip.tar.gz").write_bytes(bytes(bad))
    rc = main(["train", "--dataset", "folder", "--data", str(tmp_path / "flip.tar.gz"), "--epochs", "1",
               "--no-tensorboard", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "flip.tar.gz is damaged" in err, err
    assert not (tmp_path / "run").exists()  # refused before the run claimed anything


def _flip_idat_crc(png: bytes) -> bytes:
    pos = png.index(b"IDAT") - 4
    n, = struct.unpack_from(">I", png, pos)
    crc_at = pos + 8 + n
    return png[:crc_at] + bytes([png[crc_at] ^ 0xFF]) + png[crc_at + 1:]


def _flip_idat_byte(png: bytes) -> bytes:
    """One byte of the image data changed, its chunk's CRC left as it was (a bit flip on disk)."""
    pos = png.index(b"IDAT") + 4 + 10
    return png[:pos] + bytes([png[pos] ^ 0x01]) + png[pos + 1:]


@pytest.mark.parametrize("damage", [_flip_idat_crc, _flip_idat_byte])
def test_png_chunk_crcs_are_checked(damage):
    png = _png()
    check_png_crcs(png, "ok.png")
    with pytest.raises(DataError, match=r"bad\.png is damaged: its PNG chunk 'IDAT' at byte \d+ fails its CRC"):
        _decode(damage(png), "bad.png", "RGB")


def test_predict_names_a_png_with_a_bad_crc(tiny_run, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(_flip_idat_crc(next(tiny_run["folder"].rglob("*.png")).read_bytes()))
    assert main(["predict", str(tiny_run["run"]), str(tmp_path / "bad.png")]) == 1
    assert "fails its CRC check" in capsys.readouterr().err


def test_predict_keeps_each_image_on_its_line_and_skips_hidden_folders(tiny_run, tmp_path, capsys):
    """A newline or terminal escape in a file name is shown escaped; `.venv/`-like folders are skipped below
    a folder given, unless --include-hidden."""
    png = next(tiny_run["folder"].rglob("*.png")).read_bytes()
    (tmp_path / "two\nlines\x1b[31m.png").write_bytes(png)
    (tmp_path / ".venv" / "site").mkdir(parents=True)
    (tmp_path / ".venv" / "site" / "logo.png").write_bytes(png)
    assert main(["predict", str(tiny_run["run"]), str(tmp_path), "--top-k", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "two\\nlines\\x1b[31m.png" in out[0] and "\x1b" not in out[0], out
    assert main(["predict", str(tiny_run["run"]), str(tmp_path), "--top-k", "1", "--include-hidden"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and any("logo.png" in line for line in out), out


def _copy_run(tiny_run, dst: Path) -> Path:
    shutil.copytree(tiny_run["run"], dst, symlinks=True)
    for p in dst.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o644)
    return dst


def test_resume_refuses_a_non_finite_checkpoint_and_never_calls_it_good(tiny_run, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = _copy_run(tiny_run, tmp_path / "run")
    f = os.path.realpath(run / "last") + "/model.safetensors"
    with safe_open(f, "pt") as h:
        meta = h.metadata()
    tensors = load_file(f)
    tensors["classifier.weight"][0, 0] = float("nan")
    save_file(tensors, f, metadata=meta)
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds non-finite values (1 tensors, e.g. classifier.weight)" in err and "last good" not in err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before


def test_a_head_of_another_size_is_refused_and_leaves_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "new"
    rc = main(["train", "--dataset", "folder", "--data", str(tiny_run["folder"]), "--model-arg", "num_classes=0",
               "--epochs", "1", "--val-size", "6", "--batch-size", "8", "--no-tensorboard", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--model-arg num_classes=0: the data has 3 classes" in err, err
    assert not out.exists()  # not even the lock file or the directory it made
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert main(["train", "--dataset", "folder", "--data", str(tiny_run["folder"]), "--model-arg", "num_classes=5",
                 "--epochs", "1", "--val-size", "6", "--batch-size", "8", "--no-tensorboard", "--out", str(existing)]) == 2
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]


def test_parse_json_bounds_depth_and_checks_types():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match=f"x.json is damaged: its JSON is nested 100000 levels deep \\(at most "
                                         f"{MAX_JSON_DEPTH}\\)"):
        parse_json(deep, "x.json")
    assert parse_json('{"a": "[[[[" }', "x.json") == {"a": "[[[["}  # brackets inside strings do not count
    assert parse_json('[' * MAX_JSON_DEPTH + ']' * MAX_JSON_DEPTH, "x.json", list)
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        parse_json("[1]", "x.json", dict)
    with pytest.raises(ValueError, match="not UTF-8"):
        parse_json(b"\xff\xfe\x00", "x.json")
    with pytest.raises(ValueError, match="not JSON"):
        parse_json("{", "x.json")


def _deep_metadata(tiny_run, tmp_path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = _copy_run(tiny_run, tmp_path / "run")
    for name in ("last", "best"):
        f = os.path.realpath(run / name) + "/model.safetensors"
        with safe_open(f, "pt") as h:
            meta = dict(h.metadata())
        meta["preprocessing"] = "[" * 100_000 + "]" * 100_000
        save_file(load_file(f), f, metadata=meta)
    return run


@pytest.mark.parametrize("command", [["predict", "RUN", "IMG"], ["eval", "RUN"],
                                     ["export", "RUN", "--format", "torchscript", "--out", "OUT"]])
def test_deeply_nested_metadata_is_a_named_error(tiny_run, tmp_path, capsys, command):
    run = _deep_metadata(tiny_run, tmp_path)
    argv = [str(run) if a == "RUN" else str(tmp_path / "m.pt") if a == "OUT" else a for a in command]
    argv = [str(next(tiny_run["folder"].rglob("*.png"))) if a == "IMG" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "metadata preprocessing is damaged: its JSON is nested 100000 levels deep" in err and "internal" not in err


def _grid(tmp_path: Path, summary: bytes | str) -> Path:
    from densenet.grid.reproduce import Cell

    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text(json.dumps({"grid": "table2", "cells": [["densenet_40_k12", "C10+", 0]]}))
    cell = Cell("densenet_40_k12", "C10+", 0).path(grid)
    cell.mkdir(parents=True)
    (cell / "summary.json").write_bytes(summary.encode() if isinstance(summary, str) else summary)
    return grid


@pytest.mark.parametrize("summary,why", [(b"\x00\x01garbage", "not UTF-8|not JSON"),
                                         ("{", "not JSON"),
                                         ('{"test_top1_error": "low"}', "test_top1_error must be a number"),
                                         ('{"test_top1_error": [1]}', "test_top1_error must be a number"),
                                         ("[" * 5000 + "]" * 5000, "nested 5000 levels")],
                         ids=["binary", "not-json", "string-error", "list-error", "deep"])
def test_reproduce_status_names_a_damaged_cell_file(tmp_path, capsys, summary, why):
    import re

    grid = _grid(tmp_path, summary)
    rc = main(["reproduce", "status", str(grid)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert "summary.json is damaged" in text and re.search(why, text), text
    assert "Traceback" not in text and "internal error" not in text and rc in (0, 1, 2)


def test_a_deeply_nested_grid_json_is_a_named_error(tmp_path, capsys):
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["reproduce", "status", str(grid)]) == 2
    assert "grid.json is damaged: its JSON is nested" in capsys.readouterr().err


def test_ctrl_c_inside_torch_export_is_an_interruption(tiny_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    import torch

    def interrupted_export(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:  # as torch.export wraps it: its own error, raised "from" the Ctrl-C
            raise RuntimeError("\x1b[31mTorchExportError: Failed to export the model\x1b[0m") from e

    monkeypatch.setattr(torch.onnx, "export", interrupted_export)
    assert main(["export", str(tiny_run["run"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "internal error" not in err and "\x1b" not in err
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.glob(".m.onnx.*"))


def test_read_json_names_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('"just a string"')
    with pytest.raises(ValueError, match=r"config\.json is damaged: expected a JSON object, got str"):
        read_json(f)


# --- the fuzz: one draw from each class of damage, through the real commands ----------------------------

def _one_line_error(rc: int, err: str) -> None:
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert rc in (1, 2) and len(lines) == 1, (rc, err)
    assert "internal error" not in err and "Traceback" not in err, err


def _damage_destination(case, tmp_path, tiny_run):
    """A non-regular file where an output goes: export, reuse or plot must refuse it and leave it be."""
    kind, command = case
    out = tmp_path / ("out.png" if command == "reuse" else "out.pt")
    keep = None
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "directory":
        out.mkdir()
    else:
        import socket

        keep = socket.socket(socket.AF_UNIX)
        keep.bind(str(out))
    argv = {"export": ["export", str(tiny_run["run"]), "--format", "torchscript", "--out", str(out)],
            "reuse": ["reuse", str(tiny_run["run"]), "--out", str(out)]}[command]
    try:
        return argv, lambda: not out.is_file() and out.exists()
    finally:
        if keep is not None:
            keep.close()


@pytest.mark.slow
def test_fuzz_every_class_of_damage_through_the_commands(tiny_run, tmp_path_factory, archive_bytes):
    """Non-regular destinations, CRC flips and trailer cuts at drawn positions, deep nesting and wrong JSON
    types in drawn files: each through the real command, each a one-line error naming what is wrong."""
    import hypothesis.strategies as st
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.data())
    def one(data):
        tmp_path = tmp_path_factory.mktemp("fuzz")
        cls = data.draw(st.sampled_from(["destination", "gzip", "png", "nesting", "types"]))
        if cls == "destination":
            argv, intact = _damage_destination(
                (data.draw(st.sampled_from(["fifo", "directory", "socket"])),
                 data.draw(st.sampled_from(["export", "reuse"]))), tmp_path, tiny_run)
            with _captured() as err:
                rc = main(argv)
            _one_line_error(rc, err.getvalue())
            assert intact()
        elif cls == "gzip":
            raw = bytearray(archive_bytes)
            if data.draw(st.booleans()):
                at = data.draw(st.integers(10, len(raw) - 9))  # past gzip's header, before its trailer
                raw[at] ^= 1 << data.draw(st.integers(0, 7))
            else:
                raw = raw[:-data.draw(st.integers(1, 64))]
            (tmp_path / "d.tar.gz").write_bytes(bytes(raw))
            with pytest.raises(DataError, match=r"d\.tar\.gz"):
                _read_archive(tmp_path / "d.tar.gz")
        elif cls == "png":
            png = bytearray(_png(seed=data.draw(st.integers(0, 9))))
            at = data.draw(st.integers(8, len(png) - 1))  # any byte after the signature
            png[at] ^= 1 << data.draw(st.integers(0, 7))
            with pytest.raises(DataError, match=r"x\.png"):
                _decode(bytes(png), "x.png", "RGB")
        elif cls == "nesting":
            depth = data.draw(st.integers(MAX_JSON_DEPTH + 1, 200_000))
            opener = data.draw(st.sampled_from(["[", '{"a":']))
            closer = "]" if opener == "[" else "}"
            with pytest.raises(ValueError, match=f"nested {depth} levels"):
                parse_json(opener * depth + "1" + closer * depth, "f.json")
        else:
            value = data.draw(st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans(),
                                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)))
            grid = _grid(tmp_path, json.dumps({"test_top1_error": value}))
            with _captured() as out:
                main(["reproduce", "status", str(grid)])
            assert "test_top1_error must be a number" in out.getvalue(), out.getvalue()

    one()


@contextlib.contextmanager
def _captured():
    import sys

    buf = io.StringIO()
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = buf
    try:
        yield buf
    finally:
        sys.stdout, sys.stderr = old_out, old_err


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_sigint_during_an_onnx_export_exits_130_and_writes_nothing(tiny_run, tmp_path, delay):
    """A real Ctrl-C (SIGINT to the process) at a drawn moment of an ONNX export: 130, "interrupted"
    (or, if the export had finished, 0 and a complete file); never "internal error", never a partial file."""
    pytest.importorskip("onnx")
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m.onnx"
    p = subprocess.Popen([sys.executable, "-m", "densenet", "export", str(tiny_run["run"]), "--format", "onnx",
                          "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert "internal error" not in err and "Traceback" not in err, err
    if p.returncode == 0:
        assert out.stat().st_size > 0
    else:
        # 130, or death by SIGINT itself (what a shell also reports as 130): Python ends that way when a
        # library's C code saw the KeyboardInterrupt first, after the command had printed "interrupted"
        assert p.returncode in (130, -signal.SIGINT) and "interrupted" in err, (p.returncode, err)
        assert not out.exists()
    assert not list(tmp_path.glob(".m.onnx.*"))
