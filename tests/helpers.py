"""Small real data made by the tests themselves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
