"""Activation memory of a training step, measured without running it: the network runs on the meta
device (shapes only, no data, no time) while a dispatch mode keeps account of every tensor allocated
and freed. What is still alive when the forward pass ends is what the backward pass needs: the
activation memory that grows with depth and batch size (parameters and the input excluded).

The dispatch mode, the flattening of an operator's outputs and the key of a storage are private
PyTorch APIs (models._torch_compat). Without the dispatch mode, tensors are counted as torch
functions return them (TorchFunctionMode, public): the tensors an operator allocates inside itself
and frees or keeps unseen are missed, a few percent of a DenseNet's total.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..models import _torch_compat


class LiveTensorBytes:
    """Bytes of tensor storage alive now, and at peak, among tensors created under this mode;
    each storage is attributed to the stage that was running when it was allocated. The accounting;
    `live_tensor_bytes()` makes the mode that feeds it (a dispatch mode, or a function mode)."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, int] = {}
        self._size: dict[int, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.stage = "other"

    def _returned(self, out):
        for t in _torch_compat.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = _torch_compat.storage_key(storage)  # one key per storage, shared by all of its views
        if key not in self._refs:
            self._refs[key] = 0
            self._size[key] = (storage.nbytes(), self.stage)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)  # PyTorch keeps a tensor's Python object alive with it

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._size.pop(key)[0]

    def live_by_stage(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for size, stage in self._size.values():
            out[stage] += size
        return dict(out)


class _FunctionLevelBytes(LiveTensorBytes, TorchFunctionMode):
    """LiveTensorBytes fed by the tensors torch functions return (the fallback without a dispatch mode)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self._returned(func(*args, **(kwargs or {})))


_dispatch_level: dict[type, type] = {}  # TorchDispatchMode -> LiveTensorBytes fed by it, made once


def live_tensor_bytes() -> LiveTensorBytes:
    """A LiveTensorBytes mode: fed by every tensor an operator returns (a dispatch mode) or, where
    PyTorch's dispatch mode is unavailable, by every tensor a torch function returns."""
    base = _torch_compat.get("python_dispatch")
    if base is not None:
        try:
            return _dispatch_level_class(base)()
        except Exception as exc:  # its first use
            _torch_compat.failed("python_dispatch", exc)
    return _FunctionLevelBytes()


def _dispatch_level_class(base: type) -> type:
    cls = _dispatch_level.get(base)
    if cls is None:
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return self._returned(func(*args, **(kwargs or {})))

        cls = type("DispatchLevelBytes", (LiveTensorBytes, base), {
            "__torch_dispatch__": __torch_dispatch__, "__module__": __name__,
            "__doc__": "LiveTensorBytes fed by every tensor an operator returns (a dispatch mode)."})
        _dispatch_level[base] = cls
    return cls


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's stages in order: the children of `features` (stem, blocks, transitions, final
    norm) followed by the other top-level modules (classifier); for other networks, top-level children."""
    features = getattr(model, "features", None)
    out = []
    for name, child in model.named_children():
        if child is features and isinstance(features, nn.Sequential):
            out += [(f"features.{n}", c) for n, c in features.named_children()]
        else:
            out.append((name, child))
    return out


def activation_memory(model: nn.Module, input_size: tuple[int, int, int], batch_size: int,
                      dtype: torch.dtype = torch.float32) -> dict:
    """Bytes kept for the backward pass by one training step at `batch_size`, total and per stage,
    and the peak during the forward pass. `model` may live on any device: a meta copy is measured, each
    dense block on the path `fused="auto"` takes on the model's own device (FUSED_BY_DEVICE; the CPU's for
    a model built on the meta device)."""
    import copy

    from ..models.fused import policy

    device = next(model.parameters(), torch.empty(0)).device
    if device.type == "meta":  # a model built on the meta device (profile) has no device: the CPU's path
        device = torch.device("cpu")
    with torch.device("meta"):
        meta = copy.deepcopy(model).to("meta", dtype=dtype).train()
        x = torch.empty((batch_size, *input_size), dtype=dtype)
    for m in meta.modules():
        if getattr(m, "fused", None) == "auto":
            m.fused = policy.default_fused(device)
    tracker = live_tensor_bytes()
    hooks = []
    for name, module in stages(meta):
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: setattr(tracker, "stage", name)))
    try:
        with tracker:
            y = meta(x)  # keeps the graph, and with it the saved activations, alive while we count
        by_stage = tracker.live_by_stage()
        by_stage.pop("other", None)
        total = sum(by_stage.values())
    finally:
        for h in hooks:
            h.remove()
    del y
    return {"total_bytes": total, "peak_forward_bytes": tracker.peak, "by_stage": by_stage}
