"""Activation memory of a training step, measured without running it: the network runs on the meta
device (shapes only, no data, no time) while a dispatch mode keeps account of every tensor allocated
and freed. What is still alive when the forward pass ends is what the backward pass needs: the
activation memory that grows with depth and batch size (parameters and the input excluded).
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive now, and at peak, among tensors created under this mode;
    each storage is attributed to the stage that was running when it was allocated."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, int] = {}
        self._size: dict[int, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.stage = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # one key per storage, shared by all of its views
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

    from ..models import _fused

    device = next(model.parameters(), torch.empty(0)).device
    if device.type == "meta":  # a model built on the meta device (profile) has no device: the CPU's path
        device = torch.device("cpu")
    with torch.device("meta"):
        meta = copy.deepcopy(model).to("meta", dtype=dtype).train()
        x = torch.empty((batch_size, *input_size), dtype=dtype)
    for m in meta.modules():
        if getattr(m, "fused", None) == "auto":
            m.fused = _fused.default_fused(device)
    tracker = LiveTensorBytes()
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
