"""Today's ``Recorder`` keyword arguments (``grad_*``, ``curvature_*``, ``snapshot_*`` ...) as quantities."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ...errors import RecorderError
from .base import Quantity
from .controllers import Controllers
from .curvature import Curvature
from .gradnoise import GradNoise
from .storage import Checkpoints, Snapshots

KINDS = (Snapshots, Checkpoints, GradNoise, Curvature, Controllers)


def from_kwargs(*, snapshot_every: Any = None, snapshot_kind: str = "raw", snapshot_dtype: str = "float64",
                checkpoint_every: Any = None, grad_samples_every: Any = None,
                grad_probe: tuple[Any, Any] | None = None,
                grad_loss: Callable[[Any, Any], torch.Tensor] | None = None, grad_samples_max: int = 64,
                grad_chunk: int | None = None, grad_probe_eval: bool = False,
                grad_microbatch_size: int | None = None, grad_microbatch_scale: str | float = "n_micro",
                grad_source: str | None = None, grad_mask: dict[str, Any] | None = None,
                grad_proj_dim: int | None = None, grad_proj: str = "coords", grad_proj_seed: int = 0,
                curvature_every: Any = None, curvature_batch: Any = None,
                curvature_loss: Callable[[Any, Any], torch.Tensor] | None = None, curvature_topk: int = 1,
                curvature_tol: float = 1e-6, curvature_max_iter: int | None = None,
                curvature_trace: int | str | None = None, curvature_mode: str = "eval",
                curvature_hvp: str = "auto", ntk_inputs: Any = None, ntk_outputs: str = "trace",
                ntk_method: str = "auto", controllers: Iterable[Any] | None = None,
                batch_size: int | None = None) -> dict[type, Quantity]:
    """The quantities of the recorder's keyword arguments (one of each kind, off where not asked),
    checked in the order the recorder always checked them."""
    snaps = Snapshots(snapshot_every, kind=snapshot_kind, dtype=snapshot_dtype)
    ctrl = Controllers(controllers, batch_size=batch_size)
    grad = GradNoise(grad_samples_every, probe=grad_probe, loss=grad_loss, samples_max=grad_samples_max,
                     chunk=grad_chunk, probe_eval=grad_probe_eval, microbatch_size=grad_microbatch_size,
                     microbatch_scale=grad_microbatch_scale, source=grad_source, mask=grad_mask,
                     proj_dim=grad_proj_dim, proj=grad_proj, proj_seed=grad_proj_seed)
    curv = Curvature(curvature_every, batch=curvature_batch, loss=curvature_loss, topk=curvature_topk,
                     tol=curvature_tol, max_iter=curvature_max_iter, trace=curvature_trace, mode=curvature_mode,
                     hvp=curvature_hvp, ntk_inputs=ntk_inputs, ntk_outputs=ntk_outputs, ntk_method=ntk_method)
    return {Snapshots: snaps, Checkpoints: Checkpoints(checkpoint_every), GradNoise: grad, Curvature: curv,
            Controllers: ctrl}


def resolve(quantities: Iterable[Quantity] | None, legacy: dict[str, Any]) -> tuple[dict[type, Any], list]:
    """One quantity of each built-in kind (from ``quantities``, else from the keyword arguments
    ``legacy``) and the other :class:`Quantity` objects given, in their ``order``.  A kind given both
    ways is refused."""
    try:
        built = from_kwargs(**legacy)
    except TypeError as e:
        raise TypeError(str(e).replace("from_kwargs()", "Recorder()")) from None
    extra: list[Quantity] = []
    seen: set[type] = set()
    for q in quantities or []:
        kind = next((k for k in KINDS if isinstance(q, k)), None)
        if kind is None:
            if not isinstance(q, Quantity):
                raise RecorderError(f"quantities: {type(q).__name__} is not a phasewatch Quantity")
            extra.append(q)
            continue
        if kind in seen:
            raise RecorderError(f"quantities: two {kind.__name__} given; pass one of each kind")
        seen.add(kind)
        if built[kind].on:
            raise RecorderError(f"quantities: {kind.__name__} is given both as an object and as keyword "
                                "arguments; use one of the two")
        built[kind] = q
    return built, sorted(extra, key=lambda q: q.order)
