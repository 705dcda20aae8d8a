"""The default (fused) path on a GPU: float32, fp16/bf16 autocast, channels_last, SyncBatchNorm, DDP
with NCCL, and the training loop with --amp. Every test here needs CUDA and skips cleanly without it;
the rest of the model tests run on a GPU with `pytest --device cuda` (tests/conftest.py).
benchmarks/gpu_check.py runs the quick ones (-m "not slow") after its throughput and memory sections.
The fused path is opt-in on CUDA (fused="auto" takes the reference path there until measured): the
tests here build it with fused=True."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import densenet

from helpers import MODES, NETS, assert_same, train_step

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


def build32(name, kw, **mode):
    torch.manual_seed(0)
    return densenet.create_model(name, **kw, **mode).to(CUDA)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name, kw", NETS)
@pytest.mark.parametrize("mode", MODES[:2], ids=["fused", "fused-memeff"])
def test_float32_matches_the_reference_path(name, kw, mode, channels_last, exact_cuda):
    """Float32 on the GPU (TF32 off): outputs, gradients and BN buffers of two steps, then eval."""
    x = torch.randn(4, 3, 48, 40, device=CUDA)
    plain = build32(name, kw, fused=False)
    other = build32(name, kw, **mode)
    other.load_state_dict(plain.state_dict())
    if channels_last:
        other = other.to(memory_format=torch.channels_last)
    xo = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    for seed in (1, 2):
        assert_same(train_step(other, xo, seed), train_step(plain, x, seed), rtol=2e-4)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(xo), plain.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES[:2], ids=["fused", "fused-memeff"])
def test_fp16_autocast_outputs_match_the_reference_path(mode):
    """Under CUDA fp16 autocast (bf16: test_fused.py with --device cuda) the fused path's outputs, in
    training and evaluation, equal the reference path's to fp16 precision; gradient accuracy against
    float64: test_fused.py::test_autocast_gradients_as_accurate_as_the_reference_path --device cuda."""
    x = torch.randn(8, 3, 32, 32, device=CUDA)
    plain = build32("densenet_bc_100_k12", dict(depth=22), fused=False)
    fused = build32("densenet_bc_100_k12", dict(depth=22), **mode)
    fused.load_state_dict(plain.state_dict())
    for train in (True, False):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            a, b = fused.train(train)(x), plain.train(train)(x)
        assert a.dtype == b.dtype == torch.float16
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02)


def test_sync_batchnorm_model_takes_the_reference_path(exact_cuda):
    """convert_sync_batchnorm replaces the BNs: the fused path steps aside (it covers plain BatchNorm2d).
    TF32 off (exact_cuda): the fused model's 1x1 products and the reference's cuDNN convolutions would
    otherwise differ at TF32 precision (~1e-3), not float32's."""
    from densenet.models.fused import policy

    ref = build32("densenet_bc_100_k12", dict(depth=10), fused=True)
    m = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    block = m.features.denseblock1
    assert not policy.supported(list(block.values()))
    x = torch.randn(2, 3, 8, 8, device=CUDA)
    with torch.no_grad():  # eval: SyncBatchNorm needs no process group
        torch.testing.assert_close(m.eval()(x), ref.eval()(x))


def _nccl_worker(rank, world, init_file, result_file, sync_bn):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.cuda.set_device(rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = densenet.create_model("densenet_bc_100_k12", depth=16, fused=True).cuda(rank)  # opt-in on CUDA
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = DDP(model, device_ids=[rank])
        torch.manual_seed(123)
        x = torch.randn(2 * world, 3, 16, 16)[2 * rank:2 * rank + 2].cuda(rank)  # the CPU generator, as below
        ddp(x).sum().backward()
        if rank == 0:
            torch.save({n: p.grad.cpu() for n, p in model.named_parameters()}, result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP with NCCL needs two GPUs (one process each)")
@pytest.mark.parametrize("sync_bn", [False, True], ids=["ddp", "ddp-syncbn"])
def test_ddp_with_nccl(tmp_path, sync_bn, exact_cuda):
    """Two processes, one GPU each: DDP's gradients equal the mean of each half's own gradients (each
    half normalised by its own statistics); with SyncBatchNorm, half the gradient of the whole batch."""
    import torch.multiprocessing as mp

    result = tmp_path / "grads.pt"
    mp.spawn(_nccl_worker, args=(2, str(tmp_path / "init"), str(result), sync_bn), nprocs=2, join=True)
    got = torch.load(result, weights_only=True)
    torch.manual_seed(123)
    x = torch.randn(4, 3, 16, 16).to(CUDA)  # drawn on the CPU like the workers' (CUDA's Philox draws others)
    expected = {}
    halves = [x] if sync_bn else [x[:2], x[2:]]
    for xi in halves:
        model = build32("densenet_bc_100_k12", dict(depth=16), fused=False)
        model(xi).sum().backward()
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad.cpu() / 2
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-5 * expected[n].abs().max().item(), msg=n)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_loop_on_cuda(tmp_path, amp):
    """`densenet train --device cuda --amp ...` end to end on a tiny folder: finite loss, a checkpoint
    (with the GradScaler's state for fp16) that resumes."""
    from densenet.train import TrainConfig, fit
    from densenet.train.checkpoint import RunDir

    from helpers import make_folder

    folder = make_folder(tmp_path / "shapes", per_class=24, test_per_class=6, size=12)
    kw = dict(model="densenet_bc_100_k12", model_args={"depth": 10, "growth_rate": 6}, dataset="folder",
              data=str(folder), batch_size=16, val_size=9, progress=False, tensorboard=False, device="cuda",
              amp=amp, channels_last=True, out=str(tmp_path / "run"))
    s = fit(TrainConfig(epochs=1, **kw))
    assert math.isfinite(s["train_loss"]) and 0 <= s["val_top1_error"] <= 100
    state = RunDir(tmp_path / "run").load_state("last")[2]
    assert ("scaler" in state["train"]) == (amp == "fp16")
    s = fit(TrainConfig(epochs=2, **kw), resume=str(tmp_path / "run"))
    assert s["epochs"] == 2
