"""Studies, reports, compare and the multi-run figures: synthetic runs with planted answers, the
packed sample runs end to end through the CLI, and a real Recorder run with gradient samples."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import phasewatch  # noqa: E402
from phasewatch.analysis import noise as nz  # noqa: E402
from phasewatch.analysis.pipeline import Analysis  # noqa: E402
from phasewatch.cli import main  # noqa: E402
from phasewatch.outputs.report import build_report, report_markdown, segments  # noqa: E402
from phasewatch.plot.multirun import band_stats, mean_band, sweep  # noqa: E402
from phasewatch.workflows.study import run_study  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "data"
GROK = DATA / "grokking-p71.h5"
NOWD = DATA / "grokking-p71-no-wd.h5"


def _synthetic(event: int | None, lead: int, N: int = 300, seed: int = 0) -> Analysis:
    """A run whose g23 peaks and then falls below peak/1.5 exactly ``lead`` steps before the step at
    which test accuracy first reaches 0.95 (``event``); ``event=None``: a control whose g23 only
    rises and whose accuracy stays low."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, N + 1)
    if event is None:
        g = np.linspace(0.5, 1.0, N)
        acc = np.full(N // 2, 0.05)
    else:
        onset = event - lead
        g = np.full(N, 0.9)
        g[(steps >= onset - 10) & (steps < onset)] = 1.0
        g[steps >= onset] = 0.55
        acc = np.where(np.arange(2, N + 1, 2) >= event, 0.99, 0.05)
    g = g * (1 + 1e-4 * rng.uniform(size=N))  # no exact ties; the planted steps are unchanged
    table = {"step": steps, "g23": g, "valid": np.ones(N, bool), "kstar": np.ones(N, int)}
    return Analysis(source="band", window=10, n_params=10, table=table, scalars={},
                    metrics={"test_acc": (np.arange(2, N + 1, 2), acc)})


def _image_ok(path: Path) -> None:
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert np.std(img[..., :3]) > 0.02  # something was drawn


def test_study_recovers_planted_precursors_and_writes_everything(tmp_path):
    events = [100, 140, 180, 220]
    runs = [_synthetic(e, 12, seed=i) for i, e in enumerate(events)] + [_synthetic(None, 0, seed=9),
                                                                           _synthetic(None, 0, seed=10)]
    labels = [f"grok{i}" for i in range(4)] + ["ctrl0", "ctrl1"]
    st = run_study(runs, labels=labels, event="test_acc>=0.95", signal="g23")
    ev = st.event_rows
    assert [r.event_step for r in ev] == events
    assert [r.tau for r in ev] == [12.0] * 4 and all(r.status == "lead" for r in ev)
    assert [r.onset_step for r in ev] == [e - 12 for e in events]
    assert [r.fired for r in st.control_rows] == [False, False]
    s = st.summary
    assert (s.hits, s.n_event_runs, s.false_alarms, s.n_control_runs) == (4, 4, 0, 2)
    assert (s.median_tau.median, s.median_tau.lo, s.median_tau.hi) == (12.0, 12.0, 12.0)
    # 4 runs: only the identity keeps >= 3 of 4 distances at 12 (no permutation fixes exactly 3)
    assert st.permutation.p == pytest.approx(1 / 24) and st.permutation.n_perm == 24
    # per run: the decline step is the only place the rule fires; p = (1 + #rotations within 12) / N
    for r in ev:
        assert r.p_shift < 0.1
    assert "separates event runs from controls" in st.verdict()
    written = st.write(tmp_path / "out")
    names = {p.name for p in written}
    assert names == {"study.md", "study.json", "study.pdf", "study.png"}
    d = json.loads((tmp_path / "out" / "study.json").read_text())
    assert d["summary"]["hits"] == 4 and d["rows"][0]["tau"] == 12.0 and d["rows"][4]["control"] is True
    md = (tmp_path / "out" / "study.md").read_text()
    assert "| grok0 | no | 100 | 88 | 12 | lead |" in md and "false-alarm rate: 0/2" in md
    _image_ok(tmp_path / "out" / "study.png")
    assert (tmp_path / "out" / "study.pdf").read_bytes()[:5] == b"%PDF-"


def test_study_reports_lags_and_false_alarms():
    # the decline comes 15 steps after the event: a lag; a control whose g23 falls: a false alarm
    lag_run = _synthetic(150, 12)
    lag_run.metrics["test_acc"] = (np.arange(2, 301, 2), np.where(np.arange(2, 301, 2) >= 123, 0.99, 0.05))
    ctrl = _synthetic(None, 0)
    ctrl.table["g23"] = np.linspace(1.0, 0.1, 300)
    st = run_study([lag_run, ctrl], signal="g23")
    r = st.rows[0]
    assert r.event_step == 124 and r.onset_step == 138 and r.tau == -14 and r.status == "lag"
    assert r.p_shift == 1.0  # no evidence of a lead
    assert st.rows[1].fired and st.summary.false_alarm_rate == 1.0 and st.summary.lags == 1
    assert "a lag" in st.verdict()


def test_study_cli_on_the_sample_runs_matches_brute_force(tmp_path):
    out = tmp_path / "study"
    rc = main(["study", str(GROK), str(NOWD), "--event", "test_acc>=0.95", "--signal", "g23",
               "--onset", "decline", "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "study.json").read_text())
    rows = {r["run"]: r for r in d["rows"]}
    g, c = rows["grokking-p71"], rows["grokking-p71-no-wd"]
    assert g["event_step"] == 138 and c["event_step"] is None and c["control"]
    # brute force: the pre-event peak of g23 and the first later value below peak/1.5
    for run, ref in ((GROK, 138), (NOWD, None)):
        a = phasewatch.analyze(run)
        steps, g23 = a.table["step"], a.table["g23"]
        last = len(steps) if ref is None else max(i for i in range(len(steps)) if steps[i] <= ref) + 1
        k = max(range(last), key=lambda i: (g23[i], -i))
        onset = next((int(steps[i]) for i in range(k + 1, len(steps)) if g23[i] <= g23[k] / 1.5), None)
        row = g if ref else c
        assert row["onset_step"] == onset
    assert g["tau"] == 138 - g["onset_step"]
    assert c["fired"] == (c["onset_step"] is not None)
    _image_ok(out / "study.png")


def test_study_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["study", str(GROK), "--event", "test_acc>>1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "e.g." in err
    assert main(["study", str(GROK), "--signal", "nosuch", "--onset", "peak"]) == 1
    assert "available" in capsys.readouterr().err
    assert main(["study", str(GROK), "--param", "factor"]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err


def test_report_cli_on_the_sample_run(tmp_path, capsys):
    assert main(["report", str(GROK)]) == 0
    md = capsys.readouterr().out
    assert "| grokking | 138 |" in md
    assert "No curvature probes recorded" in md and "No gradient-noise measurements recorded" in md
    assert main(["report", str(GROK), "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    keys = [s["key"] for s in rep["sections"]]
    assert keys == ["events", "onsets", "phases", "kstar", "A", "C", "flags", "alpha", "S", "forecast"]
    sec = {s["key"]: s for s in rep["sections"]}
    for k in ("phases", "C", "flags", "S", "forecast"):
        assert not sec[k]["available"] and len(sec[k]["lines"]) == 1
    assert sec["kstar"]["available"] and "kstar" in rep["conventions"]
    a = phasewatch.analyze(GROK)
    assert sec["kstar"]["data"]["mode"] == a.summary_dict()["kstar_mode"]
    assert sec["kstar"]["data"]["changes"] == a.summary_dict()["kstar_changes"]
    # the k* segments tile the valid windows in order
    segs = sec["kstar"]["data"]["segments"]
    assert sum(s["n"] for s in segs) == int(a.table["valid"].sum())
    assert sec["alpha"]["data"]["median"] == pytest.approx(np.nanmedian(a.tail_index["alpha"]))
    onsets = {o["signal"]: o for o in sec["onsets"]["data"]["onsets"]}
    assert onsets["g23"]["tau"] == 138 - onsets["g23"]["onset_step"]


def test_segments_tile_the_series():
    segs = segments(np.arange(10, 17), np.array(["a", "a", "b", "b", "b", "a", "c"]))
    assert [(s["from"], s["to"], s["label"], s["n"]) for s in segs] == [
        (10, 11, "a", 2), (12, 14, "b", 3), (15, 15, "a", 1), (16, 16, "c", 1)]
    assert segments(np.zeros(0), np.zeros(0)) == []


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """A real recorded run: linear regression by SGD with per-example gradient samples every 2 steps.
    Inputs near the all-ones vector make the per-example gradients agree while far from the optimum
    (C ≫ 1), and the label noise dominates once it is fitted (C → 0)."""
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
                             grad_probe=(px, py), grad_loss=lambda o, y: 0.5 * ((o - y) ** 2).sum(-1),
                             meta={"width": 5}) as rec:
        for step in range(1, 81):
            x = 1 + 0.1 * torch.randn(64, 5, dtype=torch.float64, generator=gen)
            y = x @ w_star + 0.5 * torch.randn(64, 1, dtype=torch.float64, generator=gen)
            opt.zero_grad()
            loss = 0.5 * ((model(x) - y) ** 2).sum(-1).mean()
            loss.backward()
            rec.loss(loss)
            opt.step()
            if step % 4 == 0:
                rec.log(step, test_loss=loss.item())
    return path


def test_report_with_gradient_noise_matches_the_estimators(noisy_run, tmp_path):
    a = phasewatch.analyze(noisy_run, window=4)
    rep = build_report(noisy_run, window=4)
    sec = {s["key"]: s for s in rep["sections"]}
    pr = a.probes
    assert sec["C"]["available"] and sec["C"]["data"]["C"] == pytest.approx(list(pr["C"]), nan_ok=True)
    assert sec["C"]["data"]["p_hi"] == pytest.approx(list(pr["p_hi"]), nan_ok=True)
    # C starts high (far from the optimum) and falls: the phases move from generalization to exploration
    phases = [s["label"] for s in sec["phases"]["data"]["segments"]]
    assert phases[0] == "generalization" and "exploration" in phases
    flat = [s["label"] for s in sec["phases"]["data"]["segments"] for _ in range(s["n"])]
    assert flat == list(pr["phase"])
    assert sec["flags"]["data"]["first_step"] == a.probe_flags
    assert sec["flags"]["data"]["first_step"]["low_p"] is not None
    fc = nz.logistic_forecast(pr["step"], pr["p"])
    assert sec["forecast"]["data"]["t0"] == pytest.approx(fc.t0)
    assert sec["forecast"]["data"]["t0_ci"] == pytest.approx(list(fc.t0_ci))
    assert not sec["S"]["available"] and sec["S"]["lines"] == ["No curvature probes recorded: no λ_max and no S."]
    md = report_markdown(rep)
    assert md.count("*Convention:") == sum(s["available"] and bool(s["convention"]) for s in rep["sections"])
    assert "width=5" in md  # the user's attribute
    assert main(["report", str(noisy_run), "--window", "4", "--out", str(tmp_path), "--format", "json"]) == 0
    assert (tmp_path / "report.json").exists() and not (tmp_path / "report.md").exists()


def test_compare_cli(tmp_path, noisy_run, capsys):
    assert main(["compare", str(GROK), str(NOWD), "--by", "weight_decay", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "compare.csv").read_text())))
    assert [r["run"] for r in rows] == ["grokking-p71-no-wd", "grokking-p71"]  # sorted by the attribute
    assert float(rows[0]["weight_decay"]) == 0.0 and float(rows[1]["weight_decay"]) == 2e-4
    run = phasewatch.open_run(GROK)
    s, v = run.metrics()["test_acc"]
    assert float(rows[1]["final_test_acc"]) == pytest.approx(v[-1])
    assert float(rows[1]["grok_step"]) == 138 and rows[0]["grok_step"] == ""
    d = json.loads((tmp_path / "compare.json").read_text())
    assert d["by"] == "weight_decay" and d["rows"][0]["grok_step"] is None
    _image_ok(tmp_path / "sweep.png")
    capsys.readouterr()
    # a dotted path, an optimizer hyper-parameter, a user attribute of a recorded run
    assert main(["compare", str(GROK), "--by", "optimizer.hyper.lr", "--no-figure"]) == 0
    assert "| grokking-p71 | 0.001 |" in capsys.readouterr().out
    assert main(["compare", str(noisy_run), "--by", "width", "--window", "4", "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert "| linreg | 5 |" in out and "C_last" in out
    assert main(["compare", str(GROK), "--by", "depth"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meta=" in err


def test_band_stats_against_numpy():
    s = np.arange(0, 100, 10)
    ys = [np.arange(10.0), 2 * np.arange(10.0), 3 * np.arange(10.0)]
    grid, mean, lo, hi = band_stats([(s, y) for y in ys])
    Y = np.vstack(ys)
    assert np.array_equal(grid, s)
    assert mean == pytest.approx(Y.mean(0)) and hi - mean == pytest.approx(Y.std(0, ddof=1))
    # a run on other steps is interpolated onto the first run's grid, within the common range
    grid2, mean2, lo2, hi2 = band_stats([(s, ys[0]), (s + 5, ys[0] + 0.5)], band="minmax")
    assert np.array_equal(grid2, s[1:])
    assert lo2 == pytest.approx(ys[0][1:]) and hi2 == pytest.approx(ys[0][1:])  # both lines are 0.1·step


def test_mean_band_and_sweep_figures(tmp_path):
    runs = {"a": [_synthetic(100, 10, seed=i) for i in range(3)], "b": [_synthetic(None, 0, seed=i) for i in range(2)]}
    fig = mean_band(runs, "test_acc", band="sem")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (n=3)", "b (n=2)"]
    fig.savefig(tmp_path / "band.png")
    plt.close(fig)
    _image_ok(tmp_path / "band.png")
    fig = sweep([50, 100, 200, 200, 400], {"test error": [0.1, 0.5, 2.0, 1.8, 0.3], "C": [3, 1, 0.2, 0.3, 2]},
                xlabel="features")
    assert fig.axes[0].get_xscale() == "linear" and len(fig.axes) == 2
    fig2 = sweep([50, 3200, 200], {"err": [1, 2, 3]})
    assert fig2.axes[0].get_xscale() == "log"
    fig3 = sweep(["sgd", "adam", "sgd"], {"err": [1, 2, 3]})
    assert [t.get_text() for t in fig3.axes[0].get_xticklabels()] == ["sgd", "adam"]
    for f in (fig, fig2, fig3):
        plt.close(f)


def test_report_margin_section_from_a_curvature_table():
    """The S section reads Analysis.curvature when it has rows: last S, λ_max, threshold, S < 0 count."""
    import dataclasses

    a = phasewatch.analyze(GROK)
    lam = np.array([100.0, 1500.0, 2100.0, 1900.0])
    thr = np.full(4, 2 / 1e-3)  # 2/η for η = 1e-3
    cv = {"step": np.array([50, 100, 150, 200]), "lambda_max": lam, "threshold": thr, "S": thr - lam}
    a2 = dataclasses.replace(a, curvature=cv)
    sec = {s["key"]: s for s in build_report(GROK, analysis=a2)["sections"]}["S"]
    assert sec["available"]
    assert sec["data"]["S"] == pytest.approx(list(thr - lam))
    assert "last S = 100 at step 200" in sec["lines"][0] and "λ_max = 1.9e+03" in sec["lines"][0]
    assert "in 1 of 4 probes" in sec["lines"][1] and "min S = -100" in sec["lines"][1]
