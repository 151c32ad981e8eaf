"""Claim 3: after grokking the update Gram locks in (k* = 2, large λ2/λ3); controls stay isotropic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.workflows.claims import grokking_runs, grokking_setup, result, save_figure

CLAIM = "after grokking k* = 2 with a large λ₂/λ₃ (median ≈ 300), controls stay isotropic (≈ 1.3)"
SOURCE = "author's note on this model family"


def _late(an, start: float):
    """k* and λ₂/λ₃ = (σ₂/σ₃)² over valid windows ending after ``start``."""
    t = an.table
    keep = t["valid"] & (t["step"] > start)
    sig = t["sigma"][keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        l23 = (sig[:, 1] / sig[:, 2]) ** 2
    return t["kstar"][keep], l23


def _mode(k: np.ndarray) -> int | None:
    if not k.size:
        return None
    vals, counts = np.unique(k, return_counts=True)
    return int(vals[np.argmax(counts)])


def run(out_dir, quick: bool) -> dict:
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import WIDTHS, paper_style

    out_dir = Path(out_dir)
    runs = grokking_runs(out_dir, quick)
    ans = {r["path"].name: phasewatch.analyze(r["path"], window=10) for r in runs}
    groks = [r["grok_step"] for r in runs if r["group"] == "wd" and r["grok_step"] is not None]
    ref = float(np.median(groks)) if groks else None
    rows = {}
    for r in runs:
        name = r["path"].name
        start = r["grok_step"] if r["grok_step"] is not None else ref  # controls: after the median grok step
        if start is None:
            continue
        k, l23 = _late(ans[name], start)
        rows[name] = {"group": r["group"], "grokked": r["grok_step"] is not None, "from_step": start,
                      "kstar_mode": _mode(k), "kstar2_fraction": float(np.mean(k == 2)) if k.size else None,
                      "median_l2_l3": float(np.nanmedian(l23)) if l23.size else None}
    grok_rows = [v for v in rows.values() if v["group"] == "wd" and v["grokked"]]
    ctrl_rows = [v for v in rows.values() if v["group"] == "nowd"]
    med_g = float(np.median([v["median_l2_l3"] for v in grok_rows])) if grok_rows else float("nan")
    med_c = float(np.median([v["median_l2_l3"] for v in ctrl_rows])) if ctrl_rows else float("nan")
    modes = [v["kstar_mode"] for v in grok_rows]
    numbers = {"per_run": rows, "median_l2_l3_grokked": med_g, "median_l2_l3_controls": med_c,
               "kstar_modes_grokked": modes}

    with paper_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(WIDTHS["text"], 2.2), layout="constrained")
    for r in runs:
        an = ans[r["path"].name]
        t = an.table
        v = t["valid"]
        with np.errstate(divide="ignore", invalid="ignore"):
            l23 = (t["sigma"][:, 1] / t["sigma"][:, 2]) ** 2
        ls, c = ("-", "C0") if r["group"] == "wd" else ("--", "0.5")
        ax.plot(t["step"][v], l23[v], ls, color=c, lw=0.8)
        bx.plot(t["step"][v], t["kstar"][v] + (0.05 * r["seed"]), ls, color=c, lw=0.8)
        if r["grok_step"] is not None:
            ax.axvline(r["grok_step"], color="C3", lw=0.5, alpha=0.6)
    ax.set(yscale="log", xlabel="step", ylabel="λ₂/λ₃ (W = 10)")
    bx.set(xlabel="step", ylabel="k*")
    ax.plot([], [], "-", color="C0", label="weight decay")
    ax.plot([], [], "--", color="0.5", label="no weight decay")
    ax.legend(fontsize=6)
    fig_path = save_figure(fig, out_dir, "lock_in")

    frac2 = [round(v["kstar2_fraction"], 2) for v in grok_rows]
    desc = (f"after grokking: k* modes {modes} (k* = 2 in fractions {frac2} of the windows), median λ₂/λ₃ "
            f"{med_g:.3g}; controls (same steps): "
            f"median λ₂/λ₃ {med_c:.3g}")
    if not grok_rows or not ctrl_rows:
        verdict, why = "inconclusive", "no grokking run (or no control) to compare"
    elif all(m == 2 for m in modes) and med_g >= 10 * med_c and med_c < 3:
        verdict, why = "holds", desc
    else:
        verdict, why = "fails", desc
    if quick:
        why += " (quick mode: one seed per group)"
    return result(CLAIM, SOURCE, grokking_setup(quick) + "; W = 10; windows after the grokking step "
                  "(controls: after the median grokking step); holds if k* mode = 2 on every grokking run, "
                  "λ₂/λ₃ ≥ 10× the controls' and controls < 3", verdict, why, numbers, fig_path)
