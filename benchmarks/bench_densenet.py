"""Training and inference speed and peak memory of this package's DenseNet against torchvision's.

    PYTHONPATH=src python benchmarks/bench_densenet.py --device cpu            # the full run (~10 min, 2 cores)
    PYTHONPATH=src python benchmarks/bench_densenet.py --device cpu --quick    # CIFAR only, fewer steps
    PYTHONPATH=src python benchmarks/bench_densenet.py --device cuda --amp bf16 --compile

Networks: CIFAR DenseNet-BC (L=100, k=12), batch 64, 32x32; DenseNet-121, batch 32, 224x224.
Training throughput is images/s of a full step (forward, backward, SGD with momentum); every
configuration is warmed until its step time is stable (benchmarks/steady.py: at least --warmup steps,
10 by default; torchvision needs 5-10), then measured in interleaved rounds, so that load from other
processes hits all of them alike; the median step of the rounds is reported (the best beside it).
Inference: the median of the timings after the same warm-up. Peak memory is measured per
configuration in a fresh process: peak RSS (VmHWM) on the CPU (and its growth over the RSS before the first
step, i.e. activations and gradients), torch.cuda.max_memory_allocated on a GPU. Every figure is
printed with its ratio to torchvision's NCHW DenseNet of the same configuration.

torchvision's CIFAR network is built from its own `_DenseBlock` and `_Transition` with the CIFAR stem
(3x3 convolution, 2k maps); parameter counts are checked equal to this package's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# Every configuration of a run shares one process, hence oneDNN's cache of compiled kernels (1,024
# entries by default). Several DenseNets' convolutions in several layouts overflow it, and the
# configurations then evict each other's kernels and recompile them at every pass (torchvision NCHW
# measured 11.1 instead of 17.9 img/s, DenseNet-121 batch 1). A process serving one model never sees that.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch
import torch.nn as nn
import torch.nn.functional as F

NETS = {  # name in the registry, batch, input size, classes
    "cifar": dict(model="densenet_bc_100_k12", batch=64, size=32, classes=10, title="DenseNet-BC (L=100, k=12), batch 64, 32x32"),
    "imagenet": dict(model="densenet121", batch=32, size=224, classes=1000, title="DenseNet-121, batch 32, 224x224"),
}
# implementation -> (library, options, channels_last)
IMPLS = {
    "ours": ("ours", {}, True),  # create_model(name) as it comes, fed channels_last
    "ours-nchw": ("ours", {}, False),
    "ours-memeff": ("ours", {"memory_efficient": True}, True),
    "ours-reference": ("ours", {"fused": False}, True),  # the paper's equation, concatenation per layer
    "tv": ("tv", {}, False),
    "tv-cl": ("tv", {}, True),
    "tv-memeff": ("tv", {"memory_efficient": True}, False),
    "tv-memeff-cl": ("tv", {"memory_efficient": True}, True),
}
BASELINE = "tv"


def torchvision_cifar(depth: int = 100, k: int = 12, memory_efficient: bool = False, num_classes: int = 10):
    """torchvision's DenseNet-BC blocks and transitions with the CIFAR stem (3x3 conv, 2k maps)."""
    from torchvision.models.densenet import _DenseBlock, _Transition

    n = (depth - 4) // 6
    c = 2 * k
    features = nn.Sequential()
    features.add_module("conv0", nn.Conv2d(3, c, 3, padding=1, bias=False))
    for i in range(3):
        features.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, 4, k, 0.0, memory_efficient))
        c += n * k
        if i < 2:
            features.add_module(f"transition{i + 1}", _Transition(c, c // 2))
            c //= 2
    features.add_module("norm5", nn.BatchNorm2d(c))
    features.add_module("relu5", nn.ReLU(inplace=True))
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c, num_classes))


def build(net: str, impl: str, depth: int | None = None, device: str = "cpu"):
    """(model, input, target) for one configuration, in the memory format the configuration names."""
    import densenet
    import torchvision

    spec = NETS[net]
    lib, opts, channels_last = IMPLS[impl]
    torch.manual_seed(0)
    if lib == "ours":
        kw = dict(opts, **({"depth": depth} if depth else {}))
        model = densenet.create_model(spec["model"], **kw)
    elif net == "cifar":
        model = torchvision_cifar(depth or 100, memory_efficient=opts.get("memory_efficient", False))
    else:
        model = torchvision.models.densenet121(memory_efficient=opts.get("memory_efficient", False))
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"])
    y = torch.randint(0, spec["classes"], (spec["batch"],))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt), x.to(device, memory_format=fmt), y.to(device)


class Trainer:
    """One configuration ready to step: model, data, SGD (the paper's: Nesterov momentum, weight decay)."""

    def __init__(self, net, impl, args, depth=None):
        self.model, self.x, self.y = build(net, impl, depth, args.device)
        if args.compile:
            self.model = torch.compile(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        self.device, self.amp = args.device, args.amp
        self.times: list[float] = []

    def step(self) -> float:
        sync(self.device)
        t = time.perf_counter()
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        sync(self.device)
        return time.perf_counter() - t

    @torch.no_grad()
    def infer(self, batch: int) -> float:
        self.model.eval()
        x = self.x[:batch]
        sync(self.device)
        t = time.perf_counter()
        with autocast(self.device, self.amp):
            self.model(x)
        sync(self.device)
        return time.perf_counter() - t


def autocast(device: str, amp: str | None):
    return torch.autocast(device, dtype=getattr(torch, amp), enabled=amp is not None) if amp else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def proc_status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MB. ru_maxrss is not used:
    Linux carries it over from the parent across fork and exec, so a worker would report its parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_worker(args) -> None:
    """In a fresh process: peak memory of a training step of one configuration, as JSON on stdout."""
    tr = Trainer(args.net, args.impl, args, args.depth)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = proc_status_mb("VmRSS")
    tr.step()
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = proc_status_mb("VmHWM")
    print(json.dumps(dict(peak_mb=peak, before_mb=before, growth_mb=peak - before)))


def in_fresh_process(job: str, net: str, args, impl: str = "ours", depth=None):
    """Run one job of this script in a new process and return its JSON answer. Throughput runs there
    too: a process that has trained eight networks keeps gigabytes of freed-but-mapped memory."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job, "--net", net, "--impl", impl,
           "--device", args.device, "--threads", str(args.threads), "--warmup", str(args.warmup)]
    cmd += ["--depth", str(depth)] if depth else []
    cmd += ["--amp", args.amp] if args.amp else []
    cmd += ["--compile"] if args.compile else []
    cmd += ["--quick"] if args.quick else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(net, impl, args, depth=None) -> dict:
    return in_fresh_process("memory", net, args, impl, depth)


ROUNDS = {"cifar": 4, "imagenet": 2}


def worker(args) -> None:
    if args.worker == "memory":
        return memory_worker(args)
    rounds = 2 if args.quick else ROUNDS[args.net]
    if args.worker == "throughput":
        res = throughput(args.net, list(IMPLS), args, rounds, steps=1)
    else:
        res = inference(args.net, ["ours", "ours-nchw", "tv", "tv-cl"], args, rounds)
    print(json.dumps(res))


def throughput(net, impls, args, rounds, steps) -> dict:
    """Images/s of each configuration after a steady warm-up (first-step allocations, oneDNN primitive
    creation, compile), measured in interleaved rounds: {impl: (median, best)}."""
    from steady import interleaved, warm_all

    trainers = {impl: Trainer(net, impl, args) for impl in impls}
    check_same_size(trainers)
    warm_all({impl: tr.step for impl, tr in trainers.items()}, min_steps=args.warmup)
    times = interleaved({impl: tr.step for impl, tr in trainers.items()}, rounds * steps)
    batch = NETS[net]["batch"]
    return {impl: (batch / statistics.median(t), batch / min(t)) for impl, t in times.items()}


def inference(net, impls, args, rounds) -> dict:
    """Images/s of eval-mode forward passes at batch 1 and the network's training batch."""
    res = {}
    for impl in impls:
        tr = Trainer(net, impl, args)
        res[impl] = {}
        for batch in (1, NETS[net]["batch"]):
            from steady import warm_up

            warm_up(lambda: tr.infer(batch), min_steps=args.warmup)
            n = max(rounds, 5 if batch > 1 else 20)
            res[impl][batch] = batch / statistics.median(tr.infer(batch) for _ in range(n))
    return res


def check_same_size(trainers) -> None:
    counts = {impl: sum(p.numel() for p in tr.model.parameters()) for impl, tr in trainers.items()}
    assert len(set(counts.values())) == 1, f"parameter counts differ: {counts}"


def ratio(v, base, lower_is_better=False):
    r = (base / v) if lower_is_better else (v / base)
    return f"{r:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    p.add_argument("--quick", action="store_true", help="CIFAR only, fewer rounds (about 3 minutes)")
    p.add_argument("--amp", choices=["bfloat16", "float16"], help="autocast dtype (GPU; not the exact fp32 maths)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--warmup", type=int, default=10,
                   help="at least this many untimed steps of each, then until its time is stable (steady.py)")
    p.add_argument("--json", help="write all results here too")
    p.add_argument("--worker", choices=["memory", "throughput", "inference"], help=argparse.SUPPRESS)
    p.add_argument("--net", default="cifar", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    if args.worker:
        return worker(args)

    import torchvision

    nets = ["cifar"] if args.quick else ["cifar", "imagenet"]
    results = dict(date=datetime.date.today().isoformat(), command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                   machine=cpu_name(), threads=args.threads, torch=torch.__version__,
                   torchvision=torchvision.__version__, python=platform.python_version(), device=args.device,
                   amp=args.amp, compile=args.compile)
    print(f"# {results['date']}  {results['machine']}, {args.threads} threads, torch {torch.__version__}, "
          f"device {args.device}, amp {args.amp}, compile {args.compile}")
    for net in nets:
        print(f"\n## Training: {NETS[net]['title']}  (ratios: to torchvision NCHW '{BASELINE}', and to 'tv-cl')")
        tp = in_fresh_process("throughput", net, args)
        mem = {impl: measure_memory(net, impl, args) for impl in IMPLS}
        results[f"train_{net}"] = {impl: dict(median_img_s=tp[impl][0], best_img_s=tp[impl][1], **mem[impl])
                                   for impl in IMPLS}
        print(f"{'config':16s} {'img/s':>8s} {'vs tv':>6s} {'vs tv-cl':>8s} {'best':>7s} | "
              f"{'peak MB':>8s} {'vs tv':>6s} | {'growth MB':>9s} {'vs tv':>6s} {'vs tv-memeff':>12s}")
        for impl in IMPLS:
            r, m = results[f"train_{net}"][impl], mem
            print(f"{impl:16s} {r['median_img_s']:8.1f} {ratio(tp[impl][0], tp[BASELINE][0]):>6s} "
                  f"{ratio(tp[impl][0], tp['tv-cl'][0]):>8s} {r['best_img_s']:7.1f} | {r['peak_mb']:8.0f} "
                  f"{ratio(m[impl]['peak_mb'], m[BASELINE]['peak_mb'], True):>6s} | {r['growth_mb']:9.0f} "
                  f"{ratio(m[impl]['growth_mb'], m[BASELINE]['growth_mb'], True):>6s} "
                  f"{ratio(m[impl]['growth_mb'], m['tv-memeff']['growth_mb'], True):>12s}", flush=True)
        save(results, args)
    print("\n## Peak memory against depth: DenseNet-BC (k=12), batch 64, 32x32 (ratios: torchvision / ours)")
    depths = [100, 190] if args.quick else [100, 190, 250]
    impls = ["ours", "ours-memeff", "tv", "tv-memeff"]
    results["depth"] = {}
    print(f"{'L':>4s} " + " ".join(f"{i + ' MB':>16s}" for i in impls) + "   (growth over the RSS before the first step)")
    for d in depths:
        row = results["depth"][d] = {impl: measure_memory("cifar", impl, args, d) for impl in impls}
        print(f"{d:4d} " + " ".join(f"{row[i]['growth_mb']:16.0f}" for i in impls)
              + "   peak " + " ".join(f"{row[i]['peak_mb']:.0f}" for i in impls), flush=True)
    save(results, args)
    print("\n## Inference (eval, no_grad), images/s")
    for net in nets:
        inf = {impl: {int(b): v for b, v in r.items()} for impl, r in in_fresh_process("inference", net, args).items()}
        results[f"infer_{net}"] = inf
        for batch in (1, NETS[net]["batch"]):
            print(f"{net:9s} batch {batch:3d}: " + "  ".join(
                f"{impl} {inf[impl][batch]:.1f} ({ratio(inf[impl][batch], inf[BASELINE][batch])})" for impl in inf))
    save(results, args)


def save(results: dict, args) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
