#!/usr/bin/env python
"""Speed of the per-window Hill estimates that go through the one Hill kernel (``tails.hill_top``).

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hill_kernel.py

Times (best of 3) ``rolling_hill`` and ``gradcov.levy_rolling`` on 10^6 gradient norms (window
100, k = 10), ``tails.hill`` on 10^6 values and ``gradcov.coordinate_tails`` on 64 x 1000 noise
coordinates with 200 row-bootstrap resamples.  Run it on two checkouts (``PYTHONPATH=<tree>/src``)
to compare commits.
"""

from __future__ import annotations

import time

import numpy as np

from phasewatch.analysis import gradcov, tails


def best(f, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_t(3, 1_000_000)) + 0.1
    X = rng.standard_t(3, (64, 1000))
    rows = [
        ("rolling_hill, 10^6 steps, window 100", lambda: tails.rolling_hill(x, window=100, fraction=0.1)),
        ("levy_rolling, 10^6 steps, window 100", lambda: gradcov.levy_rolling(x)),
        ("hill, 10^6 values, 10% fraction", lambda: tails.hill(x)),
        ("coordinate_tails, 64 x 1000, 200 resamples", lambda: gradcov.coordinate_tails(X, n_boot=200, seed=0)),
    ]
    for name, f in rows:
        print(f"{name:48s} {best(f):7.3f} s")


if __name__ == "__main__":
    main()
