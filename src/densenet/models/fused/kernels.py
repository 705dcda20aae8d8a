"""The fused block's numeric kernels, on (c, N) matrices of a block's buffer (N = B*H*W): BN-ReLU with
fixed statistics, batch statistics, 2x2 average pooling, 1x1 convolutions as matrix products (oneDNN
for the backward products), dropout masks, the running-statistics update; and the public computations
that stand in for the private operators they call where those are missing (models._torch_compat)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import options
from .. import _torch_compat

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
    _torch_compat.call("native_batch_norm_out", _batch_norm_into, x.view(1, c, -1, 1), w, b, mean, var, False,
                       0.0, eps, out=dst.view(1, c, -1, 1), save_mean=x.new_empty(0, dtype=acc),
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


# oneDNN's matrix product (the kernel torch.compile's CPU backend calls for linear layers): the two
# products of a 1x1 convolution's backward pass run in it, the forward product in torch.mm (MKL). A
# rule from measurements on both ISAs of an AMD Zen 4 (BENCHMARKS_HISTORY.md, "Third pass", item 3; not measured
# on Intel): with oneDNN a DenseNet-BC-100 training step is 1.16x (AVX-512) and 1.05x (AVX2) faster,
# DenseNet-121 1.02x and 1.00x; oneDNN for the forward product as well was slower (0.92x for
# DenseNet-121), because its output comes channel-major and has to be transposed. Float32 on the CPU only; False, or
# DENSENET_ONEDNN_BACKWARD=0 in the environment, uses torch.mm everywhere.
# The operator is private (torch.ops.mkldnn._linear_pointwise, models._torch_compat): it is checked once
# against torch.mm, on small matrices, before its first use; where it is missing or differs, torch.mm.
ONEDNN_BACKWARD: bool = options.flag("DENSENET_ONEDNN_BACKWARD", True)


def _onednn(t: torch.Tensor) -> bool:
    return ONEDNN_BACKWARD and t.dtype == torch.float32 and t.device.type == "cpu" \
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled \
        and _torch_compat.available("linear_pointwise")


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x w^T in oneDNN's product (mkldnn._linear_pointwise), or in torch.mm if it fails at its first use."""
    return _torch_compat.call("linear_pointwise", _mm_linear, x, w, None, "none", [], "")


def _mm_linear(x: torch.Tensor, w: torch.Tensor, bias, attr, scalars, algorithm) -> torch.Tensor:
    """mkldnn._linear_pointwise(x, w, None, "none", [], "") in torch.mm: x w^T."""
    return torch.mm(x, w.t())


def _conv1x1(z: torch.Tensor, conv_w: torch.Tensor, shape) -> torch.Tensor:
    """1x1 convolution of z (c, N) as a matrix product, written channels_last: (B, o, H, W)."""
    b, h, w = shape
    o = conv_w.shape[0]
    y = torch.mm(z.t(), conv_w.view(o, -1).t())  # (N, o): pixel-major
    return y.view(b, h, w, o).permute(0, 3, 1, 2)


def _input_grad(conv_w: torch.Tensor, g2: torch.Tensor, st, c: int, dt: torch.dtype) -> torch.Tensor:
    """dL/dz (c, N) = W^T g2^T of a 1x1 convolution from dL/dy g2 (N, o): in oneDNN (a new tensor), or
    in torch.mm into the block's workspace (st: the block's `state._BlockState`)."""
    w = conv_w.view(conv_w.shape[0], -1)
    if _onednn(g2):  # (contiguous(): a no-op for the gradients that arrive here, cheap insurance otherwise)
        return _linear(w.t().contiguous(), g2.contiguous())
    return torch.mm(w.t(), g2.t(), out=st.workspace("gz", c, dt))


def _weight_grad(z: torch.Tensor, g2: torch.Tensor, conv_w: torch.Tensor) -> torch.Tensor:
    """dL/dW (o, c) of a 1x1 convolution from z (c, N) and dL/dy g2 (N, o), computed as (z g2)^T:
    in oneDNN, or in torch.mm, where z g2 is 1.15x to 1.35x faster than g2^T z^T (the same sums)."""
    if _onednn(z):
        return _linear(z, g2.contiguous().t()).t().reshape(conv_w.shape)
    return torch.mm(z, g2).t().reshape(conv_w.shape)


def _pixel_major(g: torch.Tensor) -> torch.Tensor:
    """(B, o, H, W) -> (N, o), a view when g is channels_last."""
    return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])


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
    from ..common import dropout

    noise = dropout(torch.ones(x.shape, dtype=x.dtype, device=x.device), p, True)
    return x * noise, noise != 0


def _undrop(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x * noise for the dropout noise that `keep` records: 0, or 1 / (1 - p) as F.dropout computes it."""
    scale = torch.ones((), dtype=x.dtype, device=x.device).div_(1 - p)
    return x * (keep * scale)


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What nn.BatchNorm2d does to its buffers in a training step, from shared statistics."""
    bn.num_batches_tracked.add_(1)
    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
    bn.running_var.mul_(1 - m).add_((var * (n / (n - 1))).to(bn.running_var.dtype), alpha=m)


# --- public stand-ins for the private operators above (models._torch_compat), with their arguments -----
# Each computes what the operator computes, from the same arguments, in public operations: where the
# operator is missing, or raised at its first use, the fused path runs on with these.

def _batch_norm_into(x, w, b, mean, var, training, momentum, eps, *, out, save_mean, save_invstd):
    """aten.native_batch_norm.out with fixed statistics (training False): F.batch_norm into out."""
    with _no_autocast(x.device):
        out.copy_(F.batch_norm(x.to(mean.dtype), mean, var, w, b, False, 0.0, eps))
    return out, save_mean, save_invstd


def _relu_backward(grad, result, threshold, *, grad_input):
    """aten.threshold_backward.grad_input: grad where result > threshold, else 0, into grad_input."""
    if grad_input is not grad:
        grad_input.copy_(grad)
    return grad_input.masked_fill_(result <= threshold, 0)


def _batch_norm_backward(grad_out, x, w, running_mean, running_var, save_mean, save_invstd, train, eps,
                         output_mask):
    """aten.native_batch_norm_backward by autograd of F.batch_norm: dL/dx, dL/dweight, dL/dbias
    (None where output_mask says so), for the statistics of the batch (train) or the running ones."""
    acc = save_invstd.dtype
    with torch.enable_grad(), _no_autocast(x.device):
        xs = x.detach().to(acc).requires_grad_(bool(output_mask[0]))
        ws = w.detach().to(acc).requires_grad_(bool(output_mask[1]))
        bs = torch.zeros_like(ws).requires_grad_(bool(output_mask[2]))
        stats = (None, None) if train else (running_mean.to(acc), running_var.to(acc))
        y = F.batch_norm(xs, *stats, ws, bs, training=train, momentum=0.0, eps=eps)
        return _grads(y, grad_out.to(acc), (xs, ws, bs), output_mask, (x.dtype, w.dtype, w.dtype))


def _convolution_backward(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                          groups, output_mask):
    """aten.convolution_backward of a convolution without bias, not transposed, by autograd of F.conv2d:
    dL/dx, dL/dw and None."""
    with torch.enable_grad(), _no_autocast(x.device):
        xs = x.detach().requires_grad_(bool(output_mask[0]))
        ws = w.detach().requires_grad_(bool(output_mask[1]))
        y = F.conv2d(xs, ws, None, stride, padding, dilation, groups)
        return _grads(y, grad_out, (xs, ws, None), (output_mask[0], output_mask[1], False),
                      (x.dtype, w.dtype, None))


def _grads(y, grad_out, inputs, mask, dtypes) -> tuple:
    wanted = [t for t, m in zip(inputs, mask) if m]
    got = iter(torch.autograd.grad(y, wanted, grad_out) if wanted else ())
    return tuple(next(got).to(dt) if m else None for m, dt in zip(mask, dtypes))
