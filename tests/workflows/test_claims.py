"""The claims infrastructure: discovery, a claim that raises, the table, and the quick mode of real
experiments through the CLI (checks that the table and figures are produced, not what they conclude)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from phasewatch.cli import main  # noqa: E402
from phasewatch.errors import PhasewatchError  # noqa: E402
from phasewatch.workflows.claims import (  # noqa: E402
    REPRODUCTION_VERDICTS,
    VERDICTS,
    discover,
    reproduction,
    result,
    run_claims,
    save_figure,
    to_markdown,
    write_table,
)

GOOD = '''
"""Claim 7: a toy claim that holds."""
from pathlib import Path
import matplotlib.pyplot as plt
from phasewatch.workflows.claims import result, save_figure

def run(out_dir, quick):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    return result("toy | claim", "nowhere", "none", "holds", "1 + 1 = 2", {"x": 2.0, "nan": float("nan")},
                  save_figure(fig, out_dir, "toy"))
'''

BAD = '''
"""Claim 8: a claim whose experiment breaks."""
def run(out_dir, quick):
    raise ValueError("boom")
'''


def _table_rows(md: str) -> list[list[str]]:
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    return [re.split(r"(?<!\\)\|", ln)[1:-1] for ln in rows]


def test_discover_run_and_table(tmp_path: Path):
    d = tmp_path / "claims"
    d.mkdir()
    (d / "claim_07_toy.py").write_text(GOOD)
    (d / "claim_08_broken.py").write_text(BAD)
    (d / "helper.py").write_text("x = 1\n")  # not a claim: ignored
    assert sorted(discover(d)) == [7, 8]
    out = tmp_path / "out"
    res = run_claims(out, quick=True, directory=d, log=None)
    assert [r["number"] for r in res] == [7, 8]
    assert res[0]["verdict"] == "holds" and res[0]["figure"] == "claim_07/toy.png"
    assert res[1]["verdict"] == "inconclusive" and "ValueError: boom" in res[1]["reason"]
    assert "boom" in (out / "claim_08" / "error.txt").read_text()
    md, js = write_table(res, out, quick=True)
    rows = _table_rows(md.read_text())
    # claim, source, then reproduction (setup, figure, verdict) and beyond (setup, figure, verdict)
    assert len(rows) == 2 and all(len(r) == 9 for r in rows)  # the "|" inside the claim text is escaped
    assert "toy \\| claim" in rows[0][1] and "**holds**" in rows[0][8] and "(claim_07/toy.png)" in rows[0][7]
    assert "not yet run in the source's own protocol" in rows[0][5]  # the toy gives no reproduction
    data = json.loads(js.read_text())
    assert data["quick"] is True and data["claims"][0]["numbers"] == {"x": 2.0, "nan": None}
    # the figure is a real PNG
    img = plt.imread(out / "claim_07" / "toy.png")
    assert img.ndim == 3 and img.shape[0] > 50
    # --only selects, and an unknown number is a clear error
    assert [r["number"] for r in run_claims(out, True, only=[7], directory=d, log=None)] == [7]
    with pytest.raises(PhasewatchError, match="no such claim"):
        run_claims(out, True, only=[3], directory=d, log=None)


def test_result_checks_the_verdict(tmp_path: Path):
    with pytest.raises(PhasewatchError, match="verdict"):
        result("c", "s", "x", "probably", "r")
    fig, _ = plt.subplots()
    p = save_figure(fig, tmp_path, "f")
    assert p.exists() and (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    md = to_markdown([{**result("c", "s", "x", "fails", "r"), "number": 1}])
    assert "**fails**: r" in md and "| – |" in md  # no figure: a dash
    # the reproduction part has its own verdicts
    with pytest.raises(PhasewatchError, match="verdict"):
        reproduction("x", "holds", "r")
    rep = reproduction("the source's protocol", "not feasible here", "needs 40 GPU-hours", {"n": 1}, p)
    res = result("c", "s", "x", "inconclusive", "r", reproduction=rep)
    assert res["reproduction"]["verdict"] == "not feasible here" and res["beyond"]["verdict"] == "inconclusive"
    md = to_markdown([{**res, "number": 1}])
    assert "**not feasible here**: needs 40 GPU-hours" in md and "(" + str(p) + ")" in md


def test_repository_scripts_are_found():
    found = discover()
    assert {1, 2, 3, 4, 9} <= set(found)


def test_no_claims_dir_is_one_line(monkeypatch, capsys, tmp_path: Path):
    """An installed package without the source checkout: the claims are not found, and the error says
    where it looked and what to pass instead, in one line (from Python and from the CLI)."""
    from phasewatch.workflows import claims as cl

    fake = tmp_path / "site-packages" / "phasewatch" / "workflows" / "claims.py"
    monkeypatch.setattr(cl, "__file__", str(fake))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PhasewatchError, match="--claims-dir") as e:
        discover()
    assert "\n" not in str(e.value) and str(tmp_path / "examples" / "claims") in str(e.value)
    assert main(["claims", "--quick", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e ." in err
    # --claims-dir points at them from anywhere
    d = tmp_path / "mine"
    d.mkdir()
    (d / "claim_07_toy.py").write_text(GOOD)
    assert main(["claims", "--quick", "--claims-dir", str(d), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "claims.json").read_text())["claims"][0]["verdict"] == "holds"
    assert main(["claims", "--claims-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_cli_bad_only(capsys, tmp_path: Path):
    assert main(["claims", "--only", "two", "--out", str(tmp_path)]) != 0
    assert "--only two" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_mode_cli(tmp_path: Path):
    """The quick mode of every claim experiment (~1 min with one thread): each runs, none raises, the
    table has a row and a readable figure per claim.  What they conclude is not checked."""
    out = tmp_path / "claims"
    assert main(["claims", "--quick", "--out", str(out)]) == 0
    rows = _table_rows((out / "claims.md").read_text())
    assert [int(r[0]) for r in rows] == sorted(discover())
    data = json.loads((out / "claims.json").read_text())
    for c in data["claims"]:
        assert c["verdict"] in VERDICTS and c["beyond"]["verdict"] == c["verdict"]
        rep = c["reproduction"]
        assert rep["verdict"] is None or rep["verdict"] in REPRODUCTION_VERDICTS
        if rep["verdict"] is not None:
            assert rep["setup"] and rep["reason"] and (out / rep["figure"]).exists()
        assert c["reason"] and c["setup"] and "raised" not in c["reason"]
        assert c["figure"] and (out / c["figure"]).exists()
        assert plt.imread(out / c["figure"]).shape[0] > 50


def _char_lm():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "char_lm_stdlib.py"
    spec = importlib.util.spec_from_file_location("phasewatch_example_char_lm_stdlib", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cached_runs_groups_record_once(tmp_path: Path):
    """``cached_runs`` with custom groups: ``train`` gets each group's keyword arguments, once per
    (group, seed); a second call reuses the recorded runs; the default groups keep the cache
    directory of the configuration alone (the grokking runs' caches stay valid)."""
    import hashlib

    import torch

    import phasewatch
    from phasewatch.workflows.claims import cached_runs

    calls = []

    def train(path, seed, optimizer=None, weight_decay=None):
        calls.append((path.name, seed, optimizer, weight_decay))
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 3)
        with phasewatch.Recorder(path, model, opt, k=4, strict=True) as rec:
            for _ in range(5):
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                rec.loss(loss)
                opt.step()
        return {"final": float(loss.detach())}

    cfg = {"seeds": [0, 1], "weight_decay": 0.5}
    groups = {"a": {"optimizer": "sgd"}, "b": {"optimizer": "other"}}
    out = tmp_path / "claim_01"
    runs = cached_runs(out, "toy", cfg, train, groups=groups)
    assert sorted(calls) == [("a-seed0", 0, "sgd", None), ("a-seed1", 1, "sgd", None),
                             ("b-seed0", 0, "other", None), ("b-seed1", 1, "other", None)]
    assert [(r["group"], r["seed"], r["optimizer"]) for r in runs] == [
        ("a", 0, "sgd"), ("a", 1, "sgd"), ("b", 0, "other"), ("b", 1, "other")]
    assert all(isinstance(r["final"], float) and (r["path"] / "meta.json").exists() for r in runs)
    again = cached_runs(out, "toy", cfg, train, groups=groups)
    assert len(calls) == 4 and [r["final"] for r in again] == [r["final"] for r in runs]
    default = cached_runs(out, "toy", cfg, train)
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]
    assert {r["path"].parent.name for r in default} == {f"toy-{key}"}
    assert [(r["group"], r["weight_decay"]) for r in default] == [("wd", 0.5), ("wd", 0.5), ("nowd", 0.0), ("nowd", 0.0)]
    assert calls[4:] == [("wd-seed0", 0, None, 0.5), ("wd-seed1", 1, None, 0.5),
                         ("nowd-seed0", 0, None, 0.0), ("nowd-seed1", 1, None, 0.0)]


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_claim1_two_recorders_see_one_run(tmp_path: Path, optimizer: str):
    """Claim 1 records each char-LM run twice (stride s and stride 1, one training loop): every
    checkpoint displacement's squared norm (the stride run's band lag 0) equals ‖Σ u_i‖² of the s
    per-step updates of its block, read off the per-step band (lags < s ≤ K−1).

    Tolerance: u_i and the displacement Δ are float32 differences of float32 parameters, each rounded
    once (relative 2⁻²⁴), so per coordinate |Δ − Σu_i| ≤ 2⁻²³ Σ|u_i| and ‖Δ − Σu_i‖ ≤ e = 2⁻²³ Σ‖u_i‖;
    then |‖Δ‖² − ‖Σu_i‖²| ≤ e (2‖Σu_i‖ + e), plus the float64 band sums (P·2⁻⁵³ per inner product)."""
    import phasewatch

    lm = _char_lm()
    s, steps = 4, 24
    cfg = {"d_model": 16, "heads": 2, "layers": 1, "context": 16, "batch": 4, "steps": steps, "warmup": 5,
           "adamw_lr": 2e-3, "muon_lr": 0.02, "decay_per_step": 2e-4, "stride": s, "k": 8,
           "eval_every": 12, "val_batches": 1}
    summary = lm.train(tmp_path / "run", optimizer, 0, cfg)
    ckpt = phasewatch.open_run(tmp_path / "run")
    per = phasewatch.open_run(lm.step_run(tmp_path / "run"))
    assert ckpt.meta["recorder"]["stride"] == s and per.meta["recorder"]["stride"] == 1
    assert ckpt.n_params == per.n_params == summary["recorded_params"] < summary["total_params"]
    assert list(ckpt.band["step"]) == list(range(s, steps + 1, s))
    assert list(per.band["step"]) == list(range(1, steps + 1))
    b = np.asarray(per.band["band"], dtype=np.float64)
    P = per.n_params
    for row, t in enumerate(ckpt.band["step"]):
        idx = [i - 1 for i in range(t - s + 1, t + 1)]  # rows of the block's per-step updates
        sq = sum(b[i, 0] + 2 * sum(b[i, j] for j in range(1, i - idx[0] + 1)) for i in idx)
        norms = np.sqrt([b[i, 0] for i in idx])
        e = 2.0**-23 * norms.sum()
        tol = e * (2 * np.sqrt(sq) + e) + P * 2.0**-53 * norms.sum() ** 2 * 2
        assert abs(ckpt.band["band"][row, 0] - sq) <= tol, (t, ckpt.band["band"][row, 0], sq, tol)


def test_char_lm_muon_takes_the_block_matrices():
    """Muon gets exactly the blocks' 2-D matrices; embeddings, norms and head stay with AdamW."""
    import torch

    lm = _char_lm()
    cfg = {"d_model": 16, "heads": 2, "layers": 2, "context": 8, "adamw_lr": 1e-3, "muon_lr": 0.02,
           "decay_per_step": 2e-4}
    model = lm.build_model(cfg)
    mat, other = lm.optimizers(model, "muon", cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for g in mat.param_groups for p in g["params"])
    assert got == sorted(f"blocks.{i}.{m}.weight" for i in range(2) for m in ("qkv", "proj", "fc", "out"))
    assert isinstance(mat, torch.optim.Muon) and isinstance(other, torch.optim.AdamW)
    rest = {names[id(p)] for g in other.param_groups for p in g["params"]}
    assert rest | set(got) == set(names.values()) and not rest & set(got)
    # equal decoupled decay per step in both arms
    adam_mat, _ = lm.optimizers(model, "adamw", cfg)
    assert mat.param_groups[0]["lr"] * mat.param_groups[0]["weight_decay"] == pytest.approx(
        adam_mat.param_groups[0]["lr"] * adam_mat.param_groups[0]["weight_decay"], rel=1e-12)


def _example(rel: str):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / rel
    spec = importlib.util.spec_from_file_location("phasewatch_test_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_claim2_table7_statistic_on_known_series():
    """Table 7's statistic against a hand computation: peak over the windows ending before the
    grok, divided by the last of them; a window ending at the grok step itself does not count."""
    c2 = _example("claims/claim_02_gap_precedes_grokking.py")
    steps = np.arange(100, 1100, 100)
    g = np.array([1.0, 4.0, np.nan, 6.0, 3.0, 2.0, 9.0, 9.0, 9.0, 9.0])
    d = c2.table7_decline(steps, g, 700)  # windows 100..600 count, 700 does not
    assert d["pre_windows"] == 5 and d["peak"] == 6.0 and d["peak_step"] == 400
    assert d["last"] == 2.0 and d["last_step"] == 600 and d["decline"] == 3.0
    one = c2.table7_decline(steps, g, 200)
    assert one["pre_windows"] == 1 and np.isnan(one["decline"]) and "two" in one["why"]
    assert np.isnan(c2.table7_decline(steps, g, None)["decline"])


def test_dyck_data_labels_and_split():
    """Every label equals the brute-force balance check; train and test are disjoint, half each class."""
    dy = _example("grokking_dyck.py")
    trx, try_, tex, tey = dy.dyck_data(16, 50, 200, seed=3)
    x, y = np.concatenate([trx.numpy(), tex.numpy()]), np.concatenate([try_.numpy(), tey.numpy()])
    for seq, lab in zip(x, y):
        depth, ok = 0, True
        for t in seq:
            depth += 1 if t == 0 else -1
            ok &= depth >= 0
        assert lab == int(ok and depth == 0)
    assert len({s.tobytes() for s in x}) == len(x) and y.sum() == len(y) // 2 and len(trx) == 50
    with pytest.raises(ValueError, match="balanced sequences"):
        dy.dyck_data(10, 50, 1000)


def test_dyck_records_attention_only_and_two_adamw_are_one(tmp_path: Path):
    """The Dyck run records exactly the attention matrices; two AdamW instances (attention / rest)
    train bit for bit as one AdamW over all parameters (AdamW's update is per parameter tensor)."""
    import torch

    import phasewatch

    dy = _example("grokking_dyck.py")
    s = dy.train(tmp_path / "run", weight_decay=1.0, seed=0, steps=20, stride=5, k=4, eval_every=10)
    run = phasewatch.open_run(tmp_path / "run")
    assert run.n_params == s["recorded_params"] == 2 * (3 * 32 * 32 + 32 * 32) < s["total_params"]
    assert list(run.band["step"]) == [5, 10, 15, 20]
    assert phasewatch.open_run(dy.step_run(tmp_path / "run")).n_params == s["recorded_params"]
    x, y, _, _ = dy.dyck_data(16, 50, 10, 0)
    models = []
    for split in (False, True):
        torch.manual_seed(0)
        m = dy.DyckTransformer(16)
        att, rest = dy.attention_matrices(m)
        opts = ([torch.optim.AdamW(att, lr=1e-3, weight_decay=1.0), torch.optim.AdamW(rest, lr=1e-3, weight_decay=1.0)]
                if split else [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1.0)])
        for _ in range(5):
            for o in opts:
                o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            for o in opts:
                o.step()
        models.append(m)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
