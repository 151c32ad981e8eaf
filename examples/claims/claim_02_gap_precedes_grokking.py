"""Claim 2: gap dynamics (g23 decline > 1.5x) precede grokking with weight decay, not without."""

from __future__ import annotations

from pathlib import Path

import phasewatch
from phasewatch.claims import grokking_runs, grokking_setup, result
from phasewatch.study import run_study

CLAIM = ("g₂₃ = λ₂ − λ₃ declines > 1.5× from its pre-event peak before every grokking event; "
         "runs without weight decay do not grok")
SOURCE = "Xu 2026 (arXiv:2603.28964) §7, Table 7: 24/24"


def run(out_dir, quick: bool) -> dict:
    out_dir = Path(out_dir)
    runs = grokking_runs(out_dir, quick)
    analyses = [phasewatch.analyze(r["path"], window=10) for r in runs]
    labels = [r["path"].name for r in runs]
    st = run_study(analyses, labels=labels, event="test_acc>=0.95", signal="g23")
    st.write(out_dir, figure_formats=("png", "pdf"))
    s = st.summary
    wd = [r for r in runs if r["group"] == "wd"]
    nowd = [r for r in runs if r["group"] == "nowd"]
    wd_grok = sum(r["grok_step"] is not None for r in wd)
    nowd_grok = sum(r["grok_step"] is not None for r in nowd)
    m = s.median_tau
    numbers = {"wd_runs_grokked": f"{wd_grok}/{len(wd)}", "nowd_runs_grokked": f"{nowd_grok}/{len(nowd)}",
               "grok_steps": [r["grok_step"] for r in wd], "hits": s.hits, "lags": s.lags,
               "coincident": s.coincident, "event_runs": s.n_event_runs, "false_alarms": s.false_alarms,
               "control_runs": s.n_control_runs, "median_tau": m.median, "median_tau_ci": [m.lo, m.hi],
               "taus": [r.tau for r in st.event_rows],
               "p_shift": [r.p_shift for r in st.event_rows],
               "permutation_p": None if st.permutation is None else st.permutation.p}
    desc = (f"g₂₃ decline led grokking in {s.hits}/{s.n_event_runs} runs (median τ {m.median:g} steps), "
            f"lags {s.lags}; it also fired on {s.false_alarms}/{s.n_control_runs} runs without weight decay; "
            f"{wd_grok}/{len(wd)} runs with and {nowd_grok}/{len(nowd)} without weight decay grokked")
    nowd_steps = [r["grok_step"] for r in nowd if r["grok_step"] is not None]
    if s.n_event_runs == 0:
        verdict, why = "inconclusive", f"no run grokked ({desc})"
    elif nowd_grok:
        verdict, why = "fails", (desc + f": runs without weight decay grok too (at steps {nowd_steps}), so the "
                                 "contrast the claim rests on is absent here")
    elif s.hits < s.n_event_runs:
        verdict, why = "fails", desc
    elif s.false_alarms > s.n_control_runs / 2:
        verdict, why = "fails", desc + ": the decline precedes grokking but is not specific to it"
    else:
        verdict, why = "holds", desc
    if quick:
        why += " (quick mode: one seed per group)"
    return result(CLAIM, SOURCE, grokking_setup(quick) + "; W = 10; onset rule decline(factor=1.5); "
                  "nulls: circular shifts, permutation across runs", verdict, why, numbers,
                  out_dir / "study.png")
