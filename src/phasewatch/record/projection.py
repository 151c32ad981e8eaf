"""Seeded random-sign fold: a one-pass Johnson–Lindenstrauss projection of a parameter tensor.

fold(x)[i] = Σ_{k : k mod d = i} s_k x_k, with s_k ∈ {−1, +1} i.i.d. from a seeded generator.

For vectors a, b of length n > d, ⟨fold(a), fold(b)⟩ is an unbiased estimate of ⟨a, b⟩ (the
cross terms s_k s_l, k ≠ l, have mean zero); for a dense vector spread over its coordinates the
relative error of ‖fold(a)‖² is about √(2/d).  It is the "sparse sign" projection with one
non-zero per column (Kane & Nelson, JACM 61(1), 2014; Weinberger et al., "Feature hashing", ICML
2009) with blocks of consecutive coordinates instead of hashed buckets, so it costs one
multiply-add pass over the tensor and no index arrays.  The projection is linear, so folding θ_t
and differencing gives the fold of the update u_t = θ_t − θ_{t−1}: the recorder folds θ_t itself
with :func:`fold_float64` (one read of the parameters a step, no copy of θ, no full-size difference),
whose float64 sums keep the difference's precision (the error bound is in its docstring).
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


def fold_chunk_rows(d: int, device: torch.device) -> int:
    """Rows c of the (m, d) view that :func:`fold_float64` multiplies at a time: a float64 scratch
    of c·d elements, 2^16 (512 KiB: stays in a core's L2; 1.4x faster than 2 MiB on a 4.2M-element
    tensor at d = 8192, one thread) on the CPU, 2^21 (16 MiB: few kernel launches) on an accelerator."""
    return max(1, (1 << (16 if torch.device(device).type == "cpu" else 21)) // int(d))


def fold_float64(x: torch.Tensor, signs: torch.Tensor, d: int, out: torch.Tensor,
                 buf: torch.Tensor) -> torch.Tensor:
    """fold(x) into ``out`` (d,) float64, with every product x_k·s_k exact and every sum in float64.

    The flat tensor is viewed as (m, d), m = ⌊n/d⌋, plus a tail of n − m·d < d elements.  ``buf``
    (c + 1, d) float64 is scratch: c rows at a time are multiplied by their signs into ``buf[:c]``
    (exact: s = ±1, and a cast to float64 is exact from every float dtype), summed over the rows into
    ``buf[c]`` and added to ``out``.  One read of x and of the signs; nothing of x's size is allocated.

    Error (recursive summation, any order: Higham, *Accuracy and Stability of Numerical Algorithms*,
    2nd ed., §4.2; γ_L = L·u/(1 − L·u), u = 2^−53): each coordinate is a sum of at most c terms per
    chunk (min(c, m)), then of ⌈m/c⌉ chunk sums and one tail element, so

        |out_i − fold(x)_i| ≤ γ_L · Σ_{k ≡ i mod d} |x_k|,   L = min(c, m) + ⌈m/c⌉.

    The difference of two such folds, out(θ_t) − out(θ_{t−1}) (one more rounding, ≤ u·|result|),
    is fold(u_t) within γ_L·Σ_{k ≡ i}(|θ_{t,k}| + |θ_{t−1,k}|) + u·|fold(u_t)_i|: relative to the
    update, ~L·u·‖θ‖/‖u‖ (1e−9 for L = 48, ‖θ‖/‖u‖ = 1e5), where a float32 fold of θ would lose
    ~√m·2^−24·‖θ‖/‖u‖ (all of it)."""
    flat, sg = x.reshape(-1), signs.reshape(-1)
    n = flat.numel()
    m = n // d
    c = buf.shape[0] - 1
    acc = buf[c]
    out.zero_()
    if m:
        rows, srows = flat[: m * d].view(m, d), sg[: m * d].view(m, d)
        for r in range(0, m, c):
            h = min(c, m - r)
            chunk = buf[:h]
            torch.mul(rows[r: r + h], srows[r: r + h], out=chunk)
            torch.sum(chunk, dim=0, out=acc)
            out.add_(acc)
    if m * d < n:
        torch.mul(flat[m * d:], sg[m * d:], out=acc[: n - m * d])
        out[: n - m * d] += acc[: n - m * d]
    return out


def fold_error_bound(x_abs_folded: torch.Tensor, n: int, d: int, c: int) -> torch.Tensor:
    """γ_L · Σ_{k ≡ i}|x_k| of :func:`fold_float64`, given the fold of |x| (with signs +1)."""
    m = n // d
    L = min(c, m) + -(-m // c) if m else 1
    u = 2.0 ** -53
    return x_abs_folded * (L * u / (1 - L * u))


def fold_matrix(n: int, d: int, signs: torch.Tensor) -> torch.Tensor:
    """The dense (d, n) matrix of the fold, for tests on small n."""
    m = torch.zeros(d, n, dtype=torch.float64)
    idx = torch.arange(n)
    m[idx % d, idx] = signs.to(torch.float64)
    return m
