"""Events and onset rules on synthetic series with planted answers."""

from __future__ import annotations

import numpy as np
import pytest

from phasewatch.analysis.events import (
    SIGNALS,
    OnsetRule,
    available_columns,
    first_crossing,
    first_rule,
    jumps,
    parse_rule,
    plateaus,
    rule_events,
    series,
    signal_rule,
)
from phasewatch.analysis.pipeline import Analysis
from phasewatch.errors import PhasewatchError


def test_first_crossing_and_jumps_keep_their_behaviour():
    s = np.arange(0, 100, 2)
    v = np.where(s < 60, 0.01, 0.99)
    v[10] = np.nan
    e = first_crossing(s, v, 0.95, "test_acc", kind="grokking")
    assert (e.kind, e.step, e.rule, e.end) == ("grokking", 60, "test_acc >= 0.95", None)
    assert first_crossing(s, np.zeros_like(v), 0.95) is None
    js = jumps(s, v, metric="test_acc")
    assert [j.step for j in js] == [60]


def test_plateau_planted_stretch_found_exactly():
    rng = np.random.default_rng(0)
    t = np.arange(300)
    v = np.empty(300)
    v[:100] = 1.05 ** (100 - t[:100])  # 5 % per step: no window in the decline is flat
    v[100:200] = 1.0 + rng.uniform(-0.001, 0.001, 100)  # range < 0.2 % < 1 %
    v[200:] = 0.95 ** (t[200:] - 199)
    ps = plateaus(t + 1, v, window=50, rel_range=0.01)
    assert len(ps) == 1
    p = ps[0]
    assert (p.kind, p.step, p.end) == ("plateau", 101, 200)
    assert p.value == pytest.approx(v[100:200].mean())
    # shorter than the window: not a plateau; a window of 101 covers more than the flat part
    assert plateaus(t + 1, v, window=101) == []
    # a 2 % wobble is flat at 5 %, not at 1 %
    w = 1.0 + 0.01 * np.sin(np.arange(200))
    assert plateaus(np.arange(200), w, window=20, rel_range=0.01) == []
    assert len(plateaus(np.arange(200), w, window=20, rel_range=0.05)) == 1
    with pytest.raises(PhasewatchError):
        plateaus(t, v, window=1)


@pytest.mark.parametrize("text,col,op,val", [
    ("test_acc>=0.95", "test_acc", ">=", 0.95), ("C<1", "C", "<", 1.0), ("kstar!=2", "kstar", "!=", 2.0),
    (" loss <= 1e-3 ", "loss", "<=", 1e-3), ("x=3", "x", "==", 3.0), ("g23 > -0.5", "g23", ">", -0.5),
])
def test_parse_rule(text, col, op, val):
    r = parse_rule(text)
    assert (r.column, r.op, r.value) == (col, op, val)


@pytest.mark.parametrize("bad", ["test_acc", "C<", "<1", "C<one", "a >= 1 2"])
def test_parse_rule_rejects_with_a_fix(bad):
    with pytest.raises(PhasewatchError) as ei:
        parse_rule(bad)
    assert "\n" not in str(ei.value) and "e.g." in str(ei.value)


def test_rule_events_with_sustain_and_nan():
    s = np.arange(1, 21)
    v = np.array([0, 2, 0, 2, 2, 2, 0, 2, 2, np.nan, 2, 2, 2, 2, 0, 0, 0, 0, 0, 2], float)
    evs = rule_events(s, v, "x>1")
    assert [(e.step, e.end) for e in evs] == [(2, 2), (4, 6), (8, 9), (11, 14), (20, 20)]
    evs3 = rule_events(s, v, "x>1", sustain=3)
    assert [(e.step, e.end) for e in evs3] == [(4, 6), (11, 14)]
    assert first_rule(s, v, "x>1", sustain=4).step == 11
    assert first_rule(s, v, "x>5") is None
    assert [e.step for e in rule_events(s, v, "x!=2")] == [1, 3, 7, 15]  # NaN never satisfies a rule


def _onset(name, v, ref=None, **params):
    s = np.arange(1, len(v) + 1)
    o = OnsetRule(name, params)(s, np.asarray(v, float), ref)
    return None if o is None else o.step


def test_onset_change_and_sustain():
    k = np.full(200, 1.0)
    k[40] = 2  # a one-window blip
    k[80:] = 3
    k[100] = np.nan  # an invalid window is skipped, not a change
    assert _onset("change", k) == 41
    assert _onset("change", k, sustain=3) == 81
    assert _onset("change", np.ones(50)) is None
    k2 = np.array([1, 1, 2, 2, 2, 1, 1, 1, 3, 3, 3], float)  # a held change, a return, another change
    assert _onset("change", k2, sustain=3) == 3


def test_onset_ratio_change():
    rng = np.random.default_rng(1)
    g = 10 + rng.uniform(-1, 1, 200)
    g[120:] = 30
    assert _onset("ratio_change", g, factor=2.0, baseline=20) == 121
    g2 = g.copy()
    g2[120:] = 4  # a fall by more than 2x
    assert _onset("ratio_change", g2, factor=2.0, baseline=20) == 121
    assert _onset("ratio_change", 10 + rng.uniform(-1, 1, 200)) is None
    with pytest.raises(PhasewatchError):
        OnsetRule("ratio_change", {"factor": 1.0}).index(np.arange(5), np.ones(5))


def test_onset_decline_is_the_papers_rule():
    """g23 peaks at step 60 (value 1), falls below 1/1.5 first at step 90; event at 100: τ = 10."""
    t = np.arange(1, 201)
    g = np.where(t <= 60, 0.5 + 0.5 * t / 60, 1.0 - (t - 60) * (1 - 1 / 1.5) / 30 - 1e-9)
    g[0] = 0.2
    assert _onset("decline", g, ref=100) == 90
    assert _onset("decline", g, ref=100, factor=2.0) == 105  # after the event: a lag, still reported
    # the pre-event peak: a higher peak after the event is not used
    g2 = g.copy()
    g2[150] = 5.0
    assert _onset("decline", g2, ref=100) == 90
    assert _onset("decline", g2) == 152  # no reference: the global peak
    assert _onset("decline", -np.ones(10)) is None  # a non-positive peak cannot decline by a factor


def test_onset_enter_cross_peak_drop_rise_threshold():
    reg = np.array([-1, 2, 2, 2, 0, 0, 1, 1, 2, 1], float)
    assert _onset("enter", reg, code=1) == 7
    assert _onset("enter", np.array([1, 1, 2, 2], float), code=1) is None  # started there: not an entry
    assert _onset("enter", np.array([1, -1, 1, 2, 1], float), code=1) == 5  # -1 undefined is skipped

    C = np.array([0.2, 0.5, np.nan, 0.9, 1.3, 1.5, 0.7, 1.1])
    assert _onset("cross", C, level=1.0) == 5
    assert _onset("cross", C, level=1.0, direction="down") == 7
    assert _onset("cross", C[::-1], level=1.0, direction="up") == 3

    phi = np.array([0.1, 0.3, 0.9, 0.4, 0.95, 0.2])
    assert _onset("peak", phi) == 5
    assert _onset("peak", phi, ref=4) == 3  # the maximum up to the event
    assert _onset("peak", phi, ref=4, min_height=0.95) is None

    alpha = np.array([1.8, 1.7, 1.9, 1.6, 1.39, 1.5])
    assert _onset("drop", alpha, amount=0.5) == 5
    assert _onset("drop", alpha, amount=0.6) is None
    assert _onset("rise", -alpha, amount=0.5) == 5

    C2 = np.array([2, 0.5, 2, 0.5, 0.4, 0.3, 0.2])
    assert _onset("<1", C2) == 2
    assert _onset("<1", C2, sustain=3) == 4
    assert _onset("threshold", C2, when="C<1", sustain=4) == 4


def test_onset_rule_errors_are_one_line():
    with pytest.raises(PhasewatchError, match="unknown; choose from"):
        OnsetRule("wiggle")
    with pytest.raises(PhasewatchError, match="unknown parameter"):
        OnsetRule("decline", {"factr": 2})


def test_signal_presets():
    col, r = signal_rule("g23")
    assert col == "g23" and r.name == "decline" and r.params == {"factor": 1.5} and r.uses_reference
    col, r = signal_rule("A")
    assert col == "regime" and r.name == "enter" and r.params == {"code": 1}
    col, r = signal_rule("A", "cross", {"level": 1.0})
    assert col == "A" and r.name == "cross"
    col, r = signal_rule("Φ")
    assert col == "phi" and r.name == "peak"
    col, r = signal_rule("g23", params={"factor": 2.0})
    assert r.params == {"factor": 2.0}
    assert set(SIGNALS) == {"kstar", "gap_ratio", "g23", "A", "C", "phi", "alpha"}
    with pytest.raises(PhasewatchError, match="no default onset"):
        signal_rule("update_norm")


def _analysis():
    steps = np.arange(10, 20)
    valid = np.ones(10, bool)
    valid[3] = False
    table = {"step": steps, "kstar": np.arange(10), "g23": np.linspace(1, 2, 10), "valid": valid,
             "sigma": np.arange(30.0).reshape(10, 3), "stability": np.zeros((10, 3)),
             "regime": np.full(10, 2)}
    return Analysis(source="band", window=3, n_params=5, table=table,
                    scalars={"step": np.arange(1, 20), "loss": np.linspace(2, 1, 19)},
                    metrics={"test_acc": (np.array([5, 10]), np.array([0.1, 0.9]))},
                    probes={"step": np.array([4, 8]), "C": np.array([0.5, 2.0]),
                            "phase": np.array(["exploration", "generalization"])},
                    tail_index={"step": np.array([19]), "alpha": np.array([1.5])})


def test_series_reads_every_table_and_masks_invalid_windows():
    a = _analysis()
    s, v, where = series(a, "test_acc")
    assert where == "metrics" and list(s) == [5, 10]
    s, v, where = series(a, "k*")
    assert where == "table" and np.isnan(v[3]) and v[4] == 4
    s, v, _ = series(a, "sigma_2")
    assert v[0] == 1.0 and np.isnan(v[3])
    _, v, where = series(a, "loss")
    assert where == "scalars" and v[0] == 2
    _, v, where = series(a, "C")
    assert where == "probes" and list(v) == [0.5, 2.0]
    _, v, where = series(a, "α")
    assert where == "tail_index" and v[0] == 1.5
    with pytest.raises(PhasewatchError, match="not a numeric"):
        series(a, "phase")
    with pytest.raises(PhasewatchError) as ei:
        series(a, "phi")
    assert "available" in str(ei.value) and "g23" in str(ei.value)
    cols = available_columns(a)
    assert {"test_acc", "kstar", "g23", "sigma_3", "loss", "C", "alpha"} <= set(cols)
