"""Inference for people who deploy a trained model: `load` a checkpoint into the model and the exact
preprocessing its training evaluated with, and `predict` the classes of image files.

The preprocessing travels in the checkpoint (`info["preprocessing"]`, written by `densenet train`), so
nobody repeats it by hand:
- in-memory datasets (CIFAR, SVHN, digits, small image folders) were evaluated at their one image size,
  unresized. An image of that size is only normalised, exactly as in training. An image of another size
  is first resized (bilinear, antialiased) to the smallest size that covers `image_size` with its aspect
  ratio kept, then centre-cropped to `image_size`: our choice, as training never saw another size.
- streamed folders (ImageNet) were evaluated by resizing the shorter side to `resize`, then a centre
  crop of `image_size`: the same transform here.
Images are converted to the model's channels as training read them: for RGB models, RGBA loses its
alpha, palette and grayscale images are expanded; grayscale models take colour images as luma; 16-bit
images are scaled to 8 bits.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from .data.sources import IMAGE_SUFFIXES, DataError, _decode, convert_image, max_file_bytes, open_image, walk_files
from .data.transforms import Normalization
from .saved_model import load_model
from .runs import CheckpointError


class Preprocess:
    """A path or a PIL image -> the normalised float32 (C, H, W) tensor the model expects."""

    def __init__(self, preprocessing: dict[str, Any], checkpoint_file: str | Path | None = None):
        from .data.normalization import find_normalization

        self.source = preprocessing["source"]  # "memory" or "stream": how training read its images
        # per-channel numbers; per-pixel or ZCA statistics from the run directory of `checkpoint_file`
        self.normalize = find_normalization(preprocessing, checkpoint_file)
        self.channels = int(preprocessing["channels"])
        self.image_size = tuple(int(s) for s in preprocessing["image_size"])  # (H, W)
        self.resize = int(preprocessing.get("resize") or round(self.image_size[0] * 256 / 224))
        self.mode = "L" if self.channels == 1 else "RGB"

    def __repr__(self) -> str:
        extra = f", resize={self.resize}" if self.source == "stream" else ""
        return (f"Preprocess(source={self.source!r}, channels={self.channels}, image_size={self.image_size}"
                f"{extra}, " + (f"mean={self.normalize.mean}, std={self.normalize.std})"
                                if isinstance(self.normalize, Normalization) else f"normalize={self.normalize.kind!r})"))

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        if isinstance(image, Image.Image):
            return self._stream(image) if self.source == "stream" else self._memory(self._pil_tensor(image))
        if not isinstance(image, (str, os.PathLike)):
            raise TypeError(f"expected an image path or a PIL image, got {type(image).__name__}")
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{path} is a directory, not an image" if path.is_dir() else _not_a_file(path))
        try:
            if path.stat().st_size > max_file_bytes():
                raise DataError(f"{path}: the file has {path.stat().st_size / 2 ** 20:,.0f} MiB, over the limit of "
                                f"{max_file_bytes() / 2 ** 20:,.0f} MiB; if it is genuine, raise the limit with "
                                f"DENSENET_MAX_FILE_MB=N")
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path} could not be read ({e.strerror or e})") from None
        if self.source == "stream":  # as training's loader: Pillow
            with open_image(data, str(path)) as im:
                try:
                    return self._stream(im)
                except Exception as e:  # damaged files raise anything from Pillow's decoders
                    raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})"[:400]) from None
        return self._memory(_decode(data, str(path), self.mode))  # as training's in-memory reader

    def _pil_tensor(self, im) -> torch.Tensor:
        import numpy as np

        t = torch.from_numpy(np.array(convert_image(im, self.mode)))
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)  # uint8 (C, H, W)

    def _memory(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        h, w = x.shape[-2:]
        th, tw = self.image_size
        if (h, w) != (th, tw):
            scale = max(th / h, tw / w)
            x = TF.resize(x, [max(th, round(h * scale)), max(tw, round(w * scale))], antialias=True)
            x = TF.center_crop(x, [th, tw])
        return self.normalize(x.unsqueeze(0))[0]

    def _stream(self, im) -> torch.Tensor:
        from .data.loader import stream_transform

        return stream_transform(False, self.image_size[0], self.resize, self.normalize)(convert_image(im, self.mode))


def load(checkpoint: str | Path, device: str | torch.device = "cpu",
         which: str | None = None) -> tuple[nn.Module, Preprocess]:
    """A model trained by this package, from its checkpoint (a run directory: the checkpoint its protocol
    reports, or `which`, best or last; or a model.safetensors file): (model in eval mode on `device`, its
    preprocessing transform). `model.classes` holds the class names, in the order of the model's
    outputs; `model.checkpoint` the `densenet.runs.Checkpoint` read (file, which, epoch)."""
    model, info = load_model(checkpoint, device, which)
    if "preprocessing" not in info or "classes" not in info:
        raise CheckpointError(f"{checkpoint} holds no preprocessing or class names (it was not written by "
                              f"`densenet train`); build the transform by hand")
    model.classes = list(info["classes"])
    model.checkpoint = info["checkpoint"]
    return model, Preprocess(info["preprocessing"], info["checkpoint"].file)


def find_images(paths: Iterable[str | Path], include_hidden: bool = False) -> list[tuple[str, str | None]]:
    """(path, error or None) for each file given, and for each image (by suffix) under each folder
    given, searched recursively in sorted order. Below a folder given, hidden files and folders (a
    name starting with ".": `.venv/`, `.git/`, `.ipynb_checkpoints/`) are skipped unless
    `include_hidden`. A folder without images is an error."""
    out: list[tuple[str, str | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in walk_files(p) if f.suffix.lower() in IMAGE_SUFFIXES
                           and (include_hidden or not any(part.startswith(".") for part in f.relative_to(p).parts)))
            out += [(str(f), None) for f in found] or [(str(p), f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) "
                                                                f"in this folder")]
        else:
            out.append((str(p), None if p.is_file() else _not_a_file(p)))
    return out


def _not_a_file(p: Path) -> str:
    """Why `p` is not an image file to read: missing, or a FIFO, device or socket (never opened: a FIFO
    would block)."""
    import stat

    try:
        mode = p.stat().st_mode
    except OSError:
        return f"{p} does not exist"
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"{p} is {kind}, not an image file"


def predict(model: nn.Module, transform: Preprocess, paths: Iterable[str | Path], *, top_k: int = 5,
            batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """For each image under `paths`, in order: {"path", "predictions": [{"class", "index",
    "probability"}]} with the `top_k` most probable classes, or {"path", "error"} for a file that is not
    a readable image (the others are still predicted). Images go through the model `batch_size` at a time."""
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")  # compiled: CPU
    items = find_images(paths)
    for start in range(0, len(items), batch_size):
        results, inputs = [], []
        for path, error in items[start:start + batch_size]:
            if error is None:
                try:
                    inputs.append(transform(path))
                except DataError as e:
                    error = str(e)
            results.append({"path": path, "error": error} if error else {"path": path})
        if inputs:
            with torch.no_grad():  # inference_mode gives the same numbers (tests/test_fused.py::test_inference_mode)
                probs = model(torch.stack(inputs).to(device)).float().softmax(1).cpu()
            classes = getattr(model, "classes", None) or [str(i) for i in range(probs.shape[1])]
            p, idx = probs.topk(min(top_k, probs.shape[1]), dim=1)
            ok = iter(zip(p.tolist(), idx.tolist()))
            for r in results:
                if "error" not in r:
                    ps, ix = next(ok)
                    r["predictions"] = [{"class": classes[i], "index": i, "probability": q} for q, i in zip(ps, ix)]
        yield from results


__all__ = ["Preprocess", "find_images", "load", "predict"]
