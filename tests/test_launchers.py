"""Launchers of reproduction grids: the run's one lock, shared with `densenet train` (each blocks the
other, in real processes), cells that skip, resume and record their failures, `reproduce status` from
run directories alone, and real grids of tiny digits cells run by submitit's local executor and by a
local Ray instance, with a killed cell that resumes."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from densenet.grid.status import cell_state
from densenet.grid.launchers import (CellJob, LaunchOptions, LauncherError, SlurmLauncher, checkpoint_epoch, launch,
                                     run_cell, timeout_minutes, write_launch)
from densenet.cli import main
from densenet.train.lock import LOCK_FILE, DirLock, LockedError, holder
from helpers import ENV, epochs_logged, make_folder, wait_for


def tiny_job(root: Path, name: str, epochs: int = 1) -> CellJob:
    """A cell of a few seconds: a 7-layer DenseNet (k=4) on 128 of scikit-learn's digits. (Explicit
    milestones: the recipe's fractions round to a drop at epoch 0 for 1 epoch, which resolve() rejects.)"""
    from densenet.train import TrainConfig

    cfg = TrainConfig(model="densenet_40_k12", model_args={"depth": 7, "growth_rate": 4}, dataset="digits",
                      epochs=epochs, milestones=(100.0,), train_subset=128, batch_size=32, val_size=100,
                      out=str(root / name), progress=False, tensorboard=False).resolve()
    return CellJob(f"{name}/digits/seed0", str(root / name), cfg.to_dict())



def lock_info(run: str) -> dict:
    """The record of the cell's lock (the run's one lock, train/lock.py): kept after an attempt."""
    return json.loads((Path(run) / LOCK_FILE).read_text())


# --- the lock and one cell, in this process -----------------------------------------------------------

def test_lock_is_exclusive_and_says_who_holds_it(tmp_path):
    with DirLock(tmp_path, {"launcher": "slurm", "job_id": "42", "key": "net/C10/seed0"}) as held:
        assert held.record["attempt"] == 1 and holder(tmp_path)["job_id"] == "42"
        with pytest.raises(LockedError, match=r"process \d+ on .*grid cell net/C10/seed0, slurm job 42"):
            DirLock(tmp_path).acquire()
    assert holder(tmp_path) is None  # released: and the next attempt counts on
    assert lock_info(tmp_path)["attempt"] == 1 and "released" in lock_info(tmp_path)
    with DirLock(tmp_path, {"key": "net/C10/seed0"}) as held:
        assert held.record["attempt"] == 2
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # one lock file, the run's


def test_a_cell_runs_once_then_is_skipped_and_a_busy_cell_gives_way(tmp_path):
    job = tiny_job(tmp_path, "a")
    r = run_cell(job)
    assert r["outcome"] == "done" and r["summary"]["epochs"] == 1
    st = cell_state(job.run_dir)
    assert (st.state, st.epoch, st.epochs, st.attempts) == ("done", 1, 1, 1) and "test error" in st.detail
    assert run_cell(job)["outcome"] == "skipped"
    other = tiny_job(tmp_path, "b")
    with DirLock(other.run_dir, {"job_id": "7", "launcher": "slurm", "key": other.key}):
        assert cell_state(other.run_dir).state == "running"
        assert "slurm job 7" in cell_state(other.run_dir).detail
        r = run_cell(other)
    assert r["outcome"] == "busy" and "job 7" in r["error"] and not (Path(other.run_dir) / "summary.json").exists()


def test_a_cell_trained_by_hand_is_running_and_the_launcher_gives_way(tmp_path):
    job = tiny_job(tmp_path, "by-hand")
    with DirLock(job.run_dir):  # what `densenet train --out RUN` holds while it trains
        st = cell_state(job.run_dir)
        assert st.state == "running" and f"pid {os.getpid()}" in st.detail
        r = run_cell(job)
    assert r["outcome"] == "busy" and str(os.getpid()) in r["error"]
    assert not (Path(job.run_dir) / "error.json").exists() and not (Path(job.run_dir) / "summary.json").exists()
    assert run_cell(job)["outcome"] == "done"  # once that run has let go


# --- one lock, across processes: `densenet train` by hand and the grid's attempt exclude each other --------

# A child process whose training stops half-way and waits there, holding what it took: the run's lock
# taken, the directory claimed (written.json), the data and the model built; `make_optimizer` waits
# instead (before torch.optim would import the compiler). argv[1] is a JSON list: a `densenet train`
# command line, or ["cell", CellJob fields] for the grid's attempt at a cell (`run_cell`, a slurm job).
PAUSED = """
import json, sys, time
import densenet.train.engine as engine

def make_optimizer(cfg, model):
    print("training", flush=True)
    time.sleep(120)

engine.make_optimizer = make_optimizer
argv = json.loads(sys.argv[1])
if argv[0] == "cell":
    from densenet.grid.launchers import CellJob, run_cell
    run_cell(CellJob(**argv[1]), "slurm", "7")
else:
    from densenet.cli import main
    sys.exit(main(argv))
"""
def folder_job(root: Path, name: str) -> CellJob:
    """A cell on a tiny image folder (no scikit-learn to import: the child processes start sooner)."""
    from densenet.train import TrainConfig

    folder = make_folder(root / "shapes", per_class=4, test_per_class=1, size=8)
    cfg = TrainConfig(model="densenet_40_k12", model_args={"depth": 7, "growth_rate": 4}, dataset="folder",
                      data=str(folder), epochs=1, milestones=(100.0,), batch_size=8, val_size=3,
                      out=str(root / name), progress=False, tensorboard=False).resolve()
    return CellJob(f"{name}/shapes/seed0", str(root / name), cfg.to_dict())


def hand_train(job: CellJob) -> list[str]:
    """`densenet train --out CELL` of the same settings as the cell, typed by hand."""
    return ["train", "--model", "densenet_40_k12", "--depth", "7", "--growth-rate", "4", "--dataset", "folder",
            "--data", job.config["data"], "--epochs", "1", "--milestones", "100", "--batch-size", "8",
            "--val-size", "3", "--no-progress", "--no-tensorboard", "--out", job.run_dir]


def paused(argv: list):
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", PAUSED, json.dumps(argv)], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline().strip()
    if line != "training":
        child.kill()
        raise AssertionError(f"the child did not start training: {line!r} {child.stderr.read()[-2000:]}")
    return child


def stop(child) -> None:
    child.kill()  # kill -9: its lock is left as a crash leaves it
    child.wait()
    child.stdout.close()
    child.stderr.close()


def quick_fit(monkeypatch) -> list:
    """The cell's training without its epochs: the real `fit` (which takes the run's lock) up to its
    request checks, then a summary. Returns the lock's holder as the training saw it."""
    from densenet.train.engine import Trainer

    seen = []

    def fit_on(self, dist, device):
        seen.append(holder(self.cfg.out))
        summary = {"epochs": self.cfg.epochs, "test_top1_error": 50.0}
        (Path(self.cfg.out) / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(Trainer, "_fit_on", fit_on)
    return seen


def test_a_hand_started_train_blocks_the_grids_attempt_at_its_cell(tmp_path, monkeypatch):
    """`densenet train --out CELL` started by hand (another process) holds CELL/densenet.lock: the grid's
    attempt at that cell gives way (busy, naming it; status: running; nothing of the grid's written);
    killed with -9, its lock no longer blocks: the next attempt trains the cell, holding the one lock."""
    job = folder_job(tmp_path, "cell")
    run = Path(job.run_dir)
    child = paused(hand_train(job))
    try:
        r = run_cell(job, "slurm", "8")
        assert r["outcome"] == "busy" and f"in use by process {child.pid}" in r["error"], r
        st = cell_state(run)
        assert st.state == "running" and f"pid {child.pid}" in st.detail
        assert not (run / "error.json").exists() and not (run / "summary.json").exists()
        assert sorted(p.name for p in run.glob("*lock*")) == [LOCK_FILE]  # the one lock file
        assert lock_info(run)["pid"] == child.pid and "key" not in lock_info(run)  # the hand-started run's
    finally:
        stop(child)
    assert holder(run) is None  # a stale lock file blocks nobody
    seen = quick_fit(monkeypatch)
    assert run_cell(job, "slurm", "8")["outcome"] == "done"
    # the training itself held the attempt's lock (taken over, not refused): one holder, the grid's attempt
    assert seen[0]["pid"] == os.getpid() and seen[0]["key"] == job.key and seen[0]["job_id"] == "8"
    assert cell_state(run).state == "done" and lock_info(run)["attempt"] == 2 and holder(run) is None


def test_the_grid_holding_a_cell_blocks_a_hand_started_train_and_resume(tmp_path, capsys):
    """The grid's attempt at a cell (another process, its `fit` training under the attempt's lock):
    `densenet train --out CELL` and `densenet train --resume CELL` started by hand are refused with one
    line naming the attempt; killed with -9, the attempt's lock no longer blocks."""
    from densenet.train.checkpoint import RunDir

    job = folder_job(tmp_path, "cell")
    run = Path(job.run_dir)
    RunDir(run).start_new()  # an earlier attempt was killed before its first checkpoint: this one starts over
    RunDir(run).write_config(job.config)
    child = paused(["cell", {"key": job.key, "run_dir": job.run_dir, "config": job.config}])
    try:
        who = holder(run)
        assert who["pid"] == child.pid and who["key"] == job.key and who["job_id"] == "7" and who["attempt"] == 1
        assert cell_state(run).state == "running"
        capsys.readouterr()
        for argv in (hand_train(job), ["train", "--resume", job.run_dir]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
            assert f"is in use by process {child.pid}" in err and f"grid cell {job.key}, slurm job 7" in err, err
        assert run_cell(job)["outcome"] == "busy"  # nor does a second attempt start
        assert sorted(p.name for p in run.glob("*lock*")) == [LOCK_FILE]
    finally:
        stop(child)
    assert holder(run) is None
    with DirLock(run) as lock:  # what the next `densenet train --resume CELL` takes: it counts on
        assert lock.record["attempt"] == 2


def test_a_failed_cell_says_why_and_pending_cells_say_where(tmp_path):
    job = tiny_job(tmp_path, "bad")
    job = CellJob(job.key, job.run_dir, {**job.config, "dataset": "folder", "data": str(tmp_path / "nowhere")})
    with pytest.raises(Exception):
        run_cell(job)
    st = cell_state(job.run_dir)
    assert st.state == "failed" and "nowhere" in st.detail
    write_launch(job, "slurm", "123_4")  # resubmitted after it failed: pending again
    st = cell_state(job.run_dir)
    assert st.state == "pending" and "slurm job 123_4" in st.detail
    assert cell_state(tmp_path / "never").state == "pending"
    killed = tmp_path / "killed"  # a checkpoint and a finished attempt without a word: killed
    (killed / "last").mkdir(parents=True)
    (killed / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    st = cell_state(killed)
    assert (st.state, st.epoch) == ("failed", 2) and "resume" in st.detail


# --- options -----------------------------------------------------------------------------------------

def test_time_limits_in_slurm_formats():
    assert [timeout_minutes(t) for t in ("90", "2:00:00", "1-12", "1-00:30:00", "0:30:01", 45)] == \
        [90, 120, 2160, 1470, 31, 45]
    for bad in ("", "soon", "0", "1:2:3:4"):
        with pytest.raises(LauncherError, match="time"):
            timeout_minutes(bad)
    with pytest.raises(LauncherError, match="unknown launcher"):
        LaunchOptions(launcher="kubernetes")
    with pytest.raises(LauncherError, match="gpus-per-cell"):
        LaunchOptions(launcher="slurm", gpus_per_cell=-1)


def test_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    """The options a cluster user sets, in the sbatch script submitit writes (a fake srun on PATH:
    submitit only looks for it)."""
    pytest.importorskip("submitit")
    opts = LaunchOptions(launcher="slurm", gpus_per_cell=4, partition="gpu", time="1-00:00:00", account="proj7",
                         qos="high", constraint="a100", mem_gb=64, setup=["module load cuda/12"],
                         slurm_args={"exclude": "node7"}, max_parallel=8)
    fake_srun(tmp_path, monkeypatch)
    text = SlurmLauncher(opts, tmp_path).executor()._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--time=1440", "--account=proj7", "--qos=high", "--constraint=a100",
                 "--gpus-per-node=4", "--cpus-per-task=16", "--mem=64GB", "--exclude=node7", "--ntasks-per-node=1",
                 "--nodes=1", "module load cuda/12"):
        assert line in text, line
    assert opts.procs == 4  # the cell trains under torchrun inside the job, one process per GPU
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LauncherError, match="srun.*--cluster local"):
        SlurmLauncher(opts, tmp_path).executor()


def fake_srun(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir), prepend=os.pathsep)


def test_cells_still_queued_are_not_submitted_again(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import densenet.grid.launchers as launchers

    fake_srun(tmp_path, monkeypatch)
    job = tiny_job(tmp_path, "q")
    write_launch(job, "slurm", "991_3")
    asked = []
    monkeypatch.setattr(launchers, "slurm_job_state", lambda folder, job_id: asked.append(job_id) or "PENDING")
    r = launch([job], LaunchOptions(launcher="slurm"), tmp_path)
    assert r == [{"key": job.key, "outcome": "queued", "job_id": "991_3"}] and asked == ["991_3"]


def test_launcher_options_from_a_file_and_the_command_line(tmp_path):
    from densenet.grid.launchers import options_from_args
    from densenet.cli import build_parser

    f = tmp_path / "cluster.toml"
    f.write_text('launcher = "slurm"\npartition = "gpu"\ntime = "12:00:00"\ngpus_per_cell = 2\n'
                 'setup = ["module load cuda"]\n[slurm_args]\nexclude = "node7"\n')
    args = build_parser().parse_args(["reproduce", "table2", "--out", "x", "--launcher-config", str(f),
                                      "--partition", "long", "--slurm-arg", "mail-type=END"])
    o = options_from_args(args)
    assert (o.launcher, o.partition, o.time, o.gpus_per_cell, o.setup) == ("slurm", "long", "12:00:00", 2,
                                                                            ["module load cuda"])
    assert o.slurm_args == {"exclude": "node7", "mail_type": "END"} and o.procs == 2
    f.write_text('partion = "gpu"\n')
    with pytest.raises(LauncherError, match="unknown setting.*partion"):
        options_from_args(build_parser().parse_args(["reproduce", "table2", "--launcher-config", str(f)]))


def test_reproduce_on_submitit_debug_then_status(tmp_path, monkeypatch, capsys):
    """The CLI path: cells handed to submitit (its in-process debug executor), then `reproduce status`."""
    pytest.importorskip("submitit")
    import densenet.train as train

    calls = []

    def fake_fit(cfg, resume=None):
        calls.append((cfg.model, resume))
        out = Path(cfg.out)
        (out / "metrics.jsonl").write_text(json.dumps({"epoch": cfg.epochs}) + "\n")
        (out / "summary.json").write_text(json.dumps({"val_top1_error": 9.5, "epochs": cfg.epochs}))
        return {}

    monkeypatch.setattr(train, "fit", fake_fit)
    folder = tmp_path / "c10"
    (folder / "train").mkdir(parents=True)
    grid = tmp_path / "grid"
    args = ["reproduce", "table2", "--out", str(grid), "--epochs", "2", "--data", f"cifar10={folder}",
            "--only", "densenet_40_k12/C10+", "--only", "densenet_40_k12/C10", "--launcher", "slurm",
            "--cluster", "debug", "--partition", "ignored-here"]
    assert main(args) == 0
    assert len(calls) == 2 and json.loads((grid / "grid.json").read_text())["grid"] == "table2"
    capsys.readouterr()
    assert main(["reproduce", "status", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "densenet_40_k12/C10+/seed0" in out and "2 done, 0 running, 0 pending, 0 failed of 2 cells" in out
    assert "9.50 val (5.24, +4.26)" in (grid / "results.md").read_text()
    assert main(["reproduce", "status", "table2", "--out", str(grid), "--only", "densenet_40_k12", "--json"]) == 0
    states = json.loads(capsys.readouterr().out)
    assert len(states) == 5 and sum(s["state"] == "done" for s in states) == 2
    assert main(args) == 0 and len(calls) == 2  # done cells are not submitted again
    assert main(["reproduce", "status", str(tmp_path)]) == 2
    assert "grid.json is missing" in capsys.readouterr().err


def test_missing_launcher_package_is_one_line(tmp_path, monkeypatch, capsys):
    # as if ray were not installed (None in sys.modules: `import ray` raises ImportError at once; a hook
    # on builtins.__import__ would fail ray's own `import ray` half way and leave a broken ray behind)
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LauncherError, match=r'pip install "densenet-paper\[cluster\]"'):
        launch([tiny_job(tmp_path, "x")], LaunchOptions(launcher="ray"), tmp_path)


# --- real grids on real schedulers (this machine) -----------------------------------------------------

def checkpointed(job: CellJob, after: int = 0) -> int:
    """Epochs of the cell's last checkpoint, if more than `after` while an attempt runs; else 0."""
    e = checkpoint_epoch(Path(job.run_dir))
    return e if e > after and holder(job.run_dir) else 0


@pytest.mark.slow
def test_submitit_local_grid_with_a_killed_and_a_preempted_cell(tmp_path):
    """submitit's local executor runs each cell as its own process: a cell killed by SIGKILL shows as
    failed and resumes from its checkpoint when the grid is launched again; a cell pre-empted (SIGUSR2,
    submitit's timeout signal) saves at the current step, requeues itself and resumes."""
    pytest.importorskip("submitit")
    quick, long = tiny_job(tmp_path, "quick", 1), tiny_job(tmp_path, "long", 6)
    opts = LaunchOptions(launcher="slurm", cluster="local", gpus_per_cell=0, cpus_per_cell=1)
    launch([quick, long], opts, tmp_path)
    wait_for(lambda: checkpointed(long), 120, "the long cell's first checkpoint")
    os.kill(holder(long.run_dir)["pid"], signal.SIGKILL)
    wait_for(lambda: cell_state(long.run_dir).state == "failed", 30, "the killed cell to show as failed")
    wait_for(lambda: cell_state(quick.run_dir).state == "done", 120, "the quick cell")
    st = cell_state(long.run_dir)
    killed_at = checkpoint_epoch(Path(long.run_dir))
    assert 1 <= killed_at < 6 and "resume it after epoch" in st.detail

    outcomes = {}
    t = threading.Thread(target=lambda: outcomes.update(
        {r["key"]: r for r in launch([quick, long], LaunchOptions(**{**opts.__dict__, "wait": True}), tmp_path)}))
    t.start()
    second = wait_for(lambda: (h := holder(long.run_dir) or {}).get("attempt") == 2 and "resumed_at_epoch" in h and h,
                      120, "the resubmitted attempt")
    assert second["resumed_at_epoch"] == killed_at
    preempted_at = wait_for(lambda: checkpointed(long, killed_at), 120, "an epoch of the resumed attempt")
    os.kill(holder(long.run_dir)["pid"], signal.SIGUSR2)  # what SLURM sends before the time limit
    t.join(240)
    assert not t.is_alive()
    assert outcomes[quick.key]["outcome"] == "skipped" and outcomes[long.key]["outcome"] == "done"
    st = cell_state(long.run_dir)
    assert (st.state, st.epoch, st.attempts) == ("done", 6, 3)
    assert lock_info(long.run_dir)["resumed_at_epoch"] >= preempted_at
    epochs = epochs_logged(long.run_dir)
    assert epochs == [1, 2, 3, 4, 5, 6]  # each epoch once: resumed, never restarted
    log = "".join(p.read_text() for p in (tmp_path / ".submitit").glob("*/*_log.out"))
    assert "SIGTERM: saving a resumable checkpoint" in log and "Requeued job" in log


@pytest.mark.slow
def test_ray_grid_with_a_killed_cell(tmp_path):
    """A local Ray instance (2 CPUs): a cell whose worker is killed is retried by Ray and resumes."""
    ray = pytest.importorskip("ray")
    quick, long = tiny_job(tmp_path, "quick", 1), tiny_job(tmp_path, "long", 4)
    opts = LaunchOptions(launcher="ray", ray_num_cpus=2, cpus_per_cell=1, gpus_per_cell=0, ray_retries=2)
    outcomes = {}
    t = threading.Thread(target=lambda: outcomes.update(
        {r["key"]: r for r in launch([quick, long], opts, tmp_path)}))
    t.start()
    try:
        killed_at = wait_for(lambda: checkpointed(long), 180, "the long cell's first checkpoint")
        os.kill(holder(long.run_dir)["pid"], signal.SIGKILL)
        t.join(300)
    finally:
        if t.is_alive() and ray.is_initialized():
            ray.shutdown()
    assert not t.is_alive()
    assert outcomes[quick.key]["outcome"] == "done" and outcomes[long.key]["outcome"] == "done"
    st = cell_state(long.run_dir)
    assert (st.state, st.epoch, st.attempts) == ("done", 4, 2)
    assert lock_info(long.run_dir)["resumed_at_epoch"] >= killed_at


@pytest.mark.slow
def test_a_multi_process_cell_trains_under_torchrun(tmp_path):
    """--gpus-per-cell N > 1: the job runs `densenet train` under torchrun (here 2 CPU processes, gloo)."""
    job = tiny_job(tmp_path, "ddp", 1)
    r = run_cell(CellJob(job.key, job.run_dir, job.config, procs=2))
    assert r["outcome"] == "done" and r["summary"]["epochs"] == 1
    assert cell_state(job.run_dir).state == "done"
