"""The paper's augmentation and normalisation, applied to whole batches of tensors.

Small datasets (CIFAR, SVHN, digits, small image folders) live in memory as uint8 tensors and are
augmented a batch at a time on the device that trains: no per-image Python work, no worker processes.

CIFAR "+" augmentation follows the authors' code (fb.resnet.torch's order): normalise by the training
set's per-channel mean and standard deviation, zero-pad 4 pixels (zero is the mean colour after
normalising), take a random 32x32 crop, flip horizontally with probability 1/2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AUGMENTATIONS = ("cifar", "flip", "none", "imagenet")


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine map applied to pixels in [0, 1]: (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32."""
        view = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(view)
        std = torch.tensor(self.std, device=x.device).view(view)
        return (x.float().div_(255.0) - mean) / std


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> Normalization:
    """Mean and standard deviation per channel of uint8 images (N, C, H, W), over all pixels, in [0, 1]."""
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].double().div_(255.0)
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = images.numel() // c
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))


def random_crop(x: torch.Tensor, size: tuple[int, int], padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad every image by `padding` pixels, then take one random crop of `size` per image."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, h + 2 * padding - size[0] + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, w + 2 * padding - size[1] + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(size[0], device=x.device))[:, :, None]  # (B, h, 1)
    cols = (ox[:, None] + torch.arange(size[1], device=x.device))[:, None, :]  # (B, 1, w)
    idx = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)  # (B, C, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a normalised float batch (B, C, H, W)."""
    if kind == "cifar":
        x = random_crop(x, x.shape[-2:], 4, generator)
        return random_flip(x, generator)
    if kind == "flip":
        return random_flip(x, generator)
    if kind == "none":
        return x
    raise ValueError(f"augmentation {kind!r} applies to images streamed from disk, not to in-memory batches")


TRANSLATION_PADDING = {"cifar": 4}  # zero-padding of each augmentation's random crop (none/flip: no shifts)


def ten_crop_padding(preprocessing: dict) -> int:
    """The zero-padding of in-memory ten-crop evaluation: that of the random crops the model was trained
    on (4 pixels of "cifar" augmentation, at any image size), so that the ten crops are shifts the model
    saw in training. A model trained without random crops never saw a shifted image: ten-crop is
    refused for it (on 8x8 digits trained without shifts, 4-pixel shifts gave 90% top-1 error)."""
    augment = preprocessing.get("augment")
    if augment not in TRANSLATION_PADDING:
        raise ValueError(f"ten-crop averages over crops shifted as the training's random crops were, but "
                         f"this model was trained without random crops (augment {augment!r}): every crop "
                         f"but the centre would be an image it never saw. Evaluate without --ten-crop (the "
                         f"single full image is the paper's protocol for such a model).")
    return TRANSLATION_PADDING[augment]


def ten_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The four corner crops and the centre crop, and their mirror images: (10, B, C, h, w)."""
    h, w = x.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"ten-crop of {th}x{tw} needs images at least that large, got {h}x{w}")
    top, left = (h - th) // 2, (w - tw) // 2
    crops = [x[..., :th, :tw], x[..., :th, w - tw:], x[..., h - th:, :tw], x[..., h - th:, w - tw:],
             x[..., top:top + th, left:left + tw]]
    return torch.stack(crops + [c.flip(-1) for c in crops])
