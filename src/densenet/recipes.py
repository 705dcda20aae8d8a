"""Training recipes as data: for every registered family, the recipe its own paper ran, checked against
its authors' code (each recipe's `sources`: repository, file, lines, commit), and for every dataset its
own (DenseNet's, with the dataset's protocol: augmentation, hold-out, tested weights). A recipe also
lists its `departures`: every place the project's protocol departs from its sources. `recipe_for` is
the one resolution of a recipe: `densenet train` (TrainConfig.resolve) and `densenet reproduce`
(grid/reproduce.cell_config) fill every setting not given from what it returns.

Schedules are written as `milestones`: the number of epochs done before each learning-rate decay
(PyTorch's MultiStepLR convention), so `(149, 224)` trains epoch 150 (1-indexed) at the decayed rate, as
Lua's `epoch >= 0.5 * nEpochs` does. Values below 1 are fractions of the run, turned into epochs by the
same Lua rule (`first_decayed_epoch = ceil(f * epochs)`); absolute milestones scale with the run when
`--epochs` changes its length. Recipes that count iterations (He 2015/2016) decay at exact iterations.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction


@dataclass(frozen=True)
class Source:
    """Where a recipe's facts come from: lines of a file of the authors' code at a commit, or a paper's
    section where no code was released (He 2015/2016's Caffe runs)."""

    what: str  # the facts it fixes, e.g. "schedule: learningRate"
    repository: str | None = None  # "owner/name" on GitHub; None: a paper
    file: str | None = None
    lines: str | None = None  # "188-199", "43, 70"
    commit: str | None = None  # the full 40-digit hash the lines were read at
    paper: str | None = None  # "He et al. 2015, Sec. 4.2" where there is no code

    def __post_init__(self) -> None:
        if self.repository is None and self.paper is None:
            raise ValueError(f"source {self.what!r} names neither a repository nor a paper")
        if self.repository is not None and not (self.file and self.lines and self.commit and len(self.commit) == 40):
            raise ValueError(f"source {self.what!r} in {self.repository} needs a file, lines and a full commit")

    def text(self) -> str:
        """One line: "liuzhuang13/DenseNet train.lua:188-199 @e3d24fb (schedule: learningRate)"."""
        if self.repository is None:
            return f"{self.paper} ({self.what})"
        return f"{self.repository} {self.file}:{self.lines} @{self.commit[:7]} ({self.what})"

    @property
    def url(self) -> str | None:
        """The cited lines on GitHub, at the commit (None for a paper)."""
        if self.repository is None:
            return None
        first = re.split(r"[-, ]", self.lines)[0]
        return f"https://github.com/{self.repository}/blob/{self.commit}/{self.file}#L{first}"


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
    sources: tuple[Source, ...] = ()  # the code (or paper) each fact was checked against
    departures: tuple[str, ...] = ()  # where the project's protocol departs from the sources
    normalize: str | None = None  # "channel", "pixel" (per-pixel mean, one std), "zca"; None: the dataset's
    val_every_iterations: int = 0  # validate every N optimizer steps, keeping the best; 0: once per epoch
    reset_momentum_at_decay: bool = False  # clear SGD's momentum buffers at each decay (WRN's train.lua)
    drop_last: bool = False  # drop each epoch's last partial batch (WRN's 'skip-last')

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


# --- The authors' code, at the commits its lines were read at ---------------------------------------------
_DN, _DN_C = "liuzhuang13/DenseNet", "e3d24fb44997875f6eddc90dfd605e028d052bad"  # HEAD (2024); train.lua since 2017-06
_DN_2016 = "cbb6bff0b4bc8a0eba1f89f60b721e1a264d2afd"  # 2016-08-25, the paper's: fb.resnet.torch with a new schedule
_FB, _FB_C = "facebook/fb.resnet.torch", "985e569d468d23baeef5b952954dcdf3c61c5e73"  # HEAD (2019)
_FB_2016 = "eff127fd58b0fec1a259786ead9ffef5f38d4c26"  # 2016-02-25: the fb.resnet.torch resnet-1k-layers ran on
_1K, _1K_C = "KaimingHe/resnet-1k-layers", "fde7ee93c464d8312ca9b3df1c488cb245a9e2c1"  # HEAD (2016-04-13)
_SD, _SD_C = "yueatsprograms/Stochastic_Depth", "86b5cddd97841d2586ce0047f476eba0568efc95"  # 2016-07-25, before camera ready
_WRN, _WRN_C = "szagoruyko/wide-residual-networks", "5ed3b7293d0b76a2fb8cb80bb6436ac477c1c3f4"  # 2016-08-20: v1's code
_RNX, _RNX_C = "facebookresearch/ResNeXt", "1f59a2c744edba655bb703e8e060d6f9ce3b289c"  # HEAD (2020)


def _src(what: str, repo: str, commit: str, file: str, lines: str) -> Source:
    return Source(what, repo, file, lines, commit)


def _paper(what: str, paper: str) -> Source:
    return Source(what, paper=paper)


NO_PUBLISHED_RECIPE = "no published recipe: the DenseNet authors' own run"

# --- DenseNet (Huang et al. 2017) ----------------------------------------------------------------------
# liuzhuang13/DenseNet: train.lua Trainer:__init (SGD, nesterov = true, dampening = 0.0) and
# Trainer:learningRate (cifar10/cifar100: `decay = epoch >= 0.75*nEpochs and 2 or epoch >= 0.5*nEpochs
# and 1 or 0`; imagenet: `math.floor((epoch - 1) / 30)`); opts.lua: LR 0.1, momentum 0.9, weightDecay 1e-4;
# README: batch 64, 300 epochs on CIFAR, dropRate 0.2 without augmentation. The paper's own code (2016):
# fb.resnet.torch with `decay = epoch >= 225 and 2 or epoch >= 150 and 1 or 0` (README at cbb6bff). The
# numbers are one run's test error after training (issue #34). The paper: SVHN 40 epochs.
_DENSENET = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, lr_gamma=0.1)
_DN_SGD = _src("optimiser: Trainer:__init, nesterov = true, dampening = 0.0", _DN, _DN_C, "train.lua", "19-30")
_DN_LR = _src("schedule: Trainer:learningRate", _DN, _DN_C, "train.lua", "188-199")
DENSENET_CIFAR = Recipe("densenet-cifar", "Huang 2017 Sec. 4.2; liuzhuang13/DenseNet train.lua (learningRate)",
                        300, 64, milestones=(0.5, 0.75), **_DENSENET, sources=(
                            _DN_SGD, _DN_LR, _src("LR 0.1, momentum 0.9, weightDecay 1e-4", _DN, _DN_C, "opts.lua", "41-43"),
                            _src("the paper's schedule: epoch >= 225 and 2 or epoch >= 150 and 1", _DN, _DN_2016,
                                 "README.md", "39-41"),
                            _paper("the final epoch's test error of one run", "liuzhuang13/DenseNet issue #34")))
DENSENET_SVHN = Recipe("densenet-svhn", "Huang 2017 Sec. 4.2 (40 epochs; lr / 10 at 50% and 75%)",
                       40, 64, milestones=(0.5, 0.75), **_DENSENET, sources=(
                           _paper("40 epochs, 6,000 images held out, the lowest validation error's model",
                                  "Huang et al. 2017, Sec. 4.1-4.2"), _DN_SGD, _DN_LR,
                           _src("the 6,000-image split: 400 per class from train, 200 from extra", _SD, _SD_C,
                                "svhn-dataset.lua", "39-58")),
                       departures=("liuzhuang13/DenseNet has no SVHN loader: the split is Stochastic_Depth's "
                                   "svhn-dataset.lua, validated once per epoch (the paper does not say how often)",))
DENSENET_IMAGENET = Recipe("densenet-imagenet", "Huang 2017 Sec. 4.2; liuzhuang13/DenseNet train.lua "
                           "(imagenet: floor((epoch - 1) / 30)), datasets/imagenet.lua (augmentation)",
                           90, 256, milestones=(30, 60), **_DENSENET, sources=(
                               _DN_SGD, _DN_LR, _src("batch 256, 90 epochs", _DN, _DN_C, "README.md", "88"),
                               _src("augmentation and evaluation crops", _DN, _DN_C, "datasets/imagenet.lua", "80-101")))

# --- ResNet (He et al. 2015), CIFAR ---------------------------------------------------------------------
# He 2015 Sec. 4.2 (Caffe, no training code released): batch 128, momentum 0.9 (plain SGD momentum),
# weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k (chosen on a 45k/5k
# split, then trained on all 50k); ResNet-110 (and -1202) warm up at 0.01 "until the training error is
# below 80% (about 400 iterations)". fb.resnet.torch (train.lua learningRate: cifar10 `epoch >= 122 and 2
# or epoch >= 81 and 1`; opts.lua: 164 epochs) is the same schedule in epochs: 164 x 391 steps ~ 64k.
_HE2015 = dict(batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
               milestones=(32_000, 48_000), iterations=64_000, val_size=0, test_on="final")
_HE2015_SRC = (_paper("batch 128, momentum 0.9, wd 1e-4, 0.1 / 10 at 32k and 48k iterations, 64k; per-pixel mean; "
                      "pad 4, crop, flip", "He et al. 2015, Sec. 4.2 (Caffe, code not released)"),
               _src("the same schedule in epochs: cifar10 epoch >= 122 and 2 or epoch >= 81 and 1", _FB, _FB_C,
                    "train.lua", "174-185"))
_HE_DEPARTURES = ("He 2015 Sec. 4.2 (and He 2016, following it) subtracts the per-pixel mean only; here per-channel "
                  "mean and std",
                  "64k iterations run as whole epochs (164 on 50,000 images: 64,124 steps), the decays at exactly "
                  "32k and 48k iterations")
RESNET_CIFAR = Recipe("resnet-he2015-cifar", "He 2015 Sec. 4.2 (CIFAR-10); schedule as fb.resnet.torch "
                      "train.lua (learningRate, cifar10: epochs 81 and 122 of 164)", None, **_HE2015,
                      sources=_HE2015_SRC, departures=_HE_DEPARTURES)
RESNET_CIFAR_WARMUP = Recipe("resnet-he2015-cifar-warmup", "He 2015 Sec. 4.2: ResNet-110 and -1202 "
                             "warm up at 0.01 for about 400 iterations", None, warmup_lr=0.01,
                             warmup_iterations=400, **_HE2015, sources=_HE2015_SRC + (
                                 _paper("ResNet-110: 0.01 until the training error is below 80% (about 400 "
                                        "iterations)", "He et al. 2015, Sec. 4.2"),),
                             departures=_HE_DEPARTURES + ("the warm-up is exactly 400 iterations, not 'until the "
                                                          "training error is below 80%'",))

# --- ResNet on ImageNet (Figure 3's ResNets are fb.resnet.torch's) ---------------------------------------
# fb.resnet.torch: train.lua Trainer:__init (nesterov = true, dampening 0) and learningRate (imagenet:
# floor((epoch - 1) / 30)); opts.lua: 90 epochs, LR 0.1, momentum 0.9, weightDecay 1e-4; TRAINING.md:
# batch 256; datasets/imagenet.lua: the augmentation DenseNet copies.
RESNET_IMAGENET = Recipe("resnet-imagenet-fb", "fb.resnet.torch train.lua (learningRate), opts.lua, "
                         "datasets/imagenet.lua", 90, 256, lr=0.1, momentum=0.9, nesterov=True,
                         weight_decay=1e-4, milestones=(30, 60), sources=(
                             _src("optimiser: Trainer:__init, nesterov = true", _FB, _FB_C, "train.lua", "17-30"),
                             _src("schedule: imagenet math.floor((epoch - 1) / 30)", _FB, _FB_C, "train.lua", "174-185"),
                             _src("90 epochs, LR 0.1, momentum 0.9, weightDecay 1e-4", _FB, _FB_C, "opts.lua", "30-77"),
                             _src("batch 256", _FB, _FB_C, "TRAINING.md", "31-37")))

# --- Pre-activation ResNet (He et al. 2016) --------------------------------------------------------------
# He 2016 (Caffe, as He 2015; appendix): batch 128, lr 0.1 / 10 at 32k and 48k iterations, 64k iterations,
# weight decay 1e-4, momentum 0.9, "a smaller learning rate of 0.01 at the beginning 400 iterations".
# ResNet-1001, decided per dataset: C10+ 4.62 comes from KaimingHe/resnet-1k-layers (README: "we simply
# reduced the mini-batch size to 64 ... 4.62"; its command `-batchSize 64 -dataset cifar10 -nEpochs 200` on
# fb.resnet.torch, whose train.lua decays at epochs 81 and 122 with Nesterov momentum, no warm-up);
# resnet-pre-act.lua builds CIFAR-10 only (`if opt.dataset == 'cifar10'`), so C100+ 22.71 is the paper's
# Caffe recipe at batch 128.
_HE2016_SRC = (_paper("batch 128, 0.01 for 400 iterations, then 0.1 / 10 at 32k and 48k, 64k iterations, momentum "
                      "0.9, wd 1e-4", "He et al. 2016, appendix (Caffe, code not released)"),)
PREACT_CIFAR = Recipe("preact-he2016-cifar", "He 2016 Sec. 4 and appendix (as He 2015, 0.01 warm-up "
                      "for 400 iterations)", None, warmup_lr=0.01, warmup_iterations=400, **_HE2015,
                      sources=_HE2016_SRC, departures=_HE_DEPARTURES)
PREACT_1001_C100 = dataclasses.replace(
    PREACT_CIFAR, name="preact-resnet1001-c100", source="He 2016's Caffe recipe at batch 128 (C100+ 22.71): "
    "resnet-1k-layers builds CIFAR-10 only", sources=_HE2016_SRC + (
        _src("CIFAR-10 only: if opt.dataset == 'cifar10'", _1K, _1K_C, "resnet-pre-act.lua", "105-107"),
        _src("the paper's results at batch 128; 4.62 of this code at 64 (CIFAR-10)", _1K, _1K_C, "README.md", "44-51")))
PREACT_1001 = Recipe("preact-resnet1001", "KaimingHe/resnet-1k-layers README (batch 64, 200 epochs, "
                     "4.62%) on fb.resnet.torch train.lua (learningRate, cifar10: epochs 81 and 122)",
                     200, 64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                     milestones=(80, 121), val_size=0, test_on="final", sources=(
                         _src("batch 64: 4.62 (median of the runs)", _1K, _1K_C, "README.md", "46-51"),
                         _src("-batchSize 64 -dataset cifar10 -nEpochs 200", _1K, _1K_C, "README.md", "62"),
                         _src("optimiser: nesterov = true, dampening = 0.0", _FB, _FB_2016, "train.lua", "17-27"),
                         _src("schedule: cifar10 epoch >= 122 and 2 or epoch >= 81 and 1 (no warm-up)", _FB, _FB_2016,
                              "train.lua", "163-172"),
                         _src("LR 0.1, momentum 0.9, weightDecay 1e-4", _FB, _FB_2016, "opts.lua", "29-38")),
                     departures=("fb.resnet.torch main.lua ends with the lowest test error over the epochs "
                                 "(' * Finished top1', lines 45-65 at eff127f); the README does not say whether 4.62 "
                                 "is that or the final epoch's: here the final epoch is tested",))

# --- Stochastic depth (Huang et al. 2016) ----------------------------------------------------------------
# yueatsprograms/Stochastic_Depth main.lua: maxEpochs 500, batchSize 128, sgdState {weightDecay 1e-4,
# momentum 0.9, dampening 0, nesterov true}, `lrSchedule = {svhn = {0.6, 0.7}, cifar10 = {0.5, 0.75}, ...}`:
# lr 0.1 while `epochCounter < maxEpochs*lrSchedule[1]`, 0.01 while < [2], then 0.001 (CIFAR: epochs 250 and
# 375, 1-indexed, are decayed: milestones 249 and 374; SVHN at 50 epochs: epoch 30 -> 0.01, 35 -> 0.001:
# milestones 29 and 34); SVHN validates every 200 iterations (`if sgdState.iterCounter % 200 == 0 then
# accounting(...)`), CIFAR once per epoch; both keep the last partial batch (`split(opt.batchSize)`).
# cifar-dataset.lua and svhn-dataset.lua: per-pixel mean and one scalar std (`self.data:mean(1)`,
# `self.data:std()`); 45,000/5,000 on CIFAR; 400 per class from train and 200 from extra held out on SVHN.
# README: "test error (selected by best validation error)"; SVHN: `-dataset svhn -N 25 -maxEpochs 50`
# (152 layers).
_SD_OPT = dict(batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, test_on="best",
               normalize="pixel")
_SD_SGD = _src("sgdState: weightDecay 1e-4, momentum 0.9, dampening 0, nesterov true", _SD, _SD_C, "main.lua", "46-51")
_SD_LR = _src("schedule: lrSchedule, epochCounter < maxEpochs*lrSchedule[1]", _SD, _SD_C, "main.lua", "53-55, 164-172")
_SD_BEST = _src("test error selected by best validation error", _SD, _SD_C, "README.md", "34")
STOCHDEPTH_CIFAR = Recipe("stochdepth-cifar", "Huang 2016; yueatsprograms/Stochastic_Depth main.lua "
                          "(sgdState, learning rate schedule), cifar-dataset.lua (45k/5k)", 500,
                          milestones=(0.5, 0.75), val_size=5000, **_SD_OPT, sources=(
                              _SD_SGD, _SD_LR, _src("maxEpochs 500, batchSize 128", _SD, _SD_C, "main.lua", "15-16"),
                              _src("45,000 train / 5,000 validation; per-pixel mean, one std", _SD, _SD_C,
                                   "cifar-dataset.lua", "29-30, 47-51"), _SD_BEST),
                          departures=("cifar-dataset.lua holds out the last 5,000 of a torch.randperm shuffle "
                                      "(seed 1); here a seeded class-balanced 5,000",))
STOCHDEPTH_SVHN = Recipe("stochdepth-svhn", "Huang 2016 Sec. 4 (SVHN: 50 epochs, 152 layers); "
                         "yueatsprograms/Stochastic_Depth main.lua (lrSchedule svhn {0.6, 0.7}, validation every "
                         "200 iterations), svhn-dataset.lua (6,000 held out)", 50,
                         milestones=(0.6, 0.7), val_size=6000, val_every_iterations=200, **_SD_OPT, sources=(
                             _SD_SGD, _SD_LR,
                             _src("SVHN: validation and test every 200 iterations", _SD, _SD_C, "main.lua", "196-202"),
                             _src("-dataset svhn -N 25 -maxEpochs 50: 152 layers, 50 epochs", _SD, _SD_C,
                                  "README.md", "43"),
                             _src("400 per class from train, 200 from extra held out; per-pixel mean, one std", _SD,
                                  _SD_C, "svhn-dataset.lua", "39-58, 73-78"), _SD_BEST),
                         departures=("svhn-dataset.lua holds out the first 400 / 200 per class of a torch.randperm "
                                     "shuffle (seed 1); here a seeded draw of the same numbers",))

# --- Wide ResNet (Zagoruyko and Komodakis 2016) ----------------------------------------------------------
# szagoruyko/wide-residual-networks at the commit of the paper's numbers (5ed3b72, 2016-08-20; Table 2's
# 4.81/4.17 and 22.07/20.50 are arXiv v1's): train.lua `dataset = './datasets/cifar10_whitened.t7'` (ZCA-
# whitened by pylearn2's make_cifar10_gcn_whitened.py, README), batchSize 128, weightDecay 0.0005,
# momentum 0.9, dampening 0; the train iterator `:batch(opt.batchSize, 'skip-last')` drops the last
# partial batch; `onStartEpoch` multiplies the rate by learningRateDecayRatio when `tablex.find(
# opt.epoch_step, epoch)` (epoch 60, 1-indexed, already runs at 0.02: milestones 59, 119, 159) and sets
# `state.optim = tablex.deepcopy(opt)`, which drops optim.sgd's momentum buffer (`dfdx`).
# scripts/train_cifar.sh: lr 0.1, epoch_step {60,120,160}, max_epoch 200, ratio 0.2, nesterov true,
# randomcrop_type reflection. scripts/train_svhn.sh: lr 0.01, epoch_step {80,120}, max_epoch 160, ratio 0.1,
# nesterov, dropout 0.4, no crops or flips. DenseNet's Table 2 cites WRN-16-8 and WRN-28-10 without dropout
# (the WRN paper's dropout 0.3 rows are separate) and WRN-16-4 with dropout on SVHN.
_WRN_OPT = dict(batch_size=128, momentum=0.9, nesterov=True, weight_decay=5e-4, val_size=0, test_on="final",
                reset_momentum_at_decay=True, drop_last=True)
_WRN_TRAIN = (_src("opt: batchSize 128, weightDecay 0.0005, momentum 0.9, dampening 0", _WRN, _WRN_C, "train.lua",
                   "17-47"),
              _src("'skip-last': the last partial batch dropped", _WRN, _WRN_C, "train.lua", "138"),
              _src("onStartEpoch: lr x learningRateDecayRatio at epoch_step, state.optim reset (momentum)", _WRN,
                   _WRN_C, "train.lua", "159-171"))
_WRN_INIT_NOTE = ("models/utils.lua MSRinit at 5ed3b72 draws with fan-out (n = kW*kH*nOutputPlane, lines 3-9); "
                  "fan-in only from ea02518 (2016-09-08), after the paper's numbers")
WRN_CIFAR = Recipe("wrn-cifar", "Zagoruyko 2016 v1 on ZCA-whitened CIFAR; szagoruyko/wide-residual-networks "
                   "train.lua (opt, onStartEpoch), scripts/train_cifar.sh", 200, lr=0.1,
                   milestones=(59, 119, 159), lr_gamma=0.2, drop_rate=0.0, augment="cifar-reflect", normalize="zca",
                   notes=("dropout 0.3 between the convolutions for the WRN paper's '-dropout' rows", _WRN_INIT_NOTE),
                   **_WRN_OPT, sources=(
                       _src("dataset = './datasets/cifar10_whitened.t7'", _WRN, _WRN_C, "train.lua", "18"),
                       _src("CIFAR whitened with pylearn2 make_cifar10_gcn_whitened.py", _WRN, _WRN_C, "README.md",
                            "61-66"),
                       *_WRN_TRAIN,
                       _src("lr 0.1, epoch_step {60,120,160}, max_epoch 200, ratio 0.2, nesterov, reflection crops",
                            _WRN, _WRN_C, "scripts/train_cifar.sh", "3-9")))
WRN_SVHN = Recipe("wrn-svhn", "szagoruyko/wide-residual-networks train.lua, scripts/train_svhn.sh", 160,
                  lr=0.01, milestones=(79, 119), lr_gamma=0.1, drop_rate=0.4, augment="none",
                  notes=(_WRN_INIT_NOTE,), **_WRN_OPT, sources=(
                      *_WRN_TRAIN,
                      _src("lr 0.01, epoch_step {80,120}, max_epoch 160, ratio 0.1, dropout 0.4, no crops or flips",
                           _WRN, _WRN_C, "scripts/train_svhn.sh", "3-13")),
                  departures=("svhn.t7 comes from a gist the repository links (README), not checked here: its "
                              "split and preprocessing may differ from the dataset's (train + extra, pixels / 255)",))

# --- ResNeXt (Xie et al. 2017) ---------------------------------------------------------------------------
# facebookresearch/ResNeXt: README (CIFAR: `-depth 29 ... -weightDecay 5e-4 -batchSize 128`), opts.lua
# (cifar: nEpochs 300; LR 0.1, momentum 0.9), train.lua Trainer:__init (nesterov true) and learningRate
# (cifar: `decay = (epoch/nEpochs) > 0.74 and 2 or (epoch/nEpochs) > 0.49 and 1`: epochs 148 and 223,
# 1-indexed, are decayed: milestones 147 and 222); imagenet: 100 epochs, floor((epoch - 1) / 30).
_RNX_SGD = _src("optimiser: Trainer:__init, nesterov = true", _RNX, _RNX_C, "train.lua", "17-30")
_RNX_LR = _src("schedule: Trainer:learningRate", _RNX, _RNX_C, "train.lua", "174-183")
RESNEXT_CIFAR = Recipe("resnext-cifar", "facebookresearch/ResNeXt README, opts.lua, train.lua (learningRate)",
                       300, 128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, milestones=(147, 222),
                       val_size=0, test_on="final", sources=(
                           _src("-weightDecay 5e-4 -batchSize 128 -nGPU 8", _RNX, _RNX_C, "README.md", "78"),
                           _src("cifar: nEpochs 300; LR 0.1, momentum 0.9", _RNX, _RNX_C, "opts.lua", "30-41, 82-88"),
                           _RNX_SGD, _RNX_LR),
                       departures=("the README's run splits the batch of 128 over 8 GPUs (batch-norm statistics "
                                   "of 16 images); here one batch of 128",))
RESNEXT_IMAGENET = Recipe("resnext-imagenet", "facebookresearch/ResNeXt README, opts.lua (100 epochs), "
                          "train.lua (learningRate)", 100, 256, lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=1e-4, milestones=(30, 60, 90), sources=(
                              _src("-batchSize 256 -nGPU 8", _RNX, _RNX_C, "README.md", "73"),
                              _src("imagenet: nEpochs 100", _RNX, _RNX_C, "opts.lua", "77-80"), _RNX_SGD, _RNX_LR))

# Departures of a network, whichever recipe it trains with (`departures`)
_PREACT_STRIDE = ("stride 2 on the bottleneck's 3x3 convolution (SPEC.md's MACs); the authors' resnet-pre-act.lua "
                  "strides the first 1x1 (lines 43, 70 at fde7ee9): --model-arg stride_in_1x1=true")
MODEL_DEPARTURES: dict[str, tuple[str, ...]] = {
    "preact_resnet164": (_PREACT_STRIDE,),
    "preact_resnet1001": (_PREACT_STRIDE,),
}

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    DENSENET_CIFAR, DENSENET_SVHN, DENSENET_IMAGENET, RESNET_CIFAR, RESNET_CIFAR_WARMUP, RESNET_IMAGENET,
    PREACT_CIFAR, PREACT_1001, PREACT_1001_C100, STOCHDEPTH_CIFAR, STOCHDEPTH_SVHN, WRN_CIFAR, WRN_SVHN, RESNEXT_CIFAR,
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
                        "augmentation, no dropout", sources=(_paper("DenseNet's schedule at 30 epochs, no dropout",
                                                                    "this package (BENCHMARKS.md)"),), epochs=30, batch_size=64, milestones=(0.5, 0.75),
                        drop_rate=0.0, augment="none", val_size=300, test_on="final", **_DENSENET, **_DATASET)
DATASET_RECIPES: dict[str, Recipe] = {"cifar10": DATASET_CIFAR, "cifar100": DATASET_CIFAR, "svhn": DATASET_SVHN,
                                      "imagenet": DATASET_IMAGENET, "folder": DATASET_FOLDER,
                                      "digits": DATASET_DIGITS}
PROTOCOL = ("augment", "val_size", "test_on", "drop_rate")  # what a paper's recipe may leave to the dataset's

# Which paper's recipe a model trains with, by dataset kind: the model's own row first, then its family's.
_BY_MODEL: dict[str, dict[str, Recipe]] = {
    "resnet110": {"cifar": RESNET_CIFAR_WARMUP},
    "resnet1202": {"cifar": RESNET_CIFAR_WARMUP},
    "preact_resnet1001": {"cifar10": PREACT_1001, "cifar100": PREACT_1001_C100},  # per dataset: see above
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
    own = _BY_MODEL.get(model, {})
    if dataset in own or kind in own:  # the dataset's own entry first (pre-act ResNet-1001: C10 and C100 differ)
        return own.get(dataset, own.get(kind))
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


def decays_reached(milestones, epoch: int, step: int, steps_per_epoch: int, iterations: bool = False) -> int:
    """How many decays the schedule has made by optimizer step `step` of 0-indexed `epoch` (the exponent of
    `gamma` in `learning_rate`, the warm-up aside)."""
    where = epoch * steps_per_epoch + step if iterations else epoch
    return sum(1 for m in milestones if where >= m)


def is_decay_step(milestones, epoch: int, step: int, steps_per_epoch: int, iterations: bool = False) -> bool:
    """Whether step `step` of `epoch` is the first at a decayed rate: where WRN's train.lua resets the
    momentum (`state.optim = tablex.deepcopy(opt)` in onStartEpoch). A function of the position alone, so
    a resumed run resets where the uninterrupted one does."""
    if epoch == 0 and step == 0:
        return False
    prev = (epoch, step - 1) if step else (epoch - 1, steps_per_epoch - 1)
    return (decays_reached(milestones, epoch, step, steps_per_epoch, iterations)
            > decays_reached(milestones, *prev, steps_per_epoch, iterations))


def departures(model: str, dataset: str, recipe: str = "auto") -> tuple[str, ...]:
    """Every place a run of `model` on `dataset` departs from its recipe's sources: the recipe's own
    departures, then the network's (MODEL_DEPARTURES)."""
    return recipe_for(model, dataset, recipe).departures + MODEL_DEPARTURES.get(model, ())
