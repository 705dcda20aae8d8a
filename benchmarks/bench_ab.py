"""A/B of the package's models against another git revision of them, in one process.

    python benchmarks/bench_ab.py --rev HEAD~1 --mode train --net cifar             # a training step
    python benchmarks/bench_ab.py --rev HEAD~1 --mode eval --net imagenet --batch 1
    DENSENET_ONEDNN_BACKWARD=0 python benchmarks/bench_ab.py --rev HEAD --mode train   # a switch

The package as it is at --rev (`git archive` of src/densenet) is imported under another name
(densenet_at_rev: its imports are relative) next to the working tree's, whatever its module layout;
the same network with the same weights is built from each, and the two run in alternating rounds (the
other order every second round), so that load from other processes hits both alike; the median time of
each is reported with the ratio new / old. The same input serves both; for eval, outputs are checked
to agree (<= 1e-4 relative). Used for the A/B figures in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
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


def package_at(rev: str):
    """The densenet package as it is at git revision `rev`, imported as `densenet_at_rev`."""
    import io
    import tarfile

    tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "src/densenet"], check=True, capture_output=True).stdout
    root = tempfile.mkdtemp()
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(root, filter="data")
    path = os.path.join(root, "src", "densenet", "__init__.py")
    spec = importlib.util.spec_from_file_location("densenet_at_rev", path,
                                                  submodule_search_locations=[os.path.dirname(path)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["densenet_at_rev"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="HEAD", help="the git revision to compare the working tree with")
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--net", choices=list(NETS), default="cifar")
    p.add_argument("--batch", type=int, help="default: 64 (cifar) or 32 (imagenet)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10,
                   help="at least this many untimed steps of each, then until its time is stable (steady.py)")
    p.add_argument("--reps", type=int, default=10, help="eval: forward passes per timing at batch 1")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import densenet

    name, size, classes, batch = NETS[args.net]
    batch = args.batch or batch
    train = args.mode == "train"
    torch.manual_seed(0)
    models = {"new": densenet.create_model(name), "old": package_at(args.rev).create_model(name)}
    models["old"].load_state_dict(models["new"].state_dict())
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    opts = {}
    for k, m in models.items():
        m.to(memory_format=torch.channels_last).train(train)
        opts[k] = torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9)  # lr 0: every round the same weights

    def run(k: str) -> float:
        model = models[k]
        t = time.perf_counter()
        if train:
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opts[k].step()
        else:
            with torch.no_grad():
                for _ in range(args.reps if batch == 1 else 1):
                    model(x)
        return (time.perf_counter() - t) / (1 if train or batch > 1 else args.reps)

    if not train:
        with torch.no_grad():
            a, b = models["old"](x), models["new"](x)
        err = ((a - b).abs().max() / a.abs().max()).item()
        assert err <= 1e-4, err
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from steady import interleaved, warm_all

    warm_all({k: (lambda k=k: run(k)) for k in ("old", "new")}, min_steps=args.warmup)  # until stable
    times = interleaved({k: (lambda k=k: run(k)) for k in ("old", "new")}, args.rounds)
    best = {k: batch / statistics.median(v) for k, v in times.items()}  # the median round
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"{name} batch {batch} {'training' if train else 'eval'} ({isa}, {args.threads} threads): "
          f"{args.rev} {best['old']:.1f} img/s, working tree {best['new']:.1f} img/s: "
          f"{best['new'] / best['old']:.3f}x")


if __name__ == "__main__":
    main()
