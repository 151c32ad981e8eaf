"""Figures for papers (matplotlib): one function per figure, taking analysis results.

Single-run figures live in :mod:`.figures` (registered in :data:`FIGURES`, the names of
``phasewatch plot --figure``); the paper styles (sizes, fonts, palette, deterministic files) in
:mod:`.style`.
"""

from .figures import (
    FIGURES,
    MissingDataError,
    criticality,
    hill_plot,
    layers,
    noise,
    ntk,
    overview,
    sharpness,
    spectrum,
)
from .style import (
    LINESTYLES,
    PALETTE,
    WIDTHS,
    bind_save_style,
    figure_width,
    paper_style,
    save,
    scienceplots_available,
)

__all__ = [
    "FIGURES",
    "LINESTYLES",
    "PALETTE",
    "WIDTHS",
    "MissingDataError",
    "bind_save_style",
    "criticality",
    "figure_width",
    "hill_plot",
    "layers",
    "noise",
    "ntk",
    "overview",
    "paper_style",
    "save",
    "scienceplots_available",
    "sharpness",
    "spectrum",
]
