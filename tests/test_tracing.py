"""Tracing the models as PyTorch's tools do: torch.fx symbolic tracing (torchvision's
create_feature_extractor) returns the eager model's tensors, torch.jit.script says in one line what
to use instead, and a freshly built model's eval-mode outputs are what the authors' initialisation
gives (documented in `init_weights`)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import densenet

DENSENETS = [n for n in densenet.list_models() if n.startswith("densenet")]
BASELINES = ["resnet18", "preact_resnet110", "wrn_16_4"]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # a fresh model's eval outputs reach 1e5 (test_fresh_eval_outputs...): relative to their scale
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-6)


@pytest.mark.parametrize("name", DENSENETS + BASELINES)
def test_create_feature_extractor_returns_the_eager_tensors(name):
    """torchvision's FX feature extraction, with feature_info's modules (timm's names) as the return
    nodes, gives forward_intermediates' tensors and the logits (the dense blocks trace as the paper's
    modules, the fused eager path computes the same numbers)."""
    torch.manual_seed(0)
    m = densenet.create_model(name).eval()
    c, h, _ = densenet.get_entry(name).input_size
    size = 8 if h == 32 else 32  # small inputs: the depth is the point (the smallest each network takes)
    x = torch.randn(1, c, size, size)
    nodes = {info["module"]: f"f{i}" for i, info in enumerate(m.feature_info)}
    extractor = create_feature_extractor(m, return_nodes={**nodes, m.classifier_name: "logits"})
    with torch.no_grad():
        got = extractor(x)
        final, want = m.forward_intermediates(x)
        logits = m(x)
    for i, w in enumerate(want):
        _close(got[f"f{i}"], w)
    _close(got["logits"], logits)


def test_symbolic_trace_of_a_training_densenet_gives_its_gradients():
    """torch.fx.symbolic_trace of a DenseNet in training mode: the same output and parameter gradients
    as the eager (fused) model."""
    torch.manual_seed(0)
    m = densenet.create_model("densenet_bc_100_k12", depth=16).train()
    traced = torch.fx.symbolic_trace(m)
    x = torch.randn(4, 3, 16, 16)
    outs = []
    for model in (m, traced):
        model.zero_grad()
        torch.manual_seed(1)
        y = model(x)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("name", ["densenet_bc_100_k12", "resnet20"])
def test_jit_script_says_what_to_use_instead(name):
    m = densenet.create_model(name)
    with warnings.catch_warnings(), \
            pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile .*torch.jit.trace.*torch.export") as e:
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in recent releases
        torch.jit.script(m)
    assert "\n" not in str(e.value)


def test_fresh_eval_outputs_follow_the_authors_initialisation():
    """The documented choice (`init_weights`): the authors' fan-out initialisation, with running
    statistics untouched (mean 0, variance 1), gives a freshly built DenseNet-121 eval logits of order
    1e5 (torchvision's fan-in initialisation: order 1). Training mode normalises with batch statistics
    and gives order-1 outputs; so do eval outputs once the running statistics are estimated (here in
    one pass, with momentum 1; `densenet eval --recalibrate-bn` does it for a trained checkpoint)."""
    torch.manual_seed(0)
    m = densenet.create_model("densenet121", bn_momentum=1.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fresh = m.eval()(x).abs().max()
        train = m.train()(x).abs().max()
        settled = m.eval()(x).abs().max()
    assert fresh > 1e3, fresh
    assert train < 50 and settled < 50, (train, settled)


def test_create_feature_extractor_matches_torchvisions_densenet121():
    """The same call on torchvision's DenseNet-121 with the same weights: the same nodes by the same
    names, the same tensors; except that torchvision's forward applies F.relu(inplace=True) to norm5's
    output, so its "features.norm5" node returns the maps after ReLU, and ours (relu5 a module, not in
    place) what norm5 computed."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.densenet121().eval()
    ours = densenet.create_model("densenet121").eval()
    ours.load_state_dict(tv.state_dict())
    nodes = {"features.denseblock2": "b2", "features.transition3": "t3", "features.norm5": "n5", "classifier": "out"}
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = create_feature_extractor(tv, return_nodes=nodes)(x)
        got = create_feature_extractor(ours, return_nodes=nodes)(x)
    assert got.keys() == want.keys()
    for k in ("b2", "t3", "out"):
        _close(got[k], want[k])
    assert (got["n5"] < 0).any() and not (want["n5"] < 0).any()
    _close(got["n5"].relu(), want["n5"])
