"""Per-layer analysis and the subspace rotation (issue 20, items 1–2; DEFINITIONS §1 "Stored per
layer", "Subspace rotation").

Ground truth is a real training run recorded with :class:`phasewatch.Recorder` storing every update
(``snapshot_every=1``, float64: the exact ring rows the band is computed from): each layer group's
per-window spectra must be those of an SVD of that group's coordinates of the updates, and the
rotation those of ``scipy.linalg.subspace_angles`` between the top-k* right singular vectors of
consecutive windows of raw updates, to tolerances derived from float64 rounding (see
:func:`_lam_tol` and :func:`_rotation_tol`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

import phasewatch
from phasewatch.analysis.gram import window_singular_values
from phasewatch.analysis.layers import LOCK_IN_WINDOWS, layer_summary
from phasewatch.analysis.rotation import window_rotation
from phasewatch.cli import main
from phasewatch.errors import PhasewatchError
from phasewatch.store import open_run

W, K = 5, 7  # K >= W + 1: the rotation's lag-W inner products are in the band
EPS = np.finfo(np.float64).eps
GROUPS = {"inp": ["0"], "hidden": ["2"], "head": ["4"]}


def _train(rec, model, opt, steps: int, seed: int, d_in: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(256, d_in, generator=g), torch.randint(0, 3, (256,), generator=g)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)  # mini-batches: noisy updates, changing spectra
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        rec.loss(loss)
        opt.step()


def _record(path: Path, groups, widths=(8, 12, 12, 3), sessions=(45, 30)) -> Path:
    import torch

    torch.manual_seed(0)
    mods = []
    for a, b in zip(widths[:-1], widths[1:]):
        mods += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*mods[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = dict(k=K, block=4, groups=groups, snapshot_every=1, snapshot_dtype="float64", flush_rows=8,
              flush_seconds=1e9, rotate_rows=25, fsync="never", strict=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    try:
        for i, n in enumerate(sessions):  # a resumed second session: windows across it are invalid
            with phasewatch.Recorder(path, model, opt, resume=i > 0, **kw) as rec:
                _train(rec, model, opt, n, seed=i, d_in=widths[0])
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """3 layer groups (one per Linear), SGD with momentum, 2 sessions, segments of 25 rows."""
    return _record(tmp_path_factory.mktemp("layers") / "run", GROUPS)


@pytest.fixture(scope="module")
def many_groups(tmp_path_factory) -> Path:
    """10 layer groups (one per parameter tensor of a 5-layer MLP): the heat-map figure."""
    return _record(tmp_path_factory.mktemp("layers10") / "run", None, widths=(6, 8, 8, 8, 8, 3), sessions=(40,))


@pytest.fixture(scope="module")
def res(recorded):
    return phasewatch.analyze(open_run(recorded, lazy=False), window=W, layers=True)


def _updates(run):
    """The exact updates aligned with the band rows, and each group's column slice (the recorder's
    layout: parameters sorted by group, groups contiguous in meta order)."""
    snap = run.table("snapshots")
    steps = np.asarray(run.band["step"])
    assert np.array_equal(np.asarray(snap["step"]), steps)  # every update stored
    U = np.asarray(snap["update"], dtype=np.float64)
    sizes = [int(g["numel"]) for g in run.meta["model"]["groups"]]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    assert bounds[-1] == U.shape[1]
    return U, {g["name"]: slice(int(a), int(b)) for g, a, b in zip(run.meta["model"]["groups"], bounds[:-1], bounds[1:])}


def _lam_tol(X: np.ndarray) -> float:
    """Bound on |λ_j(band Gram) − σ_j(SVD of X)²| for one window X (W × P), float64.

    The band's entries are float64 dot products of length P: |δG_ab| ≤ γ_P‖u_a‖‖u_b‖ whatever the
    summation order (γ_P = Pε/(1 − Pε), Higham 2002 §3.1), so ‖δG‖₂ ≤ ‖δG‖_F ≤ γ_P·tr G.
    ``eigvalsh`` is backward stable (eigenvalues of G + E, ‖E‖₂ ≤ c·W·ε‖G‖₂, c = 4 a generous LAPACK
    constant) and the SVD likewise (|δσ| ≤ 4Wε σ₁, so |δσ²| ≤ 8Wε σ₁² + O(ε²)); ‖G‖₂ ≤ tr G."""
    P = X.shape[1]
    tr = float(np.sum(X * X))
    gamma = P * EPS / (1 - P * EPS)
    return (gamma + 4 * W * EPS + 8 * W * EPS) * tr


def test_per_layer_spectra_equal_svd_of_the_layer_updates(recorded, res):
    run = open_run(recorded, lazy=False)
    U, cols = _updates(run)
    assert list(res.layers) == list(GROUPS)
    for name, sl in cols.items():
        t = res.layers[name]
        Ug = U[:, sl]
        brute, ends = window_singular_values(Ug, W)
        assert len(t["step"]) == len(ends) and np.array_equal(t["step"], run.band["step"][ends])
        v = t["valid"]
        assert 0.8 * v.size < v.sum() < v.size  # the windows across the resumed session are invalid
        lam_band = t["sigma"][v] ** 2
        checked = 0
        for i, n in enumerate(np.flatnonzero(v)):
            X = Ug[ends[n] - W + 1: ends[n] + 1]
            tol = _lam_tol(X)
            assert np.all(np.abs(lam_band[i] - brute[n] ** 2) <= tol), (name, int(t["step"][n]))
            # k* and the gap ratio where the argmax is decided beyond rounding: σ_j's relative error
            # is at most tol/(2σ_j²), so a ratio's is at most tol/σ_{j+1}² (first order)
            s = brute[n]
            r = s[:-1] / s[1:]
            err = tol / s[1:] ** 2
            j = int(np.argmax(r))
            others = np.delete(r * (1 + err), j)
            if r[j] * (1 - err[j]) > others.max():
                checked += 1
                assert t["kstar"][n] == j + 1
                assert abs(t["gap_ratio"][n] - r[j]) <= 2 * err[j] * r[j]
            assert abs(t["update_norm"][n] - np.linalg.norm(X[-1])) <= tol / np.linalg.norm(X[-1])
        assert checked >= 0.5 * v.sum(), name  # the k* comparison is not vacuous


def test_layer_bands_sum_to_the_global_band_and_tables_agree(recorded, res):
    run = open_run(recorded, lazy=False)
    bt = run.band
    lb, gb = np.asarray(bt["layer_band"]), np.asarray(bt["band"])
    G = lb.shape[1]
    fin = np.isfinite(gb)
    assert np.array_equal(fin, np.isfinite(lb).all(axis=1))
    # a sum of G float64 terms: |error| <= (G-1) ε Σ|terms|
    assert np.all(np.abs(lb.sum(axis=1)[fin] - gb[fin]) <= (G - 1) * EPS * np.abs(lb).sum(axis=1)[fin])
    t = res.table
    v = t["valid"]
    for name in res.layers:
        assert np.array_equal(res.layers[name]["step"], t["step"])
        assert np.array_equal(res.layers[name]["valid"], v)
    # the window Gram is the sum of the groups' Grams: traces add (each eigenvalue within W ε tr G of
    # LAPACK's, W of them) and Weyl: λ₁ of the sum ≤ the sum of the groups' λ₁
    tr = (t["sigma"][v] ** 2).sum(axis=1)
    tr_layers = sum((res.layers[n]["sigma"][v] ** 2).sum(axis=1) for n in res.layers)
    assert np.all(np.abs(tr - tr_layers) <= (G + 2 * W * W) * EPS * tr)
    lam1_layers = sum(res.layers[n]["sigma"][v, 0] ** 2 for n in res.layers)
    assert np.all(t["sigma"][v, 0] ** 2 <= lam1_layers * (1 + (G + 2 * W * W) * EPS))
    un2 = sum(res.layers[n]["update_norm"] ** 2 for n in res.layers)
    assert np.allclose(un2, t["update_norm"] ** 2, rtol=4 * G * EPS, atol=0)
    # each group's null uses its own recorded dimension; the tables carry every global column
    assert set(res.layers["inp"]) == set(t)
    assert res.layers["head"]["sigma1_over_dcrit"][v].shape == t["sigma1_over_dcrit"][v].shape
    assert not np.array_equal(res.layers["head"]["gap_ratio_null_hi"][v], res.layers["hidden"]["gap_ratio_null_hi"][v])


def _rotation_tol(Xp: np.ndarray, k: int) -> float:
    """Bound on |θ_max(band) − θ_max(SVD)| for the windows X₁ = Xp[:W], X₂ = Xp[1:] (float64).

    The band route computes the top-k subspaces from Grams perturbed by ‖δG‖₂ ≤ e·tr G' (``_lam_tol``'s
    e = γ_P + 12Wε, plus 4(W+1)ε for the eigenbasis of G' that gives the coordinates, as its inner
    products are those of G' + E).  Davis–Kahan: the top-k eigenvectors turn by ≤ ‖δG‖/(λ_k − λ_{k+1}),
    and v = Xᵀa/σ by ≤ (σ₁/σ_k) of that; √W converts Frobenius to spectral norms.  The SVD's right
    singular subspace turns by ≤ 4Wε σ₁/(σ_k − σ_{k+1}) (Wedin).  The largest principal angle is a
    metric, so its error is at most the sum of the four subspace errors (two windows, two routes)."""
    P = Xp.shape[1]
    e = P * EPS / (1 - P * EPS) + 12 * W * EPS + 4 * (W + 1) * EPS
    trp = float(np.sum(Xp * Xp))
    tol = 0.0
    for X in (Xp[:W], Xp[1:]):
        s = np.linalg.svd(X, compute_uv=False)
        lam = s ** 2
        tol += math.sqrt(W) * (s[0] / s[k - 1]) * e * trp / (lam[k - 1] - lam[k])
        tol += 4 * W * EPS * s[0] / (s[k - 1] - s[k])
    return tol


def _top_right(X: np.ndarray, k: int) -> np.ndarray:
    return np.linalg.svd(X, full_matrices=False)[2][:k].T


def test_rotation_from_the_band_equals_principal_angles_of_raw_updates(recorded, res):
    run = open_run(recorded, lazy=False)
    U, cols = _updates(run)
    _, ends = window_singular_values(U, W)
    tables = {"global": (res.table, slice(None)), **{n: (res.layers[n], sl) for n, sl in cols.items()}}
    for name, (t, sl) in tables.items():
        Ug = U[:, sl]
        rot = t["rotation"]
        have = np.isfinite(rot)
        # defined exactly where the window and the one before it are valid (not the first window)
        prev_valid = np.r_[False, t["valid"][:-1]]
        assert np.array_equal(have, t["valid"] & prev_valid & (t["kstar"] > 0)), name
        tight = 0
        for n in np.flatnonzero(have):
            r, k = ends[n], int(t["kstar"][n])
            Xp = Ug[r - W: r + 1]
            ref = scipy.linalg.subspace_angles(_top_right(Xp[:W], k), _top_right(Xp[1:], k)).max()
            tol = _rotation_tol(Xp, k)
            assert abs(rot[n] - ref) <= tol, (name, int(t["step"][n]), rot[n], ref, tol)
            assert t["rotation_sin"][n] == pytest.approx(math.sin(rot[n]), rel=4 * EPS)
            tight += tol < 1e-6
        assert tight >= 0.5 * have.sum(), name  # the comparison is not vacuous
        assert 0 < np.nanmedian(rot) < math.pi / 2
        # the measured rotation obeys the bound A_dk stands for: sin θ ≤ 2‖ΔC‖_F/(λ_k* − λ_k*+1)
        # (Yu, Wang & Samworth 2015, the later window as reference; both columns from the same band)
        both = have & np.isfinite(t["A_dk"])
        assert both.sum() > 0.8 * have.sum()
        assert np.all(t["rotation_sin"][both] <= 2 * t["A_dk"][both] * (1 + 1e-9)), name


def test_rotation_is_nan_without_the_lag_w_products(recorded):
    res = phasewatch.analyze(open_run(recorded, lazy=False), window=K, layers=True)  # K < W + 1
    assert np.isnan(res.table["rotation"]).all()
    assert all(np.isnan(t["rotation"]).all() for t in res.layers.values())
    assert "K >= W+1" in res.conventions["rotation"]


def test_window_rotation_on_synthetic_updates():
    """The pure function on known updates (three directions of decreasing strength plus noise,
    P = 40): equal to scipy's angles between the raw windows' top-k* right singular vectors for
    every k in 1 … W−1 that the windows pick, NaN for the first window."""
    from phasewatch.analysis.gram import band_from_updates, compute_spectra

    rng = np.random.default_rng(3)
    T, P = 60, 40
    basis = np.linalg.qr(rng.standard_normal((P, 3)))[0].T
    U = (rng.standard_normal((T, 3)) * [4.0, 2.0, 1.0]) @ basis + 0.1 * rng.standard_normal((T, P))
    band = band_from_updates(U, K)
    spec = compute_spectra(band, W)
    th, s = window_rotation(band, spec.kstar, spec.ends, W)
    assert np.isnan(th[0]) and np.isfinite(th[1:]).all()
    for n in range(1, len(th)):
        r, k = spec.ends[n], int(spec.kstar[n])
        Xp = U[r - W: r + 1]
        ref = scipy.linalg.subspace_angles(_top_right(Xp[:W], k), _top_right(Xp[1:], k)).max()
        assert abs(th[n] - ref) <= _rotation_tol(Xp, k)
    assert len(set(spec.kstar[1:].tolist())) >= 2  # more than one subspace dimension exercised


def test_layers_stream_bit_equal_to_in_memory(recorded, res):
    for chunk in (1, 7, 10_000):
        lazy = phasewatch.analyze(recorded, window=W, layers=True, chunk_steps=chunk)
        assert list(lazy.layers) == list(res.layers)
        for n in res.layers:
            a, b = res.layers[n], lazy.layers[n]
            assert list(a) == list(b)
            for c in a:
                assert a[c].dtype == b[c].dtype and a[c].shape == b[c].shape, (chunk, n, c)
                assert np.array_equal(a[c], b[c], equal_nan=True), (chunk, n, c)
        for c in res.table:
            assert np.array_equal(res.table[c], lazy.table[c], equal_nan=True), (chunk, c)
    # under a memory budget smaller than the layer band the run is streamed too
    small = phasewatch.analyze(open_run(recorded, lazy=True), window=W, layers=True, memory_budget=1)
    for n in res.layers:
        for c in res.layers[n]:
            assert np.array_equal(res.layers[n][c], small.layers[n][c], equal_nan=True), (n, c)


def test_layer_summary_lock_in_against_brute_force(res):
    summ = layer_summary(res.layers)
    for n, t in res.layers.items():
        ok = t["valid"] & t["above_null"]
        first = next((int(t["step"][i]) for i in range(len(ok) - LOCK_IN_WINDOWS + 1)
                      if ok[i: i + LOCK_IN_WINDOWS].all()), None)
        assert summ["groups"][n]["lock_in_step"] == first
        assert summ["groups"][n]["above_null_fraction"] == pytest.approx(float(np.mean(t["above_null"][t["valid"]])))
    locks = {n: d["lock_in_step"] for n, d in summ["groups"].items() if d["lock_in_step"] is not None}
    if locks:
        assert summ["first_lock_in_step"] == min(locks.values())
        assert set(summ["first_lock_in"]) == {n for n, s in locks.items() if s == min(locks.values())}
    # synthetic: a group above the band from window 3 on, one never 5 in a row, an invalid window breaking a run
    steps = np.arange(10, 30)
    above = np.zeros(20, bool)
    above[3:] = True
    flicker = np.tile([True, True, True, True, False], 4)
    broken = above.copy()
    valid = np.ones(20, bool)
    vb = valid.copy()
    vb[5] = False
    mk = dict(kstar=np.ones(20, "i8"), gap_excess=np.ones(20), step=steps)
    s = layer_summary({"a": {**mk, "above_null": above, "valid": valid},
                       "b": {**mk, "above_null": flicker, "valid": valid},
                       "c": {**mk, "above_null": broken, "valid": vb}})
    assert s["groups"]["a"]["lock_in_step"] == 13
    assert s["groups"]["b"]["lock_in_step"] is None
    assert s["groups"]["c"]["lock_in_step"] == 16
    assert s["first_lock_in"] == ["a"] and s["first_lock_in_step"] == 13


def test_cli_writes_the_layers_csv(recorded, res, tmp_path, capsys):
    assert main(["analyze", str(recorded), "--window", str(W), "--layers", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "first group to lock in" in out or "no group locks in" in out
    path = tmp_path / "analysis-layers.csv"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# phasewatch per-layer analysis")
    head = lines[1].split(",")
    assert head[:2] == ["group", "step"] and "rotation" in head and "gap_excess" in head and f"sigma_{W}" in head
    rows = [ln.split(",") for ln in lines[2:]]
    n_win = len(res.table["step"])
    assert len(rows) == len(GROUPS) * n_win
    assert [r[0] for r in rows[::n_win]] == list(GROUPS)
    gi, ci = head.index("gap_ratio"), head.index("rotation")
    for g, name in enumerate(GROUPS):  # repr() round-trips float64 exactly
        mine = rows[g * n_win: (g + 1) * n_win]
        want = res.layers[name]
        assert [int(r[1]) for r in mine] == want["step"].tolist()
        for col, i in (("gap_ratio", gi), ("rotation", ci)):
            got = np.array([float(r[i]) if r[i] else np.nan for r in mine])
            assert np.array_equal(got, want[col], equal_nan=True), (name, col)
    js = json.loads((tmp_path / "analysis.json").read_text())
    assert set(js["layers"]["groups"]) == set(GROUPS)


def test_layers_needs_a_layer_band(tmp_path):
    from phasewatch.analysis.gram import band_from_updates
    from phasewatch.store import RunWriter
    from phasewatch.store import format as fmt

    meta = {"model": {"n_params": 4, "groups": [{"name": "all", "dim": 4}]}, "recorder": {"k": K}}
    spec = fmt.band_table(1, K)
    spec = fmt.TableSpec("band", {c: v for c, v in spec.columns.items() if c != "layer_band"})
    b = band_from_updates(np.random.default_rng(0).standard_normal((20, 4)), K)
    with RunWriter(tmp_path / "r", meta, [fmt.steps_table(1, 1), spec], fsync="never") as w:
        w.append("band", step=np.arange(1, 21), lr=np.full(20, 0.1), band=b)
    assert phasewatch.analyze(tmp_path / "r", window=W).layers == {}
    with pytest.raises(PhasewatchError, match="no per-layer band"):
        phasewatch.analyze(tmp_path / "r", window=W, layers=True)


def test_figure_and_report(recorded, many_groups, res, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from phasewatch.outputs.report import build_report, report_markdown
    from phasewatch.plot import FIGURES, MissingDataError, save
    from phasewatch.plot import layers as layers_fig

    assert FIGURES["layers"] is layers_fig
    many = phasewatch.analyze(many_groups, window=W, layers=True)
    assert len(many.layers) == 10
    for name, a in (("few", res), ("many", many)):
        fig = layers_fig(a)
        n_img = sum(len(ax.collections) for ax in fig.axes)
        p = tmp_path / f"{name}.png"
        save(fig, p, "png", dpi=80)
        plt.close(fig)
        img = plt.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert (n_img >= 2) == (name == "many")  # heat maps (QuadMesh) only above 8 groups
    with pytest.raises(MissingDataError, match="layers=True"):
        layers_fig(phasewatch.analyze(open_run(recorded, lazy=False), window=W))
    # phasewatch plot makes it
    assert main(["plot", str(recorded), "--window", str(W), "--figure", "layers", "--format", "png",
                 "--out", str(tmp_path / "fig")]) == 0
    assert plt.imread(tmp_path / "fig" / "layers.png").ndim == 3
    rep = build_report(open_run(recorded, lazy=False), window=W, analysis=res)
    sec = {s["key"]: s for s in rep["sections"]}["layers"]
    assert sec["available"] and sec["title"] == "Per-layer readings"
    for g in GROUPS:
        assert any(ln.startswith(f"- {g}:") for ln in sec["lines"])
    summ = layer_summary(res.layers)
    assert sec["data"]["first_lock_in"] == summ["first_lock_in"]
    md = report_markdown(rep)
    assert "## Per-layer readings" in md and ("first group to lock in" in md or "no group locks in" in md)
    back = json.loads(json.dumps(rep, default=lambda x: None))
    assert set(back["sections"][-1]["data"]["groups"]) == set(GROUPS)
    # without layers the report has no such section (the other sections unchanged)
    keys = [s["key"] for s in build_report(open_run(recorded, lazy=False), window=W)["sections"]]
    assert "layers" not in keys


def test_rotation_can_be_skipped(recorded, res):
    off = phasewatch.analyze(open_run(recorded, lazy=False), window=W, layers=True, rotation=False)
    for a, b in [(res.table, off.table), *((res.layers[n], off.layers[n]) for n in res.layers)]:
        assert list(a) == list(b)
        assert np.isnan(b["rotation"]).all() and np.isnan(b["rotation_sin"]).all()
        for c in a:
            if c not in ("rotation", "rotation_sin"):
                assert np.array_equal(a[c], b[c], equal_nan=True), c
    assert "rotation=False" in off.conventions["rotation"]
