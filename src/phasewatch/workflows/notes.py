"""The framework notes' own measurement protocol for claims 4-9: C from 20 minibatch gradients.

The notes (000-004) estimate the consolidation ratio at a point θ from ``n = 20`` minibatch
gradients ``g^(i)`` (each the mean over ``b`` training examples): ``A = ||mean_i g^(i)||^2``,
``T = sum over coordinates of the unbiased (n-1) sample variance`` and ``C = A / T``,
``p = C / (1 + C)``.  That is :func:`phasewatch.consolidation_ratio` with ``variant="naive"`` on
the ``(n, P)`` sample matrix (the notes add 1e-10 to ``T``, which changes nothing here); ours is
``variant="canonical"``, ``C_b = (A - T/n) / T`` (the ``1/n`` bias removed, clipped at 0).

:func:`minibatch_gradients` draws the samples (torch), :func:`notes_ratio` turns them into both
readings, and :func:`train_modular` is the notes' grokking toy (modular addition, minibatch
training, C measured every ``measure_every`` steps) shared by claims 4, 8 and 9.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..analysis.consolidation import consolidation_ratio
from ..analysis.hill_kernel import hill_top, top_order_statistics

__all__ = ["N_SAMPLES", "MODULAR", "minibatch_gradients", "notes_ratio", "hill_alpha_notes", "train_modular",
           "modular_runs", "modular_setup"]

#: the notes' number of minibatch gradients per measurement
N_SAMPLES = 20


def minibatch_gradients(model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        x: torch.Tensor, y: torch.Tensor, batch_size: int, n_samples: int = N_SAMPLES,
                        generator: torch.Generator | None = None,
                        params: list[torch.Tensor] | None = None,
                        mask: list[torch.Tensor] | None = None) -> np.ndarray:
    """``(n_samples, P)`` float64 matrix of minibatch gradients at the model's current θ.

    Each row is the gradient of ``loss_fn(model(x_B), y_B)`` (a mean over the batch) for a batch
    ``B`` of ``batch_size`` training examples drawn without replacement (independently per row).
    ``params``: the parameters differentiated (default all); ``mask``: per-parameter 0/1 tensors,
    only the coordinates where the mask is 1 are kept (pruned networks)."""
    params = list(model.parameters()) if params is None else list(params)
    rows = []
    n = x.shape[0]
    for _ in range(int(n_samples)):
        idx = torch.randperm(n, generator=generator)[: int(batch_size)]
        loss = loss_fn(model(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        parts = []
        for j, (g, p) in enumerate(zip(grads, params)):
            g = torch.zeros_like(p) if g is None else g
            parts.append(g.detach().reshape(-1) if mask is None else g.detach()[mask[j].bool()].reshape(-1))
        rows.append(torch.cat(parts).double())
    return torch.stack(rows).numpy()


def notes_ratio(G: np.ndarray, b: float = 1) -> dict[str, float]:
    """The notes' C and p (``naive``: ``||mean||^2 / sum of unbiased variances``) and ours
    (``canonical``) on the ``(n, P)`` gradient samples ``G``, each a mean over ``b`` examples."""
    nv = consolidation_ratio(G, b=b, variant="naive", ci="none")
    cn = consolidation_ratio(G, b=b, variant="canonical", ci="none")
    return {"C_notes": float(nv.C), "p_notes": float(nv.p), "C_ours": float(cn.C), "p_ours": float(cn.p)}


def hill_alpha_notes(values: np.ndarray, k: int = 100) -> float:
    """The notes' tail index of ``|values|``: Hill's ``k / Σ_{i≤k} ln(x_(i) / x_(k+1))`` over the top
    ``k`` (the project's one Hill kernel, :func:`~phasewatch.analysis.hill_kernel.hill_top`),
    clipped to [1, 2] (the notes' clip).  NaN with fewer than ``k + 1`` values, a non-positive
    threshold, or a tail the kernel refuses as tied (an atom)."""
    a = np.abs(np.asarray(values, float).ravel())
    if a.size <= k:
        return float("nan")
    alpha = float(hill_top(top_order_statistics(a, k)).alpha)
    return float(np.clip(alpha, 1.0, 2.0)) if np.isfinite(alpha) else float("nan")


def train_modular(*, p: int = 71, width: int = 512, steps: int = 600, batch_size: int = 256, lr: float = 1e-3,
                  weight_decay: float = 2e-4, train_fraction: float = 0.4, seed: int = 0,
                  measure_every: int = 10, n_samples: int = N_SAMPLES) -> dict[str, Any]:
    """Minibatch training of the demo model on (a+b) mod p, the notes' C measured along the way.

    Model and data: :class:`~phasewatch.workflows.demo.QuadraticMLP` (demo init) on
    :func:`~phasewatch.workflows.demo.modular_addition`; MSE to the zero-mean one-hot target; Adam
    (coupled L2) on minibatches of ``batch_size`` drawn without replacement each step.  Every
    ``measure_every`` steps: train/test accuracy, ``n_samples`` minibatch gradients of the same
    size (:func:`minibatch_gradients`), the notes' and our C and p, and the notes' tail index of the
    first sample's coordinates.  Returns arrays keyed ``step``, ``train_acc``, ``test_acc``,
    ``C_notes``, ``p_notes``, ``C_ours``, ``p_ours``, ``alpha`` and ``grok_step`` (first measured
    test accuracy ≥ 0.95, or None)."""
    from .demo import QuadraticMLP, modular_addition

    torch.manual_seed(seed)
    data = modular_addition(p, train_fraction, seed)
    model = QuadraticMLP(p, width, torch.Generator().manual_seed(seed + 1))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    target = torch.nn.functional.one_hot(data.train_y, p).float() - 1.0 / p
    gen = torch.Generator().manual_seed(seed + 7)

    def loss_fn(out, t):
        return ((out - t) ** 2).sum(-1).mean()

    keys = ("step", "train_acc", "test_acc", "C_notes", "p_notes", "C_ours", "p_ours", "alpha")
    log: dict[str, list] = {k: [] for k in keys}
    n = data.train_x.shape[0]
    for step in range(steps + 1):
        if step % measure_every == 0:
            with torch.no_grad():
                tr = (model(data.train_x).argmax(1) == data.train_y).float().mean().item()
                te = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
            G = minibatch_gradients(model, loss_fn, data.train_x, target, batch_size, n_samples, gen)
            r = notes_ratio(G, b=batch_size)
            for k, v in zip(keys, (step, tr, te, r["C_notes"], r["p_notes"], r["C_ours"], r["p_ours"],
                                   hill_alpha_notes(G[0]))):
                log[k].append(v)
        if step == steps:
            break
        idx = torch.randperm(n, generator=gen)[:batch_size]
        opt.zero_grad()
        loss_fn(model(data.train_x[idx]), target[idx]).backward()
        opt.step()
    out = {k: np.asarray(v, float) for k, v in log.items()}
    hit = np.flatnonzero(out["test_acc"] >= 0.95)
    out["grok_step"] = float(out["step"][hit[0]]) if hit.size else None
    return out


#: The notes' grokking toy as run here (full and quick): minibatch Adam on (a+b) mod 71.  The notes
#: leave the task size, model, batch and length unstated; these are our choices (the demo model
#: groks at step ~600 with minibatches of 256; quick: CI-sized, it does not grok).
MODULAR = {
    False: {"p": 71, "width": 512, "steps": 700, "batch_size": 256, "lr": 1e-3, "weight_decay": 2e-4,
            "seeds": [0, 1], "measure_every": 10},
    True: {"p": 31, "width": 64, "steps": 60, "batch_size": 64, "lr": 1e-3, "weight_decay": 2e-4,
           "seeds": [0], "measure_every": 10},
}


def modular_runs(out_dir, quick: bool) -> list[dict[str, Any]]:
    """Record (or reuse) the notes-protocol grokking runs of :data:`MODULAR`, with weight decay and
    without; each run's arrays (:func:`train_modular`) are under the key ``log``."""
    import json
    from pathlib import Path

    from .claims import cached_runs

    cfg = dict(MODULAR[bool(quick)])

    def train(path, weight_decay, seed):
        kw = {k: cfg[k] for k in ("p", "width", "steps", "batch_size", "lr", "measure_every")}
        r = train_modular(weight_decay=weight_decay, seed=seed, **kw)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "log.npz", **{k: v for k, v in r.items() if k != "grok_step"})
        (path / "meta.json").write_text(json.dumps({"weight_decay": weight_decay, "seed": seed, **kw}))
        return {"grok_step": r["grok_step"], "final_test_acc": float(r["test_acc"][-1])}

    runs = cached_runs(out_dir, "notes-modular", cfg, train)
    for r in runs:
        with np.load(Path(r["path"]) / "log.npz") as z:
            r["log"] = {k: z[k] for k in z.files}
    return runs


def modular_setup(quick: bool) -> str:
    """One sentence describing :data:`MODULAR` for the tables."""
    c = MODULAR[bool(quick)]
    return (f"the notes' grokking toy as we read it: demo model (x W)^2 V on (a+b) mod {c['p']} (40% train), "
            f"width {c['width']}, Adam (coupled L2) lr {c['lr']:g}, minibatches of {c['batch_size']}, "
            f"{c['steps']} steps, weight decay {c['weight_decay']:g} ({len(c['seeds'])} seed(s)) vs 0; every "
            f"{c['measure_every']} steps the notes' estimator: {N_SAMPLES} minibatch gradients of "
            f"{c['batch_size']}, C = ||mean||²/Σ var (n−1), p = C/(1+C) (naive), and ours (canonical)")
