"""Sufficient statistics of a measurement of gradient samples, and the bootstrap helpers.

A *measurement* is ``n`` gradients ``g^(1..n)`` taken at (nearly) the same parameters, each the
mean over ``b`` examples (per-example gradients: ``b = 1``; micro-batches, per-rank gradients or
probe batches: ``b`` = their size).  The estimators of :mod:`phasewatch.analysis.consolidation`
and :mod:`phasewatch.analysis.noise_scale` take them either raw, as an ``(n, P)`` array
``samples`` (one gradient per row), or as the sufficient statistics the recorder stores
(DEFINITIONS §2): ``n``, ``b``, ``mean_sq_norm = ||g_bar||^2`` and
``trace = T = sum_i ||g^(i) - g_bar||^2 / (n-1)`` (the unbiased estimate of ``Tr Sigma_b``),
optionally with the four moment statistics of :class:`SufficientStatistics` (``quad``,
``trace_sq``, ``fourth``, ``third``) that make the delta-method interval distribution-free.
``mean_sq_norm`` and ``trace`` are additive over layers; the moment statistics are not.
Units: ``||g||^2`` and ``T`` in (loss / parameter)^2.

"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from phasewatch.errors import PhasewatchError


def _check_n_boot(n_boot: int) -> int:
    n_boot = int(n_boot)
    if n_boot < 10:
        raise PhasewatchError(f"n_boot must be >= 10, got {n_boot}")
    return n_boot


def _as_out(x: np.ndarray) -> float | np.ndarray:
    """0-d arrays become Python floats; everything else stays an array."""
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else x


def _percentile_ci(reps: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates, without interpolation.

    Uses the order statistics just outside the nominal quantiles (``method="lower"``
    / ``"higher"``), which is exact for +/-inf replicates and slightly conservative.
    NaN replicates are dropped; all-NaN gives ``(nan, nan)``.
    """
    r = np.asarray(reps, dtype=np.float64).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        return (math.nan, math.nan)
    a = (1.0 - level) / 2.0
    lo = np.quantile(r, a, method="lower")
    hi = np.quantile(r, 1.0 - a, method="higher")
    return (float(lo), float(hi))


def _clean_samples(samples: ArrayLike) -> tuple[np.ndarray, int]:
    G = np.asarray(samples, dtype=np.float64)
    if G.ndim == 1:
        raise PhasewatchError(
            f"samples must be an (n, P) array of n gradients, got shape {G.shape}; reshape to (n, P)"
        )
    if G.ndim != 2:
        raise PhasewatchError(f"samples must be an (n, P) array of n gradients, got shape {G.shape}")
    ok = np.isfinite(G).all(axis=1)
    dropped = int(G.shape[0] - ok.sum())
    if dropped:
        G = G[ok]
    if G.shape[0] < 2:
        raise PhasewatchError(
            f"need n >= 2 finite gradient samples, got {G.shape[0]} ({dropped} dropped as non-finite)"
        )
    return G, dropped


@dataclass(frozen=True, eq=False)
class SufficientStatistics:
    """Per-measurement statistics of ``n`` gradient samples (each a ``b``-example mean).

    With ``d_i = g^(i) - g_bar`` (``g_bar`` the mean of the samples):

    Attributes:
        n, b
            Number of samples and examples per sample.
        mean_sq_norm
            ``A = ||g_bar||^2``.
        trace
            ``T = sum_i ||d_i||^2 / (n-1) = Tr(Sigma_hat_b)``.
        quad
            ``g_bar^T Sigma_hat_b g_bar = sum_i <d_i, g_bar>^2 / (n-1)``.
        trace_sq
            ``||Sigma_hat_b||_F^2 = sum_{i,j} <d_i, d_j>^2 / (n-1)^2``.
        fourth
            ``mean_i ||d_i||^4``.
        third
            ``mean_i <d_i, g_bar> ||d_i||^2``.
        n_params
            ``P``.
        n_dropped
            Samples dropped because they contained NaN/Inf.

        All are scalars computable from the ``n x n`` Gram matrix of the samples, so a
        recorder can store them per measurement (and per layer) at ``O(n^2 P)`` cost.
    """

    n: int
    b: float
    mean_sq_norm: float
    trace: float
    quad: float
    trace_sq: float
    fourth: float
    third: float
    n_params: int
    n_dropped: int = 0


@dataclass(frozen=True, eq=False)
class _Gram:
    """Centred Gram quantities of a cleaned sample matrix (used by the bootstrap)."""

    K: np.ndarray  # (n, n) <d_i, d_j>
    v: np.ndarray  # (n,) <d_i, g_bar>
    A: float  # ||g_bar||^2


def _gram_stats(G: np.ndarray, b: float, dropped: int) -> tuple[SufficientStatistics, _Gram]:
    n, P = G.shape
    gbar = G.mean(axis=0)
    D = G - gbar
    K = D @ D.T
    v = D @ gbar
    A = float(gbar @ gbar)
    diag = np.diag(K).copy()
    st = SufficientStatistics(
        n=int(n),
        b=float(b),
        mean_sq_norm=A,
        trace=float(diag.sum() / (n - 1)),
        quad=float(v @ v / (n - 1)),
        trace_sq=float(np.sum(K * K) / (n - 1) ** 2),
        fourth=float(np.mean(diag * diag)),
        third=float(np.mean(v * diag)),
        n_params=int(P),
        n_dropped=dropped,
    )
    return st, _Gram(K=K, v=v, A=A)


def _check_b(b: float) -> float:
    bf = float(b)
    if not (np.isfinite(bf) and bf >= 1.0):
        raise PhasewatchError(f"b (examples per gradient sample) must be >= 1, got {b}")
    return bf


def sufficient_statistics(samples: ArrayLike, b: float = 1) -> SufficientStatistics:
    """Sufficient statistics of one measurement of ``n`` gradient samples.

    ``g_bar = mean_i g^(i)``, ``d_i = g^(i) - g_bar`` and (DEFINITIONS §2)
    ``T = sum_i ||d_i||^2 / (n-1)``; see :class:`SufficientStatistics` for the
    moment statistics used by the distribution-free delta method of
    :func:`consolidation_ratio`. Computed from the centred ``n x n`` Gram matrix
    ``K = D D^T`` in float64 (cost ``O(n^2 P)``, memory ``O(nP + n^2)``).

    Parameters:
        samples
            ``(n, P)`` gradients, one per row, each the mean over ``b`` examples. Rows
            with NaN/Inf are dropped (counted in ``n_dropped``).
        b
            Examples per sample (``>= 1``).

    Returns:
        :class:`SufficientStatistics` (units: (loss/parameter)^2, ^4 for ``fourth``,
        ``trace_sq``, ^3 for ``third``).

    Raises:
        PhasewatchError
            If fewer than 2 finite samples remain or ``samples`` is not 2-D.

    Examples:
        >>> import numpy as np
        >>> G = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])  # g_bar = (2, 1), d = (-1,-1), (1,-1), (0,2)
        >>> st = sufficient_statistics(G)
        >>> st.n, st.mean_sq_norm, st.trace  # ||g_bar||^2 = 5, T = (2 + 2 + 4) / 2 = 4
        (3, 5.0, 4.0)
    """
    bf = _check_b(b)
    G, dropped = _clean_samples(samples)
    return _gram_stats(G, bf, dropped)[0]
