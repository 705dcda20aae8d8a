"""Datasets by name, read from their official on-disk formats into memory (or streamed, for big folders).

Every reader returns uint8 images (N, C, H, W) and int64 labels: `ImageSet`. Big image folders
(ImageNet) are too large for memory and are streamed through torchvision's ImageFolder instead:
`StreamSet`.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """Data that is missing or unreadable; the message names the path and what would fix it."""


@dataclass
class ImageSet:
    """Decoded images in memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class StreamSet:
    """An image folder read from disk a batch at a time: (path, label) pairs."""

    samples: list[tuple[str, int]]
    labels: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.labels = torch.tensor([s[1] for s in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, index: torch.Tensor) -> "StreamSet":
        return StreamSet([self.samples[i] for i in index.tolist()])


@dataclass
class Splits:
    """What a dataset provides: its official splits, class names and image format."""

    train: ImageSet | StreamSet
    test: ImageSet | StreamSet | None
    classes: list[str]
    in_channels: int
    val: ImageSet | StreamSet | None = None  # an official validation split, where one exists


def balanced_split(labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded, class-balanced hold-out: (train_index, val_index), val having `size` items.

    Each class gives size/num_classes items (the remainder goes to the largest classes first), chosen
    by a permutation seeded with `seed` alone: the same split on every machine and every run.
    """
    n = len(labels)
    if not 0 < size < n:
        raise DataError(f"--val-size {size} must be between 1 and {n - 1} (the training set has {n} images)")
    classes, counts = labels.unique(return_counts=True)
    quota = torch.floor(counts.double() * size / n).long()
    for i in torch.argsort(counts.double() * size / n - quota.double(), descending=True, stable=True):
        if quota.sum() == size:
            break
        quota[i] += 1
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_mask = torch.zeros(n, dtype=torch.bool)
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = perm[labels[perm] == c]
        val_mask[members[:q]] = True
    return torch.nonzero(~val_mask).flatten(), torch.nonzero(val_mask).flatten()


# --- torchvision's official formats ---------------------------------------------------------------------

def _missing(name: str, root: Path, what: str, url: str) -> DataError:
    return DataError(f"{name} not found in {root} (looked for {what}). Pass --download to fetch it "
                     f"there (needs a network), or download it from {url} and give its folder with --data.")


def load_cifar(root: Path, num_classes: int, download: bool) -> Splits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, url, folder = ((CIFAR10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py")
                        if num_classes == 10 else
                        (CIFAR100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"))
    try:
        sets = [cls(str(root), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:
        if "not found" in str(e).lower():
            raise _missing(f"CIFAR-{num_classes}", root, f"{root / folder}", url) from None
        raise DataError(f"CIFAR-{num_classes} in {root} could not be read: {e}") from None
    tr, te = (ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                       torch.tensor(s.targets, dtype=torch.int64)) for s in sets)
    return Splits(tr, te, list(sets[0].classes), 3)


def load_svhn(root: Path, download: bool, extra: bool = True) -> Splits:
    """SVHN train (+ extra, as the paper: 604,388 images) and test, from the official .mat files."""
    from torchvision.datasets import SVHN

    def read(split):
        try:
            s = SVHN(str(root), split=split, download=download)
        except RuntimeError as e:
            if "not found" in str(e).lower():
                raise _missing("SVHN", root, f"{root / (split + '_32x32.mat')}",
                               "http://ufldl.stanford.edu/housenumbers/") from None
            raise DataError(f"SVHN in {root} could not be read: {e}") from None
        return ImageSet(torch.from_numpy(s.data).contiguous(), torch.from_numpy(s.labels).long())

    train = read("train")
    if extra:
        ex = read("extra")
        train = ImageSet(torch.cat([train.images, ex.images]), torch.cat([train.labels, ex.labels]))
    return Splits(train, read("test"), [str(i) for i in range(10)], 3)


def load_digits() -> Splits:
    """scikit-learn's handwritten digits (1,797 8x8 grayscale images, bundled with scikit-learn):
    the offline dataset. A fixed stratified fifth (360 images) is the test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = torch.from_numpy(d.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)  # 0..16 -> 0..255
    labels = torch.from_numpy(d.target).long()
    full = ImageSet(images, labels)
    train_idx, test_idx = balanced_split(labels, 360, seed=0)
    return Splits(full.subset(train_idx), full.subset(test_idx), [str(i) for i in range(10)], 1)


# --- image folders, from a directory or a .tar(.gz) archive -----------------------------------------------

def _split_dirs(names: list[str]) -> tuple[str, dict[str, str]]:
    """The root of an ImageNet-layout tree among `names` (posix paths) and its split folders."""
    dirs = {n.rstrip("/") for n in names}
    for n in list(dirs):  # every parent of a file is a directory, even when the archive lists no entry
        parts = n.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for split in ("train", "val", "test"):
        candidates = sorted((d for d in dirs if d.split("/")[-1] == split), key=lambda d: d.count("/"))
        if candidates:
            root = candidates[0].rsplit("/", 1)[0] if "/" in candidates[0] else ""
            prefix = root + "/" if root else ""
            return root, {s: prefix + s for s in ("train", "val", "test") if prefix + s in dirs}
    return "", {}


def _decode(data: bytes, name: str, mode: str) -> torch.Tensor:
    """One image file's bytes -> uint8 (C, H, W), converted to RGB or L (grayscale) as the model needs.

    torchvision.io decodes JPEG/PNG 3x faster than Pillow (20,000 CIFAR JPEGs: 1.6 s against 5.0 s
    on this 2-core machine; all 50,000 read from the archive and decoded: 3.4 s); Pillow takes every other format and anything torchvision.io declines.
    """
    fast = _fast_decode(data, mode)
    if fast is not None:
        return fast
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(convert_image(im, mode))
    except Exception as e:
        raise DataError(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def convert_image(im, mode: str):
    """A PIL image in `mode` ("RGB" or "L"): alpha dropped, palettes expanded, and 16-bit images scaled
    to 8 bits first (PIL's own convert clips them to 255)."""
    import numpy as np
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    return im.convert(mode)


def _fast_decode(data: bytes, mode: str) -> torch.Tensor | None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
            from torchvision.io import ImageReadMode, decode_image

            t = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             mode=ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB)
    except Exception:
        return None
    return t if t.dtype == torch.uint8 else None


def _stack(images: list[torch.Tensor], where: str) -> torch.Tensor:
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) > 1:
        raise DataError(f"images in {where} have different sizes ({', '.join(map(str, sorted(sizes)[:4]))}); "
                        f"in-memory folders need one size: resize them, or use --no-in-memory to stream "
                        f"them with resizing crops")
    return torch.stack(images)


def _files_by_class(names: list[str], split_dir: str) -> dict[str, list[str]]:
    prefix = split_dir + "/" if split_dir else ""
    by_class: dict[str, list[str]] = {}
    for n in names:
        if n.startswith(prefix) and n.lower().endswith(IMAGE_SUFFIXES):
            rest = n[len(prefix):].split("/")
            if len(rest) >= 2:
                by_class.setdefault(rest[0], []).append(n)
    return {c: sorted(v) for c, v in sorted(by_class.items())}


def load_folder(path: Path, channels: int = 3, in_memory: bool | None = None,
                only: tuple[str, ...] | None = None) -> Splits:
    """An ImageNet-layout folder (train/ and val/ or test/, one sub-folder per class), a directory or a
    .tar/.tar.gz archive of one. A directory with class sub-folders and no train/ is a training set.
    With `only` (e.g. ("test",)), the other splits are listed (the classes are train/'s) but not read:
    they are None."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"image folder {path} does not exist: give a directory with train/ (and val/ or "
                        f"test/) holding one sub-folder of images per class, or a .tar.gz of one")
    mode = "L" if channels == 1 else "RGB"
    is_archive = path.is_file()
    if is_archive:
        try:
            tf = tarfile.open(path)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{path} is not a readable .tar or .tar.gz archive ({e})") from None
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        names = list(members)
    else:
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    _, splits = _split_dirs(names)
    if "train" not in splits:  # a bare folder of class sub-folders is a training set
        if is_archive or not any("/" in n for n in names):
            raise DataError(f"no train/ folder found in {path}: expected train/<class>/<image> "
                            f"(and val/ or test/ alike)")
        splits = {"train": ""}
    train_files = _files_by_class(names, splits["train"])
    classes = [c for c, files in train_files.items() if files]
    if not classes:
        raise DataError(f"{path}: the train folder has no class sub-folders with images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    index = {c: i for i, c in enumerate(classes)}

    def files_of(split: str) -> list[tuple[str, int]]:
        by_class = train_files if split == "train" else _files_by_class(names, splits[split])
        unknown = sorted(set(by_class) - set(index))
        if unknown:
            raise DataError(f"{path}: {split}/ has classes that train/ lacks: {', '.join(unknown[:5])}")
        return [(f, index[c]) for c, fs in by_class.items() for f in fs]

    listed = {s: files_of(s) for s in splits}
    if in_memory is None:  # small images in memory; big ones (ImageNet) streamed
        first = listed["train"][0][0]
        data = tf.extractfile(members[first]).read() if is_archive else (path / first).read_bytes()
        h, w = _decode(data, first, mode).shape[-2:]
        in_memory = is_archive or (h * w <= 96 * 96 and len(names) <= 2_000_000)
    if not in_memory and is_archive:
        raise DataError(f"{path}: streaming from an archive is not supported; extract it and give the folder")

    def read(split: str):
        items = listed[split]
        if not in_memory:
            return StreamSet([(str(path / f), y) for f, y in items])
        images = []
        for f, _ in items:
            data = tf.extractfile(members[f]).read() if is_archive else (path / f).read_bytes()
            images.append(_decode(data, f"{path}/{f}", mode))
        return ImageSet(_stack(images, f"{path}/{splits[split]}"), torch.tensor([y for _, y in items]))

    out = {s: read(s) for s in ("train", "val", "test") if s in splits and (only is None or s in only)}
    if is_archive:
        tf.close()
    return Splits(out.get("train"), out.get("test"), classes, channels, val=out.get("val"))
