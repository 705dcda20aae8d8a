"""What the fused block's autograd nodes share: one reader of the buffer (`_BNReLUInput`), gradients
placed by the names of forward's arguments (`function_args`, `_Needs`), the first steps of every
backward pass (`_begin_backward`) and the gradient of a feature map once complete (`_finished_grad`)."""
from __future__ import annotations

import inspect

import torch

from .. import _torch_compat
from .kernels import _LOW_PRECISION, _acc_dtype, _affine, _batch_norm_backward, _bn_relu, _compute_dtype, _relu_backward
from .state import _BlockState


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
        _torch_compat.call("threshold_backward", _relu_backward, gz, z, 0, grad_input=gz)  # through the ReLU, in place
        # dL/dgamma and dL/dbeta: per-channel sums over N; (1, c, N, 1) is a contiguous NCHW view
        # statistics held fixed (train=False); save_mean and save_invstd given as tensors, never None: the
        # CUDA kernel asserts they are defined (tests/test_fused_cuda_contract.py), the CPU one ignores them
        acc = self.invstd.dtype
        _, gw, gb = _torch_compat.call(
            "native_batch_norm_backward", _batch_norm_backward, gz.view(1, c, -1, 1), x.view(1, c, -1, 1), w,
            self.mean, self.var, self.mean.to(acc), self.invstd, False, self.eps, [False, True, True])
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


def function_args(cls):
    """Class decorator of the fused block's autograd Functions: sets `cls.ARGS`, the names of forward's
    arguments after ctx up to the chunks x_0 ... x_{l-1} (`*chunks`, which follow them), read from
    forward's signature. backward places each gradient by name (`_Needs`), so an argument added to,
    moved in or renamed in forward takes its gradient with it and cannot shift the others'. Refuses
    what Function.apply cannot pass by position (keyword-only arguments, defaults) and the name
    `newest`, which stands for the newest chunk."""
    params = list(inspect.signature(cls.forward).parameters.values())
    if not params or params[0].name != "ctx":
        raise TypeError(f"{cls.__name__}.forward must take ctx first")
    names = []
    for i, p in enumerate(params[1:], 1):
        if p.kind is p.VAR_POSITIONAL and i == len(params) - 1:
            break
        if p.kind is not p.POSITIONAL_OR_KEYWORD or p.default is not p.empty:
            raise TypeError(f"{cls.__name__}.forward: {p.name} must be positional, without a default, and "
                            "only *chunks may follow the named arguments (Function.apply passes them by position)")
        names.append(p.name)
    if "newest" in names:
        raise TypeError(f"{cls.__name__}.forward: 'newest' names the newest chunk's gradient (_Needs)")
    cls.ARGS = tuple(names)
    return cls


class _Needs:
    """ctx.needs_input_grad by the names of forward's arguments (`ARGS` of each Function, derived from
    its signature by `function_args`), followed by the chunks x_0 ... x_{l-1}; of these only the newest,
    x_{l-1}, ever takes a gradient (`newest`): see "Backward order" in the package docstring
    (fused/__init__.py)."""

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
        """The tuple backward returns: grads[name] for the arguments that need one, None elsewhere. A name
        that is not one of forward's arguments (nor `newest`) is an error, not a gradient dropped."""
        unknown = grads.keys() - self._flags.keys() - {"newest"}
        if unknown:
            raise RuntimeError(f"fused dense block: gradients for {sorted(unknown)}, which are not arguments of "
                               f"forward {self._names}")
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
