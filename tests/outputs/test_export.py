"""Exports (TensorBoard, CSV, Parquet), following a live run, and ``phasewatch watch``.

TensorBoard files are read back with TensorBoard's own ``EventAccumulator``; live runs are written
by a real ``RunWriter`` while the follower runs in a thread of the same process.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import phasewatch
from phasewatch.analysis import noise
from phasewatch.analysis.gram import band_from_updates
from phasewatch.cli import main
from phasewatch.outputs.export import (
    CsvSink,
    Follower,
    TensorBoardSink,
    export,
    merged_rows,
    scalar_series,
    tables,
)
from phasewatch.outputs.watch import watch
from phasewatch.store import RunWriter
from phasewatch.store import format as fmt
from phasewatch.store.live import run_closed

ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "grokking-p71.h5"
K, W = 12, 8
LAYERS = ("W", "V")
SIZES = (24, 16)
P = sum(SIZES)
N_SAMPLES = 8


class Synthetic:
    """A run known in advance (updates, losses, metrics, gradient samples), written in pieces."""

    def __init__(self, T: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        basis = np.linalg.qr(rng.standard_normal((P, 3)))[0].T
        coef = rng.standard_normal((T, 3)) * np.array([3.0, 1.0, 0.5])
        self.U = coef @ basis + 0.05 * rng.standard_normal((T, P))
        self.layer_band = band_from_updates(self.U, K, SIZES)
        self.band = self.layer_band.sum(axis=1)
        self.loss = np.exp(-np.arange(T) / 50.0) + 0.01 * rng.random(T)
        self.loss[3] = np.nan  # a step without a loss
        self.layer_gn = rng.pareto(1.5, size=(T, 2)) + 0.1
        self.lr = np.where(np.arange(T) < T // 2, 0.1, 0.05)
        self.T = T
        self.rng = rng

    def write(self, w: RunWriter, lo: int, hi: int) -> None:
        """Rows of steps lo+1..hi (0-based rows lo..hi-1)."""
        r = slice(lo, hi)
        s = np.arange(lo + 1, hi + 1)
        n = hi - lo
        w.append("steps", step=s, wall_time=1.7e9 + s.astype(float), loss=self.loss[r], lr=self.lr[r][:, None],
                 grad_norm=np.sqrt((self.layer_gn[r] ** 2).sum(1)), layer_grad_norm=self.layer_gn[r],
                 update_norm=np.sqrt(self.band[r, 0]), flags=np.zeros(n, dtype="i4"))
        w.append("band", step=s, lr=self.lr[r], band=self.band[r], layer_band=self.layer_band[r])
        ev = s[s % 5 == 0]
        acc = 1 / (1 + np.exp(-(ev - 0.6 * self.T) / 4.0))
        w.append("metrics", step=np.repeat(ev, 2), name=np.tile([b"test_acc", b"train_acc"], len(ev)),
                 value=np.column_stack([acc, np.minimum(1, acc + 0.3)]).ravel())
        for step in s[s % 10 == 0]:
            mu = np.full(P, 0.05 * step / self.T)
            g = mu + self.rng.standard_normal((N_SAMPLES, P))
            st = noise.sufficient_statistics(g, b=1)
            gbar = g.mean(0)
            parts = np.split(np.arange(P), np.cumsum(SIZES)[:-1])
            lm = [float(gbar[p] @ gbar[p]) for p in parts]
            lt = [float(((g[:, p] - gbar[p]) ** 2).sum() / (N_SAMPLES - 1)) for p in parts]
            w.append("grad_samples", step=[step], n=[st.n], b=[1.0], source=[b"per_example"],
                     mean_sq_norm=[st.mean_sq_norm], trace=[st.trace], quad=[st.quad], trace_sq=[st.trace_sq],
                     fourth=[st.fourth], third=[st.third], layer_mean_sq_norm=[lm], layer_trace=[lt],
                     sample_norms=[np.linalg.norm(g, axis=1)])

    def writer(self, path: Path, resume: bool = False) -> RunWriter:
        meta = {"model": {"n_params": P, "groups": [{"name": n} for n in LAYERS]}, "recorder": {"k": K, "mode": "exact"}}
        tables_ = [fmt.steps_table(2, 1), fmt.band_table(2, K), fmt.metrics_table(),
                   fmt.grad_samples_table(2, N_SAMPLES)]
        return RunWriter(path, meta, tables_, resume=resume, block_rows=100_000, flush_seconds=1e9)


def _run(path: Path, T: int = 160) -> Path:
    syn = Synthetic(T)
    with syn.writer(path) as w:
        syn.write(w, 0, T)
    return path


def _accumulator(logdir: Path):
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def _series(acc, tag):
    ev = acc.Scalars(tag)
    return np.array([e.step for e in ev]), np.array([e.value for e in ev])


def _check_tag(acc, tag, steps, values):
    """The tag holds exactly the finite values, each rounded to float32 as TensorBoard stores it."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v)
    got_s, got_v = _series(acc, tag)
    np.testing.assert_array_equal(got_s, np.asarray(steps)[ok], err_msg=tag)
    np.testing.assert_array_equal(got_v.astype(np.float32), v[ok].astype(np.float32), err_msg=tag)


def _check_tensorboard(logdir: Path, res) -> None:
    acc = _accumulator(logdir)
    t, sc, pr, ti = res.table, res.scalars, res.probes, res.tail_index
    # named quantities, straight from the analysis
    for col in ("kstar", "gap_ratio", "gap", "A", "A_eigen", "regime", "g23", "sigma1_over_dcrit"):
        _check_tag(acc, f"window/{col}", t["step"], t[col])
    assert np.isnan(t["A"][0]) and _series(acc, "window/A")[0][0] == t["step"][1]  # NaN left out
    for j in range(W):
        _check_tag(acc, f"window/sigma_{j + 1}", t["step"], t["sigma"][:, j])
    for col in ("loss", "grad_norm", "update_norm"):
        _check_tag(acc, f"steps/{col}", sc["step"], sc[col])
    _check_tag(acc, "steps/lr", sc["step"], sc["lr"][:, 0])
    for j, name in enumerate(LAYERS):
        _check_tag(acc, f"steps/grad_norm_{name}", sc["step"], sc["layer_grad_norm"][:, j])
        _check_tag(acc, f"noise/layer_C_{name}", pr["step"], pr["layer_C"][:, j])
    for col in ("C", "C_lo", "C_hi", "p", "p_lo", "p_hi", "C_naive", "C_per_example", "B_simple", "n"):
        _check_tag(acc, f"noise/{col}", pr["step"], pr[col])
    for col in ("alpha", "alpha_lo", "alpha_hi"):
        _check_tag(acc, f"tail/{col}", ti["step"], ti[col])
    for name, (s, v) in res.metrics.items():
        _check_tag(acc, f"eval/{name}", s, v)
    # every numeric column of every table is there, except copies of per-step series and the
    # per-mode stability coefficients (CSV/Parquet only), and nothing else
    want = {tag for tag, *_ in scalar_series(tables(res, list(LAYERS)))}
    left_out = {"window/lr", "window/update_norm"} | {f"window/stability_{j + 1}" for j in range(W)}
    assert left_out <= want and set(acc.Tags()["scalars"]) == want - left_out
    # the window spectra as histograms: one bucket per singular value, exact (float64)
    h = acc.Histograms("window/sigma")
    np.testing.assert_array_equal([e.step for e in h], t["step"])
    for e, row in zip(h, t["sigma"]):
        hv = e.histogram_value
        np.testing.assert_allclose(hv.bucket_limit, np.sort(row), rtol=1e-15)
        assert hv.num == W and hv.bucket == [1.0] * W and hv.max == row.max()
        np.testing.assert_allclose(hv.sum_squares, np.sum(row**2), rtol=1e-12)
    lh = acc.Histograms("window/log10_sigma")[-1].histogram_value
    np.testing.assert_allclose(lh.bucket_limit, np.sort(np.log10(t["sigma"][-1])), rtol=1e-12)
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("events")]
    grok = [e for e in res.events if e.kind == "grokking"][0]
    assert any(x.startswith(f"grokking at step {grok.step}") for x in texts)
    assert "canonical" in acc.Tensors("conventions")[0].tensor_proto.string_val[0].decode()
    assert "Delta C" in acc.SummaryMetadata("window/A").summary_description


def test_tensorboard_export_reads_back_equal_to_the_analysis(tmp_path, capsys):
    run = _run(tmp_path / "run")
    assert main(["export", str(run), "--window", str(W), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert "exported" in capsys.readouterr().out
    res = phasewatch.analyze(run, window=W)
    assert res.events and len(res.probes["step"]) == 16 and len(res.tail_index["step"]) == 61
    _check_tensorboard(tmp_path / "tb", res)
    # a second export into the same directory is refused, unless asked for
    assert main(["export", str(run), "--window", str(W), "--tensorboard", str(tmp_path / "tb")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "-w", str(W), "--tensorboard", str(tmp_path / "tb"), "--overwrite"]) == 0
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1


def _read_csv(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return {name: [r[i] for r in rows[1:]] for i, name in enumerate(rows[0])}


def _assert_csv_equal(path: Path, table) -> None:
    got = _read_csv(path)
    assert list(got) == list(table.columns)
    for name, col in table.columns.items():
        col = np.asarray(col)
        if col.dtype.kind in "fiub":
            back = np.array([float(x) if x else np.nan for x in got[name]])
            np.testing.assert_array_equal(back, col.astype(float), err_msg=f"{path.name}:{name}")  # exact
        else:
            assert got[name] == [str(x) for x in col], f"{path.name}:{name}"


def test_csv_and_parquet_round_trip(tmp_path):
    run = _run(tmp_path / "run")
    out_csv, out_pq = tmp_path / "csv", tmp_path / "pq"
    try:
        import pyarrow.parquet as pa
    except ImportError:
        pa = None
    res = phasewatch.analyze(run, window=W)
    tabs = tables(res, list(LAYERS))
    exp = export(phasewatch.open_run(run), csv_dir=out_csv, parquet=out_pq if pa else None, window=W)
    assert exp.rows_written == sum(len(t) for t in tabs.values())
    assert set(tabs) == {"window", "steps", "noise", "tail", "eval", "events"}
    assert sorted(p.stem for p in out_csv.glob("*.csv")) == sorted(tabs)
    assert json.loads((out_csv / "conventions.json").read_text()) == res.conventions
    for name, t in tabs.items():
        _assert_csv_equal(out_csv / f"{name}.csv", t)
    # spot checks against the analysis itself, not only against tables()
    steps = _read_csv(out_csv / "steps.csv")
    assert steps["loss"][3] == "" and float(steps["loss"][4]) == res.scalars["loss"][4]
    win = _read_csv(out_csv / "window.csv")
    np.testing.assert_array_equal([float(x) for x in win["sigma_2"]], res.table["sigma"][:, 1])
    nz = _read_csv(out_csv / "noise.csv")
    assert nz["phase"] == list(res.probes["phase"]) and float(nz["C"][-1]) == res.probes["C"][-1]
    if pa is not None:
        for name, t in tabs.items():
            back = pa.read_table(out_pq / f"{name}.parquet")
            assert back.schema.names == list(t.columns)
            for col, v in t.columns.items():
                got = back.column(col).to_pylist()
                if np.asarray(v).dtype.kind in "fiub":
                    np.testing.assert_array_equal(np.array(got, dtype=float), np.asarray(v, dtype=float))
                else:
                    assert got == [str(x) for x in v]
        md = pa.read_schema(out_pq / "noise.parquet").metadata
        assert b"canonical" in md[b"phasewatch.convention.C"]


def test_missing_optional_packages_give_one_line_errors(tmp_path, capsys, monkeypatch):
    run = _run(tmp_path / "run", T=40)
    assert main(["export", str(run)]) == 1
    assert "--tensorboard DIR" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    assert main(["export", str(run), "--parquet", str(tmp_path / "pq")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install pyarrow" in err
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["export", str(run), "--wandb", "--wandb-dir", str(tmp_path / "wb")]) == 1
    assert "pip install wandb" in capsys.readouterr().err


def test_controller_interventions_are_exported_when_the_analysis_has_them(tmp_path):
    res = phasewatch.analyze(_run(tmp_path / "run", T=40), window=W)
    res.interventions = {"step": np.array([20, 30]), "rule": np.array([b"p_band", b"c_rule"]),
                         "param": np.array([b"param_groups[0].lr"] * 2), "old": np.array([0.1, 0.05]),
                         "new": np.array([0.05, 0.1]), "note": np.array([b"p=0.45 sub-threshold: x0.5", b""])}
    tabs = tables(res, list(LAYERS))
    assert tabs["interventions"].columns["rule"].tolist() == ["p_band", "c_rule"]
    sinks = [TensorBoardSink(tmp_path / "tb"), CsvSink(tmp_path / "csv")]
    for s in sinks:
        s.write(tabs, None, res.conventions)
        s.close()
    _assert_csv_equal(tmp_path / "csv" / "interventions.csv", tabs["interventions"])
    from phasewatch.outputs.watch import latest, render

    assert "control    2 changes; last at step 30: c_rule param_groups[0].lr 0.05 -> 0.1" in render(latest(res))
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in _accumulator(tmp_path / "tb").Tensors("interventions")}
    assert texts == {20: "p_band: param_groups[0].lr 0.1 -> 0.05 (p=0.45 sub-threshold: x0.5)",
                     30: "c_rule: param_groups[0].lr 0.05 -> 0.1"}


def test_crc32c_against_tensorboards_own_and_the_rfc_check_value():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    from phasewatch.outputs.export import crc32c, masked_crc32c

    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    assert crc32c(b"") == 0 and crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 5, 8, 1023, 1024, 1025, 1027, 2048, 5000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == reference(data), n


def test_merged_rows_are_one_increasing_row_per_step(tmp_path):
    res = phasewatch.analyze(_run(tmp_path / "run", T=60), window=W)
    rows = merged_rows(tables(res, list(LAYERS)))
    steps = [s for s, _ in rows]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 60
    by = dict(rows)
    assert by[20]["eval/test_acc"] == res.metrics["test_acc"][1][3]
    assert by[20]["noise/C"] == res.probes["C"][1]
    assert "window/A" not in by[W]  # the first window has no canonical A (NaN is left out)
    assert by[W + 1]["window/A"] == res.table["A"][1]


def _wait(cond, timeout=20.0, what=""):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_follow_picks_up_new_rows_and_segments_of_a_live_run(tmp_path):
    syn = Synthetic(160, seed=3)
    path = tmp_path / "live"
    w = syn.writer(path)
    syn.write(w, 0, 5)  # fewer rows than the window: steps and metrics only at first
    w.flush()
    follower = Follower(path, [TensorBoardSink(tmp_path / "tb"), CsvSink(tmp_path / "csv")], window=W)
    polls: list[tuple[int, int]] = []
    result = {}
    th = threading.Thread(target=lambda: result.setdefault(
        "why", follower.follow(0.02, on_poll=lambda f, n: polls.append((f.last_step, n)))), daemon=True)
    th.start()
    try:
        for lo, hi, rotate in [(5, 40, False), (40, 90, True), (90, 130, False), (130, 160, True)]:
            _wait(lambda: follower.polls > 0 and not w._closed, what="first poll")
            syn.write(w, lo, hi)
            if rotate:
                w.rotate()  # a new segment appears while following
            else:
                w.flush()
            _wait(lambda hi=hi: follower.last_step == hi, what=f"step {hi}")
            assert not result  # still following: the run is open
    finally:
        w.close()
    th.join(timeout=20)
    assert not th.is_alive() and result["why"] == "closed"  # stopped by itself once the writer closed
    follower.close()
    seen = [s for s, n in polls if n]
    assert {5, 40, 90, 130, 160} <= set(seen)  # each piece was exported while the run was live
    assert len(follower.run.segments) == 3
    res = phasewatch.analyze(path, window=W)
    _check_tensorboard(tmp_path / "tb", res)  # the incremental export equals one full analysis
    for name, t in tables(res, list(LAYERS)).items():
        if name != "events":
            _assert_csv_equal(tmp_path / "csv" / f"{name}.csv", t)


def test_follow_after_a_resume_over_exported_steps(tmp_path):
    """A run resumed from an earlier checkpoint: TensorBoard gets a restart marker and the new rows;
    it then shows only the trajectory the reader keeps (later rows win)."""
    syn = Synthetic(100, seed=5)
    path = tmp_path / "run"
    with syn.writer(path) as w:
        syn.write(w, 0, 70)
    follower = Follower(path, [TensorBoardSink(tmp_path / "tb")], window=W)
    assert follower.poll() > 0 and follower.done["steps"] == 70
    other = Synthetic(100, seed=6)  # a different trajectory from step 51 on
    other.U[:50] = syn.U[:50]
    other.layer_band = band_from_updates(other.U, K, SIZES)
    rows, lags = np.arange(50, 100)[:, None, None], np.arange(K)[None, None, :]
    other.layer_band[50:] = np.where(lags > rows - 50, np.nan, other.layer_band[50:])  # a resumed ring starts empty
    other.band = other.layer_band.sum(axis=1)
    with other.writer(path, resume=True) as w:
        other.write(w, 50, 100)
    assert follower.poll() > 0
    follower.close()
    res = phasewatch.analyze(path, window=W)
    assert any("overlap" in x for x in res.warnings)
    acc = _accumulator(tmp_path / "tb")
    _check_tag(acc, "steps/loss", res.scalars["step"], res.scalars["loss"])
    _check_tag(acc, "window/gap_ratio", res.table["step"], res.table["gap_ratio"])
    _check_tag(acc, "tail/alpha", res.tail_index["step"], res.tail_index["alpha"])
    _check_tag(acc, "eval/test_acc", *res.metrics["test_acc"])


def test_run_closed_tells_a_live_writer_from_a_finished_or_crashed_one(tmp_path):
    import h5py

    syn = Synthetic(20)
    w = syn.writer(tmp_path / "run")
    syn.write(w, 0, 10)
    w.flush()
    assert not run_closed(tmp_path / "run")
    w.rotate()
    assert not run_closed(tmp_path / "run")
    w.close()
    assert run_closed(tmp_path / "run")
    seg = sorted((tmp_path / "run").glob("segment-*.h5"))[-1]
    with h5py.File(seg, "r+", libver="latest") as f:  # a writer without a run lock still has it open
        f.swmr_mode = True
        assert not run_closed(tmp_path / "run")
    assert run_closed(tmp_path / "run")
    try:
        from phasewatch.store.writer import LOCK_FILE
    except ImportError:
        return
    (tmp_path / "run" / LOCK_FILE).write_text("{}")  # left by a writer that was killed: nobody holds it
    assert run_closed(tmp_path / "run")


def test_follow_on_a_finished_run_exits_by_itself(tmp_path, capsys):
    run = _run(tmp_path / "run", T=40)
    assert run_closed(run)
    t0 = time.monotonic()
    assert main(["export", str(run), "-w", str(W), "--csv", str(tmp_path / "csv"), "--follow",
                 "--interval", "600"]) == 0
    # not a timing test: waiting for the next poll would take the whole 600 s interval; a 40-step
    # export takes seconds even on a loaded machine
    assert time.monotonic() - t0 < 300
    out = capsys.readouterr().out
    assert "closed: exported" in out and "last step 40" in out
    assert _read_csv(tmp_path / "csv" / "steps.csv")["step"][-1] == "40"


def _expected_lines(res) -> list[str]:
    t = res.table
    v = np.nonzero(t["valid"])[0][-1]
    ti = res.tail_index
    loss = res.scalars["loss"][np.isfinite(res.scalars["loss"])][-1]
    return [f"step {int(res.scalars['step'][-1])}", f"loss       {loss:.4g}",
            f"k* {int(t['kstar'][v])}   gap ratio {t['gap_ratio'][v]:.4g}   A {t['A'][v]:.4g}",
            f"Hill {ti['alpha'][-1]:.3g} [{ti['alpha_lo'][-1]:.3g}, {ti['alpha_hi'][-1]:.3g}]"]


def test_watch_once_on_the_sample_run(capsys):
    assert main(["watch", str(SAMPLE), "--once"]) == 0
    out = capsys.readouterr().out
    res = phasewatch.analyze(SAMPLE, window=10)
    for line in _expected_lines(res):
        assert line in out, line
    assert "(forgetting)" in out and "no evidence of a stable heavy tail" in out
    assert "grokking at step 138 (test_acc >= 0.95)" in out and "jump at step 78" in out
    assert f"test_acc {res.metrics['test_acc'][1][-1]:.4g}" in out
    assert "no gradient samples recorded" in out
    assert len(out.strip().splitlines()) == 7


def test_watch_shows_gradient_noise_refreshes_and_renders_the_figure(tmp_path):
    import matplotlib.image

    run = _run(tmp_path / "run")
    res = phasewatch.analyze(run, window=W)
    buf = io.StringIO()
    assert watch(run, window=W, interval=0.05, out=buf, figure=tmp_path / "ov.png") == "closed"
    text = buf.getvalue()
    assert text.count("[closed]") == 2  # refreshed until the closed run was seen twice
    pr = res.probes
    assert f"C {pr['C'][-1]:.4g} [{pr['C_lo'][-1]:.3g}, {pr['C_hi'][-1]:.3g}]   p {pr['p'][-1]:.3f}" in text
    assert f"{pr['phase'][-1]}, {pr['band'][-1]}" in text and "16 measurements" in text
    for line in _expected_lines(res):
        assert line in text, line
    img = matplotlib.image.imread(tmp_path / "ov.png")
    assert img.shape[0] > 500 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # drawn, not blank
    assert not math.isnan(float(img.mean()))


def test_tail_analysis_of_a_lazy_run_reads_only_the_tail_and_equals_the_eager_one(tmp_path):
    from phasewatch.outputs.export import analyze_tail

    path = _run(tmp_path / "run", T=80)
    after = {"window": 60, "steps": 60, "tail": 60}
    eager = analyze_tail(phasewatch.open_run(path, lazy=False), window=W, after=after)
    lazy_run = phasewatch.open_run(path, lazy=True)
    lazy = analyze_tail(lazy_run, window=W, after=after)
    for k, v in eager.table.items():
        np.testing.assert_array_equal(np.asarray(lazy.table[k]), np.asarray(v), err_msg=k)
    assert set(lazy_run.table("band").loaded) <= {"step", "band", "lr"}  # no per-layer band read whole
