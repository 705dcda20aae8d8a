"""The run directory's one lock (train/lock.py): its record (the same for `densenet train` and a grid's
attempt), the hand-over by which a launcher's lock becomes the cell's own training's (in this process
and in a child process), and nothing left in a user's directory by a refused run. The two directions
between `densenet train` and a grid's attempt, in real processes, are in test_launchers.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import densenet.train.lock as lock_module
from densenet.cli import main
from densenet.train.lock import HANDOVER_ENV, LOCK_FILE, DirLock, LockedError, holder
from helpers import ENV, cli, copy_run, make_folder, one_line_error

# a child process that takes the lock of argv[1] and says what it holds: lock.py alone (standard library
# only), loaded from its file, so that the child starts in milliseconds
CHILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lock", sys.argv[2])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
try:
    held = lock.DirLock(sys.argv[1]).acquire()
except lock.LockedError as e:
    print(json.dumps({"refused": str(e)}))
else:
    print(json.dumps({"held": held.held, "record": held.record}))
    held.release()
"""


def child_takes(d: Path, env: dict | None = None) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != HANDOVER_ENV}
    out = subprocess.run([sys.executable, "-c", CHILD, str(d), lock_module.__file__], env={**environ, **(env or {})},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def record(d: Path) -> dict:
    return json.loads((d / LOCK_FILE).read_text())


def test_the_record_says_who_holds_it_and_counts_the_attempts(tmp_path):
    d = tmp_path / "run"
    info = {"launcher": "slurm", "job_id": "42", "key": "densenet_40_k12/C10+/seed0"}
    with DirLock(d, info) as first:
        r = record(d)
        assert (r["pid"], r["host"], r["attempt"]) == (os.getpid(), socket.gethostname(), 1)
        assert isinstance(r["started"], float) and r["command"] and {**r, **info} == r and "released" not in r
        assert holder(d) == r == first.record
        with pytest.raises(LockedError, match=r"in use by process \d+ on .* since \d{4}-\d\d-\d\d .*grid cell "
                                              r"densenet_40_k12/C10\+/seed0, slurm job 42"):
            DirLock(d).acquire()
        first.update(resumed_at_epoch=3)
        assert holder(d)["resumed_at_epoch"] == 3
    assert holder(d) is None
    after = record(d)  # kept, marked as let go: `reproduce status` counts the attempts from it
    assert after["released"] >= after["started"] and after["attempt"] == 1 and after["resumed_at_epoch"] == 3
    with DirLock(d) as second:  # the next holder counts on, and writes only itself
        assert second.record["attempt"] == 2 and "key" not in second.record
    assert [p.name for p in d.iterdir()] == [LOCK_FILE]


def test_a_glance_at_a_lock_left_by_a_dead_holder_changes_nothing(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    dead = {"pid": 2 ** 22 + 7, "host": socket.gethostname(), "started": 1.0, "attempt": 4, "key": "c"}
    (d / LOCK_FILE).write_text(json.dumps(dead) + "\n")  # what a kill -9 leaves: a record, no flock
    assert holder(d) is None and record(d) == dead
    with DirLock(d) as lock:
        assert lock.record["attempt"] == 5


def test_a_lock_handed_over_in_this_process(tmp_path):
    """The launcher's lock, handed to the `DirLock` its `fit` takes: taken over (not refused), given back
    on release; anyone else is refused throughout, and nobody takes it over outside the hand-over."""
    d = tmp_path / "cell"
    with DirLock(d, {"key": "cell", "launcher": "local"}) as launcher:
        with pytest.raises(LockedError):
            DirLock(d).acquire()  # not handed over: refused, as a second `densenet train` in this process
        with launcher.hand_over():
            with DirLock(d) as training:
                assert training.held and training.record["key"] == "cell" and holder(d)["key"] == "cell"
                with pytest.raises(LockedError, match=f"process {os.getpid()}.*grid cell cell"):
                    DirLock(d).acquire()  # a second taker while it is taken over
                training.update(resumed_at_epoch=2)  # written through the launcher's lock
            assert launcher.held and not training.held and holder(d)["resumed_at_epoch"] == 2
        with pytest.raises(LockedError):
            DirLock(d).acquire()
    assert holder(d) is None and record(d)["attempt"] == 1  # one attempt, one holder: the launcher's


def test_a_lock_handed_over_to_a_child_process(tmp_path):
    """A child started with the hand-over's environment (torchrun's `densenet train` of a multi-GPU cell)
    takes the lock over while the launcher holds it; a child without it is refused, naming the launcher;
    an old hand-over's environment opens nothing once the launcher has let go."""
    d = tmp_path / "cell"
    with DirLock(d, {"key": "cell", "launcher": "slurm", "job_id": "9"}) as launcher:
        with launcher.hand_over() as env:
            assert set(env) == {HANDOVER_ENV}
            took = child_takes(d, env)
            assert took["held"] and took["record"]["pid"] == os.getpid() and took["record"]["key"] == "cell"
            refused = child_takes(d)["refused"]
            assert f"process {os.getpid()}" in refused and "slurm job 9" in refused
        assert launcher.held and holder(d)["key"] == "cell"  # the child let go: the launcher still holds it
    with DirLock(d):  # another holder now: the old hand-over does not open it
        assert "refused" in child_takes(d, env)
    assert child_takes(d, env)["record"]["attempt"] == 3  # free: taken as usual, counting on
    other = tmp_path / "other"
    with DirLock(other) as lock, lock.hand_over() as other_env:
        assert "refused" in child_takes(other, env)  # the hand-over of one directory opens no other
        assert child_takes(other, other_env)["held"]


def test_a_hand_over_without_flock(tmp_path, monkeypatch):
    """File systems without flock (the lock file's creation is the lock): the same hand-over."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    d = tmp_path / "cell"
    with DirLock(d, {"key": "cell"}) as launcher:
        with launcher.hand_over(), DirLock(d) as training:
            assert training.held
            with pytest.raises(LockedError, match="grid cell cell"):
                DirLock(d).acquire()
        with pytest.raises(LockedError):
            DirLock(d).acquire()
    assert not (d / LOCK_FILE).exists()


def test_a_refused_run_leaves_no_lock_file_in_a_users_directory(tmp_path, capsys):
    """`densenet train --out DIR` refused because DIR holds the user's own files: DIR is as it was."""
    folder = make_folder(tmp_path / "shapes", per_class=4, test_per_class=1, size=8)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"mine": true}')
    (proj / "ckpt").mkdir()
    before = sorted(p.name for p in proj.iterdir())
    code = main(["train", "--dataset", "folder", "--data", str(folder), "--depth", "10", "--growth-rate", "6",
                 "--epochs", "1", "--batch-size", "8", "--val-size", "3", "--no-progress", "--out", str(proj)])
    err = capsys.readouterr().err
    assert code == 2 and "already holds" in err, err
    assert sorted(p.name for p in proj.iterdir()) == before  # no densenet.lock left behind
    with DirLock(tmp_path / "empty"):  # a lock let go where no run began: gone with it, and the folder it made
        pass
    assert not (tmp_path / "empty").exists()
    (tmp_path / "kept").mkdir()
    with DirLock(tmp_path / "kept"):  # a folder that was there stays
        pass
    assert list((tmp_path / "kept").iterdir()) == []


# --- one process per run directory: a second holder, kill -9, a probe, no flock ------------------------


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with DirLock(tmp_path / "run") as first:
        with pytest.raises(LockedError) as e:
            DirLock(tmp_path / "run").acquire()
        assert f"process {os.getpid()} on {socket.gethostname()}" in str(e.value)
        assert holder(tmp_path / "run")["pid"] == os.getpid() and first.held
    assert holder(tmp_path / "run") is None
    with DirLock(tmp_path / "run"):  # released: taken again
        pass


def test_a_lock_left_by_kill_9_does_not_block(tiny, tmp_path):
    """A process holds the run directory; `densenet train --out` there is refused naming its pid; after
    kill -9 of the holder, the stale lock file does not block."""
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom densenet.train.lock import DirLock\n"
                              f"DirLock({str(run)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(300)"],
                             env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        code, err = cli("train", "--dataset", "folder", "--data", tiny["folder"], "--epochs", "1", "--out", run)
        one_line_error(code, err, f"in use by process {child.pid} on {socket.gethostname()}")
        code, err = cli("train", "--resume", copy_run(tiny, tmp_path / "other"))  # the other run is free
        assert code == 0, err
    finally:
        child.kill()
        child.wait()
    assert (run / "densenet.lock").exists() and holder(run) is None
    with DirLock(run):
        pass


def test_a_probe_of_the_lock_does_not_turn_a_run_away(tmp_path, monkeypatch):
    """holder() takes the lock for a moment to see whether anyone holds it: a run starting in that moment
    waits for the probe to end (a launcher asking for a cell's state must not make the cell "busy");
    a lock really held is still refused, after the short grace."""
    import threading
    import time

    import densenet.train.lock as lock

    d = tmp_path / "run"
    d.mkdir()
    probe = DirLock(d).acquire(_probe=True)  # what holder() does, held here for 50 ms
    t = threading.Timer(0.05, probe.release)
    # the grace (0.25 s) widened while the timer must fire within it: on a loaded machine a 50 ms timer
    # can fire late; the wait still ends as soon as the probe is released
    grace = lock.PROBE_GRACE_S
    monkeypatch.setattr(lock, "PROBE_GRACE_S", 30.0)
    t.start()
    try:
        with DirLock(d):
            assert json.loads((d / "densenet.lock").read_text())["pid"] == os.getpid()
    finally:
        t.cancel()
    monkeypatch.setattr(lock, "PROBE_GRACE_S", grace)
    with DirLock(d):
        start = time.monotonic()
        with pytest.raises(LockedError, match=f"process {os.getpid()}"):
            DirLock(d).acquire()
        assert time.monotonic() - start >= lock.PROBE_GRACE_S


def test_without_flock_the_lock_file_itself_locks(tmp_path, monkeypatch):
    """File systems without flock: the lock file's creation is the lock; a dead holder's file on this
    host is taken over, a live holder's is refused."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    d = tmp_path / "run"
    with DirLock(d):
        with pytest.raises(LockedError, match=f"process {os.getpid()}"):
            DirLock(d).acquire()
    assert not (d / "densenet.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (d / "densenet.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with DirLock(d):  # stale: its process is gone
        assert json.loads((d / "densenet.lock").read_text())["pid"] == os.getpid()
    import threading

    import densenet.train.lock as lock

    (d / "densenet.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    t = threading.Timer(0.05, (d / "densenet.lock").unlink)  # holder()'s probe: a live file for a moment
    monkeypatch.setattr(lock, "PROBE_GRACE_S", 30.0)  # a 50 ms timer may fire late on a loaded machine
    t.start()
    with DirLock(d):
        pass
    t.join()
