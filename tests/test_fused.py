"""The fused dense block and the memory-efficient mode compute the paper's function exactly:
outputs, gradients and BN running statistics against the plain (reference) implementation."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn as nn

import densenet
from densenet.models import fused

from helpers import MODES, NETS, assert_same, build, train_step


@pytest.mark.parametrize("name, kw", NETS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"fused{int(m['fused'])}-memeff{int(m['memory_efficient'])}")
def test_same_outputs_gradients_and_bn_statistics_as_plain(name, kw, mode, device):
    x = torch.randn(4, 3, 48, 40, dtype=torch.double, device=device)
    plain = build(name, kw, device, fused=False, memory_efficient=False)
    other = build(name, kw, device, **mode)
    other.load_state_dict(plain.state_dict())
    for seed in (1, 2):  # two steps: the second starts from updated running statistics
        assert_same(train_step(other, x, seed), train_step(plain, x, seed))
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), plain.eval()(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES[:2] + [dict(fused=False, memory_efficient=False)])
def test_running_statistics_updated_exactly_once_per_step(mode):
    """torchvision and timm re-run BN in training mode when recomputing: num_batches_tracked + 2 and
    momentum 0.19. One step here moves every BN exactly as nn.BatchNorm2d does once."""
    m = densenet.create_model("densenet_bc_100_k12", depth=16, **mode).train()
    x = torch.randn(8, 3, 16, 16)
    m(x).sum().backward()
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(bn.num_batches_tracked.item() == 1 for bn in bns)
    # the first BN of the first layer sees the stem output: its running mean is 0.1 * batch mean
    layer = m.features.denseblock1.denselayer1
    with torch.no_grad():
        stem = m.features.conv0(x)
    torch.testing.assert_close(layer.norm1.running_mean, 0.1 * stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.norm1.running_var, 0.9 + 0.1 * stem.var((0, 2, 3), unbiased=True),
                               rtol=1e-4, atol=1e-6)


def test_torchvision_memory_efficient_updates_twice_we_do_not():
    from torchvision.models.densenet import _DenseBlock

    tv = _DenseBlock(2, 8, 4, 4, 0.0, memory_efficient=True).train()
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    tv(x).sum().backward()
    assert tv.denselayer1.norm1.num_batches_tracked.item() == 2  # the pitfall this package avoids
    ours = densenet.create_model("densenet_bc_100_k12", depth=10, memory_efficient=True).train()
    ours(torch.randn(4, 3, 8, 8)).sum().backward()
    assert ours.features.denseblock1.denselayer1.norm1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("mode", MODES)
def test_frozen_layers(mode, device):
    """Frozen stem and first block (fine-tuning): gradients of the rest are unchanged, frozen ones None."""
    x = torch.randn(4, 3, 32, 32, dtype=torch.double, device=device)
    plain = build("densenet_bc_100_k12", dict(depth=16), device, fused=False, memory_efficient=False)
    other = build("densenet_bc_100_k12", dict(depth=16), device, **mode)
    other.load_state_dict(plain.state_dict())
    for m in (plain, other):
        for p in list(m.features.conv0.parameters()) + list(m.features.denseblock1.parameters()):
            p.requires_grad_(False)
        for p in m.features.denseblock2.denselayer2.norm1.parameters():
            p.requires_grad_(False)  # a frozen BN in the middle of a block
    a, b = train_step(other, x), train_step(plain, x)
    for n, p in other.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), n
    assert a[1].keys() == b[1].keys()
    assert_same(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_and_input_gradients(mode, device):
    m = densenet.create_model("densenet_bc_100_k12", depth=16, **mode).to(device).train()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 16, 16, device=device))
    assert not y.requires_grad
    assert m.features.denseblock1.denselayer1.norm1.num_batches_tracked.item() == 1
    # eval mode with gradients w.r.t. the input (saliency, Grad-CAM): same as the plain path
    plain = densenet.create_model("densenet_bc_100_k12", depth=16, fused=False).double().to(device).eval()
    m = m.double().eval()
    m.load_state_dict(plain.state_dict())
    x1 = torch.randn(2, 3, 16, 16, dtype=torch.double, device=device, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    m(x1)[:, 3].sum().backward()
    plain(x2)[:, 3].sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.slow
def test_memory_efficient_saves_linear_activation_memory():
    """Bytes kept for the backward pass by autograd: quadratic in block depth in the plain mode,
    linear with memory_efficient (plus the block buffers, which are linear by construction)."""
    def saved_bytes(n, **mode):
        m = densenet.create_model("densenet_bc_100_k12", depth=6 * n + 4, **mode).train()
        storages = {}  # count each storage once: many nodes save views of the same tensor
        weights = {p.untyped_storage().data_ptr() for p in m.parameters()}  # not activations

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(torch.randn(2, 3, 16, 16))
        return sum(storages.values())

    ratios = {}
    for fused in (False, True):
        for me in (False, True):
            s = [saved_bytes(n, memory_efficient=me, fused=fused) for n in (8, 16, 32)]
            ratios[fused, me] = s[2] / s[1]
    assert ratios[False, False] > 2.5  # quadratic: the concatenation and its normalisation, every layer
    assert ratios[False, True] < 2.1  # doubling the depth (at most) doubles what is stored
    # the fused path recomputes each layer's normalised input from the block buffer in both modes
    assert ratios[True, False] < 2.1 and ratios[True, True] < 2.1


def test_in_place_modification_of_output_is_caught():
    m = densenet.create_model("densenet_bc_100_k12", depth=10).train()
    out = m.features[:2](torch.randn(2, 3, 8, 8))  # conv0, denseblock1
    with pytest.raises(RuntimeError, match="modified inplace.*clon"):  # says what to do: clone it
        out.mul_(2)
        out.sum().backward()
    with torch.no_grad():  # without autograd there is nothing to protect
        m.features[:2](torch.randn(2, 3, 8, 8)).mul_(2)


def _ddp_worker(rank, world, init_file, result_file, mode):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build("densenet_bc_100_k12", dict(depth=16, drop_rate=0.1), **mode)
        model.features.conv0.weight.requires_grad_(False)  # a frozen layer under DDP, too
        ddp = DDP(model)
        torch.manual_seed(123)
        x = torch.randn(2 * world, 3, 16, 16, dtype=torch.double)[2 * rank:2 * rank + 2]
        torch.manual_seed(10 + rank)
        ddp(x).sum().backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, result_file)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES[1:], ids=["fused-memeff", "reference-memeff"])
def test_memory_efficient_under_ddp(tmp_path, mode):
    """Two gloo processes: DDP's averaged gradients equal the mean of each half's own gradients."""
    import torch.multiprocessing as mp

    result = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(result), mode), nprocs=2, join=True)
    ddp_grads = torch.load(result, weights_only=True)
    torch.manual_seed(123)
    x = torch.randn(4, 3, 16, 16, dtype=torch.double)
    expected = {}
    for rank in range(2):
        model = build("densenet_bc_100_k12", dict(depth=16, drop_rate=0.1), fused=False)
        model.features.conv0.weight.requires_grad_(False)
        torch.manual_seed(10 + rank)
        model(x[2 * rank:2 * rank + 2]).sum().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, 0) + p.grad / 2
    assert ddp_grads.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(ddp_grads[n], expected[n], rtol=1e-6, atol=1e-9, msg=n)


@pytest.mark.parametrize("backward", [True, False])
def test_no_block_state_outlives_its_graph(backward):
    """Each step's buffers are freed with its graph (a reference cycle through the autograd graph once
    leaked ~20 MB per training step)."""
    import gc

    from densenet.models.fused import state

    def alive():
        gc.collect()
        return sum(type(o) is state._BlockState for o in gc.get_objects())

    before = alive()  # earlier tests may still hold graphs (pytest keeps tracebacks)
    m = densenet.create_model("densenet_bc_100_k12", depth=10).train()
    for _ in range(3):
        y = m(torch.randn(2, 3, 8, 8))
        if backward:
            y.sum().backward()
        del y
    assert alive() == before


def test_inference_mode(device):
    m = densenet.create_model("densenet_bc_100_k12", depth=10).to(device).eval()
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.inference_mode():
        a = m(x)
    with torch.no_grad():
        torch.testing.assert_close(a, m(x))


@pytest.mark.parametrize("name, kw", NETS[1:])
@pytest.mark.parametrize("channels_last", [False, True])
def test_odd_sizes_and_channels_last_input(name, kw, channels_last, device):
    """Odd map sizes (the transition's pooling drops the last row and column) and channels_last input,
    through the fused transition that pools before its convolution: same as the plain path."""
    x = torch.randn(3, 3, 45, 37, dtype=torch.double, device=device)
    plain = build(name, kw, device, fused=False)
    fused = build(name, kw, device, fused=True)
    fused.load_state_dict(plain.state_dict())
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        xf = x.contiguous(memory_format=torch.channels_last)
    else:
        xf = x
    for seed in (1, 2):
        assert_same(train_step(fused, xf, seed), train_step(plain, x, seed))


@pytest.mark.parametrize("mode", MODES[:2], ids=["fused", "fused-memeff"])
def test_two_forward_passes_then_one_backward(mode, device):
    """Two graphs of the same blocks alive at once (the scratch memory a block keeps between steps
    must not be shared by them): gradients of the summed losses equal the plain path's."""
    x1 = torch.randn(2, 3, 40, 40, dtype=torch.double, device=device)
    x2 = torch.randn(3, 3, 40, 40, dtype=torch.double, device=device)
    grads = []
    for m in (build("densenet121", dict(block_config=(2, 3, 2, 2)), device, fused=False),
              build("densenet121", dict(block_config=(2, 3, 2, 2)), device, **mode)):
        m.train()
        with torch.no_grad():
            m.eval()(x1)  # an inference pass in between leaves nothing behind
        m.train()
        (m(x1).square().sum() + m(x2).sum()).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-10, msg=n)


@pytest.mark.parametrize("mode", MODES[:2], ids=["fused", "fused-memeff"])
def test_bfloat16_autocast_matches_the_plain_path(mode, device):
    """Under autocast (bf16 maps, float32 weights and statistics) the fused path computes what
    the plain path does, to bf16 precision, in training and in evaluation."""
    x = torch.randn(4, 3, 32, 32, device=device)
    plain = densenet.create_model("densenet_bc_100_k12", depth=16, fused=False).to(device)
    fused = densenet.create_model("densenet_bc_100_k12", depth=16, **mode).to(device)
    fused.load_state_dict(plain.state_dict())
    for train in (True, False):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            a, b = fused.train(train)(x), plain.train(train)(x)
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def autocast_gradient_errors(mode, dtype, device):
    """Mean relative error (over parameters, Frobenius norm) of the autocast gradients of the fused and
    of the reference path against float64: (fused, reference)."""
    x = torch.randn(4, 3, 16, 16, device=device)
    plain = densenet.create_model("densenet_bc_100_k12", depth=16, fused=False).to(device)
    fused = densenet.create_model("densenet_bc_100_k12", depth=16, **mode).to(device)
    exact = densenet.create_model("densenet_bc_100_k12", depth=16, fused=False).double().to(device)
    fused.load_state_dict(plain.state_dict())
    exact.load_state_dict(plain.state_dict())
    exact(x.double()).log_softmax(1)[:, 0].mean().backward()
    errors = []
    for m in (fused, plain):
        with torch.autocast(device.type, dtype=dtype):
            y = m(x)
        assert y.dtype == dtype
        y.float().log_softmax(1)[:, 0].mean().backward()
        errors.append(sum(((p.grad.double() - e.grad).norm() / e.grad.norm()).item()
                          for p, e in zip(m.parameters(), exact.parameters())) / len(list(exact.parameters())))
    return errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES[:2], ids=["fused", "fused-memeff"])
def test_autocast_gradients_as_accurate_as_the_reference_path(mode, dtype, device):
    """Low-precision maps, float32 statistics: the fused path's gradients are as close to the float64
    ones as the reference path's (its BN is centred before scaling, as batch norm computes it; the
    uncentred x * scale + shift once doubled the float16 error)."""
    fused_err, plain_err = autocast_gradient_errors(mode, dtype, device)
    assert fused_err <= 1.5 * plain_err + 0.02, (fused_err, plain_err)


# --- the fused block's parts: gradcheck, the small backward helpers, debug mode, scratch memory, the
# block-transition unit and the one way to choose the reference path ---------------------------------------

def tiny_block(memory_efficient: bool, drop_rate: float = 0.0):
    """A 2-layer bottleneck block (k = 2, 3 input maps) and the transition after it, float64."""
    from densenet.models.densenet import DenseBlock, DenseNetConfig, Transition

    cfg = DenseNetConfig(growth_rate=2, block_config=(2, 1), bn_size=2, num_init_features=3, fused=True,
                         memory_efficient=memory_efficient, drop_rate=drop_rate)
    torch.manual_seed(0)
    block, trans = DenseBlock(2, 3, cfg).double().train(), Transition(7, 3, cfg).double().train()
    for bn in (m for m in (*block.modules(), *trans.modules()) if isinstance(m, nn.BatchNorm2d)):
        with torch.no_grad():  # not 1 and 0: every term of the BN gradient counts
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return block, trans


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["default", "memeff"])
def test_gradcheck_of_a_two_layer_block_and_its_transition(memory_efficient):
    """torch.autograd.gradcheck (float64 finite differences) of the fused nodes' hand-written backward,
    with respect to the input and every parameter, through the shared batch statistics: of the block's
    output and of the transition's, which both read the block's buffer (one backward pass)."""
    from torch.func import functional_call

    block, trans = tiny_block(memory_efficient)
    names = [n for n, _ in block.named_parameters()] + [f"t.{n}" for n, _ in trans.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in (*block.parameters(), *trans.parameters())]
    x = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    # random projections of the outputs: 2 + 2 backward passes instead of one per output element
    proj_block, proj_trans = torch.randn(2, 2 * 7 * 4 * 4, dtype=torch.double), torch.randn(2, 2 * 3 * 2 * 2).double()
    nodes = set()

    def f(x, *ps):
        p = dict(zip(names, ps))
        hand_over = fused.HandOver()  # what DenseFeatures passes from a block to its transition
        out = functional_call(block, {n: v for n, v in p.items() if not n.startswith("t.")}, (x, hand_over))
        y = functional_call(trans, {n[2:]: v for n, v in p.items() if n.startswith("t.")}, (out, hand_over))
        nodes.update(type(t.grad_fn).__name__ for t in (out, y))
        return proj_block @ out.reshape(-1), proj_trans @ y.reshape(-1)

    # fast mode: the derivative along a random direction of all inputs at once, by finite differences
    # and by the backward pass (the full Jacobian is ~40x slower on 2 cores; a wrong term fails both)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    assert nodes == {"_BlockOutputBackward", "_TransitionInputBackward"}  # the fused nodes, not a fallback


def test_bn_relu_input_backward_and_finished_grad_equal_autograd():
    """One reader of the buffer with batch statistics: dL/dx through the reader's affine map
    (_BNReLUInput.backward) plus the term through the shared statistics (_finished_grad) is autograd's
    gradient of relu(batch_norm(x)); dL/dgamma and dL/dbeta too."""
    from densenet.models.fused import nodes, state

    x = torch.randn(3, 4, 5, 2, dtype=torch.double) * 2 + 1
    w = torch.rand(4, dtype=torch.double) + 0.5
    b = torch.randn(4, dtype=torch.double)
    gy = torch.randn(3, 4, 5, 2, dtype=torch.double)
    for batch_stats in (True, False):
        rm, rv = torch.randn(4, dtype=torch.double), torch.rand(4, dtype=torch.double) + 0.5
        st = state._BlockState(x, 4, batch_stats=batch_stats, pool=state.ScratchPool())
        st.write(0, x)
        mean, var = (st.mean, st.var) if batch_stats else (rm, rv)
        inp = nodes._BNReLUInput(st, 4, mean, var, w, b, 1e-5)
        z = inp.z()
        gw, gb = inp.backward(gy.permute(1, 0, 2, 3).reshape(4, -1).clone(), z, w)
        gx = nodes._finished_grad(st, 0, 4)
        xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
        yr = torch.relu(nn.functional.batch_norm(xr, None if batch_stats else rm, None if batch_stats else rv, wr, br,
                                                 training=batch_stats, eps=1e-5))
        torch.testing.assert_close(z.view(4, 3, 5, 2).permute(1, 0, 2, 3), yr.detach())
        yr.backward(gy)
        torch.testing.assert_close(gx, xr.grad)
        torch.testing.assert_close(gw, wr.grad)
        torch.testing.assert_close(gb, br.grad)


@pytest.mark.parametrize("size", [(4, 6), (5, 7)])
def test_avg_pool2_and_its_backward_equal_pytorch(size):
    from densenet.models.fused import kernels

    z = torch.randn(3, 2, *size, dtype=torch.double, requires_grad=True)
    ref = nn.functional.avg_pool2d(z, 2)
    torch.testing.assert_close(kernels._avg_pool2(z.detach()), ref.detach())
    gp = torch.randn_like(ref)
    ref.backward(gp)
    out = torch.full_like(z, float("nan"))  # every element written, the unpooled border with 0
    torch.testing.assert_close(kernels._avg_pool2_backward(gp, out), z.grad)


def test_needs_maps_gradients_by_name():
    """The gradients a node returns are placed by the names of forward's arguments; of the chunks
    x_0 ... x_{l-1} only the newest ever takes one."""
    from types import SimpleNamespace

    from densenet.models.fused import nodes

    names = ("st", "c", "w", "b")
    ctx = SimpleNamespace(needs_input_grad=(False, False, True, False, True, True, True))  # 3 chunks
    need = nodes._Needs(ctx, names)
    assert need.w and not need.b and need.newest
    with pytest.raises(AttributeError):
        need.bias  # a misspelt name is an error, not False
    g = need.gradients({"w": "gw", "b": "gb", "newest": "gx"})
    assert g == (None, None, "gw", None, None, None, "gx")  # b is not needed: None
    assert nodes._Needs(SimpleNamespace(needs_input_grad=(False, True)), ("st", "x")).gradients({"x": 1}) == (None, 1)
    with pytest.raises(RuntimeError, match="not arguments of forward"):
        need.gradients({"weight": "gw"})  # a gradient under a name forward does not have: an error, not dropped


def test_dropped_and_undrop_agree():
    from densenet.models.fused import kernels

    x = torch.randn(2, 8, 5, 5, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    y, keep = kernels._dropped(x, 0.3)
    assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(kernels._undrop(x, keep, 0.3), y)
    torch.testing.assert_close(y[keep], x[keep] / 0.7)


def test_debug_mode_is_on_in_tests():
    from densenet.models.fused import state

    assert state.DEBUG  # tests/conftest.py sets DENSENET_DEBUG_FUSED=1 before densenet is imported


def test_debug_mode_catches_a_backward_order_violation(monkeypatch):
    """Within one backward pass a block's nodes must run newest first (see 'Backward order' in
    fused/__init__.py); a node that runs after an older one raises in debug mode."""
    from types import SimpleNamespace

    from densenet.models.fused import nodes, state

    st = state._BlockState(torch.randn(2, 3, 4, 4), 3, batch_stats=True, pool=state.ScratchPool())
    st.version = state._version(st.buf)

    def backward_pass(order):
        class Probe(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                for seq in order:  # as the block's nodes would, numbered in creation order
                    nodes._begin_backward(SimpleNamespace(st=st, seq=seq))
                return g

        Probe.apply(torch.ones(1, requires_grad=True)).sum().backward()

    backward_pass([3, 2, 1])  # newest first: fine
    backward_pass([3, 2])  # a new backward pass starts afresh
    with pytest.raises(RuntimeError, match="backward order violated"):
        backward_pass([2, 3])
    monkeypatch.setattr(state, "DEBUG", False)
    backward_pass([2, 3])  # not checked outside debug mode


@pytest.mark.parametrize("mode", MODES, ids=["fused", "fused-memeff", "reference-memeff"])
def test_a_second_backward_pass_after_a_partial_one(mode):
    """autograd.grad of a later layer's weight (retain_graph=True) stops before the block's first layer;
    a later full backward pass over the same graph starts from a fresh gradient buffer (it once
    added to the buffer the first pass left: wrong gradients, silently). The reference path's
    memory-efficient mode recomputes twice (its BN-restoring context once failed the second time)."""
    grads = []
    x = torch.randn(2, 3, 8, 8, dtype=torch.double)
    for m in (build("densenet_bc_100_k12", dict(depth=16), fused=False),
              build("densenet_bc_100_k12", dict(depth=16), **mode)):
        m.train()
        y = m(x)
        torch.autograd.grad(y.square().sum(), m.features.denseblock2.denselayer2.conv2.weight, retain_graph=True)
        y.square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-10, msg=n)


def test_a_copied_model_owns_fresh_caches():
    """Scratch memory, block outputs and folded eval tensors belong to their block: a deepcopy or a
    pickle starts with empty ones of its own (never the original's), and computes the same."""
    import copy
    import pickle

    m = densenet.create_model("densenet_bc_100_k12", depth=10).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = m(x)  # folds the eval tensors into m's blocks' caches
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        for a, b in zip(m.modules(), other.modules()):
            if type(a).__name__ == "DenseBlock":
                assert a.frozen.entry is not None and b.frozen.entry is None
                assert b.scratch is not a.scratch
        with torch.no_grad():
            torch.testing.assert_close(other(x), want, rtol=1e-5, atol=1e-6)
        other.train()(x).sum().backward()  # the fused training path, with its own scratch memory


def test_scratch_memory_is_the_blocks_and_can_be_released():
    import pickle
    import weakref

    m = densenet.create_model("densenet_bc_100_k12", depth=10).train()
    blocks = [mod for mod in m.modules() if type(mod).__name__ == "DenseBlock"]
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    assert all(b.scratch.nbytes > 0 for b in blocks)  # kept for the next step (on the CPU)
    assert not any("scratch" in k or "frozen" in k for k in m.state_dict())
    assert copy.deepcopy(m).features.denseblock1.scratch.nbytes == 0  # not copied
    assert pickle.loads(pickle.dumps(m)).features.denseblock1.scratch.nbytes == 0  # not pickled
    kept = [weakref.ref(t) for b in blocks for t in b.scratch.free.values()]
    m.release_scratch()
    assert all(b.scratch.nbytes == 0 for b in blocks) and all(r() is None for r in kept)  # the memory is freed
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    assert blocks[0].scratch.nbytes > 0
    m.eval()  # evaluation (or the end of training) gives it back too
    assert all(b.scratch.nbytes == 0 for b in blocks)


def test_the_block_hands_its_state_to_the_transition_explicitly(monkeypatch):
    """DenseNet.features (DenseFeatures) gives each block a HandOver and passes it to the transition
    after it: the transition reads the block's buffer when its input is the block's untouched output,
    and computes from its modules otherwise (no hand-over, a clone, an output a forward hook replaced).
    Nothing is kept on the modules between passes."""
    from densenet.models import _inference
    from densenet.models.densenet import DenseFeatures

    calls = []
    for mod in (fused, _inference):
        real = mod.transition_forward
        monkeypatch.setattr(mod, "transition_forward", lambda *a, real=real, mod=mod: calls.append(mod) or real(*a))
    m = densenet.create_model("densenet_bc_100_k12", depth=16).train()
    assert type(m.features) is DenseFeatures
    t, block = m.features.transition1, m.features.denseblock1
    x = torch.randn(2, 3, 8, 8)
    m(x).sum().backward()
    assert calls == [fused, fused]
    with torch.no_grad():
        m.eval()(x)
    assert calls[2:] == [_inference, _inference]
    calls.clear()
    with torch.no_grad():
        hand_over = fused.HandOver()
        out = block(m.features.conv0(x), hand_over)
        ref = nn.Sequential(*list(t.children()))(out)  # the modules themselves
        torch.testing.assert_close(t(out), ref)  # no hand-over: the modules
        torch.testing.assert_close(t(out.clone(), hand_over), ref)  # not the block's output: the modules
        assert calls == []
        torch.testing.assert_close(t(out, hand_over), ref, rtol=1e-5, atol=1e-6)  # from the block's buffer
        assert calls == [_inference]
        calls.clear()
        handle = block.register_forward_hook(lambda mod, args, y: y * 2)  # a hook that replaces the output
        try:
            want = m(x)
            assert calls == [_inference]  # the second transition only: the first sees the hook's tensor
        finally:
            handle.remove()
    assert not any(isinstance(v, fused.HandOver) for mod in m.modules() for v in vars(mod).values())
    with torch.no_grad():  # the same numbers with the hook on a plain nn.Sequential of the same modules
        handle = block.register_forward_hook(lambda mod, args, y: y * 2)
        try:
            seq = nn.Sequential(*m.features.children())
            torch.testing.assert_close(m.forward_head(seq(x)), want, rtol=1e-5, atol=1e-5)
        finally:
            handle.remove()


def test_the_fused_block_output_modified_in_place_is_not_read_from_the_buffer():
    """A training-mode output changed in place after the block (a hook, say) bumps the buffer's
    version: the transition computes from its modules, on the changed values."""
    m = densenet.create_model("densenet_bc_100_k12", depth=16).train()
    block, t = m.features.denseblock1, m.features.transition1
    x = torch.randn(2, 3, 8, 8)
    h0 = m.features.conv0(x)
    hand_over = fused.HandOver()
    out = block(h0, hand_over)
    assert hand_over.source_for(out) is not None
    with torch.no_grad():
        out.mul_(2)
    assert hand_over.source_for(out) is None


def test_reference_path_is_one_switch(monkeypatch):
    """densenet.models.reference_path(): every dense block computes as fused=False does, without
    touching the model; counting multiply-adds and exporting use it."""
    from densenet.analysis import count_macs
    from densenet.models import fused as fused_path
    from densenet.models import reference_path

    calls = []
    monkeypatch.setattr(fused_path, "dense_block_forward", lambda *a: calls.append(1))
    fused = build("densenet_bc_100_k12", dict(depth=16), fused=True).train()
    plain = build("densenet_bc_100_k12", dict(depth=16), fused=False).train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.double)
    with reference_path():
        with reference_path():
            pass
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)  # the same modules, the same numbers
    assert calls == [] and fused.features.denseblock1.fused is True
    assert count_macs(fused, (3, 8, 8)) == count_macs(plain, (3, 8, 8)) and fused.training
    assert calls == []
    with pytest.raises(TypeError):
        fused(x)  # outside the context the fused path again (here: the stub)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "mm"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["default", "memeff"])
def test_float32_backward_products_in_either_kernel(onednn, memory_efficient, monkeypatch):
    """The 1x1 convolutions' backward products run in oneDNN (float32 on the CPU) or in torch.mm
    (kernels.ONEDNN_BACKWARD): either way the gradients are the reference path's, to float32 rounding."""
    from densenet.models import _torch_compat
    from densenet.models.fused import kernels

    if onednn and not (torch.backends.mkldnn.is_available() and _torch_compat.available("linear_pointwise")):
        pytest.skip("this PyTorch build has no oneDNN matrix product (torch.ops.mkldnn._linear_pointwise)")
    calls = []
    real = kernels._linear
    monkeypatch.setattr(kernels, "_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "ONEDNN_BACKWARD", onednn)
    torch.manual_seed(0)
    plain = densenet.create_model("densenet_bc_100_k12", depth=22, fused=False)
    fused = densenet.create_model("densenet_bc_100_k12", depth=22, memory_efficient=memory_efficient)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 16, 16)
    (y, grads, _), (y_ref, grads_ref, _) = train_step(fused, x), train_step(plain, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for k, g in grads_ref.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=k)
    # two products per bottleneck layer (3 blocks of 3); the transitions pool first, a product of their own
    assert len(calls) == (2 * 9 if onednn else 0)


def test_a_onednn_product_that_disagrees_with_mm_is_not_used(monkeypatch):
    """If this PyTorch's oneDNN product fails or disagrees with torch.mm on the backward pass's operand
    layouts (a private operator, checked before its first use: models._torch_compat), torch.mm computes
    the products, with a warning."""
    import dataclasses

    from densenet.models import _torch_compat
    from densenet.models.fused import kernels

    entry = _torch_compat.ENTRIES["linear_pointwise"]

    def broken(*a):
        raise RuntimeError("mkldnn linear: unsupported layout")

    for fake, works in ((broken, False), (lambda a, b, *rest: a @ b.t() + 1.0, False), ("real", True)):
        if fake == "real":
            try:
                fake = entry.locate()
            except (AttributeError, RuntimeError):
                continue  # no oneDNN product in this build
        monkeypatch.setitem(_torch_compat.ENTRIES, "linear_pointwise", dataclasses.replace(entry, locate=lambda f=fake: f))
        monkeypatch.setitem(_torch_compat._status, "linear_pointwise", _torch_compat._Status())  # looked up afresh
        if works:
            assert _torch_compat.available("linear_pointwise")
        else:
            with pytest.warns(_torch_compat.PrivateTorchAPIWarning, match="_linear_pointwise"):
                assert not _torch_compat.available("linear_pointwise")
        expected = works and kernels.ONEDNN_BACKWARD and torch.backends.mkldnn.is_available()
        assert kernels._onednn(torch.zeros(2, dtype=torch.float32)) is expected


def test_the_onednn_check_draws_nothing_from_the_global_generator():
    """The oneDNN product is checked once, inside the first backward pass of a process: drawing from
    torch's default generator there shifted every later dropout mask, so a resumed run (a new process)
    and an uninterrupted one diverged, depending on which process had run the check first."""
    from densenet.models import _torch_compat

    entry = _torch_compat.ENTRIES["linear_pointwise"]
    try:
        linear = entry.locate()
    except (AttributeError, RuntimeError):
        pytest.skip("this PyTorch build has no oneDNN matrix product (torch.ops.mkldnn._linear_pointwise)")
    before = torch.get_rng_state()
    entry.check(linear)
    assert torch.equal(torch.get_rng_state(), before)


def test_every_autograd_function_names_its_arguments_by_forward_signature():
    """Each fused Function's backward places its gradients by the names of forward's arguments (ARGS):
    they are read from forward's signature (nodes.function_args), so that an argument added to forward
    cannot shift the gradients of the others. Every Function in the package's modules has them, and
    function_args refuses a forward whose arguments Function.apply could not pass by position."""
    import importlib
    import inspect
    import pkgutil

    from densenet.models import fused
    from densenet.models.fused import nodes

    found = []
    for info in pkgutil.iter_modules(fused.__path__):
        module = importlib.import_module(f"{fused.__name__}.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) and obj.__module__ == module.__name__:
                found.append(obj)
                params = list(inspect.signature(obj.forward).parameters.values())
                assert params[0].name == "ctx", obj
                named = tuple(p.name for p in params[1:] if p.kind is p.POSITIONAL_OR_KEYWORD)
                assert "ARGS" in vars(obj) and obj.ARGS == named, (obj, getattr(obj, "ARGS", None), named)
                rest = [p for p in params[1 + len(named):]]
                assert all(p.kind is p.VAR_POSITIONAL for p in rest) and len(rest) <= 1, obj
    assert {f.__name__ for f in found} >= {"_LayerInput", "_RecomputedLayer", "_BlockOutput", "_TransitionInput"}

    class Shifted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, st, w, b, *chunks):
            pass

    assert nodes.function_args(Shifted).ARGS == ("st", "w", "b")
    for bad in ("ctx, st, w=None", "ctx, st, *chunks, w", "ctx, st, *, w", "ctx, st, newest", "st, w"):
        namespace = {}
        exec(f"def forward({bad}):\n    pass", namespace)
        with pytest.raises(TypeError):
            nodes.function_args(type("Bad", (torch.autograd.Function,), {"forward": staticmethod(namespace["forward"])}))


def test_reference_path_holds_for_the_thread_that_entered_it(monkeypatch):
    """reference_path() is a context variable: an export in one thread never moves another thread's
    blocks onto the reference path."""
    import threading

    from densenet.models import fused

    entered, checked = threading.Event(), threading.Event()
    seen = {}

    def exporter():
        with fused.reference_path():
            seen["exporter"] = fused.reference_path_active()
            entered.set()
            checked.wait(10)

    t = threading.Thread(target=exporter)
    t.start()
    assert entered.wait(10)
    seen["trainer"] = fused.reference_path_active()  # this thread, while the other is inside the context
    calls = []
    real = fused.dense_block_forward
    monkeypatch.setattr(fused, "dense_block_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = densenet.create_model("densenet_bc_100_k12", depth=10)
    try:
        m.train()(torch.randn(2, 3, 8, 8))
    finally:
        checked.set()
        t.join(10)
    assert seen == {"exporter": True, "trainer": False} and calls
    assert not fused.reference_path_active()


def test_hooks_see_one_input_and_hooks_inside_blocks_run_on_every_path():
    """Hooks on a block or transition see its input as (x,) (the hand-over goes by keyword); a hook on a
    module inside one (Grad-CAM on a convolution) runs in training, in eval with gradients and in eval
    without, because that block or transition then takes the reference path; outputs unchanged."""
    m = densenet.create_model("densenet_bc_100_k12", depth=16)
    x = torch.randn(2, 3, 8, 8)
    seen, fired = [], []
    handles = [m.features.denseblock1.register_forward_pre_hook(lambda mod, inp: seen.append(len(inp))),
               m.features.transition1.register_forward_hook(lambda mod, inp, out: seen.append(len(inp)))]
    try:
        m.train()(x)
        assert seen == [1, 1]
    finally:
        for h in handles:
            h.remove()
    ref = densenet.create_model("densenet_bc_100_k12", depth=16, fused=False)
    ref.load_state_dict(m.state_dict())
    for train, grad in ((True, True), (False, True), (False, False)):
        for target in (m.features.denseblock2.denselayer1.conv1, m.features.transition1.conv):
            h = target.register_forward_hook(lambda mod, inp, out: fired.append(out.shape))
            try:
                with torch.set_grad_enabled(grad):
                    torch.manual_seed(0)
                    got = m.train(train)(x)
                    torch.manual_seed(0)
                    want = ref.train(train)(x)
            finally:
                h.remove()
            assert len(fired) == 1, (train, grad, target)
            fired.clear()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_intermediates_work_when_features_is_a_plain_sequential():
    m = densenet.create_model("densenet_bc_100_k12", depth=16).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = m.forward_intermediates(x)[1]
        m.features = nn.Sequential(collections.OrderedDict(m.features.named_children()))  # same modules and names, no hand-over
        got = m.forward_intermediates(x)[1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
