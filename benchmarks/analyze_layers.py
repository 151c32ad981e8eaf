#!/usr/bin/env python
"""Cost of the per-layer analysis: ``analyze(run, layers=True)`` against ``layers=False`` on a real
recorded run of ~10 layer groups.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/analyze_layers.py [--steps 10000] [--window 10]

Data: a 5-layer tanh MLP (10 parameter tensors = 10 layer groups, ``groups=None``) trained with
SGD + momentum on random mini-batches, recorded with :class:`phasewatch.Recorder` (K = 32).  Times
are the best of ``--repeat`` runs, with and without the momentum null's finite-dimension band
(groups below d_eff = 1000 coordinates take its Monte Carlo route, ~0.4 ms a window) (the machine may be shared), the run opened eagerly once; also the
time of the rotation column alone on the global band (:func:`~phasewatch.analysis.rotation.window_rotation`)
and of the layers streamed (``chunk_steps``), checked bit-equal to the in-memory tables.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def record(path: Path, steps: int) -> None:
    import torch

    import phasewatch

    torch.manual_seed(0)
    w = (16, 32, 32, 32, 32, 4)
    mods = []
    for a, b in zip(w[:-1], w[1:]):
        mods += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*mods[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, w[0], generator=g), torch.randint(0, w[-1], (1024,), generator=g)
    with phasewatch.Recorder(path, model, opt, k=32, fsync="never") as rec:
        for _ in range(steps):
            idx = torch.randint(0, 1024, (64,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            rec.loss(loss)
            opt.step()


def best(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    import phasewatch
    from phasewatch.analysis.gram import compute_spectra
    from phasewatch.analysis.rotation import window_rotation
    from phasewatch.store import open_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run"
        t = time.perf_counter()
        record(path, a.steps)
        print(f"recorded {a.steps} steps in {time.perf_counter() - t:.1f} s")
        run = open_run(path, lazy=False)
        G = len(run.layer_names)
        dims = [g["dim"] for g in run.meta["model"]["groups"]]
        t0, _ = best(lambda: phasewatch.analyze(run, window=a.window), a.repeat)
        t1, res = best(lambda: phasewatch.analyze(run, window=a.window, layers=True), a.repeat)
        print(f"{G} groups, {a.steps} steps, W={a.window}: analyze {t0:.2f} s; layers=True {t1:.2f} s "
              f"(x{t1 / t0:.1f}; {(t1 - t0) / G:.2f} s per group)")
        n0, _ = best(lambda: phasewatch.analyze(run, window=a.window, null_draws=0), a.repeat)
        n1, _ = best(lambda: phasewatch.analyze(run, window=a.window, layers=True, null_draws=0), a.repeat)
        print(f"without the null's finite-dimension band (null_draws=0): {n0:.2f} s; layers=True {n1:.2f} s "
              f"(x{n1 / n0:.1f}); group dims {[int(d) for d in dims]}")
        band = np.asarray(run.band["band"])
        spec = compute_spectra(band, a.window)
        tr, _ = best(lambda: window_rotation(band, spec.kstar, spec.ends, a.window), a.repeat)
        print(f"rotation column alone (global band): {tr:.2f} s ({1e6 * tr / len(spec.ends):.1f} us a window)")
        ts, st = best(lambda: phasewatch.analyze(path, window=a.window, layers=True, chunk_steps=2048), 1)
        same = all(np.array_equal(res.layers[n][c], st.layers[n][c], equal_nan=True)
                   for n in res.layers for c in res.layers[n])
        print(f"layers streamed (chunk_steps=2048, lazy reader): {ts:.2f} s, bit-equal: {same}")


if __name__ == "__main__":
    main()
