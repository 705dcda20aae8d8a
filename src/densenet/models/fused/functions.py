"""The fused block's autograd Functions: a layer's input part (`_LayerInput`), a whole recomputed
bottleneck layer (`_RecomputedLayer`), the block's output (`_BlockOutput`) and the transition's input
part (`_TransitionInput`). Each reads the block's buffer and adds to its gradient buffer in place, in
the backward order the package docstring describes ("Backward order")."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from .. import _torch_compat
from .kernels import (_acc_dtype, _affine, _avg_pool2, _avg_pool2_backward, _batch_norm_backward, _conv1x1,
                      _convolution_backward, _dropped, _input_grad, _no_autocast, _pixel_major, _relu_backward,
                      _scale_shift_relu, _undrop, _update_running_stats, _var_mean, _weight_grad)
from .nodes import _begin_backward, _BNReLUInput, _finished_grad, _Needs, function_args
from .state import _BlockState, _version


@function_args
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
            gz4, grads["conv_w"], _ = _torch_compat.call(
                "convolution_backward", _convolution_backward, g, z.view(c, *bhw).permute(1, 0, 2, 3), conv_w, None,
                [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1, [need_x, need.conv_w, False])
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


@function_args
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
        gu, gconv2, _ = _torch_compat.call(
            "convolution_backward", _convolution_backward, g, u, conv2_w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
            1, [True, need.conv2_w, False])
        del g
        _torch_compat.call("threshold_backward", _relu_backward, gu, u, 0, grad_input=gu)
        del u
        # saved statistics always given (the CUDA kernel asserts them), in the accumulation dtype; running
        # ones only in eval mode, where they are read, and then in the weight's dtype as BN keeps them
        gy, gw2, gb2 = _torch_compat.call(
            "native_batch_norm_backward", _batch_norm_backward, gu, y, w2, None if training2 else mean2,
            None if training2 else var2, mean2.to(invstd2.dtype), invstd2, training2, eps2, [True, need.w2, need.b2])
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


@function_args
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

    @staticmethod
    def backward(ctx, g):
        st = _begin_backward(ctx)
        c = st.buf.shape[0]
        st.add_grad(None if g is None else g.permute(1, 0, 2, 3).reshape(c, st.n))
        need = _Needs(ctx, _BlockOutput.ARGS)
        return need.gradients({"newest": _finished_grad(st, ctx.lo, c) if need.newest else None})


@function_args
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

