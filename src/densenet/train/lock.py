"""One process at a time in a directory: a lock file holding who has it.

    with DirLock(run_dir):          # raises LockedError naming the holder if another process has it
        ...                         # train, write metrics, checkpoints

    holder(run_dir)                 # who holds it now (its record, below), or None

The lock is an advisory `flock` on `DIR/densenet.lock`, taken without waiting. The kernel releases
it when the holder exits in any way, kill -9 included, so a stale lock file left behind never blocks
anyone: the next process locks the same file and writes itself in. Where a file system has no
`flock` (some network mounts), the file's creation is the lock, and a file left by a dead process
on this host (its pid no longer running) is taken over; one left by another host has to be deleted
by hand, which the message says.

It is the only lock of a run directory: `densenet train --out/--resume` takes it, and so does the
grid's launcher for a cell (grid/launchers.py), so a run started by hand and a grid's attempt at the
same directory exclude each other, whichever came first.

The lock file holds one record, the same for every holder (JSON):

    pid, host, command     the holding process
    started                when it took the lock (seconds since the epoch)
    attempt                how many processes have held this directory, this one included
    ...                    what the holder adds: a grid cell's launcher, job_id, key, resumed_at_epoch
    released               when it let go (the record stays after a run, so `reproduce status` can
                           count its attempts); absent while held, or after a kill -9

A lock file this holder created in a directory where it leaves no run behind (no `written.json`: the
run was refused before it claimed the directory, e.g. one holding a user's other files) is removed
when it lets go, so a refused run leaves nothing in a user's directory.

Handing the lock over. A launcher takes the lock of a cell first, decides under it (done? resume?)
and then runs the cell's own training, which takes the same lock again: `with lock.hand_over() as env:`
lets that training hold it. In this process the next `DirLock` of the directory (the one `fit` takes)
takes over the held lock itself, and gives it back when it lets go; a child process started with `env`
in its environment (torchrun's `densenet train`) takes it over as long as the lender still holds it
(the launcher keeps the `flock` for the child's whole life). Anyone else is refused as usual, and so
is a second taker while the lock is taken over.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

LOCK_FILE = "densenet.lock"
HANDOVER_ENV = "DENSENET_LOCK_HANDOVER"  # set by `DirLock.hand_over()` for a child process that takes it over
PROBE_GRACE_S = 0.25  # how long a busy lock is retried before it counts as held (holder() probes briefly)
_RUN_RECORD = "written.json"  # train/checkpoint.py's RECORD_FILE: a run has claimed the directory
_LENT: dict[str, "DirLock"] = {}  # locks this process hands over now (hand_over()), by their file's real path


class LockedError(RuntimeError):
    """Another process holds the directory; the message names it (pid, host, since when)."""

    def __init__(self, message: str, holder: dict[str, Any] | None):
        super().__init__(message)
        self.holder = holder


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(sys.argv)[:500]}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # missing, or not a record (standard library only here:
        return None  # a child process loads this file alone)
    return data if isinstance(data, dict) else None


def _holding(path: Path) -> dict[str, Any] | None:
    """The record of the lock file, if it names a holder (not one that has let go: a new holder
    writes itself in a moment after it takes the lock)."""
    who = _read(path)
    return None if who is None or "released" in who else who


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
    """Who holds the lock of `directory` now (its record), or None where nobody does (no file, or a
    stale one)."""
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


def _when(t: Any) -> str:
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))
    return str(t)


def _describe(path: Path, who: dict[str, Any] | None) -> str:
    if not who:
        return f"{path.parent} is in use by another process (lock file {path})"
    what = who.get("command") or "densenet"
    if who.get("key"):  # a grid's attempt at a cell
        job = f", {who.get('launcher') or ''} job {who['job_id']}".replace(",  ", ", ") if who.get("job_id") else ""
        what = f"grid cell {who['key']}{job}; {what}"
    return (f"{path.parent} is in use by process {who.get('pid')} on {who.get('host')} since "
            f"{_when(who.get('started'))} ({what}; lock file {path})")


def _real(path: Path) -> str:
    return os.path.realpath(path)


class DirLock:
    """An exclusive, non-blocking lock on a directory (created if missing); a context manager.

    `info`: fields added to the holder's record (a grid cell's launcher, job id, key)."""

    def __init__(self, directory: str | Path, info: dict[str, Any] | None = None):
        self.directory = Path(directory).expanduser()
        self.path = self.directory / LOCK_FILE
        self.info = dict(info or {})
        self.record: dict[str, Any] = {}  # what this holder wrote into the lock file
        self._fd: int | None = None
        self._flock = True
        self._probe = False
        self._created = False  # this holder made the lock file
        self._made_dir = False  # and the directory
        self._lender: DirLock | None = None  # taken over from a lock of this process (hand_over())
        self._borrower: DirLock | None = None  # who has taken this one over now
        self._inherited = False  # taken over from the parent process that holds it (hand_over())
        self._pid = os.getpid()

    def acquire(self, _probe: bool = False) -> "DirLock":
        if self.held:
            return self
        self._made_dir = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        if not _probe and self._take_over():
            return self
        self._probe = _probe
        self._pid = os.getpid()
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
                    who = _holding(self.path)
                    raise LockedError(_describe(self.path, who) + "; wait for it to finish, or stop it", who) from None
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
            self._fd, self._created = fd, created
            if not _probe:
                self._write(self._new_record(fd))
            return self
        who = _holding(self.path)
        raise LockedError(_describe(self.path, who), who)

    def _new_record(self, fd: int | None) -> dict[str, Any]:
        """This holder's record: the attempt after the one the file records (read under the lock)."""
        previous: Any = None
        if fd is not None:
            with contextlib.suppress(OSError, ValueError, RecursionError):
                previous = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        attempt = previous.get("attempt", 0) if isinstance(previous, dict) else 0
        attempt = attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0
        return {**self.info, **_me(), "attempt": attempt + 1}

    def _write(self, record: dict[str, Any]) -> None:
        self.record = record
        data = (json.dumps(record) + "\n").encode()
        if self._flock:  # through the locking descriptor only: on NFS, flock is a POSIX lock, which
            os.ftruncate(self._fd, 0)  # closing any other descriptor of the file would drop
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        else:  # the file's existence is the lock: replace it whole, it never disappears
            tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)

    def update(self, **fields: Any) -> None:
        """Add fields to the holder's record while it holds the lock (e.g. the epoch a cell resumed at)."""
        if self._lender is not None:
            return self._lender.update(**fields)
        if self._fd is None or self._probe:
            return  # not held here (or held by the parent process that handed it over: its record)
        self._write({**self.record, **fields})

    def _acquire_by_creation(self, probe: bool) -> "DirLock":
        self._flock = False
        deadline = time.monotonic() + (0.0 if probe else PROBE_GRACE_S)  # a probe's file lives a moment
        for _ in range(10 + int(PROBE_GRACE_S / 0.01)):
            tmp = self.path.with_name(f".{LOCK_FILE}.{os.getpid()}.tmp")
            record = self._new_record(None)
            tmp.write_text(json.dumps(record) + "\n")
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
            self.record, self._created = record, True
            self._fd = os.open(self.path, os.O_RDONLY)
            return self
        who = _read(self.path)
        raise LockedError(_describe(self.path, who), who)

    # --- handing the lock over to the run it was taken for -------------------------------------------

    @contextlib.contextmanager
    def hand_over(self) -> Iterator[dict[str, str]]:
        """For the body, let the next DirLock of this directory take this held lock over: one in this
        process, or one in a child process started with the yielded environment variables (added to
        its environment). The lock stays held by this object throughout, and after the body."""
        if not self.held or self._lender is not None or self._inherited:
            raise RuntimeError(f"{self.path} is not held by this DirLock: nothing to hand over")
        key = _real(self.path)
        _LENT[key] = self
        try:
            yield {HANDOVER_ENV: json.dumps({"lock": key, "pid": self.record.get("pid"),
                                             "started": self.record.get("started")})}
        finally:
            if _LENT.get(key) is self:
                del _LENT[key]

    def _take_over(self) -> bool:
        """Take a lock handed over by this process or by the parent process (hand_over())."""
        key = _real(self.path)
        lender = _LENT.get(key)
        if lender is not None and lender._fd is not None and lender._pid == os.getpid():
            if lender._borrower is not None:
                return False  # taken over already: refused as usual, naming the holder
            lender._borrower, self._lender, self.record = self, lender, lender.record
            return True
        try:
            offer = json.loads(os.environ.get(HANDOVER_ENV) or "null")
        except ValueError:
            return False
        if not isinstance(offer, dict) or offer.get("lock") != key:
            return False
        who = _holding(self.path)  # the lender's record, not released: it holds the lock still
        if who is None or (who.get("pid"), who.get("started")) != (offer.get("pid"), offer.get("started")):
            return False
        if who.get("host") != socket.gethostname() or not _alive(who.get("pid")) or holder(self.directory) is None:
            return False
        self._inherited, self.record = True, who
        return True

    # --- letting go -------------------------------------------------------------------------------------

    def release(self) -> None:
        if self._lender is not None:  # taken over in this process: give it back
            if self._lender._borrower is self:
                self._lender._borrower = None
            self._lender = None
            return
        if self._inherited:  # its parent process holds it, and lets go itself
            self._inherited = False
            return
        if self._fd is None:
            return
        if self._borrower is not None:
            self._borrower._lender = None
            self._borrower = None
        fd, self._fd = self._fd, None
        if not self._flock:
            self.path.unlink(missing_ok=True)
        elif self._probe:  # a glance changes nothing (but a file it made, the holder having removed its own)
            if self._created:
                self.path.unlink(missing_ok=True)
        elif self._created and not self.info and not (self.directory / _RUN_RECORD).exists():
            # made for a run that never claimed the directory (refused, or stopped before it began): leave
            # nothing behind. Unlinked while still locked: a process waiting on the old file sees it gone
            # and locks a new one (acquire's inode check)
            self.path.unlink(missing_ok=True)
            if self._made_dir:  # and the directory it made, if nothing else is in it
                with contextlib.suppress(OSError):
                    self.directory.rmdir()
        else:  # the record stays, marked as let go: the attempts of a directory are counted on
            with contextlib.suppress(OSError):
                data = (json.dumps({**self.record, "released": time.time()}) + "\n").encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
        os.close(fd)  # releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None or self._lender is not None or self._inherited

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["DirLock", "HANDOVER_ENV", "LOCK_FILE", "LockedError", "holder"]
