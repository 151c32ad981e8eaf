"""The recorder: one line attaches it to any PyTorch training loop.

    rec = phasewatch.Recorder("runs/exp1", model, optimizer)
    for x, y in data:
        loss = loss_fn(model(x), y)
        loss.backward()
        rec.loss(loss)          # before or after optimizer.step(): detected on the first call
        optimizer.step()
        optimizer.zero_grad()
    rec.close()                 # or `with phasewatch.Recorder(...) as rec:`

It hooks ``optimizer.step`` (``register_step_pre_hook``/``register_step_post_hook``), so it sees
exactly the steps the optimizer takes and the gradients it sees: after gradient accumulation, after
clipping, and after a ``GradScaler`` has unscaled them (a step the scaler skips is not a step).
With ``optimizer.step(closure)`` (Lightning, LBFGS), where backward runs inside the step, the
pre-step work runs when the (first) closure call returns.

Per recorded update u_t = θ_t − θ_{t−stride} it computes the band b_t[j] = ⟨u_t, u_{t−j}⟩, j < K,
per layer group, in float64.  Updates live in a ring of K−1+B rows on the parameters' device; every
B updates one matrix product (ring × the B new rows) yields B band rows at once.  That turns K
memory-bound dot products per step into a compute-bound GEMM, the main reason the recorder is cheap.
When the ring would exceed ``memory_budget`` it holds a seeded sign-fold projection of each large
parameter tensor instead (see :mod:`phasewatch.record.projection`), and the run says so.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import RecorderError
from ..store import format as fmt
from ..store.reader import open_run
from ..store.writer import Critical, RunWriter
from . import fsdp, signals
from .distributed import PerRankSampler, run_after_closure, trainable_named
from .drain import DrainMixin
from .quantities import Checkpoints, Controllers, Curvature, GradNoise, Quantity, Snapshots, resolve
from .quantities.base import json_safe
from .ring import RingMixin
from .sharding import NO_SHARDING, SingleProcess

log = logging.getLogger("phasewatch")


def _group_of(name: str, groups: None | dict | Callable[[str], str]) -> str:
    if groups is None:
        return name
    if callable(groups):
        return str(groups(name))
    for label, members in groups.items():
        for m in members:
            if name == m or name.startswith(m + "."):  # a parameter, or every parameter of a module
                return label
    return "other"


class Recorder(RingMixin, DrainMixin):
    """Record a training run to a phasewatch run directory.

    Parameters
    ----------
    path: run directory to create (or to continue with ``resume=True``).
    model, optimizer: the model (for parameter names) and the optimizer whose steps are recorded.
        Parameters that require grad and belong to the optimizer are recorded.
    quantities: the scheduled work as objects (:mod:`phasewatch.record.quantities`):
        ``[Snapshots(every=...), Checkpoints(every=...), GradNoise(every=..., probe=..., loss=...),
        Curvature(every=..., batch=..., loss=...), Controllers([...], batch_size=...)]``, at most one
        of each kind, plus any :class:`~phasewatch.record.quantities.Quantity` of your own (its
        ``compute(recorder, step)`` runs after the steps its schedule names).  The keyword arguments
        below (``snapshot_*``, ``checkpoint_every``, ``grad_*``, ``curvature_*``, ``ntk_*``,
        ``controllers``, ``batch_size``) build the same objects and record the same run; a kind
        given both ways is refused.
    k: band length K: inner products of each update with itself and the K−1 previous ones (32).
    stride: record displacements θ_t − θ_{t−stride} every ``stride`` steps (1).
    block: B, updates per band GEMM (16); rows reach the writer every B recorded updates.
    mode: ``"auto"`` (exact if the ring fits ``memory_budget``), ``"exact"`` or ``"projected"``.
    memory_budget: bytes allowed for the ring buffer in ``auto`` mode (512 MiB).
    proj_dim, proj_seed: fold dimension d per parameter tensor and seed for ``projected`` mode;
        tensors with at most d elements are kept exact.
    groups: layer groups: ``None`` (one per parameter tensor), a dict label -> list of parameter
        names or prefixes, or a callable name -> label.
    flush_rows, flush_seconds: write to disk every this many rows or seconds (256, 5 s).
    fsync: what survives a power loss: ``"never"`` (the OS writes back when it likes),
        ``"segment"`` (default: every closed segment and ``meta.json``) or ``"flush"`` (every
        committed row; two fsyncs per flush).  A crash of the process alone loses nothing committed
        under any policy.
    min_free_bytes: stop recording (logged once, committed rows kept) rather than leave less free
        space than this on the run's disk (64 MiB; 0: until the disk is full).
    resume: continue an existing run in a new segment; steps continue from the last recorded step
        unless ``start_step`` says where training resumed.
    strict: re-raise the recorder's own errors (for tests) instead of disabling it.
    seeds, meta: anything to store in the run's metadata.
    **options: the quantities in keyword form (``snapshot_*``, ``checkpoint_every``, ``grad_*``,
        ``curvature_*``, ``ntk_*``, ``controllers``, ``batch_size``), each described at
        :func:`phasewatch.record.quantities.from_kwargs`; an unknown name is a ``TypeError``.
    """

    # projected mode folds θ_t (one read of θ a step); False: the fold of u_t = θ_t − θ_{t−stride} as
    # FSDP does (a copy of θ, a full-size difference), kept for benchmarks/recorder_overhead.py --ufold
    _FOLD_THETA = True

    def __init__(
        self,
        path: str | os.PathLike,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        quantities: Iterable[Quantity] | None = None,
        k: int = 32,
        stride: int = 1,
        block: int = 16,
        mode: str = "auto",
        memory_budget: int = 512 * 2**20,
        proj_dim: int = 8192,
        proj_seed: int = 0,
        groups: None | dict[str, Iterable[str]] | Callable[[str], str] = None,
        flush_rows: int = 256,
        flush_seconds: float = 5.0,
        rotate_rows: int = 1_000_000,
        rotate_seconds: float = 3600.0,
        fsync: str = "segment",
        min_free_bytes: int = 64 << 20,
        resume: bool = False,
        start_step: int | None = None,
        strict: bool = False,
        seeds: dict | None = None,
        meta: dict | None = None,
        **options: Any,
    ) -> None:
        # ``options``: the quantities' keyword form (snapshot_*, checkpoint_every, grad_*, curvature_*,
        # ntk_*, controllers, batch_size), translated by phasewatch.record.quantities.from_kwargs
        if k < 2:
            raise RecorderError(f"k={k}: the band needs K >= 2 (the window W must satisfy W <= K-1)")
        if stride < 1 or block < 1:
            raise RecorderError("stride and block must be positive integers")
        if mode not in ("auto", "exact", "projected"):
            raise RecorderError(f"mode={mode!r}: use 'auto', 'exact' or 'projected'")
        self.path = Path(path)
        self.strict = strict
        self._dist_sampler = None
        sharded = self._use_quantities(*resolve(quantities, options), model, optimizer)
        self._writes = not sharded or torch.distributed.get_rank() == 0  # ranks != 0 open no file
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_rank() != 0 and not sharded:
            self._idle_rank(model, optimizer, start_step, groups)
            return
        self.k, self.stride, self.block = int(k), int(stride), int(block)
        self.enabled = True
        self._hooks: list[Any] = []
        self._closed = False
        self._model, self.optimizer = model, optimizer
        order, param_group_idx = self._select_params(model, optimizer, groups, sharded)
        projected, dims, local_numel = self._choose_mode(mode, memory_budget, proj_dim, proj_seed, param_group_idx)
        for q in self._quantities:
            q.bind(self)
        self._init_ring(projected, local_numel)
        self._init_buffers(param_group_idx)
        # -- the run on disk ----------------------------------------------------------------
        # (under FSDP the ring row is this rank's part; stored snapshots are of the full model)
        global_dim = self._sharding.global_dim(dims, projected)
        tables = self._declare_tables(resume, n_lr=len(optimizer.param_groups), n_groups=len(order),
                                      snap_dim=self.n_params if self.snapshot_kind == "raw" else global_dim)
        run_meta = self._run_meta(model, optimizer, memory_budget, seeds, meta, (order, param_group_idx,
                                                                                projected, dims))
        self._open_writer(run_meta, tables, resume, start_step, dict(
            block_rows=flush_rows, flush_seconds=flush_seconds, rotate_rows=rotate_rows,
            rotate_seconds=rotate_seconds, fsync=fsync, min_free_bytes=min_free_bytes))
        self._attach(model, optimizer, len(order))

    # ------------------------------------------------------------------------------------------
    # construction, in steps
    def _use_quantities(self, built: dict[type, Any], extra: list, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> bool:
        """Keep the quantities (one of each built-in kind, off where not asked, plus ``extra``), check
        what depends on the process group, and say whether the parameters are FSDP2-sharded."""
        snaps, ckpt, grad, curv, ctrl = (built[t] for t in (Snapshots, Checkpoints, GradNoise, Curvature,
                                                            Controllers))
        self._snapq, self._ckptq, self._grad, self._curvq, self._ctrlq = snaps, ckpt, grad, curv, ctrl
        self._extra = extra
        self._quantities = [snaps, ckpt, grad, curv, ctrl, *extra]
        # the post-step loop: what is scheduled, in each quantity's order (snapshots: with the update)
        self._scheduled = sorted((q for q in self._quantities[1:] if q.on), key=lambda q: q.order)
        self.snapshots, self.snapshot_kind, self._snap_dtype = snaps.schedule, snaps.kind, snaps.dtype
        self.checkpoints, self.grad_samples, self.curvature = ckpt.schedule, grad.schedule, curv.schedule
        self.controllers = ctrl.controllers  # phasewatch.record.control: off unless given
        self.interventions: list[Any] = []  # every change the controllers made in this session
        self._measured: list[tuple[int, float, dict]] = []  # (step, b, statistics) awaiting the controllers
        self._last_loss: Any = None  # the last loss given to loss(), for the controllers' estimates
        ctrl.check(optimizer)
        grad.resolve()  # per_example | micro_batch | per_rank | None (choose_source)
        self._grad_on = grad.on
        self._grad_source = grad.source
        self._grad_mb_size, self._grad_mb_scale = grad.microbatch_size, grad.microbatch_scale
        # FSDP2 (DTensor parameters): every rank records its shards, rank 0 writes (record/fsdp.py)
        self._shard: Any = None  # the FSDP2 strategy (record/fsdp.py), else None; see _sharding
        self._sharding: Any = NO_SHARDING
        sharded = fsdp.detect(trainable_named(model, optimizer))
        if sharded:
            # (gradient samples: the micro-batch route only, see ShardSync.sample_exchange)
            fsdp.refuse_options(grad_probe=grad.probe,
                                grad_source=grad.source if grad.source not in (None, "micro_batch") else None,
                                grad_mask=grad.mask or None, grad_proj_dim=grad.proj_dim or None,
                                ntk_inputs=curv.options["ntk_inputs"])  # curvature: record/curvature_fsdp.py
        return bool(sharded)

    # the quantities' state read by the rest of the recorder and by record/fsdp.py, distributed.py
    grad_samples_max = property(lambda self: self._grad.samples_max)
    _mb = property(lambda self: self._grad.capture)
    _proj = property(lambda self: self._grad.projector)
    _curv = property(lambda self: self._curvq.probe)
    _curv_service = property(lambda self: self._curvq.service)  # DDP: the all-reduced probe products

    def _idle_rank(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, start_step: int | None,
                   groups: Any) -> None:
        """Under DDP the parameters are the same on every rank: rank 0 records, the others idle
        (except for capturing their local gradients when per-rank samples are scheduled, and for
        serving rank 0's curvature products on their share of the probe batch)."""
        self.enabled, self._closed, self._hooks = False, True, []
        # ``step`` still counts this rank's optimizer steps (from ``start_step``, else 0: the
        # run file is rank 0's), so a loop may use rec.step on every rank
        self.step = int(start_step) if start_step is not None else 0
        optimizer.register_step_post_hook(self._count_step)
        if self._grad_source == "per_rank":
            g = self._grad
            self._dist_sampler = PerRankSampler(model, optimizer, g.schedule, scale=g.microbatch_scale,
                                                n_max=g.samples_max)
            self._closed = False  # close() removes the sampler's hooks
        c = self._curvq
        if c.on and c.options["batch"] is not None:
            # curvature probes: serve rank 0's products on this rank's share of the probe batch
            from .curvature_ddp import DistributedSchedule, make_service

            service = make_service(model, _recorded_order(model, optimizer, groups), c.options["loss_fn"],
                                   c.options["batch"], c.options["mode"])
            self._hooks.append(DistributedSchedule(service, optimizer, c.schedule, self.step).handle)
            self._closed = False  # close() removes the hook

    def _select_params(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, groups: Any,
                       sharded: bool) -> tuple[list[str], list[int]]:
        """Which parameters, in which layout: the group labels and each parameter's group."""
        order, named, missing = _recorded_layout(model, optimizer, groups)
        if not named:
            raise RecorderError("the model has no trainable parameters in this optimizer; nothing to record")
        if missing:
            log.warning("phasewatch: %d optimizer parameters are not in model.named_parameters(); "
                        "they are not recorded", missing)
        self.group_labels = order
        self.params = [p for _, (_, p) in named]
        self.param_names = [n for _, (n, _) in named]
        param_group_idx = [order.index(lbl) for lbl, _ in named]
        self._param_group = param_group_idx  # (the quantities' bind reads the layout)
        self.n_params = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        if sharded:  # a collective: agree on the layout, learn every rank's shard sizes
            self._shard = fsdp.ShardSync(self.params, self.param_names)
        self._sharding = self._shard if sharded else SingleProcess(self.params)
        return order, param_group_idx

    def _init_buffers(self, param_group_idx: list[int]) -> None:
        """Host-side buffers of the per-step path."""
        self._n_updates = 0          # updates written into the ring so far (this session)
        self._n_banded = 0           # updates whose band row has been computed
        self._pending_update_steps: list[tuple[int, float]] = []  # (step, lr) awaiting band
        self._step_rows: list[dict] = []  # per step: step, wall, lr list, grad norms tensor, losses
        self._loss_mode: str | None = None  # "before" or "after" optimizer.step()
        self._losses: dict[int, list] = {}
        self._unclipped: dict[int, float | torch.Tensor] = {}  # step -> norm before clipping
        self._unclipped_late = False  # values arrive after their step (HF's logged grad_norm)
        self._cur_grad: torch.Tensor | None = None
        self._cur_lr: list[float | torch.Tensor] = []
        self._param_group = param_group_idx
        self._warned_nonfinite = False
        self._update_norms: dict[int, float] = {}

    def _declare_tables(self, resume: bool, n_lr: int, n_groups: int, snap_dim: int) -> list:
        """The tables of the run (kept as the run on disk has them when resuming)."""
        old_tables = None
        if resume and self._writes and (self.path / fmt.META_FILE).exists():
            try:
                old_tables = json.loads((self.path / fmt.META_FILE).read_text()).get("tables")
            except Exception:  # noqa: BLE001 - the writer reports an unreadable meta.json
                old_tables = None
        # the grad_norm_unclipped column (kept off when resuming a run recorded without it)
        self._unclipped_col = not (isinstance(old_tables, dict) and isinstance(old_tables.get("steps"), dict)
                                   and "grad_norm_unclipped" not in old_tables["steps"])
        tables = [
            fmt.steps_table(n_groups, n_lr, unclipped=self._unclipped_col),
            fmt.band_table(n_groups, self.k),
            fmt.metrics_table(),
            fmt.snapshots_table(snap_dim, self._snap_dtype),
            fmt.checkpoints_table(self.n_params, "float32"),
        ]
        # grad_samples is always declared (segments are SWMR: no datasets can be added later).
        # Resuming a run recorded before the table existed: without sampling, keep its tables;
        # with sampling, say so in one line.  An existing table's n_max is kept.
        self._grad_cov = True  # the cov_eigs column (kept off when resuming a run recorded without it)
        grad_spec = fmt.grad_samples_table(n_groups, self.grad_samples_max, cov_eigs=True)
        if isinstance(old_tables, dict) and "grad_samples" not in old_tables:
            if self._grad_on:
                raise RecorderError(
                    f"{self.path}: cannot resume with grad_samples_every: the run was recorded without "
                    "a grad_samples table; resume without gradient sampling or record into a new path")
            grad_spec = None
        elif isinstance(old_tables, dict):
            old_norms = old_tables["grad_samples"].get("sample_norms")
            if old_norms and old_norms[1] and old_norms[1][0] != self.grad_samples_max:
                self._grad.samples_max = int(old_norms[1][0])
            self._grad_cov = "cov_eigs" in old_tables["grad_samples"]
            grad_spec = fmt.grad_samples_table(n_groups, self.grad_samples_max, cov_eigs=self._grad_cov)
        if grad_spec is not None:
            tables.append(grad_spec)
        proj_spec = self._grad_proj_spec(old_tables)
        if proj_spec is not None:
            tables.append(proj_spec)
        if self._curv is not None:
            if isinstance(old_tables, dict) and (("curvature" not in old_tables and self._curv.batch is not None)
                                                 or ("ntk" not in old_tables and self._curv.ntk_size)):
                raise RecorderError(f"{self.path}: cannot resume with curvature probes the run was recorded "
                                    "without; resume without them or record into a new path")
            if self._curv.batch is not None:
                if isinstance(old_tables, dict) and "hvp" not in old_tables["curvature"]:
                    self._curv.hvp_column = False  # a run recorded before the column: resume in its schema
                if isinstance(old_tables, dict) and "group_lambda" not in old_tables["curvature"] \
                        and self._curv.groups is not None:  # a run recorded without them: keep its schema
                    log.warning("phasewatch: %s was recorded without per-group curvature; the resumed run "
                                "records none (curvature_groups ignored)", self.path)
                    self._curv.groups = None
                tables.append(fmt.curvature_table(self._curv.top_k, hvp=self._curv.hvp_column,
                                                  groups=len(self._curv.groups or [])))
            if self._curv.ntk_size:
                tables.append(fmt.ntk_table(self._curv.ntk_size))
        # interventions: declared when controllers are given, and kept when resuming a run that has it
        if self.controllers and isinstance(old_tables, dict) and "interventions" not in old_tables:
            raise RecorderError(f"{self.path}: cannot resume with controllers: the run was recorded without an "
                                "interventions table; resume without controllers or record into a new path")
        if self.controllers or (isinstance(old_tables, dict) and "interventions" in old_tables):
            tables.append(fmt.interventions_table())
        if self.controllers and not self._grad_on:
            log.warning("phasewatch: controllers are given but no gradient samples (grad_samples_every): "
                        "they get no measurements and only see on_step")
        self._grad_table = grad_spec is not None
        return tables

    def _run_meta(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, memory_budget: int,
                  seeds: dict | None, meta: dict | None, layout: tuple) -> dict:
        """The run's ``meta.json``: model, optimizer, the recorder's configuration and its quantities'."""
        order, param_group_idx, projected, dims = layout
        config = {
            "k": self.k, "stride": self.stride, "block": self.block, "mode": self.mode,
            "memory_budget": memory_budget, "proj_dim": self.proj_dim if self.mode == "projected" else None,
            "proj_seed": self.proj_seed if self.mode == "projected" else None,
            "proj_method": "sign-fold" if self.mode == "projected" else None,
            "projected_tensors": [self.param_names[i] for i in self._folded],
            **self._snapq.config(self), **self._ckptq.config(self),
            "accumulate": "float64", "device": str(self.device),
            **self._grad.config(self), **self._curvq.config(self), **self._ctrlq.config(self),
            "sharding": self._sharding.describe(),
        }
        if self._extra:  # quantities beyond the built-in kinds
            config["quantities"] = [{"class": type(q).__name__, "every": json_safe(q.describe()),
                                     **json_safe(q.config(self))} for q in self._extra]
        model_meta = {
            "class": type(model).__name__,
            "n_params": self.n_params,
            "params": [
                {"name": n, "shape": list(p.shape), "numel": p.numel(), "dtype": str(p.dtype).replace("torch.", ""),
                 "group": order[g], "projected_dim": dims[i] if projected[i] else None}
                for i, (n, p, g) in enumerate(zip(self.param_names, self.params, param_group_idx))
            ],
            "groups": [
                {"name": lbl, "numel": sum(p.numel() for p, g in zip(self.params, param_group_idx) if g == gi),
                 "dim": sum(self.proj_dim if pr else p.numel() for p, pr, g in zip(self.params, projected,
                                                                                  param_group_idx) if g == gi)}
                for gi, lbl in enumerate(order)
            ],
        }
        opt_meta = {
            "class": type(optimizer).__name__,
            "defaults": json_safe({k: v for k, v in optimizer.defaults.items()}),
            "param_groups": [json_safe({k: v for k, v in g.items() if k != "params"})
                             for g in optimizer.param_groups],
        }
        opt_meta["hyper"] = opt_meta["param_groups"][0]
        run_meta = {
            "model": model_meta, "optimizer": opt_meta, "recorder": config,
            "versions": {"phasewatch": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "seeds": {"torch_initial_seed": int(torch.initial_seed()), **(json_safe(seeds or {}))},
            "user": json_safe(meta or {}),
            "command": " ".join(sys.argv),
        }
        return run_meta

    def _open_writer(self, run_meta: dict, tables: list, resume: bool, start_step: int | None,
                     writer_options: dict) -> None:
        """Open the run (rank 0 under FSDP; a NullWriter elsewhere) and learn the step to continue from."""
        last_step = 0
        if resume and self._writes and (self.path / fmt.META_FILE).exists():
            try:
                prev_run = open_run(self.path)
                st = prev_run.steps["step"]
                last_step = int(st[-1]) if len(st) else 0
            except Exception as e:  # noqa: BLE001 - resume from what can be read
                log.warning("phasewatch: could not read the run to resume (%s); steps restart at 1", e)
        writer_error = None
        try:
            self.writer = (RunWriter(self.path, run_meta, tables, resume=resume, **writer_options)
                           if self._writes else fsdp.NullWriter())
        except Exception as e:  # (raised by start(); under FSDP on every rank)
            writer_error = e
        steps_spec = getattr(getattr(self, "writer", None), "tables", {}).get("steps")
        if steps_spec is not None:  # write the column only where the run on disk has it
            self._unclipped_col = "grad_norm_unclipped" in steps_spec.columns
        self.step = int(start_step) if start_step is not None else last_step  # last completed step
        # (FSDP: a collective: rank 0's error is raised on every rank, its step kept)
        self.step = self._sharding.start(writer_error, self.step)
        self._resume_step = self.step

    def _attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, n_groups: int) -> None:
        """Hook the optimizer's steps, the exit and SIGTERM handlers, the shard's hook and the samplers."""
        self._hooks.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._hooks.append(optimizer.register_step_post_hook(self._post_hook))
        self._pid = os.getpid()
        self._critical = Critical()
        # (under FSDP: close without collectives, see record/fsdp.py)
        self._atexit = weakref.WeakMethod(self._sharding.exit_target(self).close)
        atexit.register(_close_at_exit, self._atexit)
        # SIGTERM: flush and close, then the signal's previous action
        signals.register(self._sharding.exit_target(self))
        self._sharding.setup(self)  # FSDP: its step post-hook runs after the recorder's
        self._grad.arm(self)
        if self._grad_source == "per_rank":  # a collective: every rank builds its sampler here
            self._dist_sampler = PerRankSampler(
                model, optimizer, self.grad_samples, scale=self._grad_mb_scale, n_max=self.grad_samples_max,
                layout=(self.param_names, self._param_group, n_groups, self.step), on_row=self._per_rank_row)
        if self._curv_service is not None:
            # a collective, after the sampler's as on the other ranks; its hook runs after the
            # recorder's, so the probe sees this step's update
            from .curvature_ddp import DistributedSchedule

            self._hooks.append(DistributedSchedule(self._curv_service, optimizer, self.curvature, self.step,
                                                   on_probe=self._ddp_curvature_probe).handle)

    # ------------------------------------------------------------------------------------------
    # public API
    def loss(self, value: float | torch.Tensor, step: int | None = None) -> None:
        """Record the training loss of a step.  Call it before or after ``optimizer.step()``:
        the first call tells which (before any step: the loss belongs to the coming step; after
        the first step: to the step just taken).  Several calls per step (gradient accumulation)
        are averaged."""
        if not self.enabled or not self._writes:  # (under FSDP, rank 0's loss is recorded)
            return
        try:
            if isinstance(value, torch.Tensor):
                value = value.detach()
            if step is None:
                if self._loss_mode is None:
                    self._loss_mode = "before" if self.step == self._resume_step else "after"
                step = self.step + 1 if self._loss_mode == "before" else self.step
            self._losses.setdefault(int(step), []).append(value)
            self._last_loss = (int(step), value)  # for the controllers (a float only when they need it)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def unclipped_grad_norm(self, value: float | torch.Tensor, step: int | None = None) -> None:
        """Record the gradient norm *before clipping* of a step, the value
        ``torch.nn.utils.clip_grad_norm_`` returns (the recorder itself sees the gradient the
        optimizer uses, after clipping).  Call it between clipping and ``optimizer.step()``
        (default ``step``: the coming step), e.g.
        ``rec.unclipped_grad_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))``.
        A tensor is kept on its device and copied to the host with the block's other per-step
        scalars (no sync per step).  Stored in the ``steps`` column ``grad_norm_unclipped`` (NaN at
        steps without a value); the tail analysis uses it where it is recorded (DEFINITIONS §3).
        A value for a step already taken (``step <= rec.step``) makes the recorder hold the newest
        steps row back until the next step, so that late values (the HF callback) still land."""
        if not self.enabled or not self._writes:
            return
        try:
            if isinstance(value, torch.Tensor):
                value = value.detach().reshape(())
            s = self.step + 1 if step is None else int(step)
            if s <= self.step:
                self._unclipped_late = True
            self._unclipped[s] = value
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def log(self, step: int | None = None, **metrics: float | torch.Tensor) -> None:
        """Store evaluation metrics (test accuracy, eval loss ...) at a step (default: the last
        completed step)."""
        if not self.enabled:
            return
        try:
            s = self.step if step is None else int(step)
            names, vals = [], []
            for name, v in metrics.items():
                if len(name.encode()) > 64:
                    raise RecorderError(f"metric name {name[:20]}... is longer than 64 bytes")
                names.append(name.encode())
                vals.append(float(v.detach().cpu()) if isinstance(v, torch.Tensor) else float(v))
            if names:
                self.writer.append("metrics", step=np.full(len(names), s, dtype="i8"),
                                   name=np.array(names, dtype="S64"), value=np.array(vals))
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def flush(self) -> None:
        """Compute pending band rows and write everything buffered to disk.  Under FSDP a
        collective: call it on every rank."""
        shard = self._sharding
        if not self.enabled and not self._closed and not self._forked():
            shard.ensure_met(shard.meetings)  # FSDP: a failed rank still meets the others' all-reduce
            return
        if not self.enabled or self._forked() or Critical.active():  # (a handler amid a write)
            return
        m0 = shard.meetings
        with self._critical:
            try:
                if not self._critical.torn:
                    self._drain(final=True)
                self.writer.flush(rotate=False)
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        shard.ensure_met(m0)

    def close(self) -> None:
        """Write what is pending, close the run, remove the hooks.  Idempotent.  Under FSDP a
        collective: call it on every rank."""
        if self._closed or self._forked() or Critical.active():  # (a handler amid a write)
            return
        shard = getattr(self, "_sharding", NO_SHARDING)
        m0 = shard.meetings
        if self.enabled:
            with self._critical:
                try:
                    if not self._critical.torn:  # a KeyboardInterrupt left a drain half-done
                        self._drain(final=True)
                    self.writer.close()
                except Exception as e:  # noqa: BLE001
                    self._fail(e)
        if getattr(self, "_dist_sampler", None) is not None:
            self._dist_sampler.close()  # not in _fail: the other ranks still expect its collectives
        shard.finish(m0)  # FSDP: a rank that failed still meets the others' last all-reduce
        self._remove_hooks()
        signals.unregister(self)
        self._closed = True
        self.enabled = False

    def _forked(self) -> bool:
        """In a child forked while the recorder is open (DataLoader workers ...), whose exit or
        SIGTERM handlers call close(): the run is the parent's, and torch may deadlock after a
        fork, so nothing is computed or written here."""
        return getattr(self, "_pid", None) not in (None, os.getpid())

    @property
    def should_stop(self) -> bool:
        """True once a controller (:class:`phasewatch.record.control.EarlyStopping`) decided training should
        stop; the training loop decides what to do with it (the recorder never stops training)."""
        return any(bool(getattr(c, "should_stop", False)) for c in getattr(self, "controllers", []))

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    # hooks
    def _count_step(self, optimizer, args, kwargs) -> None:
        self.step += 1  # idle DDP ranks only

    def _pre_hook(self, optimizer, args, kwargs):
        # optimizer.step(closure) runs forward/backward (and Lightning's clipping) inside step():
        # the gradients the step uses exist only once the closure has returned
        if not self.enabled:
            return None
        return run_after_closure(args, kwargs, lambda: self._before_step(optimizer))

    def _before_step(self, optimizer) -> None:
        if not self.enabled:
            return
        try:
            with torch.no_grad():
                # (under FSDP the norms of this rank's shards; the drain all-reduces their squares)
                grads = [p.grad for p in self.params if p.grad is not None]
                if self._shard is not None:
                    grads = [g.to_local() for g in grads]
                if len(grads) == len(self.params):
                    norms = torch.stack(torch._foreach_norm(grads))
                else:
                    norms = torch.stack([fsdp.local(p.grad).detach().norm() if p.grad is not None
                                         else torch.zeros((), device=p.device) for p in self.params])
                self._cur_grad = norms
            # a tensor lr (capturable optimizers, schedulers under torch.compile) is kept on its
            # device and read with the block (float() here would be a host sync every step)
            self._cur_lr = [g["lr"].detach().clone() if isinstance(g["lr"], torch.Tensor) else float(g["lr"])
                            for g in optimizer.param_groups]
            self._grad.before_step(self, self.step + 1)  # micro-batch samples (FSDP: in the shard's hook)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _post_hook(self, optimizer, args, kwargs) -> None:
        if not self.enabled:
            return
        try:
            self.step += 1
            step = self.step
            self._step_rows.append({"step": step, "wall": time.time(), "lr": self._cur_lr,
                                    "grad": self._cur_grad})
            self._cur_grad = None
            if (step - self._resume_step) % self.stride == 0:
                self._record_update(step)
            for q in self._scheduled:  # checkpoints, gradient noise, curvature, ...; controllers last
                if q.should_compute(step):
                    q.compute(self, step)
            self._grad.arm(self)
            if len(self._pending_update_steps) >= self.block and self._shard is None:  # (FSDP: ditto)
                with self._critical:  # a SIGTERM handler (close) must not run in the middle of a drain
                    self._drain(final=False)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    # ------------------------------------------------------------------------------------------
    # curvature probes
    def _ddp_curvature_probe(self, step: int) -> None:
        """Rank 0 under DDP, inside the session every rank takes part in (off or failed: a no-op)."""
        if self.enabled and self._curv is not None:
            self._curvq.compute(self, step)

    # ------------------------------------------------------------------------------------------
    # gradient samples
    def _write_grad_row(self, step: int, source: str, b: float, st: dict) -> None:
        if self.controllers:  # the controllers read these statistics at the end of the step's post-hook
            self._measured.append((step, b, st))
        if not self._grad_table:
            return
        self.writer.append(
            "grad_samples", step=np.array([step], dtype="i8"), n=np.array([st["n"]], dtype="i8"),
            b=np.array([b], dtype="f8"), source=np.array([source.encode()], dtype="S16"),
            **{k: np.array([st[k]], dtype="f8") for k in
               ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth", "third")},
            layer_mean_sq_norm=st["layer_mean_sq_norm"][None], layer_trace=st["layer_trace"][None],
            sample_norms=st["sample_norms"][None],
            **({"cov_eigs": st["cov_eigs"][None]} if self._grad_cov else {}))

    def _grad_proj_spec(self, old_tables: Any) -> fmt.TableSpec | None:
        """The ``grad_proj`` table to declare: when projections are asked for, and when resuming a run
        that has the table (the writer resumes only with the same tables).  A resumed projection must
        be the run's own (same method, d and seed), or the rows would not be comparable."""
        old = old_tables.get("grad_proj") if isinstance(old_tables, dict) else None
        if self._proj is None:
            return None if old is None else fmt.grad_proj_table(*old["samples"][1])
        if isinstance(old_tables, dict):
            try:
                old_cfg = json.loads((self.path / fmt.META_FILE).read_text()).get("recorder", {}).get("grad_proj")
            except Exception:  # noqa: BLE001 - the writer reports an unreadable meta.json
                old_cfg = None
            new_cfg = self._proj.describe()
            same = old is not None and isinstance(old_cfg, dict) and all(
                old_cfg.get(k) == new_cfg[k] for k in ("method", "dim", "seed"))
            if not same:
                raise RecorderError(f"{self.path}: cannot resume with grad_proj_dim: the run was recorded "
                                    + ("without projected samples" if old is None else
                                       "with another projection (method, d or seed)")
                                    + "; resume with the run's own projection, without it, or into a new path")
            return fmt.grad_proj_table(*old["samples"][1])
        return fmt.grad_proj_table(self.grad_samples_max, self._proj.d)

    def _per_rank_row(self, step: int, st: dict) -> None:
        """Rank 0: the statistics of the per-rank samples (phasewatch.record.distributed)."""
        if not self.enabled:
            return
        try:
            self._write_grad_row(step, "per_rank", self._grad_mb_size, st)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    # ------------------------------------------------------------------------------------------
    # failure policy
    def _fail(self, e: BaseException) -> None:
        if self.strict:
            raise e
        if getattr(self, "_sharding", NO_SHARDING).fail(self, e):  # FSDP: no collective here (record/fsdp.py)
            return
        if self.enabled:
            log.error("phasewatch: recorder disabled after an error (%s: %s); training continues, "
                      "the %s run keeps what was written", type(e).__name__, e, self.path)
        self.enabled = False
        # The hooks stay registered (they do nothing once disabled) until close(): removing them
        # here, from inside torch's loop over the optimizer's (or a tensor's) hooks, makes the
        # user's step() raise "OrderedDict mutated during iteration" when another hook follows.
        mb = getattr(self, "_mb", None)
        if mb is not None:
            mb.stop()
        writer = getattr(self, "writer", None)
        if writer is not None:
            if not getattr(writer, "failed", True):
                try:  # a probe or a hook failed, not the disk: keep the steps computed so far
                    self._drain(final=True)
                except Exception:  # noqa: BLE001
                    pass
            try:
                writer.close()  # keep what is buffered if the writer itself still works
            except Exception:  # noqa: BLE001
                writer.abandon()

    def _remove_hooks(self) -> None:
        mb = getattr(self, "_mb", None)
        if mb is not None:
            try:
                mb.disarm()
            except Exception:  # noqa: BLE001
                pass
        for h in self._hooks:
            try:
                h.remove()
            except Exception:  # noqa: BLE001
                pass
        self._hooks = []


def _close_at_exit(ref: weakref.WeakMethod) -> None:
    close = ref()
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001
            pass


def _recorded_layout(model: torch.nn.Module, optimizer: torch.optim.Optimizer, groups: Any):
    """The recorded parameters and their order — trainable, in the optimizer, grouped in order of
    first appearance — as (group labels, [(label, (name, param)), ...], optimizer parameters missing
    from ``model.named_parameters()``).  One rule for every rank, so the idle DDP ranks' share of the
    curvature probes sees rank 0's order."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in in_opt]
    labels = [_group_of(n, groups) for n, _ in named]
    order = list(dict.fromkeys(labels))
    missing = len(in_opt - {id(p) for _, p in named})
    return order, sorted(zip(labels, named), key=lambda t: order.index(t[0])), missing


def _recorded_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer, groups: Any) -> list[torch.Tensor]:
    """The recorded parameters in rank 0's order (:func:`_recorded_layout`)."""
    return [p for _, (_, p) in _recorded_layout(model, optimizer, groups)[1]]
