"""The spectrum figures: the gap ratios σ_j/σ_{j+1} of the update window over training as a heat map
(:func:`spectrum`), and the Hill plot of α̂_k against k (:func:`hill_plot`).
"""

from __future__ import annotations

import numpy as np

from .common import (
    HEATMAP_COLUMNS,
    MIN_HILL_VALUES,
    MissingDataError,
    _decimate,
    _event_lines,
    _legend_above,
    _log_axis,
    _max_columns,
    _nb,
    _place_legends,
    _single,
    _step_axis,
)
from .style import PALETTE, paper_style


def spectrum(analysis, ax=None, width: str | float = "text", columns: int = HEATMAP_COLUMNS,
             show_kstar: bool | None = None):
    """Heat map of the gap ratios σ_j/σ_{j+1} (j = 1 … W−1) of the update window over training, on a
    log colour scale, with k*(t) (the argmax) drawn over it when it changes in at most 2 % of the
    windows (``show_kstar=None``; True/False force it).  Windows whose σ_{j+1} is below the
    numerical floor, and invalid windows, are grey.  Long runs: the largest ratio per time column
    (so a brief gap is not averaged away); the map is a raster image inside the vector figure."""
    from matplotlib.colors import LogNorm

    t = analysis.table
    sig = np.asarray(t.get("sigma", np.empty((0, 0))), dtype=float)
    if sig.ndim != 2 or sig.shape[0] == 0 or sig.shape[1] < 2:
        raise MissingDataError("spectrum: the analysis has no window spectra; record at least W steps")
    steps = np.asarray(t["step"])
    floor = 1e-10 * sig[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sig[:, 1:] > floor, sig[:, :-1] / sig[:, 1:], np.nan)
    ratio[~np.asarray(t["valid"], dtype=bool)] = np.nan
    edges, cols = _max_columns(steps, ratio, columns)
    fin = cols[np.isfinite(cols) & (cols > 0)]
    if not fin.size:
        raise MissingDataError("spectrum: no valid window has a finite gap ratio (all updates zero or non-finite)")
    vmin = max(1.0, float(np.min(fin)))
    vmax = float(np.percentile(fin, 99.5))
    vmax = max(vmax, vmin * 1.5)
    with paper_style():
        import matplotlib as mpl

        fig, ax = _single(ax, width, aspect=0.42)
        nb = _nb(fig)
        cmap = mpl.colormaps["viridis"].with_extremes(bad="0.85")
        J = sig.shape[1] - 1
        yedges = np.arange(J + 1) + 0.5
        pcm = ax.pcolormesh(edges, yedges, np.ma.masked_invalid(cols.T), cmap=cmap,
                            norm=LogNorm(vmin=vmin, vmax=vmax), shading="flat", rasterized=True)
        k = np.where(np.asarray(t["valid"], bool) & (t["kstar"] > 0), t["kstar"], np.nan).astype(float)
        fk = k[np.isfinite(k)]
        if show_kstar is None:  # a k* that flips every few windows would hide the map: leave it out
            show_kstar = fk.size > 1 and np.count_nonzero(np.diff(fk)) <= max(2, 0.02 * fk.size)
        if show_kstar:
            x, y = _decimate(steps, k, nb)
            ax.plot(x, y, color="white", lw=1.6, zorder=3, solid_capstyle="butt")
            ax.plot(x, y, color=PALETTE[3], lw=0.8, zorder=4, label=r"$k^*$ (argmax)")
        ax.set_ylim(0.5, J + 0.5)
        ax.invert_yaxis()
        from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(J, 10)))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_ylabel(r"mode $j$")
        _step_axis(ax)
        cb = fig.colorbar(pcm, ax=ax, pad=0.01, aspect=25)
        cb.set_label(r"$\sigma_j/\sigma_{j+1}$")
        cb.outline.set_linewidth(0.5)
        cb.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        cb.ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"gap ratios of the update window (W = {analysis.window})", loc="left")
        _legend_above(ax, handlelength=2.0)
        _event_lines(ax, analysis)
        _place_legends(fig)
    return fig


def hill_plot(analysis, ax=None, width: str | float = "text", *, x=None, rule: str = "fraction",
              fraction: float = 0.1, description: str | None = None, level: float = 0.95, seed: int = 0):
    """Hill plot: α̂_k = k / Σ_{i≤k} ln(|x|_(i)/|x|_(k+1)) against k (log axis) with its exact χ²
    interval (2αS ~ χ²_{2k} under a Pareto tail; Hill 1975), the k chosen by ``rule`` (``fraction``
    — the notes' 10 % —, ``sqrt``, ``double_bootstrap``, ``ks``; see
    :func:`phasewatch.analysis.tails.hill`) with its estimate and CI, the stability window [k/2, 2k]
    shaded, and the α = 2 line.  ``x`` defaults to the run's per-step gradient norms."""
    from scipy import stats

    from ..analysis import tails

    if x is None:  # the norm before clipping where the run recorded it (DEFINITIONS §3)
        un = analysis.scalars.get("grad_norm_unclipped")
        if un is not None and np.isfinite(un).all() and len(un):
            x, description = un, description or "gradient norms before clipping"
        else:
            x = analysis.scalars.get("grad_norm")
        description = description or "gradient norms per step"
        if x is None:
            raise MissingDataError("hill: the run has no gradient norms (steps/grad_norm); record with the "
                                   "Recorder or pass x=")
    description = description or "the given sample"
    v = np.abs(np.asarray(x, dtype=float).ravel())
    v = v[np.isfinite(v) & (v > 0)]
    if v.size < MIN_HILL_VALUES:
        raise MissingDataError(f"hill: {v.size} finite non-zero values, fewer than {MIN_HILL_VALUES}; "
                               "record longer")
    res = tails.hill(v, rule=rule, fraction=fraction, level=level, seed=seed, input_description=description)
    ks = np.unique(np.geomspace(1, v.size - 1, 400).astype(np.int64))
    ks = np.unique(np.r_[ks, res.k])
    curve = tails.hill_curve(v, ks)
    S = np.where(np.isfinite(curve.alpha) & (curve.alpha > 0), curve.k / curve.alpha, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = stats.chi2.ppf((1 - level) / 2, 2 * curve.k) / (2 * S)
        hi = stats.chi2.ppf((1 + level) / 2, 2 * curve.k) / (2 * S)
    with paper_style():
        fig, ax = _single(ax, width, aspect=0.45)
        ax.axvspan(max(2, res.k // 2), min(2 * res.k, v.size - 1), color="0.9", lw=0, zorder=0,
                   label=r"$[k/2,\,2k]$")
        ax.fill_between(curve.k, lo, hi, color=PALETTE[0], alpha=0.25, lw=0, label=f"{level:.0%} CI")
        ax.plot(curve.k, curve.alpha, color=PALETTE[0], label=r"$\hat\alpha_k$")
        ax.axhline(2.0, color="0.3", lw=0.7, ls="--", label=r"$\alpha = 2$")
        lab = rf"chosen $k = {res.k}$"
        ax.errorbar([res.k], [res.estimate], yerr=[[res.estimate - res.ci[0]], [res.ci[1] - res.estimate]],
                    color=PALETTE[3], marker="o", ms=3.5, capsize=2, lw=0.9, zorder=5, label=lab)
        _log_axis(ax.xaxis)
        ax.set_xlim(1, v.size)
        good = curve.k >= min(10, res.k)
        ref = np.r_[curve.alpha[good], res.ci[1], 2.0]
        ref = ref[np.isfinite(ref)]
        top = float(np.percentile(ref, 98)) if ref.size else 4.0
        ax.set_ylim(0, max(3.0, 1.15 * max(top, res.ci[1] if np.isfinite(res.ci[1]) else 0)))
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(r"$k$ (largest values used)")
        ax.set_ylabel(r"$\hat\alpha_k$")
        est = (rf"$\hat\alpha = {res.estimate:.2f}$ [{res.ci[0]:.2f}, {res.ci[1]:.2f}] at $k = {res.k}$ "
               f"({res.rule.replace('_', ' ')})")
        note = "\n" + r"$\hat\alpha > 2$: no evidence of a stable heavy tail" if res.estimate > 2 else ""
        if res.degenerate:  # an atom in the tail (e.g. clipped norms): no estimate, say why
            est, note = f"no estimate at k = {res.k}", "\n" + res.reason
        ax.set_title(f"Hill plot, {description} (n = {res.n})\n{est}{note}", loc="left")
        _legend_above(ax)
        _place_legends(fig)
    return fig
