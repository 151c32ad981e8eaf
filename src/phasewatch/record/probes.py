"""Gradient samples for the consolidation ratio (DEFINITIONS §2): per-example gradients on a
probe batch (``torch.func``) and micro-batch gradients of gradient accumulation.

The recorder stores, per measurement, exactly the sufficient statistics of
:func:`phasewatch.analysis.noise.sufficient_statistics` (same formulas as its ``_gram_stats``),
computed here in torch, in float64, on the parameters' device, from the centred n×n Gram matrix
of the samples.  Samples are held as one ``(n, numel)`` tensor per parameter tensor, so the
statistics never need the samples concatenated; memory is n·P values (float64 when computing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import RecorderError

_BN = torch.nn.modules.batchnorm._BatchNorm


def training_batchnorm(model: torch.nn.Module) -> list[str]:
    """Names of BatchNorm modules of ``model`` that are in training mode (they mix examples and
    update running statistics in place, which per-example gradients cannot honour)."""
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, _BN) and m.training]


@torch.no_grad()
def gram_statistics(samples: Sequence[torch.Tensor], group_of: Sequence[int], n_groups: int,
                    n_max: int) -> dict[str, Any] | None:
    """Sufficient statistics of n gradient samples given per parameter tensor as ``(n, numel_i)``.

    Returns a dict of the ``grad_samples`` columns (without step, b, source) as Python floats /
    CPU float64 arrays, or None if fewer than 2 finite samples remain.  Rows with a NaN/Inf in
    any tensor are dropped (as ``noise.sufficient_statistics`` does); ``sample_norms`` keeps them.
    """
    # Everything follows from the raw Gram matrices M_l = G_l G_lᵀ (n × n, float64), one GEMM per
    # tensor: centring is H M H with H = I − 11ᵀ/n, ḡ·ḡ = 1ᵀM1/n², Dḡ = M1/n − 1ᵀM1/n².  A
    # non-finite sample makes its row of M non-finite, which is how it is found and dropped.
    dev = samples[0].device
    n_all = int(samples[0].shape[0])
    Ms = torch.zeros(n_groups, n_all, n_all, dtype=torch.float64, device=dev)
    for s_, gi in zip(samples, group_of):
        g = s_.reshape(n_all, -1).to(torch.float64)
        Ms[gi] += g @ g.T
    return gram_matrix_statistics(Ms, n_max)


@torch.no_grad()
def gram_matrix_statistics(Ms: torch.Tensor, n_max: int) -> dict[str, Any] | None:
    """:func:`gram_statistics` from the per-group raw Gram matrices ``Ms`` (L, n, n), float64,
    ``Ms[l][i, j] = <g_i, g_j>`` restricted to group l (e.g. assembled across DDP ranks)."""
    n_all = int(Ms.shape[1])
    M = Ms.sum(0)
    diag_all = torch.diagonal(M)
    norms = diag_all.clamp_min(0).sqrt()
    ok = torch.isfinite(diag_all)
    if not bool(ok.all()):
        idx = torch.nonzero(ok).reshape(-1)
        Ms = Ms[:, idx][:, :, idx]
        M = Ms.sum(0)
    n = int(M.shape[0])
    if n < 2:
        return None
    r_l = Ms.mean(dim=2)  # (L, n): row means, = G_l ḡ_l
    m_l = r_l.mean(dim=1)  # (L,): ḡ_l · ḡ_l
    layer_A = m_l
    Kl_diag = torch.diagonal(Ms, dim1=1, dim2=2) - 2 * r_l + m_l[:, None]
    layer_T = Kl_diag.sum(dim=1) / (n - 1)
    r, m = r_l.sum(0), m_l.sum()
    K = M - r[:, None] - r[None, :] + m
    v = r - m
    diag = torch.diagonal(K)
    A = layer_A.sum()
    stats = torch.stack([
        A,
        diag.sum() / (n - 1),
        v @ v / (n - 1),
        (K * K).sum() / (n - 1) ** 2,
        (diag * diag).mean(),
        (v * diag).mean(),
    ]).cpu().tolist()
    padded = torch.full((n_max,), float("nan"), dtype=torch.float64)
    k = min(n_max, n_all)
    padded[:k] = norms[:k].cpu()
    return {
        "n": n,
        "mean_sq_norm": stats[0], "trace": stats[1], "quad": stats[2],
        "trace_sq": stats[3], "fourth": stats[4], "third": stats[5],
        "layer_mean_sq_norm": layer_A.cpu().numpy(), "layer_trace": layer_T.cpu().numpy(),
        "sample_norms": padded.numpy(),
    }


def _batch_size(tree: Any) -> int:
    leaves = [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise RecorderError("grad_probe: the inputs hold no tensor; pass (inputs, targets) tensors")
    return int(leaves[0].shape[0])


def _slice(tree: Any, a: int, b: int) -> Any:
    return pytree.tree_map(lambda x: x[a:b] if isinstance(x, torch.Tensor) else x, tree)


def per_example_gradients(
    model: torch.nn.Module,
    names: Sequence[str],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    chunk: int | None = None,
    randomness: str = "different",
) -> list[torch.Tensor]:
    """Per-example gradients ``(n, *shape)`` of the parameters ``names`` at the model's current
    parameters: ``vmap(grad(...))`` of ``functional_call`` over chunks of ``chunk`` examples.

    ``inputs`` is a tensor (or a tuple of positional-argument tensors) with the examples along
    dim 0; ``targets`` likewise (any pytree of tensors).  ``loss_fn(outputs, targets)`` may
    return per-example losses or their mean: on a batch of one both are the example's loss.
    Buffers are passed through unchanged; parameters not in ``names`` are held constant.
    """
    from torch.func import functional_call, grad, vmap

    named = dict(model.named_parameters())
    diff = {n: named[n].detach() for n in names}
    const = {n: p.detach() for n, p in named.items() if n not in diff}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    args_tree = inputs if isinstance(inputs, tuple) else (inputs,)

    def one(d, c, bufs, x, y):
        x1 = pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)
        y1 = pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, y)
        out = functional_call(model, (d, c, bufs), x1)
        return loss_fn(out, y1).sum()

    f = vmap(grad(one), in_dims=(None, None, None, 0, 0), randomness=randomness)
    n = _batch_size(args_tree)
    if _batch_size(targets) != n:
        raise RecorderError(f"grad_probe: inputs have {n} examples but targets {_batch_size(targets)}")
    step = n if not chunk else max(1, int(chunk))
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for a in range(0, n, step):
        g = f(diff, const, buffers, _slice(args_tree, a, a + step), _slice(targets, a, a + step))
        for k in names:
            parts[k].append(g[k].detach())
    return [torch.cat(parts[k]) if len(parts[k]) > 1 else parts[k][0] for k in names]


class MicroBatchCapture:
    """Capture each micro-batch's gradient during gradient accumulation.

    While armed, a ``register_post_accumulate_grad_hook`` on every parameter copies p.grad after
    each backward pass; :meth:`take` returns the differences
    g_i = (p.grad after backward i) − (p.grad after backward i−1) in float64 (exact for the
    difference of two stored values), taking p.grad = 0 before the first backward, i.e. assuming
    the user zeroes gradients after each step.  Armed only for scheduled steps; otherwise no hook
    is installed and nothing costs anything.  An error inside a hook goes to ``on_error`` (the
    recorder's failure policy), never into the user's ``backward()``.
    """

    def __init__(self, params: Sequence[torch.Tensor],
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.params = list(params)
        self.on_error = on_error
        self._handles: list[Any] = []
        self._snaps: list[list[torch.Tensor]] = [[] for _ in self.params]

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self.armed:
            return
        self._snaps = [[] for _ in self.params]
        for i, p in enumerate(self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            try:
                with torch.no_grad():
                    self._snaps[i].append(p.grad.detach().clone())
            except Exception as e:  # noqa: BLE001 - never break the user's backward()
                if self.on_error is None:
                    raise
                self.on_error(e)
        return hook

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def take(self) -> list[torch.Tensor]:
        """Disarm, reset and return per parameter the ``(n_backward, *shape)`` float64 differences
        (an empty list entry if the parameter saw no backward pass)."""
        self.disarm()
        snaps, self._snaps = self._snaps, [[] for _ in self.params]
        out = []
        for s in snaps:
            if not s:
                out.append(torch.empty(0))
                continue
            cum = torch.stack(s).to(torch.float64)
            del s[:]
            diff = cum.clone()
            diff[1:] -= cum[:-1]
            out.append(diff)
        return out
