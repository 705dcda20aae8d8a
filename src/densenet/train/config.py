"""The training configuration: one dataclass, its defaults the recipe of the model and dataset.

Sources, lowest priority first: the recipe (`densenet.recipes.recipe_for`: the model family's paper and
authors' code, e.g. He 2015 for ResNets, Zagoruyko 2016 for WRNs, DenseNet's for DenseNets; what a paper
leaves open, and every setting of a family without a recipe for the dataset, from the dataset's own
recipe), a TOML/YAML file (`--config`), the command line. `resolve()` fills every recipe default in;
the resolved config is saved with the run (config.json) and in every checkpoint. Each setting's help
text (`densenet train --help`) is its field's metadata, SETTING_HELP; add_setting_args makes each field
an option of `densenet train` (its help with its default: help_with_default), and settings_from_options
reads the options given back as settings.
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


def setting(help: str, default: Any = None, **kw: Any) -> Any:
    """A TrainConfig field with its help text (`densenet train --help`; the default is appended where the
    text does not say it)."""
    if "default_factory" in kw:
        return field(metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """One run's settings; `densenet train --help` shows each with its help text (SETTING_HELP)."""

    # what to train
    model: str = setting("a registered name (`densenet models`)", "densenet_bc_100_k12")
    model_args: dict[str, ModelArg] = setting(
        "overrides of the model's options: depth, growth_rate, ... (default: none: the registered network as it "
        "is)", default_factory=dict)
    dataset: str = setting("cifar10, cifar100, svhn, imagenet, folder, digits", "digits")
    data: str | None = setting("where the dataset is (a folder, or a .tar.gz for `folder`) (default: none; every "
                               "dataset but digits needs one)")
    download: bool = setting("fetch CIFAR/SVHN into `data` (needs a network)", False)
    svhn_extra: bool = setting("train on train + extra, as the paper", True)
    in_memory: bool | None = setting(
        "folder datasets: hold the decoded images in memory (default: an archive's, and a folder's of images up "
        "to 96x96; larger ones are streamed; imagenet always streams)")
    val_size: int | None = setting(
        "images held out of train for validation (default: the recipe's: 5,000 for CIFAR and folders, 6,000 for "
        "SVHN, 300 for the digits, 0 for ImageNet and for the papers that train on all of train)")
    split_seed: int = setting("seeds the validation split alone: every run of a dataset validates on the same "
                              "images", 0)
    train_subset: int | None = setting("train on the first N images of the shuffled train split (quick runs) "
                                       "(default: all)")
    augment: str | None = setting("cifar (pad 4, crop, flip), cifar-reflect (WRN's reflection padding), flip, "
                                  "none, imagenet, auto (folders: by image size) (default: the recipe's)")
    normalize: str | None = setting(
        "channel (the dataset's own: per-channel mean and std of the training images; SVHN pixels / 255; "
        "ImageNet's constants), pixel (per-pixel mean, one std: stochastic depth's), zca (ZCA whitening: Wide "
        "ResNets' CIFAR) (default: the recipe's, else channel)")
    image_size: int = setting("streamed folders: training crop and evaluation centre crop", 224)
    resize: int = setting("streamed folders: evaluation resizes the shorter side to this, then crops", 256)
    # the recipe: a setting left unset (None) takes the recipe's value (`densenet.recipes.recipe_for`)
    recipe: str = setting("auto (the model's paper's recipe for the dataset, else the dataset's own), dataset "
                          "(the dataset's own: DenseNet's schedule and the dataset's protocol), or a recipe name",
                          "auto")
    epochs: int | None = setting("epochs to train (default: the recipe's: DenseNet's 300 on CIFAR, 40 SVHN, 90 "
                                 "ImageNet, 30 digits)")
    batch_size: int | None = setting("global batch, split across processes under torchrun (default: the "
                                     "recipe's)")
    lr: float | None = setting("the learning rate after any warm-up, multiplied by lr_gamma at each milestone "
                               "(default: the recipe's: 0.1; WRN on SVHN 0.01)")
    momentum: float | None = setting("SGD momentum (default: the recipe's: 0.9)")
    nesterov: bool | None = setting("Nesterov momentum (default: the recipe's: on for DenseNet as the authors' "
                                    "code, off for He 2015/2016's CIFAR ResNets)")
    weight_decay: float | None = setting("L2 penalty on every parameter (default: the recipe's: 1e-4; WRN, and "
                                         "ResNeXt on CIFAR: 5e-4)")
    milestones: tuple[float, ...] | None = setting("lr x lr_gamma after this many epochs (< 1: fraction of the "
                                                   "run) (default: the recipe's)")
    milestone_unit: str | None = setting("epochs, or iterations (He 2015/2016 decay at 32k and 48k steps) "
                                         "(default: the recipe's)")
    iterations: int | None = setting("run length in steps where the recipe counts them (epochs follow) "
                                     "(default: the recipe's)")
    lr_gamma: float | None = setting("factor of the learning rate at each milestone (default: the recipe's: "
                                     "0.1; WRN on CIFAR 0.2)")
    warmup_lr: float | None = setting("a constant rate for the first warmup_iterations steps (default: the "
                                      "recipe's, unless warmup_iterations is given; He 2015: 0.01)")
    warmup_iterations: int | None = setting("steps at warmup_lr before the recipe's rate (default: the recipe's: "
                                            "0; He 2015's ResNet-110/1202 and He 2016: 400)")
    drop_rate: float | None = setting(
        "dropout rate: DenseNet's after every convolution but the first, WRN's between a block's convolutions "
        "(default: the recipe's: WRN 0 on CIFAR, 0.4 on SVHN; the digits 0; 0 for a network without a dropout "
        "option under its paper's recipe; else DenseNet's rule, 0.2 without augmentation and 0 with it)")
    test_on: str | None = setting("final or best: the weights whose test error is reported (default: the "
                                  "recipe's: best on SVHN, WRN's aside, and for stochastic depth; else final)")
    val_every_iterations: int | None = setting(
        "validate every N optimizer steps (counted over the run), keeping the best; 0: once per epoch (default: "
        "the recipe's: 200 for stochastic depth on SVHN, as its main.lua; else 0)")
    reset_momentum_at_decay: bool | None = setting("clear SGD's momentum buffers at each decay of the rate (default: "
                                                   "the recipe's: on for Wide ResNets, as their train.lua)")
    drop_last: bool | None = setting("drop each epoch's last partial batch (default: the recipe's: on for Wide "
                                     "ResNets, as their train.lua's 'skip-last')")
    label_smoothing: float = setting("label smoothing of the cross-entropy (0: none, as the paper)", 0.0)
    accumulate: int = setting("split each batch into this many micro-batches (BN then sees the micro-batches)", 1)
    # how to run it
    seed: int = setting("seeds initialisation, data order, augmentation and dropout: a seed reproduces a run", 0)
    device: str = setting("auto, cpu, cuda, cuda:1, mps", "auto")
    amp: str = setting("none, bf16, fp16", "none")
    channels_last: bool = setting("the model and its batches in channels-last memory format", False)
    compile: bool = setting("torch.compile the model", False)
    sync_bn: bool = setting("SyncBatchNorm across processes (torchrun)", False)
    workers: int = setting("data-loading processes for streamed folders", 4)
    eval_batch_size: int = setting("batch of validation and test", 256)
    out: str | None = setting("run directory: checkpoints, config, metrics (default: none: nothing is saved)")
    tensorboard: bool = setting("write TensorBoard logs when tensorboard is installed", True)
    progress: bool = setting("a progress bar per epoch", True)

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
        need(self.normalize in (None, "channel", "pixel", "zca"),
             f"normalize must be channel, pixel or zca, got {self.normalize!r}")
        need(self.val_every_iterations is None or self.val_every_iterations >= 0,
             f"val_every_iterations must be >= 0, got {self.val_every_iterations}")
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
        """The Recipe this config follows, complete (`recipes.recipe_for`)."""
        from ..recipes import recipe_for

        return recipe_for(self.model, self.dataset, self.recipe)

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
        """A copy with every recipe default filled in: each setting left None takes the value of the recipe
        (`recipes.recipe_for`), a warm-up given whole (its rate with its length); the schedule by the recipe's
        rule for the run's length. A recipe that counts iterations needs the size of the training set for
        its epochs: known for CIFAR and SVHN, else `train_images` (`fit` gives it once the data is loaded;
        until then `epochs` stays None)."""
        from ..recipes import epochs_for_iterations, resolve_milestones

        rec = self.get_recipe()
        given = {k for k in RECIPE_SETTINGS if getattr(self, k) is not None}
        if "warmup_iterations" in given:
            given.add("warmup_lr")
        c = dataclasses.replace(self, model_args=dict(self.model_args), recipe=rec.name,
                                **{k: getattr(rec, k) for k in RECIPE_SETTINGS if k not in given})
        if c.warmup_iterations and c.warmup_lr is None:
            raise ValueError("config: warmup_iterations needs warmup_lr (the rate of the warm-up)")
        if c.normalize is None:  # a recipe without its own normalisation: the dataset's
            c.normalize = "channel"
        if c.drop_rate is None:  # DenseNet's rule: dropout without augmentation
            c.drop_rate = 0.2 if c.augment == "none" else 0.0
        if c.milestone_unit == "iterations" and c.milestones is not None:  # decays at exact iterations
            if c.epochs is None:
                if c.iterations is None:
                    raise ValueError("config: milestone_unit iterations needs iterations (the run's length in steps)")
                n = train_images if train_images is not None else c.known_train_images()
                c.epochs = epochs_for_iterations(c.iterations, n, c.batch_size) if n is not None else None
            return c
        by_steps = rec.iterations is not None and self.epochs is None
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
        c.epochs = c.epochs or rec.epochs
        if c.milestones is not None:
            c.milestones = resolve_milestones(c.milestones, c.epochs)
        elif rec.iterations:  # the run's length given: the decays at the same fractions
            c.milestones = resolve_milestones(tuple(m / rec.iterations for m in rec.milestones), c.epochs)
        else:
            c.milestones = resolve_milestones(rec.milestones, c.epochs, rec.epochs if rec.scale_milestones else None)
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


# the settings a Recipe gives where they are not set (the schedule's, epochs to iterations, resolve() plans)
RECIPE_SETTINGS = ("batch_size", "lr", "momentum", "nesterov", "weight_decay", "lr_gamma", "warmup_iterations",
                   "warmup_lr", "augment", "val_size", "test_on", "drop_rate", "normalize", "val_every_iterations",
                   "reset_momentum_at_decay", "drop_last")
# `densenet train --help`: each field's help text, from its metadata (the default is appended where not said)
SETTING_HELP: dict[str, str] = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


def help_with_default(f: dataclasses.Field) -> str:
    """A TrainConfig field's help text (SETTING_HELP) with the field's default, as argparse's
    %(default)s would show it (the options themselves stay unset); a None default is explained in
    the text itself."""
    h = SETTING_HELP[f.name]
    if f.default is dataclasses.MISSING or f.default is None or "default" in h:
        return h
    default = {True: "on", False: "off"}.get(f.default, f.default) if isinstance(f.default, bool) else f.default
    return f"{h} (default: {default})"


def add_setting_args(p) -> None:
    """The options of `densenet train` that set TrainConfig's fields (all but model_args), each with its
    help text and default (help_with_default), each unset unless given (argparse.SUPPRESS): the config
    file or the resumed run decides."""
    import argparse
    import typing

    from ..data import DATASETS

    S = argparse.SUPPRESS
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model_args":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        h = help_with_default(f)
        if f.name == "dataset":
            h += " | " + "; ".join(f"{n}: {d.description}" for n, d in DATASETS.items())
        if kind in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=S, help=h)
        elif f.name == "milestones":
            p.add_argument(flag, default=S, metavar="E1,E2", help=h,
                           type=lambda t: tuple(float(v) for v in t.split(",") if v.strip()))
        else:
            base = next((t for t in (int, float, str) if t == kind or t in typing.get_args(kind)), str)
            p.add_argument(flag, type=base, default=S, help=h, metavar=f.name.upper())


def settings_from_options(options: dict[str, Any]) -> dict[str, Any]:
    """The settings `densenet train`'s options give (for settings_for_run): each TrainConfig field given
    as it is; the model options (keys m_NAME: --depth, --growth-rate, ...) and "model_arg" (KEY=VALUE
    texts, --model-arg, each value read by parse_value) gathered in model_args."""
    given = {k: v for k, v in options.items() if k != "model_arg" and not k.startswith("m_")}
    model_args = {k[2:]: v for k, v in options.items() if k.startswith("m_")}
    for item in options.get("model_arg") or []:
        if "=" not in item:
            raise ValueError(f"--model-arg takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        model_args[k.strip()] = parse_value(v)
    if model_args:
        given["model_args"] = model_args
    return given


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
