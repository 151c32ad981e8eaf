"""Stability margin, optimal step, NTK log-determinant rate and criticality (numpy only).

DEFINITIONS §4–6.  The probes themselves (λ_max by Lanczos, Hutchinson trace, NTK Gram) are
computed by :mod:`phasewatch.record.curvature` (torch) and stored per probe; this module turns them
into the framework's quantities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PhasewatchError

ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax")


@dataclass(frozen=True)
class Threshold:
    """The sharpness at which the optimizer's iteration on a quadratic turns unstable.

    value: the threshold (units 1/η); quantity: which sharpness it applies to (``lambda_max`` of
    H, or ``preconditioned`` λ_max(D⁻¹H) for Adam); convention: the formula, in words.
    """

    value: float
    quantity: str
    convention: str


def stability_threshold(optimizer: str, lr: float, hyper: dict | None = None, step: float | None = None) -> Threshold:
    """Largest stable sharpness of an optimizer on a quadratic (the edge of stability).

    * GD/SGD without momentum: 2/η (Cohen et al. 2021, arXiv:2103.00065).
    * SGD with heavy-ball momentum β (PyTorch form v ← βv + (1−τ)g, θ ← θ − ηv, dampening τ):
      2(1+β)/(η(1−τ)); with Nesterov: 2(1+β)/(η(1−τ)(1+2β)).  Both from the eigenvalue −1 of the
      2×2 iteration matrix on one curvature mode.
    * Adam/AdamW (a frozen preconditioner D = √v̂ + ε): the *preconditioned* sharpness
      λ_max(D⁻¹H) against (2 + 2β₁)/((1 − β₁)·η̃), η̃ = η/(1 − β₁ᵗ) (Cohen et al. 2022,
      arXiv:2207.14484: 38/η for β₁ = 0.9).  Plain λ_max against 2/η is meaningless for Adam.
    Other optimizers fall back to 2/η, said in the convention.

    >>> round(stability_threshold("SGD", 0.1).value, 9)
    20.0
    >>> round(stability_threshold("SGD", 0.1, {"momentum": 0.9}).value, 9)  # 2·1.9/0.1
    38.0
    >>> t = stability_threshold("Adam", 1e-3, {"betas": [0.9, 0.999]})  # 3.8/(0.1·1e-3)
    >>> round(t.value, 6), t.quantity
    (38000.0, 'preconditioned')
    """
    h = hyper or {}
    if not (lr and np.isfinite(lr) and lr > 0):
        return Threshold(float("nan"), "lambda_max", "no positive learning rate")
    if optimizer in ADAM_LIKE:
        beta1 = float((h.get("betas") or [0.9, 0.999])[0]) if "betas" in h else float(h.get("beta1", 0.9))
        t = float(step) if step else float("inf")
        eta = lr / (1 - beta1 ** t) if np.isfinite(t) else lr
        return Threshold((2 + 2 * beta1) / ((1 - beta1) * eta), "preconditioned",
                         f"(2+2*beta1)/((1-beta1)*eta_t) with beta1={beta1:g}, eta_t=eta/(1-beta1^t) "
                         "(Cohen et al. 2022), against lambda_max(D^-1 H), D = sqrt(v_hat)+eps")
    if optimizer == "SGD" and float(h.get("momentum", 0) or 0) > 0:
        beta = float(h["momentum"])
        damp = float(h.get("dampening", 0) or 0)
        if h.get("nesterov"):
            return Threshold(2 * (1 + beta) / (lr * (1 - damp) * (1 + 2 * beta)), "lambda_max",
                             f"2(1+beta)/(eta(1-tau)(1+2beta)), Nesterov, beta={beta:g}, tau={damp:g}")
        return Threshold(2 * (1 + beta) / (lr * (1 - damp)), "lambda_max",
                         f"2(1+beta)/(eta(1-tau)), heavy-ball momentum beta={beta:g}, tau={damp:g}")
    conv = "2/eta (gradient descent)" if optimizer in ("SGD", "") else f"2/eta (no threshold known for {optimizer})"
    return Threshold(2.0 / lr, "lambda_max", conv)


def stability_margin(lambda_max, threshold):
    """S = threshold − λ_max (DEFINITIONS §4; 2/η − λ_max for plain GD).  S > 0: stable;
    S ≈ 0: at the edge of stability; S < 0: the top mode is unstable (loss spikes follow)."""
    return np.asarray(threshold, dtype=float) - np.asarray(lambda_max, dtype=float)


def optimal_lr(lambda_max, d: float = 1.0):
    """η_opt = 2D/λ_max (note 002).  The note leaves D open; D = 1 (default) gives the largest step
    that is stable for the current sharpness.  Reported, never acted on."""
    lam = np.asarray(lambda_max, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lam > 0, 2.0 * d / lam, np.nan)


def intelligence_coefficient(p, s, alpha, d: float = np.inf):
    """I = p·S/d_H, d_H = min(d, α̂) (note 000; the framework's heuristic, labelled as such).
    Thresholds 0.5 / 0.1 / 0 (:func:`intelligence_label`)."""
    d_h = np.minimum(d, np.asarray(alpha, dtype=float))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(p, dtype=float) * np.asarray(s, dtype=float) / d_h


def intelligence_label(i: float) -> str:
    if not np.isfinite(i):
        return "undefined"
    return "high" if i > 0.5 else "moderate" if i > 0.1 else "low" if i > 0 else "negative"


@dataclass(frozen=True)
class LogDet:
    """ρ = Σ_k ln λ_k over the eigenvalues of a Gram above ``rel_floor``·λ_1; ``rank`` how many."""

    rho: float
    rank: int
    eigenvalues: np.ndarray


def ntk_logdet(gram: np.ndarray, rel_floor: float = 1e-6) -> LogDet:
    """NTK log-determinant ρ = Σ_k ln λ_k(K) over λ_k > rel_floor·λ_max (DEFINITIONS §5).

    The floor keeps the numerical null space (float32 Jacobians: ~1e-7 relative) out of ρ; a
    change of ``rank`` between probes makes ρ jump and is worth reporting with it."""
    g = np.asarray(gram, dtype=float)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise PhasewatchError(f"NTK Gram of shape {g.shape}: must be square")
    ev = np.linalg.eigvalsh((g + g.T) / 2)[::-1]
    if not np.isfinite(ev).all() or ev[0] <= 0:
        return LogDet(float("nan"), 0, ev)
    keep = ev > rel_floor * ev[0]
    return LogDet(float(np.log(ev[keep]).sum()), int(keep.sum()), ev)


def rate(steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """d(value)/dt per step by finite differences between probes: backward difference at each
    probe (NaN at the first), (v_i − v_{i−1})/(t_i − t_{i−1})."""
    t = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    out = np.full(v.shape, np.nan)
    if v.size > 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            out[1:] = np.diff(v) / np.diff(t)
    return out


@dataclass(frozen=True)
class CriticalityConstants:
    """Φ's widths and the 'all three critical' box (note 001; configurable)."""

    sigma_c: float = 0.3
    sigma_s: float = 0.15
    sigma_r: float = 0.5
    c_lo: float = 0.8
    c_hi: float = 1.2
    s_max: float = 0.1
    r_min: float = 0.5


def criticality(c, s, r, k: CriticalityConstants | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Φ = exp(−[(C−1)²/(2σ_C²) + S²/(2σ_S²) + (r−1)²/(2σ_r²)]), r = dρ/dt, and the flag
    "all three critical": c_lo ≤ C ≤ c_hi, |S| ≤ s_max, |r| > r_min (note 001; σ = 0.3, 0.15,
    0.5; box 0.8–1.2, 0.1; r_min = 0.5 is our choice, the note leaves τ open).  S is in the
    units of 1/η, so Φ depends on the learning rate's scale: a convention of the note, kept."""
    k = k or CriticalityConstants()
    c, s, r = (np.asarray(a, dtype=float) for a in (c, s, r))
    phi = np.exp(-((c - 1) ** 2 / (2 * k.sigma_c**2) + s**2 / (2 * k.sigma_s**2) + (r - 1) ** 2 / (2 * k.sigma_r**2)))
    with np.errstate(invalid="ignore"):
        flag = (c >= k.c_lo) & (c <= k.c_hi) & (np.abs(s) <= k.s_max) & (np.abs(r) > k.r_min)
    return phi, flag


def align(t_to: np.ndarray, t_from: np.ndarray, v_from: np.ndarray, max_lag: float | None = None) -> np.ndarray:
    """The value of a series (t_from, v_from) at steps t_to: the latest measurement at or before
    each step (NaN if none, or if older than ``max_lag`` steps)."""
    t_to = np.asarray(t_to, dtype=float)
    t_from = np.asarray(t_from, dtype=float)
    v = np.asarray(v_from, dtype=float)
    out = np.full(t_to.shape, np.nan)
    if not t_from.size:
        return out
    i = np.searchsorted(t_from, t_to, side="right") - 1
    ok = i >= 0
    out[ok] = v[i[ok]]
    if max_lag is not None:
        out[ok & (t_to - t_from[np.maximum(i, 0)] > max_lag)] = np.nan
    return out


def _decode(a) -> np.ndarray:
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).ravel()])


def _hessian_columns(hess, steps: np.ndarray, put, threshold_fn, d: float) -> dict[str, np.ndarray]:
    """The Hessian-probe columns of :func:`curvature_columns` (NaN / empty where there is none)."""
    n = steps.size
    out: dict[str, np.ndarray] = {}
    if hess and len(hess["step"]):
        hs = np.asarray(hess["step"])
        eig = np.asarray(hess["eigenvalues"], dtype=float)
        out["lr"] = put(hs, hess["lr"])
        out["lambda_max"] = put(hs, eig[:, 0])
        out["eigenvalues"] = put(hs, eig)
        out["lambda_residual"] = put(hs, np.asarray(hess["residuals"], dtype=float)[:, 0])
        out["hvps"] = put(hs, hess["hvps"])
        out["converged"] = put(hs, hess["converged"])
        for c in ("trace", "trace_lo", "trace_hi", "pre_lambda", "loss"):
            out[c] = put(hs, hess[c])
        thr = np.asarray(hess["threshold"], dtype=float)
        of = _decode(hess["threshold_of"])
        if threshold_fn is not None:
            fill = ~np.isfinite(thr)
            thr = np.where(fill, [threshold_fn(x).value for x in np.asarray(hess["lr"], dtype=float)], thr)
        sharp = np.where(of == "preconditioned", np.asarray(hess["pre_lambda"], dtype=float), eig[:, 0])
        out["threshold"] = put(hs, thr)
        out["S"] = put(hs, thr - sharp)
        out["S_of"] = np.full(n, "", dtype=object)
        out["S_of"][np.searchsorted(steps, hs)] = np.where(
            of == "preconditioned", np.where(np.isfinite(hess["pre_lambda"]), "preconditioned", "unavailable"),
            "lambda_max")
        out["eta_opt"] = optimal_lr(out["lambda_max"], d)
        # how the products were computed; runs recorded before the column were all double backward
        out["hvp"] = np.full(n, "", dtype=object)
        out["hvp"][np.searchsorted(steps, hs)] = _decode(hess["hvp"]) if "hvp" in hess else "autograd"
        out["u_curvature"] = put(hs, hess["u_curvature"]) if "u_curvature" in hess else np.full(n, np.nan)
        if "group_lambda" in hess:  # per-group curvature, when it was asked for: (probes, groups)
            out["group_lambda"] = put(hs, np.asarray(hess["group_lambda"], dtype=float))
    else:
        for c in ("lr", "lambda_max", "lambda_residual", "hvps", "converged", "trace", "trace_lo", "trace_hi",
                  "pre_lambda", "loss", "threshold", "S", "eta_opt"):
            out[c] = np.full(n, np.nan)
        out["S_of"] = np.full(n, "", dtype=object)
        out["hvp"] = np.full(n, "", dtype=object)
        out["u_curvature"] = np.full(n, np.nan)
    return out


def curvature_columns(
    hess: dict[str, np.ndarray] | None,
    ntk: dict[str, np.ndarray] | None,
    probes: dict[str, np.ndarray] | None = None,
    tail_index: dict[str, np.ndarray] | None = None,
    *,
    lr_steps: np.ndarray | None = None,
    lr_values: np.ndarray | None = None,
    threshold_fn=None,
    d: float = 1.0,
    ntk_floor: float = 1e-6,
    constants: CriticalityConstants | None = None,
) -> dict[str, np.ndarray]:
    """The per-probe curvature table (``Analysis.curvature``) from the stored ``curvature`` and
    ``ntk`` tables, with C, p (gradient-noise probes) and α (tail index) taken at each probe as
    their latest measurement at or before it.  Φ and ``all_critical`` use ``C_crit``: the training
    batch's C_B (``C_batch`` of the probes, when the batch size is known) else the probe's own C_b.

    S uses the stored optimizer threshold (against λ_max, or against the preconditioned
    sharpness for Adam-type optimizers when it was measured); ``threshold_fn(lr)`` supplies one
    where the table has none (post-hoc probes).
    """
    steps = np.union1d(np.asarray(hess["step"]) if hess and len(hess["step"]) else np.empty(0, "i8"),
                       np.asarray(ntk["step"]) if ntk and len(ntk["step"]) else np.empty(0, "i8")).astype("i8")
    n = steps.size
    if not n:
        return {}

    def put(src_steps, vals, fill=np.nan):
        out = np.full((n, *np.asarray(vals).shape[1:]), fill, dtype=float)
        idx = np.searchsorted(steps, src_steps)
        out[idx] = vals
        return out

    out: dict[str, np.ndarray] = {"step": steps}
    out.update(_hessian_columns(hess, steps, put, threshold_fn, d))
    if lr_steps is not None and len(lr_steps):
        miss = ~np.isfinite(out["lr"])
        out["lr"][miss] = align(steps[miss], lr_steps, lr_values)
    if ntk and len(ntk["step"]):
        ns = np.asarray(ntk["step"])
        lds = [ntk_logdet(g, ntk_floor) for g in np.asarray(ntk["gram"], dtype=float)]
        rho = np.array([x.rho for x in lds])
        out["ntk_rho"] = put(ns, rho)
        out["ntk_rank"] = put(ns, [x.rank for x in lds])
        out["ntk_rate"] = put(ns, rate(ns, rho))
    else:
        out["ntk_rho"] = out["ntk_rank"] = out["ntk_rate"] = np.full(n, np.nan)
    pr = probes or {}
    ti = tail_index or {}
    have = pr.get("step") is not None and len(pr["step"])
    c = align(steps, pr["step"], pr["C"]) if have else np.full(n, np.nan)
    # criticality is about the training gradient's SNR: C_B = B·C_1 where the batch size is known
    cb = align(steps, pr["step"], pr["C_batch"]) if have and "C_batch" in pr else np.full(n, np.nan)
    p = align(steps, pr["step"], pr["p"]) if pr.get("step") is not None and len(pr["step"]) else np.full(n, np.nan)
    a = align(steps, ti["step"], ti["alpha"]) if ti.get("step") is not None and len(ti["step"]) else np.full(n, np.nan)
    # dρ/dt between NTK probes holds until the next NTK probe
    r = align(steps, steps[np.isfinite(out["ntk_rate"])], out["ntk_rate"][np.isfinite(out["ntk_rate"])])
    out["C"], out["p"], out["alpha"] = c, p, a
    out["C_batch"] = cb
    out["C_crit"] = np.where(np.isfinite(cb), cb, c)
    out["phi"], out["all_critical"] = criticality(out["C_crit"], out["S"], r, constants)
    out["I"] = intelligence_coefficient(p, out["S"], a)
    return out
