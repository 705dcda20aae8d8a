"""Datasets by name, read from their official on-disk formats into memory (or streamed, for big folders).

Every reader returns uint8 images (N, C, H, W) and int64 labels: `ImageSet`. Big image folders
(ImageNet) are too large for memory and are streamed instead: `StreamSet` holds the (path, label)
pairs this module lists itself (`load_folder`: links followed, class folders sorted, classes taken
from train/), which data/loader.py decodes a batch at a time through Pillow (`open_image`, pixel limit
checked from the header). torchvision's ImageFolder is not used.
"""
from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
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
    parts: tuple[int, ...] | None = None  # sizes of the official sets concatenated into train (SVHN: train, extra)


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


SVHN_VAL_PER_CLASS = (400, 200)  # from train, from extra: 6,000 images (the authors' split)


def svhn_split(labels: torch.Tensor, n_train: int, seed: int,
               per_class: tuple[int, int] = SVHN_VAL_PER_CLASS) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN's validation split as the authors draw it: 400 images per class from the train set and 200
    per class from extra (yueatsprograms/Stochastic_Depth svhn-dataset.lua, SVHN:__init: the first 400
    and 200 of each class after a random shuffle), the rest for training. `labels` is train followed by
    extra, the first `n_train` from train. Returns (train_index, val_index), seeded by `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    for lo, hi, quota in ((0, n_train, per_class[0]), (n_train, len(labels), per_class[1])):
        part = labels[lo:hi]
        perm = torch.randperm(len(part), generator=g)
        for c in part.unique().tolist():
            members = perm[part[perm] == c]
            if len(members) <= quota:
                raise DataError(f"SVHN: class {c} has {len(members)} images in "
                                f"{'train' if lo == 0 else 'extra'}, too few to hold out {quota}")
            val_mask[lo + members[:quota]] = True
    return torch.nonzero(~val_mask).flatten(), torch.nonzero(val_mask).flatten()


# --- torchvision's official formats ---------------------------------------------------------------------

def _missing(name: str, root: Path, what: str, url: str) -> DataError:
    return DataError(f"{name} not found in {root} (looked for {what}). Pass --download to fetch it "
                     f"there (needs a network), or download it from {url} and give its folder with --data.")


def _download_failed(name: str, root: Path, url: str, place: str, e: BaseException) -> DataError:
    return DataError(f"--download could not fetch {name} from {url} ({type(e).__name__}: {str(e)[:120]}). "
                     f"Without a network here: fetch that file on a machine with one and {place}, then run "
                     f"again without --download.")


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
    except OSError as e:  # urllib's URLError, a timeout, a refused connection: only when downloading
        if not download:
            raise
        raise _download_failed(f"CIFAR-{num_classes}", root, url, f"unpack it in {root} (giving {root / folder}/)",
                               e) from None
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
        except OSError as e:  # no network: only when downloading
            if not download:
                raise
            url = f"http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat"
            raise _download_failed(f"SVHN {split}", root, url, f"put it in {root}", e) from None
        return ImageSet(torch.from_numpy(s.data).contiguous(), torch.from_numpy(s.labels).long())

    train = read("train")
    parts = (len(train),)
    if extra:
        ex = read("extra")
        parts = (len(train), len(ex))
        train = ImageSet(torch.cat([train.images, ex.images]), torch.cat([train.labels, ex.labels]))
    return Splits(train, read("test"), [str(i) for i in range(10)], 3, parts=parts)


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


# --- limits: a hostile or unlucky file ends in one clear error, never in an exhausted machine ---------------

def max_image_pixels() -> int:
    """Pixels one image may have (default: Pillow's 89.5 M); DENSENET_MAX_IMAGE_PIXELS overrides it."""
    return _env_int("DENSENET_MAX_IMAGE_PIXELS", 89_478_485)


def max_file_bytes() -> int:
    """Bytes one image file may have (default 64 MiB); DENSENET_MAX_FILE_MB overrides it."""
    return _env_int("DENSENET_MAX_FILE_MB", 64) * 2 ** 20


def memory_budget() -> int:
    """Bytes a folder or archive may take in memory (files read and images decoded): half of this
    machine's memory; DENSENET_MAX_MEMORY_MB overrides it."""
    try:
        half = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX
        half = 8 * 2 ** 30
    return _env_int("DENSENET_MAX_MEMORY_MB", half // 2 ** 20) * 2 ** 20


def _env_int(name: str, default: int) -> int:
    from ..options import text as env_text

    text = env_text(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(float(text))
    except ValueError:
        raise DataError(f"{name}={text!r} must be a positive number") from None
    if value < 1:
        raise DataError(f"{name}={text!r} must be a positive number")
    return value


def _too_big(name: str, what: str, size: float, limit: float, unit: str, env: str) -> DataError:
    return DataError(f"{name}: {what} {size:,.0f} {unit}, over the limit of {limit:,.0f} {unit}; "
                     f"if the file is genuine, raise the limit with {env}=N")


# --- decoding -------------------------------------------------------------------------------------------

def _decode(data: bytes, name: str, mode: str) -> torch.Tensor:
    """One image file's bytes -> uint8 (C, H, W), converted to RGB or L (grayscale) as the model needs.
    Any damaged, truncated or lying file is a DataError naming it; nothing crashes the process.

    torchvision.io decodes JPEG/PNG 3x faster than Pillow (20,000 CIFAR JPEGs: 1.6 s against 5.0 s
    on this 2-core machine; all 50,000 read from the archive and decoded: 3.4 s). Its PNG decoder
    crashes the process (SIGSEGV) on any file libpng rejects, so a PNG reaches it only after
    `_png_is_sound` has checked every chunk's CRC, the zlib stream and its exact length (11 us per
    32x32 PNG; decoding takes 28 us, Pillow 55 us). Its JPEG decoder survived 900 random mutations.
    Pillow, which raises clean errors, takes everything else, animated images as their first frame.
    """
    check_png_crcs(data, name)
    fast = _fast_decode(data, mode) if _fast_ok(data, name) else None
    if fast is not None:
        return fast
    import warnings

    import numpy as np

    with open_image(data, name) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's notes on damaged files: the file is read, or an error says why
        try:
            arr = np.asarray(convert_image(im, mode))
        except Exception as e:  # damaged files raise anything from Pillow's decoders
            raise DataError(f"{name} is not a readable image ({_reason(e)})") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def open_image(data: bytes, name: str):
    """A Pillow image of the file's bytes, its size checked against `max_image_pixels()` before it
    is decoded; a DataError naming the file for anything Pillow cannot open."""
    import warnings

    from PIL import Image

    check_png_crcs(data, name)
    limit = max_image_pixels()
    old = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own limit decides; notes on damage
            Image.MAX_IMAGE_PIXELS = max(limit, old or 0) // 2 + 1  # Pillow refuses at twice its limit
            im = Image.open(io.BytesIO(data))
    except Exception as e:
        raise DataError(f"{name} is not a readable image ({_reason(e)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old
    w, h = im.size
    if w * h > limit:
        im.close()
        raise _too_big(name, f"the image has {w}x{h} =", w * h, limit, "pixels", "DENSENET_MAX_IMAGE_PIXELS")
    return im


def _reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):  # its message names an io.BytesIO object, not the file
        return "not an image format Pillow knows"
    return f"{type(e).__name__}: {e}"[:300]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# chunks libpng reads without ever raising an error (a damaged ancillary chunk is a warning)
_PNG_SAFE_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"PLTE", b"tEXt", b"zTXt", b"iTXt", b"tIME", b"pHYs", b"gAMA",
                    b"sRGB", b"cHRM", b"bKGD", b"sBIT", b"tRNS"}


def check_png_crcs(data: bytes, name: str) -> None:
    """Raise a DataError naming the file if any chunk of a PNG fails its CRC-32: Pillow does not check
    the CRCs of the image data (IDAT), so one flipped byte there would be read as other pixels. A chunk
    cut short is left to the decoders, which report a truncated file. Not a PNG: nothing to check."""
    if data[:8] != _PNG_SIGNATURE:
        return
    pos = 8
    while pos + 12 <= len(data):
        n, = struct.unpack_from(">I", data, pos)
        if pos + 12 + n > len(data):
            return
        kind = data[pos + 4:pos + 8]
        crc, = struct.unpack_from(">I", data, pos + 8 + n)
        if zlib.crc32(data[pos + 4:pos + 8 + n]) != crc:
            raise DataError(f"{name} is damaged: its PNG chunk {kind.decode('latin-1')!r} at byte {pos} fails "
                            f"its CRC check; replace the file")
        if kind == b"IEND":
            return
        pos += 12 + n


def _fast_ok(data: bytes, name: str) -> bool:
    """Whether torchvision may decode these bytes: a sound 8-bit PNG, or a JPEG within the pixel limit."""
    if data[:8] == _PNG_SIGNATURE:
        return _png_is_sound(data, name)
    if data[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(data)
        if size is None:
            return False
        if size[0] * size[1] > max_image_pixels():
            raise _too_big(name, f"the image has {size[1]}x{size[0]} =", size[0] * size[1], max_image_pixels(),
                           "pixels", "DENSENET_MAX_IMAGE_PIXELS")
        return True
    return False


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None where the markers do not lead to one
    (a few us; Pillow's header parse takes 40 us, as long as torchvision's whole decode)."""
    try:
        pos = 2
        while True:
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            n, = struct.unpack_from(">H", data, pos + 2)
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
                h, w = struct.unpack_from(">HH", data, pos + 5)
                return (h, w) if h and w else None
            if marker in (0xD9, 0xDA) or n < 2:  # end of image or of scan before any frame
                return None
            pos += 2 + n
    except (IndexError, struct.error):
        return None


def _png_is_sound(data: bytes, name: str) -> bool:
    """True for a non-interlaced 8-bit grey/RGB(A) PNG (its CRCs already checked) whose
    image data inflate to exactly the rows its header declares, each with a valid filter byte: what
    libpng needs to decode without error. False sends the file to Pillow, which reports what is wrong."""
    try:
        pos, idat, seen, width = 8, [], [], 0
        while True:
            n, = struct.unpack_from(">I", data, pos)
            kind = data[pos + 4:pos + 8]
            body = data[pos + 8:pos + 8 + n]
            if n >= 2 ** 31 or len(body) != n or kind not in _PNG_SAFE_CHUNKS:
                return False
            if kind == b"IHDR":  # (every chunk's CRC was checked before: check_png_crcs)
                if seen or n != 13:
                    return False
                width, height, depth, colour, compression, filt, interlace = struct.unpack(">IIBBBBB", body)
                channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(colour)
                if (channels is None or depth != 8 or (compression, filt, interlace) != (0, 0, 0)
                        or not 0 < width < 2 ** 31 or not 0 < height < 2 ** 31):
                    return False  # palettes, 16-bit, interlaced: Pillow
                if width * height > max_image_pixels():
                    raise _too_big(name, f"the image has {width}x{height} =", width * height, max_image_pixels(),
                                   "pixels", "DENSENET_MAX_IMAGE_PIXELS")
            elif not seen:
                return False
            elif kind == b"IDAT":
                if seen[-1] != b"IDAT" and b"IDAT" in seen:
                    return False  # IDAT chunks must be consecutive
                idat.append(body)
            seen.append(kind)
            pos += 12 + n
            if kind == b"IEND":
                break
        if not idat:
            return False
        stride = width * channels + 1
        inflate = zlib.decompressobj()
        raw = inflate.decompress(b"".join(idat), height * stride + 1)
        return (inflate.eof and not inflate.unused_data and len(raw) == height * stride
                and max(raw[0::stride]) < 5)  # filter types 0-4
    except (struct.error, zlib.error):
        return False


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
    if t.dim() == 4:  # an animated image (GIF, WebP): its first frame, as Pillow reads it
        t = t[0]
    return t if t.dtype == torch.uint8 and t.dim() == 3 else None


def _stack(images: list[torch.Tensor], where: str, is_archive: bool = False) -> torch.Tensor:
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) > 1:
        raise DataError(f"images in {where} have different sizes ({', '.join(map(str, sorted(sizes)[:4]))}); "
                        f"in-memory folders need one size: resize them, or "
                        + ("extract the archive and give the folder with --no-in-memory" if is_archive else
                           "use --no-in-memory") + " to stream them with resizing crops")
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


def walk_files(root: Path) -> list[Path]:
    """Every file under `root`, following links to directories (a `test/` linked to a shared disk is
    common on clusters) and visiting each real directory once, so a link cycle ends."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        out += [Path(dirpath, f) for f in sorted(filenames) if os.path.isfile(os.path.join(dirpath, f))]
    return out


def _decompressed(raw):
    """The archive's bytes as a file object: a .tar as it is, a .tar.gz/.bz2/.xz through a reader that
    checks the format's own integrity data (gzip's CRC-32 and length trailer, bzip2's block CRCs, xz's
    check) when it reaches the end; `_read_archive` reads to the end so that the check runs."""
    import bz2
    import gzip
    import lzma

    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic[:3] == b"BZh":
        return bz2.BZ2File(raw, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, "rb")
    return raw


def _read_archive(path: Path) -> dict[str, bytes]:
    """The bytes of every image file in a .tar(.gz) archive, read in one pass in the archive's own
    order: linear time whatever the order of its members (random access into a .tar.gz decompresses
    from the start again, quadratic time for an unsorted archive). The compressed stream is read to
    its end, so a flipped byte (gzip CRC-32) or a cut trailer (gzip length) is an error, not data."""
    import gzip
    import lzma

    limit, budget = max_file_bytes(), memory_budget()
    files: dict[str, bytes] = {}
    total, current = 0, None
    try:
        with open(path, "rb") as raw, _decompressed(raw) as stream, tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                current = m.name
                name = m.name
                if not m.isfile() or not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if m.size > limit:
                    raise _too_big(f"{path}: {m.name}", "the file has", m.size / 2 ** 20, limit / 2 ** 20, "MiB",
                                   "DENSENET_MAX_FILE_MB")
                total += m.size
                if total > budget:
                    raise _too_big(str(path), "its image files hold more than", total / 2 ** 20,
                                   budget / 2 ** 20, "MiB (half of this machine's memory)", "DENSENET_MAX_MEMORY_MB")
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise tarfile.ReadError(f"{m.name} holds {len(data)} of its {m.size} bytes")
                files[name] = data
            current = None
            while stream.read(1 << 20):  # the rest (tar padding, the compressor's trailer): its check runs
                pass
    except (gzip.BadGzipFile, lzma.LZMAError) as e:
        where = f" in or after member {current!r}" if current else " at its end"
        raise DataError(f"{path} is damaged: its compressed data fails the integrity check{where} "
                        f"({type(e).__name__}: {e}); download or create it again") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        after = f" at or after member {current!r}" if current else ""
        raise DataError(f"{path} is not a readable .tar or .tar.gz archive: damaged or truncated{after} "
                        f"({type(e).__name__}: {e}); download or create it again") from None
    return files


def load_folder(path: Path, channels: int = 3, in_memory: bool | None = None,
                only: tuple[str, ...] | None = None) -> Splits:
    """An ImageNet-layout folder (train/ and val/ or test/, one sub-folder per class), a directory or a
    .tar/.tar.gz archive of one. A directory with class sub-folders and no train/ is a training set.
    Links to directories are followed. With `only` (e.g. ("test",)), the other splits are listed (the
    classes are train/'s) but not decoded: they are None."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"image folder {path} does not exist: give a directory with train/ (and val/ or "
                        f"test/) holding one sub-folder of images per class, or a .tar.gz of one")
    mode = "L" if channels == 1 else "RGB"
    is_archive = path.is_file()
    if is_archive:
        archive = _read_archive(path)
        names = list(archive)
    else:
        names = [p.relative_to(path).as_posix() for p in walk_files(path)]
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

    def read_bytes(f: str) -> bytes:
        if is_archive:
            return archive[f]
        p = path / f
        try:
            size = p.stat().st_size
            if size > max_file_bytes():
                raise _too_big(str(p), "the file has", size / 2 ** 20, max_file_bytes() / 2 ** 20, "MiB",
                               "DENSENET_MAX_FILE_MB")
            return p.read_bytes()
        except OSError as e:
            raise DataError(f"{p} could not be read ({e.strerror or e})") from None

    listed = {s: files_of(s) for s in splits}
    first = listed["train"][0][0]
    shape = _decode(read_bytes(first), f"{path}/{first}", mode).shape
    if in_memory is None:  # small images in memory; big ones (ImageNet) streamed
        in_memory = is_archive or (shape[-2] * shape[-1] <= 96 * 96 and len(names) <= 2_000_000)
    if not in_memory and is_archive:
        raise DataError(f"{path}: streaming from an archive is not supported; extract it and give the folder")
    if in_memory:
        need = sum(map(len, listed.values())) * shape.numel()
        if need > memory_budget():
            raise _too_big(str(path), "its images, decoded, would take", need / 2 ** 20, memory_budget() / 2 ** 20,
                           "MiB (half of this machine's memory)", "DENSENET_MAX_MEMORY_MB")

    def read(split: str):
        items = listed[split]
        if not in_memory:
            return StreamSet([(str(path / f), y) for f, y in items])
        images = []
        for f, _ in items:
            images.append(_decode(read_bytes(f), f"{path}/{f}", mode))
            if images[-1].shape != shape:  # stop at the first odd size: no decoding of a whole archive for nothing
                break
        return ImageSet(_stack(images, f"{path}/{splits[split]}", is_archive), torch.tensor([y for _, y in items]))

    out = {s: read(s) for s in ("train", "val", "test") if s in splits and (only is None or s in only)}
    return Splits(out.get("train"), out.get("test"), classes, channels, val=out.get("val"))
