"""analyze(), its exports, the command line and the shipped sample run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import phasewatch
from phasewatch.analysis.gram import band_from_updates
from phasewatch.analysis.pipeline import analyze_band
from phasewatch.cli import main
from phasewatch.store import RunWriter
from phasewatch.store import format as fmt

DATA = Path(__file__).resolve().parents[2] / "data"
SAMPLE = DATA / "grokking-p71.h5"


def _write_run(path: Path, U: np.ndarray, k: int, lr: float = 0.1, metrics=None) -> None:
    """A run written through the numpy-level writer from known updates (no torch)."""
    T = len(U)
    band = band_from_updates(U, k)
    meta = {"model": {"n_params": U.shape[1], "groups": [{"name": "all"}]}, "recorder": {"k": k, "mode": "exact"}}
    tables = [fmt.steps_table(1, 1), fmt.band_table(1, k), fmt.metrics_table()]
    with RunWriter(path, meta, tables) as w:
        steps = np.arange(1, T + 1)
        w.append("steps", step=steps, wall_time=np.zeros(T), loss=np.ones(T), lr=np.full((T, 1), lr),
                 grad_norm=np.ones(T), layer_grad_norm=np.ones((T, 1)),
                 update_norm=np.sqrt(band[:, 0]), flags=np.zeros(T, dtype="i4"))
        w.append("band", step=steps, lr=np.full(T, lr), band=band, layer_band=band[:, None, :])
        for name, (s, v) in (metrics or {}).items():
            w.append("metrics", step=s, name=np.array([name.encode()] * len(s)), value=v)


def test_planted_gap_is_found_and_moves(tmp_path):
    """Updates that live in a rank-2 subspace, then a rank-4 one: k* moves from 2 to 4."""
    rng = np.random.default_rng(0)
    P, T = 400, 80
    basis = np.linalg.qr(rng.standard_normal((P, 4)))[0].T
    coef = rng.standard_normal((T, 4)) * np.array([3.0, 2.0, 1.5, 1.2])
    coef[:40, 2:] = 0.0
    U = coef @ basis + 1e-4 * rng.standard_normal((T, P))
    acc = np.where(np.arange(0, T, 2) < 50, 0.1, 1.0)
    _write_run(tmp_path / "r", U, k=12, metrics={"test_acc": (np.arange(0, T, 2) + 1, acc)})
    res = phasewatch.analyze(tmp_path / "r", window=8)
    k = res.table["kstar"]
    steps = res.table["step"]
    assert np.all(k[steps <= 40] == 2)
    assert np.all(k[steps >= 48] == 4)
    assert res.table["gap_ratio"][steps <= 40].min() > 100
    ev = [e for e in res.events if e.kind == "grokking"]
    assert ev and ev[0].step == 51 and ev[0].metric == "test_acc"
    assert res.table["valid"].all()
    # stability coefficients against the definition, by brute force on the stored updates
    r = 30  # window ending at row 30 (step 31)
    n = int(np.nonzero(res.table["step"] == r + 1)[0][0])
    G = U[r - 7: r + 1] @ U[r - 7: r + 1].T
    lam = np.sort(np.linalg.eigvalsh(G))[::-1]
    dC = np.linalg.norm(np.outer(U[r], U[r]) - np.outer(U[r - 8], U[r - 8]))
    gaps = [min(abs(lam[j] - lam[i]) for i in range(8) if i != j) for j in range(8)]
    np.testing.assert_allclose(res.table["stability"][n, :2], 1 - dC**2 / np.array(gaps[:2]) ** 2, rtol=1e-6)


def test_too_short_empty_and_bad_window(tmp_path):
    rng = np.random.default_rng(1)
    _write_run(tmp_path / "short", rng.standard_normal((5, 30)), k=8)
    with pytest.raises(phasewatch.RunTooShortError, match="fewer than the window"):
        phasewatch.analyze(tmp_path / "short", window=6)
    with pytest.raises(phasewatch.PhasewatchError, match="exceeds the recorded band"):
        phasewatch.analyze(tmp_path / "short", window=9)
    meta = {"model": {"n_params": 3}, "recorder": {"k": 4}}
    with RunWriter(tmp_path / "empty", meta, [fmt.steps_table(1, 1), fmt.band_table(1, 4)]):
        pass
    with pytest.raises(phasewatch.RunTooShortError, match="empty run"):
        phasewatch.analyze(tmp_path / "empty", window=3)


def test_chunked_analysis_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(2)
    U = rng.standard_normal((300, 50)) * np.linspace(1, 3, 300)[:, None]
    band = band_from_updates(U, 10)
    lr = np.full(300, 0.01)
    steps = np.arange(300)
    one = analyze_band(band, lr, steps, 6)
    monkeypatch.setattr("phasewatch.analysis.pipeline.CHUNK_WINDOWS", 37)
    many = analyze_band(band, lr, steps, 6)
    for c in one:
        np.testing.assert_array_equal(one[c], many[c])


def test_exports_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    _write_run(tmp_path / "r", rng.standard_normal((40, 60)), k=8)
    res = phasewatch.analyze(tmp_path / "r", window=5)
    res.to_csv(tmp_path / "a.csv")
    res.to_json(tmp_path / "a.json")
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0].startswith("# phasewatch analysis")
    header = lines[1].split(",")
    assert header[:3] == ["step", "lr", "update_norm"] and "sigma_5" in header and "A" in header
    row = dict(zip(header, lines[2].split(",")))
    assert int(row["step"]) == res.table["step"][0]
    assert float(row["sigma_1"]) == res.table["sigma"][0, 0]
    js = json.loads((tmp_path / "a.json").read_text())
    assert js["window"] == 5 and js["table"]["kstar"] == res.table["kstar"].tolist()
    assert "A" in js["conventions"]
    df = res.to_dataframe()
    assert df.index.name == "step" and len(df) == 36
    np.testing.assert_array_equal(df["sigma_2"].to_numpy(), res.table["sigma"][:, 1])


def test_sample_run_ships_and_analyses():
    assert SAMPLE.exists(), "the sample run data/grokking-p71.h5 must ship with the repository"
    assert SAMPLE.stat().st_size < 8 * 2**20
    run = phasewatch.open_run(SAMPLE)
    assert run.packed and not run.warnings
    assert list(run.steps["step"]) == list(range(1, 301))
    res = phasewatch.analyze(run, window=10)
    grok = [e for e in res.events if e.kind == "grokking"]
    assert grok and 100 <= grok[0].step <= 180
    ctrl = phasewatch.analyze(DATA / "grokking-p71-no-wd.h5", window=10)
    assert not [e for e in ctrl.events if e.kind == "grokking"]


def test_cli_commands(tmp_path, capsys):
    assert main(["info", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "436,224 parameters" in out and "K=32" in out
    assert main(["analyze", str(SAMPLE), "--window", "8", "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "analysis.csv").exists() and (tmp_path / "a" / "analysis.json").exists()
    # streamed in chunks of 7 windows: the same table, byte for byte
    assert main(["analyze", str(SAMPLE), "--window", "8", "--chunk-steps", "7", "--out", str(tmp_path / "c"),
                 "--format", "csv"]) == 0
    assert (tmp_path / "c" / "analysis.csv").read_bytes() == (tmp_path / "a" / "analysis.csv").read_bytes()
    assert main(["plot", str(SAMPLE), "--out", str(tmp_path / "p"), "--format", "pdf", "png"]) == 0
    assert (tmp_path / "p" / "noise.pdf").read_bytes().startswith(b"%PDF")
    pdf = (tmp_path / "p" / "overview.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/Type3" not in pdf and b"FontFile2" in pdf
    png = tmp_path / "p" / "overview.png"
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.shape[1] > 1000 and img[..., :3].std() > 0.05  # not blank
    # deterministic PDF: same bytes on repeat
    assert main(["plot", str(SAMPLE), "--out", str(tmp_path / "p2"), "--format", "pdf"]) == 0
    assert (tmp_path / "p2" / "overview.pdf").read_bytes() == pdf
    assert main(["pack", str(SAMPLE), "-o", str(tmp_path / "x.h5")]) == 0
    assert phasewatch.open_run(tmp_path / "x.h5").steps["step"].size == 300


@pytest.mark.parametrize("args, needle", [
    (["info", "/nonexistent/run"], "no such file"),
    (["analyze", "__FILE__"], "not an HDF5 file"),
    (["analyze", "__SAMPLE__", "--window", "40"], "exceeds the recorded band"),
    (["plot", "__SAMPLE__", "--out", "__TMP__", "--format", "gif"], "--format gif"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    args = [a.replace("__FILE__", str(f)).replace("__SAMPLE__", str(SAMPLE)).replace("__TMP__", str(tmp_path))
            for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and err.startswith("phasewatch: error:")


def test_gradient_noise_table_from_recorded_statistics(tmp_path):
    """A run holding gradient-sample statistics gets C, p, phase and band per measurement, equal
    to the estimators applied to the raw samples."""
    from phasewatch.analysis import noise
    from phasewatch.store.format import Column, TableSpec

    rng = np.random.default_rng(5)
    P, L = 40, 2
    spec = TableSpec("grad_samples", {
        "step": Column("i8"), "n": Column("i8"), "b": Column("f8"), "source": Column("S16"),
        "mean_sq_norm": Column("f8"), "trace": Column("f8"), "quad": Column("f8"), "trace_sq": Column("f8"),
        "fourth": Column("f8"), "third": Column("f8"), "layer_mean_sq_norm": Column("f8", (L,)),
        "layer_trace": Column("f8", (L,)), "sample_norms": Column("f8", (8,)),
    })
    meta = {"model": {"n_params": P}, "recorder": {"k": 4}}
    raws, rows = [], []
    for i, mu in enumerate([0.05, 0.2, 0.6, 1.5]):
        G = rng.standard_normal((32, P)) + mu
        raws.append(G)
        st = noise.sufficient_statistics(G)
        lm = [float(np.sum(G[:, :20].mean(0) ** 2)), float(np.sum(G[:, 20:].mean(0) ** 2))]
        lt = [float(np.sum(G[:, :20].var(0, ddof=1))), float(np.sum(G[:, 20:].var(0, ddof=1)))]
        rows.append(dict(step=[10 * (i + 1)], n=[32], b=[1.0], source=[b"per_example"],
                         mean_sq_norm=[st.mean_sq_norm], trace=[st.trace], quad=[st.quad],
                         trace_sq=[st.trace_sq], fourth=[st.fourth], third=[st.third],
                         layer_mean_sq_norm=[lm], layer_trace=[lt],
                         sample_norms=[np.linalg.norm(G, axis=1)[:8]]))
    with RunWriter(tmp_path / "r", meta, [fmt.steps_table(1, 1), fmt.band_table(1, 4), spec]) as w:
        for r in rows:
            w.append("grad_samples", **{k: np.asarray(v) for k, v in r.items()})
    run = phasewatch.open_run(tmp_path / "r")
    pr = phasewatch.analysis.pipeline.noise_table(run.table("grad_samples"))
    assert pr["step"].tolist() == [10, 20, 30, 40]
    for i, G in enumerate(raws):
        ref = noise.consolidation_ratio(G, ci="delta")
        assert abs(pr["C"][i] - ref.C) <= 1e-12 * max(1.0, ref.C)
        np.testing.assert_allclose([pr["C_lo"][i], pr["C_hi"][i]], ref.ci, rtol=1e-10)
        assert pr["phase"][i] == ref.phase and pr["band"][i] == ref.band
    # C grows with the mean; the last measurement is clearly in the generalisation phase
    assert np.all(np.diff(pr["C"]) > 0) and pr["phase"][-1] == "generalization"
    assert pr["layer_C"].shape == (4, 2) and np.all(pr["B_simple"] > 0)
