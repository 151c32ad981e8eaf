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
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for t, p in zip(tensors, like)])


def _unflat(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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


def double_differentiable_attention() -> contextlib.AbstractContextManager:
    """A context in which ``torch.nn.functional.scaled_dot_product_attention`` (what HF models,
    nanoGPT and ``nn.MultiheadAttention`` call) uses the math backend, whose graph is made of
    elementary ops and so has a double backward.  Only the probe's own forward/backward run in
    it: the graph records the backend chosen at forward time.  A torch without
    ``torch.nn.attention`` (< 2.3) gets a no-op context."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


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
    differences of two ordinary gradients: no kept graph, no double backward, any kernel.

    The step.  With unit-norm v̂ and the gradient evaluated in unit roundoff u (u = 2⁻²⁴ float32,
    2⁻⁵³ float64), the error of one product has two parts:

    * truncation (Taylor): (g(θ+εv̂) − g(θ−εv̂))/(2ε) − Hv̂ = (ε²/6)·∇³g[v̂, v̂, v̂] + O(ε⁴), so
      ≤ ε²·T₃/6 with T₃ = ‖∇³L[v̂, v̂]‖ (the change of Hv̂ along v̂ per unit step);
    * rounding: θ ± εv̂ is rounded to the parameters' dtype (a perturbation error ≤ u‖θ‖, which H
      maps to ≤ u‖H‖‖θ‖) and each gradient carries its own rounding error δg; divided by 2ε:
      ≤ (u‖H‖‖θ‖ + δg)/ε.

    E(ε) = ε²T₃/6 + R/ε, R = u‖H‖‖θ‖ + δg, is smallest at ε* = (3R/T₃)^{1/3}.  Neither T₃ nor R is
    known before the probe; on the scale assumption that the curvature changes by O(1) relative
    over a step of the size of θ (T₃ ≈ ‖H‖/‖θ‖) and δg ≲ u‖H‖‖θ‖, ε* ≈ (3u)^{1/3}‖θ‖, and we take
    ``ε = rel_step · max(‖θ‖, 1) / ‖v‖`` with ``rel_step = u^{1/3}`` (6.1e-6 float64, 4.9e-3
    float32); the relative error left is then ~ u^{2/3} (4e-11 float64, 2.4e-5 float32).  The
    bound above is what the tests check, with T₃ and δg measured.

    Parameters are perturbed in place (so any module works, wrapped or hooked) and copied back
    from a saved clone after every gradient (bit-exact, never θ + εv − εv).  Buffers (BatchNorm
    running statistics) are restored after every forward, as the autograd route leaves them.  In
    train mode the random number generator is reset to ``seed`` before every forward, so each
    gradient sees the same dropout mask (the operator stays symmetric up to the error above).
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
        self.rel_step = float(rel_step) if rel_step is not None else self.unit_roundoff ** (1.0 / 3.0)
        self._theta = [p.detach().clone() for p in self.params]
        self.theta_norm = math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in self._theta))
        self.n_matvec = 0
        self.n_gradients = 0
        self._at_theta: tuple[torch.Tensor, float] | None = None

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

    def step(self, v: torch.Tensor) -> float:
        """ε for a product with v: rel_step · max(‖θ‖, 1) / ‖v‖."""
        return self.rel_step * max(self.theta_norm, 1.0) / float(torch.linalg.vector_norm(v))

    def _rng(self) -> contextlib.AbstractContextManager:
        devs = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devs) if self.mode == "train" else contextlib.nullcontext()

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
                with model_mode(self.model, self.mode), torch.enable_grad(), self._rng():
                    if self.mode == "train":
                        torch.manual_seed(self.seed)
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

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v (central difference) for a flat vector v; float64 on the parameters' device."""
        v = v.to(self.device, torch.float64)
        self.n_matvec += 1
        if not bool(torch.any(v != 0)):
            return torch.zeros_like(v)
        eps = self.step(v)
        gp, _ = self._gradient_at(eps * v)
        gm, _ = self._gradient_at(-eps * v)
        return (gp - gm) / (2 * eps)

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
