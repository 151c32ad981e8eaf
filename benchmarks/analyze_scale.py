#!/usr/bin/env python
"""Analysis throughput (steps per second) for runs of 10^4 to 10^6 steps, and many runs in parallel.

    .venv/bin/python benchmarks/analyze_scale.py            # 1e4, 1e5, 1e6 steps (~2 min)
    .venv/bin/python benchmarks/analyze_scale.py --quick    # 1e4, 1e5 steps (~20 s)

Data.  Synthetic runs written with the framework-agnostic :class:`phasewatch.store.RunWriter`
(nothing of torch is imported): per step an update u_t in R^64 (two layer groups of 32) made of a
slowly rotating rank-3 signal plus noise, its band b_t[j] = <u_t, u_{t-j}> (K = 16, float64, global
and per layer), and the per-step scalars (loss, lr, gradient and update norms).  Segments rotate
every 250,000 steps, so the largest run is read across 4 segments.

Timed.  ``write``: the RunWriter appends (blocks of 65,536 rows) and close; ``read``:
``open_run`` and loading the band and step tables; ``analyze``: ``phasewatch.analyze(run,
window=8)`` end to end (spectra of every window by batched ``eigvalsh``, k*, gaps, adiabatic
parameter, tail index of the gradient norms ...), reported as steps per second; ``band only``:
:func:`phasewatch.analysis.pipeline.analyze_band` on the in-memory band (the numerical core).
Then ``--parallel`` runs of 10^5 steps are analysed one after another and in a process pool of
``--workers`` processes (one per core by default).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.analysis.pipeline import analyze_band
from phasewatch.store import RunWriter
from phasewatch.store import format as fmt

K, Q, LAYERS = 16, 64, 2


def synthetic_updates(T: int, seed: int = 0) -> np.ndarray:
    """(T, Q) updates: a rank-3 signal whose directions rotate slowly, plus isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(Q, Q)))[0]
    t = np.arange(T)[:, None]
    angle = 2 * np.pi * t / max(T, 1) * 3
    coef = rng.normal(size=(T, 3)) * np.array([4.0, 2.0, 1.0])
    dirs = [np.cos(angle) * basis[:, i] + np.sin(angle) * basis[:, i + 3] for i in range(3)]  # (T, Q) each
    u = sum(coef[:, i: i + 1] * dirs[i] for i in range(3)) + 0.3 * rng.normal(size=(T, Q))
    return u * 1e-3


def band_of(u: np.ndarray) -> np.ndarray:
    """(T, L, K) per-layer band from (T, Q) updates, NaN where t − j < 0."""
    T = len(u)
    layer = np.full((T, LAYERS, K), np.nan)
    cols = np.array_split(np.arange(Q), LAYERS)
    for li, c in enumerate(cols):
        ul = u[:, c]
        for j in range(K):
            layer[j:, li, j] = np.einsum("ij,ij->i", ul[j:], ul[: T - j])
    return layer


def write_run(path: Path, T: int, seed: int = 0) -> dict:
    u = synthetic_updates(T, seed)
    layer = band_of(u)
    band = layer.sum(axis=1)
    steps = np.arange(1, T + 1, dtype="i8")
    loss = 2.0 * np.exp(-steps / (T / 3)) + 0.05 * np.random.default_rng(seed + 1).random(T)
    grad = np.abs(np.random.default_rng(seed + 2).standard_t(3, size=T)) + 0.1
    meta = {"model": {"class": "synthetic", "n_params": Q,
                      "params": [{"name": f"layer{i}", "shape": [Q // LAYERS], "numel": Q // LAYERS,
                                  "dtype": "float64", "group": f"layer{i}", "projected_dim": None} for i in range(LAYERS)],
                      "groups": [{"name": f"layer{i}", "numel": Q // LAYERS, "dim": Q // LAYERS} for i in range(LAYERS)]},
            "optimizer": {"class": "SGD", "hyper": {"lr": 1e-3}, "param_groups": [{"lr": 1e-3}]},
            "recorder": {"k": K, "stride": 1, "mode": "exact", "framework": "synthetic (numpy)"}}
    tables = [fmt.steps_table(LAYERS, 1), fmt.band_table(LAYERS, K), fmt.metrics_table()]
    t0 = time.perf_counter()
    chunk = 65536
    with RunWriter(path, meta, tables, block_rows=chunk, flush_seconds=1e9, rotate_rows=250_000) as w:
        for a in range(0, T, chunk):
            s = slice(a, min(a + chunk, T))
            n = s.stop - s.start
            w.append("band", step=steps[s], lr=np.full(n, 1e-3), band=band[s], layer_band=layer[s])
            lg = np.stack([grad[s] / np.sqrt(2)] * LAYERS, axis=1)
            w.append("steps", step=steps[s], wall_time=np.zeros(n), loss=loss[s], lr=np.full((n, 1), 1e-3),
                     grad_norm=grad[s], layer_grad_norm=lg, update_norm=np.sqrt(band[s, 0]),
                     flags=np.zeros(n, dtype="i4"))
    return {"write": time.perf_counter() - t0, "band": band, "bytes": sum(f.stat().st_size for f in path.glob("*"))}


def analyze_path(path: str) -> int:
    a = phasewatch.analyze(path, window=8)
    return int(a.table["valid"].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1e4 and 1e5 steps only; 4 parallel runs")
    ap.add_argument("--sizes", type=float, nargs="*", default=None)
    ap.add_argument("--parallel", type=int, default=None, help="runs of 1e5 steps analysed in parallel (8)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    sizes = [int(s) for s in (args.sizes or ([1e4, 1e5] if args.quick else [1e4, 1e5, 1e6]))]
    n_par = args.parallel or (4 if args.quick else 8)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"{os.cpu_count()} cpus, load average {load}; K={K}, W=8, {LAYERS} layer groups")
    print(f"\n{'steps':>9} {'segments':>8} {'MiB':>7} {'write s':>8} {'read s':>7} {'analyze s':>9} "
          f"{'steps/s':>10} {'band only s':>11} {'steps/s':>10}")
    with tempfile.TemporaryDirectory(prefix="pw-analyze-") as d:
        tmp = Path(d)
        for T in sizes:
            path = tmp / f"run-{T}"
            w = write_run(path, T)
            t0 = time.perf_counter()
            run = phasewatch.open_run(path)
            bt = run.band
            _ = run.steps
            t_read = time.perf_counter() - t0
            assert len(bt["step"]) == T and np.allclose(bt["band"], w["band"], equal_nan=True)
            t0 = time.perf_counter()
            a = phasewatch.analyze(run, window=8)
            t_an = time.perf_counter() - t0
            assert a.table["valid"].sum() == T - 7
            t0 = time.perf_counter()
            analyze_band(bt["band"], bt["lr"], bt["step"], 8, n_params=Q)
            t_band = time.perf_counter() - t0
            print(f"{T:9d} {len(run.segments):8d} {w['bytes'] / 2**20:7.1f} {w['write']:8.2f} {t_read:7.2f} "
                  f"{t_an:9.2f} {T / t_an:10.3g} {t_band:11.2f} {T / t_band:10.3g}", flush=True)
            del run, bt, a, w

        paths = []
        for i in range(n_par):
            paths.append(str(tmp / f"par-{i}"))
            write_run(Path(paths[-1]), 100_000, seed=10 + i)
        t0 = time.perf_counter()
        for p in paths:
            analyze_path(p)
        t_seq = time.perf_counter() - t0
        # fresh interpreters with one BLAS/OpenMP thread each (forked children would inherit this
        # process's thread pools: oversubscription); their start-up is inside the timing
        os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            list(ex.map(analyze_path, paths))
        t_par = time.perf_counter() - t0
        total = n_par * 100_000
        print(f"\n{n_par} runs of 1e5 steps: one after another {t_seq:.2f} s ({total / t_seq:.3g} steps/s); "
              f"{args.workers} processes {t_par:.2f} s ({total / t_par:.3g} steps/s, {t_seq / t_par:.2f}x)")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
