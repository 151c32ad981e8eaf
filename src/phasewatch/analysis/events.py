"""Events in evaluation metrics: threshold crossings and jumps (DEFINITIONS §6).

Pure functions on (steps, values) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Event:
    """One event: its kind, the metric it was found in, the step, and the rule that found it."""

    kind: str
    metric: str
    step: int
    value: float
    rule: str


def first_crossing(
    steps: np.ndarray, values: np.ndarray, threshold: float, metric: str = "", kind: str = "crossing"
) -> Event | None:
    """First evaluation with ``value >= threshold`` (the grokking step for test accuracy ≥ 0.95,
    Xu 2026, arXiv:2603.28964).  NaN values are skipped.  Returns None if it never happens."""
    v = np.asarray(values, dtype=float)
    hit = np.nonzero(np.isfinite(v) & (v >= threshold))[0]
    if not hit.size:
        return None
    i = int(hit[0])
    return Event(kind, metric, int(steps[i]), float(v[i]), f"{metric} >= {threshold:g}")


def jumps(
    steps: np.ndarray, values: np.ndarray, delta: float = 0.05, within: int = 10, metric: str = ""
) -> list[Event]:
    """Jumps: the value rises by more than ``delta`` within ``within`` steps (note 001: Δacc > 5
    points within 10 steps).  Evaluations where the rule holds are merged while they are at most
    ``within`` steps apart, so one sustained rise is one event, reported at its first step."""
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=float)
    hits = []
    for i in range(len(s)):
        lo = np.searchsorted(s, s[i] - within, side="left")
        prior = v[lo:i]
        prior = prior[np.isfinite(prior)]
        if prior.size and np.isfinite(v[i]) and v[i] - prior.min() > delta:
            hits.append(i)
    out: list[Event] = []
    last = None
    for i in hits:
        if last is None or s[i] - s[last] > within:
            out.append(Event("jump", metric, int(s[i]), float(v[i]), f"Δ{metric} > {delta:g} within {within} steps"))
        last = i
    return out
