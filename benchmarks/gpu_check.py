"""One command that answers every GPU question at once, within a time budget; one JSON and a table.

    # On the GPU machine, from the repository root, with the CIFAR-10 archive carried in .devdata/
    # (mkdir -p .devdata && cp ../shared/data/cifar10-train.tar.gz .devdata/; .devdata is git-ignored):
    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json
    # Anywhere, small sizes (tests/test_gpu_check.py runs a tiny version so that CI keeps it alive):
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu

Sections, in this order (each item checks the budget, --budget-s, 470 s by default, and is skipped with
a note once it is spent; the JSON is rewritten after every item, so a run cut short keeps what it had):
  tests     pytest of tests/test_cuda.py, test_fused.py and test_compile.py on the device (slow tests included)
  train     images/s of a training step (forward, backward, SGD) against torchvision, eager: NCHW,
            channels_last, memory_efficient, the reference path, bf16 autocast (timm too where installed);
            DenseNet-BC-100 batch 64 at 32x32 and DenseNet-121 batch 128 at 224x224
  infer     images/s of an eval forward pass at the training batch, same configurations
  memory    peak torch.cuda.max_memory_allocated of one fp32 training step, DenseNet-BC (k=12) batch 64,
            L = 100, 190, 250: ours, ours memory_efficient, the reference path, torchvision (+memeff)
  real      a short training of DenseNet-BC-100 on the CIFAR-10 training images (the paper's recipe
            scaled to --real-epochs, bf16, channels_last): validation error on the 5,000 held-out
            images and images/s
  compiled  training and inference images/s under torch.compile (bf16, channels_last), ours and
            torchvision, with the time of the first (compiling) step
Every throughput is printed with its ratio to torchvision's NCHW eager network of the same run. The
last lines say which path is faster on this device (the entry for _fused.FUSED_BY_DEVICE).
A section cut by the budget is named under "skipped"; run it again alone, e.g. `--sections compiled`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (label, library, model options, channels_last, amp)
EAGER = [
    ("tv", "tv", {}, False, None),  # the baseline of every ratio
    ("tv-cl", "tv", {}, True, None),
    ("tv-memeff", "tv", {"memory_efficient": True}, False, None),
    ("ours", "ours", {"fused": True}, True, None),
    ("ours-nchw", "ours", {"fused": True}, False, None),
    ("ours-memeff", "ours", {"fused": True, "memory_efficient": True}, True, None),
    ("ours-reference", "ours", {"fused": False}, True, None),
    ("tv-bf16", "tv", {}, False, "bf16"),
    ("tv-cl-bf16", "tv", {}, True, "bf16"),
    ("ours-bf16", "ours", {"fused": True}, True, "bf16"),
    ("ours-memeff-bf16", "ours", {"fused": True, "memory_efficient": True}, True, "bf16"),
    ("ours-reference-bf16", "ours", {"fused": False}, True, "bf16"),
    ("timm-cl-bf16", "timm", {}, True, "bf16"),  # imagenet net only, where timm is installed
]
COMPILED = [("tv-cl-bf16-compiled", "tv", {}, True, "bf16"), ("ours-bf16-compiled", "ours", {"fused": True}, True, "bf16"),
            ("ours-compiled", "ours", {"fused": True}, True, None)]  # the last: CPU only (compile time on a GPU)
TARGETS = ("targets: timm DenseNet-121 training ~730 img/s with AMP, 914 channels_last (RTX 3090); the authors' "
           "shared-memory DenseNet-BC-100 batch 64: 1,655 MB (5,453 MB naive)")


def profile(args) -> dict:
    """Sizes: the issue's on a GPU; small on the CPU; tiny for the CI test."""
    if args.device.startswith("cuda"):
        return dict(nets={"cifar": dict(depth=100, batch=64, size=32, classes=10, title="DenseNet-BC-100 (k=12), batch 64, 32x32"),
                          "imagenet": dict(blocks=None, batch=128, size=224, classes=1000, title="DenseNet-121, batch 128, 224x224")},
                    rounds=2, steps=4, memory_depths=(100, 190, 250), memory_batch=64,
                    real=dict(depth=100, subset=None, epochs=args.real_epochs, batch=64))
    if args.tiny:
        return dict(nets={"cifar": dict(depth=10, batch=4, size=16, classes=10, title="DenseNet-BC-10 (k=12), batch 4, 16x16")},
                    rounds=1, steps=1, memory_depths=(10, 16), memory_batch=4,
                    real=dict(depth=10, subset=64, epochs=1, batch=32))
    return dict(nets={"cifar": dict(depth=22, batch=16, size=32, classes=10, title="DenseNet-BC-22 (k=12), batch 16, 32x32"),
                      "imagenet": dict(blocks=(2, 2, 2, 2), batch=4, size=64, classes=1000,
                                       title="DenseNet-121 stem/widths, blocks (2,2,2,2), batch 4, 64x64")},
                rounds=2, steps=2, memory_depths=(22, 40, 58), memory_batch=16,
                real=dict(depth=22, subset=1024, epochs=1, batch=64))


# --- building ------------------------------------------------------------------------------------------

def build(net: str, spec: dict, lib: str, opts: dict, channels_last: bool, device: str, depth: int | None = None):
    import densenet
    import torchvision

    torch.manual_seed(0)
    if net == "cifar":
        d = depth or spec["depth"]
        if lib == "ours":
            model = densenet.create_model("densenet_bc_100_k12", depth=d, **opts)
        elif lib == "tv":
            from bench_densenet import torchvision_cifar

            model = torchvision_cifar(d, memory_efficient=opts.get("memory_efficient", False))
        else:
            return None
    else:
        blocks = spec.get("blocks")
        if lib == "ours":
            model = densenet.create_model("densenet121", **({"block_config": blocks} if blocks else {}), **opts)
        elif lib == "tv":
            model = torchvision.models.DenseNet(32, blocks or (6, 12, 24, 16), 64,
                                                memory_efficient=opts.get("memory_efficient", False))
        else:
            try:
                import timm
            except ImportError:
                return None
            if blocks:
                return None
            model = timm.create_model("densenet121")
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class Config:
    """One configuration ready to step: model, batch, SGD with the paper's settings, autocast."""

    def __init__(self, label, net, spec, lib, opts, channels_last, amp, device, compiled=False, backend="inductor"):
        self.label, self.device, self.amp = label, device, amp
        self.model = build(net, spec, lib, opts, channels_last, device)
        if self.model is None:
            raise LookupError("not available here")
        self.net = torch.compile(self.model, backend=backend) if compiled else self.model
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, spec["classes"], (spec["batch"],), device=device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
        self.train_s: list[float] = []
        self.infer_s: list[float] = []

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.amp])

    def step(self) -> float:
        self.model.train()
        sync(self.device)
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.net(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        sync(self.device)
        return time.perf_counter() - t

    @torch.no_grad()
    def infer(self) -> float:
        self.model.eval()
        sync(self.device)
        t = time.perf_counter()
        with self.autocast():
            self.net(self.x)
        sync(self.device)
        return time.perf_counter() - t


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- the run -------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.prof = profile(args)
        self.res: dict = {"meta": meta(args), "skipped": [], "errors": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(self.args.json + ".tmp")
            tmp.write_text(json.dumps(self.res, indent=1, default=str))
            os.replace(tmp, self.args.json)

    def item(self, what: str, need_s: float, fn, *a):
        """Run one item unless the budget is spent; an error is recorded, not fatal."""
        if self.left() < need_s:
            self.res["skipped"].append(f"{what}: budget ({self.left():.0f} s left, ~{need_s:.0f} s needed)")
            print(f"  skipped {what}: budget", flush=True)
            return None
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - reported, and the other sections still run
            self.res["errors"].append(f"{what}: {type(e).__name__}: {e}"[:2000])
            print(f"  ERROR {what}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
            return None
        finally:
            free(self.args.device)
            self.save()

    # tests ----------------------------------------------------------------------------------------------
    def tests(self):
        files = ["tests/test_cuda.py", "tests/test_fused.py", "tests/test_compile.py"]
        timeout = max(30, min(self.args.tests_s, self.left() - 60))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "--device", self.args.device]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
            self.res["errors"].append(f"tests: timed out after {timeout:.0f} s (raise --tests-s)")
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", out.splitlines()[-1] if out else "")}
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        self.res["tests"] = dict(command=" ".join(cmd[2:]), returncode=rc, seconds=time.perf_counter() - t,
                                 counts=counts, failed=failed, tail=out[-4000:])
        print(f"tests: {counts or rc} in {time.perf_counter() - t:.0f} s" + (f"; failed: {failed}" if failed else ""), flush=True)

    # throughput -----------------------------------------------------------------------------------------
    def throughput(self, net: str, configs, compiled: bool):
        spec = self.prof["nets"][net]
        key = f"{'compiled' if compiled else 'eager'}_{net}"
        built = {}
        for label, lib, opts, cl, amp in configs:
            if self.args.configs and label not in self.args.configs.split(","):
                continue
            try:
                built[label] = Config(label, net, spec, lib, opts, cl, amp, self.args.device, compiled,
                                      self.args.compile_backend)
            except LookupError:
                continue
        first = {}
        for label, c in built.items():  # warm-up (compilation, cudnn autotuning, first allocations)
            t = time.perf_counter()
            c.step()
            c.infer()
            first[label] = time.perf_counter() - t
            if self.left() < 20:
                raise TimeoutError(f"budget spent while warming up {label}")
        for label, c in built.items():
            c.step()
        for _ in range(self.prof["rounds"]):  # interleaved: load from elsewhere hits every configuration alike
            for c in built.values():
                c.train_s += [c.step() for _ in range(self.prof["steps"])]
                c.infer_s += [c.infer() for _ in range(self.prof["steps"])]
        b = spec["batch"]
        rows = {label: dict(train_img_s=b / min(c.train_s), train_median_img_s=b / statistics.median(c.train_s),
                            infer_img_s=b / min(c.infer_s), first_step_s=first[label]) for label, c in built.items()}
        base = self.res.get(f"eager_{net}", {}).get("tv") or rows.get("tv")
        for r in rows.values():
            if base:
                r["train_vs_tv"] = r["train_img_s"] / base["train_img_s"]
                r["infer_vs_tv"] = r["infer_img_s"] / base["infer_img_s"]
        self.res[key] = rows
        print(f"\n## {'Compiled' if compiled else 'Eager'}: {spec['title']}  (ratios to torchvision NCHW eager fp32)")
        print(f"{'config':22s} {'train img/s':>11s} {'vs tv':>6s} {'median':>8s} | {'infer img/s':>11s} {'vs tv':>6s} | first step s")
        for label, r in rows.items():
            print(f"{label:22s} {r['train_img_s']:11.1f} {r.get('train_vs_tv', float('nan')):5.2f}x {r['train_median_img_s']:8.1f} | "
                  f"{r['infer_img_s']:11.1f} {r.get('infer_vs_tv', float('nan')):5.2f}x | {r['first_step_s']:6.1f}", flush=True)

    # memory ---------------------------------------------------------------------------------------------
    def memory(self, depth: int):
        impls = [("ours", "ours", {"fused": True}), ("ours-memeff", "ours", {"fused": True, "memory_efficient": True}),
                 ("ours-reference", "ours", {"fused": False}), ("tv", "tv", {}), ("tv-memeff", "tv", {"memory_efficient": True})]
        row = {}
        for label, lib, opts in impls:
            if self.args.device.startswith("cuda"):
                row[label] = memory_step(label, lib, opts, depth, self.prof["memory_batch"], self.args.device)
            else:  # peak RSS needs a fresh process
                cmd = [sys.executable, __file__, "--worker-memory", json.dumps([label, lib, opts, depth, self.prof["memory_batch"]]),
                       "--device", "cpu"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
                row[label] = json.loads(out.strip().splitlines()[-1])
        self.res.setdefault("memory", {})[str(depth)] = row
        unit = "max_memory_allocated" if self.args.device.startswith("cuda") else "peak RSS growth"
        print(f"memory L={depth:4d} batch {self.prof['memory_batch']} ({unit}, MB): " + "  ".join(
            f"{k} {v['peak_mb']:.0f} ({row['tv']['peak_mb'] / v['peak_mb']:.2f}x less than tv)" for k, v in row.items()), flush=True)

    # real training --------------------------------------------------------------------------------------
    def real(self):
        from densenet.train import TrainConfig, fit

        archive = self.args.data
        if not archive or not Path(archive).is_file():
            self.res["skipped"].append(f"real: no CIFAR-10 archive at {archive} (give --data PATH)")
            print(f"real: skipped, no CIFAR-10 archive at {archive}", flush=True)
            return
        r = self.prof["real"]
        cuda = self.args.device.startswith("cuda")
        cfg = TrainConfig(model="densenet_bc_100_k12", model_args={"depth": r["depth"]}, dataset="folder", data=str(archive),
                          epochs=r["epochs"], train_subset=r["subset"], batch_size=r["batch"], device=self.args.device,
                          amp="bf16" if cuda else "none", channels_last=True, progress=False, tensorboard=False, out=None)
        t = time.perf_counter()
        s = fit(cfg)
        self.res["real"] = dict(config={k: v for k, v in cfg.to_dict().items() if v is not None}, seconds=time.perf_counter() - t,
                                val_top1_error=s.get("val_top1_error"), best=s.get("best"), images_per_s=s.get("images_per_s"),
                                train_loss=s.get("train_loss"), epochs=s.get("epochs"))
        print(f"real: DenseNet-BC-{r['depth']} on CIFAR-10, {r['epochs']} epoch(s): validation error "
              f"{s.get('val_top1_error', float('nan')):.2f}%, {s.get('images_per_s', 0):.0f} img/s (last epoch), "
              f"{time.perf_counter() - t:.0f} s in all", flush=True)

    def verdict(self):
        """Which path is faster here, training, eager: the entry for _fused.FUSED_BY_DEVICE."""
        votes = {}
        for net in self.prof["nets"]:
            rows = self.res.get(f"eager_{net}", {})
            for amp in ("", "-bf16"):
                a, b = rows.get("ours" + amp), rows.get("ours-reference" + amp)
                if a and b:
                    votes[f"{net}{amp or '-fp32'}"] = a["train_img_s"] / b["train_img_s"]
        if votes:
            fused = statistics.median(votes.values()) >= 1.0
            dev = torch.device(self.args.device).type
            self.res["verdict"] = dict(fused_over_reference=votes, rule=f'FUSED_BY_DEVICE["{dev}"] = {fused}')
            print("\nfused / reference training throughput: " + ", ".join(f"{k} {v:.2f}x" for k, v in votes.items()))
            print(f"=> set in src/densenet/models/_fused.py: FUSED_BY_DEVICE[\"{dev}\"] = {fused}")


def memory_step(label, lib, opts, depth, batch, device) -> dict:
    """Peak memory of one fp32 training step (MB): CUDA's max_memory_allocated, or the growth of peak RSS."""
    spec = dict(depth=depth, batch=batch, size=32, classes=10)
    free(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    c = Config(label, "cifar", spec, lib, opts, False, None, device)
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb("VmRSS")
    c.step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM")
    del c
    return dict(peak_mb=peak if cuda else peak - before, before_mb=before, total_peak_mb=peak)


def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def meta(args) -> dict:
    import torchvision

    m = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
             device=args.device, torch=torch.__version__, torchvision=torchvision.__version__, python=platform.python_version(),
             budget_s=args.budget_s)
    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(args.device))
        m.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), tf32=True, cudnn_benchmark=True)
    else:
        from bench_densenet import cpu_name

        m.update(cpu=cpu_name(), threads=torch.get_num_threads())
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here (rewritten after every item)")
    p.add_argument("--budget-s", type=float, default=470, help="wall-clock budget of the whole check (s)")
    p.add_argument("--tests-s", type=float, default=170, help="at most this long for the tests (s)")
    p.add_argument("--sections", help="comma-separated subset of: tests, train (and infer), memory, real, compiled "
                                      "(default: all on a GPU; train,memory,real on the CPU)")
    p.add_argument("--data", default=None,
                   help="the CIFAR-10 training archive for the real training (default: .devdata/, else ../shared/data/)")
    p.add_argument("--real-epochs", type=int, default=3)
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    p.add_argument("--tiny", action="store_true", help="on the CPU: the smallest sizes (the CI test; no verdict)")
    p.add_argument("--configs", help="only these configurations (comma-separated labels, e.g. tv,ours)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--worker-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    if args.worker_memory:
        label, lib, opts, depth, batch = json.loads(args.worker_memory)
        print(json.dumps(memory_step(label, lib, opts, depth, batch, args.device)))
        return 0
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("gpu_check: --device cuda, but PyTorch sees no CUDA device; use --device cpu", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.data is None:  # not given: where the GPU machine carries it, else the shared folder beside the checkout
        carried = ROOT / ".devdata" / "cifar10-train.tar.gz"
        shared = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"
        args.data = str(shared if not carried.is_file() and shared.is_file() else carried)
    sections = set((args.sections or ("tests,train,memory,real,compiled" if args.device.startswith("cuda")
                                      else "train,memory,real")).split(","))
    run = Run(args)
    m = run.res["meta"]
    print(f"# gpu_check {m['date']}  {m.get('gpu', m.get('cpu'))}  torch {m['torch']}  device {args.device}  "
          f"budget {args.budget_s:.0f} s", flush=True)
    nets = list(run.prof["nets"])
    if "tests" in sections:
        run.item("tests", 60, run.tests)
    if "train" in sections:
        for net in nets:
            run.item(f"eager {net}", 30, run.throughput, net, [c for c in EAGER if not (c[1] == "timm" and net != "imagenet")], False)
    if "memory" in sections:
        for d in run.prof["memory_depths"]:
            run.item(f"memory L={d}", 15, run.memory, d)
    if "real" in sections:
        run.item("real", 60 if args.device.startswith("cuda") else 20, run.real)
    if "compiled" in sections:
        for net in nets:
            configs = COMPILED[:2] if args.device.startswith("cuda") else COMPILED
            run.item(f"compiled {net}", 90 if args.device.startswith("cuda") else 30, run.throughput, net, configs, True)
    if not args.tiny:
        run.verdict()
    run.res["meta"]["seconds"] = time.perf_counter() - run.t0
    run.save()
    print(f"\n{TARGETS}\n# done in {run.res['meta']['seconds']:.0f} s; skipped: {len(run.res['skipped'])}, "
          f"errors: {len(run.res['errors'])}" + (f" -> {args.json}" if args.json else ""), flush=True)
    for e in run.res["errors"]:
        print("  error: " + e.splitlines()[0][:300])
    return 1 if run.res["errors"] or (run.res.get("tests", {}).get("counts", {}).get("failed")) else 0


if __name__ == "__main__":
    sys.exit(main())
