"""The momentum null of the update-Gram spectra (DEFINITIONS §1, "Momentum null").

A momentum optimizer fed *pure noise* still produces correlated updates: the filter
``m_t = β m_{t−1} + g_t`` spreads each gradient over ``~1/(1−β)`` steps, so the window Gram of
momentum-filtered white noise is the Toeplitz matrix ``β^|a−b|`` (scaled by the update norms), whose
spectrum has k* = 1 and σ₁/σ₂ = 2.247 at W = 10, β = 0.9.  A gap ratio is evidence of structure
only above that.  This module gives

* the update autocorrelation ρ(j) of momentum-filtered white noise in closed form, for heavy ball
  (with dampening), Nesterov, Adam-type first moments, Muon and NAdam, and for ``stride`` s
  displacements (sums of s consecutive updates): :func:`filter_autocorrelation`,
  :func:`null_from_optimizer`;
* the null Gram ``G⁰[a, b] = ‖u_a‖‖u_b‖ ρ(|a−b|)`` built from each window's own update norms, its
  spectrum, the null's k* and gap ratio at the observed k*, and the excess of the observed reading
  over it: :func:`null_gram`, :func:`momentum_null`;
* a finite-dimension band: a seeded Monte Carlo of the Gram of momentum-filtered Gaussian noise in
  ``dim`` independent coordinates with the window's norms (:func:`wishart_draws`), whose
  ``level``-quantile of the *maximum* gap ratio over j (the statistic k* selects) is the upper end
  of what noise alone produces in that window;
* above ``FIRST_ORDER_DIM`` coordinates, the same band from first-order perturbation theory: with
  ``S = I + E`` the Gram's eigenvalues move by ``w_jᵀ E w_j`` (``w_j = Mᵀ v_j``, ``w_iᵀ w_j = λ⁰_j δ_ij``)
  and ``Cov(xᵀEx, yᵀEy) = 2(xᵀy)²/d`` for the Wishart, so to first order ``λ_j = λ⁰_j (1 + η_j)`` with
  η_j independent ``N(0, 2/d)`` whatever the norms and ρ; the band is then the ``level``-quantile of the
  maximum gap ratio of the sorted ``λ⁰ (1 + η)`` over the same seeded draws (:func:`band_first_order`:
  O(draws·W) per window instead of ``draws`` W×W eigensolves, ~20× cheaper; its neglected terms are
  O(1/d) against the O(1/√d) it keeps);
* a brute-force simulator of the filtered noise (:func:`simulate_filtered_noise`) the closed forms
  are tested against.

Everything is float64 numpy, vectorised over windows; randomness only through an explicit seed.

Derivation (the filter family)
------------------------------
Let ``g_t`` be white noise (independent over t, unit variance per coordinate) and
``m_t = β m_{t−1} + g_t`` (stationary: ``E[m_t m_{t−j}] = β^j/(1−β²)``, ``E[m_t g_{t−j}] = β^j``,
``E[g_t m_{t−j}] = 0`` for j ≥ 1).  Every optimizer below updates along ``u_t ∝ a·g_t + b·m_t``:

* heavy ball (PyTorch SGD, ``buf ← β buf + (1−τ) g``, ``u = −η buf``): ``(a, b) = (0, 1)`` — the
  dampening τ only rescales (``buf = (1−τ) m``), so ρ(j) = β^j whatever τ;
* Nesterov (SGD ``nesterov=True``: ``u ∝ g_t + β buf_t``): ``(a, b) = (1, β)``;
* Adam / AdamW / RAdam / Adamax first moment (``exp_avg = (1−β₁) m``): heavy ball with β₁;
* Muon (``buf.lerp_(g, 1−μ)`` then ``g.lerp(buf, μ)`` when ``nesterov=True``, the default in
  torch 2.13: ``u ∝ (1−μ) g + μ (1−μ) m``): Nesterov with μ; heavy ball when ``nesterov=False``;
* NAdam (``u ∝ (1−μ_t)/(1−Πμ) g + μ_{t+1}/(1−Πμ') (1−β₁) m`` with the momentum schedule
  ``μ_t = β₁(1 − ½·0.96^{t·ψ})``, ψ = ``momentum_decay``): ``(a, b) = (1−μ_t, μ_{t+1}(1−β₁))``
  once the products Πμ have decayed (after a few steps), at the step given.

Then, for lags j ≥ 1,

    c(0) = a² + 2ab + b²/(1−β²),        c(j) = β^j·(ab + b²/(1−β²)),        ρ(j) = c(j)/c(0).

Heavy ball: ρ(j) = β^j.  Nesterov (a = 1, b = β):
``ρ(j) = β^{j+1}(1 + β − β²)/(1 + 2β − 2β³)`` (0.731·0.9^j at β = 0.9: the fresh gradient
weighs more, the memory less).

Stride s: a recorded displacement is the sum ``U_k = Σ_{i<s} u_{ks−i}``.  For m ≥ 1 every pair of
its terms is at a lag ≥ 1, so ``Cov(U_k, U_{k−m}) = C₁ β^{ms−s+1} S²`` with ``C₁ = ab + b²/(1−β²)``
and ``S = Σ_{i<s} β^i = (1−β^s)/(1−β)``; ``Var U = s·c(0) + 2C₁·β(s − 1 − sβ + β^s)/(1−β)²``
(the sum ``Σ_{d=1}^{s−1}(s−d)β^d`` in closed form).  So ρ_s(m) = A_s·(β^s)^m: again geometric in
the lag, with decay β^s and amplitude ``A_s = C₁ β^{1−s} S² / Var U``.  Every case is therefore
``ρ(0) = 1, ρ(j) = A·γ^j`` (:class:`MomentumNull` holds A and γ).

What the null neglects
----------------------
The start-up of the filter (the first ~1/(1−β) steps; torch also starts ``buf = g₁`` undamped),
Adam's bias correction (a deterministic per-step factor: it changes the norms, which the null takes
from the data, and makes the first ~1/(1−β₁) steps non-stationary) and the ``√v̂`` normalisation
(a slowly varying per-coordinate scale: exact when v̂ is constant over a window, since a constant
per-coordinate scale keeps each coordinate's autocorrelation; it changes the effective dimension),
Muon's Newton–Schulz orthogonalisation (nonlinear), weight decay and any schedule of β within a
window (OneCycle cycles β₁: the null uses the recorded param-group value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import PhasewatchError
from . import gram

__all__ = [
    "MomentumNull",
    "NullResult",
    "filter_autocorrelation",
    "null_from_optimizer",
    "null_gram",
    "wishart_draws",
    "band_first_order",
    "momentum_null",
    "simulate_filtered_noise",
    "DEFAULT_DRAWS",
    "FIRST_ORDER_DIM",
    "DEFAULT_LEVEL",
]

#: Monte Carlo draws per window for the finite-dimension band (common random numbers).
DEFAULT_DRAWS: int = 64
#: At or above this many coordinates the band comes from first-order perturbation theory
#: (:func:`band_first_order`: relative eigenvalue fluctuations √(2/d) ≤ 4.5%, the neglected terms
#: O(1/d) ≤ 0.1%); below it from exact Wishart draws (:func:`wishart_draws`).
FIRST_ORDER_DIM: float = 1000.0
#: Where first order is not valid, the exact band is computed for windows whose gap ratio is within
#: this factor of the first-order band (elsewhere the verdict does not depend on the difference:
#: first order is within ~40% of the exact band's width even for degenerate null spectra, and the
#: width is a few % of the band).
EXACT_NEAR: float = 1.5
#: Upper quantile of the null's maximum gap ratio that a reading must exceed to be ``above_null``.
DEFAULT_LEVEL: float = 0.95

HEAVY_BALL_BETA1 = ("Adam", "AdamW", "RAdam", "Adamax", "SparseAdam")


def _check_beta(beta: float) -> float:
    b = float(beta)
    if not (0.0 <= b < 1.0):
        raise PhasewatchError(f"momentum beta={beta!r}: use 0 <= beta < 1 (a filter with beta >= 1 has no "
                              "stationary autocorrelation)")
    return b


def filter_autocorrelation(beta: float, lags, *, a: float = 0.0, b: float = 1.0, stride: int = 1) -> np.ndarray:
    """Autocorrelation ρ(j) of ``u_t = a·g_t + b·m_t``, ``m_t = β m_{t−1} + g_t``, g white noise.

    ``ρ(0) = 1``; for j ≥ 1, ``ρ(j) = c(j)/c(0)`` with ``c(0) = a² + 2ab + b²/(1−β²)`` and
    ``c(j) = β^j (ab + b²/(1−β²))`` (module docstring); with ``stride`` s the correlation of the
    s-step sums ``Σ_{i<s} u_{ks−i}`` at lag m (in recorded displacements),
    ``ρ_s(m) = C₁ β^{ms−s+1} S² / Var U`` with ``S = (1−β^s)/(1−β)``.
    Heavy ball: ``(a, b) = (0, 1)`` → β^j; Nesterov: ``(a, b) = (1, β)``.

    Parameters: ``beta`` in [0, 1); ``lags`` non-negative integers (any shape); ``a, b`` the
    weights of the fresh gradient and the momentum buffer (not both 0); ``stride`` ≥ 1.
    Returns float64 ρ of the shape of ``lags`` (dimensionless, in [−1, 1]).

    Heavy ball gives β^j; Nesterov at β = 0.9 has c(0) = 1 + 1.8 + 0.81/0.19 and
    c(1) = 0.9·(0.9 + 0.81/0.19), so ρ(1) = 4.6468…/7.0631… = 0.6579:

    >>> filter_autocorrelation(0.9, [0, 1, 2]).round(6).tolist()
    [1.0, 0.9, 0.81]
    >>> round(float(filter_autocorrelation(0.9, [1], a=1.0, b=0.9)[0]), 4)
    0.6579
    """
    amp, decay = _amplitude_decay(beta, a, b, stride)
    j = np.asarray(lags)
    if j.size and (np.any(j < 0) or np.any(j != np.round(j))):
        raise PhasewatchError(f"lags {lags!r}: use non-negative integers")
    j = j.astype(np.int64)
    with np.errstate(over="ignore", under="ignore"):
        rho = amp * np.power(decay, j.astype(float))
    return np.where(j == 0, 1.0, rho)


def _amplitude_decay(beta: float, a, b, stride: int):
    """(A, γ) of ρ(j) = A γ^j (j ≥ 1) for the filter ``a g + b m`` summed over ``stride`` steps
    (``a``, ``b`` scalars or arrays of one shape: A then has that shape)."""
    beta = _check_beta(beta)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.any((a == 0) & (b == 0)):
        raise PhasewatchError(f"filter weights a={a!r}, b={b!r}: need finite weights, not both 0")
    if a.ndim == 0 and b.ndim == 0:
        a, b = float(a), float(b)
    s = int(stride)
    if s < 1 or s != stride:
        raise PhasewatchError(f"stride={stride!r}: use an integer >= 1")
    inv = 1.0 / (1.0 - beta * beta)
    c0 = a * a + 2.0 * a * b + b * b * inv
    c1 = a * b + b * b * inv  # c(j) = c1 β^j for j >= 1
    if s == 1:
        return c1 / c0, beta
    ssum = (1.0 - beta ** s) / (1.0 - beta)
    tri = beta * (s - 1 - s * beta + beta ** s) / (1.0 - beta) ** 2  # Σ_{d=1}^{s-1} (s-d) β^d
    var = s * c0 + 2.0 * c1 * tri
    if beta == 0.0:
        return 0.0 * c1, 0.0
    return c1 * beta ** (1 - s) * ssum * ssum / var, beta ** s


def nadam_weights(beta1: float, momentum_decay: float, step):
    """NAdam's ``(a, b)`` of ``u ∝ a g_t + b m_t`` at ``step`` (scalar or array): ``a = 1 − μ_t``,
    ``b = μ_{t+1}(1 − β₁)`` with ``μ_t = β₁(1 − ½·0.96^{t·ψ})`` (torch.optim.NAdam), the products of
    μ in its bias terms taken as decayed (``Πμ ≤ β₁^t``)."""
    t = np.asarray(step, dtype=np.float64)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * momentum_decay))
    return 1.0 - mu, mu_next * (1.0 - beta1)


@dataclass(frozen=True)
class MomentumNull:
    """The update autocorrelation of momentum-filtered white noise, ``ρ(j) = amplitude·decay^j``.

    kind: ``"heavy ball"``, ``"nesterov"``, ``"nadam"`` or ``"none"`` (β = 0: white updates);
    beta: the filter's β; a, b: weights of ``u ∝ a·g + b·m``; stride: steps per recorded
    displacement; source: where β came from (optimizer class and hyper-parameter);
    neglected: what the null leaves out for this optimizer.
    """

    kind: str
    beta: float
    a: float
    b: float
    stride: int
    source: str
    neglected: str = ""
    momentum_decay: float | None = None  # NAdam's ψ: (a, b) then follow the step (:func:`nadam_weights`)

    @property
    def amplitude(self) -> float:
        """A of ρ(j) = A·γ^j (j ≥ 1)."""
        return _amplitude_decay(self.beta, self.a, self.b, self.stride)[0]

    @property
    def decay(self) -> float:
        """γ of ρ(j) = A·γ^j (j ≥ 1)."""
        return _amplitude_decay(self.beta, self.a, self.b, self.stride)[1]

    def rho(self, window: int) -> np.ndarray:
        """ρ(0..W−1), float64 (W,)."""
        return filter_autocorrelation(self.beta, np.arange(int(window)), a=self.a, b=self.b, stride=self.stride)

    def rho_at(self, window: int, steps) -> np.ndarray:
        """ρ(0..W−1) of windows ending at ``steps``: (W,) for a fixed filter, (N, W) for NAdam, whose
        weights follow the step (each window uses the μ_t of the step it ends at)."""
        if self.momentum_decay is None:
            return self.rho(window)
        a, b = nadam_weights(self.beta, self.momentum_decay, np.asarray(steps, dtype=np.float64))
        amp, decay = _amplitude_decay(self.beta, a, b, self.stride)
        j = np.arange(int(window), dtype=np.float64)
        with np.errstate(under="ignore"):
            out = np.asarray(amp)[:, None] * decay ** j[None, :]
        out[:, 0] = 1.0
        return out

    def describe(self) -> str:
        """One line for the conventions: the filter, β, where β came from, ρ(j) and what is neglected."""
        rho1 = float(self.rho(2)[1])
        return (f"{self.kind} momentum null, beta={self.beta:g} ({self.source}); rho(j) = "
                f"{self.amplitude:.4g}*{self.decay:.4g}^j, rho(1) = {rho1:.4g}"
                + (f", stride {self.stride}" if self.stride > 1 else "")
                + (f"; neglects {self.neglected}" if self.neglected else ""))


def null_from_optimizer(name: str, hyper: dict | None, *, stride: int = 1, step: float | None = None,
                        override: str | float = "momentum") -> MomentumNull:
    """The :class:`MomentumNull` of a recorded optimizer (``run.meta["optimizer"]``: class name and the
    hyper-parameters of param group 0).

    ``override``: ``"momentum"`` (read β from the optimizer), ``"none"`` (β = 0: white updates, the
    null of plain SGD) or a float β (heavy ball with that β).  SGD: ``momentum``, ``dampening`` (a
    rescaling only), ``nesterov``; Adam/AdamW/RAdam/Adamax: β₁ of ``betas``; NAdam: ``betas`` and
    ``momentum_decay`` at ``step`` (the run's median step; large steps if None); Muon: ``momentum`` and
    ``nesterov`` (default True); RMSprop: ``momentum`` (heavy ball on the normalised gradient).  Any
    other optimizer: β = 0, said in ``source``.
    """
    h = dict(hyper or {})
    s = int(stride or 1)
    if isinstance(override, (int, float)) and not isinstance(override, bool):
        return MomentumNull("heavy ball", _check_beta(override), 0.0, 1.0, s, f"given beta={float(override):g}")
    if override == "none":
        return MomentumNull("none", 0.0, 0.0, 1.0, s, "null='none': no momentum (white updates)")
    if override != "momentum":
        raise PhasewatchError(f"null={override!r}: use 'momentum' (from the recorded optimizer), 'none', a "
                              "float beta in [0, 1), or 'off' (analyze only: no null)")
    name = str(name or "")
    if step is not None and not np.isfinite(float(step)):
        step = None
    if name == "SGD":
        return _sgd_null(h, s)
    if name in HEAVY_BALL_BETA1 or name == "NAdam":
        return _adam_null(name, h, s, step)
    if name == "Muon":
        return _muon_null(h, s)
    if name == "RMSprop" and float(h.get("momentum", 0) or 0) > 0:
        beta = _check_beta(h["momentum"])
        return MomentumNull("heavy ball", beta, 0.0, 1.0, s, f"RMSprop momentum={beta:g}",
                            "the sqrt(v) normalisation")
    label = f"{name} (no momentum known)" if name else "optimizer not recorded"
    return MomentumNull("none", 0.0, 0.0, 1.0, s, label)


def _sgd_null(h: dict, s: int) -> MomentumNull:
    beta = _check_beta(h.get("momentum", 0) or 0)
    if beta == 0:
        return MomentumNull("none", 0.0, 0.0, 1.0, s, "SGD without momentum")
    if h.get("nesterov"):
        return MomentumNull("nesterov", beta, 1.0, beta, s, f"SGD momentum={beta:g}, nesterov",
                            "the filter's start-up")
    return MomentumNull("heavy ball", beta, 0.0, 1.0, s,
                        f"SGD momentum={beta:g}, dampening={float(h.get('dampening', 0) or 0):g} (rescales only)",
                        "the filter's start-up")


def _adam_null(name: str, h: dict, s: int, step: float | None) -> MomentumNull:
    betas = h.get("betas") or [h.get("beta1", 0.9)]
    beta = _check_beta(betas[0])
    neglect = "the sqrt(v_hat) normalisation and the bias correction (first ~1/(1-beta1) steps)"
    if name != "NAdam":
        return MomentumNull("heavy ball", beta, 0.0, 1.0, s, f"{name} beta1={beta:g} (first moment)", neglect)
    psi = float(h.get("momentum_decay", 0.004))
    if beta == 0:
        return MomentumNull("none", 0.0, 0.0, 1.0, s, "NAdam beta1=0")
    t = 1e9 if step is None else float(step)  # (a, b) shown: at ``step``, else the large-t limit
    a, b = (float(x) for x in nadam_weights(beta, psi, t))
    return MomentumNull("nadam", beta, a, b, s,
                        f"NAdam beta1={beta:g}, momentum_decay={psi:g}: u ~ (1-mu_t) g + mu_t+1 (1-beta1) m, "
                        f"mu_t at each window's end step" + (f" (mu = {1 - a:.4g} at step {t:g})"
                                                             if step is not None else ""),
                        neglect, momentum_decay=psi)


def _muon_null(h: dict, s: int) -> MomentumNull:
    beta = _check_beta(h.get("momentum", 0.95))
    neglect = "the Newton-Schulz orthogonalisation (nonlinear) and the filter's start-up"
    if beta == 0:
        return MomentumNull("none", 0.0, 0.0, 1.0, s, "Muon momentum=0")
    if bool(h.get("nesterov", True)):
        return MomentumNull("nesterov", beta, 1.0, beta, s, f"Muon momentum={beta:g}, nesterov", neglect)
    return MomentumNull("heavy ball", beta, 0.0, 1.0, s, f"Muon momentum={beta:g}", neglect)


def null_gram(norms: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``G⁰[n, a, b] = norms[n, a]·norms[n, b]·ρ(|a − b|)``: the Gram of momentum-filtered noise with
    the window's own update norms (``norms`` (N, W) = ‖u‖ of each row, i.e. √band[:, 0]; ``rho`` (W,), or (N, W) per window).
    Units of ‖u‖²; float64 (N, W, W).

    With equal norms and heavy-ball ρ(j) = β^j this is the Kac–Murdock–Szegő matrix: at W = 10
    and β = 0.9 its σ₁/σ₂ is 2.247 and k* = 1 (momentum alone, no signal):

    >>> rho = filter_autocorrelation(0.9, np.arange(10))
    >>> lam = np.linalg.eigvalsh(null_gram(np.ones((1, 10)), rho)[0])[::-1]
    >>> round(float(np.sqrt(lam[0] / lam[1])), 3)
    2.247
    """
    n = np.asarray(norms, dtype=np.float64)
    r = np.asarray(rho, dtype=np.float64)
    if n.ndim != 2 or r.shape not in ((n.shape[1],), n.shape):
        raise PhasewatchError(f"null_gram needs norms (N, W) and rho (W,) or (N, W), got {n.shape}, {r.shape}")
    return n[:, :, None] * n[:, None, :] * _toeplitz(r, n.shape[1])


def _toeplitz(r: np.ndarray, W: int) -> np.ndarray:
    """ρ(|a−b|) as (1, W, W) from ρ (W,), or (N, W, W) from ρ (N, W)."""
    lag = np.abs(np.arange(W)[:, None] - np.arange(W)[None, :])
    return r[lag][None] if r.ndim == 1 else r[:, lag]


def wishart_draws(window: int, dim: float, draws: int, seed: int = 0) -> np.ndarray:
    """``draws`` matrices ``S = Z Zᵀ/d`` with Z (W × d) standard Gaussian (E S = I): the sample Gram of
    W isotropic unit-variance steps in ``d`` coordinates, normalised.  By the Bartlett decomposition
    (``S = L Lᵀ/d``, ``L_ii² ~ χ²_{d−i}``, ``L_ij ~ N(0, 1)`` below the diagonal) for ``d > W − 1``
    (any real d: cost O(W²) whatever d), by Z itself (d rounded, ≥ 1) below.  Returns (draws, W, W)."""
    W, draws = int(window), int(draws)
    rng = np.random.default_rng(seed)
    d = float(dim)
    if not (d > 0):
        raise PhasewatchError(f"null dimension {dim!r}: use a positive number of coordinates")
    if d > W - 1:
        L = np.tril(rng.standard_normal((draws, W, W)), -1)
        idx = np.arange(W)
        L[:, idx, idx] = np.sqrt(rng.chisquare(d - idx, size=(draws, W)))
        return L @ np.swapaxes(L, 1, 2) / d
    n = max(1, int(round(d)))
    Z = rng.standard_normal((draws, W, n))
    return Z @ np.swapaxes(Z, 1, 2) / n


@dataclass(frozen=True, eq=False)
class NullResult:
    """The momentum null per window (DEFINITIONS §1, "Momentum null").

    sigma_null (N, W): singular values of G⁰; kstar_null (N,): the null's own k* (1-indexed, 0
    undefined); gap_ratio_null (N,): σ⁰_k*/σ⁰_{k*+1} at the OBSERVED k*; gap_excess = gap_ratio /
    gap_ratio_null; g23_null = λ⁰₂ − λ⁰₃ and g23_excess = g23/g23_null; gap_ratio_null_hi: the
    ``level`` quantile of the maximum over j of σ_j/σ_{j+1} of the Monte Carlo Gram (dim
    coordinates), the largest gap ratio noise alone gives in that window; gap_excess_hi =
    gap_ratio_null_hi/gap_ratio_null; above_null: gap_ratio > gap_ratio_null_hi (inside the band,
    or undefined: False).  dim, draws, level, seed: the band's parameters (dim = inf, draws = 0: no
    Monte Carlo, the band is the point G⁰ with a relative margin of 1e-9).
    """

    sigma_null: np.ndarray
    kstar_null: np.ndarray
    gap_ratio_null: np.ndarray
    gap_excess: np.ndarray
    g23_null: np.ndarray
    g23_excess: np.ndarray
    gap_ratio_null_hi: np.ndarray
    gap_excess_hi: np.ndarray
    above_null: np.ndarray
    dim: float
    draws: int
    level: float
    seed: int


def _row_quantile(r: np.ndarray, level: float) -> np.ndarray:
    """``np.nanquantile(r, level, axis=1)``, vectorised: rows without NaN in one ``np.quantile`` call
    (numpy's nanquantile loops over rows in Python), the others row by row."""
    out = np.empty(r.shape[0])
    bad = np.isnan(r).any(axis=1)
    if (~bad).any():
        out[~bad] = np.quantile(r[~bad], level, axis=1)
    if bad.any():
        out[bad] = np.nanquantile(r[bad], level, axis=1)
    return out


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square roots of a stack (..., W, W) of positive semi-definite matrices."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.maximum(w, 0.0))[..., None, :]) @ np.swapaxes(v, -1, -2)


def _band_max_ratio(norms: np.ndarray, root: np.ndarray, S: np.ndarray, level: float, rel_floor: float,
                    block: int = 256) -> np.ndarray:
    """``level`` quantile over the draws of max_j σ_j/σ_{j+1} of ``M S Mᵀ``, M = diag(norms)·R^{1/2}
    (``root`` (1, W, W) shared or (N, W, W) per window; windows in blocks, each window's value
    depends only on its own norms and ρ)."""
    N, W = norms.shape
    out = np.full(N, np.nan)
    D = S.shape[0]
    for lo in range(0, N, block):
        n = norms[lo: lo + block]
        M = n[:, :, None] * (root if root.shape[0] == 1 else root[lo: lo + block])  # (nb, W, W)
        G = M[:, None] @ S[None] @ np.swapaxes(M, 1, 2)[:, None]  # (nb, D, W, W)
        lam = gram.gram_spectra(G.reshape(-1, W, W))
        _, ratio, _ = gram.gap_position(gram.singular_values(lam), "plain", rel_floor)
        r = ratio.reshape(len(n), D)
        ok = np.isfinite(r).any(axis=1)
        if ok.any():
            out[lo: lo + len(n)][ok] = _row_quantile(r[ok], level)
    return out


def _normal_quantile(level: float) -> float:
    """Φ⁻¹(level) of the standard normal."""
    from scipy.special import ndtri

    return float(ndtri(level))


def band_first_order(lam0: np.ndarray, dim, draws: int, level: float, seed: int = 0,
                     rel_floor: float = gram.DEFAULT_REL_FLOOR, block: int = 4096) -> np.ndarray:
    """First-order finite-dimension band of the momentum null: the ``level`` quantile over ``draws`` of
    ``max_j σ_j/σ_{j+1}`` of the spectrum ``λ⁰_j (1 + η_j)`` (sorted), η_j ~ N(0, 2/d) independent.

    Derivation: the Gram of ``d`` coordinates of filtered noise is ``G = M S Mᵀ``, ``S = I + E`` with
    ``S ~ Wishart(d, I)/d``.  For an eigenpair (λ⁰_j, v_j) of ``G⁰ = M Mᵀ``, first-order perturbation
    gives ``λ_j = λ⁰_j + w_jᵀ E w_j`` with ``w_j = Mᵀ v_j``; since ``w_iᵀ w_j = v_iᵀ G⁰ v_j = λ⁰_j δ_ij``
    and ``Cov(xᵀEx, yᵀEy) = 2(xᵀy)²/d``, the relative shifts η_j are uncorrelated Gaussians of variance
    2/d, whatever the norms and ρ.  Sorting the perturbed values keeps near-degenerate pairs ordered.
    Valid for ``√(2/d) ≪ 1`` (used at ``d ≥ FIRST_ORDER_DIM``); the same seeded η serve every window
    and every ``d`` (scaled by √(2/d)), so a window's value depends on its own spectrum only.

    lam0 (N, W) null eigenvalues (any order), dim a number or (N,); returns (N,), NaN where undefined.
    """
    lam0 = np.asarray(lam0, dtype=np.float64)
    N, W = lam0.shape
    z = np.random.default_rng(seed).standard_normal((int(draws), W))
    scale = np.sqrt(2.0 / np.broadcast_to(np.asarray(dim, dtype=np.float64), (N,)))
    out = np.full(N, np.nan)
    for lo in range(0, N, block):
        lam = lam0[lo: lo + block, None, :] * (1.0 + scale[lo: lo + block, None, None] * z[None])
        sig = np.sqrt(np.maximum(-np.sort(-lam, axis=-1), 0.0))  # (nb, draws, W), descending
        ok = sig[..., 1:] > rel_floor * sig[..., :1]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(ok, sig[..., :-1] / sig[..., 1:], -np.inf).max(axis=-1)
        r[~np.isfinite(r)] = np.nan
        good = np.isfinite(r).any(axis=1)
        if good.any():
            out[lo: lo + block][good] = _row_quantile(r[good], level)
    return out


def _fill_band(hi, lam0, r0max, R, dims, finite, draws, level, seed, rel_floor) -> np.ndarray:
    """Fill ``hi`` (the band's upper end, in place) by the cheapest route that is valid per window;
    returns the mask of windows left for the exact Wishart draws.

    1. Analytic (O(1)): where first order holds (``d ≥ FIRST_ORDER_DIM`` and the null eigenvalues
       at least 3 fluctuations apart) and one point ratio leads the next by ≥ 4 sd, the maximum gap
       ratio is that ratio, log-normal with sd √(1/d) (:func:`band_first_order`'s η), so its quantile is
       ``r⁰_max·exp(Φ⁻¹(level)/√d)`` — no Monte Carlo noise at all.
    2. First-order draws (O(draws·W)): the other windows, as an estimate.
    3. Exact draws (``draws`` W×W eigensolves, by the caller): where first order does not hold and
       the reading is within a factor :data:`EXACT_NEAR` of the estimate (there the difference could
       change the verdict), and for ``d < 2W`` (rank-deficient draws: a vacuous band).
    """
    N, W = lam0.shape
    dfin = np.isfinite(dims)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = 0.5 * np.log(lam0[:, :-1] / lam0[:, 1:])  # log σ_j/σ_{j+1} of the null, (N, W−1)
        sd = np.sqrt(1.0 / dims)
        big = dfin & (dims >= FIRST_ORDER_DIM)
        # first order holds where eigenvalues are ≥ 3 fluctuations √(2/d) apart (lr ≥ 1.5·√2·sd)
        valid_fo = big & (np.min(lr, axis=1) >= 1.5 * np.sqrt(2.0) * sd)
        # analytic: the leading ratio j* and its two eigenvalues' neighbours are first-order (the
        # degenerate pairs elsewhere only make ratios of 1 + O(sd), far below the lead), and j* leads
        # the next ratio by 4 sd
        js = np.nanargmax(np.where(np.isfinite(lr), lr, -np.inf), axis=1)
        srt = np.sort(lr, axis=1)
        local = np.full(N, np.inf)
        for off in (-1, 0, 1):
            j = np.clip(js + off, 0, W - 2)
            local = np.minimum(local, np.take_along_axis(lr, j[:, None], axis=1)[:, 0])
        second = srt[:, -2] if W > 2 else np.full(N, -np.inf)  # (W = 2: a single ratio leads alone)
        clear = (finite & big & (local >= 1.5 * np.sqrt(2.0) * sd) & (srt[:, -1] - second >= 4.0 * sd)
                 & (srt[:, -1] >= 6.0 * sd))
    hi[clear] = r0max[clear] * np.exp(_normal_quantile(level) * sd[clear])
    rest = np.nonzero(finite & dfin & ~clear)[0]
    if rest.size:
        hi[rest] = band_first_order(lam0[rest], dims[rest], draws, level, seed, rel_floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = np.abs(np.log(R / hi)) < np.log(EXACT_NEAR)
    return finite & dfin & ~valid_fo & ~clear & (near | (dims < 2 * W))


def momentum_null(norms: np.ndarray, kstar: np.ndarray, gap_ratio: np.ndarray, g23: np.ndarray,
                  rho: np.ndarray, *, dim=math.inf, draws: int = DEFAULT_DRAWS,
                  level: float = DEFAULT_LEVEL, seed: int = 0,
                  rel_floor: float = gram.DEFAULT_REL_FLOOR) -> NullResult:
    """The momentum null of each window and the observed reading's excess over it.

    ``G⁰ = diag(n) R diag(n)`` (R the Toeplitz ``ρ(|a−b|)``, n the window's update norms ‖u‖, in
    units of ‖u‖), its spectrum, k*⁰ (:func:`~phasewatch.analysis.gram.gap_position`), the null's ratio
    at the observed ``kstar`` and ``gap_excess = gap_ratio / gap_ratio_null`` (dimensionless; 1 on
    noise), ``g23_excess = g23 / (λ⁰₂ − λ⁰₃)``.  Finite dimension: the Gram of ``dim`` independent
    coordinates of filtered Gaussian noise is ``M S Mᵀ`` (M = diag(n) R^{1/2}, S ~ Wishart(dim, I)/dim,
    :func:`wishart_draws`); the band's upper end ``gap_ratio_null_hi`` is the ``level`` quantile over
    ``draws`` of its maximum gap ratio over j — the look-elsewhere-corrected statistic, since k* itself is
    an argmax.  The same ``draws`` (seeded) serve every window (common random numbers), so the result
    of a window does not depend on which other windows are computed with it.  With ``dim < W`` the
    simulated Gram has rank ``dim`` and its σ_{dim+1} sits at rounding level, so the band is vacuous
    (noise alone then gives any gap ratio at j = dim).  Routes per window (:func:`_fill_band`): the
    quantile is analytic where first-order perturbation holds and one ratio clearly leads, from
    first-order draws (:func:`band_first_order`) otherwise, and from the exact Wishart draws where
    first order fails and the reading is near the band (the only place the difference matters).

    Parameters: norms (N, W) (NaN rows give NaN); kstar (N,) observed 1-indexed k* (0: undefined);
    gap_ratio, g23 (N,) observed; rho (W,) with ρ(0) = 1, or (N, W) per window; dim a number of
    coordinates, or (N,) per window (windows of equal dim share their draws; inf: no band).
    Returns :class:`NullResult` (its ``dim`` the median of the windows' dims).
    """
    n = np.asarray(norms, dtype=np.float64)
    N, W = n.shape
    k = np.asarray(kstar, dtype=np.int64)
    R = np.asarray(gap_ratio, dtype=np.float64)
    if k.shape != (N,) or R.shape != (N,) or np.shape(g23) != (N,):
        raise PhasewatchError(f"momentum_null: kstar, gap_ratio and g23 must have shape ({N},)")
    if not 0.0 < level < 1.0:
        raise PhasewatchError(f"level={level!r}: use a quantile in (0, 1)")
    lam0 = gram.gram_spectra(null_gram(n, rho))
    sig0 = gram.singular_values(lam0)
    k0, r0max, _ = gram.gap_position(sig0, "plain", rel_floor)
    rows = np.nonzero((k >= 1) & (k <= W - 1))[0]
    r0 = np.full(N, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        r0[rows] = sig0[rows, k[rows] - 1] / sig0[rows, k[rows]]
        r0 = np.where(np.isfinite(r0), r0, np.nan)
        excess = R / r0
        g0 = lam0[:, 1] - lam0[:, 2] if W >= 3 else np.full(N, np.nan)
        g_ex = np.asarray(g23, dtype=np.float64) / g0
    dims = np.broadcast_to(np.asarray(dim, dtype=np.float64), (N,))
    draws = int(draws)
    finite = np.isfinite(n).all(axis=1)
    hi = r0max * (1.0 + 1e-9)  # infinite dimension: the null is a point
    if draws > 0 and np.isfinite(dims).any():
        r = np.asarray(rho, dtype=np.float64)
        root = _sqrt_psd(_toeplitz(r, W))  # (1, W, W) or (N, W, W)
        hi = np.where(np.isfinite(dims), np.nan, hi)
        exact = _fill_band(hi, lam0, r0max, R, dims, finite, draws, level, seed, rel_floor)
        for d in np.unique(dims[exact]):
            sel = exact & (dims == d)
            idx = np.nonzero(sel)[0]
            if idx.size:
                S = wishart_draws(W, d, draws, seed)
                hi[idx] = _band_max_ratio(n[idx], root if root.shape[0] == 1 else root[idx], S, level, rel_floor)
    else:
        draws = 0
    with np.errstate(invalid="ignore"):
        above = np.isfinite(R) & np.isfinite(hi) & (R > hi)
        excess_hi = hi / r0
    return NullResult(sigma_null=sig0, kstar_null=k0, gap_ratio_null=r0, gap_excess=excess, g23_null=g0,
                      g23_excess=g_ex, gap_ratio_null_hi=hi, gap_excess_hi=excess_hi, above_null=above,
                      dim=float(np.median(dims)) if N else math.nan, draws=draws, level=float(level), seed=int(seed))


def simulate_filtered_noise(steps: int, dim: int, null: MomentumNull, *, seed: int = 0,
                            burn_in: int | None = None) -> np.ndarray:
    """Brute-force reference: ``steps`` recorded updates (float64 (steps, dim)) of the fixed filter
    ``u_t = a g_t + b m_t``, ``m_t = β m_{t−1} + g_t`` on white Gaussian ``g_t`` (unit variance per
    coordinate), summed over ``null.stride`` consecutive steps, after ``burn_in`` steps (default
    ``⌈20/(1−β)⌉``: the start-up transient decays as β^t, and β^{20/(1−β)} ≤ e^{−20})."""
    rng = np.random.default_rng(seed)
    s = null.stride
    burn = int(math.ceil(20.0 / (1.0 - null.beta))) if burn_in is None else int(burn_in)
    total = burn + steps * s
    g = rng.standard_normal((total, int(dim)))
    m = np.zeros(int(dim))
    u = np.empty_like(g)
    for t in range(total):  # the recursion is sequential in t, vectorised over coordinates
        m = null.beta * m + g[t]
        u[t] = null.a * g[t] + null.b * m
    return u[burn:].reshape(steps, s, int(dim)).sum(axis=1)
