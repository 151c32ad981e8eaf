"""Analyse many runs at once, in parallel processes: :func:`analyze_many`.

    results = phasewatch.analyze_many(["runs/a", "runs/b", "runs/c"], workers=2, window=10)
    for r in results:
        print(r.summary() if r else f"failed: {r}")

Each run is analysed by :func:`phasewatch.analyze` in a pool of ``workers`` processes, forked
from a ``forkserver`` that has imported the analyzer once (``spawn`` where there is no
forkserver); neither inherits this process' threads or open files, so it is safe when torch or
other threaded libraries are loaded.  Workers get one BLAS/OpenMP thread each unless the
environment says otherwise.  The results come back in the order of the input; a run
that cannot be analysed gives an :class:`AnalysisFailure` (its one-line error) in its place
instead of stopping the batch, also when it kills its worker process.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from ..errors import PhasewatchError

__all__ = ["AnalysisFailure", "analyze_many", "raise_failures"]

# threads per worker for BLAS/OpenMP, unless the environment sets them: N workers on N cores
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class AnalysisFailure:
    """A run that could not be analysed: ``run`` (as given), ``error`` (one line naming the run,
    the problem and the fix) and ``kind`` (the exception's class name).  False in a boolean
    context, so ``[r for r in results if r]`` keeps the analyses."""

    run: str
    error: str
    kind: str

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.error


def _one_line(run: str, e: BaseException) -> str:
    first = (str(e).splitlines() or [""])[0].strip()
    if isinstance(e, PhasewatchError):
        return first if run in first else f"{run}: {first}"
    return f"{run}: {type(e).__name__}: {first or 'no message'}"


def _analyze_one(run: Any, kw: dict, func=None) -> Any:
    """The task of one worker: the analysis of ``run``, or its failure (never raises)."""
    name = str(getattr(run, "path", run))
    try:
        if func is None:
            from ..analysis.pipeline import analyze

            func = analyze
        return func(run, **kw)
    except Exception as e:  # noqa: BLE001 - any failure of one run is reported in its place
        return AnalysisFailure(name, _one_line(name, e), type(e).__name__)


def analyze_many(
    runs: Sequence[Any],
    workers: int | None = None,
    *,
    _func=None,
    **kw: Any,
) -> list[Any]:
    """Analyse every run of ``runs`` (paths of run directories or packed files) with
    :func:`phasewatch.analyze` ``(run, **kw)``; return the analyses in input order, an
    :class:`AnalysisFailure` in place of each run that failed.

    workers: processes; ``None`` or 0: one per CPU (at most one per run); 1: one after another in
        this process (no pool).  Workers come from a ``forkserver`` (``spawn`` where there is
        none) and get one BLAS/OpenMP thread each (``OMP_NUM_THREADS`` etc.) unless those
        variables are set when the first pool starts.
    A worker that dies (a crash inside a C library) fails only the run it was analysing: the runs
    still pending are analysed again in a fresh pool, and a run that kills a worker on its own is
    reported as an :class:`AnalysisFailure`.
    """
    runs = list(runs)
    if workers is not None and (isinstance(workers, bool) or int(workers) < 0):
        raise PhasewatchError(f"workers={workers!r}: use a number of processes >= 1 (0 or None: one per CPU)")
    n = int(workers or 0) or (os.cpu_count() or 1)
    n = max(1, min(n, len(runs)))
    if n == 1 or len(runs) <= 1:
        return [_analyze_one(r, kw, _func) for r in runs]
    results: list[Any] = [None] * len(runs)
    pending = list(range(len(runs)))
    isolate = False  # after a worker died: one run per pool, to find the run that kills it
    while pending:
        batch = pending[:1] if isolate else pending
        done = _run_pool(runs, batch, 1 if isolate else n, kw, _func, results)
        if isolate and not done:
            i = batch[0]
            name = str(getattr(runs[i], "path", runs[i]))
            results[i] = AnalysisFailure(name, f"{name}: the worker process analysing it died (a crash in a "
                                               "C library, or out of memory); analyse it alone to see why",
                                         "BrokenProcessPool")
            done = [i]
        if len(done) < len(batch):
            isolate = True
        pending = [i for i in pending if i not in set(done)]
    return results


def _context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # the server imports the analyzer once; every worker is a cheap fork of it
        ctx.set_forkserver_preload(["phasewatch.analysis.pipeline"])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_pool(runs: list, batch: list[int], n: int, kw: dict, func, results: list) -> list[int]:
    """Analyse ``batch`` in a pool of ``n`` processes; the indices that completed."""
    ctx = _context()
    saved = {v: os.environ.get(v) for v in _THREAD_VARS}
    done: list[int] = []
    try:
        for v in _THREAD_VARS:  # inherited by the workers spawned below; this process is unaffected
            os.environ.setdefault(v, "1")
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as ex:
            futures = {i: ex.submit(_analyze_one, runs[i], kw, func) for i in batch}
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old
            for i, fut in futures.items():
                try:
                    results[i] = fut.result()
                    done.append(i)
                except BrokenProcessPool:
                    continue
    except BrokenProcessPool:
        pass
    finally:
        for v, old in saved.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old
    return done


def raise_failures(results: Sequence[Any], total: int | None = None) -> None:
    """Raise one :class:`PhasewatchError` naming every failure in ``results`` (none: nothing)."""
    bad = [r for r in results if isinstance(r, AnalysisFailure)]
    if not bad:
        return
    total = len(results) if total is None else total
    more = f"; and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise PhasewatchError(f"{len(bad)} of {total} runs could not be analysed: {bad[0].error}{more}")
