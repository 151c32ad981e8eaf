"""Lanczos with full reorthogonalisation: the extreme eigenvalues of a symmetric operator.

The Lanczos process with full reorthogonalisation, stopped on the Ritz residual ‖Hy − θy‖ ≤ tol·|θ|
(Parlett, *The Symmetric Eigenvalue Problem*, ch. 13; Golub & Van Loan §10.1); the reported
residuals are measured with one more product per eigenpair (Weyl: an eigenvalue lies within the
residual of each Ritz value).  One loop serves one process and vectors sharded over processes
(FSDP2, :mod:`phasewatch.record.curvature_fsdp`): with ``reduce``, every inner product is a local
one summed over the shards, so every process builds the same tridiagonal T_m and takes the same
decisions.  Re-exported by :mod:`phasewatch.record.curvature`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PhasewatchError

Matvec = Callable[[torch.Tensor], torch.Tensor]
#: Sums a small float64 tensor over the shards of the vectors (an all-reduce); None: one process.
Reduce = Callable[[torch.Tensor], torch.Tensor] | None

WHICH = ("LA", "SA", "LM")


def _dot(a: torch.Tensor, b: torch.Tensor, reduce: Reduce) -> float:
    """⟨a, b⟩ over every shard (a local dot product, then ``reduce``)."""
    d = a @ b
    return float(d) if reduce is None else float(reduce(d.reshape(1).to(torch.float64))[0])


def _norm(w: torch.Tensor, reduce: Reduce) -> float:
    """‖w‖ over every shard."""
    if reduce is None:
        return float(torch.linalg.vector_norm(w))
    return math.sqrt(max(_dot(w, w, reduce), 0.0))


@dataclass
class EigenResult:
    """Extreme eigenvalues of a symmetric operator.

    eigenvalues: (k,) in the order asked for (``LA``: descending; ``SA``: ascending; ``LM``: by
        decreasing magnitude).
    residuals: (k,) ‖Hy_i − θ_i y_i‖ for unit Ritz vectors y_i — measured with one product each
        when ``verify`` (default), else the Lanczos estimate β_m|s_{m,i}|.
    n_matvec: operator products used (Hessian-vector products for a Hessian), verification included.
    converged: every wanted residual ≤ tol·|θ_i| (or the Krylov space became invariant).
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    n_matvec: int
    iterations: int
    converged: bool
    which: str
    tol: float
    eigenvectors: torch.Tensor | None = None
    convention: str = "Lanczos with full reorthogonalisation; residual = ||Hy - theta*y||"

    @property
    def lambda_max(self) -> float:
        """The first of the eigenvalues (the largest for ``which="LA"``)."""
        return float(self.eigenvalues[0])

    @property
    def relative_residuals(self) -> np.ndarray:
        """The residuals ÷ |eigenvalue|."""
        return self.residuals / np.maximum(np.abs(self.eigenvalues), np.finfo(float).tiny)


def _pick(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "SA":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def choose_basis_device(basis_device: torch.device | str, dev: torch.device, nbytes: int) -> torch.device:
    """Where the Lanczos basis lives: ``"auto"`` keeps it on ``dev`` unless ``dev`` is a CUDA
    device on which ``nbytes`` exceed half of the free memory (then the host); else as given."""
    if basis_device != "auto":
        return torch.device(basis_device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return dev if nbytes <= free // 2 else torch.device("cpu")
    return dev


def _orthogonalise(w: torch.Tensor, v: torch.Tensor, beta_prev: float,
                   reduce: Reduce = None) -> tuple[torch.Tensor, float, float]:
    """The three-term recurrence w = Aq_j − α_j q_j − β_{j−1} q_{j−1}, then one classical
    Gram–Schmidt pass w ← w − V(Vᵀw) against the whole basis V = [q_0 … q_j] (rows), and a second
    pass only when the first cancelled more than 1/√2 of ‖w‖ (Daniel, Gragg, Kaufman & Stewart
    1976: orthogonality to O(u) either way; "twice is enough").  After the recurrence w is
    orthogonal to V up to rounding, so the second pass is rare; each pass reads the basis twice
    (one GEMV each way), the cost that dominates an iteration beside the product.  The pass's
    correction to α_j is added to it.  ``w`` is updated in place.  Returns (w, α_j, β_j = ‖w‖).
    With ``reduce`` (sharded vectors) every inner product and the projections Vᵀw are summed over
    the shards."""
    q = v[-1].to(w.dtype)  # (a float32 basis: its rows in float64, two P-sized temporaries)
    alpha = _dot(w, q, reduce)
    # in place: a fresh vector per operation costs more than the operation (a P-sized allocation
    # is an mmap + page faults: 0.34 ms for w − αq at P = 55k against 0.01 ms for the dot product)
    w.sub_(q, alpha=alpha)
    if v.shape[0] > 1:
        w.sub_(v[-2].to(w.dtype), alpha=beta_prev)
    beta = _norm(w, reduce)
    for _ in range(2):
        before = beta
        if v.dtype == w.dtype:
            h = torch.mv(v, w)
            if reduce is not None:
                h = reduce(h)
            w.addmv_(v.T, h, alpha=-1)
        else:  # a float32 basis: the projections in its dtype, the work vector kept in float64
            h = torch.mv(v, w.to(v.dtype))
            if reduce is not None:
                h = reduce(h.to(torch.float64)).to(v.dtype)
            w.sub_(torch.mv(v.T, h).to(w.dtype))
            h = h.to(w.dtype)
        alpha += float(h[-1])
        beta = _norm(w, reduce)
        if beta >= 0.7071 * before:
            break
    return w, alpha, beta


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the Lanczos tridiagonal T_m (diagonal α, off-diagonal β), ascending."""
    if len(alphas) == 1:
        return np.asarray(alphas, dtype=float), np.ones((1, 1))
    from scipy.linalg import eigh_tridiagonal

    return eigh_tridiagonal(np.asarray(alphas, dtype=float), np.asarray(betas, dtype=float))


def _basis_rows(n: int, k: int, which: str, max_iter: int | None, memory_budget: int,
                basis_dtype: torch.dtype, width: int | None = None) -> tuple[int, int]:
    """Check :func:`lanczos`'s arguments; the basis dtype's itemsize s and the rows the basis may
    have, m_max = min(n, max_iter, max(k + 10, memory_budget // (s·width))) (its memory model;
    ``width`` the basis rows' length, this process's shard, default n)."""
    if which not in WHICH:
        raise PhasewatchError(f"which={which!r}: use one of {', '.join(WHICH)}")
    if k < 1 or k > n:
        raise PhasewatchError(f"k={k}: need 1 <= k <= n={n}")
    if basis_dtype not in (torch.float64, torch.float32):
        raise PhasewatchError(f"basis_dtype={basis_dtype}: use torch.float64 or torch.float32")
    size = torch.empty((), dtype=basis_dtype).element_size()
    m_max = int(min(n, max_iter or max(100, 20 * k), max(k + 10, memory_budget // (size * (width or n)))))
    if m_max < k:
        raise PhasewatchError(f"max_iter={max_iter} < k={k}")
    return size, m_max


def _ritz_vectors(basis: torch.Tensor, s: np.ndarray, dev: torch.device, reduce: Reduce = None) -> torch.Tensor:
    """The unit Ritz vectors y_i = V_m s_i (k, n), float64 on ``dev``, from the m basis rows V_m
    (in their own dtype, on their device) and the chosen eigenvectors s (m, k) of T_m."""
    coeff = torch.as_tensor(s, dtype=torch.float64, device=basis.device)  # (m, k)
    vecs = (basis.T @ coeff.to(basis.dtype)).T.to(torch.float64)  # (k, n)
    if reduce is None:
        return (vecs / torch.linalg.vector_norm(vecs, dim=1, keepdim=True)).to(dev)
    norms = reduce((vecs * vecs).sum(dim=1)).clamp_min(0).sqrt()
    return (vecs / norms[:, None].to(vecs.device)).to(dev)


def _true_residuals(matvec: Matvec, vals: np.ndarray, vecs: torch.Tensor, dev: torch.device,
                    reduce: Reduce = None) -> np.ndarray:
    """The measured residuals ‖A y_i − θ_i y_i‖ of the Ritz pairs, one product each."""
    res = np.empty(len(vals))
    for i in range(len(vals)):
        r = matvec(vecs[i]).to(dev, torch.float64) - float(vals[i]) * vecs[i]
        res[i] = _norm(r, reduce)
    return res


def lanczos(
    matvec: Matvec,
    n: int,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_iter: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    verify: bool = True,
    return_vectors: bool = False,
    memory_budget: int = 2 << 30,
    basis_device: torch.device | str = "auto",
    basis_dtype: torch.dtype = torch.float64,
    reduce: Reduce = None,
) -> EigenResult:
    """The k extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Each iteration: w = Aq_j − α_j q_j − β_{j−1} q_{j−1}, then w is orthogonalised against every
    Lanczos vector so far by classical Gram–Schmidt, a second pass when the first cancelled much
    (:func:`_orthogonalise`), β_j = ‖w‖.  After every iteration the
    tridiagonal T_m is diagonalised (O(m²), negligible) and the Ritz
    residual estimates β_m |s_{m,i}| of the wanted Ritz values θ_i are compared with tol·|θ_i|.
    Convergence to an eigenvalue error ≤ residual (Weyl) and ≤ residual²/gap (Kato–Temple).

    Parameters: ``which`` ∈ {"LA" largest algebraic (default), "SA" smallest algebraic, "LM"
    largest magnitude}; ``max_iter`` Lanczos vectors kept (default min(n, max(100, 20k)); the
    basis costs max_iter·n float64, capped by ``memory_budget`` bytes (2 GiB: ~2.7e6 parameters
    at 100 vectors); a run that hits the cap unconverged says so in ``converged``); ``verify``
    measures the true residuals with k extra products.

    Memory model (P = n, m = the number of basis vectors, s = ``basis_dtype``'s itemsize, 8 for
    float64, i = the parameters' itemsize): the basis is m·P·s bytes, m ≤ m_max = min(P, max_iter,
    max(k + 10, memory_budget // (s·P))) rows, allocated at once but paged in row by row as the
    iteration fills them (resident: m·P·s after m iterations); two float64 work vectors (16·P);
    the Ritz vectors and the verification's residual at the end (8·(k + 1)·P).  With the basis on
    the host and the operator on a device, one more float64 device vector (8·P) carries q_j to the
    product.  A :class:`HessianOperator` keeps, per probe, the gradient graph (about one backward's
    activations plus the gradients, i·P) and the flat float64 gradient (8·P); one product then
    costs the double backward's own transients, its input cast to the parameters' dtype and its
    output (2·i·P) and the float64 flat copy (8·P).  Measured (``benchmarks/curvature_memory.py``,
    float32 tanh MLP, P = 12.0M, batch 32, m = 20, peak RSS growth per phase): the operator
    232 MiB (20 B/P), one product's peak 27 B/P, Lanczos 2485 MiB against the model's 2518 MiB
    (float64 basis 1837 MiB), the whole probe 237 B/P; with a float32 basis Lanczos 1565 MiB
    (model 1600), 157 B/P.  So a probe's peak is ≈ graph +
    (m·s + 16 + 8(k + 1) + 8 + product)·P bytes, dominated by m·s·P.  ``basis_device``:
    ``"auto"`` (the work vectors' device when the basis fits in half of the device's free memory,
    for CUDA by ``torch.cuda.mem_get_info``; else the host), ``"cpu"`` or a device.
    ``basis_dtype``: float64 (default; orthogonality to ~1e-16) or float32 (half the memory;
    orthogonality to ~1e-7, which bounds the eigenvalues' relative accuracy by about m·2⁻²⁴).
    ``reduce``: vectors sharded over processes — ``v0`` (required) is this process's shard, ``n``
    the global dimension, and ``reduce`` sums a small float64 tensor over the shards (an
    all-reduce); the eigenvalues, residuals and decisions are then the same on every process and
    ``eigenvectors`` are this process's shards.
    """
    if reduce is not None and v0 is None:
        raise PhasewatchError("lanczos(reduce=...): pass v0, this process's shard of the start vector")
    width = n if v0 is None else v0.numel()
    size, m_max = _basis_rows(n, k, which, max_iter, memory_budget, basis_dtype, width)
    dev = torch.device(device) if device is not None else (v0.device if v0 is not None else torch.device("cpu"))
    bdev = choose_basis_device(basis_device, dev, m_max * width * size)
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(dev)
    q = v0.to(bdev, torch.float64)
    q = q / (torch.linalg.vector_norm(q) if reduce is None else _norm(q, reduce))
    basis = torch.empty((m_max, width), dtype=basis_dtype, device=bdev)
    basis[0] = q
    # two work vectors, reused: the product is copied into w (the operator may return a view of its
    # own state, and keeps its input: it gets a copy of q_j, never the basis row itself)
    w = torch.empty(width, dtype=torch.float64, device=bdev)
    q = torch.empty(width, dtype=torch.float64, device=bdev)
    alphas: list[float] = []
    betas: list[float] = []
    n_mv = 0
    converged = False
    theta = s = idx = None
    beta = 0.0
    m = 0
    for j in range(m_max):
        q.copy_(basis[j])
        w.copy_(matvec(q if bdev == dev else q.to(dev)))
        n_mv += 1
        w, a, beta = _orthogonalise(w, basis[: j + 1], betas[-1] if betas else 0.0, reduce)
        alphas.append(a)
        m = j + 1
        theta, s = _tridiagonal_eigh(alphas, betas)
        scale = max(np.abs(theta).max(), np.finfo(float).tiny)
        invariant = beta <= 1e-13 * scale
        if m >= k:
            idx = _pick(theta, k, which)
            est = beta * np.abs(s[-1, idx])
            if invariant or np.all(est <= tol * np.maximum(np.abs(theta[idx]), 1e-300)):
                converged = True
                break
        if invariant:  # the Krylov space is exhausted before k values: restart is not supported
            break
        if j + 1 < m_max:
            betas.append(beta)
            basis[j + 1].copy_(w.div_(beta))
    idx = _pick(theta, min(k, m), which)
    vals = theta[idx]
    vecs = _ritz_vectors(basis[:m], s[:, idx], dev, reduce)
    if verify:
        res = _true_residuals(matvec, vals, vecs, dev, reduce)
        n_mv += len(vals)
        if converged and not invariant:
            # the estimate can be optimistic in finite precision: trust the measurement
            converged = bool(np.all(res <= max(10 * tol, 1e-12) * np.maximum(np.abs(vals), 1e-300)))
    else:
        res = beta * np.abs(s[-1, idx])
    return EigenResult(eigenvalues=np.asarray(vals, dtype=float), residuals=res, n_matvec=n_mv,
                       iterations=m, converged=converged, which=which, tol=tol,
                       eigenvectors=vecs if return_vectors else None)
