"""What the framework callbacks (:mod:`.hf`, :mod:`.lightning`) share: finding the torch optimizer
inside framework wrappers, the gradient-sample route under DDP/FSDP, the global mean of a loss, the
batch size of a loader or batch, and the scalar metrics worth logging.  torch is imported inside
the functions."""

from __future__ import annotations

from typing import Any


def _torch_optimizer(opt: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside framework wrappers (Accelerate's ``AcceleratedOptimizer``
    keeps it as ``.optimizer``, Lightning's ``LightningOptimizer`` as ``._optimizer``), or None."""
    import torch

    for _ in range(8):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(opt, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            opt = inner
            continue
        break
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def _sample_source(cfg: dict[str, Any], model: Any = None) -> None:
    """Gradient samples under DDP: the callbacks run on every rank, so they can use the per-rank
    local gradients (a collective) unless the user chose a source or a probe batch.  A model
    sharded with FSDP2 has no per-rank route (its gradients are reduce-scattered after every
    backward): there the micro-batch route, the one the recorder supports under FSDP."""
    from ..distributed import world_size

    if cfg.get("grad_samples_every") is not None and cfg.get("grad_probe") is None and world_size() >= 2:
        sharded = False
        if model is not None:
            from ..fsdp import detect

            sharded = detect(list(model.named_parameters()))
        cfg.setdefault("grad_source", "micro_batch" if sharded else "per_rank")


def _active(recorder: Any) -> bool:
    """True for a recorder that writes: built, open and on rank 0 (under DDP the other ranks'
    recorders are disabled from the start and have no step counter)."""
    return recorder is not None and bool(getattr(recorder, "enabled", False))


def _global_mean(total: Any, count: int) -> Any:
    """The mean of every rank's values: ``(Σ_ranks total) / (Σ_ranks count)``, by one all-reduce of
    two numbers over the default process group; ``total / count`` on one process.

    A collective: every rank calls it at the same point of the step, a rank without a value with
    ``total=0, count=0`` (the result is NaN only if no rank had one).  ``total`` must be on the
    backend's device (CUDA for nccl; gloo's numbers travel on the CPU).  The result stays a tensor:
    no host synchronisation."""
    import torch
    import torch.distributed as dist

    from ..distributed import world_size

    t = torch.as_tensor(total).detach().reshape(())
    if world_size() < 2:
        return t / count
    vec = torch.stack([t.to(torch.float64), torch.full((), float(count), dtype=torch.float64, device=t.device)])
    if dist.get_backend() == "gloo":
        vec = vec.cpu()
    dist.all_reduce(vec)
    return vec[0] / vec[1]


def _loader_batch_size(loader: Any) -> int | None:
    """Examples per batch of a single ``DataLoader`` (its ``batch_size``, else its batch sampler's),
    or None."""
    for obj in (loader, getattr(loader, "batch_sampler", None)):
        bs = getattr(obj, "batch_size", None)
        if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0:
            return bs
    return None


def _leading_dim(batch: Any) -> int | None:
    """The common leading dimension of the tensors of a batch (a tensor or a nested tuple/list/dict
    of them), or None if they disagree or there is none."""
    import torch
    from torch.utils import _pytree as pytree

    dims = {int(t.shape[0]) for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.ndim}
    return dims.pop() if len(dims) == 1 else None


_SKIP_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def _scalar_metrics(metrics: Any, skip: tuple[str, ...] = ("epoch",)) -> dict[str, float]:
    """The finite-or-not scalar entries of a metrics mapping, as floats; names longer than the run
    format's 64 bytes, non-scalars, timings/throughputs and the ``skip`` names are left out."""
    import numbers

    import torch

    out: dict[str, float] = {}
    for k, v in dict(metrics or {}).items():
        name = str(k)
        if name in skip or name.endswith(_SKIP_SUFFIXES) or len(name.encode()) > 64:
            continue
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                continue
            out[name] = float(v.detach().cpu())
        elif isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[name] = float(v)
    return out
