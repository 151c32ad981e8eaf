"""The consolidation ratio (gradient SNR) ``C``: canonical, naive, Langevin and Lévy, with intervals.

Implements section 2 of ``DEFINITIONS.md`` ("Gradient noise and the consolidation ratio", the
framework's theory notes 000-004; Y. Xu, arXiv:2603.28964, 2026).  ``C_b = (A - T/n) / T`` with
``A = ||g_bar||^2`` and ``T`` the unbiased trace of the sample covariance
(:mod:`phasewatch.analysis.gradient_stats`), ``C_1 = C_b / b = 1 / B_simple`` (McCandlish et al.
2018), ``p = C / (1 + C)``.  The ``langevin`` and ``levy`` variants are **not** dimensionless
(see :func:`consolidation_ratio`), which is one reason the variants disagree by orders of
magnitude: always label which is shown.

Variants (``variant``), with ``n`` samples ``g^(i)``, each a mean over ``b`` examples, ``g_bar``
their mean, ``A = ||g_bar||^2`` and ``T = sum_i ||g^(i) - g_bar||^2 / (n-1)`` (unbiased for
``Tr Sigma_b``, ``Sigma_b = Sigma_1 / b``):

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
    (:func:`phasewatch.analysis.hill_kernel.hill_top`): a window whose top holds an atom or
    near-ties (norms clipped by ``clip_grad_norm_``) gives ``C = NaN`` with the tied
    fraction and likely cause in ``flags``; feed the norms before clipping.

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
    * With fewer than 4 samples (``MOMENTS_MIN_N``) the moment estimates cannot carry T's own
      sampling noise (at n = 2 it is estimated as exactly 0: ``d_1 = -d_2``), so the Gaussian
      bound is used for those measurements whatever moments are stored.
    * Where the standard error of log(A/T) exceeds 1 the log-scale interval is
      replaced by the linear one, R·(1 ± z·se) clipped at 0 (the log expansion
      fails there: its upper end reaches 1e100 when the signal is buried).
``"none"``
    No interval (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from phasewatch.errors import PhasewatchError

from . import hill_kernel
from ._checks import check_level as _check_level
from ._checks import rng as _rng
from .gradient_stats import (
    _as_out,
    _check_b,
    _check_n_boot,
    _clean_samples,
    _Gram,
    _gram_stats,
    _percentile_ci,
)
from .phases import decision_bands, phases
from .result import Estimate

Variant = Literal["canonical", "naive", "langevin", "levy"]
CIKind = Literal["bootstrap", "delta", "none"]

#: Fewest samples for the moment-based delta interval: below it the fourth-moment term Var‖dᵢ‖²
#: (T's own sampling noise) has at most two degrees of freedom, and none at n = 2 (d₁ = −d₂), so
#: the Gaussian worst-case bound is used instead (``ci_method`` says so).
MOMENTS_MIN_N = 4
_VARIANTS: tuple[str, ...] = ("canonical", "naive", "langevin", "levy")
#: Flag raised when the bias-corrected signal ``||g_bar||^2 - T/n`` is <= 0 (C reported as 0).
FLAG_UNRESOLVED: str = "signal not resolved (bias-corrected C <= 0)"
#: Lévy variant constants (the note's choices, DEFINITIONS §2): Hill on the top 10 % of the
#: window, alpha clipped to [1.1, 1.9], at least 10 norms.
LEVY_TOP_FRACTION: float = 0.1
LEVY_ALPHA_RANGE: tuple[float, float] = (1.1, 1.9)
LEVY_MIN_WINDOW: int = 10


def _prob(C: np.ndarray) -> np.ndarray:
    """``p = C / (1 + C)`` with ``p(+inf) = 1``; NaN stays NaN."""
    C = np.asarray(C, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = C / (1.0 + C)
    return np.where(np.isposinf(C), 1.0, p)


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


@dataclass(frozen=True, eq=False)
class ConsolidationResult(Estimate):
    """Consolidation ratio (gradient signal-to-noise ratio) of one or many measurements.

    Scalars for a single measurement; arrays of the input shape when the
    sufficient statistics were arrays (``ci``/``p_ci`` then have a trailing axis 2).

    Attributes:
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

    _statistic_field = "C"  # statistic / confidence_interval: Estimate
    _interval_field = "ci"

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


def levy_terms(
    win: np.ndarray, g_t: float | np.ndarray, *, check_ties: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, hill_kernel.HillTop]:
    """The Lévy variant (DEFINITIONS §2) on a batch of norm windows ``win`` ``(..., W)``.

    ``alpha_raw`` = Hill on the top ``k = max(1, round(0.1 W))`` (the kernel
    :func:`phasewatch.analysis.hill_kernel.hill_top`; NaN where it refuses an atom or near-ties, e.g.
    clipped norms), ``alpha`` = ``alpha_raw`` clipped to [1.1, 1.9], ``sigma`` = std (ddof 1) of the
    window, ``D = (sigma / g_t)^alpha``, ``C = g_t^2 / (2 D W)`` (units of ``||g||^2``).
    ``check_ties=False`` for bootstrap resamples (their duplicates come from the resampling).
    Returns ``(C, alpha, alpha_raw, D, hill)``.
    """
    W = win.shape[-1]
    k = max(1, int(round(LEVY_TOP_FRACTION * W)))
    lo_a, hi_a = LEVY_ALPHA_RANGE
    h = hill_kernel.hill_top(hill_kernel.top_order_statistics(win, k), check_ties=check_ties)
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
        frac = float(hill_kernel.tied_fraction(w, h.tie_value))
        flags.append("levy: " + hill_kernel.tie_reason(frac, float(h.tie_value), bool(h.tie_at_top), what="norms"))
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

    ``canonical``  ``C_b = (A - T/n) / T``, estimating ``||mu||^2 / Tr(Sigma_b)`` (reported as 0
    and flagged :data:`FLAG_UNRESOLVED` where ``<= 0``); ``C_1 = C_b / b = 1 / B_simple``.
    ``naive``  ``A / T`` as the notes write it (``= canonical + 1/n`` before clipping).
    ``langevin``  ``C_L = ||g||^2 / (2 D P) = B A / (eta^2 b T)`` with ``D = eta^2 sigma_bar^2 / (2B)``,
    ``sigma_bar^2 = b T / P`` (units ``1/eta^2``).
    ``levy``  ``C_alpha = ||g_t||^2 / (2 D_alpha W_alpha)``, ``D_alpha = (sigma_alpha / ||g_t||)^alpha``
    over ``grad_norm_window`` (:func:`levy_terms`; units of ``||g||^2``).
    The variants in full (what each estimates, units, the Lévy tie rule): the module docstring.

    For every variant ``p = C / (1 + C)`` and ``odds = p / (1 - p) = C``.

    Intervals (``ci``): ``"bootstrap"`` (default; basic bootstrap over the samples, the delta method
    without them; ``levy``: over the norm window), ``"delta"`` (on ``log(A/T)``, distribution-free
    with the moment statistics, a Gaussian worst-case bound without) or ``"none"``; all built for
    ``tau = C_b + 1/n`` and mapped to the variant (derivations: the module docstring).
    The interval of ``p`` is the image of that of ``C``; for ``canonical`` both ends are clipped at 0.

    Parameters:
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

    Returns:
        :class:`ConsolidationResult`. Non-finite inputs give NaN results (flagged);
        ``T = 0 < A`` gives ``C = inf``, ``p = 1`` (flagged).

    Raises:
        PhasewatchError
            Bad variant/ci, ``n < 2``, ``b < 1``, missing inputs for the variant, or
            partial moment statistics.

    Examples:
        Three samples with ``g_bar = (2, 1)``: ``A = 5``, ``T = (2 + 2 + 4)/2 = 4``, so
        ``C_b = (5 - 4/3)/4 = 11/12`` and ``p = 11/23``; naive ``A/T = 5/4``.

        >>> import numpy as np
        >>> G = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])
        >>> r = consolidation_ratio(G, ci="none")
        >>> bool(abs(r.C - 11 / 12) < 1e-15), bool(abs(r.p - 11 / 23) < 1e-15), r.phase
        (True, True, 'exploration')
        >>> float(consolidation_ratio(G, variant="naive", ci="none").C)
        1.25
    """
    if variant not in _VARIANTS:
        raise PhasewatchError(f"unknown variant {variant!r}; use one of {', '.join(_VARIANTS)}")
    if ci not in ("bootstrap", "delta", "none"):
        raise PhasewatchError(f"unknown ci {ci!r}; use 'bootstrap', 'delta' or 'none'")
    level = _check_level(level)
    if variant == "levy":
        return _levy(grad_norm_window, b=float(_check_b(b)), ci=ci, level=level, n_boot=n_boot, seed=seed)

    flags: list[str] = []
    if samples is not None:
        if n is not None or mean_sq_norm is not None or trace is not None:
            raise PhasewatchError("give either raw samples or the sufficient statistics n, mean_sq_norm, trace, not both")
        m = _from_samples(samples, b, flags)
    else:
        m = _from_statistics(n, b, mean_sq_norm, trace, (quad, trace_sq, fourth, third), n_params, flags)
    scale, shift = _linear_map(variant, m, lr, batch_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        R = np.where((m.T == 0) & (m.A > 0), np.inf, m.A / m.T)
    C_raw = scale * R + shift
    R_ci, ci_method = _ratio_interval(ci, R, m, level, n_boot, seed)
    ci_raw = scale[..., None] * R_ci + shift[..., None]
    signal, noise, diffusion = _signal_noise(variant, m, scale, lr, batch_size)
    shape = np.broadcast_shapes(
        np.shape(C_raw), ci_raw.shape[:-1], np.shape(signal), np.shape(noise), m.n.shape, m.b.shape
    )
    C_raw, signal, noise, n_b, b_b = (np.broadcast_to(x, shape) for x in (C_raw, signal, noise, m.n, m.b))
    ci_raw = np.broadcast_to(ci_raw, shape + (2,))
    if diffusion is not None:
        diffusion = np.broadcast_to(diffusion, shape)
    return _finish(C_raw=C_raw, ci_raw=ci_raw, variant=variant, b=b_b, n=n_b.astype(np.int64), ci_method=ci_method,
                   flags=flags, level=level, signal=signal, noise=noise, diffusion=diffusion)


@dataclass(frozen=True, eq=False)
class _Measurement:
    """The inputs of :func:`consolidation_ratio` as float64 arrays (NaN where an input is not finite)."""

    n: np.ndarray  # samples per measurement
    b: np.ndarray  # examples per sample
    A: np.ndarray  # ||g_bar||^2
    T: np.ndarray  # unbiased trace of the sample covariance
    moments: tuple[np.ndarray, ...] | None  # (quad, trace_sq, fourth, third) or None
    P: int | None  # number of parameters, if known
    gram: _Gram | None  # centred Gram quantities, with raw samples only (the bootstrap needs them)


def _from_samples(samples: ArrayLike, b: float | ArrayLike, flags: list[str]) -> _Measurement:
    """A :class:`_Measurement` of ``(n, P)`` raw samples (rows with NaN/Inf dropped and flagged)."""
    bf = _check_b(b)
    G, dropped = _clean_samples(samples)
    st, gram = _gram_stats(G, bf, dropped)
    if dropped:
        flags.append(f"dropped {dropped} gradient samples containing NaN/Inf")
    return _Measurement(
        n=np.asarray(float(st.n)),
        b=np.asarray(bf),
        A=np.asarray(st.mean_sq_norm),
        T=np.asarray(st.trace),
        moments=tuple(np.asarray(x) for x in (st.quad, st.trace_sq, st.fourth, st.third)),
        P=st.n_params,
        gram=gram,
    )


def _from_statistics(n: int | ArrayLike | None, b: float | ArrayLike, mean_sq_norm: float | ArrayLike | None,
                     trace: float | ArrayLike | None, moment_stats: tuple[float | ArrayLike | None, ...],
                     n_params: int | None, flags: list[str]) -> _Measurement:
    """A :class:`_Measurement` of sufficient statistics; non-finite entries become NaN (flagged)."""
    if n is None or mean_sq_norm is None or trace is None:
        raise PhasewatchError("give raw samples, or the sufficient statistics n, mean_sq_norm and trace")
    given = [x is not None for x in moment_stats]
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
        moments = tuple(np.asarray(x, dtype=np.float64) for x in moment_stats)
    bad = ~(np.isfinite(A) & np.isfinite(T))
    if moments is not None:
        for mom in moments:
            bad = bad | ~np.isfinite(mom)
    if np.any(bad):
        flags.append(f"non-finite input (NaN/Inf) in {int(np.sum(bad))} of {bad.size} measurements: result NaN")
    neg = np.isfinite(A) & np.isfinite(T) & ((A < 0) | (T < 0))
    if np.any(neg):
        raise PhasewatchError("mean_sq_norm and trace are squared norms and must be >= 0")
    if moments is not None:
        moments = tuple(np.where(bad, np.nan, mom) for mom in moments)
    return _Measurement(
        n=n_arr, b=b_arr, A=np.where(bad, np.nan, A), T=np.where(bad, np.nan, T), moments=moments,
        P=None if n_params is None else int(n_params), gram=None,
    )


def _linear_map(variant: str, m: _Measurement, lr: float | ArrayLike | None,
                batch_size: float | ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` of the variant's map ``R = A/T -> C = scale * R + shift``."""
    if variant == "langevin":
        if lr is None or batch_size is None:
            raise PhasewatchError("variant 'langevin' needs lr (eta) and batch_size (B)")
        eta = np.asarray(lr, dtype=np.float64)
        B = np.asarray(batch_size, dtype=np.float64)
        if np.any(~(eta > 0)) or np.any(~(B > 0)):
            raise PhasewatchError("langevin: lr and batch_size must be > 0")
        scale = B / (eta**2 * m.b)
        return scale, np.zeros_like(scale)
    if variant == "canonical":
        return np.ones_like(m.n), -1.0 / m.n
    return np.ones_like(m.n), np.zeros_like(m.n)  # naive


def _ratio_interval(ci: str, R: np.ndarray, m: _Measurement, level: float, n_boot: int,
                    seed: int | np.random.Generator | None) -> tuple[np.ndarray, str]:
    """``(interval of R = A/T with a trailing axis of 2, ci_method)``: the basic bootstrap on the log
    scale with raw samples, else the delta method (module docstring), or NaN for ``"none"``."""
    ci_method = ci
    if ci == "bootstrap" and (m.gram is None or np.any(np.asarray(m.n) < MOMENTS_MIN_N)):
        ci_method = "delta"  # (fewer than 4 samples have at most 10 distinct resamples: no bootstrap)
    if ci_method == "bootstrap":
        assert m.gram is not None
        rng = _rng(seed)
        Rb = _bootstrap_ratio(m.gram, _check_n_boot(n_boot), rng)
        q_lo, q_hi = _percentile_ci(Rb, level)
        # basic (pivotal) bootstrap on the log scale around the bootstrap-world target
        n0 = float(m.n)
        tau_star = n0 * R / (n0 - 1.0) + 1.0 / n0
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.array([R * tau_star / q_hi, R * tau_star / q_lo], dtype=np.float64), ci_method
    if ci_method == "delta":
        z = float(stats.norm.ppf(0.5 + level / 2.0))
        if m.moments is not None:
            var_log = _delta_var_log_ratio_moments(m.n, m.A, m.T, *m.moments)
            # n < MOMENTS_MIN_N: the sample moments cannot carry T's own variance (at n = 2,
            # d_1 = -d_2 makes Var_i ||d_i||^2 exactly 0, an interval that ignores the noise of T
            # altogether); those measurements get the conservative Gaussian bound instead
            few = np.asarray(m.n) < MOMENTS_MIN_N
            if few.any():
                var_log = np.where(few, _delta_var_log_ratio_gaussian_bound(m.n, m.A, m.T), var_log)
                ci_method = "delta-gaussian-bound" if few.all() else "delta (delta-gaussian-bound where n < 4)"
        else:
            var_log = _delta_var_log_ratio_gaussian_bound(m.n, m.A, m.T)
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
        return R_ci, ci_method
    return np.full(np.shape(R) + (2,), np.nan), ci_method


def _signal_noise(variant: str, m: _Measurement, scale: np.ndarray, lr: float | ArrayLike | None,
                  batch_size: float | ArrayLike | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(signal, noise, diffusion)`` with ``C = signal / noise``; ``diffusion`` D only for langevin."""
    if variant == "canonical":
        signal, noise = m.A - m.T / m.n, m.T
    elif variant == "naive":
        signal, noise = m.A, m.T
    else:
        signal, noise = m.A, m.T / scale
    diffusion = None
    if variant == "langevin":
        # D = eta^2 sigma_bar^2 / (2B), sigma_bar^2 = b T / P
        Pn = np.nan if m.P is None else float(m.P)
        diffusion = np.asarray(lr, dtype=np.float64) ** 2 * (m.b * m.T / Pn) / (
            2.0 * np.asarray(batch_size, dtype=np.float64)
        )
    return signal, noise, diffusion


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
