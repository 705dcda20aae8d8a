"""The data normalisations of the baselines' authors (data/normalization.py, data/zca.py): WRN's GCN + ZCA
whitening and stochastic depth's per-pixel mean and scalar std, fitted on the training split only, stored
with the run and read back unchanged."""
from __future__ import annotations

import warnings

import pytest
import torch

from densenet.data import ImageSet
from densenet.data.normalization import (PixelNormalization, find_normalization, fit_normalization,
                                         load_normalization, pixel_stats, save_normalization)
from densenet.data.zca import GCN_SCALE, ZCA_EPSILON, fit_zca, global_contrast_normalize


def _images(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 8, 8, generator=g) * 160  # correlated channels, as natural images
    return (base + torch.rand(n, 3, 8, 8, generator=g) * 95).round().to(torch.uint8)


def test_gcn_is_pylearn2s():
    x = torch.tensor([[0.0, 10.0, 20.0, 30.0], [5.0, 5.0, 5.0, 5.0]])
    y = global_contrast_normalize(x)
    c = x[0] - 15
    torch.testing.assert_close(y[0], c / (c.norm() / GCN_SCALE))
    assert y[0].norm().item() == pytest.approx(55.0) and torch.equal(y[1], torch.zeros(4))  # flat: left as 0


def test_zca_whitens_the_training_images_at_the_stated_epsilon():
    images = _images()
    zca = fit_zca(images)
    assert zca.epsilon == ZCA_EPSILON == 0.1
    x = zca(images).double().reshape(len(images), -1)
    cov = (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)
    p = zca.matrix.double()
    # P C P = I - epsilon P^2: the identity but for the bias's shrinkage (exact up to float32)
    torch.testing.assert_close(cov + ZCA_EPSILON * p @ p, torch.eye(192, dtype=torch.float64), atol=2e-3, rtol=0)
    # at a tiny epsilon, the identity on the 191 directions GCN leaves (each image is centred: not 1s)
    tiny = fit_zca(images, epsilon=1e-6)
    x = tiny(images).double().reshape(len(images), -1)
    cov = (x - x.mean(0)).T @ (x - x.mean(0)) / len(x)
    ones = torch.ones(192, 1, dtype=torch.float64) / 192 ** 0.5
    torch.testing.assert_close(cov, torch.eye(192, dtype=torch.float64) - ones @ ones.T, atol=2e-2, rtol=0)


def test_normalisations_are_fitted_on_the_training_images_only(tmp_path):
    from densenet.data.transforms import Normalization
    from densenet.train.config import TrainConfig
    from densenet.train.engine import _fitted_normalization
    from densenet.data import get_dataset_spec

    images = _images()
    held_out = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    a, b = fit_zca(images), fit_zca(images)
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.mean, b.mean)  # deterministic
    # the engine fits on the split it is given (train, after the hold-out): a val/test image changes nothing
    train = ImageSet(images, torch.zeros(200, dtype=torch.long))
    for kind in ("zca", "pixel"):
        cfg = TrainConfig(model="resnet20", dataset="cifar10", normalize=kind)
        norm, data = _fitted_normalization(cfg, get_dataset_spec("cifar10"), train, None)
        ref = fit_zca(images) if kind == "zca" else pixel_stats(images)
        assert torch.equal(norm(held_out), ref(held_out)) and data
    assert fit_normalization("channel", Normalization((0.5,), (0.2,)), images).mean == (0.5,)
    with pytest.raises(ValueError, match="normalize must be one of channel, pixel, zca, got 'gcn'"):
        fit_normalization("gcn", None, images)
    with pytest.raises(ValueError, match="needs the training images in memory"):
        fit_normalization("zca", None, None)


def test_pixel_normalisation_is_stochastic_depths():
    images = torch.tensor([[[[0, 255]]], [[[51, 102]]]], dtype=torch.uint8)  # 2 images, 1x1x2
    norm = pixel_stats(images)
    v = torch.tensor([0.0, 1.0, 0.2, 0.4], dtype=torch.float64)
    torch.testing.assert_close(norm.mean, torch.tensor([[[0.1, 0.7]]]))  # mean(1): per pixel
    assert norm.std == pytest.approx(float(v.std()))  # self.data:std(): all values, unbiased, uncentred
    out = norm(images)
    torch.testing.assert_close(out, (images.float() / 255 - norm.mean) / norm.std)


@pytest.mark.parametrize("kind", ["zca", "pixel"])
def test_stored_normalisation_reads_back_equal(tmp_path, kind):
    images = _images(60)
    norm = fit_zca(images) if kind == "zca" else pixel_stats(images)
    sha = save_normalization(norm, tmp_path / "normalization.safetensors")
    back = load_normalization(tmp_path / "normalization.safetensors", sha)
    assert type(back) is type(norm) and torch.equal(back(images), norm(images))
    # a checkpoint finds it in its run directory, and refuses a file that is not the one it names
    ckpt = tmp_path / "ckpt" / "000001"
    ckpt.mkdir(parents=True)
    pre = {"normalize": kind, "normalization_file": "normalization.safetensors", "normalization_sha256": sha}
    assert torch.equal(find_normalization(pre, ckpt / "model.safetensors")(images), norm(images))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        find_normalization({**pre, "normalization_sha256": "0" * 64}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="not found beside"):
        find_normalization(pre, tmp_path / "elsewhere" / "a" / "b" / "model.safetensors")
    assert isinstance(back, PixelNormalization) == (kind == "pixel")


def test_a_zca_run_stores_its_whitening_and_evaluates_and_resumes_with_it(tmp_path):
    """`densenet train --normalize zca` writes RUN/normalization.safetensors; the checkpoint names it;
    evaluation and a resumed run read that file rather than fit again."""
    from densenet.evaluation import evaluate_checkpoint
    from densenet.train import TrainConfig, fit
    from densenet.saved_model import load_model
    from helpers import SMALL

    out = tmp_path / "run"
    cfg = dict(model="densenet_bc_100_k12", model_args=SMALL, dataset="digits", batch_size=32, train_subset=64,
               val_size=32, augment="none", drop_rate=0.0, progress=False, tensorboard=False, normalize="zca")
    fit(TrainConfig(epochs=1, out=str(out), **cfg))
    stored = out / "normalization.safetensors"
    _, info = load_model(out)
    pre = info["preprocessing"]
    assert pre["normalize"] == "zca" and pre["normalization_file"] == stored.name
    zca = find_normalization(pre, info["checkpoint"].file)
    assert zca.shape == (1, 8, 8) and zca.epsilon == 0.1
    before = stored.read_bytes()
    assert evaluate_checkpoint(str(out), split="val")[0]["top1_error"] >= 0
    # an export carries the whitening beside it, named in its preprocessing: complete without the run
    import json

    from densenet.export import export_checkpoint, format_report

    report = export_checkpoint(str(out), tmp_path / "served" / "wrn.pt", "torchscript")
    sidecar = tmp_path / "served" / "wrn.normalization.safetensors"
    assert report["parity"]["ok"] and sidecar.read_bytes() == before
    assert f"wrote {sidecar}: the zca normalisation" in format_report(report)
    files = {"densenet.json": ""}
    with warnings.catch_warnings():  # torch.jit.load's deprecation note: TorchScript is the format read here
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(tmp_path / "served" / "wrn.pt"), _extra_files=files)
    served = json.loads(json.loads(files["densenet.json"])["densenet.preprocessing"])  # values are JSON text
    assert served["normalization_file"] == sidecar.name
    assert torch.equal(find_normalization(served, tmp_path / "served" / "wrn.pt").matrix, zca.matrix)
    fit(TrainConfig(epochs=2, **cfg), resume=str(out))
    assert stored.read_bytes() == before
    assert load_model(out)[1]["preprocessing"]["normalization_sha256"] == pre["normalization_sha256"]
