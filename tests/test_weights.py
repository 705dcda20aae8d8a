"""Weights from the ecosystem: torchvision's DenseNet files (current and old key names, DataParallel
prefixes, files without num_batches_tracked) give torchvision's outputs; mismatches are clear errors;
loading never executes code from the file."""
from __future__ import annotations

import functools
import json
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import densenet
from densenet.saved_model import load_model, model_metadata, save_model
from densenet.runs import CheckpointError
from densenet.weights import NonFiniteWeightsWarning, convert_state_dict, read_state_dict

from helpers import cli, copy_run, rewrite_safetensors

OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@functools.lru_cache(maxsize=None)  # built once per network: the tests only read it
def randomised_torchvision(name, num_classes=1000):
    torch.manual_seed(1)
    tv = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    with torch.no_grad():  # non-trivial BN statistics and affine maps, so a mis-mapped key shows
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return tv.eval()


def to_old_style(sd):
    """The key names of torchvision's published files (`norm.1.weight`), as they are on download.pytorch.org."""
    return {OLD_KEY.sub(lambda m: f"{m.group(1)}.{m.group(2)}", k): v for k, v in sd.items()}


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name, style", [
    # DenseNet: current key names, the published files' old ones (`norm.1`), DataParallel's prefix
    *[(n, s) if n == "densenet121" else pytest.param(n, s, marks=SLOW)
      for n in ("densenet121", "densenet161") for s in ("current", "old", "dataparallel_old_no_nbt")],
    # the baselines of torchvision's zoo
    ("resnet18", "current"), ("resnet50", "dataparallel_no_nbt"), ("resnext50_32x4d", "current"),
])
def test_torchvision_checkpoint_gives_torchvision_outputs(tmp_path, name, style):
    tv = randomised_torchvision(name)
    sd = tv.state_dict()
    if "old" in style:
        sd = to_old_style(sd)
        assert any(".norm.1." in k for k in sd)
    if style.startswith("dataparallel"):
        sd = {"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    ours = densenet.create_model(name, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max().item() <= 1e-4
    assert set(ours.state_dict()) == set(tv.state_dict())  # the same names, nothing more


def test_outputs_match_for_channels_last_and_reference_path(tmp_path):
    tv = randomised_torchvision("densenet121")
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv(x)
        for fused in (True, False):
            ours = densenet.create_model("densenet121", pretrained=str(path), fused=fused).eval()
            ours = ours.to(memory_format=torch.channels_last)
            got = ours(x.contiguous(memory_format=torch.channels_last))
            assert (got - expected).abs().max().item() <= 1e-4


def test_wrong_number_of_classes_is_a_clear_error_and_reset_classifier_loads_the_rest(tmp_path):
    tv = randomised_torchvision("densenet121")
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \(1000, 1024\) vs model \(10, 1024\)"
                       r".*reset_classifier=True"):
        densenet.create_model("densenet121", num_classes=10, pretrained=str(path))
    ours = densenet.create_model("densenet121", num_classes=10, pretrained=str(path), reset_classifier=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), tv.features(x).relu(), atol=1e-4, rtol=0)
    assert ours.classifier.weight.shape == (10, 1024)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "tv169.pth"
    torch.save(randomised_torchvision("densenet169").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit model densenet121.*checkpoint keys the model lacks"):
        densenet.create_model("densenet121", pretrained=str(path))


def test_grayscale_model_from_rgb_checkpoint(tmp_path):
    """A 1-channel model loaded from RGB weights sees a gray image as torchvision sees its RGB copy."""
    tv = randomised_torchvision("densenet121")
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    gray = densenet.create_model("densenet121", in_channels=1, pretrained=str(path)).eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        assert (gray(x) - tv(x.expand(-1, 3, -1, -1))).abs().max().item() <= 1e-4


def test_own_checkpoint_roundtrip(tmp_path):
    m = densenet.create_model("densenet_bc_100_k12", depth=16).train()
    m(torch.randn(4, 3, 32, 32))  # move the running statistics
    path = save_model(m, tmp_path / "model.safetensors", {"classes": ["a", "b"]})
    sd, meta = read_state_dict(path)
    assert meta["model"] == "densenet_bc_100_k12" and meta["classes"] == '["a", "b"]'
    m2 = densenet.create_model("densenet_bc_100_k12", depth=16, pretrained=str(path))
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("name, args", [("densenet_bc_100_k12", {"depth": 16, "num_classes": 3}),
                                        ("resnet20", {"depth": 8, "num_classes": 3})])
def test_save_model_writes_what_load_model_reads(tmp_path, name, args):
    """One writer of the model file: what save_model writes, load_model rebuilds (name, arguments,
    weights and running statistics), for every family; before, save_model left out model_args."""
    torch.manual_seed(0)
    m = densenet.create_model(name, **args).train()
    m(torch.randn(4, 3, 32, 32))  # move the running statistics
    m.eval()
    path = save_model(m, tmp_path / "model.safetensors", {"classes": ["a", "b", "c"]})
    loaded, info = load_model(path)
    assert info["model"] == name and info["model_args"] == args and info["classes"] == ["a", "b", "c"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the same metadata as a training checkpoint's, which goes through the same writer
    assert read_state_dict(path)[1] == model_metadata(name, args, ["a", "b", "c"])


def test_save_model_refuses_a_model_load_model_could_not_rebuild(tmp_path):
    with pytest.raises(ValueError, match="create_model"):
        save_model(densenet.DenseNet(densenet.DenseNetConfig(block_config=(1,))), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_compile_prefix_is_stripped():
    assert convert_state_dict({"_orig_mod.module.features.conv0.weight": 1}) == {"features.conv0.weight": 1}


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/densenet_pwned_by_pickle",))


def test_crafted_pickle_cannot_execute_code(tmp_path):
    import os

    marker = "/tmp/densenet_pwned_by_pickle"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"features.conv0.weight": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        densenet.create_model("densenet121", pretrained=str(path))
    assert not os.path.exists(marker)


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        densenet.create_model("densenet121", pretrained=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        densenet.create_model("densenet121", pretrained=str(bad))
    with pytest.raises(CheckpointError, match="no checkpoint in directory"):
        densenet.create_model("densenet121", pretrained=str(tmp_path))


# --- non-finite weights warn; a changed model names every key ------------------------------------------


def test_eval_predict_and_load_warn_on_non_finite_weights(tiny, tmp_path):
    run = copy_run(tiny, tmp_path / "run")
    f = run / "last" / "model.safetensors"
    rewrite_safetensors(f, lambda t, m: t["features.norm5.running_var"].fill_(float("nan")))
    with pytest.warns(NonFiniteWeightsWarning, match="features.norm5.running_var"):
        load_model(f)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    code, err = cli("predict", f, img)
    assert "densenet predict: warning: " in err and "non-finite weights" in err and "Traceback" not in err


def test_a_changed_model_names_every_key_and_both_shapes(tiny, tmp_path):
    f = copy_run(tiny, tmp_path / "run") / "last" / "model.safetensors"
    rewrite_safetensors(f, lambda t, m: m.update(model_args=json.dumps({**json.loads(m["model_args"]), "growth_rate": 4})))
    with pytest.raises(CheckpointError) as e:
        load_model(f)
    msg = str(e.value)
    assert "Error(s) in loading" not in msg and "shapes differ" in msg
    import re

    assert re.search(r"features.denseblock1.denselayer1.conv1.weight \(24, \d+, 1, 1\) in the checkpoint, "
                     r"\(16, \d+, 1, 1\) in the model", msg), msg
