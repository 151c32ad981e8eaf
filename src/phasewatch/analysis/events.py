"""Events and onsets (DEFINITIONS §6): threshold crossings, jumps, plateaus, rules on any column,
and the named onset rules of precursor signals.

Pure functions on ``(steps, values)`` arrays, plus :func:`series`, which reads one named column out
of an :class:`~phasewatch.analysis.pipeline.Analysis` (duck-typed: this module imports nothing from
the pipeline).

* **Events** happen in what the user cares about (test accuracy, loss): :func:`first_crossing`
  (the grokking step: first evaluation with test accuracy ≥ 0.95, Xu 2026, arXiv:2603.28964),
  :func:`jumps` (Δ > 5 points within 10 steps, note 001), :func:`plateaus` (loss range < 1 % over
  a window) and :func:`rule_events` for a user rule such as ``"test_acc>=0.95"`` or ``"C<1"``
  (:func:`parse_rule`).
* **Onsets** are when a candidate precursor signal moves: :class:`OnsetRule` wraps one of the named
  rules in :data:`ONSET_RULES` (``change``, ``ratio_change``, ``decline``, ``enter``, ``cross``,
  ``peak``, ``drop``, ``rise``, ``threshold``); :data:`SIGNALS` names the default rule of each
  signal of the framework (k* change, gap-ratio change, the paper's g₂₃ decline > 1.5× from its
  pre-event peak, A entering its transition regime, C crossing 1, Φ peaks, α drops).

Rules that refer to "the event" (``decline``, ``peak``) take a reference step ``ref_step``: the event
step on a run with the event; on a control run the caller chooses (the study uses the last step,
i.e. the whole run).  All other rules are causal: their onset depends only on the past.
Lead times and their statistics are in :mod:`phasewatch.analysis.leadtime`.
"""

from __future__ import annotations

import functools
import inspect
import operator
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PhasewatchError

__all__ = [
    "Event",
    "first_crossing",
    "jumps",
    "plateaus",
    "Rule",
    "parse_rule",
    "rule_events",
    "first_rule",
    "Onset",
    "OnsetRule",
    "ONSET_RULES",
    "SIGNALS",
    "signal_rule",
    "series",
    "available_columns",
    "onset_change",
    "onset_ratio_change",
    "onset_decline",
    "onset_enter",
    "onset_cross",
    "onset_peak",
    "onset_drop",
    "onset_rise",
    "onset_threshold",
]


@dataclass(frozen=True)
class Event:
    """One event: its kind, the metric it was found in, the step, and the rule that found it.

    ``end`` is the last step of events with a duration (plateaus), else None."""

    kind: str
    metric: str
    step: int
    value: float
    rule: str
    end: int | None = None


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


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True as (first index, last index) pairs."""
    m = np.asarray(mask, dtype=bool)
    if not m.size:
        return []
    d = np.diff(np.concatenate([[False], m, [False]]).astype(np.int8))
    starts = np.nonzero(d == 1)[0]
    ends = np.nonzero(d == -1)[0] - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends)]


def plateaus(
    steps: np.ndarray, values: np.ndarray, window: int = 50, rel_range: float = 0.01, metric: str = "loss"
) -> list[Event]:
    """Plateaus: stretches where the series barely moves (DEFINITIONS §6 / issue: loss range < 1 %
    over a window).

    A window of ``window`` consecutive recorded values (steps, for the per-step loss) is flat when

        (max − min) / mean|v|  <  rel_range

    over its values (all finite).  Overlapping flat windows are merged: one plateau spans from the
    first step of its first flat window to the last step of its last one.  Each plateau is an
    :class:`Event` of kind ``"plateau"`` with ``step`` = its first step, ``end`` = its last step and
    ``value`` = the mean of the series over it.  A series shorter than ``window`` has none.
    """
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=float)
    window = int(window)
    if window < 2:
        raise PhasewatchError(f"plateaus: window={window}; use a window of at least 2 values")
    if v.size < window:
        return []
    win = np.lib.stride_tricks.sliding_window_view(v, window)
    with np.errstate(invalid="ignore", divide="ignore"):
        rng = win.max(axis=1) - win.min(axis=1)
        scale = np.abs(win).mean(axis=1)
        flat = np.isfinite(rng) & (scale > 0) & (rng < rel_range * scale)
    # window i covers values i .. i+window-1; mark the covered values of flat windows
    cover = np.zeros(v.size + 1, dtype=np.int64)
    idx = np.nonzero(flat)[0]
    np.add.at(cover, idx, 1)
    np.add.at(cover, idx + window, -1)
    covered = np.cumsum(cover[:-1]) > 0
    rule = f"({metric} range)/mean < {rel_range:g} over {window} values"
    return [Event("plateau", metric, int(s[a]), float(np.mean(v[a:b + 1])), rule, end=int(s[b]))
            for a, b in _runs(covered)]


# --------------------------------------------------------------------------- #
# rules on a column
# --------------------------------------------------------------------------- #
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne,
}
_RULE_RE = re.compile(r"^\s*([^\s<>=!]+)\s*(>=|<=|==|!=|>|<|=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Rule:
    """``column OP value`` with OP one of ``>= <= > < == !=`` (``=`` is read as ``==``)."""

    column: str
    op: str
    value: float

    def holds(self, values: np.ndarray) -> np.ndarray:
        """Boolean array: where the rule holds (never at NaN)."""
        v = np.asarray(values, dtype=float)
        with np.errstate(invalid="ignore"):
            return np.isfinite(v) & _OPS[self.op](v, self.value)

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value:g}"


def parse_rule(text: str) -> Rule:
    """Parse ``"test_acc>=0.95"``, ``"C<1"``, ``"kstar!=2"`` (spaces allowed) into a :class:`Rule`."""
    m = _RULE_RE.match(str(text))
    if not m:
        raise PhasewatchError(f"rule {text!r}: write COLUMN OP NUMBER with OP one of >= <= > < == != "
                              "(e.g. \"test_acc>=0.95\", \"C<1\", \"kstar!=2\")")
    col, op, num = m.groups()
    try:
        val = float(num)
    except ValueError:
        raise PhasewatchError(f"rule {text!r}: {num!r} is not a number; write e.g. \"test_acc>=0.95\"") from None
    return Rule(col, "==" if op == "=" else op, val)


def _as_rule(rule: Rule | str) -> Rule:
    return rule if isinstance(rule, Rule) else parse_rule(rule)


def rule_events(
    steps: np.ndarray, values: np.ndarray, rule: Rule | str, *, sustain: int = 1, kind: str = "rule"
) -> list[Event]:
    """Every stretch where ``rule`` holds for at least ``sustain`` consecutive recorded values, as an
    event at its first step (``end`` its last step).  NaN breaks a stretch."""
    r = _as_rule(rule)
    s = np.asarray(steps, dtype=np.int64)
    v = np.asarray(values, dtype=float)
    sustain = max(1, int(sustain))
    desc = str(r) + (f" for {sustain} values" if sustain > 1 else "")
    return [Event(kind, r.column, int(s[a]), float(v[a]), desc, end=int(s[b]))
            for a, b in _runs(r.holds(v)) if b - a + 1 >= sustain]


def first_rule(
    steps: np.ndarray, values: np.ndarray, rule: Rule | str, *, sustain: int = 1, kind: str = "rule"
) -> Event | None:
    """The first event of :func:`rule_events` (first step where the rule holds), or None."""
    ev = rule_events(steps, values, rule, sustain=sustain, kind=kind)
    return ev[0] if ev else None


# --------------------------------------------------------------------------- #
# named onset rules: each takes (values, ref_index, **params) and returns an index or None
# --------------------------------------------------------------------------- #
def _finite_idx(v: np.ndarray) -> np.ndarray:
    return np.nonzero(np.isfinite(v))[0]


def onset_change(v: np.ndarray, ref_index: int | None = None, *, sustain: int = 1) -> int | None:
    """First change of the prevailing value (k* changes): the series is cut into runs of equal
    finite values (NaN, e.g. invalid windows, skipped); the prevailing value is that of the first
    run; the onset is the start of the first later run of at least ``sustain`` values whose value
    differs from it.  Shorter runs (blips) are ignored, so a blip and its return are not changes."""
    idx = _finite_idx(v)
    x = v[idx]
    if not x.size:
        return None
    sustain = max(1, int(sustain))
    starts = np.concatenate([[0], np.nonzero(x[1:] != x[:-1])[0] + 1])
    lengths = np.diff(np.concatenate([starts, [x.size]]))
    prevailing = x[0]
    for a, n in zip(starts[1:], lengths[1:]):
        if n >= sustain and x[a] != prevailing:
            return int(idx[a])
    return None


def onset_ratio_change(v: np.ndarray, ref_index: int | None = None, *, factor: float = 2.0,
                       baseline: int = 20) -> int | None:
    """First value that departs from the median m of the ``baseline`` values before it by more than
    ``factor``: v > factor·m or v < m/factor (gap-ratio changes; causal)."""
    if factor <= 1:
        raise PhasewatchError(f"ratio_change: factor={factor}; use a factor > 1")
    baseline = max(1, int(baseline))
    if v.size <= baseline:
        return None
    win = np.lib.stride_tricks.sliding_window_view(v[:-1], baseline)  # win[i] = v[i : i+baseline]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN baselines give NaN, never a hit
        med = np.nanmedian(win, axis=1)
        cur = v[baseline:]
        hit = np.isfinite(cur) & (med > 0) & ((cur > factor * med) | (cur < med / factor))
    j = np.nonzero(hit)[0]
    return int(j[0] + baseline) if j.size else None


def onset_decline(v: np.ndarray, ref_index: int | None = None, *, factor: float = 1.5) -> int | None:
    """The paper's rule (Xu 2026, §7 / Table 7) generalised: the peak is the maximum of the series up
    to the reference (the event), the onset the first later value with ``v <= peak / factor``
    (a decline by more than ``factor`` from the pre-event peak).  The decline may come after the
    reference: that is a lag, reported as one.  None if the peak is not positive."""
    if factor <= 1:
        raise PhasewatchError(f"decline: factor={factor}; use a factor > 1")
    k = onset_peak(v, ref_index)
    if k is None:
        return None
    peak = v[k]
    if not peak > 0:
        return None
    with np.errstate(invalid="ignore"):
        j = np.nonzero(np.isfinite(v[k + 1:]) & (v[k + 1:] <= peak / factor))[0]
    return int(k + 1 + j[0]) if j.size else None


def onset_enter(v: np.ndarray, ref_index: int | None = None, *, code: float = 1) -> int | None:
    """First value equal to ``code`` whose previous finite value is not (A entering its transition
    regime: code 1 of the ``regime`` column; a series that starts in the regime has not entered it).
    Undefined regimes (code −1) are skipped like NaN."""
    idx = np.nonzero(np.isfinite(v) & (v != -1))[0]
    x = v[idx]
    j = np.nonzero((x[1:] == code) & (x[:-1] != code))[0]
    return int(idx[j[0] + 1]) if j.size else None


def onset_cross(v: np.ndarray, ref_index: int | None = None, *, level: float = 1.0,
                direction: str = "either") -> int | None:
    """First crossing of ``level`` between consecutive finite values (C crossing 1): ``up``:
    previous < level ≤ current; ``down``: previous > level ≥ current; ``either``: the first of both."""
    if direction not in ("up", "down", "either"):
        raise PhasewatchError(f"cross: direction={direction!r}; use up, down or either")
    idx = _finite_idx(v)
    x = v[idx]
    up = (x[:-1] < level) & (x[1:] >= level)
    down = (x[:-1] > level) & (x[1:] <= level)
    hit = up if direction == "up" else down if direction == "down" else (up | down)
    j = np.nonzero(hit)[0]
    return int(idx[j[0] + 1]) if j.size else None


def onset_peak(v: np.ndarray, ref_index: int | None = None, *, min_height: float | None = None) -> int | None:
    """The maximum of the series up to the reference (Φ peaks); None if it is below ``min_height``."""
    end = v.size if ref_index is None else min(v.size, int(ref_index) + 1)
    pre = v[:end]
    if not pre.size:
        return None
    k = int(np.argmax(np.where(np.isnan(pre), -np.inf, pre)))
    if np.isnan(pre[k]) or (min_height is not None and not pre[k] >= min_height):
        return None
    return k


def onset_drop(v: np.ndarray, ref_index: int | None = None, *, amount: float = 0.5) -> int | None:
    """First value at least ``amount`` below the running maximum of the values before it
    (α drops by ``amount``; causal)."""
    idx = _finite_idx(v)
    x = v[idx]
    if x.size < 2:
        return None
    runmax = np.maximum.accumulate(x)[:-1]
    j = np.nonzero(x[1:] <= runmax - amount)[0]
    return int(idx[j[0] + 1]) if j.size else None


def onset_rise(v: np.ndarray, ref_index: int | None = None, *, amount: float = 0.5) -> int | None:
    """First value at least ``amount`` above the running minimum of the values before it (causal)."""
    idx = _finite_idx(v)
    x = v[idx]
    if x.size < 2:
        return None
    runmin = np.minimum.accumulate(x)[:-1]
    j = np.nonzero(x[1:] >= runmin + amount)[0]
    return int(idx[j[0] + 1]) if j.size else None


@functools.lru_cache(maxsize=64)
def _when_rule(when: str) -> Rule:
    return parse_rule(when if re.match(r"^\s*[^\s<>=!]", when) else "x" + when)


def onset_threshold(v: np.ndarray, ref_index: int | None = None, *, when: str = "", sustain: int = 1) -> int | None:
    """First value from which the rule ``when`` (e.g. ``"<1"`` or ``"C<1"``) holds for ``sustain``
    consecutive values."""
    r = _when_rule(when or "")
    sustain = max(1, int(sustain))
    for a, b in _runs(r.holds(v)):
        if b - a + 1 >= sustain:
            return a
    return None


#: name -> (function, uses the reference step, one-line description)
ONSET_RULES: dict[str, tuple[Callable[..., int | None], bool, str]] = {
    "change": (onset_change, False, "first change of the prevailing value, held for `sustain` values"),
    "ratio_change": (onset_ratio_change, False,
                     "first value off the median of the previous `baseline` values by more than `factor`x"),
    "decline": (onset_decline, True, "first value <= pre-event peak / `factor` after that peak"),
    "enter": (onset_enter, False, "first entry into regime `code`"),
    "cross": (onset_cross, False, "first crossing of `level` (`direction` up/down/either)"),
    "peak": (onset_peak, True, "maximum before the event (optionally >= `min_height`)"),
    "drop": (onset_drop, False, "first value `amount` below the running maximum"),
    "rise": (onset_rise, False, "first value `amount` above the running minimum"),
    "threshold": (onset_threshold, False, "first value from which rule `when` holds for `sustain` values"),
}


@dataclass(frozen=True)
class Onset:
    """When a signal moved: step, value there, index into the series, and the rule."""

    step: int
    value: float
    index: int
    rule: str
    signal: str = ""


@dataclass(frozen=True)
class OnsetRule:
    """A named onset rule with its parameters; call it on ``(steps, values, ref_step)``.

    ``name`` is a key of :data:`ONSET_RULES`, or a rule string with an operator (``"<1"``, ``">=0.5"``,
    ``"C<1"``), read as the ``threshold`` rule."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ONSET_RULES:
            if re.search(r"[<>=!]", self.name):
                object.__setattr__(self, "params", {"when": self.name, **self.params})
                object.__setattr__(self, "name", "threshold")
            else:
                raise PhasewatchError(f"onset rule {self.name!r}: unknown; choose from "
                                      f"{', '.join(ONSET_RULES)} or give a threshold like \"<1\"")
        fn = ONSET_RULES[self.name][0]
        allowed = [p for p in inspect.signature(fn).parameters if p not in ("v", "ref_index")]
        bad = [k for k in self.params if k not in allowed]
        if bad:
            raise PhasewatchError(f"onset rule {self.name}: unknown parameter(s) {', '.join(bad)}; "
                                  f"it takes {', '.join(allowed) or 'none'}")

    @property
    def uses_reference(self) -> bool:
        """True if the onset depends on the event step (``decline``, ``peak``)."""
        return ONSET_RULES[self.name][1]

    def describe(self) -> str:
        ps = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({ps})" if ps else self.name

    def ref_index(self, steps: np.ndarray, ref_step: float | None) -> int | None:
        """Index of the last step ≤ ``ref_step`` (−1 if none); None if the rule ignores the reference."""
        if ref_step is None or not self.uses_reference:
            return None
        return int(np.searchsorted(np.asarray(steps), ref_step, side="right")) - 1

    def index_at(self, values: np.ndarray, ref_index: int | None) -> int | None:
        """Onset index in a float array, the reference given as an index (fast path for null models)."""
        if ref_index is not None and ref_index < 0:
            return None
        return ONSET_RULES[self.name][0](values, ref_index, **self.params)

    def index(self, steps: np.ndarray, values: np.ndarray, ref_step: float | None = None) -> int | None:
        """Index of the onset in ``values`` (or None)."""
        return self.index_at(np.asarray(values, dtype=float), self.ref_index(steps, ref_step))

    def __call__(self, steps: np.ndarray, values: np.ndarray, ref_step: float | None = None,
                 signal: str = "") -> Onset | None:
        i = self.index(steps, values, ref_step)
        if i is None:
            return None
        return Onset(int(np.asarray(steps)[i]), float(np.asarray(values, dtype=float)[i]), int(i),
                     self.describe(), signal)


#: Named signals of the framework: name -> (column, default onset rule, its parameters).
SIGNALS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "kstar": ("kstar", "change", {}),
    "gap_ratio": ("gap_ratio", "ratio_change", {"factor": 2.0, "baseline": 20}),
    "g23": ("g23", "decline", {"factor": 1.5}),
    "A": ("regime", "enter", {"code": 1}),
    "C": ("C", "cross", {"level": 1.0}),
    "phi": ("phi", "peak", {}),
    "alpha": ("alpha", "drop", {"amount": 0.5}),
}

_ALIASES = {"k*": "kstar", "Φ": "phi", "Phi": "phi", "α": "alpha", "g_23": "g23"}


def signal_rule(signal: str, onset: str | None = None, params: dict[str, Any] | None = None
                ) -> tuple[str, OnsetRule]:
    """Resolve a signal name and an optional onset rule into ``(column, OnsetRule)``.

    Without ``onset`` a named signal of :data:`SIGNALS` takes its default rule (``g23`` → ``decline``
    with factor 1.5, ``A`` → ``enter`` regime 1 of the ``regime`` column, ...); explicit ``params``
    override the defaults.  ``--signal A --onset enter`` also reads the ``regime`` column."""
    sig = _ALIASES.get(signal, signal)
    params = dict(params or {})
    if sig in SIGNALS:
        col, default, dparams = SIGNALS[sig]
        if onset is None or onset == default:
            return col, OnsetRule(default, {**dparams, **params})
        if sig == "A":
            col = "A"
        return col, OnsetRule(onset, params)
    if onset is None:
        raise PhasewatchError(f"signal {signal!r} has no default onset rule; pass one of "
                              f"{', '.join(ONSET_RULES)} (named signals: {', '.join(SIGNALS)})")
    return sig, OnsetRule(onset, params)


# --------------------------------------------------------------------------- #
# columns of an Analysis
# --------------------------------------------------------------------------- #
def _sources(analysis) -> list[tuple[str, dict[str, np.ndarray], str]]:
    out = []
    table = getattr(analysis, "table", None) or {}
    out.append(("table", table, "step"))
    out.append(("scalars", getattr(analysis, "scalars", None) or {}, "step"))
    out.append(("probes", getattr(analysis, "probes", None) or {}, "step"))
    out.append(("tail_index", getattr(analysis, "tail_index", None) or {}, "step"))
    out.append(("curvature", getattr(analysis, "curvature", None) or {}, "step"))
    return out


def available_columns(analysis) -> list[str]:
    """Every numeric 1-D column :func:`series` can read from ``analysis``."""
    names = list(getattr(analysis, "metrics", {}) or {})
    for _, tab, _ in _sources(analysis):
        for k, v in tab.items():
            a = np.asarray(v)
            if k != "step" and a.ndim == 1 and a.dtype.kind in "fiub" and "step" in tab:
                names.append(k)
    table = getattr(analysis, "table", None) or {}
    for k in ("sigma", "stability"):
        if k in table and np.asarray(table[k]).ndim == 2:
            names += [f"{k}_{j + 1}" for j in range(np.asarray(table[k]).shape[1])]
    return list(dict.fromkeys(str(n) for n in names))


def series(analysis, name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``(steps, values, where)`` of column ``name`` of an Analysis.

    Looks in order at the evaluation metrics, the per-window table (invalid windows become NaN;
    ``sigma_j``/``stability_j`` are the j-th columns), the per-step scalars, the gradient-noise
    probes (``C``, ``p``, ...), the tail index (``alpha``) and the curvature table (``S``, ``phi``, ...).
    Aliases: ``k*`` = kstar, ``Φ``/``Phi`` = phi, ``α`` = alpha.  Values are float (NaN where
    missing); ``where`` names the table the column came from.
    """
    name = _ALIASES.get(name, name)
    metrics = getattr(analysis, "metrics", None) or {}
    if name in metrics:
        s, v = metrics[name]
        return np.asarray(s, dtype=np.int64), np.asarray(v, dtype=float), "metrics"
    table = getattr(analysis, "table", None) or {}
    m = re.fullmatch(r"(sigma|stability)_(\d+)", name)
    if m and m.group(1) in table:
        arr = np.asarray(table[m.group(1)], dtype=float)
        j = int(m.group(2)) - 1
        if 0 <= j < arr.shape[1]:
            vals = arr[:, j].copy()
            if "valid" in table:
                vals[~np.asarray(table["valid"], dtype=bool)] = np.nan
            return np.asarray(table["step"], dtype=np.int64), vals, "table"
    for where, tab, key in _sources(analysis):
        if name in tab and key in tab and name != key:
            a = np.asarray(tab[name])
            if a.ndim != 1 or a.dtype.kind not in "fiub":
                raise PhasewatchError(f"column {name!r} ({where}) is not a numeric series; "
                                      "rules and onsets need numbers")
            vals = a.astype(float)
            if where == "table" and "valid" in tab:
                vals = vals.copy()
                vals[~np.asarray(tab["valid"], dtype=bool)] = np.nan
            steps = np.asarray(tab[key])
            if steps.ndim != 1 or len(steps) != len(vals):
                continue
            return steps.astype(np.int64), vals, where
    cols = available_columns(analysis)
    raise PhasewatchError(f"no column {name!r} in this run's analysis; "
                          f"available: {', '.join(cols[:40])}{' ...' if len(cols) > 40 else ''}")

