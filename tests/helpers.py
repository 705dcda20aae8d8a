"""Plain helpers shared by the test modules (fixtures are in conftest.py): small real data made by the
tests themselves, the environment of a child `densenet` process, a tiny trained run, and the
comparison of the fused and memory-efficient paths against the reference one. Test modules import from
here, never from one another."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit of every repository of the offline hub
# a child process (`python -m densenet.cli ...`) imports this checkout's package, on one thread
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}

CLASSES = ("circle", "square", "stripes")


def _image(cls: int, i: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Learnable but not trivial: a class-specific pattern in noise and a random colour."""
    yy, xx = np.mgrid[:size, :size] / (size - 1) - 0.5
    if cls == 0:
        mask = (xx ** 2 + yy ** 2) < 0.12
    elif cls == 1:
        mask = (np.abs(xx) < 0.3) & (np.abs(yy) < 0.3)
    else:
        mask = (np.floor((xx + 0.5) * 6) % 2) == 0
    colour = rng.integers(80, 256, 3)
    img = rng.integers(0, 60, (size, size, 3))
    img[mask] = colour
    return img.astype(np.uint8)


def make_folder(root: Path, per_class: int = 24, test_per_class: int = 6, size: int = 12,
                seed: int = 0, val: bool = False) -> Path:
    """An ImageNet-layout folder: train/<class>/*.png and test/<class>/*.png (and val/)."""
    rng = np.random.default_rng(seed)
    splits = {"train": per_class, "test": test_per_class}
    if val:
        splits["val"] = test_per_class
    for split, n in splits.items():
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_image(c, i, size, rng)).save(d / f"{i:04d}.png")
    return root


def train(folder, out, **kw):
    """A tiny run (DenseNet-BC, L=10, k=6, 1 epoch) on an image folder; returns `out`."""
    from densenet.train import TrainConfig, fit

    base = dict(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 6}, dataset="folder",
                data=str(folder), epochs=1, batch_size=16, val_size=9, progress=False, tensorboard=False,
                out=str(out))
    fit(TrainConfig(**{**base, **kw}))
    return out


# --- the fused and memory-efficient paths against the reference one (test_fused, test_cuda) ------------

MODES = [dict(fused=True, memory_efficient=False), dict(fused=True, memory_efficient=True),
         dict(fused=False, memory_efficient=True)]
NETS = [("densenet_bc_100_k12", dict(depth=22, drop_rate=0.2)),
        ("densenet_40_k12", dict(depth=13)),
        ("densenet121", dict(block_config=(2, 3, 2, 2)))]


def build(name, kw, device="cpu", **mode):
    import densenet

    torch.manual_seed(0)
    return densenet.create_model(name, **kw, **mode).double().to(device)


def train_step(model, x, seed=1):
    torch.manual_seed(seed)  # same dropout masks in every mode
    model.train()
    model.zero_grad()
    y = model(x)
    ((y ** 2).sum() + y.sum()).backward()
    return (y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in model.named_buffers()})


def assert_same(a, b, rtol=1e-5):
    """Outputs, gradients and buffers of two train_step results agree to `rtol`, relative to each tensor's
    largest magnitude: the paths sum in different orders, so an element near zero carries the rounding of
    its tensor's largest terms (float32 on a GPU: ~1e-7 of them; an absolute 1e-10 would fail there)."""
    ya, ga, ba = a
    yb, gb, bb = b

    def close(x, y, msg=None):
        scale = y.abs().max().item() if y.is_floating_point() and y.numel() else 0.0
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-10 + rtol * scale, msg=msg)

    close(ya, yb)
    for k in gb:
        close(ga[k], gb[k], msg=k)
    for k in bb:
        close(ba[k], bb[k], msg=k)


# --- stand-ins for the big datasets, in their official on-disk formats (README's commands, offline) -------

def make_cifar10(root: Path, per_batch: int = 1010, test: int = 100, seed: int = 0) -> Path:
    """torchvision's CIFAR-10 layout, `root/cifar-10-batches-py/` (5 training batches, test_batch,
    batches.meta), with random pixels: 5 x `per_batch` training images (the recipe holds 5,000 out).
    Not the official files: torchvision's md5 check fails on them (tests bypass it)."""
    import pickle

    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test}
    for name, n in batches.items():
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(i % 10) for i in range(n)], "filenames": [f"{i}.png" for i in range(n)]}
        (d / name).write_bytes(pickle.dumps(entry))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_cases_per_batch": per_batch,
                                                   "num_vis": 3072}))
    return root


def make_svhn(root: Path, train: int = 4100, extra: int = 2100, test: int = 50, seed: int = 0) -> Path:
    """SVHN's official `.mat` files (train/extra/test_32x32.mat: X (32, 32, 3, N), y in 1..10) with
    random pixels; enough images per class for the authors' validation split (400 + 200 per class)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("extra", extra), ("test", test)):
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                               "y": (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)})
    return root


def make_cifar_archive(path: Path, per_class: int = 510, seed: int = 0) -> Path:
    """A `.tar.gz` in the layout of ../shared/data/cifar10-train.tar.gz: cifar10/train/<class>/NNNN.jpg,
    32x32 JPEGs of random pixels, `per_class` per class (the recipe holds 5,000 out)."""
    import io
    import tarfile

    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for c in names:
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                info = tarfile.TarInfo(f"cifar10/train/{c}/{i:04d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tf.addfile(info, buf)
    return path
