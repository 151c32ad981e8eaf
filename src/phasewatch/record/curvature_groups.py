"""Per-group curvature: λ_max of the Hessian's diagonal block of each layer group.

For a group g of parameters (a set of coordinates S_g of θ), the block H_gg = [∇²L]_{S_g,S_g} is
the Hessian of L as a function of θ_g alone, the other parameters held fixed.  Its largest
eigenvalue is the sharpness of the loss along directions that move only that group (the
quantity per-layer learning-rate rules and per-layer edge-of-stability analyses compare with
2/η_g).  By Cauchy interlacing λ_min(H) ≤ λ_max(H_gg) ≤ λ_max(H).

A product H_gg v_g is one product of the full operator: v = (v_g on S_g, 0 elsewhere), then the
S_g block of Hv (:class:`BlockOperator`), so every route (double backward, finite differences,
the all-reduced DDP operator) serves it unchanged; Lanczos then runs in the group's P_g
coordinates (a basis of m·P_g floats).  Cost: one full HVP per Lanczos iteration per group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def group_segments(params: Sequence[torch.Tensor], members: Sequence[int]) -> list[tuple[int, int]]:
    """The (start, stop) ranges, in the flat vector of ``params``, of the tensors ``members``."""
    offsets = np.concatenate([[0], np.cumsum([p.numel() for p in params])])
    return [(int(offsets[i]), int(offsets[i + 1])) for i in sorted(members)]


class BlockOperator:
    """v_g ↦ (H [v_g; 0])_g, the diagonal block of ``op`` on the coordinates ``segments``."""

    def __init__(self, op: Any, segments: Sequence[tuple[int, int]]):
        self.op, self.segments = op, list(segments)
        self.n = sum(b - a for a, b in self.segments)
        self.device = op.device
        self.route = op.route
        self.noise_floor = getattr(op, "noise_floor", 0.0)
        self.n_matvec = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H_gg v_g for a flat vector of the group's P_g coordinates (float64)."""
        full = torch.zeros(self.op.n, dtype=torch.float64, device=self.device)
        o = 0
        v = v.to(self.device, torch.float64)
        for a, b in self.segments:
            full[a:b] = v[o: o + b - a]
            o += b - a
        hv = self.op.matvec(full).to(self.device, torch.float64)
        self.n_matvec += 1
        return torch.cat([hv[a:b] for a, b in self.segments])

    __call__ = matvec


def group_lambdas(op: Any, params: Sequence[torch.Tensor], groups: Sequence[Sequence[int] | None],
                  eigen: Callable[[Any, int], Any], seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """λ_max of each group's block, its measured Ritz residual and the products spent.

    groups: per group the indices (into ``params``) of its tensors, or None for a group not asked
    for (NaN).  eigen(block_operator, seed) → an :class:`~phasewatch.record.curvature.EigenResult`
    (the probe's Lanczos settings); group i is seeded with ``seed + 10 + i``."""
    vals = np.full(len(groups), np.nan)
    res = np.full(len(groups), np.nan)
    used = 0
    for i, members in enumerate(groups):
        if not members:
            continue
        block = BlockOperator(op, group_segments(params, members))
        eig = eigen(block, seed + 10 + i)
        used += eig.n_matvec
        vals[i], res[i] = float(eig.eigenvalues[0]), float(eig.residuals[0])
    return vals, res, used
