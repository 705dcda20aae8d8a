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

How the buffer is laid out, and why (figures: BENCHMARKS_HISTORY.md, "Where the time went"):

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
(`transition_forward`), which is handed the block's state explicitly (`HandOver`, passed from the
block to the transition by `DenseNet.features`, a `DenseFeatures`): it uses the shared statistics too, and pools before its 1x1 convolution
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

Each Function names its forward arguments in `ARGS`, read from forward's signature (`function_args`),
so that they cannot drift apart; `_Needs` reads needs_input_grad and builds the returned gradients by
those names. What a node that reads the buffer needs again in its backward pass
is one record it owns (`_BNReLUInput`, ctx.input). The backward passes compute in place, outside
autograd, so higher-order gradients raise an error that names fused=False (`_no_double_backward`).

Under torch.compile none of this runs: `dense_block_traceable` writes the same arithmetic as plain
operations, which the compiler traces as one graph (no graph breaks) and fuses itself.

On a GPU the same code runs; `ScratchPool` (a CPU page-fault workaround) is bypassed there, and batch
statistics use torch.var_mean (one pass).

The private PyTorch APIs this needs (aten kernels called directly, oneDNN's product, autograd's
backward-pass id, the version counter) are reached through models/_torch_compat.py, each with a
fallback: a public computation of the same kernel, or the reference path, with a warning, once.
"""
from __future__ import annotations

# The entry points models/densenet.py calls, gathered here (each is defined in the module named):
# which path a block takes (policy), a block's scratch memory and its hand-over to the transition after
# it (state), the eager fused block and transition (block), the same arithmetic for torch.compile
# (traceable). The package's modules:
#   policy.py     which path a dense block takes: FUSED_BY_DEVICE, reference_path(), supported()
#   state.py      a block's buffer, statistics and scratch memory: ScratchPool, _BlockState, HandOver
#   kernels.py    the numeric kernels: BN-ReLU, batch statistics, pooling, 1x1 products, dropout masks
#   nodes.py      what the autograd nodes share: a reader of the buffer, gradients by name, backward order
#   functions.py  the autograd Functions: _LayerInput, _RecomputedLayer, _BlockOutput, _TransitionInput
#   block.py      the fused block and transition: dense_block_forward, transition_forward
#   traceable.py  the twin in plain operations that torch.compile traces: dense_block_traceable
from .block import dense_block_forward, transition_forward, transition_supported
from .policy import default_fused, reference_path, reference_path_active, supported
from .state import HandOver, ScratchPool
from .traceable import dense_block_traceable

__all__ = ["HandOver", "ScratchPool", "default_fused", "dense_block_forward", "dense_block_traceable",
           "reference_path", "reference_path_active", "supported", "transition_forward", "transition_supported"]
