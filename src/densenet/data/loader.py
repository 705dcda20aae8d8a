"""Batches for training and evaluation, reproducible to the bit and resumable mid-epoch.

The order of epoch e is a permutation seeded with (seed, e); the augmentation of step s of epoch e
draws from a generator seeded with (seed, e, s). Nothing depends on what ran before, so a run resumed
at step s of epoch e sees exactly the batches an uninterrupted run sees. Under torchrun each process
takes its slice of every global batch, augmented identically, so N processes see what one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .sources import ImageSet, StreamSet
from .transforms import Normalization, augment_batch, ten_crop


def _generator(*seeds: int) -> torch.Generator:
    g = torch.Generator()
    value = 0
    for s in seeds:  # a simple, stable mix of the seeds into one 63-bit integer
        value = (value * 1_000_003 + int(s) + 0x9E3779B9) % (2 ** 63)
    return g.manual_seed(value)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A batch gathered on the CPU, onto `device`. To CUDA through pinned memory, so the copy is
    asynchronous (non_blocking from pageable memory is an ordinary blocking copy); elsewhere as it is."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


@dataclass
class _Sampling:
    """What every kind of batches shares: `data` in `batch_size` batches (the global batch; with
    world_size > 1 each rank yields its slice of it), their number and their order in an epoch.
    The options after the batch size are keyword-only."""

    data: Any
    batch_size: int
    shuffle: bool = field(default=False, kw_only=True)
    drop_last: bool = field(default=False, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    rank: int = field(default=0, kw_only=True)
    world_size: int = field(default=1, kw_only=True)
    device: torch.device | str = field(default="cpu", kw_only=True)
    channels_last: bool = field(default=False, kw_only=True)

    def __len__(self) -> int:
        n = _num_batches(len(self.data), self.batch_size, self.drop_last)
        rest = len(self.data) % self.batch_size
        if n and rest and not self.drop_last and self.world_size > 1 \
                and (self.world_size - 1) * self._per_rank(rest) >= rest:
            # a last batch too small to give every process at least one image is left out: a process
            # without a batch would skip the step the others wait in (DDP's gradient all-reduce) forever
            n -= 1
        return n

    def _per_rank(self, batch: int) -> int:
        """Images each rank takes of a global batch of `batch` images (the last rank may take fewer)."""
        return -(-batch // self.world_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.data))
        return torch.randperm(len(self.data), generator=_generator(self.seed, epoch))


@dataclass
class Batches(_Sampling):
    """Training or evaluation batches of an in-memory ImageSet.

    `batch_size` is the global batch; with world_size > 1 each rank yields its slice of it.
    """

    data: ImageSet
    normalize: Normalization
    augment: str = "none"

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch` from step `start` on: (normalised float images, labels) on the device."""
        order = self.order(epoch)
        for step in range(start, len(self)):
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            x, y = _to_device(self.data.images[idx], self.device), _to_device(self.data.labels[idx], self.device)
            x = self.normalize(x)
            if self.augment != "none":
                x = augment_batch(x, self.augment, _generator(self.seed, epoch, step, 1))
            if self.world_size > 1:  # this rank's slice of the global batch
                per = self._per_rank(len(idx))
                x, y = x[self.rank * per:(self.rank + 1) * per], y[self.rank * per:(self.rank + 1) * per]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def __iter__(self):
        return self.iterate()


def eval_batches(data: ImageSet, batch_size: int, normalize: Normalization, device="cpu",
                 ten_crop_pad: tuple[int, str] | None = None, channels_last: bool = False):
    """Evaluation batches; with `ten_crop_pad` = (pixels, mode), (10, B, C, H, W) crops of the images
    padded so (mode: "constant" for zeros, or "reflect")."""
    for i in range(0, len(data), batch_size):
        x = normalize(data.images[i:i + batch_size].to(device))
        if ten_crop_pad is not None:
            size = x.shape[-2:]
            p, mode = ten_crop_pad
            x = ten_crop(torch.nn.functional.pad(x, (p, p, p, p), mode=mode), size)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, data.labels[i:i + batch_size].to(device)


# --- streamed image folders (ImageNet) ------------------------------------------------------------------

IMAGENET_MEAN_STD = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, data: StreamSet, transform, channels: int):
        self.data, self.transform, self.mode = data, transform, "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from .sources import DataError, convert_image, open_image

        path, label = self.data.samples[i]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DataError(f"{path} could not be read ({e.strerror or e})") from None
        with open_image(data, path) as im:  # Pillow, with the pixel limit checked from the header
            try:
                im = convert_image(im, self.mode)
            except Exception as e:  # damaged files raise anything from Pillow's decoders
                raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})"[:400]) from None
        return self.transform(im), label


def stream_transform(train: bool, image_size: int, resize: int, normalize: Normalization, ten: bool = False):
    """ImageNet preprocessing: for training fb.resnet.torch's (random-sized crop, colour jitter, PCA
    lighting, flip: transforms.imagenet_train_transform); for evaluation its datasets/imagenet.lua (val):
    Scale(`resize`) by Torch's bicubic image.scale (no antialiasing), ColorNormalize, then CenterCrop
    (offsets rounded up, as the Lua's math.ceil) or TenCrop of `image_size` (transforms.LuaScale ...)."""
    from torchvision import transforms as T

    from .transforms import LuaCenterCrop, LuaScale, LuaTenCrop, _float_image, imagenet_train_transform

    if train:
        return imagenet_train_transform(image_size, normalize)
    crop = LuaTenCrop(image_size) if ten else LuaCenterCrop(image_size)
    return T.Compose([_float_image, LuaScale(resize), T.Normalize(normalize.mean, normalize.std), crop])


@dataclass
class StreamBatches(_Sampling):
    """Batches of a streamed folder through worker processes; same contract as `Batches`."""

    data: StreamSet
    transform: object
    channels: int = 3
    workers: int = 4

    def iterate(self, epoch: int = 0, start: int = 0):
        order = self.order(epoch)
        per = self._per_rank(self.batch_size)
        n_steps = len(self)
        index = []
        for step in range(start, n_steps):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            p = self._per_rank(len(batch))  # per, or less in a short last batch (its own DataLoader batch)
            index.extend(batch[self.rank * p:(self.rank + 1) * p].tolist())
        ds = torch.utils.data.Subset(_FolderDataset(self.data, self.transform, self.channels), index)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=per, num_workers=self.workers, pin_memory=str(self.device).startswith("cuda"),
            generator=_generator(self.seed, epoch, start, 2), persistent_workers=False)
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)

    def __iter__(self):
        return self.iterate()
