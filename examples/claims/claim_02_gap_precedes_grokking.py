"""Claim 2: gap dynamics (g23 decline > 1.5x) precede grokking with weight decay, not without."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

import phasewatch
from phasewatch.analysis.events import first_rule, series, signal_rule
from phasewatch.analysis.leadtime import lead_time, summarize
from phasewatch.workflows.claims import (
    GROKKING,
    cached_runs,
    grokking_runs,
    grokking_setup,
    result,
    save_figure,
)
from phasewatch.workflows.study import run_study

CLAIM = ("g₂₃ = λ₂ − λ₃ declines > 1.5× from its pre-event peak before every grokking event; "
         "runs without weight decay do not grok")
SOURCE = "Xu 2026 (arXiv:2603.28964) §7, Table 7: 24/24"

WINDOW = 10
EVENT = "test_acc>=0.95"
#: The second task (examples/grokking_subtraction.py): an MLP on learned embeddings, cross-entropy,
#: AdamW, on (a - b) mod 59; seeds as the demo runs (GROKKING).  Full: lr 1e-2, 800 steps (it fits the
#: training set by step ~50 and groks at ~450-550).  Quick: lr 2e-2 and 450 steps (groks at ~300).
SUBTRACTION = {
    False: {"p": 59, "train_fraction": 0.5, "embed": 32, "width": 128, "steps": 800, "lr": 1e-2,
            "weight_decay": 1.0, "eval_every": 5},
    True: {"p": 59, "train_fraction": 0.5, "embed": 32, "width": 128, "steps": 450, "lr": 2e-2,
           "weight_decay": 1.0, "eval_every": 5},
}


def _subtraction_module():
    path = Path(__file__).resolve().parents[1] / "grokking_subtraction.py"
    spec = importlib.util.spec_from_file_location("phasewatch_example_grokking_subtraction", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def subtraction_runs(out_dir, quick: bool) -> list[dict[str, Any]]:
    """Record (or reuse) the second task's runs, with weight decay and without, every seed of the demo
    runs; cached in ``out_dir/../_runs/subtraction-<hash of the configuration>`` like the demo runs."""
    cfg = {**SUBTRACTION[bool(quick)], "seeds": list(GROKKING[bool(quick)]["seeds"])}
    kw = {k: v for k, v in cfg.items() if k not in ("seeds", "weight_decay")}

    def train(path, weight_decay, seed):
        return _subtraction_module().train(path, weight_decay=weight_decay, seed=seed, **kw)

    return cached_runs(out_dir, "subtraction", cfg, train)


def subtraction_setup(quick: bool) -> str:
    c = SUBTRACTION[bool(quick)]
    n = len(GROKKING[bool(quick)]["seeds"])
    return (f"embedding MLP (examples/grokking_subtraction.py: embeddings {c['embed']}, ReLU width {c['width']}, "
            f"cross-entropy) on (a−b) mod {c['p']}, {c['train_fraction']:.0%} of pairs, AdamW lr {c['lr']:g}, "
            f"{c['steps']} steps, {n} seed(s) with weight decay {c['weight_decay']:g} and {n} without")


def _fit_step(an) -> int | None:
    """First evaluation with training accuracy ≥ 0.99 (from the recorded metrics)."""
    s, v, _ = series(an, "train_acc")
    e = first_rule(s, v, "train_acc>=0.99")
    return None if e is None else e.step


def _after_fit(st, analyses, fits: dict[str, int | None]) -> dict[str, Any]:
    """A diagnostic beside the claim's rule (not part of the verdict): the same decline rule, with the
    peak taken only over windows from the fit step on (first evaluation with training accuracy
    ≥ 0.99), i.e. with the transient of the first steps left out.  Hits, lags and false alarms as in
    the study (controls: over the rest of the run)."""
    _, rule = signal_rule("g23")
    taus, fired, onsets = [], [], {}
    for row, an in zip(st.rows, analyses):
        s, v, _ = series(an, "g23")
        fit = fits.get(row.run)
        keep = s >= fit if fit is not None else np.zeros(len(s), bool)
        ref = row.event_step if not row.control else (float(s[-1]) if len(s) else None)
        on = rule(s[keep], v[keep], ref) if keep.any() else None
        onsets[row.run] = None if on is None else on.step
        if row.control:
            fired.append(on is not None)
        else:
            taus.append(lead_time(row.event_step, None if on is None else on.step))
    sm = summarize(taus, fired, seed=0)
    return {"hits": f"{sm.hits}/{sm.n_event_runs}", "lags": sm.lags, "false_alarms": f"{sm.false_alarms}/"
            f"{sm.n_control_runs}", "median_tau": sm.median_tau.median, "onset_steps": onsets}


def _span(xs, fmt: str) -> str:
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return lo if lo == hi else f"{lo}–{hi}"


def _task(name: str, runs: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """The study of one task: g23 decline before grokking, lead/lag, false alarms, the verdict."""
    analyses = [phasewatch.analyze(r["path"], window=WINDOW) for r in runs]
    labels = [r["path"].name for r in runs]
    st = run_study(analyses, labels=labels, event=EVENT, signal="g23", window=WINDOW)
    st.write(out_dir / name, figure=False)
    s = st.summary
    wd = [r for r in runs if r["group"] == "wd"]
    nowd = [r for r in runs if r["group"] == "nowd"]
    wd_grok = sum(r["grok_step"] is not None for r in wd)
    nowd_grok = sum(r["grok_step"] is not None for r in nowd)
    nowd_steps = [r["grok_step"] for r in nowd if r["grok_step"] is not None]
    rows = {r.run: r for r in st.rows}
    fits = {lab: _fit_step(a) for lab, a in zip(labels, analyses)}
    m = s.median_tau
    onsets = [r.onset_step for r in st.rows if r.onset_step is not None]
    numbers = {
        "wd_runs_grokked": f"{wd_grok}/{len(wd)}", "nowd_runs_grokked": f"{nowd_grok}/{len(nowd)}",
        "grok_steps": [r["grok_step"] for r in wd], "nowd_grok_steps": [r["grok_step"] for r in nowd],
        "fit_steps": fits,
        "decline_before_grokking": f"{s.hits}/{s.n_event_runs}", "hits": s.hits, "lags": s.lags,
        "coincident": s.coincident, "no_onset": s.n_event_runs - s.n_onset, "event_runs": s.n_event_runs,
        "false_alarms": s.false_alarms, "control_runs": s.n_control_runs,
        "median_tau": m.median, "median_tau_ci": [m.lo, m.hi],
        "per_run": {lab: {"event_step": rows[lab].event_step, "onset_step": rows[lab].onset_step,
                          "tau": rows[lab].tau, "status": rows[lab].status, "p_shift": rows[lab].p_shift}
                    for lab in labels},
        "permutation_p": None if st.permutation is None else st.permutation.p,
        "after_fit_diagnostic": _after_fit(st, analyses, fits),
    }
    desc = (f"g₂₃ declined > 1.5× before grokking in {s.hits}/{s.n_event_runs} grokking runs "
            f"(median lead τ {m.median:g} steps), lags {s.lags}; it fired on {s.false_alarms}/{s.n_control_runs} "
            f"runs without grokking; {wd_grok}/{len(wd)} runs with and {nowd_grok}/{len(nowd)} without weight "
            f"decay grokked")
    if onsets:
        desc += f"; onsets at step{'s' if len(set(onsets)) > 1 else ''} {_span(onsets, '{:d}')}"
    ps = [r.p_shift for r in st.event_rows if r.p_shift is not None]
    if ps:
        desc += f" (circular-shift p {_span(ps, '{:.2g}')})"
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
    numbers.update(verdict=verdict, reason=why)
    return {"name": name, "runs": runs, "analyses": analyses, "study": st, "numbers": numbers,
            "verdict": verdict, "reason": why}


def _figure(tasks: list[dict[str, Any]], titles: list[str], out_dir: Path) -> Path:
    """One panel per task: g₂₃ (log, left axis, solid/dashed) and test accuracy (right axis, dotted) of
    every run against step − grokking step; triangles mark the onset of the decline rule."""
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import PALETTE, WIDTHS, paper_style

    nowd_colors = ("#D55E00", "#CC79A7", "#999999")
    with paper_style():
        fig, axes = plt.subplots(1, len(tasks), figsize=(WIDTHS["full"], 2.8), layout="constrained")
        for ax, task, title in zip(np.atleast_1d(axes), tasks, titles):
            bx = ax.twinx()
            groks = [r.event_step for r in task["study"].event_rows]
            ref_ctrl = float(np.median(groks)) if groks else 0.0
            count = {"wd": 0, "nowd": 0}
            for run, an, row in zip(task["runs"], task["analyses"], task["study"].rows):
                ref = row.event_step if row.event_step is not None else ref_ctrl
                i = count[run["group"]]
                count[run["group"]] += 1
                color, ls = (PALETTE[i % 3], "-") if run["group"] == "wd" else (nowd_colors[i % 3], "--")
                s, v, _ = series(an, "g23")
                label = f"{'wd' if run['group'] == 'wd' else 'no wd'} seed {run['seed']}"
                ax.plot(s - ref, v, ls, color=color, lw=0.8, label=label)
                if row.onset_step is not None:
                    ax.plot(row.onset_step - ref, row.onset_value, "v", color=color, ms=3.5)
                ts, tv, _ = series(an, "test_acc")
                bx.plot(ts - ref, tv, ":", color=color, lw=0.9)
            ax.axvline(0, color="k", lw=0.5)
            ax.set(yscale="log", ylabel="g₂₃ = λ₂ − λ₃ (W = 10)", title=title,
                   xlabel="step − grokking step (no grokking: − median)")
            bx.set(ylim=(-0.02, 1.02), ylabel="test accuracy (dotted)")
        handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=6, frameon=False)
    return save_figure(fig, out_dir, "gap_precedes_grokking")


@contextlib.contextmanager
def _one_thread():
    """torch on one intra-op thread while recording: these models are small, and on a loaded 2-core
    machine two threads cost 5-7x the CPU time (a demo run of the full mode: 100 s CPU with two
    threads, 15 s with one; the same grokking step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(out_dir, quick: bool) -> dict:
    out_dir = Path(out_dir)
    with _one_thread():
        demo_runs = grokking_runs(out_dir, quick)
        sub_runs = subtraction_runs(out_dir, quick)
    tasks = [_task("demo", demo_runs, out_dir), _task("subtraction", sub_runs, out_dir)]
    titles = ["demo: (xW)²V, (a+b) mod 71, MSE, Adam+L2", "embedding MLP, (a−b) mod 59, CE, AdamW"]
    fig = _figure(tasks, titles, out_dir)
    verdicts = [t["verdict"] for t in tasks]
    if all(v == "holds" for v in verdicts):
        verdict = "holds"
    elif "fails" in verdicts:
        verdict = "fails"
    else:
        verdict = "inconclusive"
    why = "; ".join(f"{t['name']} ({t['verdict']}): {t['reason']}" for t in tasks)
    why = f"holds on {verdicts.count('holds')}/2 tasks — " + why
    if quick:
        why += " (quick mode: one seed per group; the second task shortened, lr 2e-2)"
    numbers = {t["name"]: t["numbers"] for t in tasks}
    setup = (f"(1) {grokking_setup(quick)}; (2) {subtraction_setup(quick)}; W = {WINDOW}; event: first "
             f"evaluation with test accuracy ≥ 0.95; onset rule decline(factor=1.5) from the pre-event peak "
             "(runs without the event: from the peak of the whole run, a false alarm if it fires); nulls: "
             "circular shifts, permutation across runs; holds only if it holds on both tasks")
    return result(CLAIM, SOURCE, setup, verdict, why, numbers, fig)
