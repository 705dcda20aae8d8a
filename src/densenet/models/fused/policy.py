"""Which path a dense block takes: the fused one where it was measured faster (`FUSED_BY_DEVICE`,
fused="auto"), the reference one within `reference_path()` and while tracing, and wherever the fused
path does not cover the block's modules or lacks a private PyTorch API it needs (`supported`)."""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn as nn

from .. import _torch_compat

# Which path `fused="auto"` (the default) takes on each kind of device: the one measured faster there.
# cpu: the fused path: training throughput 1.5-1.9x torchvision NCHW (1.4-1.5x channels_last) on a 2-core
# Intel Xeon (Sapphire Rapids), 1.3-1.6x NCHW (1.1-1.3x channels_last) on a 2-core AMD EPYC Zen 4 with
# AVX-512 and with AVX2 only (BENCHMARKS_HISTORY.md, "Results" and "Third pass").
# cuda: the reference path (torch's own modules, cuDNN kernels) until a GPU has measured the fused one:
# no GPU has run it yet. Its CUDA calls are checked without a GPU (tests/test_fused_cuda_contract.py)
# and `fused=True` opts in; benchmarks/gpu_check.py measures both and prints the entry to set here.
# Devices not listed (mps, xpu, ...) take the reference path too: only a measurement puts one on the
# fused path.
FUSED_BY_DEVICE: dict[str, bool] = {"cpu": True, "cuda": False}


# True inside `reference_path()`: a context variable, so it holds for the thread (or asyncio task) that
# entered the context and no other: an export in one thread never moves another thread's training
_REFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("densenet_reference_path", default=False)


@contextlib.contextmanager
def reference_path():
    """Within this context, every DenseBlock (of every model) run by this thread takes the reference
    path: the paper's concatenate-BN-ReLU-convolution in standard modules, as fused=False computes it.
    The one way to choose it for a model built fused: counting multiply-adds (analysis.complexity) and
    exporting (export.py) use it. Tracing (torch.jit.trace, the TorchScript-based ONNX exporter) takes
    it automatically: the fused path's autograd Functions and shared buffer are not traceable."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def reference_path_active() -> bool:
    """Whether dense blocks take the reference path now, in this thread (`reference_path()`, or tracing)."""
    return _REFERENCE.get() or torch.jit.is_tracing()


def default_fused(device: torch.device) -> bool:
    """Whether fused="auto" takes the fused path on `device` (FUSED_BY_DEVICE; False where unmeasured)."""
    return FUSED_BY_DEVICE.get(torch.device(device).type, False)


def supported(layers) -> bool:
    """The fused path covers plain affine BatchNorm2d with running statistics (SyncBatchNorm and
    other replacements take the reference path, which calls the modules). Eager, it also needs two
    private PyTorch APIs (models._torch_compat; without either, a warning, once, and the reference
    path): the version counter, which refuses a block output modified in place before backward, and,
    where autograd records the block, the id of the backward pass, which starts a second pass over
    the same graph from a fresh gradient buffer. (Under torch.compile the block is traced as plain
    operations, `dense_block_traceable`, which needs neither.)"""
    if not all(_plain_bn(layer.norm1) for layer in layers):
        return False
    if torch.compiler.is_compiling():
        return True
    return _torch_compat.available("tensor_version") \
        and (not torch.is_grad_enabled() or _torch_compat.available("graph_task_id"))


def _plain_bn(bn) -> bool:
    return type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats

