"""Export a model for serving: ONNX (onnxruntime, TensorRT, ...), TorchScript (libtorch) or an
AOTInductor package (compiled ahead of time for this machine's CPU; `densenet.compiled`), with a dynamic
batch size, checked against PyTorch.

The exported graph computes the dense blocks as the paper's equation reads (concatenate, BN, ReLU,
convolution): the fused block's shared buffer and custom autograd nodes are a training-time
optimisation of the same function that tracers cannot record. Height and width are those of the
checkpoint's preprocessing; the batch dimension is dynamic. The class names and the preprocessing go
into the file (ONNX metadata_props; TorchScript extra file `densenet.json`; the AOTInductor package's
metadata, read with `torch._inductor.aoti_load_package(path).get_metadata()`), so a server needs nothing else.

Parity: the exported model and the PyTorch model (in eval mode, its own fused path) run the same
random batches of 2 and of 3 images, two sizes so that the batch dimension is shown to be dynamic; the
largest absolute difference of their logits must be at most `tolerance`. ONNX files run in onnxruntime
where it is installed (otherwise the check is skipped and says so); TorchScript files are loaded back
with torch.jit.load, AOTInductor packages with torch._inductor.aoti_load_package. `format_report` writes the report (export_model's, export_checkpoint's) as
`densenet export` prints it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .utils.atomic import atomic_write, check_destination

FORMATS = ("onnx", "torchscript", "aoti")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "aoti": ".pt2"}
PARITY_BATCHES = (2, 3)
INPUT, OUTPUT = "input", "logits"


def reference_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose dense blocks take the reference (traceable) path.

    Kept for compatibility; the package exports within `densenet.models.reference_path()`, which
    needs no copy."""
    from .models.densenet import DenseBlock

    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, DenseBlock):
            m.fused = False
    return ref


def export_model(model: nn.Module, out: str | Path, format: str, input_size: tuple[int, int, int],
                 metadata: dict[str, Any] | None = None, *, onnx_exporter: str = "auto",
                 tolerance: float = 1e-4, opset: int | None = None) -> dict[str, Any]:
    """Write `model` (taking (B, *input_size) float inputs) to `out` in `format`; return a report:
    {"path", "format", "exporter", "input", "output", "parity": {"runtime", "max_abs_diff", "ok", ...}}.

    `onnx_exporter`: "dynamo" (torch.export-based; needs onnxscript), "legacy" (TorchScript-based,
    deprecated by PyTorch) or "auto" (dynamo where onnxscript is installed). `opset`: the ONNX opset
    to target (default: the exporter's), for runtimes that read only older ones."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    from .train.checkpoint import refuse_run_file

    refuse_run_file(out, "--out")
    if Path(out).is_dir():
        raise ValueError(f"--out {out} is a directory: give the file to write, e.g. {Path(out) / ('model' + SUFFIXES[format])}")
    if format == "aoti" and Path(out).suffix != ".pt2":
        raise ValueError(f"--out {out}: an AOTInductor package's name must end in .pt2 (its loader reads the format "
                         f"from the suffix), e.g. {Path(out).with_suffix('.pt2')}")
    check_destination(out, "--out")  # a FIFO or a device (/dev/null): refused before the export's work
    if opset is not None and (format != "onnx" or isinstance(opset, bool) or not isinstance(opset, int)
                              or not 7 <= opset <= 30):
        raise ValueError(f"opset {opset!r}: an ONNX opset number (e.g. 17), for --format onnx only")
    out = Path(out)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model stays where and as it is
    ref = model  # exported within reference_path(): the traceable path
    g = torch.Generator().manual_seed(0)
    example = torch.randn(PARITY_BATCHES[0], *input_size, generator=g)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    if format == "aoti":
        from .compiled import compile_package

        with _interrupts_kept():
            compile_package(model, input_size, out, {**(metadata or {}), "input_size": list(input_size)})
        exporter = f"AOTInductor (torch {torch.__version__})"
    else:
        exporter = _export_file(ref, example, out, format, onnx_exporter, meta, opset)
    report = {"path": str(out), "format": format, "exporter": exporter,
              "input": {"name": INPUT, "shape": ["batch", *input_size], "dtype": "float32"},
              "output": {"name": OUTPUT, "shape": ["batch", _num_outputs(model, example)]}}
    report["parity"] = _parity(model, out, format, input_size, g, tolerance)
    return report


def _export_file(ref: nn.Module, example: torch.Tensor, out: Path, format: str, onnx_exporter: str,
                 meta: dict[str, str], opset: int | None) -> str:
    """Write ONNX or TorchScript (atomically); the exporter's name."""
    from .models import reference_path

    with atomic_write(out, "--out") as tmp, reference_path():
        if format == "onnx":
            exporter = _export_onnx(ref, example, tmp, onnx_exporter, meta, opset)
        else:
            exporter = "torch.jit.trace"
            with warnings.catch_warnings(), torch.no_grad():
                # deprecated in favour of torch.export, and the input checks trace as constants: expected
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(ref, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={"densenet.json": json.dumps(meta)})
    return exporter


def export_checkpoint(checkpoint: str | Path, out: str | Path, format: str, which: str | None = None,
                      **kwargs: Any) -> dict[str, Any]:
    """Export a model trained by this package (a run directory: its protocol's checkpoint, or `which`),
    at the image size and channels of its preprocessing, with its class names and preprocessing as
    metadata. The report's "checkpoint" names what was exported."""
    from .saved_model import load_model

    model, info = load_model(checkpoint, which=which)
    pre = info.get("preprocessing")
    if not pre:
        raise ValueError(f"{checkpoint} holds no preprocessing (not written by `densenet train`): "
                         f"use densenet.export.export_model with an input size")
    size = (int(pre["channels"]), *map(int, pre["image_size"]))
    # a "pixel" or "zca" model's input statistics are a file of the run (data/normalization.py): it goes
    # beside the export, named in its preprocessing, so that the export is complete without the run
    from .data.normalization import file_sha256, normalization_path

    c = info["checkpoint"]
    stats = normalization_path(pre, c.file)
    sidecar = None
    if stats is not None:
        sidecar = Path(out).with_name(Path(out).stem + ".normalization.safetensors")
        if pre.get("normalization_sha256") not in (None, file_sha256(stats)):
            raise ValueError(f"{stats} is not the normalisation this checkpoint was trained with (its SHA-256 "
                             f"differs from the one in the checkpoint's preprocessing)")
        pre = {**pre, "normalization_file": sidecar.name}
    metadata = {"densenet.model": info["model"], "densenet.model_args": info["model_args"],
                "densenet.classes": info.get("classes"), "densenet.preprocessing": pre}
    report = export_model(model, out, format, size, metadata, **kwargs)
    if sidecar is not None:
        from .utils.atomic import atomic_write

        with atomic_write(sidecar, "the normalisation beside the export") as tmp:
            Path(tmp).write_bytes(stats.read_bytes())
        report["normalization"] = {"path": str(sidecar), "normalize": pre["normalize"]}
    report["checkpoint"] = {"file": str(c.file), "model": info["model"], "which": c.which, "epoch": c.epoch,
                            "why": c.why}
    return report


def format_report(r: dict[str, Any]) -> str:
    """An export's report as `densenet export` prints it: the file written, its input and output, and
    the parity check's outcome."""
    shape = lambda s: "(" + ", ".join(map(str, s)) + ")"  # noqa: E731
    fmt = {"onnx": "ONNX", "torchscript": "TorchScript", "aoti": "AOTInductor package"}[r["format"]]
    parity = r["parity"]
    lines = [f"wrote {r['path']}: {fmt} by {r['exporter']}; input \"{r['input']['name']}\" "
             f"{shape(r['input']['shape'])} float32 -> \"{r['output']['name']}\" {shape(r['output']['shape'])}"]
    if parity["ok"] is None:
        lines.append(f"parity with PyTorch: not checked ({parity['note']})")
    else:
        diffs = ", ".join(f"{d:.2e} at batch {b}" for b, d in parity["max_abs_diff"].items())
        lines.append(f"parity with PyTorch ({parity['runtime']}): max |logit difference| {diffs} "
                     f"(tolerance {parity['tolerance']:.0e}): {'ok' if parity['ok'] else 'FAILED'}")
    if r.get("normalization"):
        lines.append(f"wrote {r['normalization']['path']}: the {r['normalization']['normalize']} normalisation "
                     f"the input needs (fitted on the training images; named in the preprocessing metadata)")
    return "\n".join(lines)


def _num_outputs(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(example[:1]).shape[1])


@contextlib.contextmanager
def _interrupts_kept():
    """Re-raise a Ctrl-C that torch.export wrapped into its own error (TorchExportError, "from" the
    KeyboardInterrupt) as the KeyboardInterrupt it was: the command then exits 130, "interrupted"."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        raise


def _export_onnx(ref: nn.Module, example: torch.Tensor, path: Path, exporter: str, meta: dict[str, str],
                 opset: int | None = None) -> str:
    if importlib.util.find_spec("onnx") is None:
        raise ValueError("ONNX export needs the onnx package: pip install 'densenet-paper[export]'")
    import onnx

    if exporter == "auto":
        exporter = "dynamo" if importlib.util.find_spec("onnxscript") is not None else "legacy"
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"onnx_exporter must be auto, dynamo or legacy, got {exporter!r}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ValueError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript (or use legacy)")
    with warnings.catch_warnings(), torch.no_grad(), _interrupts_kept():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        if exporter == "dynamo":
            torch.onnx.export(ref, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                              input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        else:
            torch.onnx.export(ref, (example,), str(path), dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset)
    proto = onnx.load(str(path))
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return f"torch.onnx ({exporter}), opset {max(o.version for o in proto.opset_import if o.domain in ('', 'ai.onnx'))}"


def _parity(model: nn.Module, path: Path, format: str, input_size, g: torch.Generator, tolerance: float) -> dict:
    """Largest |logit difference| between PyTorch and the exported file, per batch size."""
    if format == "onnx":
        if importlib.util.find_spec("onnxruntime") is None:
            return {"runtime": None, "ok": None, "note": "onnxruntime is not installed: parity not checked"}
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runtime = f"onnxruntime {ort.__version__}"

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {INPUT: x.numpy()})[0])
    elif format == "aoti":
        from .compiled import load_package

        runtime, run = f"torch._inductor.aoti_load_package (torch {torch.__version__})", load_package(path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; still what libtorch loads
            loaded = torch.jit.load(str(path))
        runtime, run = f"torch.jit.load (torch {torch.__version__})", loaded
    diffs = {}
    for batch in PARITY_BATCHES:
        x = torch.randn(batch, *input_size, generator=g)
        with torch.no_grad():
            expected, got = model(x), run(x)
        if got.shape != expected.shape:
            raise ValueError(f"the exported model returned shape {tuple(got.shape)} for a batch of {batch}, "
                             f"PyTorch {tuple(expected.shape)}")
        diffs[batch] = float((got - expected).abs().max())
    return {"runtime": runtime, "max_abs_diff": diffs, "tolerance": tolerance,
            "ok": all(d <= tolerance for d in diffs.values())}


__all__ = ["FORMATS", "export_checkpoint", "export_model", "reference_copy"]
