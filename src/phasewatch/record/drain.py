"""The recorder's block drain: one device→host transfer per block, then rows to the writer.

Every B recorded updates (and at flush/close) :meth:`DrainMixin._drain` gathers what the host needs
from the block — the band Gram products, the steps' gradient norms, their losses and pre-clip norms
when given as tensors — reads it with one ``.cpu()`` per device (:func:`_to_host`), and hands
``band`` and ``steps`` rows to the writer.  A mixin of :class:`~phasewatch.record.recorder.Recorder`
with no state of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..store import format as fmt

log = logging.getLogger("phasewatch")


class DrainMixin:
    """The drain's methods of :class:`~phasewatch.record.recorder.Recorder` (no state of its own)."""

    @torch.no_grad()
    def _drain(self, final: bool) -> None:
        """Compute band rows of pending updates (one GEMM per group) and hand rows to the writer.

        Everything the host needs from the block (the band products, the steps' gradient norms,
        their losses and pre-clip norms when given as tensors) reaches it in one device→host
        transfer per device (:func:`_to_host`): the one host synchronisation of a block."""
        reduced = None
        if self._shard is not None:  # FSDP: one all-reduce of every rank's local contributions
            reduced = self._shard.reduce(self)
            if reduced is None:  # a rank other than 0 (it writes nothing), or recording stopped
                return
        pend = self._pending_update_steps
        rows = self._step_rows
        # with losses given after optimizer.step(), the newest step's loss may still come
        keep = 1 if ((self._loss_mode == "after" or self._unclipped_late) and not final) else 0
        out, self._step_rows = rows[: len(rows) - keep], rows[len(rows) - keep:]
        # -- gather on the device ------------------------------------------------------------
        tensors: list[torch.Tensor] = []
        band_at = grad_at = None
        if pend and reduced is None:
            n1 = self._n_updates
            n0 = n1 - len(pend)
            first = n0 % self.rows
            wraps = first + (n1 - n0) > self.rows  # only after a flush between block boundaries
            slots_dev = torch.arange(n0, n1, device=self.device) % self.rows if wraps else None
            per_group = []
            for sl in self._group_slices:
                block = self._ring[:, sl]
                new = block.index_select(0, slots_dev) if wraps else block[first: first + n1 - n0]
                per_group.append((new @ block.T).T)  # (R, nb): one GEMM per group and block (~20% faster)
            band_at = len(tensors)
            tensors.append(torch.stack(per_group))  # (G, R, nb)
        steps = np.array([r["step"] for r in out], dtype="i8")
        grads = [r["grad"] for r in out]
        if out and all(g is not None for g in grads):
            grad_at = len(tensors)
            tensors.append(torch.stack(grads))  # (n, n_params)
        elif out:
            grad_at = {a: len(tensors) + j for j, a in enumerate(a for a, g in enumerate(grads) if g is not None)}
            tensors += [g for g in grads if g is not None]
        pend_lr = [_slot(lr, tensors) for _, lr in pend]
        row_lr = [[_slot(v, tensors) for v in r["lr"]] for r in out]
        losses = self._take(self._losses, steps, tensors)
        unclipped = self._take(self._unclipped, steps, tensors, single=True) if self._unclipped_col else None
        host = _to_host(tensors)
        # -- on the host -----------------------------------------------------------------------
        if pend:
            self._band_rows([(s, _read(lr, host)) for (s, _), lr in zip(pend, pend_lr)],
                            reduced if band_at is None else host[band_at])
        if not out:
            return
        n = len(out)
        if isinstance(grad_at, int):
            gn = host[grad_at]
        else:
            gn = np.full((n, len(self.params)), np.nan)
            for a, j in grad_at.items():
                gn[a] = host[j]
        loss, loss_given = _values(losses, host)
        for r, lrs in zip(out, row_lr):
            r["lr"] = [_read(v, host) for v in lrs]
        self._steps_rows(out, steps, gn, loss, loss_given,
                         None if unclipped is None else _values(unclipped, host)[0])

    @staticmethod
    def _take(store: dict, steps: np.ndarray, tensors: list, single: bool = False) -> list:
        """Pop the values of ``steps`` from ``store`` (step -> value, or list of values): per step a
        list whose tensors are appended to ``tensors`` (replaced by their :class:`_At` index) and whose
        numbers stay numbers.  Values of earlier steps (never taken: a GradScaler skip) are dropped."""
        taken = []
        for s in steps.tolist():
            vals = store.pop(s, None)
            vals = [] if vals is None else ([vals] if single else list(vals))
            for a, v in enumerate(vals):
                vals[a] = _slot(v, tensors)
            taken.append(vals)
        if len(steps):
            for s in [s for s in store if s < int(steps[0])]:
                del store[s]
        return taken

    def _steps_rows(self, out: list[dict], steps: np.ndarray, gn: np.ndarray, loss: np.ndarray,
                    loss_given: np.ndarray, unclipped: np.ndarray | None) -> None:
        """The ``steps`` rows of ``out`` from host arrays: per-tensor gradient norms ``gn`` (n, T), the
        steps' mean losses (``loss_given``: a loss was given) and pre-clip norms (NaN where none was)."""
        n = len(out)
        layer_sq = np.zeros((n, len(self.group_labels)))
        np.add.at(layer_sq.T, np.asarray(self._param_group), (gn**2).T)
        grad_norm = np.sqrt(layer_sq.sum(axis=1))
        loss_nan = loss_given & np.isnan(loss)  # a loss was given and it is NaN (not merely missing)
        n_lr = len(self.optimizer.param_groups)
        lr = np.array([(r["lr"] + [np.nan] * n_lr)[:n_lr] for r in out], dtype="f8")
        has_update = np.array([s in self._update_norms for s in steps.tolist()], dtype=bool)
        upd = np.array([self._update_norms.pop(s, np.nan) for s in steps.tolist()])
        flags = np.zeros(n, dtype="i4")
        flags |= np.where(np.isinf(loss) | loss_nan, fmt.FLAG_LOSS_NONFINITE, 0).astype("i4")
        flags |= np.where(np.isfinite(grad_norm), 0, fmt.FLAG_GRAD_NONFINITE).astype("i4")
        flags |= np.where(has_update & ~np.isfinite(upd), fmt.FLAG_UPDATE_NONFINITE, 0).astype("i4")
        if np.any(flags) and not self._warned_nonfinite:
            self._warned_nonfinite = True
            bad = int(steps[np.nonzero(flags)[0][0]])
            log.warning("phasewatch: non-finite loss/gradient/update at step %d (flagged in the run; "
                        "analysis skips windows that contain it)", bad)
        extra = {"grad_norm_unclipped": unclipped} if unclipped is not None else {}
        self.writer.append("steps", step=steps, wall_time=np.array([r["wall"] for r in out]),
                           loss=loss, lr=lr, grad_norm=grad_norm, layer_grad_norm=np.sqrt(layer_sq),
                           update_norm=upd, flags=flags, **extra)


class _At(int):
    """Where a value sits in the list handed to :func:`_to_host` (a number stays a float)."""


def _slot(v: Any, tensors: list[torch.Tensor]) -> Any:
    """A tensor goes to ``tensors`` (for :func:`_to_host`) and becomes its :class:`_At` index; a
    number becomes a float."""
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return _At(len(tensors) - 1)
    return float(v)


def _read(v: Any, host: list[np.ndarray]) -> float:
    """The value of a :func:`_slot` entry once ``host`` holds the transferred tensors."""
    return float(host[v].item()) if isinstance(v, _At) else v


def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Copy tensors to the host as float64 arrays of their shapes in one transfer per device: they
    are flattened, cast and concatenated on their device, then read with a single ``.cpu()`` (the
    drain's one host synchronisation; a cast to float64 is exact from every float dtype)."""
    by_dev: dict[torch.device, list[int]] = {}
    for a, t in enumerate(tensors):
        by_dev.setdefault(t.device, []).append(a)
    out: list[Any] = [None] * len(tensors)
    for idx in by_dev.values():
        flat = torch.cat([tensors[a].detach().reshape(-1).to(torch.float64) for a in idx])
        host = flat.cpu().numpy()  # the transfer (on one line: .numpy() reads the host copy)
        o = 0
        for a in idx:
            t = tensors[a]
            out[a] = host[o: o + t.numel()].reshape(t.shape)
            o += t.numel()
    return out


def _values(taken: list[list], host: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per step the mean of its values (tensors read from ``host``), NaN where there is none; and
    whether any was given.  A tensor with more than one element is refused (numpy's ``item``)."""
    arr = np.full(len(taken), np.nan)
    given = np.zeros(len(taken), dtype=bool)
    for a, vals in enumerate(taken):
        if vals:
            given[a] = True
            arr[a] = float(np.mean([_read(v, host) for v in vals]))
    return arr, given
