"""The training configuration: one dataclass, its defaults the recipe of the model and dataset.

Sources, lowest priority first: the recipe (`densenet.recipes`: the model family's paper and authors'
code, e.g. He 2015 for ResNets, Zagoruyko 2016 for WRNs; DenseNet's own for DenseNets, image folders
and the digits), the dataset's protocol (DATASETS), a TOML/YAML file (`--config`), the command line.
`resolve()` fills every recipe default in; the resolved config is saved with the run (config.json)
and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import AUGMENTATIONS, get_dataset_spec
from ..utils.validate import check_types, needing

ModelArg = int | float | bool | str | list


@dataclass
class TrainConfig:
    """One run's settings; `densenet train --help` shows each with its help text from SETTING_HELP."""

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
    # the recipe (None: the value of the model's recipe for the dataset, `densenet.recipes`)
    recipe: str = "auto"  # auto (by model and dataset), dataset (DenseNet's for the dataset), or a recipe name
    epochs: int | None = None
    batch_size: int | None = None  # global batch, split across processes under torchrun
    lr: float | None = None  # 0.1 in every recipe but WRN on SVHN (0.01)
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    milestones: tuple[float, ...] | None = None  # lr x lr_gamma after this many epochs (< 1: fraction of the run)
    milestone_unit: str | None = None  # epochs, or iterations (He 2015/2016 decay at 32k and 48k steps)
    iterations: int | None = None  # run length in steps where the recipe counts them (epochs follow)
    lr_gamma: float | None = None
    warmup_lr: float | None = None  # a constant rate for the first warmup_iterations steps (He 2015: 0.01)
    warmup_iterations: int | None = None  # steps at warmup_lr before the recipe's rate (He 2015 ResNet-110: 400)
    drop_rate: float | None = None  # None: the recipe's (DenseNet: 0.2 without augmentation, 0 with it)
    test_on: str | None = None  # final or best: the weights whose test error is reported (None: the protocol's)
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
        need = needing("config: ")
        check_types(self, "config")  # YAML/TOML can put a list, a string or NaN anywhere
        get_dataset_spec(self.dataset)
        need(self.augment is None or self.augment in AUGMENTATIONS + ("auto",),
             f"augment must be one of {', '.join(AUGMENTATIONS)} or auto, got {self.augment!r}")
        need(self.amp in ("none", "bf16", "fp16"), f"amp must be none, bf16 or fp16, got {self.amp!r}")
        need(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.momentum is None or 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay is None or self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.lr_gamma is None or 0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        need(self.warmup_lr is None or self.warmup_lr > 0, f"warmup_lr must be positive, got {self.warmup_lr}")
        need(self.warmup_iterations is None or self.warmup_iterations >= 0,
             f"warmup_iterations must be >= 0, got {self.warmup_iterations}")
        need(self.iterations is None or self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}")
        need(self.milestone_unit in (None, "epochs", "iterations"),
             f"milestone_unit must be epochs or iterations, got {self.milestone_unit!r}")
        need(self.test_on in (None, "final", "best"), f"test_on must be final or best, got {self.test_on!r}")
        if self.recipe not in ("auto", "dataset"):
            from ..recipes import RECIPES

            need(self.recipe in RECIPES, f"recipe must be auto, dataset or one of {', '.join(RECIPES)}, "
                                         f"got {self.recipe!r}")
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
            # >= 0: a resolved config of a 1-epoch run holds round(0.5 * 1) = 0 (no drop), and must load on resume
            need(all(m >= 0 for m in self.milestones), f"milestones must be >= 0, got {self.milestones}")
        need(isinstance(self.model_args, dict), "model_args must be a table of option = value")

    def get_recipe(self):
        """The Recipe this config follows (None: DenseNet's recipe of the dataset spec)."""
        from ..recipes import get_recipe, recipe_for

        if self.recipe == "dataset":
            return None
        return recipe_for(self.model, self.dataset) if self.recipe == "auto" else get_recipe(self.recipe)

    def known_train_images(self, dataset: str | None = None) -> int | None:
        """Training images of a dataset of known size after the hold-out (None: counted when loaded).
        `dataset`: the named dataset whose images these are, where they are read as a `folder` (the
        CIFAR-10 archive of `densenet reproduce --data cifar10=cifar10.tar.gz`)."""
        n = get_dataset_spec(dataset or self.dataset).train_size(extra=self.svhn_extra)
        if n is None or self.val_size is None:
            return None
        n -= self.val_size
        return min(n, self.train_subset) if self.train_subset else n

    def resolve(self, train_images: int | None = None) -> "TrainConfig":
        """A copy with every recipe default filled in. A recipe that counts iterations needs the size
        of the training set for its epochs: known for CIFAR and SVHN, else `train_images` (`fit` gives
        it once the data is loaded; until then `epochs` stays None)."""
        from ..recipes import has_dropout, resolve_milestones, epochs_for_iterations

        spec = get_dataset_spec(self.dataset)
        rec = self.get_recipe()
        c = dataclasses.replace(self, model_args=dict(self.model_args))
        c.recipe = rec.name if rec is not None else "dataset"
        plain = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, lr_gamma=0.1)  # DenseNet's
        for name, value in plain.items():
            if getattr(c, name) is None:
                setattr(c, name, getattr(rec, name) if rec is not None else value)
        c.batch_size = c.batch_size or (rec.batch_size if rec is not None else spec.batch_size)
        c.augment = c.augment or (rec.augment if rec is not None and rec.augment else spec.augment)
        if c.val_size is None:
            c.val_size = rec.val_size if rec is not None and rec.val_size is not None else spec.val_size
        c.test_on = c.test_on or (rec.test_on if rec is not None and rec.test_on else spec.test_on)
        if c.warmup_iterations is None:
            c.warmup_iterations = rec.warmup_iterations if rec is not None else 0
            c.warmup_lr = c.warmup_lr if c.warmup_lr is not None else (rec.warmup_lr if rec is not None else None)
        if c.warmup_iterations and c.warmup_lr is None:
            raise ValueError("config: warmup_iterations needs warmup_lr (the rate of the warm-up)")
        if c.drop_rate is None:
            if rec is not None and rec.drop_rate is not None:
                c.drop_rate = rec.drop_rate  # WRN: its paper's rate for the dataset
            elif rec is not None and not has_dropout(c.model):
                c.drop_rate = 0.0  # ResNets, ResNeXts: no dropout in their papers
            else:
                # DenseNet: dropout without augmentation, unless the dataset's recipe is our own (digits)
                c.drop_rate = spec.drop_rate if spec.drop_rate is not None else 0.2 if c.augment == "none" else 0.0
        if c.milestone_unit == "iterations" and c.milestones is not None:  # decays at exact iterations
            if c.epochs is None:
                if c.iterations is None:
                    raise ValueError("config: milestone_unit iterations needs iterations (the run's length in steps)")
                n = train_images if train_images is not None else c.known_train_images()
                c.epochs = epochs_for_iterations(c.iterations, n, c.batch_size) if n is not None else None
            return c
        by_steps = rec is not None and rec.iterations is not None and self.epochs is None
        if by_steps and c.milestones is None:  # He 2015/2016: decays at exact iterations
            c.iterations = c.iterations or rec.iterations
            c.milestones = tuple(float(m) for m in rec.milestones)
            c.milestone_unit = "iterations"
            n = train_images if train_images is not None else c.known_train_images()
            c.epochs = epochs_for_iterations(c.iterations, n, c.batch_size) if n is not None else None
            return c
        if by_steps:  # own milestones in epochs, the length still the recipe's iterations
            n = train_images if train_images is not None else c.known_train_images()
            if n is None:
                c.iterations = c.iterations or rec.iterations
                return c
            c.epochs = epochs_for_iterations(c.iterations or rec.iterations, n, c.batch_size)
        c.iterations = None
        c.milestone_unit = "epochs"
        c.epochs = c.epochs or (rec.epochs if rec is not None and rec.epochs else spec.epochs)
        if c.milestones is not None:
            c.milestones = resolve_milestones(c.milestones, c.epochs)
        elif rec is not None and rec.iterations:  # the run's length given: the decays at the same fractions
            c.milestones = resolve_milestones(tuple(m / rec.iterations for m in rec.milestones), c.epochs)
        else:
            ms = rec.milestones if rec is not None else spec.milestones
            c.milestones = resolve_milestones(ms, c.epochs, rec.epochs if rec is not None else None)
        return c

    def lr_milestones(self) -> list[int]:
        """Epochs done (or iterations, where milestone_unit is iterations) before each decay."""
        assert self.milestones is not None and self.milestone_unit is not None, "resolve() the config first"
        if self.milestone_unit == "iterations":
            return sorted(int(m) for m in self.milestones)
        assert self.epochs is not None, "resolve() the config first"
        return sorted(int(m) for m in self.milestones if m < self.epochs)

    def learning_rate(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        """The learning rate of optimizer step `step` (0-indexed) of 0-indexed `epoch`."""
        from ..recipes import learning_rate

        return learning_rate(self.lr, self.lr_gamma, self.lr_milestones(), epoch, step, steps_per_epoch,
                             iterations=self.milestone_unit == "iterations", warmup_lr=self.warmup_lr,
                             warmup_iterations=self.warmup_iterations or 0)

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


SETTING_HELP: dict[str, str] = {  # `densenet train --help` (the default is appended where not said)
    "model": "a registered name (`densenet models`)",
    "model_args": "overrides of the model's options: depth, growth_rate, ... (default: none: the registered network "
        "as it is)",
    "dataset": "cifar10, cifar100, svhn, imagenet, folder, digits",
    "data": "where the dataset is (a folder, or a .tar.gz for `folder`) (default: none; every dataset but digits "
        "needs one)",
    "download": "fetch CIFAR/SVHN into `data` (needs a network)",
    "svhn_extra": "train on train + extra, as the paper",
    "in_memory": "folder datasets: hold decoded images in memory (default: small images are held)",
    "val_size": "images held out of train for validation (default: the recipe's: 5,000 for CIFAR, 6,000 for SVHN)",
    "split_seed": "seeds the validation split alone: every run of a dataset validates on the same images",
    "train_subset": "train on the first N images of the shuffled train split (quick runs) (default: all)",
    "augment": "cifar (pad 4, crop, flip), flip, none, imagenet, auto (folders: by image size) (default: the "
        "dataset's recipe)",
    "image_size": "streamed folders: training crop and evaluation centre crop",
    "resize": "streamed folders: evaluation resizes the shorter side to this, then crops",
    "recipe": "auto (by model and dataset), dataset (DenseNet's for the dataset), or a recipe name",
    "epochs": "epochs to train (default: the recipe's: 300 CIFAR, 40 SVHN, 90 ImageNet, 30 digits)",
    "batch_size": "global batch, split across processes under torchrun (default: the dataset's recipe)",
    "lr": "initial learning rate, multiplied by --lr-gamma at --milestones (default: the recipe's: 0.1; WRN on SVHN "
        "0.01)",
    "momentum": "SGD momentum (default: the recipe's: 0.9)",
    "nesterov": "Nesterov momentum (default: the recipe's: on for DenseNet as the authors' code, off for He 2015's "
        "ResNets)",
    "weight_decay": "L2 penalty on every parameter (default: the recipe's: 1e-4; WRN and ResNeXt 5e-4)",
    "milestones": "lr x lr_gamma after this many epochs (< 1: fraction of the run) (default: the dataset's recipe)",
    "milestone_unit": "epochs, or iterations (He 2015/2016 decay at 32k and 48k steps) (default: the recipe's)",
    "iterations": "run length in steps where the recipe counts them (epochs follow) (default: the recipe's)",
    "lr_gamma": "factor of the learning rate at each milestone (default: the recipe's: 0.1; WRN on CIFAR 0.2)",
    "warmup_lr": "a constant rate for the first warmup_iterations steps (default: the recipe's; He 2015: 0.01)",
    "warmup_iterations": "steps at warmup_lr before the recipe's rate (default: the recipe's: 0; He 2015 "
        "ResNet-110: 400)",
    "drop_rate": "dropout after each convolution (default: the paper's rule, 0.2 without augmentation and 0 with "
        "it; digits: 0)",
    "test_on": "final or best: the weights whose test error is reported (default: the protocol's)",
    "label_smoothing": "label smoothing of the cross-entropy (0: none, as the paper)",
    "accumulate": "split each batch into this many micro-batches (BN then sees the micro-batches)",
    "seed": "seeds initialisation, data order, augmentation and dropout: a seed reproduces a run",
    "device": "auto, cpu, cuda, cuda:1, mps",
    "amp": "none, bf16, fp16",
    "channels_last": "the model and its batches in channels-last memory format",
    "compile": "torch.compile the model",
    "sync_bn": "SyncBatchNorm across processes (torchrun)",
    "workers": "data-loading processes for streamed folders",
    "eval_batch_size": "batch of validation and test",
    "out": "run directory: checkpoints, config, metrics (default: none: nothing is saved)",
    "tensorboard": "write TensorBoard logs when tensorboard is installed",
    "progress": "a progress bar per epoch",
}


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


def settings_for_run(given: dict[str, Any], *, config_file: str | Path | None = None,
                     resume: str | Path | None = None) -> TrainConfig:
    """The TrainConfig of `densenet train`: the resumed run's saved settings, then the config file's, then
    `given` (the command-line options), each winning over the ones before; model_args tables merge the
    same way, key by key. A resume refuses changed settings in the engine (train/resume.py)."""
    from .checkpoint import RunDir

    settings: dict[str, Any] = {}
    saved = RunDir(resume).read_config() if resume else {}
    settings.update(saved)
    from_file = read_config_file(config_file) if config_file else {}
    settings.update(from_file)
    if isinstance(saved.get("model_args"), dict) and isinstance(from_file.get("model_args"), dict):
        settings["model_args"] = {**saved["model_args"], **from_file["model_args"]}  # a file adds to the run's
    given = dict(given)
    if "model_args" in given and "model_args" in settings:
        if not isinstance(settings["model_args"], dict):
            raise ValueError(f"model_args in {config_file or resume} must be a table of option = value, "
                             f"got {settings['model_args']!r}"[:300])
        given["model_args"] = {**settings["model_args"], **given["model_args"]}
    settings.update(given)
    if resume:
        settings["out"] = resume
    return TrainConfig.from_dict(settings)


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
