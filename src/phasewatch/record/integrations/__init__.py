"""Thin adapters of the :class:`~phasewatch.record.recorder.Recorder` to training frameworks.

    from phasewatch.record.integrations.hf import PhasewatchCallback            # transformers.Trainer
    from phasewatch.record.integrations.lightning import PhasewatchCallback     # lightning.pytorch

Both build one recorder on the framework's model and optimizer when training starts and close it
when training ends; everything else (step boundaries, gradients, DDP) is the recorder's own optimizer
hooks.  Each submodule imports its framework, so importing this package imports neither
(``pip install phasewatch[hf]`` / ``phasewatch[lightning]``).  :func:`__getattr__` gives lazy
access: ``integrations.HFCallback`` and ``integrations.LightningCallback``.
"""

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


def _sample_source(cfg: dict[str, Any]) -> None:
    """Gradient samples under DDP: the callbacks run on every rank, so they can use the per-rank
    local gradients (a collective) unless the user chose a source or a probe batch."""
    from ..distributed import world_size

    if cfg.get("grad_samples_every") is not None and cfg.get("grad_probe") is None and world_size() >= 2:
        cfg.setdefault("grad_source", "per_rank")


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


def __getattr__(name: str) -> Any:
    if name == "HFCallback":
        from .hf import PhasewatchCallback

        return PhasewatchCallback
    if name == "LightningCallback":
        from .lightning import PhasewatchCallback

        return PhasewatchCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HFCallback", "LightningCallback"]
