"""Weights on the Hugging Face Hub, offline: push_to_hub writes into a local directory laid out as the
Hub's cache (models--ORG--NAME/refs/main, snapshots/<commit>/...), and from_pretrained /
create_model(pretrained="hf-hub:...") read it back through huggingface_hub with no network."""
from __future__ import annotations

import json

import pytest
import torch

import densenet
import densenet.hub

from helpers import HUB_COMMIT as COMMIT

hf = pytest.importorskip("huggingface_hub")

SMALL = dict(depth=16, growth_rate=4)


def _model():
    m = densenet.create_model("densenet_bc_100_k12", num_classes=4, in_chans=1, **SMALL).eval()
    with torch.no_grad():  # not the initialisation: weights that must travel
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_push_then_from_pretrained_offline(offline_hub, tmp_path):
    model = _model()
    url = densenet.hub.push_to_hub(model, "someone/tiny-densenet")
    assert url.endswith(COMMIT) and offline_hub == [("someone/tiny-densenet",
                                                     ["README.md", "config.json", "model.safetensors"])]
    loaded, info = densenet.hub.from_pretrained("someone/tiny-densenet")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info["model"] == "densenet_bc_100_k12" and info["model_args"] == {"num_classes": 4, "in_channels": 1,
                                                                             **SMALL}
    snapshot = tmp_path / "hub-cache" / "models--someone--tiny-densenet" / "snapshots" / COMMIT
    config = json.loads((snapshot / "config.json").read_text())
    assert config["architecture"] == "densenet_bc_100_k12" and config["num_classes"] == 4
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32] and config["library"] == "densenet-paper"
    # the registered network with these weights, timm's way
    m = densenet.create_model("densenet_bc_100_k12", pretrained="hf-hub:someone/tiny-densenet", num_classes=4,
                              in_chans=1, **SMALL).eval()
    with torch.no_grad():
        assert torch.equal(m(x), model(x))
    # fine-tuning to other classes: everything but the classifier
    m5 = densenet.create_model("densenet_bc_100_k12", pretrained="hf-hub:someone/tiny-densenet", num_classes=5,
                               in_chans=1, reset_classifier=True, **SMALL)
    assert torch.equal(m5.features.conv0.weight, model.features.conv0.weight)


def test_a_trained_run_goes_to_the_hub_with_its_classes_and_preprocessing(offline_hub, tmp_path):
    from densenet.saved_model import save_model

    model = _model()
    pre = {"source": "memory", "mean": [0.5], "std": [0.25], "channels": 1, "image_size": [16, 16]}
    save_model(model, tmp_path / "run" / "best" / "model.safetensors",
               {"model_args": model.model_args, "preprocessing": pre, "classes": ["a", "b", "c", "d"]})
    densenet.hub.push_to_hub(tmp_path / "run", "someone/run")
    loaded, info = densenet.hub.from_pretrained("hf-hub:someone/run")
    assert info["classes"] == ["a", "b", "c", "d"] and info["preprocessing"] == pre
    assert densenet.resolve_data_config(loaded)["mean"] == (0.5,)


def test_local_folder_in_the_hub_layout_and_clear_errors(offline_hub, tmp_path):
    model = _model()
    densenet.hub.save_pretrained(model, tmp_path / "folder")
    loaded, _ = densenet.hub.from_pretrained(str(tmp_path / "folder"))
    assert torch.equal(loaded.features.conv0.weight, model.features.conv0.weight)
    with pytest.raises(ValueError, match="could not get model.safetensors of 'nobody/nothing'"):
        densenet.hub.from_pretrained("nobody/nothing")
    with pytest.raises(ValueError, match="could not get model.safetensors"):
        densenet.create_model("densenet_bc_100_k12", pretrained="hf-hub:nobody/nothing")
    with pytest.raises(ValueError, match="densenet.create_model or densenet.load"):
        densenet.hub.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


def test_save_pretrained_refuses_a_run_directory(tmp_path):
    """A run's config.json is its training's: save_pretrained must not overwrite it."""
    import densenet
    from densenet import hub

    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "config.json").write_text('{"dataset": "digits"}\n')
    model = densenet.create_model("densenet_bc_100_k12", num_classes=3, depth=10, growth_rate=4)
    with pytest.raises(ValueError, match="not a Hub export"):
        hub.save_pretrained(model, run)
    assert (run / "config.json").read_text() == '{"dataset": "digits"}\n'
    assert not (run / "model.safetensors").exists()
