"""The fused dense block: the same function as the paper's, computed without its O(L^2) overheads.

A naive dense block (torchvision's) concatenates [x_0, ..., x_{l-1}] for every layer l, normalises the
concatenation with batch statistics of its own, and in the backward pass adds up the gradient of every
x_s from each of the L - s layers that read it. Three observations remove most of that work, exactly:

1. One buffer per block holds x_0 ... x_L side by side; layer l reads the first c_l channels as a view
   and writes its k maps after them. No concatenation is ever copied.
2. In training mode every layer that reads x_s normalises it with the same batch statistics (they are
   statistics of the same tensor); only its affine scale and shift differ. So mean and variance are
   computed once per feature map, when it is written, and each layer's BN reduces to a per-channel
   affine map: y = x * scale + shift with scale = gamma * rsqrt(var + eps), shift = beta - mean * scale.
3. The gradient also flows through the shared statistics. dL/dmean and dL/dvar are per-channel sums
   that each reader adds to; the term they contribute to dL/dx_s is applied once, when the last
   reader of x_s in backward order (layer s + 1) has run:
       dL/dx_s += dL/dmean / N + dL/dvar * 2 (x_s - mean) / N,     N = B * H * W.
   Each layer adds dL/dx through its own normalisation into one gradient buffer, in place.

How the buffer is laid out, and why (figures: BENCHMARKS.md, "Where the time went"):

- Channel-major, (C, B, H, W): the prefix [x_0, ..., x_{l-1}] that layer l reads is then one
  contiguous (c_l, N) matrix. In NCHW the prefix is strided per image, in NHWC per pixel, and
  PyTorch's CPU batch-norm backward falls back to a slow generic kernel on such views (about 10x).
- The bottleneck's 1x1 convolution is a matrix product, (N, c) = z^T W^T, done with torch.mm: on the
  CPU it runs at memory speed, several times faster than oneDNN's convolution on the same data in NCHW
  and about 2x faster in its backward in NHWC. Its output is written pixel-major, i.e. channels_last,
  the layout in which oneDNN's 3x3 convolution and batch norm of the rest of the layer are fastest.
  (Measured on an Intel Xeon. On an AMD Zen 4 oneDNN's NHWC 1x1 convolution is 1.1-2.1x the product,
  but it needs z pixel-major, and a transpose costs as much as the product: benchmarks/bench_bottleneck.py.)
  The two products of its backward pass, dL/dz and dL/dW, run in oneDNN's matrix product in float32
  (`ONEDNN_BACKWARD`), which was faster than MKL's on the AMD Zen 4 measured, with AVX-512 and AVX2.
- The normalised input z = relu(x * scale + shift) of each layer is written into one workspace per
  block and recomputed in the backward pass (one elementwise pass), in both modes: storing it needs
  a fresh allocation per layer, and large fresh allocations cost page faults on the CPU that are
  slower than the recomputation. So activation memory is linear in depth by default too.

By default each layer's BN-ReLU-Conv input part is one autograd node (`_LayerInput`) that reads the
buffer; dropout and the rest of the layer (BN-ReLU-Conv3x3 of the 4k bottleneck maps) are ordinary
autograd, which stores the bottleneck maps. With memory_efficient, a whole bottleneck layer is one
node (`_RecomputedLayer`) that stores nothing but dropout masks and recomputes its bottleneck in the
backward pass. Running statistics are updated once per step, in the forward pass, in every mode.
The transition after a block is another reader of the whole buffer
(`transition_forward`), which finds the block's state through the block (`BlockOutputs`, set up by
`Transition.follow`): it uses the shared statistics too, and pools before its 1x1 convolution
(average pooling and a 1x1 convolution commute; 4x fewer multiply-adds). tests/test_fused.py checks
all of this against the reference path.

Backward order (the invariant the in-place gradient buffer relies on). Every node of a block takes
the chunks x_0 ... x_{l-1} it reads as inputs, so autograd runs the block's nodes in exactly the
reverse order of their creation: the transition (`_TransitionInput`) or `_BlockOutput` first (it starts
the gradient buffer), then layer L, L-1, ..., 1. Hence when layer l + 1's node has run, every reader
of x_l has added its part (layer l + 1 is the last reader in backward order), so dL/dx_l is complete:
that node returns it as the gradient of its newest chunk x_l (`_finished_grad`), the only chunk that
ever takes a gradient, and autograd carries it into layer l's own nodes (dropout, norm2, conv2).
The first layer's node (lo == 0) ends the block's backward pass and gives the scratch memory back.
Each node is numbered when it is created (`_BlockState.new_node`); in debug mode (`DEBUG`, the
environment variable DENSENET_DEBUG_FUSED=1, on in the tests) every node checks in its backward pass
that it runs after the nodes created after it (`_BlockState.enter_backward`). A second backward pass
over the same graph (retain_graph=True) starts from a fresh gradient buffer.

Each Function names its forward arguments in `ARGS`; `_Needs` reads needs_input_grad and builds the
returned gradients by those names. What a node that reads the buffer needs again in its backward pass
is one record it owns (`_BNReLUInput`, ctx.input). The backward passes compute in place, outside
autograd, so higher-order gradients raise an error that names fused=False (`_no_double_backward`).

Under torch.compile none of this runs: `dense_block_traceable` writes the same arithmetic as plain
operations, which the compiler traces as one graph (no graph breaks) and fuses itself.

On a GPU the same code runs; `ScratchPool` (a CPU page-fault workaround) is bypassed there, and batch
statistics use torch.var_mean (one pass).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from .. import options


# Which path `fused="auto"` (the default) takes on each kind of device: the one measured faster there.
# cpu: the fused path: training throughput 1.5-1.9x torchvision NCHW (1.4-1.5x channels_last) on a 2-core
# Intel Xeon (Sapphire Rapids), 1.3-1.6x NCHW (1.1-1.3x channels_last) on a 2-core AMD EPYC Zen 4 with
# AVX-512 and with AVX2 only (BENCHMARKS.md, "Results" and "Third pass").
# cuda: the reference path (torch's own modules, cuDNN kernels) until a GPU has measured the fused one:
# no GPU has run it yet. Its CUDA calls are checked without a GPU (tests/test_fused_cuda_contract.py)
# and `fused=True` opts in; benchmarks/gpu_check.py measures both and prints the entry to set here.
# Devices not listed (mps, xpu, ...) take the reference path too: only a measurement puts one on the
# fused path.
FUSED_BY_DEVICE: dict[str, bool] = {"cpu": True, "cuda": False}

# Debug mode: check invariants the fused backward relies on (the backward order of a block's nodes)
# at every node. On with DENSENET_DEBUG_FUSED=1 (tests/conftest.py sets it), or by setting this flag.
DEBUG: bool = options.flag("DENSENET_DEBUG_FUSED", False)


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
    other replacements take the reference path, which calls the modules)."""
    return all(_plain_bn(layer.norm1) for layer in layers)


def _plain_bn(bn) -> bool:
    return type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats


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
                "(see 'Backward order' in densenet/models/_fused.py)")
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
        if self.buf._version != self.version:
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


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and per-channel affine maps in float32 (float64 for float64 models)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device, used to count parameters and multiply-adds


def _affine(mean, var, w, b, eps, acc):
    """BN with fixed statistics as y = x * scale + shift, per channel."""
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = w.to(acc) * invstd
    shift = b.to(acc) - mean.to(acc) * scale
    return invstd, scale, shift


def _bn_relu(x: torch.Tensor, mean, var, w, b, eps: float, out: torch.Tensor) -> torch.Tensor:
    """relu(BN(x)) with fixed statistics for x (c, N), into out (c, N) of the compute dtype.

    PyTorch's inference batch-norm kernel on the contiguous (1, c, N, 1) view is the fastest single
    pass for x * scale + shift per channel: 2.7x faster than torch.addcmul with broadcast
    per-channel operands (BENCHMARKS.md)."""
    c = x.shape[0]
    dst = out if out.dtype == x.dtype else torch.empty_like(x)
    acc = _acc_dtype(x.dtype)
    # parameters and statistics all in the accumulation dtype (float32 for float16/bfloat16 maps: autocast,
    # or a .half() model whose running statistics are float16), and so the saved statistics the kernel
    # writes: CUDA's kernel reads them as acc(parameter dtype) and refuses float16 ones
    # (tests/test_fused_cuda_contract.py). The kernel computes (x - mean) * invstd in float32; x * scale +
    # shift in the maps' own precision lost most digits when |mean| >> std.
    w, b, mean, var = (t if t.dtype == acc else t.to(acc) for t in (w, b, mean, var))
    torch.ops.aten.native_batch_norm.out(x.view(1, c, -1, 1), w, b, mean, var, False, 0.0, eps,
                                         out=dst.view(1, c, -1, 1), save_mean=x.new_empty(0, dtype=acc),
                                         save_invstd=x.new_empty(0, dtype=acc))
    if dst is not out:
        out.copy_(dst)
    return out.relu_()



def _var_mean(x: torch.Tensor):
    """Biased variance and mean of each row of x (k, N), in two passes: torch.var_mean is 4x slower
    on such rows on the CPU (BENCHMARKS.md). On a GPU its one-pass reduction is the faster (and
    allocates no (k, N) temporary)."""
    if x.device.type == "cuda":
        return torch.var_mean(x, 1, correction=0)
    mean = x.mean(1)
    return torch.sub(x, mean[:, None]).square_().mean(1), mean


def _avg_pool2(z: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, stride 2, of z (..., H, W): sums of rows, then of columns. 3x faster
    than F.avg_pool2d on the CPU for this layout (BENCHMARKS.md); the same floor for odd sizes."""
    h, w = z.shape[-2] // 2 * 2, z.shape[-1] // 2 * 2
    z = z[..., :h, :w]
    rows = z[..., 0::2, :] + z[..., 1::2, :]
    return (rows[..., 0::2] + rows[..., 1::2]).mul_(0.25)


def _avg_pool2_backward(gp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradient of _avg_pool2: each pooled gradient / 4 over its 2x2 window, into out (..., H, W)."""
    h, w = gp.shape[-2] * 2, gp.shape[-1] * 2
    if (h, w) != out.shape[-2:]:
        out.zero_()  # odd sizes: the last row or column is not pooled
    lead = gp.shape[:-2]
    cols = (gp * 0.25).unsqueeze(-1).expand(*lead, h // 2, w // 2, 2).reshape(*lead, h // 2, w)
    out[..., :h, :w].view(*lead, h // 2, 2, w).copy_(cols.unsqueeze(-2).expand(*lead, h // 2, 2, w))
    return out


class _BNReLUInput:
    """One reader of a block's buffer: relu(BN(buffer[:, :c])), forward and backward, on (c, N) matrices.

    A small record owned by the autograd node that reads (`_LayerInput`, `_RecomputedLayer`,
    `_TransitionInput`: `ctx.input`), holding what its backward pass needs to recompute z and to
    send dL/dz back into the block's gradient buffer."""

    __slots__ = ("st", "c", "eps", "dt", "batch_stats", "mean", "var", "invstd", "scale", "shift", "w", "b")

    def __init__(self, st: _BlockState, c: int, mean, var, w, b, eps: float):
        self.st, self.c, self.eps = st, c, eps
        self.dt = _compute_dtype(st.buf)
        self.batch_stats = st.mean is not None
        # mean and var may be views of the block's statistics, which later layers extend in place:
        # kept here, not in save_for_backward, whose version check would reject them.
        self.mean, self.var = mean, var
        self.invstd, self.scale, self.shift = _affine(mean, var, w, b, eps, _acc_dtype(st.buf.dtype))
        self.w, self.b = w, b

    def z(self) -> torch.Tensor:
        """The normalised input into the block's workspace: computed in the forward pass, and again in
        the backward pass (not kept)."""
        st, c = self.st, self.c
        return _bn_relu(st.rows(0, c), self.mean, self.var, self.w, self.b, self.eps, st.workspace("z", c, self.dt))

    def backward(self, gz: torch.Tensor, z: torch.Tensor, w: torch.Tensor):
        """gz = dL/dz (c, N) -> dL/dx into the block's gradient buffer, and dL/dgamma, dL/dbeta."""
        st, c = self.st, self.c
        x = st.rows(0, c)
        torch.ops.aten.threshold_backward.grad_input(gz, z, 0, grad_input=gz)  # through the ReLU, in place
        # dL/dgamma and dL/dbeta: per-channel sums over N; (1, c, N, 1) is a contiguous NCHW view
        # statistics held fixed (train=False); save_mean and save_invstd given as tensors, never None: the
        # CUDA kernel asserts they are defined (tests/test_fused_cuda_contract.py), the CPU one ignores them
        acc = self.invstd.dtype
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(
            gz.view(1, c, -1, 1), x.view(1, c, -1, 1), w, self.mean, self.var, self.mean.to(acc), self.invstd,
            False, self.eps, [False, True, True])
        # dL/dx through this layer's normalisation with the statistics held fixed, into the buffer
        if st.grad is None:  # the first reader in backward order (the transition) starts the buffer
            st.start_grad()
            torch.mul(gz, self.scale.to(gz.dtype)[:, None], out=st.rows(0, c, st.grad))
        else:
            st.rows(0, c, st.grad).addcmul_(gz, self.scale.to(gz.dtype)[:, None])
        if self.batch_stats:  # and through the shared statistics: accumulated, applied once per map
            st.dmean[:c].sub_(gb * self.scale)
            st.dvar[:c].sub_(0.5 * gw * self.scale * self.invstd)
        return gw.to(w.dtype), gb.to(w.dtype)


class _Needs:
    """ctx.needs_input_grad by the names of forward's arguments (`ARGS` of each Function), followed by
    the chunks x_0 ... x_{l-1}; of these only the newest, x_{l-1}, ever takes a gradient (`newest`):
    see "Backward order" in the module docstring."""

    def __init__(self, ctx, names: tuple[str, ...]):
        flags = ctx.needs_input_grad
        self._names = names
        self._flags = dict(zip(names, flags))
        self._chunks = len(flags) - len(names)
        self.newest = self._chunks > 0 and bool(flags[-1])

    def __getattr__(self, name: str) -> bool:
        try:
            return self._flags[name]
        except KeyError:
            raise AttributeError(name) from None

    def gradients(self, grads: dict) -> tuple:
        """The tuple backward returns: grads[name] for the arguments that need one, None elsewhere."""
        named = tuple(grads.get(n) if self._flags[n] else None for n in self._names)
        chunks = (None,) * max(self._chunks - 1, 0) + ((grads.get("newest") if self.newest else None,)
                                                        if self._chunks else ())
        return named + chunks


def _begin_backward(ctx) -> _BlockState:
    """What every node's backward does first: refuse double backward, check that the block output is
    unmodified and, in debug mode, the backward order. Returns the block's state."""
    _no_double_backward()
    st = ctx.input.st if hasattr(ctx, "input") else ctx.st
    st.check_unmodified()
    st.enter_backward(ctx.seq, ctx)
    return st


_CURRENT_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _graph_task_id() -> int:
    """Autograd's id of the backward pass running now (private API; without it, every pass is one)."""
    return -1 if _CURRENT_GRAPH_TASK_ID is None else _CURRENT_GRAPH_TASK_ID()


def _no_double_backward() -> None:
    """Higher-order gradients (backward with create_graph=True, e.g. a gradient penalty) would need the
    backward pass to be differentiable; the fused nodes compute it in place, outside autograd."""
    if torch.is_grad_enabled():
        raise RuntimeError("the fused dense block does not support higher-order gradients (backward with "
                           "create_graph=True, e.g. a gradient penalty); build the model with fused=False "
                           "(create_model(..., fused=False)), which computes the same function and supports them")


def _finished_grad(st: _BlockState, lo: int, hi: int) -> torch.Tensor:
    """dL/dx for channels [lo, hi), once every reader has added to it: (B, hi - lo, H, W), channels_last
    like the convolution output it is the gradient of."""
    g = st.rows(lo, hi, st.grad)
    b, h, w = st.buf.shape[1:]
    out = torch.empty((b, hi - lo, h, w), dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
    out_rows = out.permute(1, 0, 2, 3).view(hi - lo, st.n)  # the same memory as a (k, N) matrix
    if st.mean is not None:
        a = (2.0 / st.n) * st.dvar[lo:hi]
        if g.dtype in _LOW_PRECISION:  # a * (x - mean) + dmean / n: centred first, no cancellation
            torch.sub(st.rows(lo, hi), st.mean[lo:hi].to(g.dtype)[:, None], out=out_rows)
            out_rows.mul_(a.to(g.dtype)[:, None]).add_((st.dmean[lo:hi] / st.n).to(g.dtype)[:, None])
        else:
            b0 = st.dmean[lo:hi] / st.n - a * st.mean[lo:hi]
            torch.addcmul(b0.to(g.dtype)[:, None], st.rows(lo, hi), a.to(g.dtype)[:, None], out=out_rows)
        out_rows.add_(g)
    else:
        out_rows.copy_(g)
    return out


# oneDNN's matrix product (the kernel torch.compile's CPU backend calls for linear layers): the two
# products of a 1x1 convolution's backward pass run in it, the forward product in torch.mm (MKL). A
# rule from measurements on both ISAs of an AMD Zen 4 (BENCHMARKS.md, "Third pass", item 3; not measured
# on Intel): with oneDNN a DenseNet-BC-100 training step is 1.16x (AVX-512) and 1.05x (AVX2) faster,
# DenseNet-121 1.02x and 1.00x; oneDNN for the forward product as well was slower (0.92x for
# DenseNet-121), because its output comes channel-major and has to be transposed. Float32 on the CPU only; False, or
# DENSENET_ONEDNN_BACKWARD=0 in the environment, uses torch.mm everywhere.
ONEDNN_BACKWARD: bool = options.flag("DENSENET_ONEDNN_BACKWARD", True)
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if hasattr(torch.ops, "mkldnn") else None


def _onednn(t: torch.Tensor) -> bool:
    return ONEDNN_BACKWARD and _LINEAR is not None and t.dtype == torch.float32 and t.device.type == "cpu" \
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and _linear_works()


@functools.lru_cache(maxsize=None)
def _linear_works() -> bool:
    """Whether this PyTorch's oneDNN product (a private operator, measured on torch 2.14 only) gives
    torch.mm's result on operands laid out as the backward pass passes them (a contiguous weight for
    dL/dz, a transposed one for dL/dW); checked once, on small matrices. If not, torch.mm is used."""
    gen = torch.Generator().manual_seed(0)  # not the global generator: this check runs inside a training
    # step (the first backward pass), and drawing from torch's default generator there would shift that
    # step's and every later dropout mask: a resumed run would no longer end bitwise where an uninterrupted one does
    with torch.no_grad():
        w_t, g2, z = (torch.randn(*shape, generator=gen) for shape in ((5, 3), (11, 3), (5, 11)))  # (c, o), (N, o), (c, N)
        try:
            return bool(torch.allclose(_LINEAR(w_t, g2, None, "none", [], ""), w_t @ g2.t(), atol=1e-5)
                        and torch.allclose(_LINEAR(z, g2.t(), None, "none", [], ""), z @ g2, atol=1e-5))
        except (RuntimeError, TypeError, ValueError):
            return False


def _conv1x1(z: torch.Tensor, conv_w: torch.Tensor, shape) -> torch.Tensor:
    """1x1 convolution of z (c, N) as a matrix product, written channels_last: (B, o, H, W)."""
    b, h, w = shape
    o = conv_w.shape[0]
    y = torch.mm(z.t(), conv_w.view(o, -1).t())  # (N, o): pixel-major
    return y.view(b, h, w, o).permute(0, 3, 1, 2)


def _input_grad(conv_w: torch.Tensor, g2: torch.Tensor, st: _BlockState, c: int, dt: torch.dtype) -> torch.Tensor:
    """dL/dz (c, N) = W^T g2^T of a 1x1 convolution from dL/dy g2 (N, o): in oneDNN (a new tensor), or
    in torch.mm into the block's workspace."""
    w = conv_w.view(conv_w.shape[0], -1)
    if _onednn(g2):  # (contiguous(): a no-op for the gradients that arrive here, cheap insurance otherwise)
        return _LINEAR(w.t().contiguous(), g2.contiguous(), None, "none", [], "")
    return torch.mm(w.t(), g2.t(), out=st.workspace("gz", c, dt))


def _weight_grad(z: torch.Tensor, g2: torch.Tensor, conv_w: torch.Tensor) -> torch.Tensor:
    """dL/dW (o, c) of a 1x1 convolution from z (c, N) and dL/dy g2 (N, o), computed as (z g2)^T:
    in oneDNN, or in torch.mm, where z g2 is 1.15x to 1.35x faster than g2^T z^T (the same sums)."""
    if _onednn(z):
        return _LINEAR(z, g2.contiguous().t(), None, "none", [], "").t().reshape(conv_w.shape)
    return torch.mm(z, g2).t().reshape(conv_w.shape)


def _pixel_major(g: torch.Tensor) -> torch.Tensor:
    """(B, o, H, W) -> (N, o), a view when g is channels_last."""
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


class _LayerInput(Function):
    """Conv(ReLU(BN(buffer[:, :c]))) with the block's shared statistics: one dense layer's input part."""

    @staticmethod
    def forward(ctx, st: _BlockState, c: int, mean, var, w, b, eps: float, conv_w, padding, *chunks):
        ctx.input = inp = _BNReLUInput(st, c, mean, var, w, b, eps)
        ctx.seq = st.new_node()
        z = inp.z()
        conv_w_dt = conv_w.to(inp.dt)
        bhw = st.buf.shape[1:]
        ctx.one_by_one = conv_w.shape[-2:] == (1, 1)
        with _no_autocast(z.device):
            if ctx.one_by_one:
                out = _conv1x1(z, conv_w_dt, bhw)
            else:  # a 3x3 convolution on the prefix: DenseNet without bottleneck
                out = F.conv2d(z.view(c, *bhw).permute(1, 0, 2, 3), conv_w_dt, padding=padding)
        ctx.padding, ctx.conv_dtype = padding, conv_w.dtype
        ctx.lo = c - chunks[-1].shape[1]  # the newest input, x_{l-1}, occupies channels [lo, c)
        ctx.save_for_backward(w, conv_w_dt)
        return out

    ARGS = ("st", "c", "mean", "var", "w", "b", "eps", "conv_w", "padding")  # forward's, then *chunks

    @staticmethod
    def backward(ctx, g):
        inp = ctx.input
        st, c, dt = _begin_backward(ctx), inp.c, inp.dt
        w, conv_w = ctx.saved_tensors
        z = inp.z()
        need = _Needs(ctx, _LayerInput.ARGS)
        need_x = need.newest or need.w or need.b  # (only the newest chunk takes a gradient: see above)
        g = g.to(dt)
        grads = {}
        if ctx.one_by_one:
            g2 = _pixel_major(g)  # (N, o)
            if need.conv_w:
                grads["conv_w"] = _weight_grad(z, g2, conv_w)
            if need_x:
                gz = _input_grad(conv_w, g2, st, c, dt)
        else:
            bhw = st.buf.shape[1:]
            gz4, grads["conv_w"], _ = torch.ops.aten.convolution_backward(
                g, z.view(c, *bhw).permute(1, 0, 2, 3), conv_w, None, [1, 1], list(ctx.padding), [1, 1], False,
                [0, 0], 1, [need_x, need.conv_w, False])
            if need_x:
                gz = st.workspace("gz", c, dt)
                gz.view(c, *bhw).copy_(gz4.permute(1, 0, 2, 3))
        if need_x:
            grads["w"], grads["b"] = inp.backward(gz, z, w)
            if need.newest:  # every reader of x_{l-1} has now run backward: its gradient is complete
                grads["newest"] = _finished_grad(st, ctx.lo, c)
        if ctx.lo == 0:  # the first layer: the block's backward pass is over
            st.release()
        if grads.get("conv_w") is not None:
            grads["conv_w"] = grads["conv_w"].to(ctx.conv_dtype)
        return need.gradients(grads)


class _RecomputedLayer(Function):
    """A whole bottleneck layer, BN-ReLU-Conv1x1-[Dropout]-BN-ReLU-Conv3x3-[Dropout], that keeps
    nothing for the backward pass but its dropout masks (as booleans): the memory-efficient mode.
    Its backward recomputes the 4k bottleneck maps from the block buffer (one more 1x1 matrix product
    and BN-ReLU than the default mode, which stores them), so each layer adds only its k new maps to
    the memory of a step. BN running statistics move once, in the forward pass."""

    @staticmethod
    def forward(ctx, st: _BlockState, c: int, mean, var, w1, b1, eps1: float, conv1_w, bn2: nn.BatchNorm2d,
                w2, b2, conv2_w, p: float, *chunks):
        ctx.input = inp = _BNReLUInput(st, c, mean, var, w1, b1, eps1)
        ctx.seq = st.new_node()
        z = inp.z()
        dt, bhw = inp.dt, st.buf.shape[1:]
        conv1_w, conv2_w = conv1_w.to(dt), conv2_w.to(dt)
        with _no_autocast(z.device):
            y = _conv1x1(z, conv1_w, bhw)  # (B, 4k, H, W), channels_last
            masks = []
            if p > 0:
                y, m1 = _dropped(y, p)
                masks.append(m1)
            if bn2.training:  # batch statistics of the bottleneck maps; running ones updated once, here
                var2, mean2 = _var_mean(_pixel_major(y).t().to(_acc_dtype(st.buf.dtype)))
                with torch.no_grad():
                    _update_running_stats(bn2, mean2, var2, st.n)
            else:
                mean2, var2 = bn2.running_mean, bn2.running_var
            invstd2, scale2, shift2 = _affine(mean2, var2, w2, b2, bn2.eps, _acc_dtype(st.buf.dtype))
            u = _scale_shift_relu(y, scale2, shift2, mean2, b2)
            out = F.conv2d(u, conv2_w, padding=1)
            if p > 0:
                out, m2 = _dropped(out, p)
                masks.append(m2)
        ctx.p, ctx.lo, ctx.conv_dtype = p, c - chunks[-1].shape[1], conv1_w.dtype
        ctx.bn2 = (bn2.training, mean2, var2, invstd2, scale2, shift2, bn2.eps)
        ctx.b2 = b2
        ctx.save_for_backward(w1, conv1_w, w2, conv2_w, *masks)
        return out

    ARGS = ("st", "c", "mean", "var", "w1", "b1", "eps1", "conv1_w", "bn2", "w2", "b2", "conv2_w", "p")

    @staticmethod
    def backward(ctx, g):
        inp = ctx.input
        st, c, dt = _begin_backward(ctx), inp.c, inp.dt
        w1, conv1_w, w2, conv2_w, *masks = ctx.saved_tensors
        training2, mean2, var2, invstd2, scale2, shift2, eps2 = ctx.bn2
        need = _Needs(ctx, _RecomputedLayer.ARGS)
        need_x = need.newest or need.w1 or need.b1
        g = g.to(dt)
        if ctx.p > 0:
            g = _undrop(g, masks[1], ctx.p)
        z = inp.z()
        y = _conv1x1(z, conv1_w, st.buf.shape[1:])  # the bottleneck again
        if ctx.p > 0:
            y = _undrop(y, masks[0], ctx.p)
        u = _scale_shift_relu(y, scale2, shift2, mean2, ctx.b2)
        gu, gconv2, _ = torch.ops.aten.convolution_backward(
            g, u, conv2_w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, need.conv2_w, False])
        del g
        torch.ops.aten.threshold_backward.grad_input(gu, u, 0, grad_input=gu)
        del u
        # saved statistics always given (the CUDA kernel asserts them), in the accumulation dtype; running
        # ones only in eval mode, where they are read, and then in the weight's dtype as BN keeps them
        gy, gw2, gb2 = torch.ops.aten.native_batch_norm_backward(
            gu, y, w2, None if training2 else mean2, None if training2 else var2, mean2.to(invstd2.dtype), invstd2,
            training2, eps2, [True, need.w2, need.b2])
        del gu, y
        if ctx.p > 0:
            gy = _undrop(gy, masks[0], ctx.p)
        gy2 = _pixel_major(gy)  # (N, 4k)
        grads = {"w2": gw2, "b2": gb2, "conv2_w": gconv2}
        if need.conv1_w:
            grads["conv1_w"] = _weight_grad(z, gy2, conv1_w)
        if need_x:
            gz = _input_grad(conv1_w, gy2, st, c, dt)
            grads["w1"], grads["b1"] = inp.backward(gz, z, w1)
            if need.newest:
                grads["newest"] = _finished_grad(st, ctx.lo, c)
        if ctx.lo == 0:
            st.release()
        like = {"w1": w1, "b1": w1, "conv1_w": conv1_w, "w2": w2, "b2": w2, "conv2_w": conv2_w}
        return need.gradients({k: v if v is None or k not in like else v.to(like[k].dtype) for k, v in grads.items()})


def _scale_shift_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
                      beta: torch.Tensor) -> torch.Tensor:
    """relu(y * scale + shift) per channel of a channels_last y: the same operations forward and in
    the recomputation, so the recomputed maps are bitwise those of the forward pass. In float16 and
    bfloat16, (y - mean) * scale + beta (BN's bias): centred first, as batch norm computes it."""
    y2 = _pixel_major(y)  # (N, C): the channel is the contiguous dimension
    if y.dtype in _LOW_PRECISION:
        u = torch.sub(y2, mean.to(y.dtype)).mul_(scale.to(y.dtype)).add_(beta.to(y.dtype)).relu_()
    else:
        u = torch.addcmul(shift.to(y.dtype), y2, scale.to(y.dtype)).relu_()
    return u.view(y.shape[0], y.shape[2], y.shape[3], -1).permute(0, 3, 1, 2)


def _dropped(x: torch.Tensor, p: float):
    """Dropout as the reference path draws it (NCHW order), returning the kept positions as booleans."""
    from .common import dropout

    noise = dropout(torch.ones(x.shape, dtype=x.dtype, device=x.device), p, True)
    return x * noise, noise != 0


def _undrop(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x * noise for the dropout noise that `keep` records: 0, or 1 / (1 - p) as F.dropout computes it."""
    scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1 - p)
    return x * (keep * scale)


class _BlockOutput(Function):
    """Hands the buffer on as the block's output [x_0, ..., x_L]; its gradient seeds the gradient buffer."""

    @staticmethod
    def forward(ctx, st: _BlockState, *chunks):
        ctx.set_materialize_grads(False)  # a fused transition sends its gradient through the state
        ctx.st = st
        ctx.seq = st.new_node()
        ctx.lo = st.buf.shape[0] - chunks[-1].shape[1]
        st.version = _version(st.buf)
        # A view, not st.out itself: returning st.out would make it the output, its grad_fn this node,
        # whose ctx holds st, which holds st.out: a reference cycle through autograd's C++ graph that
        # Python's collector cannot free (it leaked every step's buffers: +20 MB per step).
        return st.out.view_as(st.out)

    ARGS = ("st",)

    @staticmethod
    def backward(ctx, g):
        st = _begin_backward(ctx)
        c = st.buf.shape[0]
        st.add_grad(None if g is None else g.permute(1, 0, 2, 3).reshape(c, st.n))
        need = _Needs(ctx, _BlockOutput.ARGS)
        return need.gradients({"newest": _finished_grad(st, ctx.lo, c) if need.newest else None})


class _TransitionInput(Function):
    """The transition's Conv1x1(ReLU(BN(block output))), reading the block's buffer and statistics.

    With pool_first, returns AvgPool2x2 of it, computed as Conv1x1(AvgPool2x2(ReLU(BN(x)))): average
    pooling and a 1x1 convolution commute (both are linear, one over space, one over channels), so the
    matrix product runs on a quarter of the pixels."""

    @staticmethod
    def forward(ctx, st: _BlockState, mean, var, w, b, eps: float, conv_w, pool_first: bool, block_out):
        c = st.buf.shape[0]
        ctx.input = inp = _BNReLUInput(st, c, mean, var, w, b, eps)
        ctx.seq = st.new_node()
        z = inp.z()
        conv_w_dt = conv_w.to(inp.dt)
        o = conv_w.shape[0]
        bhw = st.buf.shape[1:]
        ctx.pool_first, ctx.conv_dtype, ctx.bhw = pool_first, conv_w.dtype, bhw
        with _no_autocast(z.device):
            if pool_first:
                zp = _avg_pool2(z.view(c, *bhw))  # (c, B, H/2, W/2)
                ctx.pooled_shape = zp.shape
                out = torch.mm(conv_w_dt.view(o, c), zp.view(c, -1)).view(o, *zp.shape[1:]).permute(1, 0, 2, 3)
            else:
                out = _conv1x1(z, conv_w_dt, bhw)
        ctx.save_for_backward(w, conv_w_dt)
        return out

    ARGS = ("st", "mean", "var", "w", "b", "eps", "conv_w", "pool_first", "block_out")

    @staticmethod
    def backward(ctx, g):
        inp = ctx.input
        st, c, dt = _begin_backward(ctx), inp.c, inp.dt
        w, conv_w = ctx.saved_tensors
        need = _Needs(ctx, _TransitionInput.ARGS)
        need_x = need.w or need.b or need.block_out
        g = g.to(dt)
        o = conv_w.shape[0]
        grads = {}
        z = inp.z()
        if ctx.pool_first:
            zp = _avg_pool2(z.view(c, *ctx.bhw))
            g2 = g.permute(1, 0, 2, 3).reshape(o, -1)  # (o, N/4)
            if need.conv_w:
                grads["conv_w"] = torch.mm(g2, zp.view(c, -1).t()).view_as(conv_w)
            if need_x:
                gzp = torch.mm(conv_w.view(o, c).t(), g2).view(ctx.pooled_shape)
                gz = st.workspace("gz", c, dt)
                _avg_pool2_backward(gzp, gz.view(c, *ctx.bhw))
        else:
            g2 = _pixel_major(g)
            if need.conv_w:
                grads["conv_w"] = _weight_grad(z, g2, conv_w)
            if need_x:
                gz = _input_grad(conv_w, g2, st, c, dt)
        if need_x:  # dL/d(block output) goes into the block's gradient buffer, not through block_out
            grads["w"], grads["b"] = inp.backward(gz, z, w)
        if grads.get("conv_w") is not None:
            grads["conv_w"] = grads["conv_w"].to(ctx.conv_dtype)
        return need.gradients(grads)


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What nn.BatchNorm2d does to its buffers in a training step, from shared statistics."""
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_((var * (n / (n - 1))).to(bn.running_var.dtype), alpha=m)


def _stats_for(bn: nn.BatchNorm2d, st: _BlockState, c: int):
    """The statistics a BN reading the first c channels normalises with; updates its running ones."""
    if st.mean is None:
        return bn.running_mean, bn.running_var
    mean, var = st.mean[:c], st.var[:c]
    with torch.no_grad():
        _update_running_stats(bn, mean, var, st.n)
    return mean, var


def dense_block_forward(block, layers, x0: torch.Tensor, memory_efficient: bool) -> tuple[torch.Tensor, _BlockState]:
    """[x_0, H_1(x_0), H_2([x_0, x_1]), ...] for the DenseLayers of one block, fused, and the block's
    state (buffer and statistics), which the transition after the block reads (`BlockOutputs`).

    The nodes created here (one per layer, then `_BlockOutput`; `transition_forward` adds one more)
    share the state's gradient buffer and the per-channel sums dmean and dvar, which each node adds
    to in place. That is correct only because autograd runs them in the reverse order of their
    creation, which holds because every node takes all the chunks x_0 ... x_{l-1} it reads as inputs:
    see "Backward order" in the module docstring. A node that took fewer would break it silently;
    debug mode (DEBUG) checks the order at every node."""
    batch, c, h, w = x0.shape
    k = _growth(layers[0])
    training = layers[0].norm1.training
    if training and batch * h * w == 1:
        raise ValueError("BatchNorm in training mode needs more than one value per channel: "
                         f"got a batch of {batch} with {h}x{w} maps; use a larger batch or model.eval()")
    st = _BlockState(x0, c + len(layers) * k, batch_stats=training, pool=block.scratch)
    st.write(0, x0)
    chunks = [x0]
    for layer in layers:
        bn = layer.norm1
        mean, var = _stats_for(bn, st, c)
        if memory_efficient and layer.bottleneck and _plain_bn(layer.norm2) and torch.is_grad_enabled():
            new = _RecomputedLayer.apply(st, c, mean, var, bn.weight, bn.bias, bn.eps, layer.conv1.weight,
                                         layer.norm2, layer.norm2.weight, layer.norm2.bias, layer.conv2.weight,
                                         layer.drop_rate if layer.training else 0.0, *chunks)
        else:
            y = _LayerInput.apply(st, c, mean, var, bn.weight, bn.bias, bn.eps, layer.conv1.weight,
                                  layer.conv1.padding, *chunks)
            new = layer.rest(y)  # (B, k, H, W)
        st.write(c, new)
        chunks.append(new)
        c += k
    out = _BlockOutput.apply(st, *chunks)
    if not out.requires_grad:
        st.release()
    return out, st


def dense_block_traceable(layers, x0: torch.Tensor, memory_efficient: bool) -> torch.Tensor:
    """The fused block's function in plain, differentiable PyTorch operations: what torch.compile traces.

    The autograd Functions above share a Python state object and write into buffers in place, which
    the compiler cannot see through (a graph break per node). Here the same arithmetic is written
    functionally and the compiler does the fusing: batch statistics once per feature map, shared by
    every reader (concatenated, not recomputed: O(L) reductions instead of O(L^2)); each reader's BN a
    per-channel affine map of the concatenation followed by ReLU; the gradient through the shared
    statistics is autograd's. Running statistics move once per step, as in the eager fused path. With
    memory_efficient the BN-ReLU-Conv1x1 of each layer is checkpointed (recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    training = layers[0].norm1.training
    n = x0.shape[0] * x0.shape[2] * x0.shape[3]
    if training and n == 1:
        raise ValueError("BatchNorm in training mode needs more than one value per channel: "
                         f"got a batch of {x0.shape[0]} with {x0.shape[2]}x{x0.shape[3]} maps; "
                         "use a larger batch or model.eval()")
    acc = _acc_dtype(x0.dtype)
    feats, means, variances = [x0], [], []

    def add_stats(x):
        if training:
            xf = x.to(acc)
            mean = xf.mean((0, 2, 3))
            means.append(mean)
            variances.append((xf - mean[None, :, None, None]).square().mean((0, 2, 3)))

    add_stats(x0)
    for layer in layers:
        bn = layer.norm1
        if training:
            mean, var = torch.cat(means), torch.cat(variances)
            with torch.no_grad():
                _update_running_stats(bn, mean.detach(), var.detach(), n)
        else:
            mean, var = bn.running_mean, bn.running_var
        part = functools.partial(_traced_layer_input, bn.weight, bn.bias, bn.eps, layer.conv1)
        if memory_efficient and torch.is_grad_enabled():
            y = checkpoint(part, mean, var, *feats, use_reentrant=False)
        else:
            y = part(mean, var, *feats)
        new = layer.rest(y)
        add_stats(new)
        feats.append(new)
    return torch.cat(feats, 1)


def _traced_layer_input(w, b, eps, conv: nn.Conv2d, mean, var, *feats) -> torch.Tensor:
    """conv(relu(x * scale + shift)) of the concatenation x, scale and shift from shared statistics."""
    x = torch.cat(feats, 1)
    _, scale, shift = _affine(mean, var, w, b, eps, _acc_dtype(x.dtype))
    dt = _compute_dtype(x)
    z = torch.addcmul(shift.to(dt)[None, :, None, None], x.to(dt), scale.to(dt)[None, :, None, None]).relu()
    return conv(z)


def _version(t: torch.Tensor) -> int:
    """How often t was modified in place (inference tensors, which cannot be, have no counter)."""
    return 0 if t.is_inference() else t._version


class BlockOutputs:
    """How a dense block hands its output's internals to the transition after it, explicitly: the
    block records each output it returns with what produced it (`record`); the transition, given
    the same object (`Transition.follow`), looks its input up (`get`). A _BlockState for the fused
    training path, an `_inference.FrozenOutput` for the eval path; anything else (a tensor modified
    in place, another module's output) finds nothing and takes the transition's reference path.

    Entries are keyed by the output tensor's identity and live exactly as long as that tensor.
    Not copied or pickled with the model (`__reduce__`: an empty registry)."""

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary

        self._by_output = WeakIdKeyDictionary()

    def __reduce__(self):
        return (BlockOutputs, ())

    def __len__(self) -> int:
        return len(self._by_output)

    def record(self, out: torch.Tensor, what) -> torch.Tensor:
        self._by_output[out] = what
        return out

    def get(self, x: torch.Tensor):
        """What produced x, if x is an output of the block, untouched since."""
        what = self._by_output.get(x)
        if isinstance(what, _BlockState) and _version(what.buf) != what.version:
            return None
        return what


def transition_supported(transition, st) -> bool:
    if not isinstance(st, _BlockState):
        return False
    bn = transition.norm
    return _plain_bn(bn) and bn.training == (st.mean is not None)


def transition_forward(transition, st: _BlockState, x: torch.Tensor) -> torch.Tensor:
    """BN-ReLU-Conv1x1 [-Dropout] -AvgPool2x2 of a fused block's output, from its buffer and statistics."""
    bn, conv = transition.norm, transition.conv
    mean, var = _stats_for(bn, st, st.buf.shape[0])
    drop = getattr(transition, "drop", None)
    pool_first = drop is None  # dropout sits between the convolution and the pooling
    y = _TransitionInput.apply(st, mean, var, bn.weight, bn.bias, bn.eps, conv.weight, pool_first, x)
    if not y.requires_grad:
        st.release()
    if pool_first:
        return y
    from .common import dropout  # the masks of the reference path, whatever the layout

    return transition.pool(dropout(y, drop.p, transition.training))


def _growth(layer) -> int:
    return (layer.conv2 if layer.bottleneck else layer.conv1).out_channels
