"""W&B (offline) and MLflow (local SQLite store) exports, read back by the trackers' own code.

W&B: wandb 0.2x/0.3x no longer ship a Python reader of the ``.wandb`` transaction log (the
``wandb.sdk.internal.datastore`` module is gone; the log is read by the Go ``wandb-core``), and
``wandb.Api`` needs a server.  The test reads the log's framing here (LevelDB log blocks, each
record's CRC-32 checked) and decodes every record with W&B's own protobuf ``Record``.
MLflow: ``MlflowClient(tracking_uri)`` on the written store.

The runs are the real synthetic runs of test_export (``_run``, ``Synthetic``, written by a real
``RunWriter``); values are compared with the analysis of the same run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

import phasewatch
from phasewatch.cli import main
from phasewatch.outputs.export import Follower, merged_rows, scalar_series, tables

pytest.importorskip("tensorboard")  # test_export's helpers need it
from test_export import LAYERS, Synthetic, W, _run, _wait  # noqa: E402

# ------------------------------------------------------------------------------------------------
# reading an offline W&B run
_WANDB_HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"  # identifier, magic, version 0
_BLOCK, _HEAD = 32768, 7  # LevelDB log: 32 KiB blocks; record header crc32 u32, length u16, type u8
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> list:
    """Every record of a ``.wandb`` transaction log, as W&B's protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[: len(_WANDB_HEADER)] == _WANDB_HEADER
    pos, out, parts = len(_WANDB_HEADER), [], b""
    while pos + _HEAD <= len(data):
        if _BLOCK - pos % _BLOCK < _HEAD:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos: pos + _HEAD])
        if kind == 0 and n == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK
            continue
        body = data[pos + _HEAD: pos + _HEAD + n]
        assert zlib.crc32(bytes([kind]) + body) == crc, f"{path.name}: bad CRC at byte {pos}"
        pos += _HEAD + n
        if kind == _FULL:
            out.append(body)
        elif kind == _FIRST:
            parts = body
        elif kind == _MIDDLE:
            parts += body
        elif kind == _LAST:
            out.append(parts + body)
    recs = []
    for body in out:
        r = pb.Record()
        r.ParseFromString(body)
        recs.append(r)
    return recs


def _wandb_rows(path: Path) -> tuple[list[tuple[int, dict]], list]:
    """The run's history rows in logged order as ``(step, {key: value})`` (``step`` being the
    x-axis metric the sink logs; W&B's own keys starting with ``_`` left out), and all records."""
    recs = _wandb_records(path)
    rows = []
    for r in recs:
        if r.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for it in r.history.item:
            key, *sub = [it.key] if it.key else list(it.nested_key)  # media: nested (key, field)
            if key.startswith("_"):
                continue
            if sub:
                row.setdefault(key, {})["/".join(sub)] = json.loads(it.value_json)
            else:
                row[key] = json.loads(it.value_json)
        rows.append((row.pop("step"), row))
    return rows, recs


def _wandb_history(path: Path) -> tuple[dict[int, dict], list]:
    """``{step: {key: value}}``: the rows of each step merged, each (step, key) logged once."""
    rows, recs = _wandb_rows(path)
    hist: dict[int, dict] = {}
    for step, row in rows:
        h = hist.setdefault(step, {})
        assert not set(h) & set(row), f"step {step}: {sorted(set(h) & set(row))} logged twice"
        h.update(row)
    return hist, recs


def _offline_run(directory: Path) -> Path:
    files = sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def _check_wandb(path: Path, res) -> None:
    hist, recs = _wandb_history(path)
    kinds = [r.WhichOneof("record_type") for r in recs]
    assert kinds.count("exit") == 1  # finished cleanly
    want = dict(merged_rows(tables(res, list(LAYERS))))
    assert sorted(hist) == sorted(want)  # one history row per exported step, the step as x axis
    for step, row in want.items():
        got = {k: v for k, v in hist[step].items() if not k.startswith("figures/")}
        assert got == row, step  # every value exact: float64 through JSON
    # straight from the analysis, not only through merged_rows
    t, pr, sc = res.table, res.probes, res.scalars
    for col in ("kstar", "gap_ratio", "A"):
        ok = np.isfinite(t[col])
        assert [hist[s][f"window/{col}"] for s in t["step"][ok]] == t[col][ok].tolist()
    assert [hist[s]["window/sigma_1"] for s in t["step"]] == t["sigma"][:, 0].tolist()
    assert [hist[s]["noise/C"] for s in pr["step"]] == pr["C"].tolist()
    assert [hist[s]["noise/layer_C_V"] for s in pr["step"]] == pr["layer_C"][:, 1].tolist()
    ok = np.isfinite(sc["loss"])
    assert [hist[s]["steps/loss"] for s in sc["step"][ok]] == sc["loss"][ok].tolist()
    assert "steps/loss" not in hist[4]  # the NaN loss of step 4 is left out
    s, v = res.metrics["test_acc"]
    assert [hist[int(x)]["eval/test_acc"] for x in s] == v.tolist()


def test_wandb_offline_export_reads_back_equal_to_the_analysis(tmp_path, capfd, monkeypatch):
    run = _run(tmp_path / "run")
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's setting: the export stays offline all the same
    env_before = os.environ.get("WANDB_MODE")
    assert main(["export", str(run), "-w", str(W), "--wandb", str(tmp_path / "wb"), "--run-name", "syn",
                 "--figures"]) == 0
    out, err = capfd.readouterr()  # file descriptors: wandb-core's output would show here too
    assert out.splitlines()[0].startswith("exported ") and "wandb" not in out.split("wrote")[0]
    assert "wandb:" not in out and "wandb:" not in err
    assert os.environ.get("WANDB_MODE") == env_before  # the sink set it for itself only
    path = _offline_run(tmp_path / "wb")
    res = phasewatch.analyze(run, window=W)
    _check_wandb(path, res)
    recs = _wandb_records(path)
    runrec = [r.run for r in recs if r.WhichOneof("record_type") == "run"][0]
    assert runrec.display_name == "syn" and runrec.project == "phasewatch"
    metrics = {(m.metric.name, m.metric.glob_name, m.metric.step_metric) for m in recs
               if m.WhichOneof("record_type") == "metric"}
    assert ("", "*", "step") in metrics  # every series drawn against the optimizer step
    config = {it.key: json.loads(it.value_json) for it in runrec.config.update}
    assert config["window"] == W and config["phasewatch_run"] == str(run)
    hist, _ = _wandb_history(path)
    last = int(res.scalars["step"][-1])
    assert hist[last]["figures/overview"]["_type"] == "image-file"
    media = list(path.parent.glob("files/media/images/figures/overview_*.png"))
    assert len(media) == 1 and media[0].stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------
# MLflow
def _mlflow_run(directory: Path, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{directory.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name("phasewatch")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == [name]
    return client, runs[0]


def _history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    h = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.step for m in h], [m.value for m in h]


def _check_mlflow(client, r, res) -> None:
    rid = r.info.run_id
    series = list(scalar_series(tables(res, list(LAYERS))))
    assert set(r.data.metrics) == {tag for tag, *_ in series}  # every numeric series, nothing else
    for tag, st, v, _ in series:
        steps, values = _history(client, rid, tag)
        assert steps == st.tolist() and values == v.tolist(), tag  # each point once, exact
    t, pr, sc = res.table, res.probes, res.scalars
    ok = np.isfinite(t["gap_ratio"])
    assert _history(client, rid, "window/gap_ratio") == (t["step"][ok].tolist(), t["gap_ratio"][ok].tolist())
    assert _history(client, rid, "window/sigma_2")[1] == t["sigma"][:, 1].tolist()
    assert _history(client, rid, "noise/C") == (pr["step"].tolist(), pr["C"].tolist())
    assert _history(client, rid, "noise/p_hi")[1] == pr["p_hi"].tolist()
    ok = np.isfinite(sc["loss"])
    assert _history(client, rid, "steps/loss") == (sc["step"][ok].tolist(), sc["loss"][ok].tolist())
    s, v = res.metrics["test_acc"]
    assert _history(client, rid, "eval/test_acc") == (s.tolist(), v.tolist())
    # timestamps: the steps' wall clock (Synthetic writes 1.7e9 + step seconds), in ms
    h = client.get_metric_history(rid, "steps/grad_norm")
    assert sorted(m.timestamp for m in h) == [round((1.7e9 + s) * 1000) for s in sorted(m.step for m in h)]


def test_mlflow_export_reads_back_equal_to_the_analysis(tmp_path, capfd):
    run = _run(tmp_path / "run")
    assert main(["export", str(run), "-w", str(W), "--mlflow", str(tmp_path / "ml"), "--figures"]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines()[0].startswith("exported ") and "mlflow" not in out.split("wrote")[0].lower()
    assert "INFO" not in err  # MLflow/alembic's database chatter is held back
    res = phasewatch.analyze(run, window=W)
    client, r = _mlflow_run(tmp_path / "ml", "run")
    assert r.info.status == "FINISHED"
    _check_mlflow(client, r, res)
    p = r.data.params
    assert p["window"] == str(W) and p["recorder.k"] == "12" and p["model.n_params"] == "40"
    assert [g["name"] for g in json.loads(p["model.groups"])] == list(LAYERS)  # a list: JSON
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert arts == {"conventions.json", "figures"}
    figs = client.list_artifacts(r.info.run_id, "figures")
    assert [a.path for a in figs] == ["figures/overview.png"] and figs[0].file_size > 10_000
    conv = json.loads(Path(client.download_artifacts(r.info.run_id, "conventions.json", str(tmp_path))).read_text())
    assert conv == res.conventions
    events = {k: v for k, v in r.data.tags.items() if k.startswith("phasewatch.event.")}
    assert len(events) == len(res.events) and any(e.kind == "grokking" for e in res.events)
    for e in res.events:
        assert events[f"phasewatch.event.{e.kind}.{e.metric}.{e.step}"] == f"step {e.step}: {e.value:.6g} ({e.rule})"


def test_mlflow_params_are_flattened_and_cut_to_mlflows_limits(tmp_path):
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    from phasewatch.outputs.trackers import MlflowSink, flatten

    assert flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x", "f": None}) == \
        {"a.b.c": "1", "a.d": "[1, 2]", "e": "x", "f": "null"}
    long_key = "k" * (MAX_ENTITY_KEY_LENGTH + 50)
    params = {"long": "v" * (MAX_PARAM_VAL_LENGTH + 1000), long_key: 1, "bad chars!": {"é?": 2},
              **{f"p{i}": i for i in range(150)}}  # more than one batch of 100
    sink = MlflowSink(tmp_path / "ml", "limits", params)
    sink.close()
    client, r = _mlflow_run(tmp_path / "ml", "limits")
    p = r.data.params
    assert len(p) == 153
    assert p["long"] == "v" * MAX_PARAM_VAL_LENGTH and p["k" * MAX_ENTITY_KEY_LENGTH] == "1"
    assert p["bad chars_.é_"] == "2" and p["p149"] == "149"


# ------------------------------------------------------------------------------------------------
# following a live run
def test_follow_a_live_run_into_wandb_and_mlflow(tmp_path):
    from phasewatch.outputs.trackers import MlflowSink, WandbSink

    syn = Synthetic(120, seed=3)
    path = tmp_path / "live"
    w = syn.writer(path)
    syn.write(w, 0, 5)  # fewer rows than the window: steps and metrics only at first
    w.flush()
    sinks = [WandbSink("phasewatch", "live", tmp_path / "wb", {"window": W}),
             MlflowSink(tmp_path / "ml", "live", {"window": W})]
    follower = Follower(path, sinks, window=W)
    polls: list[tuple[int, int]] = []
    result = {}
    th = threading.Thread(target=lambda: result.setdefault(
        "why", follower.follow(0.02, on_poll=lambda f, n: polls.append((f.last_step, n)))), daemon=True)
    th.start()
    try:
        for lo, hi, rotate in [(5, 40, False), (40, 80, True), (80, 120, False)]:
            _wait(lambda: follower.polls > 0 and not w._closed, what="first poll")
            syn.write(w, lo, hi)
            if rotate:
                w.rotate()
            else:
                w.flush()
            _wait(lambda hi=hi: follower.last_step == hi, timeout=60, what=f"step {hi}")
            assert not result  # still following: the run is open
    finally:
        w.close()
    th.join(timeout=60)
    assert not th.is_alive() and result["why"] == "closed"
    follower.close()
    assert {5, 40, 80, 120} <= {s for s, n in polls if n}  # each piece exported while the run was live
    res = phasewatch.analyze(path, window=W)  # the incremental exports equal one full analysis
    _check_wandb(_offline_run(tmp_path / "wb"), res)
    client, r = _mlflow_run(tmp_path / "ml", "live")
    _check_mlflow(client, r, res)


def test_cli_follow_of_a_finished_run_and_the_python_export(tmp_path, capsys):
    from phasewatch.outputs.export import export

    run = _run(tmp_path / "run", T=60)
    assert main(["export", str(run), "-w", str(W), "--wandb", str(tmp_path / "wb"), "--mlflow", str(tmp_path / "ml"),
                 "--follow", "--interval", "600"]) == 0  # exits by itself: the run is closed
    out = capsys.readouterr().out
    assert "closed: exported" in out and "last step 60" in out
    res = phasewatch.analyze(run, window=W)
    _check_wandb(_offline_run(tmp_path / "wb"), res)
    _check_mlflow(*_mlflow_run(tmp_path / "ml", "run"), res)
    f = export(run, mlflow=tmp_path / "ml2", window=W)
    assert f.rows_written == sum(len(t) for t in tables(res, list(LAYERS)).values())
    _check_mlflow(*_mlflow_run(tmp_path / "ml2", "run"), res)


def test_follow_after_a_resume_over_exported_steps(tmp_path):
    """Both trackers keep both trajectories' points at the re-exported steps and say where the run
    resumed (MLflow: a tag; W&B: the config)."""
    from collections import Counter

    from test_export import SIZES, K

    from phasewatch.analysis.gram import band_from_updates
    from phasewatch.outputs.trackers import MlflowSink, WandbSink

    syn = Synthetic(100, seed=5)
    path = tmp_path / "run"
    with syn.writer(path) as w:
        syn.write(w, 0, 70)
    first = phasewatch.analyze(path, window=W)
    follower = Follower(path, [WandbSink("phasewatch", "resumed", tmp_path / "wb", {}),
                               MlflowSink(tmp_path / "ml", "resumed")], window=W)
    assert follower.poll() > 0 and follower.done["steps"] == 70
    other = Synthetic(100, seed=6)  # a different trajectory from step 51 on (as in test_export)
    other.U[:50] = syn.U[:50]
    other.layer_band = band_from_updates(other.U, K, SIZES)
    rows, lags = np.arange(50, 100)[:, None, None], np.arange(K)[None, None, :]
    other.layer_band[50:] = np.where(lags > rows - 50, np.nan, other.layer_band[50:])
    other.band = other.layer_band.sum(axis=1)
    with other.writer(path, resume=True) as w:
        other.write(w, 50, 100)
    assert follower.poll() > 0
    follower.close()
    res = phasewatch.analyze(path, window=W)
    client, r = _mlflow_run(tmp_path / "ml", "resumed")
    assert r.data.tags["phasewatch.resumed_at_step"] == "51"
    # both trajectories' points; a point equal in both (same step, value and wall-clock stamp: the
    # synthetic resume repeats the wall times) is one row of MLflow's metric table, so sets compare
    old = {tag: (st, v) for tag, st, v, _ in scalar_series(tables(first, list(LAYERS)))}
    n_both = 0
    for tag, st, v, _ in scalar_series(tables(res, list(LAYERS))):
        got = Counter(zip(*_history(client, r.info.run_id, tag)))
        want = set(zip(old[tag][0].tolist(), old[tag][1].tolist())) if tag in old else set()
        new_pts = {(s, x) for s, x in zip(st.tolist(), v.tolist()) if s >= 51}
        n_both += len(new_pts - want)
        assert set(got) == want | new_pts and max(got.values()) == 1, tag
    assert n_both > 100  # the resumed trajectory's own points are there beside the first one's
    # W&B: the first export's rows, then the resumed trajectory's from step 51, each once
    rows, recs = _wandb_rows(_offline_run(tmp_path / "wb"))
    rows_old, rows_new = dict(merged_rows(tables(first, list(LAYERS)))), dict(merged_rows(tables(res, list(LAYERS))))
    want = sorted(rows_old.items()) + [(s, r) for s, r in sorted(rows_new.items()) if s >= 51]
    assert rows == want  # one row per step and poll: the steps 51..70 twice, once per trajectory
    resumed = [json.loads(it.value_json) for r in recs if r.WhichOneof("record_type") == "config"
               for it in r.config.update if it.key == "phasewatch_resumed_at"]
    assert resumed == [[51]]
    assert any(rows_old[s] != rows_new[s] for s in range(51, 71))  # the trajectories differ there


# ------------------------------------------------------------------------------------------------
def test_trackers_are_imported_lazily_and_missing_ones_say_which_extra(tmp_path, capsys, monkeypatch, child_env):
    code = ("import sys, phasewatch, phasewatch.cli, phasewatch.outputs.trackers; "
            "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    run = _run(tmp_path / "run", T=40)
    for mod, opt in (("wandb", "--wandb"), ("mlflow", "--mlflow")):
        monkeypatch.setitem(sys.modules, mod, None)  # as if it were not installed
        assert main(["export", str(run), opt, str(tmp_path / mod)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "pip install 'phasewatch[trackers]'" in err, err
