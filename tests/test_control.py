"""Controllers: each rule changes the learning rate exactly as stated, on scripted estimate sequences
(real torch optimizers), and on a real short run whose estimates come from gradient samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import phasewatch
from phasewatch.analysis import noise
from phasewatch.control import (
    BAND_FACTORS,
    CRuleLR,
    EarlyStopping,
    Intervention,
    KramersEscape,
    PBandLR,
    apply,
    batch_size_lr,
    depth_lr,
    estimates,
)
from phasewatch.errors import PhasewatchError


def _sgd(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def _lrs(opt) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


def test_p_band_rule_sets_base_times_band_factor():
    opt = _sgd(0.1, 0.01)
    ctl = PBandLR(opt)
    # p -> band -> factor; band edges as DEFINITIONS: [0.40, 0.50) sub, [0.50, 0.60) critical, [0.60, 0.75] learning
    script = [(0.55, 1.0), (0.30, 0.1), (0.39, 0.1), (0.40, 0.5), (0.50, 1.0), (0.60, 1.5), (0.75, 1.5),
              (0.7501, 2.0), (math.nan, 2.0), (0.0, 0.1), (0.599, 1.0)]
    prev = [0.1, 0.01]
    for i, (p, f) in enumerate(script):
        step = 10 * (i + 1)
        ivs = ctl.on_measurement(step, {"p": p})
        want = [0.1 * f, 0.01 * f]
        assert _lrs(opt) == want, (p, f)  # exact: base * factor, no chain of divisions
        if want != prev:
            assert ivs == [Intervention(step, "p_band", f"param_groups[{g}].lr", prev[g], want[g], ivs[g].note)
                           for g in (0, 1)]
            assert noise.decision_band(p) in ivs[0].note
        else:
            assert ivs == []
        prev = want
    assert len(ctl.history) == 2 * 7  # seven band changes, two groups each
    # p from C when p is not given; a rule limited to one group
    opt = _sgd(0.1, 0.01)
    ctl = PBandLR(opt, groups=[1])
    ctl.on_measurement(1, {"C": 3.0})  # p = 0.75: learning
    assert _lrs(opt) == [0.1, 0.01 * 1.5]


def test_p_band_rule_follows_an_outside_change_of_the_learning_rate():
    opt = _sgd(0.1)
    ctl = PBandLR(opt)
    ctl.on_measurement(1, {"p": 0.45})
    assert _lrs(opt) == [0.05]
    opt.param_groups[0]["lr"] = 0.02  # a scheduler: the base is now 0.04
    ctl.on_measurement(2, {"p": 0.8})
    assert _lrs(opt) == [0.02 / 0.5 * 2.0]
    ctl.on_measurement(3, {"p": 0.55})
    assert _lrs(opt) == [0.02 / 0.5]
    with pytest.raises(PhasewatchError, match="missing"):
        PBandLR(opt, factors={"failing": 0.1})
    assert BAND_FACTORS == {"failing": 0.1, "sub-threshold": 0.5, "critical": 1.0, "learning": 1.5, "strong": 2.0}


def test_c_rule_doubles_below_half_and_shrinks_above_fifty():
    opt = _sgd(0.1)
    ctl = CRuleLR(opt)
    lr = 0.1
    for step, (c, mult) in enumerate([(0.3, 2.0), (0.49, 2.0), (0.5, 1.0), (1.0, 1.0), (50.0, 1.0),
                                      (60.0, 0.8), (1e4, 0.8), (math.nan, 1.0), (0.0, 2.0)], start=1):
        ivs = ctl.on_measurement(step, {"C": c})
        new = lr * mult
        assert _lrs(opt) == [new], (step, c)
        assert (ivs == []) == (mult == 1.0)
        if ivs:
            assert (ivs[0].old, ivs[0].new, ivs[0].rule, ivs[0].step) == (lr, new, "c_rule", step)
        lr = new
    # clamped, and on the training batch's C instead of the samples' C
    opt = _sgd(0.1)
    ctl = CRuleLR(opt, max_lr=0.3, min_lr=0.25, key="C_batch")
    ctl.on_measurement(1, {"C": 100.0, "C_batch": 0.1})
    ctl.on_measurement(2, {"C": 100.0, "C_batch": 0.1})
    assert _lrs(opt) == [0.3]
    ctl.on_measurement(3, {"C": 0.1, "C_batch": 100.0})
    assert _lrs(opt) == [0.25]
    iv = ctl.on_measurement(4, {"C_batch": 100.0})
    assert iv == [] and _lrs(opt) == [0.25]


def test_kramers_escape_boosts_on_a_plateau_with_low_c_then_restores():
    opt = _sgd(0.1)
    ctl = KramersEscape(opt, boost=3.0, duration=30, plateau_window=4, plateau_tol=0.01, cooldown=50)
    # falling loss, low C: no plateau, no boost
    for i, loss in enumerate([2.0, 1.5, 1.2, 1.0]):
        assert ctl.on_measurement(10 * (i + 1), {"C": 0.1, "loss": loss}) == []
    # a plateau (spread 0.8% of the mean) with C >= 0.5: no boost either
    for i, loss in enumerate([1.0, 1.004, 0.996, 1.0]):
        assert ctl.on_measurement(50 + 10 * i, {"C": 0.5, "loss": loss}) == []
    assert ctl.plateau()
    ivs = ctl.on_measurement(90, {"C": 0.2, "loss": 1.001})
    assert _lrs(opt) == [0.1 * 3.0] and ivs[0].old == 0.1 and ctl.boosted_until == 119
    for step in range(91, 120):
        assert ctl.on_step(step) == []
        if step == 100:
            assert ctl.on_measurement(100, {"C": 0.2, "loss": 1.0}) == []  # no second boost while boosted
    assert _lrs(opt) == [0.1 * 3.0]
    ivs = ctl.on_step(120)  # the boost lasted steps 90..119
    assert _lrs(opt) == [0.1] and ivs[0].new == 0.1 and ivs[0].old == 0.1 * 3.0  # back exactly
    assert ctl.on_measurement(130, {"C": 0.2, "loss": 1.0}) == []  # cooldown until step 170
    assert ctl.on_measurement(160, {"C": 0.2, "loss": 1.0}) == []
    ivs = ctl.on_measurement(170, {"C": 0.2, "loss": 1.0})
    assert _lrs(opt) == [0.1 * 3.0] and len(ivs) == 1
    # the end is also noticed at a measurement, when no on_step calls come
    ivs = ctl.on_measurement(250, {"C": 5.0, "loss": 1.0})
    assert _lrs(opt) == [0.1] and ivs[0].note == "boost over"
    # a missing loss is no plateau
    ctl2 = KramersEscape(lr=0.1, plateau_window=2)
    assert ctl2.on_measurement(1, {"C": 0.1}) == [] and ctl2.on_measurement(2, {"C": 0.1}) == []


def test_early_stopping_matches_the_analyzers_flag():
    rng = np.random.default_rng(0)
    for trial in range(30):
        p = rng.uniform(0.3, 0.6, size=60)
        p[rng.random(60) < 0.05] = np.nan
        if trial % 3 == 0:
            p[20:31] = 0.4  # a run of 11 below 0.45
        ctl = EarlyStopping()
        stops = [ctl.on_measurement(i, {"p": x}) for i, x in enumerate(p)]
        ref = noise.early_stopping_flags(p, np.ones_like(p), np.ones_like(p)).first["low_p"]
        assert ctl.stop_step == ref
        fired = [i for i, s in enumerate(stops) if s]
        assert fired == ([] if ref is None else [ref])
        if ref is not None:
            assert ctl.should_stop and stops[ref][0].param == "stop" and stops[ref][0].new == 1.0
    # it never touches the learning rate
    opt = _sgd(0.1)
    ctl = EarlyStopping(opt, patience=2)
    ctl.on_measurement(1, {"p": 0.1})
    assert ctl.on_measurement(2, {"p": 0.1})[0].rule == "early_stopping" and _lrs(opt) == [0.1]


def test_scaling_rules_and_dry_run():
    assert batch_size_lr(0.1, 256, 64) == pytest.approx(0.2, rel=1e-15)
    assert batch_size_lr(0.1, 32, 128) == pytest.approx(0.05, rel=1e-15)
    assert depth_lr(0.1, 48, 12) == pytest.approx(0.05, rel=1e-15)
    assert depth_lr(0.1, 48, 12, exponent=1.0) == pytest.approx(0.025, rel=1e-15)
    with pytest.raises(PhasewatchError):
        batch_size_lr(0.1, 0, 1)
    opt = _sgd(0.1)
    ctl = CRuleLR(opt, dry_run=True)
    ivs = ctl.on_measurement(1, {"C": 0.1})
    assert _lrs(opt) == [0.1] and ctl.lr() == 0.2 and ivs[0].new == 0.2  # decided, not applied
    apply(opt, ivs)
    assert _lrs(opt) == [0.2]
    with pytest.raises(PhasewatchError, match="optimizer"):
        PBandLR()
    d = KramersEscape(lr=0.1, boost=4.0).describe()
    assert d == {"rule": "kramers_escape", "class": "KramersEscape", "dry_run": False, "groups": None,
                 "boost": 4.0, "duration": 100, "c_below": 0.5, "plateau_window": 5, "plateau_tol": 0.01,
                 "cooldown": 100, "key": "C"}
    assert PBandLR(lr=0.1).describe()["factors"] == BAND_FACTORS
    assert EarlyStopping().describe()["patience"] == 10


def test_controllers_on_a_real_short_run_with_live_gradient_samples(tmp_path):
    """A recorder records gradient samples; the same statistics, computed in the loop at the same θ,
    drive a C-rule and an early-stopping controller.  The analyzer's C of the recorded run equals
    what the controllers saw, and the lr trajectory in the run is the rule applied to it."""
    from phasewatch.record.probes import gram_statistics, per_example_gradients

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(1)
    w_star = 3.0 * torch.randn(4, 1, dtype=torch.float64, generator=gen)  # far from the start: C high early
    px = torch.randn(24, 4, dtype=torch.float64, generator=gen)
    py = px @ w_star + 0.3 * torch.randn(24, 1, dtype=torch.float64, generator=gen)

    def per_example_loss(out, y):
        return 0.5 * ((out - y) ** 2).sum(-1)

    # per-example C of this model stays near 1/(P+1) while far from the optimum and falls near it:
    # thresholds that put both branches of the rule to work (the framework's 0.5/50 are defaults)
    crule = CRuleLR(opt, low=0.05, high=0.12, min_lr=1e-4, max_lr=0.6)
    stop = EarlyStopping(opt, p_threshold=0.45, patience=3)
    seen = {}
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, strict=True, grad_samples_every=4,
                             grad_probe=(px, py), grad_loss=per_example_loss) as rec:
        for step in range(1, 41):
            x = torch.randn(8, 4, dtype=torch.float64, generator=gen)
            y = x @ w_star + 0.3 * torch.randn(8, 1, dtype=torch.float64, generator=gen)
            loss = per_example_loss(model(x), y).mean()
            opt.zero_grad()
            loss.backward()
            rec.loss(loss)
            opt.step()
            if step % 4 == 0:
                samples = per_example_gradients(model, ["weight"], px, py, per_example_loss)
                est = estimates(gram_statistics(samples, [0], 1, 24), b=1.0, loss=float(loss.detach()))
                seen[step] = est
                crule.on_measurement(step, est)
                stop.on_measurement(step, est)
    res = phasewatch.analyze(tmp_path / "r", window=3)
    pr = res.probes
    assert pr["step"].tolist() == sorted(seen)
    np.testing.assert_allclose(pr["C"], [seen[s]["C"] for s in pr["step"]], rtol=1e-9)
    np.testing.assert_allclose(pr["p_hi"], [seen[s]["p_hi"] for s in pr["step"]], rtol=1e-9)
    # replay the rule on the analyzer's C: the same lr trajectory as recorded in the run
    lr, want = 0.3, {}
    for s, c in zip(pr["step"].tolist(), pr["C"].tolist()):
        if c < 0.05:
            lr = min(lr * 2.0, 0.6)
        elif c > 0.12:
            lr = max(lr * 0.8, 1e-4)
        want[s] = lr
    steps, lrs = res.scalars["step"], res.scalars["lr"][:, 0]
    for s, v in want.items():
        if s + 1 in steps:  # the lr set after step s is the lr of step s + 1
            assert lrs[steps == s + 1][0] == v
    changed, prev = [], 0.3
    for s, v in want.items():
        if v != prev:
            changed.append(s)
        prev = v
    assert [iv.step for iv in crule.history] == changed
    assert {iv.note.split(": ")[-1] for iv in crule.history} == {"x2", "x0.8"}  # both branches acted
    flag = noise.early_stopping_flags(pr["p"], pr["C"], pr["p_hi"], p_threshold=0.45, p_run=3).first["low_p"]
    assert stop.stop_step == (None if flag is None else int(pr["step"][flag]))
