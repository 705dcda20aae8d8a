"""One process at a time in a directory: a lock file holding who has it.

    with DirLock(run_dir):          # raises LockedError naming the holder if another process has it
        ...                         # train, write metrics, checkpoints

    holder(run_dir)                 # who holds it now: {"pid", "host", "started", "command"} or None

The lock is an advisory `flock` on `DIR/densenet.lock`, taken without waiting. The kernel releases
it when the holder exits in any way, kill -9 included, so a stale lock file left behind never blocks
anyone: the next process locks the same file and writes itself in. Where a file system has no
`flock` (some network mounts), the file's creation is the lock, and a file left by a dead process
on this host (its pid no longer running) is taken over; one left by another host has to be deleted
by hand, which the message says.

The cluster launcher uses the same lock to make sure a grid cell never runs twice at once.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_FILE = "densenet.lock"
PROBE_GRACE_S = 0.25  # how long a busy lock is retried before it counts as held (holder() probes briefly)


class LockedError(RuntimeError):
    """Another process holds the directory; the message names it (pid, host, since when)."""

    def __init__(self, message: str, holder: dict[str, Any] | None):
        super().__init__(message)
        self.holder = holder


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def holder(directory: str | Path) -> dict[str, Any] | None:
    """Who holds the lock of `directory` now, or None where nobody does (no file, or a stale one)."""
    path = Path(directory) / LOCK_FILE
    if not path.exists():
        return None
    try:
        lock = DirLock(directory)
        lock.acquire(_probe=True)
    except LockedError as e:
        return e.holder or {}
    lock.release()
    return None


def _describe(path: Path, who: dict[str, Any] | None) -> str:
    if not who:
        return f"{path.parent} is in use by another process (lock file {path})"
    return (f"{path.parent} is in use by process {who.get('pid')} on {who.get('host')} since "
            f"{who.get('started')} ({who.get('command') or 'densenet'}; lock file {path})")


class DirLock:
    """An exclusive, non-blocking lock on a directory (created if missing); a context manager."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self.path = self.directory / LOCK_FILE
        self._fd: int | None = None
        self._flock = True

    def acquire(self, _probe: bool = False) -> "DirLock":
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        # `holder()` probes by taking the lock for a moment: a busy lock is tried again for up to
        # PROBE_GRACE_S before it counts as held (a run holds it for its whole length)
        deadline = time.monotonic() + (0.0 if _probe else PROBE_GRACE_S)
        for _ in range(10):  # a holder that releases between our open and our flock: try again
            try:  # whether this call made the file decides whether it may remove it (no flock below)
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # removed by its holder meanwhile: try again
                    continue
            try:
                import fcntl

                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                            raise
                        time.sleep(0.01)
            except (ImportError, OSError) as e:
                os.close(fd)
                if isinstance(e, OSError) and e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockedError(_describe(self.path, _read(self.path)) + "; wait for it to finish, or "
                                      "stop it", _read(self.path)) from None
                if created:
                    self.path.unlink(missing_ok=True)
                return self._acquire_by_creation(_probe)  # no flock on this file system
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the file we locked was removed by its last holder: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            if not _probe:
                self._write(fd)
            return self
        raise LockedError(_describe(self.path, _read(self.path)), _read(self.path))

    def _write(self, fd: int) -> None:
        data = (json.dumps(_me()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _acquire_by_creation(self, probe: bool) -> "DirLock":
        self._flock = False
        deadline = time.monotonic() + (0.0 if probe else PROBE_GRACE_S)  # a probe's file lives a moment
        for _ in range(10 + int(PROBE_GRACE_S / 0.01)):
            tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_me()) + "\n")
            try:
                os.link(tmp, self.path)  # atomic, and the lock file never exists without its holder in it
            except FileExistsError:
                who = _read(self.path)
                if who is not None and who.get("host") == socket.gethostname() and not _alive(who.get("pid")):
                    self.path.unlink(missing_ok=True)  # left by a dead process on this host (an unreadable
                    continue                           # one may be a holder mid-write elsewhere: not ours)
                if time.monotonic() < deadline:  # perhaps holder()'s probe: it removes the file at once
                    time.sleep(0.01)
                    continue
                raise LockedError(_describe(self.path, who) + "; wait for it to finish, or stop it (if no "
                                  "such process runs, delete the lock file)", who) from None
            finally:
                tmp.unlink(missing_ok=True)
            if probe:
                self.path.unlink(missing_ok=True)
                return self
            self._fd = os.open(self.path, os.O_RDONLY)
            return self
        raise LockedError(_describe(self.path, _read(self.path)), _read(self.path))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if not self._flock:
            self.path.unlink(missing_ok=True)
        else:  # clear who held it; the empty file stays (removing it would race with the next holder)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
        os.close(fd)  # releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["DirLock", "LOCK_FILE", "LockedError", "holder"]
