"""One command that answers the GPU questions within a time budget; one JSON and a table.

    # On the GPU machine, from the repository root, with the CIFAR-10 archive carried in .devdata/
    # (mkdir -p .devdata && cp ../shared/data/cifar10-train.tar.gz .devdata/; .devdata is git-ignored):
    PYTHONUNBUFFERED=1 PYTHONPATH=src python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json
    # Anywhere, small sizes (tests/test_gpu_check.py runs a tiny version so that CI keeps it alive):
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu

Sections, in this order (default: train,memory,tests,real on a GPU; train,memory,real on the CPU). Each
is bounded by the budget (--budget-s, 470 s by default): an item that does not fit is skipped and named
under "skipped", and an item still running 20 s past its share of the budget is cut by an alarm (an error).
The JSON is rewritten after every configuration, so a run cut short keeps what it had.
  train     eager images/s of a training step (forward, backward, SGD) and of an eval forward pass at the
            same batch, against torchvision: NCHW, channels_last, memory_efficient, the reference path,
            bf16 autocast (timm too where installed); DenseNet-BC-100 batch 64 at 32x32, then DenseNet-121
            batch 128 at 224x224. After each network the verdict (fused / reference training throughput:
            the entry for fused/policy.FUSED_BY_DEVICE) is formed and written; where a row it needs failed or
            was not measured, the verdict says so ("rule": null, "why": ...).
  memory    peak torch.cuda.max_memory_allocated of an fp32 training step after one warm-up step (cuDNN's
            autotuning excluded), DenseNet-BC (k=12) batch 64, L = 100, 190, 250: ours, ours
            memory_efficient, the reference path, torchvision (+memeff). On the CPU: the peak RSS growth
            of the first step, each configuration in a fresh process.
  tests     pytest -m "not slow" of tests/test_cuda.py, test_fused.py and test_compile.py on the device, its
            timeout capped by the time left; counts from pytest's summary line on stdout, failed tests
            by name; a failure or a timeout fails the run.
  real      a short training of DenseNet-BC-100 on the CIFAR-10 training images (the paper's recipe scaled
            to --real-epochs, bf16, channels_last): validation error on the 5,000 held-out images and
            images/s. Sized to the time left from a measured step time (a subset of the images, fewer
            epochs), or skipped with a note when too little is left.
  compiled  training and inference images/s under torch.compile (bf16, channels_last), ours and
            torchvision: only when --sections names it.
Throughput: each configuration warms up until its step time is steady (the median of its last 3 steps
within 5% of the 3 before, capped in steps and seconds; the first step's time is kept as first_step_s),
then all run in interleaved rounds; the median round is reported with its min and max, and its ratio to
torchvision's NCHW eager network of the same run.
Each configuration (a label of a section, a memory row) runs in its own try block: an error is recorded
under "errors" ({"eager_cifar/ours": "RuntimeError: ... <traceback tail>"}) and the rest goes on. The exit
status is 1 when anything failed (an error, a failed or timed-out test run); the last lines name each
failure, after the verdict. --fail-config LABEL forces a failure (a self-test of this handling).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (label, library, model options, channels_last, amp); the verdict's four first after the baseline, so
# that a run cut by the budget has measured them
EAGER = [
    ("tv", "tv", {}, False, None),  # the baseline of every ratio
    ("ours", "ours", {"fused": True}, True, None),
    ("ours-reference", "ours", {"fused": False}, True, None),
    ("ours-bf16", "ours", {"fused": True}, True, "bf16"),
    ("ours-reference-bf16", "ours", {"fused": False}, True, "bf16"),
    ("tv-cl", "tv", {}, True, None),
    ("tv-memeff", "tv", {"memory_efficient": True}, False, None),
    ("ours-nchw", "ours", {"fused": True}, False, None),
    ("ours-memeff", "ours", {"fused": True, "memory_efficient": True}, True, None),
    ("tv-bf16", "tv", {}, False, "bf16"),
    ("tv-cl-bf16", "tv", {}, True, "bf16"),
    ("ours-memeff-bf16", "ours", {"fused": True, "memory_efficient": True}, True, "bf16"),
    ("timm-cl-bf16", "timm", {}, True, "bf16"),  # imagenet net only, where timm is installed
]
VERDICT_PAIRS = [("ours", "ours-reference"), ("ours-bf16", "ours-reference-bf16")]  # fused, reference
COMPILED = [("tv-cl-bf16-compiled", "tv", {}, True, "bf16"), ("ours-bf16-compiled", "ours", {"fused": True}, True, "bf16"),
            ("ours-compiled", "ours", {"fused": True}, True, None)]  # the last: CPU only (compile time on a GPU)
MEMORY = [("ours", "ours", {"fused": True}), ("ours-memeff", "ours", {"fused": True, "memory_efficient": True}),
          ("ours-reference", "ours", {"fused": False}), ("tv", "tv", {}), ("tv-memeff", "tv", {"memory_efficient": True})]
TEST_FILES = ["tests/test_cuda.py", "tests/test_fused.py", "tests/test_compile.py"]
SECTIONS = ("train", "memory", "tests", "real", "compiled")  # the order they run in
TARGETS = ("targets: timm DenseNet-121 training ~730 img/s with AMP, 914 channels_last (RTX 3090); the authors' "
           "shared-memory DenseNet-BC-100 batch 64: 1,655 MB (5,453 MB naive)")
GRACE_S = 20  # an item's alarm rings this long after its share of the budget is spent
STEADY = 0.05  # warm-up ends when the median of the last 3 steps is within 5% of the 3 before
# real: what a run costs besides its training steps (decoding 50,000 JPEGs took 8 s on one Xeon core)
REAL_LOAD_S, REAL_STEP_OVERHEAD, REAL_MIN_STEPS, CIFAR_TRAIN, CIFAR_VAL = 30.0, 1.5, 20, 45_000, 5_000


def profile(args) -> dict:
    """Sizes: the issue's on a GPU; small on the CPU; tiny for the CI test."""
    if args.device.startswith("cuda"):
        p = dict(nets={"cifar": dict(depth=100, batch=64, size=32, classes=10, title="DenseNet-BC-100 (k=12), batch 64, 32x32"),
                       "imagenet": dict(blocks=None, batch=128, size=224, classes=1000, title="DenseNet-121, batch 128, 224x224")},
                 rounds=5, steps=3, warm_max=25, warm_s=20.0, memory_depths=(100, 190, 250), memory_batch=64,
                 real=dict(depth=100, subset=None, epochs=args.real_epochs, batch=64))
    elif args.tiny:
        p = dict(nets={"cifar": dict(depth=10, batch=4, size=16, classes=10, title="DenseNet-BC-10 (k=12), batch 4, 16x16")},
                 rounds=2, steps=1, warm_max=2, warm_s=5.0, memory_depths=(10, 16), memory_batch=4,
                 real=dict(depth=10, subset=64, epochs=1, batch=32))
    else:
        p = dict(nets={"cifar": dict(depth=22, batch=16, size=32, classes=10, title="DenseNet-BC-22 (k=12), batch 16, 32x32"),
                       "imagenet": dict(blocks=(2, 2, 2, 2), batch=4, size=64, classes=1000,
                                        title="DenseNet-121 stem/widths, blocks (2,2,2,2), batch 4, 64x64")},
                 rounds=3, steps=2, warm_max=8, warm_s=10.0, memory_depths=(22, 40, 58), memory_batch=16,
                 real=dict(depth=22, subset=1024, epochs=1, batch=64))
    if args.memory_depths:
        p["memory_depths"] = tuple(int(d) for d in args.memory_depths.split(","))
    return p


# --- building ------------------------------------------------------------------------------------------

def build(net: str, spec: dict, lib: str, opts: dict, channels_last: bool, device: str, depth: int | None = None):
    import densenet

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
            import torchvision

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
        self.train_rounds: list[float] = []  # seconds per step, one figure per interleaved round
        self.infer_rounds: list[float] = []

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


def settle(fn, max_steps: int, max_s: float) -> tuple[list[float], bool]:
    """Call fn (one timed step) until its time is steady: the median of the last 3 within STEADY of the
    median of the 3 before. At most max_steps calls, and none started after max_s (at least 2 calls where
    max_steps allows). Returns every time, the first one included, and whether it became steady."""
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < max_steps:
        times.append(fn())
        if len(times) >= 6:
            a, b = statistics.median(times[-3:]), statistics.median(times[-6:-3])
            if abs(a / b - 1) <= STEADY:
                return times, True
        if len(times) >= 2 and time.perf_counter() - t0 > max_s:
            break
    return times, False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


class BudgetExceeded(BaseException):
    """An item ran past its share of the budget (its alarm rang). A BaseException, so that the
    per-configuration handlers inside the item do not take it for one configuration's error."""


class Interrupted(BaseException):
    """SIGTERM: the run is being stopped from outside."""


class ForcedFailure(RuntimeError):
    """--fail-config: the self-test of the error handling."""


@contextlib.contextmanager
def alarm(seconds: float | None):
    """Raise BudgetExceeded in this (main) thread after `seconds`; nothing where signals are not ours."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise BudgetExceeded(f"still running {seconds:.0f} s after it started (its share of the budget plus "
                             f"{GRACE_S} s): cut")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_text(e: BaseException) -> str:
    """'Type: message' (one line, short) and the tail of the traceback."""
    head = f"{type(e).__name__}: {e}".splitlines()[0][:500] if str(e) else type(e).__name__
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return f"{head}\n{tb[-1500:]}"


# --- the run -------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.prof = profile(args)
        self.cuda = args.device.startswith("cuda")
        self.forced = {s.strip() for s in (args.fail_config or "").split(",") if s.strip()}
        self.only = {s.strip() for s in args.configs.split(",")} if args.configs else None
        self.res: dict = {"meta": meta(args), "skipped": [], "errors": {}}
        if self.forced:
            self.res["meta"]["fail_config"] = sorted(self.forced)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def selected(self, label: str) -> bool:
        return self.only is None or label in self.only

    def maybe_fail(self, *names: str) -> None:
        """--fail-config: raise if it names one of these (a label, a section, section/label)."""
        hit = self.forced.intersection(names)
        if hit:
            raise ForcedFailure(f"--fail-config {sorted(hit)[0]}: a forced failure (self-test)")

    def error(self, key: str, e: BaseException) -> None:
        text = error_text(e)
        self.res["errors"][key] = text
        print(f"  ERROR {key}: {text.splitlines()[0][:300]}", flush=True)

    def skip(self, note: str) -> None:
        self.res["skipped"].append(note)
        print(f"  skipped {note}", flush=True)

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(self.args.json + ".tmp")
            tmp.write_text(json.dumps(self.res, indent=1, default=str))
            os.replace(tmp, self.args.json)

    def item(self, key: str, need_s: float, fn, *a, allow_s: float | None = None):
        """Run one item unless the budget is spent, under an alarm at its share of the budget (allow_s, else
        all that is left) plus GRACE_S. An error is recorded under `key`, not fatal."""
        left = self.left()
        if left < need_s:
            self.skip(f"{key}: budget ({left:.0f} s left, ~{need_s:.0f} s needed)")
            self.save()
            return None
        try:
            with alarm(min(allow_s if allow_s is not None else left, left) + GRACE_S):
                return fn(*a)
        except (Exception, BudgetExceeded) as e:  # noqa: BLE001 - reported, and the other sections still run
            self.error(key, e)
            return None
        finally:
            free(self.args.device)
            self.save()

    # tests ----------------------------------------------------------------------------------------------
    def tests(self):
        self.maybe_fail("tests")
        room = self.left() - 10
        if room < min(30.0, self.args.tests_s):
            self.skip(f"tests: budget ({self.left():.0f} s left)")
            return
        timeout = min(self.args.tests_s, room)
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-m", "not slow", "-p", "no:cacheprovider", *TEST_FILES,
               "--device", self.args.device]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}  # unbuffered: a timeout keeps the output
        t = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
        timed_out = False
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(p)
            try:
                out, err = p.communicate(timeout=15)
            except subprocess.TimeoutExpired as e:  # a grandchild of its own session still holds the pipes
                out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        except BaseException:
            kill_group(p)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=15)
            raise
        seconds = time.perf_counter() - t
        counts, line = pytest_summary(out)
        outcomes = re.findall(r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", out, re.M)
        failed = list(dict.fromkeys(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
                                    + [name for name, o in outcomes if o in ("FAILED", "ERROR")]))
        if not counts and outcomes:  # cut short: what had run by then
            for _, o in outcomes:
                k = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
                     "XFAIL": "xfailed", "XPASS": "xpassed"}[o]
                counts[k] = counts.get(k, 0) + 1
        self.res["tests"] = dict(command=" ".join(cmd[2:]), returncode=None if timed_out else p.returncode,
                                 timed_out=timed_out, timeout_s=timeout, seconds=seconds, counts=counts,
                                 summary=line, failed=failed, tail=out[-4000:], stderr_tail=(err or "")[-2000:])
        why = None
        if timed_out:
            why = (f"timed out after {timeout:.0f} s (raise --tests-s or --budget-s); ran so far: {counts or 'nothing'}"
                   + (f"; failed so far: {', '.join(failed)}" if failed else ""))
        elif p.returncode != 0 or counts.get("failed") or counts.get("errors") or not line:
            why = (f"{line or 'no pytest summary line on stdout'} (exit status {p.returncode})"
                   + (f"; failed: {', '.join(failed)}" if failed else ""))
        if why:
            self.res["errors"]["tests"] = why
        print(f"tests: {line or counts or 'no summary'} in {seconds:.0f} s" + (f"; FAILED: {why}" if why else ""), flush=True)

    # throughput -----------------------------------------------------------------------------------------
    def throughput(self, net: str, configs, compiled: bool, allow_s: float):
        spec = self.prof["nets"][net]
        key = f"{'compiled' if compiled else 'eager'}_{net}"
        start = time.perf_counter()
        deadline = start + allow_s
        warm_until = start + 0.6 * allow_s  # the rest for the rounds
        rows: dict = {}
        self.res[key] = rows
        todo = [c for c in configs if self.selected(c[0])]
        built: dict[str, Config] = {}
        for i, (label, lib, opts, cl, amp) in enumerate(todo):
            now = time.perf_counter()
            need = (90 if self.cuda else 30) if compiled else 0
            if built and (now > warm_until or self.left() < need + 10):
                self.skip(f"{key}/{label}: budget ({self.left():.0f} s left of the run, "
                          f"{deadline - now:.0f} s of this item's share)")
                continue
            c = None
            try:
                self.maybe_fail(label, key, f"{key}/{label}")
                c = Config(label, net, spec, lib, opts, cl, amp, self.args.device, compiled, self.args.compile_backend)
                cap = min(self.prof["warm_s"], max(1.0, (warm_until - time.perf_counter()) / (len(todo) - i)))
                tr, steady_t = settle(c.step, self.prof["warm_max"], cap)
                inf, steady_i = settle(c.infer, self.prof["warm_max"], cap / 2)
                rows[label] = dict(first_step_s=tr[0], first_infer_s=inf[0], warmup_steps=len(tr),
                                   warmup_infer_steps=len(inf), steady=steady_t and steady_i,
                                   warm_step_s=statistics.median(tr[-3:]), warm_infer_s=statistics.median(inf[-3:]))
                built[label] = c
            except LookupError as e:
                self.skip(f"{key}/{label}: {e}")
            except Exception as e:  # noqa: BLE001 - this configuration's error; the others go on
                self.error(f"{key}/{label}", e)
                rows.pop(label, None)
                del c
                free(self.args.device)
            self.save()
        est = sum(self.prof["steps"] * (rows[k]["warm_step_s"] + rows[k]["warm_infer_s"]) for k in built)
        rounds = max(1, min(self.prof["rounds"], int((deadline - time.perf_counter()) / max(est, 1e-9))))
        for r in range(rounds):  # interleaved: load from elsewhere hits every configuration alike
            if r and time.perf_counter() + est > deadline:
                rounds = r
                break
            for label, c in list(built.items()):
                try:
                    n = self.prof["steps"]
                    c.train_rounds.append(sum(c.step() for _ in range(n)) / n)
                    c.infer_rounds.append(sum(c.infer() for _ in range(n)) / n)
                except Exception as e:  # noqa: BLE001
                    self.error(f"{key}/{label}", e)
                    rows.pop(label, None)
                    del built[label]
                    c = None  # noqa: PLW2901 - its memory back before the next configuration steps
                    free(self.args.device)
            self.figures(key, spec, built)
            self.save()
        if rounds < self.prof["rounds"]:
            self.res["skipped"].append(f"{key}: {rounds} of {self.prof['rounds']} rounds (budget)")
        self.table(key, spec, compiled)

    def figures(self, key: str, spec: dict, built: dict) -> None:
        rows, b = self.res[key], spec["batch"]
        for label, c in built.items():
            r = rows[label]
            for what, times in (("train", c.train_rounds), ("infer", c.infer_rounds)):
                if times:
                    med = statistics.median(times)
                    r.update({f"{what}_img_s": b / med, f"{what}_img_s_min": b / max(times),
                              f"{what}_img_s_max": b / min(times), f"{what}_spread_pct": 100 * (max(times) - min(times)) / med})
            r["rounds"] = len(c.train_rounds)
        base = self.res.get(f"eager_{key.split('_', 1)[1]}", {}).get("tv", {})
        for r in rows.values():
            for what in ("train", "infer"):
                if base.get(f"{what}_img_s") and r.get(f"{what}_img_s"):
                    r[f"{what}_vs_tv"] = r[f"{what}_img_s"] / base[f"{what}_img_s"]

    def table(self, key: str, spec: dict, compiled: bool) -> None:
        nan = float("nan")
        print(f"\n## {'Compiled' if compiled else 'Eager'}: {spec['title']}  (ratios to torchvision NCHW eager fp32; "
              f"median of interleaved rounds, [min-max])")
        print(f"{'config':22s} {'train img/s':>11s} {'[min-max]':>17s} {'vs tv':>6s} | {'infer img/s':>11s} {'[min-max]':>17s} "
              f"{'vs tv':>6s} | first step s, warm-up steps")
        for label, r in self.res[key].items():
            if "train_img_s" not in r:
                continue
            print(f"{label:22s} {r['train_img_s']:11.1f} [{r['train_img_s_min']:7.1f}-{r['train_img_s_max']:7.1f}] "
                  f"{r.get('train_vs_tv', nan):5.2f}x | {r['infer_img_s']:11.1f} [{r['infer_img_s_min']:7.1f}-"
                  f"{r['infer_img_s_max']:7.1f}] {r.get('infer_vs_tv', nan):5.2f}x | {r['first_step_s']:6.2f}, "
                  f"{r['warmup_steps']}{'' if r['steady'] else ' (not steady)'}", flush=True)
        for k, e in self.res["errors"].items():
            if k.startswith(key + "/"):
                print(f"{k.split('/', 1)[1]:22s} ERROR {e.splitlines()[0][:200]}", flush=True)

    # the verdict ----------------------------------------------------------------------------------------
    def verdict(self) -> None:
        """Which path trains faster here, eager: the entry for fused/policy.FUSED_BY_DEVICE. Never raises."""
        try:
            self.res["verdict"] = v = self._verdict()
        except Exception as e:  # noqa: BLE001 - the verdict must not end the run
            self.res["verdict"] = v = dict(rule=None, why=f"the verdict could not be formed: {error_text(e).splitlines()[0]}")
        self.save()
        if v.get("fused_over_reference"):
            print("\nfused / reference training throughput: " + ", ".join(f"{k} {x:.2f}x" for k, x in v["fused_over_reference"].items()))
        print(verdict_line(v), flush=True)

    def _verdict(self) -> dict:
        dev = torch.device(self.args.device).type
        try:
            from densenet.models.fused import policy as _policy

            current = _policy.FUSED_BY_DEVICE.get(dev)
        except Exception:  # noqa: BLE001
            current = None
        votes, missing = {}, []
        for net in self.prof["nets"]:
            key = f"eager_{net}"
            rows = self.res.get(key)
            for fused, ref in VERDICT_PAIRS:
                if not (self.selected(fused) and self.selected(ref)):
                    continue
                gone = [lab for lab in (fused, ref) if "train_img_s" not in (rows or {}).get(lab, {})]
                if gone:
                    missing += [f"{key}/{lab}: " + ("failed" if f"{key}/{lab}" in self.res["errors"] or key in self.res["errors"]
                                                    else "not measured") for lab in gone]
                else:
                    votes[f"{net}-{'bf16' if fused.endswith('bf16') else 'fp32'}"] = rows[fused]["train_img_s"] / rows[ref]["train_img_s"]
        v = dict(device=dev, current=current, fused_over_reference=votes)
        if not self.cuda:  # the CPU's entry comes from benchmarks/bench_densenet.py at full sizes
            v["note"] = (f"{'--tiny' if self.args.tiny else 'small CPU'} sizes: not evidence for the device; "
                         f"do not act on this rule")
        partial = statistics.median(votes.values()) >= 1.0 if votes else None
        if missing or not votes:
            v.update(rule=None, why=("cannot be formed: " + "; ".join(missing) if missing else
                                     "no fused/reference pair measured (--configs or --sections leave them out)"))
            if votes:
                v["partial"] = f'FUSED_BY_DEVICE["{dev}"] = {partial} (from {", ".join(votes)} alone)'
            return v
        v.update(rule=f'FUSED_BY_DEVICE["{dev}"] = {partial}', fused=partial,
                 why=f"median fused/reference training throughput {statistics.median(votes.values()):.2f}x over "
                     f"{', '.join(votes)}")
        return v

    # memory ---------------------------------------------------------------------------------------------
    def memory(self, depth: int):
        key, batch = f"memory/L={depth}", self.prof["memory_batch"]
        impls = [i for i in MEMORY if self.selected(i[0])]
        row = self.res.setdefault("memory", {}).setdefault(str(depth), {})
        worker: dict = {}
        if not self.cuda:  # peak RSS needs a fresh process: one worker per depth, a fork per configuration
            jobs = [i for i in impls if not self.forced.intersection({i[0], "memory", key, f"{key}/{i[0]}"})]
            worker = memory_in_worker(jobs, depth, batch, self.args, timeout=max(10.0, self.left()))
        for label, lib, opts in impls:
            try:
                self.maybe_fail(label, "memory", key, f"{key}/{label}")
                if self.cuda:
                    if self.left() < 5:
                        self.skip(f"{key}/{label}: budget")
                        continue
                    r = memory_step(label, lib, opts, depth, batch, self.args.device)
                else:
                    r = worker.get(label) or {"error": "the memory worker gave no answer"}
                    if "error" in r:
                        raise RuntimeError(r["error"])
                row[label] = r
            except Exception as e:  # noqa: BLE001 - this row's error; the others go on
                self.error(f"{key}/{label}", e)
            finally:
                free(self.args.device)
                self.save()
        unit = "max_memory_allocated, 2nd step" if self.cuda else "peak RSS growth"
        tv = row.get("tv", {}).get("peak_mb")
        print(f"memory L={depth:4d} batch {batch} ({unit}, MB): " + "  ".join(
            f"{k} {v['peak_mb']:.0f}" + (f" ({tv / v['peak_mb']:.2f}x less than tv)" if tv and k != "tv" and v["peak_mb"] > 0 else "")
            for k, v in row.items()), flush=True)

    # real training --------------------------------------------------------------------------------------
    def real(self):
        from densenet.train import TrainConfig, fit

        self.maybe_fail("real")
        archive = self.args.data
        if not archive or not Path(archive).is_file():
            self.skip(f"real: no CIFAR-10 archive at {archive} (give --data PATH)")
            return
        r = self.prof["real"]
        plan = self.real_plan(r)
        self.res["real"] = dict(plan=plan)
        if plan.get("skip"):
            self.skip(f"real: {plan['skip']}")
            return
        cfg = TrainConfig(model="densenet_bc_100_k12", model_args={"depth": r["depth"]}, dataset="folder", data=str(archive),
                          epochs=plan["epochs"], train_subset=plan["subset"], batch_size=r["batch"], device=self.args.device,
                          amp="bf16" if self.cuda else "none", channels_last=True, progress=False, tensorboard=False, out=None)
        print(f"real: {plan['epochs']} epoch(s) of {plan['subset'] or CIFAR_TRAIN} images, ~{plan['estimated_s']:.0f} s "
              f"estimated ({plan['why']})", flush=True)
        t = time.perf_counter()
        s = fit(cfg)
        self.res["real"].update(config={k: v for k, v in cfg.to_dict().items() if v is not None}, seconds=time.perf_counter() - t,
                                val_top1_error=s.get("val_top1_error"), best=s.get("best"), images_per_s=s.get("images_per_s"),
                                train_loss=s.get("train_loss"), epochs=s.get("epochs"))
        print(f"real: DenseNet-BC-{r['depth']} on CIFAR-10, {plan['epochs']} epoch(s): validation error "
              f"{s.get('val_top1_error', float('nan')):.2f}%, {s.get('images_per_s', 0):.0f} img/s (last epoch), "
              f"{time.perf_counter() - t:.0f} s in all", flush=True)

    def real_plan(self, r: dict) -> dict:
        """Epochs and training subset that fit the time left, from a measured step time."""
        step_s, source = self.real_step_s(r)
        batch, epochs = r["batch"], r["epochs"]
        n = min(r["subset"] or CIFAR_TRAIN, CIFAR_TRAIN)
        eval_s = CIFAR_VAL / batch * step_s / 3 * REAL_STEP_OVERHEAD  # a forward pass: ~1/3 of a training step
        step_cost = step_s * REAL_STEP_OVERHEAD
        avail = self.left() - 15

        def cost(ep, images):
            return REAL_LOAD_S + ep * (math.ceil(images / batch) * step_cost + eval_s)

        plan = dict(step_s=step_s, step_s_from=source, available_s=avail)
        if cost(epochs, n) <= avail:
            return dict(plan, epochs=epochs, subset=r["subset"], estimated_s=cost(epochs, n), why="as planned")
        for ep in sorted({epochs, 1}, reverse=True):
            steps = int((avail - REAL_LOAD_S - ep * eval_s) / (ep * step_cost))
            if steps >= REAL_MIN_STEPS:
                sub = min(steps * batch, n)
                return dict(plan, epochs=ep, subset=sub, estimated_s=cost(ep, sub),
                            why=f"sized to the time left: {cost(epochs, n):.0f} s needed for {epochs} epoch(s) of {n} images")
        return dict(plan, skip=f"too little time: {self.left():.0f} s left, {cost(1, REAL_MIN_STEPS * batch):.0f} s needed "
                               f"for {REAL_MIN_STEPS} steps (at {step_s * 1e3:.0f} ms a step, {source})")

    def real_step_s(self, r: dict) -> tuple[float, str]:
        """Seconds of one training step of the real run's model: from the eager rows where they measured the
        same network and batch, else timed here."""
        spec = self.prof["nets"].get("cifar", {})
        rows = self.res.get("eager_cifar", {})
        if spec.get("depth") == r["depth"] and spec.get("batch") == r["batch"] and spec.get("size") == 32:
            try:
                from densenet.models.fused import policy as _policy

                fused = _policy.FUSED_BY_DEVICE.get(torch.device(self.args.device).type, False)  # as fused="auto"
            except Exception:  # noqa: BLE001
                fused = False
            amp = "-bf16" if self.cuda else ""
            for label in (("ours" if fused else "ours-reference") + amp, "ours" + amp, "ours-reference" + amp):
                if rows.get(label, {}).get("train_img_s"):
                    return r["batch"] / rows[label]["train_img_s"], f"eager_cifar/{label}"
        spec = dict(depth=r["depth"], batch=r["batch"], size=32, classes=10)
        c = Config("real-probe", "cifar", spec, "ours", {}, True, "bf16" if self.cuda else None, self.args.device)
        times, _ = settle(c.step, 12, 15.0)
        del c
        free(self.args.device)
        return statistics.median(times[-3:]), f"timed: {len(times)} steps"


def verdict_line(v: dict) -> str:
    dev = v.get("device", "?")
    if v.get("rule"):
        now = v.get("current")
        change = (" (not in FUSED_BY_DEVICE now: add it)" if now is None else " (as it is)" if now == v.get("fused")
                  else f" (it is {now} now: change it)")
        return (f"=> set in src/densenet/models/fused/policy.py: {v['rule']}{change}; {v.get('why', '')}"
                + (f"  [{v['note']}]" if v.get("note") else ""))
    return (f"=> no verdict for FUSED_BY_DEVICE[\"{dev}\"]: {v.get('why', 'not formed')}; leave src/densenet/models/fused/policy.py "
            f"as it is" + (f" (partial: {v['partial']})" if v.get("partial") else ""))


def kill_group(p: subprocess.Popen) -> None:
    """Kill a child started with start_new_session=True and whatever it started."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        p.kill()


SUMMARY = re.compile(r"^=*\s*((?:\d+ (?:passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)(?:, )?)+|no tests ran)"
                     r"(?: in [\d.]+s)")


def pytest_summary(stdout: str) -> tuple[dict, str | None]:
    """pytest's final summary line ("2 failed, 40 passed, 3 deselected in 9.81s") on stdout: its counts and
    the line (errors/warnings counted as "errors"/"warnings"), or ({}, None) where there is none."""
    for line in reversed(stdout.splitlines()):
        m = SUMMARY.match(line.strip())
        if m:
            counts = {}
            for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)", m.group(1)):
                k = {"error": "errors", "warning": "warnings"}.get(k, k)
                counts[k] = int(n)
            return counts, line.strip().strip("= ")
    return {}, None


def memory_step(label, lib, opts, depth, batch, device) -> dict:
    """Peak memory of an fp32 training step (MB). CUDA: max_memory_allocated of the step after one warm-up
    step (so that cuDNN's autotuning workspaces, cudnn.benchmark, count for no one), stats reset in between.
    CPU: the growth of peak RSS in the first step, which is the only one peak RSS can see (memory the
    allocator keeps after a step hides the next step's growth)."""
    spec = dict(depth=depth, batch=batch, size=32, classes=10)
    free(device)
    cuda = device.startswith("cuda")
    c = Config(label, "cifar", spec, lib, opts, False, None, device)
    if cuda:
        c.step()  # warm-up: autotuning, first allocations
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        reset_peak_rss()
        before = rss_mb("VmRSS")
    c.step()
    # Linux syncs its per-thread RSS counters lazily (up to 64 pages each), so VmHWM can read a few pages
    # below the VmRSS read before: the peak is at least what was resident before the step
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else max(rss_mb("VmHWM"), rss_mb("VmRSS"), before)
    del c
    return dict(peak_mb=peak if cuda else peak - before, before_mb=before, total_peak_mb=peak,
                measured_step=2 if cuda else 1)


def memory_in_worker(impls, depth, batch, args, timeout: float) -> dict:
    """The CPU memory rows of one depth, from a fresh process: {label: row, or {"error": text}}."""
    if not impls:
        return {}
    cmd = [sys.executable, __file__, "--worker-memory", json.dumps(dict(impls=impls, depth=depth, batch=batch)),
           "--device", "cpu", "--threads", str(args.threads)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {i[0]: {"error": f"the memory worker timed out after {timeout:.0f} s"} for i in impls}
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        why = f"the memory worker failed (exit status {p.returncode}): {(p.stderr or '')[-1000:]}"
        return {i[0]: {"error": why} for i in impls}


def memory_worker(job: dict, device: str) -> dict:
    """In a fresh process that has only imported: one forked child per configuration (each a fresh heap)."""
    import densenet  # noqa: F401 - imported once, before the forks
    import bench_densenet  # noqa: F401

    if any(lib == "tv" for _, lib, _ in job["impls"]):
        import torchvision  # noqa: F401

    out = {}
    for label, lib, opts in job["impls"]:
        if not hasattr(os, "fork"):
            try:
                out[label] = memory_step(label, lib, opts, job["depth"], job["batch"], device)
            except Exception as e:  # noqa: BLE001
                out[label] = {"error": error_text(e)}
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, answer, leave without cleanup
            os.close(r)
            try:
                answer = memory_step(label, lib, opts, job["depth"], job["batch"], device)
            except BaseException as e:  # noqa: BLE001
                answer = {"error": error_text(e)}
            os.write(w, json.dumps(answer).encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        try:
            out[label] = json.loads(data)
        except ValueError:
            out[label] = {"error": f"the measuring process ended without an answer (wait status {status})"}
    return out


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: /proc/self/clear_refs, 5); where not allowed, it stays."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


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


def sections_run(run: Run, sections: set, args) -> None:
    nets = list(run.prof["nets"])
    if "train" in sections:
        for i, net in enumerate(nets):  # the verdict after each network: written however the rest goes
            allow = max(30.0, (0.35 if i < len(nets) - 1 else 0.6) * run.left())  # a share; the rest for later items
            run.item(f"eager_{net}", 30, run.throughput, net, [c for c in EAGER if not (c[1] == "timm" and net != "imagenet")],
                     False, allow, allow_s=allow)
            run.verdict()
    else:
        run.res["verdict"] = dict(device=torch.device(args.device).type, rule=None,
                                  why="the train section did not run (--sections)")
    if "memory" in sections:
        for d in run.prof["memory_depths"]:
            run.item(f"memory/L={d}", 15, run.memory, d)
    if "tests" in sections:
        run.item("tests", 60, run.tests)
    if "real" in sections:
        run.item("real", 60 if run.cuda else 20, run.real)
    if "compiled" in sections:
        for net in nets:
            configs = COMPILED[:2] if run.cuda else COMPILED
            run.item(f"compiled_{net}", 90 if run.cuda else 30, run.throughput, net, configs, True, run.left() - 10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here (rewritten after every configuration)")
    p.add_argument("--budget-s", type=float, default=470, help="wall-clock budget of the whole check (s)")
    p.add_argument("--tests-s", type=float, default=170, help="at most this long for the tests (s)")
    p.add_argument("--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)} (train includes infer; always run "
                                      "in that order; default: train,memory,tests,real on a GPU, train,memory,real on the "
                                      "CPU; compiled only when named)")
    p.add_argument("--data", default=None,
                   help="the CIFAR-10 training archive for the real training (default: .devdata/, else ../shared/data/)")
    p.add_argument("--real-epochs", type=int, default=3, help="epochs of the real training, if the budget allows")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    p.add_argument("--tiny", action="store_true", help="on the CPU: the smallest sizes (the CI test; its verdict is no evidence)")
    p.add_argument("--configs", help="only these configurations (comma-separated labels, e.g. tv,ours), memory rows too")
    p.add_argument("--memory-depths", help="comma-separated depths for the memory section (default: the profile's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--fail-config", metavar="LABEL",
                   help="self-test: raise inside these configurations' try blocks (comma-separated: a label, e.g. "
                        "ours-reference, everywhere it runs; SECTION/LABEL, e.g. eager_cifar/ours or memory/L=100/tv; "
                        "or tests, real) to check that the failure is recorded, the rest runs and the exit status is 1")
    p.add_argument("--worker-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    try:  # called in-process (tests/test_gpu_check.py): the caller's thread count back afterwards
        if not args.device.startswith("cuda"):
            torch.set_num_threads(args.threads)
        return run_check(args)
    finally:
        torch.set_num_threads(threads)


def run_check(args) -> int:
    if args.worker_memory:
        print(json.dumps(memory_worker(json.loads(args.worker_memory), args.device)))
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
    sections = set((args.sections or ("train,memory,tests,real" if args.device.startswith("cuda")
                                      else "train,memory,real")).split(","))
    sections.discard("infer")
    unknown = sections - set(SECTIONS)
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    run = Run(args)
    m = run.res["meta"]
    print(f"# gpu_check {m['date']}  {m.get('gpu', m.get('cpu'))}  torch {m['torch']}  device {args.device}  "
          f"budget {args.budget_s:.0f} s  sections {','.join(s for s in SECTIONS if s in sections)}", flush=True)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def stop(signum, frame):
            raise Interrupted("SIGTERM")

        old_term = signal.signal(signal.SIGTERM, stop)
    try:
        sections_run(run, sections, args)
    except (KeyboardInterrupt, Interrupted, Exception) as e:  # noqa: BLE001 - still write what there is
        run.error("run", e)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    run.res["meta"]["seconds"] = time.perf_counter() - run.t0
    run.save()
    errors = run.res["errors"]
    print(f"\n{TARGETS}\n# done in {run.res['meta']['seconds']:.0f} s; skipped: {len(run.res['skipped'])}, "
          f"errors: {len(errors)}" + (f" -> {args.json}" if args.json else ""), flush=True)
    for s in run.res["skipped"]:
        print(f"  skipped: {s}")
    if "verdict" in run.res:
        print(verdict_line(run.res["verdict"]))
    for k, e in errors.items():
        print(f"FAILED {k}: {e.splitlines()[0][:300]}")
    print(f"# {'FAILED: ' + ', '.join(errors) if errors else 'OK: nothing failed'}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
