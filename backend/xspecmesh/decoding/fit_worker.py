"""Fit to Source beside a batch: one worker process that runs `fit.fit_result` while the batch decodes on.

A fit costs ~0.2 s of NumPy/SciPy that holds the GIL for much of it, so in a thread it would still stall every other
object of the batch; a process runs it on another core. The worker is spawned (it imports this module and the fit,
not torch), started at the first fit and kept for the process's life. It holds none of its parent's output (a pipe
that a caller may be reading to its end) and leaves when its parent is gone, also a parent killed before it could
shut the pool down. Where the pool cannot take a fit or its worker died, the fit runs in the caller's process.
As with any spawned process, a script that batches with the fit must guard its entry point (`if __name__ ==
"__main__":`), since the worker imports the script's main module; `python -m xspecmesh ...` needs nothing.
"""
from __future__ import annotations

import atexit
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

_POOL = None


def fit_here(triangles, points, stats: dict) -> tuple:
    """`fit.fit_result` in this process (imported on first use: scipy's sparse solvers load only for a fit)."""
    from xspecmesh.geometry.fit import fit_result

    return fit_result(triangles, points, stats)


def _worker_start(parent: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


@dataclass(eq=False)
class Fit:
    """A fit started beside the batch: the worker's future (None where the pool refused it) and what it fits, so that
    the caller can fit it itself."""

    job: Future | None
    triangles: object
    points: object
    stats: dict

    def done(self) -> bool:
        return self.job is None or self.job.done()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()


def start(triangles, points, stats: dict) -> Fit:
    """`fit.fit_result(triangles, points, stats)` started in the worker."""
    global _POOL
    try:
        if _POOL is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _POOL = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_start, initargs=(os.getpid(),))
            atexit.register(_POOL.shutdown, cancel_futures=True)  # not at teardown, when its modules are gone
        job = _POOL.submit(fit_here, triangles, points, stats)
    except Exception:  # a broken pool refuses work: `result` fits here instead
        _POOL, job = None, None
    return Fit(job, triangles, points, stats)


def result(fit: Fit, idle: bool = False) -> tuple:
    """The (fitted, fit stats) of a fit from `start`, computed here if the worker could not (the pool is remade), or,
    when the caller is `idle` (nothing left to decode), if the worker has not started it yet: then both cores fit."""
    global _POOL
    if fit.job is None or (idle and fit.job.cancel()):
        return fit_here(fit.triangles, fit.points, fit.stats)
    try:
        return fit.job.result()
    except Exception:  # the worker was killed or ran out of memory
        _POOL = None
        return fit_here(fit.triangles, fit.points, fit.stats)
