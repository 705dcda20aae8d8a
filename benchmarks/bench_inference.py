"""CPU inference (eval mode, no_grad) of this package's DenseNet against torchvision and onnxruntime.

    PYTHONPATH=src python benchmarks/bench_inference.py                 # both networks, ~5 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_inference.py --nets cifar --rounds 5
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        PYTHONPATH=src python benchmarks/bench_inference.py

Configurations, all with the same weights (copied from ours into torchvision's modules):
  ours         create_model(name).eval(): the eval-mode path (models/_inference.py), NCHW input
  ours-cl      the same, channels_last input
  ours-fused   the fused training path in eval mode (what eval did before the eval-mode path)
  compiled     densenet.optimize(model): AOTInductor with freezing (densenet/compiled.py); its compile
               time is reported once per network (--no-compiled skips it)
  tv, tv-cl    torchvision's DenseNet, NCHW and channels_last
  ort          onnxruntime on the ONNX file `densenet export` writes (if onnxruntime is installed)

Steady state (benchmarks/steady.py): each configuration is warmed until its time is stable (at least 10
timings), then all run in interleaved rounds; the median of the rounds is reported with its spread
(interquartile range / median) and its ratio to torchvision NCHW, channels_last and onnxruntime of the
same run; the first timing of each is the start-up cost. onnxruntime runs its rounds after the others: its
threads spin, waiting for work, for a while after each run (its default, which a server keeps), which
took the CPU from whatever ran next (the "channels_last input" gain of the tables before 2026-12-02 was
that: ours-cl followed ort). Outputs are checked against the reference path (<= 1e-4).
Under the AVX2 emulation also set ATEN_CPU_CAPABILITY=avx2 (ATen's and Inductor's generated kernels);
onnxruntime has no such switch and uses the machine's full instruction set.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

# Every configuration of a run shares one process, hence oneDNN's cache of compiled kernels (1,024
# entries by default). Several DenseNets' convolutions in several layouts overflow it, and the
# configurations then evict each other's kernels and recompile them at every pass (torchvision NCHW
# measured 11.1 instead of 17.9 img/s, DenseNet-121 batch 1). A process serving one model never sees that.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NETS = {"cifar": ("densenet_bc_100_k12", 32, 10, (1, 64)), "imagenet": ("densenet121", 224, 1000, (1, 32))}


def torchvision_twin(net: str, ours):
    """torchvision's network with our weights (same module names and parameter shapes)."""
    import torchvision

    from bench_densenet import torchvision_cifar

    tv = torchvision_cifar() if net == "cifar" else torchvision.models.densenet121()
    sd = ours.state_dict()
    tsd = tv.state_dict()
    keys = list(tsd)
    ours_keys = list(sd)
    assert len(keys) == len(ours_keys), (len(keys), len(ours_keys))
    tv.load_state_dict({k: sd[o] for k, o in zip(keys, ours_keys)})
    return tv.eval()


def calibrate(model, size: int) -> None:
    """BN running statistics of real activations (a fresh network's 0 and 1 would be too easy to match)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    model.eval()


def onnx_session(model, size: int, threads: int):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from densenet.export import export_model

    path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    export_model(model, path, "onnx", (3, size, size), onnx_exporter="legacy")  # the same graph, exported faster
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="cifar,imagenet")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds after the warm-up")
    p.add_argument("--reps", type=int, default=10, help="forward passes per timing at batch 1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-ort", action="store_true")
    p.add_argument("--no-compiled", action="store_true", help="skip densenet.optimize (compiles for minutes)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import densenet
    from densenet.export import reference_copy
    from densenet.models import _inference
    from bench_densenet import cpu_name

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    results = {"date": datetime.date.today().isoformat(), "machine": cpu_name(), "threads": args.threads,
               "isa": isa, "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(f"# {results['date']}  {results['machine']}, {args.threads} threads, ISA {isa}, torch {torch.__version__}")
    real_applies = _inference.block_applies
    from steady import interleaved, summary, warm_all

    for net in args.nets.split(","):
        name, size, classes, batches = NETS[net]
        torch.manual_seed(0)
        ours = densenet.create_model(name)
        calibrate(ours, size)
        tv = torchvision_twin(net, ours)
        tv_cl = torchvision_twin(net, ours).to(memory_format=torch.channels_last)
        ref = reference_copy(ours)
        sess = None if args.no_ort else onnx_session(ours, size, args.threads)
        compiled = None
        results[net] = {}
        if not args.no_compiled:
            compiled = densenet.optimize(ours, (3, size, size))
            results[net]["compile_s"] = compiled.compile_seconds
            print(f"{name}: densenet.optimize compiled in {compiled.compile_seconds:.0f} s", flush=True)
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            xcl = x.contiguous(memory_format=torch.channels_last)

            def fused(inp):
                _inference.block_applies = lambda *a: False
                try:
                    return ours(inp)
                finally:
                    _inference.block_applies = real_applies

            calls = {"ours": lambda: ours(x), "ours-cl": lambda: ours(xcl), "ours-fused": lambda: fused(x),
                     "tv": lambda: tv(x), "tv-cl": lambda: tv_cl(xcl)}
            if compiled is not None:
                calls["compiled"] = lambda: compiled(x)
            if sess is not None:
                xn = x.numpy()
                calls["ort"] = lambda: torch.from_numpy(sess.run(None, {"input": xn})[0])
            reps = args.reps if batch == 1 else 1

            def timed(f):
                def step() -> float:
                    t = time.perf_counter()
                    for _ in range(reps):
                        f()
                    return (time.perf_counter() - t) / reps
                return step

            with torch.no_grad():
                want = ref(x)
                for k, f in calls.items():  # every output checked
                    err = (f() - want).abs().max().item()
                    assert err <= 1e-4 * max(1.0, want.abs().max().item()), (net, batch, k, err)
                torch_steps = {k: timed(f) for k, f in calls.items() if k != "ort"}
                start = warm_all(torch_steps)
                times = interleaved(torch_steps, args.rounds)
                if "ort" in calls:  # after the others (see the docstring)
                    start.update(warm_all({"ort": timed(calls["ort"])}))
                    times.update(interleaved({"ort": timed(calls["ort"])}, args.rounds))
            stats = {k: summary(v) for k, v in times.items()}
            img_s = {k: batch / st["median"] for k, st in stats.items()}
            results[net][batch] = {k: {"img_s": img_s[k], "spread": stats[k]["spread"],
                                       "first_s": start[k]["first_s"], "warmup_steps": start[k]["warmup_steps"]}
                                   for k in stats}
            base = {b: img_s[b] for b in ("tv", "tv-cl", "ort") if b in img_s}
            print(f"{name:20s} batch {batch:3d} (median of {args.rounds} rounds after a steady warm-up):", flush=True)
            for k in img_s:
                vs = ", ".join(f"{img_s[k] / v:.2f}x {b}" for b, v in base.items())
                print(f"  {k:11s} {img_s[k]:8.1f} img/s +-{stats[k]['spread'] / 2:4.0%}  ({vs})  first "
                      f"{start[k]['first_s'] * 1e3:.0f} ms, {start[k]['warmup_steps']} warm-up timings", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
