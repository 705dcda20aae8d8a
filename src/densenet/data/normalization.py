"""The normalisation of in-memory images, chosen by one setting (TrainConfig.normalize), fitted on the
training split only, and stored with the run so that evaluation and resume apply the very same numbers.

    channel   the dataset's own (DatasetSpec.normalize): per-channel mean and std of the training images
              (CIFAR, as fb.resnet.torch and DenseNet), pixels / 255 (SVHN), ImageNet's constants
    pixel     stochastic depth's: per-pixel mean and one scalar std (`PixelNormalization`)
    zca       the Wide ResNets' CIFAR: GCN and ZCA whitening (`zca.ZCA`)

The tensors of "pixel" and "zca" go to RUN/normalization.safetensors (no pickle); the checkpoint's
preprocessing names the file and its SHA-256, and `load_normalization` refuses any other file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .transforms import Normalization
from .zca import ZCA, fit_zca

NORMALIZATIONS = ("channel", "pixel", "zca")
NORMALIZATION_FILE = "normalization.safetensors"
FORMAT = "densenet.normalization/1"


def check_normalize(kind) -> str:
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {kind!r}")
    return kind


@dataclass(frozen=True, eq=False)
class PixelNormalization:
    """Stochastic depth's (x - mean) / std with a mean per pixel (C, H, W) and one std, pixels in [0, 1].

    yueatsprograms/Stochastic_Depth cifar-dataset.lua:47-52 (and svhn-dataset.lua:73-78) at commit
    86b5cddd97841d2586ce0047f476eba0568efc95: `mean = self.data:mean(1)`, `std = self.data:std()`,
    computed on the training split (main.lua:38, then applied to valid and test, :39-40); torch's std
    is the unbiased one over every value of the uncentred training tensor."""

    mean: torch.Tensor  # (C, H, W)
    std: float

    kind = "pixel"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32."""
        if tuple(x.shape[1:]) != tuple(self.mean.shape):
            raise ValueError(f"the per-pixel mean has shape {tuple(self.mean.shape)}, the images "
                             f"{tuple(x.shape[1:])}")
        return (x.float().div_(255.0) - self.mean.to(x.device)) / self.std

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.contiguous(), "std": torch.tensor([self.std], dtype=torch.float64)}

    def metadata(self) -> dict[str, str]:
        return {}


def pixel_stats(images: torch.Tensor, chunk: int = 4096) -> PixelNormalization:
    """The per-pixel mean and the one unbiased std (over all N*C*H*W values) of uint8 images, in [0, 1]."""
    n, count = len(images), images.numel()
    if n < 1 or count < 2:
        raise ValueError(f"per-pixel statistics need images, got shape {tuple(images.shape)}")
    s = torch.zeros(images.shape[1:], dtype=torch.float64)
    for i in range(0, n, chunk):
        s += images[i:i + chunk].double().div_(255.0).sum(0)
    total = s.sum()
    sq = torch.zeros((), dtype=torch.float64)
    for i in range(0, n, chunk):
        sq += (images[i:i + chunk].double().div_(255.0) - total / count).pow(2).sum()
    return PixelNormalization((s / n).float(), float((sq / (count - 1)).sqrt()))


Normalizer = Normalization | PixelNormalization | ZCA


def fit_normalization(kind: str, dataset_default: Normalization | None, train_images: torch.Tensor | None,
                      device="cpu") -> Normalizer:
    """The normalisation `kind` fitted on the training images (uint8 (N, C, H, W), the training split
    only: never validation or test); "channel" is `dataset_default`, the dataset's own."""
    check_normalize(kind)
    if kind == "channel":
        return dataset_default
    if train_images is None:
        raise ValueError(f"normalize {kind} needs the training images in memory (CIFAR, SVHN, small folders), "
                         f"not a streamed folder: use --normalize channel")
    return pixel_stats(train_images) if kind == "pixel" else fit_zca(train_images, device=device)


def describe(norm: Normalizer, channels: int) -> dict:
    """The normalisation's fields of a checkpoint's preprocessing. mean and std stay per-channel numbers
    (what readers of older checkpoints expect): for "pixel" the channel means of the per-pixel mean and
    the one std, for "zca" 0 and 1 (whitened data); `normalize` says how to read them."""
    if isinstance(norm, Normalization):  # as before `normalize` existed: its absence means "channel"
        return {"mean": norm.mean, "std": norm.std}
    if isinstance(norm, PixelNormalization):
        return {"normalize": "pixel", "mean": norm.mean.double().mean((1, 2)).tolist(), "std": [norm.std] * channels}
    return {"normalize": "zca", "mean": [0.0] * channels, "std": [1.0] * channels, "zca_epsilon": norm.epsilon}


def normalization_bytes(norm: PixelNormalization | ZCA) -> bytes:
    """A "pixel" or "zca" normalisation as the bytes of a safetensors file (what the run stores)."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "normalize": norm.kind, **norm.metadata()}
    return save({k: v.detach().cpu().contiguous() for k, v in norm.tensors().items()}, metadata=meta)


def save_normalization(norm: PixelNormalization | ZCA | bytes, path: str | Path) -> str:
    """Write a "pixel" or "zca" normalisation (or its bytes) as safetensors, atomically; its SHA-256 (hex)."""
    from ..utils.atomic import atomic_write

    data = norm if isinstance(norm, bytes) else normalization_bytes(norm)
    with atomic_write(Path(path)) as tmp:
        Path(tmp).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_normalization(path: str | Path, sha256: str | None = None) -> PixelNormalization | ZCA:
    """The normalisation stored at `path` (ValueError, one line, for a missing, altered or foreign file)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: the run's normalisation (fitted on its training images) is "
                         f"stored there")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{path} is not the normalisation this checkpoint was trained with (SHA-256 differs)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a damaged file raises anything from safetensors
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})"[:300]) from None
    kind = meta.get("normalize")
    if meta.get("format") != FORMAT or kind not in ("pixel", "zca"):
        raise ValueError(f"{path} is not a normalisation written by this package")
    try:
        if kind == "pixel":
            return PixelNormalization(tensors["mean"].float(), float(tensors["std"].reshape(-1)[0]))
        mean, matrix = tensors["mean"].float(), tensors["matrix"].float()
        shape = tuple(int(s) for s in meta["shape"].split(","))
        return ZCA(mean, matrix, shape, float(meta["epsilon"]), float(meta["gcn_scale"]))
    except (KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{path} holds an incomplete {kind} normalisation ({type(e).__name__}: {e})"[:300]) from None


def normalization_path(preprocessing: dict, checkpoint_file: str | Path | None) -> Path | None:
    """Where the run's stored normalisation of a "pixel" or "zca" checkpoint is: beside its model file or
    in the run directory above it (RUN/ckpt/000012/model.safetensors -> RUN/normalization.safetensors);
    None for a per-channel checkpoint (its numbers are in the preprocessing itself). ValueError where
    the file is not found."""
    kind = check_normalize(preprocessing.get("normalize", "channel"))
    if kind == "channel":
        return None
    name = preprocessing.get("normalization_file", NORMALIZATION_FILE)
    if Path(name).name != name:
        raise ValueError(f"preprocessing normalization_file must be a file name, got {name!r}")
    where = [] if checkpoint_file is None else [p / name for p in list(Path(checkpoint_file).resolve().parents)[:3]]
    for p in where:
        if p.is_file():
            return p
    raise ValueError(f"the checkpoint was trained on {kind}-normalised images, whose statistics are stored in "
                     f"its run directory ({name}), not found beside {checkpoint_file}")


def find_normalization(preprocessing: dict, checkpoint_file: str | Path | None) -> Normalizer:
    """The normalisation a checkpoint's preprocessing describes: per-channel from its numbers, else the
    run's stored file (`normalization_path`), checked against the SHA-256 the preprocessing names."""
    path = normalization_path(preprocessing, checkpoint_file)
    if path is None:
        return Normalization(tuple(preprocessing["mean"]), tuple(preprocessing["std"]))
    kind = preprocessing["normalize"]
    norm = load_normalization(path, preprocessing.get("normalization_sha256"))
    if norm.kind != kind:
        raise ValueError(f"{path} holds a {norm.kind} normalisation; the checkpoint was trained with {kind}")
    return norm


__all__ = ["FORMAT", "NORMALIZATIONS", "NORMALIZATION_FILE", "Normalizer", "PixelNormalization", "check_normalize",
           "describe", "file_sha256", "find_normalization", "fit_normalization", "load_normalization",
           "normalization_bytes", "normalization_path",
           "pixel_stats", "save_normalization"]
