"""The recorder's scheduled work as small objects (after Cockpit's ``Quantity``).

Each quantity holds its own options (checked in its constructor), its schedule
(:class:`phasewatch.record.schedule.Schedule`), the metadata it adds to ``meta.json``
(:meth:`Quantity.config`), and the work it does after a scheduled optimizer step
(:meth:`Quantity.compute`).  :meth:`Quantity.bind` runs once inside the recorder's constructor,
when the model's layout and device are known.  The recorder's post-step hook is a loop:
``for q in quantities: if q.should_compute(step): q.compute(recorder, step)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..schedule import Schedule


def json_safe(v: Any) -> Any:
    """``v`` as JSON: numbers, strings, lists and dicts kept; a tensor as its value(s); else ``repr``."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    return repr(v)


class Quantity:
    """A scheduled measurement of the recorder.

    ``every``: the schedule (``None`` off, int N, ``"log"``, list of steps, callable step -> bool).
    ``order`` fixes where a quantity runs within a step (smaller first); it does not depend on the
    order of the ``quantities`` list, so a run records the same whatever order they are given in.
    """

    order = 0

    def __init__(self, every: Any = None) -> None:
        self.every = every
        self.schedule = Schedule(every)

    @property
    def on(self) -> bool:
        """Whether the quantity is scheduled at all."""
        return self.every is not None

    def should_compute(self, step: int) -> bool:
        """True at the steps the schedule names."""
        return self.schedule(step)

    def describe(self) -> Any:
        """The schedule as stored in ``meta.json``."""
        return self.schedule.describe()

    def config(self, rec: Any) -> dict:
        """The recorder metadata keys of this quantity (``meta.json`` ``recorder``)."""
        return {}

    def bind(self, rec: Any) -> None:
        """Set up against the recorder's layout (parameters, device); called once by the recorder."""

    def compute(self, rec: Any, step: int) -> None:
        """The work of a scheduled step, after ``optimizer.step()``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every={self.describe()!r})"
