"""Training speed on the CPU under each instruction set: this package against torchvision, and the
fraction of the machine's fp32 matrix-multiply peak the training step reaches.

    PYTHONPATH=src python benchmarks/bench_isa.py                       # native ISA and AVX2, CIFAR
    PYTHONPATH=src python benchmarks/bench_isa.py --nets cifar,imagenet --rounds 3
    PYTHONPATH=src python benchmarks/bench_isa.py --isas native --allocators default,keep

`--allocators keep` runs the workers with glibc's malloc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 2 GiB, settings any user of either model can make),
for every configuration alike; `default` is the C library's defaults, what a program that imports torch
gets. Large tensors are otherwise mapped afresh and faulted in page by page at every step.

Each ISA runs in its own process (oneDNN and MKL read ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS at
start-up; AVX2 is how an AVX2-only machine is measured on an AVX-512 one). Inside a process, each
configuration is warmed until its step time is stable (benchmarks/steady.py: at least 10 steps;
torchvision needs 5-10), then all step in interleaved rounds, so that load from other processes hits
them alike; the median step is reported with its spread and its ratio to torchvision NCHW and
channels_last of the same process, and the first step separately (start-up cost).
Peak: the best of repeated 2048x2048 float32 torch.mm at the same thread count. A training step is
counted as 3x the forward multiply-adds (forward, and backward for inputs and weights), 2 FLOPs each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Every configuration of a run shares one process, hence oneDNN's cache of compiled kernels (1,024
# entries by default). Several DenseNets' convolutions in several layouts overflow it, and the
# configurations then evict each other's kernels and recompile them at every pass (torchvision NCHW
# measured 11.1 instead of 17.9 img/s, DenseNet-121 batch 1). A process serving one model never sees that.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

HERE = os.path.dirname(os.path.abspath(__file__))
ISAS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                               "ATEN_CPU_CAPABILITY": "avx2"}}
IMPLS = ["ours", "tv", "tv-cl"]


def gemm_peak(threads: int, n: int = 2048, reps: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


ALLOCATORS = {"default": {}, "keep": {"MALLOC_MMAP_THRESHOLD_": str(2**31 - 1), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}}


def worker(args) -> None:
    import torch

    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from bench_densenet import NETS, Trainer
    from steady import interleaved, summary, warm_all

    from densenet.analysis.complexity import stored_counts

    torch.set_num_threads(args.threads)
    out = {"gemm_gflops": gemm_peak(args.threads)}
    for net in args.nets.split(","):
        trainers = {impl: Trainer(net, impl, argparse.Namespace(device="cpu", compile=False, amp=None))
                    for impl in IMPLS}
        steps = {impl: tr.step for impl, tr in trainers.items()}
        start = warm_all(steps)
        times = interleaved(steps, args.rounds)
        batch = NETS[net]["batch"]
        stats = {impl: summary(t) for impl, t in times.items()}
        best = {impl: batch / st["median"] for impl, st in stats.items()}  # the median round (name kept for the JSON)
        macs = stored_counts()[NETS[net]["model"]][1]
        out[net] = {"img_s": best, "spread": {k: st["spread"] for k, st in stats.items()}, "start": start,
                    "gflops": best["ours"] * 3 * 2 * macs / 1e9}
        out["gemm_gflops"] = max(out["gemm_gflops"], gemm_peak(args.threads))
        del trainers
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="cifar")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds after the warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isas", default="native,avx2")
    p.add_argument("--allocators", default="default", help="default, keep, or both: default,keep")
    p.add_argument("--json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, HERE)
    from bench_densenet import cpu_name

    import datetime

    results = {"date": datetime.date.today().isoformat(), "machine": cpu_name(), "threads": args.threads}
    print(f"# {results['date']}  {results['machine']}, {args.threads} threads")
    for isa, alloc in [(i, a) for i in args.isas.split(",") for a in args.allocators.split(",")]:
        env = {**os.environ, **ISAS[isa], **ALLOCATORS[alloc]}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--nets", args.nets, "--rounds",
               str(args.rounds), "--threads", str(args.threads)]
        r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        key = isa if alloc == "default" else f"{isa}+{alloc}"
        results[key] = r
        for net in args.nets.split(","):
            s = r[net]["img_s"]
            sp = r[net]["spread"]
            print(f"{key:11s} {net:8s} median of {args.rounds} after a steady warm-up: ours {s['ours']:.1f} img/s "
                  f"(+-{sp['ours'] / 2:.0%}), tv {s['tv']:.1f}, tv-cl {s['tv-cl']:.1f}: "
                  f"{s['ours'] / s['tv']:.2f}x tv, {s['ours'] / s['tv-cl']:.2f}x tv-cl; "
                  f"{r[net]['gflops']:.1f} GFLOP/s = {r[net]['gflops'] / r['gemm_gflops']:.0%} of the "
                  f"{r['gemm_gflops']:.0f} GFLOP/s sgemm peak", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
