"""Every model as a backbone: `forward_stages` (a feature pyramid for detection and segmentation heads),
`stage_strides` and timm-style `feature_info`, and tracing (which takes the reference path)."""
from __future__ import annotations

import pytest
import torch

import densenet

ALL = densenet.list_models()


def small(**kw):
    return densenet.create_model("densenet_bc_100_k12", depth=16, growth_rate=6, **kw)


@pytest.mark.parametrize("name", ALL)
def test_stage_shapes_and_strides_of_every_model(name):
    with torch.device("meta"):
        m = densenet.create_model(name).eval()
    c, h, w = densenet.get_entry(name).input_size
    stages = m.forward_stages(torch.empty(2, c, h, w, device="meta"))
    assert len(stages) == len(m.stage_channels) == len(m.feature_info) - 1  # feature_info[0]: the stem (timm's)
    stem = m.feature_info[0]
    assert (stem["num_chs"], stem["reduction"]) == (m.stem_channels, 2 if m.config.stem == "imagenet" else 1)
    for x, info, ch, stride in zip(stages, m.feature_info[1:], m.stage_channels, m.stage_strides):
        assert x.shape == (2, ch, h // stride, w // stride)
        assert (info["num_chs"], info["reduction"]) == (ch, stride)
    assert m.stage_strides[-1] == m.reduction and m.stage_channels[-1] == m.num_features
    expected = [4, 8, 16, 32] if m.config.stem == "imagenet" else [1, 2, 4]
    assert m.stage_strides == expected
    modules = dict(m.named_modules())
    assert all(info["module"] in modules for info in m.feature_info)


@pytest.mark.parametrize("fused", [True, False])
def test_stages_are_the_block_outputs_and_the_last_is_forward_features(fused):
    m = small(fused=fused).eval()
    x = torch.randn(3, 3, 20, 20)
    stages = m.forward_stages(x)
    assert torch.equal(stages[-1], m.forward_features(x))
    outputs = {}
    hooks = [getattr(m.features, f"denseblock{i}").register_forward_hook(
        lambda mod, inp, out, i=i: outputs.__setitem__(i, out.clone())) for i in (1, 2)]
    m.forward_features(x)
    for h in hooks:
        h.remove()
    assert torch.equal(stages[0], outputs[1]) and torch.equal(stages[1], outputs[2])
    ref = small(fused=not fused).eval()
    ref.load_state_dict(m.state_dict())
    for a, b in zip(stages, ref.forward_stages(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_flow_from_every_stage():
    m = small().train()
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    stages = m.forward_stages(x)
    stages[0].square().mean().backward()  # the first stage reaches the stem and the first block only
    assert m.features.conv0.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert m.features.denseblock1.denselayer1.conv1.weight.grad.abs().sum() > 0
    assert m.features.transition1.conv.weight.grad is None and m.classifier.weight.grad is None
    m.zero_grad()
    sum(s.mean() for s in m.forward_stages(torch.randn(4, 3, 16, 16))).backward()
    grads = {n: p.grad for n, p in m.named_parameters() if not n.startswith("classifier")}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert m.features.norm5.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("x, match", [
    (torch.randn(3, 16, 16), "4-D batch"),
    (torch.randn(2, 1, 16, 16), "3 input channels got 1"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.int64), "floating-point"),
    (torch.randn(2, 3, 3, 3), "too small.*at least 4x4"),
    (torch.randn(2, 16, 16, 3), r"channels last\? x.permute\(0, 3, 1, 2\)"),
    (torch.randn(2, 3, 16, 16, dtype=torch.float64), "weights are torch.float32 on cpu, the input is torch.float64"),
    (torch.randn(2, 3, 16, 16, device="meta"), "the input is torch.float32 on meta"),
])
def test_forward_stages_rejects_inputs_the_model_cannot_take(x, match):
    with pytest.raises(ValueError, match=match):
        small().eval().forward_stages(x)


def test_inputs_of_another_dtype_are_fine_under_autocast():
    m = small().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.forward_stages(torch.randn(2, 3, 16, 16, dtype=torch.bfloat16))[-1].dtype == torch.bfloat16


def test_tracing_a_fused_model_records_the_reference_path():
    m = small().eval()
    assert m.features.denseblock1.fused
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(Warning):  # torch.jit.trace is deprecated, and the input checks trace as constants
        traced = torch.jit.trace(m, x, check_trace=False)
    for batch in (2, 5):
        y = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(traced(y), m(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kw", [("densenet_bc_100_k12", dict(depth=16, growth_rate=6)),
                                     ("densenet121", dict(block_config=(1, 1, 1, 1), growth_rate=4)),
                                     ("resnet20", {}), ("preact_resnet110", {}), ("resnet18", {})],
                         ids=["densenet-cifar", "densenet-imagenet", "resnet20", "preact110", "resnet18"])
def test_feature_info_modules_output_the_intermediates(name, kw):
    """Each feature_info entry's module, hooked, outputs exactly that feature (the stem's included)."""
    m = densenet.create_model(name, **kw).eval()
    modules = dict(m.named_modules())
    seen = {}
    hooks = [modules[info["module"]].register_forward_hook(
        lambda mod, inp, out, i=info["index"]: seen.__setitem__(i, out.clone())) for info in m.feature_info]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inter = m.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    assert len(inter) == len(seen) == len(m.feature_info)
    for i, t in enumerate(inter):
        torch.testing.assert_close(t, seen[i], rtol=0, atol=0, msg=m.feature_info[i]["module"])
