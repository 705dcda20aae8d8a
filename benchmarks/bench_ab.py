"""A/B of one of the models' kernel modules against another git revision of it, in one process.

    python benchmarks/bench_ab.py --rev HEAD~1 --module _fused --net cifar       # a training step
    python benchmarks/bench_ab.py --rev HEAD~1 --module _inference --net imagenet --batch 1
    DENSENET_ONEDNN_BACKWARD=0 python benchmarks/bench_ab.py --rev HEAD --module _fused   # a switch

The module (densenet/models/_fused.py or _inference.py) is loaded as it is at --rev (`git show`) next to
the working tree's, and models.densenet uses one or the other in alternating rounds (the other order
every second round), so that load from other processes hits both alike; the best time of each is
reported with the ratio new / old. The same model, the same weights and the same input serve both;
for eval, outputs are checked to agree (<= 1e-4 relative). Used for the A/B figures in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")  # see bench_inference.py

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "src"))

NETS = {"cifar": ("densenet_bc_100_k12", 32, 10, 64), "imagenet": ("densenet121", 224, 1000, 32)}


def module_at(rev: str, name: str):
    """densenet.models.<name> as it is at git revision `rev`, imported under another name."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:src/densenet/models/{name}.py"], check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"{name}_at_rev.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"densenet.models.{name}_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="HEAD", help="the git revision to compare the working tree with")
    p.add_argument("--module", choices=["_fused", "_inference"], default="_fused")
    p.add_argument("--net", choices=list(NETS), default="cifar")
    p.add_argument("--batch", type=int, help="default: 64 (cifar) or 32 (imagenet)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--reps", type=int, default=10, help="eval: forward passes per timing at batch 1")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import densenet
    from densenet.models import densenet as D

    name, size, classes, batch = NETS[args.net]
    batch = args.batch or batch
    new, old = getattr(D, args.module), module_at(args.rev, args.module)
    if args.module == "_inference" and not hasattr(old, "stem_applies"):  # before the stem ran channels_last
        old.stem_applies = lambda model, x: False
    torch.manual_seed(0)
    model = densenet.create_model(name).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    train = args.module == "_fused"
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: every round the same weights

    def run() -> float:
        t = time.perf_counter()
        if train:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                for _ in range(args.reps if batch == 1 else 1):
                    model(x)
        return (time.perf_counter() - t) / (1 if train or batch > 1 else args.reps)

    if not train:
        model.eval()
        with torch.no_grad():
            D._inference = old
            a = model(x)
            D._inference = new
            b = model(x)
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err <= 1e-4, err
    times = {"old": [], "new": []}
    for k, mod in (("old", old), ("new", new)):  # warm-up
        setattr(D, args.module, mod)
        run()
    for r in range(args.rounds):
        for k, mod in ((("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old))):
            setattr(D, args.module, mod)
            times[k].append(run())
    setattr(D, args.module, new)
    best = {k: batch / min(v) for k, v in times.items()}
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"{name} batch {batch} {'training' if train else 'eval'} ({isa}, {args.threads} threads): "
          f"{args.rev} {best['old']:.1f} img/s, working tree {best['new']:.1f} img/s: "
          f"{best['new'] / best['old']:.3f}x")


if __name__ == "__main__":
    main()
