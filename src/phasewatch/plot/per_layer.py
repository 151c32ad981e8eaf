"""The per-layer figure: per layer group over training, the gap position k* and the gap excess, as
lines or, above :data:`LAYER_LINES_MAX` groups, as heat maps (:func:`layers`).
"""

from __future__ import annotations

import math

import numpy as np

from .common import (
    HEATMAP_COLUMNS,
    MissingDataError,
    _decimate,
    _event_lines,
    _legend_above,
    _log_if_wide,
    _max_columns,
    _nb,
    _place_legends,
    _stack,
    _step_axis,
)
from .style import LINESTYLES, PALETTE, paper_style

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
