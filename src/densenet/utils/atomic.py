"""Atomic file writes: a reader sees the old file or the complete new one, never a torn write."""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it: set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_destination(path: str | Path, what: str = "the output") -> None:
    """Raise ValueError if `path` exists and is not a regular file (after links): writing a file
    "over" a directory, a FIFO, a device such as /dev/null or a socket would replace that node, as
    root too, so nothing is written there. A path that does not exist, or a regular file, passes."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing (the usual case), or unreadable: the write itself reports what is wrong
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise ValueError(f"{what} {path} exists and is {kind}, not a regular file: nothing was written; "
                         f"give the path of a file to create or replace")


@contextlib.contextmanager
def atomic_write(path: str | Path, what: str = "the output") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    If the body raises (or the process dies), `path` is untouched and the temporary file is removed
    (or, after a kill -9, left behind under a name no reader looks for). A destination that exists and
    is not a regular file is refused before anything is written (`check_destination`).
    """
    check_destination(path, what)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            # mkstemp (and some writers, e.g. safetensors) make the file 0600; a new file from open()
            # is 0666 less the umask, readable by a model server running as another user: as open()
            with contextlib.suppress(AttributeError, OSError):  # no fchmod (Windows), or no modes
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, what: str = "the output") -> None:
    with atomic_write(path, what) as tmp:
        tmp.write_text(text)
