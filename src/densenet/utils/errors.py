"""How an error reads at the top of a command: one line that names its cause, and an exit status.

    report(command, e)      -> ("densenet eval: error: ...", 2): the line and the exit status
    one_line_warnings(p)    warnings shown as one line each on stderr ("P: warning: ..."), while in it
    one_line(e)             an exception's message on one line (a loading worker's: its own last line)
    printable(text)         `text` with control characters shown escaped, never sent to the terminal

Exit status 2: a mistake in the input (UsageError, ValueError, OSError, a locked run directory), a
resource (out of memory) or a distributed job's lost process (a node gone: resume on every node); 1: anything else, an internal error (the line asks for a report); 130: an
error after a Ctrl-C that a library swallowed ("interrupted (then X)"). Imports nothing heavy:
`densenet --help` reaches it without torch (a locked run directory's LockedError is imported from
train/lock.py when an error is reported, the one import from above this module's layer).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line; an error re-raised from a data-loading worker (its message
    holds the worker's traceback) by its last line, the error itself."""
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in text:
        last = lines[-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() \
            else last
    return printable(" ".join(text.split())[:2000])


def printable(text: str) -> str:
    """`text` with control characters (a newline or terminal escape in a file name, say) shown escaped,
    never sent to the terminal."""
    return text if text.isprintable() else \
        "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are a mistake in the input, not in the program (exit status 2)."""
    from ..train.lock import LockedError

    return (UsageError, ValueError, OSError, LockedError)


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` says the host or the accelerator ran out of memory."""
    if isinstance(e, MemoryError):
        return True
    name = type(e).__name__
    return name == "OutOfMemoryError" or isinstance(e, RuntimeError) and (
        "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower())


def peer_lost(e: BaseException) -> bool:
    """Whether `e` says another process of a distributed job went away (a node lost, a worker killed):
    torch.distributed's own errors, or a collective's connection closed or reset under it."""
    if type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted"))


def report(command: str, e: BaseException, interrupted: bool = False) -> tuple[str, int]:
    """The line that reports an error that reached the top of `densenet COMMAND`, and the exit status.
    `interrupted`: a Ctrl-C or SIGTERM came first (a library swallowed it and failed later because of it)."""
    if interrupted:
        return f"densenet: interrupted (then {type(e).__name__})", 130
    if out_of_memory(e):
        return (f"densenet {command}: error: out of memory ({one_line(e)[:300]}); use a smaller "
                f"--batch-size or a smaller model", 2)
    if isinstance(e, user_errors()):
        return f"densenet {command}: error: {one_line(e)}", 2
    if peer_lost(e):
        return (f"densenet {command}: error: another process of this distributed job stopped or lost its "
                f"connection ({one_line(e)[:300]}); the job cannot go on: start it again on every node with "
                f"--resume RUN_DIR (it goes on from the last checkpoint)", 2)
    return (f"densenet {command}: error: internal error ({type(e).__name__}: {one_line(e)[:500]}); "
            f"run again with --debug for the traceback, and please report it", 1)


@contextlib.contextmanager
def one_line_warnings(prefix: str) -> Iterator[None]:
    """Within it, each warning is one line on stderr, "PREFIX: warning: MESSAGE"; the previous way of
    showing warnings is restored on the way out."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
