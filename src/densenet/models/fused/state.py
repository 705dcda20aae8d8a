"""A fused block's state: the buffer that holds x_0 ... x_L side by side, their batch statistics, the
gradient buffer of the backward pass and the scratch memory kept from step to step (`ScratchPool`,
`_BlockState`), and what a block hands the transition after it (`HandOver`)."""
from __future__ import annotations

import torch

from ... import options
from .. import _torch_compat
from .kernels import _acc_dtype, _var_mean

# Debug mode: check invariants the fused backward relies on (the backward order of a block's nodes)
# at every node. On with DENSENET_DEBUG_FUSED=1 (tests/conftest.py sets it), or by setting this flag.
DEBUG: bool = options.flag("DENSENET_DEBUG_FUSED", False)


class ScratchPool:
    """Scratch memory of one block kept from step to step: the workspaces and the gradient buffer.

    A fresh tensor of tens of MB costs page faults on first touch on the CPU (glibc returns large
    blocks to the system when they are freed), which measured slower than the work done in it
    (BENCHMARKS.md). A state takes what it needs and gives it back when the block's backward pass
    (or its forward pass, without autograd) is over; two states alive at once simply allocate.
    Only on the CPU: on a GPU PyTorch's caching allocator reuses freed blocks without page faults, and
    memory held here between steps would count against the next step's peak.

    Owned by the block (`DenseBlock`, not a buffer: not in its state_dict, not copied or pickled with
    it); `release()` (`DenseBlock.release_scratch`, also on `.eval()`) gives the memory back."""

    def __init__(self):
        self.free: dict[tuple, torch.Tensor] = {}

    def __reduce__(self):  # copy.deepcopy and pickle: an empty pool, not the scratch tensors
        return (ScratchPool, ())

    def release(self) -> None:
        """Drop the kept scratch tensors (the next training step allocates them again)."""
        self.free.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.free.values())

    def take(self, kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        t = self.free.pop((kind, dtype, device), None)
        if t is None or t.numel() < numel:
            t = torch.empty(numel, dtype=dtype, device=device)
        return t

    def give(self, kind: str, t: torch.Tensor) -> None:
        if t.is_inference() or t.device.type != "cpu":  # inference tensors: unusable by a later training step
            return
        key = (kind, t.dtype, t.device)
        if key not in self.free or self.free[key].numel() < t.numel():
            self.free[key] = t


class _BlockState:
    """What the autograd nodes of one dense block share."""

    __slots__ = ("out", "buf", "n", "mean", "var", "grad", "dmean", "dvar", "version", "_ws", "pool", "_grad_flat",
                 "nodes", "backward_seq", "backward_task")

    def __init__(self, x0: torch.Tensor, channels: int, batch_stats: bool, pool: ScratchPool):
        b, _, h, w = x0.shape
        # the block's output (B, C, H, W), laid out channel-major; buf is the same memory as (C, B, H, W)
        self.out = torch.empty_strided((b, channels, h, w), (h * w, b * h * w, w, 1), dtype=x0.dtype,
                                       device=x0.device)
        self.buf = self.out.permute(1, 0, 2, 3)  # x_0 ... x_L, one contiguous (k, B, H, W) slab each
        self.n = b * h * w
        acc = _acc_dtype(x0.dtype)
        stats = (lambda: torch.empty(channels, device=x0.device, dtype=acc)) if batch_stats else (lambda: None)
        self.mean, self.var = stats(), stats()  # batch statistics per channel (biased variance)
        self.grad = self.dmean = self.dvar = None  # filled by the backward pass
        self.version = 0
        self._ws = {}  # name -> flat scratch tensor taken from the pool
        self.pool = pool
        self._grad_flat = None
        self.nodes = 0  # autograd nodes created on this state, numbered in creation order (`new_node`)
        self.backward_seq = None  # the number of the node that ran backward last in this backward pass
        self.backward_task = None  # autograd's id of that backward pass

    def new_node(self) -> int:
        self.nodes += 1
        return self.nodes

    def enter_backward(self, seq: int, node) -> None:
        """Node number `seq` starts its backward pass. A new backward pass over the block's graph
        (retain_graph=True) starts from a fresh gradient buffer, also when the last one ended early
        (autograd.grad of a later layer's weight, a frozen first layer). In debug mode (DEBUG), checks
        that within one pass the nodes run in the reverse order of their creation."""
        task = _graph_task_id()
        if task != self.backward_task:
            self.end_backward()
            self.backward_task = task
        elif DEBUG and self.backward_seq is not None and seq >= self.backward_seq:
            raise RuntimeError(
                f"fused dense block: backward order violated: {type(node).__name__.removesuffix('Backward')} "
                f"(node {seq} of {self.nodes}) ran after "
                f"node {self.backward_seq} in the same backward pass, so the shared gradient buffer is wrong "
                "(see 'Backward order' in densenet/models/fused/__init__.py)")
        self.backward_seq = seq

    def end_backward(self) -> None:
        """The block's backward pass is over: give the gradient buffer back."""
        if self._grad_flat is not None:
            self.pool.give("grad", self._grad_flat)
        self._grad_flat = self.grad = self.dmean = self.dvar = None
        self.backward_seq = self.backward_task = None

    def rows(self, lo: int, hi: int, t: torch.Tensor | None = None) -> torch.Tensor:
        """Channels [lo, hi) of the buffer (or of the gradient buffer) as a (hi - lo, N) matrix."""
        return (self.buf if t is None else t)[lo:hi].view(hi - lo, self.n)

    def features(self, c: int) -> torch.Tensor:
        """[x_0, ..., x_{l-1}] as a (B, c, H, W) tensor: a view, no copy."""
        return self.buf[:c].permute(1, 0, 2, 3)

    def workspace(self, name: str, c: int, dtype: torch.dtype) -> torch.Tensor:
        """A (c, N) scratch matrix, one per name and block, reused by every layer in turn."""
        ws = self._ws.get(name)
        if ws is None or ws.dtype != dtype:
            ws = self._ws[name] = self.pool.take(name, self.buf.shape[0] * self.n, dtype, self.buf.device)
        return ws[:c * self.n].view(c, self.n)

    def release(self) -> None:
        """Give the scratch memory back to the block's pool, for the next step."""
        for name, ws in self._ws.items():
            self.pool.give(name, ws)
        self._ws = {}
        self.end_backward()

    def write(self, lo: int, x: torch.Tensor) -> None:
        """Store x_l (B, k, H, W) in channels [lo, lo + k) and compute its batch statistics."""
        k = x.shape[1]
        with torch.no_grad():
            self.buf[lo:lo + k].copy_(x.permute(1, 0, 2, 3))
            if self.mean is not None:
                var, mean = _var_mean(self.rows(lo, lo + k).to(self.mean.dtype))
                self.mean[lo:lo + k] = mean
                self.var[lo:lo + k] = var

    def check_unmodified(self) -> None:
        version = _version(self.buf)  # (None: the version counter failed at this use; nothing to check)
        if version is not None and self.version is not None and version != self.version:
            raise RuntimeError("the output of a fused dense block was modified in place before backward; "
                               "clone it first, or build the model with fused=False")

    def start_grad(self) -> None:
        self._grad_flat = self.pool.take("grad", self.buf.numel(), self.buf.dtype, self.buf.device)
        self.grad = self._grad_flat[:self.buf.numel()].view(self.buf.shape)
        if self.mean is not None:
            self.dmean = torch.zeros_like(self.mean)
            self.dvar = torch.zeros_like(self.var)

    def add_grad(self, g: torch.Tensor | None) -> None:
        """Add the gradient of the block output (C, N), or start the gradient buffer from it."""
        if self.grad is None:
            self.start_grad()
            if g is None:
                self.grad.zero_()
            else:
                self.rows(0, self.buf.shape[0], self.grad).copy_(g)
        elif g is not None:
            self.rows(0, self.buf.shape[0], self.grad).add_(g)


def _graph_task_id() -> int:
    """Autograd's id of the backward pass running now (a private API, models._torch_compat; without it
    the fused path is off where autograd records a block, and a pass that began anyway counts as one)."""
    return _torch_compat.graph_task_id()


def _version(t: torch.Tensor) -> int | None:
    """How often t was modified in place (inference tensors, which cannot be, have no counter); None
    where PyTorch's version counter is unavailable (models._torch_compat: the fused path is then off)."""
    return _torch_compat.tensor_version(t)


class HandOver:
    """What a dense block passes to the transition after it, for one forward pass: the block's output
    and what produced it, a _BlockState (the fused training path) or an `_inference.FrozenOutput` (the
    eval-mode path). `models.densenet.DenseFeatures` makes one per block and gives it to the block and
    then to the transition, as an argument of each call: nothing is kept between passes or shared
    between threads. The transition reads the block's buffer only for that very output, untouched
    since (`source_for`); any other input (an output a forward hook replaced, or changed in place
    after the fused path's buffer was written) finds nothing and takes the transition's modules.
    `lend`: the caller keeps no reference to the block's output beyond the transition's call, so the
    eval-mode path may lend the block buffer from its workspace (`_inference.Workspace.take`)."""

    __slots__ = ("out", "source", "lend")

    def __init__(self, lend: bool = False):
        self.out = self.source = None
        self.lend = lend

    def give(self, out: torch.Tensor, source) -> torch.Tensor:
        """Record the block's output `out` and what produced it; returns `out`."""
        self.out, self.source = out, source
        return out

    def source_for(self, x: torch.Tensor):
        """What produced x, if x is the block's output, untouched since; else None."""
        if x is not self.out or self.source is None:
            return None
        if isinstance(self.source, _BlockState):
            version = _version(self.source.buf)
            if version is None or version != self.source.version:
                return None
        return self.source
