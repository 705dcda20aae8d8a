"""torch.compile of the default (fused) path, and higher-order gradients.

Under torch.compile a fused dense block is traced as plain operations (fused.traceable.dense_block_traceable):
one graph for the whole network, the same numbers as the eager fused path. Compiling with inductor
takes minutes on 2 CPU cores, so the fast tests use the "aot_eager" backend (Dynamo and AOTAutograd
trace forward and backward exactly as for inductor; only the code generation is left out) on tiny
networks; the inductor tests are marked slow."""
from __future__ import annotations

import copy

import pytest
import torch

import densenet

NETS = [("densenet_bc_100_k12", dict(depth=10, drop_rate=0.2)),
        pytest.param("densenet_40_k12", dict(depth=7), marks=pytest.mark.slow)]  # no bottleneck: 3x3 first


def tiny(name="densenet_bc_100_k12", kw=None, device="cpu", **mode):
    torch.manual_seed(0)
    return densenet.create_model(name, **(kw or dict(depth=10)), **mode).double().to(device)


def step(model, x, seed):
    torch.manual_seed(seed)  # the same dropout masks (aot_eager draws them as eager does)
    model.train()
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y.square().sum() + y.sum()).backward()
    return y.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["fused", "fused-memeff"])
@pytest.mark.parametrize("name, kw", NETS)
def test_one_graph_no_breaks(name, kw, memory_efficient):
    m = tiny(name, kw, memory_efficient=memory_efficient).train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.double)
    for train in (True, False):
        torch._dynamo.reset()
        with torch.set_grad_enabled(train):
            explained = torch._dynamo.explain(m.train(train))(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["fused", "fused-memeff"])
@pytest.mark.parametrize("name, kw", NETS)
def test_compiled_matches_eager(name, kw, memory_efficient, device):
    """Outputs, gradients and BN running statistics of two training steps, then evaluation."""
    torch._dynamo.reset()
    eager = tiny(name, kw, device, fused=True, memory_efficient=memory_efficient)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(3, 3, 9, 8, dtype=torch.double, device=device)
    for seed in (1, 2):
        (ya, ga), (yb, gb) = step(compiled, x, seed), step(eager, x, seed)
        torch.testing.assert_close(ya, yb)
        for n in gb:
            torch.testing.assert_close(ga[n], gb[n], msg=n)
    for (n, a), (_, b) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x))


def test_double_backward_names_fused_false():
    """A gradient penalty (create_graph=True) through the fused path: a clear error naming fused=False;
    with fused=False it works. (torch.compile refuses double backward whatever the model.)"""
    x = torch.randn(2, 3, 8, 8, dtype=torch.double, requires_grad=True)
    for memory_efficient in (False, True):
        m = tiny(fused=True, memory_efficient=memory_efficient)
        (g,) = torch.autograd.grad(m(x).sum(), x)  # first order: fine
        with pytest.raises(RuntimeError, match="higher-order gradients.*fused=False"):
            torch.autograd.grad(m(x).sum(), x, create_graph=True)
    plain = tiny(fused=False)
    plain.load_state_dict(m.state_dict())
    (g,) = torch.autograd.grad(plain(x).square().sum(), x, create_graph=True)
    g.square().sum().backward()  # the penalty's gradient reaches the weights
    assert plain.features.conv0.weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["fused", "fused-memeff"])
def test_inductor_training_and_inference(memory_efficient, device, exact_cuda):
    """The real compiler (inductor; Triton on a GPU): float32 training steps and inference match eager.
    Dropout off: inductor draws its own random numbers. TF32 off on a GPU (exact_cuda): inductor's
    convolutions and eager's 1x1 products would otherwise round differently (TF32 vs float32)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = densenet.create_model("densenet_bc_100_k12", depth=10, memory_efficient=memory_efficient).to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x = torch.randn(4, 3, 8, 8, device=device)
    for seed in (1, 2):
        (ya, ga), (yb, gb) = step(compiled, x, seed), step(eager, x, seed)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)
        for n in gb:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-4 * gb[n].abs().max().item() + 1e-6, msg=n)
    for (n, a), (_, b) in zip(compiled_model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-4)
