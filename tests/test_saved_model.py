"""densenet.saved_model: the metadata a model file carries is checked when it is read: damaged
preprocessing or fewer class names than outputs is an error naming what is wrong, from Python
(`densenet.load`) and from the command line (one line)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from densenet.inference import load
from densenet.runs import CheckpointError

from helpers import cli, copy_run, one_line_error, rewrite_safetensors


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p.pop("mean"), "preprocessing lacks mean"),
    (lambda p: p.update(image_size=[100000, 100000]), "image_size must be [height, width], each 1 to 8192"),
    (lambda p: p.update(std=[0, 1, 1]), "std must be positive"),
    (lambda p: p.update(source="disk"), "source must be memory or stream"),
])
def test_damaged_preprocessing_metadata_is_an_error(tiny, tmp_path, edit, needle):
    run = copy_run(tiny, tmp_path / "run")
    f = run / "last" / "model.safetensors"

    def change(t, m):
        p = json.loads(m["preprocessing"])
        edit(p)
        m["preprocessing"] = json.dumps(p)

    rewrite_safetensors(f, change)
    with pytest.raises(CheckpointError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load(f)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    one_line_error(*cli("predict", f, img), needle)


def test_fewer_class_names_than_outputs_is_an_error(tiny, tmp_path):
    f = copy_run(tiny, tmp_path / "run") / "last" / "model.safetensors"
    rewrite_safetensors(f, lambda t, m: m.update(classes=json.dumps(["circle", "square"])))
    with pytest.raises(CheckpointError, match="lists 2 class names for the model's 3 outputs"):
        load(f)


def test_a_reset_head_is_what_the_saved_model_rebuilds(tmp_path):
    """reset_classifier and set_global_pool update model_args, from which save_model's file rebuilds the
    network: the loaded model has the new head and pooling and the same outputs."""
    import torch

    import densenet
    from densenet.saved_model import load_model, save_model

    m = densenet.create_model("densenet_bc_100_k12", depth=10)
    m.reset_classifier(5, "max")
    assert m.model_args["num_classes"] == 5 and m.model_args["global_pool"] == "max"
    path = save_model(m.eval(), tmp_path / "model.safetensors")
    loaded, info = load_model(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x))
    assert loaded.num_classes == 5 and loaded.pool_type == "max"
