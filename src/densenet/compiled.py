"""Compiled inference: a model ahead-of-time compiled by AOTInductor, in this process or as a file that
needs no Python package of ours (`densenet export --format aoti`).

`optimize(model, input_size)` exports the model in eval mode with `torch.export` (the dense blocks take
the reference path, the paper's concatenate-BN-ReLU-convolution, which tracers record), compiles it with
Inductor's freezing (the weights become constants: each bottleneck's BN2 folds into its 1x1
convolution, the convolutions' weights are packed once for oneDNN, BN1-ReLU fuses into one pass over
the concatenated input) and AOTInductor's C++ wrapper (no Python between the kernels), and loads the
result. The batch dimension stays dynamic; the image size is fixed at the one given. Outputs are checked
against the eager model at compile time (`tolerance`, absolute, on the logits).

`compile_package` writes the same compilation as an AOTInductor package (`.pt2`), with the class names and
the preprocessing as its metadata (strings, JSON where not one); `torch._inductor.aoti_load_package(path)`
loads it in any process with PyTorch (of the same version), and libtorch's
`torch::inductor::AOTIModelPackageLoader` from C++. The package is built for this machine's processor
(its instruction set is recorded in the metadata as AOTI_CPU_ISA): compile it where it will run.

Compilation takes from tens of seconds (a small CIFAR network) to minutes (DenseNet-121) on two cores;
`OptimizedModel.compile_seconds` reports it. BENCHMARKS.md has the speed against eager and onnxruntime.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

PARITY_BATCHES = (2, 3)  # two sizes: the batch dimension is shown to be dynamic
METADATA_KEY = "densenet.metadata"  # the package's metadata entry that holds this package's metadata, JSON


def _aoti_available() -> str | None:
    """Why AOTInductor cannot compile here, or None."""
    import shutil

    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        return f"torch {torch.__version__} has no AOTInductor packaging: PyTorch 2.6 or later is needed"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "AOTInductor compiles C++: no C++ compiler (g++, c++, clang++) is on PATH; install one (apt-get install g++)"
    return None


def _check_model(model: nn.Module, input_size) -> tuple[int, ...]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    size = tuple(int(s) for s in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if devices - {"cpu"}:
        raise ValueError(f"compiled inference runs on the CPU; the model is on {', '.join(sorted(devices))}: "
                         f"move it with model.cpu()")
    return size


def compile_package(model: nn.Module, input_size, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Compile `model` (in eval mode, for float32 inputs of shape (B, *input_size)) into the AOTInductor
    package `path` (a `.pt2` file, written whole or not at all). `metadata`: strings (other values are
    written as JSON) readable with `aoti_load_package(path).get_metadata()`; all of it is also stored as one
    JSON object under "densenet.metadata"."""
    why = _aoti_available()
    if why:
        raise RuntimeError(why)
    size = _check_model(model, input_size)
    from .models import reference_path
    from .utils.atomic import atomic_write

    model = copy.deepcopy(model).cpu().float().eval()  # the caller's model stays as it is
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta[METADATA_KEY] = json.dumps(metadata or {})
    example = torch.randn(PARITY_BATCHES[0], *size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad(), reference_path(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's notes on the dynamic dimension's specialisation
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    path = Path(path)
    with atomic_write(path, "--out") as tmp:
        # AOTInductor picks the format by the suffix: the temporary file must end in .pt2
        with tempfile.TemporaryDirectory() as d:
            staged = Path(d) / "model.pt2"
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(staged),
                inductor_configs={"freezing": True, "aot_inductor.metadata": meta})
            Path(tmp).write_bytes(staged.read_bytes())
    return path


class OptimizedModel:
    """A compiled model: call it with a float32 CPU batch (B, C, H, W) of the compiled image size; it returns
    the logits. `compile_seconds`, `max_abs_diff` (against eager, per parity batch size) and `metadata`
    describe it; `classes` is kept from the model it was compiled from, where that had them."""

    def __init__(self, runner, input_size: tuple[int, ...], compile_seconds: float, path: Path | None = None):
        self._runner = runner
        self.input_size = input_size
        self.compile_seconds = compile_seconds
        self.path = path
        self.max_abs_diff: dict[int, float] = {}
        self.classes: list[str] | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self._runner.get_metadata().get(METADATA_KEY, "{}"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.input_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"the compiled model takes (batch, {', '.join(map(str, self.input_size))}) "
                             f"tensors, got {shape}")
        if x.device.type != "cpu":
            raise ValueError(f"the compiled model runs on the CPU, the input is on {x.device}")
        # the compiled kernels index the example's strides: contiguous NCHW float32, whatever came in
        return self._runner(x.to(torch.float32).contiguous())

    def __repr__(self) -> str:
        return (f"OptimizedModel(input_size={self.input_size}, AOTInductor, compiled in "
                f"{self.compile_seconds:.1f} s)")


def load_package(path: str | Path) -> OptimizedModel:
    """An AOTInductor package written by `compile_package` (or `densenet export --format aoti`), loaded for
    inference; its metadata's preprocessing fixes the input size."""
    runner = torch._inductor.aoti_load_package(str(path))
    meta = json.loads(runner.get_metadata().get(METADATA_KEY, "{}"))
    size = tuple(int(s) for s in meta.get("input_size", ()))
    if len(size) != 3:
        raise ValueError(f"{path}: no input size in its metadata (not written by densenet's compile_package)")
    m = OptimizedModel(runner, size, 0.0, Path(path))
    m.classes = meta.get("densenet.classes")
    return m


def parity(model: nn.Module, run, input_size, tolerance: float) -> dict[int, float]:
    """Largest |logit difference| between `model` (eval, no_grad) and `run` on random batches of each
    PARITY_BATCHES size; a ValueError where one is above `tolerance`."""
    g = torch.Generator().manual_seed(1)
    diffs = {}
    was_training = model.training
    model.eval()
    try:
        for b in PARITY_BATCHES:
            x = torch.randn(b, *input_size, generator=g)
            with torch.no_grad():
                want, got = model(x), run(x)
            if got.shape != want.shape:
                raise ValueError(f"the compiled model returned shape {tuple(got.shape)} for a batch of {b}, "
                                 f"PyTorch {tuple(want.shape)}")
            diffs[b] = float((got - want).abs().max())
    finally:
        model.train(was_training)
    worst = max(diffs.values())
    if worst > tolerance:
        raise ValueError(f"the compiled model's logits differ from eager by {worst:.2e} (tolerance {tolerance:.0e})")
    return diffs


def optimize(model: nn.Module, input_size=None, *, tolerance: float = 1e-4) -> OptimizedModel:
    """`model` compiled for CPU inference by AOTInductor (see the module's docstring): call the result as
    the model. `input_size`: (channels, height, width); by default the model's `preprocessing` (a model
    loaded with `densenet.load`) or its default_cfg's input_size (a registered model). The outputs are
    checked against the eager model on batches of 2 and 3 (a ValueError above `tolerance`)."""
    size = input_size if input_size is not None else _input_size(model)
    size = _check_model(model, size)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = compile_package(model, size, Path(d) / "model.pt2", {"input_size": list(size)})
        runner = torch._inductor.aoti_load_package(str(path))  # loaded: the file may go
    out = OptimizedModel(runner, size, time.perf_counter() - start)
    out.max_abs_diff = parity(model, out, size, tolerance)
    out.classes = getattr(model, "classes", None)
    return out


def _input_size(model: nn.Module) -> tuple[int, ...]:
    pre = getattr(model, "preprocessing", None)
    if isinstance(pre, dict) and "image_size" in pre:
        return (int(pre["channels"]), *map(int, pre["image_size"]))
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    raise ValueError("the model carries no input size: give input_size=(channels, height, width)")


__all__ = ["OptimizedModel", "compile_package", "load_package", "optimize"]
