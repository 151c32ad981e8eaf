"""Gradient noise: samples of the gradient at scheduled steps, stored as sufficient statistics."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ...errors import RecorderError
from ..distributed import choose_source
from ..ghost import ghost_grams, ghost_plan, unbatched_modules
from ..gram import add_gram64
from ..probes import (
    MicroBatchCapture,
    SampleProjector,
    apply_masks,
    gradient_masks,
    gram_matrix_statistics,
    gram_statistics,
    per_example_gradients,
    training_batchnorm,
)
from .base import Quantity

log = logging.getLogger("phasewatch")


class GradNoise(Quantity):
    """Gradient-noise measurements in the ``grad_samples`` table (DEFINITIONS §2); the options are
    the recorder's ``grad_*`` keywords without the prefix (see :class:`phasewatch.Recorder`):
    ``probe=(inputs, targets)`` and ``loss`` for per-example gradients after the step; without a
    probe the micro-batch gradients of gradient accumulation (``microbatch_size``,
    ``microbatch_scale``); ``source="per_rank"`` under DDP; ``mask``, ``samples_max``, ``chunk``,
    ``probe_eval``; ``proj_dim``/``proj``/``proj_seed`` for the ``grad_proj`` table; ``method``
    (``"auto"``, ``"ghost"``, ``"func"``) how per-example Grams are formed (see
    :mod:`phasewatch.record.ghost`)."""

    order = 20

    def __init__(self, every: Any = None, *, probe: tuple[Any, Any] | None = None,
                 loss: Callable[[Any, Any], torch.Tensor] | None = None, samples_max: int = 64,
                 chunk: int | None = None, probe_eval: bool = False, microbatch_size: int | None = None,
                 microbatch_scale: str | float = "n_micro", source: str | None = None,
                 mask: dict[str, Any] | None = None, proj_dim: int | None = None, proj: str = "coords",
                 proj_seed: int = 0, method: str = "auto") -> None:
        super().__init__(every)
        if method not in ("auto", "ghost", "func"):
            raise RecorderError(f"grad_method={method!r}: use 'auto', 'ghost' or 'func'")
        if method == "ghost" and (proj_dim or mask):
            raise RecorderError("grad_method='ghost' forms Grams without per-example gradients, so it "
                                "cannot project or mask them; drop grad_proj_dim/grad_mask or use 'auto'/'func'")
        if int(samples_max) < 1:
            raise RecorderError(f"grad_samples_max={samples_max}: must be a positive integer")
        if probe is not None and not self.on:
            raise RecorderError("grad_probe is given but grad_samples_every is not; say when to probe")
        if probe is not None:
            if loss is None:
                raise RecorderError("grad_probe needs grad_loss=callable(outputs, targets) -> per-example or mean loss")
            if not (isinstance(probe, (tuple, list)) and len(probe) == 2):
                raise RecorderError("grad_probe must be a pair (inputs, targets)")
        if microbatch_scale != "n_micro" and not isinstance(microbatch_scale, (int, float)):
            raise RecorderError(f"grad_microbatch_scale={microbatch_scale!r}: use 'n_micro' or a number")
        if proj_dim and not self.on:
            raise RecorderError("grad_proj_dim is given but grad_samples_every is not; say when to sample")
        self.probe, self.loss, self.samples_max = probe, loss, int(samples_max)
        self.chunk = int(chunk) if chunk else None
        self.probe_eval = bool(probe_eval)
        self.microbatch_size = float(microbatch_size) if microbatch_size else float("nan")
        self.microbatch_scale = microbatch_scale
        self.requested_source, self.mask = source, mask
        self.proj_dim, self.proj, self.proj_seed = proj_dim, proj, proj_seed
        self.source: str | None = None  # per_example | micro_batch | per_rank | None, by resolve()
        self.masks: list = []
        self.mask_meta: Any = None
        self.capture: MicroBatchCapture | None = None
        self.projector: SampleProjector | None = None
        self.method = method
        self.method_used: str | None = None  # ghost | mixed | func, by bind() (per-example probes)
        self.ghost_covered: dict = {}
        self.ghost_fallback: list = []
        self.ghost_broadcast: set = set()

    def resolve(self) -> str | None:
        """The source this recorder samples from (:func:`phasewatch.record.distributed.choose_source`)."""
        self.source = choose_source(self.every, self.probe, self.requested_source)
        if self.mask and self.source == "per_rank":
            raise RecorderError("grad_mask is not supported with per_rank gradient samples; prune with "
                                "torch.nn.utils.prune instead (its gradients are already masked)")
        if self.proj_dim and self.source == "per_rank":
            raise RecorderError("grad_proj_dim: projected samples are recorded for per-example and "
                                "micro-batch samples only, not per_rank; drop grad_proj_dim under DDP")
        return self.source

    def bind(self, rec: Any) -> None:
        """Set up against the recorder's parameters and device."""
        model = rec._model
        if self.probe is not None:
            bn = training_batchnorm(model)
            if bn and not self.probe_eval:
                raise RecorderError(
                    f"grad_probe: the model has BatchNorm in training mode ({bn[0]}), which mixes the "
                    "examples of a batch, so per-example gradients are undefined; pass "
                    "grad_probe_eval=True to probe in eval mode, or use micro-batch samples (no grad_probe)")
        self.masks, self.mask_meta = gradient_masks(model, rec.param_names, self.mask)
        if self.probe is not None:
            self.probe = tuple(pytree.tree_map(
                lambda t: t.to(rec.device) if isinstance(t, torch.Tensor) else t, tuple(self.probe)))
        self.capture = MicroBatchCapture(rec.params, on_error=rec._fail) if self.source == "micro_batch" else None
        if self.proj_dim:
            self.projector = SampleProjector(rec.params, self.proj, self.proj_dim, self.proj_seed)
        if self.probe is not None and self.source == "per_example":
            self._choose_method(rec)

    def _choose_method(self, rec: Any) -> None:
        """``method_used``: "func" (explicit per-example gradients of every parameter), "ghost"
        (every parameter covered by :func:`~phasewatch.record.ghost.ghost_plan`) or "mixed"
        (covered ones by ghost Grams, the rest by torch.func, per-group Grams summed)."""
        if self.method == "func" or self.proj_dim or self.mask:  # (samples needed explicitly)
            self.method_used = "func"
            return
        if isinstance(rec._model, torch.nn.parallel.DistributedDataParallel):
            if self.method == "ghost":
                raise RecorderError("grad_method='ghost' is not supported on a DDP-wrapped model (its "
                                    "forward prepares a gradient reduction); use 'auto' or 'func'")
            self.method_used = "func"
            return
        covered, fallback = ghost_plan(rec._model, rec.param_names)
        if self.method == "ghost" and fallback:
            raise RecorderError(f"grad_method='ghost': parameter {fallback[0]} is not owned by Linear, "
                                "Conv1D, Conv2d, Embedding or LayerNorm modules only; use grad_method='auto' "
                                "(those parameters then go through torch.func)")
        if covered:  # a no-grad forward of two examples finds modules that see no per-example batch dim
            two = lambda t: t[:2] if isinstance(t, torch.Tensor) else t  # noqa: E731
            modes = [(m, m.training) for m in rec._model.modules()] if self.probe_eval else []
            if self.probe_eval:
                rec._model.eval()
            skipped, self.ghost_broadcast = unbatched_modules(rec._model, covered,
                                                              pytree.tree_map(two, self.probe[0]))
            for m, tr in modes:
                m.training = tr
            if skipped and self.method == "ghost":
                raise RecorderError(f"grad_method='ghost': parameter {skipped[0]} belongs to a module "
                                    "called without the examples along dim 0; use grad_method='auto'")
            fallback = [n for n in rec.param_names if n in set(fallback) | set(skipped)]
            covered = {k: v for k, v in covered.items() if k not in skipped}
        self.ghost_covered, self.ghost_fallback = covered, fallback
        self.method_used = "func" if not covered else ("mixed" if fallback else "ghost")

    def should_compute(self, step: int) -> bool:
        """True at the steps this quantity runs after."""
        return self.source == "per_example" and self.schedule(step)  # (micro-batch: before the step)

    def config(self, rec: Any) -> dict:
        """The recorder metadata keys of this quantity."""
        return {
            "grad_samples_every": self.describe() if self.on else None,
            "grad_samples_source": self.source, "grad_samples_max": self.samples_max,
            "grad_probe_size": None if self.probe is None else _probe_size(self.probe[0]),
            "grad_chunk": self.chunk, "grad_probe_eval": self.probe_eval,
            "grad_microbatch_size": None if math.isnan(self.microbatch_size) else self.microbatch_size,
            "grad_microbatch_scale": self.microbatch_scale, "grad_mask": self.mask_meta,
            "grad_proj": self.projector.describe() if self.projector is not None else None,
            "grad_method": self.method, "grad_method_used": self.method_used,
            "grad_method_fallback": list(self.ghost_fallback) if self.method_used == "mixed" else [],
        }

    def compute(self, rec: Any, step: int) -> None:
        """The work of a scheduled step, after ``optimizer.step()``."""
        _per_example_samples(rec, self, step)

    def before_step(self, rec: Any, step: int) -> None:
        """Before the optimizer step ``step``: the micro-batch samples captured at backward time."""
        if self.capture is not None and self.capture.armed and rec._shard is None:  # (FSDP: the shard's hook)
            _micro_batch_samples(rec, self, step)

    def arm(self, rec: Any) -> None:
        """Install the per-parameter accumulate hooks for the coming step if it is scheduled."""
        if self.capture is None or rec._shard is not None:  # (FSDP: armed by the shard's step hook)
            return
        if self.schedule(rec.step + 1):
            self.capture.arm()
        else:
            self.capture.disarm()

    def write_proj_row(self, rec: Any, step: int, samples: list[torch.Tensor], n_finite: int) -> None:
        """The ``grad_proj`` row of a measurement (projected, centred samples; see SampleProjector)."""
        import numpy as np

        row = self.projector.row(samples, self.samples_max, n_finite)
        if row is not None:
            rec.writer.append("grad_proj", step=np.array([step], dtype="i8"), n=np.array([row["n"]], dtype="i8"),
                              mean=row["mean"][None], samples=row["samples"][None])


def _per_example_samples(rec: Any, gn: GradNoise, step: int) -> None:
    model = rec._model
    modes = None
    if gn.probe_eval:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
    else:
        bn = training_batchnorm(model)
        if bn:
            raise RecorderError(f"grad_probe: BatchNorm {bn[0]} is in training mode; per-example "
                                "gradients are undefined (pass grad_probe_eval=True)")
    try:
        inputs, targets = gn.probe
        if gn.method_used in ("ghost", "mixed"):
            st = _ghost_statistics(rec, gn, inputs, targets)
            samples = None
        else:
            samples = apply_masks(per_example_gradients(model, rec.param_names, inputs, targets,
                                                        gn.loss, gn.chunk), gn.masks)
    finally:
        if modes is not None:
            for m, tr in modes:
                m.training = tr
    if samples is not None:
        st = gram_statistics(samples, rec._param_group, len(rec.group_labels), gn.samples_max)
    if st is not None and gn.projector is not None:
        gn.write_proj_row(rec, step, samples, st["n"])
    del samples
    if st is None:
        log.debug("phasewatch: step %d: fewer than 2 finite per-example gradients; no grad_samples row",
                  step)
        return
    rec._write_grad_row(step, "per_example", 1.0, st)


def _ghost_statistics(rec: Any, gn: GradNoise, inputs: Any, targets: Any) -> dict | None:
    """Statistics from ghost Grams of the covered parameters plus, for the others, the Grams of
    their torch.func per-example gradients (summed per group)."""
    group = dict(zip(rec.param_names, rec._param_group))
    L = len(rec.group_labels)
    Ms, skipped = ghost_grams(rec._model, gn.ghost_covered, group, L, inputs, targets, gn.loss,
                              gn.ghost_broadcast)
    if skipped:  # (not seen by the forward at bind: move them to torch.func from now on)
        log.info("phasewatch: ghost Grams: %s ran without a per-example batch dim; torch.func for them",
                 ", ".join(skipped))
        gn.ghost_fallback = [n for n in rec.param_names if n in set(gn.ghost_fallback) | set(skipped)]
        gn.ghost_covered = {k: v for k, v in gn.ghost_covered.items() if k not in skipped}
    if gn.ghost_fallback:
        samples = per_example_gradients(rec._model, gn.ghost_fallback, inputs, targets, gn.loss, gn.chunk)
        with torch.no_grad():
            for name, s_ in zip(gn.ghost_fallback, samples):
                add_gram64(s_.reshape(s_.shape[0], -1), Ms[group[name]])
        del samples
    return gram_matrix_statistics(Ms, gn.samples_max)


def _micro_batch_samples(rec: Any, gn: GradNoise, step: int) -> None:
    per_param = gn.capture.take()
    counts = {int(s.shape[0]) if s.ndim else 0 for s in per_param}
    if len(counts) != 1:
        log.debug("phasewatch: step %d: parameters saw different numbers of backward passes %s; "
                  "no micro-batch grad_samples row", step, sorted(counts))
        return
    n_micro = counts.pop()
    if n_micro < 2:
        log.debug("phasewatch: step %d: %d backward pass(es) before the step; micro-batch samples "
                  "need >= 2; no grad_samples row", step, n_micro)
        return
    scale = float(n_micro) if gn.microbatch_scale == "n_micro" else float(gn.microbatch_scale)
    samples = apply_masks([s.mul_(scale) for s in per_param], gn.masks)
    del per_param
    st = gram_statistics(samples, rec._param_group, len(rec.group_labels), gn.samples_max)
    if st is None:
        log.debug("phasewatch: step %d: fewer than 2 finite micro-batch gradients; no row", step)
        return
    if gn.projector is not None:
        gn.write_proj_row(rec, step, samples, st["n"])
    rec._write_grad_row(step, "micro_batch", gn.microbatch_size, st)


def _probe_size(inputs: Any) -> int | None:
    t = inputs[0] if isinstance(inputs, (tuple, list)) and inputs else inputs
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.ndim else None
