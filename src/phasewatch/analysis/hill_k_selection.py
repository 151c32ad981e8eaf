"""Data-driven choices of ``k`` for the Hill estimator.

* Clauset, Shalizi & Newman, "Power-law distributions in empirical data", *SIAM Review* 51 (2009):
  ``k`` minimising the Kolmogorov–Smirnov distance between the ``k`` values above ``|x|_(k+1)``
  and the fitted Pareto ``F(y) = 1 - (|x|_(k+1)/y)^{alpha_hat_k}`` (:func:`_ks_select`, on a
  log-spaced grid of candidates refined around the best one, not the ``O(n^2)`` scan).
* Danielsson, de Haan, Peng & de Vries, "Using a bootstrap method to choose the sample fraction
  in tail index estimation", *J. Multivar. Anal.* 76 (2001): the double bootstrap
  (:func:`_double_bootstrap_select`): ``k1``/``k2`` minimise the bootstrap MSE of
  ``M_k - 2 gamma_k^2`` in resamples of sizes ``n1 = floor(n^{0.9})`` and ``n2 = floor(n1^2/n)``,
  then ``k = k1^2/k2 * ((ln k1)^2 / (2 ln n1 - ln k1)^2)^{(ln n1 - ln k1)/ln n1}``.

Both work on ``L``, the descending logs of the positive ``|x|`` shifted so that ``L[0] = 0``
(:func:`phasewatch.analysis.hill_kernel._desc_logs`), and return ``(k, info)``.
"""

from __future__ import annotations

import math

import numpy as np

from .hill_kernel import MIN_TAIL_SAMPLES, _alpha_from_sums, _log_sums

# KS rule: candidates k in [min(10, k_hi), k_hi], k_hi = ks_max_fraction * n_pos, on a log
# grid of _KS_GRID values, then _KS_REFINE values between the neighbours of the best one.
_KS_GRID: int = 200
_KS_REFINE: int = 24
# Double bootstrap: subsample n1 = n^(1 - _DB_EPS), n2 = n1^2 / n.
_DB_EPS: float = 0.1
_DB_CHUNK_ELEMENTS: int = 1 << 18


def _ks_one(L: np.ndarray, k: int, alpha: float, half: np.ndarray, work: np.ndarray | None = None) -> float:
    """KS distance between the ``k`` tail values and the Pareto fit above ``L[k]``.

    With ``G_i = exp(-alpha (L[i] - L[k]))`` the fitted survival at the ``i``-th
    largest value (0-indexed) and ``i / k``, ``(i + 1) / k`` the empirical survival
    just above and at it, ``D = max_i |G_i - (i + 1/2) / k| + 1 / (2k)``.
    """
    if not (np.isfinite(alpha) and alpha > 0):
        return math.inf
    buf = np.subtract(L[:k], L[k], out=None if work is None else work[:k])
    buf *= -alpha
    np.exp(buf, out=buf)
    buf *= k
    buf -= half[:k]
    np.abs(buf, out=buf)
    return (float(buf.max()) + 0.5) / k


def _ks_select(L: np.ndarray, max_fraction: float = 0.5) -> tuple[int, dict[str, float]]:
    """Clauset–Shalizi–Newman (2009) choice of ``k``: minimise the KS distance.

    ``alpha_hat_k`` (MLE) for every candidate comes from one cumulative sum. The KS
    distance of each candidate costs ``O(k)``; candidates are a log-spaced grid of
    ``_KS_GRID`` values in ``[min(10, k_hi), k_hi]``, ``k_hi = floor(max_fraction n_pos)`` (all
    integers where the grid is denser than 1), then ``_KS_REFINE`` values between
    the two grid neighbours of the best grid point. Total cost ``O(n)`` after the
    sort (about 30 ``k_hi`` element operations).
    """
    n_pos = L.size
    k_hi = max(2, min(n_pos - 1, int(max_fraction * n_pos)))
    k_lo = min(MIN_TAIL_SAMPLES, k_hi)
    csum = np.cumsum(L[:k_hi])
    half = np.arange(k_hi, dtype=np.float64) + 0.5
    work = np.empty(k_hi)

    def dist(cands: np.ndarray) -> np.ndarray:
        S = _log_sums(L, cands, csum)
        a = _alpha_from_sums(cands, S, "mle")
        return np.array([_ks_one(L, int(k), float(al), half, work) for k, al in zip(cands, a)])

    grid = np.unique(np.round(np.geomspace(k_lo, k_hi, _KS_GRID)).astype(np.int64))
    d_grid = dist(grid)
    j = int(np.argmin(d_grid))
    lo = int(grid[max(j - 1, 0)])
    hi = int(grid[min(j + 1, grid.size - 1)])
    best_k, best_d = int(grid[j]), float(d_grid[j])
    n_cand = grid.size
    if hi - lo > 2:
        if hi - lo + 1 <= _KS_REFINE:
            ref = np.arange(lo + 1, hi, dtype=np.int64)
        else:
            ref = np.unique(np.round(np.geomspace(lo + 1, hi - 1, _KS_REFINE)).astype(np.int64))
        ref = ref[ref != best_k]
        if ref.size:
            d_ref = dist(ref)
            n_cand += ref.size
            i = int(np.argmin(d_ref))
            if d_ref[i] < best_d:
                best_k, best_d = int(ref[i]), float(d_ref[i])
    return best_k, {"ks_distance": best_d, "candidates": float(n_cand), "k_max": float(k_hi)}


def _db_argmin_q(L: np.ndarray, n_sub: int, n_boot: int, rng: np.random.Generator) -> tuple[int, float]:
    """``argmin_k Q(n_sub, k)`` with ``Q = E*[(M*_k - 2 (gamma*_k)^2)^2]`` over bootstrap
    subsamples of size ``n_sub`` (Danielsson et al. 2001), ``k in [2, n_sub - 1]``.

    ``gamma_k = (1/k) sum_{i<=k} (ln X_(i) - ln X_(k+1))`` (Hill, ``1/alpha``) and
    ``M_k = (1/k) sum_{i<=k} (ln X_(i) - ln X_(k+1))^2``; both from cumulative sums.
    """
    n = L.size
    inv_k = 1.0 / np.arange(1, n_sub, dtype=np.float64)  # k = 1 .. n_sub-1
    Q = np.zeros(n_sub - 1)
    chunk = max(1, _DB_CHUNK_ELEMENTS // n_sub)
    done = 0
    while done < n_boot:  # loop over small chunks of resamples (cache-sized temporaries)
        b = min(chunk, n_boot - done)
        # A sorted iid resample without sorting: the order statistics of n_sub iid
        # uniforms are U_(i) = (E_1 + ... + E_i) / (E_1 + ... + E_{n_sub+1}) with E iid
        # Exp(1) (Renyi), and floor(n U_(i)) are sorted iid indices into L. L is
        # descending, so ascending indices give a descending resample.
        e = rng.standard_exponential(size=(b, n_sub + 1))
        np.cumsum(e, axis=1, out=e)
        e[:, :-1] *= n / e[:, -1:]
        idx = e[:, :-1].astype(np.int64)
        np.minimum(idx, n - 1, out=idx)
        Ls = L[idx]
        Ls -= Ls[:, :1]
        # with m1, m2 the mean of the top-k logs and of their squares:
        # gamma_k = m1 - L_(k+1), M_k = (m2 - m1^2) + gamma_k^2, so M_k - 2 gamma_k^2 = m2 - m1^2 - gamma_k^2
        m1 = np.cumsum(Ls[:, :-1], axis=1)
        m1 *= inv_k
        m2 = np.square(Ls[:, :-1])
        np.cumsum(m2, axis=1, out=m2)
        m2 *= inv_k
        m2 -= np.square(m1)
        m1 -= Ls[:, 1:]
        np.square(m1, out=m1)
        m2 -= m1
        np.square(m2, out=m2)
        Q += m2.sum(axis=0)
        done += b
    Q[0] = np.inf  # k >= 2
    k_star = int(np.argmin(Q)) + 1
    return k_star, float(Q[k_star - 1] / n_boot)


def _double_bootstrap_select(
    L: np.ndarray, n_boot: int, rng: np.random.Generator
) -> tuple[int, dict[str, float]]:
    """Danielsson, de Haan, Peng & de Vries (2001) double-bootstrap choice of ``k``.

    ``n1 = floor(n^{0.9})``, ``n2 = floor(n1^2 / n)``; ``k1``, ``k2`` minimise the
    bootstrap MSE ``Q`` of ``M_k - 2 gamma_k^2`` in subsamples of size ``n1``, ``n2``;
    then ``k = k1^2 / k2 * ((ln k1)^2 / (2 ln n1 - ln k1)^2)^{(ln n1 - ln k1) / ln n1}``
    (the factor is ``(1 - 1/rho)^{2/(2 rho - 1)}`` at ``rho = ln k1 / (2 ln k1 - 2 ln n1)``).
    """
    n = L.size
    n1 = max(3, int(n ** (1.0 - _DB_EPS)))
    n2 = max(3, int(n1 * n1 / n))
    k1, q1 = _db_argmin_q(L, n1, n_boot, rng)
    k2, q2 = _db_argmin_q(L, n2, n_boot, rng)
    lk1, ln1 = math.log(k1), math.log(n1)
    factor = (lk1**2 / (2.0 * ln1 - lk1) ** 2) ** ((ln1 - lk1) / ln1)
    k_hat = k1 * k1 / k2 * factor
    rho = lk1 / (2.0 * lk1 - 2.0 * ln1) if lk1 != ln1 else -math.inf
    info = {
        "n1": float(n1),
        "n2": float(n2),
        "k1": float(k1),
        "k2": float(k2),
        "rho": rho,
        "k_raw": float(k_hat),
        "n_bootstrap": float(n_boot),
    }
    return int(round(k_hat)), info
