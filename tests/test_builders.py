"""torchvision's API (densenet.models.builders): `densenet121(*, weights=None, progress=True, **kwargs)` and
its siblings return create_model's network; their Weights enums match torchvision's (URL, meta,
preprocessing); `weights=` (in the builders and in create_model) loads torchvision's file from torch's hub
cache, offline, as `pretrained=True` does. No network: a stand-in file is put where the cache lookup looks."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import densenet
import densenet.models as models
from densenet.models import builders
from densenet.registry import _weights_as_pretrained, create_model, get_entry

NAMES = ["densenet121", "densenet161", "densenet169", "densenet201"]
ENUMS = {"densenet121": "DenseNet121_Weights", "densenet161": "DenseNet161_Weights",
         "densenet169": "DenseNet169_Weights", "densenet201": "DenseNet201_Weights"}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub cache: torch.hub.get_dir() is $TORCH_HOME/hub."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert torch.hub.get_dir() == str(checkpoints.parent)
    return checkpoints


def test_importing_the_models_package_loads_no_builder():
    code = "import sys, densenet.models\nprint('torch' in sys.modules, 'densenet.models.builders' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["False", "False"], r.stdout + r.stderr
    assert {"densenet121", "densenet264", "DenseNet121_Weights"} <= set(dir(models))


def test_densenet121_is_the_registry_model_in_torchvisions_layout():
    ours, tv = models.densenet121(), torchvision.models.densenet121()
    assert type(ours) is densenet.DenseNet and ours.model_name == "densenet121"
    assert ours.pretrained_cfg == create_model("densenet121", block_config=(1, 1, 1, 1)).pretrained_cfg
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in tv.parameters()) == get_entry("densenet121").paper_params \
        == models.DenseNet121_Weights.DEFAULT.meta["num_params"]
    with torch.no_grad():
        assert ours.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name", NAMES + ["densenet264"])
def test_each_builder_asks_create_model_for_its_network(name, monkeypatch):
    """The builders pass their name, the verified enum member and the options on (no network is built)."""
    calls = []
    monkeypatch.setattr(builders, "create_model", lambda *a, **kw: calls.append((a, kw)))
    build = getattr(models, name)
    build(num_classes=10, progress=False)
    assert calls[-1] == ((name,), {"weights": None, "num_classes": 10})
    if name != "densenet264":
        enum = getattr(models, ENUMS[name])
        build(weights="DEFAULT", drop_rate=0.1)
        assert calls[-1] == ((name,), {"weights": enum.IMAGENET1K_V1, "drop_rate": 0.1})


@pytest.mark.parametrize("name", NAMES)
def test_weights_enum_is_torchvisions(name):
    ours, tv = getattr(models, ENUMS[name]), getattr(torchvision.models, ENUMS[name])
    assert issubclass(ours, torchvision.models.WeightsEnum)
    assert list(ours.__members__) == list(tv.__members__) == ["IMAGENET1K_V1", "DEFAULT"]
    assert ours.DEFAULT is ours.IMAGENET1K_V1 and repr(ours.DEFAULT) == f"{ENUMS[name]}.IMAGENET1K_V1"
    w, t = ours.IMAGENET1K_V1, tv.IMAGENET1K_V1
    assert w.url == t.url == densenet.registry.pretrained_cfg(name)["url"]
    assert {k: w.meta[k] for k in t.meta} == t.meta  # categories, min_size, num_params, _metrics, _ops, ...
    assert len(w.meta["categories"]) == 1000 and w.meta["num_params"] == get_entry(name).paper_params
    assert w.meta["_ops"] == get_entry(name).paper_gmacs
    if name in densenet.paper.TABLE1:
        assert w.meta["paper"]["errors"] == densenet.paper.TABLE1[name]
    assert t.meta["_metrics"]["ImageNet-1K"]["acc@1"] == w.meta["_metrics"]["ImageNet-1K"]["acc@1"]


def test_transforms_agree_with_torchvisions_on_images_and_uint8_tensors():
    ours, tv = models.DenseNet121_Weights.IMAGENET1K_V1.transforms(), \
        torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.transforms()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 270, 3), dtype=np.uint8))
    tensor = torch.from_numpy(rng.integers(0, 256, (3, 240, 320), dtype=np.uint8))
    for x in (image, tensor):
        a, b = ours(x), tv(x)
        assert a.shape == b.shape == (3, 224, 224) and torch.allclose(a, b, atol=1e-6)
    # ... and with the package's own evaluation transform of the model's pretrained_cfg (PIL images)
    cfg = densenet.resolve_data_config(pretrained_cfg=densenet.registry.pretrained_cfg("densenet121"))
    assert torch.allclose(densenet.create_transform(**cfg)(image), ours(image), atol=1e-5)


def test_weights_names_and_torchvisions_members_resolve():
    enum, member = models.DenseNet121_Weights, models.DenseNet121_Weights.IMAGENET1K_V1
    tv_member = torchvision.models.get_weight("DenseNet121_Weights.IMAGENET1K_V1")
    for w in ("IMAGENET1K_V1", "DEFAULT", "DenseNet121_Weights.IMAGENET1K_V1", "DenseNet121_Weights.DEFAULT",
              member, tv_member):
        assert enum.verify(w) is member, w
        assert _weights_as_pretrained("densenet121", w) is True, w
    assert enum.verify(None) is None and _weights_as_pretrained("densenet121", None) is False
    assert _weights_as_pretrained("resnet18", "IMAGENET1K_V1") is True  # create_model: any torchvision file


@pytest.mark.parametrize("wrong", ["DenseNet169_Weights.IMAGENET1K_V1", "tv DenseNet169_Weights.DEFAULT",
                                   "IMAGENET1K_V2", "True"])
def test_another_networks_weights_are_refused(wrong):
    w = {"DenseNet169_Weights.IMAGENET1K_V1": models.DenseNet169_Weights.IMAGENET1K_V1,
         "tv DenseNet169_Weights.DEFAULT": torchvision.models.DenseNet169_Weights.DEFAULT,
         "IMAGENET1K_V2": "IMAGENET1K_V2", "True": True}[wrong]
    message = "IMAGENET1K_V1, DEFAULT" if wrong == "IMAGENET1K_V2" else \
        "Weights enum member" if wrong == "True" else "expected DenseNet121_Weights but received DenseNet169_Weights"
    with pytest.raises(ValueError, match=message):
        create_model("densenet121", weights=w)
    with pytest.raises(ValueError, match="Invalid Weight class" if wrong != "IMAGENET1K_V2" else message):
        models.densenet121(weights=w)


def test_weights_of_networks_without_this_file_are_refused():
    with pytest.raises(ValueError, match="no published PyTorch weights"):
        models.densenet264(weights="DEFAULT")
    with pytest.raises(ValueError, match=r"ResNet50_Weights\.IMAGENET1K_V2 .*not a file this package loads"):
        create_model("resnet50", weights="DEFAULT")  # torchvision's DEFAULT is V2; this package has V1


def test_weights_and_pretrained_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        create_model("densenet121", pretrained=True, weights="DEFAULT")
    with pytest.raises(ValueError, match="not both"):
        models.densenet121(weights="DEFAULT", pretrained=True)


def test_a_missing_file_says_a_download_is_needed_as_pretrained_true_does(hub_cache):
    with pytest.raises(ValueError) as by_pretrained:
        create_model("densenet121", pretrained=True)
    with pytest.raises(ValueError) as by_weights:
        models.densenet121(weights=models.DenseNet121_Weights.DEFAULT)
    assert str(by_weights.value) == str(by_pretrained.value)
    assert "downloads nothing" in str(by_weights.value) and "\n" not in str(by_weights.value)
    assert str(hub_cache / "densenet121-a639ec97.pth") in str(by_weights.value)


def test_weights_load_the_file_in_the_hub_cache(hub_cache):
    torch.manual_seed(0)
    saved = torchvision.models.densenet121().state_dict()
    hub_cache.mkdir(parents=True)
    torch.save(saved, hub_cache / "densenet121-a639ec97.pth")
    built = models.densenet121(weights="IMAGENET1K_V1", progress=False)
    created = create_model("densenet121", weights=torchvision.models.DenseNet121_Weights.DEFAULT)
    for model in (built, created):
        state = model.state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], v) for k, v in saved.items())


def test_torchvisions_get_model_weights_reads_the_builders():
    from torchvision.models import get_model_weights

    from densenet.models import DenseNet121_Weights, densenet121

    assert get_model_weights(densenet121) is DenseNet121_Weights
