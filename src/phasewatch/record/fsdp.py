"""Recording a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every recorded parameter is a ``DTensor`` with placements ``(Shard(0),)`` on a 1-D
device mesh: rank r holds rows [a_r, b_r) of dim 0, i.e. one contiguous range of the tensor's
flattened (row-major) coordinates, and the ranks' ranges, in mesh order, tile the tensor.  The
recorder is built on every rank; each rank keeps only its own shard of every update in its ring
buffer (memory per rank ≈ 1/world of the single-process ring), and all the quantities the recorder
reduces over parameters are sums over coordinates, hence sums over ranks of shard-local sums:

    ⟨u_t, u_s⟩_l = Σ_r ⟨u_t^(r), u_s^(r)⟩_l        (band, per layer group l; update norms: s = t)
    ‖g_t‖²_i     = Σ_r ‖g_t^(r)‖²_i                   (gradient norms, per parameter tensor i)

Every ``block`` (B) recorded updates each rank packs its local contributions — the Gram block of
its B new ring rows against its whole ring (float64, per group), the squared local gradient norms of
the steps since the last reduction, and (projected mode) the local folds of the B new updates —
into one float64 vector; ONE ``all_reduce(SUM)`` gives the full-tensor values, and rank 0 writes.
That is one collective per B steps (≤ one per step), of (1 + G·R·B + S·T + B·D) doubles (G groups,
R ring rows, S steps, T tensors, D folded coordinates); ranks other than 0 never open the run.

Projected mode.  The sign fold (:mod:`phasewatch.record.projection`) sends global coordinate k to
bucket k mod d with the sign s_k of the tensor's seeded sign vector.  A shard starting at flat
offset a folds its coordinates with the signs s[a:a+n] and rotates the result by a mod d, so the
sum over ranks of the shard folds IS the fold of the full tensor (the fold is linear).  Inner
products of folds are not sums of shard-local inner products, so the shard folds of the new rows
travel in the same all-reduce and each rank writes the summed (full) folds into its ring; the fold
part of the band is then computed from full folds.  The projected band equals the single-process
one (same seed) up to rounding.

Snapshots and checkpoints are gathered to rank 0 on their schedule (one ``gather`` per scheduled
step, shards concatenated in mesh order, shard folds summed) and stored as full tensors, exactly as
without FSDP.

Gradient samples: the micro-batch route.  With gradient accumulation (m backward passes per step)
FSDP2 reduce-scatters after every backward (its default; with ``set_requires_gradient_sync(False)``
on some micro-batches a sample is the sum of those up to the next synced one, and with sync only on
the last, n = 1 and no row is written) and then calls the sharded parameter's
post-accumulate-grad hooks, so p.grad after backward i is the rank's shard of the all-ranks mean of
the first i micro-batch gradients, and the differences of consecutive passes are the shards of the
n = m global micro-batch gradients g_i (each over b = world × per-rank micro-batch examples).  The
Gram matrices are sums over coordinates, so each rank builds its shard-local raw Grams per layer
group, M_l^(r) = G_l^(r) G_l^(r)ᵀ (n × n), and ONE ``all_reduce(SUM)`` per scheduled step, issued in
the step post-hook on every rank (also a failed one), gives M_l = Σ_r M_l^(r); rank 0 turns them
into the ``grad_samples`` row (:func:`~phasewatch.record.probes.gram_matrix_statistics`).  The
vector's size 1 + G·n² is agreed without a collective: n is the number of hook calls, one per
reduce-scatter, itself a collective, hence the same on every rank.  Per-example probes (full-model
functional calls), per-rank samples, ``grad_mask`` and ``grad_proj_dim`` are refused.  Curvature probes run
on every rank by shard-local finite differences (:mod:`phasewatch.record.curvature_fsdp`); autograd
products, per-group curvature, an adaptive trace and ``ntk_inputs`` are refused.

Failure policy.  Every rank must meet the others at the same collectives, even after its recorder
failed: a rank whose recorder failed keeps taking part (sending zeros and status 0) until the next
all-reduce, after which every rank stops recording, rank 0 keeps what it wrote, and training goes
on.  ``flush()`` and ``close()`` are collectives: call them on every rank at the same point (``with``
does).  SIGTERM and interpreter exit close the recorder without any collective (a collective from
a signal handler could deadlock the job): the steps not yet reduced (< B) are lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..errors import RecorderError
from ..store.writer import Critical
from .dtensor import is_sharded, local

log = logging.getLogger("phasewatch")


def detect(named: Sequence[tuple[str, torch.Tensor]]) -> bool:
    """True when the recorded parameters are FSDP2-sharded DTensors, False when none is a DTensor.

    Raises :class:`RecorderError` for a mix of DTensor and plain parameters, for placements other
    than ``(Shard(0),)`` on a 1-D mesh, and for a mesh that is not the whole default group in rank
    order (HSDP, tensor or sequence parallelism)."""
    sharded = [(n, p) for n, p in named if is_sharded(p)]
    if not sharded:
        return False
    plain = [n for n, p in named if not is_sharded(p)]
    if plain:
        raise RecorderError(
            f"parameters are partly sharded: {sharded[0][0]} is a DTensor (FSDP2) but {plain[0]} is a plain "
            f"tensor ({len(plain)} of {len(named)} recorded tensors); apply fully_shard to the root module too")
    if not (dist.is_available() and dist.is_initialized()):
        raise RecorderError("the parameters are DTensors but no torch.distributed process group is initialised")
    from torch.distributed.tensor import Shard

    world = dist.get_world_size()
    for n, p in sharded:
        mesh, placements = p.device_mesh, tuple(p.placements)
        if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
            raise RecorderError(
                f"parameter {n} has placements {placements} on a {mesh.ndim}-D mesh; the recorder supports FSDP2 "
                "sharding only: (Shard(0),) on a 1-D mesh (no HSDP, tensor or sequence parallelism)")
        ranks = [int(r) for r in mesh.mesh.flatten().tolist()]
        if ranks != list(range(world)):
            raise RecorderError(f"parameter {n} is sharded over ranks {ranks}; the recorder needs the FSDP mesh to "
                                f"span all {world} ranks of the default process group, in rank order")
    return True


def refuse_options(**given: Any) -> None:
    """The recorder options FSDP does not support, as one clear error each."""
    for name, value in given.items():
        if value is not None:
            what = f"{name}={value!r}" if isinstance(value, str) else name
            raise RecorderError(f"{what} is not supported for FSDP-sharded (DTensor) parameters; record without "
                                f"it (the band, gradient norms, micro-batch gradient samples, snapshots and "
                                f"checkpoints and curvature probes by finite differences are supported)")


class NullWriter:
    """The writer of ranks other than 0: it accepts rows and writes nothing (opens no file)."""

    failed = False

    def append(self, table: str, **columns: Any) -> None:
        pass

    def flush(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class ShardSync:
    """The collectives of a recorder on FSDP2-sharded parameters (see the module docstring).

    Built by the recorder on every rank, in the same order.  The constructor agrees on the layout
    (one ``all_gather_object``: names, global shapes and every rank's local sizes; a disagreement is
    the same :class:`RecorderError` on every rank)."""

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        dev = local(params[0]).device
        # the collectives' device: gloo works on CPU tensors, nccl on CUDA ones (also when FSDP
        # offloads the shards to CPU); untested beyond gloo
        backend = str(dist.get_backend())
        self.comm_dev = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                         else torch.device("cpu") if "gloo" in backend else dev)
        info = {"names": list(names), "shapes": [list(p.shape) for p in params],
                "local": [list(local(p).shape) for p in params]}
        infos: list[Any] = [None] * self.world
        dist.all_gather_object(infos, info)
        for r, other in enumerate(infos):
            if other["names"] != infos[0]["names"] or other["shapes"] != infos[0]["shapes"]:
                raise RecorderError(f"rank {r} records other parameters than rank 0; build the recorder on every "
                                    "rank with the same model, optimizer and groups")
        for i, (n, shape) in enumerate(zip(names, info["shapes"])):
            rows = [other["local"][i] for other in infos]
            if any(s[1:] != shape[1:] for s in rows) or sum(s[0] for s in rows) != shape[0]:
                raise RecorderError(f"parameter {n} of shape {shape} has local shards {rows}: not a Shard(0) split")
        # (world, T): the number of elements of tensor i on rank r
        self.numels = np.array([[int(np.prod(s)) for s in other["local"]] for other in infos], dtype=np.int64)
        self.starts = self.numels[: self.rank].sum(axis=0)  # flat offset of this rank's shard in each tensor
        self.stopped = False   # recording stopped on every rank (or the process group broke): no more collectives
        self.failed = False    # this rank's recorder failed, or it saw another rank's failure in a gather
        self.meetings = 0      # all-reduces taken part in
        self.n_upd = 0         # updates recorded since the last all-reduce
        self.n_rows = 0        # steps since the last all-reduce
        self.step = 0
        self._rec: Any = None
        self._hooks: list[Any] = []

    # -- layout ----------------------------------------------------------------------------------
    def local_numel(self, i: int) -> int:
        return int(self.numels[self.rank, i])

    def max_local_numel(self) -> int:
        """The largest per-rank total (what the ring of the fullest rank holds)."""
        return int(self.numels.sum(axis=1).max())

    def local_signs(self, i: int, signs: torch.Tensor) -> torch.Tensor:
        """This rank's slice of tensor i's full sign vector."""
        a = int(self.starts[i])
        return signs[a: a + self.local_numel(i)].clone()

    def place_fold(self, i: int, d: int, fold: torch.Tensor, out: torch.Tensor) -> None:
        """Write the shard fold ``fold`` (buckets by local index mod d) into ``out`` by global index:
        rotated by the shard's flat offset, out[(j + a) mod d] = fold[j]."""
        s = int(self.starts[i]) % d
        if s == 0:
            out.copy_(fold)
        else:
            out[s:].copy_(fold[: d - s])
            out[:s].copy_(fold[d - s:])

    def setup(self, rec: Any) -> None:
        """After the recorder built its ring: column slices per group (exact/folded) and the hooks."""
        self._rec = rec
        self.step = rec.step
        offs, o = [], 0
        for i in range(len(rec.params)):
            w = rec._slot_views[0][i].numel()
            offs.append((o, o + w))
            o += w
        folded = set(rec._folded)
        self.n_tensors = len(rec.params)
        self.n_groups = len(rec.group_labels)
        self.exact_cols: list[list[slice]] = [[] for _ in range(self.n_groups)]
        self.fold_cols: list[list[slice]] = [[] for _ in range(self.n_groups)]
        for i, g in enumerate(rec._param_group):
            cols = (self.fold_cols if i in folded else self.exact_cols)[g]
            a, b = offs[i]
            if cols and cols[-1].stop == a:
                cols[-1] = slice(cols[-1].start, b)
            else:
                cols.append(slice(a, b))
        fidx = [j for i in sorted(folded) for j in range(*offs[i])]
        self.fold_idx = torch.tensor(fidx, dtype=torch.long, device=rec._ring.device)
        self.n_fold = len(fidx)
        self._hooks.append(rec.optimizer.register_step_post_hook(self._after_step))
        self.sample_meetings = 0  # sample all-reduces taken part in
        self._arm_samples()

    def _arm_samples(self) -> None:
        """Arm the micro-batch capture for the coming step if it is scheduled (on every rank, also a
        failed one: the hook calls give the size of the step's sample all-reduce)."""
        mb = self._rec._mb
        if mb is None:
            return
        if not self.stopped and self._rec.grad_samples(self.step + 1):
            mb.arm()
        else:
            mb.disarm()

    sharded = True

    def exit_target(self, rec: Any) -> Any:
        """What the exit and SIGTERM handlers close: this object (closes without collectives)."""
        return self

    def describe(self) -> dict:
        """The ``sharding`` entry of the run's metadata."""
        return {"kind": "fsdp2", "placement": "Shard(0)", "world_size": self.world}

    def global_dim(self, rec_dims: Sequence[int], projected: Sequence[bool]) -> int:
        """Ring dimension of the full model (what a projected snapshot stores)."""
        return int(sum(d if pr else int(self.numels[:, i].sum()) for i, (d, pr) in enumerate(zip(rec_dims, projected))))

    def start(self, error: BaseException | None, step: int) -> int:
        """Second agreement, after rank 0 created (or failed to create) the run: rank 0's error is
        raised on every rank; returns rank 0's step counter."""
        obj = [None if error is None else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
               int(step)]
        dist.broadcast_object_list(obj, src=0)
        if error is not None:
            raise error
        if obj[0] is not None:
            raise RecorderError(f"rank 0 could not create the run ({obj[0]}); no rank records")
        return int(obj[1])

    # -- per step -----------------------------------------------------------------------------------
    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer post-hook, registered after the recorder's: counts the step and meets the other
        ranks at the scheduled gathers and at every B-th update (also when this rank has failed)."""
        if self.stopped:  # (inert: hooks are removed by close(), never inside a step hook)
            return
        rec = self._rec
        self.step += 1
        self.n_rows += 1
        upd = (self.step - rec._resume_step) % rec.stride == 0
        if upd:
            self.n_upd += 1
        mb = rec._mb
        if mb is not None and mb.armed:
            self.sample_exchange(self.step)
            self._arm_samples()
            if self.stopped:
                return
        elif mb is not None:
            self._arm_samples()
        snap = upd and rec.snapshots(self.step)
        ckpt = bool(rec.checkpoints(self.step))
        if snap or ckpt:
            self._gather_event(self.step, snap, ckpt)
        if self.n_upd >= rec.block and not self.stopped:
            m0 = self.meetings
            if rec.enabled and not self.failed:
                try:
                    with rec._critical:
                        rec._drain(final=False)
                except Exception as e:  # noqa: BLE001
                    rec._fail(e)
            self.ensure_met(m0)

    def ensure_met(self, m0: int) -> None:
        """If no all-reduce happened since ``m0`` (this rank failed, or skipped its drain), take part
        in the one the other ranks are in, with status 0: then every rank stops."""
        if not self.stopped and self.meetings == m0:
            self._exchange(None, 0, 0)

    # -- the all-reduce -----------------------------------------------------------------------------
    def _size(self, nb: int, nr: int) -> int:
        rec = self._rec
        return 1 + self.n_groups * rec.rows * nb + nr * self.n_tensors + nb * self.n_fold

    def _exchange(self, vec: torch.Tensor | None, nb: int, nr: int) -> torch.Tensor | None:
        """The one all-reduce; ``vec`` None sends zeros with status 0.  Returns the sum, or None when
        recording stops (a rank failed, or the process group itself failed)."""
        if self.n_upd == 0 and self.n_rows == 0:  # nothing pending on any rank (the counters agree)
            self.meetings += 1
            return torch.full((1,), float(self.world), dtype=torch.float64) if vec is not None else None
        nb, nr = (self.n_upd, self.n_rows) if vec is None else (nb, nr)
        if vec is None:
            vec = torch.zeros(self._size(nb, nr), dtype=torch.float64)
        self.n_upd = self.n_rows = 0
        self.meetings += 1
        t = vec if vec.device == self.comm_dev else vec.to(self.comm_dev)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        except Exception as e:  # noqa: BLE001 - the group itself failed: no more collectives
            self._stop(f"the all-reduce failed on rank {self.rank} ({type(e).__name__}: {e})")
            return None
        if float(t[0]) < self.world - 0.5:
            self._stop(f"{self.world - round(float(t[0]))} rank(s) reported a recorder failure")
            return None
        return t

    @torch.no_grad()
    def reduce(self, rec: Any) -> np.ndarray | None:
        """Called by the recorder's drain on every rank: one all-reduce of the local contributions of
        the pending updates and steps.  Afterwards the pending steps carry full gradient norms and the
        ring holds full folds; returns on rank 0 the full Gram blocks (G, R, nb) of the pending updates
        (the drain turns them into band rows), elsewhere (or when recording stops) None."""
        if self.stopped:
            rec._pending_update_steps, rec._step_rows = [], []
            return None
        pend = rec._pending_update_steps
        rows = [r for r in rec._step_rows if not r.get("reduced")]
        nb, nr = len(pend), len(rows)
        vec = None
        if not self.failed and (nb, nr) == (self.n_upd, self.n_rows):
            try:
                vec = self._pack(rec, rows, nb)
            except Exception as e:  # noqa: BLE001 - a local failure: every rank stops below
                log.error("phasewatch: rank %d: local contributions failed (%s: %s)", self.rank, type(e).__name__, e)
        elif not self.failed:
            log.error("phasewatch: rank %d: %d pending updates and %d steps, expected %d and %d", self.rank,
                      nb, nr, self.n_upd, self.n_rows)
        out = self._exchange(vec, nb, nr)
        if out is None:
            rec._pending_update_steps, rec._step_rows = [], []
            return None
        out = out.cpu()
        G, R, T, D = self.n_groups, rec.rows, self.n_tensors, self.n_fold
        o = 1
        m = out[o: o + G * R * nb].view(G, R, nb)
        o += G * R * nb
        gsq = out[o: o + nr * T].view(nr, T)
        o += nr * T
        folds = out[o: o + nb * D].view(nb, D)
        for a, r in enumerate(rows):
            r["grad"], r["reduced"] = gsq[a].sqrt(), True
        if nb and D:
            slots = self._new_slots(rec, nb)
            ring = rec._ring
            for a, s in enumerate(slots.tolist()):
                ring[s].index_copy_(0, self.fold_idx, folds[a].to(ring.device))
        if self.rank != 0:
            rec._pending_update_steps, rec._step_rows = [], []
            return None
        m = m.clone()
        if nb and D:
            new = rec._ring.index_select(0, slots)
            for g, cols in enumerate(self.fold_cols):
                for sl in cols:
                    m[g] += (new[:, sl] @ rec._ring[:, sl].T).T.cpu()
        return m.numpy()

    def _new_slots(self, rec: Any, nb: int) -> torch.Tensor:
        n1 = rec._n_updates
        return (torch.arange(n1 - nb, n1) % rec.rows).to(rec._ring.device)

    def _pack(self, rec: Any, rows: list[dict], nb: int) -> torch.Tensor:
        G, R, T, D = self.n_groups, rec.rows, self.n_tensors, self.n_fold
        vec = torch.zeros(self._size(nb, len(rows)), dtype=torch.float64, device=rec._ring.device)
        vec[0] = 1.0
        o = 1
        if nb:
            ring = rec._ring
            new = ring.index_select(0, self._new_slots(rec, nb))
            m = vec[o: o + G * R * nb].view(G, R, nb)
            for g, cols in enumerate(self.exact_cols):
                for sl in cols:
                    m[g] += (new[:, sl] @ ring[:, sl].T).T
        o += G * R * nb
        for a, r in enumerate(rows):
            g = r["grad"]
            vec[o + a * T: o + (a + 1) * T] = (float("nan") if g is None
                                                else g.to(device=vec.device, dtype=torch.float64) ** 2)
        o += len(rows) * T
        if nb and D:
            vec[o: o + nb * D] = new.index_select(1, self.fold_idx).reshape(-1)
        return vec

    # -- gradient samples: the micro-batch route -------------------------------------------------
    @torch.no_grad()
    def _local_grams(self, rec: Any, n: int) -> torch.Tensor:
        """This rank's raw Gram matrices (G, n, n) of the shards of the n scaled micro-batch samples."""
        per_param = rec._mb.take()
        scale = float(n) if rec._grad_mb_scale == "n_micro" else float(rec._grad_mb_scale)
        Ms = torch.zeros(self.n_groups, n, n, dtype=torch.float64, device=rec._ring.device)
        for i, (s, g) in enumerate(zip(per_param, rec._param_group)):
            if int(s.shape[0]) != n:
                raise RecorderError(f"parameter {rec.param_names[i]}: {int(s.shape[0])} captured gradients, "
                                    f"{n} backward passes")
            flat = s.reshape(n, self.local_numel(i)).to(device=Ms.device, dtype=torch.float64)
            Ms[g] += flat @ flat.T
        return Ms.mul_(scale * scale)

    @torch.no_grad()
    def sample_exchange(self, step: int) -> None:
        """After a scheduled step, on every rank: one all-reduce of [status, shard-local Grams]; rank 0
        writes the ``grad_samples`` row (source ``micro_batch``, b = grad_microbatch_size × world)."""
        rec = self._rec
        mb = rec._mb
        calls = list(mb.calls)
        n = calls[0] if calls else 0
        if any(c != n for c in calls) or n < 2:  # the same on every rank: no collective
            mb.disarm()
            if self.rank == 0 and rec.enabled:
                log.debug("phasewatch: step %d: backward passes per parameter %s; micro-batch samples need "
                          ">= 2, the same for every parameter; no grad_samples row", step, sorted(set(calls)))
            return
        vec = torch.zeros(1 + self.n_groups * n * n, dtype=torch.float64)
        if rec.enabled and not self.failed:
            try:
                vec[1:] = self._local_grams(rec, n).reshape(-1).cpu()
                vec[0] = 1.0
            except Exception as e:  # noqa: BLE001 - a local failure: every rank stops below
                log.error("phasewatch: rank %d: micro-batch samples failed (%s: %s)", self.rank, type(e).__name__, e)
                vec.zero_()
        mb.disarm()
        self.sample_meetings += 1
        t = vec.to(self.comm_dev)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        except Exception as e:  # noqa: BLE001 - the group itself failed: no more collectives
            self._stop(f"the sample all-reduce failed on rank {self.rank} ({type(e).__name__}: {e})")
            return
        t = t.cpu()
        if float(t[0]) < self.world - 0.5:
            self._stop(f"{self.world - round(float(t[0]))} rank(s) reported a recorder failure")
            return
        if self.rank != 0:
            return
        from .probes import gram_matrix_statistics

        try:
            st = gram_matrix_statistics(t[1:].view(self.n_groups, n, n), rec.grad_samples_max)
            if st is None:
                log.debug("phasewatch: step %d: fewer than 2 finite micro-batch gradients; no row", step)
                return
            rec._write_grad_row(step, "micro_batch", rec._grad_mb_size * self.world, st)
        except Exception as e:  # noqa: BLE001
            rec._fail(e)

    # -- snapshots and checkpoints: gathered to rank 0 ---------------------------------------------
    def _pieces(self, rec: Any, snap: bool, ckpt: bool) -> list[tuple[str, np.ndarray, Any]]:
        """What each rank sends: (combine, lengths per rank, local data or None) per piece."""
        out: list[tuple[str, np.ndarray, Any]] = []
        healthy = rec.enabled and not self.failed
        if snap:
            slot = (rec._n_updates - 1) % rec.rows
            views = rec._slot_views[slot]
            for i in range(self.n_tensors):
                if i in rec._signs and rec.snapshot_kind == "projected":
                    d = rec.proj_dim
                    out.append(("sum", np.full(self.world, d), views[i].reshape(-1) if healthy else None))
                elif i in rec._signs:  # the raw update u = (u·s)·s of a folded tensor, kept in scratch
                    out.append(("cat", self.numels[:, i],
                                (rec._scratch[i] * rec._signs[i]) if healthy else None))
                else:
                    out.append(("cat", self.numels[:, i], views[i].reshape(-1) if healthy else None))
        if ckpt:
            for i, p in enumerate(rec.params):
                out.append(("cat", self.numels[:, i], local(p.detach()).reshape(-1) if healthy else None))
        return out

    @torch.no_grad()
    def _gather_event(self, step: int, snap: bool, ckpt: bool) -> None:
        rec = self._rec
        try:
            pieces = self._pieces(rec, snap, ckpt)
            ok = all(x is not None for _, _, x in pieces)
        except Exception as e:  # noqa: BLE001
            log.error("phasewatch: rank %d: snapshot/checkpoint data failed (%s)", self.rank, e)
            pieces, ok = self._pieces_failed(snap, ckpt), False
        lens = np.array([n for _, n, _ in pieces]).reshape(len(pieces), self.world)  # (pieces, world)
        per_rank = lens.sum(axis=0)
        width = 1 + int(per_rank.max())
        buf = torch.zeros(width, dtype=torch.float64)
        if ok:
            buf[0] = 1.0
            o = 1
            for _, _, x in pieces:
                buf[o: o + x.numel()] = x.reshape(-1).to("cpu", torch.float64)
                o += x.numel()
        t = buf.to(self.comm_dev)
        bufs = [torch.zeros_like(t) for _ in range(self.world)] if self.rank == 0 else None
        try:
            dist.gather(t, gather_list=bufs, dst=0)
        except Exception as e:  # noqa: BLE001
            self._stop(f"the gather failed on rank {self.rank} ({type(e).__name__}: {e})")
            return
        if self.rank != 0 or not (rec.enabled and not self.failed):
            return
        got = [b.cpu() for b in bufs]
        if any(float(b[0]) != 1.0 for b in got):
            self.failed = True  # another rank failed: say so at the next all-reduce
            return
        offs = np.zeros(self.world, dtype=np.int64)
        full = []
        for a, (how, _, _) in enumerate(pieces):
            parts = [got[r][1 + offs[r]: 1 + offs[r] + lens[a, r]] for r in range(self.world)]
            offs += lens[a]
            full.append(torch.stack(parts).sum(0) if how == "sum" else torch.cat(parts))
        n_snap = self.n_tensors if snap else 0
        try:
            if snap:
                data = torch.cat(full[:n_snap]).to(getattr(torch, rec._snap_dtype))
                rec.writer.append("snapshots", step=np.array([step]), update=data.numpy()[None])
            if ckpt:
                theta = torch.cat(full[n_snap:]).to(torch.float32)
                rec.writer.append("checkpoints", step=np.array([step]), theta=theta.numpy()[None])
        except Exception as e:  # noqa: BLE001
            rec._fail(e)

    def _pieces_failed(self, snap: bool, ckpt: bool) -> list[tuple[str, np.ndarray, Any]]:
        rec = self._rec
        out: list[tuple[str, np.ndarray, Any]] = []
        if snap:
            for i in range(self.n_tensors):
                fold = i in rec._signs and rec.snapshot_kind == "projected"
                out.append(("sum", np.full(self.world, rec.proj_dim), None) if fold
                           else ("cat", self.numels[:, i], None))
        if ckpt:
            out += [("cat", self.numels[:, i], None) for i in range(self.n_tensors)]
        return out

    # -- failure and closing ---------------------------------------------------------------------
    def fail(self, rec: Any, e: BaseException) -> bool:
        """This rank's recorder failed: stop its own work now (rank 0 keeps what it wrote); keep the
        hooks that meet the other ranks until the next all-reduce tells every rank to stop.  True:
        handled here (the recorder's own failure policy would run a collective)."""
        if rec.enabled:
            log.error("phasewatch: recorder disabled on rank %d after an error (%s: %s); every rank stops "
                      "recording at the next all-reduce, training continues", self.rank, type(e).__name__, e)
        self.failed = True
        self._disable(rec)
        return True

    def _disable(self, rec: Any) -> None:
        # the recorder's hooks stay registered, inert (enabled is False), until close(): removing an
        # optimizer hook from inside a step hook makes torch raise in the user's optimizer.step()
        # ("OrderedDict mutated during iteration") when another post-hook follows it
        rec.enabled = False
        writer = getattr(rec, "writer", None)
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                writer.abandon()

    def _stop(self, why: str) -> None:
        rec = self._rec
        self.stopped = True  # (the hooks return at once from now on; close() removes them)
        if rec is not None and getattr(rec, "_mb", None) is not None:
            rec._mb.disarm()
        if rec is not None and rec.enabled:
            log.error("phasewatch: recording stopped on rank %d: %s; what was written stays, training "
                      "continues", self.rank, why)
            self._disable(rec)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def finish(self, m0: int) -> None:
        """From the recorder's close(): meet the others' last all-reduce if this rank did not take
        part in it (it failed), then remove the hooks.  No more collectives after this."""
        from . import signals

        self.ensure_met(m0)
        self.stopped = True
        self._remove_hooks()
        signals.unregister(self)

    def close(self) -> None:
        """SIGTERM / interpreter exit: close without any collective; rank 0 keeps the rows already
        reduced, the pending ones (fewer than B steps) are lost."""
        rec = self._rec
        if rec is None or rec._closed or rec._forked() or Critical.active():
            return
        self.stopped = True  # (the hooks stay, inert: a signal may arrive amid the optimizer's hook loop)
        if rec.enabled:
            self._disable(rec)
        from . import signals

        signals.unregister(self)
        rec._closed = True
