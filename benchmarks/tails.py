#!/usr/bin/env python
"""Heavy-tail estimators: speed, agreement with ``powerlaw``, and an accuracy table.

    .venv/bin/python benchmarks/tails.py              # speed + powerlaw comparison (about 1 min)
    .venv/bin/python benchmarks/tails.py --accuracy   # also the bias/spread table (a few min)
    .venv/bin/python benchmarks/tails.py --quick      # smaller n for powerlaw, fewer repeats

Speed
  ``phasewatch.analysis.tails.hill`` with every rule for k, ``stable_index`` and ``mcculloch``
  on n = 10^5 and 10^6 samples (median wall time over repeats, data generated beforehand).
  The target is Hill with KS selection on 10^6 samples well under one second.

powerlaw comparison
  ``powerlaw.Fit`` (Alstott, Bullmore & Plenz 2014; the reference implementation of Clauset,
  Shalizi & Newman 2009 for continuous data) scans every candidate x_min with an O(n) fit and
  KS test each, O(n^2) overall, so it is run at modest n; ``hill(rule="ks")`` is run on the
  same data with ``ks_max_fraction=1.0`` (the same scan range as powerlaw) and with the
  default 0.5. powerlaw 2.x bounds the density exponent to [0, 3] by default (tail index
  <= 2) and skips x_min candidates whose fit falls outside, so it is run both with its
  defaults and unbounded (``parameter_ranges={"alpha": [1, None]}``); speed ratios and
  "hill at powerlaw x_min" refer to the unbounded run. Reported: wall time and speed ratio at equal n, alpha (powerlaw's density
  exponent minus 1, i.e. the tail index), x_min, tail size and KS distance. powerlaw is not
  a phasewatch dependency (``pip install powerlaw``); without it this part is skipped.

  Conventions differ slightly: powerlaw counts x_min itself in the tail (alpha - 1 =
  n_tail / sum ln(x_i / x_min) over x_i >= x_min) and in its KS statistic; Hill uses the k
  values strictly above the threshold |x|_(k+1). At the same x_min the two alphas differ by
  a factor (k+1)/k.

Accuracy (--accuracy)
  Bias and spread (standard deviation) over repeated draws of each estimator and rule on
  data with a known index: exact Pareto (alpha 1.5, 3), symmetric alpha-stable
  (scipy.stats.levy_stable, alpha 1.2, 1.5, 1.8), Student-t (nu 3, tail index 3), Gaussian
  (tail index infinite; stable index 2). Also the coverage of Hill's exact chi^2 interval
  (nominal 0.95) and the share of runs flagged "alpha > 2".
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import levy_stable

from phasewatch.analysis.tails import FLAG_NO_HEAVY_TAIL, hill, mcculloch, stable_index


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls, and the last result."""
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def draw(dist: str, n: int, rng: np.random.Generator) -> np.ndarray:
    kind, _, par = dist.partition(":")
    if kind == "pareto":
        return rng.pareto(float(par), n) + 1.0
    if kind == "stable":
        return levy_stable.rvs(float(par), 0.0, size=n, random_state=rng)
    if kind == "t":
        return rng.standard_t(float(par), n)
    if kind == "gauss":
        return rng.standard_normal(n)
    raise ValueError(dist)


# --------------------------------------------------------------------------- #
def speed(repeats: int) -> None:
    print(f"== speed (median of {repeats} runs, data generated beforehand) ==")
    print(f"{'estimator':34s} {'n':>9s} {'seconds':>9s} {'alpha':>8s} {'k':>8s}")
    rng = np.random.default_rng(0)
    for n in (10**5, 10**6):
        x = draw("pareto:1.5", n, rng)
        s = draw("stable:1.5", n, rng)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("hill rule=ks (Pareto 1.5)", lambda x=x: hill(x, rule="ks")),
            ("hill rule=fraction (Pareto 1.5)", lambda x=x: hill(x, rule="fraction")),
            ("hill rule=sqrt (Pareto 1.5)", lambda x=x: hill(x, rule="sqrt")),
            ("hill rule=double_bootstrap (P 1.5)", lambda x=x: hill(x, rule="double_bootstrap", seed=1)),
            ("hill rule=ks (stable 1.5)", lambda s=s: hill(s, rule="ks")),
            ("stable_index (stable 1.5)", lambda s=s: stable_index(s, seed=1)),
            ("mcculloch (stable 1.5)", lambda s=s: mcculloch(s)),
        ]
        for name, fn in cases:
            dt, r = timed(fn, repeats)
            a = getattr(r, "estimate", getattr(r, "alpha", float("nan")))
            k = getattr(r, "k", "")
            print(f"{name:34s} {n:9d} {dt:9.3f} {a:8.3f} {k!s:>8s}")
    print()


# --------------------------------------------------------------------------- #
def powerlaw_comparison(sizes: tuple[int, ...]) -> None:
    print("== powerlaw comparison (continuous power law, x_min by KS minimisation) ==")
    try:
        import powerlaw  # noqa: F401
    except ImportError:
        print("powerlaw is not installed: comparison skipped (pip install powerlaw to run it)")
        print()
        return
    import powerlaw

    print(f"powerlaw {getattr(powerlaw, '__version__', '?')}")
    hdr = (
        f"{'data':12s} {'n':>6s} {'method':22s} {'seconds':>8s} {'alpha':>7s} {'x_min':>9s} "
        f"{'n_tail':>7s} {'KS D':>8s} {'speedup':>8s}"
    )
    print(hdr)
    for dist, label in (("pareto:1.5", "Pareto 1.5"), ("t:3", "|t_3|")):
        for n in sizes:
            x = np.abs(draw(dist, n, np.random.default_rng(n + 7)))
            # powerlaw 2.x restricts the density exponent to [0, 3] (tail index <= 2) by
            # default and discards x_min candidates outside; also run it unrestricted.
            pl_runs = []
            for pname, kwargs in (
                ("powerlaw.Fit default", {}),
                ("powerlaw.Fit unbounded", {"parameter_ranges": {"alpha": [1.0, None]}}),
            ):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fit = powerlaw.Fit(x, discrete=False, verbose=False, **kwargs)
                    pl_alpha, pl_xmin, pl_d = float(fit.alpha) - 1.0, float(fit.xmin), float(fit.power_law.D)
                t_pl = time.perf_counter() - t0
                pl_runs.append((t_pl, pl_xmin))
                pl_tail = int(np.count_nonzero(x >= pl_xmin))
                print(
                    f"{label:12s} {n:6d} {pname:22s} {t_pl:8.3f} {pl_alpha:7.3f} {pl_xmin:9.4g} "
                    f"{pl_tail:7d} {pl_d:8.4f} {'':>8s}"
                )
            t_pl, pl_xmin = pl_runs[-1]
            for frac in (1.0, 0.5):
                t_h, r = timed(lambda frac=frac, x=x: hill(x, rule="ks", ks_max_fraction=frac), 5)
                name = f"hill ks, k<={frac:g}n"
                print(
                    f"{'':12s} {n:6d} {name:22s} {t_h:8.4f} {r.estimate:7.3f} {r.threshold:9.4g} "
                    f"{r.k:7d} {r.ks_distance:8.4f} {t_pl / t_h:7.0f}x"
                )
            # our estimator at powerlaw's x_min, to separate selection from fitting
            k_at = int(np.count_nonzero(x > pl_xmin))
            if 2 <= k_at < x.size:
                r = hill(x, k=k_at)
                print(
                    f"{'':12s} {n:6d} {'hill at powerlaw x_min':22s} {'':>8s} {r.estimate:7.3f} "
                    f"{r.threshold:9.4g} {r.k:7d} {r.ks_distance:8.4f}"
                )
    print()


# --------------------------------------------------------------------------- #
TRUTH = {
    "pareto:1.5": 1.5,
    "pareto:3": 3.0,
    "stable:1.2": 1.2,
    "stable:1.5": 1.5,
    "stable:1.8": 1.8,
    "t:3": 3.0,
    "gauss": float("inf"),
}


def accuracy(reps: dict[int, int]) -> None:
    print("== accuracy: bias = mean - truth, sd over repeated draws ==")
    print("   (Gaussian: truth = inf for Hill (the mean is shown), 2 for stable_index/mcculloch;")
    print("    Student-t: truth = 3 for Hill, 2 for stable_index/mcculloch (finite variance).)")
    hdr = (
        f"{'distribution':12s} {'n':>7s} {'R':>3s} {'estimator':22s} {'mean':>7s} {'bias':>7s} "
        f"{'sd':>6s} {'mean k':>8s} {'cover':>6s} {'>2 flag':>7s}"
    )
    print(hdr)
    for dist, truth in TRUTH.items():
        for n, R in reps.items():
            rows: dict[str, list[tuple[float, float, float, float]]] = {}
            for rep in range(R):
                x = draw(dist, n, np.random.default_rng(1000 * rep + n % 997))
                for rule in ("fraction", "sqrt", "double_bootstrap", "ks"):
                    r = hill(x, rule=rule, seed=rep)
                    cov = float(r.ci[0] <= truth <= r.ci[1])
                    rows.setdefault(f"hill {rule}", []).append(
                        (r.estimate, r.k, cov, float(FLAG_NO_HEAVY_TAIL in r.flags))
                    )
                if not dist.startswith("pareto"):
                    si = stable_index(x, seed=rep)
                    rows.setdefault("stable_index", []).append(
                        (si.estimate, si.m, float(si.ci[0] <= min(truth, 2.0) <= si.ci[1]), 0.0)
                    )
                    mc = mcculloch(x)
                    rows.setdefault("mcculloch", []).append((mc.alpha, float("nan"), float("nan"), 0.0))
            for name, vals in rows.items():
                arr = np.array(vals)
                tr = truth if name.startswith("hill") else min(truth, 2.0)
                mean = float(arr[:, 0].mean())
                bias = mean - tr if np.isfinite(tr) else float("nan")
                sd = float(arr[:, 0].std(ddof=1))
                kk = float(np.nanmean(arr[:, 1])) if np.isfinite(arr[:, 1]).any() else float("nan")
                cov = float(np.nanmean(arr[:, 2])) if np.isfinite(arr[:, 2]).any() else float("nan")
                flag = float(arr[:, 3].mean()) if name.startswith("hill") else float("nan")
                print(
                    f"{dist:12s} {n:7d} {R:3d} {name:22s} {mean:7.3f} {bias:7.3f} {sd:6.3f} "
                    f"{kk:8.0f} {cov:6.2f} {flag:7.2f}"
                )
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--accuracy", action="store_true", help="also print the bias/spread table")
    ap.add_argument("--quick", action="store_true", help="smaller powerlaw runs and fewer repeats")
    args = ap.parse_args()
    speed(3 if args.quick else 5)
    powerlaw_comparison((2000, 5000) if args.quick else (5000, 10000))
    if args.accuracy:
        accuracy({10**4: 10, 10**5: 4} if args.quick else {10**4: 50, 10**5: 20})


if __name__ == "__main__":
    main()
