"""Datasets by name with the paper's recipe for each, in-memory batches and streamed folders."""
from __future__ import annotations

from dataclasses import dataclass

from .sources import DataError, ImageSet, Splits, StreamSet, balanced_split
from .transforms import AUGMENTATIONS, Normalization, channel_stats


@dataclass(frozen=True)
class DatasetSpec:
    """What the paper does with a dataset; every field is a default the command line can override."""

    name: str
    epochs: int
    batch_size: int
    milestones: tuple[float, ...]  # lr / 10 at these epochs; values < 1 are fractions of the epochs
    val_size: int  # images held out of the training set for model selection
    augment: str  # "cifar" (pad-crop-flip), "flip", "none", or "imagenet" (streamed folders)
    normalize: str  # "stats": per-channel mean/std of the training set; "div255"; "imagenet"
    needs_path: bool = True
    description: str = ""
    test_on: str = "final"  # the weights whose test error is reported: the final epoch's, or the best validation's
    drop_rate: float | None = None  # None: the paper's rule (0.2 without augmentation, else 0)
    train_images: int | None = None  # the official training set's size (None: counted when loaded)
    extra_images: int = 0  # SVHN's extra set, trained on beside train as the paper (--svhn-extra)

    def train_size(self, extra: bool = True) -> int | None:
        """Images of the official training split, before any hold-out (None: known once loaded)."""
        return None if self.train_images is None else self.train_images + (self.extra_images if extra else 0)


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("cifar10", 300, 64, (0.5, 0.75), 5000, "cifar", "stats", train_images=50_000,
                description="CIFAR-10, official python format (torchvision); C10+ by default, --augment none for C10"),
    DatasetSpec("cifar100", 300, 64, (0.5, 0.75), 5000, "cifar", "stats", train_images=50_000,
                description="CIFAR-100, official python format; C100+ by default"),
    DatasetSpec("svhn", 40, 64, (0.5, 0.75), 6000, "none", "div255", test_on="best", train_images=73_257,
                extra_images=531_131,
                description="SVHN train + extra (604,388 images), official .mat files; no augmentation; "
                            "the model of lowest validation error is tested"),
    DatasetSpec("imagenet", 90, 256, (30, 60), 0, "imagenet", "imagenet",
                description="ImageNet-layout folder (train/, val/), streamed; 224 crops"),
    DatasetSpec("folder", 300, 64, (0.5, 0.75), 5000, "auto", "stats",
                description="any folder or .tar.gz with train/ (and val/ or test/) of class sub-folders"),
    # not a paper dataset; no dropout: with dropout 0.2 the BN statistics training leaves do not fit the
    # dropout-free test network (4.17% test error, 1.11% after re-estimating them; without dropout 0.56%; BENCHMARKS.md)
    DatasetSpec("digits", 30, 64, (0.5, 0.75), 300, "none", "stats", needs_path=False, drop_rate=0.0,
                description="scikit-learn's handwritten digits, 8x8 grayscale, offline (the first run; "
                            "no dropout)"),
]}


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_splits(name: str, path=None, *, download: bool = False, svhn_extra: bool = True,
                in_memory: bool | None = None, in_channels: int = 3, only: tuple[str, ...] | None = None) -> Splits:
    """The official splits of a dataset, read from `path`; of an image folder, only the splits in `only`
    are decoded (the others are None)."""
    from pathlib import Path

    from . import sources

    spec = get_dataset_spec(name)
    if spec.needs_path and path is None:
        raise DataError(f"dataset {name!r} needs --data PATH (the folder that holds it"
                        + (", or where --download should put it)" if name in ("cifar10", "cifar100", "svhn") else ")"))
    p = Path(path).expanduser() if path is not None else None
    if name in ("cifar10", "cifar100"):
        return sources.load_cifar(p, 10 if name == "cifar10" else 100, download)
    if name == "svhn":
        return sources.load_svhn(p, download, svhn_extra)
    if name == "digits":
        return sources.load_digits()
    if download:
        raise DataError(f"--download is not available for {name!r}: give the folder with --data")
    return sources.load_folder(p, channels=in_channels, in_memory=False if name == "imagenet" else in_memory,
                               only=only)


__all__ = ["AUGMENTATIONS", "DATASETS", "DataError", "DatasetSpec", "ImageSet", "Normalization", "Splits",
           "StreamSet", "balanced_split", "channel_stats", "get_dataset_spec", "load_splits"]
