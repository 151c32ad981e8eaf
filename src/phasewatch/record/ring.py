"""The recorder's ring of updates and its band rows (a mixin of :class:`~phasewatch.record.recorder.Recorder`).

The ring holds the last K−1+B recorded updates u_t = θ_t − θ_{t−stride} (or their seeded sign-fold
projections, :mod:`phasewatch.record.projection`) in float64 on the parameters' device.  This module
fills it (:meth:`RingMixin._record_update`), writes raw snapshots from it, and turns the Gram blocks the
drain computes (:mod:`phasewatch.record.drain`) into ``band`` rows b_t[j] = ⟨u_t, u_{t−j}⟩, j < K.
The mixin has no state of its own: every attribute it reads or sets is the recorder's.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from . import fsdp
from .projection import fold_chunk_rows, fold_float64, fold_signs, fold_sum

log = logging.getLogger("phasewatch")


class RingMixin:
    """The ring's methods of :class:`~phasewatch.record.recorder.Recorder` (no state of its own)."""

    def _choose_mode(self, mode: str, memory_budget: int, proj_dim: int, proj_seed: int,
                     param_group_idx: list[int]) -> tuple[list[bool], list[int], list[int]]:
        """Exact or projected: which tensors are folded, each tensor's ring width, the group slices."""
        # elements of each tensor this rank's ring sees (under FSDP its shard)
        local_numel = [self._sharding.local_numel(i) for i in range(len(self.params))]
        # ring rows R >= K-1+B, a multiple of B so that a block of new rows never wraps around
        self.rows = self.block * -(-(self.k - 1 + self.block) // self.block)
        exact_bytes = self.rows * self._sharding.max_local_numel() * 8
        if mode == "auto":
            mode = "exact" if exact_bytes <= memory_budget else "projected"
            if mode == "projected":
                log.info("phasewatch: an exact ring of %d updates would take %.2f GiB > budget %.2f GiB; "
                         "recording a sign-fold projection to d=%d per tensor (inner products within ~%.1f%%)",
                         self.rows, exact_bytes / 2**30, memory_budget / 2**30, proj_dim,
                         100 * math.sqrt(2 / proj_dim))
        self.mode = mode
        self.proj_dim, self.proj_seed = int(proj_dim), int(proj_seed)
        projected = [mode == "projected" and p.numel() > self.proj_dim for p in self.params]
        dims = [self.proj_dim if pr else n for n, pr in zip(local_numel, projected)]
        self.dim = sum(dims)
        self._offsets = offsets = np.concatenate([[0], np.cumsum(dims)]).astype(int)
        self._group_slices = []
        for g in range(len(self.group_labels)):
            idx = [i for i, gi in enumerate(param_group_idx) if gi == g]
            self._group_slices.append(slice(int(offsets[idx[0]]), int(offsets[idx[-1] + 1])))
        return projected, dims, local_numel

    def _init_ring(self, projected: list[bool], local_numel: list[int]) -> None:
        """The device state: the float64 ring, θ_{t−stride}, the fold signs and preallocated scratch."""
        with torch.no_grad():
            dev = self.device
            self._ring = torch.zeros(self.rows, self.dim, dtype=torch.float64, device=dev)
            self._exact = [i for i, pr in enumerate(projected) if not pr]
            self._folded = [i for i, pr in enumerate(projected) if pr]
            self._signs = {i: fold_signs(self.params[i].numel(), self.proj_seed, i,
                                         self.params[i].dtype, dev) for i in self._folded}
            # Folded tensors (one process): the fold of θ_t itself, in float64, one read of θ a step;
            # the ring row is fold(θ_t) − fold(θ_{t−stride}) (projection.fold_float64: error bound).
            # Under FSDP the fold of the local update u_t as before (record/fsdp.py reads the scratch).
            self._fold_theta = self._shard is None and self._FOLD_THETA
            # θ_{t-stride} in its own dtype (u_t is computed in it): exact tensors; folded ones only
            # where u_t itself is needed (raw snapshots, copied on the steps before a snapshot)
            self._raw_snaps = self._snapq.raw
            keep_prev = [i for i in range(len(self.params)) if i in self._exact or not self._fold_theta
                         or self._raw_snaps]
            self._prev = {i: fsdp.local(self.params[i].detach()).clone() for i in keep_prev}
            self._prev_fresh = True  # the folded tensors' θ_prev is θ_{t−stride} of the coming update
            # (under FSDP the signs of this rank's coordinates of each tensor)
            self._signs = {i: self._sharding.local_signs(i, s) for i, s in self._signs.items()}
            # preallocated scratch: no allocation (and no page faults) on the per-step path
            self._scratch, self._fold_out, self._theta_fold = {}, {}, {}
            if self._fold_theta and self._folded:
                self._fold_buf = torch.empty(fold_chunk_rows(self.proj_dim, dev) + 1, self.proj_dim,
                                             dtype=torch.float64, device=dev)
                for i in self._folded:  # two buffers each: fold(θ_{t−stride}) and fold(θ_t), swapped
                    self._theta_fold[i] = [fold_float64(self.params[i].detach(), self._signs[i], self.proj_dim,
                                                        torch.empty(self.proj_dim, dtype=torch.float64, device=dev),
                                                        self._fold_buf),
                                           torch.empty(self.proj_dim, dtype=torch.float64, device=dev)]
            elif self._folded:
                self._scratch = {i: torch.empty(local_numel[i], dtype=self.params[i].dtype, device=dev)
                                 for i in self._folded}
                self._fold_out = {i: torch.empty(self.proj_dim, dtype=torch.promote_types(
                    self.params[i].dtype, torch.float32), device=dev) for i in self._folded}
            # per ring slot: views of that row for each parameter (exact: shaped like the param)
            self._slot_views = []
            for r in range(self.rows):
                row = self._ring[r]
                views = {}
                for i in range(len(self.params)):
                    v = row[self._offsets[i]: self._offsets[i + 1]]
                    views[i] = v if i in self._signs else v.view(self._prev[i].shape)
                self._slot_views.append(views)

    @torch.no_grad()
    def _record_update(self, step: int) -> None:
        slot = self._n_updates % self.rows
        views = self._slot_views[slot]
        for i in self._exact:
            # u = θ_t − θ_{t−stride} in the parameters' dtype, stored in the float64 ring
            p, prev = self.params[i], self._prev[i]
            if self._shard is not None:  # FSDP: this rank's shard
                p = p.to_local()
            torch.sub(p, prev, out=views[i])
            prev.copy_(p)
        if self._fold_theta:
            for i in self._folded:  # the ring row: fold(θ_t) − fold(θ_{t−stride}), both in float64
                old, new = self._theta_fold[i]
                fold_float64(self.params[i].detach(), self._signs[i], self.proj_dim, new, self._fold_buf)
                torch.sub(new, old, out=views[i])
                self._theta_fold[i] = [new, old]
        else:
            for i in self._folded:
                p, prev, u = self.params[i], self._prev[i], self._scratch[i]
                if self._shard is not None:
                    p = p.to_local()
                torch.sub(p.reshape(-1), prev.reshape(-1), out=u)
                prev.copy_(p)
                u.mul_(self._signs[i])
                if self._shard is None:
                    views[i].copy_(fold_sum(u, self.proj_dim, self._fold_out[i]))
                else:  # the shard's part of the full fold (summed over ranks in the drain's all-reduce)
                    self._shard.place_fold(i, self.proj_dim, fold_sum(u, self.proj_dim, self._fold_out[i]),
                                           views[i])
        self._n_updates += 1
        self._pending_update_steps.append((step, self._cur_lr[0] if self._cur_lr else float("nan")))
        if self.snapshots(step) and self._shard is None:  # (FSDP: gathered by the shard's hook)
            self._snapshot(step, slot)
        if self._fold_theta and self._raw_snaps and self._folded:
            # θ_prev of the folded tensors is needed (for u_t) only when the next update is a snapshot
            self._prev_fresh = self.snapshots(step + self.stride)
            if self._prev_fresh:
                for i in self._folded:
                    self._prev[i].copy_(self.params[i].detach())

    @torch.no_grad()
    def _snapshot(self, step: int, slot: int) -> None:
        if self.snapshot_kind == "projected" or not self._folded:
            data = self._ring[slot]  # exact tensors: the raw update in layout order
        else:
            views = self._slot_views[slot]
            parts = []
            for i in range(len(self.params)):
                if i not in self._signs:
                    parts.append(views[i].reshape(-1))
                elif not self._fold_theta:  # the signed update u·s kept in the scratch buffer: s² = 1
                    parts.append((self._scratch[i] * self._signs[i]).to(torch.float64))
                elif self._prev_fresh:  # u_t = θ_t − θ_{t−stride} in the parameters' dtype
                    parts.append(torch.sub(self.params[i].detach(), self._prev[i]).reshape(-1).to(torch.float64))
                else:  # θ_{t−stride} was not kept (a schedule that changed its answer): unknown
                    parts.append(torch.full((self.params[i].numel(),), float("nan"), dtype=torch.float64,
                                            device=self.device))
            data = torch.cat(parts)
        arr = data.to(device="cpu", dtype=getattr(torch, self._snap_dtype), copy=True).numpy()[None]
        self.writer.append("snapshots", step=np.array([step]), update=arr)

    def _band_rows(self, pend: list[tuple[int, float]], m: np.ndarray) -> None:
        """Band rows of the pending updates from their Gram blocks ``m`` (G, R, nb), to the writer."""
        n1 = self._n_updates
        n0 = n1 - len(pend)
        i = np.arange(n0, n1)[:, None]
        j = np.arange(self.k)[None, :]
        src = i - j  # (nb, K)
        valid = src >= 0
        src_slot = np.where(valid, src, 0) % self.rows
        cols = np.broadcast_to(np.arange(n1 - n0)[:, None], src.shape)
        layer = m[:, src_slot, cols]  # (G, nb, K)
        layer = np.where(valid[None], layer, np.nan).transpose(1, 0, 2)
        band = layer.sum(axis=1)
        steps = np.array([s for s, _ in pend], dtype="i8")
        lrs = np.array([lr for _, lr in pend], dtype="f8")
        self.writer.append("band", step=steps, lr=lrs, band=band, layer_band=layer)
        # kept until their steps rows are written (a row may be held back for a late loss)
        # (NaN/Inf stay NaN/Inf: that is how a non-finite update is flagged below)
        self._update_norms.update(zip(steps.tolist(), np.sqrt(np.maximum(band[:, 0], 0)).tolist()))
        self._pending_update_steps = []
