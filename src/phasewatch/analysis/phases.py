"""Readings of the consolidation probability: phases, decision bands, early-stopping flags, forecast.

Implements the "Phases" and "Decision guide" rules of section 2 of ``DEFINITIONS.md`` and the
"Early-stopping flags" and "Logistic forecast" rules of section 6 (the framework's theory notes
000-004; Y. Xu, arXiv:2603.28964, 2026), on ``p = C / (1 + C)``.

>>> phase(0.7), phase(0.7, (0.45, 0.9)), decision_band(0.55)
('generalization', 'transition', 'critical')
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats

from phasewatch.errors import PhasewatchError

from ._checks import check_level as _check_level
from .result import Estimate

#: Phase labels (DEFINITIONS §2, "Phases"); ``"undefined"`` is used for NaN.
PHASE_LABELS: tuple[str, ...] = ("exploration", "transition", "generalization")
#: Decision-guide bands in increasing order of ``p`` with their lower edges
#: (DEFINITIONS §2): ``p < 0.40`` failing, ``[0.40, 0.50)`` sub-threshold,
#: ``[0.50, 0.60)`` critical, ``[0.60, 0.75]`` learning, ``p > 0.75`` strong.
BAND_LABELS: tuple[str, ...] = ("failing", "sub-threshold", "critical", "learning", "strong")
_UNDEFINED = "undefined"


def phases(p: ArrayLike, p_ci: ArrayLike | None = None) -> np.ndarray:
    """Phase label per measurement (vectorised :func:`phase`).

    ``"transition"`` where the interval ``[lo, hi]`` contains 0.5 (takes
    precedence), else ``"exploration"`` for ``p < 0.5``, ``"generalization"`` for
    ``p > 0.5``, ``"transition"`` for ``p == 0.5``; ``"undefined"`` where ``p`` is
    NaN. A NaN interval is ignored (``p`` alone decides). DEFINITIONS §2.

    Parameters:
        p
            Array of probabilities.
        p_ci
            ``p.shape + (2,)`` intervals, or None.

    Returns:
        ndarray of str, shape of ``p``.
    """
    pa = np.asarray(p, dtype=np.float64)
    out = np.full(pa.shape, _UNDEFINED, dtype=object)
    with np.errstate(invalid="ignore"):
        out = np.where(pa < 0.5, PHASE_LABELS[0], out)
        out = np.where(pa > 0.5, PHASE_LABELS[2], out)
        out = np.where(pa == 0.5, PHASE_LABELS[1], out)
        if p_ci is not None:
            c = np.asarray(p_ci, dtype=np.float64)
            if c.shape != pa.shape + (2,):
                raise PhasewatchError(f"p_ci must have shape {pa.shape + (2,)}, got {c.shape}")
            lo, hi = c[..., 0], c[..., 1]
            contains = (lo <= 0.5) & (hi >= 0.5)
            out = np.where(contains & ~np.isnan(pa), PHASE_LABELS[1], out)
    return out.astype(str)


def phase(p: float, p_ci: Sequence[float] | np.ndarray | None = None) -> str:
    """Phase of one measurement from ``p`` and its interval (DEFINITIONS §2, "Phases").

    ``exploration`` if ``p < 0.5``, ``generalization`` if ``p > 0.5``, but
    ``transition`` whenever the interval ``[lo, hi]`` contains 0.5 (the interval
    takes precedence), and for ``p == 0.5`` exactly. ``"undefined"`` for NaN ``p``.
    Framework notes, as summarised in DEFINITIONS.md.

    Returns:
        str, one of :data:`PHASE_LABELS` or ``"undefined"``.
    """
    return str(phases(np.asarray(p, dtype=np.float64), None if p_ci is None else np.asarray(p_ci, float)))


def decision_bands(p: ArrayLike) -> np.ndarray:
    """Decision-guide band per measurement (vectorised :func:`decision_band`).

    ``p < 0.40`` failing; ``0.40 <= p < 0.50`` sub-threshold; ``0.50 <= p < 0.60``
    critical; ``0.60 <= p <= 0.75`` learning; ``p > 0.75`` strong; NaN undefined.
    DEFINITIONS §2 (framework notes).

    Returns:
        ndarray of str, shape of ``p``.
    """
    pa = np.asarray(p, dtype=np.float64)
    idx = np.searchsorted(np.array([0.40, 0.50, 0.60]), pa, side="right")
    with np.errstate(invalid="ignore"):
        idx = np.where(pa > 0.75, 4, idx)
    labels = np.array(BAND_LABELS + (_UNDEFINED,), dtype=object)
    idx = np.where(np.isnan(pa), len(BAND_LABELS), idx)
    return np.asarray(labels[idx]).astype(str)


def decision_band(p: float) -> str:
    """Decision-guide band of one ``p`` (DEFINITIONS §2, framework notes).

    ``p < 0.40`` ``"failing"``; ``[0.40, 0.50)`` ``"sub-threshold"``;
    ``[0.50, 0.60)`` ``"critical"``; ``[0.60, 0.75]`` ``"learning"``;
    ``p > 0.75`` ``"strong"``; NaN ``"undefined"``.

    Returns:
        str.
    """
    return str(decision_bands(np.asarray(p, dtype=np.float64)))


def _run_length(cond: np.ndarray) -> np.ndarray:
    """Length of the run of True values ending at each index (0 where False)."""
    idx = np.arange(cond.size)
    last_false = np.maximum.accumulate(np.where(cond, -1, idx))
    return idx - last_false


def _first(mask: np.ndarray) -> int | None:
    hit = np.flatnonzero(mask)
    return int(hit[0]) if hit.size else None


@dataclass(frozen=True, eq=False)
class EarlyStoppingFlags:
    """Early-stopping flags per measurement (DEFINITIONS §6; notes 000/004).

    Attributes:
        low_p
            ``p < p_threshold`` at this and the preceding measurements, ``>= p_run`` in
            a row.
        c_falling
            ``C`` strictly below its predecessor at ``>= c_run`` consecutive
            measurements ending here (``c_run`` decreases, i.e. ``c_run + 1`` values).
        ci_below
            Upper end of the ``p`` interval ``< ci_threshold``.
        i_negative
            ``I < 0`` (all False if ``I`` was not given).
        any
            OR of the four.
        first
            First index at which each flag fires (keys ``low_p``, ``c_falling``,
            ``ci_below``, ``i_negative``, ``any``), ``None`` if never.
        p_threshold, p_run, c_run, ci_threshold
            The rule constants used.
    """

    low_p: np.ndarray
    c_falling: np.ndarray
    ci_below: np.ndarray
    i_negative: np.ndarray
    any: np.ndarray
    first: dict[str, int | None] = field(default_factory=dict)
    p_threshold: float = 0.45
    p_run: int = 10
    c_run: int = 20
    ci_threshold: float = 0.5


def early_stopping_flags(
    p: ArrayLike,
    C: ArrayLike,
    p_ci_hi: ArrayLike,
    I: ArrayLike | None = None,  # noqa: E741 - the framework's name
    *,
    p_threshold: float = 0.45,
    p_run: int = 10,
    c_run: int = 20,
    ci_threshold: float = 0.5,
) -> EarlyStoppingFlags:
    """Which early-stopping rules fire at each measurement (DEFINITIONS §6; notes 000/004).

    Over a sequence of measurements ``0..N-1`` (in time order):

    * ``low_p``: ``p < 0.45`` for ``>= 10`` consecutive measurements (fires from the
      10th one of a run on);
    * ``c_falling``: ``C_t < C_{t-1}`` for ``>= 20`` consecutive measurements (20
      strict decreases, i.e. 21 values);
    * ``ci_below``: the interval of ``p`` lies entirely below 0.5 (``hi < 0.5``);
    * ``i_negative``: the intelligence coefficient ``I < 0`` (if ``I`` is given).

    NaN entries never satisfy a condition and therefore break runs. These are the
    framework's heuristics; they flag, they do not decide.

    Parameters:
        p, C, p_ci_hi
            1-D arrays of length ``N`` (``p_ci_hi``: upper end of the ``p`` interval).
        I
            Optional 1-D array of length ``N``.

    Returns:
        :class:`EarlyStoppingFlags` of boolean ``(N,)`` arrays and first indices.
    """
    pa = np.asarray(p, dtype=np.float64).ravel()
    Ca = np.asarray(C, dtype=np.float64).ravel()
    hi = np.asarray(p_ci_hi, dtype=np.float64).ravel()
    N = pa.size
    if Ca.size != N or hi.size != N:
        raise PhasewatchError(f"p, C and p_ci_hi need the same length, got {N}, {Ca.size}, {hi.size}")
    if int(p_run) < 1 or int(c_run) < 1:
        raise PhasewatchError("p_run and c_run must be >= 1")
    with np.errstate(invalid="ignore"):
        low_p = _run_length(pa < p_threshold) >= int(p_run)
        falling = np.zeros(N, dtype=bool)
        if N > 1:
            falling[1:] = Ca[1:] < Ca[:-1]
        c_falling = _run_length(falling) >= int(c_run)
        ci_below = hi < ci_threshold
        if I is None:
            i_neg = np.zeros(N, dtype=bool)
        else:
            Ia = np.asarray(I, dtype=np.float64).ravel()
            if Ia.size != N:
                raise PhasewatchError(f"I needs length {N}, got {Ia.size}")
            i_neg = Ia < 0
    anyf = low_p | c_falling | ci_below | i_neg
    first = {
        "low_p": _first(low_p),
        "c_falling": _first(c_falling),
        "ci_below": _first(ci_below),
        "i_negative": _first(i_neg),
        "any": _first(anyf),
    }
    return EarlyStoppingFlags(
        low_p=low_p,
        c_falling=c_falling,
        ci_below=ci_below,
        i_negative=i_neg,
        any=anyf,
        first=first,
        p_threshold=float(p_threshold),
        p_run=int(p_run),
        c_run=int(c_run),
        ci_threshold=float(ci_threshold),
    )


@dataclass(frozen=True, eq=False)
class LogisticForecast(Estimate):
    """Least-squares logistic fit ``p(t) = 1 / (1 + exp(-k (t - t0)))``.

    Attributes:
        t0, k
            Midpoint (units of ``t``, e.g. steps) and rate (1 / units of ``t``).
        t0_ci, k_ci
            ``(2,)`` Wald intervals from the fit covariance (see
            :func:`logistic_forecast`); NaN if unavailable.
        se_t0, se_k
            Their standard errors.
        level
            Confidence level.
        converged
            Whether the optimiser converged with a finite covariance.
        n
            Number of finite points used.
        residual_std
            RMS residual ``sqrt(SSR / (n - 2))``.
        flags
            One-line warnings (no convergence, ``t0`` outside the data range, ...).
        method
            ``"least_squares"`` (``scipy.optimize.curve_fit``).
    """

    _statistic_field = "t0"  # statistic / confidence_interval: Estimate
    _interval_field = "t0_ci"

    t0: float
    t0_ci: np.ndarray
    k: float
    k_ci: np.ndarray
    se_t0: float
    se_k: float
    level: float
    converged: bool
    n: int
    residual_std: float
    flags: tuple[str, ...]
    method: str = "least_squares"

    def predict(self, t: ArrayLike) -> np.ndarray:
        """``p(t)`` of the fitted curve."""
        return special.expit(self.k * (np.asarray(t, dtype=np.float64) - self.t0))


def _logistic(t: np.ndarray, t0: float, k: float) -> np.ndarray:
    return special.expit(k * (t - t0))


def logistic_forecast(t: ArrayLike, p: ArrayLike, level: float = 0.95) -> LogisticForecast:
    """Forecast the transition time by fitting ``p(t) = 1 / (1 + exp(-k (t - t0)))``.

    DEFINITIONS §6, "Logistic forecast" (framework note 004). Ordinary least
    squares with ``scipy.optimize.curve_fit`` (Levenberg–Marquardt), started from
    a linear fit of ``logit(p)`` against ``t`` (``p`` clipped to [0.02, 0.98]).
    Intervals are Wald intervals from the covariance returned by ``curve_fit``
    (``absolute_sigma=False``: the Gauss–Newton covariance scaled by the residual
    variance ``SSR/(n-2)``), with a Student-t quantile on ``n - 2`` degrees of
    freedom: ``t0 +/- t_{n-2} se(t0)``. This assumes independent, homoscedastic
    errors; consecutive measurements of ``p`` are autocorrelated in practice,
    which makes these intervals too narrow.

    Flags: no convergence (estimates NaN), non-finite covariance (intervals NaN),
    an interval of ``k`` containing 0 (no resolved transition), and ``t0`` outside ``[min t, max t]`` (an extrapolation, not an
    interpolation). NaN points are dropped.

    Parameters:
        t
            Times (steps) of the measurements.
        p
            ``p`` at those times (in [0, 1]).
        level
            Confidence level of the intervals.

    Returns:
        :class:`LogisticForecast`.

    Raises:
        PhasewatchError
            Fewer than 3 finite points or mismatched lengths.

    Examples:
        An exact logistic ``p(t) = 1 / (1 + exp(-0.05 (t - 120)))`` is recovered.

        >>> import numpy as np
        >>> t = np.arange(200.0)
        >>> f = logistic_forecast(t, 1 / (1 + np.exp(-0.05 * (t - 120))))
        >>> bool(abs(f.t0 - 120) < 1e-6), bool(abs(f.k - 0.05) < 1e-9), f.converged
        (True, True, True)
    """
    level = _check_level(level)
    ta = np.asarray(t, dtype=np.float64).ravel()
    pa = np.asarray(p, dtype=np.float64).ravel()
    if ta.size != pa.size:
        raise PhasewatchError(f"t and p need the same length, got {ta.size} and {pa.size}")
    flags: list[str] = []
    ok = np.isfinite(ta) & np.isfinite(pa)
    if not ok.all():
        flags.append(f"dropped {int((~ok).sum())} non-finite points")
        ta, pa = ta[ok], pa[ok]
    N = ta.size
    if N < 3:
        raise PhasewatchError(f"logistic forecast needs >= 3 finite points, got {N}")
    nan2 = np.array([np.nan, np.nan])

    # start: linear regression of logit(p) on t
    span = float(ta.max() - ta.min())
    y = special.logit(np.clip(pa, 0.02, 0.98))
    slope, icpt = np.polyfit(ta, y, 1) if span > 0 else (0.0, 0.0)
    if slope != 0 and np.isfinite(slope) and abs(slope) * max(span, 1.0) > 1e-3:
        k0, t00 = float(slope), float(-icpt / slope)
    else:
        k0, t00 = 4.0 / max(span, 1.0), float(np.median(ta))
    if not (ta.min() - span <= t00 <= ta.max() + span):
        t00 = float(np.median(ta))

    converged = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            popt, pcov = optimize.curve_fit(_logistic, ta, pa, p0=[t00, k0], maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        flags.append(f"logistic fit did not converge: {str(exc).splitlines()[0]}")
        return LogisticForecast(
            t0=math.nan, t0_ci=nan2, k=math.nan, k_ci=nan2.copy(), se_t0=math.nan, se_k=math.nan,
            level=level, converged=False, n=int(N), residual_std=math.nan, flags=tuple(flags),
        )
    t0, k = float(popt[0]), float(popt[1])
    resid = pa - _logistic(ta, t0, k)
    dof = N - 2
    rstd = float(np.sqrt(np.sum(resid**2) / dof)) if dof > 0 else math.nan
    se = np.sqrt(np.diag(pcov)) if np.all(np.isfinite(pcov)) else np.array([np.inf, np.inf])
    if not np.all(np.isfinite(se)) or dof < 1:
        converged = False
        flags.append("logistic fit: covariance not estimable (flat or degenerate p(t)); no intervals")
        t0_ci, k_ci = nan2, nan2.copy()
        se = np.array([np.nan, np.nan])
    else:
        q = float(stats.t.ppf(0.5 + level / 2.0, dof))
        t0_ci = np.array([t0 - q * se[0], t0 + q * se[0]])
        k_ci = np.array([k - q * se[1], k + q * se[1]])
        if k_ci[0] <= 0.0 <= k_ci[1]:
            flags.append("logistic fit: the interval of k contains 0 (no resolved transition; t0 not identified)")
    if not (ta.min() <= t0 <= ta.max()):
        flags.append(f"t0={t0:.4g} lies outside the data range [{ta.min():.4g}, {ta.max():.4g}] (extrapolated)")
    return LogisticForecast(
        t0=t0,
        t0_ci=t0_ci,
        k=k,
        k_ci=k_ci,
        se_t0=float(se[0]),
        se_k=float(se[1]),
        level=level,
        converged=converged,
        n=int(N),
        residual_std=rstd,
        flags=tuple(flags),
    )
