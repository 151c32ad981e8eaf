"""What every figure of :mod:`phasewatch.plot` uses: :class:`MissingDataError`, the colours of
regimes and phases, the reduction of long series (min/max envelopes per bucket, modal regimes, heat-map
columns; see :mod:`.figures`), and the layout helpers (stacked panels, legends above the axes, step
and log axes).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import PhasewatchError
from .style import bind_save_style, figure_width


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
