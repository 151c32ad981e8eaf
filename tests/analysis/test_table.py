"""One result shape (issue 20 item 3): every table of an Analysis is a ``Table``; the options object and
the stages (issue 16 item 2): ``--level`` reaches every interval; the estimators' shared result names."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

import phasewatch
from phasewatch.analysis import (
    consolidation,
    gradcov,
    hill,
    leadtime,
    mcculloch,
    noise_scale,
    phases,
    stable_index,
)
from phasewatch.analysis.options import HILL_WINDOW, AnalysisOptions
from phasewatch.analysis.pipeline import analyze
from phasewatch.analysis.table import Table
from phasewatch.errors import PhasewatchError

pd = pytest.importorskip("pandas")
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "grokking-p71.h5"


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and (
        np.array_equal(a, b, equal_nan=True) if a.dtype.kind == "f" else np.array_equal(a, b))


# --------------------------------------------------------------------------- Table itself
def test_table_keeps_blocks_whole_and_expands_them_flat(tmp_path):
    sig = np.arange(12.0).reshape(4, 3)
    sig[1, 2] = np.nan
    t = Table({"step": np.arange(4, dtype="i8"), "sigma": sig, "name": np.array(list("abcd")),
               "ok": np.array([True, False, True, True])}, "demo")
    assert t["sigma"] is sig  # the stored block, not a copy
    assert list(dict.items(t))[1][1] is sig and [k for k, _ in t.items()] == ["step", "sigma", "name", "ok"]
    assert t.keys() == t.columns == ["step", "sigma_1", "sigma_2", "sigma_3", "name", "ok"]
    assert _same(t["sigma_3"], sig[:, 2]) and "sigma_3" in t and "sigma_4" not in t and "sigma" in t
    assert t.get("nope") is None and t.get("sigma_2") is not None
    assert len(t) == 4 and bool(t) and not Table() and len(Table()) == 0
    df = pd.DataFrame(t)  # pandas reads the flat view
    assert list(df.columns) == t.columns and _same(df["sigma_2"].to_numpy(), sig[:, 1])
    assert t.to_dataframe(index="step").index.name == "step"
    p = t.to_csv(tmp_path / "t.csv", header="demo table")
    lines = p.read_text().splitlines()
    assert lines[0] == "# demo table" and lines[1] == ",".join(t.columns) and len(lines) == 2 + 4
    back = pd.read_csv(p, comment="#")
    for c in ("sigma_1", "sigma_2", "sigma_3"):  # repr round-trips float64 exactly; NaN as an empty cell
        assert _same(back[c].to_numpy(dtype=float), t[c].astype(float))
    assert back["ok"].tolist() == [1, 0, 1, 1] and back["name"].tolist() == list("abcd")


# --------------------------------------------------------------------------- the sample run
@pytest.fixture(scope="module")
def sample():
    return analyze(SAMPLE, layers=False)


def test_every_table_of_an_analysis_is_a_table_and_a_dataframe(sample):
    res = sample
    for name in ("table", "scalars", "probes", "tail_index", "curvature", "interventions"):
        assert isinstance(getattr(res, name), Table), name
    sc = pd.DataFrame(res.scalars)  # raised before: lr (N, 1) and layer_grad_norm (N, 2)
    assert len(sc) == len(res.scalars["step"]) == 300
    assert _same(sc["lr_1"].to_numpy(), res.scalars["lr"][:, 0])
    assert _same(sc["layer_grad_norm_2"].to_numpy(), res.scalars["layer_grad_norm"][:, 1])
    assert res.scalars["lr"].shape == (300, 1)  # the block is still there for code that reads it so
    dfs = res.to_dataframes()
    assert set(dfs) == {"window", "steps", "noise", "tail_index", "curvature", "events", "interventions"}
    win = dfs["window"]
    assert len(win) == len(res.table["step"]) and _same(win["kstar"].to_numpy(), res.table["kstar"])
    W = res.table["sigma"].shape[1]
    assert [c for c in win.columns if c.startswith("sigma_")] == [f"sigma_{j}" for j in range(1, W + 1)]
    old = res.to_dataframe()  # the per-window frame of before: the same values, column for column
    for c in old.columns:
        assert _same(old[c].to_numpy(), win[c].to_numpy()), c
    ev = dfs["events"]
    assert ev["kind"].tolist() == [e.kind for e in res.events] and ev["step"].tolist() == [e.step for e in res.events]
    assert len(dfs["tail_index"]) == 300 - HILL_WINDOW + 1 and dfs["noise"].empty


def test_layer_tables_are_tables(tmp_path):
    res = analyze(SAMPLE, layers=True)
    assert res.layers and all(isinstance(t, Table) for t in res.layers.values())
    dfs = res.to_dataframes()
    for name, t in res.layers.items():
        assert _same(dfs[f"layer/{name}"]["gap_ratio"].to_numpy(), t["gap_ratio"])


def test_options_object_is_the_keywords(sample):
    via = analyze(SAMPLE, options=AnalysisOptions(window=10))
    for k in sample.table:
        assert _same(via.table[k], sample.table[k]), k
    assert via.conventions == sample.conventions and via.options == sample.options
    assert sample.options.hill_window == HILL_WINDOW and sample.options.level == 0.95
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.options.level = 0.5
    for bad in (dict(level=1.5), dict(level=0.0), dict(hill_window=1), dict(chunk_steps=0)):
        with pytest.raises(PhasewatchError):
            AnalysisOptions(**bad)


def test_hill_window_option_gives_the_estimator_on_that_window():
    res = analyze(SAMPLE, options=AnalysisOptions(hill_window=50))
    gn = np.asarray(res.scalars["grad_norm"], float)
    direct = phasewatch.analysis.tails.rolling_hill(gn, window=50, fraction=0.1)
    assert len(res.tail_index["step"]) == 300 - 50 + 1
    assert _same(res.tail_index["alpha"], direct.alpha) and _same(res.tail_index["alpha_lo"], direct.ci[:, 0])
    assert "last 50 gradient norms" in res.conventions["alpha"]
    assert "over 50-step windows" in res.summary()


# --------------------------------------------------------------------------- --level reaches every interval
@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """A real recorded run (linear regression by SGD) with per-example gradient samples every 2 steps
    and 120 steps of gradient norms (enough for the rolling Hill window)."""
    import torch

    path = tmp_path_factory.mktemp("rec") / "linreg"
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, bias=False).double()
    w_star = torch.randn(5, 1, dtype=torch.float64) * 3
    gen = torch.Generator().manual_seed(1)
    px = 1 + 0.1 * torch.randn(48, 5, dtype=torch.float64, generator=gen)
    py = px @ w_star + 0.5 * torch.randn(48, 1, dtype=torch.float64, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with phasewatch.Recorder(path, model, opt, k=6, block=4, strict=True, grad_samples_every=2,
                             grad_probe=(px, py), grad_loss=lambda o, y: 0.5 * ((o - y) ** 2).sum(-1)) as rec:
        for _ in range(120):
            x = 1 + 0.1 * torch.randn(64, 5, dtype=torch.float64, generator=gen)
            y = x @ w_star + 0.5 * torch.randn(64, 1, dtype=torch.float64, generator=gen)
            opt.zero_grad()
            loss = 0.5 * ((model(x) - y) ** 2).sum(-1).mean()
            loss.backward()
            rec.loss(loss)
            opt.step()
    return path


def _section(rep, key):
    return next(s for s in rep["sections"] if s["key"] == key)


def test_report_level_changes_every_interval(noisy_run, tmp_path):
    from phasewatch.cli.main import main
    from phasewatch.outputs.report import build_report

    reps = {}
    for lv in (0.9, 0.95):
        out = tmp_path / f"r{lv}"
        assert main(["report", str(noisy_run), "--level", str(lv), "--window", "5", "--out", str(out), "--format", "json"]) == 0
        reps[lv] = json.loads((out / "report.json").read_text())
    assert reps[0.95] == json.loads(json.dumps(build_report(noisy_run, window=5)))  # the default is 0.95
    run = phasewatch.open_run(noisy_run)
    gs = run.table("grad_samples")
    ok = np.asarray(gs["n"]) >= 2
    stats = {k: np.asarray(gs[k], float)[ok] for k in ("mean_sq_norm", "trace", "quad", "trace_sq", "fourth", "third")}
    gn = np.asarray(run.steps["grad_norm"], float)
    for lv, rep in reps.items():
        c = _section(rep, "C")["data"]
        # ground truth: the estimator called directly at that level
        r = consolidation.consolidation_ratio(n=np.asarray(gs["n"])[ok].astype("i8"), b=np.asarray(gs["b"], float)[ok],
                                              ci="delta", level=lv, **stats)
        assert np.allclose(c["C_lo"], r.ci[:, 0], rtol=0, atol=0, equal_nan=True)
        assert np.allclose(c["p_hi"], r.p_ci[:, 1], rtol=0, atol=0, equal_nan=True)
        a = _section(rep, "alpha")["data"]
        rh = hill.rolling_hill(gn, window=HILL_WINDOW, fraction=0.1, level=lv)
        j = int(np.nonzero(np.isfinite(rh.alpha))[0][-1])
        assert a["last_ci"] == [float(rh.ci[j, 0]), float(rh.ci[j, 1])]
    c9, c95 = _section(reps[0.9], "C")["data"], _section(reps[0.95], "C")["data"]
    fin = [i for i, x in enumerate(c9["C_lo"]) if x is not None and c95["C_lo"][i] is not None
           and math.isfinite(x) and c9["C_hi"][i] > c9["C_lo"][i]]
    assert fin, "no finite C interval to compare"
    for i in fin:  # a lower level gives a narrower interval inside the wider one (C_lo truncated at 0)
        assert c95["C_lo"][i] <= c9["C_lo"][i] <= c9["C_hi"][i] < c95["C_hi"][i]
        assert c95["C_lo"][i] < c9["C_lo"][i] or c9["C_lo"][i] == 0.0
    a9, a95 = _section(reps[0.9], "alpha")["data"]["last_ci"], _section(reps[0.95], "alpha")["data"]["last_ci"]
    assert a95[0] < a9[0] < a9[1] < a95[1]
    assert _section(reps[0.9], "forecast")["data"].get("level", 0.9) == 0.9


# --------------------------------------------------------------------------- shared estimator result names
@functools.lru_cache(maxsize=1)
def _results():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_t(3, size=2000)) + 1e-3
    samples = rng.standard_normal((40, 30)) + 0.3
    t = np.arange(60.0)
    p = 1 / (1 + np.exp(-0.2 * (t - 30))) + 0.01 * rng.standard_normal(60)
    return {
        "hill": (hill.hill(x), "estimate", "ci"),
        "rolling_hill": (hill.rolling_hill(x, window=100), "alpha", "ci"),
        "consolidation_ratio": (consolidation.consolidation_ratio(samples, ci="delta"), "C", "ci"),
        "noise_scale": (noise_scale.noise_scale(samples, ci="delta"), "B_simple", "ci"),
        "two_batch": (noise_scale.noise_scale_two_batch(np.full(8, 2.0) + rng.random(8), np.full(8, 1.2) + rng.random(8) * 0.1,
                                                        4, 64, seed=0), "B_simple", "ci"),
        "stable_index": (stable_index.stable_index(rng.standard_cauchy((400, 8)), seed=0), "estimate", "ci"),
        "mcculloch": (mcculloch.mcculloch(rng.standard_cauchy(4000)), "alpha", None),
        "logistic_forecast": (phases.logistic_forecast(t, p), "t0", "t0_ci"),
        "coordinate_tails": (gradcov.coordinate_tails(rng.standard_t(3, size=(40, 50))), "estimate", "ci"),
        "levy_rolling": (gradcov.levy_rolling(x, window=100), "C", None),
        "median_ci": (leadtime.median_ci(rng.standard_normal(30), seed=0), "median", ("lo", "hi")),
    }


@pytest.mark.parametrize("name", ["hill", "rolling_hill", "consolidation_ratio", "noise_scale", "two_batch",
                                  "stable_index", "mcculloch", "logistic_forecast", "coordinate_tails",
                                  "levy_rolling", "median_ci"])
def test_every_public_result_has_statistic_and_confidence_interval(name):
    res, stat, ci = _results()[name]
    assert res.statistic is getattr(res, stat)  # the old name stays, the new one is the same object
    lo, hi = res.confidence_interval
    if ci is None:  # the estimator gives no interval: NaN of the statistic's shape
        assert np.shape(lo) == np.shape(res.statistic) and np.isnan(lo).all() and np.isnan(hi).all()
    elif isinstance(ci, tuple):
        assert (lo, hi) == (getattr(res, ci[0]), getattr(res, ci[1]))
    else:
        old = np.asarray(getattr(res, ci), float)
        assert _same(np.asarray(lo, float), old[..., 0]) and _same(np.asarray(hi, float), old[..., 1])
        fin = np.isfinite(np.asarray(lo, float)) & np.isfinite(np.asarray(hi, float))
        assert fin.any() and (np.asarray(lo)[fin] <= np.asarray(hi)[fin]).all()


def test_the_list_above_covers_every_result_type_with_an_interval():
    """Every public frozen-dataclass result in analysis/ with an interval field has the shared names."""
    import importlib
    import pkgutil

    import phasewatch.analysis as pkg
    from phasewatch.analysis.result import Estimate

    missing = []
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"phasewatch.analysis.{m.name}")
        for obj in vars(mod).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == mod.__name__
                    and not obj.__name__.startswith("_")):
                names = {f.name for f in dataclasses.fields(obj)}
                if {"ci", "t0_ci"} & names or {"lo", "hi"} <= names:
                    if not issubclass(obj, Estimate):
                        missing.append(f"{mod.__name__}.{obj.__name__}")
    assert not missing, missing
