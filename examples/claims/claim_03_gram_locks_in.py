"""Claim 3: after grokking the update Gram locks in (k* = 2, large λ2/λ3); controls stay isotropic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.workflows.claims import (
    cached_runs,
    grokking_runs,
    grokking_setup,
    reproduction,
    result,
    save_figure,
)

CLAIM = "after grokking k* = 2 with a large λ₂/λ₃ (median ≈ 300), controls stay isotropic (≈ 1.3)"
SOURCE = "author's note on this model family (Tian's quadratic model on modular addition)"

#: The note's protocol: width 2048, W ~ N(0, 1/fan_in) and V ~ N(0, 1/fan_in), Adam with coupled L2
#: (lr 1e-3, weight decay 2e-4 vs 0), full batch, 300 steps; Gram window W = 20; the statistic is
#: the median of λ₂/λ₃ over the last 50 windows.  Quick mode: width 512, one seed (CI-sized).
NOTE = {
    False: {"p": 71, "width": 2048, "steps": 300, "lr": 1e-3, "seeds": [0, 1, 2], "weight_decay": 2e-4,
            "init": "fan_in", "window": 20, "last": 50},
    True: {"p": 71, "width": 512, "steps": 300, "lr": 1e-3, "seeds": [0], "weight_decay": 2e-4,
           "init": "fan_in", "window": 20, "last": 50},
}
#: "≈ 300" and "≈ 1.3" read as: grokked runs' median within a factor 3 of 300, controls' below 2
REPRODUCED_IF = {"grokked_min": 100.0, "grokked_max": 900.0, "controls_max": 2.0}


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


def _last(an, n: int):
    """k* and λ₂/λ₃ over the last ``n`` valid windows."""
    t = an.table
    keep = np.flatnonzero(t["valid"])[-n:]
    sig = t["sigma"][keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        l23 = (sig[:, 1] / sig[:, 2]) ** 2
    return t["kstar"][keep], l23


def _note_protocol(out_dir: Path, quick: bool) -> dict:
    """The claim in its source's protocol (:data:`NOTE`): the reproduction part."""
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import WIDTHS, paper_style
    from phasewatch.workflows.demo import train_grokking

    cfg = dict(NOTE[bool(quick)])

    def train(path, weight_decay, seed):
        return train_grokking(path, p=cfg["p"], width=cfg["width"], steps=cfg["steps"], lr=cfg["lr"],
                              weight_decay=weight_decay, seed=seed, init=cfg["init"],
                              recorder_kwargs={"k": cfg["window"] + 12})

    runs = cached_runs(out_dir, "tian-note", cfg, train)
    rows, curves = {}, {}
    for r in runs:
        an = phasewatch.analyze(r["path"], window=cfg["window"])
        k, l23 = _last(an, cfg["last"])
        t = an.table
        curves[r["path"].name] = (r, t["step"][t["valid"]], t["sigma"][t["valid"]])
        rows[r["path"].name] = {"group": r["group"], "seed": r["seed"], "grok_step": r["grok_step"],
                                "final_test_acc": r["final_test_acc"], "kstar_mode": _mode(k),
                                "kstar2_fraction": float(np.mean(k == 2)) if k.size else None,
                                "median_l2_l3": float(np.nanmedian(l23)) if l23.size else None}
    grok = [v for v in rows.values() if v["group"] == "wd"]
    ctrl = [v for v in rows.values() if v["group"] == "nowd"]
    med_g = float(np.median([v["median_l2_l3"] for v in grok]))
    med_c = float(np.median([v["median_l2_l3"] for v in ctrl]))
    modes = [v["kstar_mode"] for v in grok]
    numbers = {"per_run": rows, "median_l2_l3_grokked": med_g, "median_l2_l3_controls": med_c,
               "kstar_modes_grokked": modes, "reproduced_if": REPRODUCED_IF,
               "test_acc_grokked": [v["final_test_acc"] for v in grok],
               "test_acc_controls": [v["final_test_acc"] for v in ctrl]}
    with paper_style():
        fig, ax = plt.subplots(figsize=(WIDTHS["column"], 2.2), layout="constrained")
    for r, steps, sig in curves.values():
        with np.errstate(divide="ignore", invalid="ignore"):
            l23 = (sig[:, 1] / sig[:, 2]) ** 2
        ls, c = ("-", "C0") if r["group"] == "wd" else ("--", "0.5")
        ax.plot(steps, l23, ls, color=c, lw=0.8)
    ax.axvspan(cfg["steps"] - cfg["last"], cfg["steps"], color="0.9", zorder=0)
    ax.set(yscale="log", xlabel="step", ylabel=f"λ₂/λ₃ (W = {cfg['window']})")
    ax.plot([], [], "-", color="C0", label="weight decay 2e-4")
    ax.plot([], [], "--", color="0.5", label="no weight decay")
    ax.legend(fontsize=6)
    fig_path = save_figure(fig, out_dir, "note_protocol")
    ok = (all(m == 2 for m in modes) and REPRODUCED_IF["grokked_min"] <= med_g <= REPRODUCED_IF["grokked_max"]
          and med_c <= REPRODUCED_IF["controls_max"])
    why = (f"last {cfg['last']} windows: k* modes {modes} with weight decay, median λ₂/λ₃ {med_g:.3g} "
           f"(note: ≈ 300) vs {med_c:.3g} without (note: ≈ 1.3); final test accuracy "
           f"{[round(a, 2) for a in numbers['test_acc_grokked']]} vs {[round(a, 2) for a in numbers['test_acc_controls']]}")
    if quick:
        why += f" (quick mode: width {cfg['width']}, one seed; the note's width is 2048)"
    setup = (f"the note's protocol: (x W)^2 V on (a+b) mod {cfg['p']}, width {cfg['width']}, W, V ~ N(0, 1/fan_in), "
             f"Adam (coupled L2) lr {cfg['lr']:g}, weight decay {cfg['weight_decay']:g} vs 0, full batch, "
             f"{cfg['steps']} steps, {len(cfg['seeds'])} seed(s) each; Gram window W = {cfg['window']} of per-step "
             f"updates; median λ₂/λ₃ over the last {cfg['last']} windows")
    return reproduction(setup, "reproduced" if ok else "not reproduced", why, numbers, fig_path)


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
                  "λ₂/λ₃ ≥ 10× the controls' and controls < 3", verdict, why, numbers, fig_path,
                  reproduction=_note_protocol(out_dir, quick))
