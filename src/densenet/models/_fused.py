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

Each layer's BN-ReLU-Conv input part is one autograd node (`_LayerInput`) that reads the buffer and
saves only the ReLU output for the convolution's backward; with `memory_efficient` it saves nothing
and recomputes that output from the buffer in the backward pass, so activation memory grows linearly
with depth. Running statistics are updated once per step, in the forward pass; dropout and the rest of
each layer are ordinary autograd. tests/test_fused.py checks all of this against the reference path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function


def supported(layers) -> bool:
    """The fused path covers plain affine BatchNorm2d with running statistics (SyncBatchNorm and
    other replacements take the reference path, which calls the modules)."""
    return all(type(layer.norm1) is nn.BatchNorm2d and layer.norm1.affine
               and layer.norm1.track_running_stats for layer in layers)


class _BlockState:
    """What the autograd nodes of one dense block share."""

    __slots__ = ("buf", "mean", "var", "n", "grad", "dmean", "dvar", "version")

    def __init__(self, buf: torch.Tensor, batch_stats: bool):
        self.buf = buf  # (B, k0 + L*k, H, W): x_0, x_1, ..., x_L side by side
        c = buf.shape[1]
        self.n = buf.shape[0] * buf.shape[2] * buf.shape[3]
        acc = _acc_dtype(buf.dtype)
        stats = (lambda: torch.empty(c, device=buf.device, dtype=acc)) if batch_stats else (lambda: None)
        self.mean, self.var = stats(), stats()  # batch statistics per channel (biased variance)
        self.grad = self.dmean = self.dvar = None  # filled by the backward pass
        self.version = 0

    def write(self, lo: int, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.buf[:, lo:lo + x.shape[1]].copy_(x)
            if self.mean is not None:
                var, mean = torch.var_mean(x.to(self.mean.dtype), dim=(0, 2, 3), correction=0)
                self.mean[lo:lo + x.shape[1]] = mean
                self.var[lo:lo + x.shape[1]] = var


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and per-channel affine maps in float32 (float64 for float64 models)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _bn_relu(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """relu(x * scale + shift), per channel: BN with fixed statistics, then ReLU."""
    view = (1, -1, 1, 1)
    return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view)).relu_()


class _LayerInput(Function):
    """Conv(ReLU(BN(buffer[:, :c]))) with the block's shared statistics: one dense layer's input part."""

    @staticmethod
    def forward(ctx, st: _BlockState, c: int, mean, var, w, b, eps: float, conv_w, padding, recompute: bool,
                *chunks):
        x = st.buf[:, :c]  # (B, k0 + (l-1)k, H, W), a view: [x_0, ..., x_{l-1}] without a copy
        acc = _acc_dtype(x.dtype)
        invstd = torch.rsqrt(var.to(acc) + eps)
        scale = w.to(acc) * invstd
        shift = b.to(acc) - mean.to(acc) * scale
        dt = _compute_dtype(x)
        z = _bn_relu(x, scale, shift).to(dt)
        conv_w_dt = conv_w.to(dt)
        if torch.amp.is_autocast_available(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                out = F.conv2d(z, conv_w_dt, padding=padding)
        else:  # e.g. the meta device, used to count parameters and multiply-adds without memory
            out = F.conv2d(z, conv_w_dt, padding=padding)
        ctx.st, ctx.c, ctx.eps, ctx.padding, ctx.dt, ctx.conv_dtype = st, c, eps, padding, dt, conv_w.dtype
        ctx.lo = c - chunks[-1].shape[1]  # the newest input, x_{l-1}, occupies channels [lo, c)
        ctx.batch_stats = st.mean is not None
        # mean and var may be views of the block's statistics, which later layers extend in place:
        # kept on ctx, not in save_for_backward, whose version check would reject them.
        ctx.stats = (mean, var, invstd, scale, shift)
        ctx.save_for_backward(w, conv_w_dt, None if recompute else z)
        return out

    @staticmethod
    def backward(ctx, g):
        st, c, lo = ctx.st, ctx.c, ctx.lo
        if st.buf._version != st.version:
            raise RuntimeError("the output of a fused dense block was modified in place before backward; "
                               "clone it first, or build the model with fused=False")
        w, conv_w, z = ctx.saved_tensors
        mean, var, invstd, scale, shift = ctx.stats
        x = st.buf[:, :c]
        if z is None:  # memory-efficient mode: recompute the normalised input instead of storing it
            z = _bn_relu(x, scale, shift).to(ctx.dt)
        need = ctx.needs_input_grad
        need_x = any(need[10:]) or need[4] or need[5]
        gz, gconv, _ = torch.ops.aten.convolution_backward(
            g.to(ctx.dt), z, conv_w, None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1,
            [need_x, need[7], False])
        gw = gb = gnew = None
        if need_x:
            gz = torch.ops.aten.threshold_backward(gz, z, 0)
            _, gw, gb = torch.ops.aten.native_batch_norm_backward(
                gz, x, w, mean, var, None, None, False, ctx.eps, [False, True, True])
            # dL/dx through this layer's normalisation with the statistics held fixed, into the buffer
            st.grad[:, :c].addcmul_(gz, scale.to(gz.dtype).view(1, -1, 1, 1))
            if ctx.batch_stats:  # and through the shared statistics: accumulated, applied once below
                st.dmean[:c].sub_(gb * scale)
                st.dvar[:c].sub_(0.5 * gw * scale * invstd)
            if need[-1]:  # every reader of x_{l-1} has now run backward: its gradient is complete
                gnew = st.grad[:, lo:c]
                if ctx.batch_stats:
                    a = (2.0 / st.n) * st.dvar[lo:c]
                    b0 = st.dmean[lo:c] / st.n - a * st.mean[lo:c]
                    gnew = torch.addcmul(b0.to(gnew.dtype).view(1, -1, 1, 1), x[:, lo:c],
                                         a.to(gnew.dtype).view(1, -1, 1, 1)).add_(gnew)
        if gw is not None:
            gw, gb = gw.to(w.dtype), gb.to(w.dtype)
        gconv = gconv.to(ctx.conv_dtype) if gconv is not None else None
        n_chunks = len(need) - 10
        return (None, None, None, None, gw if need[4] else None, gb if need[5] else None, None,
                gconv, None, None) + (None,) * (n_chunks - 1) + (gnew,)


class _BlockOutput(Function):
    """Hands the buffer on as the block's output [x_0, ..., x_L]; its gradient seeds the gradient buffer."""

    @staticmethod
    def forward(ctx, st: _BlockState, *chunks):
        ctx.st = st
        ctx.lo = st.buf.shape[1] - chunks[-1].shape[1]
        st.version = 0 if st.buf.is_inference() else st.buf._version  # inference tensors have no version
        # A view, not the buffer itself: returning st.buf would make it the output, its grad_fn this
        # node, whose ctx holds st, which holds st.buf: a reference cycle through autograd's C++ graph
        # that Python's collector cannot free (measured: +20 MB per step, BENCHMARKS.md).
        return st.buf.view_as(st.buf)

    @staticmethod
    def backward(ctx, g):
        st = ctx.st
        st.grad = torch.empty_like(st.buf)
        st.grad.copy_(g)
        if st.mean is not None:
            st.dmean = torch.zeros_like(st.mean)
            st.dvar = torch.zeros_like(st.var)
        n_chunks = len(ctx.needs_input_grad) - 1
        return (None,) + (None,) * (n_chunks - 1) + (st.grad[:, ctx.lo:],)


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What nn.BatchNorm2d does to its buffers in a training step, from shared statistics."""
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_((var * (n / (n - 1))).to(bn.running_var.dtype), alpha=m)


def dense_block_forward(layers, x0: torch.Tensor, memory_efficient: bool) -> torch.Tensor:
    """[x_0, H_1(x_0), H_2([x_0, x_1]), ...] for the DenseLayers of one block, fused."""
    batch, c, h, w = x0.shape
    k = _growth(layers[0])
    fmt = (torch.channels_last if x0.is_contiguous(memory_format=torch.channels_last)
           and not x0.is_contiguous() else torch.contiguous_format)
    training = layers[0].norm1.training
    if training and batch * h * w == 1:
        raise ValueError("BatchNorm in training mode needs more than one value per channel: "
                         f"got a batch of {batch} with {h}x{w} maps; use a larger batch or model.eval()")
    buf = torch.empty((batch, c + len(layers) * k, h, w), dtype=x0.dtype, device=x0.device, memory_format=fmt)
    st = _BlockState(buf, batch_stats=training)
    st.write(0, x0)
    chunks = [x0]
    for layer in layers:
        bn = layer.norm1
        if training:
            mean, var = st.mean[:c], st.var[:c]
            with torch.no_grad():
                _update_running_stats(bn, mean, var, st.n)
        else:
            mean, var = bn.running_mean, bn.running_var
        y = _LayerInput.apply(st, c, mean, var, bn.weight, bn.bias, bn.eps, layer.conv1.weight,
                              layer.conv1.padding, memory_efficient, *chunks)
        new = layer.rest(y)  # (B, k, H, W)
        st.write(c, new)
        chunks.append(new)
        c += k
    return _BlockOutput.apply(st, *chunks)


def _growth(layer) -> int:
    return (layer.conv2 if layer.bottleneck else layer.conv1).out_channels
