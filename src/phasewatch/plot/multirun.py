"""Figures over many runs: a precursor study, a mean ± band over seeds, a sweep.

Each function takes results (a :class:`~phasewatch.workflows.study.Study`, analyses, or plain arrays), never
raw files, and returns a Figure drawn in the paper style of :mod:`phasewatch.plot.style`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from .style import LINESTYLES, PALETTE, WIDTHS, paper_style

__all__ = ["lead_time_study", "mean_band", "sweep", "band_stats"]

# the palette without its yellow, which is hard to see as a thin line on white
_COLOURS = [c for c in PALETTE if c.upper() != "#F0E442"]


def _width(width: Any) -> float:
    if isinstance(width, (int, float)):
        return float(width)
    return WIDTHS.get(width, 5.5)


def _positive_decades(vals: list[np.ndarray]) -> bool:
    allv = np.concatenate([np.asarray(v, float) for v in vals]) if vals else np.zeros(0)
    allv = allv[np.isfinite(allv)]
    return bool(allv.size) and bool(np.all(allv > 0)) and allv.max() / allv.min() > 20


def lead_time_study(study, width: Any = "text"):
    """(a) the signal of every run against t − t_event (controls, dashed grey, against t − the median
    event step), onsets marked; (b) τ per run with the median and its interval; lags left of 0."""
    import matplotlib.pyplot as plt

    ev = study.event_rows
    ct = study.control_rows
    ev_steps = [r.event_step for r in ev]
    ref = float(np.median(ev_steps)) if ev_steps else 0.0
    with paper_style():
        w = _width(width)
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(w, w * 0.42), layout="constrained",
                                     gridspec_kw={"width_ratios": [1.6, 1.0]})
        for i, r in enumerate(ev):
            x = r.steps - r.event_step
            c = _COLOURS[i % len(_COLOURS)]
            ax.plot(x, r.values, color=c, ls=LINESTYLES[i % 4], lw=0.9, label=r.run)
            if r.onset_step is not None:
                ax.plot([r.onset_step - r.event_step], [r.onset_value], marker="v", ms=5,
                        color=c, mec="k", mew=0.4, ls="none")
        for j, r in enumerate(ct):
            x = r.steps - ref
            ax.plot(x, r.values, color="0.55", ls="--", lw=0.7, label="control" if j == 0 else None)
            if r.onset_step is not None:
                ax.plot([r.onset_step - ref], [r.onset_value], marker="v", ms=4, mfc="white", mec="0.4",
                        ls="none")
        ax.axvline(0, color="0.2", lw=0.7, ls=":")
        if _positive_decades([r.values for r in study.rows]):
            ax.set_yscale("log")
        ax.set_xlabel("step − event step (controls: − median event step)")
        ax.set_ylabel(study.column)
        ax.set_title(f"(a) {study.signal}: onset rule {study.onset}", loc="left")
        if len(study.rows) <= 8:
            ax.legend(loc="best", ncols=2)

        # (b) lead times
        taus = [(i, r) for i, r in enumerate(ev) if r.tau is not None]
        for i, r in taus:
            lag = r.tau < 0
            bx.plot([r.tau], [i], marker="s" if lag else "o", ms=5, ls="none",
                    color=PALETTE[3] if lag else PALETTE[0], mec="k", mew=0.4)
        missing = [i for i, r in enumerate(ev) if r.tau is None]
        for i in missing:
            bx.text(0, i, " no onset", va="center", ha="left", fontsize=6, color="0.3")
        m = study.summary.median_tau
        if math.isfinite(m.median):
            bx.axvspan(m.lo, m.hi, color=PALETTE[5], alpha=0.25, lw=0)
            bx.axvline(m.median, color=PALETTE[0], lw=1.0)
        bx.axvline(0, color="0.2", lw=0.7, ls=":")
        bx.set_yticks(range(len(ev)), [r.run for r in ev])
        bx.set_ylim(-0.7, max(len(ev), 1) - 0.3)
        xs = [0.0] + [r.tau for _, r in taus] + ([m.lo, m.hi] if math.isfinite(m.median) else [])
        span = max(max(xs) - min(xs), 1.0)
        bx.set_xlim(min(xs) - 0.12 * span, max(xs) + 0.12 * span)
        bx.set_xlabel("τ = t_event − t_onset (steps)")
        s = study.summary
        fa = f"{s.false_alarms}/{s.n_control_runs}" if s.n_control_runs else "n/a"
        bx.set_title(f"(b) hits {s.hits}/{s.n_event_runs}, false alarms {fa}", loc="left")
    return fig


def band_stats(series_list: Sequence[tuple[np.ndarray, np.ndarray]], band: str = "sd",
               grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and band of several runs' series on a common grid: ``(grid, mean, lo, hi)``.

    Each series is linearly interpolated onto ``grid`` (default: the steps of the first series within
    the range all series cover).  ``band``: ``sd`` (mean ± standard deviation over runs, ddof 1),
    ``sem`` (± standard error), ``minmax`` (range over runs).  NaN values are ignored per point."""
    if not series_list:
        raise InvalidArgumentError("band_stats needs at least one series")
    ss = [(np.asarray(s, float), np.asarray(v, float)) for s, v in series_list]
    if grid is None:
        lo = max(s[0] for s, _ in ss if s.size)
        hi = min(s[-1] for s, _ in ss if s.size)
        grid = ss[0][0][(ss[0][0] >= lo) & (ss[0][0] <= hi)]
    grid = np.asarray(grid, float)
    Y = np.full((len(ss), grid.size), np.nan)
    for i, (s, v) in enumerate(ss):
        ok = np.isfinite(v)
        if ok.sum() >= 2:
            Y[i] = np.interp(grid, s[ok], v[ok], left=np.nan, right=np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.sum(np.isfinite(Y), axis=0)
        mean = _nanmean(Y)
        if band == "minmax":
            lo_, hi_ = _nanreduce(Y, np.nanmin), _nanreduce(Y, np.nanmax)
        elif band in ("sd", "sem"):
            sd = _nanstd(Y)
            if band == "sem":
                sd = sd / np.sqrt(np.maximum(n, 1))
            lo_, hi_ = mean - sd, mean + sd
        else:
            raise InvalidArgumentError(f"band={band!r}: use sd, sem or minmax")
    return grid, mean, lo_, hi_


def _nanreduce(Y: np.ndarray, fn) -> np.ndarray:
    out = np.full(Y.shape[1], np.nan)
    ok = np.isfinite(Y).any(axis=0)
    if ok.any():
        out[ok] = fn(Y[:, ok], axis=0)
    return out


def _nanmean(Y: np.ndarray) -> np.ndarray:
    return _nanreduce(Y, np.nanmean)


def _nanstd(Y: np.ndarray) -> np.ndarray:
    out = np.full(Y.shape[1], np.nan)
    ok = np.sum(np.isfinite(Y), axis=0) >= 2
    if ok.any():
        out[ok] = np.nanstd(Y[:, ok], axis=0, ddof=1)
    ok1 = np.sum(np.isfinite(Y), axis=0) == 1
    out[ok1] = 0.0
    return out


def _get_series(x, column: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, tuple) and len(x) == 2:
        return np.asarray(x[0]), np.asarray(x[1], float)
    from ..analysis.events import series

    s, v, _ = series(x, column)
    return s, v


def mean_band(
    groups: Mapping[str, Sequence[Any]] | Sequence[Any],
    column: str,
    *,
    band: str = "sd",
    width: Any = "column",
    logy: bool | None = None,
    ax=None,
    ylabel: str | None = None,
):
    """Mean ± band over seeds of any column, one line per group.

    groups: ``{label: [Analysis or (steps, values), ...]}`` (or one list); column: a name readable by
    :func:`~phasewatch.analysis.events.series` (``test_acc``, ``g23``, ``loss``, ...); band: ``sd``,
    ``sem`` or ``minmax`` (see :func:`band_stats`).  Returns the Figure (or draws into ``ax``)."""
    import matplotlib.pyplot as plt

    if not isinstance(groups, Mapping):
        groups = {"runs": list(groups)}
    with paper_style():
        if ax is None:
            w = _width(width)
            fig, ax = plt.subplots(figsize=(w, w * 0.62), layout="constrained")
        else:
            fig = ax.figure
        allv = []
        for i, (label, runs) in enumerate(groups.items()):
            ss = [_get_series(r, column) for r in runs]
            grid, mean, lo, hi = band_stats(ss, band)
            allv.append(mean)
            c = _COLOURS[i % len(_COLOURS)]
            ax.fill_between(grid, lo, hi, color=c, alpha=0.22, lw=0)
            ax.plot(grid, mean, color=c, ls=LINESTYLES[i % 8], label=f"{label} (n={len(ss)})")
        if logy or (logy is None and _positive_decades(allv)):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel or column)
        names = {"sd": "± 1 s.d.", "sem": "± 1 s.e.m.", "minmax": "min–max"}
        ax.set_title(f"mean over runs, band {names.get(band, band)}", loc="left")
        ax.legend(loc="best")
    return fig


def sweep(
    x: Sequence[Any],
    columns: Mapping[str, Sequence[float]],
    *,
    xlabel: str = "",
    logx: bool | None = None,
    width: Any = "text",
    labels: Mapping[str, str] | None = None,
):
    """A final metric or diagnostic against an attribute: one panel per column, a dot per run and a
    line through the mean at each attribute value.  Non-numeric attributes are placed in order of
    first appearance; ``logx`` defaults to a log axis when the values are positive and span ≥ 20×."""
    import matplotlib.pyplot as plt

    xs = list(x)
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and v is not None
                  and not isinstance(v, bool) for v in xs)
    if numeric:
        xv = np.asarray(xs, dtype=float)
        ticks = None
    else:
        cats = list(dict.fromkeys(str(v) for v in xs))
        xv = np.asarray([cats.index(str(v)) for v in xs], dtype=float)
        ticks = cats
    names = list(columns)
    n = max(1, len(names))
    ncol = 2 if n == 4 else min(n, 3)
    nrow = math.ceil(n / ncol)
    with paper_style():
        w = _width(width)
        fig, axes = plt.subplots(nrow, ncol, figsize=(w, w * 0.36 * nrow + 0.3), layout="constrained",
                                 squeeze=False)
        for k, name in enumerate(names):
            ax = axes[k // ncol][k % ncol]
            y = np.asarray(columns[name], dtype=float)
            c = _COLOURS[k % len(_COLOURS)]
            ax.plot(xv, y, ls="none", marker="o", ms=3.5, color=c, alpha=0.8)
            ux = np.unique(xv[np.isfinite(xv)])
            my = [np.nanmean(y[(xv == u) & np.isfinite(y)]) if np.any((xv == u) & np.isfinite(y)) else np.nan
                  for u in ux]
            ax.plot(ux, my, color=c, ls=LINESTYLES[0], lw=0.9)
            if numeric and (logx or (logx is None and ux.size and ux.min() > 0 and ux.max() / ux.min() >= 20)):
                ax.set_xscale("log")
            if ticks is not None:
                ax.set_xticks(range(len(ticks)), ticks)
            if ux.size and ax.get_xscale() == "linear":
                pad = 0.06 * max(float(np.ptp(xv[np.isfinite(xv)])), 1e-12 if numeric else 1.0)
                ax.set_xlim(np.nanmin(xv) - pad, np.nanmax(xv) + pad)
            ax.set_xlabel(xlabel)
            ax.set_ylabel((labels or {}).get(name, name))
        for k in range(n, nrow * ncol):
            axes[k // ncol][k % ncol].set_visible(False)
    return fig
