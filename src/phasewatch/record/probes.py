"""Gradient samples for the consolidation ratio (DEFINITIONS §2): per-example gradients on a
probe batch (``torch.func``) and micro-batch gradients of gradient accumulation.

The recorder stores, per measurement, exactly the sufficient statistics of
:func:`phasewatch.analysis.noise.sufficient_statistics` (same formulas as its ``_gram_stats``),
computed here in torch, in float64, on the parameters' device, from the centred n×n Gram matrix
of the samples.  Samples are held as one ``(n, numel)`` tensor per parameter tensor, so the
statistics never need the samples concatenated; memory is n·P values (float64 when computing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import RecorderError
from .dtensor import local
from .gram import add_gram64

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
        add_gram64(s_.reshape(n_all, -1), Ms[gi])
    return gram_matrix_statistics(Ms, n_max)


def _eigvalsh(K: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of a small symmetric matrix.  On CPU on one intra-op thread: LAPACK's
    threaded tridiagonalisation gains nothing at n ≲ 10³ and collapses when the cores are busy
    (n = 500: 4.5 s on 2 threads vs 0.12 s on one, measured on a loaded 2-core machine)."""
    if K.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.linalg.eigvalsh(K)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(K)
    finally:
        torch.set_num_threads(threads)


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
    # The nonzero eigenvalues of Σ̂ = Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ/(n−1) (P × P) are those of K/(n−1)
    # (n × n): Σ̂ = DᵀD/(n−1) and K = DDᵀ share their nonzero spectrum.  K·1 = 0, so at most n−1
    # are nonzero: the top min(n_max, n−1), descending, clipped at 0 (roundoff), NaN-padded.
    # Cost O(n³) (eigvalsh), below the O(n²P) of the Gram matrix whenever n ≤ P.
    eigs = _eigvalsh(0.5 * (K + K.T)).flip(0).clamp_min(0) / (n - 1)
    cov = torch.full((n_max,), float("nan"), dtype=torch.float64)
    k = min(n_max, n - 1)
    cov[:k] = eigs[:k].cpu()
    return {
        "n": n,
        "mean_sq_norm": stats[0], "trace": stats[1], "quad": stats[2],
        "trace_sq": stats[3], "fourth": stats[4], "third": stats[5],
        "layer_mean_sq_norm": layer_A.cpu().numpy(), "layer_trace": layer_T.cpu().numpy(),
        "sample_norms": padded.numpy(), "cov_eigs": cov.numpy(),
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
    # torch.nn.utils.prune sets module.<name> = <name>_orig * <name>_mask in a forward pre-hook;
    # inside functional_call that attribute becomes a tensor of the transform: put the real one back
    from torch.nn.utils.prune import BasePruningMethod

    pruned = [(m, h._tensor_name) for m in model.modules() for h in m._forward_pre_hooks.values()
              if isinstance(h, BasePruningMethod) and hasattr(m, h._tensor_name)]
    saved = [(m, a, getattr(m, a)) for m, a in pruned]
    try:
        for a in range(0, n, step):
            g = f(diff, const, buffers, _slice(args_tree, a, a + step), _slice(targets, a, a + step))
            for k in names:
                parts[k].append(g[k].detach())
    finally:
        for m, a, v in saved:
            setattr(m, a, v)
    return [torch.cat(parts[k]) if len(parts[k]) > 1 else parts[k][0] for k in names]


class MicroBatchCapture:
    """Capture each micro-batch's gradient during gradient accumulation.

    While armed, a ``register_post_accumulate_grad_hook`` on every parameter copies p.grad after
    each backward pass; :meth:`take` returns the differences
    g_i = (p.grad after backward i) − (p.grad after backward i−1) in float64 (exact for the
    difference of two stored values), taking p.grad = 0 before the first backward, i.e. assuming
    the user zeroes gradients after each step.  Under FSDP2 torch calls these hooks on the sharded
    parameter after each backward's reduce-scatter, and the capture keeps the rank's shard
    (``to_local()``) of the reduced gradient.  Armed only for scheduled steps; otherwise no hook
    is installed and nothing costs anything.  An error inside a hook goes to ``on_error`` (the
    recorder's failure policy), never into the user's ``backward()``.
    """

    def __init__(self, params: Sequence[torch.Tensor],
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.params = list(params)
        self.on_error = on_error
        self._handles: list[Any] = []
        self._snaps: list[list[torch.Tensor]] = [[] for _ in self.params]
        self._stopped = False
        self.calls = [0] * len(self.params)  # hook calls per parameter since arm() (counted first)

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        if self.armed:
            return
        self._snaps = [[] for _ in self.params]
        self.calls = [0] * len(self.params)
        for i, p in enumerate(self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(i)))

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if self._stopped:
                return
            self.calls[i] += 1
            try:
                with torch.no_grad():  # (FSDP2: p.grad is a DTensor; keep the rank's shard)
                    self._snaps[i].append(local(p.grad).detach().clone())
            except Exception as e:  # noqa: BLE001 - never break the user's backward()
                if self.on_error is None:
                    raise
                self.on_error(e)
        return hook

    def stop(self) -> None:
        """Capture nothing more, without removing hooks (safe from inside a hook: torch iterates
        the hook dicts while it calls them); :meth:`disarm` removes them later."""
        self._stopped = True
        self._snaps = [[] for _ in self.params]

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


# --------------------------------------------------------------------------------------------- #
# parameter masks (pruned networks)
# --------------------------------------------------------------------------------------------- #
def _prune_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<name>_orig": <name>_mask buffer}`` of every tensor pruned with
    ``torch.nn.utils.prune`` (parameter ``<name>_orig`` plus buffer ``<name>_mask`` on one module)."""
    out = {}
    for mname, mod in model.named_modules():
        bufs = dict(mod.named_buffers(recurse=False))
        for pname, _ in mod.named_parameters(recurse=False):
            if pname.endswith("_orig") and pname[:-5] + "_mask" in bufs:
                out[f"{mname}.{pname}" if mname else pname] = bufs[pname[:-5] + "_mask"]
    return out


def gradient_masks(model: torch.nn.Module, names: Sequence[str],
                   grad_mask: dict[str, Any] | None) -> tuple[list[torch.Tensor | None], dict[str, Any] | None]:
    """Masks restricting the gradient statistics to the unpruned coordinates, and their description.

    ``grad_mask`` maps parameter names (as in ``model.named_parameters()``) to bool or 0/1 tensors
    of the parameter's shape; each per-example or micro-batch gradient sample g is replaced by
    m ⊙ g, so ‖ḡ‖², T and the sample norms are those of the unpruned coordinates only (a pruned
    coordinate adds 0 to every inner product).  Tensors pruned with ``torch.nn.utils.prune`` need
    no entry: the parameter is ``<name>_orig`` and the forward uses ``<name>_orig ⊙ <name>_mask``,
    so ∂L/∂<name>_orig = mask ⊙ ∂L/∂<name> is already masked; they are found and described here.

    Returns one float mask per name in ``names`` (None: not masked explicitly; copied, on the
    parameter's device and dtype) and ``None`` or a dict for the run's metadata: ``source``,
    ``density`` (unmasked fraction of the recorded parameters, explicit and pruned masks together),
    ``n_unmasked``, ``n_params``, per-tensor ``tensors`` densities.  Densities are those at
    construction: a mask changed later (iterative pruning) is not re-described.
    """
    named = dict(model.named_parameters())
    grad_mask = dict(grad_mask or {})
    unknown = [k for k in grad_mask if k not in names]
    if unknown:
        raise RecorderError(f"grad_mask: {unknown[0]!r} is not a recorded parameter; use names of "
                            f"model.named_parameters() in the optimizer (e.g. {names[0]!r})")
    masks: list[torch.Tensor | None] = []
    for n in names:
        if n not in grad_mask:
            masks.append(None)
            continue
        p = named[n]
        m = torch.as_tensor(grad_mask[n]).detach()
        if tuple(m.shape) != tuple(p.shape):
            raise RecorderError(f"grad_mask[{n!r}]: shape {tuple(m.shape)} but the parameter is {tuple(p.shape)}")
        m = m.to(device=p.device, dtype=p.dtype, copy=True)
        if not bool(((m == 0) | (m == 1)).all()):
            raise RecorderError(f"grad_mask[{n!r}]: values must be 0/1 (or bool); pass the pruning mask itself")
        masks.append(m)
    pruned = {k: v for k, v in _prune_masks(model).items() if k in names}
    if not grad_mask and not pruned:
        return masks, None
    tensors, kept, total = {}, 0, 0
    for n, m in zip(names, masks):
        numel = named[n].numel()
        keep = torch.ones(named[n].shape, dtype=torch.bool, device=named[n].device)
        if m is not None:
            keep &= m.bool()
        if n in pruned:
            keep &= pruned[n].to(keep.device).bool()
        k = int(keep.sum())
        if m is not None or n in pruned:
            tensors[n] = k / numel
        kept += k
        total += numel
    source = "+".join(s for s, on in (("explicit", bool(grad_mask)), ("torch.nn.utils.prune", bool(pruned))) if on)
    return masks, {"source": source, "density": kept / total, "n_unmasked": kept, "n_params": total,
                   "tensors": tensors}


@torch.no_grad()
def apply_masks(samples: list[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """m ⊙ g in place for every sample ``(n, *shape)`` whose mask is not None; returns ``samples``."""
    for s, m in zip(samples, masks):
        if m is not None and s.numel():
            s.mul_(m.to(s.dtype))
    return samples


# --------------------------------------------------------------------------------------------- #
# projected gradient samples (the grad_proj table)
# --------------------------------------------------------------------------------------------- #
GRAD_PROJ_METHODS = ("coords", "gaussian")
#: Columns of the Gaussian sketch generated from one seed (per parameter tensor and chunk): it fixes
#: the random stream, so R is the same on any device, with or without the cache.
SKETCH_CHUNK = 1 << 16
#: R (d × P float32) is kept on the device after its first use when it takes at most this much.
SKETCH_CACHE_BYTES = 128 << 20


def coordinate_subset(n_params: int, d: int, seed: int):
    """The ``coords`` projection: d distinct coordinates of the flattened parameter vector (in the
    order of ``meta['model']['params']``), uniform without replacement from
    ``numpy.random.default_rng(seed)``, sorted ascending (int64 numpy array)."""
    import numpy as np

    return np.sort(np.random.default_rng(int(seed)).choice(int(n_params), size=int(d), replace=False)).astype(np.int64)


def sketch_block(seed: int, index: int, chunk: int, d: int, cols: int) -> torch.Tensor:
    """Columns ``[chunk·SKETCH_CHUNK, chunk·SKETCH_CHUNK + cols)`` of the Gaussian sketch R restricted to
    parameter tensor ``index`` (the recorder's order): a ``(d, cols)`` float32 CPU tensor with i.i.d.
    N(0, 1/d) entries from a ``torch.Generator`` seeded by ``SeedSequence([seed, index, chunk])``."""
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(index), int(chunk)]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state) & ((1 << 63) - 1))
    return torch.randn(int(d), int(cols), generator=g, dtype=torch.float32).mul_(1.0 / math.sqrt(d))


class SampleProjector:
    """d-dimensional projections of gradient samples, for the ``grad_proj`` table.

    ``coords``: the exact values of d seeded coordinates (:func:`coordinate_subset`) — for
    coordinate-wise tail estimates.  ``gaussian``: y = R g with R ∈ R^{d×P}, R_ij ~ N(0, 1/d) i.i.d.
    (Johnson–Lindenstrauss: E⟨Ra, Rb⟩ = ⟨a, b⟩, relative error of ‖Ra‖² ≈ √(2/d) for any a), applied
    per parameter tensor and per chunk of :data:`SKETCH_CHUNK` columns, each block generated from its
    own seed (:func:`sketch_block`), so R is never materialised unless it fits
    :data:`SKETCH_CACHE_BYTES` (then it is cached on the device).  Cost n·d·P multiply-adds per
    measurement plus d·P normals when not cached.  The sign fold of :mod:`.projection` costs only n·P
    but sums fixed blocks of coordinates (one nonzero per column): its inner products are unbiased
    but without the Gaussian sketch's rotation invariance, so a projected coordinate's law depends on
    the parameter layout; we keep the true Gaussian sketch for ``gaussian``.
    """

    def __init__(self, params: Sequence[torch.Tensor], method: str, d: int, seed: int = 0,
                 cache_bytes: int = SKETCH_CACHE_BYTES) -> None:
        import numpy as np

        if method not in GRAD_PROJ_METHODS:
            raise RecorderError(f"grad_proj={method!r}: use 'coords' or 'gaussian'")
        numels = [int(p.numel()) for p in params]
        P = sum(numels)
        self.method, self.d, self.seed, self.n_params = method, int(d), int(seed), P
        if self.d < 1:
            raise RecorderError(f"grad_proj_dim={d}: must be a positive integer")
        self.device = params[0].device
        self.index = None
        self._take: list[tuple[int, torch.Tensor, slice]] = []
        self._numels = numels
        self._cache: dict[tuple[int, int], torch.Tensor] | None = None
        if method == "coords":
            if self.d > P:
                raise RecorderError(f"grad_proj_dim={d} exceeds the {P} recorded parameters; coords picks "
                                    "distinct coordinates: use grad_proj_dim <= P")
            self.index = coordinate_subset(P, self.d, self.seed)
            offsets = np.concatenate([[0], np.cumsum(numels)])
            for i, p in enumerate(params):
                a, b = np.searchsorted(self.index, [offsets[i], offsets[i + 1]])
                if b > a:
                    loc = torch.as_tensor(self.index[a:b] - offsets[i], dtype=torch.long, device=p.device)
                    self._take.append((i, loc, slice(int(a), int(b))))
        elif self.d * P * 4 <= cache_bytes:
            self._cache = {}

    def describe(self) -> dict[str, Any]:
        """The projection's metadata (stored in the run's ``recorder.grad_proj``)."""
        d: dict[str, Any] = {"method": self.method, "dim": self.d, "seed": self.seed, "n_params": self.n_params}
        if self.method == "coords":
            d["index"] = self.index.tolist()
        else:
            d.update(entries="N(0, 1/d)", chunk=SKETCH_CHUNK, generator="torch.Generator(cpu), "
                     "seed SeedSequence([seed, tensor, chunk]); see phasewatch.record.probes.sketch_block")
        return d

    def _block(self, i: int, c: int, cols: int, device: torch.device) -> torch.Tensor:
        if self._cache is not None and (i, c) in self._cache:
            return self._cache[(i, c)]
        R = sketch_block(self.seed, i, c, self.d, cols).to(device)
        if self._cache is not None:
            self._cache[(i, c)] = R
        return R

    @torch.no_grad()
    def project(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(n, d)`` float64 projections of the n samples given per tensor as ``(n, *shape)``."""
        n = int(samples[0].shape[0])
        Y = torch.zeros(n, self.d, dtype=torch.float64, device=samples[0].device)
        if self.method == "coords":
            for i, loc, sl in self._take:
                Y[:, sl] = samples[i].reshape(n, -1)[:, loc.to(samples[i].device)].to(torch.float64)
            return Y
        for i, s in enumerate(samples):
            flat = s.reshape(n, -1)
            dt = torch.float64 if flat.dtype == torch.float64 else torch.float32
            for c, a in enumerate(range(0, flat.shape[1], SKETCH_CHUNK)):
                b = min(a + SKETCH_CHUNK, flat.shape[1])
                R = self._block(i, c, b - a, flat.device)
                Y += (flat[:, a:b].to(dt) @ R.to(dt).T).to(torch.float64)
        return Y

    @torch.no_grad()
    def row(self, samples: Sequence[torch.Tensor], n_max: int, n_finite: int | None = None) -> dict[str, Any] | None:
        """The ``grad_proj`` row of one measurement: ``n`` finite samples (rows with a NaN/Inf
        anywhere are dropped, as for the statistics), ``mean`` = R ḡ (d,) float64 and ``samples`` =
        R(g_i − ḡ) for the first min(n, n_max) of them, float32, NaN-padded to (n_max, d).
        ``n_finite``: the statistics' count of finite samples; when it is all of them the pass that
        finds non-finite rows is skipped (it costs as much as a second copy of the samples)."""
        import numpy as np

        n_all = int(samples[0].shape[0])
        Y = self.project(samples)
        if n_finite is None or n_finite != n_all:
            ok = torch.ones(n_all, dtype=torch.bool, device=Y.device)
            for s in samples:
                ok &= torch.isfinite(s.reshape(n_all, -1)).all(1).to(Y.device)
            Y = Y[ok]
        n = int(Y.shape[0])
        if n < 2:
            return None
        mean = Y.mean(0)
        out = np.full((n_max, self.d), np.nan, dtype=np.float32)
        k = min(n, n_max)
        out[:k] = (Y[:k] - mean).to(torch.float32).cpu().numpy()
        return {"n": n, "samples": out, "mean": mean.cpu().numpy()}
