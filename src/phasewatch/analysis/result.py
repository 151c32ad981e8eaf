"""``Estimate``: the shared names of the public estimators' results (after ``scipy.stats``).

Every estimator result carries ``statistic`` (the estimate) and ``confidence_interval`` (a
``(lo, hi)`` tuple: floats for a scalar estimate, arrays for a vectorised one; NaN where the
estimator gives no interval).  They are read-only views of the result's own fields, whose older
names (``estimate``, ``C``, ``B_simple``, ``alpha``, ``t0``, ``median``, ``ci``, ``t0_ci``,
``lo``/``hi``) stay as they were: aliases for one release.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Estimate"]


def _scalar(x):
    a = np.asarray(x)
    return float(a) if a.ndim == 0 and a.dtype.kind in "fiu" else x


class Estimate:
    """Mixin of a frozen dataclass result: ``statistic`` is the field named by ``_statistic_field``,
    ``confidence_interval`` the ``(lo, hi)`` of the field ``_interval_field`` (a tuple, or an array
    whose last axis holds lo, hi), of the two fields ``_interval_field = ("lo", "hi")``, or NaN
    (``_interval_field = None``: no interval)."""

    _statistic_field = "estimate"
    _interval_field: Any = "ci"

    @property
    def statistic(self):
        """The estimate (the same object as the result's own field, e.g. ``estimate`` or ``C``)."""
        return getattr(self, self._statistic_field)

    @property
    def confidence_interval(self) -> tuple[Any, Any]:
        """``(lo, hi)`` of the estimate's interval at the result's level (NaN where there is none)."""
        spec = self._interval_field
        if spec is None:
            nan = np.full(np.shape(self.statistic), np.nan)
            return (_scalar(nan), _scalar(nan.copy()))
        if isinstance(spec, tuple):
            return (_scalar(getattr(self, spec[0])), _scalar(getattr(self, spec[1])))
        ci = getattr(self, spec)
        if isinstance(ci, tuple) and len(ci) == 2:
            return (_scalar(ci[0]), _scalar(ci[1]))
        a = np.asarray(ci, dtype=float)
        return (_scalar(a[..., 0]), _scalar(a[..., 1]))
