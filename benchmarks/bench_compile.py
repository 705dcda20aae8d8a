"""torch.compile against eager on the CPU: graph breaks, compile time, training and inference speed.

    PYTHONPATH=src python benchmarks/bench_compile.py --depth 40 --json compile_cpu.json

For each of this package's default (fused) DenseNet-BC and torchvision's with the same structure:
`torch._dynamo.explain` graph and break counts (training mode), the time of the first compiled step,
then images/s of a training step (forward, backward, SGD) and of an eval forward pass, eager and
compiled, in steady state (benchmarks/steady.py: each configuration warmed until its time is stable, at
least 10 steps, then the median of interleaved rounds with its spread; the first step, compilation
included, is the start-up cost). Ratios are to torchvision eager in the same run. Inductor compiles a DenseNet-BC-100 training graph in many minutes on 2 cores: --depth
sets a smaller network (the compiled code is the same per layer).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from steady import interleaved, summary, warm_all  # noqa: E402


def models(depth: int):
    import densenet
    from bench_densenet import torchvision_cifar

    torch.manual_seed(0)
    ours = densenet.create_model("densenet_bc_100_k12", depth=depth).to(memory_format=torch.channels_last)
    tv = torchvision_cifar(depth)
    return {"ours": (ours, True), "tv": (tv, False)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--explain-depth", type=int, default=100, help="depth for the graph-break count")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bench_densenet import cpu_name

    res = dict(date=datetime.date.today().isoformat(), machine=cpu_name(), threads=args.threads,
               torch=torch.__version__, depth=args.depth, batch=args.batch, command=" ".join(sys.argv))
    # graph breaks of the full-depth network, training and eval
    import densenet

    res["explain"] = {}
    for train in (True, False):
        m = densenet.create_model("densenet_bc_100_k12", depth=args.explain_depth).train(train)
        torch._dynamo.reset()
        with torch.set_grad_enabled(train):
            e = torch._dynamo.explain(m)(torch.randn(4, 3, 32, 32))
        res["explain"]["train" if train else "eval"] = dict(graphs=e.graph_count, breaks=e.graph_break_count)
    print(json.dumps(res["explain"]), flush=True)
    torch._dynamo.reset()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    runs = {}
    for name, (model, cl) in models(args.depth).items():
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        for compiled in (False, True):
            net = torch.compile(model) if compiled else model
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
            runs[f"{name}{'-compiled' if compiled else ''}"] = dict(net=net, model=model, opt=opt, x=xi)
    first = {}
    for key, r in runs.items():  # compilation and first-step allocations: the start-up cost
        t = time.perf_counter()
        step(r, y)
        infer(r)
        first[key] = time.perf_counter() - t
        print(f"{key}: first train step + eval pass {first[key]:.1f} s", flush=True)
    steps = {f"{key}/{what}": (lambda r=r, f=f: f(r, y)) for key, r in runs.items()
             for what, f in (("train", step), ("eval", lambda r, y: infer(r)))}
    warm = warm_all(steps)
    times = interleaved(steps, args.rounds)
    out = {}
    for key in runs:
        s_train, s_eval = summary(times[f"{key}/train"]), summary(times[f"{key}/eval"])
        b_train, b_eval = summary(times["tv/train"]), summary(times["tv/eval"])
        out[key] = dict(first_s=first[key], warmup_steps=warm[f"{key}/train"]["warmup_steps"],
                        train_img_s=args.batch / s_train["median"], train_spread=s_train["spread"],
                        eval_img_s=args.batch / s_eval["median"], eval_spread=s_eval["spread"],
                        train_vs_tv=b_train["median"] / s_train["median"], eval_vs_tv=b_eval["median"] / s_eval["median"])
        print(f"{key:14s} train {out[key]['train_img_s']:7.1f} img/s ({out[key]['train_vs_tv']:.2f}x tv, spread "
              f"{s_train['spread']:.0%})  eval {out[key]['eval_img_s']:7.1f} img/s ({out[key]['eval_vs_tv']:.2f}x tv)"
              f"  first step {first[key]:.0f} s, {out[key]['warmup_steps']} warm-up steps", flush=True)
    res["runs"] = out
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def step(r, y=None) -> float:
    r["model"].train()
    t = time.perf_counter()
    r["opt"].zero_grad(set_to_none=True)
    out = r["net"](r["x"])
    F.cross_entropy(out, y if y is not None else torch.zeros(len(out), dtype=torch.long)).backward()
    r["opt"].step()
    return time.perf_counter() - t


@torch.no_grad()
def infer(r) -> float:
    r["model"].eval()
    t = time.perf_counter()
    r["net"](r["x"])
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
