"""`densenet reproduce --launcher slurm` on a real SLURM cluster: one node, this machine, started by
tools/slurm/start-cluster.sh (Debian's slurm-wlm, slurmdbd with MariaDB, munge) before these tests and
stopped after them. Tiny cells of the real grid (DenseNet-40 on 8x8 images, the recipe's 5,000-image
hold-out): a job array with --max-parallel, --time, --setup and --slurm-arg that --wait follows to
results.md; a cell past its time limit that gets SLURM's timeout signal, saves, requeues itself and ends
with the very weights of an uninterrupted run; a cell cancelled with scancel that `reproduce status` shows
as failed and the same command resumes. Where the cluster cannot start (not root, packages missing),
they skip with one line saying why. The job ids sbatch gave and the requeues are printed in the summary
(`python -m pytest -m slurm -rs`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from densenet.grid.launchers import checkpoint_epoch
from densenet.grid.status import cell_state
from densenet.train.lock import LOCK_FILE, holder
from helpers import ENV, ROOT, epochs_logged, make_folder, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SCRIPT = ROOT / "tools" / "slurm" / "start-cluster.sh"
C10 = "densenet_40_k12/C10/seed0"
SLURM = ["--launcher", "slurm", "--gpus-per-cell", "0", "--cpus-per-cell", "1"]


@pytest.fixture(scope="module")
def slurm_env() -> dict:
    """The environment of a process that uses the cluster (SLURM_CONF set); the cluster is started for
    these tests and stopped after them (left running if it was running before, or other pytest-xdist
    workers may still use it)."""
    try:
        r = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"the SLURM test cluster cannot start here: {e}")
    if r.returncode == 3:  # the script's "cannot start here" (not root, packages missing, a daemon down)
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, f"tools/slurm/start-cluster.sh start failed:\n{r.stderr[-3000:]}"
    conf = re.search(r"^SLURM_CONF=(.+)$", r.stdout, re.M).group(1)
    yield {**ENV, "SLURM_CONF": conf}
    if "STARTED=1" in r.stdout and not os.environ.get("PYTEST_XDIST_WORKER"):
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def c10(tmp_path_factory) -> Path:
    """CIFAR-10 in miniature as an image folder: 5,100 training images of 8x8 pixels (the recipe holds
    5,000 out for validation, so a cell trains on 100: two steps an epoch) and 12 test images."""
    return make_folder(tmp_path_factory.mktemp("slurm") / "c10", per_class=1700, test_per_class=4, size=8)


def reproduce(out: Path, data: Path, epochs: int, *options: str, rows=("densenet_40_k12/C10",)) -> list[str]:
    argv = [sys.executable, "-m", "densenet.cli", "reproduce", "table2", "--out", str(out), "--epochs", str(epochs),
            "--data", f"cifar10={data}"]
    for row in rows:
        argv += ["--only", row]
    return argv + list(options)


def run(argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-3000:])
    return r


def submitted(stderr: str) -> dict[str, str]:
    """{cell: job id} from the command's `submitted KEY as job ID` lines (the ids sbatch gave)."""
    return dict(re.findall(r"^submitted (\S+) as job (\S+)$", stderr, re.M))


def sacct(env: dict, job: str) -> list[dict]:
    """The job's records in SLURM's accounting, every attempt of it (-D: a requeue starts another)."""
    fields = ["JobID", "State", "Start", "End", "Comment"]
    r = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job, "-o", ",".join(fields)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [dict(zip(fields, line.split("|"))) for line in r.stdout.splitlines() if line.strip()]


def record(request, text: str) -> None:
    """A line for the summary's SLURM section (tests/conftest.py), and the test's own output (-s)."""
    print(text)
    request.node.user_properties.append(("slurm", text))




def job_logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / ".submitit").glob("*/*_log.out")))


def test_a_grid_is_one_job_array_that_waits_and_writes_results(slurm_env, c10, tmp_path, request):
    """Two cells, one sbatch: a job array run one cell at a time (--max-parallel 1), with the time limit,
    the set-up line and an extra sbatch option asked for; --wait returns when both are done, with
    results.md written."""
    out = tmp_path / "grid"
    r = run(reproduce(out, c10, 1, *SLURM, "--max-parallel", "1", "--time", "10",
                      "--setup", "echo set-up ran on $(hostname)", "--slurm-arg", "comment=densenet-test-grid",
                      "--wait",
                      rows=("densenet_40_k12/C10", "densenet_40_k12/C10+")), slurm_env, 300)
    jobs = submitted(r.stderr)
    array = {j.split("_")[0] for j in jobs.values()}
    assert len(jobs) == 2 and len(array) == 1 and sorted(j.split("_")[1] for j in jobs.values()) == ["0", "1"], jobs
    record(request, f"job array {array.pop()} from sbatch: " + ", ".join(f"{k} as {j}" for k, j in jobs.items()))
    script = "".join(p.read_text() for p in (out / ".submitit").glob("*/*.sh"))
    for line in ("--array=0-1%1", "--time=10", "--comment=densenet-test-grid", "--cpus-per-task=1"):
        assert line in script, line
    done = [sacct(slurm_env, j)[-1] for j in jobs.values()]
    assert [d["State"] for d in done] == ["COMPLETED", "COMPLETED"]
    assert {d["Comment"] for d in done} == {"densenet-test-grid"}
    first, second = sorted(done, key=lambda d: d["Start"])
    assert first["End"] <= second["Start"]  # --max-parallel 1: one cell after the other
    assert job_logs(out).count("set-up ran on ") == 2
    table = (out / "results.md").read_text()
    measured = r"\d+\.\d\d( val)?"  # measured (published, difference), for C10 and C10+
    assert re.search(rf"\| densenet_40_k12 \| {measured} \(7\.00, [+-]\d+\.\d\d\) \| {measured} \(5\.24", table), table
    status = run([sys.executable, "-m", "densenet.cli", "reproduce", "status", str(out)], slurm_env, 60).stdout
    assert "2 done, 0 running, 0 pending, 0 failed of 2 cells" in status


def test_a_cell_past_its_time_limit_is_signalled_requeued_and_resumes_bitwise(slurm_env, c10, tmp_path, request):
    """A cell of ~70 s under a 2-minute limit whose timeout signal comes 60 s before it (SLURM sends it
    30-60 s into the job: its limits are checked every 30 s): SLURM signals it (SIGUSR2), it saves at the
    current step and requeues itself (submitit's `scontrol requeue`), the next attempt resumes, and the
    final weights are bitwise those of the same cell trained here without a break."""
    out, ref = tmp_path / "grid", tmp_path / "uninterrupted"
    reference = subprocess.Popen(reproduce(ref, c10, 24), env=slurm_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        r = run(reproduce(out, c10, 24, *SLURM, "--time", "2", "--slurm-arg", "signal=USR2@60", "--wait"),
                slurm_env, 480)
        ref_out, _ = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.communicate()
    assert reference.returncode == 0, ref_out[-3000:]
    job = submitted(r.stderr)[C10]
    attempts = sacct(slurm_env, job)
    states = [a["State"] for a in attempts]
    record(request, f"job {job} from sbatch, its attempts in sacct -D: " +
           ", ".join(f"{a['State']} {a['Start'][11:]}-{a['End'][11:]}" for a in attempts))
    assert states[-1] == "COMPLETED" and states[:-1] and set(states[:-1]) == {"REQUEUED"}, states
    log = job_logs(out)
    assert "Caught signal SIGUSR2" in log and "SIGTERM: saving a resumable checkpoint" in log, log[-3000:]
    requeued = re.findall(r"Requeued job \S+ \(\d+ remaining timeouts\)", log)
    assert len(requeued) == len(states) - 1, log[-3000:]
    record(request, f"job {job}: " + "; ".join(requeued))
    run_dir = out / C10
    st = cell_state(run_dir)
    assert (st.state, st.epoch, st.attempts) == ("done", 24, len(states))
    assert json.loads((run_dir / LOCK_FILE).read_text())["resumed_at_epoch"] >= 1
    assert epochs_logged(run_dir) == list(range(1, 25))  # each epoch once: resumed, never restarted
    from safetensors.torch import load_file
    import torch

    a, b = load_file(run_dir / "last" / "model.safetensors"), load_file(ref / C10 / "last" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_a_cancelled_cell_shows_as_failed_and_the_same_command_resumes_it(slurm_env, c10, tmp_path, request):
    """scancel of a running cell: `reproduce status` says failed (and where to resume); the same
    command, run again, submits it again and it resumes from its checkpoint."""
    out = tmp_path / "grid"
    argv = reproduce(out, c10, 8, *SLURM, "--time", "10")
    first = submitted(run(argv, slurm_env, 120).stderr)[C10]
    run_dir = out / C10
    wait_for(lambda: checkpoint_epoch(run_dir) >= 1 and holder(run_dir), 120, "the cell's first checkpoint")
    subprocess.run(["scancel", first], env=slurm_env, check=True, timeout=60)
    wait_for(lambda: cell_state(run_dir).state == "failed", 60, "the cancelled cell to show as failed")
    status = run([sys.executable, "-m", "densenet.cli", "reproduce", "status", str(out)], slurm_env, 60).stdout
    assert re.search(r"0 done, 0 running, 0 pending, 1 failed of 1 cell", status), status
    wait_for(lambda: sacct(slurm_env, first)[-1]["State"].startswith("CANCELLED"), 60, "sacct to say CANCELLED",
             every=0.5)
    stopped_at = checkpoint_epoch(run_dir)
    second = submitted(run(argv, slurm_env, 120).stderr)[C10]  # the same command again
    assert second != first
    record(request, f"job {first} from sbatch, cancelled at epoch {stopped_at} (state "
                    f"{sacct(slurm_env, first)[-1]['State']}); the same command again: job {second}")
    wait_for(lambda: cell_state(run_dir).state == "done", 180, "the resubmitted cell to finish")
    info = json.loads((run_dir / LOCK_FILE).read_text())
    assert info["attempt"] == 2 and info["job_id"] == second and info["resumed_at_epoch"] == stopped_at >= 1
    assert epochs_logged(run_dir) == list(range(1, 9))
    wait_for(lambda: sacct(slurm_env, second)[-1]["State"] == "COMPLETED", 60, "sacct to say COMPLETED",
             every=0.5)
