"""The Hill (1975) tail-index estimator with rules for ``k``, Hill plots and rolling windows.

Implements the Hill part of section 3 of ``DEFINITIONS.md`` ("Heavy tails"): ``P(|X| > x) ~ c
x^{-alpha}``, ``alpha_hat = k / sum_{i<=k} ln(|x|_(i) / |x|_(k+1))`` (B. M. Hill, *Ann. Statist.*
3, 1975), with ``k`` by a fixed fraction, ``sqrt(n)``, the Danielsson et al. (2001) double
bootstrap or the Clauset et al. (2009) KS rule (:mod:`phasewatch.analysis.hill_k_selection`), an
exact ``chi^2`` or asymptotic interval and a Hill-plot stability diagnostic.  :func:`hill_curve`
gives ``alpha_hat_k`` for many ``k`` (Hill plots), :func:`rolling_hill` the estimate on every
window.  The estimate itself comes from the one kernel, :func:`phasewatch.analysis.hill_kernel.hill_top`.

Known biases (DEFINITIONS §3): on alpha-stable data with ``alpha`` near 2 Hill at a fixed fraction
overestimates ``alpha``; on Gaussian data it returns 4.7 to 8-20.  Every estimate above 2 is
flagged :data:`FLAG_NO_HEAVY_TAIL`: it is not a number to interpret.

"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
from scipy import special

from phasewatch.errors import InvalidArgumentError, PhasewatchError

from ._checks import check_choice, check_level
from ._checks import rng as _rng
from .hill_k_selection import _double_bootstrap_select, _ks_one, _ks_select
from .hill_kernel import (
    _CONVENTIONS,
    MIN_TAIL_SAMPLES,
    TIE_RTOL,
    HillConvention,
    HillTop,
    _alpha_from_sums,
    _desc_logs,
    _dropped_flag,
    _finite_abs,
    _log_sums,
    hill_top,
    tie_reason,
    tied_fraction,
    top_order_statistics,
)
from .result import Estimate

HillRule = Literal["fraction", "sqrt", "double_bootstrap", "ks"]
HillCI = Literal["exact", "asymptotic"]
_RULES = ("fraction", "sqrt", "double_bootstrap", "ks")
_CI_METHODS = ("exact", "asymptotic")

#: Flag raised when a Hill estimate exceeds 2 (DEFINITIONS §3, "Known bias").
FLAG_NO_HEAVY_TAIL: str = "alpha > 2: no evidence of a stable heavy tail"
#: Flag raised when the Hill plot spread over ``[k/2, 2k]`` exceeds :data:`UNSTABLE_SPREAD`.
FLAG_HILL_UNSTABLE: str = "hill plot unstable"
#: Flag raised when fewer than :data:`MIN_TAIL_SAMPLES` order statistics are used.
FLAG_FEW_TAIL_SAMPLES: str = "k < 10: too few tail samples"
#: Relative Hill-plot spread ``(max - min) / alpha_hat`` above which the plot is unstable.
UNSTABLE_SPREAD: float = 0.5

# fewest finite non-zero values for hill (any k) and for the data-driven rules
_MIN_HILL_VALUES = 3
_MIN_SELECTION_VALUES = 20


@dataclass(frozen=True)
class HillResult(Estimate):
    """Hill estimate of the tail index (DEFINITIONS §3, "Hill").

    Attributes:
        estimate
            ``alpha_hat`` in the requested ``convention``.
        ci
            ``(lo, hi)`` confidence interval for ``alpha`` at ``level``.
        k
            Number of upper order statistics used.
        n
            Number of finite input values (after dropping ``n_dropped`` non-finite ones).
        threshold
            ``|x|_(k+1)``, the largest value *not* in the tail (the Pareto ``x_min``).
        rule
            ``"fraction"``, ``"sqrt"``, ``"double_bootstrap"``, ``"ks"``, or ``"fixed"``
            (``k`` given by the caller).
        convention
            ``"mle"`` (``k / S``) or ``"unbiased"`` (``(k - 1) / S``).
        ci_method
            ``"exact"`` (chi^2) or ``"asymptotic"`` (normal).
        input_description
            What was fed in, as stated by the caller.
        stability
            ``(max - min) / alpha_hat`` of ``alpha_hat_j`` over ``j in [max(2, k // 2),
            min(2k, n_pos - 1)]`` (same convention); ``> 0.5`` is flagged unstable.
        flags
            Human-readable warnings (see the ``FLAG_*`` constants); ``"dropped N
            non-finite values"`` when inputs were dropped.
        level
            Confidence level of ``ci``.
        std_error
            ``alpha_hat / sqrt(k)``.
        log_sum
            ``S = sum_{i<=k} ln(|x|_(i) / |x|_(k+1))``.
        ks_distance
            Kolmogorov–Smirnov distance between the ``k`` tail values and the fitted
            Pareto (MLE ``alpha``, ``x_min = threshold``).
        n_dropped
            Number of non-finite inputs dropped.
        selection
            Read-only diagnostics of the ``k`` rule (e.g. ``n1``, ``k1``, ``k2``, ``rho``
            for the double bootstrap; the number of candidates for ``ks``).
        degenerate
            The tail was refused: an atom or near-ties in it (see :func:`hill_top`); then
            ``estimate``, ``ci``, ``std_error``, ``stability`` are NaN and ``reason`` says why.
        tied_fraction
            Fraction of the ``n`` values in the atom (0 when not degenerate).
        reason
            One line naming the tied fraction and the likely cause (also the last flag); ``""``
            when not degenerate.
    """

    _statistic_field = "estimate"  # statistic / confidence_interval: Estimate
    _interval_field = "ci"

    estimate: float
    ci: tuple[float, float]
    k: int
    n: int
    threshold: float
    rule: str
    convention: str
    ci_method: str
    input_description: str
    stability: float
    flags: tuple[str, ...]
    level: float
    std_error: float
    log_sum: float
    ks_distance: float
    n_dropped: int
    selection: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    degenerate: bool = False
    tied_fraction: float = 0.0
    reason: str = ""


@dataclass(frozen=True, eq=False)
class HillCurve:
    """``alpha_hat_k`` for many ``k`` (a Hill plot).

    Attributes:
        k
            int64 ``(m,)`` the requested ``k``.
        alpha
            float64 ``(m,)`` ``alpha_hat_k`` (``inf`` where the ``k`` top values all equal
            the threshold).
        threshold
            float64 ``(m,)`` ``|x|_(k+1)``.
        n
            Number of finite values used; ``n_dropped`` non-finite values were dropped.
        convention
            ``"mle"`` or ``"unbiased"``.
        flags
            ``("dropped N non-finite values",)`` or empty.
    """

    k: np.ndarray
    alpha: np.ndarray
    threshold: np.ndarray
    n: int
    n_dropped: int
    convention: str
    flags: tuple[str, ...]


def hill_curve(x: Any, ks: Any = None, convention: HillConvention = "mle") -> HillCurve:
    """Hill estimates ``alpha_hat_k`` for many ``k`` at once (a Hill plot).

    With ``|x|_(1) >= |x|_(2) >= ...`` and ``S_k = sum_{i=1}^{k} ln(|x|_(i) / |x|_(k+1))``,
    ``alpha_hat_k = k / S_k`` (``"mle"``) or ``(k - 1) / S_k`` (``"unbiased"``)
    (Hill, *Ann. Statist.* 3, 1975). All ``S_k`` come from one cumulative sum of the
    sorted logs, ``S_k = C_k - k ln|x|_(k+1)``: ``O(n log n)`` for the sort plus
    ``O(n + len(ks))``.

    Parameters:
        x
            Any array; ``|x|`` of the finite entries is used (non-finite entries are
            dropped and counted in ``flags``; zeros are kept but never enter a tail).
        ks
            Integer ``k`` values in ``[1, n_pos - 1]`` (``n_pos`` the number of non-zero
            finite values); default all of them.
        convention
            ``"mle"`` or ``"unbiased"``.

    Returns:
        :class:`HillCurve` with ``alpha`` aligned to ``k``.

    Raises:
        PhasewatchError
            Fewer than 2 finite non-zero values, or a ``k`` out of range.
    """
    check_choice("convention", convention, _CONVENTIONS)
    a, n_drop = _finite_abs(x)
    L, v = _desc_logs(a)
    n_pos = L.size
    if n_pos < 2:
        raise PhasewatchError(f"hill_curve needs at least 2 finite non-zero values, got {n_pos}")
    if ks is None:
        k_arr = np.arange(1, n_pos, dtype=np.int64)
    else:
        k_raw = np.asarray(ks)
        if k_raw.size and not np.issubdtype(k_raw.dtype, np.integer):
            if not np.all(k_raw == np.round(k_raw)):
                raise InvalidArgumentError("ks must be integers")
        k_arr = np.atleast_1d(k_raw).astype(np.int64).ravel()
        if k_arr.size == 0:
            raise InvalidArgumentError("ks is empty")
        if k_arr.min() < 1 or k_arr.max() > n_pos - 1:
            raise PhasewatchError(
                f"ks must lie in [1, {n_pos - 1}] for {n_pos} non-zero finite values, "
                f"got [{k_arr.min()}, {k_arr.max()}]"
            )
    S = _log_sums(L, k_arr)
    alpha = _alpha_from_sums(k_arr, S, convention)
    return HillCurve(
        k=k_arr,
        alpha=alpha,
        threshold=v[k_arr],
        n=int(a.size),
        n_dropped=n_drop,
        convention=convention,
        flags=_dropped_flag(n_drop),
    )


def _degenerate_hill(a: np.ndarray, v: np.ndarray, kern: HillTop, *, n: int, rule: str, ci: str, level: float,
                     flags: list[str], n_drop: int, selection: dict[str, float],
                     input_description: str) -> HillResult:
    """The :class:`HillResult` of a refused tail: NaN estimate and interval, the reason in ``flags``."""
    value = float(kern.tie_value)
    frac = float(tied_fraction(a, value))
    what = "norms" if "norm" in input_description else "values"
    reason = tie_reason(frac, value, bool(kern.tie_at_top), what=what)
    nan = math.nan
    return HillResult(
        estimate=nan, ci=(nan, nan), k=kern.k, n=n, threshold=float(v[kern.k]), rule=rule,
        convention=kern.convention, ci_method=ci, input_description=input_description, stability=nan,
        flags=tuple(flags) + (reason,), level=level, std_error=nan, log_sum=float(kern.log_sum), ks_distance=nan,
        n_dropped=n_drop, selection=MappingProxyType(dict(selection)), degenerate=True, tied_fraction=frac,
        reason=reason,
    )


def hill(
    x: Any,
    k: int | None = None,
    rule: HillRule = "fraction",
    fraction: float = 0.1,
    convention: HillConvention = "mle",
    ci: HillCI = "exact",
    level: float = 0.95,
    seed: int | np.random.Generator | None = None,
    *,
    input_description: str = "unspecified",
    n_bootstrap: int = 100,
    ks_max_fraction: float = 0.5,
) -> HillResult:
    """Hill (1975) estimate of the tail index of ``|x|`` with a rule for ``k``.

    With ``|x|_(1) >= |x|_(2) >= ...`` the finite ``|x|`` sorted descending and
    ``S = sum_{i=1}^{k} ln(|x|_(i) / |x|_(k+1))``, the conditional MLE is
    ``alpha_hat = k / S`` (``convention="mle"``) or ``(k - 1) / S`` (``"unbiased"``,
    unbiased under an exact Pareto tail). B. M. Hill, "A simple general approach to
    inference about the tail of a distribution", *Ann. Statist.* 3 (1975).

    Choice of ``k`` (``rule``; an explicit ``k`` overrides it and is reported as
    ``"fixed"``): ``"fraction"`` ``k = floor(fraction * n)`` (default 0.1, as the notes use);
    ``"sqrt"`` ``k = floor(sqrt(n))``; ``"double_bootstrap"`` Danielsson, de Haan, Peng & de
    Vries (2001) with ``n_bootstrap`` resamples per stage (about 0.13 s at ``n = 10^5``);
    ``"ks"`` Clauset, Shalizi & Newman (2009), the KS distance evaluated on 200 log-spaced
    candidates in ``[10, ks_max_fraction * n]`` refined by 24 (well under a second at
    ``n = 10^6``).  Formulas and references of the two data-driven rules:
    :mod:`phasewatch.analysis.hill_k_selection`.

    Rules yielding ``k < 2`` or ``k >= n_pos`` (``n_pos`` the number of non-zero
    values) are clipped to ``[2, n_pos - 1]`` with a flag.

    Confidence interval at ``level``:

    ``"exact"``  under an exact Pareto tail above ``|x|_(k+1)`` the log-ratios are iid
        exponential with rate ``alpha``, so ``2 alpha S ~ chi^2_{2k}`` and
        ``alpha in [chi^2_{2k,(1-level)/2} / (2S), chi^2_{2k,(1+level)/2} / (2S)]``
        (same for both conventions: it is an interval for ``alpha``, not around
        ``alpha_hat``). Exact for a fixed fraction; approximate when ``k`` is
        chosen from the data.
    ``"asymptotic"``  ``alpha_hat +- z_{(1+level)/2} alpha_hat / sqrt(k)`` (lower end
        clipped at 0).

    Stability diagnostic: ``(max - min) / alpha_hat`` of ``alpha_hat_j`` over
    ``j in [max(2, k // 2), min(2k, n_pos - 1)]``.

    Parameters:
        x
            Any array (e.g. gradient norms over steps); ``|x|`` is used. Non-finite entries
            are dropped and counted in ``flags``.
        k, rule, fraction, convention, ci, level
            As above.
        seed
            Seed or Generator for the double bootstrap (the only random rule).
        input_description
            What ``x`` is (DEFINITIONS §3 asks that it be stated), copied to the result.
        n_bootstrap
            Resamples per stage of the double bootstrap.
        ks_max_fraction
            Largest ``k / n`` considered by the ``ks`` rule, in ``(0, 1]``.

    Returns:
        :class:`HillResult` with ``estimate``, ``ci``, ``k``, ``n``, ``threshold =
        |x|_(k+1)``, ``rule``, ``convention``, ``ci_method``, ``stability`` and
        ``flags`` (``"alpha > 2: no evidence of a stable heavy tail"``, ``"hill plot
        unstable"``, ``"k < 10: too few tail samples"``, ``"dropped N non-finite
        values"``, clipping of ``k``).

    Raises:
        PhasewatchError
            Fewer than 3 finite non-zero values (20 for the ``ks`` and
            ``double_bootstrap`` rules), an explicit ``k`` out of range, or every
            non-zero value equal (within :data:`TIE_RTOL`): a constant has no tail.
            A tail with an atom or near-ties is not an error: it gives ``estimate = NaN``,
            ``degenerate = True`` and the ``reason`` (:func:`hill_top`).
        ValueError
            Unknown ``rule``/``convention``/``ci``, ``level`` or ``fraction`` outside
            ``(0, 1)``, ``k < 2``.

    Examples:
        Exact Pareto(1.5) quantiles; :func:`~phasewatch.analysis.hill_kernel.hill_top` shows the exact value.

        >>> import numpy as np
        >>> r = hill((np.arange(1, 10_001) / 10_001) ** (-1 / 1.5), k=1000)
        >>> round(r.estimate, 3), bool(r.ci[0] < 1.5 < r.ci[1]), r.flags
        (1.505, True, ())
    """
    level = _check_hill_args(k, rule, convention, ci, level, fraction, ks_max_fraction, n_bootstrap)
    need = _MIN_SELECTION_VALUES if (k is None and rule in ("ks", "double_bootstrap")) else _MIN_HILL_VALUES
    a, n_drop, L, v = _hill_values(x, need)
    n, n_pos = int(a.size), int(L.size)
    flags: list[str] = list(_dropped_flag(n_drop))
    k_use, used_rule, selection = _choose_k(L, n, k, rule, fraction, ks_max_fraction, n_bootstrap, seed, flags)
    kern = hill_top(v[: k_use + 1], convention=convention)  # the kernel: estimate and tie rule
    if bool(kern.degenerate):
        return _degenerate_hill(a, v, kern, n=n, rule=used_rule, ci=ci, level=level, flags=flags,
                                n_drop=n_drop, selection=selection, input_description=str(input_description))
    S = float(kern.log_sum)
    est = float(kern.alpha)
    stability = _hill_stability(L, k_use, n_pos, convention, est)
    lo, hi = _hill_interval(ci, k_use, S, est, level)
    ks_d = (
        float(selection["ks_distance"])
        if "ks_distance" in selection
        else _ks_one(L, k_use, k_use / S, np.arange(k_use, dtype=np.float64) + 0.5)
    )
    if est > 2.0:
        flags.append(FLAG_NO_HEAVY_TAIL)
    if not stability <= UNSTABLE_SPREAD:
        flags.append(FLAG_HILL_UNSTABLE)
    if k_use < MIN_TAIL_SAMPLES:
        flags.append(FLAG_FEW_TAIL_SAMPLES)
    return HillResult(
        estimate=est, ci=(lo, hi), k=k_use, n=n, threshold=float(v[k_use]), rule=used_rule,
        convention=convention, ci_method=ci, input_description=str(input_description), stability=stability,
        flags=tuple(flags), level=level, std_error=est / math.sqrt(k_use), log_sum=S, ks_distance=ks_d,
        n_dropped=n_drop, selection=MappingProxyType(dict(selection)),
    )


def _check_hill_args(k: int | None, rule: str, convention: str, ci: str, level: float, fraction: float,
                     ks_max_fraction: float, n_bootstrap: int) -> float:
    """The argument checks of :func:`hill`; returns the checked ``level``."""
    check_choice("rule", rule, _RULES)
    check_choice("convention", convention, _CONVENTIONS)
    check_choice("ci", ci, _CI_METHODS)
    level = check_level(level)
    if not 0.0 < float(fraction) < 1.0:
        raise InvalidArgumentError(f"fraction must be in (0, 1), got {fraction}")
    if k is not None:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise InvalidArgumentError(f"k must be an int, got {type(k).__name__}")
        if k < 2:
            raise InvalidArgumentError(f"k must be >= 2, got {k}")
    if not 0.0 < float(ks_max_fraction) <= 1.0:
        raise InvalidArgumentError(f"ks_max_fraction must be in (0, 1], got {ks_max_fraction}")
    if int(n_bootstrap) < 1:
        raise InvalidArgumentError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    return level


def _hill_values(x: Any, need: int) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """``(|x| finite, n dropped, L, v)`` (:func:`~phasewatch.analysis.hill_kernel._desc_logs`), refusing
    fewer than ``need`` non-zero values and a constant."""
    a, n_drop = _finite_abs(x)
    L, v = _desc_logs(a)
    n_pos = int(L.size)
    if n_pos < need:
        raise PhasewatchError(
            f"hill needs at least {need} finite non-zero values, got {n_pos}"
            + (f" (after dropping {n_drop} non-finite)" if n_drop else "")
        )
    if L[0] - L[-1] <= TIE_RTOL:  # one value repeated: not a tail but a constant
        raise PhasewatchError(f"hill: all {n_pos} non-zero values equal {v[0]:.6g} (within {TIE_RTOL:g}); "
                              "there is no tail to estimate")
    return a, n_drop, L, v


def _choose_k(L: np.ndarray, n: int, k: int | None, rule: str, fraction: float, ks_max_fraction: float,
              n_bootstrap: int, seed: int | np.random.Generator | None,
              flags: list[str]) -> tuple[int, str, dict[str, float]]:
    """``(k, rule used, selection info)`` of :func:`hill`: the explicit ``k`` (``"fixed"``) or the
    rule's, clipped to ``[2, n_pos - 1]`` (a flag appended to ``flags`` when clipped)."""
    n_pos = int(L.size)
    if k is not None:
        if k > n_pos - 1:
            raise PhasewatchError(f"k={k} too large: at most {n_pos - 1} for {n_pos} non-zero finite values")
        return int(k), "fixed", {}
    selection: dict[str, float] = {}
    if rule == "fraction":
        k0 = int(math.floor(float(fraction) * n + 1e-9))
    elif rule == "sqrt":
        k0 = int(math.floor(math.sqrt(n)))
    elif rule == "ks":
        k0, selection = _ks_select(L, float(ks_max_fraction))
    else:
        k0, selection = _double_bootstrap_select(L, int(n_bootstrap), _rng(seed))
    k_use = min(max(k0, 2), n_pos - 1)
    if k_use != k0:
        flags.append(f"k clipped to {k_use} (rule {rule} gave {k0})")
    return k_use, rule, selection


def _hill_stability(L: np.ndarray, k_use: int, n_pos: int, convention: str, est: float) -> float:
    """Hill-plot spread ``(max - min) / alpha_hat`` of ``alpha_hat_j``, ``j in [max(2, k//2), min(2k, n_pos-1)]``."""
    hi_span = min(2 * k_use, n_pos - 1)
    span = np.arange(max(2, k_use // 2), hi_span + 1, dtype=np.int64)
    if k_use not in span:
        span = np.union1d(span, [k_use])
    csum = np.cumsum(L[: int(span.max())])
    a_span = _alpha_from_sums(span, _log_sums(L, span, csum), convention)
    with np.errstate(invalid="ignore"):
        return float((np.max(a_span) - np.min(a_span)) / est) if est > 0 else math.inf


def _hill_interval(ci: str, k_use: int, S: float, est: float, level: float) -> tuple[float, float]:
    """The interval of :func:`hill`: exact ``chi^2_{2k}`` on ``2 alpha S`` or ``est +- z est/sqrt(k)``."""
    if ci == "exact":
        lo = float(special.gammaincinv(k_use, (1.0 - level) / 2.0)) / S
        hi = float(special.gammaincinv(k_use, (1.0 + level) / 2.0)) / S
        return lo, hi
    z = float(special.ndtri((1.0 + level) / 2.0))
    half_w = z * est / math.sqrt(k_use)
    return max(0.0, est - half_w), est + half_w


@dataclass(frozen=True)
class RollingHill(Estimate):
    """Hill estimates over a sliding window of a series (e.g. gradient norms over steps).

    ``ends`` the index of each window's last value; ``alpha`` and ``ci`` ``(N, 2)`` NaN where a
    window holds a non-finite value or its tail is refused; ``degenerate`` (bool, per window) the
    refused windows (an atom or near-ties in the top ``k + 1``, :func:`hill_top`), with
    ``tied_fraction`` (fraction of the window in the atom, 0 elsewhere) and ``tie_value`` (the
    atom); ``flags`` one line per kind of refusal with its count (see :meth:`reason`).
    """

    _statistic_field = "alpha"  # statistic / confidence_interval: Estimate
    _interval_field = "ci"

    ends: np.ndarray
    alpha: np.ndarray
    ci: np.ndarray
    k: int
    window: int
    level: float
    input_description: str
    degenerate: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    tied_fraction: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tie_value: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tie_at_top: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    flags: tuple[str, ...] = ()

    def reason(self, i: int) -> str:
        """The one-line reason window ``i`` was refused (``""`` if it was not)."""
        if not bool(self.degenerate[i]):
            return ""
        what = "norms" if "norm" in self.input_description else "values"
        return tie_reason(float(self.tied_fraction[i]), float(self.tie_value[i]), bool(self.tie_at_top[i]),
                          what=what)


def rolling_hill(
    x: Any, window: int = 100, fraction: float = 0.1, level: float = 0.95,
    *, input_description: str = "gradient norms over steps",
) -> RollingHill:
    """Hill's α̂_k = k / Σ_{i≤k} ln(x_(i)/x_(k+1)) on every window of ``window`` consecutive values,
    with k = ⌊fraction·window⌋ (the framework note's choice: the top 10 % of 100 gradient norms)
    and the exact χ² interval 2αS ~ χ²_{2k} (Hill 1975).  Windows with a non-finite value are NaN;
    windows whose top k+1 hold an atom or near-ties (clipped gradient norms) are refused by the
    kernel's rule (:func:`hill_top`): NaN, ``degenerate`` True, the tied fraction and the reason.

    The values of a window are a time series, not independent draws, so the interval is optimistic;
    α̂ > 2 is no evidence of a stable heavy tail.  Vectorised: partitions of (block, window) views
    through :func:`top_order_statistics` and :func:`hill_top`, memory O(block).
    Returns :class:`RollingHill` with ``ends`` the index of each window's last value.
    """
    from numpy.lib.stride_tricks import sliding_window_view
    from scipy import stats

    level = check_level(level)
    v = np.abs(np.asarray(x, dtype=np.float64))
    k = int(fraction * window)
    if window < 3 or not 1 <= k < window:
        raise InvalidArgumentError(f"rolling_hill: window={window}, fraction={fraction} give k={k}; "
                                   "need 1 <= k < window")
    if len(v) < window:
        e = np.empty(0, dtype=np.int64)
        return RollingHill(e, np.empty(0), np.empty((0, 2)), k, window, level, input_description)
    w = sliding_window_view(v, window)
    N = len(w)
    S, alpha = np.empty(N), np.empty(N)
    degen, at_top = np.zeros(N, dtype=bool), np.zeros(N, dtype=bool)
    tie_value = np.full(N, np.nan)
    bad = ~np.isfinite(w).all(axis=1) if not np.isfinite(v).all() else np.zeros(N, dtype=bool)
    block = max(1, (1 << 20) // window)  # windows per block: each partitioned copy stays ~8 MiB
    for a in range(0, N, block):  # rows are independent: blocks give the same values
        kern = hill_top(top_order_statistics(w[a: a + block], k))
        S[a: a + block], alpha[a: a + block] = kern.log_sum, kern.alpha
        degen[a: a + block], at_top[a: a + block] = kern.degenerate, kern.tie_at_top
        tie_value[a: a + block] = kern.tie_value
    degen &= ~bad
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = stats.chi2.ppf((1 - level) / 2, 2 * k) / (2 * S)
        hi = stats.chi2.ppf((1 + level) / 2, 2 * k) / (2 * S)
    nan = bad | ~np.isfinite(alpha)
    alpha[nan], lo[nan], hi[nan] = np.nan, np.nan, np.nan
    frac = np.zeros(N)
    idx = np.flatnonzero(degen)
    for a in range(0, idx.size, block):  # only the refused windows: how much of each is the atom
        frac[idx[a: a + block]] = tied_fraction(w[idx[a: a + block]], tie_value[idx[a: a + block]])
    flags: list[str] = []
    for top_, label in ((True, "at the top (likely clipping or a cap)"), (False, "inside the tail (an atom)")):
        sel = degen & (at_top == top_)
        if sel.any():
            flags.append(f"{int(sel.sum())} of {N} windows refused: near-tied values {label}, up to "
                         f"{100 * float(np.max(frac[sel])):.3g}% of a window; Hill undefined there")
    ends = np.arange(window - 1, len(v), dtype=np.int64)
    return RollingHill(ends, alpha, np.stack([lo, hi], axis=1), k, window, level, input_description,
                       degen, frac, np.where(degen, tie_value, np.nan), degen & at_top, tuple(flags))
