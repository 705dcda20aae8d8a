"""The fused dense block and the transition after it, eager: the block's nodes created in order over
one state (`dense_block_forward`), and the transition reading that state (`transition_forward`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .functions import _BlockOutput, _LayerInput, _RecomputedLayer, _TransitionInput
from .kernels import _update_running_stats
from .policy import _plain_bn
from .state import _BlockState


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
    state (buffer and statistics), which the transition after the block reads (`HandOver`).

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
    from ..common import dropout  # the masks of the reference path, whatever the layout

    return transition.pool(dropout(y, drop.p, transition.training))


def _growth(layer) -> int:
    return (layer.conv2 if layer.bottleneck else layer.conv1).out_channels
