"""The command line's error handling (densenet.cli): every error is one line that names its cause, out of
memory and internal errors included, never a traceback; a loading worker's error is reported by its own
last line. The fuzz: random byte mutations of real files (PNG, JPEG, .tar.gz, safetensors, JSON) through
the real commands end with exit status 0 to 3, never a traceback, and write nothing outside each case's
run directory."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densenet.data.sources import DataError, _decode

from helpers import (ENV, cfg, cli, folder_files, lying_png, make_archive, make_folder, mutations, one_line_error,
                     valid_images)


# --- one line, the cause named -------------------------------------------------------------------------


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

    def peer_gone(cfg, resume=None):  # what gloo raises in a node's worker when the other node is killed
        raise torch.distributed.DistBackendError("[gloo/transport/tcp/pair.cc:538] Connection closed by peer "
                                                 "[127.0.0.1]:29400")

    monkeypatch.setattr(densenet.train, "fit", peer_gone)
    code, err = cli("train")
    assert code == 2 and "another process of this distributed job" in err and "--resume" in err, err
    assert "Connection closed by peer" in err and "internal error" not in err and len(err.strip().splitlines()) == 1


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


# --- the fuzz: random byte mutations of real files through the real commands, in a subprocess ----------


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


# --- errors from loading workers -----------------------------------------------------------------------


def test_an_error_from_a_loading_worker_is_its_own_last_line():
    from densenet.utils.errors import one_line

    e = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  '  File "x.py", line 1, in f\n    g()\ndensenet.data.sources.DataError: a.png is not a readable '
                  "image (OSError: truncated)\n")
    assert one_line(e) == "a.png is not a readable image (OSError: truncated)"


def test_a_damaged_image_in_a_streamed_folder_is_one_line(tmp_path):
    folder = make_folder(tmp_path / "shapes", per_class=4, test_per_class=1, size=8)
    (folder / "train" / "circle" / "0001.png").write_bytes(lying_png(8, 8, bytes(10)))
    code, err = cli("train", "--dataset", "folder", "--data", folder, "--no-in-memory", "--image-size", "8",
                    "--resize", "8", "--workers", "0", "--epochs", "1", "--batch-size", "4", "--val-size", "0",
                    "--depth", "10", "--growth-rate", "6", "--no-progress")
    one_line_error(code, err, "0001.png is not a readable image")
