"""The fused block's twin for torch.compile: the same arithmetic in plain, differentiable operations."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .kernels import _acc_dtype, _affine, _compute_dtype, _update_running_stats


def dense_block_traceable(layers, x0: torch.Tensor, memory_efficient: bool) -> torch.Tensor:
    """The fused block's function in plain, differentiable PyTorch operations: what torch.compile traces.

    The autograd Functions (functions.py) share a Python state object and write into buffers in place, which
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

