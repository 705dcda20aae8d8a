"""Where the cells of a grid run: here one after another (`local`), as SLURM jobs through submitit
(`slurm`) or as Ray tasks (`ray`). Each launcher only hands cells to an existing scheduler; what a
cell does is the same everywhere (`run_cell`), and everything about its state is written into its
run directory, so `densenet reproduce status` reads it back whichever launcher ran it.

    RUN/launch.json     written when the cell is handed to a scheduler: launcher, job id, time
    RUN/densenet.lock   the run's one lock (train/lock.py), held while an attempt runs; its record:
                        host, pid, start, attempt number, and the cell's launcher, job id, key and
                        the epoch it resumed at (kept after the attempt, marked released)
    RUN/error.json      why the last attempt failed (removed when a new attempt starts)
    RUN/summary.json    written by training when the cell is done

A cell is idempotent: a done cell is skipped, a cell with a checkpoint is resumed from it, and the
lock makes a second attempt of the same cell give way while the first runs. So re-running the same
command (or a scheduler retrying a job after pre-emption) can never train a cell twice at once.

One lock. A cell is locked by train/lock.py's `DirLock`, the very lock `densenet train --out/--resume`
takes, so a run started by hand in a cell's directory and a grid's attempt at it exclude each other,
whichever came first: the grid reports the cell as running (busy) and skips it; the hand-started run
is refused with one line naming the attempt (pid, host, grid cell, job). An attempt takes the lock
first (not waiting: a held lock means busy), decides under it whether the cell is done and whether
to resume it, records the epoch it resumes at, then runs the cell's own training inside
`lock.hand_over()`: the `DirLock` that `fit` takes in this process takes the attempt's lock over
(it is not refused by its own launcher, and nothing can slip in between), and so does torchrun's
`densenet train` of a multi-GPU cell, a child process started with the hand-over's environment
(this process keeps the flock for the child's whole life). The kernel releases the flock when the
attempt dies (kill -9, OOM, pre-emption), so a dead attempt never blocks the next one; the record
stays, and the next attempt counts on from it.

submitit and Ray are optional: pip install "densenet-paper[cluster]".
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..train.lock import DirLock, LockedError
from ..utils.atomic import write_text_atomic
from ..utils.validate import parse_json, read_json

LAUNCHERS = ("local", "slurm", "ray")
LAUNCH_FILE, ERROR_FILE, SUMMARY_FILE = "launch.json", "error.json", "summary.json"


class LauncherError(ValueError):
    """A launcher cannot be used as asked (missing package, bad option); printed as one line."""


def _read_json(path: Path) -> dict | None:
    """A cell's JSON record, None where there is none; a damaged one is a ValueError naming the file."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


# --- one cell --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellJob:
    """Everything a job needs to train one cell, in plain data (it is pickled to the job)."""

    key: str  # e.g. densenet_40_k12/C10+/seed0
    run_dir: str
    config: dict  # a resolved TrainConfig.to_dict(), its `out` the run directory
    procs: int = 1  # processes (GPUs) of the cell: more than one trains under torchrun inside the job


def run_cell(job: CellJob, launcher: str = "local", job_id: str | None = None) -> dict:
    """Train one cell to the end, resuming its checkpoint if it has one; skip it if done.

    Returns {"key", "outcome": "done"|"skipped"|"busy", "summary"}; "busy" (with "error", the holder) while
    another process holds the cell's lock: another attempt, or a `densenet train` started by hand. A failure
    is written to RUN/error.json and raised again (TrainingStopped keeps its exit code)."""
    run = Path(job.run_dir)
    if (run / SUMMARY_FILE).is_file():
        return {"key": job.key, "outcome": "skipped", "summary": _read_json(run / SUMMARY_FILE)}
    try:
        lock = DirLock(run, {"launcher": launcher, "job_id": job_id, "key": job.key}).acquire()
    except LockedError as e:
        return {"key": job.key, "outcome": "busy", "error": str(e)}
    try:
        if (run / SUMMARY_FILE).is_file():  # done by another attempt just before this one took the lock
            return {"key": job.key, "outcome": "skipped", "summary": _read_json(run / SUMMARY_FILE)}
        return {"key": job.key, "outcome": "done", "summary": _attempt(job, run, lock)}
    except LockedError as e:  # not expected (the lock is handed over to the cell's training): not a failure
        return {"key": job.key, "outcome": "busy", "error": str(e)}
    finally:
        lock.release()


def _attempt(job: CellJob, run: Path, lock: DirLock) -> dict:
    from ..train import TrainConfig, TrainingStopped, fit

    with contextlib.suppress(FileNotFoundError):
        (run / ERROR_FILE).unlink()
    resume = (run / "last").exists()
    lock.update(resumed_at_epoch=checkpoint_epoch(run) if resume else 0)
    try:
        with lock.hand_over() as env:  # the cell's own training takes this lock over (module docstring)
            if job.procs > 1:
                return _torchrun(job, resume, env)
            return fit(TrainConfig.from_dict(job.config), resume=str(run) if resume else None)
    except TrainingStopped as e:
        _record_error(run, str(e), e.exit_code, lock.record)
        raise
    except LockedError:  # another process trains the run: not a failure of this cell
        raise
    except BaseException as e:
        text = str(e) or type(e).__name__
        if isinstance(e, SystemExit):
            text = f"the job exited (status {e.code}) before the cell finished"
        elif isinstance(e, KeyboardInterrupt):
            text = "interrupted"
        _record_error(run, text, getattr(e, "exit_code", 1), lock.record)
        raise


def _record_error(run: Path, message: str, exit_code: int, held: dict) -> None:
    write_text_atomic(run / ERROR_FILE, json.dumps(
        {"error": message, "exit_code": exit_code, "time": time.time(), "host": held.get("host"),
         "job_id": held.get("job_id"), "attempt": held.get("attempt"), "epoch": _epochs_done(run)}, indent=2) + "\n")


def _epochs_done(run: Path) -> int:
    """Epochs finished by the run so far: the last row of its metrics."""
    try:
        lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        return int(parse_json(lines[-1], "metrics.jsonl", dict)["epoch"]) if lines else 0
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 0


def checkpoint_epoch(run: Path) -> int:
    """Epochs finished by the run's last checkpoint (read from its header; nothing is unpickled)."""
    try:
        from safetensors import safe_open

        with safe_open(str(run / "last" / "state.safetensors"), framework="pt") as f:
            return int(parse_json((f.metadata() or {})["train"], "state.safetensors", dict)["epoch"])
    except Exception:  # noqa: BLE001 -- no or an unreadable checkpoint: nothing to resume from
        return 0


def _torchrun(job: CellJob, resume: bool, handover: dict[str, str]) -> dict:
    """A multi-GPU cell: `densenet train` under torchrun, one process per GPU of this job. `handover`: the
    environment by which its rank 0 takes over the cell's lock, which this process holds meanwhile."""
    run = Path(job.run_dir)
    config_file = run / "cell-config.json"
    write_text_atomic(config_file, json.dumps(job.config, indent=2) + "\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.procs}",
           "-m", "densenet.cli", "train", "--config", str(config_file)]
    if resume:
        cmd += ["--resume", str(run)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    code = subprocess.call(cmd, env={**env, **handover})
    if code != 0 or not (run / SUMMARY_FILE).is_file():
        from ..train import TrainingStopped

        raise TrainingStopped(f"torchrun ({job.procs} processes) exited with status {code} before the cell "
                              f"finished; its output is in the job's log", code or 1)
    return _read_json(run / SUMMARY_FILE) or {}


def write_launch(job: CellJob, launcher: str, job_id: str | None, note: str = "",
                 submitted: float | None = None) -> None:
    """Record the hand-over; `submitted` is taken before the submission, so that it never postdates
    the start of the attempt (which would make a started cell look queued)."""
    write_text_atomic(Path(job.run_dir) / LAUNCH_FILE, json.dumps(
        {"launcher": launcher, "job_id": job_id, "submitted": submitted or time.time(), "key": job.key, "note": note,
         "epochs": job.config.get("epochs"), "procs": job.procs}, indent=2) + "\n")


# --- options ----------------------------------------------------------------------------------------------

@dataclass
class LaunchOptions:
    """What a cluster user sets; from --launcher-config FILE and the command line (which wins)."""

    launcher: str = "local"
    gpus_per_cell: int | None = None  # GPUs of one cell (None: 1 on slurm; on ray, 1 if the cluster has GPUs)
    cpus_per_cell: int | None = None  # CPU cores of one cell (data loading; None: 4 per GPU on slurm, 1 on ray)
    mem_gb: float | None = None  # memory of one cell (slurm)
    partition: str | None = None  # slurm partition
    time: str | None = None  # slurm time limit of one job: minutes or [D-]HH:MM[:SS]; longer cells are requeued
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None  # e.g. a100 (slurm --constraint)
    setup: list[str] = field(default_factory=list)  # shell lines run before each job (module load, conda activate)
    slurm_args: dict[str, str] = field(default_factory=dict)  # any other sbatch option: {"exclude": "node7"}
    max_parallel: int | None = None  # at most this many cells at once (slurm array parallelism)
    max_requeues: int = 10  # slurm: times a timed-out or pre-empted cell is requeued
    cluster: str = "slurm"  # slurm; local and debug run submitit's own executors (tests, a laptop)
    wait: bool = False  # slurm: wait for the jobs and write results.md; default: submit and return
    ray_address: str | None = None  # an existing Ray cluster (None: start one here, or RAY_ADDRESS)
    ray_retries: int = 3  # Ray re-runs a cell whose worker died this many times (it resumes)
    ray_num_cpus: int | None = None  # a Ray started here: its CPUs

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise LauncherError(f"unknown launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if self.cluster not in ("slurm", "local", "debug"):
            raise LauncherError(f"slurm cluster must be slurm, local or debug, got {self.cluster!r}")
        for name in ("gpus_per_cell", "cpus_per_cell", "max_parallel"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "gpus_per_cell" else 1)):
                raise LauncherError(f"{name.replace('_', '-')} must be a whole number >= "
                                    f"{0 if name == 'gpus_per_cell' else 1}, got {v!r}")
        if self.time is not None:
            timeout_minutes(self.time)
        if isinstance(self.setup, str):
            self.setup = [self.setup]

    @property
    def procs(self) -> int:
        """Processes per cell on SLURM: one per GPU (torchrun), one on CPU. (Ray: the same, once it
        knows whether its cluster has GPUs.)"""
        return max(1, self.gpus_per_cell or 1) if self.launcher == "slurm" else 1


def timeout_minutes(text: str | int) -> int:
    """SLURM's time formats: MM, HH:MM:SS, D-HH[:MM[:SS]] -> whole minutes (rounded up)."""
    s = str(text).strip()
    try:
        days = 0
        if "-" in s:
            d, s = s.split("-", 1)
            days = int(d)
            parts = [int(p) for p in s.split(":")] + [0] * (3 - len(s.split(":")))
            h, m, sec = parts[:3]
        else:
            parts = [int(p) for p in s.split(":")]
            if len(parts) == 1:
                h, m, sec = 0, parts[0], 0
            elif len(parts) == 2:
                h, m, sec = 0, parts[0], parts[1]
            else:
                h, m, sec = parts[-3:]
        minutes = days * 1440 + h * 60 + m + (1 if sec else 0)
    except ValueError:
        minutes = -1
    if minutes < 1 or len(str(text).split(":")) > 3:
        raise LauncherError(f"time {text!r}: give minutes (e.g. 720) or [D-]HH:MM[:SS] (e.g. 2-00:00:00)")
    return minutes


def read_launch_config(path: str | Path) -> dict:
    """Settings of LaunchOptions from a TOML/YAML/JSON file (a [slurm_args] table for other sbatch options)."""
    from ..train.config import read_config_file

    data = read_config_file(path)
    names = set(LaunchOptions.__dataclass_fields__)
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        raise LauncherError(f"launcher config {path}: unknown setting(s) {', '.join(unknown)}; valid settings "
                            f"are {', '.join(sorted(names))}")
    return data


def add_launcher_args(p) -> None:
    """The launcher options of `densenet reproduce` (also settable in --launcher-config FILE)."""
    import argparse

    S = argparse.SUPPRESS  # unset options stay unset: --launcher-config or the defaults decide
    g = p.add_argument_group("where the cells run (slurm and ray need pip install \"densenet-paper[cluster]\")")
    g.add_argument("--launcher", choices=LAUNCHERS, default=S,
                   help="local: one after another in this process (default); slurm: one submitit job per cell; "
                        "ray: one Ray task per cell")
    g.add_argument("--launcher-config", metavar="FILE", help="TOML/YAML file of the options below "
                                                             "(command-line options win)")
    g.add_argument("--gpus-per-cell", type=int, default=S, help="GPUs of each cell; more than 1 runs torchrun "
                                                                "in the job (slurm default 1)")
    g.add_argument("--cpus-per-cell", type=int, default=S, help="CPU cores of each cell")
    g.add_argument("--mem-gb", type=float, default=S, help="memory of each cell (slurm)")
    g.add_argument("--partition", default=S, help="slurm partition")
    g.add_argument("--time", default=S, help="slurm time limit per job, minutes or [D-]HH:MM:SS; a cell that "
                                             "needs longer is checkpointed and requeued")
    g.add_argument("--account", default=S, help="slurm account to charge")
    g.add_argument("--qos", default=S, help="slurm quality of service")
    g.add_argument("--constraint", default=S, help="slurm node features, e.g. a100")
    g.add_argument("--setup", action="append", default=S, metavar="LINE",
                   help="shell line run before each slurm job, e.g. 'module load cuda' (repeat)")
    g.add_argument("--slurm-arg", action="append", default=S, metavar="KEY=VALUE", dest="slurm_args",
                   help="any other sbatch option, e.g. --slurm-arg exclude=node7 (repeat)")
    g.add_argument("--max-parallel", type=int, default=S, help="at most this many cells at once (slurm)")
    g.add_argument("--max-requeues", type=int, default=S, help="slurm: requeues of a timed-out cell (default 10)")
    g.add_argument("--cluster", choices=("slurm", "local", "debug"), default=S,
                   help="slurm: a SLURM cluster (default); local: submitit's jobs as processes of this machine; "
                        "debug: in this process, opening pdb on an error (submitit's debug executor)")
    g.add_argument("--wait", action=argparse.BooleanOptionalAction, default=S,
                   help="slurm: wait for the jobs, then write results.md (default: submit and return)")
    g.add_argument("--ray-address", default=S, help="an existing Ray cluster (default: RAY_ADDRESS, or start one)")
    g.add_argument("--ray-retries", type=int, default=S, help="ray: re-runs of a cell whose worker died (default 3)")


def options_from_args(args) -> LaunchOptions:
    settings: dict[str, Any] = {}
    if getattr(args, "launcher_config", None):
        settings.update(read_launch_config(args.launcher_config))
    for name in LaunchOptions.__dataclass_fields__:
        if not hasattr(args, name):
            continue
        v = getattr(args, name)
        if name == "slurm_args":
            pairs = {}
            for item in v:
                if "=" not in item:
                    raise LauncherError(f"--slurm-arg takes KEY=VALUE, got {item!r}")
                k, val = item.split("=", 1)
                pairs[k.strip().lstrip("-").replace("-", "_")] = val.strip()
            v = {**settings.get("slurm_args", {}), **pairs}
        settings[name] = v
    try:
        return LaunchOptions(**settings)
    except TypeError as e:
        raise LauncherError(f"launcher options: {e}") from None


# --- launchers --------------------------------------------------------------------------------------------

Report = Callable[[dict], None]  # called with each finished cell's outcome (to rebuild results.md)


def launch(jobs: list[CellJob], opts: LaunchOptions, folder: Path, report: Report = lambda r: None) -> list[dict]:
    """Hand the cells to the launcher of `opts`. Returns one outcome per cell handed over."""
    if not jobs:
        return []
    if opts.launcher == "slurm":
        return SlurmLauncher(opts, folder).launch(jobs, report)
    if opts.launcher == "ray":
        return RayLauncher(opts).launch(jobs, report)
    return [_local(job, report) for job in jobs]


def check(opts: LaunchOptions, folder: Path) -> None:
    """Fail before any work if the launcher cannot be used here (package missing, no SLURM)."""
    if opts.launcher == "slurm":
        SlurmLauncher(opts, folder).executor()
    elif opts.launcher == "ray":
        _require("ray")


def _local(job: CellJob, report: Report) -> dict:
    r = run_cell(job, "local")
    report(r)
    return r


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LauncherError(f"--launcher {'slurm' if module == 'submitit' else module} needs the {module} "
                            f"package: pip install \"densenet-paper[cluster]\" (or pip install {module})") from None


class SubmititCell:
    """The callable submitit pickles into each job: `run_cell`, and on timeout or pre-emption
    (SIGUSR2 before the time limit) a checkpoint at the current step, then a requeue of itself."""

    def __init__(self, job: CellJob):
        self.job = job

    def __call__(self) -> dict:
        submitit = _require("submitit")
        env = submitit.JobEnvironment()
        requeue = signal.getsignal(env._usr_sig())  # submitit's checkpoint-and-requeue handler
        asked: list[int] = []

        def on_usr(signum, frame):
            # the training loop saves at the end of the current step on SIGTERM (engine._StopFlag);
            # during training, hand it the signal, requeue after the save; before it, requeue at once
            current = signal.getsignal(signal.SIGTERM)
            if type(getattr(current, "__self__", None)).__name__ == "_StopFlag":
                asked.append(signum)
                current(signal.SIGTERM, frame)
            elif callable(requeue):
                write_launch(self.job, "slurm", env.job_id, "requeued after a timeout or pre-emption")
                requeue(signum, frame)

        signal.signal(env._usr_sig(), on_usr)
        try:
            return run_cell(self.job, "slurm", env.job_id)
        except BaseException:
            if asked and callable(requeue):
                write_launch(self.job, "slurm", env.job_id, "requeued after a timeout or pre-emption")
                requeue(asked[0], None)  # checkpoint() below, requeue, exit
            raise
        finally:  # the debug executor runs the job in the caller's process: leave its handler as it was
            signal.signal(env._usr_sig(), signal.SIG_DFL if requeue is None else requeue)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(SubmititCell(self.job))  # it resumes from the run directory


class SlurmLauncher:
    def __init__(self, opts: LaunchOptions, folder: Path):
        self.opts, self.folder = opts, folder

    def parameters(self) -> dict:
        """submitit AutoExecutor parameters from the options (tested against the sbatch text)."""
        o = self.opts
        gpus = 1 if o.gpus_per_cell is None else o.gpus_per_cell
        params: dict[str, Any] = {"name": "densenet", "nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus,
                                  "cpus_per_task": o.cpus_per_cell or 4 * max(1, gpus),
                                  "stderr_to_stdout": True}
        if o.time is not None:
            params["timeout_min"] = timeout_minutes(o.time)
        if o.mem_gb is not None:
            params["mem_gb"] = o.mem_gb
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(o, name):
                params[f"slurm_{name}"] = getattr(o, name)
        if o.setup:
            params["slurm_setup"] = list(o.setup)
        if o.max_parallel:
            params["slurm_array_parallelism"] = o.max_parallel
        if o.slurm_args:
            params["slurm_additional_parameters"] = dict(o.slurm_args)
        return params

    def executor(self):
        submitit = _require("submitit")
        try:
            cluster = self.opts.cluster
            requeues = {f"{cluster}_max_num_timeout": self.opts.max_requeues} if cluster != "debug" else {}
            ex = submitit.AutoExecutor(folder=str(self.folder / ".submitit" / "%j"), cluster=cluster, **requeues)
        except RuntimeError as e:  # e.g. no srun: not on a SLURM login node
            raise LauncherError(f"{str(e).strip().splitlines()[0]} (--cluster local runs the jobs on this "
                                f"machine instead)") from None
        params = self.parameters()
        if self.opts.cluster != "slurm":  # submitit's local executors take only the generic options
            params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k != "nodes"}
            if self.opts.cluster == "local":
                params["gpus_per_node"] = 0 if not _cuda_count() else min(params["gpus_per_node"], _cuda_count())
        try:
            ex.update_parameters(**params)
        except (NameError, AssertionError, ValueError) as e:
            raise LauncherError(f"submitit rejected the options: {str(e).splitlines()[0]}") from None
        return ex

    def launch(self, jobs: list[CellJob], report: Report) -> list[dict]:
        submitit = _require("submitit")
        ex = self.executor()
        waiting = []
        if self.opts.cluster == "slurm":  # a cell still queued or running from an earlier submission: leave it
            for j in jobs:
                launched = _read_json(Path(j.run_dir) / LAUNCH_FILE) or {}
                if launched.get("launcher") == "slurm" and launched.get("job_id"):
                    state = slurm_job_state(self.folder, str(launched["job_id"]))
                    if state in SLURM_ACTIVE:
                        print(f"{j.key}: still {state.lower()} as job {launched['job_id']}; not submitted again",
                              file=sys.stderr)
                        waiting.append({"key": j.key, "outcome": "queued", "job_id": str(launched["job_id"])})
            jobs = [j for j in jobs if j.key not in {w["key"] for w in waiting}]
            if not jobs:
                return waiting
        cells = [SubmititCell(CellJob(j.key, j.run_dir, j.config, self.opts.procs)) for j in jobs]
        t0 = time.time()
        if self.opts.cluster == "slurm" and len(cells) > 1:
            with ex.batch():  # one job array: a single sbatch for the whole grid
                handles = [ex.submit(c) for c in cells]
        else:
            handles = [ex.submit(c) for c in cells]
        outcomes = []
        for c, h in zip(cells, handles):
            write_launch(c.job, "slurm", str(h.job_id), submitted=t0)
            print(f"submitted {c.job.key} as job {h.job_id}", file=sys.stderr)
        if not (self.opts.wait or self.opts.cluster == "debug"):
            return waiting + [{"key": c.job.key, "outcome": "submitted", "job_id": str(h.job_id)}
                              for c, h in zip(cells, handles)]
        for c, h in zip(cells, handles):
            try:
                r = h.result()
            except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError, Exception) as e:
                first = str(e).strip().splitlines()
                r = {"key": c.job.key, "outcome": "failed", "job_id": str(h.job_id),
                     "error": (first[-1] if first else type(e).__name__)[:300]}
            outcomes.append(r)
            report(r)
        return waiting + outcomes


SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                "REQUEUE_HOLD", "REQUEUE_FED"}


def slurm_job_state(folder: Path, job_id: str) -> str:
    """SLURM's state of a job (sacct, through submitit); UNKNOWN when it cannot be asked."""
    try:
        from submitit.slurm.slurm import SlurmJob

        return str(SlurmJob(folder / ".submitit" / job_id, job_id).watcher.get_state(job_id, mode="force")).upper()
    except Exception:  # noqa: BLE001 -- no sacct, no answer: the lock still keeps a cell from running twice
        return "UNKNOWN"


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- no usable CUDA means none
        return 0


def _ray_cell(job: CellJob) -> dict:
    import ray

    try:
        task_id = ray.get_runtime_context().get_task_id()
    except Exception:  # noqa: BLE001 -- only a label
        task_id = None
    return run_cell(job, "ray", task_id)


class RayLauncher:
    def __init__(self, opts: LaunchOptions):
        self.opts = opts

    def launch(self, jobs: list[CellJob], report: Report) -> list[dict]:
        ray = _require("ray")
        started_here = False
        environ = dict(os.environ)  # ray.init sets RAY_* and PYTHONBREAKPOINT here; shutdown leaves them
        if not ray.is_initialized():
            address = self.opts.ray_address or os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if address:
                kwargs["address"] = address
            elif self.opts.ray_num_cpus:
                kwargs["num_cpus"] = self.opts.ray_num_cpus
            try:
                ray.init(**kwargs)
            except Exception as e:  # noqa: BLE001 -- Ray's own errors: one line
                _restore_environ(environ)
                raise LauncherError(f"could not start or reach Ray ({address or 'a local instance'}): "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
            started_here = True
        try:
            gpus = self.opts.gpus_per_cell
            if gpus is None:
                gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            task = ray.remote(_ray_cell).options(num_cpus=self.opts.cpus_per_cell or 1, num_gpus=gpus,
                                                 max_retries=self.opts.ray_retries, retry_exceptions=False)
            pending = {}
            for j in jobs:
                j = CellJob(j.key, j.run_dir, j.config, max(1, gpus))  # several GPUs: torchrun inside the task
                t0 = time.time()
                ref = task.remote(j)
                pending[ref] = j
                write_launch(j, "ray", ref.hex()[:16], submitted=t0)
            outcomes = []
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                j = pending.pop(done[0])
                try:
                    r = ray.get(done[0])
                except Exception as e:  # noqa: BLE001 -- the cell's error is in its run directory
                    r = {"key": j.key, "outcome": "failed", "error": _ray_error(e)}
                outcomes.append(r)
                report(r)
            return outcomes
        finally:
            if started_here:
                ray.shutdown()
                _restore_environ(environ)


def _restore_environ(before: dict[str, str]) -> None:
    """os.environ as it was before a Ray started here (this process's environment is the caller's)."""
    for key in [k for k in os.environ if k not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _ray_error(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    text = str(cause) if cause is not None else str(e)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]
