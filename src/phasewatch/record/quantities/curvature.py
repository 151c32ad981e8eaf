"""Curvature probes: Hessian (Lanczos, Hutchinson trace, preconditioned sharpness) and the NTK Gram."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ...errors import PhasewatchError, RecorderError
from .base import Quantity

log = logging.getLogger("phasewatch")


class Curvature(Quantity):
    """Curvature probes on fixed probe data after the scheduled step, on the new θ (DEFINITIONS §4–5);
    the options are the recorder's ``curvature_*`` and ``ntk_*`` keywords without the
    ``curvature_`` prefix (see :class:`phasewatch.Recorder` and
    :class:`phasewatch.record.curvature.CurvatureProbe`).  A probe that fails is logged and
    switched off; training and the rest of the recording go on."""

    order = 30

    def __init__(self, every: Any = None, *, batch: Any = None,
                 loss: Callable[[Any, Any], torch.Tensor] | None = None, topk: int = 1, tol: float = 1e-6,
                 max_iter: int | None = None, trace: int | str | None = None, mode: str = "eval",
                 hvp: str = "auto", groups: bool | list[str] = False, basis_device: str = "auto",
                 basis_dtype: str = "float64", ntk_inputs: Any = None, ntk_outputs: str = "trace", ntk_method: str = "auto") -> None:
        super().__init__(every)
        if self.on and batch is None and ntk_inputs is None:
            raise RecorderError("curvature_every is given but neither curvature_batch nor ntk_inputs; "
                                "say what to probe")
        if not self.on and (batch is not None or ntk_inputs is not None):
            raise RecorderError("curvature_batch/ntk_inputs are given but curvature_every is not; say when to probe")
        self.options = dict(loss_fn=loss, batch=batch, top_k=topk, tol=tol, max_iter=max_iter, trace=trace,
                            mode=mode, ntk_inputs=ntk_inputs, ntk_outputs=ntk_outputs, ntk_method=ntk_method,
                            hvp=hvp, basis_device=basis_device, basis_dtype=_basis_dtype(basis_dtype))
        self.groups = groups  # per-group λ_max: True (every layer group) or a list of group names
        self.probe: Any = None  # the CurvatureProbe, once bound (None again after a failure)
        self.service: Any = None  # under DDP: every rank's share of the probe batch, products all-reduced

    def bind(self, rec: Any) -> None:
        """Set up against the recorder's parameters and device."""
        if not self.on:
            return
        from ..curvature import CurvatureProbe
        from ..curvature_ddp import ddp_active, make_service, unwrap

        def _dev(t):
            return pytree.tree_map(lambda x: x.to(rec.device) if isinstance(x, torch.Tensor) else x, t)

        o = dict(self.options, batch=_dev(self.options["batch"]), ntk_inputs=_dev(self.options["ntk_inputs"]))
        try:
            cgroups = _curvature_groups(self.groups, rec.group_labels, rec._param_group)
            net = rec._model
            if o["batch"] is not None and ddp_active(rec._shard is not None):
                net = unwrap(rec._model)
                self.service = make_service(rec._model, rec.params, o["loss_fn"], o["batch"], o["mode"])
            if rec._shard is not None:  # FSDP2: shard-local FD products on every rank (record/curvature_fsdp.py)
                from ..curvature_fsdp import fsdp_probe

                o["hvp"] = "fd" if o["hvp"] == "auto" else o["hvp"]
                self.probe = fsdp_probe(CurvatureProbe(net, rec.params, optimizer=rec.optimizer, groups=cgroups,
                                                       group_names=rec.group_labels, **o))
                return
            self.probe = CurvatureProbe(net, rec.params, optimizer=rec.optimizer, groups=cgroups,
                                        group_names=rec.group_labels, service=self.service, **o)
        except PhasewatchError as e:
            raise RecorderError(str(e)) from None

    def should_compute(self, step: int) -> bool:
        """True at the steps this quantity runs after (under DDP the distributed schedule's hook
        runs the probe instead, :meth:`phasewatch.Recorder._ddp_curvature_probe`)."""
        return self.probe is not None and self.service is None and self.schedule(step)

    def config(self, rec: Any) -> dict:
        """The recorder metadata keys of this quantity."""
        on = self.probe is not None
        return {"curvature_every": self.describe() if on else None,
                "curvature": self.probe.config() if on else None}

    def compute(self, rec: Any, step: int) -> None:
        """The work of a scheduled step, after ``optimizer.step()``."""
        _curvature_probe(rec, self, step)


def _curvature_probe(rec: Any, q: Curvature, step: int) -> None:
    """Hessian and NTK probes on the fixed probe data; a failure switches the probe off only."""
    from ..curvature import rows_to_columns

    c = q.probe
    try:
        if c.batch is not None:
            lr = float(rec._cur_lr[0]) if rec._cur_lr else float("nan")
            # u_t exactly as the ring holds it: every tensor exact, one step per update (under FSDP2 the
            # ring row is this rank's shards in parameter order, the vector the sharded probe takes)
            exact_u = not rec._folded and rec.stride == 1 and rec._n_updates
            upd = rec._ring[(rec._n_updates - 1) % rec.rows] if exact_u else None
            row = c.hessian_row(step, lr, update=upd)
            rec.writer.append("curvature", **rows_to_columns([row]))
        if c.ntk_size:
            rec.writer.append("ntk", **rows_to_columns([c.ntk_row(step)]))
    except Exception as e:  # noqa: BLE001 - a probe never stops training
        if rec.strict:
            raise
        q.probe = None
        log.warning("phasewatch: curvature probe failed at step %d (%s: %s); curvature probes are off "
                    "for the rest of this run, everything else is still recorded",
                    step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def _basis_dtype(name: Any) -> torch.dtype:
    """curvature_basis_dtype ("float64" | "float32", or the torch dtype) → the torch dtype."""
    dt = {"float64": torch.float64, "float32": torch.float32, torch.float64: torch.float64,
          torch.float32: torch.float32}.get(name)
    if dt is None:
        raise RecorderError(f"curvature_basis_dtype={name!r}: use 'float64' or 'float32'")
    return dt


def _curvature_groups(want: Any, labels: list[str], param_group_idx: list[int]) -> list[list[int] | None] | None:
    """curvature_groups=True (every group) or a list of group names → per recorded group the
    indices of its tensors (None: not asked for)."""
    if want is False or want is None:
        return None
    names = list(labels) if want is True else [want] if isinstance(want, str) else list(want)
    unknown = [n for n in names if n not in labels]
    if unknown:
        raise RecorderError(f"curvature_groups: no layer group {unknown[0]!r}; the groups are {labels[:8]}")
    return [[i for i, g in enumerate(param_group_idx) if g == gi] if lbl in names else None
            for gi, lbl in enumerate(labels)]
