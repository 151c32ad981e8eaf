"""Claim 6: double descent: the test error peaks where p ≈ 0.5, at the interpolation threshold."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.workflows.claims import result, save_figure

CLAIM = "double descent: the test error peaks where p ≈ 0.5, at the interpolation threshold"
SOURCE = "notes 002/004"


def _fit_function():
    """``fit`` of examples/double_descent.py (random ReLU features, recorded GD runs), by file path."""
    path = Path(__file__).resolve().parents[1] / "double_descent.py"
    spec = importlib.util.spec_from_file_location("phasewatch_example_double_descent", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fit


def run(out_dir, quick: bool) -> dict:
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import WIDTHS, paper_style

    fit = _fit_function()
    out_dir = Path(out_dir)
    features = [100, 150, 200, 300, 800] if quick else [50, 100, 150, 180, 200, 220, 250, 300, 400, 800, 1600, 3200]
    steps = 60 if quick else 300
    rng = np.random.default_rng(0)
    n, n_test, d = 200, 1000, 20
    beta = rng.standard_normal(d)
    beta /= np.linalg.norm(beta)
    X, Xt = rng.standard_normal((n, d)), rng.standard_normal((n_test, d))
    y = X @ beta + 0.5 * rng.standard_normal(n)
    yt = Xt @ beta + 0.5 * rng.standard_normal(n_test)
    rows = []
    for m in features:
        path = out_dir / "runs" / f"m{m}"
        if path.exists():
            shutil.rmtree(path)
        r = fit(path, m, X, y, Xt, yt, steps=steps, seed=0)
        an = phasewatch.analyze(path, window=10)
        c1 = np.asarray(an.probes["C_per_example"], float)
        pb = n * c1 / (1 + n * c1)  # full batch B = n: C_B = n·C_1 (DEFINITIONS §2)
        rows.append({"m": m, "minnorm_test_mse": r["minnorm_test"], "gd_test_mse": r["gd_test"],
                     "p_B_first": float(pb[0]), "p_B_median": float(np.nanmedian(pb)), "p_B_last": float(pb[-1])})
    ms = np.array([r["m"] for r in rows])
    err = np.array([r["minnorm_test_mse"] for r in rows])
    p0 = np.array([r["p_B_first"] for r in rows])
    i_peak = int(np.argmax(err))
    i_half = int(np.nanargmin(np.abs(p0 - 0.5)))

    with paper_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(WIDTHS["text"], 2.2), layout="constrained")
    ax.plot(ms, err, "o-", ms=3, label="min-norm")
    ax.plot(ms, [r["gd_test_mse"] for r in rows], "s--", ms=3, label=f"GD, {steps} steps")
    ax.set(xscale="log", yscale="log", xlabel="features m (n = 200)", ylabel="test MSE")
    ax.legend(fontsize=6)
    bx.plot(ms, p0, "o-", ms=3, label="first measurement")
    bx.plot(ms, [r["p_B_median"] for r in rows], "s--", ms=3, label="median over the run")
    bx.axhline(0.5, color="k", lw=0.5)
    bx.set(xscale="log", xlabel="features m", ylabel="p_B = n·C₁/(1 + n·C₁)", ylim=(-0.02, 1.02))
    bx.legend(fontsize=6)
    for a in (ax, bx):
        a.axvline(n, color="0.4", lw=0.6, ls=":")
    fig_path = save_figure(fig, out_dir, "double_descent")

    desc = (f"test error peaks at m = {ms[i_peak]} (n = {n}), where p_B = {p0[i_peak]:.2f} at step 1 "
            f"(median over the run {rows[i_peak]['p_B_median']:.2f}); p_B at step 1 is closest to 0.5 at "
            f"m = {ms[i_half]} ({p0[i_half]:.2f}) and ranges {np.nanmin(p0):.2f}–{np.nanmax(p0):.2f} over m")
    peak_at_threshold = abs(np.log(ms[i_peak] / n)) <= np.log(1.25)
    if not peak_at_threshold:
        verdict, why = "inconclusive", desc + ": no double-descent peak at the threshold in this sweep"
    elif abs(p0[i_peak] - 0.5) <= 0.1:
        verdict, why = "holds", desc
    else:
        verdict, why = "fails", desc + ": the peak is at the threshold but p there is not ≈ 0.5 (±0.1)"
    if quick:
        why += f" (quick mode: {len(features)} widths, {steps} steps)"
    setup = (f"random ReLU features (examples/double_descent.py): n = {n}, d = {d}, noise 0.5, m ∈ {features}; "
             f"full-batch GD {steps} steps recorded with per-example gradient samples; p_B from C₁ at the first "
             "measurement (step 1) with B = n; test error of the min-norm fit")
    return result(CLAIM, SOURCE, setup, verdict, why, {"per_width": rows}, fig_path)
