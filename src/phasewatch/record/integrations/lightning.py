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
  ones the optimizer uses: after ``gradient_clip_val`` clipping and after unscaling.  Micro-batch
  gradient samples are captured at backward time (before clipping; under fp16 still scaled).  Under
  DDP only rank 0 writes and the samples are every rank's local micro-batch gradients (``per_rank``).
* **Loss.**  The loss Lightning back-propagates for each batch (``on_before_backward``, which it has
  divided by ``accumulate_grad_batches``), times ``accumulate_grad_batches``, averaged over the
  step's batches: the mean of the ``training_step`` losses of the step.
* **Validation metrics.**  After each validation run (not the sanity check), every scalar of
  ``trainer.callback_metrics`` (``val_loss``, ``val_acc``, and whatever else was logged), at the
  recorder's step.

The recorder is built in ``on_fit_start`` (the strategy has set up the optimizers and any DDP
wrapper by then) on the ``LightningModule`` and closed in ``on_fit_end`` (``teardown`` closes it too
if fitting stopped on an exception).  A second ``fit`` continues the same run (``resume=True``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import Callback

from ...errors import RecorderError
from . import _sample_source, _scalar_metrics, _torch_optimizer


class PhasewatchCallback(Callback):
    """A Lightning ``Callback`` that records the run to ``path``.

    Parameters
    ----------
    path: the run directory.
    optimizer_index: which of ``trainer.optimizers`` to record (0).
    record_loss: record each step's training loss (see the module docs).
    **recorder_config: passed to :class:`phasewatch.Recorder`.

    ``recorder`` is the :class:`~phasewatch.Recorder` while fitting (None before).
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

    def on_fit_start(self, trainer, pl_module) -> None:
        from ..recorder import Recorder

        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        opts = list(trainer.optimizers)
        if not (0 <= self.optimizer_index < len(opts)):
            raise RecorderError(f"PhasewatchCallback: optimizer_index={self.optimizer_index} but the module "
                                f"configured {len(opts)} optimizer(s)")
        opt = _torch_optimizer(opts[self.optimizer_index])
        if opt is None:
            raise RecorderError(f"PhasewatchCallback: {type(opts[self.optimizer_index]).__name__} is not a "
                                "torch.optim.Optimizer; the recorder hooks torch optimizers only")
        cfg = dict(self.config)
        _sample_source(cfg)
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
        if self.recorder is not None and self.record_loss and isinstance(loss, torch.Tensor):
            self.recorder.loss(loss.detach() * trainer.accumulate_grad_batches, step=self.recorder.step + 1)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.recorder is None or trainer.sanity_checking:
            return
        vals = _scalar_metrics(trainer.callback_metrics)
        if vals:
            self.recorder.log(self.recorder.step, **vals)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self.close()

    def close(self) -> None:
        """Close the recorder (also done at the end of fitting).  Idempotent."""
        if self.recorder is not None:
            self.recorder.close()
