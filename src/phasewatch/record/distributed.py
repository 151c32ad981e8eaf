"""Per-rank gradient samples under data parallelism (DDP): the ``per_rank`` source.

Under ``DistributedDataParallel`` every rank computes the gradient of its own shard of the batch,
then the ranks all-reduce (average) it.  Those local gradients, before the all-reduce, are
independent gradient samples at one θ, for free: with R ranks and m micro-batches per step
(gradient accumulation) there are n = R·m of them, each the mean over the b examples of one
micro-batch on one rank.  Their mean is exactly the gradient the optimizer sees (before clipping),
so the consolidation ratio (DEFINITIONS §2) needs no extra computation of gradients.

How they are captured.  A tensor hook on each recorded parameter (``Tensor.register_hook``,
armed only for scheduled steps) receives the gradient that one backward pass is about to
accumulate into ``p.grad``.  DDP's reducer acts only *after* accumulation (its autograd hooks sit
on the accumulation nodes), so what the hook sees is the rank-local micro-batch gradient, before
any all-reduce.  This is used instead of a DDP communication hook (``register_comm_hook``) because
a comm hook fires only on synchronised backward passes: under ``no_sync()`` accumulation — what
HuggingFace ``Trainer``/Accelerate and Lightning do — it sees one bucket per step holding the sum of
the rank's micro-batches, so n would be R, not R·m.  The tensor hook gives every micro-batch with
or without ``no_sync``, with ``gradient_as_bucket_view``, and it leaves DDP's single comm-hook slot
free for the user's own (PowerSGD, fp16 compression ...).  Tested against brute force (each rank's
gradient of its own shard, gathered) in ``tests/record/test_distributed.py``.

How they are reduced.  At the step (optimizer pre-hook, after all backward passes; with a closure
optimizer such as Lightning's, right after the closure) each rank holds its samples X_r (m×P,
float64).  The statistics need only the n×n Gram matrix per layer group, M_l = [X_1;…;X_R]_l
[X_1;…;X_R]_lᵀ, so the samples are never gathered on one rank: in R−1 ring shifts each rank sends
its X_r to rank r+k and receives X_{r−k}, computing its own block rows of M (memory 2·m·P floats per
rank, communication (R−1)·m·P per rank, the same as an all-gather without its R·m·P memory).  The
small M is then reduced to rank 0, which computes the sufficient statistics
(:func:`~phasewatch.record.probes.gram_matrix_statistics`) and writes the ``grad_samples`` row.

Collectives.  Every rank runs the same collectives at the same scheduled steps: the schedule is
evaluated on every rank from a step counter that rank 0 broadcasts at construction (so resuming
works), and a small status all-gather precedes each exchange, so a rank whose capture failed
makes every rank skip that measurement instead of leaving the others waiting.  The sampler keeps
taking part when rank 0's recorder has disabled itself (its rows are then dropped); close the
recorder on every rank at the same point of the program.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import RecorderError
from .probes import gram_matrix_statistics
from .schedule import Schedule

log = logging.getLogger("phasewatch")

SOURCE = "per_rank"


def world_size() -> int:
    """The number of ranks of the default process group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def choose_source(grad_samples_every: Any, grad_probe: Any, grad_source: str | None) -> str | None:
    """The gradient-sample source a recorder uses: ``grad_source`` if given (checked), else
    ``per_example`` with a probe batch and ``micro_batch`` without; None when sampling is off.

    ``per_rank`` is never chosen implicitly: it runs collectives from the recorder's constructor
    on, so every rank must build the recorder, and a program that builds it on rank 0 only would
    wait forever.  The framework callbacks, which run on every rank, choose it themselves."""
    if grad_source is not None and grad_source not in ("per_example", "micro_batch", SOURCE):
        raise RecorderError(f"grad_source={grad_source!r}: use 'per_example', 'micro_batch' or 'per_rank'")
    if grad_samples_every is None:
        if grad_source is not None:
            raise RecorderError(f"grad_source={grad_source!r} is given but grad_samples_every is not; "
                                "say when to sample")
        return None
    if grad_source == "per_example" and grad_probe is None:
        raise RecorderError("grad_source='per_example' needs grad_probe=(inputs, targets)")
    if grad_source in ("micro_batch", SOURCE) and grad_probe is not None:
        raise RecorderError(f"grad_source={grad_source!r} does not use grad_probe; drop one of them")
    if grad_source == SOURCE and world_size() < 2:
        raise RecorderError("grad_source='per_rank' needs an initialised torch.distributed process group "
                            "with at least 2 ranks (call dist.init_process_group first)")
    if grad_source is not None:
        return grad_source
    return "per_example" if grad_probe is not None else "micro_batch"


def trainable_named(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """Named parameters that require grad and belong to ``optimizer``, in model order (as the
    recorder selects them, before it sorts them by layer group)."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in in_opt]


def _closure_of(args: tuple, kwargs: dict) -> Callable | None:
    c = kwargs.get("closure") if kwargs else None
    if c is None and args:
        c = args[0]
    return c if callable(c) else None


def run_after_closure(args: tuple, kwargs: dict, work: Callable[[], None]) -> tuple[tuple, dict] | None:
    """For an optimizer pre-hook: if ``step`` was given a closure (which runs forward and backward
    inside ``step``, as Lightning does), return new ``(args, kwargs)`` whose closure runs ``work``
    once, right after the first closure call; else run ``work`` now and return None."""
    closure = _closure_of(args, kwargs)
    if closure is None:
        work()
        return None
    done = []

    def wrapped(*a: Any, **k: Any) -> Any:
        out = closure(*a, **k)
        if not done:
            done.append(True)
            work()
        return out

    if kwargs and "closure" in kwargs:
        return args, {**kwargs, "closure": wrapped}
    return (wrapped, *args[1:]), dict(kwargs or {})


class PerRankSampler:
    """Capture per-rank, per-micro-batch local gradients on scheduled steps and reduce their Gram
    matrices to rank 0 (see the module docstring).  One instance per rank, built by the recorder.

    Parameters
    ----------
    model, optimizer: as given to the recorder (the DDP wrapper or its module: the parameters are
        the same tensors).
    schedule: the recorder's ``grad_samples_every``.
    scale: ``"n_micro"`` (multiply each captured gradient by the rank's number of backward passes
        m, so a sample is the micro-batch mean gradient when each micro-batch loss is divided by
        m) or a number.
    n_max: per-sample norms kept per row (the recorder's ``grad_samples_max``).
    layout: on rank 0 only: ``(names, group_of, n_groups, start_step)`` — the recorder's parameter
        order, group index per parameter and the last completed step; broadcast to the others.
    on_row: on rank 0: ``on_row(step, stats)`` receives the statistics dict of
        :func:`~phasewatch.record.probes.gram_matrix_statistics`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        scale: str | float = "n_micro",
        n_max: int = 64,
        layout: tuple[Sequence[str], Sequence[int], int, int] | None = None,
        on_row: Callable[[int, dict], None] | None = None,
    ) -> None:
        if world_size() < 2:
            raise RecorderError("per-rank gradient samples need a torch.distributed group of >= 2 ranks")
        self.rank, self.world = rank(), world_size()
        self.schedule = schedule
        self.scale = scale
        self.n_max = int(n_max)
        self.on_row = on_row
        self.enabled = True
        named = trainable_named(model, optimizer)
        if any(type(p).__name__ == "DTensor" for _, p in named):
            raise RecorderError("per-rank gradient samples support DDP (replicated parameters), not sharded "
                                "DTensor parameters (FSDP2/tensor parallel); use grad_source='micro_batch'")
        dev = named[0][1].device if named else torch.device("cpu")
        # the collective device: gloo works on CPU tensors, nccl on CUDA ones
        self._comm_dev = dev if dist.get_backend() != "gloo" else torch.device("cpu")

        # -- agree on the layout and the step counter: rank 0 broadcasts ------------------------
        head = torch.zeros(3, dtype=torch.int64)
        if self.rank == 0:
            if layout is None:
                raise RecorderError("PerRankSampler on rank 0 needs the recorder's layout")
            names, group_of, n_groups, start_step = layout
            head[:] = torch.tensor([int(start_step), len(names), int(n_groups)])
        head = self._broadcast(head)
        start_step, n_tensors, n_groups = (int(v) for v in head.tolist())
        if n_tensors != len(named):
            raise RecorderError(f"rank {self.rank} records {len(named)} parameter tensors but rank 0 records "
                                f"{n_tensors}; every rank must build the recorder on the same model and optimizer")
        order = torch.zeros(2 * n_tensors, dtype=torch.int64)
        if self.rank == 0:
            pos = {n: i for i, (n, _) in enumerate(named)}
            try:
                perm = [pos[n] for n in names]
            except KeyError as e:
                raise RecorderError(f"parameter {e} of the recorder is not a trainable model parameter") from None
            order[:] = torch.tensor(list(perm) + [int(g) for g in group_of])
        order = self._broadcast(order)
        perm, groups = order[:n_tensors].tolist(), order[n_tensors:].tolist()
        self.params = [named[i][1] for i in perm]
        self.n_groups = n_groups
        numels = [p.numel() for p in self.params]
        self.n_params = sum(numels)
        off = [0]
        for k in numels:
            off.append(off[-1] + k)
        self._offsets = off
        # column slices of the flat sample matrix per group (a group's tensors need not be adjacent)
        self._group_cols: list[list[slice]] = [[] for _ in range(n_groups)]
        for i, g in enumerate(groups):
            cols = self._group_cols[g]
            if cols and cols[-1].stop == off[i]:
                cols[-1] = slice(cols[-1].start, off[i + 1])
            else:
                cols.append(slice(off[i], off[i + 1]))
        self.step = start_step
        self._caps: list[list[torch.Tensor]] = [[] for _ in self.params]
        self._tensor_hooks: list[Any] = []
        self._opt_hooks = [optimizer.register_step_pre_hook(self._pre_hook),
                           optimizer.register_step_post_hook(self._post_hook)]
        self._arm()

    # -- capture --------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        return bool(self._tensor_hooks)

    def _arm(self) -> None:
        if not self.enabled or not self.schedule(self.step + 1):
            self._disarm()
            return
        if self.armed:
            return
        self._caps = [[] for _ in self.params]
        for i, p in enumerate(self.params):
            self._tensor_hooks.append(p.register_hook(self._make_hook(i)))

    def _make_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        caps = self._caps

        def hook(grad: torch.Tensor) -> None:
            try:
                caps[i].append(grad.detach().clone())
            except Exception as e:  # noqa: BLE001 - never break the user's backward()
                log.debug("phasewatch: per-rank capture failed (%s)", e)
                caps[i].append(None)
            # returns None: the gradient is left as it is

        return hook

    def _disarm(self) -> None:
        for h in self._tensor_hooks:
            h.remove()
        self._tensor_hooks = []

    # -- optimizer hooks -----------------------------------------------------------------------
    def _pre_hook(self, optimizer, args, kwargs):
        if not self.enabled or not self.armed:
            return None
        return run_after_closure(args, kwargs, lambda: self._measure(self.step + 1))

    def _post_hook(self, optimizer, args, kwargs) -> None:
        if not self.enabled:
            return
        self.step += 1
        self._arm()

    # -- the measurement ----------------------------------------------------------------------
    @torch.no_grad()
    def _local_samples(self) -> torch.Tensor | None:
        """The rank's samples as one (m, P) float64 matrix (scaled), or None if unusable."""
        caps, self._caps = self._caps, [[] for _ in self.params]
        self._disarm()
        counts = {len(c) for c in caps if c}
        if len(counts) != 1 or any(x is None for c in caps for x in c):
            log.debug("phasewatch: per-rank samples: parameters saw different numbers of backward passes %s",
                      sorted(counts))
            return None
        m = counts.pop()
        scale = float(m) if self.scale == "n_micro" else float(self.scale)
        X = torch.zeros(m, self.n_params, dtype=torch.float64, device=self.params[0].device)
        for i, c in enumerate(caps):
            if c:  # a parameter without gradient in this step (unused under DDP) contributes zeros
                X[:, self._offsets[i]: self._offsets[i + 1]] = torch.stack(c).reshape(m, -1).to(torch.float64)
        X.mul_(scale)
        return X

    def _gram_block(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Per group: X_l Y_lᵀ, shape (L, m_x, m_y)."""
        out = torch.zeros(self.n_groups, X.shape[0], Y.shape[0], dtype=torch.float64, device=X.device)
        for g, cols in enumerate(self._group_cols):
            for sl in cols:
                out[g] += X[:, sl] @ Y[:, sl].T
        return out

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast a CPU tensor from rank 0 (through the backend's device); returns it on CPU."""
        d = self._to_comm(t)
        dist.broadcast(d, src=0)
        return d.cpu()

    def _to_comm(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self._comm_dev else t.to(self._comm_dev)

    @torch.no_grad()
    def _measure(self, step: int) -> None:
        X = None
        try:
            X = self._local_samples()
        except Exception as e:  # noqa: BLE001 - a local failure: every rank skips this measurement
            log.debug("phasewatch: per-rank samples at step %d failed locally (%s)", step, e)
        try:
            self._exchange(step, X)
        except Exception as e:  # noqa: BLE001 - the process group itself failed: stop sampling
            self.enabled = False
            self._disarm()
            log.error("phasewatch: per-rank gradient sampling stopped on rank %d (%s: %s)", self.rank,
                      type(e).__name__, e)

    def _exchange(self, step: int, X: torch.Tensor | None) -> None:
        R, r = self.world, self.rank
        status = torch.tensor([0 if X is None else 1, 0 if X is None else X.shape[0]], dtype=torch.int64)
        gathered = [torch.zeros(2, dtype=torch.int64, device=self._comm_dev) for _ in range(R)]
        dist.all_gather(gathered, self._to_comm(status))
        st = torch.stack([g.cpu() for g in gathered])
        if not bool((st[:, 0] == 1).all()):
            if r == 0:
                log.debug("phasewatch: step %d: per-rank samples unusable on ranks %s; no grad_samples row",
                          step, torch.nonzero(st[:, 0] != 1).reshape(-1).tolist())
            return
        ms = st[:, 1].tolist()
        starts = [0]
        for m in ms:
            starts.append(starts[-1] + m)
        n = starts[-1]
        Xc = self._to_comm(X)
        rows = torch.zeros(self.n_groups, ms[r], n, dtype=torch.float64, device=X.device)
        rows[:, :, starts[r]: starts[r + 1]] = self._gram_block(X, X)
        for k in range(1, R):
            dst, src = (r + k) % R, (r - k) % R
            Y = torch.empty(ms[src], self.n_params, dtype=torch.float64, device=self._comm_dev)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, Xc, dst), dist.P2POp(dist.irecv, Y, src)])
            for q in reqs:
                q.wait()
            rows[:, :, starts[src]: starts[src + 1]] = self._gram_block(X, Y.to(X.device))
            del Y
        M = torch.zeros(self.n_groups, n, n, dtype=torch.float64, device=self._comm_dev)
        M[:, starts[r]: starts[r + 1], :] = self._to_comm(rows)
        dist.reduce(M, dst=0)
        if r != 0:
            return
        # symmetrise the assembled matrix: blocks (r, s) and (s, r) come from different ranks'
        # GEMMs, equal up to rounding
        M = 0.5 * (M + M.transpose(1, 2))
        stats = gram_matrix_statistics(M, n_max=self.n_max)
        if stats is None:
            log.debug("phasewatch: step %d: fewer than 2 finite per-rank samples; no row", step)
            return
        if self.on_row is not None:
            self.on_row(step, stats)

    def close(self) -> None:
        """Remove every hook (the capture and the optimizer hooks).  Idempotent."""
        self.enabled = False
        self._disarm()
        for h in self._opt_hooks:
            h.remove()
        self._opt_hooks = []
