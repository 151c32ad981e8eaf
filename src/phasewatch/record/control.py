"""Controllers: the framework's prescriptions as opt-in callbacks (DEFINITIONS §2 and §6).

Each controller reads the live gradient-noise estimates of one measurement (the dict made by
:func:`estimates` from the sufficient statistics the recorder already computes: no second pass over
the model) and returns the :class:`Intervention` s it made::

    ctl = PBandLR(optimizer)                       # p-band learning-rate rule, framework defaults
    for step, stats in measurements:               # the recorder does this when wired
        for iv in ctl.on_measurement(step, estimates(stats, b=1.0, loss=last_loss)):
            print(iv)                              # step, rule, param, old -> new

Rules (each parameter exposed, defaults the framework's):

* :class:`PBandLR`: learning rate = base × factor of the decision band of p = C/(1+C): ×0.1 for
  p < 0.40, ×0.5 on [0.40, 0.50), ×1 on [0.50, 0.60), ×1.5 on [0.60, 0.75], ×2 above 0.75
  (bands as :func:`phasewatch.analysis.noise.decision_band`).
* :class:`CRuleLR`: the optimizer wrapper of the notes: lr ×2 when C < 0.5, ×0.8 when C > 50, at
  every measurement (compounding), optionally clamped to ``[min_lr, max_lr]``.
* :class:`KramersEscape`: when C < 0.5 on a loss plateau, lr × ``boost`` (the notes: 2–5) for
  ``duration`` steps, then back.
* :class:`EarlyStopping`: p < 0.45 at ≥ 10 consecutive measurements (the same rule as
  :func:`phasewatch.analysis.noise.early_stopping_flags`, ``low_p``); sets ``should_stop``.
* :func:`batch_size_lr` and :func:`depth_lr`: pure scaling rules.

Learning-rate rules change ``optimizer.param_groups[i]['lr']`` multiplicatively by their own factor
only (new = current × factor_new / factor_old), so they compose with each other and with a
learning-rate scheduler.  When nobody else changed the lr since a rule last set it, the rule
recomputes from the value it set, so lr values are exact products (``base * 0.1``, not a drifting
chain of divisions).  ``dry_run=True`` (or no optimizer, with ``lr=``) tracks the lr without
touching any optimizer: what the rule would have done.

These are the framework's heuristics, implemented as stated so that they can be evaluated; nothing
here runs unless asked for, and every change is returned (and, when wired into the recorder,
stored in the run).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..analysis import noise as nz
from ..errors import PhasewatchError

__all__ = [
    "BAND_FACTORS",
    "CRuleLR",
    "Controller",
    "EarlyStopping",
    "Intervention",
    "KramersEscape",
    "PBandLR",
    "apply",
    "batch_size_lr",
    "depth_lr",
    "estimates",
]

#: The p-band rule's factors per decision band (DEFINITIONS §2 bands; framework notes).
BAND_FACTORS: dict[str, float] = {"failing": 0.1, "sub-threshold": 0.5, "critical": 1.0, "learning": 1.5,
                                  "strong": 2.0}


@dataclass(frozen=True)
class Intervention:
    """One change a controller made: at ``step``, rule ``rule`` set ``param`` from ``old`` to ``new``.

    ``param`` is ``"param_groups[i].lr"`` for a learning rate, ``"stop"`` for an early-stopping
    decision (old 0, new 1).  ``note`` says why, in a few words (e.g. ``"p=0.312 failing"``).
    """

    step: int
    rule: str
    param: str
    old: float
    new: float
    note: str = ""

    @property
    def group(self) -> int | None:
        """The optimizer parameter group of a learning-rate change, else None."""
        if self.param.startswith("param_groups[") and self.param.endswith("].lr"):
            return int(self.param[len("param_groups["):-len("].lr")])
        return None

    def __str__(self) -> str:
        return f"step {self.step}: {self.rule} {self.param} {self.old:.6g} -> {self.new:.6g}" + (
            f" ({self.note})" if self.note else "")


def apply(optimizer: Any, interventions: Sequence[Intervention]) -> None:
    """Set ``optimizer.param_groups[i]['lr']`` to ``new`` for every learning-rate intervention."""
    for iv in interventions:
        g = iv.group
        if g is not None:
            optimizer.param_groups[g]["lr"] = iv.new


def estimates(stats: dict[str, Any], b: float = 1.0, *, loss: float | None = None,
              batch_size: float | None = None, level: float = 0.95) -> dict[str, float]:
    """Live estimates of one gradient-sample measurement, for controllers.

    ``stats``: the sufficient statistics of the ``grad_samples`` row (``n``, ``mean_sq_norm``,
    ``trace`` and, for the distribution-free delta-method interval, ``quad``, ``trace_sq``,
    ``fourth``, ``third``), as :func:`phasewatch.record.probes.gram_statistics` returns them.
    Returns ``C`` (canonical C_b = (‖ḡ‖² − T/n)/T, clipped at 0), ``C_lo``/``C_hi``, ``p`` = C/(1+C)
    with ``p_lo``/``p_hi``, ``C_per_example`` = C_b/b, ``n``, ``b``; with ``batch_size`` B also
    ``C_batch`` = B·C_1 (the SNR of a training-batch gradient) and ``p_batch``; ``loss`` if given.
    The same numbers as the analyzer's per-measurement table (DEFINITIONS §2).
    """
    n = int(stats["n"])
    out: dict[str, float] = {"n": float(n), "b": float(b)}
    if loss is not None:
        out["loss"] = float(loss)
    if n < 2:
        out.update(C=math.nan, C_lo=math.nan, C_hi=math.nan, p=math.nan, p_lo=math.nan, p_hi=math.nan)
        return out
    moments = {k: stats[k] for k in ("quad", "trace_sq", "fourth", "third") if k in stats}
    r = nz.consolidation_ratio(n=n, b=b, mean_sq_norm=stats["mean_sq_norm"], trace=stats["trace"],
                               ci="delta", level=level, **moments)
    out.update(C=float(r.C), C_lo=float(r.ci[0]), C_hi=float(r.ci[1]), p=float(r.p), p_lo=float(r.p_ci[0]),
               p_hi=float(r.p_ci[1]), C_per_example=float(r.C_per_example))
    if batch_size is not None:
        cb = float(batch_size) * float(r.C_per_example)
        out["C_batch"], out["p_batch"] = cb, cb / (1.0 + cb)
    return out


def _value(est: dict[str, Any], key: str) -> float:
    """``est[key]`` as a float (NaN if missing); ``p``-type keys fall back to C/(1+C)."""
    v = est.get(key)
    if v is None and key.startswith("p"):
        c = est.get("C" + key[1:])
        if c is not None and math.isfinite(float(c)):
            v = float(c) / (1.0 + float(c))
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


class Controller:
    """Base class: binds to an optimizer (or tracks ``lr`` alone) and scales learning rates by a
    factor of its own.

    Parameters
    ----------
    optimizer: anything with ``param_groups`` (a list of dicts with ``'lr'``); None to track ``lr``.
    groups: indices of the parameter groups to control (default: all).
    lr: starting learning rate(s) when there is no optimizer (or with ``dry_run``).
    dry_run: decide and report, but never change the optimizer.
    """

    rule = "controller"

    def __init__(self, optimizer: Any = None, *, groups: Sequence[int] | None = None,
                 lr: float | Sequence[float] | None = None, dry_run: bool = False) -> None:
        self.optimizer = None
        self.dry_run = bool(dry_run)
        self.groups = None if groups is None else [int(g) for g in groups]
        self.factor = 1.0
        self.history: list[Intervention] = []
        self._lr: list[float] | None = None if lr is None else [float(x) for x in np.atleast_1d(lr)]
        self._set: dict[int, float] = {}   # the lr this controller last set, per group
        self._base: dict[int, float] = {}  # that lr divided by its factor, exactly as set
        if optimizer is not None:
            self.bind(optimizer)
        elif lr is None:
            raise PhasewatchError(f"{type(self).__name__}: pass an optimizer (or lr= to only track the rule)")

    def bind(self, optimizer: Any) -> Controller:
        """Attach to an optimizer (the recorder calls this with its own)."""
        if not hasattr(optimizer, "param_groups"):
            raise PhasewatchError(f"{type(self).__name__}: {type(optimizer).__name__} has no param_groups")
        self.optimizer = optimizer
        if self._lr is None or not self.dry_run:
            self._lr = [float(g["lr"]) for g in optimizer.param_groups]
        if self.groups is None:
            self.groups = list(range(len(self._lr)))
        return self

    # -- learning rates ------------------------------------------------------------------
    def lr(self, group: int = 0) -> float:
        """The current learning rate of a group (the optimizer's, or the tracked one)."""
        if self.optimizer is not None and not self.dry_run:
            return float(self.optimizer.param_groups[group]["lr"])
        return self._lr[group]

    def _write_lr(self, group: int, value: float) -> None:
        if self.optimizer is not None and not self.dry_run:
            self.optimizer.param_groups[group]["lr"] = value
        else:
            self._lr[group] = value

    def _groups(self) -> list[int]:
        return self.groups if self.groups is not None else list(range(len(self._lr or [])))

    def _set_factor(self, step: int, factor: float, note: str) -> list[Intervention]:
        """Change this controller's factor: lr_i ← base_i · factor with base_i = lr_i / old factor
        (exactly the base it used before, if nobody else changed lr_i since)."""
        out = []
        for g in self._groups():
            cur = self.lr(g)
            base = self._base[g] if self._set.get(g) == cur else cur / self.factor
            new = base * factor
            if new != cur:
                self._write_lr(g, new)
                out.append(Intervention(int(step), self.rule, f"param_groups[{g}].lr", cur, new, note))
            self._set[g], self._base[g] = new, base
        self.factor = float(factor)
        self.history.extend(out)
        return out

    def _scale(self, step: int, mult: float, note: str, lo: float | None = None,
               hi: float | None = None) -> list[Intervention]:
        """Multiply each controlled lr by ``mult`` (clamped to [lo, hi])."""
        out = []
        for g in self._groups():
            cur = self.lr(g)
            new = cur * mult
            if lo is not None:
                new = max(new, lo)
            if hi is not None:
                new = min(new, hi)
            if new != cur:
                self._write_lr(g, new)
                out.append(Intervention(int(step), self.rule, f"param_groups[{g}].lr", cur, new, note))
        self.history.extend(out)
        return out

    def describe(self) -> dict[str, Any]:
        """The rule and its parameters (JSON-safe), for the run's metadata."""
        skip = {"optimizer", "history", "factor", "run", "should_stop", "stop_step", "boosted_until"}
        params = {k: v for k, v in vars(self).items()
                  if not k.startswith("_") and k not in skip and isinstance(v, (int, float, str, bool, list, dict,
                                                                                 type(None)))}
        return {"rule": self.rule, "class": type(self).__name__, **params}

    # -- callbacks -----------------------------------------------------------------------
    def on_measurement(self, step: int, estimates: dict[str, Any]) -> list[Intervention]:
        """Called after each gradient-noise measurement; returns the changes made."""
        return []

    def on_step(self, step: int) -> list[Intervention]:
        """Called after every optimizer step (for rules that act for a number of steps)."""
        return []


class PBandLR(Controller):
    """Learning rate keyed to the decision band of p = C/(1+C) (framework notes; DEFINITIONS §2):
    lr = base × ``factors[band(p)]``, with the bands of :func:`~phasewatch.analysis.noise.decision_band`
    and by default ×0.1 (p < 0.40), ×0.5 ([0.40, 0.50)), ×1 ([0.50, 0.60)), ×1.5 ([0.60, 0.75]),
    ×2 (p > 0.75).  ``base`` is the lr when the rule was attached (followed through outside changes
    such as a scheduler).  ``key``: which estimate is p (``"p"``; ``"p_batch"`` for the training
    batch's SNR).  A NaN p changes nothing."""

    rule = "p_band"

    def __init__(self, optimizer: Any = None, *, factors: dict[str, float] | None = None, key: str = "p",
                 **kw: Any) -> None:
        super().__init__(optimizer, **kw)
        self.factors = dict(BAND_FACTORS if factors is None else factors)
        missing = set(BAND_FACTORS) - set(self.factors)
        if missing:
            raise PhasewatchError(f"PBandLR: factors need every band; missing {sorted(missing)}")
        self.key = key

    def on_measurement(self, step: int, estimates: dict[str, Any]) -> list[Intervention]:
        p = _value(estimates, self.key)
        if not math.isfinite(p):
            return []
        band = nz.decision_band(p)
        f = self.factors[band]
        if f == self.factor:
            return []
        return self._set_factor(step, f, f"{self.key}={p:.3g} {band}: x{f:g}")


class CRuleLR(Controller):
    """The C-rule optimizer wrapper (framework notes): at each measurement, lr × ``up`` (2) when
    C < ``low`` (0.5), lr × ``down`` (0.8) when C > ``high`` (50), else unchanged; compounding,
    clamped to [``min_lr``, ``max_lr``] when given.  ``key``: which estimate is C (``"C"``)."""

    rule = "c_rule"

    def __init__(self, optimizer: Any = None, *, low: float = 0.5, high: float = 50.0, up: float = 2.0,
                 down: float = 0.8, min_lr: float | None = None, max_lr: float | None = None, key: str = "C",
                 **kw: Any) -> None:
        super().__init__(optimizer, **kw)
        if not low < high:
            raise PhasewatchError(f"CRuleLR: low={low} must be below high={high}")
        self.low, self.high, self.up, self.down = float(low), float(high), float(up), float(down)
        self.min_lr, self.max_lr, self.key = min_lr, max_lr, key

    def on_measurement(self, step: int, estimates: dict[str, Any]) -> list[Intervention]:
        c = _value(estimates, self.key)
        if not math.isfinite(c):
            return []
        if c < self.low:
            return self._scale(step, self.up, f"{self.key}={c:.3g} < {self.low:g}: x{self.up:g}",
                               self.min_lr, self.max_lr)
        if c > self.high:
            return self._scale(step, self.down, f"{self.key}={c:.3g} > {self.high:g}: x{self.down:g}",
                               self.min_lr, self.max_lr)
        return []


class KramersEscape(Controller):
    """Kramers escape boost (framework notes): when C < ``c_below`` (0.5) while the loss is on a
    plateau, multiply lr by ``boost`` (the notes: 2–5; default 2) for ``duration`` steps (100), then
    divide it back.  A plateau: the last ``plateau_window`` (5) measurements' losses (``estimates
    ['loss']``) spread by less than ``plateau_tol`` (1%) of their mean magnitude,
    (max − min)/|mean| < tol.  After a boost ends, no new boost for ``cooldown`` steps (default
    ``duration``).  The boost ends at the first ``on_step`` or ``on_measurement`` at or after
    its last step."""

    rule = "kramers_escape"

    def __init__(self, optimizer: Any = None, *, boost: float = 2.0, duration: int = 100, c_below: float = 0.5,
                 plateau_window: int = 5, plateau_tol: float = 0.01, cooldown: int | None = None,
                 key: str = "C", **kw: Any) -> None:
        super().__init__(optimizer, **kw)
        if boost <= 0 or duration < 1 or plateau_window < 2:
            raise PhasewatchError("KramersEscape: boost > 0, duration >= 1 and plateau_window >= 2 are needed")
        self.boost, self.duration, self.c_below = float(boost), int(duration), float(c_below)
        self.plateau_window, self.plateau_tol = int(plateau_window), float(plateau_tol)
        self.cooldown = self.duration if cooldown is None else int(cooldown)
        self.key = key
        self._losses: deque[float] = deque(maxlen=self.plateau_window)
        self.boosted_until: int | None = None  # last step of the current boost
        self._quiet_until: int | None = None

    def plateau(self) -> bool:
        """Whether the recent losses are on a plateau (see the class docstring)."""
        if len(self._losses) < self.plateau_window:
            return False
        v = np.asarray(self._losses, dtype=float)
        if not np.isfinite(v).all():
            return False
        scale = abs(float(v.mean()))
        return scale > 0 and float(v.max() - v.min()) / scale < self.plateau_tol

    def _maybe_end(self, step: int) -> list[Intervention]:
        if self.boosted_until is not None and step > self.boosted_until:
            self.boosted_until = None
            self._quiet_until = step + self.cooldown
            return self._set_factor(step, 1.0, "boost over")
        return []

    def on_step(self, step: int) -> list[Intervention]:
        return self._maybe_end(step)

    def on_measurement(self, step: int, estimates: dict[str, Any]) -> list[Intervention]:
        out = self._maybe_end(step)
        loss = _value(estimates, "loss")
        self._losses.append(loss)
        c = _value(estimates, self.key)
        if self.boosted_until is not None or (self._quiet_until is not None and step < self._quiet_until):
            return out
        if math.isfinite(c) and c < self.c_below and self.plateau():
            self.boosted_until = step + self.duration - 1
            out += self._set_factor(step, self.boost, f"{self.key}={c:.3g} < {self.c_below:g} on a loss "
                                                      f"plateau: x{self.boost:g} for {self.duration} steps")
        return out


class EarlyStopping(Controller):
    """Stop when p < ``p_threshold`` (0.45) at ``patience`` (10) consecutive measurements (notes
    000/004; the ``low_p`` flag of :func:`~phasewatch.analysis.noise.early_stopping_flags`, same
    counting: a NaN p breaks the run).  Never changes the learning rate: it records one ``stop``
    intervention and sets ``should_stop``; the training loop decides what to do with it."""

    rule = "early_stopping"

    def __init__(self, optimizer: Any = None, *, p_threshold: float = 0.45, patience: int = 10, key: str = "p",
                 **kw: Any) -> None:
        if optimizer is None and "lr" not in kw:
            kw["lr"] = math.nan  # needs no learning rate
        super().__init__(optimizer, **kw)
        if patience < 1:
            raise PhasewatchError(f"EarlyStopping: patience={patience} must be >= 1")
        self.p_threshold, self.patience, self.key = float(p_threshold), int(patience), key
        self.run = 0
        self.should_stop = False
        self.stop_step: int | None = None

    def on_measurement(self, step: int, estimates: dict[str, Any]) -> list[Intervention]:
        p = _value(estimates, self.key)
        self.run = self.run + 1 if (math.isfinite(p) and p < self.p_threshold) else 0
        if self.run >= self.patience and not self.should_stop:
            self.should_stop, self.stop_step = True, int(step)
            iv = Intervention(int(step), self.rule, "stop", 0.0, 1.0,
                              f"{self.key} < {self.p_threshold:g} at {self.run} consecutive measurements")
            self.history.append(iv)
            return [iv]
        return []


def batch_size_lr(lr: float, batch_size: float, base_batch_size: float) -> float:
    """Square-root batch-size scaling (framework notes; Krizhevsky 2014, Hoffer et al. 2017):
    η(B) = η(B₀)·√(B/B₀), which keeps the per-step update-noise variance η²·Tr Σ₁/B fixed.
    Returns the learning rate for ``batch_size`` given ``lr`` at ``base_batch_size``."""
    if batch_size <= 0 or base_batch_size <= 0:
        raise PhasewatchError("batch sizes must be positive")
    return float(lr) * math.sqrt(float(batch_size) / float(base_batch_size))


def depth_lr(lr: float, depth: float, base_depth: float, exponent: float = 0.5) -> float:
    """Depth scaling of the learning rate: η(L) = η(L₀)·(L₀/L)^exponent.

    The framework names a depth rule without an exponent; the default 1/2 is the depth-μP scaling
    of residual networks (Yang et al. 2023, "Tensor Programs VI"; Bordelon et al. 2023), ``exponent=1``
    the 1/L rule.  Returns the learning rate for ``depth`` given ``lr`` at ``base_depth``."""
    if depth <= 0 or base_depth <= 0:
        raise PhasewatchError("depths must be positive")
    return float(lr) * (float(base_depth) / float(depth)) ** float(exponent)
