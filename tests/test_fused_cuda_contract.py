"""The fused path's CUDA contract, checked without a GPU.

No GPU has run this package yet, and PyTorch's CPU kernels accept calls that its CUDA kernels refuse:
`native_batch_norm_backward` with `save_mean=None` runs on the CPU, while the CUDA kernel
(aten/src/ATen/native/cuda/Normalization.cu, `batch_norm_backward_cuda`) asserts "save_mean should
always be defined" whenever it does not take its fused branch. So every aten call that the fused and
memory-efficient paths make is checked here, on the CPU, against a model of the CUDA kernel's
preconditions (`CudaContract`): training, evaluation with gradients, NCHW and channels_last, float32
and bf16/fp16 autocast. An operator this file does not know fails the test: a new call in the fused
path must get its CUDA preconditions written down here (or be listed as having none) before it lands.

The forward passes also run on fake CUDA tensors (`FakeTensorMode`, device "cuda", no GPU needed),
which takes the code's own CUDA branches (`_var_mean`, the scratch pool, the oneDNN gate) and checks
that every tensor stays on the device and in the dtype it should. (Autograd's engine needs a real
device for a backward pass on CUDA tensors, hence the CPU run with the contract for the backward.)
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import densenet
from densenet.models import fused
from densenet.models.fused import kernels, policy

aten = torch.ops.aten
_LOW = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """at::acc_type<T, /*is_cuda=*/true>: float for half and bfloat16, else the type itself."""
    return torch.float32 if dtype in _LOW else dtype


def _mixed(x: torch.Tensor, *params) -> bool:
    """is_mixed_type (Normalization.cu): the first defined parameter's dtype differs from the input's."""
    first = next((p for p in params if p is not None), None)
    return first is not None and first.dtype != x.dtype


def _channels_last_kernels(x: torch.Tensor) -> bool:
    """batch_norm_use_channels_last_kernels (Normalization.cu)."""
    return x.is_contiguous(memory_format=torch.channels_last) or (x.is_contiguous() and x.stride(1) == 1)


def _dtype(errors, name, t, want):
    if t is not None and t.dtype != want:
        errors.append(f"{name} is {t.dtype}, the CUDA kernel reads it as {want}")


def check_batch_norm_backward(args) -> list[str]:
    """native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean,
    save_invstd, train, eps, output_mask) as batch_norm_backward_cuda dispatches it."""
    gout, x, w, rmean, rvar, smean, sinv, train, _eps, mask = args
    errors = []
    _dtype(errors, "grad_out", gout, x.dtype)
    c = x.shape[1]
    needs_reduction = train or mask[1] or mask[2]
    if needs_reduction and mask[0] and not _channels_last_kernels(x):
        # the fused template: weight and running statistics in stat_t, saved ones in acc(stat_t)
        stat = _acc(x.dtype) if _mixed(x, w, rmean, rvar) else x.dtype
        for name, t in (("weight", w), ("running_mean", rmean), ("running_var", rvar)):
            _dtype(errors, name, t, stat)
        for name, t in (("save_mean", smean), ("save_invstd", sinv)):
            _dtype(errors, name, t, _acc(stat))
        if train and (smean is None or sinv is None or smean.numel() != c or sinv.numel() != c):
            errors.append("train=True needs save_mean and save_invstd of every channel")
        if not train and (rmean is None or rvar is None):
            errors.append("train=False reads running_mean and running_var: they must be given")
        return errors
    # the unfused kernels: TORCH_INTERNAL_ASSERT(save_mean->defined()) and the same for save_invstd
    if smean is None or sinv is None:
        return errors + ["save_mean and save_invstd must be tensors (None fails TORCH_INTERNAL_ASSERT "
                         "'save_mean should always be defined' outside the fused branch)"]
    acc = _acc(x.dtype)
    if smean.numel() == 0 and needs_reduction and (train or rmean is None):
        errors.append("an empty save_mean is read from running_mean: needs train=False and running_mean")
    if sinv.numel() == 0 and (train or rvar is None):
        errors.append("an empty save_invstd is computed from running_var: needs train=False and running_var")
    mean_dt = smean.dtype if smean.numel() else acc
    inv_dt = sinv.dtype if sinv.numel() else acc
    if mean_dt != inv_dt:
        errors.append(f"mean ({mean_dt}) and invstd ({inv_dt}) need to have the same data types")
    if needs_reduction:  # batch_norm_backward_reduce_cuda: mean and invstd in acc(stat_t), weight in stat_t
        stat = _acc(x.dtype) if _mixed(x, w) else x.dtype
        _dtype(errors, "weight", w, stat)
        if mean_dt != _acc(stat):
            errors.append(f"mean/invstd are {mean_dt}, the reduction reads {_acc(stat)}")
    return errors


def check_batch_norm(args, kwargs) -> list[str]:
    """native_batch_norm(.out)(input, weight, bias, running_mean, running_var, train, momentum, eps) as
    batch_norm_cuda_out computes it: the saved statistics are the ones the elementwise kernel reads."""
    x, w, b, rmean, rvar, train = args[:6]
    errors = []
    if (rmean is None) != (rvar is None):
        errors.append("running_mean and running_var: both or neither")
    if not train and rmean is None:
        errors.append("train=False needs running statistics")
    stat = _acc(x.dtype) if _mixed(x, w, b) else x.dtype
    _dtype(errors, "weight", w, stat)
    _dtype(errors, "bias", b, stat)
    for name in ("save_mean", "save_invstd"):  # .out: written by the kernel, then read as acc(stat_t)
        _dtype(errors, name, kwargs.get(name), _acc(stat))
    _dtype(errors, "out", kwargs.get("out"), x.dtype)
    return errors


def _same_dtype(*names):
    def check(args, kwargs):
        ts = [(n, a) for n, a in zip(names, args) if isinstance(a, torch.Tensor)]
        ts += [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        dts = {t.dtype for _, t in ts}
        return [] if len(dts) <= 1 else [f"operands of different dtypes: " +
                                          ", ".join(f"{n} {t.dtype}" for n, t in ts)]
    return check


# operators with a CUDA precondition beyond one device (checked above or here)
CHECKS = {
    aten.native_batch_norm_backward: lambda a, k: check_batch_norm_backward(a),
    aten.native_batch_norm: check_batch_norm,
    aten.mm: _same_dtype("self", "mat2"),
    aten.addmm: _same_dtype("self", "mat1", "mat2"),
    aten.convolution: _same_dtype("input", "weight", "bias"),
    aten.convolution_backward: _same_dtype("grad_output", "input", "weight"),
    aten.threshold_backward: _same_dtype("grad_output", "self"),
}
# operators whose CUDA kernels take what their CPU kernels take (elementwise, views, reductions, copies,
# factories, dropout, pooling): checked for one device only. Exactly the ones the paths below call, so a
# new operator in the fused path fails the test until its CUDA preconditions are looked up.
PLAIN = {
    "_to_copy", "_unsafe_view", "add", "add_", "addcmul", "addcmul_", "alias", "avg_pool2d",
    "avg_pool2d_backward", "bernoulli_", "clone", "copy_", "detach", "div", "div_", "empty", "empty_like",
    "empty_strided", "expand", "max_pool2d_with_indices", "max_pool2d_with_indices_backward", "mean", "mul",
    "mul_", "native_dropout", "ne", "new_empty", "new_empty_strided", "ones", "ones_like", "permute", "pow",
    "pow_", "relu", "relu_", "rsqrt", "slice", "sub", "sub_", "sum", "t", "unsqueeze", "var_mean", "view",
    "zero_", "zeros_like",
    "cudnn_batch_norm",  # what nn.BatchNorm2d itself calls on CUDA (the stem's, the reference path's)
}


class CudaContract(TorchDispatchMode):
    """Checks every aten call against the CUDA kernels' preconditions; collects the violations."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        name = packet.__name__
        self.seen.add(str(func))
        if func.namespace == "prim" and name == "device":  # a metadata query
            return func(*args, **kwargs)
        if func.namespace != "aten":
            self.violations.append(f"{func}: not an aten operator (CPU-only on this path? e.g. oneDNN)")
        elif packet in CHECKS:
            self.violations += [f"{func}: {e}" for e in CHECKS[packet](args, kwargs)]
        elif name not in PLAIN:
            self.violations.append(f"{func}: unknown to tests/test_fused_cuda_contract.py; write its CUDA "
                                   "preconditions into CHECKS, or add it to PLAIN if it has none")
        devices = {a.device for a in list(args) + list(kwargs.values())
                   if isinstance(a, torch.Tensor) and a.dim() > 0}
        if len(devices) > 1:
            self.violations.append(f"{func}: tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


NETS = {
    "bc-dropout": ("densenet_bc_100_k12", dict(depth=10, growth_rate=6, drop_rate=0.2)),
    "no-bottleneck": ("densenet_40_k12", dict(depth=7, growth_rate=6)),
    "imagenet": ("densenet121", dict(block_config=(2, 2), growth_rate=8, num_init_features=16, bn_size=2)),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


@pytest.fixture
def cuda_like(monkeypatch):
    """The fused path as it runs on CUDA: oneDNN's products are gated to CPU float32 (checked below)."""
    monkeypatch.setattr(kernels, "ONEDNN_BACKWARD", False)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-with-grad"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["fused", "fused-memeff"])
@pytest.mark.parametrize("net", NETS)
def test_every_aten_call_meets_the_cuda_preconditions(net, memory_efficient, train, layout, dtype, cuda_like):
    """One training step (or an eval-mode forward and backward, as when fine-tuning with frozen BN) of
    the fused path: every aten call it makes, forward and backward, is one the CUDA kernels accept."""
    name, kw = NETS[net]
    torch.manual_seed(0)
    model = densenet.create_model(name, **kw, fused=True, memory_efficient=memory_efficient).train(train)
    size = 33 if name == "densenet121" else 9  # odd sizes: transitions' pooling floors
    x = torch.randn(3, 3, size, size, requires_grad=True)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    contract = CudaContract()
    with contract:
        with _autocast(DTYPES[dtype]):
            y = model(x)
        y.float().square().sum().backward()
    assert not contract.violations, "\n".join(dict.fromkeys(contract.violations))
    assert "aten.native_batch_norm_backward.default" in contract.seen  # the calls that broke were made
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_the_contract_catches_the_calls_that_would_fail_on_cuda():
    """The model of the CUDA kernels is not vacuous: the calls the fused path used to make are refused."""
    c, n = 4, 6
    x, g = torch.randn(1, c, n, 1), torch.randn(1, c, n, 1)
    w, mean, var = torch.ones(c), torch.zeros(c), torch.ones(c)
    old = (g, x, w, mean, var, None, None, False, 1e-5, [False, True, True])
    assert any("save_mean" in e for e in check_batch_norm_backward(old))
    xl = torch.randn(2, c, 3, 3).contiguous(memory_format=torch.channels_last)
    old_memeff = (xl, xl, w, mean, var, None, None, False, 1e-5, [True, True, True])
    assert any("save_mean" in e for e in check_batch_norm_backward(old_memeff))
    fixed = (g, x, w, mean, var, mean, torch.rsqrt(var + 1e-5), False, 1e-5, [False, True, True])
    assert check_batch_norm_backward(fixed) == []
    half = (g.half(), x.half(), w.half(), mean.half(), var.half(), mean.half(), var.half(), False, 1e-5,
            [False, True, True])  # saved statistics must be float32 for a float16 input
    assert any("float32" in e for e in check_batch_norm_backward(half))
    contract = CudaContract()
    with contract:
        torch.ops.aten.native_batch_norm_backward(*old)
        torch.ops.aten.erfinv(x)  # an operator nobody described
    assert any("save_mean" in v for v in contract.violations)
    assert any("erfinv" in v and "unknown" in v for v in contract.violations)


def test_onednn_products_are_gated_to_the_cpu():
    """On CUDA the 1x1 backward products stay in torch.mm: the oneDNN gate reads the device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not kernels._onednn(torch.empty(4, 4, device="cuda"))
    assert not kernels._onednn(torch.empty(4, 4, dtype=torch.float64))


def _to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point():
                m._buffers[k] = b.to(dtype)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["fused", "fused-memeff"])
def test_forward_on_fake_cuda_tensors_keeps_device_and_dtype(net, model_dtype, train, memory_efficient):
    """A model built on (fake) CUDA tensors: the fused forward pass takes the code's CUDA branches and
    returns a CUDA tensor of the model's dtype; no CPU tensor enters a CUDA operator."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    name, kw = NETS[net]
    with FakeTensorMode():
        with torch.device("cuda"):
            model = densenet.create_model(name, **kw, fused=True, memory_efficient=memory_efficient)
            _to_dtype(model, model_dtype)  # (Module.to swaps tensors, which fake tensors refuse)
            model.train(train)
            x = torch.randn(2, 3, 17, 17, dtype=model_dtype)
        contract = CudaContract()
        with contract:
            y = model(x)
        assert y.device.type == "cuda" and y.dtype == model_dtype
        assert y.shape == (2, model.num_classes)
        assert not contract.violations, "\n".join(dict.fromkeys(contract.violations))
        assert all(b.device.type == "cuda" for b in model.buffers())


def test_auto_takes_the_reference_path_on_cuda(monkeypatch):
    """Until a GPU has measured the fused path, fused="auto" on CUDA (and on any unmeasured device) is the
    reference path: torch's own modules and cuDNN kernels. fused=True still opts in."""
    assert policy.default_fused(torch.device("cpu")) is True
    assert policy.default_fused(torch.device("cuda")) is False
    assert policy.default_fused(torch.device("cuda:1")) is False
    assert policy.default_fused(torch.device("mps")) is False

    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []
    real = fused.dense_block_forward
    monkeypatch.setattr(fused, "dense_block_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with FakeTensorMode():
        with torch.device("cuda"):
            auto = densenet.create_model("densenet_bc_100_k12", depth=10)
            forced = densenet.create_model("densenet_bc_100_k12", depth=10, fused=True)
            x = torch.randn(2, 3, 8, 8)
        auto(x)
        assert calls == []
        forced(x)
        assert calls
