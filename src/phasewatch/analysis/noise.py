"""Gradient noise, the consolidation ratio and the gradient noise scale.

Implements section 2 of ``DEFINITIONS.md`` ("Gradient noise and the consolidation
ratio") and the "Early-stopping flags" and "Logistic forecast" rules of section 6.
Pure numpy/scipy; every random choice goes through an explicit seed or
``numpy.random.Generator``.

References
----------
* S. McCandlish, J. Kaplan, D. Amodei and the OpenAI Dota Team, *An Empirical Model
  of Large-Batch Training*, arXiv:1812.06162 (2018): ``B_simple`` (their eq. 2.8) and
  the two-batch-size estimator (their Appendix A.1).
* The framework's theory notes 000-004 as summarised in ``DEFINITIONS.md`` §2 and §6
  (consolidation ratio, its probability/odds reading, phases, decision bands, the
  Langevin and Lévy variants, early-stopping flags, logistic forecast), and
  Y. Xu, arXiv:2603.28964 (2026).

Data convention
---------------
A *measurement* is ``n`` gradients ``g^(1..n)`` taken at (nearly) the same
parameters, each the mean over ``b`` examples (per-example gradients: ``b = 1``;
micro-batches, per-rank gradients or probe batches: ``b`` = their size). They are
passed either

* raw, as an ``(n, P)`` array ``samples`` (one gradient per row), or
* as sufficient statistics (what the recorder stores): ``n``, ``b``,
  ``mean_sq_norm = ||g_bar||^2`` and ``trace = T = sum_i ||g^(i) - g_bar||^2 / (n-1)``
  (the unbiased estimate of ``Tr Sigma_b``), optionally with the four moment
  statistics of :class:`SufficientStatistics` (``quad``, ``trace_sq``, ``fourth``,
  ``third``) that make the delta-method interval distribution-free. These may be
  arrays (one entry per measurement, or per layer); results then have that shape.
  ``mean_sq_norm`` and ``trace`` are additive over layers (the global values are the
  sums of the per-layer values); the moment statistics are not.

Units: ``||g||^2`` and ``T`` are in (loss / parameter)^2. ``C_b``, ``C_1``, ``p`` and the
odds are dimensionless; ``B_simple`` is a number of examples. The ``langevin`` and
``levy`` variants are **not** dimensionless (see :func:`consolidation_ratio`), which is
one reason the variants disagree by orders of magnitude: always label which is shown.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats

from phasewatch.errors import PhasewatchError

from . import tails
from ._checks import check_level as _check_level
from ._checks import rng as _rng

__all__ = [
    "FLAG_UNRESOLVED",
    "PHASE_LABELS",
    "BAND_LABELS",
    "SufficientStatistics",
    "sufficient_statistics",
    "ConsolidationResult",
    "consolidation_ratio",
    "NoiseScaleResult",
    "noise_scale",
    "TwoBatchNoiseScale",
    "noise_scale_two_batch",
    "phase",
    "phases",
    "decision_band",
    "decision_bands",
    "EarlyStoppingFlags",
    "early_stopping_flags",
    "LogisticForecast",
    "logistic_forecast",
]

Variant = Literal["canonical", "naive", "langevin", "levy"]
CIKind = Literal["bootstrap", "delta", "none"]

_VARIANTS: tuple[str, ...] = ("canonical", "naive", "langevin", "levy")

#: Flag raised when the bias-corrected signal ``||g_bar||^2 - T/n`` is <= 0 (C reported as 0).
FLAG_UNRESOLVED: str = "signal not resolved (bias-corrected C <= 0)"

#: Phase labels (DEFINITIONS §2, "Phases"); ``"undefined"`` is used for NaN.
PHASE_LABELS: tuple[str, ...] = ("exploration", "transition", "generalization")

#: Decision-guide bands in increasing order of ``p`` with their lower edges
#: (DEFINITIONS §2): ``p < 0.40`` failing, ``[0.40, 0.50)`` sub-threshold,
#: ``[0.50, 0.60)`` critical, ``[0.60, 0.75]`` learning, ``p > 0.75`` strong.
BAND_LABELS: tuple[str, ...] = ("failing", "sub-threshold", "critical", "learning", "strong")

_UNDEFINED = "undefined"

#: Lévy variant constants (the note's choices, DEFINITIONS §2): Hill on the top 10 % of the
#: window, alpha clipped to [1.1, 1.9], at least 10 norms.
LEVY_TOP_FRACTION: float = 0.1
LEVY_ALPHA_RANGE: tuple[float, float] = (1.1, 1.9)
LEVY_MIN_WINDOW: int = 10


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #
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


def _prob(C: np.ndarray) -> np.ndarray:
    """``p = C / (1 + C)`` with ``p(+inf) = 1``; NaN stays NaN."""
    C = np.asarray(C, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = C / (1.0 + C)
    return np.where(np.isposinf(C), 1.0, p)


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


# --------------------------------------------------------------------------- #
# sufficient statistics
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class SufficientStatistics:
    """Per-measurement statistics of ``n`` gradient samples (each a ``b``-example mean).

    With ``d_i = g^(i) - g_bar`` (``g_bar`` the mean of the samples):

    Attributes
    ----------
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

    Parameters
    ----------
    samples
        ``(n, P)`` gradients, one per row, each the mean over ``b`` examples. Rows
        with NaN/Inf are dropped (counted in ``n_dropped``).
    b
        Examples per sample (``>= 1``).

    Returns
    -------
    :class:`SufficientStatistics` (units: (loss/parameter)^2, ^4 for ``fourth``,
    ``trace_sq``, ^3 for ``third``).

    Raises
    ------
    PhasewatchError
        If fewer than 2 finite samples remain or ``samples`` is not 2-D.
    """
    bf = _check_b(b)
    G, dropped = _clean_samples(samples)
    return _gram_stats(G, bf, dropped)[0]


# --------------------------------------------------------------------------- #
# delta method
# --------------------------------------------------------------------------- #
def _delta_var_log_ratio_moments(
    n: np.ndarray,
    A: np.ndarray,
    T: np.ndarray,
    quad: np.ndarray,
    trace_sq: np.ndarray,
    fourth: np.ndarray,
    third: np.ndarray,
) -> np.ndarray:
    """Var(log(A/T)) from the moment statistics, any distribution: the nonparametric delta method
    (infinitesimal jackknife) plus the second-order term of A.

    Sample i moves A = ‖ḡ‖² by 2 dᵢ·ḡ and T by ‖dᵢ‖² − mean (dᵢ = gᵢ − ḡ), so to first order
    Var log(A/T) = Var_i(2 dᵢ·ḡ/A − ‖dᵢ‖²/T)/n = [4 Var(dᵢ·ḡ)/A² + Var‖dᵢ‖²/T² − 4 Cov/(A T)]/n,
    a variance, so never negative (``quad``, ``fourth``, ``third`` are those moments).  Where the
    signal is buried (μ ≈ 0) the first-order part of A vanishes and A's sampling variance is its
    degenerate second-order part 2 Tr(Σ²)/n² (Tr Σ² by the Srivastava 2005 estimate), added.
    (The earlier version mixed a Gaussian-corrected Var A with the empirical covariance; under
    heavy-tailed, scale-mixture noise it came out <= 0, a zero-width interval, and under-covered.)
    """
    nu = n - 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(nu >= 2.0, nu**2 / ((nu - 1.0) * (nu + 2.0)) * (trace_sq - T**2 / nu), trace_sq)
        f = np.maximum(f, 0.0)
        var_v = quad * (n - 1.0) / n  # population variance of d_i . g_bar (quad uses n - 1)
        v4 = np.maximum(fourth - ((n - 1.0) / n * T) ** 2, 0.0)  # Var ||d_i||^2
        first = (4.0 * var_v / A**2 + v4 / T**2 - 4.0 * third / (A * T)) / n
        var_log = np.maximum(first, 0.0) + 2.0 * f / (n**2 * A**2)
    return var_log


def _delta_var_log_ratio_gaussian_bound(n: np.ndarray, A: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Var(log(A/T)) under Gaussian sampling with the worst-case (rank-one) covariance."""
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.maximum(A - T / n, 0.0)
        var_A = 4.0 * T * m / n + 2.0 * T**2 / n**2
        var_T = 2.0 * T**2 / (n - 1.0)
        return var_A / A**2 + var_T / T**2


# --------------------------------------------------------------------------- #
# result object
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class ConsolidationResult:
    """Consolidation ratio (gradient signal-to-noise ratio) of one or many measurements.

    Scalars for a single measurement; arrays of the input shape when the
    sufficient statistics were arrays (``ci``/``p_ci`` then have a trailing axis 2).

    Attributes
    ----------
    C
        The variant's consolidation ratio, ``C = signal / noise`` (clipped at 0 for
        ``canonical``).
    ci
        ``(..., 2)`` confidence interval ``(lo, hi)`` of ``C`` at ``level``;
        NaN when ``ci_method == "none"``.
    p, p_ci
        ``p = C / (1 + C)`` and its interval (the image of ``ci`` under this
        increasing map).
    odds
        ``p / (1 - p) = C``.
    C_per_example
        ``C_1 = C_b / b`` for ``canonical`` and ``naive``; NaN for ``langevin``
        (which already uses the per-example variance) and ``levy``.
    b, n
        Examples per sample and samples per measurement (``levy``: ``b`` as
        passed, ``n`` = window length).
    variant
        ``"canonical"``, ``"naive"``, ``"langevin"`` or ``"levy"``.
    ci_method
        ``"bootstrap"`` (over the ``n`` samples), ``"delta"`` (moment-based delta
        method), ``"delta-gaussian-bound"`` (Gaussian, worst-case covariance;
        conservative), ``"bootstrap-window"`` (``levy``: over the norm window) or
        ``"none"``.
    flags
        Tuple of one-line warnings (unresolved signal, non-finite input, ...).
    phase, band
        :func:`phase` / :func:`decision_band` of ``p`` (string or string array).
    level
        Confidence level of the intervals.
    signal, noise
        Numerator and denominator of the variant (``C = signal / noise`` before
        clipping): canonical ``||g_bar||^2 - T/n`` and ``T``; naive ``||g_bar||^2``
        and ``T``; langevin ``||g_bar||^2`` and ``2 D P = eta^2 b T / B``; levy
        ``||g_t||^2`` and ``2 D_alpha W_alpha``.
    unresolved
        Bool (array): canonical bias-corrected signal ``<= 0`` (C reported 0).
    diffusion
        ``langevin``: ``D = eta^2 sigma_bar^2 / (2B)`` (NaN if ``P`` unknown);
        ``levy``: ``D_alpha``; else ``None``.
    tail_index
        ``levy``: the Hill estimate after clipping to [1.1, 1.9]; else ``None``.
    tail_index_raw
        ``levy``: the Hill estimate before clipping; else ``None``.
    """

    C: float | np.ndarray
    ci: np.ndarray
    p: float | np.ndarray
    p_ci: np.ndarray
    odds: float | np.ndarray
    C_per_example: float | np.ndarray
    b: float | np.ndarray
    n: int | np.ndarray
    variant: str
    ci_method: str
    flags: tuple[str, ...]
    phase: str | np.ndarray
    band: str | np.ndarray
    level: float
    signal: float | np.ndarray
    noise: float | np.ndarray
    unresolved: bool | np.ndarray
    diffusion: float | np.ndarray | None = None
    tail_index: float | None = None
    tail_index_raw: float | None = None


def _finish(
    *,
    C_raw: np.ndarray,
    ci_raw: np.ndarray,
    variant: str,
    b: np.ndarray,
    n: np.ndarray,
    ci_method: str,
    flags: list[str],
    level: float,
    signal: np.ndarray,
    noise: np.ndarray,
    diffusion: np.ndarray | None = None,
    tail_index: float | None = None,
    tail_index_raw: float | None = None,
) -> ConsolidationResult:
    C_raw = np.array(C_raw, dtype=np.float64)  # copies: inputs may be read-only broadcast views
    ci_raw = np.array(ci_raw, dtype=np.float64)
    if variant == "canonical":
        unresolved = np.isfinite(C_raw) & (C_raw <= 0.0)
        with np.errstate(invalid="ignore"):
            C = np.where(unresolved, 0.0, C_raw)
            ci = np.where(np.isnan(ci_raw), np.nan, np.maximum(ci_raw, 0.0))
        if np.any(unresolved):
            flags.append(FLAG_UNRESOLVED)
    else:
        unresolved = np.zeros(C_raw.shape, dtype=bool)
        C, ci = C_raw, ci_raw
    if np.any(np.isposinf(C)):
        flags.append("zero noise (T = 0): C is infinite")
    p = _prob(C)
    p_ci = _prob(ci)
    if variant in ("canonical", "naive"):
        C1 = C / b
    else:
        C1 = np.full(C.shape, np.nan)
    ph = phases(p, p_ci)
    bd = decision_bands(p)
    return ConsolidationResult(
        C=_as_out(C),
        ci=ci,
        p=_as_out(p),
        p_ci=p_ci,
        odds=_as_out(C),
        C_per_example=_as_out(C1),
        b=_as_out(b) if np.ndim(b) else float(b),
        n=int(n) if np.ndim(n) == 0 else np.asarray(n),
        variant=variant,
        ci_method=ci_method,
        flags=tuple(dict.fromkeys(flags)),
        phase=str(ph) if ph.ndim == 0 else ph,
        band=str(bd) if bd.ndim == 0 else bd,
        level=level,
        signal=_as_out(signal),
        noise=_as_out(noise),
        unresolved=bool(unresolved) if unresolved.ndim == 0 else unresolved,
        diffusion=None if diffusion is None else _as_out(diffusion),
        tail_index=tail_index,
        tail_index_raw=tail_index_raw,
    )


# --------------------------------------------------------------------------- #
# Lévy variant
# --------------------------------------------------------------------------- #
def levy_terms(
    win: np.ndarray, g_t: float | np.ndarray, *, check_ties: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tails.HillTop]:
    """The Lévy variant (DEFINITIONS §2) on a batch of norm windows ``win`` ``(..., W)``.

    ``alpha_raw`` = Hill on the top ``k = max(1, round(0.1 W))`` (the kernel
    :func:`phasewatch.analysis.tails.hill_top`; NaN where it refuses an atom or near-ties, e.g.
    clipped norms), ``alpha`` = ``alpha_raw`` clipped to [1.1, 1.9], ``sigma`` = std (ddof 1) of the
    window, ``D = (sigma / g_t)^alpha``, ``C = g_t^2 / (2 D W)`` (units of ``||g||^2``).
    ``check_ties=False`` for bootstrap resamples (their duplicates come from the resampling).
    Returns ``(C, alpha, alpha_raw, D, hill)``.
    """
    W = win.shape[-1]
    k = max(1, int(round(LEVY_TOP_FRACTION * W)))
    lo_a, hi_a = LEVY_ALPHA_RANGE
    h = tails.hill_top(tails.top_order_statistics(win, k), check_ties=check_ties)
    a = np.clip(h.alpha, lo_a, hi_a)  # NaN stays NaN
    sig = np.std(win, axis=-1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        D = (sig / g_t) ** a
        C = g_t**2 / (2.0 * D * W)
    return C, a, h.alpha, D, h


def _levy(
    grad_norm_window: ArrayLike | None,
    *,
    b: float,
    ci: str,
    level: float,
    n_boot: int,
    seed: int | np.random.Generator | None,
) -> ConsolidationResult:
    if grad_norm_window is None:
        raise PhasewatchError("variant 'levy' needs grad_norm_window (the last ~100 gradient norms)")
    w = np.asarray(grad_norm_window, dtype=np.float64).ravel()
    flags: list[str] = []
    if w.size == 0 or not np.isfinite(w[-1]) or w[-1] <= 0.0:
        raise PhasewatchError("levy: the last entry of grad_norm_window (||g_t||) must be finite and > 0")
    ok = np.isfinite(w)
    if not ok.all():
        flags.append(f"levy: dropped {int((~ok).sum())} non-finite gradient norms from the window")
        w = w[ok]
    W = int(w.size)
    if W < LEVY_MIN_WINDOW:
        raise PhasewatchError(f"levy: need >= {LEVY_MIN_WINDOW} finite gradient norms, got {W}")
    if ci == "delta":
        raise PhasewatchError("levy: no delta-method interval; use ci='bootstrap' or ci='none'")
    lo_a, hi_a = LEVY_ALPHA_RANGE
    g_t = float(w[-1])
    C, a, a_raw, D, h = levy_terms(w, g_t)
    degenerate = bool(h.degenerate)
    if degenerate:
        frac = float(tails.tied_fraction(w, h.tie_value))
        flags.append("levy: " + tails.tie_reason(frac, float(h.tie_value), bool(h.tie_at_top), what="norms"))
    elif not np.isfinite(a_raw):
        flags.append("levy: Hill estimate undefined (zeros in the top of the window)")
    elif not lo_a <= float(a_raw) <= hi_a:
        msg = f"levy: Hill alpha={float(a_raw):.3g} clipped to [{lo_a}, {hi_a}]"
        if a_raw > 2.0:
            msg += " (alpha > 2: no evidence of a stable heavy tail)"
        flags.append(msg)
    if ci == "bootstrap" and not degenerate:
        rng = _rng(seed)
        idx = rng.integers(0, W, size=(_check_n_boot(n_boot), W))
        Cb = levy_terms(w[idx], g_t, check_ties=False)[0]
        ci_arr = np.array(_percentile_ci(Cb, level))
        method = "bootstrap-window"
        flags.append("levy: bootstrap treats the norm window as i.i.d. (ignores autocorrelation)")
    else:
        ci_arr = np.array([np.nan, np.nan])
        method = "none"
    return _finish(
        C_raw=C,
        ci_raw=ci_arr,
        variant="levy",
        b=np.asarray(b),
        n=np.asarray(W),
        ci_method=method,
        flags=flags,
        level=level,
        signal=np.asarray(g_t**2),
        noise=np.asarray(2.0 * D * W),
        diffusion=np.asarray(D),
        tail_index=float(a),
        tail_index_raw=float(a_raw),
    )


# --------------------------------------------------------------------------- #
# consolidation ratio
# --------------------------------------------------------------------------- #
def consolidation_ratio(
    samples: ArrayLike | None = None,
    *,
    n: int | ArrayLike | None = None,
    b: float | ArrayLike = 1,
    mean_sq_norm: float | ArrayLike | None = None,
    trace: float | ArrayLike | None = None,
    quad: float | ArrayLike | None = None,
    trace_sq: float | ArrayLike | None = None,
    fourth: float | ArrayLike | None = None,
    third: float | ArrayLike | None = None,
    variant: Variant = "canonical",
    ci: CIKind = "bootstrap",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int | np.random.Generator | None = None,
    lr: float | ArrayLike | None = None,
    batch_size: float | ArrayLike | None = None,
    n_params: int | None = None,
    grad_norm_window: ArrayLike | None = None,
) -> ConsolidationResult:
    """Consolidation ratio (gradient SNR), its probability reading and a confidence interval.

    Formulas (DEFINITIONS §2; framework notes). With ``n`` samples ``g^(i)``, each
    a mean over ``b`` examples, ``g_bar`` their mean, ``A = ||g_bar||^2`` and
    ``T = sum_i ||g^(i) - g_bar||^2 / (n-1)`` (unbiased for ``Tr Sigma_b``,
    ``Sigma_b = Sigma_1 / b``):

    ``canonical``
        ``C_b = (A - T/n) / T``. Since ``E[A] = ||mu||^2 + Tr(Sigma_b)/n``, the
        numerator is unbiased for ``||mu||^2`` and ``C_b`` estimates
        ``||mu||^2 / Tr(Sigma_b)``. If ``C_b <= 0`` it is reported as 0 and
        flagged :data:`FLAG_UNRESOLVED`. ``C_1 = C_b / b = ||mu||^2 / Tr(Sigma_1)``
        (per example) ``= 1 / B_simple`` (McCandlish et al. 2018).
    ``naive``
        ``A / T`` as the notes write it; biased upward by ``1/n`` relative to
        ``canonical`` (exactly ``naive = canonical + 1/n`` before clipping).
    ``langevin``
        ``D = eta^2 sigma_bar^2 / (2B)``, ``C_L = ||g||^2 / (2 D P)``. We use
        ``||g||^2 := A`` (the mean of the samples, i.e. the step's gradient when the
        samples are its micro-batches) and ``sigma_bar^2 := b T / P``, the unbiased
        estimate of the mean per-coordinate variance of *per-example* gradients
        ``Tr(Sigma_1)/P`` (a mean of ``b`` i.i.d. examples has ``b`` times smaller
        variance). ``P`` cancels: ``C_L = B A / (eta^2 b T)``. ``C_L`` has units of
        ``1/eta^2`` (not dimensionless); ``D`` needs ``P`` (``n_params``, or the
        sample width).
    ``levy``
        Over ``grad_norm_window`` (the last ``W_alpha`` recorded gradient norms,
        note: 100, the last entry being ``||g_t||``): ``alpha`` = Hill estimate on the
        top ``k = round(0.1 W_alpha)`` norms (``k / sum ln(x_(i)/x_(k+1))``), clipped to
        [1.1, 1.9]; ``sigma_alpha`` = sample std (ddof=1) of the window;
        ``D_alpha = (sigma_alpha / ||g_t||)^alpha``;
        ``C_alpha = ||g_t||^2 / (2 D_alpha W_alpha)``. As the note does, this divides
        by the window length ``W_alpha``, not by ``P`` (we keep that choice);
        ``C_alpha`` carries units of ``||g||^2``.  Hill goes through the one kernel
        (:func:`phasewatch.analysis.tails.hill_top`): a window whose top holds an atom or
        near-ties (norms clipped by ``clip_grad_norm_``) gives ``C = NaN`` with the tied
        fraction and likely cause in ``flags``; feed the norms before clipping.

    For every variant ``p = C / (1 + C)`` and ``odds = p / (1 - p) = C``.

    Confidence intervals (``ci``):

    All intervals are first built for ``tau = E[A] / E[T] = C_b + 1/n``, the
    quantity ``R = A / T`` estimates, and then mapped to the variant (canonical
    ``tau - 1/n``, naive ``tau``, langevin ``tau * B/(eta^2 b)``), so the canonical
    interval is for ``C_b = ||mu||^2 / Tr(Sigma_b)`` and the naive one for its own,
    upward-biased, target.

    ``"bootstrap"`` (default)
        With raw ``samples``: bootstrap over the ``n`` gradients (resample rows
        with replacement and recompute ``R* = A*/T*``; computed exactly from the
        ``n x n`` Gram matrix, cost ``O(n_boot n^2)``). We use the *basic*
        (pivotal) interval on the log scale, ``[R tau*/q_hi, R tau*/q_lo]``, with
        ``q`` the bootstrap quantiles of ``R*`` and
        ``tau* = n R/(n-1) + 1/n`` the target's value in the bootstrap world (the
        empirical distribution has mean ``g_bar`` and covariance
        ``(n-1)/n Sigma_hat_b``). The plain percentile interval is shifted upward
        by about ``(1 + C_b)/n``, because resampling adds the ``T/n`` bias of ``A``
        a second time; it covers ``C_b = 0`` only ~85% of the time at 95%. Without
        samples the delta method below is used (``ci_method`` says which).
        ``levy``: percentile bootstrap over the norm window.
    ``"delta"``
        First-order delta method on ``log(A/T)`` (interval
        ``(A/T) exp(+/- z se)``, mapped to the variant: ``-1/n`` for canonical,
        ``* B/(eta^2 b)`` for langevin). Derivation, for i.i.d. samples with mean
        ``mu`` and covariance ``Sigma`` (``= Sigma_b``):
        ``Var A = 4 mu^T Sigma mu / n + 2 Tr(Sigma^2) / n^2`` (+ smaller third-moment
        terms), ``Var T = (E||g - mu||^4 - Tr(Sigma)^2)/n + 2 Tr(Sigma^2)/(n(n-1))``,
        ``Cov(A, T) = 2 E[<g - mu, mu> ||g - mu||^2] / n``, and
        ``Var log(A/T) = Var A/A^2 + Var T/T^2 - 2 Cov/(A T)``.

        * If the moment statistics ``quad``, ``trace_sq``, ``fourth``, ``third``
          are given (or raw samples are), the unknown moments are replaced by their
          sample estimates (``ci_method="delta"``): no distributional assumption,
          only ``n`` large enough for the first-order expansion.
        * With only ``n, b, A, T``: we assume **Gaussian** sampling of the ``g^(i)``
          (then ``g_bar`` and ``T`` are independent, ``Var T = 2 Tr(Sigma^2)/(n-1)``
          and ``Var A = 4 mu^T Sigma mu/n + 2 Tr(Sigma^2)/n^2``) and bound the two
          quantities these four numbers cannot identify by their worst case,
          ``Tr(Sigma^2) <= Tr(Sigma)^2`` and ``mu^T Sigma mu <= Tr(Sigma) ||mu||^2``
          (rank-one noise), plugging in ``T`` and ``max(A - T/n, 0)``
          (``ci_method="delta-gaussian-bound"``). The interval is conservative for
          Gaussian noise of any covariance (often much wider than necessary when
          the noise is spread over many directions), but not guaranteed for
          heavy-tailed noise. Store the moment statistics to do better.
        * Where the standard error of log(A/T) exceeds 1 the log-scale interval is
          replaced by the linear one, R·(1 ± z·se) clipped at 0 (the log expansion
          fails there: its upper end reaches 1e100 when the signal is buried).
    ``"none"``
        No interval (NaN).

    The interval of ``p`` is the image of the interval of ``C``. For
    ``canonical`` both ends are clipped at 0.

    Parameters
    ----------
    samples
        ``(n, P)`` raw gradients (rows with NaN/Inf are dropped and flagged).
    n, b, mean_sq_norm, trace
        Sufficient statistics (used when ``samples`` is None); broadcastable arrays
        give one result per element (per measurement or per layer).
    quad, trace_sq, fourth, third
        Optional moment statistics (all four or none), see
        :class:`SufficientStatistics`.
    variant
        ``"canonical"`` (default), ``"naive"``, ``"langevin"``, ``"levy"``.
    ci, level, n_boot, seed
        Interval method, confidence level, bootstrap replicates and the seed or
        ``numpy.random.Generator`` of the bootstrap (``None``: fresh OS entropy).
    lr, batch_size, n_params
        ``eta``, ``B`` and ``P`` for ``langevin`` (``lr`` and ``batch_size``
        required; ``n_params`` only needed for ``D`` without raw samples).
    grad_norm_window
        Gradient norms for ``levy`` (1-D, oldest first, last = current step).

    Returns
    -------
    :class:`ConsolidationResult`. Non-finite inputs give NaN results (flagged);
    ``T = 0 < A`` gives ``C = inf``, ``p = 1`` (flagged).

    Raises
    ------
    PhasewatchError
        Bad variant/ci, ``n < 2``, ``b < 1``, missing inputs for the variant, or
        partial moment statistics.
    """
    if variant not in _VARIANTS:
        raise PhasewatchError(f"unknown variant {variant!r}; use one of {', '.join(_VARIANTS)}")
    if ci not in ("bootstrap", "delta", "none"):
        raise PhasewatchError(f"unknown ci {ci!r}; use 'bootstrap', 'delta' or 'none'")
    level = _check_level(level)
    if variant == "levy":
        return _levy(grad_norm_window, b=float(_check_b(b)), ci=ci, level=level, n_boot=n_boot, seed=seed)

    flags: list[str] = []
    gram: _Gram | None = None
    if samples is not None:
        if n is not None or mean_sq_norm is not None or trace is not None:
            raise PhasewatchError("give either raw samples or the sufficient statistics n, mean_sq_norm, trace, not both")
        bf = _check_b(b)
        G, dropped = _clean_samples(samples)
        st, gram = _gram_stats(G, bf, dropped)
        if dropped:
            flags.append(f"dropped {dropped} gradient samples containing NaN/Inf")
        n_arr = np.asarray(float(st.n))
        b_arr = np.asarray(bf)
        A = np.asarray(st.mean_sq_norm)
        T = np.asarray(st.trace)
        moments: tuple[np.ndarray, ...] | None = tuple(
            np.asarray(x) for x in (st.quad, st.trace_sq, st.fourth, st.third)
        )
        P: int | None = st.n_params
    else:
        if n is None or mean_sq_norm is None or trace is None:
            raise PhasewatchError("give raw samples, or the sufficient statistics n, mean_sq_norm and trace")
        given = [x is not None for x in (quad, trace_sq, fourth, third)]
        if any(given) and not all(given):
            raise PhasewatchError("moment statistics quad, trace_sq, fourth, third must be given together")
        n_arr = np.asarray(n, dtype=np.float64)
        b_arr = np.asarray(b, dtype=np.float64)
        if np.any(n_arr < 2) or np.any(n_arr != np.round(n_arr)):
            raise PhasewatchError(f"need an integer n >= 2 gradient samples, got n={n}")
        if np.any(~np.isfinite(b_arr) | (b_arr < 1)):
            raise PhasewatchError(f"b (examples per gradient sample) must be >= 1, got {b}")
        A = np.asarray(mean_sq_norm, dtype=np.float64)
        T = np.asarray(trace, dtype=np.float64)
        moments = None
        if all(given):
            moments = tuple(np.asarray(x, dtype=np.float64) for x in (quad, trace_sq, fourth, third))
        P = None if n_params is None else int(n_params)
        bad = ~(np.isfinite(A) & np.isfinite(T))
        if moments is not None:
            for m in moments:
                bad = bad | ~np.isfinite(m)
        if np.any(bad):
            flags.append(f"non-finite input (NaN/Inf) in {int(np.sum(bad))} of {bad.size} measurements: result NaN")
        neg = np.isfinite(A) & np.isfinite(T) & ((A < 0) | (T < 0))
        if np.any(neg):
            raise PhasewatchError("mean_sq_norm and trace are squared norms and must be >= 0")
        if moments is not None:
            moments = tuple(np.where(bad, np.nan, m) for m in moments)
        A = np.where(bad, np.nan, A)
        T = np.where(bad, np.nan, T)

    # variant-specific linear map R = A/T -> C = scale * R + shift
    if variant == "langevin":
        if lr is None or batch_size is None:
            raise PhasewatchError("variant 'langevin' needs lr (eta) and batch_size (B)")
        eta = np.asarray(lr, dtype=np.float64)
        B = np.asarray(batch_size, dtype=np.float64)
        if np.any(~(eta > 0)) or np.any(~(B > 0)):
            raise PhasewatchError("langevin: lr and batch_size must be > 0")
        scale = B / (eta**2 * b_arr)
        shift = np.zeros_like(scale)
    elif variant == "canonical":
        scale = np.ones_like(n_arr)
        shift = -1.0 / n_arr
    else:  # naive
        scale = np.ones_like(n_arr)
        shift = np.zeros_like(n_arr)

    with np.errstate(divide="ignore", invalid="ignore"):
        R = np.where((T == 0) & (A > 0), np.inf, A / T)
    C_raw = scale * R + shift

    # confidence interval on R = A / T, then mapped
    ci_method = ci
    R_ci: np.ndarray
    if ci == "bootstrap" and gram is None:
        ci_method = "delta"
    if ci_method == "bootstrap":
        assert gram is not None
        rng = _rng(seed)
        Rb = _bootstrap_ratio(gram, _check_n_boot(n_boot), rng)
        q_lo, q_hi = _percentile_ci(Rb, level)
        # basic (pivotal) bootstrap on the log scale around the bootstrap-world target
        n0 = float(n_arr)
        tau_star = n0 * R / (n0 - 1.0) + 1.0 / n0
        with np.errstate(divide="ignore", invalid="ignore"):
            R_ci = np.array([R * tau_star / q_hi, R * tau_star / q_lo], dtype=np.float64)
    elif ci_method == "delta":
        z = float(stats.norm.ppf(0.5 + level / 2.0))
        if moments is not None:
            var_log = _delta_var_log_ratio_moments(n_arr, A, T, *moments)
        else:
            var_log = _delta_var_log_ratio_gaussian_bound(n_arr, A, T)
            ci_method = "delta-gaussian-bound"
        se = np.sqrt(var_log)
        with np.errstate(invalid="ignore", over="ignore"):
            R_ci = np.stack([R * np.exp(-z * se), R * np.exp(z * se)], axis=-1)
            # Where the relative standard error exceeds 1 (the signal ||g_bar||^2 is buried in its
            # own sampling noise) the log-scale expansion is meaningless: exp(z se) reached 1e100 on
            # real runs.  There the first-order interval on R itself, R (1 +/- z se), clipped at 0.
            wide = np.asarray(se > 1.0)
            if wide.any():
                lin = np.stack([np.maximum(R * (1 - z * se), 0.0), R * (1 + z * se)], axis=-1)
                R_ci = np.where(wide[..., None], lin, R_ci)
    else:
        R_ci = np.full(np.shape(R) + (2,), np.nan)
    ci_raw = scale[..., None] * R_ci + shift[..., None]

    if variant == "canonical":
        signal, noise = A - T / n_arr, T
    elif variant == "naive":
        signal, noise = A, T
    else:
        signal, noise = A, T / scale
    diffusion = None
    if variant == "langevin":
        # D = eta^2 sigma_bar^2 / (2B), sigma_bar^2 = b T / P
        Pn = np.nan if P is None else float(P)
        diffusion = np.asarray(lr, dtype=np.float64) ** 2 * (b_arr * T / Pn) / (
            2.0 * np.asarray(batch_size, dtype=np.float64)
        )
    shape = np.broadcast_shapes(
        np.shape(C_raw), ci_raw.shape[:-1], np.shape(signal), np.shape(noise), n_arr.shape, b_arr.shape
    )
    C_raw, signal, noise, n_b, b_b = (np.broadcast_to(x, shape) for x in (C_raw, signal, noise, n_arr, b_arr))
    ci_raw = np.broadcast_to(ci_raw, shape + (2,))
    if diffusion is not None:
        diffusion = np.broadcast_to(diffusion, shape)
    return _finish(
        C_raw=C_raw,
        ci_raw=ci_raw,
        variant=variant,
        b=b_b,
        n=n_b.astype(np.int64),
        ci_method=ci_method,
        flags=flags,
        level=level,
        signal=signal,
        noise=noise,
        diffusion=diffusion,
    )


def _bootstrap_ratio(gram: _Gram, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of ``R* = A*/T*`` from the centred Gram matrix.

    For resampling counts ``c`` (``sum c = n``): ``g_bar* = g_bar + D^T c / n``, so
    ``A* = A + 2 v.c/n + c^T K c / n^2`` and
    ``T* = (sum_i c_i K_ii - c^T K c / n) / (n - 1)``.
    """
    K, v, A = gram.K, gram.v, gram.A
    n = K.shape[0]
    diag = np.diag(K)
    out = np.empty(n_boot)
    chunk = max(1, (1 << 22) // n)
    for s in range(0, n_boot, chunk):  # loop over blocks of replicates (memory bound)
        m = min(chunk, n_boot - s)
        idx = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]
        c = np.bincount(idx.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)
        cKc = np.einsum("ij,ij->i", c @ K, c)
        A_b = A + 2.0 * (c @ v) / n + cKc / n**2
        T_b = (c @ diag - cKc / n) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[s : s + m] = np.where((T_b <= 0) & (A_b > 0), np.inf, A_b / T_b)
    return out


# --------------------------------------------------------------------------- #
# gradient noise scale
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class NoiseScaleResult:
    """Simple gradient noise scale ``B_simple = Tr(Sigma_1) / ||mu||^2`` (in examples).

    Attributes
    ----------
    B_simple
        ``1 / C_1`` (``inf`` when the signal is not resolved).
    ci
        ``(2,)`` (or ``(..., 2)``) interval, the image of the ``C_1`` interval under
        ``1/x`` (an upper end of ``inf`` when ``C_1``'s lower end is 0).
    C_per_example
        ``C_1 = C_b / b`` (canonical).
    b, n, ci_method, level, flags
        As in :class:`ConsolidationResult`.
    variant
        ``"simple"``.
    """

    B_simple: float | np.ndarray
    ci: np.ndarray
    C_per_example: float | np.ndarray
    b: float | np.ndarray
    n: int | np.ndarray
    ci_method: str
    level: float
    flags: tuple[str, ...]
    variant: str = "simple"


def _inv(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(x == 0, np.inf, 1.0 / x)


def noise_scale(
    samples: ArrayLike | None = None,
    *,
    n: int | ArrayLike | None = None,
    b: float | ArrayLike = 1,
    mean_sq_norm: float | ArrayLike | None = None,
    trace: float | ArrayLike | None = None,
    quad: float | ArrayLike | None = None,
    trace_sq: float | ArrayLike | None = None,
    fourth: float | ArrayLike | None = None,
    third: float | ArrayLike | None = None,
    ci: CIKind = "bootstrap",
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int | np.random.Generator | None = None,
) -> NoiseScaleResult:
    """Simple gradient noise scale ``B_simple = Tr(Sigma_1) / ||mu||^2 = 1 / C_1``.

    McCandlish, Kaplan, Amodei et al., *An Empirical Model of Large-Batch Training*
    (arXiv:1812.06162, 2018), eq. 2.8; DEFINITIONS §2. ``Sigma_1`` is the
    per-example gradient covariance and ``mu`` the true gradient. Estimated as the
    inverse of the canonical per-example consolidation ratio
    ``C_1 = (A - T/n) / (b T)`` of :func:`consolidation_ratio` (same inputs, same
    interval methods); the interval is the image of ``C_1``'s interval under the
    decreasing map ``1/x``.

    Units: examples (a batch size). ``inf`` when the bias-corrected signal is
    ``<= 0`` (flagged).

    Returns
    -------
    :class:`NoiseScaleResult`.
    """
    r = consolidation_ratio(
        samples,
        n=n,
        b=b,
        mean_sq_norm=mean_sq_norm,
        trace=trace,
        quad=quad,
        trace_sq=trace_sq,
        fourth=fourth,
        third=third,
        variant="canonical",
        ci=ci,
        level=level,
        n_boot=n_boot,
        seed=seed,
    )
    C1 = np.asarray(r.C_per_example)
    ci1 = np.asarray(r.ci) / np.asarray(r.b)[..., None]
    Bs = _inv(C1)
    ci_B = np.stack([_inv(ci1[..., 1]), _inv(ci1[..., 0])], axis=-1)
    return NoiseScaleResult(
        B_simple=_as_out(Bs),
        ci=ci_B,
        C_per_example=r.C_per_example,
        b=r.b,
        n=r.n,
        ci_method=r.ci_method,
        level=r.level,
        flags=r.flags,
    )


@dataclass(frozen=True, eq=False)
class TwoBatchNoiseScale:
    """Two-batch-size estimate of ``B_simple`` (McCandlish et al. 2018, App. A.1).

    Attributes
    ----------
    B_simple
        ``mean(S) / mean(|G|^2)`` over measurements (examples).
    ci
        ``(2,)`` percentile-bootstrap interval over measurements (NaN for one
        measurement).
    grad_sq, trace
        The averaged estimates of ``|G|^2 = ||mu||^2`` and ``S = Tr(Sigma_1)``.
    grad_sq_each, trace_each
        Per-measurement estimates.
    b_small, b_big, n_measurements, level, flags
        Inputs and warnings.
    ci_method, variant
        ``"bootstrap"`` (or ``"none"``) and ``"two_batch"``.
    """

    B_simple: float
    ci: np.ndarray
    grad_sq: float
    trace: float
    grad_sq_each: np.ndarray
    trace_each: np.ndarray
    b_small: float
    b_big: float
    n_measurements: int
    level: float
    flags: tuple[str, ...]
    ci_method: str = "bootstrap"
    variant: str = "two_batch"


def noise_scale_two_batch(
    g_small_sq: float | ArrayLike,
    g_big_sq: float | ArrayLike,
    b_small: float,
    b_big: float,
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int | np.random.Generator | None = None,
) -> TwoBatchNoiseScale:
    """``B_simple`` from squared norms of batch gradients at two batch sizes.

    McCandlish, Kaplan, Amodei et al., *An Empirical Model of Large-Batch Training*
    (arXiv:1812.06162, 2018), Appendix A.1: since
    ``E||g_B||^2 = |G|^2 + Tr(Sigma_1) / B`` for a batch of ``B`` i.i.d. examples,

    ``|G|^2 ~= (B_big ||g_big||^2 - B_small ||g_small||^2) / (B_big - B_small)``,
    ``S ~= (||g_small||^2 - ||g_big||^2) / (1/B_small - 1/B_big)``,

    both unbiased, and ``B_simple = S / |G|^2``. As the paper recommends, ``S`` and
    ``|G|^2`` are averaged over measurements *separately* before taking the ratio
    (each alone is very noisy). The interval is a percentile bootstrap over
    measurements (resampling the ``(small, big)`` pairs), assuming independent
    measurements. Non-finite pairs are dropped (flagged).

    Parameters
    ----------
    g_small_sq, g_big_sq
        ``||g_small||^2`` and ``||g_big||^2`` per measurement (same shape).
    b_small, b_big
        The two batch sizes, ``0 < b_small < b_big``.

    Returns
    -------
    :class:`TwoBatchNoiseScale`; ``B_simple = inf`` (flagged) when the averaged
    ``|G|^2 <= 0``.
    """
    level = _check_level(level)
    gs = np.asarray(g_small_sq, dtype=np.float64).ravel()
    gb = np.asarray(g_big_sq, dtype=np.float64).ravel()
    if gs.shape != gb.shape:
        raise PhasewatchError(f"g_small_sq and g_big_sq need the same length, got {gs.size} and {gb.size}")
    bs, bb = float(b_small), float(b_big)
    if not (0 < bs < bb and np.isfinite(bb)):
        raise PhasewatchError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    flags: list[str] = []
    ok = np.isfinite(gs) & np.isfinite(gb)
    if not ok.all():
        flags.append(f"dropped {int((~ok).sum())} non-finite measurements")
        gs, gb = gs[ok], gb[ok]
    M = gs.size
    if M == 0:
        raise PhasewatchError("noise_scale_two_batch: no finite measurements")
    G2 = (bb * gb - bs * gs) / (bb - bs)
    S = (gs - gb) / (1.0 / bs - 1.0 / bb)
    G2m, Sm = float(G2.mean()), float(S.mean())

    def ratio(s: np.ndarray, g: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(g > 0, s / g, np.inf)

    B = float(ratio(np.asarray(Sm), np.asarray(G2m)))
    if G2m <= 0:
        flags.append("averaged |G|^2 estimate <= 0: signal not resolved, B_simple = inf")
    if Sm <= 0:
        flags.append("averaged S = Tr(Sigma) estimate <= 0: noise not resolved")
    if M >= 2:
        rng = _rng(seed)
        idx = rng.integers(0, M, size=(_check_n_boot(n_boot), M))
        Bb = ratio(S[idx].mean(axis=1), G2[idx].mean(axis=1))
        ci_arr = np.array(_percentile_ci(Bb, level))
        method = "bootstrap"
    else:
        ci_arr = np.array([np.nan, np.nan])
        method = "none"
        flags.append("one measurement: no interval")
    return TwoBatchNoiseScale(
        B_simple=B,
        ci=ci_arr,
        grad_sq=G2m,
        trace=Sm,
        grad_sq_each=G2,
        trace_each=S,
        b_small=bs,
        b_big=bb,
        n_measurements=int(M),
        level=level,
        flags=tuple(flags),
        ci_method=method,
    )


# --------------------------------------------------------------------------- #
# phases and decision bands
# --------------------------------------------------------------------------- #
def phases(p: ArrayLike, p_ci: ArrayLike | None = None) -> np.ndarray:
    """Phase label per measurement (vectorised :func:`phase`).

    ``"transition"`` where the interval ``[lo, hi]`` contains 0.5 (takes
    precedence), else ``"exploration"`` for ``p < 0.5``, ``"generalization"`` for
    ``p > 0.5``, ``"transition"`` for ``p == 0.5``; ``"undefined"`` where ``p`` is
    NaN. A NaN interval is ignored (``p`` alone decides). DEFINITIONS §2.

    Parameters
    ----------
    p
        Array of probabilities.
    p_ci
        ``p.shape + (2,)`` intervals, or None.

    Returns
    -------
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

    Returns
    -------
    str, one of :data:`PHASE_LABELS` or ``"undefined"``.
    """
    return str(phases(np.asarray(p, dtype=np.float64), None if p_ci is None else np.asarray(p_ci, float)))


def decision_bands(p: ArrayLike) -> np.ndarray:
    """Decision-guide band per measurement (vectorised :func:`decision_band`).

    ``p < 0.40`` failing; ``0.40 <= p < 0.50`` sub-threshold; ``0.50 <= p < 0.60``
    critical; ``0.60 <= p <= 0.75`` learning; ``p > 0.75`` strong; NaN undefined.
    DEFINITIONS §2 (framework notes).

    Returns
    -------
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

    Returns
    -------
    str.
    """
    return str(decision_bands(np.asarray(p, dtype=np.float64)))


# --------------------------------------------------------------------------- #
# early-stopping flags
# --------------------------------------------------------------------------- #
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

    Attributes
    ----------
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

    Parameters
    ----------
    p, C, p_ci_hi
        1-D arrays of length ``N`` (``p_ci_hi``: upper end of the ``p`` interval).
    I
        Optional 1-D array of length ``N``.

    Returns
    -------
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


# --------------------------------------------------------------------------- #
# logistic forecast
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class LogisticForecast:
    """Least-squares logistic fit ``p(t) = 1 / (1 + exp(-k (t - t0)))``.

    Attributes
    ----------
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

    Parameters
    ----------
    t
        Times (steps) of the measurements.
    p
        ``p`` at those times (in [0, 1]).
    level
        Confidence level of the intervals.

    Returns
    -------
    :class:`LogisticForecast`.

    Raises
    ------
    PhasewatchError
        Fewer than 3 finite points or mismatched lengths.
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
