"""Ctrl-C, remembered for the length of a command.

A Ctrl-C raises KeyboardInterrupt wherever Python happens to be, and some libraries swallow it: torch's C
extension imports numpy on first use and clears any error that import raises, so a Ctrl-C that lands
inside it leaves numpy half-imported and the command fails later with an unrelated error (a RecursionError
in numpy's module __getattr__, seen in `densenet export --format onnx`). What the user did was interrupt
the command, and that is what it should report. `Interrupts` records every SIGINT while it is active, so
the command's top level can say "interrupted" (exit 130) whatever error the interrupt turned into.
"""
from __future__ import annotations

import signal
import threading


class Interrupts:
    """A context in which SIGINT still raises KeyboardInterrupt, and `seen` says whether one arrived.

    Installed only in the main thread and only over Python's own handler (a caller's custom handler is
    left alone); the previous handler is restored on exit, so calling a command in-process leaves the
    process as it was."""

    def __init__(self) -> None:
        self.seen = False
        self._old = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
