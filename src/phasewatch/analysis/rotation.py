"""Subspace rotation between consecutive update windows, from the band alone (DEFINITIONS §1,
"Subspace rotation").

For the window ending at row r, X₂ = [u_{r−W+1}; …; u_r], and the one before it, X₁ =
[u_{r−W}; …; u_{r−1}], the largest principal angle θ_max between the top-k right singular
subspaces V₁ = span of the first k right singular vectors of X₁ and V₂ (those of X₂), with
k = k*_r the gap position of the *later* window (both subspaces of the same dimension: the
subspace that window calls dominant, and where it was one step before; the rotation that A_dk
bounds: sin θ ≲ A_dk by Davis–Kahan).  With k*_{r−1} ≠ k*_r the earlier window's top-k*_r subspace
is still compared, so a change of k* does not show as a jump to π/2 by itself.

Derivation.  With X = A Σ Vᵀ (thin SVD), the eigenvectors a_j of XXᵀ = G are the left singular
vectors, and the right singular vectors are v_j = Xᵀ a_j / σ_j.  So the overlap of the two
subspaces is

    O = V₁ᵀ V₂ = Σ₁⁻¹ A₁ᵀ (X₁ X₂ᵀ) A₂ Σ₂⁻¹        (k × k; A_i the top-k eigenvectors, Σ_i their σ)

and cos θ_i are the singular values of O.  X₁X₂ᵀ holds ⟨u_{r−W+a}, u_{r−W+1+b}⟩ at lags up to W,
so it is in a band of width K ≥ W+1: it is the off-diagonal block of the (W+1)-row Gram
G' = X'X'ᵀ of X' = [u_{r−W}; …; u_r] (G₁ = G'[:W, :W], G₂ = G'[1:, 1:], X₁X₂ᵀ = G'[:W, 1:]).
For accuracy at small angles (1 − cos θ loses everything below √ε) the two subspaces are written
in an orthonormal basis of span(X'): with G' = A' Λ' A'ᵀ and X' = A' Σ' V'ᵀ,

    C₁ = V'ᵀ V₁ = Σ' A'ᵀ [A₁; 0] Σ₁⁻¹,   C₂ = Σ' A'ᵀ [0; A₂] Σ₂⁻¹     ((W+1) × k each)

(V'ᵀ X₁ᵀ = Σ' A'ᵀ E₁ᵀ with E₁ the first W rows, so only the top-k σ of each window are inverted),
and the angles come from them as in Björck & Golub (1973) / ``scipy.linalg.subspace_angles``:
Q_i = qr(C_i), cos θ the singular values of Q₁ᵀQ₂, sin θ those of D = Q₂ − Q₁Q₁ᵀQ₂ (the part of
V₂ outside V₁; as √eigenvalues of DᵀD, D formed first, so small sines keep their relative
accuracy); θ_max = arcsin(sin_max) when cos_min² ≥ ½, else arccos(cos_min).  Cost: one (W+1) and
one W eigensolve per window (a window's G₂ is the next one's G₁), ~30 µs a window at W = 10.

Undefined (NaN): K < W+1 (the lag-W inner products were not recorded), the first window of a
trajectory (no window before it), a window or its predecessor not finite, k* undefined, or the
earlier window's σ_k at or below the numerical floor (its top-k subspace is not defined).
"""

from __future__ import annotations

import numpy as np

from . import gram

__all__ = ["window_rotation"]


def window_rotation(band: np.ndarray, kstar: np.ndarray, ends: np.ndarray, window: int,
                    rel_floor: float = gram.DEFAULT_REL_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Largest principal angle (radians) between the top-k right singular subspaces of each window
    and the window one row before it, k = ``kstar`` of the later window (see the module docstring).

    Parameters:
    band: ``(T, K)`` global band (float64); K ≥ W+1 for any finite result.
    kstar: ``(N,)`` 1-indexed gap positions of the windows ending at ``ends`` (0: undefined).
    ends: ``(N,)`` band rows at which the windows end.
    window: W.

    Returns (rotation, rotation_sin): float64 ``(N,)`` each, θ_max in [0, π/2] and sin θ_max; NaN where
    undefined.
    """
    b = np.asarray(band, dtype=np.float64)
    ends = np.asarray(ends, dtype=np.int64)
    kstar = np.asarray(kstar, dtype=np.int64)
    W = int(window)
    N = ends.size
    theta = np.full(N, np.nan)
    sin = np.full(N, np.nan)
    if b.ndim != 2 or b.shape[1] < W + 1 or N == 0:
        return theta, sin
    big, big_ends = gram.window_grams(b, W + 1)  # G' of rows r−W .. r, for r = W .. T−1
    pos = np.searchsorted(big_ends, ends)
    ok = (ends >= W) & (kstar >= 1) & (kstar <= W - 1)
    pos = np.where(ok, np.minimum(pos, max(big_ends.size - 1, 0)), 0)
    ok &= big_ends.size > 0
    if ok.any():
        ok[ok] = big_ends[pos[ok]] == ends[ok]
        ok[ok] = np.isfinite(big[pos[ok]]).all(axis=(1, 2))
    if not ok.any():
        return theta, sin
    sel = np.nonzero(ok)[0]
    lam_p, vec_p = np.linalg.eigh(big[pos[sel]])  # G' = A' Λ' A'ᵀ, (n, W+1, W+1)
    # the W-row windows: window r's G₂ is window r+1's G₁, so each is solved once
    need = np.unique(np.concatenate([ends[sel] - 1, ends[sel]]))
    small, small_ends = gram.window_grams(b[need.min() - W + 1: need.max() + 1], W)
    small = small[np.searchsorted(small_ends + need.min() - W + 1, need)]
    lam_w, vec_w = np.linalg.eigh(small)
    lam_w, vec_w = lam_w[:, ::-1], vec_w[:, :, ::-1]  # descending
    s_w = np.sqrt(np.maximum(lam_w, 0.0))
    i1, i2 = np.searchsorted(need, ends[sel] - 1), np.searchsorted(need, ends[sel])
    s_p = np.sqrt(np.maximum(lam_p, 0.0))
    at = vec_p.transpose(0, 2, 1)  # A'ᵀ
    ks = kstar[sel]
    for k in np.unique(ks):  # one batch per subspace dimension (at most W−1 of them)
        m = np.nonzero(ks == k)[0]
        a1, a2 = i1[m], i2[m]
        m = m[(s_w[a1, k - 1] > rel_floor * s_w[a1, 0]) & (s_w[a2, k - 1] > rel_floor * s_w[a2, 0])]
        if not m.size:
            continue
        a1, a2 = i1[m], i2[m]
        # C₁ = Σ'A'ᵀ[A₁; 0]Σ₁⁻¹ and C₂ = Σ'A'ᵀ[0; A₂]Σ₂⁻¹: V₁ and V₂ in the orthonormal basis V'
        c1 = s_p[m][:, :, None] * (at[m][:, :, :W] @ vec_w[a1][:, :, :k]) / s_w[a1][:, None, :k]
        c2 = s_p[m][:, :, None] * (at[m][:, :, 1:] @ vec_w[a2][:, :, :k]) / s_w[a2][:, None, :k]
        q1, q2 = np.linalg.qr(c1)[0], np.linalg.qr(c2)[0]
        ov = q1.transpose(0, 2, 1) @ q2
        d = q2 - q1 @ ov  # the part of V₂ outside V₁: its singular values are sin θ, each to ~ε
        # squared singular values as eigenvalues of the k × k Grams (relative accuracy kept: d is
        # formed before squaring; cos is used only when cos² < ½, where squaring costs nothing)
        cos_min = np.sqrt(np.maximum(np.linalg.eigvalsh(ov.transpose(0, 2, 1) @ ov)[:, 0], 0.0))
        sin_max = np.sqrt(np.maximum(np.linalg.eigvalsh(d.transpose(0, 2, 1) @ d)[:, -1], 0.0))
        th = np.where(cos_min ** 2 >= 0.5, np.arcsin(np.minimum(sin_max, 1.0)),
                      np.arccos(np.clip(cos_min, 0.0, 1.0)))
        theta[sel[m]] = th
        sin[sel[m]] = np.sin(th)
    return theta, sin
