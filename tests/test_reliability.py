"""Reliability (issue 15): no input crashes the process, the run deletes only what it wrote, one
process per run directory, a diverged model is never saved as good, state and metadata are checked
when read, and every error is one line that names its cause. The hostile files are made here."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from densenet.cli import main
from densenet.train.resume import ResumeError
from densenet.data.sources import DataError, _decode, load_folder
from densenet.inference import find_images, load, predict
from densenet.train import TrainConfig, TrainingStopped, fit
from densenet.train.checkpoint import RunDir
from densenet.train.lock import DirLock, LockedError, holder
from densenet.runs import CheckpointError
from densenet.saved_model import load_model
from densenet.weights import NonFiniteWeightsWarning

from helpers import ENV, make_folder


def cfg(folder, out, **kw):
    base = dict(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 6}, dataset="folder",
                data=str(folder), epochs=1, batch_size=8, val_size=3, progress=False, tensorboard=False,
                out=str(out) if out else None)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny image folder and a run of one epoch on it (3 steps), shared by the tests that copy it."""
    root = tmp_path_factory.mktemp("tiny")
    folder = make_folder(root / "shapes", per_class=8, test_per_class=2, size=8)
    fit(cfg(folder, root / "run"))
    return {"folder": folder, "run": root / "run"}


def copy_run(tiny, dst: Path) -> Path:
    shutil.copytree(tiny["run"], dst, symlinks=True)
    for p in dst.rglob("*"):  # checkpoints may be written read-only
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o644)
    return dst


def cli(*argv) -> tuple[int, str]:
    """Run the command line in-process: (exit status, stderr)."""
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, err)


def rewrite_safetensors(path: Path, edit) -> None:
    """Apply `edit(tensors, metadata)` to a safetensors file (in place; both may be changed)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    edit(tensors, meta)
    os.chmod(path, 0o644)
    save_file(tensors, str(path), metadata=meta)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def lying_png(width=100, height=100, data=bytes(100)) -> bytes:
    """The red team's 69-byte PNG: IHDR declares 100x100 8-bit grey, IDAT holds 100 bytes. It killed
    torchvision's decoder (SIGSEGV)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(data)) + png_chunk(b"IEND", b""))


# --- 1. decoding: no file crashes the process -----------------------------------------------------------

def test_the_69_byte_png_is_an_error_not_a_segfault():
    """In-process: a crash would end the test run (the fuzz below runs it in a child process too)."""
    data = lying_png()
    assert len(data) == 69
    for mode in ("RGB", "L"):
        with pytest.raises(DataError, match="bad.png is not a readable image"):
            _decode(data, "bad.png", mode)


def valid_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    out = {}
    for name, (im, fmt, kw) in {
        "rgb.png": (Image.fromarray(rgb), "PNG", {}),
        "gray.png": (Image.fromarray(rgb).convert("L"), "PNG", {}),
        "rgba.png": (Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG", {}),
        "palette.png": (Image.fromarray(rgb).convert("P"), "PNG", {}),
        "deep16.png": (Image.fromarray(rng.integers(0, 65536, (9, 11)).astype(np.uint16)), "PNG", {}),
        "interlaced.png": (Image.fromarray(rgb), "PNG", {"interlace": 1}),
        "photo.jpg": (Image.fromarray(rgb), "JPEG", {"quality": 90}),
        "gray.jpg": (Image.fromarray(rgb).convert("L"), "JPEG", {}),
        "progressive.jpg": (Image.fromarray(rgb), "JPEG", {"progressive": True}),
        "image.bmp": (Image.fromarray(rgb), "BMP", {}),
        "image.webp": (Image.fromarray(rgb), "WEBP", {}),
        "image.tiff": (Image.fromarray(rgb), "TIFF", {}),
        "image.ppm": (Image.fromarray(rgb), "PPM", {}),
        "image.gif": (Image.fromarray(rgb).convert("P"), "GIF", {}),
    }.items():
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        out[name] = b.getvalue()
    frames = [Image.fromarray(np.full((9, 11, 3), v, np.uint8)).convert("P") for v in (0, 255)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    out["animated.gif"] = b.getvalue()
    return out


def mutations(data: bytes, seed: int, n: int) -> list[bytes]:
    """Truncations, bit flips, inserted and deleted bytes, at seeded positions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = bytearray(data)
        kind = i % 4
        if kind == 0:
            d = d[:int(rng.integers(0, len(d)))]
        elif kind == 1:
            for p in rng.integers(0, len(d), int(rng.integers(1, 4))):
                d[p] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:
            p = int(rng.integers(0, len(d)))
            d[p:p] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        else:
            p = int(rng.integers(0, len(d)))
            del d[p:p + int(rng.integers(1, 9))]
        out.append(bytes(d))
    return out


def lying_headers(name: str, data: bytes) -> list[bytes]:
    """The same pixels behind a header that declares another size (checksums made to match)."""
    if name.endswith(".png") and data[12:16] == b"IHDR":
        body = bytearray(data[16:29])
        out = []
        for w, h in ((200, 9), (11, 300), (1, 1), (2 ** 31 - 1, 2)):
            body[0:8] = struct.pack(">II", w, h)
            out.append(data[:8] + png_chunk(b"IHDR", bytes(body)) + data[33:])
        return out
    if name.endswith(".jpg"):
        i = data.index(b"\xff\xc0") if b"\xff\xc0" in data else data.index(b"\xff\xc2")
        return [data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:] for h, w in ((900, 11), (9, 0), (60000, 60000))]
    if name.endswith(".bmp"):
        return [data[:18] + struct.pack("<ii", w, h) + data[26:] for w, h in ((1100, 9), (11, -900), (0, 9))]
    if name.endswith(".gif"):
        return [data[:6] + struct.pack("<HH", 60000, 60000) + data[10:]]
    return []


def test_damaged_truncated_and_lying_images_of_every_format_are_errors_or_images():
    """Every accepted format, each valid file mutated 24 ways and given lying headers: each decodes to
    a uint8 (C, H, W) image or raises DataError naming the file (a crash would end the test run)."""
    results = {"ok": 0, "error": 0}
    for name, data in valid_images().items():
        assert _decode(data, name, "RGB").shape[0] == 3, name  # the valid file itself
        for i, bad in enumerate(mutations(data, seed=len(name), n=24) + lying_headers(name, data)):
            for mode in ("RGB", "L"):
                try:
                    t = _decode(bad, f"{name}#{i}", mode)
                except DataError as e:
                    assert f"{name}#{i}" in str(e) and "BytesIO" not in str(e)
                    results["error"] += 1
                    continue
                assert t.dtype == torch.uint8 and t.dim() == 3 and t.shape[0] == (3 if mode == "RGB" else 1)
                results["ok"] += 1
    assert results["error"] > 100  # the corpus does reach the error paths


def test_animated_gif_is_its_first_frame_and_the_batch_survives(tiny, tmp_path):
    gif = tmp_path / "animated.gif"
    gif.write_bytes(valid_images()["animated.gif"])
    assert _decode(gif.read_bytes(), "a", "RGB").shape == (3, 9, 11)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    model, tf = load(tiny["run"])
    (tmp_path / "bad.png").write_bytes(lying_png())
    out = list(predict(model, tf, [gif, good, tmp_path / "bad.png"], batch_size=8))
    assert "predictions" in out[0] and "predictions" in out[1] and "not a readable image" in out[2]["error"]


def test_pixel_limit_applies_to_every_decoder(monkeypatch):
    monkeypatch.setenv("DENSENET_MAX_IMAGE_PIXELS", "50")
    for name, data in valid_images().items():  # 99 pixels each
        with pytest.raises(DataError, match="over the limit of 50 pixels.*DENSENET_MAX_IMAGE_PIXELS"):
            _decode(data, name, "RGB")
    monkeypatch.setenv("DENSENET_MAX_IMAGE_PIXELS", "99")
    assert _decode(valid_images()["rgb.png"], "x", "RGB").shape == (3, 9, 11)
    monkeypatch.setenv("DENSENET_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(DataError, match="DENSENET_MAX_IMAGE_PIXELS='many' must be a positive number"):
        _decode(valid_images()["rgb.png"], "x", "RGB")


def test_a_decompression_bomb_is_refused_before_it_is_decoded(monkeypatch):
    """4,000 x 4,000 grey pixels in 16 KB (zeros compress 1000:1); with the limit at 1 M pixels it is
    refused from its header, for the PNG decoder and for Pillow's (palette PNG)."""
    monkeypatch.setenv("DENSENET_MAX_IMAGE_PIXELS", str(10 ** 6))
    bomb = lying_png(4000, 4000, bytes(4001 * 4000))
    assert len(bomb) < 50_000
    with pytest.raises(DataError, match="4000x4000 = 16,000,000 pixels, over the limit"):
        _decode(bomb, "bomb.png", "RGB")
    pal = bytearray(bomb)
    pal[16 + 9] = 3  # colour type 3 (palette), checksum fixed
    pal = bytes(pal[:8]) + png_chunk(b"IHDR", bytes(pal[16:29])) + bytes(pal[33:])
    with pytest.raises(DataError, match="over the limit"):
        _decode(pal, "bomb.png", "RGB")


# --- 5. archives ----------------------------------------------------------------------------------------

def make_archive(path: Path, files: dict[str, bytes], order=None, mode="w:gz") -> Path:
    names = list(files) if order is None else order
    with tarfile.open(path, mode) as tf:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(files[n])
            tf.addfile(info, io.BytesIO(files[n]))
    return path


def folder_files(n_per_class=4, size=8) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_per_class), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                b = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, "PNG")
                out[f"data/{split}/{c}/{i:03d}.png"] = b.getvalue()
    return out


def test_archives_load_identically_in_any_member_order(tmp_path):
    """One sequential pass ("r|*" mode, where a backward seek raises): reversed and shuffled archives
    load exactly as the sorted one, in linear time."""
    files = folder_files()
    names = sorted(files)
    shuffled = list(np.random.default_rng(0).permutation(names))
    loaded = [load_folder(make_archive(tmp_path / f"{k}.tar.gz", files, order))
              for k, order in (("sorted", names), ("reversed", names[::-1]), ("shuffled", shuffled))]
    for s in loaded[1:]:
        assert torch.equal(s.train.images, loaded[0].train.images) and torch.equal(s.test.labels, loaded[0].test.labels)
    assert loaded[0].train.images.shape == (8, 3, 8, 8) and loaded[0].classes == ["a", "b"]


def test_truncated_lying_and_corrupt_archives_are_one_line_errors(tmp_path):
    good = make_archive(tmp_path / "good.tar.gz", folder_files()).read_bytes()
    plain = make_archive(tmp_path / "plain.tar", folder_files(), mode="w").read_bytes()
    cases = {"truncated.tar.gz": good[:len(good) // 2], "truncated.tar": plain[:700],
             "flipped.tar.gz": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:],
             "garbage.tar.gz": b"\x1f\x8b" + bytes(range(256)) * 4, "empty.tar.gz": b""}
    # a header that declares a member longer than the archive holds
    lying = bytearray(plain)
    lying[124:136] = b"%011o\x00" % (10 ** 6)
    lying[148:156] = b"        "
    lying[148:156] = b"%06o\x00 " % sum(lying[:512])
    cases["lying.tar"] = bytes(lying)
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(DataError) as e:
            load_folder(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value), (name, e.value)
        code, err = cli("train", "--dataset", "folder", "--data", p, "--epochs", "1", "--no-progress")
        one_line_error(code, err, str(p))


def test_archive_member_and_memory_limits(tmp_path, monkeypatch):
    files = folder_files()
    files["data/train/a/huge.png"] = bytes(3 * 2 ** 20)  # 3 MiB of zeros: 3 KB compressed
    p = make_archive(tmp_path / "bomb.tar.gz", files)
    assert p.stat().st_size < 100_000
    monkeypatch.setenv("DENSENET_MAX_FILE_MB", "2")
    with pytest.raises(DataError, match=r"huge.png: the file has 3 MiB, over the limit of 2 MiB.*DENSENET_MAX_FILE_MB"):
        load_folder(p)
    monkeypatch.setenv("DENSENET_MAX_FILE_MB", "4")
    monkeypatch.setenv("DENSENET_MAX_MEMORY_MB", "1")
    with pytest.raises(DataError, match="half of this machine's memory.*DENSENET_MAX_MEMORY_MB"):
        load_folder(p)
    monkeypatch.delenv("DENSENET_MAX_MEMORY_MB")
    with pytest.raises(DataError, match="huge.png is not a readable image"):  # the limit passed: zeros are no PNG
        load_folder(p)


def test_mixed_sizes_in_an_archive_suggest_what_works(tmp_path):
    files = folder_files()
    b = io.BytesIO()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(b, "PNG")
    files["data/train/b/odd.png"] = b.getvalue()
    with pytest.raises(DataError, match="extract the archive and give the folder with --no-in-memory"):
        load_folder(make_archive(tmp_path / "mixed.tar.gz", files))


# --- 7. links to directories are followed ---------------------------------------------------------------

def test_a_test_folder_linked_elsewhere_is_followed(tmp_path):
    src = make_folder(tmp_path / "real", per_class=3, test_per_class=2, size=8)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train").symlink_to(src / "train", target_is_directory=True)
    (ds / "test").symlink_to(src / "test", target_is_directory=True)
    (ds / "train" / "circle" / "loop").symlink_to(ds, target_is_directory=True)  # a cycle ends
    s = load_folder(ds)
    assert s.test is not None and len(s.test) == 6 and len(s.train) == 9
    assert len(find_images([ds / "test"])) == 6


# --- 2. cleanup deletes only what the run wrote -----------------------------------------------------------

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


# --- 3. one process per run directory -------------------------------------------------------------------

def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with DirLock(tmp_path / "run") as first:
        with pytest.raises(LockedError) as e:
            DirLock(tmp_path / "run").acquire()
        assert f"process {os.getpid()} on {socket.gethostname()}" in str(e.value)
        assert holder(tmp_path / "run")["pid"] == os.getpid() and first.held
    assert holder(tmp_path / "run") is None
    with DirLock(tmp_path / "run"):  # released: taken again
        pass


def test_a_lock_left_by_kill_9_does_not_block(tiny, tmp_path):
    """A process holds the run directory; `densenet train --out` there is refused naming its pid; after
    kill -9 of the holder, the stale lock file does not block."""
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom densenet.train.lock import DirLock\n"
                              f"DirLock({str(run)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(300)"],
                             env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        code, err = cli("train", "--dataset", "folder", "--data", tiny["folder"], "--epochs", "1", "--out", run)
        one_line_error(code, err, f"in use by process {child.pid} on {socket.gethostname()}")
        code, err = cli("train", "--resume", copy_run(tiny, tmp_path / "other"))  # the other run is free
        assert code == 0, err
    finally:
        child.kill()
        child.wait()
    assert (run / "densenet.lock").exists() and holder(run) is None
    with DirLock(run):
        pass


def test_a_probe_of_the_lock_does_not_turn_a_run_away(tmp_path, monkeypatch):
    """holder() takes the lock for a moment to see whether anyone holds it: a run starting in that moment
    waits for the probe to end (a launcher asking for a cell's state must not make the cell "busy");
    a lock really held is still refused, after the short grace."""
    import threading
    import time

    import densenet.train.lock as lock

    d = tmp_path / "run"
    d.mkdir()
    probe = DirLock(d).acquire(_probe=True)  # what holder() does, held here for 50 ms
    t = threading.Timer(0.05, probe.release)
    # the grace (0.25 s) widened while the timer must fire within it: on a loaded machine a 50 ms timer
    # can fire late; the wait still ends as soon as the probe is released
    grace = lock.PROBE_GRACE_S
    monkeypatch.setattr(lock, "PROBE_GRACE_S", 30.0)
    t.start()
    try:
        with DirLock(d):
            assert json.loads((d / "densenet.lock").read_text())["pid"] == os.getpid()
    finally:
        t.cancel()
    monkeypatch.setattr(lock, "PROBE_GRACE_S", grace)
    with DirLock(d):
        start = time.monotonic()
        with pytest.raises(LockedError, match=f"process {os.getpid()}"):
            DirLock(d).acquire()
        assert time.monotonic() - start >= lock.PROBE_GRACE_S


def test_without_flock_the_lock_file_itself_locks(tmp_path, monkeypatch):
    """File systems without flock: the lock file's creation is the lock; a dead holder's file on this
    host is taken over, a live holder's is refused."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    d = tmp_path / "run"
    with DirLock(d):
        with pytest.raises(LockedError, match=f"process {os.getpid()}"):
            DirLock(d).acquire()
    assert not (d / "densenet.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / "densenet.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with DirLock(d):  # stale: its process is gone
        assert json.loads((d / "densenet.lock").read_text())["pid"] == os.getpid()
    import threading

    import densenet.train.lock as lock

    (d / "densenet.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    t = threading.Timer(0.05, (d / "densenet.lock").unlink)  # holder()'s probe: a live file for a moment
    monkeypatch.setattr(lock, "PROBE_GRACE_S", 30.0)  # a 50 ms timer may fire late on a loaded machine
    t.start()
    with DirLock(d):
        pass
    t.join()


# --- 4. a broken model is never saved as good --------------------------------------------------------------

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


def test_eval_predict_and_load_warn_on_non_finite_weights(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    f = run / "last" / "model.safetensors"
    rewrite_safetensors(f, lambda t, m: t["features.norm5.running_var"].fill_(float("nan")))
    with pytest.warns(NonFiniteWeightsWarning, match="features.norm5.running_var"):
        load_model(f)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    code, err = cli("predict", f, img)
    assert "densenet predict: warning: " in err and "non-finite weights" in err and "Traceback" not in err


# --- 6. and 7. state and metadata are checked when read -------------------------------------------------

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


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p.pop("mean"), "preprocessing lacks mean"),
    (lambda p: p.update(image_size=[100000, 100000]), "image_size must be [height, width], each 1 to 8192"),
    (lambda p: p.update(std=[0, 1, 1]), "std must be positive"),
    (lambda p: p.update(source="disk"), "source must be memory or stream"),
])
def test_damaged_preprocessing_metadata_is_an_error(tiny, tmp_path, edit, needle):
    run = copy_run(tiny, tmp_path / "run")
    f = run / "last" / "model.safetensors"

    def change(t, m):
        p = json.loads(m["preprocessing"])
        edit(p)
        m["preprocessing"] = json.dumps(p)

    rewrite_safetensors(f, change)
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load(f)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    one_line_error(*cli("predict", f, img), needle)


def test_fewer_class_names_than_outputs_is_an_error(tiny, tmp_path):
    f = copy_run(tiny, tmp_path / "run") / "last" / "model.safetensors"
    rewrite_safetensors(f, lambda t, m: m.update(classes=json.dumps(["circle", "square"])))
    with pytest.raises(CheckpointError, match="lists 2 class names for the model's 3 outputs"):
        load(f)


def test_a_changed_model_names_every_key_and_both_shapes(tiny, tmp_path):
    f = copy_run(tiny, tmp_path / "run") / "last" / "model.safetensors"
    rewrite_safetensors(f, lambda t, m: m.update(model_args=json.dumps({**json.loads(m["model_args"]), "growth_rate": 4})))
    with pytest.raises(CheckpointError) as e:
        load_model(f)
    msg = str(e.value)
    assert "Error(s) in loading" not in msg and "shapes differ" in msg
    import re

    assert re.search(r"features.denseblock1.denselayer1.conv1.weight \(24, \d+, 1, 1\) in the checkpoint, "
                     r"\(16, \d+, 1, 1\) in the model", msg), msg


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


def test_a_torn_last_metrics_line_is_dropped_a_damaged_one_named(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.1, "train_lo')  # a crash while the line was written
    fit(cfg(tiny["folder"], None, epochs=2), resume=str(run))
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    run2 = copy_run(tiny, tmp_path / "run2")
    (run2 / "metrics.jsonl").write_text("garbage\n" + (run2 / "metrics.jsonl").read_text())
    one_line_error(*cli("train", "--resume", run2, "--epochs", "2"), f"{run2 / 'metrics.jsonl'} line 1 is damaged")


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


# --- 6. and 8. the command line: one line, the cause named ------------------------------------------------

def test_out_of_memory_and_internal_errors_are_one_line(monkeypatch):
    import densenet.train

    def oom(cfg, resume=None):
        raise MemoryError()

    monkeypatch.setattr(densenet.train, "fit", oom)
    one_line_error(*cli("train", "--depth", "9994"), "out of memory", "--batch-size")

    def bug(cfg, resume=None):
        raise KeyError("surprise")

    monkeypatch.setattr(densenet.train, "fit", bug)
    code, err = cli("train")
    assert code == 1 and "internal error (KeyError" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(KeyError):
        cli("train", "--debug")


def test_messages_name_the_cause(tiny, tmp_path, capsys):
    one_line_error(*cli("eval", "--checkpoint", tiny["run"], "--batch-size", "0"), "--batch-size must be >= 1")
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    with pytest.raises(DataError) as e:
        _decode(txt.read_bytes(), str(txt), "RGB")
    assert "not an image format Pillow knows" in str(e.value) and "BytesIO" not in str(e.value)
    # no false "has no dropout option" note before an unrelated error
    import densenet.train.engine as engine

    calls = []

    def create(name, **kw):
        calls.append(kw)
        raise ValueError("depth 7 is not valid")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "create_model", create)
        with pytest.raises(ValueError, match="depth 7"):  # a network without dropout: the rate is not passed
            engine.build_model(cfg(tiny["folder"], None, model="resnet20", model_args={}, drop_rate=0.2), 3, 3)
    assert "note:" not in capsys.readouterr().err and len(calls) == 1 and "drop_rate" not in calls[0]


# --- the fuzz: random byte mutations of real files through the real commands, in a subprocess ------------

FUZZ_CHILD = r"""
import contextlib, io, json, sys, traceback
from densenet.cli import main
from densenet.train.resume import ResumeError
for i, (cwd, argv) in enumerate(json.loads(open(sys.argv[1]).read())):
    import os
    os.chdir(cwd)
    err = io.StringIO()
    print(json.dumps({"start": i, "argv": argv}), flush=True)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code, _ = "raised", traceback.print_exc(file=err)
    print(json.dumps({"i": i, "code": code, "err": err.getvalue()[-3000:]}), flush=True)
"""


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def fuzz_cases(tiny, root: Path, n: int, seed: int) -> tuple[list, list[Path]]:
    """(cwd, argv) pairs feeding mutated PNG, JPEG, .tar.gz, safetensors and JSON files to predict,
    train (folder) and eval; and the directories runs may write in."""
    rng = np.random.default_rng(seed)
    images = valid_images()
    archive = make_archive(root / "data.tar.gz", folder_files(n_per_class=4, size=8)).read_bytes()
    model = (tiny["run"] / "last" / "model.safetensors").read_bytes()
    config = json.dumps({"dataset": "folder", "epochs": 1, "batch_size": 4, "val_size": 2, "progress": False,
                         "tensorboard": False, "model_args": {"depth": 10, "growth_rate": 6}})
    small = ["--depth", "10", "--growth-rate", "6", "--epochs", "1", "--batch-size", "4", "--val-size", "2",
             "--no-progress", "--no-tensorboard"]
    cases, runs = [], []
    kinds = ["png", "jpeg", "targz", "safetensors", "json"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        d = root / f"case{i:03d}"
        d.mkdir()
        out = d / "run"
        runs.append(out)
        if kind in ("png", "jpeg"):
            data = images["rgb.png" if kind == "png" else "photo.jpg"]
            bad = mutations(data, seed=int(rng.integers(1 << 30)), n=1)[0]
            f = d / ("x.png" if kind == "png" else "x.jpg")
            f.write_bytes(bad)
            cases.append((str(d), ["predict", str(tiny["run"]), str(f), "--json"]))
        elif kind == "targz":
            f = d / "data.tar.gz"
            f.write_bytes(mutations(archive, seed=int(rng.integers(1 << 30)), n=4)[i % 4])
            cases.append((str(d), ["train", "--dataset", "folder", "--data", str(f), "--out", str(out)] + small))
        elif kind == "safetensors":
            f = d / "model.safetensors"
            f.write_bytes(mutations(model, seed=int(rng.integers(1 << 30)), n=4)[(i // 5) % 4])
            cases.append((str(d), ["eval", "--checkpoint", str(f), "--data", str(tiny["folder"]), "--workers", "0"]))
        else:
            f = d / "c.json"
            f.write_bytes(mutations(config.encode(), seed=int(rng.integers(1 << 30)), n=4)[(i // 5) % 4])
            cases.append((str(d), ["train", "--config", str(f), "--data", str(tiny["folder"]), "--out", str(out)]
                          + small))
    return cases, runs


def check_fuzz(results: list[dict], cases) -> None:
    for r in results:
        argv = cases[r["i"]][1]
        assert r["code"] in (0, 1, 2, 3), (argv, r)
        assert "Traceback" not in r["err"] and "internal error" not in r["err"], (argv, r["err"])
        if r["code"] == 1:
            assert argv[0] == "predict" and "images failed" in r["err"], (argv, r["err"])


def test_fuzz_mutated_files_through_predict_train_and_eval(tiny, tmp_path):
    """30 random mutations through the real commands in one child process (a crash of the child shows
    the input that killed it): exit status 0, 1 (predict: an image failed), 2 or 3, never a traceback,
    and nothing written outside each case's run directory."""
    cases, runs = fuzz_cases(tiny, tmp_path, n=30, seed=15)
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    watched = {"tiny": snapshot(tiny["run"].parent), "cases": snapshot(tmp_path)}
    r = subprocess.run([sys.executable, "-c", FUZZ_CHILD, str(spec)], env=ENV, capture_output=True, text=True,
                       timeout=900)
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert r.returncode == 0, f"the child died ({r.returncode}) on {lines[-1] if lines else None}: {r.stderr[-2000:]}"
    results = [ln for ln in lines if "code" in ln]
    assert len(results) == len(cases)
    check_fuzz(results, cases)
    assert snapshot(tiny["run"].parent) == watched["tiny"]
    now = snapshot(tmp_path)
    changed = {p for p in set(now) | set(watched["cases"]) if now.get(p) != watched["cases"].get(p)}
    assert all(any(Path(p).is_relative_to(run) for run in runs) for p in changed), sorted(changed)[:5]


@pytest.mark.slow
def test_fuzz_each_mutation_in_its_own_process(tiny, tmp_path):
    """Each case as its own `python -m densenet.cli` process: the real exit status of the program."""
    cases, runs = fuzz_cases(tiny, tmp_path, n=8, seed=1515)  # the in-process fuzz above runs 30
    for cwd, argv in cases:
        r = subprocess.run([sys.executable, "-m", "densenet.cli"] + argv, cwd=cwd, env=ENV, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode in (0, 1, 2, 3), (argv, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, (argv, r.stderr[-2000:])


def test_an_error_from_a_loading_worker_is_its_own_last_line():
    from densenet.cli import _one_line

    e = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  '  File "x.py", line 1, in f\n    g()\ndensenet.data.sources.DataError: a.png is not a readable '
                  "image (OSError: truncated)\n")
    assert _one_line(e) == "a.png is not a readable image (OSError: truncated)"


def test_a_damaged_image_in_a_streamed_folder_is_one_line(tmp_path):
    folder = make_folder(tmp_path / "shapes", per_class=4, test_per_class=1, size=8)
    (folder / "train" / "circle" / "0001.png").write_bytes(lying_png(8, 8, bytes(10)))
    code, err = cli("train", "--dataset", "folder", "--data", folder, "--no-in-memory", "--image-size", "8",
                    "--resize", "8", "--workers", "0", "--epochs", "1", "--batch-size", "4", "--val-size", "0",
                    "--depth", "10", "--growth-rate", "6", "--no-progress")
    one_line_error(code, err, "0001.png is not a readable image")


def test_imagenet_augmentation_of_a_grayscale_stream_is_one_line(tmp_path):
    """Colour jitter and PCA lighting are defined for RGB: a 1-channel streamed folder is refused up
    front (it was an IndexError in a loading worker)."""
    folder = make_folder(tmp_path / "shapes", per_class=4, test_per_class=1, size=8)
    code, err = cli("train", "--dataset", "folder", "--data", folder, "--no-in-memory", "--image-size", "8",
                    "--resize", "8", "--workers", "0", "--epochs", "1", "--batch-size", "4", "--val-size", "0",
                    "--depth", "10", "--growth-rate", "6", "--no-progress", "--model-arg", "in_channels=1")
    one_line_error(code, err, "needs RGB images", "--augment none")


# --- 6. outputs never replace a run's own files -------------------------------------------------------------

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
