"""Curvature probes (torch): Hessian-vector products, Lanczos eigenvalues, Hutchinson trace, NTK.

Everything here works on a *fixed probe batch* and a model as it is now (DEFINITIONS §4–5):

* :class:`HessianOperator` — the training-loss Hessian H on the batch as a linear operator.  The
  gradient is computed once with ``create_graph=True`` and its graph is kept, so every
  Hessian-vector product is one extra backward pass (Pearlmutter 1994, "Fast exact
  multiplication by the Hessian").  Train or eval mode is chosen by the caller and stated in the
  result; buffers a train-mode forward would change (BatchNorm running statistics) are restored.
* :func:`lanczos` — extreme eigenvalues of a symmetric operator by the Lanczos process with full
  reorthogonalisation, stopped on the Ritz residual ‖Hy − θy‖ ≤ tol·|θ| (Parlett, *The Symmetric
  Eigenvalue Problem*, ch. 13; Golub & Van Loan §10.1).  Largest algebraic by default (the top
  of the spectrum, not the largest magnitude: a Hessian may have larger negative eigenvalues).
  The reported residuals are measured with one more product per eigenpair, not estimated; by
  Weyl's theorem an eigenvalue of H lies within the residual of each Ritz value.
* :func:`hutchinson_trace` — tr H ≈ mean of zᵀHz over Rademacher probes (Hutchinson 1990), with a
  Student-t interval, a fixed budget or an adaptive one (stop when the half-width ≤ rtol·|mean|).
* :func:`preconditioned_operator` — P^{-1/2} H P^{-1/2} for Adam/AdamW, P = diag(√v̂ + ε), whose
  top eigenvalue is the preconditioned sharpness λ_max(P⁻¹H) of Cohen et al. 2022
  ("Adaptive gradient methods at the edge of stability", arXiv:2207.14484).
* :func:`ntk_gram` — the empirical NTK Gram K = J Jᵀ / n on a fixed set of n inputs with
  ``torch.func``, by Jacobian contraction or by NTK-vector products (Novak et al. 2022, "Fast
  finite width neural tangent kernel"), ``method="auto"`` timing both once and keeping the faster
  (in :mod:`phasewatch.record.ntk`, re-exported here).
* Hessian-vector products by double backward (:class:`HessianOperator`) or by central differences
  of gradients (:class:`~phasewatch.record.hvp.FiniteDifferenceHessian`), chosen per probe
  (``hvp="auto"``); the curvature along the optimizer's update (:func:`update_curvature`).

The thresholds that turn λ_max into a stability margin are in
:mod:`phasewatch.analysis.curvature` (numpy; shared with the analyzer).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from ..errors import PhasewatchError
from .hvp import (  # noqa: F401  (model_mode, double_differentiable_attention: re-exported)
    HVP_ROUTES,
    FiniteDifferenceHessian,
    _as_args,
    _flat,
    _unflat,
    chunk_weights,
    double_differentiable_attention,
    model_mode,
    seeded_randomness,
)
from .lanczos import (  # noqa: F401  (re-exported: the Lanczos solver lives in record/lanczos.py)
    WHICH,
    EigenResult,
    Matvec,
    _orthogonalise,
    _pick,
    _tridiagonal_eigh,
    choose_basis_device,
    lanczos,
)
from .ntk import NTKResult, choose_ntk_method, ntk_gram  # noqa: F401  (re-exported)

log = logging.getLogger("phasewatch")


# ----------------------------------------------------------------------------------------------
# result objects
@dataclass
class TraceResult:
    """Hutchinson estimate of tr H with a Student-t interval.

    estimate: mean of zᵀHz; ci: (lo, hi) at ``level``; se: s/√n; samples: the zᵀHz values.
    adaptive: the probe count was chosen by the stopping rule (the interval then covers slightly
    less often than nominal: sequential stopping; fixed budgets are exact in that respect).
    """

    estimate: float
    ci: tuple[float, float]
    se: float
    n_probes: int
    level: float
    adaptive: bool
    samples: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    convention: str = "Hutchinson, Rademacher probes, Student-t interval"


# ----------------------------------------------------------------------------------------------
# the Hessian as an operator
class HessianOperator:
    """H = ∇²_θ L(θ; batch) as a linear operator on flat float64 vectors.

    Products are computed in the parameters' dtype; float32 limits the relative accuracy of an
    eigenvalue to ~1e-6, float64 models reach ~1e-12.  The forward and every product run inside
    :func:`~phasewatch.record.hvp.double_differentiable_attention` (the math SDPA backend), so
    attention layers differentiate twice; a kernel with no double backward elsewhere fails at
    the first product, where ``hvp="auto"`` switches to :class:`FiniteDifferenceHessian`.

    Parameters
    ----------
    model: the network; ``params`` (default: its parameters that require grad) are the variables.
    loss_fn: ``loss_fn(outputs, targets)`` → the scalar *mean* loss of the batch.
    batch: ``(inputs, targets)`` (inputs may be a tuple of positional arguments), or a list of such
        chunks: H is then the size-weighted mean of the chunks' Hessians (each chunk's gradient
        graph is kept, so memory grows with the number of chunks).
    mode: ``"eval"`` (default: deterministic, no dropout, BatchNorm with running statistics) or
        ``"train"`` (the loss as training optimises it; a dropout mask is drawn once, from ``seed``
        on a forked generator (training's random stream is untouched), and fixed for every product,
        so the operator stays symmetric).  Stated in :attr:`mode`.
    """

    route = "autograd"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batch: Any,
                 params: Sequence[torch.Tensor] | None = None, mode: str = "eval", seed: int = 0):
        self.model = model
        self.mode = mode
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        if not self.params:
            raise PhasewatchError("HessianOperator: the model has no parameters that require grad")
        self.n = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        chunks, self.weights = chunk_weights(batch)
        self.n_matvec = 0
        self._grads: list[tuple[torch.Tensor, ...]] = []
        loss_sum = 0.0
        from torch.func import functional_call

        # the forward runs on copies of the buffers: a train-mode forward updates BatchNorm running
        # statistics in place, which must neither change the model nor the kept graph
        tensors = {n: p for n, p in model.named_parameters()}
        with model_mode(model, mode, restore_buffers=False), torch.enable_grad(), \
                double_differentiable_attention(), seeded_randomness(mode, seed, self.device):
            for (inputs, targets), w in zip(chunks, self.weights):
                buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
                out = functional_call(model, (tensors, buffers), _as_args(inputs))
                loss = loss_fn(out, targets)
                if loss.dim() != 0:
                    raise PhasewatchError("loss_fn must return the scalar mean loss of the batch")
                g = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                self._grads.append(g)
                loss_sum += w * float(loss.detach())
        self.loss = loss_sum
        self.gradient = sum(w * _flat(g, self.params, torch.float64).detach()
                            for g, w in zip(self._grads, self.weights))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v (any float dtype, any device); returns float64 on the params'
        device."""
        vs = _unflat(v.to(self.device), self.params)
        out = None  # the first chunk's product, accumulated in place (no P-sized temporaries)
        for g, w in zip(self._grads, self.weights):
            live = [(gi, vi, pi) for gi, vi, pi in zip(g, vs, self.params) if gi is not None and gi.requires_grad]
            if not live:
                continue  # the gradient does not depend on θ: H = 0 on this chunk
            with double_differentiable_attention():
                hv = torch.autograd.grad([x[0] for x in live], self.params, grad_outputs=[x[1] for x in live],
                                         retain_graph=True, allow_unused=True)
            flat = _flat(hv, self.params, torch.float64)
            if out is None:
                out = flat.mul_(w) if w != 1.0 else flat
            else:
                out.add_(flat, alpha=w)
        self.n_matvec += 1
        return out if out is not None else torch.zeros(self.n, dtype=torch.float64, device=self.device)

    __call__ = matvec

    def dense(self) -> np.ndarray:
        """The full P×P Hessian (P products; for tests and small models only)."""
        eye = torch.eye(self.n, dtype=torch.float64, device=self.device)
        h = torch.stack([self.matvec(eye[i]) for i in range(self.n)]).cpu().numpy()
        return (h + h.T) / 2


def update_curvature(op: Matvec, u: torch.Tensor) -> float:
    """The curvature of the loss along a direction, κ_u = uᵀHu / uᵀu (units of H: 1/η for a loss), by
    one product of the operator (one HVP, or two gradients for finite differences).  For u = the
    optimizer's last update this is the "directional sharpness" the update sees (cf. Kalra et al.
    2026, arXiv:2601.16979); by the Rayleigh–Ritz bound λ_min ≤ κ_u ≤ λ_max.  NaN when u = 0 or is
    not finite."""
    u = u.detach().to(torch.float64)
    uu = float(u @ u)
    if not (uu > 0 and math.isfinite(uu)):
        return float("nan")
    hu = op(u)
    return float(hu.to(u.device, torch.float64) @ u) / uu


def hessian_operator(model: torch.nn.Module, loss_fn: Callable, batch: Any,
                     params: Sequence[torch.Tensor] | None = None, mode: str = "eval", hvp: str = "autograd",
                     seed: int = 0) -> HessianOperator | FiniteDifferenceHessian:
    """The Hessian operator by the route ``hvp``: ``"autograd"`` (double backward,
    :class:`HessianOperator`) or ``"fd"`` (central differences of gradients,
    :class:`FiniteDifferenceHessian`; ``seed`` fixes the dropout masks in train mode, the same for
    both routes).  ``"auto"``
    is decided by :class:`CurvatureProbe` (autograd, FD when its first product fails or disagrees
    with FD)."""
    if hvp not in ("autograd", "fd"):
        raise PhasewatchError(f"hvp={hvp!r}: hessian_operator takes 'autograd' or 'fd' ('auto' is the probe's "
                              "choice between them: CurvatureProbe(hvp='auto'))")
    if hvp == "fd":
        return FiniteDifferenceHessian(model, loss_fn, batch, params=params, mode=mode, seed=seed)
    return HessianOperator(model, loss_fn, batch, params=params, mode=mode, seed=seed)


# ----------------------------------------------------------------------------------------------
# Hutchinson
def hutchinson_trace(
    matvec: Matvec,
    n: int,
    probes: int | None = None,
    *,
    rtol: float = 0.01,
    min_probes: int = 10,
    max_probes: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> TraceResult:
    """tr A ≈ (1/N) Σ zᵢᵀ A zᵢ with Rademacher zᵢ (Hutchinson 1990; variance 2Σ_{i≠j}A_ij², the
    smallest of any i.i.d. probe distribution with unit variance, Avron & Toledo 2011).

    ``probes=N`` fixes the budget; ``probes=None`` is adaptive: after ``min_probes``, stop when the
    Student-t half-width t_{N−1}·s/√N ≤ rtol·|mean| or at ``max_probes``.
    Interval: mean ± t_{N−1,(1+level)/2} · s/√N.
    """
    if probes is not None and probes < 2:
        raise PhasewatchError(f"probes={probes}: need at least 2 for an interval")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    limit = int(probes) if probes is not None else int(max_probes)
    vals: list[float] = []
    q = (1 + level) / 2
    while len(vals) < limit:
        z = (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1).to(device)
        vals.append(float(z @ matvec(z).to(device, torch.float64)))
        nn = len(vals)
        if probes is None and nn >= max(2, min_probes):
            arr = np.asarray(vals)
            half = stats.t.ppf(q, nn - 1) * arr.std(ddof=1) / math.sqrt(nn)
            if half <= rtol * abs(arr.mean()):
                break
    arr = np.asarray(vals)
    nn = arr.size
    se = float(arr.std(ddof=1) / math.sqrt(nn))
    half = float(stats.t.ppf(q, nn - 1) * se)
    mean = float(arr.mean())
    return TraceResult(estimate=mean, ci=(mean - half, mean + half), se=se, n_probes=nn, level=level,
                       adaptive=probes is None, samples=arr)


# ----------------------------------------------------------------------------------------------
# Adam preconditioning
def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Flat diagonal D = √v̂ + ε of Adam/AdamW (v̂ = v/(1−β₂ᵗ), the optimizer's own bias
    correction), and the hyper-parameters the threshold needs (β₁, η, t).

    The preconditioned sharpness is λ_max(D⁻¹H); Adam with a frozen preconditioner is stable on a
    quadratic while it is below (2 + 2β₁)/((1 − β₁)·η̃), η̃ = η/(1 − β₁ᵗ) (Cohen et al. 2022,
    their P = (1 − β₁ᵗ)/η · D; the threshold 38/η for β₁ = 0.9).
    """
    name = type(optimizer).__name__
    if "exp_avg_sq" not in next((optimizer.state.get(p, {}) for p in params if optimizer.state.get(p)), {}):
        raise PhasewatchError(f"{name}: no Adam second-moment state (exp_avg_sq); the preconditioned "
                              "sharpness needs an Adam/AdamW optimizer that has taken at least one step")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    info: dict[str, Any] = {}
    for p in params:
        st = optimizer.state.get(p, {})
        g = group_of.get(id(p))
        if g is None or "exp_avg_sq" not in st:
            raise PhasewatchError("adam_preconditioner: a recorded parameter has no Adam state")
        beta1, beta2 = g["betas"]
        t = float(st["step"]) if "step" in st else 1.0
        eps = g["eps"]
        if g.get("amsgrad") and "max_exp_avg_sq" in st:
            v = st["max_exp_avg_sq"]
        else:
            v = st["exp_avg_sq"]
        vhat = v.detach().to(torch.float64) / (1 - beta2 ** t)
        parts.append((vhat.sqrt() + eps).reshape(-1))
        info = {"beta1": float(beta1), "beta2": float(beta2), "lr": float(g["lr"]), "step": t, "eps": float(eps),
                "optimizer": name}
    return torch.cat(parts), info


def preconditioned_operator(op: Matvec, diag: torch.Tensor) -> Matvec:
    """v ↦ D^{-1/2} H D^{-1/2} v: symmetric, with the eigenvalues of D⁻¹H."""
    r = diag.to(torch.float64).rsqrt()

    def mv(v: torch.Tensor) -> torch.Tensor:
        return r * op(r * v.to(r.device, torch.float64))

    return mv


# ----------------------------------------------------------------------------------------------
# the probe the recorder (and the post-hoc command) runs
class CurvatureProbe:
    """λ_max (top-k), optional Hutchinson trace and Adam's preconditioned sharpness on a fixed probe
    batch, and the NTK Gram on fixed probe inputs: one row each per probe.

    Parameters
    ----------
    model, params: the network and the variables (the recorded parameters).
    loss_fn, batch: ``loss_fn(model(*inputs), targets)`` → scalar mean loss; ``batch`` =
        ``(inputs, targets)`` or a list of such chunks (see :class:`HessianOperator`).
    top_k, tol, max_iter: Lanczos settings (largest algebraic; residual ≤ tol·|θ|).
    trace: ``None`` (no trace), an int (fixed probe budget) or ``"adaptive"`` (stop at
        ``trace_rtol`` relative half-width, at most ``trace_max`` probes).
    mode: ``"eval"`` or ``"train"`` (stated in every row).
    ntk_inputs: inputs (examples along dim 0) for the NTK Gram, or None; ``ntk_outputs``,
        ``ntk_method`` as in :func:`ntk_gram` (``auto`` is decided once, at the first probe).
    optimizer: used for the stability threshold and, for Adam-type optimizers, the preconditioner.
    hvp: ``"autograd"`` (double backward), ``"fd"`` (central differences of two gradients, no kept
        graph, any kernel) or ``"auto"`` (default: autograd, checked every probe against one FD
        product along the top eigenvector (column ``hvp_check``); if its first product fails, e.g. a
        kernel with no double backward, or the two disagree beyond FD's own error, e.g. a
        ``once_differentiable`` kernel whose double backward silently drops terms, FD for this and
        every later probe, said once in the log).
        The route used is stored in every row (column ``hvp``).  On FD products Lanczos stops at
        ``max(tol, op.noise_floor)`` (100·u^{2/3}: 2.4e-3 float32, 3.7e-9 float64), the accuracy FD
        products can give.
    groups: per-group curvature (:mod:`phasewatch.record.curvature_groups`): a list with, per
        group, the indices into ``params`` of its tensors (None: not asked for, NaN); each row then
        holds λ_max of every asked group's diagonal Hessian block and its residual (columns
        ``group_lambda``, ``group_residual``).  ``group_names`` label them in :meth:`config`.
    basis_device, basis_dtype: where and in which dtype the Lanczos basis lives (see
        :func:`lanczos`, which states a probe's memory model).
    service: under DDP, this rank's :class:`~phasewatch.record.curvature_ddp.ProbeService`: the
        operators are then the shard-weighted all-reduce of every rank's (on rank 0, which runs
        this probe; the other ranks serve it).
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], *, loss_fn: Callable | None,
                 batch: Any, top_k: int = 1, tol: float = 1e-6, max_iter: int | None = None,
                 trace: int | str | None = None, trace_rtol: float = 0.02, trace_max: int = 500,
                 mode: str = "eval", ntk_inputs: Any = None, ntk_outputs: str = "trace",
                 ntk_method: str = "auto", optimizer: torch.optim.Optimizer | None = None,
                 optimizer_meta: dict | None = None, hvp: str = "auto",
                 groups: Sequence[Sequence[int] | None] | None = None, group_names: Sequence[str] | None = None,
                 basis_device: torch.device | str = "auto", basis_dtype: torch.dtype = torch.float64,
                 service: Any = None):
        if hvp not in HVP_ROUTES:
            raise PhasewatchError(f"curvature_hvp={hvp!r}: use one of {', '.join(HVP_ROUTES)}")
        if batch is not None and loss_fn is None:
            raise PhasewatchError("curvature_batch needs curvature_loss=callable(outputs, targets) -> mean loss")
        if mode not in ("train", "eval"):
            raise PhasewatchError(f"curvature_mode={mode!r}: use 'train' or 'eval'")
        if trace is not None and trace != "adaptive" and not (isinstance(trace, int) and trace >= 2):
            raise PhasewatchError(f"curvature_trace={trace!r}: use None, 'adaptive' or an int >= 2")
        self.model, self.params = model, list(params)
        self.loss_fn, self.batch = loss_fn, batch
        self.top_k, self.tol, self.max_iter = int(top_k), float(tol), max_iter
        self.trace, self.trace_rtol, self.trace_max = trace, float(trace_rtol), int(trace_max)
        self.mode = mode
        self.ntk_inputs = ntk_inputs
        self.ntk_outputs, self.ntk_method = ntk_outputs, ntk_method
        self.optimizer = optimizer
        self.optimizer_meta = optimizer_meta or {}
        self.hvp = hvp
        self.groups = None if groups is None else [list(g) if g else None for g in groups]
        self.group_names = list(group_names) if group_names is not None else None
        self.basis_device, self.basis_dtype = basis_device, basis_dtype
        self.service = service
        self._route = "autograd" if hvp == "auto" else hvp  # "auto" settles on the first failure
        self._check_failed = False
        self.hvp_column = True  # False when resuming a run recorded before the column existed
        self.ntk_size: int | None = None
        self._v0: torch.Tensor | None = None  # warm start: the last top Ritz vector
        if ntk_inputs is not None:
            x = _as_args(ntk_inputs)[0]
            n = int(x.shape[0])
            if ntk_outputs == "full":
                with torch.no_grad(), model_mode(model, "eval"):
                    c = int(model(*[t[:1] for t in _as_args(ntk_inputs)]).reshape(1, -1).shape[1])
                self.ntk_size = n * c
            else:
                self.ntk_size = n

    def config(self) -> dict:
        """The probe's settings, as stored in the run's meta."""
        return {"top_k": self.top_k, "tol": self.tol, "max_iter": self.max_iter, "trace": self.trace,
                "trace_rtol": self.trace_rtol if self.trace == "adaptive" else None, "mode": self.mode,
                "hessian": self.batch is not None, "ntk_size": self.ntk_size, "ntk_outputs": self.ntk_outputs,
                "ntk_method": self.ntk_method, "hvp": self.hvp,
                "groups": None if self.groups is None else
                [None if g is None else (self.group_names[i] if self.group_names else i)
                 for i, g in enumerate(self.groups)],
                "basis_device": str(self.basis_device), "basis_dtype": str(self.basis_dtype).replace("torch.", ""),
                "distributed": None if self.service is None else {"kind": "ddp", "world_size": self.service.world},
                "convention": "Lanczos (largest algebraic, full reorthogonalisation) to residual <= tol*|lambda|; "
                              "Hutchinson Rademacher with Student-t interval; NTK K = J J^T / n in eval mode"}

    def _threshold(self, lr: float) -> tuple[float, str]:
        from ..analysis.curvature import stability_threshold

        name = type(self.optimizer).__name__ if self.optimizer is not None else self.optimizer_meta.get("class", "")
        hyper = dict(self.optimizer.param_groups[0]) if self.optimizer is not None else \
            dict(self.optimizer_meta.get("hyper", {}))
        hyper.pop("params", None)
        step = None
        if self.optimizer is not None:
            st = next((self.optimizer.state[p] for p in self.params if self.optimizer.state.get(p)), {})
            if "step" in st:
                step = float(st["step"])
        th = stability_threshold(name, lr, hyper, step)
        return th.value, th.quantity

    def hessian_row(self, step: int, lr: float, seed: int | None = None,
                    update: torch.Tensor | None = None) -> dict:
        """One row of the ``curvature`` table at the model's current θ.  ``update``: the last update
        u_t = θ_t − θ_{t−1} (flat, in the parameters' order), for the curvature along it
        (:func:`update_curvature`, one more product; NaN without it)."""
        t0 = time.perf_counter()
        seed = int(step if seed is None else seed)
        op, eig, extra, check = self._top_eigen(seed)
        if eig.eigenvectors is not None and np.isfinite(eig.eigenvalues).all():
            self._v0 = eig.eigenvectors[0].detach()
        k = self.top_k
        vals = np.full(k, np.nan)
        res = np.full(k, np.nan)
        vals[: eig.eigenvalues.size] = eig.eigenvalues
        res[: eig.residuals.size] = eig.residuals
        hvps = eig.n_matvec + extra
        u_curv = np.nan
        if update is not None and update.numel() == op.n:
            u_curv = update_curvature(op, update)
            hvps += 1
        row = {"step": step, "lr": lr, "loss": op.loss, "mode": self.mode.encode(), "eigenvalues": vals,
               "residuals": res, "converged": int(eig.converged), "trace": np.nan, "trace_lo": np.nan,
               "trace_hi": np.nan, "trace_se": np.nan, "trace_probes": 0, "pre_lambda": np.nan,
               "pre_residual": np.nan}
        if self.trace is not None:
            tr = hutchinson_trace(op, op.n, None if self.trace == "adaptive" else int(self.trace),
                                  rtol=self.trace_rtol, max_probes=self.trace_max, seed=seed + 1, device=op.device)
            hvps += tr.n_probes
            row.update(trace=tr.estimate, trace_lo=tr.ci[0], trace_hi=tr.ci[1], trace_se=tr.se,
                       trace_probes=tr.n_probes)
        threshold, of = self._threshold(lr)
        if of == "preconditioned" and self.optimizer is not None:
            diag, _ = adam_preconditioner(self.optimizer, self.params)
            pre = lanczos(preconditioned_operator(op, diag.to(op.device)), op.n, k=1, tol=self.tol,
                          max_iter=self.max_iter, seed=seed + 2, device=op.device,
                          basis_device=self.basis_device, basis_dtype=self.basis_dtype)
            hvps += pre.n_matvec
            row.update(pre_lambda=pre.lambda_max, pre_residual=float(pre.residuals[0]))
        row.update(hvps=hvps, threshold=threshold, threshold_of=of.encode(), seconds=time.perf_counter() - t0)
        if self.hvp_column:
            row.update(hvp=op.route.encode(), hvp_check=check, u_curvature=u_curv)
        if self.groups is not None:
            from .curvature_groups import group_lambdas

            gl, gr, used = group_lambdas(op, self.params, self.groups, self._group_eigen, seed)
            row.update(group_lambda=gl, group_residual=gr, hvps=row["hvps"] + used,
                       seconds=time.perf_counter() - t0)
        return row

    def _group_eigen(self, block, seed: int) -> EigenResult:
        tol = max(self.tol, block.noise_floor) if block.route == "fd" else self.tol
        return lanczos(block, block.n, k=1, tol=tol, max_iter=self.max_iter, seed=seed, device=block.device,
                       basis_device=self.basis_device, basis_dtype=self.basis_dtype)

    def _make_op(self, route: str, seed: int):
        """The Hessian operator of the probe batch by ``route``: local, or under DDP all-reduced."""
        if self.service is not None:
            return self.service.operator(route, seed)
        return hessian_operator(self.model, self.loss_fn, self.batch, params=self.params, mode=self.mode,
                                hvp=route, seed=seed)

    def _lanczos(self, op, seed: int) -> EigenResult:
        v0 = None
        if self._v0 is not None and self._v0.numel() == op.n:
            # warm start from the last top eigenvector, mixed with a seeded random vector so the other
            # directions stay in the Krylov space (fewer products; the answer is fixed by the tolerance)
            gen = torch.Generator(device="cpu").manual_seed(seed)
            r = torch.randn(op.n, generator=gen, dtype=torch.float64).to(op.device)
            v0 = self._v0 + 0.1 * r / torch.linalg.vector_norm(r)
        tol = max(self.tol, op.noise_floor) if op.route == "fd" else self.tol
        return lanczos(op, op.n, k=min(self.top_k, op.n), tol=tol, max_iter=self.max_iter, seed=seed,
                       device=op.device, v0=v0, return_vectors=True, basis_device=self.basis_device,
                       basis_dtype=self.basis_dtype)

    # disagreement of the two routes (relative to |λ_max|) above which autograd is judged broken: FD
    # alone errs by ~u^{2/3} (2.4e-5 float32, 4e-11 float64; FiniteDifferenceHessian), a missing
    # second-derivative term by O(1) of the curvature it carries
    HVP_CHECK_RTOL = 1e-2

    def _fd(self, seed: int) -> FiniteDifferenceHessian:
        return self._make_op("fd", seed)

    def _switch_to_fd(self, why: str) -> None:
        log.warning("phasewatch: Hessian-vector products by double backward %s; curvature probes use finite "
                    "differences of gradients (hvp='fd') from now on", why)
        self._route = "fd"

    def _top_eigen(self, seed: int):
        """The operator on the probe batch, its top-k eigenpairs, the HVPs spent beyond Lanczos and the
        measured autograd-vs-FD disagreement.  Under ``hvp="auto"``: autograd, checked on every probe
        against one central-difference product along the top Ritz vector y (2 more products),
        ‖H_fd y − H_ag y‖ / |θ|; a failure of the first product, or a disagreement above
        :attr:`HVP_CHECK_RTOL` and above 10× the FD product's own error estimate (a kernel whose double backward is missing, or silently incomplete as
        ``once_differentiable`` functions are), switches this and every later probe to FD."""
        op = self._make_op(self._route, seed)
        try:
            eig = self._lanczos(op, seed)
        except RuntimeError as e:
            if self.hvp != "auto" or self._route != "autograd" or op.n_matvec:
                raise
            del op
            self._switch_to_fd(f"failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            op = self._fd(seed)
            return op, self._lanczos(op, seed), 0, np.nan
        if self.hvp != "auto" or op.route != "autograd" or eig.eigenvectors is None:
            return op, eig, 0, np.nan
        u = max(torch.finfo(p.dtype).eps / 2 for p in self.params)
        if 100 * u ** (2 / 3) >= self.HVP_CHECK_RTOL:  # half precision: FD cannot judge autograd
            return op, eig, 0, np.nan
        y = eig.eigenvectors[0]
        try:
            fd = self._fd(seed)
            diff = float(torch.linalg.vector_norm(fd.matvec(y) - op.matvec(y)))
        except Exception as e:  # noqa: BLE001 - the check cannot run: the autograd row stands, unchecked
            if not self._check_failed:
                log.warning("phasewatch: the autograd-vs-finite-difference check of the curvature probe could not "
                            "run (%s: %s); rows keep hvp_check = NaN", type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
            self._check_failed = True
            return op, eig, 0, np.nan
        scale = max(abs(float(eig.eigenvalues[0])), np.finfo(float).tiny)
        check = diff / scale
        if not check <= max(self.HVP_CHECK_RTOL, 10 * fd.error_estimates[-1] / scale):
            del op
            self._switch_to_fd(f"disagree with central differences by {check:.1e} of lambda_max along the top "
                               "eigenvector (a kernel whose double backward is missing or incomplete)")
            op = self._fd(seed)
            return op, self._lanczos(op, seed), 2, check
        return op, eig, 2, check

    def ntk_row(self, step: int) -> dict:
        """The ``ntk`` row of ``step``: the empirical NTK Gram of the probe inputs, the route that
        computed it and its time (the analyzer takes its log-determinant)."""
        names = None
        pset = {id(p) for p in self.params}
        names = [n for n, p in self.model.named_parameters() if id(p) in pset]
        res = ntk_gram(self.model, self.ntk_inputs, outputs=self.ntk_outputs, method=self.ntk_method, params=names)
        self.ntk_method = res.method  # "auto" is decided once
        return {"step": step, "gram": res.gram, "method": res.method.encode(), "seconds": res.seconds}


def rows_to_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Stack row dicts into the column arrays ``RunWriter.append`` takes."""
    return {c: np.stack([np.asarray(r[c]) for r in rows]) for c in rows[0]}
