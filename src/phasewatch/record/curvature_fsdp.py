"""Curvature probes under FSDP2: shard-local finite-difference HVPs and Lanczos on sharded vectors.

Under FSDP2 (``fully_shard``) rank r holds the shard θ^(r) = ``p.to_local()`` of every parameter,
and a backward reduce-scatters: ``p.grad.to_local()`` is rank r's shard of the ranks' mean
gradient.  A Hessian-vector product never needs the full θ or the full vector:

    (H v)^(r) ≈ (g(θ + h v)^(r) − g(θ − h v)^(r)) / (2h)

where every rank perturbs its own shards by ±h·v^(r) (in place, under no_grad), runs forward and
backward of the probe loss on its share (n_r examples) of the probe batch, and FSDP's reduce-scatter
assembles the shards of the whole batch's gradient.  Each rank's loss is scaled by W·n_r/N (W ranks,
N = Σ n_r) so that FSDP's mean over ranks is the shard-size weighted mean Σ_r (n_r/N) g_r, the
gradient of the whole probe batch (as under DDP, :mod:`phasewatch.record.curvature_ddp`).  The
step h follows :class:`~phasewatch.record.hvp.FiniteDifferenceHessian`'s rule with every norm
(‖θ‖, ‖v‖, ‖g₊ − 2g₀ + g₋‖, ‖D‖) all-reduced from local squared sums, so h is the same on every
rank.  After each gradient the shards are copied back from saved clones (bit-exact) and every
``p.grad`` is put back as it was (the same tensor, or None).

:func:`sharded_lanczos` is :func:`~phasewatch.record.curvature.lanczos` on vectors split like the
parameters: each rank keeps its rows of the basis (memory per rank ≈ 1/W of one process), every
inner product and norm is a local sum and one scalar (or, for the Gram–Schmidt pass, one (j+1)-vector)
all-reduce, and the tridiagonal eigenproblem is solved on identical numbers on every rank, so every
rank takes the same decisions.  With one process it is :func:`lanczos` operation for operation.

Failures.  The probe loss is evaluated on every rank and a status all-reduce follows before the
backward, so an exception in the forward or the loss on any rank raises on every rank; a probe that
raised is followed by a second status all-reduce (:class:`ShardedSchedule`) after which every rank
switches the probes off and training goes on.  A failure inside FSDP's own collectives (a rank
that dies mid-backward) hangs as training itself would.  Communication per product: the two
gradients' all-gathers and reduce-scatters plus one all-reduce of 3 doubles (two when the step is
re-measured), per Lanczos iteration ≤ 3 scalar all-reduces and ≤ 2 of j+1 doubles.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import PhasewatchError, RecorderError
from .curvature import (
    CurvatureProbe,
    EigenResult,
    _basis_rows,
    _pick,
    _tridiagonal_eigh,
    adam_preconditioner,
    preconditioned_operator,
)
from .curvature_ddp import shard_size
from .dtensor import local
from .hvp import HVP_ROUTES, _as_args, chunk_weights, model_mode, seeded_randomness

log = logging.getLogger("phasewatch")


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def allsum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks (in place; no collective with one process)."""
    if _world() > 1:
        dist.all_reduce(x)
    return x


def global_norm(x: torch.Tensor) -> float:
    """‖x‖ of a vector split over the ranks: √(Σ_r ‖x^(r)‖²) (one process: ``vector_norm``)."""
    n = torch.linalg.vector_norm(x)
    if _world() == 1:
        return float(n)
    return math.sqrt(float(allsum(n.to(torch.float64) ** 2)))


class ShardedFiniteDifferenceHessian:
    """Rank r's part of H v for the FSDP2 model (module docstring): ``matvec`` takes and returns
    flat float64 vectors over the rank's local shards of ``params`` (in their order), ``n`` local
    coordinates; ``loss`` is the whole probe batch's, ``gradient`` the local shard of its gradient.
    ``batch`` is this rank's share of the probe batch.  The step rule and error estimates are
    :class:`~phasewatch.record.hvp.FiniteDifferenceHessian`'s, on all-reduced norms."""

    route = "fd"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batch: Any, params: Sequence[torch.Tensor],
                 mode: str = "eval", seed: int = 0):
        if mode not in ("train", "eval"):
            raise PhasewatchError(f"mode={mode!r}: use 'train' or 'eval'")
        self.model, self.loss_fn, self.mode, self.seed = model, loss_fn, mode, int(seed)
        self.params = [p for p in params if p.requires_grad]
        self.local = [local(p) for p in self.params]  # views of FSDP's sharded storage
        self.n = sum(t.numel() for t in self.local)
        self.device = self.local[0].device
        self.chunks, self.weights = chunk_weights(batch)
        sizes = allsum(torch.tensor([float(shard_size(batch))], dtype=torch.float64))
        self.share = shard_size(batch) / float(sizes[0])  # n_r / N
        self.loss_scale = self.share * _world()  # FSDP averages over the ranks
        self.unit_roundoff = max(torch.finfo(t.dtype).eps / 2 for t in self.local)
        self.rel_step = self.unit_roundoff ** (1.0 / 3.0)
        self._theta = [t.detach().clone() for t in self.local]
        sq = sum(float((t.to(torch.float64) ** 2).sum()) for t in self._theta)
        self.theta_norm = math.sqrt(float(allsum(torch.tensor([sq], dtype=torch.float64))[0]))
        self._scale = max(self.theta_norm, 1.0)
        self._eps = self.rel_step * self._scale
        self._at_theta: tuple[torch.Tensor, float] | None = None
        self.n_matvec = self.n_gradients = 0
        self.error_estimates: list[float] = []
        self.steps: list[float] = []

    @property
    def gradient(self) -> torch.Tensor:
        """This rank's shard of ∇L at θ (flat float64)."""
        if self._at_theta is None:
            self._at_theta = self._gradient_at(None)
        return self._at_theta[0]

    @property
    def loss(self) -> float:
        """L at θ of the whole probe batch."""
        _ = self.gradient
        return self._at_theta[1]

    @property
    def noise_floor(self) -> float:
        """100·u^{2/3} (as :attr:`FiniteDifferenceHessian.noise_floor`)."""
        return 100 * self.unit_roundoff ** (2 / 3)

    def _loss(self, inputs: Any, targets: Any) -> torch.Tensor:
        """The probe loss on every rank, then a status all-reduce: any rank failing raises on all."""
        loss, err = None, None
        try:
            loss = self.loss_fn(self.model(*_as_args(inputs)), targets)
            if loss.dim() != 0:
                raise PhasewatchError("loss_fn must return the scalar mean loss of the batch")
        except Exception as e:  # noqa: BLE001 - raised below, on every rank
            err = e
        failed = float(allsum(torch.tensor([float(err is not None)], dtype=torch.float64))[0])
        if err is not None:
            raise err
        if failed:
            raise RuntimeError(f"the curvature probe's loss failed on {int(failed)} other rank(s)")
        return loss

    def _gradient_at(self, delta: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(local shard of ∇L, L) at θ + delta; the shards and every p.grad restored bit-exactly."""
        saved = [p.grad for p in self.params]
        out = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        loss_sum = 0.0
        try:
            for p in self.params:
                p.grad = None
            with torch.no_grad():
                if delta is not None:
                    o = 0
                    for t, th in zip(self.local, self._theta):
                        d = delta[o: o + t.numel()].view(t.shape)
                        t.copy_((th.to(torch.float64) + d).to(t.dtype))
                        o += t.numel()
            for (inputs, targets), w in zip(self.chunks, self.weights):
                with model_mode(self.model, self.mode), torch.enable_grad(), \
                        seeded_randomness(self.mode, self.seed, self.device):
                    loss = self._loss(inputs, targets)
                    (loss * (w * self.loss_scale)).backward()
                loss_sum += w * float(loss.detach())
            o = 0
            for p, t in zip(self.params, self.local):
                if p.grad is not None:
                    out[o: o + t.numel()].copy_(local(p.grad).reshape(-1))
                o += t.numel()
        finally:
            with torch.no_grad():
                for t, th in zip(self.local, self._theta):
                    t.copy_(th)
            for p, g in zip(self.params, saved):
                p.grad = g
        self.n_gradients += 1
        if delta is None:
            loss_sum = float(allsum(torch.tensor([self.share * loss_sum], dtype=torch.float64))[0])
        return out, loss_sum

    def _central(self, v: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
        """(D, ℓ) for a unit v: the central difference and the curvature length, norms all-reduced."""
        gp, _ = self._gradient_at(eps * v)
        gm, _ = self._gradient_at(-eps * v)
        d = (gp - gm) / (2 * eps)
        sq = torch.stack([torch.linalg.vector_norm(gp - 2 * self.gradient + gm) ** 2,
                          torch.linalg.vector_norm(d) ** 2]).to(torch.float64)
        second, dn = (math.sqrt(float(x)) for x in allsum(sq))
        second /= eps ** 2
        return d, (dn / second if second > 0 and dn > 0 else math.inf)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The local shard of H v for the local shard v (flat float64)."""
        v = v.to(self.device, torch.float64)
        self.n_matvec += 1
        nv = global_norm(v)
        if nv == 0:
            return torch.zeros_like(v)
        vh = v / nv
        u, eps0 = self.unit_roundoff, self.rel_step * self._scale
        eps = self._eps
        d, ell = self._central(vh, eps)
        best = min(eps0, (3 * u * self._scale * ell ** 2) ** (1 / 3)) if math.isfinite(ell) else eps0
        if eps > 2 * best:
            eps = best
            d, ell = self._central(vh, eps)
            best = min(eps0, (3 * u * self._scale * ell ** 2) ** (1 / 3)) if math.isfinite(ell) else eps0
        self._eps = best
        dn = global_norm(d)
        trunc = eps ** 2 / (6 * ell ** 2) if math.isfinite(ell) else 0.0
        self.error_estimates.append(dn * (trunc + u * self._scale / eps))
        self.steps.append(eps)
        return d * nv

    __call__ = matvec


def _orthogonalise(w: torch.Tensor, v: torch.Tensor, beta_prev: float) -> tuple[torch.Tensor, float, float]:
    """:func:`phasewatch.record.curvature._orthogonalise` (float64 basis) with the inner products
    all-reduced: the same operations in the same order, so one process gives the same bits."""
    q = v[-1]
    alpha = float(allsum(w @ q))
    w.sub_(q, alpha=alpha)
    if v.shape[0] > 1:
        w.sub_(v[-2], alpha=beta_prev)
    beta = global_norm(w)
    for _ in range(2):
        before = beta
        h = allsum(torch.mv(v, w))
        w.addmv_(v.T, h, alpha=-1)
        alpha += float(h[-1])
        beta = global_norm(w)
        if beta >= 0.7071 * before:
            break
    return w, alpha, beta


def _unit_rows(vecs: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.vector_norm(vecs, dim=1, keepdim=True)
    if _world() > 1:
        n = allsum(n ** 2).sqrt()
    return vecs / n


def sharded_lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int = 1, *, which: str = "LA",
                    tol: float = 1e-6, max_iter: int | None = None, v0: torch.Tensor | None = None, seed: int = 0,
                    device: torch.device | str | None = None, verify: bool = True, return_vectors: bool = False,
                    memory_budget: int = 2 << 30) -> EigenResult:
    """:func:`~phasewatch.record.curvature.lanczos` (float64 basis) on vectors split over the
    ranks: ``n`` is this rank's number of coordinates, ``matvec`` maps a local part to the local
    part of the product (a collective), ``v0`` is the local part of the start vector (default:
    standard normal from ``seed + rank``).  The basis holds m ≤ min(N, max_iter, max(k + 10,
    memory_budget // (8 n))) rows of the local n coordinates (N = Σ n over the ranks).  Returns the
    eigenvalues and residuals (identical on every rank) and, with ``return_vectors``, the local
    parts of the Ritz vectors."""
    total = int(allsum(torch.tensor([float(n)], dtype=torch.float64))[0])
    _basis_rows(total, k, which, max_iter, memory_budget, torch.float64)  # the argument checks
    m_max = int(min(total, max_iter or max(100, 20 * k), max(k + 10, memory_budget // (8 * max(n, 1)))))
    dev = torch.device(device) if device is not None else (v0.device if v0 is not None else torch.device("cpu"))
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + _rank())
        v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(dev)
    q = v0.to(dev, torch.float64)
    q = q / global_norm(q)
    basis = torch.empty((m_max, n), dtype=torch.float64, device=dev)
    basis[0] = q
    w = torch.empty(n, dtype=torch.float64, device=dev)
    q = torch.empty(n, dtype=torch.float64, device=dev)
    alphas: list[float] = []
    betas: list[float] = []
    n_mv, converged, beta, m = 0, False, 0.0, 0
    theta = s = idx = None
    invariant = False
    for j in range(m_max):
        q.copy_(basis[j])
        w.copy_(matvec(q))
        n_mv += 1
        w, a, beta = _orthogonalise(w, basis[: j + 1], betas[-1] if betas else 0.0)
        alphas.append(a)
        m = j + 1
        theta, s = _tridiagonal_eigh(alphas, betas)
        invariant = beta <= 1e-13 * max(np.abs(theta).max(), np.finfo(float).tiny)
        if m >= k:
            idx = _pick(theta, k, which)
            est = beta * np.abs(s[-1, idx])
            if invariant or np.all(est <= tol * np.maximum(np.abs(theta[idx]), 1e-300)):
                converged = True
                break
        if invariant:
            break
        if j + 1 < m_max:
            betas.append(beta)
            basis[j + 1].copy_(w.div_(beta))
    idx = _pick(theta, min(k, m), which)
    vals = theta[idx]
    coeff = torch.as_tensor(s[:, idx], dtype=torch.float64, device=dev)
    vecs = _unit_rows((basis[:m].T @ coeff).T)
    if verify:
        res = np.array([global_norm(matvec(vecs[i]).to(dev, torch.float64) - float(vals[i]) * vecs[i])
                        for i in range(len(vals))])
        n_mv += len(vals)
        if converged and not invariant:
            converged = bool(np.all(res <= max(10 * tol, 1e-12) * np.maximum(np.abs(vals), 1e-300)))
    else:
        res = beta * np.abs(s[-1, idx])
    return EigenResult(eigenvalues=np.asarray(vals, dtype=float), residuals=res, n_matvec=n_mv, iterations=m,
                       converged=converged, which=which, tol=tol, eigenvectors=vecs if return_vectors else None)


class ShardedCurvatureProbe(CurvatureProbe):
    """:class:`~phasewatch.record.curvature.CurvatureProbe` on an FSDP2 model, run on every rank at
    the same steps: :class:`ShardedFiniteDifferenceHessian` products on this rank's share of the
    probe batch, :func:`sharded_lanczos`, Adam's preconditioned sharpness on the local shards of
    its state.  Rows are the same on every rank (rank 0 writes them); the trace, per-group
    curvature, the NTK and the curvature along the update are not available here (refused, or NaN)."""

    sharded = True  # run by ShardedSchedule on every rank, not by the recorder's own schedule

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor], **kw: Any):
        super().__init__(model, params, **dict(kw, hvp="fd"))

    def config(self) -> dict:
        """:meth:`CurvatureProbe.config` with ``distributed`` = FSDP2 and its world size."""
        return dict(super().config(), distributed={"kind": "fsdp2", "world_size": _world()})

    def _make_op(self, route: str, seed: int) -> ShardedFiniteDifferenceHessian:
        return ShardedFiniteDifferenceHessian(self.model, self.loss_fn, self.batch, self.params, self.mode, seed)

    def _lanczos(self, op, seed: int) -> EigenResult:
        v0 = None
        if self._v0 is not None and self._v0.numel() == op.n:
            gen = torch.Generator(device="cpu").manual_seed(seed + _rank())
            r = torch.randn(op.n, generator=gen, dtype=torch.float64).to(op.device)
            v0 = self._v0 + 0.1 * r / global_norm(r)
        return sharded_lanczos(op, op.n, k=self.top_k, tol=max(self.tol, op.noise_floor), max_iter=self.max_iter,
                               seed=seed, device=op.device, v0=v0, return_vectors=True)

    def _local_adam(self) -> tuple[SimpleNamespace, list[torch.Tensor]]:
        """The optimizer's Adam state and groups over the local shards, and the local shards (for
        adam_preconditioner; ``to_local`` makes a new view per call: these are the keys)."""
        loc = {id(p): local(p) for p in self.params}
        state = {loc[id(p)]: {k: local(v) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in st.items()}
                 for p, st in self.optimizer.state.items() if id(p) in loc}
        groups = [dict(g, params=[loc[id(p)] for p in g["params"] if id(p) in loc]) for g in self.optimizer.param_groups]
        return SimpleNamespace(state=state, param_groups=groups), [loc[id(p)] for p in self.params]

    def hessian_row(self, step: int, lr: float, seed: int | None = None, update: torch.Tensor | None = None) -> dict:
        """One ``curvature`` row (the columns of the one-process probe), identical on every rank."""
        t0 = time.perf_counter()
        seed = int(step if seed is None else seed)
        op = self._make_op("fd", seed)
        eig = self._lanczos(op, seed)
        if eig.eigenvectors is not None and np.isfinite(eig.eigenvalues).all():
            self._v0 = eig.eigenvectors[0].detach()
        vals, res = np.full(self.top_k, np.nan), np.full(self.top_k, np.nan)
        vals[: eig.eigenvalues.size], res[: eig.residuals.size] = eig.eigenvalues, eig.residuals
        row = {"step": step, "lr": lr, "loss": op.loss, "mode": self.mode.encode(), "eigenvalues": vals,
               "residuals": res, "converged": int(eig.converged), "trace": np.nan, "trace_lo": np.nan,
               "trace_hi": np.nan, "trace_se": np.nan, "trace_probes": 0, "pre_lambda": np.nan,
               "pre_residual": np.nan}
        hvps = eig.n_matvec
        threshold, of = self._threshold(lr)
        if of == "preconditioned" and self.optimizer is not None:
            diag, _ = adam_preconditioner(*self._local_adam())
            pre = sharded_lanczos(preconditioned_operator(op, diag.to(op.device)), op.n, k=1,
                                  tol=max(self.tol, op.noise_floor), max_iter=self.max_iter, seed=seed + 2,
                                  device=op.device)
            hvps += pre.n_matvec
            row.update(pre_lambda=pre.lambda_max, pre_residual=float(pre.residuals[0]))
        row.update(hvps=hvps, threshold=threshold, threshold_of=of.encode(), seconds=time.perf_counter() - t0)
        if self.hvp_column:
            row.update(hvp=b"fd", hvp_check=np.nan, u_curvature=np.nan)
        return row


def refuse(curv: Any) -> None:
    """The curvature options FSDP2 does not support, as one clear error each."""
    o = curv.options
    if curv.on and o["hvp"] not in HVP_ROUTES:
        raise RecorderError(f"curvature_hvp={o['hvp']!r}: use one of {', '.join(HVP_ROUTES)}")
    if curv.on and o["hvp"] == "autograd":
        raise RecorderError("curvature_hvp='autograd' is not supported for FSDP-sharded (DTensor) parameters; "
                            "use curvature_hvp='fd' (shard-local finite differences)")
    for name, bad in (("curvature_trace", o["trace"] is not None), ("ntk_inputs", o["ntk_inputs"] is not None),
                      ("curvature_groups", curv.groups not in (False, None))):
        if bad:
            raise RecorderError(f"{name} is not supported for FSDP-sharded (DTensor) parameters; record without it "
                                "(under FSDP2 the curvature probes give lambda_max, top-k and Adam's "
                                "preconditioned sharpness)")


class ShardedSchedule:
    """Every rank: count optimizer steps and, at the scheduled ones, run the probe (on every rank,
    also one whose recorder has failed: its parameters are intact) and write the row (rank 0, while
    its recorder writes).  After every probe one status all-reduce: a probe that raised on any rank
    switches the probes off on every rank; training goes on (``strict``: raised after the exchange)."""

    def __init__(self, rec: Any, q: Any, optimizer: torch.optim.Optimizer, start_step: int):
        self.rec, self.q, self.step, self.off = rec, q, int(start_step), False
        self.handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        from .curvature import rows_to_columns

        self.step += 1
        if self.off or self.q.probe is None or getattr(self.rec._shard, "stopped", False) \
                or not self.q.schedule(self.step):
            return
        err = None
        try:
            row = self.q.probe.hessian_row(self.step, float(optimizer.param_groups[0]["lr"]))
            if self.rec.enabled and _rank() == 0:
                self.rec.writer.append("curvature", **rows_to_columns([row]))
        except Exception as e:  # noqa: BLE001 - a probe never stops training
            err = e
        try:
            failed = int(allsum(torch.tensor([float(err is not None)], dtype=torch.float64))[0])
        except Exception as e:  # noqa: BLE001 - the exchange itself failed: this rank leaves
            failed, err = 1, err or e
        if not failed:
            return
        self.off, self.q.probe = True, None
        if err is not None and self.rec.strict:
            raise err
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}" if err else "on another rank"
        log.warning("phasewatch: curvature probe failed at step %d on rank %d (%s); curvature probes are off on "
                    "every rank for the rest of this run, everything else is still recorded", self.step, _rank(), why)


def bind(rec: Any, options: dict) -> ShardedCurvatureProbe:
    """The FSDP2 probe of the recorder's Curvature quantity (its options; the recorder's own
    schedule leaves a ``sharded`` probe to :class:`ShardedSchedule`)."""
    o = {k: v for k, v in options.items() if k not in ("hvp", "basis_device")}
    return ShardedCurvatureProbe(rec._model, rec.params, optimizer=rec.optimizer, **o)
