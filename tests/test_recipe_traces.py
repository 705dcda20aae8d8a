"""A trace per family: the learning rate, the batch and the evaluation points of the first and the boundary
iterations, computed from the recipe (TrainConfig.resolve, the engine's StepSchedule and validates_after),
equal those of a transcription of the authors' schedule code (cited beside each). Pure arithmetic: no data,
no training."""
from __future__ import annotations

import math

import pytest
import torch

from densenet.data.loader import _num_batches
from densenet.train import TrainConfig
from densenet.train.engine import StepSchedule, validates_after


def resolved(model: str, dataset: str) -> tuple[TrainConfig, int]:
    """The resolved config and its optimizer steps per epoch (the loader's count: partial batch kept or dropped)."""
    cfg = TrainConfig(model=model, dataset=dataset).resolve()
    return cfg, _num_batches(cfg.known_train_images() or 1_281_167, cfg.batch_size, bool(cfg.drop_last))


def boundary_epochs(n: int, decays) -> list[int]:
    """1-indexed epochs worth checking: the first two, the last, and both sides of every decay."""
    return sorted({e for d in decays for e in (d - 1, d, d + 1) if 1 <= e <= n} | {1, 2, n})


def assert_epoch_trace(cfg: TrainConfig, steps: int, lua_lr, epochs: list[int]) -> None:
    """The rate of the first and last step of each 1-indexed epoch is the Lua's rate of that epoch."""
    for e in epochs:
        for step in (0, steps - 1):
            assert cfg.learning_rate(e - 1, step, steps) == pytest.approx(lua_lr(e), rel=1e-12), (e, step)


def assert_epoch_end_evaluation(cfg: TrainConfig, steps: int) -> None:
    """Evaluated once per epoch, at its end (the Lua's test after each Trainer:train)."""
    assert not cfg.val_every_iterations
    points = [i for i in range(1, 3 * steps + 1) if validates_after(cfg, i, steps)]
    assert points == [steps, 2 * steps, 3 * steps]


# --- DenseNet: liuzhuang13/DenseNet train.lua Trainer:learningRate (lines 188-199 @e3d24fb) ---------------

def test_densenet_cifar_svhn_imagenet_follow_train_lua():
    for dataset, n_epochs in (("cifar10", 300), ("svhn", 40)):
        cfg, steps = resolved("densenet_bc_100_k12", dataset)

        def lua(epoch, n=n_epochs):  # cifar10/cifar100 branch
            decay = 2 if epoch >= 0.75 * n else 1 if epoch >= 0.5 * n else 0
            return 0.1 * math.pow(0.1, decay)

        assert (cfg.batch_size, cfg.epochs) == (64, n_epochs)  # README: -batchSize 64 -nEpochs 300
        assert_epoch_trace(cfg, steps, lua, boundary_epochs(n_epochs, (0.5 * n_epochs, 0.75 * n_epochs)))
        assert_epoch_end_evaluation(cfg, steps)
    cfg, steps = resolved("densenet121", "imagenet")
    assert (cfg.batch_size, cfg.epochs) == (256, 90)
    assert_epoch_trace(cfg, steps, lambda e: 0.1 * math.pow(0.1, math.floor((e - 1) / 30)), boundary_epochs(90, (31, 61)))


# --- fb.resnet.torch: train.lua Trainer:learningRate (lines 174-185 @985e569), imagenet ---------------------

def test_resnet_imagenet_follows_fb_resnet_torch():
    cfg, steps = resolved("resnet50", "imagenet")
    assert (cfg.batch_size, cfg.epochs, cfg.nesterov) == (256, 90, True)
    assert_epoch_trace(cfg, steps, lambda e: 0.1 * math.pow(0.1, math.floor((e - 1) / 30)), boundary_epochs(90, (31, 61)))


# --- He 2015 / He 2016: Caffe's "multistep" policy at iteration counts (papers; no code released) ----------

def caffe_multistep(it: int, warmup: int) -> float:
    """He 2015 Sec. 4.2 / He 2016 appendix as Caffe runs it: iteration `it` (0-indexed, the rate of the
    update it makes) at 0.01 for the first `warmup`, then base_lr 0.1 x gamma 0.1 ^ (stepvalues 32k, 48k passed)."""
    if it < warmup:
        return 0.01
    return 0.1 * 0.1 ** sum(it >= s for s in (32_000, 48_000))


@pytest.mark.parametrize("model, dataset, warmup", [("resnet56", "cifar10", 0), ("resnet110", "cifar10", 400),
                                                     ("preact_resnet164", "cifar100", 400),
                                                     ("preact_resnet1001", "cifar100", 400)])
def test_he_caffe_recipes_decay_at_exact_iterations(model, dataset, warmup):
    cfg, steps = resolved(model, dataset)
    assert (cfg.batch_size, cfg.momentum, cfg.nesterov, cfg.milestone_unit) == (128, 0.9, False, "iterations")
    assert steps == 391 and cfg.epochs * steps >= 64_000  # 50,000 / 128, partial batch kept: 164 epochs
    for it in sorted({0, 1, 399, 400, 401, 31_999, 32_000, 32_001, 47_999, 48_000, 63_999} | set(range(0, 800, 7))):
        epoch, step = divmod(it, steps)
        assert cfg.learning_rate(epoch, step, steps) == pytest.approx(caffe_multistep(it, warmup), rel=1e-12), it
    assert_epoch_end_evaluation(cfg, steps)


# --- Pre-activation ResNet-1001, C10+: resnet-1k-layers on fb.resnet.torch @eff127f (train.lua 163-172) ----

def test_preact_resnet1001_cifar10_is_the_torch_batch_64_run():
    cfg, steps = resolved("preact_resnet1001", "cifar10")
    assert (cfg.batch_size, cfg.epochs, cfg.nesterov, cfg.warmup_iterations) == (64, 200, True, 0)
    assert steps == 782  # 50,000 / 64, fb.resnet.torch's dataloader keeps the partial batch
    lua = lambda e: 0.1 * math.pow(0.1, 2 if e >= 122 else 1 if e >= 81 else 0)  # noqa: E731
    assert_epoch_trace(cfg, steps, lua, boundary_epochs(200, (81, 122)))
    assert_epoch_end_evaluation(cfg, steps)


# --- Stochastic depth: yueatsprograms/Stochastic_Depth main.lua (lines 53-55, 164-202 @86b5cdd) ------------

def sd_main_lua(dataset: str, max_epochs: int, n_batches: int, epochs: int):
    """main.lua's loop for the first `epochs` epochs: (epochCounter, batch index, learning rate, accounting
    after this step?) of every optimizer step."""
    lr_schedule = {"svhn": (0.6, 0.7), "cifar10": (0.5, 0.75), "cifar100": (0.5, 0.75)}[dataset]
    epoch_counter, iter_counter = 1, 1
    while epoch_counter <= epochs:
        if epoch_counter < max_epochs * lr_schedule[0]:
            lr = 0.1
        elif epoch_counter < max_epochs * lr_schedule[1]:
            lr = 0.01
        else:
            lr = 0.001
        for i in range(1, n_batches + 1):
            account = False
            if dataset == "svhn":
                account = iter_counter % 200 == 0
                iter_counter += 1
            elif i == n_batches:
                account = True  # `if opt.dataset ~= 'svhn' then accounting(...)` after the epoch
            yield epoch_counter, i, lr, account
        epoch_counter += 1


@pytest.mark.parametrize("dataset, epochs, train_images", [("svhn", 50, 604_388 - 6_000), ("cifar10", 500, 45_000)])
def test_stochastic_depth_schedule_and_validation_points_follow_main_lua(dataset, epochs, train_images):
    cfg, steps = resolved("resnet110_stochdepth", dataset)
    assert (cfg.batch_size, cfg.epochs, cfg.nesterov, cfg.test_on) == (128, epochs, True, "best")
    assert cfg.known_train_images() == train_images and steps == -(-train_images // 128)  # split(): partial kept
    first = 3 if dataset == "svhn" else 2
    decays = (30, 35) if dataset == "svhn" else (250, 375)  # the first epochs at 0.01 and 0.001 (1-indexed)
    checked = set(range(1, first + 1)) | set(boundary_epochs(epochs, decays))
    for e in sorted(checked):
        lua_lr = next(lr for ep, _, lr, _ in sd_main_lua(dataset, epochs, 1, e) if ep == e)
        for step in (0, steps - 1):  # main.lua writes 0.01 and 0.001; here 0.1 x 0.1^k
            assert cfg.learning_rate(e - 1, step, steps) == pytest.approx(lua_lr, rel=1e-12), e
    # every evaluation point of the first epochs: SVHN every 200 iterations across epoch ends, CIFAR per epoch
    lua_points = [(ep - 1) * steps + i for ep, i, _, account in sd_main_lua(dataset, epochs, steps, first) if account]
    ours = [it for it in range(1, first * steps + 1) if validates_after(cfg, it, steps)]
    assert ours == lua_points
    if dataset == "svhn":
        assert cfg.milestones == (29.0, 34.0) and cfg.val_every_iterations == 200 and ours[:2] == [200, 400]


# --- Wide ResNet: szagoruyko/wide-residual-networks train.lua onStartEpoch (lines 159-171 @5ed3b72) -------

def wrn_train_lua(lr: float, epoch_step: tuple[int, ...], ratio: float, max_epoch: int):
    """onStartEpoch before each 1-indexed epoch: (epoch, rate, momentum reset?) as train.lua sets them
    (`opt.learningRate = opt.learningRate * opt.learningRateDecayRatio; state.optim = tablex.deepcopy(opt)`)."""
    for epoch in range(1, max_epoch + 1):
        reset = epoch in epoch_step  # tablex.find(opt.epoch_step, epoch)
        if reset:
            lr = lr * ratio
        yield epoch, lr, reset


@pytest.mark.parametrize("model, dataset, lua", [
    ("wrn_28_10", "cifar10", (0.1, (60, 120, 160), 0.2, 200)),  # scripts/train_cifar.sh
    ("wrn_16_4", "svhn", (0.01, (80, 120), 0.1, 160)),  # scripts/train_svhn.sh
])
def test_wide_resnet_rate_momentum_reset_and_batches_follow_train_lua(model, dataset, lua):
    cfg, steps = resolved(model, dataset)
    assert (cfg.batch_size, cfg.epochs, cfg.drop_last, cfg.reset_momentum_at_decay) == (128, lua[3], True, True)
    assert steps == cfg.known_train_images() // 128  # :batch(opt.batchSize, 'skip-last')
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr, momentum=0.9)
    sched = StepSchedule(cfg, opt)
    for epoch, lr, reset in wrn_train_lua(*lua):
        if epoch in boundary_epochs(lua[3], lua[1]):
            assert sched.lr(epoch - 1, 0, steps) == pytest.approx(lr, rel=1e-12), epoch
            assert sched.lr(epoch - 1, steps - 1, steps) == pytest.approx(lr, rel=1e-12), epoch
        assert sched.resets_momentum(epoch - 1, 0, steps) == reset, epoch
        assert not sched.resets_momentum(epoch - 1, 1, steps)
    opt.state[p]["momentum_buffer"] = torch.ones(1)  # the reset itself: the buffer is gone before the decayed step
    sched.apply(lua[1][0] - 1, 0, steps)
    assert "momentum_buffer" not in opt.state[p] and opt.param_groups[0]["lr"] == pytest.approx(lua[0] * lua[2])
    assert_epoch_end_evaluation(cfg, steps)


# --- ResNeXt: facebookresearch/ResNeXt train.lua Trainer:learningRate (lines 174-183 @1f59a2c) -------------

def test_resnext_follows_its_train_lua():
    cfg, steps = resolved("resnext29_8x64d", "cifar10")
    assert (cfg.batch_size, cfg.epochs, cfg.weight_decay) == (128, 300, 5e-4)

    def lua(epoch, n=300):
        decay = 2 if epoch / n > 0.74 else 1 if epoch / n > 0.49 else 0
        return 0.1 * math.pow(0.1, decay)

    assert_epoch_trace(cfg, steps, lua, boundary_epochs(300, (148, 223)))
    assert_epoch_end_evaluation(cfg, steps)
    cfg, steps = resolved("resnext50_32x4d", "imagenet")
    assert (cfg.batch_size, cfg.epochs) == (256, 100)
    assert_epoch_trace(cfg, steps, lambda e: 0.1 * math.pow(0.1, math.floor((e - 1) / 30)),
                       boundary_epochs(100, (31, 61, 91)))
