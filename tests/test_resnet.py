"""The baselines DenseNet is compared against, checked as numbers: published parameter counts and FLOPs,
torchvision's outputs from its checkpoints, the residual units of He 2016 computed by hand, option A
shortcuts, plain nets, stochastic depth's rule, Wide ResNets and ResNeXt's grouped convolutions."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import densenet
from densenet.analysis import count_macs, count_params
from densenet.cli import main
from densenet.models.resnet import UNITS, ResNet, ResNetConfig, ZeroPadShortcut
from densenet.runs import CheckpointError

DENSENET_FAMILIES = ("DenseNet (CIFAR/SVHN)", "DenseNet (ImageNet)")
BASELINES = [n for n in densenet.list_models() if densenet.get_entry(n).family not in DENSENET_FAMILIES]


def meta_model(name, **kw):
    with torch.device("meta"):
        return densenet.create_model(name, **kw)


def randomise_bn(model):
    """Non-trivial BN statistics and affine maps, so that a mis-mapped key or a misplaced BN shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


# --- parameter counts and FLOPs against the papers ---------------------------------------------------------

# The figures as the papers print them (millions), independent of the registry's data.
PUBLISHED_MILLIONS = {
    "resnet20": "0.27", "resnet32": "0.46", "resnet44": "0.66", "resnet56": "0.85", "resnet110": "1.7",
    "resnet1202": "19.4",  # He 2015 Table 6
    "resnet110_stochdepth": "1.7", "resnet1202_stochdepth": "19.4",  # same networks (DenseNet prints 10.2M)
    "preact_resnet110": "1.7", "preact_resnet164": "1.7",  # He 2016; ResNet-1001 below
    "wrn_16_4": "2.7", "wrn_16_8": "11.0", "wrn_28_10": "36.5",  # as DenseNet's Table 2 cites them
    "resnext50_32x4d": "25.0", "resnext101_32x4d": "44.2", "resnext29_8x64d": "34.4",  # Xie 2017
}
# SPEC.md's finer figures (two decimals), and torchvision's exact counts of the ImageNet ResNets
SPEC_MILLIONS = {"resnet20": "0.27", "resnet56": "0.85", "resnet110": "1.73", "resnet1202": "19.42",
                 "preact_resnet164": "1.70", "preact_resnet1001": "10.33", "wrn_16_8": "10.96",
                 "wrn_28_10": "36.48", "resnext50_32x4d": "25.03"}
TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d"]


def within_printed(count: int, printed: str) -> bool:
    """count rounds to the printed figure: |count - figure| <= half a unit of its last digit."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(count - float(printed) * 1e6) <= 0.5 * 10 ** (6 - decimals)


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_parameter_counts_round_to_the_published_figures(name):
    assert within_printed(count_params(meta_model(name)), PUBLISHED_MILLIONS[name])


@pytest.mark.parametrize("name", sorted(SPEC_MILLIONS))
def test_parameter_counts_match_spec(name):
    assert within_printed(count_params(meta_model(name)), SPEC_MILLIONS[name])


def test_counts_the_papers_print_differently():
    # ResNeXt-29 16x64d: 68,155,210 parameters, printed (truncated) as 68.1M
    assert count_params(meta_model("resnext29_16x64d")) == 68_155_210
    # pre-activation ResNet-1001: 10.33M by the paper's rules; the paper prints 10.2M
    n = count_params(meta_model("preact_resnet1001"))
    assert n == 10_327_706 and not within_printed(n, "10.2")


@pytest.mark.parametrize("name", TORCHVISION)
def test_imagenet_counts_are_torchvision_s(name):
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)()
    assert count_params(meta_model(name)) == count_params(tv) == densenet.get_entry(name).paper_params


def cifar_resnet_rule(n: int, classes: int = 10) -> int:
    """He 2015's CIFAR ResNet counted by hand: 3x3 conv (16), 3 stages of n two-conv units (16/32/64),
    BN with 2 parameters per map, no parameters in option A shortcuts, a 64 -> classes classifier."""
    total, c = 3 * 9 * 16 + 2 * 16, 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += c * 9 * w + 2 * w + w * 9 * w + 2 * w
            c = w
    return total + 64 * classes + classes


def wrn_rule(d: int, k: int, classes: int = 10) -> int:
    """WRN-d-k by hand: pre-activation units BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 projection (no BN) where
    the width changes, a final BN, a classifier."""
    n, total, c = (d - 4) // 6, 3 * 9 * 16, 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c + c * 9 * w + 2 * w + w * 9 * w + (c * w if c != w else 0)
            c = w
    return total + 2 * c + c * classes + classes


def preact_bottleneck_rule(n: int, classes: int = 10) -> int:
    """Pre-activation ResNet-164/1001 by hand: BN-ReLU-conv1x1(w)-BN-ReLU-conv3x3(w)-BN-ReLU-conv1x1(4w),
    w = 16/32/64, 1x1 projection where the width changes, a final BN, a classifier."""
    total, c = 3 * 9 * 16, 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += 2 * c + c * w + 2 * w + w * 9 * w + 2 * w + w * 4 * w + (c * 4 * w if c != 4 * w else 0)
            c = 4 * w
    return total + 2 * c + c * classes + classes


def test_counts_follow_the_construction_rules():
    for depth in (20, 32, 44, 56, 110, 1202):
        n = (depth - 2) // 6
        assert count_params(meta_model(f"resnet{depth}")) == cifar_resnet_rule(n)
        assert count_params(meta_model(f"resnet{depth}", num_classes=100)) == cifar_resnet_rule(n, 100)
    assert count_params(meta_model("resnet20")) == 269_722
    for d, k in ((16, 4), (16, 8), (28, 10)):
        assert count_params(meta_model(f"wrn_{d}_{k}")) == wrn_rule(d, k)
    assert count_params(meta_model("preact_resnet164")) == preact_bottleneck_rule(18) == 1_703_258
    assert count_params(meta_model("preact_resnet1001")) == preact_bottleneck_rule(111)


# He 2015 Table 1 and Xie 2017 Table 1, in 10^9 multiply-adds
PUBLISHED_GFLOPS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3,
                    "plain18": 1.8, "plain34": 3.6, "resnext50_32x4d": 4.2}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GFLOPS))
def test_multiply_adds_within_5_percent_of_the_papers(name):
    # He 2015's bottleneck models stride their first 1x1 convolution (torchvision's weights, and ResNeXt,
    # stride the 3x3, which makes ResNet-50 4.09 GMACs: 7.6% above the paper's 3.8)
    kw = {"stride_in_1x1": True} if name in ("resnet50", "resnet101", "resnet152") else {}
    macs = count_macs(meta_model(name, **kw), (3, 224, 224))
    assert macs / 1e9 == pytest.approx(PUBLISHED_GFLOPS[name], rel=0.05)


def test_stride_placement_changes_multiply_adds_not_parameters():
    v15, v1 = meta_model("resnet50"), meta_model("resnet50", stride_in_1x1=True)
    assert count_params(v15) == count_params(v1)
    assert count_macs(v15, (3, 224, 224)) / 1e9 == pytest.approx(4.089, abs=0.0006)  # torchvision's figure
    assert count_macs(v1, (3, 224, 224)) / 1e9 == pytest.approx(3.858, abs=0.0006)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)


def test_models_command_lists_the_baselines_by_family(capsys):
    assert main(["models", "resnet18", "resnet20", "preact_resnet164", "wrn_28_10", "resnext29_16x64d"]) == 0
    out = capsys.readouterr().out
    for family in ("ResNet (ImageNet)", "ResNet (CIFAR)", "Pre-activation ResNet (CIFAR)", "Wide ResNet (CIFAR)",
                   "ResNeXt (CIFAR)"):
        assert f"\n{family}\n" in out
    assert "11,689,512" in out and "1.814" in out  # exact count where one is published
    assert "269,722" in out and "0.27M" in out and "68.1M" in out  # printed figures as printed


def test_every_issue_network_is_registered():
    names = set(densenet.list_models())
    wanted = {f"resnet{d}" for d in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202)}
    wanted |= {"plain18", "plain34", "plain20", "plain32", "plain44", "plain56", "plain110",
               "preact_resnet110", "preact_resnet164", "preact_resnet1001", "wrn_16_4", "wrn_16_8", "wrn_28_10",
               "resnext50_32x4d", "resnext101_32x4d", "resnext29_8x64d", "resnext29_16x64d",
               "resnet110_stochdepth", "resnet1202_stochdepth"}
    assert wanted <= names
    # every one has its published count in the registry, but the ImageNet plain nets (He 2015 gives none)
    # (nor does Xie 2017 for its Table 3 ablation, nor Huang 2016 for its 152-layer SVHN network)
    assert sorted(n for n in BASELINES if not densenet.get_entry(n).paper_params) == sorted(
        ["plain18", "plain34", "resnet152_constdepth", "resnet152_stochdepth"]
        + [f"resnext{d}_{w}" for d in (50, 101) for w in ("2x40d", "4x24d", "8x14d")])


# --- torchvision's checkpoints ------------------------------------------------------------------------------

# test_weights.py: torchvision checkpoints of every family give torchvision's outputs

def torchvision_model(name):
    torch.manual_seed(1)
    return randomise_bn(getattr(torchvision.models, name)(weights=None)).eval()


@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnet152", "resnext101_32x4d"])
def test_other_imagenet_networks_have_torchvision_s_state_dict(name):
    with torch.device("meta"):  # ResNeXt-101 32x4d is not in torchvision's zoo; its ResNet class builds it
        if name == "resnext101_32x4d":
            from torchvision.models.resnet import Bottleneck
            tv = torchvision.models.ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
        else:
            tv = getattr(torchvision.models, name)()
    ours = meta_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}


def test_fine_tuning_and_grayscale_from_a_torchvision_checkpoint(tmp_path):
    tv = torchvision_model("resnet18")
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint \(1000, 512\) vs model \(10, 512\).*"
                                              r"reset_classifier=True"):
        densenet.create_model("resnet18", num_classes=10, pretrained=str(path))
    ours = densenet.create_model("resnet18", num_classes=10, pretrained=str(path), reset_classifier=True).eval()
    gray = densenet.create_model("resnet18", in_channels=1, pretrained=str(path)).eval()
    x = torch.randn(2, 1, 40, 24)
    with torch.no_grad():
        feats = torch.flatten(tv.avgpool(tv.layer4(tv.layer3(tv.layer2(tv.layer1(
            tv.maxpool(tv.relu(tv.bn1(tv.conv1(x.expand(-1, 3, -1, -1)))))))))), 1)
        torch.testing.assert_close(ours.forward_head(ours.forward_features(x.expand(-1, 3, -1, -1)), pre_logits=True),
                                   feats, atol=1e-4, rtol=0)
        assert (gray(x) - tv(x.expand(-1, 3, -1, -1))).abs().max().item() <= 1e-4


# --- plain nets and option A --------------------------------------------------------------------------------

def test_plain_nets_have_the_same_layers_and_no_shortcuts():
    for res, plain in [("resnet18", "plain18"), ("resnet34", "plain34"), ("resnet56", "plain56")]:
        r, p = meta_model(res), meta_model(plain)
        convs = lambda m: [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in m.modules()
                           if isinstance(c, nn.Conv2d) and c.kernel_size != (1, 1)]
        assert convs(r) == convs(p)
        assert all(u.downsample is None and not u.has_shortcut for u in p.units())
    # ImageNet: the plain net lacks exactly the projections; CIFAR: option A had no parameters to lose
    r18 = meta_model("resnet18")
    projections = sum(count_params(u.downsample) for u in r18.units() if u.downsample is not None)
    assert count_params(meta_model("plain18")) == count_params(r18) - projections == 11_515_688
    assert count_params(meta_model("plain110")) == count_params(meta_model("resnet110"))
    # a plain unit outputs ReLU(F(x)), nothing added
    m = randomise_bn(densenet.create_model("plain20")).eval()
    u, x = m.layer1[1], torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(u(x), F.relu(u.bn2(u.conv2(F.relu(u.bn1(u.conv1(x)))))))


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
    m = randomise_bn(densenet.create_model("resnet20")).eval()
    assert sum(isinstance(u.downsample, ZeroPadShortcut) for u in m.units()) == 2  # 16->32 and 32->64
    assert count_params(m.layer2[0].downsample) == 0 and not list(m.layer2[0].downsample.buffers())
    x = torch.randn(2, 16, 9, 9)
    h = ZeroPadShortcut(32, 2)(x)
    assert h.shape == (2, 32, 5, 5)
    assert torch.equal(h[:, :16], x[:, :, ::2, ::2]) and torch.equal(h[:, 16:], torch.zeros(2, 16, 5, 5))
    u = m.layer2[0]
    with torch.no_grad():
        expected = F.relu(u.bn2(u.conv2(F.relu(u.bn1(u.conv1(x))))) + h)
        torch.testing.assert_close(u(x), expected)


# --- He 2016: the units of Fig. 4 and the shortcuts of Fig. 2 ---------------------------------------------

def small_preact(unit="full_preact", bottleneck=False, **kw):
    depth = 20 if bottleneck else 14  # n = 2: the second unit of a stage has an identity shortcut
    torch.manual_seed(0)
    return randomise_bn(densenet.create_model("preact_resnet164", depth=depth, bottleneck=bottleneck,
                                              unit=unit, **kw)).eval()


def by_hand(unit, u, x):
    """Fig. 4 of He 2016 written out for a basic unit with an identity shortcut."""
    c1, b1, c2, b2 = u.conv1, getattr(u, "bn1", None), u.conv2, getattr(u, "bn2", None)
    if unit == "original":
        return F.relu(x + b2(c2(F.relu(b1(c1(x))))))
    if unit == "bn_after_addition":
        return F.relu(u.bn_out(x + c2(F.relu(b1(c1(x))))))
    if unit == "relu_before_addition":
        return x + F.relu(b2(c2(F.relu(b1(c1(x))))))
    if unit == "relu_preact":
        return x + b2(c2(F.relu(b1(c1(F.relu(x))))))
    if unit == "full_preact":
        return x + c2(F.relu(b2(c1(F.relu(b1(x))))))
    raise AssertionError(unit)


@pytest.mark.parametrize("unit", list(UNITS))
def test_each_unit_of_fig4_computes_its_order(unit):
    m = small_preact(unit)
    u, x = m.layer1[1], torch.randn(2, 16, 8, 8)
    assert u.downsample is None and not u.share_preact
    with torch.no_grad():
        torch.testing.assert_close(u(x), by_hand(unit, u, x))
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # pre-activation networks end with an extra activation, post-activation ones start with BN-ReLU
    assert hasattr(m, "relu_final") == (unit in ("relu_preact", "full_preact"))
    assert hasattr(m, "bn1") == (unit not in ("relu_preact", "full_preact"))
    b = small_preact(unit, bottleneck=True)  # the bottleneck version builds and runs too
    with torch.no_grad():
        assert torch.isfinite(b(torch.randn(2, 3, 16, 16))).all()
    assert len([o for o in b.layer1[1].branch_ops if o.startswith("conv")]) == 3


def test_full_preactivation_unit_by_hand_and_shared_activation_where_the_shape_changes():
    m = small_preact("full_preact", bottleneck=True)
    u, x = m.layer1[1], torch.randn(2, 64, 8, 8)
    assert u.branch_ops == "bn1 relu conv1 bn2 relu conv2 bn3 relu conv3".split()
    with torch.no_grad():
        f = u.conv3(F.relu(u.bn3(u.conv2(F.relu(u.bn2(u.conv1(F.relu(u.bn1(x)))))))))
        torch.testing.assert_close(u(x), x + f)
        # the first unit of a stage: BN-ReLU once, read by the 1x1 projection (conv only) and by F
        v, x = m.layer2[0], torch.randn(2, 64, 8, 8)
        assert v.share_preact and len(v.downsample) == 1
        a = F.relu(v.bn1(x))
        f = v.conv3(F.relu(v.bn3(v.conv2(F.relu(v.bn2(v.conv1(a)))))))
        torch.testing.assert_close(v(x), v.downsample(a) + f)


def residual_of(u, x):
    with torch.no_grad():
        return u._run(u.branch_ops, x)


@pytest.mark.parametrize("variant", ["scaling", "exclusive_gating", "shortcut_only_gating", "conv1x1", "dropout"])
def test_each_shortcut_of_table1_computes_its_formula(variant):
    kw = {"scaling": (0.5, 0.5)} if variant == "scaling" else {}
    m = small_preact("original", shortcut_variant=variant, **kw)  # Table 1 varies the original units
    u, x = m.layer1[1], torch.randn(2, 16, 8, 8)
    f = residual_of(u, x)
    with torch.no_grad():
        if variant == "scaling":
            expected = F.relu(0.5 * x + 0.5 * f)
        elif variant == "exclusive_gating":
            assert torch.all(u.gate.bias == -6.0)  # b_g = -6, the paper's best
            g = torch.sigmoid(u.gate(x))
            expected = F.relu((1 - g) * x + g * f)
        elif variant == "shortcut_only_gating":
            g = torch.sigmoid(u.gate(x))
            expected = F.relu((1 - g) * x + f)
        elif variant == "conv1x1":
            assert all(v.downsample is not None for v in m.units())  # every shortcut is a 1x1 convolution
            expected = F.relu(u.downsample(x) + f)
        else:
            expected = F.relu(x + f)  # test time: dropout is the identity
        torch.testing.assert_close(u(x), expected)
        assert torch.isfinite(m(torch.randn(2, 3, 16, 16))).all()
    if variant == "dropout":  # training: h(x) = dropout(x, 0.5); F draws no random numbers
        u.train()
        torch.manual_seed(3)
        got = u(x)
        f_train = residual_of(u, x)
        torch.manual_seed(3)
        torch.testing.assert_close(got, F.relu(F.dropout(x, 0.5, True) + f_train))


def test_constant_scaling_0_1_is_the_plain_net():
    scaled = small_preact("original", shortcut_variant="scaling", scaling=(0.0, 1.0))
    plain = small_preact("original", residual=False)
    plain.load_state_dict(scaled.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x), plain(x))


# --- stochastic depth ---------------------------------------------------------------------------------------

def test_survival_probabilities_follow_the_linear_decay_rule():
    m = meta_model("resnet110_stochdepth")
    p = [u.survival_prob for u in m.units()]
    assert len(p) == 54  # 110 = 6 * 18 + 2: 3 stages of 18 units
    assert p == pytest.approx([1 - l / 54 * (1 - 0.5) for l in range(1, 55)])
    assert p[-1] == 0.5 and p[0] == pytest.approx(1 - 1 / 108)
    assert sum(p) == pytest.approx(40.25)  # the expected number of active units per mini-batch
    assert all(u.survival_prob == 1.0 for u in meta_model("resnet110").units())


def test_expected_number_of_active_units_matches_the_rule():
    torch.manual_seed(0)
    m = densenet.create_model("resnet110_stochdepth").train()
    draws = torch.tensor([[u.residual_scale() for u in m.units()] for _ in range(2000)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert draws.sum(1).mean().item() == pytest.approx(40.25, abs=0.25)  # sd of the mean ~0.07
    per_unit = draws.mean(0)
    expected = torch.tensor([u.survival_prob for u in m.units()])
    assert (per_unit - expected).abs().max().item() < 0.06

    # whole forward passes: count the units whose residual branch ran (ResNet-20, 9 units: 6.5 expected)
    small = densenet.create_model("resnet20", stochastic_depth=0.5).train()
    ran = []
    for u in small.units():
        u.conv1.register_forward_hook(lambda *a: ran.append(1))
    passes, threads = 300, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend (2 ms a pass instead of 20+)
    try:
        with torch.no_grad():
            for _ in range(passes):
                small(torch.randn(2, 3, 4, 4))
    finally:
        torch.set_num_threads(threads)
    assert sum(p.survival_prob for p in small.units()) == pytest.approx(6.5)
    assert len(ran) / passes == pytest.approx(6.5, abs=0.3)  # sd of the mean ~0.08


def test_dropped_unit_passes_the_shortcut_and_test_time_scales_by_survival():
    m = randomise_bn(densenet.create_model("resnet20", stochastic_depth=0.5))
    u = m.layer2[0]  # a downsampling unit: l = 4 of 9, p = 1 - 4/9 * 0.5
    assert u.survival_prob == pytest.approx(1 - 4 / 18)
    x = torch.randn(2, 16, 8, 8)
    h = u.downsample(x)
    with torch.no_grad():
        u.eval()
        f = residual_of(u, x)
        torch.testing.assert_close(u(x), F.relu(h + u.survival_prob * f))  # test time: scaled
        u.train()
        u.survival_prob = 1e-9  # always dropped: the output is the (activated) shortcut alone
        torch.testing.assert_close(u(x), F.relu(h))
    m.eval()
    y = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(y), m(y))  # deterministic at test time


def test_stochastic_depth_network_trains():
    m = densenet.create_model("resnet20", stochastic_depth=0.5, depth=8).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- Wide ResNet and ResNeXt --------------------------------------------------------------------------------

def test_wide_resnet_structure_and_dropout_between_the_convolutions():
    m = densenet.create_model("wrn_28_10", depth=16, widen_factor=2, drop_rate=0.3)
    assert [s[0].out_channels for s in (m.layer1, m.layer2, m.layer3)] == [32, 64, 128]  # 16k, 32k, 64k
    u = m.layer2[1]
    assert u.branch_ops == ["bn1", "relu", "conv1", "bn2", "relu", "drop", "conv2"]  # after the ReLU
    assert isinstance(u.drop, nn.Dropout) and u.drop.p == 0.3
    assert len(m.layer1[0].downsample) == 1 and m.layer1[0].share_preact  # 16 -> 32: 1x1 conv, no BN
    assert densenet.create_model("wrn_16_4").layer1[0].drop.p == 0.4  # the SVHN network
    assert not hasattr(densenet.create_model("wrn_16_8").layer1[0], "drop")
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), m(x))


def test_resnext_grouped_convolutions():
    x50 = meta_model("resnext50_32x4d")
    for stage, width, out in [(x50.layer1, 128, 256), (x50.layer2, 256, 512), (x50.layer3, 512, 1024),
                              (x50.layer4, 1024, 2048)]:
        c = stage[0].conv2
        assert c.groups == 32 and c.in_channels == c.out_channels == width and stage[0].conv3.out_channels == out
        assert c.weight.shape == (width, width // 32, 3, 3)  # each group sees d = 4 * 2^stage maps
    x29 = meta_model("resnext29_16x64d")
    assert x29.conv1.out_channels == 64 and x29.conv1.kernel_size == (3, 3)
    for stage, width, out in [(x29.layer1, 1024, 256), (x29.layer2, 2048, 512), (x29.layer3, 4096, 1024)]:
        assert stage[0].conv2.groups == 16 and stage[0].conv2.out_channels == width
        assert stage[-1].conv3.out_channels == out and len(stage) == 3  # 29 = 9 * 3 + 2
    assert meta_model("resnext29_8x64d").layer1[0].conv2.out_channels == 512  # C x d = 8 x 64


# --- the model contract: inputs, options, initialisation ------------------------------------------------------

# bad inputs, invalid configurations and the initialisation of every family: test_models.py


@pytest.mark.parametrize("model, arg, match", [
    ("resnet20", "stem_width=abc", "ResNetConfig: stem_width must be an integer, got 'abc'"),
    ("densenet_40_k12", "growth_rate=abc", "DenseNetConfig: growth_rate must be an integer, got 'abc'"),
])
def test_a_model_arg_of_the_wrong_type_is_one_line_for_every_family(monkeypatch, capsys, model, arg, match):
    """`densenet train --model-arg` with a wrong type ends in one line naming the option (not a
    TypeError traceback), whatever the family; the model is built as fit builds it, on the meta device."""
    def fake_fit(cfg, resume=None):
        with torch.device("meta"):
            densenet.create_model(cfg.model, **cfg.model_args)

    monkeypatch.setattr(densenet.train, "fit", fake_fit)
    monkeypatch.delenv("DENSENET_DEBUG", raising=False)
    assert main(["train", "--model", model, "--model-arg", arg, "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_any_input_size_channels_and_classes():
    m = densenet.create_model("resnet18", in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 40, 24)).shape == (1, 7)  # batch 1, non-square
        assert m(torch.randn(2, 1, 1, 1)).shape == (2, 7)  # padded downsampling: even one pixel goes through
    assert isinstance(m.relu, nn.ReLU) and not m.relu.inplace  # hookable, not in place


def test_config_is_plain_data():
    """The config is a dataclass of plain values: it survives JSON, and the network rebuilt from the
    round-tripped config is the same network (same parameter names, shapes and count)."""
    import dataclasses
    import json

    model = densenet.create_model("preact_resnet164", depth=11)
    cfg = model.config
    assert isinstance(cfg, ResNetConfig) and cfg.layers == (1, 1, 1) and cfg.unit == "full_preact"
    fields = json.loads(json.dumps(dataclasses.asdict(cfg)))  # raises on anything but plain data
    again = ResNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    assert again == cfg
    rebuilt = ResNet(again)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert count_params(rebuilt) == count_params(model) > 0


# --- stochastic depth's code: average-pool shortcut (option), fan-in init, the 152-layer SVHN network ---------

def test_avgpool_shortcut_averages_2x2_windows_and_zero_pads_the_new_maps():
    from densenet.models.resnet import ZeroPadShortcut

    x = torch.arange(32.0).view(1, 2, 4, 4)
    y = ZeroPadShortcut(4, 2, pool=True)(x)
    assert y.shape == (1, 4, 2, 2)
    torch.testing.assert_close(y[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))  # (0+1+4+5)/4, ...
    torch.testing.assert_close(y[0, 1], torch.tensor([[18.5, 20.5], [26.5, 28.5]]))
    assert (y[0, 2:] == 0).all()  # nn.Padding(1, nOut - nIn, 3): zero maps after the input's
    assert torch.equal(ZeroPadShortcut(4, 2)(x)[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))  # subsample
    m = densenet.create_model("resnet20", downsample="avgpool").eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10) and m(torch.randn(1, 3, 9, 9)).shape == (1, 10)


def test_fan_in_init_is_nninit_kaiming_and_sd_networks_use_it():
    torch.manual_seed(0)
    m = densenet.create_model("resnet56", init="fan_in")
    w = m.layer3[1].conv1.weight.detach()  # 64 -> 64, 3x3: fan-in = fan-out = 576; the stem tells them apart
    assert float(w.std()) == pytest.approx((2 / 576) ** 0.5, rel=0.05)
    stem = m.conv1.weight.detach()  # 3 -> 16 maps: fan-in 27, fan-out 144
    assert float(stem.std()) == pytest.approx((2 / 27) ** 0.5, rel=0.25)
    assert float(densenet.create_model("resnet56").conv1.weight.detach().std()) == pytest.approx((2 / 144) ** 0.5, rel=0.25)
    for name in ("resnet110_stochdepth", "resnet152_stochdepth", "resnet110_constdepth", "resnet152_constdepth"):
        cfg = meta_model(name).config
        assert (cfg.init, cfg.downsample) == ("fan_in", "subsample")
    assert meta_model("wrn_28_10").config.init == "fan_out"  # the WRN code at its paper (fan-in from Sep 2016)
    with pytest.raises(ValueError, match="init must be one of 'fan_out', 'fan_in', got 'xavier'"):
        densenet.create_model("resnet20", init="xavier")


def test_stochastic_depth_svhn_network_has_152_layers():
    from densenet.paper import TABLE2_BY_KEY

    m = meta_model("resnet152_stochdepth")
    assert m.config.layers == (25, 25, 25) and m.config.stochastic_depth == 0.5
    assert meta_model("resnet152_constdepth").config.stochastic_depth is None
    assert TABLE2_BY_KEY["resnet110_stochdepth"].model_for("SVHN") == "resnet152_stochdepth"
    assert TABLE2_BY_KEY["resnet110_stochdepth"].model_for("C10+") == "resnet110_stochdepth"
    assert TABLE2_BY_KEY["resnet110_huang2016"].model_for("SVHN") == "resnet152_constdepth"
