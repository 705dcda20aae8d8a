"""The one training loop: `fit` (phases of `Trainer` over a `RunState`), `evaluate`.

`fit` builds everything from a TrainConfig, resumes from a run directory when asked, checkpoints at
every epoch (and on Ctrl-C / SIGTERM, mid-epoch), stops on a non-finite loss without overwriting the
last good checkpoint, and ends with a summary of validation and test error.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import DataError, ImageSet, Normalization, balanced_split, channel_stats, get_dataset_spec, load_splits
from ..data.normalization import (NORMALIZATION_FILE, describe, find_normalization, fit_normalization,
                                  load_normalization, normalization_bytes, save_normalization)
from ..data.loader import IMAGENET_MEAN_STD, Batches, StreamBatches, eval_batches, stream_transform
from ..data.transforms import ten_crop_padding
from ..registry import create_model
from ..saved_model import model_metadata
from ..utils.atomic import write_text_atomic
from ..runs import MODEL_FILE, CheckpointError
from ..weights import describe_mismatch, non_finite, read_state_dict
from . import logs
from .checkpoint import RunDir, set_rng_state
from .resume import check_settings, plan_schedule
from .config import TrainConfig
from .distributed import Distributed
from .lock import DirLock


class TrainingStopped(Exception):
    """The run stopped early; `exit_code` says why (130/143: interrupted and saved; 3: non-finite loss)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --- data ------------------------------------------------------------------------------------------------

@dataclass
class RunData:
    train: Batches | StreamBatches
    val: ImageSet | Any | None
    test: ImageSet | Any | None
    classes: list[str]
    in_channels: int
    preprocessing: dict
    normalizer: Any = None  # what normalises the in-memory images (data/normalization.py)
    normalization_file: bytes | None = None  # per-pixel / ZCA statistics: RUN/normalization.safetensors


def _normalization(kind: str, train) -> Normalization:
    if kind == "div255":  # SVHN: pixels / 255 only
        c = train.images.shape[1] if isinstance(train, ImageSet) else 3
        return Normalization((0.0,) * c, (1.0,) * c)
    if kind == "imagenet" or not isinstance(train, ImageSet):  # streamed folders: no pass over the data
        return IMAGENET_MEAN_STD
    return channel_stats(train.images)  # the training images' own per-channel mean and std


def select_splits(cfg: TrainConfig, splits):
    """(train, val, test) as the config asks: a seeded class-balanced hold-out of `val_size` images;
    on SVHN train + extra, 6,000 images are the authors' split (400 per class from train, 200 from extra)."""
    from ..data.sources import SVHN_VAL_PER_CLASS, svhn_split

    train, val = splits.train, splits.val
    parts = getattr(splits, "parts", None)
    if cfg.dataset == "svhn" and parts and len(parts) == 2 and cfg.val_size == 10 * sum(SVHN_VAL_PER_CLASS):
        tr, va = svhn_split(train.labels, parts[0], cfg.split_seed)
        train, val = train.subset(tr), train.subset(va)
    elif cfg.val_size:
        tr, va = balanced_split(train.labels, cfg.val_size, cfg.split_seed)
        train, val = train.subset(tr), train.subset(va)
    if cfg.train_subset and cfg.train_subset < len(train):
        train = train.subset(balanced_split(train.labels, cfg.train_subset, cfg.split_seed + 1)[1])
    return train, val, splits.test


def _fitted_normalization(cfg: TrainConfig, spec, train, run_dir: Path | None):
    """(normaliser, the bytes of its file or None) for cfg.normalize (data/normalization.py): the dataset's
    own per-channel numbers, or per-pixel / ZCA statistics of the training split, fitted here or, on
    resume, read back from the run directory (the very numbers the run started with)."""
    kind = cfg.normalize or "channel"
    if kind == "channel":
        return _normalization(spec.normalize, train), None
    stored = None if run_dir is None else Path(run_dir) / NORMALIZATION_FILE
    if stored is not None and stored.is_file():
        norm = load_normalization(stored)
        if norm.kind != kind:
            raise ValueError(f"{stored} holds a {norm.kind} normalisation; this run asks for --normalize {kind}")
        return norm, stored.read_bytes()
    norm = fit_normalization(kind, None, train.images if isinstance(train, ImageSet) else None)
    return norm, normalization_bytes(norm)


def build_data(cfg: TrainConfig, device, dist: Distributed, in_channels: int = 3,
               run_dir: Path | None = None) -> RunData:
    spec = get_dataset_spec(cfg.dataset)
    splits = load_splits(cfg.dataset, cfg.data, download=cfg.download and dist.is_main,
                         svhn_extra=cfg.svhn_extra, in_memory=cfg.in_memory, in_channels=in_channels)
    train, val, test = select_splits(cfg, splits)
    if len(train) < cfg.batch_size:
        raise DataError(f"the training split has {len(train)} images, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size or --val-size")
    norm, stored = _fitted_normalization(cfg, spec, train, run_dir)
    augment = cfg.augment
    common = dict(batch_size=cfg.batch_size, shuffle=True, drop_last=bool(cfg.drop_last), seed=cfg.seed, rank=dist.rank,
                  world_size=dist.world_size, device=device, channels_last=cfg.channels_last)
    if isinstance(train, ImageSet):
        augment = "cifar" if augment == "auto" else augment
        if augment == "imagenet":
            raise ValueError("--augment imagenet needs a streamed folder (--no-in-memory)")
        batches = Batches(train, normalize=norm, augment=augment, **common)
        pre = {"source": "memory", **describe(norm, train.images.shape[1]), "channels": train.images.shape[1],
               "image_size": list(train.images.shape[-2:])}
        if stored is not None:  # the run directory's file (Trainer._start writes it), named and hashed
            pre.update(normalization_file=NORMALIZATION_FILE, normalization_sha256=hashlib.sha256(stored).hexdigest())
    else:
        augment = "imagenet" if augment == "auto" else augment
        if augment == "imagenet" and splits.in_channels != 3:  # colour jitter and PCA lighting are RGB's
            raise ValueError(f"--augment imagenet (colour jitter, PCA lighting) needs RGB images; this folder is "
                             f"read with {splits.in_channels} channel(s): use --augment none")
        tf = stream_transform(augment == "imagenet", cfg.image_size, cfg.resize, norm)
        batches = StreamBatches(train, transform=tf, channels=splits.in_channels, workers=cfg.workers, **common)
        pre = {"source": "stream", "mean": norm.mean, "std": norm.std, "channels": splits.in_channels,
               "image_size": [cfg.image_size, cfg.image_size], "resize": cfg.resize}
    pre["augment"] = augment
    return RunData(batches, val, test, splits.classes, splits.in_channels, pre, norm, stored)


def evaluation_batches(data, preprocessing: dict, batch_size: int, device, ten_crop: bool = False,
                       channels_last: bool = False, workers: int = 4, normalizer=None,
                       checkpoint_file: Path | None = None) -> Iterable:
    """Batches of a split, preprocessed as the checkpoint says (the user does not repeat it); per-pixel or
    ZCA statistics from `normalizer`, else from the run directory of `checkpoint_file`."""
    norm = normalizer if normalizer is not None else find_normalization(preprocessing, checkpoint_file)
    if isinstance(data, ImageSet):
        pad = ten_crop_padding(preprocessing) if ten_crop else None  # raises where ten-crop does not apply
        return eval_batches(data, batch_size, norm, device, pad, channels_last)
    size = preprocessing["image_size"][0]
    tf = stream_transform(False, size, preprocessing.get("resize", round(size * 256 / 224)), norm, ten=ten_crop)
    sb = StreamBatches(data, batch_size, tf, channels=preprocessing["channels"], device=device, workers=workers,
                       channels_last=channels_last)

    def gen():
        for x, y in sb.iterate():
            yield (x.transpose(0, 1) if ten_crop else x), y  # (B, 10, C, H, W) -> (10, B, C, H, W)
    return gen()


# --- model -----------------------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> tuple[nn.Module, dict]:
    """The model and the exact arguments that rebuild it (stored in every checkpoint). The config's
    dropout rate goes to networks that declare a dropout option (`recipes.has_dropout`: DenseNets,
    WRNs); the others (He 2015/2016's ResNets, ResNeXts) train without, said in a note where a rate
    was asked for. A `drop_rate` given in model_args always reaches the builder."""
    from ..recipes import has_dropout

    for key, data_value, what in (("num_classes", num_classes, "classes"), ("in_channels", in_channels, "channels")):
        given = cfg.model_args.get(key, data_value)
        if given != data_value:  # a head of another size trains to nonsense (or fails at the first loss)
            raise ValueError(f"--model-arg {key}={given!r}: the data has {data_value} {what}, and training sets "
                             f"{key} from the data; drop --model-arg {key}")
    args = {"num_classes": num_classes, "in_channels": in_channels, **cfg.model_args}
    if has_dropout(cfg.model):  # the recipe's rate, 0 included, wins over the registry's
        args.setdefault("drop_rate", cfg.drop_rate or 0.0)
    model = create_model(cfg.model, **args)
    if cfg.drop_rate and "drop_rate" not in args:  # noted once the model is built: no note before another error
        print(f"note: {cfg.model} has no dropout option; training it without dropout", file=sys.stderr)
    return model, args


def _has_val(s) -> bool:
    """Whether the run (a RunState) holds validation images."""
    return s.data.val is not None and len(s.data.val) > 0


def validates_after(cfg: TrainConfig, iteration: int, steps_per_epoch: int) -> bool:
    """Whether a run validates after `iteration` optimizer steps in all: at each epoch's end, or every
    `val_every_iterations` steps counted over the run (stochastic depth's main.lua on SVHN: `if
    sgdState.iterCounter % 200 == 0 then accounting(...)`, its iterCounter never reset at an epoch)."""
    return iteration > 0 and iteration % (cfg.val_every_iterations or steps_per_epoch) == 0


class StepSchedule:
    """The recipe's learning rate as a function of (epoch, step): set before every optimizer step, so a
    resumed run, a warm-up and a decay in mid-epoch (He 2015's 32k iterations) need no state. Where the
    recipe resets the momentum at each decay (WRN's train.lua onStartEpoch: `state.optim =
    tablex.deepcopy(opt)` drops optim.sgd's `dfdx`), the buffers are cleared before the first step at the
    decayed rate; the next step starts them from the gradient, as optim.sgd does (`dfdx:copy(dfdx)`)."""

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer):
        self.cfg, self.optimizer = cfg, optimizer

    def lr(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
        return self.cfg.learning_rate(epoch, step, steps_per_epoch)

    def resets_momentum(self, epoch: int, step: int, steps_per_epoch: int) -> bool:
        from ..recipes import is_decay_step

        cfg = self.cfg
        return bool(cfg.reset_momentum_at_decay) and is_decay_step(
            cfg.lr_milestones(), epoch, step, steps_per_epoch, cfg.milestone_unit == "iterations")

    def apply(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        lr = self.lr(epoch, step, steps_per_epoch)
        reset = self.resets_momentum(epoch, step, steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if reset:
                for p in g["params"]:
                    self.optimizer.state.get(p, {}).pop("momentum_buffer", None)
        return lr


def make_optimizer(cfg: TrainConfig, model: nn.Module):
    """The recipe's SGD (momentum without dampening, Nesterov where the authors' code sets it, weight
    decay on every parameter) and its schedule. The schedule follows the authors' Lua: with 300 epochs
    and milestones (149, 224) the rate is 0.1 for epochs 1-149, 0.01 for 150-224 and 0.001 from 225
    (1-indexed), as liuzhuang13/DenseNet train.lua's `epoch >= 0.5 * nEpochs` (densenet.recipes)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, dampening=0.0,
                                nesterov=bool(cfg.nesterov) and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return optimizer, StepSchedule(cfg, optimizer)


# --- the loop --------------------------------------------------------------------------------------------

class _StopFlag:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: saving a resumable checkpoint after this step "
              f"(Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def cuda_numerics(device: torch.device):
    """On CUDA, for the duration of a run: cuDNN autotuning on (`cudnn.benchmark`; the shapes of a run are
    fixed), and TF32 in matrix products exactly when it is on in cuDNN's convolutions
    (`torch.backends.cudnn.allow_tf32`, True by default). PyTorch's defaults differ (products False,
    convolutions True), which would give the fused path (1x1 convolutions as matrix products) and the
    reference path (cuDNN) different precision for the same layer. The flags are restored afterwards.
    Nothing changes on other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    old = cudnn.benchmark, matmul.allow_tf32
    cudnn.benchmark, matmul.allow_tf32 = True, cudnn.allow_tf32
    try:
        yield
    finally:
        cudnn.benchmark, matmul.allow_tf32 = old


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Top-1 and top-5 error (percent), mean loss and the number of images. Ten-crop batches
    (10, B, C, H, W) are scored by the sum of the crops' logits, as the authors' train.lua
    (Trainer:computeScore: `output:view(B, nCrops, C):sum(2)`, its `:exp()` commented out); the loss
    is that of the summed logits' softmax."""
    was_training = model.training
    model.eval()
    n = 0
    sums = None  # loss sum, top-1 and top-5 hits, accumulated on the device: one sync at the end
    for x, y in batches:
        with autocast():
            if x.dim() == 5:
                logits = torch.stack([model(c).float() for c in x]).sum(0)
                logp = F.log_softmax(logits, 1)
            else:
                logp = F.log_softmax(model(x).float(), 1)
        top = logp.topk(min(5, logp.shape[1]), 1).indices
        hits = top == y[:, None]
        batch = torch.stack([F.nll_loss(logp, y, reduction="sum").to(_sum_dtype(logp.device)),
                             hits[:, 0].sum(), hits.any(1).sum()])
        sums = batch if sums is None else sums.add_(batch)
        n += len(y)
    model.train(was_training)
    if n == 0:
        return {"top1_error": float("nan"), "top5_error": float("nan"), "loss": float("nan"), "images": 0}
    loss_sum, correct1, correct5 = sums.tolist()
    return {"top1_error": 100.0 * (1 - correct1 / n), "top5_error": 100.0 * (1 - correct5 / n),
            "loss": loss_sum / n, "images": n}


def _sum_dtype(device: torch.device) -> torch.dtype:
    """Float64 sums (exact counts, the loss as the CPU adds it), float32 where float64 is missing (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class RunState:
    """Everything one run holds, filled in by `Trainer`'s phases in order: what trains (`net`: the model under DDP and torch.compile; `model`: the module itself, which is
    checkpointed and evaluated) and where the run stands (`epoch` done, `step` into the next one,
    `best` validation so far, the running `sums` of an epoch interrupted mid-way)."""

    cfg: TrainConfig
    dist: Distributed
    device: torch.device
    data: RunData
    model: nn.Module
    model_args: dict
    optimizer: torch.optim.Optimizer
    scheduler: StepSchedule
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    meta: dict  # model metadata written with every checkpoint
    run: RunDir | None = None
    net: nn.Module | None = None
    writer: Any = None
    epoch: int = 0
    step: int = 0
    best: dict | None = None
    sums: dict | None = None
    best_state: dict | None = None  # test_on best: the best validation epoch's weights, in memory

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch."""
        return len(self.data.train)

    def autocast(self):
        return (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                else contextlib.nullcontext())

    def evaluate_split(self, split) -> dict[str, float]:
        cfg = self.cfg
        return evaluate(self.model, evaluation_batches(split, self.data.preprocessing, cfg.eval_batch_size, self.device,
                                                       channels_last=cfg.channels_last, workers=cfg.workers,
                                                       normalizer=self.data.normalizer),
                        self.autocast)


@dataclass
class Trainer:
    """One run; `fit()` drives it through its phases (see `_fit`)."""

    cfg: TrainConfig
    resume: str | None = None

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        dist = Distributed.from_env()
        self._run: RunDir | None = None
        where = self.resume or cfg.out
        if self.resume and not Path(self.resume).expanduser().is_dir():
            raise CheckpointError(f"{self.resume} is not a run directory to resume (it does not exist)")
        try:  # one process per run directory: a second `--out X` or `--resume X` is refused, naming the first
            with DirLock(where) if where and dist.is_main else contextlib.nullcontext():
                return self._fit(dist)
        finally:
            dist.close()

    def _fit(self, dist: Distributed) -> dict[str, Any]:
        """The whole run, top to bottom."""
        device = self._check_request(dist)
        with cuda_numerics(device):
            return self._fit_on(dist, device)

    def _fit_on(self, dist: Distributed, device: torch.device) -> dict[str, Any]:
        s = self._build(dist, device)  # data, model, optimizer: the state at epoch 0
        if self.resume:
            finished = self._resume(s)
            if finished is not None:
                return finished  # the run had done all its epochs: its summary
        self._start(s)  # config.json, DDP, torch.compile, TensorBoard
        summary = self._loop(s)  # each epoch: train, validate, report, checkpoint
        self._test(s, summary)
        return self._finish(s, summary)

    # --- the phases, in order ---------------------------------------------------------------------------

    def _check_request(self, dist: Distributed) -> torch.device:
        """Refuse what cannot run before any work (a new run directory is claimed in `_start`)."""
        cfg = self.cfg
        device = dist.device(cfg.device)
        if cfg.sync_bn and device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm runs only on GPUs)")
        if cfg.batch_size % (dist.world_size * cfg.accumulate):
            raise ValueError(f"--batch-size {cfg.batch_size} must divide into {dist.world_size} process(es) "
                             f"x {cfg.accumulate} micro-batch(es)")
        if cfg.out and not self.resume:
            if RunDir(cfg.out).resolve("last") is not None:
                raise ValueError(f"{cfg.out} already holds a run: continue it with --resume {cfg.out}, "
                                 f"or give another --out")
            if dist.is_main:
                RunDir(cfg.out).check_new()  # refuses a directory with another run's files in it
        return device

    def _build(self, dist: Distributed, device: torch.device) -> RunState:
        """Seed, data, model, optimizer, in this order (the order fixes what the seed draws)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        in_channels = int(cfg.model_args.get("in_channels", 3))
        data = build_data(cfg, device, dist, in_channels, Path(self.resume) if self.resume else None)
        if cfg.epochs is None:  # a recipe that counts iterations, on a dataset of unknown size: now known
            cfg = self.cfg = cfg.resolve(train_images=len(data.train.data))
        model, model_args = build_model(cfg, len(data.classes), data.in_channels)
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and dist.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        optimizer, scheduler = make_optimizer(cfg, model)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        meta = model_metadata(cfg.model, model_args, data.classes, data.preprocessing, cfg.to_dict())
        return RunState(cfg, dist, device, data, model, model_args, optimizer, scheduler, scaler, amp_dtype, meta,
                        run=RunDir(cfg.out) if cfg.out else None)

    def _resume(self, s: RunState) -> dict[str, Any] | None:
        """Load the last checkpoint of the run being resumed into `s` (weights, optimizer, scaler, RNG,
        where it stood); the run's summary instead where it had finished."""
        cfg, run = s.cfg, RunDir(self.resume)
        saved = TrainConfig.from_dict(run.read_config(), str(Path(self.resume) / "config.json")).resolve()
        check_settings(saved, cfg, self.resume)  # the one rule for every resume (train/resume.py)
        weights, tensors, state = run.load_state("last")
        where = run.resolve("last")
        problem = describe_mismatch(s.model.state_dict(), weights)
        if problem:
            raise CheckpointError(f"{where} does not fit the model {cfg.model} {s.model_args}: {problem}")
        t = state["train"]
        if cfg.epochs < t["epoch"] <= (saved.epochs or -1) and t["step"] < s.steps:
            raise CheckpointError(f"{self.resume} has done {t['epoch']} epochs, more than the {cfg.epochs} asked "
                                  f"for: give --epochs {t['epoch']} or more")
        if t["epoch"] < cfg.epochs:
            cfg, change = plan_schedule(saved, cfg, t["epoch"], t["step"] > 0, self.resume)
            s.cfg = s.scheduler.cfg = self.cfg = cfg  # config.json records it (`_start`)
            if change and s.dist.is_main:
                print(change, file=sys.stderr)
        if not (t["epoch"] < cfg.epochs and t["step"] < s.steps or t["epoch"] == cfg.epochs and t["step"] == 0):
            raise CheckpointError(f"{where}/state.safetensors is damaged: epoch {t['epoch']}, step {t['step']} "
                                  f"lies outside this run's {cfg.epochs} epochs of {s.steps} steps")
        if t["epoch"] == cfg.epochs:  # finished: nothing to train, nothing to rewrite
            if s.dist.is_main:
                print(f"{self.resume} has finished all {cfg.epochs} epochs: nothing to resume "
                      f"(its summary is {Path(self.resume) / 'summary.json'})", file=sys.stderr)
            try:
                return json.loads((Path(self.resume) / "summary.json").read_text())
            except (OSError, ValueError):
                return {"epochs": cfg.epochs, "out": str(self.resume)}
        s.model.load_state_dict(weights)
        try:
            s.optimizer.load_state_dict(state["optimizer"])
            if "scaler" in t and cfg.amp == "fp16":
                s.scaler.load_state_dict(t["scaler"])
            set_rng_state(tensors)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{where}/state.safetensors does not fit this run's optimizer "
                                  f"({type(e).__name__}: {str(e)[:200]})") from None
        s.epoch, s.step, s.best, s.sums = t["epoch"], t["step"], t.get("best"), t.get("sums")
        if s.dist.is_main:
            print(f"resuming {self.resume} at epoch {s.epoch + 1}, step {s.step}", file=sys.stderr)
        s.run = run
        return None

    def _start(self, s: RunState) -> None:
        """The run directory's config and metrics; the model wrapped for DDP and torch.compile."""
        if s.run and s.dist.is_main:
            if not self.resume:  # claimed now that data and model are built: a refusal before leaves nothing
                s.run.start_new()
            if s.data.normalization_file is not None and not (self.resume and (s.run.path / NORMALIZATION_FILE).is_file()):
                save_normalization(s.data.normalization_file, s.run.path / NORMALIZATION_FILE)
            s.run.write_config(s.cfg.to_dict())
            s.run.truncate_metrics(s.epoch)
        s.net = s.model
        if s.dist.world_size > 1:
            # stochastic depth leaves the dropped units' parameters without gradients in a step
            skips = any(getattr(m, "survival_prob", 1.0) < 1.0 for m in s.model.modules())
            ids = [s.device.index] if s.device.type == "cuda" else None
            s.net = nn.parallel.DistributedDataParallel(s.model, device_ids=ids, find_unused_parameters=skips)
        if s.cfg.compile:
            s.net = torch.compile(s.net)
        self._run = s.run
        s.writer = _tensorboard(s.run, s.cfg) if s.dist.is_main else None

    def _loop(self, s: RunState) -> dict[str, Any]:
        """Epochs from where the run stands to cfg.epochs; returns the last epoch's summary."""
        cfg, summary = s.cfg, {}
        with _StopFlag() as stop:
            while s.epoch < cfg.epochs:
                lr = s.scheduler.lr(s.epoch, s.step, s.steps)
                t0 = time.perf_counter()
                stopped_at = self._train_epoch(s, stop)
                if stopped_at is not None:
                    self._stop_mid_epoch(s, stop, stopped_at)
                s.epoch += 1
                row = {"epoch": s.epoch, "lr": logs.clean_lr(lr), "train_loss": s.sums["loss"] / s.sums["n"],
                       "train_error": 100.0 * (1 - s.sums["correct"] / s.sums["n"]),
                       "images_per_s": s.sums["n"] / max(s.sums["time"], 1e-9),
                       "data_wait_frac": s.sums["wait"] / max(s.sums["time"], 1e-9),
                       "epoch_time_s": time.perf_counter() - t0}
                is_best = self._validate_epoch(s, row)
                s.sums, s.step = None, 0
                if s.dist.is_main:
                    self._report(s, row)
                self._save(s, s.epoch, 0, None, is_best)
                summary = {"epochs": s.epoch, **row}
                if stop.signal is not None and s.epoch < cfg.epochs:
                    raise TrainingStopped(f"stopped by {signal.Signals(stop.signal).name} after epoch {s.epoch}; "
                                          + (f"continue with `densenet train --resume {s.run.path}`" if s.run else
                                             "no --out given: nothing saved"), 128 + stop.signal)
        return summary

    def _test(self, s: RunState, summary: dict[str, Any]) -> None:
        """Test error of the weights the protocol reports (test_on: the final or the best validation epoch's)."""
        data = s.data
        if data.test is None or not len(data.test):
            return
        if s.cfg.test_on == "best" and s.best is not None and data.val is not None:
            if s.best_state is None and s.run is not None:  # resumed after the best epoch: from its checkpoint
                s.best_state = read_state_dict(s.run.path / "best" / MODEL_FILE)[0]
            if s.best_state is not None:
                s.model.load_state_dict(s.best_state)
                at = f", iteration {s.best['iteration']:,}" if "iteration" in s.best else ""
                summary["test_weights"] = f"best validation error (epoch {s.best['epoch']}{at})"
        summary.setdefault("test_weights", "final epoch")
        t = s.evaluate_split(data.test)
        summary.update({"test_top1_error": t["top1_error"], "test_top5_error": t["top5_error"],
                        "test_images": t["images"]})

    def _finish(self, s: RunState, summary: dict[str, Any]) -> dict[str, Any]:
        """summary.json, TensorBoard's hyperparameters and the summary line."""
        summary["best"] = s.best
        summary["out"] = str(s.run.path) if s.run else None
        if s.writer:
            logs.log_end(s.writer, s.cfg.to_dict(), summary)
            s.writer.close()
        if s.dist.is_main:
            if s.run:
                write_text_atomic(s.run.path / "summary.json", json.dumps(summary, indent=2) + "\n")
            print(_summary_line(summary), file=sys.stderr)
        return summary

    # --- the steps of an epoch ------------------------------------------------------------------------------

    def _train_epoch(self, s: RunState, stop: _StopFlag) -> int | None:
        """One epoch from step `s.step`, adding to `s.sums`; the step it stopped at (Ctrl-C / SIGTERM),
        or None at the epoch's end."""
        from tqdm import tqdm

        cfg, dist, batches, epoch = s.cfg, s.dist, s.data.train, s.epoch
        s.net.train()
        sums = s.sums = dict(s.sums or {"loss": 0.0, "correct": 0, "n": 0, "time": 0.0, "wait": 0.0})
        bar = tqdm(total=len(batches), initial=s.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and dist.is_main), leave=False, file=sys.stderr, dynamic_ncols=True)
        it = batches.iterate(epoch, s.step)
        step = s.step
        t_prev = time.perf_counter()
        try:
            while True:
                try:
                    x, y = next(it)
                except StopIteration:
                    break
                t_data = time.perf_counter()
                s.scheduler.apply(epoch, step, len(batches))
                s.optimizer.zero_grad(set_to_none=True)
                loss_sum, correct = self._forward_backward(s.net, x, y, s.scaler, s.autocast)
                if not math.isfinite(loss_sum):
                    raise TrainingStopped(
                        f"the loss became {loss_sum / len(y)} at epoch {epoch + 1}, step {step + 1}: training "
                        f"stopped; {self._kept()}. Lower --lr, or try --amp none.", 3)
                s.scaler.step(s.optimizer)
                s.scaler.update()
                sums["loss"] += loss_sum
                sums["correct"] += correct
                sums["n"] += len(y)
                now = time.perf_counter()
                sums["wait"] += t_data - t_prev
                sums["time"] += now - t_prev
                t_prev = now
                step += 1
                if self._validates_at(s, epoch * len(batches) + step) and step < len(batches):
                    self._validate_mid_epoch(s, step)  # the epoch's last step: validated with the epoch (_loop)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.3f}",
                                acc=f"{100 * sums['correct'] / sums['n']:.1f}%",
                                img_s=f"{sums['n'] * dist.world_size / sums['time']:.0f}", refresh=False)
                if dist.any(stop.signal is not None) and step < len(batches):
                    return step
        finally:
            bar.close()
        if dist.world_size > 1:  # every process reports the whole global batch's loss and accuracy
            s.sums = dist.sum_dict(sums, ("loss", "correct", "n"))
        return None

    def _forward_backward(self, net, x, y, scaler, autocast) -> tuple[float, int]:
        """Gradients of the batch's mean loss, in `accumulate` micro-batches; (loss sum, correct)."""
        chunks = list(zip(x.chunk(self.cfg.accumulate), y.chunk(self.cfg.accumulate)))
        stats = []  # (loss, correct) of each micro-batch, read from the device once per step (one sync)
        for i, (xc, yc) in enumerate(chunks):
            sync = i == len(chunks) - 1 or not hasattr(net, "no_sync")
            with contextlib.nullcontext() if sync else net.no_sync():  # DDP: all-reduce once per step
                with autocast():
                    out = net(xc)
                    loss = F.cross_entropy(out.float(), yc, label_smoothing=self.cfg.label_smoothing)
                # fp16: the GradScaler scales the loss up so that small gradients survive in float16
                scaler.scale(loss * (len(yc) / len(y))).backward()
            stats += [loss.detach(), (out.argmax(1) == yc).sum().to(loss.dtype)]
        values = torch.stack(stats).tolist()
        loss_sum = sum(v * len(yc) for v, (_, yc) in zip(values[0::2], chunks))
        return loss_sum, int(sum(values[1::2]))

    def _validate(self, s: RunState, row: dict[str, Any], iteration: int | None = None) -> bool:
        """Validation error into `row`; whether this epoch (or, with `iteration`, this point of the run) is
        the best so far (without validation: every epoch is). test_on best keeps the best weights in memory."""
        if not _has_val(s):
            return True
        v = s.evaluate_split(s.data.val)
        row.update({f"val_{k}": v[k] for k in ("loss", "top1_error", "top5_error")})
        if iteration is not None:
            row["val_iteration"] = iteration
        if not (s.best is None or v["top1_error"] < s.best["val_top1_error"]):
            return False
        s.best = {"epoch": s.epoch, "val_top1_error": v["top1_error"], "val_top5_error": v["top5_error"]}
        if iteration is not None:  # in mid-epoch: the epoch in progress (1-indexed) and the steps done
            s.best.update(epoch=-(-iteration // s.steps), iteration=iteration)
        if s.cfg.test_on == "best":  # SVHN, stochastic depth: the best validation model is tested
            s.best_state = {k: t.detach().clone() for k, t in s.model.state_dict().items()}
        return True

    def _validates_at(self, s: RunState, iteration: int) -> bool:
        """Whether the run, which has validation images, validates after `iteration` steps (validates_after)."""
        return validates_after(s.cfg, iteration, s.steps) and _has_val(s)

    def _validate_mid_epoch(self, s: RunState, step: int) -> None:
        """Validate at step `step` of the epoch in progress; a new best is checkpointed at once (`best`, and
        `last`: a mid-epoch checkpoint resumes exactly), since the epoch's end has other weights. The
        epoch's last validation goes to its metrics row (`s.sums["val"]`)."""
        row: dict[str, Any] = {}
        is_best = self._validate(s, row, s.epoch * s.steps + step)
        s.sums["val"] = row
        if is_best:
            self._save(s, s.epoch, step, s.sums, is_best=True)

    def _validate_epoch(self, s: RunState, row: dict[str, Any]) -> bool:
        """The validation of an epoch's end (`s.epoch` done): once per epoch, or with val_every_iterations
        where the epoch's last step is such a point, the row then carrying the epoch's last validation."""
        if not s.cfg.val_every_iterations or not _has_val(s):
            return self._validate(s, row)
        end = s.epoch * s.steps
        if self._validates_at(s, end):
            return self._validate(s, row, end)
        row.update((s.sums or {}).get("val") or {})
        return False

    def _save(self, s: RunState, epoch: int, step: int, sums: dict | None, is_best: bool = False) -> None:
        """A checkpoint of the run at (epoch, step), `last` (and `best`); refused if anything is non-finite."""
        self._check_finite(s.model, epoch, step or None)  # on every rank: DDP keeps them equal
        if s.run is None or not s.dist.is_main:
            return
        state = {"epoch": epoch, "step": step, "best": s.best, "sums": sums}
        if s.cfg.amp == "fp16":
            state["scaler"] = s.scaler.state_dict()
        s.run.save(epoch * s.steps + step, s.model, s.optimizer, s.meta, state, best=is_best)

    def _stop_mid_epoch(self, s: RunState, stop: _StopFlag, step: int):
        """Ctrl-C / SIGTERM in an epoch: every process saves where it stands, then the run stops."""
        s.dist.barrier()
        self._save(s, s.epoch, step, s.sums)
        where = f" in {s.run.path}" if s.run else ""
        raise TrainingStopped(f"stopped by {signal.Signals(stop.signal).name} at epoch {s.epoch + 1}, "
                              f"step {step}/{s.steps}; a resumable checkpoint is saved{where}"
                              + (f": continue with `densenet train --resume {s.run.path}`" if s.run else
                                 " (no --out given: nothing saved)"), 128 + stop.signal)

    def _kept(self) -> str:
        """What survives a stop: said truly, also when nothing was saved yet."""
        if self._run is None:
            return "no --out given: nothing is saved"
        last = self._run.resolve("last")
        return (f"the last good checkpoint is kept ({self._run.path / 'last'} -> {last.name})" if last else
                "no checkpoint was saved yet")

    def _check_finite(self, model: nn.Module, epoch: int, step: int | None = None) -> None:
        """Parameters and buffers (BN's running statistics too) must be finite before a checkpoint
        becomes `last` or `best`: a diverged model is never saved as good."""
        bad = non_finite(model.state_dict())
        if bad:
            at = f"epoch {epoch + 1}, step {step}" if step is not None else f"the end of epoch {epoch}"
            raise TrainingStopped(f"the weights became non-finite at {at} ({len(bad)} tensors, e.g. "
                                  f"{', '.join(bad[:3])}): training stopped without saving them; {self._kept()}. "
                                  f"Lower --lr, or try --amp none.", 3)

    def _report(self, s: RunState, row: dict[str, Any]) -> None:
        """The epoch's line on stderr, its row in metrics.jsonl/.csv and TensorBoard."""
        parts = [f"epoch {s.epoch}/{s.cfg.epochs}", f"lr {row['lr']:.4g}", f"train loss {row['train_loss']:.4f}",
                 f"train err {row['train_error']:.2f}%"]
        if "val_top1_error" in row:
            parts.append(f"val err {row['val_top1_error']:.2f}%")
        parts += [f"{row['images_per_s']:.0f} img/s", f"data wait {100 * row['data_wait_frac']:.1f}%"]
        print("  ".join(parts), file=sys.stderr)
        if s.run:
            s.run.append_metrics(row)
            logs.write_csv(s.run.path)
        if s.writer:
            logs.log_epoch(s.writer, row, s.epoch)


def _tensorboard(run: RunDir | None, cfg: TrainConfig):
    if run is None or not cfg.tensorboard:
        return None
    return logs.summary_writer(run.path / "tensorboard")  # None, said once, without tensorboard


def _summary_line(s: dict) -> str:
    parts = [f"done: {s.get('epochs', 0)} epochs"]
    if "val_top1_error" in s:
        parts.append(f"val error {s['val_top1_error']:.2f}% (final epoch)")
    if s.get("best") and "val_top1_error" in s["best"]:
        at = f", iteration {s['best']['iteration']:,}" if "iteration" in s["best"] else ""
        parts.append(f"best val error {s['best']['val_top1_error']:.2f}% (epoch {s['best']['epoch']}{at})")
    if "test_top1_error" in s:
        parts.append(f"test error {s['test_top1_error']:.2f}% ({s['test_weights']}, {s['test_images']} images)")
    if s.get("out"):
        parts.append(f"checkpoints in {s['out']}")
    return "; ".join(parts)


def fit(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train with `cfg` (resolved first); returns the summary (final epoch's metrics, best, test error)."""
    return Trainer(cfg.resolve(), resume).fit()
