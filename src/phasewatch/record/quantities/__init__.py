"""The recorder's scheduled work as quantities: ``Recorder(path, model, opt, quantities=[...])``.

    rec = phasewatch.Recorder("runs/exp1", model, opt, quantities=[
        GradNoise(every=100, probe=(x, y), loss=per_example_loss),
        Curvature(every=500, batch=(x, y), loss=mean_loss, topk=2),
        Snapshots(every="log"), Checkpoints(every=1000)])

is the same run as the keyword form ``Recorder(..., grad_samples_every=100, grad_probe=(x, y),
grad_loss=..., curvature_every=500, ...)``, which :func:`from_kwargs` translates.
"""

from __future__ import annotations

from .base import Quantity
from .compat import from_kwargs, resolve
from .controllers import Controllers
from .curvature import Curvature
from .gradnoise import GradNoise
from .storage import Checkpoints, Snapshots

__all__ = ["Checkpoints", "Controllers", "Curvature", "GradNoise", "Quantity", "Snapshots", "from_kwargs",
           "resolve"]
