"""Process pools a command makes and ends itself: a sweep's workers, the band's corner runs.

``process_pool`` forks workers from a single-threaded parent (fast: they start with everything the
parent imported, and need no main guard), else starts them from a fork server (forking a
multi-threaded parent, such as a Jupyter kernel or a Dask client, can deadlock; Python 3.14 made
forkserver the default). ``OwnPool`` kills its workers at once on Ctrl-C or SIGTERM (waiting for
their tasks could take minutes, and a worker left behind would outlive the command); ``owned`` is
the same as a ``with`` block. Workers run ``signals.worker_init``: Ctrl-C is the parent's to handle.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

from .signals import worker_init


#: While a pool is ``owned``, the thread holding the GIL hands it over within this many seconds when another
#: thread asks (Python's switch interval, 5 ms by default). The pool's own threads (its manager, its queue's
#: feeder) carry each task to the workers and each result back, while the main thread computes (the run
#: beside the band's corners): at 5 ms every such hand-off waited up to 5 ms for the GIL, and the corners
#: started 20-40 ms after their workers. A thread that waits (on a pipe, a lock) asks for nothing, so a
#: command whose only busy thread is the main one loses nothing to the shorter interval.
HANDOFF_S = 0.0005


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS says, else the machine's count)."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_pool(workers: int, preload: tuple[str, ...] = ("offloadlab.sim",)) -> ProcessPoolExecutor:
    """A process pool of ``workers`` (see the module docstring); ``preload``: what a fork server imports."""
    import multiprocessing as mp
    import threading

    methods = mp.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"), initializer=worker_init)
    ctx = None
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init)


class OwnPool:
    """A process pool this command creates and ends: shut down when done, its workers killed (SIGKILL) at
    once on Ctrl-C, SIGTERM or an error. Its workers are the child processes started after it was made
    (``multiprocessing.active_children``; Python >= 3.14: ``terminate_workers``)."""

    def __init__(self, workers: int, preload: tuple[str, ...] = ("offloadlab.sim",)):
        import multiprocessing as mp

        self._before = set(mp.active_children())
        self.pool = process_pool(workers, preload)

    def kill(self) -> None:
        """SIGKILL every worker. Not SIGTERM: a worker forked a moment ago still has the parent's SIGTERM
        handler until ``worker_init`` runs, and one that outlived its signal blocked for ever on the task
        queue's lock that a killed sibling held, so ``close`` waited on it for ever (about 1 run in 300
        of a command that failed as its band workers started; tests/test_reliability.py). A worker has
        nothing of its own to clean up either way: its outputs are the parent's staged files."""
        import multiprocessing as mp
        import signal

        stop = getattr(self.pool, "terminate_workers", None)  # Python >= 3.14
        if stop is not None:
            stop(signal.SIGKILL)
            return
        for proc in mp.active_children():
            if proc not in self._before:
                proc.kill()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def owned(workers: int, preload: tuple[str, ...] = ("offloadlab.sim",)) -> Iterator[ProcessPoolExecutor]:
    """``with owned(2) as pool:`` a process pool for the block; an exception (KeyboardInterrupt, SIGTERM's
    ``Terminated``, an error) kills its workers before it propagates: no task is worth waiting for."""
    import sys

    own = OwnPool(workers, preload)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, HANDOFF_S))
    try:
        yield own.pool
    except BaseException:
        own.kill()
        raise
    finally:
        sys.setswitchinterval(switch)
        own.close()


def call(module: str, name: str, *args, **kw):
    """``module.name(*args, **kw)``, the module imported where this runs: submitted to a pool, the worker
    imports it (e.g. matplotlib's plots), not the process that submits the task."""
    import importlib

    return getattr(importlib.import_module(module), name)(*args, **kw)
