"""Window Gram spectra of the update stream (the "spectral edge").

Implements section 1 of ``DEFINITIONS.md`` for the *band route* (spectra read off
the recorded inner-product band) and the *snapshot route* (spectra computed by
SVD of stored update vectors), which must agree.

Reference: Y. Xu, *The Spectral Edge Thesis: A Mathematical Framework for
Intra-Signal Phase Transitions in Neural Network Training*, arXiv:2603.28964 (2026).

Data convention
---------------
``band`` is a float64 array of shape ``(T, K)`` (or ``(T, L, K)`` per layer, whose
sum over ``L`` is the global band). Row ``r`` is the recorded update ``u_r``
(rows are consecutive updates) and::

    band[r, j] = <u_r, u_{r-j}>,   j = 0 .. K-1,

NaN where ``r - j < 0`` or where the earlier update is unknown.

A window of width ``W`` ending at row ``r`` stacks ``X_r = [u_{r-W+1}; ...; u_r]``
(``W x P``); its Gram matrix ``G_r = X_r X_r^T`` has entries
``G[a, b] = band[max(i, j), |i - j|]`` with ``i = r-W+1+a``, ``j = r-W+1+b``.

Everything is float64 and vectorised over windows (batched ``eigvalsh``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "Spectra",
    "window_grams",
    "gram_spectra",
    "singular_values",
    "gap_position",
    "g23",
    "BBPReference",
    "bbp_reference",
    "bbp_ratio",
    "stability_coefficients",
    "compute_spectra",
    "band_from_updates",
    "window_singular_values",
    "spectra_from_updates",
    "global_band",
]

GapVariant = Literal["plain", "weighted"]

#: Default relative floor for the denominator of the gap ratio (DEFINITIONS §1).
DEFAULT_REL_FLOOR: float = 1e-10


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _check_window(window: int) -> int:
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    window = int(window)
    if window < 1:
        raise ValueError(f"window W={window} must be >= 1")
    return window


def global_band(band: np.ndarray) -> np.ndarray:
    """Return the global band ``(T, K)`` from a global or per-layer band.

    For a per-layer band ``(T, L, K)`` the global band is the exact sum over
    layers, ``b_t[j] = sum_l b_t^{(l)}[j]`` (NaN in any layer propagates).

    Returns
    -------
    ndarray, float64, shape ``(T, K)``.
    """
    b = np.asarray(band, dtype=np.float64)
    if b.ndim == 2:
        return b
    if b.ndim == 3:
        return b.sum(axis=1)
    raise ValueError(f"band must have shape (T, K) or (T, L, K), got {b.shape}")


def _window_ends(T: int, window: int) -> np.ndarray:
    return np.arange(window - 1, T, dtype=np.int64)


# --------------------------------------------------------------------------- #
# band route
# --------------------------------------------------------------------------- #
def window_grams(band: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Window Gram matrices read off the band.

    ``G_r[a, b] = band[max(i, j), |i - j|]`` with ``i = r-W+1+a``,
    ``j = r-W+1+b``, for every window end ``r = W-1, ..., T-1``
    (``N = T - W + 1`` windows), i.e. ``G_r = X_r X_r^T`` with
    ``X_r = [u_{r-W+1}; ...; u_r]`` (DEFINITIONS §1, "Window Gram").

    Parameters
    ----------
    band
        ``(T, K)`` global band, or ``(T, L, K)`` per-layer band (then one Gram per
        layer is returned).
    window
        Window width ``W``; requires ``W <= K`` (only lags ``0..W-1`` are read).

    Returns
    -------
    grams
        float64, ``(N, W, W)`` (or ``(N, L, W, W)`` for a per-layer band). A window
        touching any NaN band entry contains NaN; callers treat it as invalid.
    ends
        int64 ``(N,)``: the band row index ``r`` at which each window ends.

    Raises
    ------
    ValueError
        If ``W > K``.
    """
    window = _check_window(window)
    b = np.asarray(band, dtype=np.float64)
    if b.ndim not in (2, 3):
        raise ValueError(f"band must have shape (T, K) or (T, L, K), got {b.shape}")
    T, K = b.shape[0], b.shape[-1]
    if window > K:
        raise ValueError(f"window W={window} exceeds band length K={K}; need W <= K")
    ends = _window_ends(T, window)
    N = ends.size
    offs = np.arange(window)
    # step index of row a of window n: i[n, a] = ends[n] - W + 1 + a
    rows = ends[:, None] - (window - 1) + offs[None, :]  # (N, W)
    row_idx = np.maximum(rows[:, :, None], rows[:, None, :])  # (N, W, W)
    lag_idx = np.abs(offs[:, None] - offs[None, :])  # (W, W)
    bk = np.moveaxis(b, -1, 1)  # (T, K) or (T, K, L)
    if N == 0:
        grams = np.empty((0,) + b.shape[1:-1] + (window, window), dtype=np.float64)
        return grams, ends
    grams = bk[row_idx, lag_idx[None, :, :]]  # (N, W, W) or (N, W, W, L)
    if b.ndim == 3:
        grams = np.moveaxis(grams, -1, 1)  # (N, L, W, W)
    return np.ascontiguousarray(grams), ends


def gram_spectra(grams: np.ndarray) -> np.ndarray:
    """Eigenvalues of a stack of symmetric Gram matrices, in descending order.

    ``lambda_1 >= ... >= lambda_W`` of each ``G`` (DEFINITIONS §1, "Spectrum").
    Computed with one batched ``np.linalg.eigvalsh`` over the finite windows only;
    a window with any non-finite entry yields a row of NaN.

    Parameters
    ----------
    grams
        ``(..., W, W)`` symmetric matrices.

    Returns
    -------
    ndarray, float64, ``(..., W)``, descending along the last axis.
    """
    g = np.asarray(grams, dtype=np.float64)
    if g.ndim < 2 or g.shape[-1] != g.shape[-2]:
        raise ValueError(f"grams must have shape (..., W, W), got {g.shape}")
    out = np.full(g.shape[:-1], np.nan, dtype=np.float64)
    finite = np.isfinite(g).all(axis=(-2, -1))
    if finite.any():
        out[finite] = np.linalg.eigvalsh(g[finite])[..., ::-1]
    return out


def singular_values(eigs: np.ndarray) -> np.ndarray:
    """Singular values of the window matrices from Gram eigenvalues.

    ``sigma_j = sqrt(max(lambda_j, 0))`` (negative rounding clipped; NaN kept).

    Returns
    -------
    ndarray, float64, same shape as ``eigs`` (descending if ``eigs`` is).
    """
    lam = np.asarray(eigs, dtype=np.float64)
    return np.sqrt(np.maximum(lam, 0.0))


def gap_position(
    sigma: np.ndarray,
    variant: GapVariant = "plain",
    rel_floor: float = DEFAULT_REL_FLOOR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position, ratio and size of the spectral gap per window.

    ``plain``:    ``k* = argmax_{1<=j<=W-1} sigma_j / sigma_{j+1}``
    ``weighted``: ``k* = argmax_j (sigma_j / sum_i sigma_i) * (sigma_j / sigma_{j+1})``
    (the form used in the replication code of Y. Xu, arXiv:2603.28964), both over
    the ``j`` with ``sigma_{j+1} > rel_floor * sigma_1``. Ties go to the smallest
    ``j``. Then ``R = sigma_{k*} / sigma_{k*+1}`` (the plain ratio, also for the
    weighted variant) and ``g = sigma_{k*} - sigma_{k*+1}``.

    Parameters
    ----------
    sigma
        ``(N, W)`` singular values, descending in each row.
    variant
        ``"plain"`` (canonical) or ``"weighted"``.
    rel_floor
        Relative numerical floor for the denominator ``sigma_{j+1}``.

    Returns
    -------
    kstar
        int64 ``(N,)``, 1-indexed; ``0`` means undefined (row contains NaN, ``W < 2``,
        or no ``j`` passes the floor).
    ratio
        float64 ``(N,)``, NaN where undefined.
    gap
        float64 ``(N,)``, NaN where undefined.

    Examples
    --------
    σ = (4, 2, 1) has two equal ratios 2; the tie goes to j = 1. σ = (4, 3, 1) has its gap at 2
    (4/3 < 3), and the weighted form keeps it there (4/8·4/3 = 0.67 < 3/8·3 = 1.125):

    >>> k, r, g = gap_position(np.array([[4.0, 2.0, 1.0], [4.0, 3.0, 1.0]]))
    >>> k.tolist(), r.tolist(), g.tolist()
    ([1, 2], [2.0, 3.0], [2.0, 2.0])
    >>> gap_position(np.array([[4.0, 3.0, 1.0]]), "weighted")[0].tolist()
    [2]
    """
    if variant not in ("plain", "weighted"):
        raise ValueError(f"variant must be 'plain' or 'weighted', got {variant!r}")
    if not rel_floor >= 0:
        raise ValueError(f"rel_floor must be >= 0, got {rel_floor}")
    s = np.asarray(sigma, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"sigma must have shape (N, W), got {s.shape}")
    N, W = s.shape
    kstar = np.zeros(N, dtype=np.int64)
    ratio = np.full(N, np.nan)
    gap = np.full(N, np.nan)
    if W < 2 or N == 0:
        return kstar, ratio, gap
    num, den = s[:, :-1], s[:, 1:]
    finite = np.isfinite(s).all(axis=1)
    qualifies = finite[:, None] & (den > rel_floor * s[:, :1])
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(qualifies, num / den, np.nan)
        if variant == "plain":
            score = r
        else:
            total = s.sum(axis=1, keepdims=True)
            score = (num / total) * r
    score = np.where(qualifies, score, -np.inf)
    j = np.argmax(score, axis=1)
    has = qualifies.any(axis=1)
    rows = np.nonzero(has)[0]
    jj = j[rows]
    kstar[rows] = jj + 1
    ratio[rows] = r[rows, jj]
    gap[rows] = num[rows, jj] - den[rows, jj]
    return kstar, ratio, gap


def g23(eigs: np.ndarray) -> np.ndarray:
    """The paper's Table 7 statistic ``g23 = lambda_2 - lambda_3`` (Gram eigenvalues).

    Returns
    -------
    ndarray, float64, ``(N,)``; all NaN if ``W < 3``.
    """
    lam = np.asarray(eigs, dtype=np.float64)
    if lam.ndim != 2:
        raise ValueError(f"eigs must have shape (N, W), got {lam.shape}")
    if lam.shape[1] < 3:
        return np.full(lam.shape[0], np.nan)
    return lam[:, 1] - lam[:, 2]


@dataclass(frozen=True, eq=False)
class BBPReference:
    """Baik–Ben Arous–Péché reference scales for each window.

    Attributes
    ----------
    nu
        ``(N,)`` noise scale per coordinate, ``nu^2 = mean(lambda_{floor(W/2)..W}) / P``.
    d_crit
        ``(N,)`` BBP detection threshold for a spike's *signal* strength,
        ``d_crit = nu * (P m)^{1/4}`` with ``m = W - 1``.
    edge
        ``(N,)`` bulk edge of the noise singular values,
        ``edge = nu * (sqrt(P) + sqrt(m))``.
    ratio
        ``(N, W)`` ``sigma_j / d_crit`` — the quantity DEFINITIONS §1 asks to report.
        Note: for pure noise, ``sigma_1 / d_crit ~ (P/m)^{1/4} + (m/P)^{1/4} >= 2``,
        so a value above 1 does **not** by itself indicate a detectable spike.
    edge_ratio
        ``(N, W)`` ``sigma_j / edge`` (about 1 for the top noise singular value).
    spike_ratio
        ``(N, W)`` ``d_hat_j / d_crit`` where ``d_hat_j`` inverts the spiked-model
        relation ``sigma^2 = (d^2 + nu^2 P)(d^2 + nu^2 m) / d^2``
        (Benaych-Georges & Nadakuditi 2012); ``> 1`` iff ``sigma_j > edge``, NaN
        below the edge (no detectable spike).
    n_params, window
        ``P`` and ``W`` used.
    """

    nu: np.ndarray
    d_crit: np.ndarray
    edge: np.ndarray
    ratio: np.ndarray
    edge_ratio: np.ndarray
    spike_ratio: np.ndarray
    n_params: int
    window: int


def bbp_reference(
    eigs: np.ndarray, n_params: int, window: int | None = None
) -> BBPReference:
    """BBP (Baik, Ben Arous & Péché, Ann. Probab. 33, 2005) reference for each window.

    With eigenvalues ``lambda_1 >= ... >= lambda_W`` of ``G = X X^T`` (``X`` is
    ``W x P``), the per-coordinate noise variance is estimated from the lower half
    of the spectrum, ``nu^2 = mean(lambda_{floor(W/2)}, ..., lambda_W) / P``
    (1-indexed, inclusive), and ``d_crit = nu * (P (W-1))^{1/4}`` (DEFINITIONS §1;
    Y. Xu, arXiv:2603.28964). Also returns the noise bulk edge and a calibrated
    spike-strength ratio; see :class:`BBPReference`.

    Parameters
    ----------
    eigs
        ``(N, W)`` descending Gram eigenvalues.
    n_params
        ``P``, the dimension of the update vectors (the projected dimension ``d``
        if the band was recorded on projected updates).
    window
        ``W``; defaults to ``eigs.shape[1]`` and must equal it. ``W >= 2``.
    """
    lam = np.asarray(eigs, dtype=np.float64)
    if lam.ndim != 2:
        raise ValueError(f"eigs must have shape (N, W), got {lam.shape}")
    W = lam.shape[1] if window is None else _check_window(window)
    if W != lam.shape[1]:
        raise ValueError(f"window W={W} does not match eigs.shape[1]={lam.shape[1]}")
    if W < 2:
        raise ValueError(f"BBP reference needs window W >= 2, got W={W}")
    P = int(n_params)
    if P < 1:
        raise ValueError(f"n_params must be >= 1, got {n_params}")
    m = W - 1
    lo = W // 2 - 1  # 0-indexed start of lambda_{floor(W/2)}
    nu2 = lam[:, lo:].mean(axis=1) / P
    nu = np.sqrt(np.maximum(nu2, 0.0))
    d_crit = nu * (P * m) ** 0.25
    edge = nu * (np.sqrt(P) + np.sqrt(m))
    sig = singular_values(lam)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = sig / d_crit[:, None]
        edge_ratio = sig / edge[:, None]
        a = (nu2 * P)[:, None]
        b = (nu2 * m)[:, None]
        c = sig**2 - a - b
        disc = c * c - 4.0 * a * b
        above = (c > 0) & (disc >= 0)
        d2 = np.where(above, 0.5 * (c + np.sqrt(np.where(above, disc, 0.0))), np.nan)
        spike_ratio = np.sqrt(d2) / d_crit[:, None]
    return BBPReference(
        nu=nu,
        d_crit=d_crit,
        edge=edge,
        ratio=ratio,
        edge_ratio=edge_ratio,
        spike_ratio=spike_ratio,
        n_params=P,
        window=W,
    )


def bbp_ratio(eigs: np.ndarray, n_params: int, window: int | None = None) -> np.ndarray:
    """``sigma_j / d_crit`` per window and mode (DEFINITIONS §1, "BBP reference").

    ``d_crit = nu * (P (W-1))^{1/4}``, ``nu^2 = mean(lambda_{floor(W/2)..W}) / P``
    (1-indexed, inclusive, eigenvalues descending); Baik–Ben Arous–Péché (2005).

    Caveat: ``d_crit`` is the threshold on a spike's *signal* strength, while
    ``sigma_j`` is an *observed* singular value; for pure noise the top ratio is
    about ``(P/(W-1))^{1/4} + ((W-1)/P)^{1/4}`` (>= 2, large when ``P >> W``).
    Use :func:`bbp_reference` (``edge_ratio``, ``spike_ratio``) for a calibrated
    comparison.

    Returns
    -------
    ndarray, float64, ``(N, W)``.
    """
    return bbp_reference(eigs, n_params, window).ratio


def stability_coefficients(eigs: np.ndarray, delta_fro: np.ndarray) -> np.ndarray:
    """Per-mode stability coefficient (the paper's "alpha").

    ``s_j = 1 - ||Delta G||_F^2 / gap_j^2`` with ``gap_j = min_{k != j} |lambda_j - lambda_k|``.
    By Davis–Kahan (sin-theta theorem), the rotation of eigenvector ``j`` obeys
    ``sin theta_j <= ||Delta G||_F / gap_j``, so ``s_j > 0`` means the mode is
    stable against the perturbation. Y. Xu, arXiv:2603.28964 (2026).

    Parameters
    ----------
    eigs
        ``(N, W)`` descending Gram eigenvalues.
    delta_fro
        ``(N,)`` Frobenius norm of the perturbation per window (e.g. from
        :func:`phasewatch.analysis.adiabatic.delta_fro_canonical`).

    Returns
    -------
    ndarray, float64, ``(N, W)``. ``-inf`` where ``gap_j = 0 < ||Delta G||``, NaN where
    inputs are NaN or ``W < 2``.
    """
    lam = np.asarray(eigs, dtype=np.float64)
    d = np.asarray(delta_fro, dtype=np.float64)
    if lam.ndim != 2:
        raise ValueError(f"eigs must have shape (N, W), got {lam.shape}")
    if d.shape != (lam.shape[0],):
        raise ValueError(f"delta_fro must have shape ({lam.shape[0]},), got {d.shape}")
    N, W = lam.shape
    if W < 2:
        return np.full((N, W), np.nan)
    # eigenvalues are sorted, so the nearest other eigenvalue is a neighbour
    diffs = np.abs(np.diff(lam, axis=1))  # (N, W-1)
    inf_col = np.full((N, 1), np.inf)
    gap_j = np.minimum(
        np.concatenate([inf_col, diffs], axis=1), np.concatenate([diffs, inf_col], axis=1)
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - d[:, None] ** 2 / gap_j**2


# --------------------------------------------------------------------------- #
# result object
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class Spectra:
    """Per-window spectra of the update stream (DEFINITIONS §1).

    Attributes
    ----------
    ends
        int64 ``(N,)``, band row at which each window ends.
    eigs
        ``(N, W)`` Gram eigenvalues, descending.
    sigma
        ``(N, W)`` singular values ``sqrt(max(lambda, 0))``.
    kstar, ratio, gap
        Plain gap position (1-indexed, 0 = undefined), ``sigma_k*/sigma_{k*+1}``
        and ``sigma_k* - sigma_{k*+1}``.
    kstar_weighted, ratio_weighted, gap_weighted
        The same for the ``weighted`` variant (ratio is still the plain ratio at
        the weighted ``k*``).
    g23
        ``lambda_2 - lambda_3``.
    valid
        bool ``(N,)``, window fully finite.
    bbp
        ``(N, W)`` ``sigma_j / d_crit`` if ``n_params`` was given, else ``None``.
    window, n_params, rel_floor
        Parameters used.
    source
        ``"band"`` or ``"snapshot"`` (the route the spectra came from).
    gap_convention
        Name of the canonical gap convention (``"plain"``).
    """

    ends: np.ndarray
    eigs: np.ndarray
    sigma: np.ndarray
    kstar: np.ndarray
    ratio: np.ndarray
    gap: np.ndarray
    kstar_weighted: np.ndarray
    ratio_weighted: np.ndarray
    gap_weighted: np.ndarray
    g23: np.ndarray
    valid: np.ndarray
    bbp: np.ndarray | None
    window: int
    n_params: int | None
    rel_floor: float
    source: str
    gap_convention: str = "plain"

    def __len__(self) -> int:
        return int(self.ends.size)


def _assemble(
    ends: np.ndarray,
    eigs: np.ndarray,
    sigma: np.ndarray,
    window: int,
    n_params: int | None,
    rel_floor: float,
    source: str,
) -> Spectra:
    kstar, ratio, gap = gap_position(sigma, "plain", rel_floor)
    kw, rw, gw = gap_position(sigma, "weighted", rel_floor)
    valid = np.isfinite(eigs).all(axis=1)
    bbp = None
    if n_params is not None and window >= 2:
        bbp = bbp_ratio(eigs, n_params, window)
    return Spectra(
        ends=ends,
        eigs=eigs,
        sigma=sigma,
        kstar=kstar,
        ratio=ratio,
        gap=gap,
        kstar_weighted=kw,
        ratio_weighted=rw,
        gap_weighted=gw,
        g23=g23(eigs),
        valid=valid,
        bbp=bbp,
        window=window,
        n_params=None if n_params is None else int(n_params),
        rel_floor=float(rel_floor),
        source=source,
    )


def compute_spectra(
    band: np.ndarray,
    window: int,
    n_params: int | None = None,
    rel_floor: float = DEFAULT_REL_FLOOR,
) -> Spectra:
    """All per-window spectral statistics from the band (band route).

    Builds ``G_r`` (:func:`window_grams`), its descending eigenvalues
    (:func:`gram_spectra`), ``sigma = sqrt(max(lambda, 0))``, the plain and weighted
    gap positions (:func:`gap_position`), ``g23 = lambda_2 - lambda_3`` and, if
    ``n_params`` is given, ``sigma_j / d_crit`` (:func:`bbp_ratio`).
    Y. Xu, arXiv:2603.28964 (2026); DEFINITIONS §1.

    Parameters
    ----------
    band
        ``(T, K)`` global band or ``(T, L, K)`` per-layer band (summed over layers).
    window
        ``W <= K``.
    n_params
        ``P`` for the BBP reference (optional).

    Returns
    -------
    :class:`Spectra` with ``source="band"``.
    """
    window = _check_window(window)
    grams, ends = window_grams(global_band(band), window)
    eigs = gram_spectra(grams)
    return _assemble(ends, eigs, singular_values(eigs), window, n_params, rel_floor, "band")


# --------------------------------------------------------------------------- #
# snapshot route / brute-force reference
# --------------------------------------------------------------------------- #
def band_from_updates(
    updates: np.ndarray,
    K: int,
    layer_sizes: Sequence[int] | None = None,
) -> np.ndarray:
    """Build the band exactly from stored update vectors.

    ``band[r, j] = <u_r, u_{r-j}>`` for ``j = 0..K-1``, NaN where ``r - j < 0``
    (NaN entries of ``u`` propagate). Accumulated in float64.

    Parameters
    ----------
    updates
        ``(T, P)`` update vectors, one per row (consecutive updates).
    K
        Band length (number of lags, including lag 0).
    layer_sizes
        Optional sizes of consecutive column groups (summing to ``P``); then a
        per-layer band ``(T, L, K)`` is returned, whose sum over ``L`` is the
        global band.

    Returns
    -------
    ndarray, float64, ``(T, K)`` or ``(T, L, K)``.
    """
    U = np.asarray(updates, dtype=np.float64)
    if U.ndim != 2:
        raise ValueError(f"updates must have shape (T, P), got {U.shape}")
    K = int(K)
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    T, P = U.shape
    if layer_sizes is None:
        band = np.full((T, K), np.nan)
        for j in range(min(K, T)):  # loop over lags, vectorised over steps
            band[j:, j] = np.einsum("ij,ij->i", U[j:], U[: T - j])
        return band
    sizes = np.asarray(layer_sizes, dtype=np.int64)
    if sizes.ndim != 1 or np.any(sizes < 0) or sizes.sum() != P:
        raise ValueError(f"layer_sizes must be non-negative and sum to P={P}")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    L = sizes.size
    band = np.full((T, L, K), np.nan)
    for j in range(min(K, T)):  # loop over lags and layers, vectorised over steps
        for li in range(L):
            a, b = bounds[li], bounds[li + 1]
            band[j:, li, j] = np.einsum("ij,ij->i", U[j:, a:b], U[: T - j, a:b])
    return band


def window_singular_values(
    updates: np.ndarray,
    window: int,
    max_block_elements: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of every window of stored updates, by SVD (brute force).

    For each ``r = W-1..T-1``: ``sigma(r) = svd([u_{r-W+1}; ...; u_r])``, descending,
    zero-padded to ``W`` if ``P < W``. Windows with a non-finite entry give NaN.
    Batched SVD over blocks of windows holding at most ``max_block_elements``
    floats (memory bound ``O(block * W * P)``).

    Returns
    -------
    sigma
        float64 ``(N, W)``.
    ends
        int64 ``(N,)``.
    """
    window = _check_window(window)
    U = np.asarray(updates, dtype=np.float64)
    if U.ndim != 2:
        raise ValueError(f"updates must have shape (T, P), got {U.shape}")
    T, P = U.shape
    ends = _window_ends(T, window)
    N = ends.size
    sigma = np.full((N, window), np.nan)
    if N == 0:
        return sigma, ends
    row_ok = np.isfinite(U).all(axis=1).astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(row_ok)])
    ok = (csum[ends + 1] - csum[ends + 1 - window]) == window  # (N,)
    views = sliding_window_view(U, window, axis=0)  # (N, P, W)
    idx = np.nonzero(ok)[0]
    kmin = min(window, P)
    block = max(1, int(max_block_elements) // max(1, window * P))
    for start in range(0, idx.size, block):  # loop over blocks of windows
        sel = idx[start : start + block]
        X = np.swapaxes(views[sel], 1, 2)  # (n, W, P)
        s = np.linalg.svd(X, compute_uv=False)  # (n, min(W, P)), descending
        sigma[sel, :kmin] = s
        sigma[sel, kmin:] = 0.0
    return sigma, ends


def spectra_from_updates(
    updates: np.ndarray,
    window: int,
    n_params: int | None = None,
    rel_floor: float = DEFAULT_REL_FLOOR,
) -> Spectra:
    """Spectra from stored (raw or projected) update snapshots (snapshot route).

    ``sigma`` by SVD of each window ``[u_{r-W+1}; ...; u_r]``
    (:func:`window_singular_values`), ``lambda = sigma^2``, and the same gap, g23
    and BBP statistics as :func:`compute_spectra`. Must agree with the band route
    (DEFINITIONS §1, "Snapshot route").

    Parameters
    ----------
    updates
        ``(T, P)`` update vectors.
    window
        ``W``.
    n_params
        ``P`` for the BBP reference; defaults to ``updates.shape[1]``.

    Returns
    -------
    :class:`Spectra` with ``source="snapshot"``.
    """
    window = _check_window(window)
    U = np.asarray(updates, dtype=np.float64)
    sigma, ends = window_singular_values(U, window)
    eigs = sigma**2
    if n_params is None and U.ndim == 2:
        n_params = U.shape[1]
    return _assemble(ends, eigs, sigma, window, n_params, rel_floor, "snapshot")
