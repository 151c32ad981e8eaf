"""Streaming analysis, the lazy reader and parallel multi-run analysis (issue 7).

Streaming must give the in-memory analysis value for value, on real runs that span several
segments, resume (invalid windows where a session starts), overlap an earlier session and carry
non-finite updates; the lazy reader must return the eager reader's arrays; ``analyze_many`` must
return the sequential results in input order with a broken run's one-line error in its place.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

import phasewatch
from phasewatch import AnalysisFailure, analyze_many
from phasewatch.analysis.gram import band_from_updates, window_singular_values
from phasewatch.cli import main
from phasewatch.errors import PhasewatchError, RunFormatError
from phasewatch.store import RunWriter, open_run, pack_run
from phasewatch.store import format as fmt
from phasewatch.store.reader import LazyTable

W, K = 5, 8


def _train(rec, model, opt, x, y, steps, nan_at=()):
    import torch

    for i in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        saved = None
        if i in nan_at:  # one non-finite update; the parameters are restored after it
            saved = [p.detach().clone() for p in model.parameters()]
            model[2].bias.grad[0] = float("nan")
        rec.loss(loss)
        opt.step()
        if saved is not None:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved):
                    p.copy_(s)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A real Recorder run: 3 sessions (one resumed from an earlier step: overlap), segments
    rotating every 30 steps, one non-finite update, evaluation metrics."""
    import torch

    path = tmp_path_factory.mktemp("stream") / "run"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: the NaN stays in one update
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    kw = dict(k=K, block=4, flush_rows=8, flush_seconds=1e9, rotate_rows=30, fsync="never", strict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))  # (PHASEWATCH_TEST_THREADS, default 1)
    try:
        with phasewatch.Recorder(path, model, opt, **kw) as rec:
            _train(rec, model, opt, x, y, 70, nan_at=(33,))
            rec.log(test_acc=0.4)
        with phasewatch.Recorder(path, model, opt, resume=True, **kw) as rec:
            _train(rec, model, opt, x, y, 40)
            rec.log(test_acc=0.7)
        with phasewatch.Recorder(path, model, opt, resume=True, start_step=100, **kw) as rec:
            _train(rec, model, opt, x, y, 45)
            rec.log(test_acc=0.97)
    finally:
        torch.set_num_threads(threads)
    return path


def _updates(T: int, P: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((P, 3)))[0].T
    U = (rng.standard_normal((T, 3)) * [3.0, 2.0, 1.0]) @ basis + 0.05 * rng.standard_normal((T, P))
    return U


def _write(path: Path, U: np.ndarray, lr: float = 0.1, layers: int = 2, nan_rows=(), acc_at=None,
           rotate: int = 1_000_000, sessions: int = 1) -> None:
    """A run through the numpy writer from known updates: per-layer band of ``layers`` column
    groups, NaN updates at ``nan_rows``, ``sessions`` writer sessions (resumes: the band does not
    reach across them, as the recorder's ring restarts)."""
    T, P = U.shape
    U = U.copy()
    U[list(nan_rows)] = np.nan
    sizes = [len(c) for c in np.array_split(np.arange(P), layers)]
    steps = np.arange(1, T + 1)
    bounds = np.linspace(0, T, sessions + 1).astype(int)
    meta = {"model": {"n_params": P, "groups": [{"name": f"l{i}"} for i in range(layers)]},
            "recorder": {"k": K, "mode": "exact"}, "optimizer": {"class": "SGD", "hyper": {"lr": lr}}}
    tables = [fmt.steps_table(layers, 1), fmt.band_table(layers, K), fmt.metrics_table()]
    for si in range(sessions):
        a, b = bounds[si], bounds[si + 1]
        layer = band_from_updates(U[a:b], K, layer_sizes=sizes)
        with RunWriter(path, meta, tables, resume=si > 0, block_rows=16, rotate_rows=rotate, fsync="never") as w:
            for c in range(a, b, 8):  # as a training loop would: a few rows at a time
                r, d = slice(c, min(c + 8, b)), slice(c - a, min(c + 8, b) - a)
                n = r.stop - r.start
                w.append("band", step=steps[r], lr=np.full(n, lr), band=layer[d].sum(axis=1), layer_band=layer[d])
                w.append("steps", step=steps[r], wall_time=np.zeros(n), loss=np.linspace(2, 1, T)[r],
                         lr=np.full((n, 1), lr), grad_norm=1 + np.abs(np.sin(steps[r])),
                         layer_grad_norm=np.ones((n, layers)), update_norm=np.sqrt(layer[d].sum(axis=1)[:, 0]),
                         flags=np.zeros(n, dtype="i4"))
            if acc_at is not None and si == sessions - 1:
                es = np.arange(2, T + 1, 2)
                w.append("metrics", step=es, name=np.array([b"test_acc"] * len(es)),
                         value=np.where(es >= acc_at, 0.99, 0.1))


def _assert_same(a, b) -> None:
    """Two analyses agree exactly on every column of every table."""
    assert list(a.table) == list(b.table)
    for k in a.table:
        assert a.table[k].dtype == b.table[k].dtype, k
        assert a.table[k].shape == b.table[k].shape, k
        assert np.array_equal(a.table[k], b.table[k], equal_nan=True), k
    for name in ("tail_index", "probes", "curvature"):
        x, y = getattr(a, name), getattr(b, name)
        assert list(x) == list(y), name
        for k in x:
            assert np.array_equal(np.asarray(x[k]), np.asarray(y[k]), equal_nan=np.asarray(x[k]).dtype.kind == "f")
    assert list(a.scalars) == list(b.scalars)
    for k in a.scalars:
        assert np.array_equal(a.scalars[k], b.scalars[k], equal_nan=True), k
    assert a.warnings == b.warnings and a.events == b.events


@pytest.fixture(scope="module")
def in_memory(recorded):
    return phasewatch.analyze(open_run(recorded, lazy=False), window=W)


def test_the_recorded_run_has_what_streaming_must_survive(recorded, in_memory):
    run = open_run(recorded, lazy=False)
    assert len(run.segments) >= 5 and any("overlap" in w for w in run.warnings)
    assert list(run.steps["step"]) == list(range(1, 146))  # session 3 went on from step 100
    assert list(np.flatnonzero(run.steps["flags"]) + 1) == [34, 35]  # the NaN update (and the one after)
    t = in_memory.table
    invalid = t["step"][~t["valid"]]
    # windows holding the NaN updates, and the first W-1 windows of each resumed session
    assert invalid.tolist() == [*range(34, 40), *range(71, 75), *range(101, 105)]
    assert np.isnan(t["A"][~t["valid"]]).all() and np.isfinite(t["A"]).sum() > 100


@pytest.mark.parametrize("chunk", [1, W, W + 1, 13, 10**6])
def test_streaming_equals_in_memory_exactly(recorded, in_memory, chunk):
    run = open_run(recorded, lazy=True)
    streamed = phasewatch.analyze(run, window=W, chunk_steps=chunk)
    _assert_same(streamed, in_memory)
    assert "band" not in run.band.loaded and "layer_band" not in run.band.loaded  # never read whole


def test_streamed_spectra_equal_brute_force_svd_across_segments_and_resumes(tmp_path):
    """Ground truth: the singular values of every window of the known updates (by SVD); windows
    across a resume or touching a NaN update are invalid."""
    U = _updates(150, 30, 1)
    _write(tmp_path / "r", U, nan_rows=(60,), rotate=23, sessions=3)
    res = phasewatch.analyze(tmp_path / "r", window=W, chunk_steps=17)
    sig, ends = window_singular_values(U, W)
    starts = {0, 50, 100}  # first rows of the sessions
    broken = {e for e in ends if any(e - W + 1 < s <= e for s in starts - {0}) or e - W + 1 <= 60 <= e}
    ok = np.array([e not in broken for e in ends])
    assert np.array_equal(res.table["valid"], ok)
    np.testing.assert_allclose(res.table["sigma"][ok], sig[ok], rtol=1e-9, atol=1e-12)
    _assert_same(res, phasewatch.analyze(open_run(tmp_path / "r", lazy=False), window=W))


def test_budget_decides_streaming_and_the_result_is_the_same(tmp_path):
    _write(tmp_path / "r", _updates(120, 20, 2), rotate=50)
    ref = phasewatch.analyze(open_run(tmp_path / "r", lazy=False), window=W)
    run = open_run(tmp_path / "r", lazy=True)
    _assert_same(phasewatch.analyze(run, window=W, memory_budget=1000), ref)  # 120 x 10 x 8 B > 1000 B
    assert "band" not in run.band.loaded
    run = open_run(tmp_path / "r", lazy=True)
    _assert_same(phasewatch.analyze(run, window=W), ref)  # 1 GiB budget: read whole
    assert "band" in run.band.loaded and "layer_band" not in run.band.loaded
    with pytest.raises(PhasewatchError, match="chunk_steps"):
        phasewatch.analyze(run, window=W, chunk_steps=0)


def test_lazy_reader_returns_the_eager_arrays(recorded, tmp_path):
    for path in (recorded, pack_run(recorded, tmp_path / "packed.h5")):
        eager, lazy = open_run(path, lazy=False), open_run(path, lazy=True)
        assert not eager.lazy and lazy.lazy and eager.warnings == lazy.warnings
        for name in ("steps", "band"):
            e, z = eager.table(name), lazy.table(name)
            assert isinstance(z, LazyTable) and list(z) == list(e)
            n = len(e["step"])
            for a, b in [(0, n), (0, 1), (28, 33), (59, 61), (95, 130), (n - 3, n + 10), (7, 7)]:
                part = z.rows(a, b)
                for c in e:
                    assert np.array_equal(part[c], e[c][a:b], equal_nan=True), (path, name, c, a, b)
            for c in e:
                assert np.array_equal(z[c], e[c], equal_nan=True)
                assert z[c].dtype == e[c].dtype
        assert lazy.summary() == eager.summary()
        again = pickle.loads(pickle.dumps(lazy.steps))  # a reference to the files, not the data
        assert again.loaded == ("step",)
        assert np.array_equal(again["loss"], eager.steps["loss"])


def test_lazy_by_size_and_damage_reported_on_access(tmp_path, monkeypatch):
    _write(tmp_path / "r", _updates(60, 12, 3), rotate=25)
    assert not open_run(tmp_path / "r").lazy
    monkeypatch.setenv("PHASEWATCH_LAZY_ABOVE", "0")
    assert open_run(tmp_path / "r").lazy
    seg = tmp_path / "r" / fmt.segment_name(1)
    with h5py.File(seg, "r") as f:
        info = f["band/band"].id.get_chunk_info(0)
    with open(seg, "r+b") as fh:  # flip one byte of a stored chunk: its fletcher32 no longer matches
        fh.seek(info.byte_offset + 5)
        b = fh.read(1)
        fh.seek(info.byte_offset + 5)
        fh.write(bytes([b[0] ^ 0xFF]))
    run = open_run(tmp_path / "r")  # the step columns are intact: opens
    assert run.lazy and not run.warnings
    assert run.band.rows(0, 25, ("band",))["band"].shape == (25, K)  # segment 0 reads fine
    with pytest.raises(RunFormatError) as ei:
        phasewatch.analyze(run, window=W, chunk_steps=10)
    msg = str(ei.value)
    assert "\n" not in msg and str(seg) in msg and "checksum" in msg


def _die_on_second(path, **kw):
    if str(path).endswith("r1"):
        os._exit(3)  # a crash that takes the worker process down
    return str(path)


def test_analyze_many_equals_sequential_and_reports_failures_in_place(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"r{i}")
        _write(paths[-1], _updates(80 + 10 * i, 16, 10 + i), rotate=40)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not a run")
    short = tmp_path / "short"
    _write(short, _updates(3, 16, 9))
    runs = [paths[0], broken, paths[1], short, paths[2]]
    res = analyze_many(runs, workers=2, window=W)
    seq = analyze_many(runs, workers=1, window=W)  # in this process, one after another
    assert len(res) == len(seq) == 5
    for i in (0, 2, 4):
        _assert_same(res[i], seq[i])
    _assert_same(seq[0], phasewatch.analyze(paths[0], window=W))
    for i, what in ((1, broken), (3, short)):
        f = res[i]
        assert isinstance(f, AnalysisFailure) and not f and f.run == str(what) and f == seq[i]
        assert "\n" not in f.error and str(what) in f.error
    assert res[1].kind == "RunFormatError" and res[3].kind == "RunTooShortError"
    with pytest.raises(PhasewatchError, match="workers"):
        analyze_many(paths, workers=-1)


def _die_on_second(path, **kw):
    if str(path).endswith("r1"):
        os._exit(3)  # a crash that takes the worker process down
    return str(path)


def test_a_worker_that_dies_fails_only_its_run(tmp_path):
    paths = [str(tmp_path / f"r{i}") for i in range(3)]
    out = analyze_many(paths, workers=2, _func=_die_on_second)
    assert out[0] == paths[0] and out[2] == paths[2]
    assert isinstance(out[1], AnalysisFailure) and "died" in out[1].error and paths[1] in out[1].error


def test_cli_workers_compare_and_study(tmp_path, capsys):
    runs = []
    for i, lr in enumerate((0.1, 0.2, 0.3)):
        runs.append(str(tmp_path / f"lr{i}"))
        _write(Path(runs[-1]), _updates(90, 16, 20 + i), lr=lr, acc_at=60 + 4 * i, rotate=40)
    bad = str(tmp_path / "missing-run")
    args = ["compare", runs[0], bad, *runs[1:], "--by", "lr", "--window", str(W), "--no-figure"]
    assert main(args) == 1
    one = capsys.readouterr()
    assert main([*args, "--workers", "2"]) == 1
    two = capsys.readouterr()
    assert two.out == one.out and two.err == one.err
    assert all(f"| lr{i} |" in one.out for i in range(3)) and "missing-run" not in one.out
    err = [line for line in one.err.splitlines() if line.strip()]
    assert len(err) == 1 and bad in err[0]

    args = ["study", *runs, bad, "--signal", "g23", "--window", str(W), "--shifts", "50"]
    assert main(args) == 1
    one = capsys.readouterr()
    assert main([*args, "-j", "2"]) == 1
    two = capsys.readouterr()
    assert two.out == one.out and two.err == one.err
    assert "| lr2 |" in one.out and "missing-run: not analysed" in one.out and bad in one.err


def test_rolling_hill_in_blocks_equals_each_window_by_hand():
    """The rolling Hill estimate is computed in blocks of windows (bounded memory); windows on both
    sides of a block boundary equal Hill's formula applied to that window alone."""
    from phasewatch.analysis.tails import rolling_hill

    x = np.random.default_rng(5).pareto(1.5, size=25_000) + 1.0
    x[12_000] = np.nan
    rh = rolling_hill(x, window=100, fraction=0.1)
    block = (1 << 20) // 100
    for e in (99, block + 98, block + 99, block + 100, 2 * block + 99, 11_990, 12_050, len(x) - 1):
        i = e - 99  # row of the window ending at value e
        w = np.sort(x[e - 99: e + 1])[::-1]
        want = np.nan if not np.isfinite(w).all() else 10 / np.sum(np.log(w[:10] / w[10]))
        assert rh.ends[i] == e
        np.testing.assert_allclose(rh.alpha[i], want, rtol=1e-12, equal_nan=True)
