#!/usr/bin/env python
"""Analysis throughput for runs of 10^4 to 10^6 steps, its peak memory in memory vs streaming, and
many runs analysed in parallel processes.

    .venv/bin/python benchmarks/analyze_scale.py            # 1e4, 1e5, 1e6 steps; 8 runs in parallel
    .venv/bin/python benchmarks/analyze_scale.py --quick    # 1e4, 1e5 steps; 4 runs (~1 min)

Data.  Synthetic runs written with the framework-agnostic :class:`phasewatch.store.RunWriter`
(nothing of torch is imported): per step an update u_t in R^64 (``--layers`` groups) made of a
slowly rotating rank-3 signal plus noise, its band b_t[j] = <u_t, u_{t-j}> (K = 16, float64, global
and per layer), and the per-step scalars.  Segments rotate every 250,000 steps, so the largest run
is read across 4 segments.

1. Throughput (one process, one after another): ``write`` (RunWriter, blocks of 65,536 rows);
   ``eager`` = ``open_run(lazy=False)`` (every column read at open, the per-layer band included)
   plus ``analyze`` with the whole band in memory; ``stream`` = ``open_run(lazy=True)`` plus
   ``analyze(chunk_steps=65536)``; ``band only``: :func:`~phasewatch.analysis.pipeline.analyze_band`
   on an in-memory band (the numerical core).  Each analysis is checked against the in-memory one.
2. Peak memory on the largest run, each mode in a fresh process: peak RSS (``VmHWM``) and the
   peak of numpy/Python allocations (``tracemalloc``), next to the size of the result itself (the
   per-window table, N x (2W + 14) values, which every mode returns whole).  Modes: eager (the
   reader before issue 7), lazy reader with the band read whole (``analyze``'s automatic choice below
   its 1 GiB budget), streaming.
3. ``--parallel`` runs of 10^5 steps: ``analyze_many(workers=1)`` (one after another in this
   process) vs ``analyze_many(workers=--workers)`` (a process pool), with the load average: the
   machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.analysis.pipeline import analyze_band
from phasewatch.store import RunWriter
from phasewatch.store import format as fmt

K, Q, W = 16, 64, 8
CHUNK = 65536


def synthetic_updates(T: int, seed: int = 0) -> np.ndarray:
    """(T, Q) updates: a rank-3 signal whose directions rotate slowly, plus isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(Q, Q)))[0]
    t = np.arange(T)[:, None]
    angle = 2 * np.pi * t / max(T, 1) * 3
    coef = rng.normal(size=(T, 3)) * np.array([4.0, 2.0, 1.0])
    u = 0.3 * rng.normal(size=(T, Q))
    for i in range(3):
        u += coef[:, i: i + 1] * (np.cos(angle) * basis[:, i] + np.sin(angle) * basis[:, i + 3])
    return u * 1e-3


def band_of(u: np.ndarray, layers: int) -> np.ndarray:
    """(T, L, K) per-layer band from (T, Q) updates, NaN where t − j < 0."""
    T = len(u)
    layer = np.full((T, layers, K), np.nan)
    for li, c in enumerate(np.array_split(np.arange(Q), layers)):
        ul = u[:, c]
        for j in range(K):
            layer[j:, li, j] = np.einsum("ij,ij->i", ul[j:], ul[: T - j])
    return layer


def write_run(path: Path, T: int, seed: int = 0, layers: int = 2) -> dict:
    u = synthetic_updates(T, seed)
    layer = band_of(u, layers)
    del u
    band = layer.sum(axis=1)
    steps = np.arange(1, T + 1, dtype="i8")
    loss = 2.0 * np.exp(-steps / (T / 3)) + 0.05 * np.random.default_rng(seed + 1).random(T)
    grad = np.abs(np.random.default_rng(seed + 2).standard_t(3, size=T)) + 0.1
    meta = {"model": {"class": "synthetic", "n_params": Q,
                      "params": [{"name": f"layer{i}", "shape": [Q // layers], "numel": Q // layers,
                                  "dtype": "float64", "group": f"layer{i}", "projected_dim": None}
                                 for i in range(layers)],
                      "groups": [{"name": f"layer{i}", "numel": Q // layers, "dim": Q // layers}
                                 for i in range(layers)]},
            "optimizer": {"class": "SGD", "hyper": {"lr": 1e-3}, "param_groups": [{"lr": 1e-3}]},
            "recorder": {"k": K, "stride": 1, "mode": "exact", "framework": "synthetic (numpy)"}}
    tables = [fmt.steps_table(layers, 1), fmt.band_table(layers, K), fmt.metrics_table()]
    t0 = time.perf_counter()
    with RunWriter(path, meta, tables, block_rows=CHUNK, flush_seconds=1e9, rotate_rows=250_000,
                   fsync="never") as w:
        for a in range(0, T, CHUNK):
            s = slice(a, min(a + CHUNK, T))
            n = s.stop - s.start
            w.append("band", step=steps[s], lr=np.full(n, 1e-3), band=band[s], layer_band=layer[s])
            lg = np.stack([grad[s] / np.sqrt(layers)] * layers, axis=1)
            w.append("steps", step=steps[s], wall_time=np.zeros(n), loss=loss[s], lr=np.full((n, 1), 1e-3),
                     grad_norm=grad[s], layer_grad_norm=lg, update_norm=np.sqrt(band[s, 0]),
                     flags=np.zeros(n, dtype="i4"))
        w.append("metrics", step=steps[::1000], name=np.array([b"test_acc"] * len(steps[::1000])),
                 value=np.minimum(1.0, steps[::1000] / T * 1.5))
    return {"write": time.perf_counter() - t0, "band": band,
            "bytes": sum(f.stat().st_size for f in path.glob("*"))}


def analyze_mode(path, mode: str):
    """The analysis of one mode: eager (reader before issue 7), lazy (band read whole), stream[:chunk]."""
    if mode == "eager":
        return phasewatch.analyze(phasewatch.open_run(path, lazy=False), window=W, memory_budget=None)
    if mode == "lazy":
        return phasewatch.analyze(phasewatch.open_run(path, lazy=True), window=W, memory_budget=None)
    chunk = int(mode.split(":")[1]) if ":" in mode else CHUNK
    return phasewatch.analyze(phasewatch.open_run(path, lazy=True), window=W, chunk_steps=chunk)


def timed_analysis(path, **kw):
    """A worker's task in the parallel benchmark: the analysis, and the CPU seconds it took there."""
    c0 = time.process_time()
    a = phasewatch.analyze(path, **kw)
    return a, time.process_time() - c0


def _rss(field: str) -> float:
    """VmRSS / VmHWM (peak) of this process in MiB.  Not ``ru_maxrss``: on Linux a child started by
    fork + exec inherits its parent's peak there."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**10
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def _child(path: str, mode: str, trace: bool) -> None:
    """Run one mode in this fresh process and print what it cost as JSON."""
    import tracemalloc

    base = _rss("VmRSS")
    if trace:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    a = analyze_mode(path, mode)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    table = sum(v.nbytes for v in a.table.values()) / 2**20
    print(json.dumps({"seconds": dt, "cpu": cpu, "rss_base": base, "rss_peak": _rss("VmHWM"),
                      "traced_peak": peak, "table": table, "valid": int(a.table["valid"].sum())}))


def measure(path: Path, mode: str, trace: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), mode] + (["--trace"] if trace else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def same(a, b) -> bool:
    return all(np.array_equal(a.table[k], b.table[k], equal_nan=True) for k in a.table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1e4 and 1e5 steps only; 4 parallel runs")
    ap.add_argument("--sizes", type=float, nargs="*", default=None)
    ap.add_argument("--layers", type=int, default=2, help="layer groups of the per-layer band (2)")
    ap.add_argument("--parallel", type=int, default=None, help="runs of 1e5 steps analysed in parallel (8)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child, args.trace)
        return
    sizes = [int(s) for s in (args.sizes or ([1e4, 1e5] if args.quick else [1e4, 1e5, 1e6]))]
    n_par = args.parallel or (4 if args.quick else 8)
    print(f"{os.cpu_count()} cpus, load average {load()}; K={K}, W={W}, P={Q} in {args.layers} layer groups, "
          f"streaming chunks of {CHUNK} windows")
    print("seconds: wall (CPU of this process); steps/s from the wall time.  On a shared machine the wall time "
          "is\nup to (load average / cpus) x the CPU time; the CPU time is what the analysis costs.")
    print(f"\n{'steps':>9} {'segs':>4} {'MiB':>5} {'write s':>7} {'eager s':>13} {'steps/s':>8} "
          f"{'stream s':>13} {'steps/s':>8} {'band only s':>13} {'steps/s':>8}")
    with tempfile.TemporaryDirectory(prefix="pw-analyze-") as d:
        tmp = Path(d)
        for T in sizes:
            path = tmp / f"run-{T}"
            w = write_run(path, T, layers=args.layers)
            t0, c0 = time.perf_counter(), time.process_time()
            a = analyze_mode(path, "eager")
            t_eager, c_eager = time.perf_counter() - t0, time.process_time() - c0
            assert a.table["valid"].sum() == T - W + 1
            t0, c0 = time.perf_counter(), time.process_time()
            s = analyze_mode(path, "stream")
            t_stream, c_stream = time.perf_counter() - t0, time.process_time() - c0
            assert same(a, s), "streaming differs from the in-memory analysis"
            del a, s
            t0, c0 = time.perf_counter(), time.process_time()
            analyze_band(w["band"], np.full(T, 1e-3), np.arange(1, T + 1), W, n_params=Q)
            t_band, c_band = time.perf_counter() - t0, time.process_time() - c0
            segs = len(list(path.glob("segment-*.h5")))

            def cell(t, c, T=T):
                return f"{t:6.2f} ({c:5.2f}) {T / t:8.3g}"

            print(f"{T:9d} {segs:4d} {w['bytes'] / 2**20:5.0f} {w['write']:7.2f} {cell(t_eager, c_eager)} "
                  f"{cell(t_stream, c_stream)} {cell(t_band, c_band)}", flush=True)
            del w

        big = tmp / f"run-{sizes[-1]}"
        print(f"\npeak memory analysing the {sizes[-1]:,}-step run ({sum(f.stat().st_size for f in big.glob('*')) / 2**20:.0f} MiB "
              f"on disk), each mode in a fresh process (load average {load()}):")
        print(f"{'mode':<34} {'wall s':>6} {'CPU s':>6} {'RSS before':>10} {'peak RSS':>9} {'traced peak':>11} "
              f"{'result':>7}   MiB")
        names = {"eager": "in memory, eager reader (before)", "lazy": "in memory, lazy reader (default)",
                 "stream": f"streaming, chunk_steps={CHUNK}", "stream:8192": "streaming, chunk_steps=8192"}
        for mode in names:
            m = measure(big, mode, trace=False)
            tr = measure(big, mode, trace=True)
            print(f"{names[mode]:<34} {m['seconds']:6.2f} {m['cpu']:6.2f} {m['rss_base']:10.0f} {m['rss_peak']:9.0f} "
                  f"{tr['traced_peak']:11.0f} {m['table']:7.0f}", flush=True)

        paths = []
        for i in range(n_par):
            paths.append(str(tmp / f"par-{i}"))
            write_run(Path(paths[-1]), 100_000, seed=10 + i, layers=args.layers)
        total = n_par * 100_000
        l0 = load()
        t0, c0 = time.perf_counter(), time.process_time()
        seq = phasewatch.analyze_many(paths, workers=1, window=W)
        t_seq, c_seq = time.perf_counter() - t0, time.process_time() - c0
        l1 = load()
        t0 = time.perf_counter()
        par = phasewatch.analyze_many(paths, workers=args.workers, window=W, _func=timed_analysis)
        t_par = time.perf_counter() - t0
        l2 = load()
        assert all(same(a, b) for a, (b, _) in zip(seq, par))
        c_par = sum(c for _, c in par)
        print(f"\n{n_par} runs of 1e5 steps: one after another {t_seq:.2f} s ({total / t_seq:.3g} steps/s, "
              f"{c_seq:.2f} CPU s); analyze_many(workers={args.workers}) {t_par:.2f} s ({total / t_par:.3g} steps/s, "
              f"{c_par:.2f} CPU s in the workers): {t_seq / t_par:.2f}x; load average {l0} before, {l1} after "
              f"sequential, {l2} after parallel ({os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
