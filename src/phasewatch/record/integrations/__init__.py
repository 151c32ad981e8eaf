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


def __getattr__(name: str) -> Any:
    if name == "HFCallback":
        from .hf import PhasewatchCallback

        return PhasewatchCallback
    if name == "LightningCallback":
        from .lightning import PhasewatchCallback

        return PhasewatchCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["HFCallback", "LightningCallback"]
