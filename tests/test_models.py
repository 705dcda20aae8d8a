"""DenseNet exactly as the paper: every registered variant's parameter count and multiply-adds,
the construction rules, and a clear error for every configuration the rules cannot build. The model
contract shared with the baselines (bad inputs, invalid configurations, the authors' initialisation) is
tested here once, parametrized by family."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import densenet
from densenet.analysis import count_params
from densenet.analysis.complexity import recount, stored_counts
from densenet.models.densenet import DenseNetConfig, compressed_channels

ALL = densenet.list_models()


def meta_model(name, **kw):
    with torch.device("meta"):
        return densenet.create_model(name, **kw)


def test_registry_has_the_papers_tables():
    for name in ["densenet_40_k12", "densenet_100_k12", "densenet_100_k24", "densenet_bc_100_k12",
                 "densenet_bc_250_k24", "densenet_bc_190_k40", "densenet121", "densenet169",
                 "densenet201", "densenet264", "densenet161"]:
        assert name in ALL


@pytest.fixture(scope="module")
def stored():
    return stored_counts()


@pytest.mark.parametrize("name", [n for n in ALL if densenet.get_entry(n).paper_params])
def test_parameter_count_matches_paper(name, stored):
    entry = densenet.get_entry(name)  # exact, or within the precision of a figure printed as "0.27M"
    assert abs(stored[name][0] - entry.paper_params) <= entry.params_tolerance


@pytest.mark.parametrize("name", [n for n in ALL if densenet.get_entry(n).paper_gmacs])
def test_multiply_adds_match_spec(name, stored):
    entry = densenet.get_entry(name)
    assert stored[name][1] / 1e9 == pytest.approx(entry.paper_gmacs, abs=0.0006)


@pytest.mark.slow
def test_stored_counts_are_those_of_the_networks(stored):
    # the figures above and `densenet models` read the stored counts: here every network is built and
    # counted once (params, and multiply-adds from a forward pass); after changing a network, run
    # python -c "from densenet.analysis.complexity import write_counts; write_counts()"
    assert list(stored) == ALL
    assert {name: recount(name) for name in ALL} == stored


def test_stored_counts_of_two_networks():  # the quick subset's check of the same thing
    for name in ("densenet_bc_100_k12", "resnet18"):
        assert recount(name) == stored_counts()[name]


def test_torchvision_counts_agree():
    import torchvision

    for name in ["densenet121", "densenet161", "densenet169", "densenet201"]:
        with torch.device("meta"):
            tv = getattr(torchvision.models, name)()
        assert count_params(meta_model(name)) == count_params(tv)


def test_layer_structure_reads_like_the_paper():
    m = densenet.create_model("densenet_bc_100_k12")
    block = m.features.denseblock1
    assert len(block) == 16  # L = 6n + 4 -> n = 16
    layer = block.denselayer3
    assert layer.conv1.in_channels == 24 + 2 * 12  # k0 + k(l-1), k0 = 2k for BC
    assert layer.conv1.out_channels == 48 and layer.conv1.kernel_size == (1, 1)  # 4k bottleneck
    assert layer.conv2.out_channels == 12 and layer.conv2.kernel_size == (3, 3)
    assert m.features.transition1.conv.out_channels == (24 + 16 * 12) // 2  # theta = 0.5
    assert m.features.conv0.kernel_size == (3, 3) and m.features.conv0.out_channels == 24
    plain = densenet.create_model("densenet_40_k12")
    assert plain.features.conv0.out_channels == 16  # 16 stem maps reproduce the non-BC counts
    assert plain.features.transition1.conv.out_channels == 16 + 12 * 12  # theta = 1
    assert not hasattr(plain.features.denseblock1.denselayer1, "conv2")
    i = densenet.create_model("densenet121")
    assert i.features.conv0.kernel_size == (7, 7) and i.features.conv0.stride == (2, 2)
    assert isinstance(i.features.pool0, nn.MaxPool2d)
    assert [len(getattr(i.features, f"denseblock{b}")) for b in range(1, 5)] == [6, 12, 24, 16]
    assert densenet.create_model("densenet161").features.conv0.out_channels == 96


def test_compression_floors_in_exact_arithmetic():
    # float arithmetic: math.floor(0.29 * 100) == 28; the paper's floor(theta * m) is 29
    assert math.floor(0.29 * 100) == 28
    assert compressed_channels(100, 0.29) == 29
    assert compressed_channels(99, 0.5) == 49
    m = densenet.create_model("densenet_40_k12", compression=0.29, num_init_features=16, depth=40)
    assert m.features.transition1.conv.out_channels == math.floor(29 * (16 + 12 * 12) / 100)


@pytest.mark.parametrize("name, conv, bns, fan_out", [
    # DenseNet as the authors' Lua: He normal with fan-out, not torchvision's fan-in
    ("densenet_100_k24", "features.denseblock2.denselayer5.conv1", ("features.norm5",), 3 * 3 * 24),
    ("resnet56", "layer3.4.conv1", ("layer3.4.bn1",), 3 * 3 * 64),  # He 2015
])
def test_authors_initialisation(name, conv, bns, fan_out):
    torch.manual_seed(0)
    m = densenet.create_model(name)
    modules = dict(m.named_modules())
    assert modules[conv].weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.03)
    for bn in bns:
        assert torch.all(modules[bn].weight == 1) and torch.all(modules[bn].bias == 0)
    assert torch.all(m.get_classifier().bias == 0)


def test_dropout_after_every_convolution_but_the_first():
    m = densenet.create_model("densenet_bc_100_k12", depth=16, drop_rate=0.2)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))  # eval: no dropout
    m.train()
    calls = []
    # count dropout applications: F.dropout after conv1 and conv2 of every layer, and after transitions
    import torch.nn.functional as F
    orig = F.dropout

    def counting(x, p=0.5, training=True, inplace=False):
        calls.append(p)
        return orig(x, p, training, inplace)

    F.dropout = counting
    try:
        m(x)
    finally:
        F.dropout = orig
    n_layers = sum(m.config.block_config)
    assert len([p for p in calls if p == 0.2]) == 2 * n_layers + len(m.config.block_config) - 1


def test_final_bn_relu_before_pooling_is_a_hookable_module():
    m = densenet.create_model("densenet_bc_100_k12", depth=16).eval()
    seen = {}
    m.features.relu5.register_forward_hook(lambda mod, i, o: seen.setdefault("out", o))
    assert isinstance(m.features.relu5, nn.ReLU) and not m.features.relu5.inplace
    x = torch.randn(1, 3, 32, 32)
    logits = m(x)
    assert seen["out"].min() >= 0
    # the output the hook saw is what the head used: pool + classifier of it reproduce the logits
    torch.testing.assert_close(m.classifier(seen["out"].mean((2, 3))), logits)


def test_batch_size_one_keeps_batch_dimension():
    m = densenet.create_model("densenet_bc_100_k12", depth=16).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("fused", [True, False])
def test_grayscale_and_non_square_inputs(fused):
    m = densenet.create_model("densenet_bc_100_k12", depth=16, in_channels=1, num_classes=7, fused=fused)
    out = m(torch.randn(3, 1, 40, 24))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    i = densenet.create_model("densenet121", block_config=(1, 1, 1, 1), in_channels=1, fused=fused).eval()
    assert i(torch.randn(2, 1, 29, 61)).shape == (2, 1000)


def test_imagenet_topology_minimum_input_is_29():
    m = densenet.create_model("densenet121", block_config=(1, 1, 1, 1)).eval()
    assert m.config.min_input_size == 29
    m(torch.randn(1, 3, 29, 29))
    with pytest.raises(ValueError, match="at least 29x29"):
        m(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("name, kw, too_small", [
    ("densenet_bc_100_k12", dict(depth=16), (2, 2)),
    ("resnet20", {}, (0, 32)),  # padded downsampling: even one pixel goes through a ResNet
])
@pytest.mark.parametrize("x, match", [
    (torch.randn(3, 32, 32), "4-D batch"),
    (torch.randn(2, 1, 32, 32), "3 input channels got 1"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    (None, "too small"),
])
def test_bad_inputs_raise_clear_errors(name, kw, too_small, x, match):
    m = densenet.create_model(name, **kw).eval()
    with pytest.raises(ValueError, match=match):
        m(torch.randn(2, 3, *too_small) if x is None else x)


@pytest.mark.parametrize("name, kwargs, match", [
    ("densenet_bc_100_k12", dict(depth=101), r"valid depths are 100, 106"),
    ("densenet_bc_100_k12", dict(depth=101, bottleneck=False), r"L = 3n \+ 4"),
    ("densenet_bc_100_k12", dict(compression=0.0), "0 < theta <= 1"),
    ("densenet_bc_100_k12", dict(compression=1.5), "0 < theta <= 1"),
    ("densenet_bc_100_k12", dict(growth_rate=0), "growth_rate"),
    ("densenet_bc_100_k12", dict(drop_rate=1.0), "drop_rate"),
    ("densenet_bc_100_k12", dict(num_classes=-1), "num_classes"),
    ("densenet_bc_100_k12", dict(in_channels=0), "in_channels"),
    ("densenet_bc_100_k12", dict(widht=3), "unknown option"),
    # the baselines
    ("resnet20", dict(depth=21), r"valid depths are 20, 26"),
    ("preact_resnet164", dict(depth=165), r"L = 9n \+ 2"),
    ("wrn_28_10", dict(depth=17), r"L = 6n \+ 4"),
    ("resnet50", dict(depth=51), "valid depths are 18, 34, 50, 101, 152"),
    ("resnext50_32x4d", dict(depth=34), "valid depths are 50, 101, 152"),
    ("resnet20", dict(drop_rate=0.2), "drop_rate"),  # He 2015 trains without dropout
    ("resnet20", dict(unit="fancy"), "unit must be one of original"),
    ("resnet20", dict(shortcut_variant="gate"), "shortcut_variant must be one of"),
    ("resnet20", dict(stochastic_depth=0.0), "0 < p_L <= 1"),
    ("plain20", dict(stochastic_depth=0.5), "plain network"),
    ("resnet20", dict(planes=(64, 32, 16)), "option A zero-pads"),
    ("resnet20", dict(widht=3), "unknown option"),
    ("resnext29_8x64d", dict(groups=4), "cardinality"),
    # the same type checks as DenseNetConfig: a string or a list from a config file, not a TypeError
    ("resnet20", dict(stem_width="abc"), "ResNetConfig: stem_width must be an integer, got 'abc'"),
    ("resnet20", dict(layers="abc"), "ResNetConfig: layers must be a list of integers"),
    ("wrn_16_4", dict(drop_rate="0.3"), "ResNetConfig: drop_rate must be a finite number"),
    ("resnet20", dict(gate_bias=float("nan")), "ResNetConfig: gate_bias must be a finite number"),
])
def test_invalid_configurations_raise_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        densenet.create_model(name, **kwargs)


def test_unknown_model_suggests_names():
    with pytest.raises(ValueError, match="densenet121"):
        densenet.create_model("densenet12l")
    with pytest.raises(ValueError, match="valid depths are 121"):
        densenet.create_model("densenet121", depth=122)


def test_any_configuration_builds():
    m = densenet.create_model("densenet_bc_100_k12", depth=22, growth_rate=5, compression=0.3,
                              bn_size=2, num_classes=3, in_channels=4)
    assert m(torch.randn(2, 4, 16, 16)).shape == (2, 3)
    cfg = DenseNetConfig(growth_rate=7, block_config=(2, 3), bottleneck=False, compression=0.7)
    assert densenet.DenseNet(cfg)(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_overrides_use_the_papers_names():
    m = densenet.create_model("densenet_bc_100_k12", depth=250, growth_rate=24)
    assert count_params(m) == densenet.get_entry("densenet_bc_250_k24").paper_params
