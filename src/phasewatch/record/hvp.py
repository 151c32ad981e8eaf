"""The pieces every Hessian-vector product shares, and the finite-difference operator.

* :func:`double_differentiable_attention` — inside it, ``scaled_dot_product_attention`` runs the
  math backend (elementary ops, differentiable any number of times).  The fused CPU/CUDA kernels
  (flash, memory-efficient, cuDNN) have a backward but no double backward, so a Hessian-vector
  product by double backward through them raises "derivative for
  aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented".  The probes
  enter this context around their own forward/backward only; training keeps its fused kernels.
* :class:`FiniteDifferenceHessian` — Hv ≈ (∇L(θ+εv) − ∇L(θ−εv)) / (2ε): two ordinary gradient
  evaluations, no kept graph, any kernel.  The step ε and the error it leaves are derived in its
  docstring.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import PhasewatchError

HVP_ROUTES = ("autograd", "fd", "auto")


def _flat(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One flat ``dtype`` vector of the tensors (None: zeros), written piece by piece into a single
    allocation (converting in the copy: no per-piece temporaries)."""
    out = torch.empty(sum(p.numel() for p in like), dtype=dtype, device=like[0].device)
    o = 0
    for t, p in zip(tensors, like):
        seg = out[o: o + p.numel()]
        if t is None:
            seg.zero_()
        else:
            seg.copy_(t.reshape(-1))
        o += p.numel()
    return out


def _unflat(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of v shaped like the tensors, in their dtype (one conversion of v when they share it)."""
    dtypes = {p.dtype for p in like}
    if len(dtypes) == 1:
        v = v.to(dtypes.pop())
    out, o = [], 0
    for p in like:
        n = p.numel()
        out.append(v[o: o + n].view(p.shape).to(p.dtype))
        o += n
    return out


def _as_args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


@contextlib.contextmanager
def model_mode(model: torch.nn.Module, mode: str, restore_buffers: bool = True):
    """Put ``model`` in ``"train"`` or ``"eval"`` mode for the block; restore every module's flag
    and (unless told not to) every buffer (a train-mode forward updates BatchNorm running
    statistics) afterwards."""
    if mode not in ("train", "eval"):
        raise PhasewatchError(f"mode={mode!r}: use 'train' or 'eval'")
    flags = [(m, m.training) for m in model.modules()]
    saved = {n: b.detach().clone() for n, b in model.named_buffers()} if restore_buffers else {}
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in saved:
                    b.copy_(saved[n])


@contextlib.contextmanager
def _mha_fastpath_off():
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def double_differentiable_attention():
    """A context in which attention differentiates any number of times, in both AD modes:
    ``torch.nn.functional.scaled_dot_product_attention`` (what HF models, nanoGPT and
    ``nn.MultiheadAttention`` call) uses the math backend, whose graph is made of elementary ops,
    and the fused eval-mode fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
    (``aten::_transformer_encoder_layer_fwd``, taken when no parameter requires grad, as inside
    ``torch.func`` transforms; it has no forward-mode AD) is switched off.  Only the probe's own
    forward/backward run in it: the graph records the kernels chosen at forward time, and both
    settings are restored on exit.  Without ``torch.nn.attention`` (torch < 2.3) only the fast
    path is switched off."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        backend = contextlib.nullcontext()
    else:
        backend = sdpa_kernel(SDPBackend.MATH)
    with _mha_fastpath_off(), backend:
        yield


@contextlib.contextmanager
def seeded_randomness(mode: str, seed: int, device: torch.device):
    """Train mode: the forward's randomness (dropout masks) drawn from ``seed`` on a forked
    generator, so every operator of a probe (autograd and FD, each FD gradient) sees the same masks
    and training's random stream is left as it was; attention then runs in the math backend too,
    whose dropout draws differ from the fused kernels'.  Eval mode: nothing changes."""
    if mode != "train":
        yield
        return
    devs = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devs), double_differentiable_attention():
        torch.manual_seed(int(seed))
        yield


def chunk_weights(batch: Any) -> tuple[list, list[float]]:
    """The probe batch as a list of ``(inputs, targets)`` chunks and their size weights (sum 1)."""
    chunks = batch if isinstance(batch, list) else [batch]
    sizes = []
    for c in chunks:
        if not (isinstance(c, (tuple, list)) and len(c) == 2):
            raise PhasewatchError("batch must be (inputs, targets) or a list of such pairs")
        x = _as_args(c[0])[0]
        sizes.append(x.shape[0] if isinstance(x, torch.Tensor) and x.dim() else 1)
    total = float(sum(sizes))
    return chunks, [s / total for s in sizes]


class FiniteDifferenceHessian:
    """H v ≈ (∇L(θ + εv) − ∇L(θ − εv)) / (2ε), the same operator as
    :class:`~phasewatch.record.curvature.HessianOperator` (same ``batch``, ``params``, ``mode``,
    same attributes ``n``, ``loss``, ``gradient``, ``n_matvec``, ``matvec``, ``dense``) by central
    differences of ordinary gradients: no kept graph, no double backward, any kernel.

    The error of one product along a unit v̂, the gradient evaluated in unit roundoff u
    (u = 2⁻²⁴ float32, 2⁻⁵³ float64), has two parts:

    * truncation (Taylor, g = ∇L): g(θ ± εv̂) = g ± εHv̂ + (ε²/2)∇³L[v̂,v̂] ± (ε³/6)∇⁴L[v̂,v̂,v̂] + …,
      so the central difference errs by (ε²/6)·Q + O(ε⁴), Q = ‖∇⁴L[v̂, v̂, v̂]‖;
    * rounding: θ ± εv̂ is rounded to the parameters' dtype (a perturbation error ≤ u‖θ‖, mapped
      by H to ≤ u‖H‖‖θ‖) and each gradient carries its own rounding error δg; divided by 2ε:
      ≤ (u‖H‖‖θ‖ + δg)/ε.

    E(ε) = ε²Q/6 + R/ε, R = u‖H‖‖θ‖ + δg, is smallest at ε* = (3R/Q)^{1/3}, where
    E ≈ 1.9·R^{2/3}Q^{1/3}: the step scales as u^{1/3} and the error as u^{2/3}.  A fixed step
    u^{1/3}‖θ‖ (the usual choice, assuming curvature varies over distances ~‖θ‖) is 30–100× too
    large along the top eigenvector of a small GPT-2, whose curvature varies over distances
    ~‖θ‖/300 (biases and embeddings): 47% error in float32.  So the step is measured, per product,
    from the same gradients: with g₀ = ∇L(θ) kept, ‖g₊ − 2g₀ + g₋‖/ε² ≈ ‖∇³L[v̂,v̂]‖ =: ‖Hv̂‖/ℓ
    gives the length ℓ over which the curvature along v̂ changes; taking Q ≈ ‖Hv̂‖/ℓ², R ≈
    u‖θ‖‖Hv̂‖ (δg ≲ u‖H‖‖θ‖ assumed), ε* = (3u‖θ‖ℓ²)^{1/3}, capped at ε₀ = u^{1/3}·max(‖θ‖, 1).
    A product whose step exceeds 2ε* is recomputed at ε* (two more gradients); the next product
    starts from the last ε*.  :attr:`steps` holds the step of each product (for a unit v̂),
    :attr:`error_estimates` each product's estimated error
    ‖Hv̂‖(ε²/(6ℓ²) + u‖θ‖/ε) (per unit v̂); :attr:`n_gradients` counts the gradients spent.

    Parameters are perturbed in place (so any module works, wrapped or hooked) and copied back
    from a saved clone after every gradient (bit-exact, never θ + εv − εv); through ``.data``, so
    a graph kept elsewhere on the same parameters stays valid.  Buffers (BatchNorm running
    statistics) are restored after every forward, as the autograd route leaves them.  In train
    mode every forward draws its randomness from ``seed`` (:func:`seeded_randomness`), so each
    gradient sees the same dropout masks as the others and as a :class:`HessianOperator` built with
    the same seed (the operator stays symmetric up to the error above).
    ``rel_step`` fixes ε = rel_step·max(‖θ‖, 1)/‖v‖ instead (no step control).
    """

    route = "fd"

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batch: Any,
                 params: Sequence[torch.Tensor] | None = None, mode: str = "eval",
                 rel_step: float | None = None, seed: int = 0):
        if mode not in ("train", "eval"):
            raise PhasewatchError(f"mode={mode!r}: use 'train' or 'eval'")
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        if not self.params:
            raise PhasewatchError("FiniteDifferenceHessian: the model has no parameters that require grad")
        self.n = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        self.chunks, self.weights = chunk_weights(batch)
        self.seed = int(seed)
        # the coarsest dtype among the parameters sets the roundoff
        self.unit_roundoff = max(torch.finfo(p.dtype).eps / 2 for p in self.params)
        self.fixed = rel_step is not None
        self.rel_step = float(rel_step) if rel_step is not None else self.unit_roundoff ** (1.0 / 3.0)
        self._theta = [p.detach().clone() for p in self.params]
        self.theta_norm = math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in self._theta))
        self.n_matvec = 0
        self.n_gradients = 0
        self._at_theta: tuple[torch.Tensor, float] | None = None
        self._scale = max(self.theta_norm, 1.0)
        self._eps = self.rel_step * self._scale  # the step for a unit vector; adapted per product
        self.error_estimates: list[float] = []
        self.steps: list[float] = []  # the step used by each product, for a unit vector

    @property
    def gradient(self) -> torch.Tensor:
        """∇L at θ (flat float64; one gradient evaluation, on first use)."""
        if self._at_theta is None:
            self._at_theta = self._gradient_at(None)
        return self._at_theta[0]

    @property
    def loss(self) -> float:
        """L at θ (evaluated with :attr:`gradient`)."""
        _ = self.gradient
        return self._at_theta[1]

    @property
    def noise_floor(self) -> float:
        """100·u^{2/3}: the relative accuracy below which a Lanczos residual on FD products is not
        asked for (the error of a product is ~1.9·u^{2/3} relative at the best step, times the
        curvature's variation; 2.4e-3 float32, 3.7e-9 float64)."""
        return 100 * self.unit_roundoff ** (2 / 3)

    def step(self, v: torch.Tensor) -> float:
        """The a-priori step ε₀ for a product with v: rel_step · max(‖θ‖, 1) / ‖v‖."""
        return self.rel_step * self._scale / self._norm(v)

    def _norm(self, x: torch.Tensor) -> float:
        """‖x‖ of a flat vector (the sharded operator of :mod:`~phasewatch.record.curvature_fsdp`
        sums it over the ranks' shards, so every scalar of the step rule is global)."""
        return float(torch.linalg.vector_norm(x))


    def _gradient_at(self, delta: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(∇L, L) at θ + delta (delta flat float64, or None for θ); θ is restored bit-exactly."""
        out = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        loss_sum = 0.0
        try:
            if delta is not None:
                # through .data: the parameters' version counters stay as they are, so a graph kept
                # elsewhere (an autograd HessianOperator on the same model) stays valid; it sees θ
                # again, bit for bit, once this returns
                with torch.no_grad():
                    for p, t, d in zip(self.params, self._theta, _unflat_f64(delta, self.params)):
                        p.data.copy_((t.to(torch.float64) + d).to(p.dtype))
            for (inputs, targets), w in zip(self.chunks, self.weights):
                with model_mode(self.model, self.mode), torch.enable_grad(), \
                        seeded_randomness(self.mode, self.seed, self.device):
                    loss = self.loss_fn(self.model(*_as_args(inputs)), targets)
                    if loss.dim() != 0:
                        raise PhasewatchError("loss_fn must return the scalar mean loss of the batch")
                    g = torch.autograd.grad(loss, self.params, allow_unused=True)
                out += w * _flat(g, self.params, torch.float64)
                loss_sum += w * float(loss.detach())
        finally:
            if delta is not None:
                with torch.no_grad():
                    for p, t in zip(self.params, self._theta):
                        p.data.copy_(t)
        self.n_gradients += 1
        return out, loss_sum

    def _central(self, v: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
        """(D, ℓ) for a unit v: the central difference at ε and the measured curvature length."""
        gp, _ = self._gradient_at(eps * v)
        gm, _ = self._gradient_at(-eps * v)
        d = (gp - gm) / (2 * eps)
        second = self._norm(gp - 2 * self.gradient + gm) / eps ** 2
        dn = self._norm(d)
        return d, (dn / second if second > 0 and dn > 0 else math.inf)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v (central difference, step measured as in the class docstring) for a flat vector v;
        float64 on the parameters' device."""
        v = v.to(self.device, torch.float64)
        self.n_matvec += 1
        nv = self._norm(v)
        if nv == 0:
            return torch.zeros_like(v)
        vh = v / nv
        u, eps0 = self.unit_roundoff, self.rel_step * self._scale
        eps = eps0 if self.fixed else self._eps
        d, ell = self._central(vh, eps)
        if not self.fixed:
            best = min(eps0, (3 * u * self._scale * ell ** 2) ** (1 / 3)) if math.isfinite(ell) else eps0
            if eps > 2 * best:
                eps = best
                d, ell = self._central(vh, eps)
                best = min(eps0, (3 * u * self._scale * ell ** 2) ** (1 / 3)) if math.isfinite(ell) else eps0
            self._eps = best
        dn = self._norm(d)
        trunc = eps ** 2 / (6 * ell ** 2) if math.isfinite(ell) else 0.0
        self.error_estimates.append(dn * (trunc + u * self._scale / eps))
        self.steps.append(eps)
        return d * nv

    __call__ = matvec

    def dense(self):
        """The full P×P finite-difference Hessian, symmetrised (P products; small models only)."""
        eye = torch.eye(self.n, dtype=torch.float64, device=self.device)
        h = torch.stack([self.matvec(eye[i]) for i in range(self.n)]).cpu().numpy()
        return (h + h.T) / 2


def _unflat_f64(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, o = [], 0
    for p in like:
        n = p.numel()
        out.append(v[o: o + n].view(p.shape))
        o += n
    return out
