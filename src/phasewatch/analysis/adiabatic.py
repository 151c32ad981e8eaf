"""Adiabatic parameter of the spectral edge.

``A_t = ||Delta C_t||_F / (eta_t * g_t^2)`` (DEFINITIONS §1, "Adiabatic parameter";
Y. Xu, *The Spectral Edge Thesis*, arXiv:2603.28964, 2026), with ``g_t`` the gap
``sigma_{k*} - sigma_{k*+1}`` from :func:`phasewatch.analysis.gram.gap_position`.

Units: ``||Delta C||_F`` has units of ``|u|^2`` and ``g^2`` has units of ``|u|^2``
(``g`` is a difference of singular values, in units of the update norm), so ``A``
carries units of ``1/eta``: since ``u ~ eta``, ``A`` scales like ``1/eta`` at fixed
geometry. This mixes units exactly as the paper defines it; we implement it as
defined. Regimes (paper): ``A << 1`` plateau, ``A ~ 1`` transition, ``A >> 1``
forgetting.

The dimensionless ratio ``A_dk = ||Delta C_t||_F / (lambda_{k*} - lambda_{k*+1})``
(:func:`adiabatic_ratio`) divides the same exact ``||Delta C||_F`` by the eigengap of the Gram
(units of ``|u|^2`` over units of ``|u|^2``): it does not change when the learning rate rescales the
same trajectory, and by Davis–Kahan it bounds the rotation of the top-k* subspace between windows.

Two estimates of ``||Delta C_t||_F`` are supported:

``canonical``
    ``C_t = X_t^T X_t = sum_{i in window} u_i u_i^T`` (basis-free, ``P x P``); between
    the windows ending at ``r-1`` and ``r``, ``Delta C = u_r u_r^T - u_{r-W} u_{r-W}^T``
    and exactly ``||Delta C||_F^2 = ||u_r||^4 + ||u_{r-W}||^4 - 2 <u_r, u_{r-W}>^2``,
    read off the band (needs lag ``W``, i.e. ``K >= W + 1``).
``eigen``
    ``sqrt(sum_j (lambda_j(t) - lambda_j(t-1))^2)`` between consecutive windows (the
    author's proxy). The nonzero eigenvalues of ``C_t`` are those of ``G_t``, so by
    the Hoffman–Wielandt inequality this is a *lower bound* on the canonical value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from phasewatch.analysis.gram import global_band

__all__ = [
    "AdiabaticResult",
    "REGIME_UNDEFINED",
    "REGIME_PLATEAU",
    "REGIME_TRANSITION",
    "REGIME_FORGETTING",
    "REGIME_LABELS",
    "delta_fro_canonical",
    "delta_fro_eigen",
    "classify_regime",
    "adiabatic",
    "AdiabaticRatio",
    "adiabatic_ratio",
    "DK_PLATEAU_BELOW",
    "DK_FORGETTING_ABOVE",
]

AdiabaticVariant = Literal["canonical", "eigen"]

REGIME_UNDEFINED: int = -1
REGIME_PLATEAU: int = 0
REGIME_TRANSITION: int = 1
REGIME_FORGETTING: int = 2
#: Label of each regime code (see also :meth:`AdiabaticResult.labels`).
REGIME_LABELS: dict[int, str] = {
    REGIME_UNDEFINED: "undefined",
    REGIME_PLATEAU: "plateau",
    REGIME_TRANSITION: "transition",
    REGIME_FORGETTING: "forgetting",
}


@dataclass(frozen=True, eq=False)
class AdiabaticResult:
    """Adiabatic parameter per window.

    Attributes
    ----------
    A
        float64 ``(N,)``, ``||Delta C||_F / (eta g^2)``; NaN where undefined.
    delta_fro
        float64 ``(N,)``, the estimate of ``||Delta C||_F`` used.
    variant
        ``"canonical"`` or ``"eigen"``.
    regime
        int8 ``(N,)``: ``-1`` undefined, ``0`` plateau (``A < plateau_below``),
        ``1`` transition, ``2`` forgetting (``A > forgetting_above``).
    ends
        int64 ``(N,)``, band row at which each window ends.
    eta
        float64 ``(N,)``, learning rate at each window end.
    plateau_below, forgetting_above
        The regime thresholds used.
    """

    A: np.ndarray
    delta_fro: np.ndarray
    variant: str
    regime: np.ndarray
    ends: np.ndarray
    eta: np.ndarray
    plateau_below: float
    forgetting_above: float

    def labels(self) -> np.ndarray:
        """Regime labels as a string array (``"plateau"``, ``"transition"``, ...)."""
        table = np.array([REGIME_LABELS[c] for c in sorted(REGIME_LABELS)])
        return table[self.regime.astype(np.int64) + 1]


def delta_fro_canonical(band: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    """Exact ``||C_r - C_{r-1}||_F`` of the basis-free window operator, from the band.

    ``C_r = sum_{i=r-W+1}^{r} u_i u_i^T``, hence ``C_r - C_{r-1} = u_r u_r^T - u_{r-W} u_{r-W}^T``
    and::

        ||Delta C_r||_F^2 = band[r,0]^2 + band[r-W,0]^2 - 2 band[r,W]^2

    (``||u_r||^4 + ||u_{r-W}||^4 - 2<u_r,u_{r-W}>^2``); negative rounding is clipped
    to 0 before the square root.

    Requires lag ``W`` in the band, i.e. ``K >= W + 1``. If ``K < W + 1`` the
    result is all NaN (a ``RuntimeWarning`` is issued); use the ``eigen`` variant
    of :func:`adiabatic` instead. The first window (``r - W < 0``) is NaN.

    Parameters
    ----------
    band
        ``(T, K)`` global band, or ``(T, L, K)`` per-layer band, in which case the
        per-layer operators ``C_r^{(l)}`` are used and the result is ``(N, L)``.
    ends
        int ``(N,)`` window end rows.
    window
        ``W``.

    Returns
    -------
    ndarray, float64, ``(N,)`` (or ``(N, L)``).

    Examples
    --------
    W = 1 and two orthogonal unit updates e₁, e₂: the window operator turns from e₁e₁ᵀ to e₂e₂ᵀ,
    ‖ΔC‖_F = ‖e₂e₂ᵀ − e₁e₁ᵀ‖_F = √2; for two parallel ones (u₁ = u₀) it does not move:

    >>> band = np.array([[1.0, 0.0], [1.0, 0.0]])  # rows [<u_t, u_t>, <u_t, u_t-1>]
    >>> round(float(delta_fro_canonical(band, np.array([1]), 1)[0]), 6)
    1.414214
    >>> float(delta_fro_canonical(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([1]), 1)[0])
    0.0
    """
    b = np.asarray(band, dtype=np.float64)
    if b.ndim not in (2, 3):
        raise ValueError(f"band must have shape (T, K) or (T, L, K), got {b.shape}")
    e = np.asarray(ends, dtype=np.int64)
    if e.ndim != 1:
        raise ValueError(f"ends must be 1-D, got shape {e.shape}")
    W = int(window)
    if W < 1:
        raise ValueError(f"window W={W} must be >= 1")
    T, K = b.shape[0], b.shape[-1]
    out = np.full((e.size,) + b.shape[1:-1], np.nan)
    if K < W + 1:
        warnings.warn(
            f"canonical ||dC||_F needs lag W={W} but band has K={K}; returning NaN "
            "(use variant='eigen')",
            RuntimeWarning,
            stacklevel=2,
        )
        return out
    if np.any((e < 0) | (e >= T)):
        raise ValueError("ends must index rows of the band")
    has_prev = e - W >= 0
    r = e[has_prev]
    now = b[r, ..., 0]
    old = b[r - W, ..., 0]
    cross = b[r, ..., W]
    sq = now * now + old * old - 2.0 * cross * cross
    out[has_prev] = np.sqrt(np.maximum(sq, 0.0))
    return out


def delta_fro_eigen(eigs: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Eigenvalue-change proxy ``sqrt(sum_j (lambda_j(r) - lambda_j(r-1))^2)``.

    Between the windows ending at ``r - 1`` and ``r`` (descending eigenvalues).
    By Hoffman–Wielandt (the sorted eigenvalues of ``C_r``, ``C_{r-1}`` are those of
    ``G_r``, ``G_{r-1}`` padded with zeros), this is a lower bound on the canonical
    ``||C_r - C_{r-1}||_F``. NaN where the previous window is not the row before
    (``ends`` not consecutive) or is absent (first window).

    Returns
    -------
    ndarray, float64, ``(N,)``.
    """
    lam = np.asarray(eigs, dtype=np.float64)
    e = np.asarray(ends, dtype=np.int64)
    if lam.ndim != 2 or e.shape != (lam.shape[0],):
        raise ValueError(f"need eigs (N, W) and ends (N,), got {lam.shape}, {e.shape}")
    out = np.full(e.size, np.nan)
    if e.size < 2:
        return out
    consecutive = np.diff(e) == 1
    d = np.sqrt(np.sum((lam[1:] - lam[:-1]) ** 2, axis=1))
    out[1:] = np.where(consecutive, d, np.nan)
    return out


def classify_regime(
    A: np.ndarray, plateau_below: float = 0.1, forgetting_above: float = 10.0
) -> np.ndarray:
    """Regime code per value of ``A``.

    ``0`` plateau (``A < plateau_below``), ``1`` transition
    (``plateau_below <= A <= forgetting_above``), ``2`` forgetting
    (``A > forgetting_above``), ``-1`` undefined (``A`` NaN or infinite, e.g. a
    zero gap or zero learning rate).

    Returns
    -------
    ndarray, int8, same shape as ``A``.
    """
    if not plateau_below <= forgetting_above:
        raise ValueError(
            f"need plateau_below <= forgetting_above, got {plateau_below}, {forgetting_above}"
        )
    a = np.asarray(A, dtype=np.float64)
    reg = np.full(a.shape, REGIME_UNDEFINED, dtype=np.int8)
    fin = np.isfinite(a)
    reg[fin & (a < plateau_below)] = REGIME_PLATEAU
    reg[fin & (a >= plateau_below) & (a <= forgetting_above)] = REGIME_TRANSITION
    reg[fin & (a > forgetting_above)] = REGIME_FORGETTING
    return reg


def adiabatic(
    band: np.ndarray,
    eigs: np.ndarray,
    ends: np.ndarray,
    gap: np.ndarray,
    lr: np.ndarray,
    window: int,
    variant: AdiabaticVariant = "canonical",
    *,
    plateau_below: float = 0.1,
    forgetting_above: float = 10.0,
) -> AdiabaticResult:
    """Adiabatic parameter ``A_t = ||Delta C_t||_F / (eta_t g_t^2)`` per window.

    Y. Xu, arXiv:2603.28964 (2026); DEFINITIONS §1. ``g_t = sigma_{k*} - sigma_{k*+1}``
    (from :func:`phasewatch.analysis.gram.gap_position`, units of the update
    norm), so ``A`` has units of ``1/eta`` as defined by the paper.

    Parameters
    ----------
    band
        ``(T, K)`` global band or ``(T, L, K)`` per-layer band (summed over layers).
        Only used by the ``canonical`` variant, which needs ``K >= W + 1``
        (otherwise ``A`` is all NaN; the ``eigen`` variant still works).
    eigs
        ``(N, W)`` descending Gram eigenvalues of the windows ending at ``ends``.
    ends
        int ``(N,)`` window end rows.
    gap
        ``(N,)`` gap ``g`` per window.
    lr
        ``(T,)`` learning rate per band row (may be NaN); ``eta_t = lr[ends]``.
    window
        ``W``.
    variant
        ``"canonical"`` (exact ``||Delta C||_F`` from the band) or ``"eigen"``
        (Hoffman–Wielandt lower bound from eigenvalue changes).
    plateau_below, forgetting_above
        Regime thresholds (defaults 0.1 and 10).

    Returns
    -------
    :class:`AdiabaticResult`. ``A`` is NaN (regime undefined) wherever any input is
    NaN or ``A`` is not finite.
    """
    if variant not in ("canonical", "eigen"):
        raise ValueError(f"variant must be 'canonical' or 'eigen', got {variant!r}")
    e = np.asarray(ends, dtype=np.int64)
    g = np.asarray(gap, dtype=np.float64)
    eta_all = np.asarray(lr, dtype=np.float64)
    b = global_band(band)
    if eta_all.shape != (b.shape[0],):
        raise ValueError(f"lr must have shape ({b.shape[0]},), got {eta_all.shape}")
    if g.shape != e.shape:
        raise ValueError(f"gap shape {g.shape} does not match ends shape {e.shape}")
    if variant == "canonical":
        delta = delta_fro_canonical(b, e, window)
    else:
        delta = delta_fro_eigen(eigs, e)
    eta = eta_all[e]
    with np.errstate(divide="ignore", invalid="ignore"):
        A = delta / (eta * g * g)
    A = np.where(np.isfinite(A), A, np.nan)
    return AdiabaticResult(
        A=A,
        delta_fro=delta,
        variant=variant,
        regime=classify_regime(A, plateau_below, forgetting_above),
        ends=e,
        eta=eta,
        plateau_below=float(plateau_below),
        forgetting_above=float(forgetting_above),
    )


#: A_dk below this: plateau.  Davis–Kahan: sin θ ≤ 0.1, the top-k* subspace keeps cos²θ ≥ 0.99 of
#: its overlap with the previous window's (turns by at most 5.7° per step).
DK_PLATEAU_BELOW: float = 0.1
#: A_dk above this: forgetting.  At A_dk ≥ 1 the Davis–Kahan bound sin θ ≤ A_dk is vacuous (sin θ ≤ 1
#: always): nothing prevents the dominant subspace from being replaced in one step.
DK_FORGETTING_ABOVE: float = 1.0


@dataclass(frozen=True, eq=False)
class AdiabaticRatio:
    """Dimensionless adiabatic ratio per window (DEFINITIONS §1).

    Attributes
    ----------
    A_dk
        float64 ``(N,)``, ``||Delta C||_F / (lambda_{k*} - lambda_{k*+1})``; NaN where undefined
        (no previous window, ``k*`` undefined, zero eigengap).
    eigengap
        float64 ``(N,)``, ``lambda_{k*} - lambda_{k*+1}`` (Gram eigenvalues, units of ``|u|^2``).
    regime
        int8 ``(N,)``: ``-1`` undefined, ``0`` plateau (``A_dk < plateau_below``), ``1``
        transition, ``2`` forgetting (``A_dk > forgetting_above``).
    plateau_below, forgetting_above
        The thresholds used.
    """

    A_dk: np.ndarray
    eigengap: np.ndarray
    regime: np.ndarray
    plateau_below: float
    forgetting_above: float


def adiabatic_ratio(
    delta_fro: np.ndarray,
    eigs: np.ndarray,
    kstar: np.ndarray,
    *,
    plateau_below: float = DK_PLATEAU_BELOW,
    forgetting_above: float = DK_FORGETTING_ABOVE,
) -> AdiabaticRatio:
    """``A_dk = ||Delta C||_F / (lambda_{k*} - lambda_{k*+1})`` per window (dimensionless).

    ``delta_fro`` is the exact canonical ``||C_r - C_{r-1}||_F`` (:func:`delta_fro_canonical`), the
    same as in ``A``; ``lambda`` the descending Gram eigenvalues (``sigma^2``) and ``k*`` the observed
    1-indexed gap position.  Both numerator and denominator have units of ``|u|^2``, so ``A_dk`` is
    invariant when every update is multiplied by the same factor (a learning-rate rescaling of the
    same trajectory), unlike the paper's ``A`` (units ``1/eta``).

    Meaning (Davis–Kahan sin-θ theorem, C. Davis & W. Kahan, SIAM J. Numer. Anal. 7, 1970): the
    nonzero spectrum of ``C_r`` is that of ``G_r``, so the top-k* eigenspace of ``C`` (the dominant
    update directions) turns between consecutive windows by an angle with
    ``sin θ ≲ ||Delta C||_F / (lambda_{k*} - lambda_{k*+1}) = A_dk`` (up to the factor 2 of the
    Yu–Wang–Samworth form, which uses the gap of one window only).  Regimes read as rotations:
    ``A_dk < 0.1`` plateau (sin θ ≤ 0.1: ≥ 99% overlap kept, ≤ 5.7° per step), ``0.1–1`` transition
    (a bounded but visible turn), ``A_dk > 1`` forgetting (the bound is vacuous: the subspace may be
    replaced in one step).

    Returns :class:`AdiabaticRatio`.
    """
    d = np.asarray(delta_fro, dtype=np.float64)
    lam = np.asarray(eigs, dtype=np.float64)
    k = np.asarray(kstar, dtype=np.int64)
    if lam.ndim != 2 or d.shape != (lam.shape[0],) or k.shape != d.shape:
        raise ValueError(f"need delta_fro (N,), eigs (N, W) and kstar (N,), got {d.shape}, {lam.shape}, {k.shape}")
    N, W = lam.shape
    gap = np.full(N, np.nan)
    rows = np.nonzero((k >= 1) & (k <= W - 1))[0]
    gap[rows] = lam[rows, k[rows] - 1] - lam[rows, k[rows]]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = d / gap
    a = np.where(np.isfinite(a), a, np.nan)
    return AdiabaticRatio(A_dk=a, eigengap=gap, regime=classify_regime(a, plateau_below, forgetting_above),
                          plateau_below=float(plateau_below), forgetting_above=float(forgetting_above))
