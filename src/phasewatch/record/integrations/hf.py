"""HuggingFace ``transformers.Trainer``: record a run with one callback.

    from phasewatch.record.integrations.hf import PhasewatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[PhasewatchCallback("runs/bert", k=32, grad_samples_every=50)])
    trainer.train()

What is recorded, exactly
-------------------------
* **Steps.**  The recorder hooks the optimizer's ``step`` (the torch optimizer inside Accelerate's
  ``AcceleratedOptimizer``), so one recorded step is one optimizer step: under
  ``gradient_accumulation_steps = m`` the m micro-batches of a step make one step, and a step that a
  ``GradScaler`` skips (fp16 overflow) is not a step.  Recorded steps therefore equal
  ``state.global_step`` except after skipped fp16 steps; evaluation metrics are logged at the
  recorder's step, so they line up with the recorded band.
* **Gradients.**  The per-step gradient norms are those the optimizer sees: after the Trainer's
  clipping (``max_grad_norm``) and after unscaling (Accelerate unscales before clipping; without
  clipping the scaler unscales before calling the optimizer).  The norm *before* clipping (column
  ``grad_norm_unclipped``, which the tail analysis uses) is what the Trainer logs as
  ``grad_norm``: the callback takes it from ``on_log``, so it is recorded at every logging step
  (every step with ``logging_steps=1``; NaN at the others).  The Trainer passes it to no per-step
  callback, so between logging steps it cannot be observed; after an fp16 step skipped by the
  scaler the logged value is attributed to the last recorded step.  Micro-batch gradient samples
  (``grad_samples_every`` without a probe batch) are captured at backward time: before clipping,
  and under fp16 still multiplied by the loss scale.
* **Loss.**  The training loss of a step is what the Trainer back-propagates, from the model
  outputs' ``loss`` of each training forward pass: their mean over the step's micro-batches, or their
  sum when the Trainer passes ``num_items_in_batch`` to the model (it then does not divide by m;
  times the world size when ``average_tokens_across_devices``) — the same number as the Trainer's
  logged ``loss`` with ``logging_steps=1``.  (A model whose ``forward`` takes ``**kwargs`` but
  ignores ``num_items_in_batch`` — ``BertForSequenceClassification`` in transformers 5 — gets the
  sum from the Trainer; that is what it back-propagates and logs, so it is what is recorded.)
* **Evaluation metrics.**  Every scalar of ``on_evaluate``'s metrics (``eval_loss``,
  ``eval_accuracy`` from ``compute_metrics`` ...), without timings, throughputs and ``epoch``.

Under DDP (``torchrun --nproc_per_node R script.py``, ``ddp_backend="gloo"`` on CPU; every rank
runs the callback with the same arguments) only rank 0 writes.  The recorded gradient is the
all-reduced one the optimizer uses, the gradient of the global batch; the step's loss is averaged
over the ranks (one all-reduce of two numbers per step), the Trainer's logged loss again;
``grad_samples_every`` without a probe batch gives every rank's local micro-batch gradients,
captured before the all-reduce (source ``per_rank``: n = R × ``gradient_accumulation_steps``, b =
``per_device_train_batch_size``; pass ``grad_source="micro_batch"`` for rank 0's own micro-batches
only).  Evaluation metrics are the Trainer's, gathered over the ranks.

The recorder is built in ``on_train_begin`` from the callback's ``model`` and ``optimizer`` (the
Trainer creates the optimizer before that event).  If a Trainer version passes no optimizer, the
callback finds it at the first optimizer step (a global ``torch.optim`` step pre-hook matching the
model's parameters) and builds the recorder there, before that step's own hooks run.  A second
``train()`` call continues the same run (``resume=True``); resuming from a checkpoint starts the steps
at the checkpoint's ``global_step``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback

from ...errors import RecorderError
from ..distributed import world_size
from .common import _active, _global_mean, _sample_source, _scalar_metrics, _torch_optimizer

log = logging.getLogger("phasewatch")


class PhasewatchCallback(TrainerCallback):
    """A ``TrainerCallback`` that records the run to ``path``.

    Parameters
    ----------
    path: the run directory.
    record_loss: record each step's training loss from the model outputs (see the module docs).
    **recorder_config: passed to :class:`phasewatch.Recorder` (``k``, ``mode``, ``grad_samples_every``,
        ``snapshot_every`` ...).  With micro-batch or per-rank samples, ``grad_microbatch_size``
        defaults to ``per_device_train_batch_size``.

    ``recorder`` is the :class:`~phasewatch.Recorder` while training runs (None before).
    """

    def __init__(self, path: str | os.PathLike, *, record_loss: bool = True, **recorder_config: Any) -> None:
        self.path = path
        self.config = recorder_config
        self.record_loss = record_loss
        self.recorder = None
        self._sessions = 0
        self._losses: list[torch.Tensor] = []
        self._loss_is_share = False
        self._pending_loss: torch.Tensor | None = None
        self._fwd_handle = None
        self._discover_handle = None

    # -- building the recorder ----------------------------------------------------------------
    def _start(self, args: Any, state: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from ..recorder import Recorder

        cfg = dict(self.config)
        if cfg.get("grad_samples_every") is not None and cfg.get("grad_probe") is None:
            cfg.setdefault("grad_microbatch_size", args.per_device_train_batch_size)
        _sample_source(cfg, model)
        if self._sessions:
            cfg.setdefault("resume", True)  # a second train() continues the run in a new segment
        if state.global_step or cfg.get("resume"):
            cfg.setdefault("start_step", int(state.global_step))
        trainer_meta = {
            "framework": "transformers.Trainer",
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "max_grad_norm": float(args.max_grad_norm) if args.max_grad_norm is not None else None,
            "per_device_train_batch_size": int(args.per_device_train_batch_size),
            "world_size": int(args.world_size),
        }
        cfg["meta"] = {**(cfg.get("meta") or {}), "trainer": trainer_meta}
        self.recorder = Recorder(self.path, model, optimizer, **cfg)
        self._sessions += 1
        if self._pending_loss is not None:
            if _active(self.recorder):
                self.recorder.loss(self._pending_loss, step=self.recorder.step + 1)
            self._pending_loss = None

    def _discover(self, args: Any, state: Any, model: torch.nn.Module) -> None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        ids = {id(p) for p in model.parameters()}

        def hook(opt: torch.optim.Optimizer, a: Any, k: Any) -> None:
            # The optimizer's own pre-hooks run after the global ones, so the recorder built here
            # still sees this first step.  (The hook stays registered, inert, until on_step_end:
            # removing it now would change the dict being iterated.)
            if self.recorder is not None or _torch_optimizer(opt) is not opt:
                return
            if any(id(p) in ids for g in opt.param_groups for p in g["params"]):
                self._start(args, state, model, opt)

        self._discover_handle = register_optimizer_step_pre_hook(hook)

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RecorderError("PhasewatchCallback: the Trainer passed no model to on_train_begin")
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None
        opt = _torch_optimizer(optimizer)
        if opt is not None:
            self._start(args, state, model, opt)
        else:
            self._discover(args, state, model)
        if self.record_loss and self._fwd_handle is None:
            self._fwd_handle = model.register_forward_hook(self._forward_hook, with_kwargs=True)

    def _forward_hook(self, module: torch.nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
            self._loss_is_share = kwargs.get("num_items_in_batch") is not None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.record_loss:
            return
        losses, self._losses = self._losses, []
        value = torch.zeros((), device=args.device)
        if losses:
            v = torch.stack([x.float() for x in losses])
            if self._loss_is_share:
                value = v.sum()
                if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
                    value = value * args.world_size
            else:
                value = v.mean()
        if world_size() >= 2:
            # every rank is here once per optimizer step: the step's loss is the mean over ranks
            value = _global_mean(value, 1 if losses else 0)
        if not losses:
            return
        if self.recorder is None:
            self._pending_loss = value  # the recorder is built at this very step (optimizer discovery)
        elif _active(self.recorder):  # before the step: it belongs to the step about to be taken
            self.recorder.loss(value, step=self.recorder.step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self._discover_handle is not None and self.recorder is not None:
            self._discover_handle.remove()
            self._discover_handle = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # the Trainer logs the norm clip_grad_norm_ returned (before clipping) of the step just taken;
        # it is already a float there (the Trainer's own .item()), so recording it costs no sync
        if not _active(self.recorder) or not logs or "grad_norm" not in logs:
            return
        try:
            value = float(logs["grad_norm"])
        except (TypeError, ValueError):
            return
        self.recorder.unclipped_grad_norm(value, step=self.recorder.step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not _active(self.recorder):
            return
        vals = _scalar_metrics(metrics)
        if vals:
            self.recorder.log(self.recorder.step, **vals)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close the recorder and remove the callback's hooks (also done by ``on_train_end``)."""
        for h in (self._fwd_handle, self._discover_handle):
            if h is not None:
                h.remove()
        self._fwd_handle = self._discover_handle = None
        self._losses, self._pending_loss = [], None
        if self.recorder is not None:
            self.recorder.close()
