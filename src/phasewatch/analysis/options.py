"""``AnalysisOptions``: every setting of :func:`~phasewatch.analysis.pipeline.analyze`, in one frozen object.

``analyze(run, **keywords)`` builds one from its keyword arguments and passes it to each stage
(:mod:`~phasewatch.analysis.stages`); ``analyze(run, options=AnalysisOptions(...))`` passes it
directly.  The rolling Hill window (:data:`HILL_WINDOW`) lives here once, read by the analysis, the
exports, the watch view and the figures alike.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import PhasewatchError
from . import adiabatic as adia
from . import gram, nulls

__all__ = ["AnalysisOptions", "HILL_WINDOW", "HILL_FRACTION", "DEFAULT_LEVEL", "hill_window_of"]

#: Gradient norms per window of the rolling Hill tail index and of the Lévy consolidation ratio
#: (the framework note's choice).
HILL_WINDOW = 100
#: Fraction of a window's largest norms the Hill estimator uses (k = ⌊fraction·window⌋).
HILL_FRACTION = 0.1
#: Confidence level of every interval of an analysis (C, p, C_batch, C_langevin, α, α_coord).
DEFAULT_LEVEL = 0.95
#: The Gram window W ``analyze`` uses when none is given.
DEFAULT_WINDOW = 10
#: Bytes above which ``analyze`` streams the band (reads it chunk by chunk).
MEMORY_BUDGET = 1 << 30


@dataclass(frozen=True)
class AnalysisOptions:
    """The settings of one analysis (the keyword arguments of :func:`~phasewatch.analysis.pipeline.analyze`,
    documented there), plus ``level`` (the confidence level of every interval: C, p and C_batch
    delta-method, C_langevin, Hill's α exact χ², α_coord bootstrap), ``hill_window`` and
    ``hill_fraction`` (the rolling tail index and Lévy C on gradient norms)."""

    window: int = DEFAULT_WINDOW
    source: str = "band"
    grok_metric: str | None = None
    grok_threshold: float = 0.95
    rel_floor: float = gram.DEFAULT_REL_FLOOR
    plateau_below: float = 0.1
    forgetting_above: float = 10.0
    chunk_steps: int | None = None
    memory_budget: int | None = MEMORY_BUDGET
    null: str | float = "momentum"
    null_dim: float | None = None
    null_draws: int = nulls.DEFAULT_DRAWS
    null_level: float = nulls.DEFAULT_LEVEL
    null_seed: int = 0
    regimes: str = "A_dk"
    dk_plateau_below: float = adia.DK_PLATEAU_BELOW
    dk_forgetting_above: float = adia.DK_FORGETTING_ABOVE
    layers: bool = False
    rotation: bool = True
    level: float = DEFAULT_LEVEL
    hill_window: int = HILL_WINDOW
    hill_fraction: float = HILL_FRACTION

    def __post_init__(self) -> None:
        cs = self.chunk_steps
        if cs is not None and (isinstance(cs, bool) or int(cs) < 1):
            raise PhasewatchError(f"chunk_steps={cs!r}: use a number of windows >= 1, or None")
        if cs is not None and self.source != "band":
            raise PhasewatchError(f"chunk_steps streams the band; source={self.source!r} reads its snapshots whole")
        if not (isinstance(self.level, (int, float)) and 0.0 < float(self.level) < 1.0):
            raise PhasewatchError(f"level={self.level!r}: a confidence level is a number in (0, 1), e.g. 0.95")
        hw = self.hill_window
        if isinstance(hw, bool) or not isinstance(hw, int) or hw < 2:
            raise PhasewatchError(f"hill_window={hw!r}: use a whole number of gradient norms >= 2 (default 100)")
        if not (0.0 < float(self.hill_fraction) <= 1.0) or not math.isfinite(float(self.hill_fraction)):
            raise PhasewatchError(f"hill_fraction={self.hill_fraction!r}: use a fraction in (0, 1] (default 0.1)")

    def replace(self, **changes) -> AnalysisOptions:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @property
    def level_note(self) -> str:
        """``""`` at the default level, else ``" (level 0.9)"``: appended to the interval conventions."""
        return "" if self.level == DEFAULT_LEVEL else f" (level {self.level:g})"


def hill_window_of(analysis) -> int:
    """The rolling Hill window an :class:`~phasewatch.analysis.pipeline.Analysis` used (``HILL_WINDOW``
    for one made without options)."""
    opts = getattr(analysis, "options", None)
    return int(opts.hill_window) if opts is not None else HILL_WINDOW
