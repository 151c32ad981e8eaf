"""``phasewatch report RUN``: what a recorded run says, section by section, as markdown and JSON.

Sections: run, events (grokking step, jumps, loss plateaus), signal onsets relative to the event,
phases timeline (from p and its CI), k* regime, A regimes, C and p with CIs and decision-guide bands,
early-stopping flags, the tail index α, the stability margin S, and the logistic forecast of p(t).
Every section states the convention its numbers use (``Analysis.conventions`` and DEFINITIONS.md),
and a section whose quantity the run lacks says so in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import adiabatic as adia
from ..analysis import noise as nz
from ..analysis.events import SIGNALS, plateaus, series, signal_rule
from ..analysis.leadtime import classify, lead_time
from ..errors import PhasewatchError

__all__ = ["build_report", "report_markdown", "write_report", "segments"]


def _f(x: Any) -> Any:
    """JSON-safe number (NaN/inf -> None)."""
    if x is None:
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def _g(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None or (isinstance(x, (float, np.floating)) and not math.isfinite(float(x))):
        return "–"
    return fmt.format(x)


def _pct(v: float) -> str:
    return "<1%" if 0 < v < 0.005 else f"{100 * v:.0f}%"


def segments(steps: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """Maximal runs of equal consecutive labels: ``[{"from": step, "to": step, "label": l, "n": count}]``."""
    s = np.asarray(steps)
    lab = np.asarray(labels)
    out: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(s) + 1):
        if i == len(s) or lab[i] != lab[start]:
            v = lab[start]
            out.append({"from": int(s[start]), "to": int(s[i - 1]),
                        "label": v.item() if hasattr(v, "item") else v, "n": i - start})
            start = i
    return out


def _section(key: str, title: str, convention: str, available: bool, lines: list[str],
             data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"key": key, "title": title, "convention": convention, "available": available, "lines": lines,
            "data": data or {}}


def _missing(key: str, title: str, line: str) -> dict[str, Any]:
    return _section(key, title, "", False, [line])


# --------------------------------------------------------------------------- sections
def _events(a, plateau_window: int, plateau_range: float) -> dict[str, Any]:
    evs = list(a.events)
    sc = a.scalars or {}
    if len(sc.get("step", [])) and "loss" in sc and np.isfinite(np.asarray(sc["loss"], float)).any():
        evs += plateaus(sc["step"], sc["loss"], window=plateau_window, rel_range=plateau_range, metric="loss")
    conv = ("grokking: first evaluation with test accuracy >= 0.95 (Xu 2026); jumps: Δacc > 0.05 within 10 "
            f"steps (note 001); plateaus: loss (max-min)/mean < {plateau_range:g} over {plateau_window} steps")
    if not evs:
        has_acc = any("acc" in m for m in a.metrics)
        why = "no evaluation metrics recorded (rec.log(step, test_acc=...))" if not a.metrics else \
            ("no threshold crossing, jump or loss plateau found" if has_acc
             else "no accuracy metric recorded and no loss plateau found")
        return _section("events", "Events", conv, False, [f"No events: {why}."])
    lines = ["| kind | step | to | value | rule |", "|---|---|---|---|---|"]
    for e in sorted(evs, key=lambda e: e.step):
        lines.append(f"| {e.kind} | {e.step} | {e.end if e.end is not None else ''} | {_g(e.value)} | {e.rule} |")
    data = {"events": [{"kind": e.kind, "metric": e.metric, "step": e.step, "end": e.end, "value": _f(e.value),
                        "rule": e.rule} for e in sorted(evs, key=lambda e: e.step)]}
    return _section("events", "Events", conv, True, lines, data)


def _grok_step(a) -> int | None:
    for e in a.events:
        if e.kind == "grokking":
            return int(e.step)
    return None


def _onsets(a) -> dict[str, Any]:
    ev = _grok_step(a)
    rows, data = [], []
    for sig in SIGNALS:
        col, rule = signal_rule(sig)
        try:
            s, v, _ = series(a, col)
        except PhasewatchError:
            continue
        if not np.isfinite(v).any():
            continue
        ref = ev if ev is not None else (float(s[-1]) if len(s) else None)
        on = rule(s, v, ref, sig)
        tau = lead_time(ev, on.step if on else None)
        status = classify(tau) if ev is not None else ("fired" if on else "silent")
        rows.append(f"| {sig} | {rule.describe()} | {on.step if on else '–'} | {_g(tau, '{:g}')} | {status} |")
        data.append({"signal": sig, "column": col, "rule": rule.describe(), "onset_step": on.step if on else None,
                     "tau": _f(tau), "status": status})
    conv = ("named onset rules of phasewatch.analysis.events.SIGNALS; τ = t_event − t_onset (τ < 0: lag); "
            "event = the grokking step; without an event, rules that need one use the whole run. "
            "One run gives no significance: use `phasewatch study` over runs with and without the event")
    if not rows:
        return _missing("onsets", "Signal onsets", "No named signal (k*, gap ratio, g23, A, C, Φ, α) in this run.")
    head = [f"Event: grokking at step {ev}." if ev is not None else "No grokking event: onsets only (no τ).", "",
            "| signal | rule | onset step | τ | status |", "|---|---|---|---|---|"]
    return _section("onsets", "Signal onsets", conv, True, head + rows, {"event_step": ev, "onsets": data})


def _phases(a) -> dict[str, Any]:
    pr = a.probes
    if not pr or not len(pr.get("step", [])):
        return _missing("phases", "Phases timeline",
                        "No gradient-noise measurements recorded (Recorder(grad_samples_every=...)): no phases.")
    segs = segments(pr["step"], np.asarray(pr["phase"]).astype(str))
    lines = [f"- steps {s['from']}–{s['to']}: {s['label']} ({s['n']} measurement{'s' if s['n'] != 1 else ''})"
             for s in segs]
    conv = "p = C/(1+C) with its CI: exploration p < 0.5, transition CI contains 0.5, generalization p > 0.5"
    return _section("phases", "Phases timeline", conv, True, lines, {"segments": segs})


def _kstar(a, min_len: int) -> dict[str, Any]:
    t = a.table
    v = np.asarray(t.get("valid", []), dtype=bool)
    if not v.size or not v.any():
        return _missing("kstar", "k* regime", "No valid spectral windows: no k*.")
    k = np.asarray(t["kstar"])[v]
    st = np.asarray(t["step"])[v]
    vals, counts = np.unique(k[k > 0], return_counts=True)
    mode = int(vals[np.argmax(counts)]) if vals.size else None
    segs = segments(st, k)
    changes = len(segs) - 1
    long = [s for s in segs if s["n"] >= min_len]
    gr = np.asarray(t["gap_ratio"], float)[v]
    lines = [f"- k* is {mode} in {100 * counts.max() / k.size:.0f}% of {k.size} valid windows; it changes "
             f"{changes} times; median gap ratio {_g(float(np.nanmedian(gr)))}" if mode is not None else
             "- k* undefined in every window"]
    if long:
        lines.append(f"- stretches of at least {min_len} windows:")
        for s in long[:20]:
            sel = (st >= s["from"]) & (st <= s["to"])
            lines.append(f"  - steps {s['from']}–{s['to']}: k* = {s['label']} (median gap ratio "
                         f"{_g(float(np.nanmedian(gr[sel])))})")
        if len(long) > 20:
            lines.append(f"  - … {len(long) - 20} more")
    else:
        lines.append(f"- no stretch of constant k* lasts {min_len} windows (k* flickers)")
    null_data = _null_lines(a, v, st, lines)
    conv = f"W = {a.window}; " + a.conventions.get("kstar", "") + "; " + a.conventions.get("gap", "")
    if "null" in a.conventions:
        conv += "; null: " + a.conventions["null"]
    return _section("kstar", "k* regime", conv, True, lines,
                    {"mode": mode, "changes": changes, "segments": segs,
                     "gap_ratio_median": _f(float(np.nanmedian(gr))), **null_data})


def _null_lines(a, v: np.ndarray, st: np.ndarray, lines: list[str]) -> dict[str, Any]:
    """The momentum-null reading of k* and the gap (appended to ``lines``): the summary's sentence and
    where the gap ratio rises above the null's band."""
    t = a.table
    if "gap_excess" not in t:
        return {}
    from ..analysis.pipeline import null_reading

    d = a.summary_dict()
    if "gap_excess_median" not in d:
        return {}
    lines.append("- " + null_reading(d))
    above = np.asarray(t["above_null"], bool)[v]
    ex = np.asarray(t["gap_excess"], float)[v]
    segs = [s for s in segments(st, above.astype(np.int8)) if s["label"] == 1]
    if segs:
        lines.append("- above the null's band: " + "; ".join(
            f"steps {s['from']}–{s['to']} (excess ×{_g(float(np.nanmedian(ex[(st >= s['from']) & (st <= s['to'])])))})"
            for s in segs[:15]) + (f"; … {len(segs) - 15} more" if len(segs) > 15 else ""))
    return {"above_null_fraction": _f(d["above_null_fraction"]), "gap_excess_median": _f(d["gap_excess_median"]),
            "above_null_segments": [{"from": s["from"], "to": s["to"]} for s in segs]}


def _regimes(a) -> dict[str, Any]:
    t = a.table
    A = np.asarray(t.get("A", []), float)
    if not A.size or not np.isfinite(A).any():
        return _missing("A", "A regimes", "The adiabatic parameter A is undefined in every window "
                        "(the canonical A needs a band of length K >= W+1).")
    reg = np.asarray(t["regime"])
    st = np.asarray(t["step"])
    fr = {adia.REGIME_LABELS[c]: float(np.mean(reg == c)) for c in sorted(adia.REGIME_LABELS)}
    segs = segments(st, reg)
    for s in segs:
        s["label"] = adia.REGIME_LABELS.get(int(s["label"]), str(s["label"]))
    on_dk = "A_dk" in t and a.conventions.get("regime", "").startswith("on A_dk")
    lines = []
    data: dict[str, Any] = {"A_median": _f(float(np.nanmedian(A))), "fractions": fr, "segments": segs}
    if "A_dk" in t:
        adk = np.asarray(t["A_dk"], float)
        data["A_dk_median"] = _f(float(np.nanmedian(adk))) if np.isfinite(adk).any() else None
        lines.append(f"- median A_dk = {_g(data['A_dk_median'])} (dimensionless; Davis–Kahan bound on sin θ of the "
                     "top-k* subspace per step)")
    head = "regimes on A_dk: " if on_dk else "regimes on A: "
    lines.append(f"- median A = {_g(float(np.nanmedian(A)))} (the paper's A, units 1/η)")
    lines.append("- " + head + ", ".join(f"{k} {_pct(v)}" for k, v in fr.items() if v > 0))
    if on_dk and "regime_A" in t:
        ra = np.asarray(t["regime_A"])
        fa = {adia.REGIME_LABELS[c]: float(np.mean(ra == c)) for c in sorted(adia.REGIME_LABELS)}
        data["fractions_A"] = fa
        lines.append("- the paper's thresholds on A (0.1 / 10, units 1/η): " +
                     ", ".join(f"{k} {_pct(v)}" for k, v in fa.items() if v > 0))
    lines.append("- timeline: " + "; ".join(f"{s['from']}–{s['to']} {s['label']}" for s in segs[:30])
                 + (f"; … {len(segs) - 30} more" if len(segs) > 30 else ""))
    conv = a.conventions.get("A", "") + "; " + (a.conventions.get("A_dk", "") + "; " if "A_dk" in t else "") + \
        "regimes: " + a.conventions.get("regime", "")
    return _section("A", "A_dk and A regimes" if "A_dk" in t else "A regimes", conv, True, lines, data)


def _consolidation(a, max_rows: int) -> dict[str, Any]:
    pr = a.probes
    if not pr or not len(pr.get("step", [])):
        return _missing("C", "Consolidation ratio C and p",
                        "No gradient-noise measurements recorded (Recorder(grad_samples_every=...)): no C or p.")
    n = len(pr["step"])
    idx = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(int))
    lines = ["| step | C | C CI | p | p CI | band | phase | b | n |", "|---|---|---|---|---|---|---|---|---|"]
    for i in idx:
        lines.append(f"| {int(pr['step'][i])} | {_g(pr['C'][i])} | [{_g(pr['C_lo'][i])}, {_g(pr['C_hi'][i])}] | "
                     f"{_g(pr['p'][i], '{:.2f}')} | [{_g(pr['p_lo'][i], '{:.2f}')}, {_g(pr['p_hi'][i], '{:.2f}')}] | "
                     f"{pr['band'][i]} | {pr['phase'][i]} | {_g(pr['b'][i], '{:g}')} | {int(pr['n'][i])} |")
    if n > len(idx):
        lines.append(f"({len(idx)} of {n} measurements shown, evenly spaced; all in the JSON)")
    bands, counts = np.unique(np.asarray(pr["band"]).astype(str), return_counts=True)
    lines.append("- decision-guide bands: " + ", ".join(f"{b} {c}" for b, c in zip(bands, counts)))
    conv = (a.conventions.get("C", "") + "; p = C/(1+C), CI the image of C's CI; bands: p < 0.40 failing, "
            "0.40–0.50 sub-threshold, 0.50–0.60 critical, 0.60–0.75 learning, > 0.75 strong")
    data = {k: [_f(x) for x in np.asarray(pr[k], float)] for k in ("step", "C", "C_lo", "C_hi", "p", "p_lo", "p_hi",
                                                                      "C_per_example", "C_naive", "B_simple", "b")}
    data["band"] = [str(x) for x in pr["band"]]
    data["phase"] = [str(x) for x in pr["phase"]]
    data["n"] = [int(x) for x in pr["n"]]
    # covariance spectrum, Langevin ratio and coordinate tail index (analysis.gradcov), when defined
    extra = [k for k in ("cov_eff_rank", "cov_eff_rank_corrected", "cov_top", "cov_top_fraction", "C_langevin",
                         "C_langevin_lo", "C_langevin_hi", "alpha_coord", "alpha_coord_lo", "alpha_coord_hi")
             if k in pr and np.isfinite(np.asarray(pr[k], float)).any()]
    for k in extra:
        data[k] = [_f(x) for x in np.asarray(pr[k], float)]
    last = {k: float(np.asarray(pr[k], float)[-1]) for k in extra}
    if "cov_eff_rank" in last:
        lines.append(f"- noise covariance (last): effective rank {_g(last['cov_eff_rank'])} (plug-in, ≤ n−1; "
                     f"Gaussian-corrected {_g(last.get('cov_eff_rank_corrected', math.nan))})"
                     + (f"; top direction {_pct(last['cov_top_fraction'])} of the variance"
                        if "cov_top_fraction" in last else ""))
    if "C_langevin" in last:
        lines.append(f"- Langevin variant (last): C_L = {_g(last['C_langevin'])} "
                     f"[{_g(last.get('C_langevin_lo'))}, {_g(last.get('C_langevin_hi'))}] (units 1/η²; "
                     "not comparable to C)")
    if "alpha_coord" in last:
        lines.append(f"- coordinate tail index (last): α = {_g(last['alpha_coord'], '{:.2f}')} "
                     f"[{_g(last.get('alpha_coord_lo'), '{:.2f}')}, {_g(last.get('alpha_coord_hi'), '{:.2f}')}] "
                     "(pooled Hill of standardised noise coordinates; > 2: no evidence of a stable heavy tail)")
    if extra:
        conv += "; " + "; ".join(f"{k}: {a.conventions[k]}" for k in ("cov", "C_langevin", "alpha_coord")
                                 if k in a.conventions)
    return _section("C", "Consolidation ratio C and p", conv, True, lines, data)


def _flags(a) -> dict[str, Any]:
    pr = a.probes
    if not pr or not len(pr.get("step", [])):
        return _missing("flags", "Early-stopping flags", "No gradient-noise measurements recorded: no flags.")
    I = None  # noqa: E741 - the framework's name
    cv = a.curvature or {}
    if len(cv.get("step", [])) and "I" in cv and np.isfinite(np.asarray(cv["I"], float)).any():
        # I at the probe steps where a curvature probe was taken at the same step; NaN (never fires) elsewhere
        by_step = dict(zip(np.asarray(cv["step"]).tolist(), np.asarray(cv["I"], float).tolist()))
        I = np.array([by_step.get(int(st), np.nan) for st in pr["step"]])  # noqa: E741
    fl = nz.early_stopping_flags(pr["p"], pr["C"], pr["p_hi"], I)
    names = {"low_p": f"p < {fl.p_threshold:g} for >= {fl.p_run} consecutive measurements",
             "c_falling": f"C falling for >= {fl.c_run} consecutive measurements",
             "ci_below": f"CI of p entirely below {fl.ci_threshold:g}",
             "i_negative": "I < 0 (at probes with a curvature probe at the same step)" if I is not None
             else "I < 0: no I (no curvature probes)"}
    first = {k: (None if i is None else int(pr["step"][i])) for k, i in fl.first.items()}
    lines = [f"- {names[k]}: " + (f"first at step {first[k]}, fires in {int(getattr(fl, k).sum())} of "
                                   f"{len(pr['step'])} measurements" if first[k] is not None else "never")
             for k in names]
    conv = "DEFINITIONS §6 (notes 000/004): heuristics that flag, not decide"
    return _section("flags", "Early-stopping flags", conv, True, lines, {"first_step": first})


def _alpha(a) -> dict[str, Any]:
    ti = a.tail_index
    if not ti or not np.isfinite(np.asarray(ti.get("alpha", []), float)).any():
        return _missing("alpha", "Tail index α",
                        "No tail index: fewer than 100 recorded gradient norms.")
    al = np.asarray(ti["alpha"], float)
    ok = np.isfinite(al)
    med = float(np.median(al[ok]))
    j = int(np.nonzero(ok)[0][-1])
    lines = [f"- median α = {med:.2f} over {int(ok.sum())} windows; last α = {al[j]:.2f} "
             f"[{_g(ti['alpha_lo'][j], '{:.2f}')}, {_g(ti['alpha_hi'][j], '{:.2f}')}] at step {int(ti['step'][j])}"]
    frac2 = float(np.mean(al[ok] > 2))
    if frac2 > 0:
        lines.append(f"- α > 2 in {100 * frac2:.0f}% of windows: no evidence of a stable heavy tail there "
                     "(Hill gives 5–12 on Gaussian data); not a number to interpret")
    cl = np.asarray(ti.get("C_levy", []), float)
    if np.isfinite(cl).any():
        lines.append(f"- Lévy variant C_α (same windows): median {_g(float(np.nanmedian(cl)))}, last "
                     f"{_g(cl[np.isfinite(cl)][-1])} (the note's levy variant: 100 norms, Hill α clipped to "
                     "[1.1, 1.9]; units of ‖g‖², not comparable to C)")
    return _section("alpha", "Tail index α", a.conventions.get("alpha", ""), True, lines,
                    {"median": med, "last": _f(al[j]), "last_ci": [_f(ti["alpha_lo"][j]), _f(ti["alpha_hi"][j])],
                     "fraction_above_2": frac2})


def _margin(a) -> dict[str, Any]:
    cv = a.curvature or {}
    if not len(cv.get("step", [])) or "S" not in cv:
        return _missing("S", "Stability margin S", "No curvature probes recorded: no λ_max and no S.")
    S = np.asarray(cv["S"], float)
    ok = np.isfinite(S)
    if not ok.any():
        return _missing("S", "Stability margin S", "Curvature probes recorded, but S is undefined in all of them.")
    j = int(np.nonzero(ok)[0][-1])
    lam = np.asarray(cv.get("lambda_max", np.full(S.size, np.nan)), float)
    thr = np.asarray(cv.get("threshold", np.full(S.size, np.nan)), float)
    lines = [f"- last S = {_g(S[j])} at step {int(cv['step'][j])} (λ_max = {_g(lam[j])}, threshold = {_g(thr[j])})",
             f"- S < 0 (beyond the stability threshold) in {int((S[ok] < 0).sum())} of {int(ok.sum())} probes; "
             f"min S = {_g(float(S[ok].min()))}"]
    conv = a.conventions.get("S", "S = threshold − λ_max; threshold 2/η for SGD, the optimizer-appropriate "
                                  "threshold otherwise (DEFINITIONS §4)")
    return _section("S", "Stability margin S", conv, True, lines,
                    {"step": [int(x) for x in cv["step"]], "S": [_f(x) for x in S],
                     "lambda_max": [_f(x) for x in lam]})


def _forecast(a, level: float) -> dict[str, Any]:
    pr = a.probes
    title = "Logistic forecast of p(t)"
    if not pr or not len(pr.get("step", [])):
        return _missing("forecast", title, "No gradient-noise measurements recorded: no p(t) to forecast.")
    t = np.asarray(pr["step"], float)
    p = np.asarray(pr["p"], float)
    if np.isfinite(p).sum() < 3:
        return _missing("forecast", title, f"Only {int(np.isfinite(p).sum())} finite p values: the forecast needs 3.")
    fc = nz.logistic_forecast(t, p, level=level)
    lines = [f"- t0 = {_g(fc.t0, '{:.1f}')} steps, {100 * level:g}% interval [{_g(fc.t0_ci[0], '{:.1f}')}, "
             f"{_g(fc.t0_ci[1], '{:.1f}')}]; k = {_g(fc.k)} per step [{_g(fc.k_ci[0])}, {_g(fc.k_ci[1])}]; "
             f"{fc.n} points, residual s.d. {_g(fc.residual_std)}"]
    lines += [f"- flag: {f}" for f in fc.flags]
    conv = ("least-squares fit of p(t) = 1/(1 + exp(−k (t − t0))) (note 004); Wald interval with a Student-t "
            "quantile; consecutive p are autocorrelated, so the interval is too narrow")
    return _section("forecast", title, conv, True, lines,
                    {"t0": _f(fc.t0), "t0_ci": [_f(x) for x in fc.t0_ci], "k": _f(fc.k),
                     "k_ci": [_f(x) for x in fc.k_ci], "converged": fc.converged, "n": fc.n, "flags": list(fc.flags),
                     "level": level})


# --------------------------------------------------------------------------- assembly
def build_report(
    run: Any,
    *,
    window: int = 10,
    analysis: Any = None,
    level: float = 0.95,
    plateau_window: int = 50,
    plateau_range: float = 0.01,
    kstar_min_len: int = 10,
    max_rows: int = 12,
    layers: bool = False,
) -> dict[str, Any]:
    """The report of one run (path or :class:`~phasewatch.store.Run`) as a JSON-safe dict.

    ``level`` is the confidence level of every interval the report shows (C, p, C_batch, C_langevin,
    Hill's α, α_coord, the forecast): the analysis is made at that level.  ``analysis`` may be passed to
    reuse an :class:`~phasewatch.analysis.pipeline.Analysis` (its intervals are at the level it was made
    with); with ``layers=True`` (or an analysis that has per-layer tables) the "Per-layer readings" section."""
    from ..analysis.options import AnalysisOptions
    from ..analysis.pipeline import analyze
    from ..store import open_run

    r = open_run(run) if not hasattr(run, "meta") else run
    a = analysis if analysis is not None else analyze(
        r, options=AnalysisOptions(window=window, layers=layers, level=level))
    meta = r.meta
    steps = r.steps.get("step", np.zeros(0))
    opt = meta.get("optimizer", {})
    head = {
        "run": str(r.path),
        "model": meta.get("model", {}).get("class"),
        "n_params": int(r.n_params or 0),
        "optimizer": opt.get("class"),
        "hyper": {k: opt.get("hyper", {}).get(k) for k in ("lr", "weight_decay", "momentum", "betas")
                  if k in opt.get("hyper", {})},
        "user": meta.get("user", {}),
        "steps": [int(steps[0]), int(steps[-1])] if len(steps) else None,
        "window": a.window,
        "source": a.conventions.get("source", a.source),
        "warnings": list(a.warnings),
    }
    sections = [
        _events(a, plateau_window, plateau_range),
        _onsets(a),
        _phases(a),
        _kstar(a, kstar_min_len),
        _regimes(a),
        _consolidation(a, max_rows),
        _flags(a),
        _alpha(a),
        _margin(a),
        _forecast(a, level),
    ]
    if layers or getattr(a, "layers", None):
        sections.append(_layers(a))
    if (meta.get("recorder") or {}).get("controllers") or getattr(a, "interventions", None):
        sections.append(_interventions(a, meta, max_rows))  # only runs recorded with controllers
    return {"format": "phasewatch-report", "version": 1, "run": head, "conventions": dict(a.conventions),
            "sections": sections}


def _layers(a) -> dict[str, Any]:
    """Per layer group: the fraction of windows above the momentum null's band and the step its gap
    first stays above the band for 5 consecutive windows; the first group to lock in."""
    from ..analysis.layers import layer_lines, layer_summary

    if not getattr(a, "layers", None):
        return _missing("layers", "Per-layer readings", "No per-layer tables: analyse with layers=True (--layers).")
    summ = layer_summary(a.layers)
    conv = a.conventions.get("layers", "") + "; null: " + a.conventions.get("null", "").split(";")[0]
    return _section("layers", "Per-layer readings", conv, True, layer_lines(summ), summ)


def _interventions(a, meta: dict, max_rows: int) -> dict[str, Any]:
    """The controllers of the run (phasewatch.record.control) and every change they made."""
    ctl = (meta.get("recorder") or {}).get("controllers") or []
    iv = getattr(a, "interventions", None) or {}
    n = len(iv.get("step", []))
    desc = ", ".join(str(c.get("rule", c.get("class", "?"))) for c in ctl) or "not listed in the run's metadata"
    conv = ("the framework's prescriptions as opt-in controllers (phasewatch.record.control; DEFINITIONS §2, §6); "
            "a learning rate set after step t is the lr of step t + 1")
    lines = [f"- controllers: {desc}"]
    if not n:
        lines.append("- no intervention: the controllers never changed anything")
        return _section("interventions", "Interventions", conv, True, lines, {"controllers": ctl, "rows": []})
    rows = [{"step": int(s), "rule": str(r), "param": str(p), "old": _f(o), "new": _f(v), "note": str(t)}
            for s, r, p, o, v, t in zip(iv["step"], iv["rule"], iv["param"], iv["old"], iv["new"],
                                        iv.get("note", [""] * n))]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["rule"]] = counts.get(r["rule"], 0) + 1
    lines.append(f"- {n} changes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines += ["", "| after step | rule | parameter | old → new | why |", "|---:|---|---|---|---|"]
    shown = rows if n <= max_rows else rows[: max_rows // 2] + rows[-(max_rows - max_rows // 2):]
    for i, r in enumerate(shown):
        if n > max_rows and i == max_rows // 2:
            lines.append(f"| … | {n - max_rows} more | | | |")
        lines.append(f"| {r['step']} | {r['rule']} | {r['param']} | {_g(r['old'], '{:.4g}')} → "
                     f"{_g(r['new'], '{:.4g}')} | {r['note']} |")
    return _section("interventions", "Interventions", conv, True, lines, {"controllers": ctl, "rows": rows})


def report_markdown(rep: dict[str, Any]) -> str:
    """Render :func:`build_report`'s dict as markdown."""
    h = rep["run"]
    lines = [f"# phasewatch report: {h['run']}", ""]
    lines.append(f"- model {h['model']}, {h['n_params']:,} parameters; optimizer {h['optimizer']} "
                 + ", ".join(f"{k}={v}" for k, v in h["hyper"].items()))
    if h["steps"]:
        lines.append(f"- steps {h['steps'][0]}–{h['steps'][1]}; Gram window W = {h['window']}; spectra from {h['source']}")
    if h["user"]:
        lines.append("- attributes: " + ", ".join(f"{k}={v}" for k, v in h["user"].items()))
    for w in h["warnings"]:
        lines.append(f"- warning: {w}")
    for s in rep["sections"]:
        lines += ["", f"## {s['title']}", ""]
        if s["available"] and s["convention"]:
            lines += [f"*Convention: {s['convention']}.*", ""]
        lines += s["lines"]
    return "\n".join(lines) + "\n"


def write_report(rep: dict[str, Any], out: str | Path, formats=("md", "json")) -> list[Path]:
    """Write ``report.md`` and/or ``report.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in formats:
        if f == "md":
            p = out / "report.md"
            p.write_text(report_markdown(rep))
        elif f == "json":
            p = out / "report.json"
            p.write_text(json.dumps(rep, indent=1, default=_f))
        else:
            raise PhasewatchError(f"--format {f}: use md and/or json")
        written.append(p)
    return written
