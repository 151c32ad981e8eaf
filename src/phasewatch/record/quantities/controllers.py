"""Controllers (:mod:`phasewatch.record.control`) as the recorder's last quantity of each step."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ...errors import RecorderError
from .base import Quantity, json_safe

log = logging.getLogger("phasewatch")


class Controllers(Quantity):
    """Run controllers (:mod:`phasewatch.record.control`) after every step.

    After every gradient-noise measurement each gets ``on_measurement(step, estimates(stats, b,
    loss=last loss, batch_size=batch_size))`` (the statistics just recorded; no second pass over the
    model), and after every step ``on_step(step)``; both run at the end of the step's post-hook (this
    quantity runs last in a step), so a changed learning rate is the lr of the next step (and is what
    the ``steps`` table records for it).  Every change is written to the ``interventions`` table.  A
    controller bound to an optimizer must be bound to the recorder's; one without an optimizer (or
    ``dry_run``) only tracks what it would do, and its rows say ``dry run``.  The recorder's
    ``should_stop`` is True once an early-stopping controller fired.  Not under DDP (the change would
    reach rank 0 only).  ``batch_size``: the training batch size B for the ``C_batch``/``p_batch``
    estimates (optional)."""

    order = 100

    def __init__(self, controllers: Iterable[Any] | None = None, *, batch_size: int | None = None) -> None:
        super().__init__(None)
        self.controllers = list(controllers or [])
        for c in self.controllers:
            if not (callable(getattr(c, "on_measurement", None)) and callable(getattr(c, "on_step", None))):
                raise RecorderError(f"controllers: {type(c).__name__} is not a controller (phasewatch.record.control: "
                                    "needs on_measurement and on_step)")
        if batch_size is not None and not float(batch_size) > 0:
            raise RecorderError(f"batch_size={batch_size}: must be a positive number of examples")
        self.batch_size = None if batch_size is None else float(batch_size)

    @property
    def on(self) -> bool:
        """Whether the quantity runs at all."""
        return bool(self.controllers)

    def check(self, optimizer: Any) -> None:
        """Refuse DDP and controllers bound to another optimizer (before any collective)."""
        if self.controllers and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RecorderError("controllers are not supported under DDP: a learning-rate change made on "
                                "rank 0 would not reach the other ranks; train without controllers")
        for c in self.controllers:
            if getattr(c, "optimizer", None) not in (None, optimizer):
                raise RecorderError(f"controllers: {type(c).__name__} is bound to another optimizer; build it "
                                    "with the optimizer given to the recorder")

    def should_compute(self, step: int) -> bool:
        """True at the steps this quantity runs after."""
        return bool(self.controllers)

    def describe(self) -> Any:
        """The schedule (or the controllers) as stored in ``meta.json``."""
        return [json_safe(c.describe()) if callable(getattr(c, "describe", None))
                else {"class": type(c).__name__} for c in self.controllers]

    def config(self, rec: Any) -> dict:
        """The recorder metadata keys of this quantity."""
        return {"controllers": self.describe(), "batch_size": self.batch_size}

    def compute(self, rec: Any, step: int) -> None:
        """The work of a scheduled step, after ``optimizer.step()``."""
        _control(rec, self, step)


def _control(rec: Any, q: Controllers, step: int) -> None:
    """After step ``step``: the controllers see this step's measurements (if any), then
    ``on_step``; every change they make is kept in ``rec.interventions`` and written to the run."""
    from ..control import estimates

    made: list[tuple[Any, Any]] = []
    measured, rec._measured = rec._measured, []
    if measured:
        loss = None
        if rec._last_loss is not None:
            s, value = rec._last_loss
            vals = rec._losses.get(s) or [value]  # the mean over a step's micro-batches
            loss = float(np.mean([float(v) for v in vals]))
        for s, b, st in measured:
            est = estimates(st, b, loss=loss, batch_size=q.batch_size)
            for c in q.controllers:
                made += [(c, iv) for iv in c.on_measurement(s, est)]
    for c in q.controllers:
        made += [(c, iv) for iv in c.on_step(step)]
    if not made:
        return
    rows = []
    for c, iv in made:
        rec.interventions.append(iv)
        dry = iv.param != "stop" and (getattr(c, "dry_run", False) or getattr(c, "optimizer", None) is None)
        note = ("dry run: " if dry else "") + str(iv.note)
        rows.append((iv.step, str(iv.rule).encode()[:32], str(iv.param).encode()[:32], iv.old, iv.new,
                     note.encode()[:96].decode("utf-8", "ignore").encode()))
    step_c, rule, param, old, new, note = zip(*rows)
    rec.writer.append("interventions", step=np.array(step_c, dtype="i8"), rule=np.array(rule, dtype="S32"),
                      param=np.array(param, dtype="S32"), old=np.array(old, dtype="f8"),
                      new=np.array(new, dtype="f8"), note=np.array(note, dtype="S96"))
    for _, iv in made:
        log.info("phasewatch: %s", iv)
