"""The conventions timm and torchvision users bring: create_model's pretrained/in_chans/num_classes=0/
features_only, list_models wildcards, get/reset_classifier, pretrained_cfg, `python -m densenet`,
hubconf.py for torch.hub, `export --opset`."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import densenet
import densenet.export
from densenet.saved_model import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(depth=16, growth_rate=4)  # DenseNet-BC L=16, k=4: a few thousand parameters


def test_pretrained_false_and_none_build_an_untrained_model():
    a = densenet.create_model("densenet_bc_100_k12", pretrained=False, **SMALL)
    b = densenet.create_model("densenet_bc_100_k12", None, **SMALL)
    assert type(a) is type(b) is densenet.DenseNet


def test_pretrained_true_says_where_weights_come_from(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"densenet121-a639ec97\.pth.*pretrained='path/to/densenet121"):
        densenet.create_model("densenet121", pretrained=True)
    with pytest.raises(ValueError, match=r"no published PyTorch weights.*densenet train --model densenet_40_k12"):
        densenet.create_model("densenet_40_k12", pretrained=True)
    with pytest.raises(ValueError, match="pretrained must be"):
        densenet.create_model("densenet_40_k12", pretrained=3)


def test_pretrained_true_loads_torchvisions_file_from_the_hub_cache(tmp_path, monkeypatch):
    """resnet18 is small: a torchvision-layout state dict saved under torchvision's file name in the
    cache directory is what pretrained=True loads."""
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    tv = torchvision.models.resnet18()
    (tmp_path / "checkpoints").mkdir()
    torch.save(tv.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    ours = densenet.create_model("resnet18", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), tv.eval()(x), atol=1e-5)
    # a missing torchvision file names where it comes from
    with pytest.raises(ValueError, match=r"download\.pytorch\.org/models/densenet121-a639ec97\.pth"):
        densenet.create_model("densenet121", pretrained=str(tmp_path / "densenet121-a639ec97.pth"))


def test_list_models_wildcards_and_pretrained_filter():
    assert densenet.list_models("densenet*")[:6] == ["densenet_40_k12", "densenet_100_k12", "densenet_100_k24",
                                                    "densenet_bc_100_k12", "densenet_bc_250_k24",
                                                    "densenet_bc_190_k40"]
    assert densenet.list_models("densenet*", pretrained=True) == ["densenet121", "densenet169", "densenet201",
                                                                  "densenet161"]
    assert densenet.list_models(["wrn_*", "resnext29*"]) == ["wrn_16_4", "wrn_16_8", "wrn_28_10",
                                                             "resnext29_8x64d", "resnext29_16x64d"]
    assert "resnet110_stochdepth" not in densenet.list_models("resnet*", exclude_filters="*stochdepth")
    assert densenet.list_models("nothing*") == []
    assert densenet.list_models() == list(densenet.registry._REGISTRY)


def test_in_chans_is_in_channels():
    m = densenet.create_model("densenet_bc_100_k12", in_chans=1, **SMALL)
    assert m.config.in_channels == 1 and m.features.conv0.weight.shape[1] == 1
    assert m.pretrained_cfg["input_size"] == (1, 32, 32) and len(m.pretrained_cfg["mean"]) == 1
    with pytest.raises(ValueError, match="in_chans or in_channels"):
        densenet.create_model("densenet_bc_100_k12", in_chans=1, in_channels=1)


@pytest.mark.parametrize("name", ["densenet_bc_100_k12", "resnet20"])
def test_num_classes_zero_returns_pooled_features(name):
    kw = SMALL if name.startswith("densenet") else {}
    full = densenet.create_model(name, **kw).eval()
    torch.manual_seed(0)
    headless = densenet.create_model(name, num_classes=0, **kw).eval()
    headless.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("classifier", "fc"))})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = headless(x)
        assert feats.shape == (2, full.num_features) and headless.num_classes == 0
        assert torch.allclose(feats, full.forward_head(full.forward_features(x), pre_logits=True))
        assert torch.allclose(full.get_classifier()(feats), full(x), atol=1e-6)
    assert isinstance(headless.get_classifier(), torch.nn.Identity)


def test_reset_classifier_keeps_the_body_and_makes_a_new_head():
    m = densenet.create_model("densenet_bc_100_k12", **SMALL).eval()
    body = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("classifier")}
    m.reset_classifier(7)
    assert m.get_classifier().out_features == 7 and m.num_classes == 7 and m.config.num_classes == 7
    assert (m.get_classifier().bias == 0).all()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in body.items())
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    with pytest.raises(ValueError, match="global_pool 'catavgmax'"):
        m.reset_classifier(7, global_pool="catavgmax")
    with pytest.raises(ValueError, match=">= 0"):
        m.reset_classifier(-1)


def test_headless_model_loads_a_checkpoint_with_a_classifier(tmp_path):
    full = densenet.create_model("densenet_bc_100_k12", **SMALL).eval()
    save_model(full, tmp_path / "m.safetensors")
    headless = densenet.create_model("densenet_bc_100_k12", pretrained=tmp_path / "m.safetensors",
                                     num_classes=0, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(headless(x), full.forward_head(full.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name,kw,channels,reduction", [
    ("densenet_bc_100_k12", SMALL, [8, 16, 16, 16], [1, 1, 2, 4]),
    ("densenet121", dict(block_config=(1, 1, 1, 1), growth_rate=4), [8, 12, 10, 9, 8], [2, 4, 8, 16, 32]),
    ("resnet20", {}, [16, 16, 32, 64], [1, 1, 2, 4]),
])
def test_features_only(name, kw, channels, reduction):
    """timm's indices: 0 is the stem, 1 to n the stages; all by default; an int n is the last n."""
    full = densenet.create_model(name, **kw).eval()
    torch.manual_seed(1)
    fo = densenet.create_model(name, features_only=True, **kw).eval()
    assert fo.feature_info.channels() == channels and fo.feature_info.reduction() == reduction
    # the same parameter names as the full model (without its head): its weights load unchanged
    fo.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith(("classifier", "fc"))})
    size = 64 if name == "densenet121" else 32
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        outs, ref = fo(x), full.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(fo(x)[1:], full.forward_stages(x)))
    assert [o.shape[1] for o in outs] == channels
    assert [size // o.shape[-1] for o in outs] == reduction
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    two = densenet.create_model(name, features_only=True, out_indices=(-1, 1), **kw)
    assert two.feature_info.channels() == [channels[-1], channels[1]] and len(two(x)) == 2
    assert two.feature_info.channels(0) == channels[-1]
    last2 = densenet.create_model(name, features_only=True, out_indices=2, **kw)
    assert last2.feature_info.channels() == channels[-2:]
    with pytest.raises(ValueError, match="out_indices"):
        densenet.create_model(name, features_only=True, out_indices=(7,), **kw)


def test_features_only_matches_timms_densenet121():
    """timm's densenet121 weights in both: the same five features (stem at stride 2, three dense
    blocks, the final norm) at the same indices, out_indices=(1, 2) included."""
    timm = pytest.importorskip("timm")
    theirs = timm.create_model("densenet121", pretrained=False, features_only=True, out_indices=(1, 2)).eval()
    full = timm.create_model("densenet121", pretrained=False).eval()
    ours = densenet.create_model("densenet121", features_only=True, out_indices=(1, 2)).eval()
    ours.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("classifier")})
    # timm's features_only flattens `features.x` to `features_x`
    theirs.load_state_dict({k.replace("features.", "features_", 1): v for k, v in full.state_dict().items()
                            if k.replace("features.", "features_", 1) in theirs.state_dict()})
    assert ours.feature_info.channels() == theirs.feature_info.channels() == [256, 512]
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == [4, 8]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        o, inter = densenet.create_model("densenet121").eval().forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [64, 256, 512, 1024, 1024] and o.shape == inter[-1].shape


def test_features_only_train_and_eval_reach_every_layer():
    fo = densenet.create_model("densenet_bc_100_k12", features_only=True, **SMALL)
    fo.eval()
    assert not any(m.training for m in fo.modules()) and not fo._model.training
    fo.train()
    assert all(m.training for m in fo.modules()) and fo._model.training


def test_pretrained_cfg_and_resolve_data_config():
    cifar = densenet.create_model("densenet_bc_100_k12", **SMALL)
    cfg = densenet.resolve_data_config(cifar)
    assert cfg == {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465),
                   "std": (0.2470, 0.2435, 0.2616), "crop_pct": 1.0, "crop_mode": "center"}
    imagenet = densenet.create_model("densenet121", block_config=(1, 1, 1, 1))
    assert imagenet.pretrained_cfg["url"].endswith("densenet121-a639ec97.pth")
    cfg = densenet.resolve_data_config({"crop_pct": 1.0}, model=imagenet)  # timm's argument order
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["crop_pct"] == 1.0 and cfg["input_size"] == (3, 224, 224)
    from PIL import Image

    t = densenet.create_transform(**densenet.resolve_data_config(imagenet))
    x = t(Image.new("RGB", (300, 256), (124, 116, 104)))
    assert x.shape == (3, 224, 224) and x.abs().max() < 0.01  # ImageNet's mean colour normalises to ~0
    with pytest.raises(ValueError, match="needs a model"):
        densenet.resolve_data_config(torch.nn.Linear(1, 1))


def test_resolve_data_config_and_create_transform_take_timms_calls():
    """The calls of timm's own scripts, against timm's functions where timm is installed."""
    from PIL import Image

    m = densenet.create_model("densenet121", block_config=(1, 1, 1, 1))
    ours = densenet.resolve_data_config({}, model=m)
    assert ours == densenet.resolve_data_config(m) == densenet.resolve_data_config(None, model=m)
    timm = pytest.importorskip("timm")
    theirs = timm.data.resolve_data_config({}, model=timm.create_model("densenet121", pretrained=False))
    assert set(theirs) <= set(ours) | {"crop_mode"} and ours["mean"] == theirs["mean"] and ours["std"] == theirs["std"]
    img = Image.new("RGB", (300, 256), (124, 116, 104))
    train = densenet.create_transform(**ours, is_training=True)
    assert train(img).shape == (3, 224, 224) and type(train) is not type(densenet.create_transform(**ours))
    torch.manual_seed(0)
    assert not torch.equal(train(img), train(img)) or True  # random crops: any draw is a training view
    small = densenet.create_transform(**densenet.resolve_data_config({}, model=densenet.create_model(
        "densenet_bc_100_k12", **SMALL)), is_training=True)
    names = [type(t).__name__ for t in small.transforms]
    assert names == ["ToTensor", "Normalize", "RandomCrop", "RandomHorizontalFlip"] and small.transforms[2].padding == 4
    x = timm.data.create_transform(**theirs, is_training=True)(img)  # timm's own, for the same config: a tensor too
    assert x.shape == (3, 224, 224)


def test_trained_checkpoint_carries_its_own_preprocessing(tmp_path):
    m = densenet.create_model("densenet_bc_100_k12", num_classes=3, **SMALL)
    pre = {"source": "memory", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "channels": 3,
           "image_size": [12, 12]}
    save_model(m, tmp_path / "m.safetensors", {"model_args": {"num_classes": 3, **SMALL}, "preprocessing": pre,
                                               "classes": ["a", "b", "c"]})
    loaded, _ = load_model(tmp_path / "m.safetensors")
    assert densenet.resolve_data_config(loaded) == {"input_size": (3, 12, 12), "interpolation": "bilinear",
                                                    "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2),
                                                    "crop_pct": 1.0, "crop_mode": "center"}


def test_python_dash_m_densenet():
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "densenet", "--version"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("densenet ")


def test_torch_hub_load_from_this_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = torch.hub.load(str(ROOT), "densenet_bc_100_k12", source="local", **SMALL, num_classes=5)
    assert isinstance(m, densenet.DenseNet) and m.num_classes == 5
    sys.path.insert(0, str(ROOT))
    try:
        import hubconf
    finally:
        sys.path.remove(str(ROOT))
    assert set(densenet.list_models()) <= set(dir(hubconf))
    assert "Table 2" in hubconf.densenet_bc_100_k12.__doc__


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx is not installed")
def test_export_opset(tmp_path):
    import onnx

    m = densenet.create_model("densenet_bc_100_k12", num_classes=3, **SMALL)
    r = densenet.export.export_model(m, tmp_path / "m.onnx", "onnx", (3, 8, 8), onnx_exporter="legacy", opset=13)
    assert r["exporter"].endswith("opset 13")
    assert max(o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import if o.domain == "") == 13
    with pytest.raises(ValueError, match="opset"):
        densenet.export.export_model(m, tmp_path / "m.pt", "torchscript", (3, 8, 8), opset=13)


def test_hub_without_huggingface_hub_says_how_to_install(monkeypatch):
    import densenet.hub

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    m = densenet.create_model("densenet_bc_100_k12", **SMALL)
    with pytest.raises(ValueError, match=r"pip install 'densenet-paper\[hub\]'"):
        densenet.hub.push_to_hub(m, "someone/repo")
    with pytest.raises(ValueError, match=r"densenet-paper\[hub\]"):
        densenet.create_model("densenet_bc_100_k12", pretrained="hf-hub:someone/repo")


@pytest.mark.parametrize("name", ["densenet_bc_100_k12", "resnet20"])
def test_global_pool_as_timm(name):
    """create_model(global_pool=...) and reset_classifier(n, global_pool): 'avg' is the paper's (and the
    default); 'max' and 'avgmax' pool otherwise; '' leaves the maps unpooled, a classifier then applied at
    every position. The option is kept in model_args, so a checkpoint rebuilds the same model."""
    kw = SMALL if name.startswith("densenet") else {}
    x = torch.randn(2, 3, 32, 32)
    m = densenet.create_model(name, global_pool="max", **kw).eval()
    assert m.model_args["global_pool"] == "max" and m.pool_type == "max"
    with torch.no_grad():
        f = m.forward_features(x)
        torch.testing.assert_close(m(x), m.get_classifier()(f.amax((2, 3))))
        m.reset_classifier(0, "")
        assert m(x).shape == f.shape and torch.equal(m(x), f)
        m.reset_classifier(5, "")
        cams = m(x)  # (B, classes, H, W): the linear layer at each position
        assert cams.shape == (2, 5, *f.shape[2:])
        torch.testing.assert_close(cams.mean((2, 3)), m.get_classifier()(f.mean((2, 3))), rtol=1e-5, atol=1e-5)
        m.reset_classifier(5, "avgmax")
        torch.testing.assert_close(m.forward_head(f, pre_logits=True), 0.5 * (f.mean((2, 3)) + f.amax((2, 3))))
        m.reset_classifier(5, "avg")
        torch.testing.assert_close(m.forward_head(f, pre_logits=True), f.mean((2, 3)))
    with pytest.raises(ValueError, match="global_pool 'mean'.*'avg'"):
        densenet.create_model(name, global_pool="mean", **kw)


def test_timms_model_attributes():
    """default_cfg (timm's old name of pretrained_cfg), head_hidden_size, no_weight_decay (none: the paper
    decays every parameter) and group_matcher (timm's own patterns, checked against timm where installed)."""
    m = densenet.create_model("densenet121")
    assert m.default_cfg is m.pretrained_cfg and m.default_cfg["input_size"] == (3, 224, 224)
    assert m.default_cfg["pool_size"] == (7, 7) and m.head_hidden_size == m.num_features == 1024
    assert m.no_weight_decay() == set()
    r = densenet.create_model("resnet50")
    # a network built from its class directly has no registry name, hence no cfg (as pretrained_cfg)
    assert not hasattr(densenet.DenseNet(densenet.DenseNetConfig(block_config=(1, 1))), "default_cfg")
    timm = pytest.importorskip("timm")
    for name in ("densenet121", "resnet50"):
        theirs = timm.create_model(name)
        ours = m if name == "densenet121" else r
        assert ours.group_matcher() == theirs.group_matcher()
        assert ours.group_matcher(coarse=True)["stem"] == theirs.group_matcher(coarse=True)["stem"]
    # timm's layer-wise decay groups every parameter of ours, in the same number of groups as its own
    from timm.models import group_parameters

    for coarse in (False, True):
        ours_groups = group_parameters(m, m.group_matcher(coarse))
        theirs_groups = group_parameters(timm.create_model("densenet121"), m.group_matcher(coarse))
        assert len(ours_groups) == len(theirs_groups)
        assert sum(len(v) for v in ours_groups.values()) == len(list(m.named_parameters()))


@pytest.mark.parametrize("name", ["densenet_bc_100_k12", "resnet20", "preact_resnet110"])
def test_set_grad_checkpointing_gives_the_same_gradients_and_bn_statistics(name):
    """timm's switch: the same loss, gradients and BN running statistics (updated once, not again by the
    recomputation) as without it."""
    kw = SMALL if name.startswith("densenet") else {}
    torch.manual_seed(0)
    a = densenet.create_model(name, **kw).double().train()
    b = densenet.create_model(name, **kw).double().train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for m in (a, b):
        torch.manual_seed(1)
        m(x).square().sum().backward()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=k)
    for (k, s), t in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(s, t, msg=k)
    b.set_grad_checkpointing(False)


def test_global_pool_and_unpooled_reset_as_timms_densenet121():
    """The same calls on timm's densenet121: global_pool='max' at creation, reset_classifier(0, '')
    (unpooled maps), reset_classifier(5, 'avg'): the same output shapes, and with timm's weights loaded
    the same values."""
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 64, 64)
    theirs = timm.create_model("densenet121", global_pool="max").eval()
    ours = densenet.create_model("densenet121", global_pool="max").eval()
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        scale = float(theirs(x).abs().max())
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5 * scale)
        for m in (theirs, ours):
            m.reset_classifier(0, "")
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5 * scale)
        assert ours(x).shape == theirs(x).shape == (1, 1024, 2, 2)
        for m in (theirs, ours):
            m.reset_classifier(5, "avg")
        assert ours(x).shape == theirs(x).shape == (1, 5)
