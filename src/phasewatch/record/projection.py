"""Seeded random-sign fold: a one-pass Johnson–Lindenstrauss projection of a parameter tensor.

fold(x)[i] = Σ_{k : k mod d = i} s_k x_k, with s_k ∈ {−1, +1} i.i.d. from a seeded generator.

For vectors a, b of length n > d, ⟨fold(a), fold(b)⟩ is an unbiased estimate of ⟨a, b⟩ (the
cross terms s_k s_l, k ≠ l, have mean zero); for a dense vector spread over its coordinates the
relative error of ‖fold(a)‖² is about √(2/d).  It is the "sparse sign" projection with one
non-zero per column (Kane & Nelson, JACM 61(1), 2014; Weinberger et al., "Feature hashing", ICML
2009) with blocks of consecutive coordinates instead of hashed buckets, so it costs one
multiply-add pass over the tensor and no index arrays.  The projection is linear, so folding θ_t
and differencing gives exactly the fold of the update u_t = θ_t − θ_{t−1}.
"""

from __future__ import annotations

import torch


def fold_signs(n: int, seed: int, index: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ±1 signs of one tensor: seeded by (seed, index) so a run is reproducible."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(index) * 7919) & ((1 << 63) - 1))
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).to(dtype) * 2 - 1
    return s.to(device)


def fold(x: torch.Tensor, signs: torch.Tensor, d: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fold a tensor of n elements into d float64 coordinates (see the module docstring)."""
    flat = x.reshape(-1)
    n = flat.numel()
    prod = flat * signs
    full = (n // d) * d
    if out is None:
        out = torch.zeros(d, dtype=torch.float64, device=x.device)
    if full:
        torch.sum(prod[:full].view(-1, d), dim=0, dtype=torch.float64, out=out)
    else:
        out.zero_()
    if full < n:
        out[: n - full] += prod[full:].to(torch.float64)
    return out


def fold_sum(signed: torch.Tensor, d: int, out: torch.Tensor) -> torch.Tensor:
    """Sum an already sign-multiplied flat tensor into ``out`` (d,), blockwise: the fold's second half.

    Accumulates in at least float32 (the float32 rounding, ~1e-7 relative, is far below the
    projection's own √(2/d)); ``out`` is preallocated so the per-step path allocates nothing.
    """
    n = signed.numel()
    full = (n // d) * d
    if full:
        torch.sum(signed[:full].view(-1, d), dim=0, dtype=out.dtype, out=out)
    else:
        out.zero_()
    if full < n:
        out[: n - full] += signed[full:]
    return out


def fold_matrix(n: int, d: int, signs: torch.Tensor) -> torch.Tensor:
    """The dense (d, n) matrix of the fold, for tests on small n."""
    m = torch.zeros(d, n, dtype=torch.float64)
    idx = torch.arange(n)
    m[idx % d, idx] = signs.to(torch.float64)
    return m
