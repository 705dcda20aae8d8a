"""torchrun across nodes: two node processes (`torchrun --nnodes 2 --nproc-per-node 1`, the c10d
rendezvous on localhost, gloo on the CPU) train one run together, to the weights one process reaches with
the same global batch; a node killed mid-run makes the job fail loudly, and the same job started again
with --resume continues from the last checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densenet.grid.launchers import checkpoint_epoch
from densenet.weights import read_state_dict
from helpers import ENV, epochs_logged, make_folder

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(folder: Path, epochs: int) -> list[str]:
    """64 training images in 4 global batches of 16: each node's process takes 8 of each."""
    return ["train", "--model", "densenet_bc_100_k12", "--depth", "10", "--growth-rate", "6", "--dataset", "folder",
            "--data", str(folder), "--epochs", str(epochs), "--batch-size", "16", "--val-size", "8", "--no-progress",
            "--no-tensorboard", "--drop-rate", "0"]


def nodes(argv: list[str], name: str) -> list[subprocess.Popen]:
    """The same job started on two "nodes": two torchrun agents, one process each, meeting at a c10d
    rendezvous on localhost (the first agent hosts its store: is_host)."""
    endpoint = f"localhost:{free_port()}"
    procs = []
    for host in (1, 0):  # said, not guessed: both agents' hostnames match the endpoint's
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", name, "--rdzv-conf",
               f"is_host={host}", "--max-restarts", "0", "-m", "densenet.cli", *argv]
        mark = f"{name}-{os.getpid()}-{host}"  # in the environment of the node's processes: kill_node finds them
        proc = subprocess.Popen(cmd, env={**ENV, "DENSENET_TEST_NODE": mark}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        proc.node_mark = mark
        procs.append(proc)
        time.sleep(0.5)  # the first agent binds the rendezvous store; the second joins it
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Each node's exit status and output; a node still running after `timeout` is killed (whole)."""
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_node(p)
                p.communicate()
    return results


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL to a node's agent and its workers, as a machine lost. The workers are found by the mark in
    their environment (torchrun starts them outside the agent's process group, not always as its children)."""
    mark = f"DENSENET_TEST_NODE={proc.node_mark}".encode()
    pids = {proc.pid}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "environ").read_bytes().split(b"\0"):
                pids.add(int(entry.name))
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def weights(run: Path) -> dict:
    return read_state_dict(run / "last" / "model.safetensors")[0]



def test_two_nodes_train_to_the_weights_of_one_process(tmp_path):
    """Two nodes of one process each, each half of every global batch of 16, against one process that
    splits each batch into the same halves (--accumulate 2: BN sees the same micro-batches)."""
    folder = make_folder(tmp_path / "shapes", per_class=24, test_per_class=6, size=12)
    results = finish(nodes(args(folder, 2) + ["--out", str(tmp_path / "two-nodes")], "agree"))
    for code, out in results:
        assert code == 0, out[-3000:]
    assert sum(out.count("done:") for _, out in results) == 1  # one summary, from rank 0
    one = subprocess.run([sys.executable, "-m", "densenet.cli", *args(folder, 2), "--accumulate", "2",
                          "--out", str(tmp_path / "one")], env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(tmp_path / "two-nodes"), weights(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        if "running_" in k or "num_batches" in k:  # DDP keeps rank 0's statistics of its own halves
            continue
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5, msg=k)


def test_a_killed_node_fails_the_job_loudly_and_a_rerun_resumes(tmp_path):
    folder = make_folder(tmp_path / "shapes", per_class=24, test_per_class=6, size=12)
    run = tmp_path / "run"
    procs = nodes(args(folder, 30) + ["--out", str(run)], "killed")
    try:
        end = time.monotonic() + 240
        while checkpoint_epoch(run) < 2:
            assert time.monotonic() < end and all(p.poll() is None for p in procs), "no checkpoint in time"
            time.sleep(0.05)
        kill_node(procs[1])  # the second node, agent and worker
    finally:
        (code, out), _ = finish(procs, 120)
    assert code != 0, out[-3000:]  # the surviving node's job fails, and says so
    # the worker's gloo collective loses its peer; torchrun's agent names the failed worker
    assert "ChildFailedError" in out and "densenet.cli FAILED" in out, out[-3000:]
    assert re.search(r"Connection (reset|closed) by peer", out), out[-3000:]
    assert "another process of this distributed job" in out and "internal error" not in out, out[-3000:]
    assert not (run / "summary.json").exists()
    stopped_at = checkpoint_epoch(run)
    assert 2 <= stopped_at < 30
    print(f"node killed after epoch {stopped_at}; the surviving node exited with status {code}:\n"
          + "\n".join(out.strip().splitlines()[-12:]))
    results = finish(nodes(["train", "--resume", str(run)], "resumed"))
    for c, o in results:
        assert c == 0, o[-3000:]
    first = [int(m) for _, o in results for m in re.findall(r"^epoch (\d+)/30 ", o, re.M)][:1]
    assert first == [stopped_at + 1], results[0][1][-2000:]  # the rerun starts after the last checkpoint
    assert epochs_logged(run) == list(range(1, 31))  # each epoch once: resumed, not restarted
    assert json.loads((run / "summary.json").read_text())["epochs"] == 30
