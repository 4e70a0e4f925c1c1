"""Ctrl-C and SIGTERM end a command cleanly: one line, exit 130 or 143, no temp files, no orphaned workers.

``handled()`` turns SIGTERM into a ``Terminated`` exception in the main thread (Ctrl-C already raises
KeyboardInterrupt), so ``finally`` blocks and context managers run on the way out: staged outputs are
removed, sweep pools kill their workers. Both derive from BaseException, so the simulator's own
``except Exception`` (a sweep row's error) never swallows them. ``worker_init`` is the initializer of
worker processes: they leave Ctrl-C to the parent (which ends them) and die quietly on SIGTERM.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# Exit statuses of a shell's killed child: 128 + the signal's number.
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread by ``handled``)."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
    raise Terminated()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Inside: SIGTERM raises ``Terminated``. Outside: the previous handler again. A no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def worker_init() -> None:
    """Initializer of worker processes: Ctrl-C (sent to the whole process group) is the parent's to handle;
    SIGTERM (the parent ending them) kills at once, without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
