"""Claim 9: the consolidation ratio C drops before grokking and gives an early warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.workflows.claims import grokking_runs, grokking_setup, reproduction, result, save_figure
from phasewatch.workflows.notes import modular_runs, modular_setup
from phasewatch.workflows.study import run_study

CLAIM = "the consolidation ratio C drops before grokking and gives an early warning (~200 epochs)"
SOURCE = "note 002"


def first_drop(steps: np.ndarray, c: np.ndarray, until: float, factor: float = 2.0) -> float | None:
    """First step before ``until`` at which ``c`` is ≤ its running maximum / ``factor``."""
    peak = -np.inf
    for s, v in zip(steps, c):
        if s >= until:
            break
        if np.isfinite(v):
            peak = max(peak, v)
            if peak > 0 and v <= peak / factor:
                return float(s)
    return None


def _notes_protocol(out_dir: Path, quick: bool) -> dict:
    """The notes' protocol: C from 20 minibatch gradients (naive) along minibatch grokking runs."""
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import WIDTHS, paper_style

    runs = modular_runs(out_dir, quick)
    rows = {}
    with paper_style():
        fig, ax = plt.subplots(figsize=(WIDTHS["column"], 2.2), layout="constrained")
    for r in runs:
        lg = r["log"]
        until = r["grok_step"] if r["grok_step"] is not None else float(lg["step"][-1]) + 1
        row = {"group": r["group"], "seed": r["seed"], "grok_step": r["grok_step"]}
        for est in ("notes", "ours"):
            d = first_drop(lg["step"], lg[f"C_{est}"], until)
            row[f"drop_step_{est}"] = d
            row[f"lead_{est}"] = None if d is None or r["grok_step"] is None else r["grok_step"] - d
        pre = lg["step"] < until
        row["C_notes_pre_max"] = float(np.nanmax(lg["C_notes"][pre]))
        row["C_notes_at_end_of_pre"] = float(lg["C_notes"][pre][-1])
        rows[r["path"].name] = row
        ls = "-" if r["group"] == "wd" else "--"
        ax.plot(lg["step"], lg["C_notes"], ls, color="C0", lw=0.8)
        ax.plot(lg["step"], lg["C_ours"], ls, color="C2", lw=0.6)
        if r["grok_step"] is not None:
            ax.axvline(r["grok_step"], color="C3", lw=0.5)
    ax.plot([], [], color="C0", label="C, notes (naive, 20 minibatches)")
    ax.plot([], [], color="C2", label="C, ours (canonical)")
    ax.legend(fontsize=5)
    ax.set(xlabel="step", ylabel="C of a minibatch")
    fig_path = save_figure(fig, out_dir, "notes_protocol")
    ev = [v for v in rows.values() if v["grok_step"] is not None]
    ctrl = [v for v in rows.values() if v["grok_step"] is None]
    hits = [v for v in ev if v["drop_step_notes"] is not None]
    alarms = [v for v in ctrl if v["drop_step_notes"] is not None]
    numbers = {"per_run": rows, "hits": len(hits), "event_runs": len(ev), "false_alarms": len(alarms),
               "control_runs": len(ctrl), "leads_notes": [v["lead_notes"] for v in hits],
               "leads_ours": [v["lead_ours"] for v in ev]}
    why = (f"the notes' C halved from its running peak before grokking in {len(hits)}/{len(ev)} grokking runs "
           f"(leads {numbers['leads_notes']} steps), and in {len(alarms)}/{len(ctrl)} runs that never grok; "
           f"pre-grok peak vs last pre-grok value per run "
           f"{[(round(v['C_notes_pre_max'], 3), round(v['C_notes_at_end_of_pre'], 3)) for v in rows.values()]}")
    ok = ev and len(hits) == len(ev) and len(alarms) <= len(ctrl) / 2
    if not ev:
        why = "no run grokked: " + why
    if quick:
        why += " (quick mode: CI-sized, does not grok)"
    return reproduction(modular_setup(quick) + "; a drop: the notes' C ≤ its running maximum / 2 before the "
                        "grokking step (first test accuracy ≥ 0.95); reproduced if every grokking run drops and at "
                        "most half the runs without weight decay do", "reproduced" if ok else "not reproduced",
                        why, numbers, fig_path)


def run(out_dir, quick: bool) -> dict:
    out_dir = Path(out_dir)
    runs = grokking_runs(out_dir, quick)
    analyses = [phasewatch.analyze(r["path"], window=10) for r in runs]
    labels = [r["path"].name for r in runs]
    # a drop: C falls below half of its maximum before the event (the decline rule, factor 2)
    st = run_study(analyses, labels=labels, event="test_acc>=0.95", signal="C", onset="decline",
                   params={"factor": 2.0})
    st.write(out_dir, figure_formats=("png", "pdf"))
    s = st.summary
    m = s.median_tau
    c_all = np.concatenate([np.asarray(a.probes["C"], float) for a in analyses])
    zero = float(np.mean(c_all <= 0))
    numbers = {"hits": s.hits, "lags": s.lags, "coincident": s.coincident, "event_runs": s.n_event_runs,
               "no_onset": s.n_event_runs - s.n_onset, "false_alarms": s.false_alarms,
               "control_runs": s.n_control_runs, "median_tau": m.median, "median_tau_ci": [m.lo, m.hi],
               "taus": [r.tau for r in st.event_rows], "p_shift": [r.p_shift for r in st.event_rows],
               "permutation_p": None if st.permutation is None else st.permutation.p,
               "fraction_C_clipped_to_0": zero}
    desc = (f"C halved from its pre-event peak before grokking in {s.hits}/{s.n_event_runs} runs "
            f"(median lead {m.median:g} steps), lags {s.lags}, no drop {s.n_event_runs - s.n_onset}; "
            f"false alarms on {s.false_alarms}/{s.n_control_runs} runs without weight decay; "
            f"{100 * zero:.0f}% of the C measurements are ≤ 0 (bias-corrected, clipped: per-example "
            "gradients of this model are nearly orthogonal)")
    sig = [p for p in numbers["p_shift"] if p is not None]
    if s.n_event_runs == 0:
        verdict, why = "inconclusive", "no run grokked, nothing to warn of"
    elif s.hits == s.n_event_runs and s.false_alarms <= s.n_control_runs / 2:
        verdict, why = "holds", desc
        if sig and min(sig) > 0.05:
            verdict, why = "inconclusive", desc + "; but no lead is significant against circular shifts"
    else:
        verdict, why = "fails", desc
    if quick:
        why += " (quick mode: one seed per group)"
    return result(CLAIM, SOURCE, grokking_setup(quick) + "; onset: C ≤ peak/2 after its pre-event peak "
                  "(decline, factor 2); controls judged over the whole run", verdict, why, numbers,
                  out_dir / "study.png", reproduction=_notes_protocol(out_dir, quick))
