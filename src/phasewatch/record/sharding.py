"""How the recorder's parameters are distributed: one interface, two strategies.

:class:`SingleProcess` (every tensor whole in this process: each call the identity or nothing) and
:class:`phasewatch.record.fsdp.ShardSync` (FSDP2 ``Shard(0)`` DTensors: every rank records its
shards, rank 0 writes; the collectives live there).  The recorder's construction and lifecycle
(layout, the run's start, exit and signal handlers, flush, close, failure) go through this
interface; only the per-step path (``_record_update``, the drain) keeps its direct test, where a
method call per tensor and step would cost more than it says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SingleProcess:
    """The strategy of unsharded parameters (one process, or DDP where rank 0 records)."""

    sharded = False
    world = 1
    meetings = 0  # collectives taken part in: none

    def __init__(self, params: Sequence[torch.Tensor] = ()) -> None:
        self._numels = [p.numel() for p in params]

    def local_numel(self, i: int) -> int:
        """Elements of tensor ``i`` this process records: all of them."""
        return self._numels[i]

    def max_local_numel(self) -> int:
        """Elements of the largest per-process part: every element."""
        return sum(self._numels)

    def local_signs(self, i: int, signs: torch.Tensor) -> torch.Tensor:
        """This process's part of tensor ``i``'s fold signs: all of them."""
        return signs

    def global_dim(self, rec_dims: Sequence[int], projected: Sequence[bool]) -> int:
        """Ring dimension of the full model: this process's ring."""
        return int(sum(rec_dims))

    def start(self, error: BaseException | None, step: int) -> int:
        """After the run was created (or not): its error raised here, the step unchanged."""
        if error is not None:
            raise error
        return step

    def setup(self, rec: Any) -> None:
        """Nothing to hook: the recorder's own step hooks do all the work."""

    def exit_target(self, rec: Any) -> Any:
        """What the exit and SIGTERM handlers close: the recorder itself."""
        return rec

    def ensure_met(self, m0: int) -> None:
        """No other process waits for this one."""

    def finish(self, m0: int) -> None:
        """Nothing to meet at close."""

    def fail(self, rec: Any, e: BaseException) -> bool:
        """False: the recorder's own failure policy applies (nothing to tell other processes)."""
        return False

    def describe(self) -> dict | None:
        """The ``sharding`` entry of the run's metadata: None."""
        return None


NO_SHARDING = SingleProcess()
