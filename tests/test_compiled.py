"""Compiled inference (densenet.compiled): `densenet.optimize` and `predict --compile` compute what the eager
model computes, and `densenet export --format aoti` writes a package that a process without this package
loads and runs to the same logits. Each compilation takes ~15-30 s on 2 cores: one per test, on the
shared tiny run (DenseNet-BC, L=10, k=6, 12x12 images)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import densenet
from densenet.cli import main
from densenet.compiled import _aoti_available

pytestmark = pytest.mark.skipif(_aoti_available() is not None, reason=str(_aoti_available()))

# Runs in a fresh interpreter where `import densenet` fails: only torch reads the package.
LOAD_WITHOUT_DENSENET = r"""
import json, sys
sys.modules["densenet"] = None  # an import of this package now raises ImportError
import torch
package, inputs = sys.argv[1], torch.load(sys.argv[2])
runner = torch._inductor.aoti_load_package(package)
meta = runner.get_metadata()
with torch.no_grad():
    out = {str(b): runner(x) for b, x in inputs.items()}
torch.save(out, sys.argv[3])
print(json.dumps({"classes": json.loads(meta["densenet.classes"]),
                  "preprocessing": json.loads(meta["densenet.preprocessing"]),
                  "modules": sorted(m for m, v in sys.modules.items() if m.startswith("densenet") and v is not None)}))
"""


def test_aoti_export_runs_without_the_package(tiny_run, tmp_path, capsys):
    run = tiny_run["run"]
    out = tmp_path / "model.pt2"
    assert main(["export", str(run), "--format", "aoti", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "aoti" and report["exporter"].startswith("AOTInductor")
    assert report["parity"]["ok"] is True and max(report["parity"]["max_abs_diff"].values()) <= 1e-4
    assert report["input"]["shape"] == ["batch", 3, 12, 12]

    model, transform = densenet.load(run)
    g = torch.Generator().manual_seed(3)
    inputs = {b: torch.randn(b, 3, 12, 12, generator=g) for b in (1, 5)}  # other sizes than the parity check's
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DENSENET, str(out), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["modules"] == []  # nothing of this package was imported
    assert seen["classes"] == model.classes
    assert seen["preprocessing"]["image_size"] == list(transform.image_size)
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        for b, x in inputs.items():
            assert (outputs[str(b)] - model(x)).abs().max() <= 1e-4


def test_optimize_and_predict_compile_match_eager(tiny_run, capsys):
    run, folder = tiny_run["run"], tiny_run["folder"]
    images = str(folder / "test")
    assert main(["predict", str(run), images, "--json", "--top-k", "3"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main(["predict", str(run), images, "--json", "--top-k", "3", "--compile", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "compiled in" in captured.err
    compiled = json.loads(captured.out)
    assert [r["path"] for r in compiled] == [r["path"] for r in eager]
    for a, b in zip(eager, compiled):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert max(abs(p["probability"] - q["probability"]) for p, q in zip(a["predictions"], b["predictions"])) < 1e-5

    model, _ = densenet.load(run)
    fast = densenet.optimize(model, (3, 12, 12))  # the same graph: Inductor's cache makes this one quick
    assert fast.classes == model.classes and max(fast.max_abs_diff.values()) <= 1e-4
    x = torch.randn(7, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
        assert (fast(x) - want).abs().max() <= 1e-4
        assert (fast(x.to(memory_format=torch.channels_last)) - want).abs().max() <= 1e-4  # any strides
        assert (fast(x.double()) - want).abs().max() <= 1e-4  # any float dtype: computed in float32
    with pytest.raises(ValueError, match=r"takes \(batch, 3, 12, 12\) tensors, got \(2, 3, 8, 8\)"):
        fast(torch.randn(2, 3, 8, 8))


def test_compile_errors(tiny_run, tmp_path, capsys):
    from densenet.compiled import optimize

    with pytest.raises(ValueError, match="input_size must be"):
        optimize(torch.nn.Linear(2, 2), (3, 12))
    with pytest.raises(ValueError, match="carries no input size"):
        optimize(torch.nn.Linear(2, 2))
    assert main(["export", str(tiny_run["run"]), "--format", "aoti", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "must end in .pt2" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
