"""Gradient-noise covariance spectrum, coordinate-wise tail indices, and the per-step Lévy ratio.

Pure numpy.  Inputs are what the recorder stores (``grad_samples``: ``cov_eigs``, ``trace``,
``trace_sq``; ``grad_proj``: projected, centred samples) or the per-step gradient norms.

* :func:`covariance_spectrum` — eigenvalues of the sample covariance Σ̂ of the gradient samples,
  its effective rank Tr(Σ̂)²/Tr(Σ̂²) (plug-in, ≤ n−1, and a Gaussian-unbiased correction) and the
  fraction of the noise in the top direction, λ₁/Tr Σ̂.
* :func:`coordinate_tails` — one tail index for the noise coordinates g^(i)_j − ḡ_j: each coordinate
  divided by its own scale, then all pooled into one Hill (or Mohammadi) estimate, with a bootstrap
  over samples.  Without the standardisation, coordinates whose scales differ by orders of
  magnitude fake a heavy tail (DEFINITIONS §3).
* :func:`levy_rolling` — the ``levy`` consolidation ratio (DEFINITIONS §2) on every window of
  gradient norms, vectorised; equal to :func:`phasewatch.analysis.noise.consolidation_ratio`
  (``variant="levy"``) applied window by window.
* :func:`langevin_ratio` — the ``langevin`` consolidation ratio C_L = B‖ḡ‖²/(η² b T) of each
  measurement where η and B are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

from ..errors import PhasewatchError
from . import noise as nz
from . import tails
from ._checks import rng as _rng
from .result import Estimate

__all__ = [
    "CovarianceSpectrum",
    "covariance_spectrum",
    "CoordinateTails",
    "coordinate_tails",
    "LevyRolling",
    "levy_rolling",
    "langevin_ratio",
]


# --------------------------------------------------------------------------- #
# covariance spectrum
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class CovarianceSpectrum:
    """Spectrum summaries of the sample covariance Σ̂ of n gradient samples (per measurement).

    Attributes (arrays of the batch shape, or floats for one measurement)
    ----------
    eigenvalues
        ``(..., m)`` the stored eigenvalues, descending, NaN-padded (as given).
    trace, trace_sq
        Tr Σ̂ and Tr Σ̂² used (given, or summed from the eigenvalues).
    top
        λ₁, the largest eigenvalue (NaN if none stored).
    top_fraction
        λ₁ / Tr Σ̂: the share of the noise variance along the top direction.
    eff_rank
        Tr(Σ̂)² / Tr(Σ̂²), the plug-in effective rank (between 1 and rank Σ̂ ≤ n − 1).
    eff_rank_corrected
        The ratio of Gaussian-unbiased estimates of (Tr Σ)² and Tr Σ² (needs n; NaN where n < 3
        or the estimate of Tr Σ² is not positive); consistent when P ≫ n, where the plug-in is
        capped at n − 1.
    n
        Samples per measurement (NaN if not given).
    """

    eigenvalues: np.ndarray
    trace: float | np.ndarray
    trace_sq: float | np.ndarray
    top: float | np.ndarray
    top_fraction: float | np.ndarray
    eff_rank: float | np.ndarray
    eff_rank_corrected: float | np.ndarray
    n: float | np.ndarray


def _out(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


def covariance_spectrum(
    eigenvalues: ArrayLike | None = None,
    *,
    trace: ArrayLike | None = None,
    trace_sq: ArrayLike | None = None,
    n: ArrayLike | None = None,
) -> CovarianceSpectrum:
    """Summaries of the covariance spectrum of gradient samples.

    Σ̂ = Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ/(n−1); its nonzero eigenvalues are those of K/(n−1) with K the
    centred n × n Gram matrix (the recorder's ``cov_eigs``).  Returned: λ₁, λ₁/Tr Σ̂ and the
    effective rank r̂ = Tr(Σ̂)²/Tr(Σ̂²) (the participation ratio of the eigenvalues; 1 for rank-one
    noise, P for isotropic noise).  Tr Σ̂ and Tr Σ̂² are taken from ``trace``/``trace_sq`` when given
    (the recorder's exact ``trace`` and ``trace_sq`` columns: all eigenvalues, also beyond the
    ``n_max`` stored), else summed from the eigenvalues (exact only if all nonzero ones are given).

    The plug-in r̂ is biased low: rank Σ̂ ≤ n − 1 caps it, and for Gaussian samples
    E Tr(S²) = ((m+1)/m)·Tr Σ² + (Tr Σ)²/m, E (Tr S)² = (Tr Σ)² + 2 Tr Σ²/m with m = n − 1 (Wishart
    moments).  Solving for Tr Σ² and (Tr Σ)² gives their unbiased estimates under Gaussian sampling
    (Srivastava, *J. Japan Statist. Soc.* 35, 2005; Bai & Saranadasa, *Statist. Sinica* 6, 1996)::

        t₂ = m (m·Tr S² − (Tr S)²) / ((m+2)(m−1)),   t₁² = m ((m+1)(Tr S)² − 2 Tr S²) / ((m+2)(m−1))

    and ``eff_rank_corrected`` = t₁²/t₂ (a ratio of unbiased estimates; Gaussian assumption:
    heavy-tailed noise biases it).  Units: eigenvalues and traces in (loss/parameter)²; the
    ranks and the fraction are dimensionless.

    Parameters
    ----------
    eigenvalues
        ``(m,)`` or ``(N, m)`` descending eigenvalues, NaN-padded (or None with trace, trace_sq).
    trace, trace_sq, n
        Tr Σ̂, Tr Σ̂² and the sample count, per measurement (broadcast against the batch shape).
    """
    if eigenvalues is None and (trace is None or trace_sq is None):
        raise PhasewatchError("covariance_spectrum needs the eigenvalues, or trace and trace_sq")
    if eigenvalues is not None:
        ev = np.asarray(eigenvalues, dtype=np.float64)
        if ev.ndim == 0:
            ev = ev[None]
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(ev)
            top = np.where(ok.any(axis=-1), np.nanmax(np.where(ok, ev, -np.inf), axis=-1), np.nan)
            tr_e = np.where(ok.any(axis=-1), np.where(ok, ev, 0.0).sum(axis=-1), np.nan)
            tr2_e = np.where(ok.any(axis=-1), np.where(ok, ev * ev, 0.0).sum(axis=-1), np.nan)
    else:
        ev = np.full(np.shape(trace) + (0,), np.nan)
        top = tr_e = tr2_e = np.full(np.shape(trace), np.nan)
    T = tr_e if trace is None else np.asarray(trace, dtype=np.float64)
    T2 = tr2_e if trace_sq is None else np.asarray(trace_sq, dtype=np.float64)
    shape = np.broadcast_shapes(np.shape(top), np.shape(T), np.shape(T2), np.shape(n) if n is not None else ())
    top, T, T2 = (np.broadcast_to(x, shape).astype(np.float64) for x in (top, T, T2))
    nn = np.broadcast_to(np.asarray(np.nan if n is None else n, dtype=np.float64), shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(T > 0, top / T, np.nan)
        eff = np.where(T2 > 0, T * T / T2, np.nan)
        m = nn - 1.0
        den = (m + 2.0) * (m - 1.0)
        t2 = m * (m * T2 - T * T) / den
        t1sq = m * ((m + 1.0) * T * T - 2.0 * T2) / den
        corr = np.where((m >= 2) & (t2 > 0) & (t1sq > 0), t1sq / t2, np.nan)
    return CovarianceSpectrum(eigenvalues=ev, trace=_out(T), trace_sq=_out(T2), top=_out(top),
                              top_fraction=_out(frac), eff_rank=_out(eff), eff_rank_corrected=_out(corr),
                              n=_out(nn))


# --------------------------------------------------------------------------- #
# coordinate-wise tails
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class CoordinateTails(Estimate):
    """Pooled tail index of standardised noise coordinates (see :func:`coordinate_tails`).

    Attributes
    ----------
    estimate
        α̂ (Hill, MLE convention; or Mohammadi's stable index).
    ci
        ``(lo, hi)`` at ``level``: percentile bootstrap over samples (rows) for Hill; the block
        bootstrap of :func:`phasewatch.analysis.tails.stable_index` for ``stable``.
    estimator
        ``"hill"`` or ``"stable"``.
    standardized
        Whether each coordinate was divided by its median |x| before pooling.
    n, d
        Samples (rows) and coordinates (columns) used.
    k, threshold
        Hill: order statistics used (``fraction`` of the n·d pooled values) and |z|_(k+1);
        ``stable``: the block length m and NaN.
    ci_method
        ``"row-bootstrap"`` or ``"block-bootstrap"``.
    flags
        Warnings (dropped rows or coordinates, α̂ > 2, ...).
    level, input_description
    """

    _statistic_field = "estimate"  # statistic / confidence_interval: Estimate
    _interval_field = "ci"

    estimate: float
    ci: tuple[float, float]
    estimator: str
    standardized: bool
    n: int
    d: int
    k: int
    threshold: float
    ci_method: str
    flags: tuple[str, ...]
    level: float
    input_description: str


def coordinate_tails(
    samples: ArrayLike,
    *,
    standardize: bool = True,
    estimator: Literal["hill", "stable"] = "hill",
    fraction: float = 0.1,
    level: float = 0.95,
    n_boot: int = 200,
    seed: int | np.random.Generator | None = 0,
    input_description: str = "noise coordinates g_ij - g_bar_j",
) -> CoordinateTails:
    """Tail index of the coordinates of gradient noise, pooled over coordinates.

    ``samples`` is ``(n, d)``: n noise vectors (g^(i) − ḡ, e.g. the recorder's ``grad_proj``
    rows; NaN rows, i.e. padding, are dropped) of d coordinates.  With ``standardize`` each
    coordinate j is divided by its scale s_j = median_i |x_ij| (robust: it exists for any tail
    index), so that coordinates whose tails are c·(x/s_j)^(−α) become identically distributed;
    then the n·d values are pooled.  Pooling raw coordinates whose scales differ by orders of
    magnitude mixes tails of very different reach: the pooled survival function decays slower
    than any of its parts over the range of scales, which reads as a heavier tail (smaller α̂).

    ``hill``: Hill's α̂ = k/Σ_{i≤k} ln(|z|_(i)/|z|_(k+1)) (Hill 1975) on the top
    k = ⌊fraction·n·d⌋ pooled |z| (:func:`phasewatch.analysis.tails.hill`).  Coordinates of one
    sample are dependent (they share the sample's example), so the i.i.d. χ² interval is far too
    narrow; the interval is a percentile bootstrap over samples (whole rows resampled, α̂_k
    recomputed exactly with its threshold, from one sort; O(n_boot·k)).  The scales s_j are held
    fixed in the bootstrap.  ``stable``: the block-sum estimator of Mohammadi et
    al. (2015) (:func:`phasewatch.analysis.tails.stable_index`, its own standardisation and block
    bootstrap); it assumes an α-stable law, so it is biased for noise only in a stable law's domain
    of attraction.  As everywhere (DEFINITIONS §3), α̂ > 2 is no evidence of a stable heavy tail.
    """
    X = np.asarray(samples, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise PhasewatchError(f"coordinate_tails: samples must be (n, d), got shape {X.shape}")
    if estimator not in ("hill", "stable"):
        raise PhasewatchError(f"coordinate_tails: estimator={estimator!r}; use 'hill' or 'stable'")
    flags: list[str] = []
    bad = ~np.isfinite(X).all(axis=1)
    partial = bad & np.isfinite(X).any(axis=1)
    if partial.any():
        flags.append(f"dropped {int(partial.sum())} samples with non-finite coordinates")
    X = X[~bad]
    if estimator == "stable":
        r = tails.stable_index(X, standardize=standardize, block_bootstrap=n_boot, level=level, seed=seed,
                               input_description=input_description)
        return CoordinateTails(float(r.estimate), (float(r.ci[0]), float(r.ci[1])), "stable", standardize,
                               int(r.n), int(r.d), int(r.m), float("nan"), "block-bootstrap",
                               tuple(flags) + tuple(r.flags), level, input_description)
    Z = np.abs(X)
    if standardize and Z.size:
        scale = np.median(Z, axis=0)
        zero = ~(scale > 0)
        if zero.any():
            flags.append(f"excluded {int(zero.sum())} coordinates with zero scale")
            Z, scale = Z[:, ~zero], scale[~zero]
        Z = Z / scale
    n, d = Z.shape
    if n < 2 or n * d < 20:
        raise PhasewatchError(f"coordinate_tails: {n} samples x {d} coordinates; need at least 2 samples "
                              "and 20 values")
    h = tails.hill(Z.ravel(), rule="fraction", fraction=fraction, level=level, input_description=input_description)
    k, u = int(h.k), float(h.threshold)
    lo = hi = np.nan
    if n_boot and not h.degenerate:  # a refused tail (atom, near-ties) has no interval either
        reps = _hill_row_bootstrap(Z, k, int(n_boot), _rng(seed))
        reps = reps[np.isfinite(reps)]
        if reps.size:
            lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    flags += [f for f in h.flags if f not in flags]
    return CoordinateTails(float(h.estimate), (float(lo), float(hi)), "hill", bool(standardize), int(n), int(d),
                           k, u, "row-bootstrap", tuple(flags), float(level), input_description)


def _hill_row_bootstrap(Z: np.ndarray, k: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Hill's α̂_k on ``n_boot`` resamples of the rows of Z (n, d) (with replacement), exactly,
    from the pooled values sorted once: a resample is the original values with the multiplicities w
    (multinomial) of their rows, so its j-th largest value is the value at the first position (in
    descending order) where the cumulative multiplicity exceeds j, i.e. the (j+1)-th entry of the
    positions repeated by their multiplicities.  Those k+1 order statistics go
    through the Hill kernel (:func:`~phasewatch.analysis.tails.hill_top`, without the tie rule:
    duplicates made by resampling are no atom).  Only the top 2k values are used unless a resample
    needs more.  O(n_boot·k)."""
    n, d = Z.shape
    flat = Z.ravel()
    N = flat.size
    draws = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    w = np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n)  # multiplicities

    def run(M: int, w: np.ndarray) -> np.ndarray:
        idx = np.argpartition(-flat, M - 1)[:M] if M < N else np.arange(N)
        idx = idx[np.argsort(-flat[idx], kind="stable")]
        mult = w[:, idx // d]  # (resamples, M): multiplicity of each of the M largest values
        total = mult.sum(axis=1)
        enough = total >= k + 1
        # each resample's values in descending order are the positions repeated by multiplicity; its
        # k+1 largest are the first k+1 of that run (linear in the resamples' sizes)
        rep = np.repeat(np.tile(np.arange(M), len(w)), mult.ravel())
        start = np.concatenate([[0], np.cumsum(total)[:-1]])
        pos = rep[start[:, None] + np.minimum(np.arange(k + 1)[None, :], total[:, None] - 1)]
        alpha = tails.hill_top(flat[idx][pos], check_ties=False).alpha
        return np.where(enough, alpha, np.nan)

    M = min(N, 2 * k)
    reps = run(M, w)
    short = np.isnan(reps)
    while short.any() and M < N:  # resamples that repeat few rows reach deeper into the sorted values
        M = min(N, 4 * M)
        reps[short] = run(M, w[short])
        short = np.isnan(reps)
    return reps


# --------------------------------------------------------------------------- #
# Lévy ratio per step
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class LevyRolling(Estimate):
    """The ``levy`` consolidation ratio on every window of gradient norms.

    ``ends`` index of each window's last value (the step t whose ‖g_t‖ is the window's last
    entry); ``C`` = ‖g_t‖²/(2 D_α W); ``alpha`` the Hill α̂ clipped to [1.1, 1.9], ``alpha_raw``
    before clipping (NaN where the Hill kernel refuses an atom or near-ties in the window's top,
    e.g. clipped norms: ``degenerate`` True there); ``D`` = (σ_α/‖g_t‖)^α; ``window`` W.
    """

    _statistic_field = "C"  # statistic / confidence_interval: Estimate
    _interval_field = None

    ends: np.ndarray
    C: np.ndarray
    alpha: np.ndarray
    alpha_raw: np.ndarray
    D: np.ndarray
    window: int
    degenerate: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def levy_rolling(grad_norm: ArrayLike, window: int = 100, chunk: int = 1 << 15) -> LevyRolling:
    """``consolidation_ratio(variant="levy", grad_norm_window=x[t−W+1..t])`` for every t ≥ W−1.

    Per window (DEFINITIONS §2, the note's Lévy variant): k = max(1, round(0.1 W)); α̂ = Hill on
    the top k, k/Σ_{i≤k} ln(x_(i)/x_(k+1)), clipped to [1.1, 1.9]; σ_α the sample standard
    deviation (ddof 1) of the window; D_α = (σ_α/‖g_t‖)^α̂; C_α = ‖g_t‖²/(2 D_α W) (divided by the
    window length, not P, as the note does).  Vectorised over windows (the same
    :func:`~phasewatch.analysis.consolidation.levy_terms` and Hill kernel as the scalar variant, in chunks of
    ``chunk`` windows; a window whose top holds an atom or near-ties is NaN); a window holding a
    non-finite norm goes through :func:`~phasewatch.analysis.noise.consolidation_ratio` (which
    drops them), and a window whose last norm is not finite and > 0 gives NaN.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    x = np.asarray(grad_norm, dtype=np.float64).ravel()
    W = int(window)
    if W < nz.LEVY_MIN_WINDOW:
        raise PhasewatchError(f"levy_rolling: window={W}; the Lévy variant needs >= {nz.LEVY_MIN_WINDOW} norms")
    N = max(0, x.size - W + 1)
    out = {k: np.full(N, np.nan) for k in ("C", "alpha", "alpha_raw", "D")}
    if not N:
        e = np.empty(0, dtype=np.int64)
        return LevyRolling(e, out["C"], out["alpha"], out["alpha_raw"], out["D"], W)
    view = sliding_window_view(x, W)
    finite = np.isfinite(view).all(axis=1) if not np.isfinite(x).all() else np.ones(N, dtype=bool)
    degenerate = np.zeros(N, dtype=bool)
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        w = view[a:b]
        g = w[:, -1]
        C, al, a_raw, D, h = nz.levy_terms(w, g)  # one formula and one Hill kernel with the scalar variant
        ok = finite[a:b] & (g > 0)
        degenerate[a:b] = h.degenerate & ok
        for key, v in (("C", C), ("alpha", al), ("alpha_raw", a_raw), ("D", D)):
            out[key][a:b] = np.where(ok, v, np.nan)
    for i in np.flatnonzero(~finite):  # rare: windows with a non-finite norm, as the reference does
        try:
            r = nz.consolidation_ratio(variant="levy", grad_norm_window=view[i], ci="none")
        except PhasewatchError:
            continue
        out["C"][i], out["alpha"][i], out["alpha_raw"][i], out["D"][i] = r.C, r.tail_index, r.tail_index_raw, r.diffusion
        degenerate[i] = any("degenerate tail" in f for f in r.flags)
    return LevyRolling(np.arange(W - 1, x.size, dtype=np.int64), out["C"], out["alpha"], out["alpha_raw"],
                       out["D"], W, degenerate)


# --------------------------------------------------------------------------- #
# Langevin ratio per measurement
# --------------------------------------------------------------------------- #
def langevin_ratio(
    *, n: ArrayLike, b: ArrayLike, mean_sq_norm: ArrayLike, trace: ArrayLike, lr: ArrayLike,
    batch_size: ArrayLike, level: float = 0.95, moments: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """C_L = B‖ḡ‖²/(η² b T) and its delta-method interval per measurement (the ``langevin`` variant
    of :func:`~phasewatch.analysis.noise.consolidation_ratio`: D = η² σ̄²/(2B), σ̄² = bT/P,
    C_L = ‖ḡ‖²/(2DP)); NaN where η, B or b is not finite and positive or n < 2.  Units 1/η².
    Returns ``(C, ci)`` with ``ci`` of shape (N, 2)."""
    arrs = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (n, b, mean_sq_norm, trace, lr,
                                                                             batch_size)))
    n_, b_, A, T, eta, B = (np.atleast_1d(v) for v in arrs)
    C = np.full(n_.shape, np.nan)
    ci = np.full(n_.shape + (2,), np.nan)
    ok = (n_ >= 2) & (b_ >= 1) & (eta > 0) & (B > 0) & np.isfinite(A) & np.isfinite(T) & np.isfinite(eta) \
        & np.isfinite(B)
    if ok.any():
        mom = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), n_.shape)[ok] for k, v in (moments or {}).items()}
        r = nz.consolidation_ratio(n=n_[ok], b=b_[ok], mean_sq_norm=A[ok], trace=T[ok], lr=eta[ok],
                                   batch_size=B[ok], variant="langevin", ci="delta", level=level, **mom)
        C[ok] = r.C
        ci[ok] = r.ci
    return C, ci


# --------------------------------------------------------------------------- #
# columns of the analyzer's per-measurement table (Analysis.probes)
# --------------------------------------------------------------------------- #
def measurement_inputs(gs: dict[str, np.ndarray], steps: dict[str, np.ndarray] | None,
                       meta: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """η and B of each ``grad_samples`` measurement, for the ``langevin`` variant.

    η: the learning rate of parameter group 0 in the ``steps`` table at the measurement's step
    (per-example samples are taken after that step, micro-batch and per-rank samples are that
    step's own gradients); NaN if the step is not in the table.  B: the recorder's ``batch_size``
    (``Recorder(batch_size=...)``) when given; else b·n for ``micro_batch``/``per_rank`` samples
    (the micro-batches of one step make up its batch) when b is known; else NaN (a per-example
    probe batch is not the training batch).
    """
    st = np.asarray(gs["step"], dtype=np.int64)
    lr = np.full(st.shape, np.nan)
    if steps is not None and "lr" in steps and len(steps.get("step", [])):
        s = np.asarray(steps["step"], dtype=np.int64)
        lr_all = np.asarray(steps["lr"], dtype=np.float64)
        lr_all = lr_all[:, 0] if lr_all.ndim == 2 else lr_all
        order = np.argsort(s, kind="stable")
        pos = np.clip(np.searchsorted(s[order], st), 0, len(s) - 1)
        hit = s[order][pos] == st
        lr = np.where(hit, lr_all[order][pos], np.nan)
    bs = ((meta or {}).get("recorder") or {}).get("batch_size")
    if bs is not None:
        B = np.full(st.shape, float(bs))
    else:
        src = gs.get("source")
        src = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in src]) if src is not None \
            else np.full(st.shape, "")
        b = np.asarray(gs["b"], dtype=np.float64)
        B = np.where(np.isin(src, ("micro_batch", "per_rank")), b * np.asarray(gs["n"], dtype=np.float64), np.nan)
    return {"lr": lr, "batch_size": B}


def probe_columns(gs: dict[str, np.ndarray], *, lr: ArrayLike | None = None, batch_size: ArrayLike | None = None,
                  level: float = 0.95) -> dict[str, np.ndarray]:
    """Covariance-spectrum and Langevin columns of the per-measurement table.

    ``cov_eff_rank`` = trace²/trace_sq (exact plug-in Tr(Σ̂)²/Tr(Σ̂²), from the stored ``trace`` and
    ``trace_sq``, so also for runs recorded before ``cov_eigs``) and ``cov_eff_rank_corrected``
    (Gaussian-unbiased, :func:`covariance_spectrum`); with the ``cov_eigs`` column also ``cov_top``
    (λ₁) and ``cov_top_fraction`` (λ₁/Tr Σ̂).  ``C_langevin`` with ``C_langevin_lo``/``_hi``
    (:func:`langevin_ratio`) where η and B are known (NaN elsewhere, b unknown counts as unknown; the
    three columns are left out when no measurement has them).
    """
    n = np.asarray(gs["n"], dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    cs = covariance_spectrum(gs.get("cov_eigs"), trace=gs["trace"], trace_sq=gs["trace_sq"], n=n) \
        if "cov_eigs" in gs else covariance_spectrum(trace=gs["trace"], trace_sq=gs["trace_sq"], n=n)
    if "cov_eigs" in gs:
        out["cov_top"] = np.atleast_1d(cs.top)
        out["cov_top_fraction"] = np.atleast_1d(cs.top_fraction)
    out["cov_eff_rank"] = np.atleast_1d(cs.eff_rank)
    out["cov_eff_rank_corrected"] = np.atleast_1d(cs.eff_rank_corrected)
    nan = np.full(n.shape, np.nan)
    moments = {k: gs[k] for k in ("quad", "trace_sq", "fourth", "third")} if all(
        k in gs for k in ("quad", "trace_sq", "fourth", "third")) else None
    C, ci = langevin_ratio(n=n, b=gs["b"], mean_sq_norm=gs["mean_sq_norm"], trace=gs["trace"],
                           lr=nan if lr is None else lr, batch_size=nan if batch_size is None else batch_size,
                           level=level, moments=moments)
    if np.isfinite(C).any():  # no all-NaN columns in the exports when η or B is never known
        out["C_langevin"], out["C_langevin_lo"], out["C_langevin_hi"] = C, ci[:, 0], ci[:, 1]
    return out


def coordinate_columns(gp: dict[str, np.ndarray], steps: ArrayLike, *, level: float = 0.95,
                       n_boot: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    """``alpha_coord`` with ``alpha_coord_lo``/``_hi`` per measurement (aligned to ``steps``; NaN where
    no ``grad_proj`` row or too few values): :func:`coordinate_tails` (standardised, pooled Hill on
    the top 10 %, row bootstrap) of each ``grad_proj`` row's stored centred samples."""
    st = np.asarray(steps, dtype=np.int64)
    out = {k: np.full(st.shape, np.nan) for k in ("alpha_coord", "alpha_coord_lo", "alpha_coord_hi")}
    where = {int(s): i for i, s in enumerate(st.tolist())}
    samples = gp.get("samples")
    for r, s in enumerate(np.asarray(gp.get("step", []), dtype=np.int64).tolist()):
        i = where.get(int(s))
        if i is None:
            continue
        try:
            res = coordinate_tails(np.asarray(samples[r], dtype=np.float64), level=level, n_boot=n_boot, seed=seed)
        except PhasewatchError:
            continue
        out["alpha_coord"][i], (out["alpha_coord_lo"][i], out["alpha_coord_hi"][i]) = res.estimate, res.ci
    return out
