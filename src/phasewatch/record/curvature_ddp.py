"""Curvature probes under DDP: every rank's share of the probe batch, the products all-reduced.

Under ``DistributedDataParallel`` every rank holds the same θ and its own shard (n_r examples) of
the probe batch.  The Hessian of the whole batch's mean loss is the shard-size weighted mean of
the shards' Hessians, H = Σ_r (n_r/N) H_r (N = Σ n_r), and likewise the gradient and the loss.
So one product H v is: rank 0 broadcasts v, every rank computes (n_r/N)·H_r v on its shard (by
double backward or by central differences, :mod:`phasewatch.record.hvp`), and an all-reduce sums
them.  Lanczos, the trace, the checks and the curvature along the update run on rank 0 only, on
these products (:class:`DistributedOperator`), so they equal the one-process probe on the whole
batch up to the rounding of the sum's order; rank 0 writes.

Collectives.  Rank 0 drives, the other ranks serve: at a scheduled step every rank enters
:meth:`ProbeService.session` (rank 0) or :meth:`ProbeService.serve` (the others), rank 0
broadcasts a small header per command (build an operator, one product, stop) and the others follow
it, so every rank issues the same collectives in the same order whatever rank 0's Lanczos decides;
the session always ends with a stop, also when rank 0's probe fails or is off.  A rank whose local
build or product fails contributes zeros and a failure flag; rank 0 then raises ``RuntimeError``
(as a local failing product would: ``hvp="auto"`` switches to finite differences on every rank).
The schedule is evaluated on every rank from a step counter rank 0 broadcasts when the service is
built (so resuming works; the ranks also check there that they exchange vectors of one length P),
and the service keeps taking part when rank 0's recorder has disabled itself.  Communication per product: P float64 broadcast + P float64 all-reduce.

FD products under DDP choose their step per rank (from the rank's own gradients), so FD rows are
the one-process FD probe only to FD's own error, not to rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .hvp import _as_args

log = logging.getLogger("phasewatch")

STOP, BUILD, MATVEC = 0.0, 1.0, 2.0
ROUTES = ("autograd", "fd")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (its forward has no collectives and no reducer state)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard_size(batch: Any) -> int:
    """The number of examples of a probe batch (``(inputs, targets)`` or a list of such)."""
    chunks = batch if isinstance(batch, list) else [batch]
    n = 0
    for c in chunks:
        x = _as_args(c[0])[0]
        n += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
    return n


class ProbeService:
    """One per rank.  ``factory(route, seed)`` builds this rank's local operator on its shard
    (``batch``, ``n_r`` examples); ``device`` is where the collectives' tensors live (CPU for gloo,
    the rank's GPU for NCCL)."""

    def __init__(self, factory: Callable[[str, int], Any], batch: Any, n: int, device: torch.device):
        self.factory, self.n, self.device = factory, int(n), torch.device(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.n_local = shard_size(batch)
        self._ops: dict[int, tuple[Any, float]] = {}
        self._next_id = 0
        self.off = False

    # -- the commands, run on every rank -------------------------------------------------------
    def _header(self, cmd: float = 0.0, op_id: int = 0, route: int = 0, seed: int = 0) -> torch.Tensor:
        """[command, operator id, route index, seed], broadcast from rank 0 (exact in float64)."""
        h = torch.tensor([cmd, op_id, route, seed], dtype=torch.float64, device=self.device)
        dist.broadcast(h, 0)
        return h

    def _build(self, op_id: int, route: str, seed: int) -> torch.Tensor:
        """Build the local operator; all-reduce [n_r·g_r, n_r, n_r·L_r, failed] (summed)."""
        buf = torch.zeros(self.n + 3, dtype=torch.float64, device=self.device)
        try:
            op = self.factory(route, seed)
            buf[: self.n] = op.gradient.to(self.device) * self.n_local
            buf[self.n + 1] = self.n_local * op.loss
            self._ops[op_id] = (op, float(self.n_local))
        except Exception as e:  # noqa: BLE001 - reported to rank 0 through the flag
            log.debug("phasewatch: rank %d: building the curvature operator failed (%s)", self.rank, e)
            buf.zero_()
            buf[self.n + 2] = 1.0
        buf[self.n] = self.n_local
        dist.all_reduce(buf)
        total = float(buf[self.n])
        if op_id in self._ops:
            self._ops[op_id] = (self._ops[op_id][0], self.n_local / total)
        return buf

    def _matvec(self, op_id: int, v: torch.Tensor | None) -> torch.Tensor:
        """Receive v, all-reduce [w_r·H_r v, w_r·err_r, failed]."""
        if v is None:
            v = torch.empty(self.n, dtype=torch.float64, device=self.device)
        dist.broadcast(v, 0)
        buf = torch.zeros(self.n + 2, dtype=torch.float64, device=self.device)
        try:
            op, w = self._ops[op_id]
            buf[: self.n] = op.matvec(v).to(self.device, torch.float64) * w
            errs = getattr(op, "error_estimates", None)
            buf[self.n] = w * errs[-1] if errs else 0.0
        except Exception as e:  # noqa: BLE001 - reported to rank 0 through the flag
            log.debug("phasewatch: rank %d: a curvature product failed (%s)", self.rank, e)
            buf.zero_()
            buf[self.n + 1] = 1.0
        dist.all_reduce(buf)
        return buf

    def serve(self) -> None:
        """Ranks != 0: follow rank 0's commands until it says stop."""
        try:
            while True:
                cmd, op_id, route, seed = (float(x) for x in self._header())
                if cmd == STOP:
                    break
                if cmd == BUILD:
                    self._build(int(op_id), ROUTES[int(route)], int(seed))
                elif cmd == MATVEC:
                    self._matvec(int(op_id), None)
        finally:
            self._ops.clear()

    def session(self, probe: Callable[[], None]) -> None:
        """Rank 0: run ``probe()`` (which builds :class:`DistributedOperator` s), then stop the
        others, whatever happened."""
        try:
            probe()
        finally:
            self._ops.clear()
            self._header(STOP)

    # -- rank 0's side ---------------------------------------------------------------------------
    def operator(self, route: str, seed: int) -> DistributedOperator:
        """Rank 0: a new all-reduced operator by ``route`` (every rank builds its local one)."""
        return DistributedOperator(self, route, seed)


class DistributedOperator:
    """Rank 0's view of H = Σ_r (n_r/N) H_r: the attributes the probe reads (``n``, ``loss``,
    ``gradient``, ``route``, ``device``, ``n_matvec``, ``matvec``, for FD ``noise_floor`` and
    ``error_estimates``, the shard-weighted sum of the ranks' estimates)."""

    def __init__(self, service: ProbeService, route: str, seed: int):
        self.service, self.route = service, route
        self.id = service._next_id
        service._next_id += 1
        service._header(BUILD, self.id, ROUTES.index(route), int(seed))
        buf = service._build(self.id, route, int(seed))
        if float(buf[-1]) > 0:
            raise RuntimeError(f"the curvature operator ({route}) could not be built on {int(buf[-1])} rank(s)")
        total = float(buf[service.n])
        self.n, self.device = service.n, service.device
        self.gradient = buf[: service.n] / total
        self.loss = float(buf[service.n + 1]) / total
        self.n_matvec = 0
        self.error_estimates: list[float] = []
        local = service._ops[self.id][0]
        self.noise_floor = getattr(local, "noise_floor", 0.0)
        self.mode = getattr(local, "mode", None)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v = Σ_r (n_r/N) H_r v (float64, on the service's device); RuntimeError if a rank failed."""
        s = self.service
        s._header(MATVEC, self.id)
        buf = s._matvec(self.id, v.detach().to(s.device, torch.float64).contiguous().clone())
        if float(buf[-1]) > 0:
            raise RuntimeError(f"a curvature product failed on {int(buf[-1])} rank(s)")
        self.n_matvec += 1
        self.error_estimates.append(float(buf[s.n]))
        return buf[: s.n]

    __call__ = matvec


class DistributedSchedule:
    """Every rank: count optimizer steps (from rank 0's counter, broadcast once here) and, at the
    scheduled ones, run the probe session (rank 0: ``on_probe(step)``) or serve it (the others)."""

    def __init__(self, service: ProbeService, optimizer: torch.optim.Optimizer, schedule: Callable[[int], bool],
                 start_step: int, on_probe: Callable[[int], None] | None = None):
        self.service, self.schedule, self.on_probe = service, schedule, on_probe
        t = torch.tensor([float(start_step)], dtype=torch.float64, device=service.device)
        dist.broadcast(t, 0)
        self.step = int(t.item())
        # every rank must exchange vectors of the same length P: agree, or nobody probes
        sizes = torch.tensor([float(service.n), -float(service.n)], dtype=torch.float64, device=service.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if float(sizes[0]) != -float(sizes[1]):
            service.off = True
            log.error("phasewatch: the ranks record different numbers of parameters (%d to %d) for the curvature "
                      "probes; build the recorder on the same model and optimizer on every rank (probes are off)",
                      int(-sizes[1]), int(sizes[0]))
        self.handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self.service.off or not self.schedule(self.step):
            return
        probe_error: list[BaseException] = []

        def probe() -> None:
            try:
                if self.on_probe is not None:
                    self.on_probe(self.step)
            except Exception as e:  # noqa: BLE001 - raised below, after the others are released
                probe_error.append(e)

        try:
            if self.service.rank == 0:
                self.service.session(probe)
            else:
                self.service.serve()
        except Exception as e:  # noqa: BLE001 - a collective failed: this rank leaves the protocol
            self.service.off = True
            log.error("phasewatch: distributed curvature probes stopped on rank %d (%s: %s)", self.service.rank,
                      type(e).__name__, e)
        if probe_error:  # the recorder's own choice (strict): the other ranks are already released
            raise probe_error[0]

    def close(self) -> None:
        """Remove the step hook."""
        self.handle.remove()


def ddp_active(sharded: bool = False) -> bool:
    """A torch.distributed group of ≥ 2 ranks with replicated (DDP) parameters."""
    return (not sharded and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def make_service(model: torch.nn.Module, params: list[torch.Tensor], loss_fn: Callable, batch: Any,
                 mode: str) -> ProbeService:
    """This rank's service: local operators on its shard ``batch`` of the probe batch, over
    ``params`` in the order rank 0 records them (the flat vectors are exchanged in that order)."""
    from torch.utils import _pytree as pytree

    from .curvature import hessian_operator

    net = unwrap(model)
    dev = params[0].device if dist.get_backend() == "nccl" else torch.device("cpu")
    batch = pytree.tree_map(lambda t: t.to(params[0].device) if isinstance(t, torch.Tensor) else t, batch)

    def factory(route: str, seed: int):
        return hessian_operator(net, loss_fn, batch, params=params, mode=mode, hvp=route, seed=seed)

    return ProbeService(factory, batch, sum(p.numel() for p in params), dev)
