"""Each private PyTorch API the package uses (models._torch_compat) has a fallback: forced here, one at
a time, as missing and as raising at its first use, the model's outputs and gradients are still the
reference path's, the fast path that needed the API is off (or runs on public operations), and the
warning is given once."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import densenet
from densenet.models import _torch_compat, fused, reference_path

# what each entry's fallback does to the dense blocks: "kernel", the fused path runs on with a public
# computation; "path", the blocks take the reference path where the entry is needed; "eval", the
# eval-mode path is off
MODEL_ENTRIES = {
    "graph_task_id": "path",
    "tensor_version": "path",
    "native_batch_norm_out": "kernel",
    "native_batch_norm_backward": "kernel",
    "convolution_backward": "kernel",
    "threshold_backward": "kernel",
    "linear_pointwise": "kernel",
    "global_forward_hooks": "eval",
}
MEMORY_ENTRIES = ("python_dispatch", "pytree", "storage_key")

# linear_pointwise is used for float32 only (oneDNN's product); everything else is checked in float64
DTYPE = {"linear_pointwise": torch.float32}
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def test_every_entry_is_checked_here():
    assert set(MODEL_ENTRIES) | set(MEMORY_ENTRIES) == set(_torch_compat.ENTRIES)


VARIANTS = {"default": ("densenet_bc_100_k12", dict(depth=10, growth_rate=6)),
            "memeff": ("densenet_bc_100_k12", dict(depth=10, growth_rate=6, memory_efficient=True)),
            "plain": ("densenet_40_k12", dict(depth=7, growth_rate=6))}  # no bottleneck: 3x3 convolutions read the buffer
# the variants whose passes need an entry (all, where not listed): the 3x3 convolution's backward is the
# memory-efficient layer's and the plain layer's; the 1x1 products' (oneDNN) the bottleneck layers'
USED_BY = {"convolution_backward": {"memeff", "plain"}, "linear_pointwise": {"default", "memeff"}}


def _model(dtype, variant="default"):
    name, kw = VARIANTS[variant]
    torch.manual_seed(0)
    return densenet.create_model(name, **kw).to(dtype)


def _run(model, x, train: bool, grad: bool, seed: int = 1):
    """Output, and with `grad` the gradients of the parameters and the input, of one pass."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(grad)
    torch.manual_seed(seed)  # the same dropout masks on both paths
    with torch.set_grad_enabled(grad):
        y = model(x)
    if not grad:
        return y.detach(), {}
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads["input"] = x.grad.clone()
    return y.detach(), grads


def _passes(model, x):
    """A training step, a second one (from updated running statistics), an eval pass without
    gradients (the eval-mode path), one with gradients w.r.t. the input (the fused path in eval)."""
    return [_run(model, x, True, True, 1), _run(model, x, True, True, 2), _run(model, x, False, False),
            _run(model, x, False, True)]


def _same(got, want, dtype, what):
    for (y, g), (y_ref, g_ref) in zip(got, want):
        torch.testing.assert_close(y, y_ref, **TOLERANCE[dtype], msg=f"{what}: output")
        assert g.keys() == g_ref.keys()
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], **TOLERANCE[dtype], msg=f"{what}: {k}")


class _Paths:
    """Counts the calls of the fused block, the fused transition and the eval-mode block."""

    def __init__(self, monkeypatch):
        from densenet.models import _inference

        self.calls = {"block": 0, "transition": 0, "eval": 0}
        for module, name, key in ((fused, "dense_block_forward", "block"), (fused, "transition_forward", "transition"),
                                  (_inference, "dense_block_forward", "eval")):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, real=real, key=key, **k: self._count(key) or real(*a, **k))

    def _count(self, key):
        self.calls[key] += 1


def _warnings_of(record, name):
    api = _torch_compat.ENTRIES[name].api
    return [w for w in record if issubclass(w.category, _torch_compat.PrivateTorchAPIWarning) and api in str(w.message)]


def _expected_calls(name: str, raising: bool) -> dict:
    """How often each fast path runs in `_passes` (3 blocks of one layer, 2 transitions) with the entry off:
    the fused block in the two training steps and the eval pass with gradients, the eval-mode block in
    the eval pass without."""
    effect = MODEL_ENTRIES[name]
    if effect == "kernel":  # the fused path throughout, on public operations where the entry is needed
        return {"block": 3 * 3, "transition": 3 * 2, "eval": 3}
    if effect == "eval":  # the fused path serves the eval pass without gradients too
        return {"block": 4 * 3, "transition": 4 * 2, "eval": 0}
    if name == "graph_task_id":  # (raising: it fails its check, before any use) fused only where autograd
        return {"block": 0, "transition": 0, "eval": 3}  # records nothing: the eval-mode block
    assert name == "tensor_version"  # no fused block, nor eval-mode block (its cache needs the counter too);
    # raising: found, it fails at its first read, in the first block's last node: that block ran fused
    return {"block": 1 if raising else 0, "transition": 0, "eval": 0}


@pytest.mark.parametrize("raising", [False, True], ids=["missing", "raising"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODEL_ENTRIES)
def test_the_fallback_computes_what_the_reference_path_does(name, variant, raising, monkeypatch):
    """With the entry forced off (missing, or raising at its first use), training steps and eval
    passes give the reference path's outputs, gradients and running statistics; one warning where
    the passes need the entry, and the fast paths that do not need it still run."""
    dtype = DTYPE.get(name, torch.float64)
    used = variant in USED_BY.get(name, VARIANTS)
    if name == "linear_pointwise" and not torch.backends.mkldnn.is_available():
        used = False  # no oneDNN in this PyTorch build: the product is never used
    model = _model(dtype, variant)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    with reference_path():
        want = _passes(ref, x)
    paths = _Paths(monkeypatch)
    s = _torch_compat._status[name]
    before = (s.state, s.api, s.warned)
    with _torch_compat.disabled(name, raising=raising), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _passes(model, x)
        assert not used or _torch_compat._status[name].state == "off"  # off from the first failure on
    s = _torch_compat._status[name]
    assert (s.state, s.api, s.warned) == before  # put back
    _same(got, want, dtype, name)
    for a, b in zip(model.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    ours = [w for w in record if issubclass(w.category, _torch_compat.PrivateTorchAPIWarning)]
    assert ours == _warnings_of(record, name), [str(w.message) for w in ours]  # no other entry fell back
    assert len(ours) == (1 if used else 0), [str(w.message) for w in ours]
    if used:
        assert paths.calls == _expected_calls(name, raising)


def test_every_model_entry_is_used_by_the_passes_checked():
    """The passes above reach every model entry (so that forcing it off changes what runs): from a
    fresh state, each is looked up."""
    saved = {n: _torch_compat._status[n].copy() for n in MODEL_ENTRIES}
    try:
        for n in MODEL_ENTRIES:
            _torch_compat._status[n] = _torch_compat._Status()
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        for variant in VARIANTS:
            _passes(_model(torch.float64, variant), x)
        _passes(_model(torch.float32), x.float())
        unused = [n for n in MODEL_ENTRIES if _torch_compat._status[n].state == "unresolved"]
        if not torch.backends.mkldnn.is_available():
            unused.remove("linear_pointwise")
        assert unused == []
    finally:
        _torch_compat._status.update(saved)


def test_the_warning_is_given_once_per_process_and_states_are_put_back():
    """Outside `disabled`, an entry that failed stays off and does not warn again; `disabled` puts back
    what it found (looked up, warned), also after an error inside it."""
    before = {n: (s.state, s.api, s.warned) for n, s in _torch_compat._status.items()}
    with pytest.raises(ZeroDivisionError):
        with _torch_compat.disabled("threshold_backward"):
            with pytest.warns(_torch_compat.PrivateTorchAPIWarning, match="threshold_backward"):
                assert _torch_compat.get("threshold_backward") is None
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert _torch_compat.get("threshold_backward") is None  # no second warning
                assert _torch_compat.call("threshold_backward", lambda *a: "fallback", 1) == "fallback"
            1 / 0
    assert {n: (s.state, s.api, s.warned) for n, s in _torch_compat._status.items()} == before
    with pytest.raises(KeyError, match="no such entry"):
        with _torch_compat.disabled("no_such_api"):
            pass


def test_a_first_use_that_raises_is_redone_by_the_fallback():
    """call(): the private API's first call raises, the fallback computes this call and every later one."""
    with _torch_compat.disabled("threshold_backward", raising=True):
        grad, result = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, -1.0])
        with pytest.warns(_torch_compat.PrivateTorchAPIWarning, match="raised RuntimeError"):
            out = _torch_compat.call("threshold_backward", lambda g, r, t, *, grad_input: "fallback", grad, result, 0,
                                     grad_input=grad)
        assert out == "fallback" and not _torch_compat.available("threshold_backward")


def _memory(net):
    from densenet.analysis.memory import activation_memory

    return activation_memory(net, (3, 16, 16), batch_size=4)


@pytest.mark.parametrize("raising", [False, True], ids=["missing", "raising"])
@pytest.mark.parametrize("name", MEMORY_ENTRIES)
def test_activation_memory_without_the_private_apis(name, raising):
    """analysis.memory: without the dispatch mode, tensors are counted as torch functions return them
    (within a few percent for a DenseNet; exactly for a convolution and a ReLU); the flattening of
    outputs and the storage key have exact stand-ins. The model computes as before."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 2))
    model = densenet.create_model("densenet_bc_100_k12", depth=16)
    want_net, want_model = _memory(net), _memory(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model.eval()(x)
    with _torch_compat.disabled(name, raising=raising), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got_net, got_model = _memory(net), _memory(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    assert len(_warnings_of(record, name)) == 1, [str(w.message) for w in record]
    assert got_net["by_stage"]["1"] == want_net["by_stage"]["1"] == 4 * 8 * 16 * 16 * 4
    if name == "python_dispatch":
        assert abs(got_model["total_bytes"] / want_model["total_bytes"] - 1) < 0.05
        assert abs(got_model["peak_forward_bytes"] / want_model["peak_forward_bytes"] - 1) < 0.05
    else:
        assert got_model == want_model and got_net == want_net
