"""Claim 9: the consolidation ratio C drops before grokking and gives an early warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.workflows.claims import grokking_runs, grokking_setup, result
from phasewatch.workflows.study import run_study

CLAIM = "the consolidation ratio C drops before grokking and gives an early warning (~200 epochs)"
SOURCE = "note 002"


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
                  out_dir / "study.png")
