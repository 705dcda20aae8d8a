"""`densenet export`: ONNX and TorchScript files with a dynamic batch size that compute what PyTorch
computes (onnxruntime and torch.jit.load, batches of 2 and 3 in the command, other sizes here)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import densenet
import densenet.export
from densenet.cli import main

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run["run"]


def export_json(capsys, *argv) -> dict:
    assert main(["export", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
@pytest.mark.parametrize("exporter", [
    pytest.param("dynamo", marks=pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="onnxscript is not installed")),
    "legacy"])
def test_onnx_export_matches_pytorch_at_any_batch_size(run, tmp_path, capsys, exporter):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    report = export_json(capsys, run, "--format", "onnx", "--out", out, "--onnx-exporter", exporter)
    parity = report["parity"]
    assert parity["runtime"].startswith("onnxruntime") and parity["ok"] is True
    assert set(parity["max_abs_diff"]) == {"2", "3"} and max(parity["max_abs_diff"].values()) <= 1e-4
    assert exporter in report["exporter"] and report["input"]["shape"] == ["batch", 3, 12, 12]

    model, transform = densenet.load(run)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # symbolic: any batch size
    for batch in (1, 5):
        x = torch.randn(batch, 3, 12, 12)
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            assert (got - model(x)).abs().max() <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["densenet.classes"]) == model.classes
    assert json.loads(meta["densenet.preprocessing"])["image_size"] == [12, 12]


def test_torchscript_export_matches_pytorch_at_any_batch_size(run, tmp_path, capsys):
    out = tmp_path / "model.pt"
    report = export_json(capsys, run, "--format", "torchscript", "--out", out)
    assert report["parity"]["ok"] is True and max(report["parity"]["max_abs_diff"].values()) <= 1e-4
    extra = {"densenet.json": ""}
    with pytest.warns(FutureWarning):  # TorchScript is deprecated by PyTorch, still what libtorch loads
        loaded = torch.jit.load(str(out), _extra_files=extra)
    model, _ = densenet.load(run)
    assert json.loads(json.loads(extra["densenet.json"])["densenet.classes"]) == model.classes
    for batch in (1, 4):
        x = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            assert (loaded(x) - model(x)).abs().max() <= 1e-4


def test_export_prints_shapes_and_parity(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'm.pt'}: TorchScript by torch.jit.trace; input \"input\" "
                               f"(batch, 3, 12, 12) float32 -> \"logits\" (batch, 3)")
    assert lines[1].startswith("parity with PyTorch (torch.jit.load") and "at batch 2" in lines[1] \
        and "at batch 3" in lines[1] and lines[1].endswith(": ok")


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed")
def test_imagenet_topology_exports_through_the_python_api(tmp_path):
    model = densenet.create_model("densenet121", block_config=(1, 2, 1, 1), growth_rate=8, num_classes=5)
    report = densenet.export.export_model(model, tmp_path / "m.onnx", "onnx", (3, 40, 48))
    assert report["parity"]["ok"] is True and report["output"]["shape"] == ["batch", 5]
    assert model.training and model.features.denseblock1.fused  # the caller's model is left as it was


def test_export_errors(run, tmp_path, capsys, monkeypatch):
    assert main(["export", str(tmp_path / "none"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a usage error
        main(["export", str(run), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert e.value.code == 2
    real = densenet.export.export_checkpoint
    monkeypatch.setattr(densenet.export, "export_checkpoint",
                        lambda *a, **kw: real(*a, **kw, tolerance=-1.0))  # any difference fails the check
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].endswith(": FAILED") and "differs from PyTorch" in captured.err
