"""Curvature probes under FSDP2 (``fully_shard``, DTensor parameters): shard-local FD products.

Every rank holds its shards θ_r of the parameters and FSDP2's backward leaves it its shard of the
gradient, g_r = (∇L)_r, where L is the mean over the ranks of each rank's probe-batch mean loss
(FSDP2 averages the gradients over ranks), each rank's loss scaled by W·n_r/N (W ranks, n_r
examples in its share, N = Σ n_r) so that the average is Σ_r (n_r/N) L_r, the whole probe batch's
mean loss also when the shares differ (as under DDP, :mod:`phasewatch.record.curvature_ddp`).  So one product H v, v sharded like the parameters, is
formed without gathering anything (Granziol & Juarev, arXiv:2602.00816): every rank perturbs its
own shards by ±εv_r, runs the forward and backward (FSDP2 gathers and reduce-scatters as in
training) and takes the central difference of its gradient shards,

    (H v)_r ≈ (g_r(θ + εv) − g_r(θ − εv)) / (2ε),

with the error bound and the measured step of :class:`phasewatch.record.hvp.FiniteDifferenceHessian`.
Every scalar that step depends on (‖θ‖, ‖v‖, ‖g₊ − 2g₀ + g₋‖, ‖D‖) is a local sum of squares
plus one all-reduce, so ε is the same on every rank.  Lanczos (:func:`sharded_lanczos`) keeps
its vectors sharded like the parameters (m·P_r·8 bytes per rank); its inner products are local
dot products plus scalar (or (j+1)-vector) all-reduces, so α, β and the tridiagonal T_m are
bit-identical on every rank and every rank takes the same convergence decision (no broadcast).
The small eigenproblem is solved on every rank; rank 0 writes.

Failures.  A rank whose forward or loss fails says so in an all-reduced flag before the backward
(whose reduce-scatter the others would otherwise wait in forever): every rank then raises the
same ``RuntimeError``, restores its shards and gradients, and the recorder switches the probe
off on all ranks.  A failure inside FSDP2's own collectives cannot be caught this way.

Parameters are restored bit-exactly after every gradient (copied back from a clone of each
shard), and the gradients the training left in ``p.grad`` are put back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import PhasewatchError
from .curvature_ddp import shard_size
from .dtensor import is_sharded, local
from .hvp import FiniteDifferenceHessian, _as_args, chunk_weights, model_mode, seeded_randomness
from .lanczos import EigenResult, lanczos


def _allsum(x: torch.Tensor, op: Any = None) -> torch.Tensor:
    """All-reduce ``x`` in place (sum by default) and return it."""
    dist.all_reduce(x, op=op if op is not None else dist.ReduceOp.SUM)
    return x


class ShardedFDHessian(FiniteDifferenceHessian):
    """H v by central differences of FSDP2's sharded gradients; vectors are this rank's flat
    float64 shards (the parameters' local shards in order).  The product, its step rule and its
    error estimates are :class:`~phasewatch.record.hvp.FiniteDifferenceHessian`'s, with every norm
    summed over the ranks (:meth:`norm`) and the gradient of :meth:`_gradient_at` this rank's
    shard; ``n`` is the global P, ``n_local`` this rank's; ``loss`` the whole probe batch's,
    Σ_r (n_r/N) L_r; :meth:`dot` / :meth:`norm` global (all-reduced)."""

    route = "fd"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batch: Any,
                 params: Sequence[torch.Tensor] | None = None, mode: str = "eval", seed: int = 0):
        if mode not in ("train", "eval"):
            raise PhasewatchError(f"mode={mode!r}: use 'train' or 'eval'")
        self.model, self.loss_fn, self.mode, self.seed = model, loss_fn, mode, int(seed)
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        if not self.params:
            raise PhasewatchError("ShardedFDHessian: the model has no parameters that require grad")
        self.shards = [local(p) for p in self.params]  # views of FSDP2's sharded storage
        self.n_local = sum(t.numel() for t in self.shards)
        self.device = self.shards[0].device
        self.chunks, self.weights = chunk_weights(batch)
        self.unit_roundoff = max(torch.finfo(p.dtype).eps / 2 for p in self.params)
        self._theta = [t.detach().clone() for t in self.shards]
        n_r = float(shard_size(batch))
        s = torch.tensor([float(self.n_local), sum(float((t.to(torch.float64) ** 2).sum()) for t in self._theta),
                          n_r], dtype=torch.float64)
        _allsum(s)
        self.n, self.theta_norm = int(s[0]), math.sqrt(float(s[1]))
        # this rank's weight n_r/N; its loss is scaled by W·n_r/N so that FSDP2's mean over the ranks
        # is the shard-size weighted mean Σ_r (n_r/N) g_r, the whole probe batch's gradient
        self.share = n_r / float(s[2])
        self.loss_scale = self.share * dist.get_world_size()
        self._scale = max(self.theta_norm, 1.0)
        self.fixed = False
        self.rel_step = self.unit_roundoff ** (1.0 / 3.0)
        self._eps = self.rel_step * self._scale
        self.n_matvec = self.n_gradients = 0
        self.steps: list[float] = []
        self.error_estimates: list[float] = []
        self._at_theta: tuple[torch.Tensor, float] | None = None

    # -- global reductions of local shards ---------------------------------------------------------
    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """aᵀb over all ranks' shards."""
        return float(_allsum(torch.dot(a, b).reshape(1).to(torch.float64).cpu())[0])

    def norm(self, a: torch.Tensor) -> float:
        """‖a‖ over all ranks' shards."""
        return math.sqrt(max(self.dot(a, a), 0.0))

    _norm = norm  # the base class's step rule, on global norms

    def dense(self):  # noqa: D102 - refused, one line
        raise PhasewatchError("ShardedFDHessian.dense: the dense Hessian needs the whole vector; use one process")

    def _gradient_at(self, delta: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(∇L shard, L) at θ + delta (delta: this rank's flat float64 shard, or None)."""
        saved = [p.grad for p in self.params]
        out = torch.zeros(self.n_local, dtype=torch.float64, device=self.device)
        loss_sum = 0.0
        try:
            with torch.no_grad():
                for p in self.params:
                    p.grad = None
                if delta is not None:
                    o = 0
                    for t, th in zip(self.shards, self._theta):
                        k = t.numel()
                        t.copy_((th.to(torch.float64) + delta[o: o + k].view(th.shape)).to(t.dtype))
                        o += k
            for (inputs, targets), w in zip(self.chunks, self.weights):
                loss_sum += w * self._one_backward(inputs, targets)
                o = 0
                for p, t in zip(self.params, self.shards):
                    k = t.numel()
                    if p.grad is not None:
                        out[o: o + k] += w * local(p.grad).detach().reshape(-1).to(torch.float64)
                        p.grad = None
                    o += k
        finally:
            with torch.no_grad():
                for t, th in zip(self.shards, self._theta):
                    t.copy_(th)
                for p, g in zip(self.params, saved):
                    p.grad = g
        self.n_gradients += 1
        s = _allsum(torch.tensor([self.share * loss_sum], dtype=torch.float64))
        return out, float(s[0])

    def _one_backward(self, inputs: Any, targets: Any) -> float:
        """Forward and loss (failure agreed on by every rank before the backward), then backward."""
        loss, why = None, ""
        try:
            with model_mode(self.model, self.mode), torch.enable_grad(), \
                    seeded_randomness(self.mode, self.seed, self.device):
                loss = self.loss_fn(self.model(*_as_args(inputs)), targets)
            if loss.dim() != 0:
                raise PhasewatchError("loss_fn must return the scalar mean loss of the batch")
        except Exception as e:  # noqa: BLE001 - agreed on below, then raised on every rank
            loss, why = None, f"{type(e).__name__}: {e}"
        bad = _allsum(torch.tensor([0.0 if loss is not None else 1.0], dtype=torch.float64))
        if float(bad[0]) > 0:
            raise RuntimeError(f"the FSDP curvature forward failed on {int(bad[0])} rank(s)"
                               + (f" ({why.splitlines()[0]})" if why else ""))
        with model_mode(self.model, self.mode):
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        return float(loss.detach())

    def random_shard(self, seed: int, kind: str = "normal") -> torch.Tensor:
        """This rank's shard of a global random vector (N(0,1) or Rademacher, from ``seed``): every
        rank draws each full tensor in order and keeps its part, so the vector is one vector."""
        from torch.distributed.tensor import distribute_tensor

        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        parts = []
        for p in self.params:
            full = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if kind == "rademacher":
                full = torch.sign(full)
            if is_sharded(p):
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            parts.append(full.reshape(-1))
        return torch.cat(parts).to(self.device)


def sharded_lanczos(op: ShardedFDHessian, k: int = 1, *, which: str = "LA", tol: float = 1e-6,
                    max_iter: int | None = None, seed: int = 0, verify: bool = True,
                    basis_dtype: torch.dtype = torch.float64) -> EigenResult:
    """:func:`phasewatch.record.lanczos.lanczos` (full reorthogonalisation, the same stopping rule
    and verification) with the Lanczos vectors sharded like the parameters: basis m × P_r per rank,
    every inner product local then all-reduced (``reduce``: one scalar or (j+1)-vector per
    Gram–Schmidt pass), so every rank builds the same T_m and stops at the same iteration.  The
    start vector is :meth:`ShardedFDHessian.random_shard` of ``seed``; ``eigenvectors`` are not
    returned (they would be sharded)."""
    if k < 1 or k > op.n:
        raise PhasewatchError(f"k={k}: need 1 <= k <= n={op.n}")
    return lanczos(op.matvec, op.n, k, which=which, tol=tol, max_iter=max_iter, v0=op.random_shard(seed),
                   device=op.device, verify=verify, basis_dtype=basis_dtype, basis_device=op.device,
                   reduce=_reduce_sum)


def _reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the ranks of a small float64 tensor (through the host: gloo reduces CPU tensors)."""
    return _allsum(x.detach().to("cpu", torch.float64).clone()).to(x.device)


def sharded_trace(op: ShardedFDHessian, samples: int = 10, seed: int = 0) -> tuple[float, float]:
    """Hutchinson tr H ≈ (1/s) Σ_i z_iᵀ H z_i, z_i Rademacher sharded like the parameters
    (:meth:`ShardedFDHessian.random_shard`); returns (estimate, its standard error)."""
    est = np.array([op.dot(z, op.matvec(z)) for z in (op.random_shard(seed + 1 + i, "rademacher")
                                                       for i in range(samples))])
    return float(est.mean()), float(est.std(ddof=1) / math.sqrt(samples)) if samples > 1 else math.nan


def sharded_update_curvature(op: ShardedFDHessian, u: torch.Tensor) -> float:
    """uᵀHu/‖u‖² along the update u (this rank's shard), the curvature along the step."""
    nu2 = op.dot(u, u)
    return op.dot(u, op.matvec(u)) / nu2 if nu2 > 0 else math.nan


class FSDPCurvatureProbe:
    """The recorder's curvature probe under FSDP2, run on every rank (rank 0's writer writes the
    row, the others' write nothing): the rows of :class:`~phasewatch.record.curvature.CurvatureProbe`
    (same columns) from :class:`ShardedFDHessian` and :func:`sharded_lanczos`; ``hvp`` is always
    ``"fd"``; the trace by a fixed number of Hutchinson probes; ``u_curvature`` along the update
    when the recorder holds it exactly (its shard); Adam's preconditioned sharpness from the local
    shards of the optimizer's second moments (:class:`_Preconditioned`)."""

    def __init__(self, base: Any):
        self.base = base  # a CurvatureProbe (options, thresholds, config)
        self.batch, self.ntk_size, self.hvp_column = base.batch, None, True
        self.top_k = base.top_k

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["base"], name)

    def config(self) -> dict:
        """The base probe's metadata, with the route and the distribution stated."""
        world = dist.get_world_size()
        return dict(self.base.config(), hvp="fd", distributed={"kind": "fsdp2", "world_size": world})

    def hessian_row(self, step: int, lr: float, seed: int | None = None, update: torch.Tensor | None = None) -> dict:
        """One ``curvature`` row at the current θ (every rank calls this at the same step)."""
        import time

        t0 = time.perf_counter()
        b = self.base
        seed = int(step if seed is None else seed)
        op = ShardedFDHessian(b.model, b.loss_fn, b.batch, params=b.params, mode=b.mode, seed=seed)
        k = min(b.top_k, op.n)
        eig = sharded_lanczos(op, k, tol=max(b.tol, op.noise_floor), max_iter=b.max_iter, seed=seed,
                              basis_dtype=b.basis_dtype)
        vals, res = np.full(b.top_k, np.nan), np.full(b.top_k, np.nan)
        vals[: eig.eigenvalues.size], res[: eig.residuals.size] = eig.eigenvalues, eig.residuals
        hvps = eig.n_matvec
        ucurv = math.nan
        if update is not None and update.numel() == op.n_local:
            ucurv = sharded_update_curvature(op, update.to(op.device, torch.float64))
            hvps += 1
        row = {"step": step, "lr": lr, "loss": op.loss, "mode": b.mode.encode(), "eigenvalues": vals,
               "residuals": res, "converged": int(eig.converged), "trace": np.nan, "trace_lo": np.nan,
               "trace_hi": np.nan, "trace_se": np.nan, "trace_probes": 0, "pre_lambda": np.nan,
               "pre_residual": np.nan}
        if b.trace is not None:
            s = int(b.trace)
            est, se = sharded_trace(op, s, seed=seed + 1)
            from scipy.stats import t as student

            half = float(student.ppf(0.975, s - 1)) * se
            row.update(trace=est, trace_lo=est - half, trace_hi=est + half, trace_se=se, trace_probes=s)
            hvps += s
        threshold, of = b._threshold(lr)
        if of == "preconditioned" and b.optimizer is not None:  # λ_max(D^{-1/2} H D^{-1/2}), D on the shards
            from .curvature import adam_preconditioner

            diag, _ = adam_preconditioner(*_local_adam(b.optimizer, b.params))
            pre = sharded_lanczos(_Preconditioned(op, diag.to(op.device)), 1, tol=max(b.tol, op.noise_floor),
                                  max_iter=b.max_iter, seed=seed + 2, basis_dtype=b.basis_dtype)
            hvps += pre.n_matvec
            row.update(pre_lambda=pre.lambda_max, pre_residual=float(pre.residuals[0]))
        row.update(hvps=hvps, threshold=threshold, threshold_of=of.encode(), seconds=time.perf_counter() - t0,
                   hvp=b"fd", hvp_check=np.nan, u_curvature=ucurv)
        return row


def _local_adam(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
    """The optimizer's state and groups over the local shards, and the shards (the keys: ``to_local``
    makes a new view per call), for :func:`~phasewatch.record.curvature.adam_preconditioner`."""
    from types import SimpleNamespace

    loc = {id(p): local(p) for p in params}
    state = {loc[id(p)]: {k: local(v) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in st.items()}
             for p, st in optimizer.state.items() if id(p) in loc}
    groups = [dict(g, params=[loc[id(p)] for p in g["params"] if id(p) in loc]) for g in optimizer.param_groups]
    return SimpleNamespace(state=state, param_groups=groups), [loc[id(p)] for p in params]


class _Preconditioned:
    """v ↦ D^{-1/2} H D^{-1/2} v on the shards (D: this rank's shard of Adam's √v̂ + ε), with the
    operator's global reductions, for :func:`sharded_lanczos`."""

    def __init__(self, op: ShardedFDHessian, diag: torch.Tensor):
        self.op, self.r = op, diag.to(torch.float64).rsqrt()
        self.n, self.n_local, self.device = op.n, op.n_local, op.device
        self.dot, self.norm, self.random_shard = op.dot, op.norm, op.random_shard

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """D^{-1/2} H D^{-1/2} v (local shards)."""
        return self.r * self.op.matvec(self.r * v.to(self.r.device, torch.float64))


def fsdp_probe(base: Any) -> FSDPCurvatureProbe:
    """The FSDP2 probe over ``base`` (a CurvatureProbe); one-line errors for what it cannot do."""
    if base.hvp == "autograd":
        raise PhasewatchError("curvature_hvp='autograd' is not supported for FSDP-sharded (DTensor) parameters; "
                              "use curvature_hvp='fd' (or 'auto', which picks it)")
    if base.groups is not None:
        raise PhasewatchError("curvature_groups is not supported for FSDP-sharded (DTensor) parameters; "
                              "record without it")
    if base.trace == "adaptive":
        raise PhasewatchError("curvature_trace='adaptive' is not supported for FSDP-sharded (DTensor) "
                              "parameters; give a number of probes (an int >= 2)")
    if base.ntk_inputs is not None:
        raise PhasewatchError("ntk_inputs is not supported for FSDP-sharded (DTensor) parameters; record "
                              "without it")
    if base.batch is None:
        raise PhasewatchError("curvature_every under FSDP needs curvature_batch (this rank's probe batch)")
    return FSDPCurvatureProbe(base)
