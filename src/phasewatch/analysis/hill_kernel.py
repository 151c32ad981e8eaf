"""The one Hill kernel: the Hill (1975) estimate from the top order statistics, with the tie rule.

B. M. Hill, "A simple general approach to inference about the tail of a distribution",
*Ann. Statist.* 3 (1975).  With ``x_(1) >= ... >= x_(k+1)`` the top ``k + 1`` order statistics of
``|x|`` and ``S = sum_{i<=k} ln(x_(i) / x_(k+1))``, ``alpha_hat = k / S`` (``"mle"``) or
``(k - 1) / S`` (``"unbiased"``).  :func:`hill_top` computes it for a batch of tails at once and
refuses a tail holding an atom or near-ties (clipped gradient norms; DEFINITIONS §3, "Degenerate
tails") with NaN, the tied fraction and the likely cause (:func:`tie_reason`).  Every Hill
estimate in phasewatch goes through it: :func:`phasewatch.analysis.hill.hill`,
:func:`~phasewatch.analysis.hill.rolling_hill`, the Lévy ratio
(:func:`phasewatch.analysis.consolidation.levy_terms`) and the coordinate tail index
(:func:`phasewatch.analysis.gradcov.coordinate_tails`).

The helpers ``_desc_logs``, ``_log_sums`` and ``_alpha_from_sums`` give ``alpha_hat_k`` for many
``k`` from one cumulative sum of the sorted logs (Hill plots, the ``k`` rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import special

from phasewatch.errors import InvalidArgumentError

from ._checks import check_choice

HillConvention = Literal["mle", "unbiased"]
_CONVENTIONS = ("mle", "unbiased")

#: Minimum ``k`` below which :data:`phasewatch.analysis.hill.FLAG_FEW_TAIL_SAMPLES` is raised.
MIN_TAIL_SAMPLES: int = 10


def _finite_abs(x: Any) -> tuple[np.ndarray, int]:
    """``|x|`` of the finite entries of ``x`` (flattened) and the number dropped."""
    a = np.asarray(x, dtype=np.float64).ravel()
    ok = np.isfinite(a)
    n_drop = int(a.size - np.count_nonzero(ok))
    if n_drop:
        a = a[ok]
    return np.abs(a), n_drop


def _dropped_flag(n_drop: int) -> tuple[str, ...]:
    return (f"dropped {n_drop} non-finite values",) if n_drop else ()


def _desc_logs(a_abs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descending positive ``|x|`` and their logs, shifted so that the first log is 0.

    Returns ``(L, v)`` with ``v`` the positive values sorted descending and
    ``L = ln(v) - ln(v[0])``. The shift keeps the cumulative sums small so that
    ``S_k = C_k - k L_k`` loses no precision.
    """
    v = np.sort(a_abs[a_abs > 0])[::-1]
    if v.size == 0:
        return np.empty(0), v
    L = np.log(v)
    L -= L[0]
    return L, v


def _log_sums(L: np.ndarray, ks: np.ndarray, csum: np.ndarray | None = None) -> np.ndarray:
    """``S_k = sum_{i<k} (L[i] - L[k])`` (0-indexed, ``L`` descending) for each ``k``."""
    if csum is None:
        csum = np.cumsum(L[: int(ks.max())])
    return csum[ks - 1] - ks * L[ks]


def _alpha_from_sums(ks: np.ndarray, S: np.ndarray, convention: str) -> np.ndarray:
    num = ks.astype(np.float64) - (1.0 if convention == "unbiased" else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(S > 0, num / np.where(S > 0, S, 1.0), np.inf)


#: Two values tie when their log-distance ``|ln a - ln b|`` is at most this (about the relative
#: difference).  Derivation: a gradient norm computed in float32 carries a relative error of a
#: few ``u log2(P)`` (``u = 2^-24``; ``<= 2e-6`` for ``P <= 10^9`` with blocked summation), and
#: ``torch.nn.utils.clip_grad_norm_`` scales by ``c / (N + 1e-6)``, which leaves clipped norms in
#: ``(c - 1e-6, c]``: a relative spread below ``1e-6 / c``, i.e. ``<= 2.5e-5`` for clip levels
#: ``c >= 0.04``.  ``3e-5`` covers both; it is 500 float32 ulps, so values that differ only by
#: float32 rounding (``~1e-7``) always tie.
TIE_RTOL: float = 3e-5
#: A near-tie group is refused when a continuous tail would produce one that large less often than
#: this (expected number of such groups among the ``k + 1`` order statistics).
TIE_FALSE_RATE: float = 1e-6
# below this many order statistics the group size is found by a loop over offsets (vectorised
# over rows); above it by one searchsorted per row
_TIE_LOOP_MAX: int = 64
# rows up to this long are fully sorted by top_order_statistics (measured at n = 100, k = 10: a
# sort of the rows 0.36 s per 10^6 windows, a partition then a sort of the top 0.46 s)
_SORT_MAX: int = 256


@dataclass(frozen=True, eq=False)
class HillTop:
    """What :func:`hill_top` returns for a batch of tails (arrays of the batch shape).

    Attributes:
        alpha
            ``alpha_hat`` in ``convention``; NaN where the tail is degenerate (``degenerate``) or
            the estimate is undefined (a non-finite or non-positive order statistic).
        log_sum
            ``S = sum_{i<=k} ln(x_(i) / x_(k+1))``.
        threshold
            ``x_(k+1)``.
        tied
            Size of the largest group of the ``k + 1`` order statistics lying within
            :data:`TIE_RTOL` (log-distance) of the group's largest member (1: no ties).
        tie_value
            That group's largest member (NaN when ``tied < 2``).
        tie_at_top
            The group holds ``x_(1)`` (what clipping or a cap produces).
        degenerate
            The tail was refused (see :func:`hill_top`); always False with ``check_ties=False``.
        k, convention
    """

    alpha: np.ndarray
    log_sum: np.ndarray
    threshold: np.ndarray
    tied: np.ndarray
    tie_value: np.ndarray
    tie_at_top: np.ndarray
    degenerate: np.ndarray
    k: int
    convention: str


def top_order_statistics(x: Any, k: int) -> np.ndarray:
    """The ``k + 1`` largest values along the last axis, descending (``(..., n) -> (..., k + 1)``):
    a partition then a sort of the ``k + 1`` (``O(n + k log k)`` per row).  NaN sorts below every
    number (it never enters the top): callers mark rows that hold one."""
    a = np.asarray(x, dtype=np.float64)
    n = a.shape[-1]
    if not 1 <= k < n:
        raise InvalidArgumentError(f"need 1 <= k < n for the top k+1 of n values; got k={k}, n={n}")
    if n <= _SORT_MAX or k + 1 == n:  # short rows: a full sort is faster than a partition
        return -np.sort(-a, axis=-1)[..., : k + 1]
    top = -np.partition(-a, k, axis=-1)[..., : k + 1]
    top.sort(axis=-1)
    return top[..., ::-1]


def _tie_groups(L: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Largest near-tie group of each row of ``L`` (logs, descending along axis 1): its size
    ``m`` and the index of its largest member, where a group starting at ``i`` holds every
    ``j >= i`` with ``L[i] - L[j] <= rtol``.  Rows with a NaN get ``m = 1``."""
    B, K = L.shape
    m = np.ones(B, dtype=np.int64)
    start = np.zeros(B, dtype=np.int64)
    if K < 2:
        return m, start
    if K <= _TIE_LOOP_MAX:
        rows = np.arange(B)
        for d in range(1, K):  # a group of >= d+1 exists iff L[i] - L[i+d] <= rtol for some i
            Lr = L if d == 1 else L[rows]
            with np.errstate(invalid="ignore"):
                hit = (Lr[:, :-d] - Lr[:, d:]) <= rtol
            anyhit = hit.any(axis=1)
            rows, hit = rows[anyhit], hit[anyhit]
            if not rows.size:
                break
            m[rows] = d + 1
            start[rows] = np.argmax(hit, axis=1)
        return m, start
    for r in range(B):  # long tails (one pooled sample, a few rows): one searchsorted per row
        neg = -L[r]
        if not np.isfinite(neg).all():
            continue
        size = np.searchsorted(neg, neg + rtol, side="right") - np.arange(K)
        i = int(np.argmax(size))
        m[r], start[r] = int(size[i]), i
    return m, start


def hill_top(
    top: Any, *, convention: HillConvention = "mle", rtol: float = TIE_RTOL, check_ties: bool = True,
) -> HillTop:
    """The Hill kernel: ``alpha_hat`` from the ``k + 1`` largest values of each tail in a batch.

    ``top`` is ``(..., k + 1)``, each row descending, ``x_(1) >= ... >= x_(k+1) > 0``
    (:func:`top_order_statistics` gives it).  ``S = sum_{i<=k} ln(x_(i) / x_(k+1))`` and
    ``alpha_hat = k / S`` (``"mle"``) or ``(k - 1) / S`` (``"unbiased"``) (Hill 1975).
    Every Hill estimate of phasewatch goes through here: :func:`hill`, :func:`rolling_hill`,
    the Lévy ratio (:mod:`phasewatch.analysis.noise`, :func:`phasewatch.analysis.gradcov.levy_rolling`)
    and the coordinate tail index (:func:`phasewatch.analysis.gradcov.coordinate_tails`).

    **Degenerate tails** (DEFINITIONS §3).  An atom or near-ties in the tail (clipped gradient
    norms sit at the clip level, float-rounded) make Hill undefined: ``S`` is then a sum of
    rounding errors and ``alpha_hat`` reads ``10^6``-``10^7``.  Rule: let ``m`` be the size of the
    largest group of the ``k + 1`` order statistics within ``rtol`` (log-distance, default
    :data:`TIE_RTOL`, derived there) of the group's largest member.  The tail is refused when

    * ``m = k + 1`` (the whole tail spans less than ``rtol``: nothing but an atom), or
    * ``m >= 2`` and a continuous tail would give such a group fewer than :data:`TIE_FALSE_RATE`
      times: under the fitted Pareto tail (``alpha_hat = k / S``) the density of ``ln x`` is at
      most ``k alpha_hat`` (at the threshold), so a tail value has at most about
      ``lambda = (k + 1) alpha_hat rtol`` others within ``rtol`` (Poisson), and the expected
      number of groups of ``m`` is about ``(k + 1) P(Poisson(lambda) >= m - 1)``.

    The second condition is scale-free: exact duplicates in a genuine tail (``lambda`` small, ``m``
    2 or 3) pass, and a light, narrow tail is not refused for chance coincidences (``lambda``
    grows with ``alpha_hat``: windows of ``N(1, 10^-3)`` values in float32, ``alpha_hat`` about
    2000, are never refused in the tests); an atom of a few percent of the sample at the top of
    the tail is refused at any ``k``.  A refused tail has ``alpha = NaN`` and ``degenerate = True``; callers add the
    reason (:func:`tie_reason`).  ``check_ties=False`` skips the rule, for bootstrap resamples,
    whose duplicates are made by the resampling (the rule is applied once to the original sample).

    Returns :class:`HillTop` (NaN ``alpha`` also where an order statistic is not finite or the
    threshold is not positive).

    Examples:
        On exact Pareto quantiles ``x_(i) = (i / (n + 1))^(-1/alpha)`` the log-spacings are exact:
        ``S = sum_{i<=k} ln((k + 1) / i) / alpha``, so ``alpha_hat = alpha k / sum_{i<=k} ln((k+1)/i)``
        (1.5051 for ``alpha = 1.5``, ``k = 1000``; the excess is ``~ ln(2 pi k) / (2k)``).  The
        tolerance: ``k`` logs of values up to ``e^6``, each off by ``<= 6u``, move ``S ~ 664`` by
        ``<= 7e-13``, a relative ``1e-15``; ``1e-12`` leaves room.

        >>> import math
        >>> import numpy as np
        >>> n, k, alpha = 10_000, 1000, 1.5
        >>> x = (np.arange(1, n + 1) / (n + 1)) ** (-1 / alpha)
        >>> h = hill_top(top_order_statistics(x, k))
        >>> exact = alpha * k / sum(math.log((k + 1) / i) for i in range(1, k + 1))
        >>> bool(abs(float(h.alpha) - exact) < 1e-12 * exact), bool(h.degenerate)
        (True, False)
    """
    t = np.asarray(top, dtype=np.float64)
    if t.ndim == 0 or t.shape[-1] < 2:
        raise InvalidArgumentError(f"hill_top needs (..., k+1) order statistics with k >= 1, got shape {t.shape}")
    check_choice("convention", convention, _CONVENTIONS)
    k = t.shape[-1] - 1
    shape = t.shape[:-1]
    thr = t[..., k]
    with np.errstate(divide="ignore", invalid="ignore"):
        R = np.log(t / t[..., k:k + 1])  # ln(x_(i) / x_(k+1)), descending, R[..., k] = 0
        S = np.sum(R[..., :k], axis=-1)
        alpha = (k - (1.0 if convention == "unbiased" else 0.0)) / S
    ok = np.isfinite(S) & (S > 0) & (thr > 0)
    tied = np.ones(shape, dtype=np.int64)
    tie_value = np.full(shape, np.nan)
    at_top = np.zeros(shape, dtype=bool)
    degenerate = np.zeros(shape, dtype=bool)
    if check_ties:
        # differences of R are differences of ln x; a row with a non-finite entry gets no group
        m, start = _tie_groups(R.reshape(-1, k + 1), float(rtol))
        fin = np.isfinite(t).all(axis=-1).reshape(-1) & (thr > 0).reshape(-1)
        grp = np.flatnonzero(fin & (m >= 2))
        if grp.size:
            mg, sg = m[grp], start[grp]
            s_g = np.asarray(S).reshape(-1)[grp]
            with np.errstate(divide="ignore", invalid="ignore"):
                lam = np.where(s_g > 0, (k + 1) * (k / s_g) * float(rtol), np.inf)
                expected = (k + 1) * special.gammainc(mg - 1, lam)
            refuse = (mg == k + 1) | (expected < TIE_FALSE_RATE)
            tied.reshape(-1)[grp] = mg
            tie_value.reshape(-1)[grp] = t.reshape(-1, k + 1)[grp, sg]
            at_top.reshape(-1)[grp] = sg == 0
            degenerate.reshape(-1)[grp] = refuse
    alpha = np.where(ok & ~degenerate, alpha, np.nan)
    return HillTop(alpha=alpha, log_sum=S, threshold=thr, tied=tied, tie_value=tie_value, tie_at_top=at_top,
                   degenerate=degenerate, k=k, convention=convention)


def tied_fraction(x: Any, value: Any, rtol: float = TIE_RTOL) -> np.ndarray:
    """Fraction of the finite values of each row of ``x`` (``(..., n)``) within ``rtol``
    (log-distance) of ``value`` (``(...)``): how much of the sample sits in the atom."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    v = np.asarray(value, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        close = np.abs(np.log(a / v)) <= rtol
    n = np.maximum(np.isfinite(a).sum(axis=-1), 1)
    return close.sum(axis=-1) / n


def tie_reason(fraction: float, value: float, at_top: bool, *, what: str = "values") -> str:
    """One-line reason for a refused tail, naming the tied fraction and the likely cause, e.g.
    ``"degenerate tail: 52% of norms tied at 1 at the top (likely gradient clipping at 1; record
    the norm before clipping)"``."""
    pct = f"{100.0 * fraction:.3g}%"
    if at_top:
        cause = (f"likely gradient clipping at {value:.3g}; record the norm before clipping" if "norm" in what
                 else f"likely a clip or cap at {value:.3g}")
        return f"degenerate tail: {pct} of {what} tied at {value:.6g} at the top ({cause}); Hill undefined"
    return (f"degenerate tail: {pct} of {what} tied at {value:.6g} inside the tail (an atom: rounded or "
            "quantised values?); Hill undefined")
