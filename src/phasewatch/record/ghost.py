"""Per-example gradient Gram matrices without per-example gradients ("ghost" Grams).

For a layer whose per-example weight gradient is a sum of outer products over positions t,
``G_i = Σ_t δ_{i,t} a_{i,t}ᵀ`` (``nn.Linear``: a = layer input, δ = ∂(Σ_k ℓ_k)/∂(layer output);
``transformers`` ``Conv1D`` the same with the weight transposed), the Gram entry is

    ⟨G_i, G_j⟩ = Σ_{t,s} (a_{i,t}·a_{j,s}) (δ_{i,t}·δ_{j,s}),

the sum of the elementwise product of the two (n·T × n·T) Grams (Goodfellow 2015; Li et al.
2022, "Large language models can be strong differentially private learners", §4).  The bias
gradient is ``Σ_t δ_{i,t}``.  ``nn.Embedding``: ``G_i = Σ_t e_{id_{i,t}} δ_{i,t}ᵀ``, so
``⟨G_i, G_j⟩ = Σ_{t,s} [id_{i,t} = id_{j,s} ≠ padding_idx] δ_{i,t}·δ_{j,s}``.  ``nn.LayerNorm``
affine: the per-example vectors ``Σ_t δ⊙x̂`` and ``Σ_t δ`` are small and formed directly.
``nn.Conv2d`` (groups 1, zero padding given as numbers) is a Linear on the unfolded input patches,
t running over output pixels.
Everything comes from ONE forward of the probe batch and one backward of the summed per-example
losses (δ is then per example, because examples do not interact), with forward hooks for the
inputs and tensor hooks on the outputs; ``p.grad`` is never touched (``torch.autograd.grad``).
A module called several times in the forward contributes each call as more positions t (the
gradient sums over calls).  Where the explicit per-example gradient is cheaper than the T×T
Grams (in·out < T·T, Li et al.'s rule) it is formed from the same a and δ instead; both exact.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import RecorderError
from .gram import add_gram64


def _conv1d_type() -> type | None:
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - a transformers without Conv1D
        return None
    return Conv1D


def _kind(m: torch.nn.Module) -> str | None:
    c1 = _conv1d_type()
    if isinstance(m, torch.nn.Linear):
        return "linear"
    if c1 is not None and isinstance(m, c1):
        return "conv1d"
    if isinstance(m, torch.nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
        return "layernorm"
    if (isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)):
        return "conv2d"
    return None


def ghost_plan(model: torch.nn.Module, names: Sequence[str]) -> tuple[dict[str, tuple], list[str]]:
    """Which of the parameters ``names`` the ghost route covers: ``({name: ((module path, role),
    ...)}, fallback names)``.  Covered: the ``weight``/``bias`` of Linear, transformers Conv1D,
    Conv2d (groups 1, numeric zero padding), Embedding (no ``max_norm``/``scale_grad_by_freq``) or affine LayerNorm modules, one or several
    (tied weights, e.g. input/output embeddings: their explicit per-example gradients are summed);
    a tensor also owned by another module, or renamed by ``torch.nn.utils.prune``, falls back."""
    owners: dict[int, list[tuple[str, str, str | None]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        k = _kind(m)
        for role, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, role, k))
    named = dict(model.named_parameters())
    covered: dict[str, tuple[tuple[str, str], ...]] = {}
    fallback: list[str] = []
    for n in names:
        by_mod: dict[int, tuple] = {}  # (a module registered under two paths is one owner)
        for a, b, c in owners.get(id(named[n]), []):
            by_mod.setdefault(id(model.get_submodule(a)), (a, b, c))
        own = sorted(by_mod.values())
        if own and all(c is not None and b in ("weight", "bias") for _, b, c in own) \
                and len({b for _, b, _ in own}) == 1:
            covered[n] = tuple((a, b) for a, b, _ in own)
            continue
        fallback.append(n)
    return covered, fallback


def _per_example_losses(out: Any, targets: Any, loss_fn: Callable, n: int) -> torch.Tensor:
    """Σ_i ℓ_i with ℓ_i = loss_fn(out_i, y_i) on a batch of one (as the torch.func route
    defines it), by ``vmap`` over the outputs; a loss ``vmap`` cannot run through falls back to
    ``loss_fn(out, targets)``: per-example losses (shape (n,)) are summed, a scalar is taken to
    be their mean and multiplied by n (the documented ``grad_loss`` contract)."""
    from torch.func import vmap

    def one(o, y):
        o1 = pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, o)
        y1 = pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, y)
        return loss_fn(o1, y1).sum()

    try:
        return vmap(one)(out, targets).sum()
    except Exception:
        val = loss_fn(out, targets)
        if val.ndim == 0:
            return val * n
        if val.shape[0] != n:
            raise RecorderError(f"grad_loss returned shape {tuple(val.shape)}; return per-example "
                                f"losses (shape ({n},)) or their mean") from None
        return val.sum()


def _flat(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n, ..., f) -> (n, T, f) in the layer's dtype."""
    return x.reshape(n, -1, x.shape[-1])


_F64 = torch.float64


def _dense_gram(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s} (a_it·a_js)(d_it·d_js) for a (n, T, p), d (n, T, q): the ghost Gram, or G Gᵀ with
    G_i = Σ_t d_it a_itᵀ formed explicitly when that costs fewer multiply-adds
    (n·T·p·q + n²·p·q against n²·T²·(p + q)); the same number either way."""
    n, T, p_ = a.shape
    q = d.shape[2]
    if n * T * p_ * q + n * n * p_ * q < n * n * T * T * (p_ + q):
        # (per-example gradients in the layer's dtype, as autograd forms them; the Gram in float64)
        g = torch.einsum("ntp,ntq->npq", a, d).reshape(n, -1)
        return add_gram64(g, torch.zeros(n, n, dtype=_F64, device=g.device))
    A, D = a.reshape(n * T, -1).to(_F64), d.reshape(n * T, -1).to(_F64)
    return ((A @ A.T) * (D @ D.T)).reshape(n, T, n, T).sum(dim=(1, 3))


def _embedding_rows(ids: torch.Tensor, d: torch.Tensor, num: int, padding_idx: int | None) -> torch.Tensor:
    """Explicit per-example embedding gradients (n, num·D): row id_{i,t} of G_i gets δ_{i,t}."""
    n, T, D = d.shape
    d = d.to(_F64)
    z = torch.zeros(n * num, D, dtype=_F64, device=d.device)
    idx = (ids.reshape(n, T) + num * torch.arange(n, device=ids.device)[:, None]).reshape(-1)
    z.index_add_(0, idx, d.reshape(n * T, D))
    z = z.reshape(n, num, D)
    if padding_idx is not None:
        z[:, padding_idx] = 0
    return z.reshape(n, -1)


def _embedding_gram(ids: torch.Tensor, d: torch.Tensor, num: int, padding_idx: int | None) -> torch.Tensor:
    """Σ_{t,s} [id_it = id_js ≠ padding] δ_it·δ_js, or the explicit rows' Gram when cheaper."""
    n, T, D = d.shape
    if n * num * D < n * T * T * D:
        g = _embedding_rows(ids, d, num, padding_idx)
        return g @ g.T
    ids = ids.reshape(n * T)
    Dm = d.reshape(n * T, -1).to(_F64)
    same = (ids[:, None] == ids[None, :]).to(torch.float64)
    if padding_idx is not None:
        keep = (ids != padding_idx).to(torch.float64)
        same = same * keep[:, None] * keep[None, :]
    return ((Dm @ Dm.T) * same).reshape(n, T, n, T).sum(dim=(1, 3))


def _layernorm_hat(m: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(x.ndim - len(m.normalized_shape), x.ndim))
    x = x.to(torch.float64)
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps)


def _cat(xs: list[torch.Tensor]) -> torch.Tensor:
    """The calls' positions joined along dim 1; one call's contiguous tensor as it is (a cat would
    only copy it into the same layout, so the products downstream see the same operands)."""
    return xs[0] if len(xs) == 1 and xs[0].is_contiguous() else torch.cat(xs, dim=1)


def _factors(kind: str, m: torch.nn.Module, calls: list, grads: list, n: int):
    """(a, d): inputs (n, T, p) (token ids (n, T) for an embedding) and output grads (n, T, q)
    over all calls; for Conv2d a = the unfolded input patches, T = output pixels."""
    if kind == "conv2d":
        a = _cat([torch.nn.functional.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
                  .transpose(1, 2) for x in calls])
        return a, _cat([g.reshape(n, g.shape[1], -1).transpose(1, 2) for g in grads])
    d = _cat([_flat(g, n) for g in grads])
    if kind == "embedding":
        return _cat([x.reshape(n, -1) for x in calls]), d
    return _cat([_flat(x, n) for x in calls]), d


def _explicit(kind: str, role: str, m: torch.nn.Module, calls: list, grads: list, n: int) -> torch.Tensor:
    """The per-example gradients (n, numel) of one module's parameter, in the parameter's layout."""
    if kind == "layernorm":
        k = len(m.normalized_shape)
        tot = None
        for x, g in zip(calls, grads):
            g = g.to(torch.float64)
            v = g * _layernorm_hat(m, x) if role == "weight" else g
            v = v.reshape(n, -1, *v.shape[v.ndim - k:]).sum(dim=1).reshape(n, -1)
            tot = v if tot is None else tot + v
        return tot
    a, d = _factors(kind, m, calls, grads, n)
    if role == "bias":
        return d.to(_F64).sum(dim=1)
    if kind == "embedding":
        return _embedding_rows(a, d, m.num_embeddings, m.padding_idx)
    eq = "nti,nto->nio" if kind == "conv1d" else "nto,nti->noi"  # (Conv1D stores W as (in, out))
    return torch.einsum(eq, d, a).reshape(n, -1).to(_F64)


def _param_gram(owners: list, n: int) -> torch.Tensor:
    """The n×n Gram of one covered parameter from its owners' captured inputs and output grads:
    ``owners`` = [(kind, role, module, calls, grads)]; one owner by the cheaper of the ghost and
    explicit forms, several (tied weights) by the sum of their explicit per-example gradients."""
    if len(owners) > 1:
        g = sum(_explicit(*o, n) for o in owners)
        return g @ g.T
    kind, role, m, calls, grads = owners[0]
    if kind == "layernorm" or role == "bias":
        g = _explicit(kind, role, m, calls, grads, n)
        return g @ g.T
    a, d = _factors(kind, m, calls, grads, n)
    if kind == "embedding":
        return _embedding_gram(a, d, m.num_embeddings, m.padding_idx)
    return _dense_gram(a, d)


def _probe_forward(model: torch.nn.Module, names: set, args: tuple, n: int, expand: set) -> tuple:
    """A no-grad forward with shape-checking hooks on the modules ``names``: returns (modules
    that ran without the examples along dim 0, those of them whose input and output had dim 0 of
    size 1, the model output); modules in ``expand`` have a size-1 dim 0 expanded to n."""
    mods = dict(model.named_modules(remove_duplicate=False))
    bad: set[str] = set()
    ones: set[str] = set()

    def make_hook(mname: str):
        def hook(mod, inp, out):
            x = inp[0] if inp else None
            if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.ndim):
                bad.add(mname)
                return None
            if x.shape[0] == n and out.shape[0] == n:
                return None
            if x.shape[0] == 1 and out.shape[0] == 1 and mname in expand:
                return out.expand(n, *out.shape[1:])
            bad.add(mname)
            if x.shape[0] == 1 and out.shape[0] == 1:
                ones.add(mname)
            return None
        return hook

    handles = [mods[m].register_forward_hook(make_hook(m)) for m in names]
    dev = [x.device for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor) and x.is_cuda][:1]
    try:  # (the same random stream each time, so dropout cannot make two probes differ)
        with torch.no_grad(), torch.random.fork_rng(devices=dev):
            torch.manual_seed(0)
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
    return bad, ones, out


def unbatched_modules(model: torch.nn.Module, covered: dict[str, tuple], inputs: Any) -> tuple[list[str], set]:
    """(covered parameters with no per-example ghost Gram, modules to broadcast): a module that
    runs without the examples along dim 0 has none, unless its input and output have dim 0 of
    size 1 (GPT-2's position embedding on ``(1, T)`` position ids) and expanding that output to n
    leaves the model's output bit-for-bit unchanged (it was broadcast over the batch anyway):
    then its output is expanded in :func:`ghost_grams` and the per-example gradients exist."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    n = int(pytree.tree_leaves(args)[0].shape[0])
    names = {mname for owners in covered.values() for mname, _ in owners}
    bad, ones, ref = _probe_forward(model, names, args, n, set())
    expand: set = set()
    if ones and n > 1:
        bad2, _, out = _probe_forward(model, names, args, n, ones)
        la, lb = pytree.tree_leaves(ref), pytree.tree_leaves(out)
        same = len(la) == len(lb) and all(
            (torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a is b or a == b)
            for a, b in zip(la, lb))
        if same and not (bad2 & names - ones):
            bad, expand = bad - ones, set(ones)
    return [p for p, owners in covered.items() if any(m in bad for m, _ in owners)], expand


def _capture(model, mods: dict, names: set, args: tuple, n: int, broadcast, targets, loss_fn) -> tuple:
    """One forward with hooks on the modules ``names`` and one autograd.grad of Σ_i ℓ_i: returns
    ({module: (inputs per call, output grads per call)}, modules run without a batch dim, device)."""
    store: dict[str, tuple[list, list]] = {mname: ([], []) for mname in names}
    outs: list[tuple[str, torch.Tensor]] = []
    unbatched: set[str] = set()

    def make_hook(mname: str):
        def hook(mod, inp, out):
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return None
            x = inp[0] if inp else None
            ret = None
            if (mname in broadcast and isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == 1
                    and out.shape[0] == 1 and n > 1):
                x, out = x.expand(n, *x.shape[1:]), out.expand(n, *out.shape[1:])
                ret = out
            if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] != n or out.shape[0] != n:
                unbatched.add(mname)
                return None
            store[mname][0].append(x.detach())
            outs.append((mname, out))
            return ret
        return hook

    handles = [mods[mname].register_forward_hook(make_hook(mname)) for mname in store]
    try:
        with torch.enable_grad():
            total = _per_example_losses(model(*args), targets, loss_fn, n)
            if not outs:
                raise RecorderError("ghost Grams: no covered module ran with gradients in the forward")
            gs = torch.autograd.grad(total, [o for _, o in outs], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for (mname, o), g in zip(outs, gs):
        store[mname][1].append(torch.zeros_like(o) if g is None else g.detach())
    return store, unbatched, total.device


def ghost_grams(model: torch.nn.Module, covered: dict[str, tuple], group: dict[str, int],
                n_groups: int, inputs: Any, targets: Any, loss_fn: Callable,
                broadcast: set | frozenset = frozenset()) -> tuple[torch.Tensor, list[str]]:
    """Per-group raw Gram matrices ``(n_groups, n, n)`` float64 of the per-example gradients of
    the ``covered`` parameters (see :func:`ghost_plan`; ``group[name]`` its group index), from one
    forward of ``inputs`` and one ``torch.autograd.grad`` of Σ_i ℓ_i with respect to the covered
    modules' outputs, and the names of covered parameters it could not do: those of a module
    that ran on an input without the examples along dim 0 (e.g. GPT-2's position embedding,
    called on ``(1, T)`` position ids and broadcast), which the caller must take another route.
    Modules in ``broadcast`` (from :func:`unbatched_modules`) have a size-1 dim 0 of their input
    and output expanded to n.  The model's ``.grad`` fields are left unchanged."""
    mods = dict(model.named_modules(remove_duplicate=False))
    wanted = {mname for owners in covered.values() for mname, _ in owners}
    seen: dict[int, str] = {}
    for mname in wanted:
        seen.setdefault(id(mods[mname]), mname)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    n = int(pytree.tree_leaves(args)[0].shape[0])
    store, unbatched, dev = _capture(model, mods, set(seen.values()), args, n, broadcast, targets, loss_fn)
    Ms = torch.zeros(n_groups, n, n, dtype=torch.float64, device=dev)
    skipped = []
    with torch.no_grad():
        for pname, owners in covered.items():
            keys = [(seen[id(mods[mname])], role) for mname, role in owners]
            if any(k in unbatched for k, _ in keys):
                skipped.append(pname)
                continue
            # (a module that did not run contributes a zero gradient: it is left out)
            ran = [(_kind(mods[k]), role, mods[k], *store[k]) for k, role in keys if store[k][0]]
            if ran:
                Ms[group[pname]] += _param_gram(ran, n)
    return Ms, skipped
