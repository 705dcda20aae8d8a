"""Plain helpers shared by the test modules (fixtures are in conftest.py): small real data made by the
tests themselves, the environment of a child `densenet` process, a tiny trained run, and the
comparison of the fused and memory-efficient paths against the reference one, the command line run
in-process, and hostile files (damaged images and archives). Test modules import from here, never from
one another."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


# --- tiny runs, the command line in-process, and hostile files (made here, not stored) -----------------

SMALL = {"depth": 10, "growth_rate": 6}  # model_args of a tiny DenseNet-BC (L=10, k=6)


def cfg(folder, out, **kw):
    """The settings of a tiny run on an image folder (DenseNet-BC, L=10, k=6, 1 epoch, batches of 8, 3
    validation images; `out` None: none given); `kw` overrides them."""
    from densenet.train import TrainConfig

    base = dict(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 6}, dataset="folder",
                data=str(folder), epochs=1, batch_size=8, val_size=3, progress=False, tensorboard=False,
                out=str(out) if out else None)
    return TrainConfig(**{**base, **kw})


def copy_run(tiny, dst: Path) -> Path:
    """A copy of the `tiny` fixture's run at `dst`, writable, for a test that changes it."""
    shutil.copytree(tiny["run"], dst, symlinks=True)
    for p in dst.rglob("*"):  # checkpoints may be written read-only
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o644)
    return dst


def cli(*argv) -> tuple[int, str]:
    """Run the command line in-process: (exit status, stderr)."""
    import contextlib

    from densenet.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """Run the command line in-process: (exit status, stdout, stderr), as pytest's capsys read them."""
    from densenet.cli import main

    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2, no traceback, and one error line that holds every needle."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, err)


def rewrite_safetensors(path: Path, edit) -> None:
    """Apply `edit(tensors, metadata)` to a safetensors file (in place; both may be changed)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(path))
    edit(tensors, meta)
    os.chmod(path, 0o644)
    save_file(tensors, str(path), metadata=meta)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def lying_png(width=100, height=100, data=bytes(100)) -> bytes:
    """The red team's 69-byte PNG: IHDR declares 100x100 8-bit grey, IDAT holds 100 bytes. It killed
    torchvision's decoder (SIGSEGV)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(data)) + png_chunk(b"IEND", b""))


def valid_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    out = {}
    for name, (im, fmt, kw) in {
        "rgb.png": (Image.fromarray(rgb), "PNG", {}),
        "gray.png": (Image.fromarray(rgb).convert("L"), "PNG", {}),
        "rgba.png": (Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG", {}),
        "palette.png": (Image.fromarray(rgb).convert("P"), "PNG", {}),
        "deep16.png": (Image.fromarray(rng.integers(0, 65536, (9, 11)).astype(np.uint16)), "PNG", {}),
        "interlaced.png": (Image.fromarray(rgb), "PNG", {"interlace": 1}),
        "photo.jpg": (Image.fromarray(rgb), "JPEG", {"quality": 90}),
        "gray.jpg": (Image.fromarray(rgb).convert("L"), "JPEG", {}),
        "progressive.jpg": (Image.fromarray(rgb), "JPEG", {"progressive": True}),
        "image.bmp": (Image.fromarray(rgb), "BMP", {}),
        "image.webp": (Image.fromarray(rgb), "WEBP", {}),
        "image.tiff": (Image.fromarray(rgb), "TIFF", {}),
        "image.ppm": (Image.fromarray(rgb), "PPM", {}),
        "image.gif": (Image.fromarray(rgb).convert("P"), "GIF", {}),
    }.items():
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        out[name] = b.getvalue()
    frames = [Image.fromarray(np.full((9, 11, 3), v, np.uint8)).convert("P") for v in (0, 255)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    out["animated.gif"] = b.getvalue()
    return out


def mutations(data: bytes, seed: int, n: int) -> list[bytes]:
    """Truncations, bit flips, inserted and deleted bytes, at seeded positions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = bytearray(data)
        kind = i % 4
        if kind == 0:
            d = d[:int(rng.integers(0, len(d)))]
        elif kind == 1:
            for p in rng.integers(0, len(d), int(rng.integers(1, 4))):
                d[p] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:
            p = int(rng.integers(0, len(d)))
            d[p:p] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        else:
            p = int(rng.integers(0, len(d)))
            del d[p:p + int(rng.integers(1, 9))]
        out.append(bytes(d))
    return out


def make_archive(path: Path, files: dict[str, bytes], order=None, mode="w:gz") -> Path:
    names = list(files) if order is None else order
    with tarfile.open(path, mode) as tf:
        for n in names:
            info = tarfile.TarInfo(n)
            info.size = len(files[n])
            tf.addfile(info, io.BytesIO(files[n]))
    return path


def folder_files(n_per_class=4, size=8) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", n_per_class), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                b = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(b, "PNG")
                out[f"data/{split}/{c}/{i:03d}.png"] = b.getvalue()
    return out


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in its order (paths relative to docs/)."""
    import yaml

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    return list(walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    """The first true value of `predicate()`, polled every `every` s; AssertionError after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def epochs_logged(run_dir: Path) -> list[int]:
    """The epochs a run's metrics.jsonl records, in order (each once for a run resumed, not restarted)."""
    return [json.loads(r)["epoch"] for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if r.strip()]
