"""Lightning (``lightning.pytorch``): record a run with one callback.

    from phasewatch.record.integrations.lightning import PhasewatchCallback

    trainer = L.Trainer(callbacks=[PhasewatchCallback("runs/exp", k=32)], accumulate_grad_batches=4)
    trainer.fit(module, train_loader, val_loader)

What is recorded, exactly
-------------------------
* **Steps.**  The recorder hooks the step of the (first) optimizer of ``trainer.optimizers``: one
  recorded step is one optimizer step, so the ``accumulate_grad_batches`` batches of a step make one
  step and the recorded steps equal ``trainer.global_step``.  (A step skipped by a ``GradScaler``
  under 16-bit mixed precision is not recorded.)
* **Gradients.**  Under automatic optimization Lightning calls ``optimizer.step(closure)`` and runs
  the last micro-batch's forward/backward *and its gradient clipping* inside that closure; the
  recorder runs its pre-step work when the closure returns.  So the recorded gradient norms are the
  ones the optimizer uses: after ``gradient_clip_val`` clipping and after unscaling.  With
  ``gradient_clip_val`` set, the total norm *before* clipping is recorded too (column
  ``grad_norm_unclipped``, which the tail analysis uses): computed on the device in
  ``on_before_optimizer_step``, which Lightning calls after unscaling and before clipping (one more
  pass over the gradients, no host sync).  Not recorded under FSDP or DeepSpeed (sharded
  gradients) or manual optimization (the callback hook does not run).  Micro-batch
  gradient samples are captured at backward time (before clipping; under fp16 still scaled); their
  micro-batch size b (``grad_microbatch_size``) defaults to the training dataloader's
  ``batch_size`` (else its batch sampler's, else the leading dimension of the first batch's
  tensors).
* **Loss.**  The loss Lightning back-propagates for each batch (``on_before_backward``, which it has
  divided by ``accumulate_grad_batches``), times ``accumulate_grad_batches``, averaged over the
  step's batches: the mean of the ``training_step`` losses of the step.
* **Validation metrics.**  After each validation run (not the sanity check), every scalar of
  ``trainer.callback_metrics`` (``val_loss``, ``val_acc``, and whatever else was logged), at the
  recorder's step.

Under DDP (``strategy="ddp"``, one process per device; every rank runs the callback with the same
arguments) only rank 0 writes.  The recorded gradient is the all-reduced one the optimizer uses
(the gradient of the global batch); the loss of each batch is averaged over the ranks (one
all-reduce of two numbers per backward pass), so it is the global batch's loss; gradient samples
are every rank's local micro-batch gradients (source ``per_rank``, n = ranks × batches per step,
b = the per-rank batch size).  Validation metrics are what ``callback_metrics`` holds on rank 0:
log them with ``sync_dist=True`` to record the global ones.

The recorder is built in ``on_train_start`` (the strategy has set up the optimizers and any DDP
wrapper, the training dataloader is loaded and a checkpoint's ``global_step`` restored by then; the
sanity-check validation comes before) on the ``LightningModule`` — at the first training batch if
b is read from it — and closed in ``on_fit_end`` (``teardown`` closes it too if fitting stopped on
an exception).  A second ``fit`` continues the same run (``resume=True``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import Callback

from ...errors import RecorderError
from ..distributed import world_size
from .common import (
    _active,
    _global_mean,
    _leading_dim,
    _loader_batch_size,
    _sample_source,
    _scalar_metrics,
    _torch_optimizer,
)


class PhasewatchCallback(Callback):
    """A Lightning ``Callback`` that records the run to ``path``.

    Parameters
    ----------
    path: the run directory.
    optimizer_index: which of ``trainer.optimizers`` to record (0).
    record_loss: record each step's training loss (see the module docs).
    **recorder_config: passed to :class:`phasewatch.Recorder` (``k``, ``grad_samples_every``,
        ``grad_source`` ...).  With micro-batch or per-rank samples, ``grad_microbatch_size``
        defaults to the training batch size (see the module docs).

    ``recorder`` is the :class:`~phasewatch.Recorder` while training (None before).
    """

    def __init__(self, path: str | os.PathLike, *, optimizer_index: int = 0, record_loss: bool = True,
                 **recorder_config: Any) -> None:
        super().__init__()
        self.path = path
        self.optimizer_index = int(optimizer_index)
        self.record_loss = record_loss
        self.config = recorder_config
        self.recorder = None
        self._sessions = 0
        self._deferred = False

    def on_train_start(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        self._deferred = False
        cfg = self.config
        if cfg.get("grad_samples_every") is not None and cfg.get("grad_probe") is None \
                and cfg.get("grad_microbatch_size") is None:
            b = _loader_batch_size(trainer.train_dataloader)
            if b is None:  # no batch_size to read: the first batch's leading dimension says it
                self._deferred = True
                return
            self._start(trainer, pl_module, b)
        else:
            self._start(trainer, pl_module, None)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._deferred:
            self._deferred = False
            self._start(trainer, pl_module, _leading_dim(batch))

    def _start(self, trainer, pl_module, microbatch_size: int | None) -> None:
        from ..recorder import Recorder

        opts = list(trainer.optimizers)
        if not (0 <= self.optimizer_index < len(opts)):
            raise RecorderError(f"PhasewatchCallback: optimizer_index={self.optimizer_index} but the module "
                                f"configured {len(opts)} optimizer(s)")
        opt = _torch_optimizer(opts[self.optimizer_index])
        if opt is None:
            raise RecorderError(f"PhasewatchCallback: {type(opts[self.optimizer_index]).__name__} is not a "
                                "torch.optim.Optimizer; the recorder hooks torch optimizers only")
        cfg = dict(self.config)
        if microbatch_size is not None:
            cfg["grad_microbatch_size"] = int(microbatch_size)
        _sample_source(cfg, pl_module)
        if self._sessions:
            cfg.setdefault("resume", True)
        if trainer.global_step or cfg.get("resume"):
            cfg.setdefault("start_step", int(trainer.global_step))
        cfg["meta"] = {**(cfg.get("meta") or {}), "trainer": {
            "framework": "lightning", "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "gradient_clip_val": trainer.gradient_clip_val, "world_size": int(trainer.world_size),
            "precision": str(trainer.precision)}}
        self.recorder = Recorder(self.path, pl_module, opt, **cfg)
        self._sessions += 1

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # every backward of a step happens before the step's update (the last one inside the
        # closure), so the recorder attributes these losses to the coming step
        if self.recorder is None or not self.record_loss or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        value = loss.detach().reshape(()) * trainer.accumulate_grad_batches
        if world_size() >= 2:  # every rank runs each backward: the mean over the ranks' losses
            value = _global_mean(value, 1)
        if _active(self.recorder):
            self.recorder.loss(value, step=self.recorder.step + 1)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning calls this after the closure (and after unscaling under 16-mixed) and before its
        # gradient clipping: the only place the norm before clipping can be observed
        rec = self.recorder
        if not _active(rec) or not trainer.gradient_clip_val or _torch_optimizer(optimizer) is not rec.optimizer:
            return
        if any(s in type(trainer.strategy).__name__ for s in ("FSDP", "DeepSpeed")):
            return  # sharded gradients: a local norm is not the clipped total (not recorded)
        grads = [p.grad for g in rec.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:  # on the device, as clip_grad_norm_ computes it; copied to the host once per block
            with torch.no_grad():
                total = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
            rec.unclipped_grad_norm(total, step=rec.step + 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not _active(self.recorder) or trainer.sanity_checking:
            return
        vals = _scalar_metrics(trainer.callback_metrics)
        if vals:
            self.recorder.log(self.recorder.step, **vals)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._deferred = False
        self.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.close()

    def close(self) -> None:
        """Close the recorder (also done at the end of fitting).  Idempotent."""
        if self.recorder is not None:
            self.recorder.close()
