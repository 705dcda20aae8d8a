"""The paper's augmentation and normalisation, applied to whole batches of tensors.

Small datasets (CIFAR, SVHN, digits, small image folders) live in memory as uint8 tensors and are
augmented a batch at a time on the device that trains: no per-image Python work, no worker processes.

CIFAR "+" augmentation follows the authors' code (fb.resnet.torch's order): normalise by the training
set's per-channel mean and standard deviation, zero-pad 4 pixels (zero is the mean colour after
normalising), take a random 32x32 crop, flip horizontally with probability 1/2.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

AUGMENTATIONS = ("cifar", "cifar-reflect", "flip", "none", "imagenet")


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


def random_crop(x: torch.Tensor, size: tuple[int, int], padding: int, generator: torch.Generator,
                mode: str = "constant") -> torch.Tensor:
    """Pad every image by `padding` pixels (zeros, or mode="reflect": mirrored, as the WRN authors'
    CIFAR script, randomcrop_type=reflection), then take one random crop of `size` per image."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (padding, padding, padding, padding), mode=mode)
    oy = torch.randint(0, h + 2 * padding - size[0] + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, w + 2 * padding - size[1] + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(size[0], device=x.device))[:, :, None]  # (B, h, 1)
    cols = (ox[:, None] + torch.arange(size[1], device=x.device))[:, None, :]  # (B, 1, w)
    idx = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)  # (B, C, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


# The padding (pixels, mode) of each in-memory augmentation's random crop: CIFAR's 4 zero pixels, WRN's 4
# reflected ones; none/flip make no shifts. Ten-crop evaluation pads the same way.
TRANSLATION_PADDING = {"cifar": (4, "constant"), "cifar-reflect": (4, "reflect")}


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a normalised float batch (B, C, H, W)."""
    if kind in TRANSLATION_PADDING:
        pad, mode = TRANSLATION_PADDING[kind]
        x = random_crop(x, x.shape[-2:], pad, generator, mode)
        return random_flip(x, generator)
    if kind == "flip":
        return random_flip(x, generator)
    if kind == "none":
        return x
    raise ValueError(f"augmentation {kind!r} applies to images streamed from disk, not to in-memory batches")


def ten_crop_padding(preprocessing: dict) -> tuple[int, str]:
    """The padding (pixels, mode) of in-memory ten-crop evaluation: that of the random crops the model was
    trained on (4 pixels, zeros or reflected, at any image size), so that the ten crops are shifts the
    model saw in training. A model trained without random crops never saw a shifted image: ten-crop is
    refused for it (on 8x8 digits trained without shifts, 4-pixel shifts gave 90% top-1 error)."""
    augment = preprocessing.get("augment")
    if augment not in TRANSLATION_PADDING:
        raise ValueError(f"ten-crop averages over crops shifted as the training's random crops were, but "
                         f"this model was trained without random crops (augment {augment!r}): every crop "
                         f"but the centre would be an image it never saw. Evaluate without --ten-crop (the "
                         f"single full image is the paper's protocol for such a model).")
    return TRANSLATION_PADDING[augment]


def ten_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """fb.resnet.torch's TenCrop (liuzhuang13/DenseNet datasets/transforms.lua:88-110 at e3d24fb, fb.resnet.torch's
    copied): the centre crop and the four corner
    crops of the image and of its mirror image, (10, ..., h, w). The centre sits at
    math.ceil((W - w) / 2) (CenterCrop, :53-59) in both, so where W - w is odd the mirror's centre crop is
    not the mirror of the image's. Ordered so that crop i + 5 is the mirror of crop i (the corners and,
    for an even margin, the centre): TL, TR, BL, BR, centre, then the mirror image's TR, TL, BR, BL, centre."""
    h, w = x.shape[-2:]
    th, tw = size
    if th > h or tw > w:
        raise ValueError(f"ten-crop of {th}x{tw} needs images at least that large, got {h}x{w}")
    top, left = lua_center_offset(h, th), lua_center_offset(w, tw)

    def corners(im):
        return [im[..., :th, :tw], im[..., :th, w - tw:], im[..., h - th:, :tw], im[..., h - th:, w - tw:]]

    m = x.flip(-1)
    tl, tr, bl, br = corners(m)
    return torch.stack(corners(x) + [x[..., top:top + th, left:left + tw]]
                       + [tr, tl, br, bl, m[..., top:top + th, left:left + tw]])


def lua_center_offset(length: int, size: int) -> int:
    """transforms.lua CenterCrop's offset, `math.ceil((length - size) / 2)`."""
    return -(-(length - size) // 2)


# --- Torch7's image.scale(src, w, h, 'bicubic'), as fb.resnet.torch and DenseNet resize ImageNet -----------
# torch/image generic/image.c (commit 5aa18819b6a7b44751f8a858bd232d1c07b67985) Main_scaleBicubic: rows,
# then columns, each by Main_scaleCubic_rowcol: destination pixel i samples the source at
# i * (src - 1) / (dst - 1) (corners aligned; float32 arithmetic), Catmull-Rom weights
# (Main_cubicInterpolate), the missing neighbour at either end extrapolated linearly (p0 = 2 p1 - p2,
# p3 = 2 p2 - p1), the last pixel copied; no antialiasing, no clamping of float images.

@functools.lru_cache(maxsize=256)
def lua_cubic_weights(src: int, dst: int) -> torch.Tensor:
    """The (dst, src) matrix of Main_scaleCubic_rowcol: resampled = weights @ line (do not modify it)."""
    if dst == src:
        return torch.eye(src)
    wt = np.zeros((dst, src))
    if src == 1:
        return torch.ones(dst, 1)
    scale = np.float32(src - 1) / np.float32(dst - 1 if dst > 1 else 1)  # float32, as the C
    for di in range(dst - 1):
        si_f = float(np.float32(di) * scale)  # `si_f = di * scale`
        i = min(int(si_f), src - 2)
        x = si_f - i
        w0, w1 = 0.5 * x * (-1 + x * (2 - x)), 1 + 0.5 * x * x * (-5 + 3 * x)
        w2, w3 = 0.5 * x * (1 + x * (4 - 3 * x)), 0.5 * x * x * (x - 1)
        if i > 0:
            wt[di, i - 1] += w0
        else:  # p0 = 2 p1 - p2
            w1, w2 = w1 + 2 * w0, w2 - w0
        if i + 2 < src:
            wt[di, i + 2] += w3
        else:  # p3 = 2 p2 - p1
            w1, w2 = w1 - w3, w2 + 2 * w3
        wt[di, i] += w1
        wt[di, i + 1] += w2
    wt[dst - 1, src - 1] = 1.0
    return torch.from_numpy(wt).float()


def lua_scale(img: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """image.scale(img, width, height, 'bicubic') of a float image (C, H, W)."""
    h, w = img.shape[-2:]
    rows = lua_cubic_weights(w, width).to(img.device)  # (width, W)
    cols = lua_cubic_weights(h, height).to(img.device)  # (height, H)
    return cols @ (img.float() @ rows.T)


class LuaScale:
    """transforms.lua M.Scale(size) (:37-50, bicubic by default): the shorter side to `size` by bicubic image.scale, the other
    truncated as Torch sizes a tensor from `h / w * size`; an image whose shorter side is `size` unchanged."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        s = self.size
        if (w <= h and w == s) or (h <= w and h == s):
            return img
        if w < h:
            return lua_scale(img, s, max(int(h / w * s), 1))
        return lua_scale(img, max(int(w / h * s), 1), s)


class LuaCenterCrop:
    """transforms.lua M.CenterCrop(size) (:53-59) of a (C, H, W) tensor: offsets math.ceil((W - size) / 2)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        s = self.size
        if s > h or s > w:
            raise ValueError(f"a centre crop of {s}x{s} needs an image at least that large, got {h}x{w}")
        top, left = lua_center_offset(h, s), lua_center_offset(w, s)
        return img[..., top:top + s, left:left + s]


class LuaTenCrop:
    """transforms.lua M.TenCrop(size) of a (C, H, W) tensor: (10, C, size, size), see `ten_crop`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return ten_crop(img, (self.size, self.size))


# --- ImageNet training augmentation, as fb.resnet.torch (which DenseNet's datasets/imagenet.lua copies) ----
# liuzhuang13/DenseNet datasets/imagenet.lua ImagenetDataset:preprocess (train): RandomSizedCrop(224),
# ColorJitter{brightness 0.4, contrast 0.4, saturation 0.4}, Lighting(0.1, pca.eigval, pca.eigvec),
# ColorNormalize(meanstd), HorizontalFlip(0.5); the transforms are datasets/transforms.lua's. Applied to
# one image at a time in the loader's worker processes; randomness from torch's generator, which the
# DataLoader seeds per worker (so a run is reproducible).

IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)  # datasets/imagenet.lua `pca`, over RGB in [0, 1]
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))


class Lighting:
    """AlexNet-style PCA lighting noise (transforms.lua M.Lighting): adds eigvec @ (alpha * eigval) to
    every pixel of a (3, H, W) float image, alpha ~ N(0, alphastd^2) per channel, drawn per image."""

    def __init__(self, alphastd: float = 0.1, eigval=IMAGENET_PCA_EIGVAL, eigvec=IMAGENET_PCA_EIGVEC):
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3, generator=generator) * self.alphastd
        rgb = (self.eigvec * alpha[None, :] * self.eigval[None, :]).sum(1)
        return img + rgb.to(img.dtype).view(3, 1, 1)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    return 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]  # transforms.lua grayscale()


class ColorJitter:
    """Brightness, contrast and saturation jitter in a random order (transforms.lua M.ColorJitter): each
    blends the image with black, its mean grey level or its greyscale by alpha = 1 + U(-var, var).
    As the Lua, nothing is clamped to [0, 1] (torchvision's ColorJitter clamps after every step)."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        self.ops = [(op, v) for op, v in (("brightness", brightness), ("contrast", contrast),
                                          ("saturation", saturation)) if v]

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for i in torch.randperm(len(self.ops), generator=generator).tolist():
            op, var = self.ops[i]
            alpha = 1.0 + (torch.rand((), generator=generator).item() * 2 - 1) * var
            if op == "brightness":
                other = torch.zeros_like(img)
            elif op == "contrast":
                other = _grayscale(img).mean().expand_as(img)
            else:
                other = _grayscale(img).expand_as(img)
            img = img * alpha + other * (1 - alpha)
        return img


def random_sized_crop_params(height: int, width: int, generator: torch.Generator | None = None,
                             attempts: int = 10) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of transforms.lua M.RandomSizedCrop: area U(0.08, 1) of the image, aspect ratio
    U(3/4, 4/3) (uniform, not log-uniform as torchvision), sides swapped with probability 1/2; None when
    ten attempts do not fit (the caller then scales and centre-crops)."""
    def uniform(a: float, b: float) -> float:
        return a + (b - a) * torch.rand((), generator=generator, dtype=torch.float64).item()

    for _ in range(attempts):
        target = uniform(0.08, 1.0) * height * width
        ratio = uniform(3 / 4, 4 / 3)
        w, h = round((target * ratio) ** 0.5), round((target / ratio) ** 0.5)
        if uniform(0, 1) < 0.5:
            w, h = h, w
        if h <= height and w <= width:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    return None


class RandomSizedCrop:
    """transforms.lua M.RandomSizedCrop (:130-163) on a PIL image (or a float (C, H, W) tensor): a random
    crop scaled to size x size by Torch's bicubic image.scale (`lua_scale`: no antialiasing, which
    Pillow's and torchvision's resizing would add), or, when no crop fits, M.Scale(size) and
    M.CenterCrop(size) (ceil). Returns a float (C, size, size) tensor, pixels in [0, 1] as Lua's."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img) -> torch.Tensor:
        x = _float_image(img)
        height, width = x.shape[-2:]
        params = random_sized_crop_params(height, width)
        if params is not None:
            top, left, h, w = params
            return lua_scale(x[:, top:top + h, left:left + w], self.size, self.size)
        return LuaCenterCrop(self.size)(LuaScale(self.size)(x))


def _float_image(img) -> torch.Tensor:
    """A PIL image (or a uint8 / float tensor) as a float32 (C, H, W) tensor in [0, 1], as Lua's image.load."""
    if isinstance(img, torch.Tensor):
        return img.float().div(255.0) if img.dtype == torch.uint8 else img.float()
    from torchvision.transforms.v2 import functional as TF

    return TF.pil_to_tensor(img).float().div_(255.0)


def imagenet_train_transform(image_size: int, normalize: Normalization):
    """The whole fb.resnet.torch training pipeline: PIL image -> normalised (3, S, S) float tensor."""
    from torchvision.transforms import v2

    jitter, lighting = ColorJitter(0.4, 0.4, 0.4), Lighting(0.1)
    return v2.Compose([RandomSizedCrop(image_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       jitter, lighting, v2.Normalize(list(normalize.mean), list(normalize.std)),
                       v2.RandomHorizontalFlip(0.5)])
