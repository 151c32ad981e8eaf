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
The functions live by family: :mod:`.trajectory` (overview, noise and their panels),
:mod:`.spectral` (spectrum, Hill plot), :mod:`.probed` (sharpness, NTK, criticality),
:mod:`.per_layer` (layers), and what they share in :mod:`.common`.
"""

from __future__ import annotations

from .common import (  # noqa: F401  (kept importable from phasewatch.plot.figures)
    BUCKETS,
    HEATMAP_COLUMNS,
    REGIME_COLOURS,
    REGIME_NAMES,
    MissingDataError,
    _decimate,
    _envelope,
    _nb,
    _shade_codes,
)
from .per_layer import LAYER_LINES_MAX, layers  # noqa: F401
from .probed import criticality, ntk, sharpness
from .spectral import hill_plot, spectrum
from .trajectory import OVERVIEW_PANELS, noise, overview  # noqa: F401

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
