"""The fused dense block and the memory-efficient mode compute the paper's function exactly:
outputs, gradients and BN running statistics against the plain (reference) implementation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import densenet

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

    from densenet.models import _fused

    def alive():
        gc.collect()
        return sum(type(o) is _fused._BlockState for o in gc.get_objects())

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
