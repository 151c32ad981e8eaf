"""Telling a DTensor (an FSDP2-sharded parameter) from a plain tensor, cheaply.

These are the checks the recorder and the gradient-sample probes run per tensor and step;
:mod:`.fsdp` does the rest."""

from __future__ import annotations

import sys
from typing import Any

import torch


def _dtensor_cls() -> type | None:
    # no DTensor can exist before torch.distributed.tensor is imported: never import it here
    # (the check runs for every recorder and, via local(), per tensor and step)
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (without importing ``torch.distributed.tensor``)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor (a view of FSDP's sharded storage), or the tensor itself."""
    return t.to_local() if is_sharded(t) else t
