"""Figures for one run, one function each, taking an :class:`~phasewatch.analysis.pipeline.Analysis`
(never raw files).

Every function returns a matplotlib Figure drawn in the paper style (:mod:`.style`) at a preset or
numeric ``width``.  Single-panel figures also take ``ax=``: they then draw into that Axes (in the
caller's figure, e.g. one panel of a larger layout) and return its figure.  A figure whose data the
run does not hold raises :class:`MissingDataError` (a :class:`~phasewatch.errors.PhasewatchError`)
with one line saying what to record.

Long series are reduced before drawing: lines to a min/max envelope per horizontal bucket (100
buckets per inch of figure width: a bucket is narrower than a 1 pt line), bands to the bucket minimum of the lower edge and maximum of the
upper edge, shaded regimes to the most frequent regime per bucket, heat maps to the largest value per
bucket, drawn as a raster.  So a 10⁶-step run gives a PDF of a few hundred kB at most while spikes
stay visible.

:data:`FIGURES` maps the names used by ``phasewatch plot --figure NAME`` to these functions.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import PhasewatchError
from .style import LINESTYLES, PALETTE, bind_save_style, figure_width, paper_style

__all__ = [
    "FIGURES",
    "MissingDataError",
    "criticality",
    "hill_plot",
    "layers",
    "noise",
    "ntk",
    "overview",
    "sharpness",
    "spectrum",
]


class MissingDataError(PhasewatchError):
    """The run does not hold the data a figure needs (the message says what to record)."""


REGIME_COLOURS = {0: "#DDEEFF", 1: "#FFE9C7", 2: "#F7D0C7"}
REGIME_NAMES = {0: "plateau", 1: "transition", 2: "forgetting"}
PHASE_COLOURS = {"exploration": "#F7D0C7", "transition": "#FFE9C7", "generalization": "#DDF2E6"}
CRITICAL_COLOUR = "#FFE9C7"
BEYOND_EDGE_COLOUR = "#F7D0C7"
EVENT_COLOUR = "0.3"

# Long series: buckets per inch of figure width (≥ 200 buckets).  100/in makes a bucket ≤ 0.25 mm,
# narrower than a 1 pt (0.35 mm) line, so the min/max envelope is indistinguishable in print.
BUCKETS_PER_INCH = 100
BUCKETS = 1000  # default for the reduction helpers when called directly
HEATMAP_COLUMNS = 600  # time columns of the spectrum heat map (a raster)
MIN_HILL_VALUES = 20

# per-panel height (in) for stacked panels, title line included; legends that need more room than
# the title line add their height once laid out (:func:`_place_legends`)
_PANEL_HEIGHT = {3.25: 1.0, 5.5: 1.1, 6.75: 1.15}
MAX_HEIGHT = 9.0  # in: a page of a two-column paper


def _panel_height(w: float) -> float:
    return _PANEL_HEIGHT.get(w, float(np.clip(0.8 + 0.05 * w, 0.95, 1.2)))


# ------------------------------------------------------------------------------------------------
# reducing long series
# ------------------------------------------------------------------------------------------------
def _nb(fig) -> int:
    """Buckets for long series in ``fig``: ``BUCKETS_PER_INCH`` per inch of its width."""
    return max(200, int(BUCKETS_PER_INCH * fig.get_figwidth()))


def _buckets(n: int, buckets: int) -> tuple[int, int]:
    """(bucket length m, number of buckets nb) covering n samples in about ``buckets`` buckets."""
    m = -(-n // buckets)
    return m, -(-n // m)


def _padded(y: np.ndarray, m: int, nb: int, fill) -> np.ndarray:
    out = np.full(nb * m, fill, dtype=y.dtype)
    out[: len(y)] = y
    return out.reshape(nb, m)


def _decimate(x: np.ndarray, y: np.ndarray, buckets: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Min/max envelope per bucket: each of about ``buckets`` consecutive buckets keeps its minimum
    and maximum, in their order of occurrence, so spikes survive and a line stays ≤ 2·buckets points.
    A bucket without finite values gives one NaN point (the line breaks there)."""
    buckets = buckets or BUCKETS
    x = np.asarray(x)
    y = np.asarray(y, dtype=float)
    n = len(y)
    if n <= 2 * buckets:
        return x, y
    m, nb = _buckets(n, buckets)
    yp = _padded(y, m, nb, np.nan)
    fin = np.isfinite(yp)
    lo = np.where(fin, yp, np.inf).argmin(axis=1)
    hi = np.where(fin, yp, -np.inf).argmax(axis=1)
    base = np.arange(nb) * m
    idx = np.minimum(base[:, None] + np.sort(np.stack([lo, hi], axis=1), axis=1), n - 1)
    xs, ys = x[idx], y[idx]
    ys[~fin.any(axis=1)] = np.nan
    return xs.ravel(), ys.ravel()


def _envelope(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, buckets: int | None = None):
    """A band reduced to ≤ 2·buckets points: per bucket the minimum of ``lo`` and maximum of ``hi``,
    held from the bucket's first to its last x."""
    buckets = buckets or BUCKETS
    x = np.asarray(x)
    lo = np.asarray(lo, dtype=float)
    hi = np.asarray(hi, dtype=float)
    n = len(x)
    if n <= 2 * buckets:
        return x, lo, hi
    m, nb = _buckets(n, buckets)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN buckets give NaN, as wanted
        blo = np.nanmin(_padded(lo, m, nb, np.nan), axis=1)
        bhi = np.nanmax(_padded(hi, m, nb, np.nan), axis=1)
    first = np.arange(nb) * m
    last = np.minimum(first + m - 1, n - 1)
    xs = np.stack([x[first], x[last]], axis=1).ravel()
    return xs, np.repeat(blo, 2), np.repeat(bhi, 2)


def _mode_codes(codes: np.ndarray, m: int, nb: int) -> np.ndarray:
    """Most frequent code per bucket (ties: the larger code)."""
    cp = _padded(codes.astype(np.int64), m, nb, np.iinfo(np.int64).min)
    values = np.unique(codes)
    counts = np.stack([(cp == v).sum(axis=1) for v in values], axis=1)
    best = counts.shape[1] - 1 - np.argmax(counts[:, ::-1], axis=1)
    return values[best]


def _shade_codes(ax, x: np.ndarray, codes: np.ndarray, colours: dict, buckets: int | None = None) -> None:
    """Shade runs of equal code (a span from a run's first x to the next run's first x); codes
    without a colour are left white.  Long series: the most frequent code per bucket."""
    buckets = buckets or BUCKETS
    x = np.asarray(x)
    codes = np.asarray(codes)
    if not len(x):
        return
    if len(x) > buckets:
        m, nb = _buckets(len(x), buckets)
        codes = _mode_codes(codes, m, nb)
        last = x[-1]
        x = np.r_[x[np.arange(nb) * m], last]
        codes = np.r_[codes, codes[-1]]
    starts = np.r_[0, np.nonzero(codes[1:] != codes[:-1])[0] + 1]
    stops = np.r_[starts[1:], len(x) - 1]
    for a, b in zip(starts, stops):
        c = int(codes[a])
        if c in colours and x[b] > x[a]:
            ax.axvspan(x[a], x[b], color=colours[c], lw=0, zorder=0)


# ------------------------------------------------------------------------------------------------
# layout helpers
# ------------------------------------------------------------------------------------------------
def _stack(width, n: int, ratios: Sequence[float] | None = None):
    """A figure of ``n`` stacked panels sharing the step axis."""
    import matplotlib.pyplot as plt

    w = figure_width(width)
    ratios = list(ratios) if ratios is not None else [1.0] * n
    h = min(MAX_HEIGHT, _panel_height(w) * sum(ratios) + 0.35)
    fig, axes = plt.subplots(n, 1, figsize=(w, h), sharex=True, squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": ratios})
    fig._phasewatch_grows = True  # room for legends is added once they are laid out
    bind_save_style(fig)
    return fig, list(axes[:, 0])


def _single(ax, width, aspect: float = 0.5, height: float | None = None):
    """(figure, axes): the caller's Axes, or a new one-panel figure ``aspect`` × width tall."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    w = figure_width(width)
    h = height if height is not None else float(np.clip(aspect * w, 2.1, 3.2))
    fig, ax = plt.subplots(figsize=(w, h), layout="constrained")
    fig._phasewatch_grows = True
    bind_save_style(fig)
    return fig, ax


def _legend_above(ax, handles=None, labels=None, handlelength: float = 1.5) -> None:
    """Ask for a legend above the panel, right-aligned opposite the panel title, so it never covers
    data; :func:`_place_legends` lays it out once the figure's layout is known."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax._phasewatch_legend = (list(handles), list(labels), handlelength)


def _place_legends(fig) -> None:
    """Lay out the requested legends: each on as few rows as fit beside its panel's title (measured
    after constrained layout); when even two columns do not fit there, the legend takes the full
    width of the panel and the title moves above it.  A figure made here grows by the height its
    legends take beyond the title line, so the panels keep their height."""
    pending = [ax for ax in fig.axes if getattr(ax, "_phasewatch_legend", None)]
    if not pending:
        return
    renderer = fig.canvas.get_renderer()
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)  # final axes positions (no drawing)
    gap = 10 * fig.dpi / 72
    extra = 0.0  # inches
    for ax in pending:
        handles, labels, hl = ax._phasewatch_legend
        del ax._phasewatch_legend
        axw = ax.get_window_extent(renderer).width
        title = getattr(ax, "_left_title", None)
        has_title = title is not None and bool(title.get_text())
        tbox = title.get_window_extent(renderer) if has_title else None
        tw, th = (tbox.width, tbox.height) if has_title else (0.0, 0.0)
        kw = {"loc": "lower right", "bbox_to_anchor": (1.0, 1.0), "borderaxespad": 0.2, "columnspacing": 1.0,
              "handletextpad": 0.4, "handlelength": hl}
        beside, fit_full = None, 1
        for ncols in range(len(handles), 0, -1):
            leg = ax.legend(handles, labels, ncols=ncols, **kw)
            w = leg.get_window_extent(renderer).width
            if w <= axw - tw - gap and ncols >= min(2, len(handles)):
                beside = ncols
                break
            if w <= axw and fit_full == 1:
                fit_full = ncols
        if beside is None:
            leg = ax.legend(handles, labels, ncols=fit_full, **kw)
        lh = leg.get_window_extent(renderer).height
        if beside is None and has_title:
            # the pad reaches the title's baseline; its descenders need room too
            ax.set_title(title.get_text(), loc="left", pad=lh * 72 / fig.dpi + 7)
            extra += (lh + 7 * fig.dpi / 72) / fig.dpi
        else:
            extra += max(0.0, lh - th) / fig.dpi
    if getattr(fig, "_phasewatch_grows", False) and extra > 0:
        fig.set_figheight(min(MAX_HEIGHT, fig.get_figheight() + extra))


def _event_lines(ax, analysis) -> None:
    for e in analysis.events:
        if e.kind == "grokking":
            ax.axvline(e.step, color=EVENT_COLOUR, lw=0.7, ls=":", zorder=1)


def _step_label(v: float, vmax: float) -> str:
    """Step tick labels without offset or exponent, one unit per axis: below 20000 plain, then k
    (20k … 900k), from 10⁶ on M (0.2M … 1M)."""
    if v == 0:
        return "0"
    if vmax >= 1e6:
        return f"{v / 1e6:g}M"
    if vmax >= 2e4:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _step_axis(ax) -> None:
    """Label the x axis "step", with compact tick labels (k, M) for long runs."""
    from matplotlib.ticker import Formatter

    class _Steps(Formatter):
        def __call__(self, x, pos=None):
            lo, hi = self.axis.get_view_interval()
            return _step_label(x, max(abs(lo), abs(hi)))

    ax.set_xlabel("step")
    ax.xaxis.set_major_formatter(_Steps())


def _step_limits(ax, analysis) -> None:
    st = analysis.scalars.get("step", [])
    if len(st):
        ax.set_xlim(st[0], st[-1])


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _power_label(x: float) -> str:
    """10⁻³, 0.2, 5×10⁴: tick labels of log axes as plain text (no mathtext: faster, same in print)."""
    e = math.floor(math.log10(x) + 1e-9)
    coeff = x / 10.0**e
    if abs(coeff - round(coeff)) < 1e-6:
        coeff = round(coeff)
    if coeff == 1:
        return "1" if e == 0 else "10" if e == 1 else "10" + str(e).translate(_SUPERSCRIPT)
    if -3 <= e <= 3:
        return f"{x:g}"
    return f"{coeff:g}×10" + str(e).translate(_SUPERSCRIPT)


def _log_axis(axis, nonpositive: str = "clip") -> None:
    """A log scale on ``axis`` (ax.xaxis or ax.yaxis) with plain-text power labels; values <= 0 are
    clipped to the axis or, with ``nonpositive="mask"``, left out."""
    from matplotlib.ticker import LogFormatter

    class _Plain(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return _power_label(x)

    (axis.axes.set_xscale if axis is axis.axes.xaxis else axis.axes.set_yscale)("log", nonpositive=nonpositive)
    axis.set_major_formatter(_Plain())
    axis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _log_if_wide(ax, *arrays, ratio: float = 30.0) -> None:
    v = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and v.max() / v.min() > ratio:
        _log_axis(ax.yaxis)


# ------------------------------------------------------------------------------------------------
# panels
# ------------------------------------------------------------------------------------------------
def _has_loss(a) -> bool:
    sc = a.scalars
    return len(sc.get("step", [])) > 0 and "loss" in sc and bool(np.isfinite(sc["loss"]).any())


def _has_probes(a) -> bool:
    pr = a.probes
    return bool(pr) and len(pr.get("step", [])) > 0 and bool(np.isfinite(pr["C"]).any())


def _has_tail(a) -> bool:
    ti = a.tail_index
    return bool(ti) and len(ti.get("step", [])) > 0 and bool(np.isfinite(ti["alpha"]).any())


def _has_alpha_coord(a) -> bool:
    pr = a.probes
    return bool(pr) and "alpha_coord" in pr and bool(np.isfinite(np.asarray(pr["alpha_coord"], float)).any())


def _panel_loss(ax, a) -> None:
    nb = _nb(ax.figure)
    sc = a.scalars
    handles, labels = [], []
    if _has_loss(a):
        x, y = _decimate(sc["step"], sc["loss"], nb)
        (h,) = ax.plot(x, y, color=PALETTE[0], label="train loss")
        handles.append(h)
        labels.append("train loss")
        if np.nanmin(y) > 0:
            _log_if_wide(ax, y, ratio=10.0)
        ax.set_ylabel("loss")
    # logged losses (val_loss, eval_loss, ...: rec.log) share the loss axis, with markers at their steps
    losses = [(n, sv) for n, sv in sorted(a.metrics.items()) if "loss" in str(n).lower()]
    for i, (name, (s, v)) in enumerate(losses):
        x, y = _decimate(np.asarray(s), np.asarray(v, dtype=float), nb)
        (h,) = ax.plot(x, y, color=PALETTE[(4 + i) % 7], ls=LINESTYLES[(1 + i) % 6], marker="o", ms=1.5,
                       label=str(name))
        handles.append(h)
        labels.append(str(name).replace("_", " "))
        ax.set_ylabel("loss")
    accs = [(n, sv) for n, sv in sorted(a.metrics.items()) if "acc" in str(n).lower()]
    if accs:
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        for i, (name, (s, v)) in enumerate(accs):
            x, y = _decimate(np.asarray(s), np.asarray(v, dtype=float), nb)
            (h,) = ax2.plot(x, y, color=PALETTE[1 + i % 6], ls=LINESTYLES[1 + i % 6], label=str(name))
            handles.append(h)
            labels.append(str(name).replace("_", " "))
        jumps = [e for e in a.events if e.kind == "jump"]
        if jumps:
            (h,) = ax2.plot([e.step for e in jumps], [e.value for e in jumps], ls="none", marker="v", ms=3.5,
                            color=EVENT_COLOUR, zorder=4)
            handles.append(h)
            labels.append("jump")
        ax2.set_ylim(-0.03, 1.03)
        ax2.set_ylabel("accuracy")
    for e in a.events:
        if e.kind == "grokking":
            thr = e.rule.split(">=")[-1].strip()
            ax.annotate(f"{e.metric.replace('_', ' ')} ≥ {thr}\nat step {e.step}", xy=(e.step, 0.5),
                        xycoords=("data", "axes fraction"), xytext=(3, 0), textcoords="offset points",
                        fontsize=6, color=EVENT_COLOUR, va="center")
    from .controls import interventions_overlay  # controllers' learning-rate changes, if any

    for lbl, h in interventions_overlay(ax, a).items():
        handles.append(h)
        labels.append(lbl)
    ax.set_title("loss and accuracy", loc="left")
    _legend_above(ax, handles, labels)


def _panel_sigma(ax, a, n_sigma: int | None = None) -> None:
    nb = _nb(ax.figure)
    t = a.table
    sig = t["sigma"]
    n = sig.shape[1] if n_sigma is None else max(1, min(n_sigma, sig.shape[1]))
    import matplotlib as mpl

    # σ_1 ≥ σ_2 ≥ … is an ordered family: one sequential colour map (dark = top mode), monotone in
    # lightness so it survives greyscale and colour-vision deficiencies; σ_1 drawn heavier
    cmap = mpl.colormaps["viridis"]
    for j in range(n):
        x, y = _decimate(t["step"], np.where(t["valid"], sig[:, j], np.nan), nb)
        label = rf"$\sigma_{{{j + 1}}}$" if j in (0, 1, n - 1) else None
        ax.plot(x, y, color=cmap(0.88 * j / max(1, n - 1)), lw=1.1 if j == 0 else 0.7, label=label)
    _log_axis(ax.yaxis)
    ax.set_ylabel(r"$\sigma_j$")
    ax.set_title(f"singular values, W = {a.window}", loc="left")
    _legend_above(ax, handlelength=2.0)


def _panel_kstar(ax, a) -> None:
    nb = _nb(ax.figure)
    t = a.table
    steps = t["step"]
    k = np.where(t["valid"] & (t["kstar"] > 0), t["kstar"], np.nan).astype(float)
    x, y = _decimate(steps, k, nb)
    if len(steps) <= 2 * nb:
        (h1,) = ax.step(x, y, where="post", color=PALETTE[0], label="k*")
    else:
        (h1,) = ax.plot(x, y, color=PALETTE[0], label="k*")
    ax.set_ylabel(r"$k^*$")
    top = int(np.nanmax(k)) if np.isfinite(k).any() else 1
    ax.set_ylim(0.5, max(2, top) + 0.5)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    ax.yaxis.set_minor_locator(MaxNLocator(integer=True, nbins=20))
    ax3 = ax.twinx()
    ax3.spines["right"].set_visible(True)
    x, y = _decimate(steps, np.where(t["valid"], t["gap_ratio"], np.nan), nb)
    (h2,) = ax3.plot(x, y, color=PALETTE[3], ls="--", lw=0.8)
    handles, labels = [h1, h2], [r"$k^*$", r"$\sigma_{k^*}/\sigma_{k^*+1}$"]
    shown = [y]
    if "gap_ratio_null" in t:  # the momentum null at the observed k*, and its finite-dimension band
        null = np.where(t["valid"], t["gap_ratio_null"], np.nan)
        hi = np.where(t["valid"], t.get("gap_ratio_null_hi", null), np.nan)
        xe, lo_e, hi_e = _envelope(steps, null, hi, nb)
        band = ax3.fill_between(xe, lo_e, hi_e, color="0.6", alpha=0.35, lw=0)
        xn, yn = _decimate(steps, null, nb)
        (h3,) = ax3.plot(xn, yn, color="0.35", ls=":", lw=1.0)
        handles += [h3, band]
        labels += ["momentum null", "null band"]
        shown += [yn, hi_e]
    _log_if_wide(ax3, *shown, ratio=10.0)
    ax3.set_ylabel("gap ratio")
    ax.set_title("gap position and ratio" + (" vs the momentum null" if "gap_ratio_null" in t else ""), loc="left")
    _legend_above(ax, handles, labels, handlelength=2.0)


def _panel_A(ax, a) -> None:
    nb = _nb(ax.figure)
    from matplotlib.patches import Patch

    t = a.table
    steps = t["step"]
    _shade_codes(ax, steps, t["regime"], REGIME_COLOURS, nb)
    dk = "A_dk" in t and a.conventions.get("regime", "on A_dk").startswith("on A_dk")
    if dk:  # regimes are A_dk's (dimensionless); the paper's A (units 1/η) on its own axis
        x, y = _decimate(steps, t["A_dk"], nb)
        ax.plot(x, y, color=PALETTE[0], label=r"$A_{dk}$")
        _log_axis(ax.yaxis)
        ax.set_ylabel(r"$A_{dk}$")
        axA = ax.twinx()
        axA.spines["right"].set_visible(True)
        x, y = _decimate(steps, t["A"], nb)
        (hA,) = axA.plot(x, y, color=PALETTE[2], ls="--", lw=0.8)
        _log_axis(axA.yaxis)
        axA.set_ylabel(r"$A$ (1/$\eta$)")
        handles, labels = ax.get_legend_handles_labels()
        handles.append(hA)
        labels.append(r"$A$ (units 1/$\eta$)")
    else:
        x, y = _decimate(steps, t["A"], nb)
        ax.plot(x, y, color=PALETTE[0], label="canonical")
        x, y = _decimate(steps, t["A_eigen"], nb)
        ax.plot(x, y, color=PALETTE[2], ls="--", lw=0.8, label="eigen")
        _log_axis(ax.yaxis)
        ax.set_ylabel(r"$A$")
        handles, labels = ax.get_legend_handles_labels()
    present = set(np.unique(t["regime"]).tolist())
    for c in (0, 1, 2):
        if c in present:
            handles.append(Patch(color=REGIME_COLOURS[c]))
            labels.append(REGIME_NAMES[c])
    if dk:
        ax.set_title(r"$A_{dk} = \|\Delta C\|_F/(\lambda_{k^*}-\lambda_{k^*+1})$ (regimes shaded)", loc="left")
    else:
        ax.set_title(r"adiabatic $A = \|\Delta C\|_F\,/\,(\eta\, g^2)$", loc="left")
    _legend_above(ax, handles, labels)


def _phase_codes(phases) -> tuple[np.ndarray, dict[int, str]]:
    names = list(PHASE_COLOURS)
    codes = np.array([names.index(p) if p in names else -1 for p in np.asarray(phases).astype(str)], dtype=np.int64)
    return codes, {i: PHASE_COLOURS[n] for i, n in enumerate(names)}


def _panel_C(ax, a) -> None:
    nb = _nb(ax.figure)
    from matplotlib.patches import Patch

    pr = a.probes
    st = np.asarray(pr["step"])
    codes, colours = _phase_codes(pr["phase"])
    _shade_codes(ax, st, codes, colours, nb)
    C, C_lo, C_hi = (np.asarray(pr[k], float) for k in ("C", "C_lo", "C_hi"))
    extra = [np.asarray(pr["C_batch"], float)] if "C_batch" in pr and np.isfinite(pr["C_batch"]).any() else []
    pos = np.concatenate([C_lo, C_hi, C, *extra])
    pos = pos[np.isfinite(pos) & (pos > 0)]
    logy = bool(pos.size and pos.max() / pos.min() > 10)
    zero = np.isfinite(C_hi) & (C <= 0)  # bias-corrected C reported 0 (signal not resolved)
    if logy:  # 0 has no place on a log axis: the line breaks there (the axis masks it), a marker shows
        # the CI's upper end, and a lower end of 0 is drawn a decade below the smallest positive value
        C_lo = np.where(C_lo > 0, C_lo, pos.min() / 10)
    xe, lo, hi = _envelope(st, C_lo, C_hi, nb)
    ax.fill_between(xe, lo, hi, color=PALETTE[0], alpha=0.25, lw=0, label="95% CI")
    x, y = _decimate(st, C, nb)
    few = len(st) <= 60
    ax.plot(x, y, color=PALETTE[0], marker="o" if few else None, ms=2, label="C (canonical)")
    if logy and zero.any():
        ax.plot(st[zero], C_hi[zero], ls="none", marker="v", ms=3, color=PALETTE[0], mfc="none", mew=0.7,
                label=r"$C = 0$: upper end of CI")
    if "C_naive" in pr and np.isfinite(pr["C_naive"]).any():
        x, y = _decimate(st, pr["C_naive"], nb)
        ax.plot(x, y, color=PALETTE[3], ls="--", lw=0.8, label="C naive")
    if extra:  # the training batch's SNR, B·C₁
        cb = np.where(extra[0] > 0, extra[0], np.nan) if logy else extra[0]
        x, y = _decimate(st, cb, nb)
        ax.plot(x, y, color=PALETTE[1], ls="-.", lw=0.9, label=r"$C_B$ (training batch)")
    ax.axhline(1.0, color="0.4", lw=0.6, ls=":", zorder=1)
    if logy:
        _log_axis(ax.yaxis, nonpositive="mask")
    handles, labels = ax.get_legend_handles_labels()
    for i, name in enumerate(PHASE_COLOURS):
        if (codes == i).any():
            handles.append(Patch(color=PHASE_COLOURS[name]))
            labels.append(name)
    ax.set_ylabel(r"$C$")
    ax.set_title("consolidation ratio", loc="left")
    _legend_above(ax, handles, labels)


def _panel_alpha(ax, a) -> None:
    nb = _nb(ax.figure)
    ti = a.tail_index
    hi = np.array([np.nan])
    if _has_tail(a):
        x, lo, hi = _envelope(ti["step"], ti["alpha_lo"], ti["alpha_hi"], nb)
        ax.fill_between(x, lo, hi, color=PALETTE[2], alpha=0.25, lw=0, label="95% CI")
        x, y = _decimate(ti["step"], ti["alpha"], nb)
        ax.plot(x, y, color=PALETTE[2], label=r"Hill $\hat\alpha$")
    if _has_alpha_coord(a):  # pooled Hill of standardised noise coordinates (grad_proj), per measurement
        pr = a.probes
        st, y = np.asarray(pr["step"]), np.asarray(pr["alpha_coord"], float)
        clo, chi = np.asarray(pr["alpha_coord_lo"], float), np.asarray(pr["alpha_coord_hi"], float)
        ok = np.isfinite(y) & np.isfinite(clo) & np.isfinite(chi)
        ax.errorbar(st[ok], y[ok], yerr=[y[ok] - clo[ok], chi[ok] - y[ok]], fmt="s", ms=2.5, lw=0.7, capsize=1.5,
                    color=PALETTE[4], label=r"$\hat\alpha_{\rm coord}$ (95% CI)")
        hi = np.concatenate([np.asarray(hi, float), chi[ok]])
    ax.axhline(2.0, color="0.3", lw=0.7, ls="--", label=r"$\alpha = 2$")
    top = float(np.nanmax(hi)) if np.isfinite(hi).any() else 4.0
    if top > 20:  # Hill on light tails runs far above 2: a log axis keeps α = 2 readable
        _log_axis(ax.yaxis)
    else:
        ax.set_ylim(0, max(4.0, top * 1.05))
    ax.set_ylabel(r"$\hat\alpha$")
    ax.set_title(r"Hill $\hat\alpha$ of gradient norms" if not _has_alpha_coord(a) else
                 r"tail index $\hat\alpha$ (gradient norms; noise coordinates)" if _has_tail(a) else
                 r"tail index $\hat\alpha$ of noise coordinates", loc="left")
    _legend_above(ax, handlelength=1.5)


# ------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------
OVERVIEW_PANELS = ("loss", "sigma", "kstar", "A", "C", "alpha")
_PANEL_RATIOS = {"loss": 1.1, "sigma": 1.2, "kstar": 0.9, "A": 1.0, "C": 1.0, "alpha": 0.9}


def overview(analysis, width: str | float = "text", n_sigma: int | None = None,
             panels: Sequence[str] | None = None):
    """The overview of a run, panels stacked over the step axis: loss and accuracies with the
    grokking step and accuracy jumps; σ_j(t) of the update window on a log axis; k*(t) and the gap
    ratio with the momentum null at the observed k* and its band (when the analysis has them); the
    dimensionless A_dk(t) with its regimes shaded and the paper's A (units 1/η) on a second axis
    (runs analysed before A_dk: A canonical and ``eigen`` with A's regimes); and, when
    the run has them, the consolidation ratio C with its 95 % CI and the phases of p = C/(1+C)
    shaded, and Hill's α̂ on gradient norms with its CI.

    ``panels`` picks and orders panels from ``loss, sigma, kstar, A, C, alpha`` (default: all the run
    has data for); ``n_sigma`` limits the number of σ_j drawn.
    """
    import matplotlib.pyplot as plt  # noqa: F401  (pyplot backs the figure)

    have = {"loss": _has_loss(analysis) or bool(analysis.metrics), "sigma": True, "kstar": True, "A": True,
            "C": _has_probes(analysis), "alpha": _has_tail(analysis)}
    if panels is None:
        names = [p for p in OVERVIEW_PANELS if have[p]]
    else:
        names = list(panels)
        bad = [p for p in names if p not in OVERVIEW_PANELS]
        if bad:
            raise PhasewatchError(f"overview panels {bad}: choose from {', '.join(OVERVIEW_PANELS)}")
        missing = [p for p in names if not have[p]]
        if missing:
            raise MissingDataError(f"overview: the run has no data for panel(s) {', '.join(missing)}; "
                                   "C needs gradient samples (Recorder(grad_samples_every=...)), "
                                   "alpha at least 100 recorded steps")
    if not len(analysis.table.get("step", [])):
        raise MissingDataError("overview: the analysis has no windows; record at least W steps")
    draw = {"loss": _panel_loss, "sigma": lambda ax, a: _panel_sigma(ax, a, n_sigma), "kstar": _panel_kstar,
            "A": _panel_A, "C": _panel_C, "alpha": _panel_alpha}
    return _panel_stack(analysis, width, [(draw[p], _PANEL_RATIOS[p]) for p in names], letters=True)


def _panel_stack(analysis, width, panels, letters: bool):
    """A column of panels sharing the step axis: ``panels`` = [(draw(ax, analysis), height ratio)];
    ``letters``: prefix the titles (a), (b), ... (always, or only when there are several panels)."""
    with paper_style():
        fig, axes = _stack(width, len(panels), [r for _, r in panels])
        for i, (ax, (draw, _)) in enumerate(zip(axes, panels)):
            draw(ax, analysis)
            if letters or len(panels) > 1:
                ax.set_title(f"({chr(97 + i)}) " + ax.get_title(loc="left"), loc="left")
            _event_lines(ax, analysis)
        _step_limits(axes[-1], analysis)
        _step_axis(axes[-1])
        _place_legends(fig)
    return fig


def noise(analysis, width: str | float = "text"):
    """Gradient noise over training: the consolidation ratio C (canonical, delta-method 95 % CI,
    with the naive variant, the training batch's C_B = B·C₁ when the batch size is known, and the
    phases of p = C/(1+C) shaded) when gradient samples were recorded,
    and Hill's α̂ on 100-step windows of gradient norms with its exact χ² interval and the α = 2 line
    (α̂ > 2: no evidence of a stable heavy tail), and, when projected samples were recorded
    (``grad_proj``), the pooled coordinate tail index α̂_coord of each measurement with its bootstrap
    95 % CI.  Draws the panels the run has data for."""
    names = [p for p, ok in (("C", _has_probes(analysis)),
                             ("alpha", _has_tail(analysis) or _has_alpha_coord(analysis))) if ok]
    if not names:
        raise MissingDataError("noise: the run has neither gradient samples nor 100 gradient norms; record "
                               "gradient samples with Recorder(grad_samples_every=...)")
    return _panel_stack(analysis, width, [(_panel_C if p == "C" else _panel_alpha, 1.1) for p in names],
                        letters=False)


def _max_columns(steps: np.ndarray, ratio: np.ndarray, columns: int):
    """Reduce (N, J) to at most ``columns`` time columns: the largest finite value per bucket.
    Returns the column edges (len C+1, in steps) and the (C, J) values."""
    n = len(steps)
    steps = np.asarray(steps, dtype=float)
    if n <= columns:
        mids = (steps[1:] + steps[:-1]) / 2 if n > 1 else np.empty(0)
        first = steps[0] - (mids[0] - steps[0] if n > 1 else 0.5)
        last = steps[-1] + (steps[-1] - mids[-1] if n > 1 else 0.5)
        return np.r_[first, mids, last], ratio
    m, nb = _buckets(n, columns)
    out = np.full((nb, ratio.shape[1]), np.nan)
    for j in range(ratio.shape[1]):
        col = _padded(np.where(np.isfinite(ratio[:, j]), ratio[:, j], -np.inf), m, nb, -np.inf)
        out[:, j] = col.max(axis=1)
    out[~np.isfinite(out)] = np.nan
    first = np.arange(nb) * m
    edges = np.r_[steps[first], steps[-1]]
    return edges, out


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


def _curvature(analysis, fig: str, need: Sequence[str], what: str) -> dict[str, np.ndarray]:
    cv = analysis.curvature or {}
    if not len(cv.get("step", [])) or any(c not in cv for c in need) or not all(
            np.isfinite(np.asarray(cv[c], dtype=float)).any() for c in need):
        raise MissingDataError(f"{fig}: the run has no {what}; {_RECORD_HINT[fig]}")
    return cv


_RECORD_HINT = {
    "sharpness": "record Hessian λ_max probes while training, or compute them on stored checkpoints "
                 "with `phasewatch curvature RUN`",
    "ntk": "record NTK probes on a fixed probe set while training, or compute them on stored checkpoints "
           "with `phasewatch curvature RUN`",
    "criticality": "Φ needs C (gradient samples), S (Hessian λ_max) and dρ/dt (NTK probes) recorded at "
                   "the same probes",
}


def _markers(n: int) -> dict:
    return {"marker": "o", "ms": 2.5} if n <= 80 else {}


def sharpness(analysis, ax=None, width: str | float = "text"):
    """λ_max of the training-loss Hessian (Lanczos; error bars = Lanczos residual where recorded)
    against the stability threshold (2/η for SGD; the optimizer-appropriate threshold otherwise, e.g.
    the preconditioned sharpness threshold for Adam), over training.  Probes where λ_max exceeds the
    threshold (S = threshold − λ_max < 0, beyond the edge of stability) are shaded."""
    cv = _curvature(analysis, "sharpness", ("lambda_max", "threshold"), "Hessian λ_max probes")
    st = np.asarray(cv["step"])
    lam = np.asarray(cv["lambda_max"], dtype=float)
    thr = np.asarray(cv["threshold"], dtype=float)
    lr = np.asarray(cv.get("lr", np.full(len(st), np.nan)), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        is_sgd = bool(np.isfinite(lr).all() and np.allclose(thr, 2.0 / lr, rtol=1e-9))
    thr_label = r"$2/\eta$" if is_sgd else "stability threshold"
    with paper_style():
        fig, ax = _single(ax, width, aspect=0.42)
        nb = _nb(fig)
        beyond = np.where(np.isfinite(lam) & np.isfinite(thr), (lam > thr).astype(np.int64), -1)
        if (beyond == 1).any():
            _shade_codes(ax, st, beyond, {1: BEYOND_EDGE_COLOUR}, nb)
        x, y = _decimate(st, thr, nb)
        ax.plot(x, y, color="0.2", ls="--", lw=0.9, label=thr_label)
        res = np.asarray(cv.get("lambda_residual", np.full(len(st), np.nan)), dtype=float)
        if len(st) <= 2 * 100 and np.isfinite(res).any() and np.nanmax(res) > 0:
            ax.errorbar(st, lam, yerr=np.where(np.isfinite(res), res, 0.0), color=PALETTE[0], capsize=0,
                        elinewidth=0.6, label=r"$\lambda_{\max}$ (Lanczos)", **_markers(len(st)))
        else:
            x, y = _decimate(st, lam, nb)
            ax.plot(x, y, color=PALETTE[0], label=r"$\lambda_{\max}$ (Lanczos)", **_markers(len(st)))
        if (beyond == 1).any():
            from matplotlib.patches import Patch

            h, lbl = ax.get_legend_handles_labels()
            h.append(Patch(color=BEYOND_EDGE_COLOUR))
            lbl.append(r"$S < 0$")
        else:
            h, lbl = ax.get_legend_handles_labels()
        _log_if_wide(ax, lam, thr)
        ax.set_ylabel("sharpness")
        _step_axis(ax)
        ax.set_title("sharpness against the stability threshold", loc="left")
        _legend_above(ax, h, lbl, handlelength=2.0)
        _event_lines(ax, analysis)
        _place_legends(fig)
    return fig


def ntk(analysis, ax=None, width: str | float = "text"):
    """The empirical NTK on the fixed probe set: (a) ρ = Σ_k ln λ_k (log-determinant over eigenvalues
    above a relative floor) and (b) its rate dρ/dt per step (finite differences between probes).
    With ``ax=`` only ρ is drawn (into that Axes)."""
    cv = _curvature(analysis, "ntk", ("ntk_rho",), "NTK probes (ntk_rho)")
    st = np.asarray(cv["step"])
    rho = np.asarray(cv["ntk_rho"], dtype=float)
    rate = np.asarray(cv.get("ntk_rate", np.full(len(st), np.nan)), dtype=float)
    two = ax is None and np.isfinite(rate).any()
    with paper_style():
        if two:
            fig, axes = _stack(width, 2, [1.0, 0.9])
        else:
            fig, a0 = _single(ax, width, aspect=0.38)
            axes = [a0]
        nb = _nb(fig)
        x, y = _decimate(st, rho, nb)
        axes[0].plot(x, y, color=PALETTE[0], label=r"$\rho$", **_markers(len(st)))
        axes[0].set_ylabel(r"$\rho$")
        axes[0].set_title(("(a) " if two else "") + r"NTK log-determinant $\rho = \Sigma_k \ln\lambda_k$",
                          loc="left")
        if two:
            ax1 = axes[1]
            x, y = _decimate(st, rate, nb)
            ax1.plot(x, y, color=PALETTE[2], ls="-", label=r"$d\rho/dt$", **_markers(len(st)))
            ax1.axhline(0.0, color="0.5", lw=0.6, ls=":")
            ax1.set_ylabel(r"$d\rho/dt$ (per step)")
            ax1.set_title("(b) rate of change", loc="left")
        for a in axes:
            _event_lines(a, analysis)
        _step_axis(axes[-1])
        _place_legends(fig)
    return fig


def criticality(analysis, ax=None, width: str | float = "text"):
    """Criticality Φ = exp(−[(C−1)²/(2·0.3²) + S²/(2·0.15²) + (r−1)²/(2·0.5²)]) (note 001; r = dρ/dt)
    per probe, with the windows where all three observables are critical (0.8 ≤ C ≤ 1.2, |S| ≤ 0.1,
    |r| > τ) shaded: each such probe covers the interval to the midpoints of its neighbours."""
    from matplotlib.patches import Patch

    cv = _curvature(analysis, "criticality", ("phi",), "criticality Φ")
    st = np.asarray(cv["step"], dtype=float)
    phi = np.asarray(cv["phi"], dtype=float)
    crit = np.asarray(cv.get("all_critical", np.zeros(len(st), bool)), dtype=bool)
    with paper_style():
        fig, ax = _single(ax, width, aspect=0.36)
        nb = _nb(fig)
        handles, labels = [], []
        if crit.any():
            mids = (st[1:] + st[:-1]) / 2 if len(st) > 1 else np.empty(0)
            left = np.r_[st[0], mids]
            right = np.r_[mids, st[-1]]
            if len(st) > nb:
                _shade_codes(ax, st, crit.astype(np.int64), {1: CRITICAL_COLOUR}, nb)
            else:
                i = 0
                while i < len(st):
                    if crit[i]:
                        j = i
                        while j + 1 < len(st) and crit[j + 1]:
                            j += 1
                        lo, hi = left[i], right[j]
                        if hi <= lo:  # a lone probe at the end of the run: a visible sliver
                            lo, hi = lo - 0.5, hi + 0.5
                        ax.axvspan(lo, hi, color=CRITICAL_COLOUR, lw=0, zorder=0)
                        i = j + 1
                    else:
                        i += 1
            handles.append(Patch(color=CRITICAL_COLOUR))
            labels.append("all three critical")
        x, y = _decimate(st, phi, nb)
        (h,) = ax.plot(x, y, color=PALETTE[4], label=r"$\Phi$", **_markers(len(st)))
        handles.insert(0, h)
        labels.insert(0, r"$\Phi$")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(r"$\Phi$")
        _step_axis(ax)
        ax.set_title(r"criticality $\Phi$ of C, S and $d\rho/dt$", loc="left")
        _legend_above(ax, handles, labels)
        _event_lines(ax, analysis)
        _place_legends(fig)
    return fig


#: above this many layer groups the per-layer figure draws heat maps (groups × steps), not lines
LAYER_LINES_MAX = 8


def _layer_series(analysis):
    """(names, steps, k* (G, N), gap excess (G, N)) of the per-layer tables; invalid windows NaN."""
    lay = getattr(analysis, "layers", None) or {}
    if not lay:
        raise MissingDataError("layers: the analysis has no per-layer tables; analyse with layers=True "
                               "(phasewatch analyze --layers)")
    names = list(lay)
    steps = np.asarray(lay[names[0]]["step"])
    ks, ex = [], []
    for n in names:
        t = lay[n]
        v = np.asarray(t["valid"], bool)
        ks.append(np.where(v & (np.asarray(t["kstar"]) > 0), t["kstar"], np.nan).astype(float))
        ex.append(np.where(v, np.asarray(t.get("gap_excess", t["gap_ratio"]), float), np.nan))
    return names, steps, np.array(ks), np.array(ex)


def layers(analysis, width: str | float = "text", columns: int = HEATMAP_COLUMNS):
    """Per layer group over training: (a) the gap position k* and (b) the gap excess (gap ratio over
    the momentum null's ratio at the observed k*; 1 = what momentum alone gives; the gap ratio itself
    for an analysis without the null), one line per group; with more than ``LAYER_LINES_MAX`` groups
    both as heat maps, groups × steps (the largest value per time column; raster), gap excess on a
    log colour scale.  Needs ``analyze(run, layers=True)``."""
    names, steps, ks, ex = _layer_series(analysis)
    has_null = "gap_excess" in next(iter(analysis.layers.values()))
    what = "gap excess over the momentum null" if has_null else "gap ratio"
    G = len(names)
    with paper_style():
        fig, axes = _stack(width, 2, [1.0, 1.2] if G <= LAYER_LINES_MAX else [max(1.0, 0.12 * G)] * 2)
        if G <= LAYER_LINES_MAX:
            nb = _nb(fig)
            for i, n in enumerate(names):
                sty = dict(color=PALETTE[i % len(PALETTE)], ls=LINESTYLES[i % len(LINESTYLES)], lw=0.9)
                x, y = _decimate(steps, ks[i], nb)
                axes[0].plot(x, y + 0.06 * (i - (G - 1) / 2), label=n, **sty)  # offset: coinciding k* stay visible
                x, y = _decimate(steps, ex[i], nb)
                axes[1].plot(x, y, **sty)
            axes[1].axhline(1.0, color="0.35", lw=0.7, ls=":", zorder=1)
            _log_if_wide(axes[1], ex, ratio=10.0)
            axes[0].set_ylabel(r"$k^*$")
            axes[1].set_ylabel("gap excess" if has_null else "gap ratio")
            from matplotlib.ticker import MaxNLocator

            axes[0].yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
            _legend_above(axes[0], handlelength=2.0)
        else:
            import matplotlib as mpl
            from matplotlib.colors import LogNorm

            yedges = np.arange(G + 1) - 0.5
            every = max(1, math.ceil(G / 30))  # at most ~30 group labels per axis
            for ax, vals, lab, log in ((axes[0], ks, r"$k^*$", False),
                                       (axes[1], ex, "gap excess" if has_null else "gap ratio", True)):
                edges, cols = _max_columns(steps, vals.T, columns)
                fin = cols[np.isfinite(cols) & (cols > 0)]
                norm = None
                if log and fin.size:
                    norm = LogNorm(vmin=max(min(float(fin.min()), 1.0), 1e-3), vmax=max(float(fin.max()), 1.5))
                cmap = mpl.colormaps["viridis"].with_extremes(bad="0.85")
                pcm = ax.pcolormesh(edges, yedges, np.ma.masked_invalid(cols.T), cmap=cmap, norm=norm,
                                    shading="flat", rasterized=True)
                ax.set_ylim(G - 0.5, -0.5)
                ax.set_yticks(np.arange(0, G, every))
                ax.set_yticklabels(names[::every], fontsize="x-small")
                cb = fig.colorbar(pcm, ax=ax, pad=0.01, aspect=20)
                cb.set_label(lab)
                cb.outline.set_linewidth(0.5)
        axes[0].set_title(f"(a) gap position per layer group (W = {analysis.window})", loc="left")
        axes[1].set_title(f"(b) {what} per layer group", loc="left")
        for ax in axes:
            _event_lines(ax, analysis)
        _step_axis(axes[-1])
        _place_legends(fig)
    return fig


FIGURES = {
    "overview": overview,
    "noise": noise,
    "spectrum": spectrum,
    "hill": hill_plot,
    "sharpness": sharpness,
    "ntk": ntk,
    "criticality": criticality,
    "layers": layers,
}
