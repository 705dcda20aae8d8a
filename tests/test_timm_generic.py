"""timm's generic model tests (its tests/test_models.py: forward, backward, default cfgs, features,
intermediates, feature-info consistency), run against `create_model` for every registered name.
Shapes on the meta device for every network (no values, so no cost for the large ones); values,
finite outputs and gradients, for one small network per family."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import densenet

# resnet1202, its stochastic-depth twin and preact_resnet1001 are resnet110/preact_resnet164's builders
# at depth 1202 and 1001 (55 s of meta modules on 2 cores): their shapes are checked by test_backbone's
# every-model test, their counts by test_models
DEEPEST = {"resnet1202", "resnet1202_stochdepth", "preact_resnet1001"}
ALL = [n for n in densenet.list_models() if n not in DEEPEST]
BATCH = 2


def _meta(name: str, **kw):
    with torch.device("meta"):
        return densenet.create_model(name, **kw)


def _input(name: str, device="meta", size: int | None = None) -> torch.Tensor:
    c, h, w = densenet.get_entry(name).input_size
    return torch.randn(BATCH, c, size or h, size or w, device=device)


@pytest.mark.parametrize("name", ALL)
def test_timms_generic_checks(name):
    """One network per name (built once: the deepest have thousands of modules), checked as timm's
    test_model_forward, _backward, _default_cfgs, _forward_features and _forward_intermediates do."""
    m = _meta(name)
    x = _input(name)
    _forward_and_backward(m, x)
    _default_cfgs(m, x, name)
    _features_and_intermediates(m, x)


def _forward_and_backward(m, x):
    """The batch and classes of the output; every parameter gets a gradient (stochastic depth in eval
    mode, where no unit is dropped)."""
    m.train(getattr(m.config, "stochastic_depth", None) is None)
    out = m(x)
    assert out.shape == (BATCH, m.num_classes)
    out.mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def _default_cfgs(m, x, name):
    """The cfg's first_conv and classifier name modules of the model (the conv reading input_size[0]
    channels, the classifier a Linear to num_classes); forward_features ends at pool_size with
    num_features channels; pre_logits are head_hidden_size wide; reset_classifier(0) gives pooled
    features, and reset_classifier(n) n classes (the model is left with num_classes classes)."""
    m.eval()
    cfg = m.default_cfg
    modules = dict(m.named_modules())
    assert cfg["architecture"] == name and cfg["num_classes"] == m.num_classes
    first, head = modules[cfg["first_conv"]], modules[cfg["classifier"]]
    assert isinstance(first, nn.Conv2d) and first.in_channels == cfg["input_size"][0]
    assert isinstance(head, nn.Linear) and head.out_features == m.num_classes and head is m.get_classifier()
    feats = m.forward_features(x)
    assert feats.shape == (BATCH, m.num_features, *cfg["pool_size"])
    assert m.forward_head(feats, pre_logits=True).shape == (BATCH, m.head_hidden_size)
    n = m.num_classes
    m.reset_classifier(0)
    assert m(x).shape == (BATCH, m.num_features) and m.num_classes == 0
    m.reset_classifier(n)
    assert m(x).shape == (BATCH, n) and m.get_classifier().out_features == n


def _features_and_intermediates(m, x):
    """features_only outputs and forward_intermediates agree with feature_info (channels,
    reductions), index by index; the final output of forward_intermediates is forward_features';
    an int takes the last n."""
    from densenet.features import FeatureListNet

    h = x.shape[-1]
    info = m.feature_info
    final, inter = m.forward_intermediates(x)
    assert final.shape == m.forward_features(x).shape
    assert len(inter) == len(info)
    for t, c, r in zip(inter, info.channels(), info.reduction()):
        assert t.shape == (BATCH, c, h // r, h // r)
    assert [t.shape for t in m.forward_intermediates(x, indices=2, intermediates_only=True)] == \
        [t.shape for t in inter[-2:]]
    f = FeatureListNet(m)  # what create_model(name, features_only=True) wraps
    outs = f(x)
    assert [o.shape[1] for o in outs] == f.feature_info.channels() == info.channels()
    assert [h // o.shape[-1] for o in outs] == f.feature_info.reduction() == info.reduction()


# One small network per family: values, not only shapes
SMALL = {"densenet_bc_100_k12": dict(depth=16), "densenet_40_k12": dict(depth=10),
         "densenet121": dict(block_config=(2, 2, 2, 2)),
         "resnet20": {}, "resnet110_stochdepth": {}, "preact_resnet110": {}, "wrn_16_4": {}, "resnext29_8x64d": {}}


@pytest.mark.parametrize("name", SMALL)
def test_values_forward_backward_and_feature_info_consistency(name):
    """Finite outputs and gradients; the features_only model with the same weights gives
    forward_intermediates' tensors (timm's feature-info consistency)."""
    torch.manual_seed(0)
    m = densenet.create_model(name, **SMALL[name])
    m.train(getattr(m.config, "stochastic_depth", None) is None)  # (no unit dropped: every gradient)
    x = _input(name, device="cpu", size=8 if densenet.get_entry(name).input_size[1] == 32 else 32)
    out = m(x)
    assert torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    f = densenet.create_model(name, features_only=True, **SMALL[name]).eval()
    f.load_state_dict({k: v for k, v in m.state_dict().items() if k in f.state_dict()})
    with torch.no_grad():
        _, inter = m.forward_intermediates(x)
        for a, b in zip(f(x), inter):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-6)
