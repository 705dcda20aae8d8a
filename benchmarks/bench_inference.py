"""CPU inference (eval mode, no_grad) of this package's DenseNet against torchvision and onnxruntime.

    PYTHONPATH=src python benchmarks/bench_inference.py                 # both networks, ~5 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_inference.py --nets cifar --rounds 5
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 PYTHONPATH=src python benchmarks/bench_inference.py

Configurations, all with the same weights (copied from ours into torchvision's modules):
  ours         create_model(name).eval(): the eval-mode path (models/_inference.py), NCHW input
  ours-cl      the same, channels_last input
  ours-fused   the fused training path in eval mode (what eval did before the eval-mode path)
  tv, tv-cl    torchvision's DenseNet, NCHW and channels_last
  ort          onnxruntime on the ONNX file `densenet export` writes (if onnxruntime is installed)

Every configuration runs in the same process, in interleaved rounds (so that load from other processes
hits all alike); the best time of all rounds is reported, with its ratio to torchvision NCHW and
channels_last of the same round set. Outputs are checked against the reference path (<= 1e-4).
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
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=10, help="forward passes per timing at batch 1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-ort", action="store_true")
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
    for net in args.nets.split(","):
        name, size, classes, batches = NETS[net]
        torch.manual_seed(0)
        ours = densenet.create_model(name)
        calibrate(ours, size)
        tv = torchvision_twin(net, ours)
        ref = reference_copy(ours)
        sess = None if args.no_ort else onnx_session(ours, size, args.threads)
        results[net] = {}
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            xcl = x.contiguous(memory_format=torch.channels_last)
            tv_cl = None

            def fused(inp):
                _inference.block_applies = lambda *a: False
                try:
                    return ours(inp)
                finally:
                    _inference.block_applies = real_applies

            configs = {"ours": lambda: ours(x), "ours-cl": lambda: ours(xcl), "ours-fused": lambda: fused(x),
                       "tv": lambda: tv(x)}
            tv_cl = torchvision_twin(net, ours).to(memory_format=torch.channels_last)
            configs["tv-cl"] = lambda: tv_cl(xcl)
            if sess is not None:
                xn = x.numpy()
                configs["ort"] = lambda: torch.from_numpy(sess.run(None, {"input": xn})[0])
            with torch.no_grad():
                want = ref(x)
                for k, f in configs.items():  # warm-up, and every output checked
                    err = (f() - want).abs().max().item()
                    assert err <= 1e-4 * max(1.0, want.abs().max().item()), (net, batch, k, err)
                reps = args.reps if batch == 1 else 1
                times = {k: [] for k in configs}
                # PyTorch's configurations in interleaved rounds, a new order each round; onnxruntime
                # after them: its threads spin, waiting for work, for a while after each run (its
                # default), which took the CPU from whatever ran next (the "channels_last input" gain
                # of the tables before 2026-12-02 was that: ours-cl followed ort)
                names = [k for k in configs if k != "ort"]
                order = [names[r % len(names):] + names[:r % len(names)] for r in range(args.rounds)]
                for ks in order + ([["ort"]] * args.rounds if "ort" in configs else []):
                    for k in ks:
                        t = time.perf_counter()
                        for _ in range(reps):
                            configs[k]()
                        times[k].append((time.perf_counter() - t) / reps)
            best = {k: batch / min(v) for k, v in times.items()}
            results[net][batch] = best
            print(f"{name:20s} batch {batch:3d}: " + "  ".join(
                f"{k} {v:.1f} img/s ({v / best['tv']:.2f}x tv, {v / best['tv-cl']:.2f}x tv-cl)" for k, v in best.items()),
                flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
