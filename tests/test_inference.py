"""Deployment: `densenet.load` (the model and the preprocessing its training evaluated with) and
`densenet predict` on the images people really have: RGBA, palette, grayscale, 16-bit, other sizes,
and files that are not images at all."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import densenet
from densenet.cli import main
from densenet.data import DataError, load_splits
from densenet.data.sources import _decode
from densenet.inference import load, predict
from densenet.saved_model import load_model
from densenet.train.engine import evaluation_batches

from helpers import ENV, lying_png, train, valid_images


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    folder = tiny_run["folder"]
    return {"folder": folder,
            "memory": tiny_run["run"],
            "stream": train(folder, root / "stream", dataset="imagenet", image_size=8, resize=10, workers=0),
            "gray": train(None, root / "gray", dataset="digits", train_subset=64, val_size=16, data=None)}


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """One image of each awkward kind, and two files that are not images."""
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)
    deep = rng.integers(0, 65536, (12, 12)).astype(np.uint16)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (12, 12), dtype=np.uint8)]), "RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray(rgb).convert("L").save(d / "gray.png")
    Image.fromarray(deep).save(d / "deep16.png")
    Image.fromarray((deep >> 8).astype(np.uint8)).save(d / "deep16_as_8bit.png")
    Image.fromarray(rgb).resize((36, 24), Image.NEAREST).save(d / "large.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (d / "notes.txt").write_text("not an image")
    return d


def test_load_gives_eval_model_and_the_training_evaluation_transform(runs):
    for kind in ("memory", "stream"):
        model, transform = densenet.load(runs[kind])
        assert not model.training and model.classes == ["circle", "square", "stripes"]
        _, info = load_model(runs[kind])
        pre = info["preprocessing"]
        assert transform.source == pre["source"] == kind
        # the test split as `densenet eval` preprocesses it, against the transform applied file by file
        splits = load_splits("folder", runs["folder"], in_memory=kind == "memory")
        expected = torch.cat([x for x, _ in evaluation_batches(splits.test, pre, 5, "cpu", workers=0)])
        files = sorted(runs["folder"].glob("test/*/*.png"))
        got = torch.stack([transform(f) for f in files])
        assert got.shape == expected.shape == (12, 3, *pre["image_size"])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        # a PIL image gives what its file gives
        with Image.open(files[0]) as im:
            torch.testing.assert_close(transform(im), got[0], rtol=0, atol=1e-6)


def test_images_are_converted_to_the_channels_the_model_takes(runs, odd_images):
    _, t = densenet.load(runs["memory"])
    rgb = t(odd_images / "rgb.png")
    assert torch.equal(t(odd_images / "rgba.png"), rgb)  # alpha dropped
    assert torch.equal(t(odd_images / "palette.png"), t(Image.open(odd_images / "palette.png").convert("RGB")))
    gray = t(odd_images / "gray.png")
    assert gray.shape == (3, 12, 12)  # grayscale repeated into the model's three channels
    g = torch.tensor(t.normalize.mean).view(3, 1, 1) + gray * torch.tensor(t.normalize.std).view(3, 1, 1)
    assert torch.allclose(g[0], g[1], atol=1e-6) and torch.allclose(g[1], g[2], atol=1e-6)
    assert torch.equal(t(odd_images / "deep16.png"), t(odd_images / "deep16_as_8bit.png"))  # scaled, not clipped
    _, t1 = densenet.load(runs["gray"])  # a grayscale (digits) model takes colour images as luma
    assert t1(odd_images / "rgb.png").shape == (1, 8, 8) and t1.channels == 1


def test_images_of_another_size_are_resized_to_cover_then_centre_cropped(runs, odd_images):
    _, t = densenet.load(runs["memory"])
    large = t(odd_images / "large.png")  # 36x24, the 12x12 image scaled 3x and 2x: covering size 18x12
    assert large.shape == (3, 12, 12) and torch.isfinite(large).all()
    with Image.open(odd_images / "large.png") as im:
        expected = t(im.resize((18, 12), Image.BILINEAR, reducing_gap=None).crop((3, 0, 15, 12)))
    assert (large - expected).abs().max() < 0.02  # the same antialiased bilinear filter as PIL: within a grey level


def test_unreadable_inputs_are_clear_errors(runs, odd_images, tmp_path):
    _, t = densenet.load(runs["memory"])
    for name, match in [("corrupt.png", "corrupt.png is not a readable image"),
                        ("notes.txt", "notes.txt is not a readable image"),
                        ("missing.png", "missing.png does not exist")]:
        with pytest.raises(DataError, match=match):
            t(odd_images / name)
    with pytest.raises(ValueError, match="is a directory"):
        t(tmp_path)
    with pytest.raises(TypeError, match="image path or a PIL image"):
        t(torch.zeros(3, 12, 12))
    _, s = densenet.load(runs["stream"])
    with pytest.raises(DataError, match="corrupt.png is not a readable image"):
        s(odd_images / "corrupt.png")


@pytest.mark.slow
def test_predict_json_on_awkward_images_matches_the_model(runs, odd_images):
    good = ["rgb.png", "rgba.png", "palette.png", "gray.png", "deep16.png", "large.png"]
    bad = ["corrupt.png", "notes.txt", "missing.png"]
    paths = [str(odd_images / n) for n in good[:3] + bad + good[3:]]
    r = subprocess.run([sys.executable, "-m", "densenet.cli", "predict", str(runs["memory"]), *paths, "--json",
                        "--batch-size", "4", "--top-k", "2"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("densenet predict: error: ")]
    assert len(errors) == 3 and all(any(b in e for e in errors) for b in bad), r.stderr
    out = json.loads(r.stdout)
    assert [o["path"] for o in out] == paths  # every image, in order, the failed ones included
    model, transform = densenet.load(runs["memory"])
    for o in out:
        if any(o["path"].endswith(b) for b in bad):
            assert set(o) == {"path", "error"} and o["path"] in o["error"]
            continue
        with torch.no_grad():
            probs = model(transform(o["path"])[None]).softmax(1)[0]
        top = probs.topk(2)
        assert [p["index"] for p in o["predictions"]] == top.indices.tolist()
        assert [p["class"] for p in o["predictions"]] == [model.classes[i] for i in top.indices.tolist()]
        assert np.allclose([p["probability"] for p in o["predictions"]], top.values.tolist(), atol=1e-6)


def test_predict_table_walks_folders_and_caps_top_k(runs, capsys):
    folder = runs["folder"] / "test"
    assert main(["predict", str(runs["stream"]), str(folder), "--top-k", "10", "--batch-size", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 and all(line.startswith(str(folder)) for line in lines)
    for line in lines:  # path, then (class, probability) for all 3 classes, most probable first
        cells = line.split()[1:]
        probs = [float(p) for p in cells[1::2]]
        assert sorted(cells[0::2]) == ["circle", "square", "stripes"] and probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1) < 1e-3


@pytest.mark.parametrize("args, code, match", [
    (["{run}", "{empty}"], 1, "no images"),
    (["{run}", "{run}/nothing.png"], 1, "does not exist"),
    (["{empty}", "x.png"], 2, "no checkpoint in directory"),
    (["{run}", "x.png", "--top-k", "0"], 2, "--top-k and --batch-size must be >= 1"),
    (["{run}", "x.png", "--device", "tpu9"], 2, "unknown device"),
])
def test_predict_exit_status(runs, tmp_path, capsys, args, code, match):
    (tmp_path / "empty").mkdir()
    argv = ["predict"] + [a.format(run=runs["memory"], empty=tmp_path / "empty") for a in args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


# --- an animated GIF, and a batch with a damaged image -------------------------------------------------


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
