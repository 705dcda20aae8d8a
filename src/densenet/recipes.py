"""Training recipes as data: for every registered family, the recipe its own paper ran, checked against
its authors' code (cited beside each), and for every dataset its own (DenseNet's, with the dataset's
protocol: augmentation, hold-out, tested weights). `recipe_for` is the one resolution of a recipe:
`densenet train` (TrainConfig.resolve) and `densenet reproduce` (grid/reproduce.cell_config) fill every
setting not given from what it returns.

Schedules are written as `milestones`: the number of epochs done before each learning-rate decay
(PyTorch's MultiStepLR convention), so `(149, 224)` trains epoch 150 (1-indexed) at the decayed rate, as
Lua's `epoch >= 0.5 * nEpochs` does. Values below 1 are fractions of the run, turned into epochs by the
same Lua rule (`first_decayed_epoch = ceil(f * epochs)`); absolute milestones scale with the run when
`--epochs` changes its length. Recipes that count iterations (He 2015/2016) decay at exact iterations.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction


@dataclass(frozen=True)
class Recipe:
    """Everything a paper fixes about training one network on one dataset."""

    name: str
    source: str  # the paper and the authors' code it was checked against
    epochs: int | None  # None: follows from `iterations` and the training-set size
    batch_size: int
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    milestones: tuple[float, ...]  # epochs done before each decay (iterations where `iterations` is set)
    lr_gamma: float = 0.1
    # drop_rate, augment, val_size, test_on: None in a paper's recipe leaves them to the dataset's (recipe_for)
    drop_rate: float | None = None  # None: DenseNet's rule (0.2 without augmentation), or 0 without a dropout option
    iterations: int | None = None  # the schedule counts optimizer steps: stop after about this many
    warmup_lr: float | None = None  # a constant rate for the first `warmup_iterations` steps
    warmup_iterations: int = 0
    augment: str | None = None  # None: the dataset's standard augmentation
    val_size: int | None = None  # images held out of train for validation; None: the dataset's protocol
    test_on: str | None = None  # "final" or "best" (validation); None: the dataset's protocol
    notes: tuple[str, ...] = field(default_factory=tuple)
    # False: absolute milestones stay at their epochs when `--epochs` changes the run's length (the datasets'
    # own recipes, as the DatasetSpec schedules they replaced did; the papers' recipes scale them)
    scale_milestones: bool = True

    def schedule_text(self) -> str:
        """The schedule in words, e.g. "lr 0.1, x0.1 after epochs 149, 224"."""
        unit = "iterations" if self.iterations else "epochs"
        ms = ", ".join(_num(m) for m in self.milestones)
        text = f"lr {self.lr:g}, x{self.lr_gamma:g} after {ms} {unit}"
        if self.warmup_iterations:
            text = f"{self.warmup_lr:g} for {self.warmup_iterations} iterations, then " + text
        return text


def _num(m: float) -> str:
    if m < 1:
        return f"{m:g} of the"
    return f"{int(m):,}" if float(m).is_integer() else f"{m:g}"


# --- DenseNet (Huang et al. 2017) ----------------------------------------------------------------------
# liuzhuang13/DenseNet: train.lua Trainer:__init (SGD, nesterov = true, dampening = 0.0) and
# Trainer:learningRate (cifar10/cifar100: `decay = epoch >= 0.75*nEpochs and 2 or epoch >= 0.5*nEpochs
# and 1 or 0`; imagenet: `math.floor((epoch - 1) / 30)`); opts.lua: LR 0.1, momentum 0.9, weightDecay 1e-4;
# README: batch 64, 300 epochs on CIFAR, dropRate 0.2 without augmentation. The paper: SVHN 40 epochs.
_DENSENET = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, lr_gamma=0.1)
DENSENET_CIFAR = Recipe("densenet-cifar", "Huang 2017 Sec. 4.2; liuzhuang13/DenseNet train.lua (learningRate)",
                        300, 64, milestones=(0.5, 0.75), **_DENSENET)
DENSENET_SVHN = Recipe("densenet-svhn", "Huang 2017 Sec. 4.2 (40 epochs; lr / 10 at 50% and 75%)",
                       40, 64, milestones=(0.5, 0.75), **_DENSENET)
DENSENET_IMAGENET = Recipe("densenet-imagenet", "Huang 2017 Sec. 4.2; liuzhuang13/DenseNet train.lua "
                           "(imagenet: floor((epoch - 1) / 30)), datasets/imagenet.lua (augmentation)",
                           90, 256, milestones=(30, 60), **_DENSENET)

# --- ResNet (He et al. 2015), CIFAR ---------------------------------------------------------------------
# He 2015 Sec. 4.2 (Caffe, no training code released): batch 128, momentum 0.9 (plain SGD momentum),
# weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k (chosen on a 45k/5k
# split, then trained on all 50k); ResNet-110 (and -1202) warm up at 0.01 "until the training error is
# below 80% (about 400 iterations)". fb.resnet.torch (train.lua learningRate: cifar10 `epoch >= 122 and 2
# or epoch >= 81 and 1`; opts.lua: 164 epochs) is the same schedule in epochs: 164 x 391 steps ~ 64k.
_HE2015 = dict(batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
               milestones=(32_000, 48_000), iterations=64_000, val_size=0, test_on="final")
RESNET_CIFAR = Recipe("resnet-he2015-cifar", "He 2015 Sec. 4.2 (CIFAR-10); schedule as fb.resnet.torch "
                      "train.lua (learningRate, cifar10: epochs 81 and 122 of 164)", None, **_HE2015)
RESNET_CIFAR_WARMUP = Recipe("resnet-he2015-cifar-warmup", "He 2015 Sec. 4.2: ResNet-110 and -1202 "
                             "warm up at 0.01 for about 400 iterations", None, warmup_lr=0.01,
                             warmup_iterations=400, **_HE2015)

# --- ResNet on ImageNet (Figure 3's ResNets are fb.resnet.torch's) ---------------------------------------
# fb.resnet.torch: train.lua Trainer:__init (nesterov = true, dampening 0) and learningRate (imagenet:
# floor((epoch - 1) / 30)); opts.lua: 90 epochs, LR 0.1, momentum 0.9, weightDecay 1e-4; TRAINING.md:
# batch 256; datasets/imagenet.lua: the augmentation DenseNet copies.
RESNET_IMAGENET = Recipe("resnet-imagenet-fb", "fb.resnet.torch train.lua (learningRate), opts.lua, "
                         "datasets/imagenet.lua", 90, 256, lr=0.1, momentum=0.9, nesterov=True,
                         weight_decay=1e-4, milestones=(30, 60))

# --- Pre-activation ResNet (He et al. 2016) --------------------------------------------------------------
# He 2016 (Caffe, as He 2015): batch 128, lr 0.1 / 10 at 32k and 48k iterations, 64k iterations, weight
# decay 1e-4, momentum 0.9, a 0.01 warm-up for the first 400 iterations. ResNet-1001: the published
# 4.62% comes from KaimingHe/resnet-1k-layers (README: "mini-batch size 64 ... 4.62"; its command:
# `-batchSize 64 -nEpochs 200` on fb.resnet.torch, whose train.lua decays at epochs 81 and 122 with
# Nesterov momentum); the 0.01 warm-up for 400 iterations is the paper's (the Torch code has none).
PREACT_CIFAR = Recipe("preact-he2016-cifar", "He 2016 Sec. 4 and appendix (as He 2015, 0.01 warm-up "
                      "for 400 iterations)", None, warmup_lr=0.01, warmup_iterations=400, **_HE2015)
PREACT_1001 = Recipe("preact-resnet1001", "KaimingHe/resnet-1k-layers README (batch 64, 200 epochs, "
                     "4.62%) on fb.resnet.torch train.lua (learningRate, cifar10: epochs 81 and 122); "
                     "warm-up from He 2016", 200, 64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                     milestones=(80, 121), warmup_lr=0.01, warmup_iterations=400, val_size=0, test_on="final")

# --- Stochastic depth (Huang et al. 2016) ----------------------------------------------------------------
# yueatsprograms/Stochastic_Depth main.lua: maxEpochs 500, batchSize 128, sgdState {weightDecay 1e-4,
# momentum 0.9, dampening 0, nesterov true}, lr 0.1 while epoch < 0.5 * maxEpochs, 0.01 while < 0.75,
# then 0.001 (so epochs 250 and 375, 1-indexed, are decayed: milestones 249 and 374); cifar-dataset.lua:
# 45,000 train / 5,000 validation; README: "test error (selected by best validation error)".
# SVHN (the paper, Sec. 4; svhn-dataset.lua: 400 per class from train and 200 from extra held out):
# 50 epochs, lr 0.1 divided by 10 after epochs 30 and 35.
_SD = dict(batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, test_on="best")
STOCHDEPTH_CIFAR = Recipe("stochdepth-cifar", "Huang 2016; yueatsprograms/Stochastic_Depth main.lua "
                          "(sgdState, learning rate schedule), cifar-dataset.lua (45k/5k)", 500,
                          milestones=(0.5, 0.75), val_size=5000, **_SD)
STOCHDEPTH_SVHN = Recipe("stochdepth-svhn", "Huang 2016 Sec. 4 (SVHN: 50 epochs, decays after 30 and 35); "
                         "yueatsprograms/Stochastic_Depth svhn-dataset.lua (6,000 held out)", 50,
                         milestones=(30, 35), val_size=6000, **_SD)

# --- Wide ResNet (Zagoruyko and Komodakis 2016) ----------------------------------------------------------
# szagoruyko/wide-residual-networks train.lua: batchSize 128, weightDecay 0.0005, momentum 0.9, dampening 0;
# `updateLR` multiplies by learningRateDecayRatio at the start of each epoch in epoch_step (so epoch 60,
# 1-indexed, already runs at 0.02: milestones 59, 119, 159). scripts/train_cifar.sh: lr 0.1, epoch_step
# {60,120,160}, max_epoch 200, ratio 0.2, nesterov true, randomcrop_type reflection.
# scripts/train_svhn.sh: lr 0.01, epoch_step {80,120}, max_epoch 160, ratio 0.1, nesterov, dropout 0.4,
# no crops or flips. DenseNet's Table 2 cites WRN-16-8 and WRN-28-10 without dropout (the WRN paper's
# dropout 0.3 rows are separate) and WRN-16-4 with dropout on SVHN.
_WRN = dict(batch_size=128, momentum=0.9, nesterov=True, weight_decay=5e-4, val_size=0, test_on="final")
WRN_CIFAR = Recipe("wrn-cifar", "szagoruyko/wide-residual-networks train.lua (opt, updateLR), "
                   "scripts/train_cifar.sh", 200, lr=0.1, milestones=(59, 119, 159), lr_gamma=0.2,
                   drop_rate=0.0, augment="cifar-reflect",
                   notes=("dropout 0.3 between the convolutions for the WRN paper's '-dropout' rows",), **_WRN)
WRN_SVHN = Recipe("wrn-svhn", "szagoruyko/wide-residual-networks train.lua, scripts/train_svhn.sh", 160,
                  lr=0.01, milestones=(79, 119), lr_gamma=0.1, drop_rate=0.4, augment="none", **_WRN)

# --- ResNeXt (Xie et al. 2017) ---------------------------------------------------------------------------
# facebookresearch/ResNeXt: README (CIFAR: `-depth 29 ... -weightDecay 5e-4 -batchSize 128`), opts.lua
# (cifar: nEpochs 300; LR 0.1, momentum 0.9), train.lua Trainer:__init (nesterov true) and learningRate
# (cifar: `decay = (epoch/nEpochs) > 0.74 and 2 or (epoch/nEpochs) > 0.49 and 1`: epochs 148 and 223,
# 1-indexed, are decayed: milestones 147 and 222); imagenet: 100 epochs, floor((epoch - 1) / 30).
RESNEXT_CIFAR = Recipe("resnext-cifar", "facebookresearch/ResNeXt README, opts.lua, train.lua (learningRate)",
                       300, 128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, milestones=(147, 222),
                       val_size=0, test_on="final")
RESNEXT_IMAGENET = Recipe("resnext-imagenet", "facebookresearch/ResNeXt README, opts.lua (100 epochs), "
                          "train.lua (learningRate)", 100, 256, lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=1e-4, milestones=(30, 60, 90))

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    DENSENET_CIFAR, DENSENET_SVHN, DENSENET_IMAGENET, RESNET_CIFAR, RESNET_CIFAR_WARMUP, RESNET_IMAGENET,
    PREACT_CIFAR, PREACT_1001, STOCHDEPTH_CIFAR, STOCHDEPTH_SVHN, WRN_CIFAR, WRN_SVHN, RESNEXT_CIFAR,
    RESNEXT_IMAGENET]}

# --- Each dataset's own recipe (`recipe = "dataset"`) ------------------------------------------------------
# DenseNet's schedule with the dataset's protocol, complete: what a network of a family without a recipe for
# the dataset trains with, and where a paper's recipe leaves the protocol (augmentation, hold-out, tested
# weights) to the dataset. Named "dataset": the setting that selects it.
_DATASET = dict(name="dataset", scale_milestones=False)
DATASET_CIFAR = dataclasses.replace(
    DENSENET_CIFAR, source="DenseNet's CIFAR recipe; C10+ (pad-crop-flip), 5,000 held out, the final epoch tested",
    augment="cifar", val_size=5000, test_on="final", **_DATASET)
DATASET_SVHN = dataclasses.replace(
    DENSENET_SVHN, source="DenseNet's SVHN recipe; no augmentation, 6,000 held out (the authors' split), the "
    "model of lowest validation error tested", augment="none", val_size=6000, test_on="best", **_DATASET)
DATASET_IMAGENET = dataclasses.replace(
    DENSENET_IMAGENET, source="DenseNet's ImageNet recipe; fb.resnet.torch's augmentation, val/ for validation",
    augment="imagenet", val_size=0, test_on="final", **_DATASET)
# image folders: as CIFAR, the augmentation chosen by image size (the paper's crops below 64 px)
DATASET_FOLDER = dataclasses.replace(DATASET_CIFAR, source="DenseNet's CIFAR recipe; augmentation by image "
                                     "size", augment="auto")
# the digits are no paper's dataset; no dropout: with dropout 0.2 the BN statistics training leaves do not fit
# the dropout-free test network (4.17% test error, 1.11% after re-estimating them; without dropout 0.56%;
# BENCHMARKS.md)
DATASET_DIGITS = Recipe(source="this package: DenseNet's schedule scaled to 30 epochs, 300 held out, no "
                        "augmentation, no dropout", epochs=30, batch_size=64, milestones=(0.5, 0.75),
                        drop_rate=0.0, augment="none", val_size=300, test_on="final", **_DENSENET, **_DATASET)
DATASET_RECIPES: dict[str, Recipe] = {"cifar10": DATASET_CIFAR, "cifar100": DATASET_CIFAR, "svhn": DATASET_SVHN,
                                      "imagenet": DATASET_IMAGENET, "folder": DATASET_FOLDER,
                                      "digits": DATASET_DIGITS}
PROTOCOL = ("augment", "val_size", "test_on", "drop_rate")  # what a paper's recipe may leave to the dataset's

# Which paper's recipe a model trains with, by dataset kind: the model's own row first, then its family's.
_BY_MODEL: dict[str, dict[str, Recipe]] = {
    "resnet110": {"cifar": RESNET_CIFAR_WARMUP},
    "resnet1202": {"cifar": RESNET_CIFAR_WARMUP},
    "preact_resnet1001": {"cifar": PREACT_1001},
}
_BY_FAMILY: dict[str, dict[str, Recipe]] = {
    "DenseNet (CIFAR/SVHN)": {"cifar": DENSENET_CIFAR, "svhn": DENSENET_SVHN},
    "DenseNet (ImageNet)": {"imagenet": DENSENET_IMAGENET},
    "ResNet (CIFAR)": {"cifar": RESNET_CIFAR},
    "ResNet (ImageNet)": {"imagenet": RESNET_IMAGENET},
    "Pre-activation ResNet (CIFAR)": {"cifar": PREACT_CIFAR},
    "ResNet with stochastic depth (CIFAR)": {"cifar": STOCHDEPTH_CIFAR, "svhn": STOCHDEPTH_SVHN},
    "Wide ResNet (CIFAR)": {"cifar": WRN_CIFAR, "svhn": WRN_SVHN},
    "ResNeXt (CIFAR)": {"cifar": RESNEXT_CIFAR},
    "ResNeXt (ImageNet)": {"imagenet": RESNEXT_IMAGENET},
}
_KIND = {"cifar10": "cifar", "cifar100": "cifar", "svhn": "svhn", "imagenet": "imagenet"}
FAMILIES_WITH_DROPOUT = ("DenseNet (CIFAR/SVHN)", "DenseNet (ImageNet)", "Wide ResNet (CIFAR)")


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose auto or one of {', '.join(RECIPES)}")
    return RECIPES[name]


def dataset_recipe(dataset: str) -> Recipe:
    """The dataset's own recipe (complete: every protocol field set)."""
    if dataset not in DATASET_RECIPES:
        from .data import get_dataset_spec

        get_dataset_spec(dataset)  # an unknown dataset: the data's error, which names the known ones
        raise ValueError(f"dataset {dataset!r} has no recipe: add it to recipes.DATASET_RECIPES")
    return DATASET_RECIPES[dataset]


def paper_recipe(model: str, dataset: str) -> Recipe | None:
    """The recipe of `model`'s own paper on `dataset`: the model's row, then its family's (None: the paper
    has none for the dataset, e.g. for image folders and the digits, or a family registered elsewhere)."""
    from .registry import _REGISTRY

    kind = _KIND.get(dataset)
    if kind is None:
        return None
    if kind in _BY_MODEL.get(model, {}):
        return _BY_MODEL[model][kind]
    entry = _REGISTRY.get(model)
    return _BY_FAMILY.get(entry.family, {}).get(kind) if entry is not None else None


def recipe_for(model: str, dataset: str, recipe: str = "auto") -> Recipe:
    """The one resolution of a recipe (TrainConfig.resolve, the grid's cells): the recipe `model` trains
    with on `dataset`. `recipe`: "auto" (the model's paper's recipe for the dataset, else the dataset's
    own), "dataset" (the dataset's own), or a name of RECIPES. A paper's recipe gets what it leaves to the
    dataset (augmentation, hold-out, tested weights) from the dataset's recipe, and no dropout for a network
    without a dropout option. `drop_rate` stays None where DenseNet's rule decides: 0.2 without
    augmentation, else 0 (TrainConfig.resolve applies it once the augmentation is known)."""
    base = dataset_recipe(dataset)
    rec = base if recipe == "dataset" else paper_recipe(model, dataset) if recipe == "auto" else get_recipe(recipe)
    if rec is None or rec is base:
        return base
    rec = dataclasses.replace(rec, **{k: getattr(base, k) for k in PROTOCOL if getattr(rec, k) is None})
    if rec.drop_rate is None and not has_dropout(model):
        rec = dataclasses.replace(rec, drop_rate=0.0)  # He 2015/2016's ResNets, ResNeXts: no dropout in their papers
    return rec


def has_dropout(model: str) -> bool:
    """Whether the registered network `model` takes a dropout rate: the package's families by name; a
    network registered elsewhere (another family) by building it with one, on the meta device."""
    from .registry import _REGISTRY, create_model

    entry = _REGISTRY.get(model)
    if entry is None:
        return False
    if entry.family in FAMILIES_WITH_DROPOUT:
        return True
    if entry.family in _BY_FAMILY:  # the package's other families
        return False
    import torch

    try:
        with torch.device("meta"):
            create_model(model, drop_rate=0.1)
    except Exception:  # anything a builder raises (no such argument, no meta support): no dropout option known
        return False
    return True


def resolve_milestones(milestones: tuple[float, ...], epochs: int, recipe_epochs: int | None = None) -> tuple[float, ...]:
    """Epoch milestones for a run of `epochs`: fractions by the Lua rule (the first decayed 1-indexed
    epoch is ceil(f * epochs), so ceil(f * epochs) - 1 epochs run before it), absolute values as given,
    or scaled when the recipe's length `recipe_epochs` differs. A decay never falls before the first
    epoch's end: every run starts at the base rate."""
    out = []
    for m in milestones:
        if m < 1:
            done = math.ceil(Fraction(m).limit_denominator(10 ** 6) * epochs) - 1
        elif recipe_epochs and recipe_epochs != epochs:
            done = round(Fraction(m).limit_denominator(10 ** 6) * epochs / recipe_epochs)
        else:
            done = m
        out.append(float(max(1, done)))
    return tuple(out)


def epochs_for_iterations(iterations: int, train_images: int, batch_size: int) -> int:
    """Whole epochs closest to `iterations` steps (He 2015's 64k at batch 128 on 50,000 images: 164)."""
    steps = max(1, -(-train_images // batch_size))
    return max(1, round(iterations / steps))


def learning_rate(base: float, gamma: float, milestones, epoch: int, step: int, steps_per_epoch: int,
                  iterations: bool = False, warmup_lr: float | None = None, warmup_iterations: int = 0) -> float:
    """The rate of optimizer step `step` of 0-indexed `epoch`: the warm-up rate for the first
    `warmup_iterations` steps, then `base` times `gamma` per milestone reached (epochs done, or
    iterations done where `iterations`)."""
    done = epoch * steps_per_epoch + step
    if warmup_iterations and done < warmup_iterations and warmup_lr is not None:
        return warmup_lr
    where = done if iterations else epoch
    return base * gamma ** sum(1 for m in milestones if where >= m)
