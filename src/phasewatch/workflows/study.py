"""Precursor studies over many runs: does a signal move before the event, and stay quiet without it?

(DEFINITIONS §6, "Precursor statistics".)

    study = run_study(["runs/wd-0", "runs/wd-1", "runs/no-wd-0"], event="test_acc>=0.95", signal="g23")
    print(study.to_markdown()); study.write("out/")

For each run: the event is the first evaluation at which the event rule holds (a run where it never
holds is a *control*); the signal is a column of the run's analysis and its onset a named rule
(:func:`phasewatch.analysis.events.signal_rule`).  On a run with the event, rules that refer to the
event (``decline``, ``peak``) use the event step; on a control they use its last step, i.e. the
whole run, and "fired" means the rule fired anywhere in the run (a conservative false-alarm count:
controls are judged over a longer stretch than event runs).  The statistics are those of
:mod:`phasewatch.analysis.leadtime`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import leadtime as lt
from ..analysis.events import ONSET_RULES, first_rule, parse_rule, series, signal_rule
from ..errors import PhasewatchError
from .batch import AnalysisFailure, analyze_many, raise_failures

__all__ = ["StudyRow", "Study", "run_study", "load_analyses"]


@dataclass
class StudyRow:
    """One run of a study.  ``steps``/``values`` hold the signal (for figures; not exported)."""

    run: str
    control: bool
    event_step: int | None
    onset_step: int | None
    onset_value: float | None
    tau: float | None
    status: str
    fired: bool
    p_shift: float | None
    ref_step: float | None
    steps: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))
    values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        def f(x):
            return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x

        return {"run": self.run, "control": self.control, "event_step": self.event_step,
                "onset_step": self.onset_step, "onset_value": f(self.onset_value), "tau": f(self.tau),
                "status": self.status, "fired": self.fired, "p_shift": f(self.p_shift),
                "ref_step": f(self.ref_step)}


@dataclass
class Study:
    """The result of :func:`run_study`: one :class:`StudyRow` per run and the summary."""

    event: str
    signal: str
    column: str
    onset: str
    onset_help: str
    alternative: str
    rows: list[StudyRow]
    summary: lt.LeadTimeSummary
    permutation: lt.PermutationTest | None
    window: int | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run, one-line error), left out

    @property
    def event_rows(self) -> list[StudyRow]:
        return [r for r in self.rows if not r.control]

    @property
    def control_rows(self) -> list[StudyRow]:
        return [r for r in self.rows if r.control]

    def verdict(self) -> str:
        """One plain sentence of what the numbers say, whichever way they fall."""
        s = self.summary
        if not s.n_event_runs:
            return "No run reached the event, so no lead time can be measured."
        head = (f"The onset came before the event (τ ≥ {s.min_lead:g}) in {s.hits} of {s.n_event_runs} runs "
                f"with the event")
        if s.lags:
            head += f", after it (a lag) in {s.lags}"
        if s.n_event_runs - s.n_onset:
            head += f", never in {s.n_event_runs - s.n_onset}"
        head += "; "
        if s.n_control_runs:
            head += f"it fired in {s.false_alarms} of {s.n_control_runs} control runs. "
            if not s.hits:
                head += "It gave no warning before the event on these runs."
            elif s.false_alarms and s.false_alarm_rate >= s.hit_rate:
                head += "It fires as often without the event as with it: on these runs it does not separate " \
                        "runs that transition from runs that do not."
            elif not s.false_alarms:
                head += "It separates event runs from controls on these runs"
                head += "." if s.hits == s.n_event_runs else ", with misses."
            else:
                head += "It separates them only partly (it fires less often on controls than before events)."
        else:
            head += "there were no control runs, so the false-alarm rate is unknown."
        ps = [r.p_shift for r in self.event_rows if r.p_shift is not None]
        if ps:
            sig = sum(p <= 0.05 for p in ps)
            head += f" The circular-shift test gives p ≤ 0.05 in {sig} of {len(ps)} event runs"
            if self.permutation is not None and math.isfinite(self.permutation.p):
                head += f"; the permutation across runs gives p = {self.permutation.p:.3g}"
            head += "."
        return head

    def to_dict(self) -> dict[str, Any]:
        perm = None
        if self.permutation is not None:
            pm = self.permutation
            perm = {"statistic": None if not math.isfinite(pm.statistic) else pm.statistic,
                    "p": None if not math.isfinite(pm.p) else pm.p, "n_perm": pm.n_perm,
                    "exhaustive": pm.exhaustive, "alternative": pm.alternative}
        return {
            "event": self.event, "signal": self.signal, "column": self.column, "onset": self.onset,
            "onset_help": self.onset_help, "alternative": self.alternative, "window": self.window,
            "seed": self.seed,
            "conventions": {
                "tau": "t_event - t_onset in steps; tau < 0 is a lag",
                "event": "first evaluation at which the event rule holds; runs without it are controls",
                "control": "reference step = last step of the run; fired = the onset rule fired anywhere",
                "p_shift": f"circular shifts of the signal against fixed steps, alternative={self.alternative}",
                "permutation": "signals paired with other runs' events; statistic = median one-sided distance",
                "rates": "Clopper-Pearson intervals; median tau: percentile bootstrap over runs",
            },
            "rows": [r.to_dict() for r in self.rows],
            "summary": self.summary.to_dict(),
            "permutation": perm,
            "verdict": self.verdict(),
            "notes": self.notes,
        }

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def to_markdown(self) -> str:
        s = self.summary
        lvl = f"{100 * s.level:g}%"

        def num(x, fmt="{:g}"):
            return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)

        lines = [
            f"# Precursor study: {self.signal} before `{self.event}`", "",
            f"- event: first evaluation with `{self.event}`; runs where it never holds are controls",
            f"- signal: column `{self.column}`, onset rule `{self.onset}` ({self.onset_help})",
            "- lead time τ = t_event − t_onset in steps; τ < 0 is a lag and is reported as one",
            f"- p (shift): circular-shift null of the signal, alternative `{self.alternative}`",
            "",
            "| run | control | event step | onset step | τ | status | p (shift) | fired on control |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.run} | {'yes' if r.control else 'no'} | {num(r.event_step)} | {num(r.onset_step)} | "
                f"{num(r.tau)} | {r.status} | {num(r.p_shift, '{:.3g}')} | "
                f"{('yes' if r.fired else 'no') if r.control else '–'} |")
        m = s.median_tau
        lines += [
            "", "## Summary", "",
            f"- runs with the event: {s.n_event_runs}; hit rate (τ ≥ {s.min_lead:g}): {s.hits}/{s.n_event_runs}"
            f" = {num(s.hit_rate, '{:.2f}')} [{num(s.hit_ci[0], '{:.2f}')}, {num(s.hit_ci[1], '{:.2f}')}]"
            f" ({lvl} Clopper–Pearson)",
            f"- lags (τ < 0): {s.lags}; coincident (0 ≤ τ < {s.min_lead:g}): {s.coincident}; "
            f"no onset: {s.n_event_runs - s.n_onset}",
            f"- control runs: {s.n_control_runs}; false-alarm rate: {s.false_alarms}/{s.n_control_runs}"
            f" = {num(s.false_alarm_rate, '{:.2f}')} [{num(s.false_alarm_ci[0], '{:.2f}')}, "
            f"{num(s.false_alarm_ci[1], '{:.2f}')}]",
            f"- median τ: {num(m.median)} steps [{num(m.lo)}, {num(m.hi)}] ({lvl} percentile bootstrap over "
            f"{m.n} run{'' if m.n == 1 else 's'} with an onset)",
        ]
        if self.permutation is not None:
            pm = self.permutation
            extra = f"; smallest possible p = {1 / pm.n_perm:.3g}" if pm.exhaustive and pm.n_perm else ""
            lines.append(f"- permutation across runs: p = {num(pm.p, '{:.3g}')} ({pm.n_perm} pairings"
                         f"{', all' if pm.exhaustive else ', random'}{extra})")
        lines += ["", "**What this shows.** " + self.verdict()]
        for n in self.notes:
            lines.append(f"- note: {n}")
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path, formats: Sequence[str] = ("md", "json"), figure: bool = True,
              figure_formats: Sequence[str] = ("pdf", "png")) -> list[Path]:
        """Write ``study.md``, ``study.json`` and (with matplotlib) ``study.pdf``/``.png`` into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in formats:
            if f == "md":
                p = out / "study.md"
                p.write_text(self.to_markdown())
                written.append(p)
            elif f == "json":
                written.append(self.to_json(out / "study.json"))
            else:
                raise PhasewatchError(f"--format {f}: use md and/or json")
        if figure:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            from ..plot.multirun import lead_time_study
            from ..plot.style import save

            fig = lead_time_study(self)
            for f in figure_formats:
                p = out / f"study.{f}"
                save(fig, p, f)
                written.append(p)
            plt.close(fig)
        return written


def _label(run: Any, i: int, used: set[str]) -> str:
    if isinstance(run, (str, Path)):
        p = Path(run)
        name = p.stem if p.suffix == ".h5" else p.name
    else:
        name = str(getattr(run, "label", "") or f"run{i + 1}")
    base, k = name, 2
    while name in used:
        name = f"{base}#{k}"
        k += 1
    used.add(name)
    return name


def load_analyses(runs: Sequence[Any], window: int = 10, workers: int | None = 1,
                  skip_failed: bool = False) -> list[Any]:
    """Analyse each run given as a path (in ``workers`` processes: :func:`phasewatch.analyze_many`);
    Analysis objects pass through.  A run that fails raises one :class:`PhasewatchError` naming
    every failure once all are analysed, or, with ``skip_failed``, stays in the list as its
    :class:`~phasewatch.workflows.batch.AnalysisFailure`."""
    at = [i for i, r in enumerate(runs) if isinstance(r, (str, Path))]
    done = analyze_many([runs[i] for i in at], workers=workers, window=window)
    out = list(runs)
    for i, a in zip(at, done):
        out[i] = a
    if not skip_failed:
        raise_failures(out)
    return out


def run_study(
    runs: Sequence[Any],
    *,
    event: str = "test_acc>=0.95",
    signal: str = "g23",
    onset: str | None = None,
    params: dict[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    window: int = 10,
    alternative: str = "lead",
    min_lead: float = 1,
    event_sustain: int = 1,
    n_shifts: int | None = None,
    n_perm: int = 9999,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    workers: int | None = 1,
    skip_failed: bool = False,
) -> Study:
    """A precursor study over ``runs`` (paths of runs, or :class:`~phasewatch.analysis.pipeline.Analysis`).

    event: rule string whose first holding evaluation is the event (``"test_acc>=0.95"``), held for
        ``event_sustain`` consecutive evaluations.
    signal, onset, params: the signal column and its onset rule (see
        :func:`~phasewatch.analysis.events.signal_rule`; ``g23`` alone means the paper's rule, a
        decline by more than 1.5× from the pre-event peak).
    alternative: what the per-run and across-run tests look for (``lead``, ``lag``, ``either``).
    min_lead: smallest τ counted as a hit (1 step).
    workers: processes analysing the runs (:func:`phasewatch.analyze_many`; 1: one after another).
    skip_failed: a run that cannot be analysed is left out (listed in ``failed`` and the notes)
        instead of raising; the study needs at least one run.
    """
    rule = parse_rule(event)
    column, orule = signal_rule(signal, onset, params)
    used: set[str] = set()
    names = list(labels) if labels is not None else [_label(r, i, used) for i, r in enumerate(runs)]
    if len(names) != len(runs):
        raise PhasewatchError(f"{len(names)} labels for {len(runs)} runs; give one label per run")
    analyses = load_analyses(runs, window, workers=workers, skip_failed=skip_failed)
    rng = np.random.default_rng(seed)
    rows: list[StudyRow] = []
    notes: list[str] = []
    failed = [(name, str(a)) for name, a in zip(names, analyses) if isinstance(a, AnalysisFailure)]
    if failed and len(failed) == len(names):
        raise PhasewatchError(f"no run could be analysed: {failed[0][1]}")
    for name, why in failed:
        notes.append(f"{name}: not analysed, left out ({why})")
    kept = [(n, a) for n, a in zip(names, analyses) if not isinstance(a, AnalysisFailure)]
    names, analyses = [n for n, _ in kept], [a for _, a in kept]
    for name, a in zip(names, analyses):
        es, ev = series(a, rule.column)[:2]
        e = first_rule(es, ev, rule, sustain=event_sustain, kind="event")
        s, v, _ = series(a, column)
        if not np.isfinite(v).any():
            notes.append(f"{name}: the signal {column} has no finite value")
        if e is not None:
            on = orule(s, v, e.step, signal)
            tau = lt.lead_time(e.step, on.step if on else None)
            test = lt.shift_test(s, v, orule, e.step, alternative=alternative, n_shifts=n_shifts, seed=rng)
            rows.append(StudyRow(name, False, e.step, on.step if on else None, on.value if on else None, tau,
                                 lt.classify(tau, min_lead), on is not None, test.p, float(e.step), s, v))
        else:
            ref = float(s[-1]) if len(s) else None
            on = orule(s, v, ref, signal) if len(s) else None
            rows.append(StudyRow(name, True, None, on.step if on else None, on.value if on else None, None,
                                 "fired" if on else "silent", on is not None, None, ref, s, v))
    ev_rows = [r for r in rows if not r.control]
    perm = None
    if len(ev_rows) >= 2:
        onsets = lt.onset_matrix([(r.steps, r.values) for r in ev_rows], orule, [r.event_step for r in ev_rows])
        perm = lt.permutation_test(onsets, [r.event_step for r in ev_rows], alternative=alternative, n_perm=n_perm,
                                   seed=rng)
    summary = lt.summarize([r.tau for r in ev_rows], [r.fired for r in rows if r.control], min_lead=min_lead,
                           level=level, n_boot=n_boot, seed=rng)
    return Study(event=str(rule), signal=signal, column=column, onset=orule.describe(),
                 onset_help=ONSET_RULES[orule.name][2], alternative=alternative, rows=rows, summary=summary,
                 permutation=perm, window=window, seed=seed, notes=notes, failed=failed)
