"""The evaluation-mode dense block: the same function as the reference path, for prediction on the CPU.

In eval mode batch normalisation is a fixed per-channel affine map, so most of a dense layer can be
computed ahead of time, once per set of weights:

- the bottleneck's BN2 follows its 1x1 convolution directly, so it is folded into it:
  BN2(W1 z) = (s2 * W1) z + t2, with s2 = gamma2 / sqrt(var2 + eps) and t2 = beta2 - mean2 * s2;
  the 1x1 convolution becomes one matrix product with a bias (torch.addmm), then a ReLU;
- BN1 cannot be folded (a ReLU sits between it and the convolution): it is one pass of PyTorch's
  inference batch-norm kernel over the contiguous (c, N) rows of the block buffer, then a ReLU.

The block keeps the fused path's buffer, channel-major (C, B, H, W), that each layer reads the first
c channels of without a copy and writes its k new maps into; the normalised input and the bottleneck
maps live in two workspaces per block that every layer reuses. No autograd node is built. A layer is
five operations (BN, ReLU, addmm, ReLU, 3x3 convolution) and a copy of its k maps into the buffer.

The transition that follows such a block reads its buffer too, and pools before its 1x1 convolution
(they commute: 4x fewer multiply-adds), writing its output channel-major as well.

Folded weights are cached per block and recomputed when any of its parameters or buffers changes (a
training step, load_state_dict, .to()): the cache key is every tensor's storage and version counter.
The path is taken on the CPU, in eval mode, for float32/float64 models, when no gradient is needed
(torch.no_grad, torch.inference_mode, or no parameter and input requiring one), without autocast and
without hooks on the block's modules; anything else takes the fused or reference path.
tests/test_inference_path.py checks it against the reference path.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.float64)


def _plain_bn(bn) -> bool:
    # a BN left in training mode inside an eval-mode model (BN re-estimation, frozen-backbone recipes)
    # normalises by batch statistics and updates its running ones: not foldable
    return type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats and bn.running_var is not None \
        and not bn.training


def _plain_conv(conv) -> bool:
    return type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1) and conv.stride == (1, 1) \
        and conv.padding_mode == "zeros" and conv.bias is None


def _no_hooks(modules) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _needs_grad(x: torch.Tensor, module: nn.Module) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in module.parameters())


def _eligible(x: torch.Tensor, module: nn.Module) -> bool:
    if module.training or x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() != 4:
        return False
    if torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    return not _needs_grad(x, module)


def block_applies(block: nn.Module, layers, x0: torch.Tensor) -> bool:
    """Whether the eval-mode path computes this dense block's forward pass."""
    if not _eligible(x0, block):
        return False
    for layer in layers:
        if not (_plain_bn(layer.norm1) and _plain_conv(layer.conv1) and type(layer.relu1) is nn.ReLU):
            return False
        if layer.bottleneck and not (_plain_bn(layer.norm2) and _plain_conv(layer.conv2)
                                     and type(layer.relu2) is nn.ReLU and layer.conv1.kernel_size == (1, 1)):
            return False
        if layer.conv1.weight.dtype != x0.dtype:
            return False
    return _no_hooks(block.modules())


class _Frozen:
    """Per-layer tensors of one block for eval mode, and the key that says whether they are current."""

    __slots__ = ("key", "layers")

    def __init__(self, key, layers):
        self.key, self.layers = key, layers


_CACHE: "weakref.WeakKeyDictionary[nn.Module, _Frozen]" = weakref.WeakKeyDictionary()


def _tensors(module: nn.Module):
    return [t for t in (*module.parameters(), *module.buffers()) if t is not None]


def _key(module: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t.dtype, 0 if t.is_inference() else t._version) for t in _tensors(module))


def _bn_affine(bn: nn.BatchNorm2d, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BN, in float64 then cast: y = x * scale + shift."""
    scale = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return scale.to(dtype), shift.to(dtype)


@torch.no_grad()
def _freeze(block: nn.Module, layers) -> list[tuple]:
    frozen = []
    for layer in layers:
        w1 = layer.conv1.weight
        if layer.bottleneck:
            s2, t2 = _bn_affine(layer.norm2, w1.dtype)
            w1f = (w1.double().flatten(1) * s2.double()[:, None]).to(w1.dtype)  # (4k, c): BN2 folded in
            w1t = w1f.t().contiguous()  # (c, 4k): addmm(t2, z^T, w1t) is (N, 4k), pixel-major
            w2 = layer.conv2.weight.contiguous(memory_format=torch.channels_last)
            frozen.append((layer.norm1, w1t, t2, w2, layer.conv2.padding))
        else:
            frozen.append((layer.norm1, None, None, w1.contiguous(memory_format=torch.channels_last),
                           layer.conv1.padding))
    return frozen


def _frozen(block: nn.Module, layers) -> list[tuple]:
    key = _key(block)
    f = _CACHE.get(block)
    if f is None or f.key != key:
        with torch.inference_mode(False):  # usable outside inference_mode too
            f = _CACHE[block] = _Frozen(key, _freeze(block, layers))
    return f.layers


def _bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d, out: torch.Tensor) -> torch.Tensor:
    """relu(BN(x)) of x (c, N) with running statistics, into out (c, N): PyTorch's inference BN kernel
    on the contiguous (1, c, N, 1) view, the fastest single pass for a per-channel affine map."""
    c = x.shape[0]
    torch.ops.aten.native_batch_norm.out(x.view(1, c, -1, 1), bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                         False, 0.0, bn.eps, out=out.view(1, c, -1, 1),
                                         save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
    return out.relu_()


class FrozenOutput:
    """Marks an eval-mode block's output for the transition after it (models.densenet.DenseBlock records
    it in the block's `_fused.BlockOutputs`): that output is the block buffer, channel-major. It holds
    nothing: a reference to the buffer, a view of the output, would keep the output alive."""

    __slots__ = ()


FROZEN_OUTPUT = FrozenOutput()


def dense_block_forward(block: nn.Module, layers, x0: torch.Tensor) -> torch.Tensor:
    """[x_0, H_1(x_0), H_2([x_0, x_1]), ...] in eval mode: (B, C, H, W), a channel-major view of the
    buffer (the caller records it with FROZEN_OUTPUT for the transition)."""
    frozen = _frozen(block, layers)
    b, c, h, w = x0.shape
    n = b * h * w
    k = (layers[0].conv2 if layers[0].bottleneck else layers[0].conv1).out_channels
    total = c + len(layers) * k
    out = torch.empty_strided((b, total, h, w), (h * w, n, w, 1), dtype=x0.dtype, device=x0.device)
    buf = out.permute(1, 0, 2, 3)  # (C, B, H, W), contiguous
    rows = buf.view(total, n)
    buf[:c].copy_(x0.permute(1, 0, 2, 3))
    zs = torch.empty(total * n, dtype=x0.dtype, device=x0.device)  # the normalised input, (c, N)
    width = max((f[1].shape[1] for f in frozen if f[1] is not None), default=0)
    ys = torch.empty((n, width), dtype=x0.dtype, device=x0.device) if width else None  # bottleneck maps
    for bn1, w1t, t2, w2, pad in frozen:
        z = _bn_relu(rows[:c], bn1, zs[:c * n].view(c, n))
        if w1t is not None:  # BN-ReLU-Conv1x1 (BN2 folded) -ReLU, pixel-major (N, 4k), then the 3x3
            y = torch.addmm(t2, z.t(), w1t, out=ys).relu_()
            new = F.conv2d(y.view(b, h, w, -1).permute(0, 3, 1, 2), w2, padding=pad)
        else:  # DenseNet without bottleneck: the 3x3 convolution reads the prefix itself
            new = F.conv2d(z.view(c, b, h, w).permute(1, 0, 2, 3), w2, padding=pad)
        buf[c:c + k].copy_(new.permute(1, 0, 2, 3))
        c += k
    return out


def transition_applies(transition: nn.Module, x: torch.Tensor, source) -> bool:
    """Whether the eval-mode path computes the transition of x, the output of its block (`source`:
    what the block recorded for x)."""
    if source is not FROZEN_OUTPUT or not _eligible(x, transition):
        return False
    return _plain_bn(transition.norm) and type(transition.relu) is nn.ReLU and type(transition.conv) is nn.Conv2d \
        and transition.conv.kernel_size == (1, 1) and _plain_conv(transition.conv) \
        and type(transition.pool) is nn.AvgPool2d and transition.pool.kernel_size in (2, (2, 2)) \
        and transition.pool.stride in (2, (2, 2)) and transition.pool.padding in (0, (0, 0)) \
        and not transition.pool.ceil_mode and _no_hooks(transition.modules()) \
        and transition.conv.weight.dtype == x.dtype


def transition_forward(transition: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BN-ReLU-AvgPool2x2-Conv1x1 (pooling and a 1x1 convolution commute) of an eval-mode block's buffer;
    (B, o, H/2, W/2), channel-major."""
    buf = x.permute(1, 0, 2, 3)  # x is an eval-mode block's output (transition_applies): the buffer
    c, b, h, w = buf.shape
    z = _bn_relu(buf.reshape(c, -1), transition.norm, torch.empty((c, b * h * w), dtype=x.dtype, device=x.device))
    z = z.view(c, b, h, w)[..., :h // 2 * 2, :w // 2 * 2]
    zr = z[..., 0::2, :] + z[..., 1::2, :]
    zp = (zr[..., 0::2] + zr[..., 1::2]).mul_(0.25)  # (c, B, H/2, W/2)
    o = transition.conv.out_channels
    y = torch.mm(transition.conv.weight.view(o, c), zp.view(c, -1))  # (o, N/4)
    return y.view(o, b, h // 2, w // 2).permute(1, 0, 2, 3)
