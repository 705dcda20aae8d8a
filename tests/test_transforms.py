"""densenet.data.transforms' ten-crop, through train.engine.evaluation_batches and `densenet eval
--ten-crop`: the ten crops are the training shifts (zero- or reflect-padded) at any image size, and a model
trained without random crops is refused."""
from __future__ import annotations

import pytest
import torch

from densenet.data import ImageSet, Normalization
from densenet.train.engine import evaluation_batches

from helpers import run_main


def test_ten_crop_crops_are_the_training_shifts_at_any_size():
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    norm = Normalization((0.5,), (0.25,))
    pre = {"source": "memory", "mean": [0.5], "std": [0.25], "channels": 1, "image_size": [8, 8], "augment": "cifar"}
    (x, y), = list(evaluation_batches(ImageSet(images, torch.arange(3)), pre, 8, "cpu", ten_crop=True))
    ref = norm(images)
    assert x.shape == (10, 3, 1, 8, 8) and y.tolist() == [0, 1, 2]
    assert torch.equal(x[4], ref)  # the centre crop of the 4-pixel padded image is the image
    assert torch.equal(x[0][..., 4:, 4:], ref[..., :4, :4]) and (x[0][..., :4, :] == 0).all()  # top-left shift
    assert torch.equal(x[3][..., :4, :4], ref[..., 4:, 4:])  # bottom-right shift
    assert all(torch.equal(x[i + 5], x[i].flip(-1)) for i in range(5))  # and their mirror images
    # WRN's reflect-padded crops: the ten crops are reflected shifts too
    (x, _), = list(evaluation_batches(ImageSet(images, torch.arange(3)), {**pre, "augment": "cifar-reflect"}, 8,
                                      "cpu", ten_crop=True))
    assert torch.equal(x[4], ref) and torch.equal(x[0][..., 4:, 4:], ref[..., :4, :4])
    assert torch.equal(x[0][..., 3, 4:], ref[..., 1, :4])  # row -1 mirrors row 1


def test_ten_crop_is_refused_for_a_model_trained_without_random_crops(digits_run, capsys):
    code, out, err = run_main(capsys, "eval", digits_run, "--ten-crop")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "trained without random crops (augment 'none')" in err
    assert "Evaluate without --ten-crop" in err
    pre = {"mean": [0.5], "std": [0.25], "augment": "flip"}
    with pytest.raises(ValueError, match="augment 'flip'"):
        evaluation_batches(ImageSet(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2)), pre, 2, "cpu",
                           ten_crop=True)
