"""Empirical NTK Gram (torch.func) on a fixed probe set (DEFINITIONS §5).

:func:`ntk_gram` — K = J Jᵀ / n on n inputs, by Jacobian contraction or by NTK-vector products
(Novak et al. 2022, "Fast finite width neural tangent kernel"), ``method="auto"`` timing both once
and keeping the faster (:func:`choose_ntk_method`).  Attention runs inside
:func:`~phasewatch.record.hvp.double_differentiable_attention`: the fused kernels have neither a
double backward nor forward-mode AD.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import PhasewatchError
from .hvp import _as_args, double_differentiable_attention, model_mode


@dataclass
class NTKResult:
    """Empirical NTK Gram on a fixed probe set.

    gram: (m, m) float64; m = n (``outputs="trace"``: K_ij = Σ_a ⟨∂f_a(x_i), ∂f_a(x_j)⟩ / n) or
    n·c (``outputs="full"``: one row per (input, output) pair, input-major), divided by n.
    """

    gram: np.ndarray
    method: str
    outputs: str
    n_inputs: int
    n_outputs: int
    seconds: float


def _functional(model: torch.nn.Module, params: dict[str, torch.Tensor]):
    from torch.func import functional_call

    buffers = dict(model.named_buffers())

    def f(p: dict[str, torch.Tensor], *x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), x)
        return out.reshape(out.shape[0], -1)

    return f


def _ntk_jacobian(f, params, x, outputs: str) -> torch.Tensor:
    from torch.func import jacrev, vmap

    def single(p, *xi):
        return f(p, *[t.unsqueeze(0) for t in xi]).squeeze(0)

    jac = vmap(jacrev(single), (None, *([0] * len(x))))(params, *x)  # name -> (n, c, *shape)
    total = None
    for j in jac.values():
        jj = j.reshape(j.shape[0], j.shape[1], -1)
        term = (torch.einsum("naf,maf->nm", jj, jj) if outputs == "trace"
                else torch.einsum("naf,mbf->namb", jj, jj))
        total = term if total is None else total + term
    return total


def _ntk_vp(f, params, x, outputs: str) -> torch.Tensor:
    from torch.func import jvp, vjp, vmap

    def fx(p):
        return f(p, *x)

    out, vjp_fn = vjp(fx, params)
    n, c = out.shape

    def column(vec):  # vec (n, c) → K·vec as (n, c): J (Jᵀ vec)
        (ct,) = vjp_fn(vec)
        return jvp(fx, (params,), (ct,))[1]

    basis = torch.eye(n * c, dtype=out.dtype, device=out.device).reshape(n * c, n, c)
    cols = vmap(column)(basis)  # (n*c, n, c): cols[j b] = K[:, :, j, b]
    full = cols.reshape(n, c, n, c).permute(2, 3, 0, 1)  # [i a, j b]
    if outputs == "trace":
        return torch.einsum("iaja->ij", full)
    return full


def ntk_gram(
    model: torch.nn.Module,
    inputs: Any,
    *,
    outputs: str = "trace",
    method: str = "auto",
    params: Sequence[str] | None = None,
) -> NTKResult:
    """Empirical NTK Gram K = J Jᵀ / n on a fixed probe set of n inputs (DEFINITIONS §5),
    computed in eval mode with ``torch.func`` (buffers passed through).

    outputs: ``"trace"`` (n×n, summed over output coordinates) or ``"full"`` ((n·c)×(n·c)).
    method: ``"jacobian"`` (per-example Jacobians by vmap(jacrev), then contraction: memory n·c·P),
        ``"ntk_vp"`` (NTK-vector products J(Jᵀv), one per basis vector: memory ~P per product),
        or ``"auto"`` (:func:`choose_ntk_method`: timed on a few inputs, extrapolated to n; the
        choice is reported).
    """
    if outputs not in ("trace", "full"):
        raise PhasewatchError(f"outputs={outputs!r}: use 'trace' or 'full'")
    x = tuple(t for t in _as_args(inputs))
    names = [n for n, p in model.named_parameters() if p.requires_grad and (params is None or n in params)]
    pdict = {n: p.detach() for n, p in model.named_parameters() if n in names}
    f = _functional(model, pdict)
    n = x[0].shape[0]
    with model_mode(model, "eval"):
        if method == "auto":
            method = choose_ntk_method(model, x, outputs=outputs, params=params)
        if method not in ("jacobian", "ntk_vp"):
            raise PhasewatchError(f"method={method!r}: use 'jacobian', 'ntk_vp' or 'auto'")
        t0 = time.perf_counter()
        with torch.enable_grad(), double_differentiable_attention():  # forward-mode AD of fused attention: none
            k = (_ntk_jacobian if method == "jacobian" else _ntk_vp)(f, pdict, x, outputs)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            n_out = int(f(pdict, *[t[:1] for t in x]).shape[1])
    k = k.detach().to(torch.float64).cpu()
    c = 1 if outputs == "trace" else k.shape[1]
    if outputs == "full":
        k = k.reshape(n * c, n * c)
    g = k.numpy() / n
    return NTKResult(gram=(g + g.T) / 2, method=method, outputs=outputs, n_inputs=n, n_outputs=n_out, seconds=secs)


def choose_ntk_method(model: torch.nn.Module, inputs: Any, *, outputs: str = "trace",
                      params: Sequence[str] | None = None, n_try: int = 4,
                      jacobian_bytes: float = 2 * 2**30) -> str:
    """The faster NTK method for all n inputs, from timing both on ``m = min(n, n_try)`` of them.

    The two scale differently, so the timings are extrapolated, not compared as measured: the
    Jacobian route costs ~n (one Jacobian per input; its n²·c²·P contraction is a GEMM, cheap
    beside it), the NTK-vector-product route ~n² (n products, each a pass over all n inputs).
    Compared raw on 2 inputs the ``ntk_vp`` route looks faster than it is (a probe of 64 inputs
    took 3.0 s by ``ntk_vp`` and 1.4 s by ``jacobian``).  ``jacobian`` is ruled out when its
    Jacobians (n·c·P floats) would exceed ``jacobian_bytes``."""
    args = _as_args(inputs)
    n = int(args[0].shape[0])
    m = max(1, min(n, n_try))
    x = tuple(t[:m] for t in args)
    pdict = {k: p.detach() for k, p in model.named_parameters()
             if p.requires_grad and (params is None or k in params)}
    f = _functional(model, pdict)
    n_par = sum(p.numel() for p in pdict.values())
    est: dict[str, float] = {}
    with model_mode(model, "eval"):
        with torch.no_grad():
            c = int(f(pdict, *[t[:1] for t in x]).reshape(1, -1).shape[1])
        elem = next(iter(pdict.values())).element_size() if pdict else 4
        for name, fn, power in (("jacobian", _ntk_jacobian, 1), ("ntk_vp", _ntk_vp, 2)):
            if name == "jacobian" and n * c * n_par * elem > jacobian_bytes:
                continue
            try:
                with torch.enable_grad(), double_differentiable_attention():
                    fn(f, pdict, x, outputs)  # warm-up
                    t0 = time.perf_counter()
                    fn(f, pdict, x, outputs)
                est[name] = (time.perf_counter() - t0) * (n / m) ** power
            except (RuntimeError, MemoryError):
                continue
    return min(est, key=est.get) if est else "ntk_vp"
