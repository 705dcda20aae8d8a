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


# --- ImageNet evaluation as the Lua: bicubic image.scale (no antialiasing), centre crop at math.ceil ---------

def test_lua_bicubic_scale_against_a_hand_computation():
    from densenet.data.transforms import lua_cubic_weights, lua_scale

    # 4 -> 3 pixels: source positions 0, 1.5, 3 (corners aligned); 1.5 is Catmull-Rom between 1 and 2
    line = torch.tensor([0.0, 1.0, 4.0, 9.0])
    x = 0.5
    p0, p1, p2, p3 = line
    mid = p1 + 0.5 * x * (p2 - p0 + x * (2 * p0 - 5 * p1 + 4 * p2 - p3 + x * (3 * (p1 - p2) + p3 - p0)))
    torch.testing.assert_close(lua_cubic_weights(4, 3) @ line, torch.stack([line[0], mid, line[3]]))
    # 3 -> 5: position 0.5 has no left neighbour: p0 = 2 p1 - p2 (linear extrapolation)
    line = torch.tensor([1.0, 3.0, 2.0])
    p1, p2, p3 = line
    p0 = 2 * p1 - p2
    first = p1 + 0.25 * (p2 - p0 + 0.5 * (2 * p0 - 5 * p1 + 4 * p2 - p3 + 0.5 * (3 * (p1 - p2) + p3 - p0)))
    torch.testing.assert_close((lua_cubic_weights(3, 5) @ line)[1], first)
    # a ramp stays a ramp (no antialiasing blur, no clamping), separable in rows and columns
    ramp = torch.arange(16.0).view(1, 4, 4)
    torch.testing.assert_close(lua_scale(ramp, 7, 7)[0, 0], torch.linspace(0, 3, 7))


def test_lua_scale_and_centre_crop_round_up():
    from densenet.data.transforms import LuaCenterCrop, LuaScale, ten_crop

    img = torch.arange(5 * 8.0).view(1, 5, 8)
    assert LuaScale(5)(img) is img  # the shorter side already the size
    assert LuaScale(4)(img).shape == (1, 4, 6)  # 8 / 5 * 4 = 6.4 -> 6, truncated as Torch sizes tensors
    crop = LuaCenterCrop(2)(img)
    assert torch.equal(crop, img[:, 2:4, 3:5])  # ceil((5 - 2) / 2) = 2, ceil((8 - 2) / 2) = 3 (round: 1 / 3)
    crops = ten_crop(img, (2, 2))  # the mirror image's centre crop sits at ceil too: not the crop's mirror
    assert torch.equal(crops[4], crop) and torch.equal(crops[9], img.flip(-1)[:, 2:4, 3:5])
    assert torch.equal(crops[0], img[:, :2, :2]) and torch.equal(crops[5], crops[0].flip(-1))


def test_imagenet_evaluation_transform_is_the_luas():
    from PIL import Image

    from densenet.data.loader import stream_transform
    from densenet.data.transforms import Normalization, lua_scale

    g = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (3, 9, 13), generator=g, dtype=torch.uint8)
    im = Image.fromarray(arr.permute(1, 2, 0).numpy())
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = stream_transform(False, 5, 6, norm)(im)
    ref = (lua_scale(arr.float() / 255, 8, 6) - 0.5) / 0.25  # 13 / 9 * 6 = 8.67 -> 8 wide
    assert x.shape == (3, 5, 5) and torch.allclose(x, ref[:, 1:6, 2:7], atol=1e-6)  # ceil(1/2), ceil(3/2)
    assert stream_transform(False, 5, 6, norm, ten=True)(im).shape == (10, 3, 5, 5)
