"""The training configuration: one dataclass, its defaults the paper's recipe for the chosen dataset.

Sources, lowest priority first: the dataclass defaults, the dataset's recipe (DATASETS), a TOML/YAML
file (`--config`), the command line. `resolve()` fills every recipe default in; the resolved config
is saved with the run (config.json) and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import AUGMENTATIONS, get_dataset_spec
from ..utils.validate import check_types

ModelArg = int | float | bool | str | list


@dataclass
class TrainConfig:
    # what to train
    model: str = "densenet_bc_100_k12"  # a registered name (`densenet models`)
    model_args: dict[str, ModelArg] = field(default_factory=dict)  # overrides: depth, growth_rate, ...
    dataset: str = "digits"  # cifar10, cifar100, svhn, imagenet, folder, digits
    data: str | None = None  # where the dataset is (a folder, or a .tar.gz for `folder`)
    download: bool = False  # fetch CIFAR/SVHN into `data` (needs a network)
    svhn_extra: bool = True  # train on train + extra, as the paper
    in_memory: bool | None = None  # folder datasets: hold decoded images in memory (None: small images do)
    val_size: int | None = None  # images held out of train for validation (recipe: 5,000 for CIFAR)
    split_seed: int = 0  # seeds the validation split alone: every run of a dataset validates on the same images
    train_subset: int | None = None  # train on the first N images of the shuffled train split (quick runs)
    augment: str | None = None  # cifar (pad 4, crop, flip), flip, none, imagenet, auto (folders: by image size)
    image_size: int = 224  # streamed folders: training crop and evaluation centre crop
    resize: int = 256  # streamed folders: evaluation resizes the shorter side to this, then crops
    # the recipe (None: the paper's value for the dataset)
    epochs: int | None = None
    batch_size: int | None = None  # global batch, split across processes under torchrun
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] | None = None  # lr x lr_gamma at these epochs (< 1: fraction of epochs)
    lr_gamma: float = 0.1
    drop_rate: float | None = None  # None: 0.2 without augmentation, 0 with it (the paper)
    label_smoothing: float = 0.0
    accumulate: int = 1  # split each batch into this many micro-batches (BN then sees the micro-batches)
    # how to run it
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    amp: str = "none"  # none, bf16, fp16
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm across processes (torchrun)
    workers: int = 4  # data-loading processes for streamed folders
    eval_batch_size: int = 256
    out: str | None = None  # run directory: checkpoints, config, metrics
    tensorboard: bool = True  # write TensorBoard logs when tensorboard is installed
    progress: bool = True  # a progress bar per epoch

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"config: {msg}")

        check_types(self, "config")  # YAML/TOML can put a list, a string or NaN anywhere
        get_dataset_spec(self.dataset)
        need(self.augment is None or self.augment in AUGMENTATIONS + ("auto",),
             f"augment must be one of {', '.join(AUGMENTATIONS)} or auto, got {self.augment!r}")
        need(self.amp in ("none", "bf16", "fp16"), f"amp must be none, bf16 or fp16, got {self.amp!r}")
        need(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.drop_rate is None or 0 <= self.drop_rate < 1, f"drop_rate must be in [0, 1), got {self.drop_rate}")
        need(self.val_size is None or self.val_size >= 0, f"val_size must be >= 0, got {self.val_size}")
        need(self.train_subset is None or self.train_subset >= 1, "train_subset must be >= 1")
        need(self.eval_batch_size >= 1 and self.workers >= 0, "eval_batch_size must be >= 1 and workers >= 0")
        need(self.accumulate >= 1, f"accumulate must be >= 1, got {self.accumulate}")
        need(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.image_size >= 1 and self.resize >= 1,
             f"image_size and resize must be >= 1, got {self.image_size} and {self.resize}")
        need(0 <= self.seed < 2 ** 63 and 0 <= self.split_seed < 2 ** 63,
             f"seed and split_seed must be in [0, 2**63), got {self.seed} and {self.split_seed}")
        if self.milestones is not None:
            self.milestones = tuple(float(m) for m in self.milestones)
            need(all(m > 0 for m in self.milestones), f"milestones must be positive, got {self.milestones}")
        need(isinstance(self.model_args, dict), "model_args must be a table of option = value")

    def resolve(self) -> "TrainConfig":
        """A copy with every recipe default of the dataset filled in."""
        spec = get_dataset_spec(self.dataset)
        c = dataclasses.replace(self, model_args=dict(self.model_args))
        c.epochs = c.epochs or spec.epochs
        c.batch_size = c.batch_size or spec.batch_size
        c.val_size = spec.val_size if c.val_size is None else c.val_size
        c.augment = c.augment or spec.augment
        if c.drop_rate is None:  # the paper's rule, unless the dataset's recipe is our own (digits)
            c.drop_rate = spec.drop_rate if spec.drop_rate is not None else 0.2 if c.augment == "none" else 0.0
        ms = c.milestones if c.milestones is not None else spec.milestones
        c.milestones = tuple(float(round(m * c.epochs)) if m < 1 else float(m) for m in ms)
        return c

    def lr_milestones(self) -> list[int]:
        """Epochs (0-indexed, counted after they end) at which the learning rate drops."""
        assert self.epochs is not None and self.milestones is not None, "resolve() the config first"
        return sorted({int(m) for m in self.milestones if m < self.epochs})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones) if self.milestones is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - names)  # YAML keys can be numbers or null
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}; valid settings are "
                             f"{', '.join(sorted(names))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML or YAML file (keys as TrainConfig's fields; a [model_args] table)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # the parsers' own error types (TOML's and JSON's are ValueErrors without the path)
        raise ValueError(f"config file {path} could not be read: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of settings, got {type(data).__name__}")
    return data


def parse_value(text: str) -> ModelArg:
    """A command-line value in its natural type: 40 -> int, 0.5 -> float, true -> bool, 6,12 -> list."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if "," in text:
        return [parse_value(t) for t in text.split(",") if t.strip()]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text
