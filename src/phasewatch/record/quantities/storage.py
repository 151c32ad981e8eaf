"""Stored vectors: snapshots of updates u_t and checkpoints of parameters θ_t."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import RecorderError
from .base import Quantity


class Snapshots(Quantity):
    """Stored update vectors u_t (the ``snapshots`` table).

    ``kind``: ``"raw"`` (u_t itself, in either band mode) or ``"projected"`` (the ring row);
    ``dtype``: dtype of stored raw snapshots (``"float64"``: the exact update; projected rows are
    always float64).  The snapshot of a step is taken while its update enters the ring (the
    recorder's ``_record_update``), since raw snapshots of folded tensors need θ_{t−stride}."""

    order = 0

    def __init__(self, every: Any = None, kind: str = "raw", dtype: str = "float64") -> None:
        if kind not in ("raw", "projected"):
            raise RecorderError(f"snapshot_kind={kind!r}: use 'raw' or 'projected'")
        super().__init__(every)
        self.kind = kind
        self.dtype = dtype if kind == "raw" else "float64"

    @property
    def raw(self) -> bool:
        """Raw snapshots are scheduled (the ring keeps θ_{t−stride} of folded tensors for them)."""
        return self.on and self.kind == "raw"

    def config(self, rec: Any) -> dict:
        """The recorder metadata keys of this quantity."""
        return {"snapshot_every": self.describe(), "snapshot_kind": self.kind, "snapshot_dtype": self.dtype}


class Checkpoints(Quantity):
    """Stored parameter vectors θ_t (float32 arrays, no pickle; the ``checkpoints`` table)."""

    order = 10

    def config(self, rec: Any) -> dict:
        """The recorder metadata keys of this quantity."""
        return {"checkpoint_every": self.describe()}

    def compute(self, rec: Any, step: int) -> None:
        """The work of a scheduled step, after ``optimizer.step()``."""
        if rec._shard is None:  # (FSDP: gathered by the shard's hook)
            _checkpoint(rec, step)


@torch.no_grad()
def _checkpoint(rec: Any, step: int) -> None:
    theta = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in rec.params])
    rec.writer.append("checkpoints", step=np.array([step]), theta=theta.numpy()[None])
