"""Controllers: each rule changes the learning rate exactly as stated, on scripted estimate sequences
(real torch optimizers), and on a real short run whose estimates come from gradient samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import phasewatch
from phasewatch.analysis import noise
from phasewatch.errors import PhasewatchError
from phasewatch.record.control import (
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


def test_estimates_equal_brute_force_from_the_samples():
    """The dict a controller receives, against the definitions computed directly from the samples."""
    from phasewatch.record.probes import gram_statistics

    rng = np.random.default_rng(3)
    g = rng.normal(size=(40, 6)) * np.array([1.0, 2.0, 0.5, 1.0, 1.0, 3.0]) + 0.4  # n = 40 samples, P = 6
    st = gram_statistics([torch.from_numpy(g[:, :4]), torch.from_numpy(g[:, 4:])], [0, 1], 2, 8)
    est = estimates(st, b=4.0, loss=torch.tensor(0.25).item(), batch_size=32)
    gbar = g.mean(0)
    T = ((g - gbar) ** 2).sum() / 39
    C = (gbar @ gbar - T / 40) / T
    assert C > 0 and est["C"] == pytest.approx(C, rel=1e-12)
    assert est["p"] == pytest.approx(C / (1 + C), rel=1e-12) and est["p_lo"] < est["p"] < est["p_hi"]
    assert est["C_per_example"] == pytest.approx(C / 4, rel=1e-12)
    assert est["C_batch"] == pytest.approx(32 * C / 4, rel=1e-12)
    assert est["p_batch"] == pytest.approx(8 * C / (1 + 8 * C), rel=1e-12)
    assert (est["n"], est["b"], est["loss"]) == (40.0, 4.0, 0.25)
    # pure noise: C clipped at 0, p = 0 (the rules then see the failing band)
    z = rng.normal(size=(40, 6))
    z -= z.mean(0)
    est0 = estimates(gram_statistics([torch.from_numpy(z)], [0], 1, 8), b=1.0)
    assert est0["C"] == 0.0 and est0["p"] == 0.0 and "loss" not in est0


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



# --------------------------------------------------------------------------------------------------
# wired into the recorder: real runs, interventions in the file, the lr column replays the rule

N_PROBE = 8
_Y = torch.arange(N_PROBE, dtype=torch.float64)
_Y = ((_Y - _Y.mean()) / _Y.std()).reshape(-1, 1)  # mean 0, unbiased variance 1


def _scripted_run(path, controllers, c_script, *, lr: float, every: int = 3, steps: int = 45, stop=False,
                  **rec_kw):
    """A real recorder on a real full-batch regression (Linear(2, 1), SGD at ``lr``) whose measured C
    is scripted: the probe has x_i = e_1 and per-example loss ŷ_i·(y_i + s), so the per-example
    gradients are (y_i + s, 0) whatever θ is; with y of mean 0 and unbiased variance 1 over n = 8,
    ḡ = (s, 0), T = 1 and C = s² − 1/8 exactly: s = √(C + 1/8) at measurement m gives ``c_script[m]``.
    ``controllers(opt)`` builds the controllers; with ``stop`` the loop ends when ``should_stop``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 2, dtype=torch.float64, generator=gen)
    y = x @ torch.tensor([[1.5], [-2.0]], dtype=torch.float64) + 0.1 * torch.randn(32, 1, dtype=torch.float64,
                                                                                     generator=gen)
    shift = [0.0]
    px = torch.zeros(N_PROBE, 2, dtype=torch.float64)
    px[:, 0] = 1.0
    ctls = controllers(opt)
    with phasewatch.Recorder(path, model, opt, k=4, strict=True, grad_samples_every=every, grad_probe=(px, _Y),
                             grad_loss=lambda out, t: (out * (t + shift[0])).sum(-1), controllers=ctls,
                             **rec_kw) as rec:
        for step in range(1, steps + 1):
            if step % every == 0:
                shift[0] = math.sqrt(c_script[step // every - 1] + 1.0 / N_PROBE)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            rec.loss(loss)
            opt.step()
            if stop and rec.should_stop:
                break
        should_stop = rec.should_stop
        made = list(rec.interventions)
    return ctls, made, should_stop, phasewatch.analyze(path, window=3)


C_SCRIPT = [3.5, 2.0, 2.0, 0.3, 0.8, 1.2, 1.2, 60.0, 0.2, 100.0, 0.45, 0.55, 70.0, 0.1, 5.0]


def _replay(res, rule, lr0):
    """Independent replay: the lr in effect after each step's controls, from the analyzer's C and the
    recorded losses.  ``rule(step, C, loss, lr) -> lr`` at measurements, ``rule(step, None, None, lr)``
    after every step (after the measurement of that step)."""
    meas = dict(zip(res.probes["step"].tolist(), res.probes["C"].tolist()))
    losses = dict(zip(res.scalars["step"].tolist(), res.scalars["loss"].tolist()))
    lr, after = lr0, {}
    for t in res.scalars["step"].tolist():
        if t in meas:
            lr = rule(t, meas[t], losses[t], lr)
        lr = rule(t, None, None, lr)
        after[t] = lr
    return after


def _check_run(res, made, ctls, after, lr0, rule_name):
    steps, lrs = res.scalars["step"].tolist(), res.scalars["lr"][:, 0].tolist()
    # the lr set after step t is the lr the steps table records for step t + 1, exactly
    want = [lr0] + [after[t] for t in steps[:-1]]
    assert lrs == want
    # the interventions are in the file: one row per change, equal to what the controllers returned
    iv = res.interventions
    rows = list(zip(iv["step"].tolist(), iv["rule"].tolist(), iv["param"].tolist(), iv["old"].tolist(),
                    iv["new"].tolist()))
    assert rows == [(m.step, m.rule, m.param, m.old, m.new) for m in made]
    assert made == [h for c in ctls for h in c.history]
    # ... and they are the changes of the replayed trajectory
    prev, changes = lr0, []
    for t in steps:
        if after[t] != prev:
            changes.append((t, rule_name, "param_groups[0].lr", prev, after[t]))
        prev = after[t]
    assert rows == changes
    assert iv["note"].tolist() == [m.note for m in made]


def test_recorder_runs_the_p_band_rule_and_the_lr_column_replays_it(tmp_path):
    ctls, made, _, res = _scripted_run(tmp_path / "r", lambda o: [PBandLR(o)], C_SCRIPT, lr=0.01)
    np.testing.assert_allclose(res.probes["C"], C_SCRIPT, rtol=0, atol=1e-12)  # the scripted noise is measured

    def rule(t, c, loss, lr):
        if c is None:
            return lr
        p = c / (1 + c)
        f = 0.1 if p < 0.40 else 0.5 if p < 0.50 else 1.0 if p < 0.60 else 1.5 if p <= 0.75 else 2.0
        return 0.01 * f

    after = _replay(res, rule, 0.01)
    _check_run(res, made, ctls, after, 0.01, "p_band")
    assert [m.note.split()[1].rstrip(":") for m in made] == ["strong", "learning", "failing", "sub-threshold",
                                                             "critical", "strong", "failing", "strong",
                                                             "failing", "strong", "failing", "strong"]
    meta = phasewatch.open_run(tmp_path / "r").meta
    assert meta["recorder"]["controllers"] == [PBandLR(lr=0.01).describe() | {"groups": [0]}]


def test_recorder_runs_the_c_rule(tmp_path):
    ctls, made, _, res = _scripted_run(tmp_path / "r", lambda o: [CRuleLR(o)], C_SCRIPT, lr=0.01)

    def rule(t, c, loss, lr):
        if c is None:
            return lr
        return lr * 2.0 if c < 0.5 else lr * 0.8 if c > 50 else lr

    after = _replay(res, rule, 0.01)
    _check_run(res, made, ctls, after, 0.01, "c_rule")
    assert [m.step for m in made] == [12, 24, 27, 30, 33, 39, 42]


def test_recorder_runs_the_kramers_escape_and_ends_the_boost_on_step(tmp_path):
    kw = dict(boost=3.0, duration=7, plateau_window=3, plateau_tol=0.01, cooldown=6)
    ctls, made, _, res = _scripted_run(tmp_path / "r", lambda o: [KramersEscape(o, **kw)], C_SCRIPT, lr=0.2)
    state = {"until": None, "quiet": None, "losses": []}

    def rule(t, c, loss, lr):
        if state["until"] is not None and t > state["until"]:  # the boost ends (at a step or a measurement)
            state["until"], state["quiet"], lr = None, t + 6, 0.2
        if c is None:
            return lr
        state["losses"] = (state["losses"] + [loss])[-3:]
        v = np.array(state["losses"])
        plateau = len(v) == 3 and (v.max() - v.min()) / abs(v.mean()) < 0.01
        if state["until"] is None and not (state["quiet"] is not None and t < state["quiet"]) and c < 0.5 and plateau:
            state["until"], lr = t + 6, 0.2 * 3.0
        return lr

    after = _replay(res, rule, 0.2)
    _check_run(res, made, ctls, after, 0.2, "kramers_escape")
    # the loss reaches a plateau by step 27 (C = 0.3 at step 12 came too early): a boost for steps 28-34,
    # ended by on_step at step 34 (not a measurement step), a second one from step 43 to the end
    assert [(m.step, m.new) for m in made] == [(27, 0.2 * 3.0), (34, 0.2), (42, 0.2 * 3.0)]
    assert made[1].note == "boost over"
    assert sum(1 for v in res.scalars["lr"][:, 0] if v == 0.2 * 3.0) == 7 + 3


def test_recorder_should_stop_fires_for_early_stopping_on_a_scripted_case(tmp_path):
    # p = C/(1+C): 0.75, 0.75, 1/3, 1/6 (two lows), 0.75 (reset), then 1/11, 1/6, 0.23: the third low is step 24
    script = [3.0, 3.0, 0.5, 0.2, 3.0, 0.1, 0.2, 0.3, 3.0, 3.0]
    ctls, made, stopped, res = _scripted_run(tmp_path / "r", lambda o: [EarlyStopping(o, patience=3)], script,
                                             lr=0.01, steps=30, stop=True)
    assert stopped and ctls[0].stop_step == 24
    assert res.scalars["step"][-1] == 24  # the loop stopped on should_stop
    assert (res.scalars["lr"][:, 0] == 0.01).all()  # early stopping never touches the lr
    iv = res.interventions
    assert iv["step"].tolist() == [24] and iv["rule"].tolist() == ["early_stopping"]
    assert iv["param"].tolist() == ["stop"] and (iv["old"][0], iv["new"][0]) == (0.0, 1.0)
    assert iv["note"][0] == "p < 0.45 at 3 consecutive measurements"
    # the analyzer's flag on the recorded p agrees
    flag = noise.early_stopping_flags(res.probes["p"], res.probes["C"], res.probes["p_hi"], p_threshold=0.45,
                                      p_run=3).first["low_p"]
    assert int(res.probes["step"][flag]) == 24


def test_controllers_are_off_unless_given_and_dry_runs_are_labelled(tmp_path):
    _, made, stopped, res = _scripted_run(tmp_path / "off", lambda o: [], C_SCRIPT, lr=0.01)
    run = phasewatch.open_run(tmp_path / "off")
    assert made == [] and not stopped and "interventions" not in run.meta["tables"]
    assert res.interventions == {} and (res.scalars["lr"][:, 0] == 0.01).all()
    assert run.meta["recorder"]["controllers"] == []
    # a dry-run controller decides, is recorded, and changes nothing
    ctls, made, _, res = _scripted_run(tmp_path / "dry", lambda o: [CRuleLR(o, dry_run=True)], C_SCRIPT, lr=0.01)
    assert (res.scalars["lr"][:, 0] == 0.01).all() and len(made) == 7
    assert all(n.startswith("dry run: C=") for n in res.interventions["note"])
    assert res.interventions["new"][-1] == ctls[0].lr()
    # a controller bound to another optimizer is refused
    other = _sgd(0.1)
    with pytest.raises(PhasewatchError, match="another optimizer"):
        _scripted_run(tmp_path / "bad", lambda o: [PBandLR(other)], C_SCRIPT, lr=0.01)


def test_resume_keeps_the_interventions_table_and_drops_rows_of_an_overlap(tmp_path):
    path = tmp_path / "r"
    _scripted_run(path, lambda o: [CRuleLR(o)], C_SCRIPT, lr=0.01, steps=30)
    # resume from step 20 (an earlier checkpoint), without controllers: the table is still declared
    _scripted_run(path, lambda o: [], C_SCRIPT[6:], lr=0.01, steps=12, resume=True, start_step=18)
    res = phasewatch.analyze(path, window=3)
    assert res.scalars["step"].tolist() == list(range(1, 31))
    # rows at or after step 19 of the interrupted trajectory are gone (grad_samples and interventions too)
    assert res.interventions["step"].tolist() == [12]
    assert res.probes["step"].tolist() == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    # resuming with controllers a run recorded without the table is refused
    _scripted_run(tmp_path / "plain", lambda o: [], C_SCRIPT, lr=0.01, steps=6)
    with pytest.raises(PhasewatchError, match="interventions table"):
        _scripted_run(tmp_path / "plain", lambda o: [CRuleLR(o)], C_SCRIPT, lr=0.01, steps=6, resume=True)


def test_micro_batch_measurements_change_the_lr_from_the_next_step(tmp_path):
    """Micro-batch samples are taken in the pre-hook of step t (before its lr is logged); the rule
    still acts at the end of step t, so step t keeps the lr it was logged with."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    w_star = torch.tensor([[1.0], [-1.0], [0.5]], dtype=torch.float64)
    ctl = PBandLR(opt)
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, strict=True, grad_samples_every=3,
                             grad_microbatch_size=4, controllers=[ctl]) as rec:
        for _ in range(30):
            opt.zero_grad()
            for _ in range(4):  # gradient accumulation: 4 micro-batches of 4
                x = torch.randn(4, 3, dtype=torch.float64, generator=gen)
                y = x @ w_star + 0.5 * torch.randn(4, 1, dtype=torch.float64, generator=gen)
                loss = ((model(x) - y) ** 2).mean() / 4
                loss.backward()
                rec.loss(loss * 4)
            opt.step()
    res = phasewatch.analyze(tmp_path / "r", window=3)
    assert res.probes["step"].tolist() == list(range(3, 31, 3))
    assert set(res.probes["source"].tolist()) <= {"micro_batch", b"micro_batch"}

    def rule(t, c, loss, lr):
        if c is None:
            return lr
        p = c / (1 + c)
        return 0.05 * (0.1 if p < 0.40 else 0.5 if p < 0.50 else 1.0 if p < 0.60 else 1.5 if p <= 0.75 else 2.0)

    after = _replay(res, rule, 0.05)
    assert ctl.history
    _check_run(res, ctl.history, [ctl], after, 0.05, "p_band")


def test_controllers_on_a_real_short_run_with_live_gradient_samples(tmp_path):
    """Unscripted: per-example gradients of a real regression drive a C-rule and early stopping wired
    into the recorder; the analyzer's C of the recorded run replays into the recorded lr column."""
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
    with phasewatch.Recorder(tmp_path / "r", model, opt, k=4, strict=True, grad_samples_every=4,
                             grad_probe=(px, py), grad_loss=per_example_loss, controllers=[crule, stop],
                             batch_size=8) as rec:
        for _ in range(40):
            x = torch.randn(8, 4, dtype=torch.float64, generator=gen)
            y = x @ w_star + 0.3 * torch.randn(8, 1, dtype=torch.float64, generator=gen)
            loss = per_example_loss(model(x), y).mean()
            opt.zero_grad()
            loss.backward()
            rec.loss(loss)
            opt.step()
    res = phasewatch.analyze(tmp_path / "r", window=3)
    pr = res.probes
    assert pr["step"].tolist() == list(range(4, 41, 4))

    def rule(t, c, loss, lr):
        if c is None:
            return lr
        return min(lr * 2.0, 0.6) if c < 0.05 else max(lr * 0.8, 1e-4) if c > 0.12 else lr

    after = _replay(res, rule, 0.3)
    steps, lrs = res.scalars["step"].tolist(), res.scalars["lr"][:, 0].tolist()
    assert lrs == [0.3] + [after[t] for t in steps[:-1]]
    lr_rows = [i for i, r in enumerate(res.interventions["rule"]) if r == "c_rule"]
    assert [res.interventions["step"][i] for i in lr_rows] == [iv.step for iv in crule.history]
    assert {iv.note.split(": ")[-1] for iv in crule.history} == {"x2", "x0.8"}  # both branches acted
    flag = noise.early_stopping_flags(pr["p"], pr["C"], pr["p_hi"], p_threshold=0.45, p_run=3).first["low_p"]
    assert stop.stop_step == (None if flag is None else int(pr["step"][flag]))
    assert rec.should_stop == (flag is not None)


# --------------------------------------------------------------------------------------------------
# shown in the report and the figures; the demo's pass-through

def test_report_lists_the_interventions_of_a_run_with_controllers(tmp_path):
    from phasewatch.outputs.report import build_report, report_markdown

    _, made, _, res = _scripted_run(tmp_path / "r", lambda o: [CRuleLR(o)], C_SCRIPT, lr=0.01)
    rep = build_report(tmp_path / "r", analysis=res, max_rows=4)
    sec = {s["key"]: s for s in rep["sections"]}["interventions"]
    assert sec["available"] and sec["data"]["controllers"][0]["rule"] == "c_rule"
    assert [(r["step"], r["old"], r["new"]) for r in sec["data"]["rows"]] == [(m.step, m.old, m.new) for m in made]
    md = report_markdown(rep)
    assert "## Interventions" in md and "- 7 changes: c_rule 7" in md
    assert "| 12 | c_rule | param_groups[0].lr | 0.01 → 0.02 | C=0.3 < 0.5: x2 |" in md
    assert "| … | 3 more | | | |" in md and "| 42 | c_rule |" in md  # 2 first, 2 last of 7
    # controllers that never acted: the section says so; a run without controllers has no section
    _scripted_run(tmp_path / "quiet", lambda o: [EarlyStopping(o)], C_SCRIPT, lr=0.01)
    sec = {s["key"]: s for s in build_report(tmp_path / "quiet", window=3)["sections"]}["interventions"]
    assert sec["lines"][-1] == "- no intervention: the controllers never changed anything"
    _scripted_run(tmp_path / "off", lambda o: [], C_SCRIPT, lr=0.01, steps=9)
    assert "interventions" not in {s["key"] for s in build_report(tmp_path / "off", window=3)["sections"]}


def test_interventions_overlay_marks_each_change_at_its_step(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phasewatch.plot import save
    from phasewatch.plot.controls import RULE_COLOURS, interventions_overlay

    _, made, _, res = _scripted_run(tmp_path / "r", lambda o: [CRuleLR(o), EarlyStopping(o, patience=2)],
                                    C_SCRIPT, lr=0.01)
    fig, ax = plt.subplots()
    ax.plot(res.scalars["step"], res.scalars["loss"])
    ylim = ax.get_ylim()
    h = interventions_overlay(ax, res)
    assert ax.get_ylim() == ylim  # the marks sit in axes coordinates
    up = [m.step for m in made if m.rule == "c_rule" and m.new > m.old]
    down = [m.step for m in made if m.rule == "c_rule" and m.new < m.old]
    stop = [m.step for m in made if m.param == "stop"]
    assert stop and up and down
    assert list(h) == ["c rule: lr raised", "c rule: lr lowered", "early stopping: stop"]
    assert h["c rule: lr raised"].get_xdata().tolist() == up and h["c rule: lr raised"].get_marker() == "^"
    assert h["c rule: lr lowered"].get_xdata().tolist() == down
    assert h["early stopping: stop"].get_xdata().tolist() == stop
    assert matplotlib.colors.same_color(h["c rule: lr raised"].get_color(), RULE_COLOURS["c_rule"])
    vlines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in vlines] == stop
    png = save(fig, tmp_path / "o.png")
    assert plt.imread(png).shape[2] in (3, 4)
    plt.close(fig)
    # the overview's loss panel carries the same marks, in its legend
    from phasewatch.plot import FIGURES

    fig = FIGURES["overview"](res, panels=["loss"]) if "panels" in FIGURES["overview"].__code__.co_varnames \
        else FIGURES["overview"](res)
    marks = [ln for a in fig.axes for ln in a.lines if ln.get_marker() == "^"]
    assert marks and marks[0].get_xdata().tolist() == up
    plt.close(fig)
    # a run without interventions: nothing drawn
    fig, ax = plt.subplots()
    _, _, _, res0 = _scripted_run(tmp_path / "off", lambda o: [], C_SCRIPT, lr=0.01, steps=9)
    assert interventions_overlay(ax, res0) == {} and not ax.lines
    plt.close(fig)


def test_controller_study_figure_and_the_demos_controllers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phasewatch.plot import save
    from phasewatch.plot.controls import controller_study
    from phasewatch.workflows.demo import train_grokking

    # the demo passes controllers and gradient samples through, and stops when told to
    kw = dict(p=13, width=32, steps=24, eval_every=2, grad_samples_every=4, grad_probe=16, recorder_kwargs={"k": 4})
    base = train_grokking(tmp_path / "none", **kw)
    assert "stop_step" not in base
    stopped = train_grokking(tmp_path / "stop", controllers=lambda o: [EarlyStopping(o, p_threshold=1.01, patience=2)],
                             **kw)
    assert stopped["stop_step"] == 8  # p < 1.01 always: the second measurement (step 8) stops training
    res_stop = phasewatch.analyze(tmp_path / "stop", window=3)
    assert res_stop.scalars["step"][-1] == 8 and res_stop.interventions["step"].tolist() == [8]
    halved = train_grokking(tmp_path / "band", controllers=lambda o: [PBandLR(o)], **kw)
    res_band = phasewatch.analyze(tmp_path / "band", window=3)
    assert halved["stop_step"] is None and len(res_band.probes["step"]) == 6
    with pytest.raises(PhasewatchError, match="need a recorder"):
        train_grokking(None, controllers=lambda o: [], **{k: v for k, v in kw.items() if k != "recorder_kwargs"})

    res_none = phasewatch.analyze(tmp_path / "none", window=3)
    runs = {"none": [{"analysis": res_none, "grok_step": None, "final_test_acc": base["final_test_acc"],
                      "diverged": False}],
            "p_band": [{"analysis": res_band, "grok_step": 20, "final_test_acc": halved["final_test_acc"],
                        "diverged": True}],
            "early_stop": [{"analysis": res_stop, "grok_step": None, "final_test_acc": stopped["final_test_acc"],
                            "diverged": False}]}
    fig = controller_study(runs)
    axes = fig.axes
    assert len(axes) == 4
    titles = [a.get_title(loc="left") for a in axes]
    assert titles[0].startswith("(a) test acc") and titles[1].startswith("(b) steps to")
    assert titles[2].startswith("(c) learning rate") and titles[3].startswith("(d) final")
    assert [t.get_text() for t in axes[1].get_yticklabels()] == ["none", "p_band", "early_stop"]
    # (b): the one grokked run at its step, the others open markers at the right edge (step 24)
    xs = sorted(x for ln in axes[1].lines for x in ln.get_xdata())
    assert xs == [20, 20, 20, 24, 24]  # 20: the marker and the median bar's two ends
    # (d): the diverged run is an X
    assert [ln.get_marker() for ln in axes[3].lines] == ["o", "X", "o"]
    png = save(fig, tmp_path / "study.png")
    img = plt.imread(png)
    assert img.shape[1] == round(5.5 * 300) and img[..., :3].std() > 0.05
    plt.close(fig)
