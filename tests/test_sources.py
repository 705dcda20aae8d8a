"""densenet.data.sources: reading images, folders and archives. No file crashes the process: damaged,
truncated and lying images of every accepted format are images or one-line errors naming the file, and
the pixel limit holds for every decoder (decompression bombs are refused from their header). Archives
load the same in any member order, in one sequential pass; damaged ones, oversized members and mixed
sizes are one-line errors. Links to directories are followed. The hostile files are made by the tests
(helpers.py)."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from densenet.data.sources import DataError, _decode, load_folder
from densenet.inference import find_images

from helpers import (cli, folder_files, lying_png, make_archive, make_folder, mutations, one_line_error, png_chunk,
                     valid_images)


# --- decoding: no file crashes the process -------------------------------------------------------------


def test_the_69_byte_png_is_an_error_not_a_segfault():
    """In-process: a crash would end the test run (the fuzz below runs it in a child process too)."""
    data = lying_png()
    assert len(data) == 69
    for mode in ("RGB", "L"):
        with pytest.raises(DataError, match="bad.png is not a readable image"):
            _decode(data, "bad.png", mode)


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


# --- archives ------------------------------------------------------------------------------------------


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


# --- links to directories are followed -----------------------------------------------------------------


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
