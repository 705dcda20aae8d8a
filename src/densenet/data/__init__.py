"""Datasets by name (the facts of each: its normalisation, size and where it is read from), in-memory
batches and streamed folders. How a network trains on a dataset is its recipe (`densenet.recipes`)."""
from __future__ import annotations

from dataclasses import dataclass

from .sources import DataError, ImageSet, Splits, StreamSet, balanced_split
from .transforms import AUGMENTATIONS, Normalization, channel_stats


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is; how to train on it (schedule, augmentation, hold-out, tested weights) is its
    recipe, `densenet.recipes.DATASET_RECIPES` and the families' recipes."""

    name: str
    normalize: str  # "stats": per-channel mean/std of the training set; "div255"; "imagenet"
    needs_path: bool = True
    description: str = ""
    train_images: int | None = None  # the official training set's size (None: counted when loaded)
    extra_images: int = 0  # SVHN's extra set, trained on beside train as the paper (--svhn-extra)

    def train_size(self, extra: bool = True) -> int | None:
        """Images of the official training split, before any hold-out (None: known once loaded)."""
        return None if self.train_images is None else self.train_images + (self.extra_images if extra else 0)


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("cifar10", "stats", train_images=50_000,
                description="CIFAR-10, official python format (torchvision); C10+ by default, --augment none for C10"),
    DatasetSpec("cifar100", "stats", train_images=50_000,
                description="CIFAR-100, official python format; C100+ by default"),
    DatasetSpec("svhn", "div255", train_images=73_257, extra_images=531_131,
                description="SVHN train + extra (604,388 images), official .mat files; no augmentation; "
                            "the model of lowest validation error is tested"),
    DatasetSpec("imagenet", "imagenet", description="ImageNet-layout folder (train/, val/), streamed; 224 crops"),
    DatasetSpec("folder", "stats",
                description="any folder or .tar.gz with train/ (and val/ or test/) of class sub-folders"),
    DatasetSpec("digits", "stats", needs_path=False,
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
