"""Tests of the run format on disk (phasewatch.store): real HDF5 files in tmp_path, no mocks.

Covers the numpy-level writer and the reader (round trip, rotation, committed_rows trimming, SWMR
reading while the writer is open, packed files, single segment files), resuming (new segment,
overlap, gap, incompatible tables, rows an interrupted session left behind), bad input (each a
one-line PhasewatchError naming the path: missing, foreign, truncated, newer schema, bit flips,
external links, virtual datasets), ``repair_run`` on a segment left open by a killed writer, wide
(snapshot) rows read on demand, and torn chunks of a segment that is being written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from phasewatch.errors import PhasewatchError, RunFormatError, SchemaVersionError
from phasewatch.store import RunWriter, open_run, pack_run, repair_run
from phasewatch.store import format as fmt

# ------------------------------------------------------------------------------------------------
# helpers: a small framework-agnostic run whose every value is a known function of (step, salt)

N_LAYERS, K = 3, 4


def make_tables(k: int = K) -> list[fmt.TableSpec]:
    return [
        fmt.TableSpec("steps", {
            "step": fmt.Column("i8"),
            "loss": fmt.Column("f8"),
            "lr": fmt.Column("f8", (2,)),
            "flags": fmt.Column("i4"),
        }),
        fmt.band_table(N_LAYERS, k),
        fmt.metrics_table(),
    ]


def rows(table: str, steps, salt: int = 0, k: int = K) -> dict[str, np.ndarray]:
    """The rows of ``table`` at ``steps``; ``salt`` tells apart rows written by different sessions."""
    s = np.asarray(steps, dtype="i8")
    if table == "steps":
        return {
            "step": s,
            "loss": 1.0 / s + 1000.0 * salt + np.sqrt(2.0),  # not exactly representable: tests exactness
            "lr": np.stack([s * 1e-3, np.full(len(s), salt + 0.1)], axis=1),
            "flags": (s % 3).astype("i4"),
        }
    if table == "band":
        layer = (s[:, None, None] * np.arange(1, N_LAYERS * k + 1).reshape(N_LAYERS, k) / 7.0) + salt
        return {"step": s, "lr": s * 1e-3, "band": layer.sum(axis=1), "layer_band": layer}
    if table == "metrics":  # two metrics at every 5th step, long form
        m = s[s % 5 == 0]
        return {
            "step": np.repeat(m, 2),
            "name": np.tile(np.array([b"acc", b"val_loss"], dtype="S64"), len(m)),
            "value": np.repeat(m / 100.0, 2) + np.tile([0.0, 0.5], len(m)) + salt,
        }
    raise KeyError(table)


def write_steps(w: RunWriter, steps, salt: int = 0, batch: int = 7) -> None:
    """Append rows of every table in batches of ``batch`` steps, as a training loop would."""
    steps = list(steps)
    for i in range(0, len(steps), batch):
        part = steps[i: i + batch]
        for t in ("band", "steps", "metrics"):
            r = rows(t, part, salt)
            if len(r["step"]):
                w.append(t, **r)


def expected(steps_and_salts: list[tuple[range, int]]) -> dict[str, dict[str, np.ndarray]]:
    """The tables a reader must return for sessions ``[(steps, salt), ...]`` (later rows win)."""
    out = {}
    for t in ("steps", "band", "metrics"):
        parts = []
        for i, (st, salt) in enumerate(steps_and_salts):
            r = rows(t, st, salt)
            nxt = [s for s, _ in steps_and_salts[i + 1:]]
            if nxt:
                cut = min(min(x) for x in nxt)
                keep = r["step"] < cut
                r = {c: v[keep] for c, v in r.items()}
            parts.append(r)
        out[t] = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    return out


def assert_tables(run, want: dict[str, dict[str, np.ndarray]]) -> None:
    for t, cols in want.items():
        got = run.table(t)
        assert set(got) == set(cols), t
        for c, v in cols.items():
            assert got[c].dtype == v.dtype or np.dtype(got[c].dtype).kind == "S", (t, c, got[c].dtype)
            np.testing.assert_array_equal(got[c], v, err_msg=f"{t}/{c}")


def write_run(path: Path, steps=range(1, 101), *, salt: int = 0, resume: bool = False,
              batch: int = 10, **kw) -> Path:
    """Write ``steps`` in one session; with the default blocks of 10 rows, segments rotate at
    exact multiples of 10 steps."""
    kw.setdefault("block_rows", 10)
    kw.setdefault("flush_seconds", 1e9)
    with RunWriter(path, {"user": {"note": "test"}, "seeds": {"numpy": 7}}, make_tables(),
                   resume=resume, **kw) as w:
        write_steps(w, steps, salt, batch=batch)
    return path


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("segment-*.h5"))


def one_line_naming(err: BaseException, path) -> str:
    msg = str(err)
    assert isinstance(err, PhasewatchError), type(err)
    assert "\n" not in msg, msg
    assert str(path) in msg, (str(path), msg)
    return msg


def flip_byte_in_chunk(file: Path, dataset: str, index: int = 0, offset_in_chunk: int = 5) -> None:
    """Flip one byte inside the ``index``-th stored chunk of ``dataset`` (fletcher32 must notice)."""
    try:
        f = h5py.File(file, "r")
    except OSError:  # left open by a killed writer
        f = h5py.File(file, "r", swmr=True)
    with f:
        info = f[dataset].id.get_chunk_info(index)
    assert info.size > offset_in_chunk
    with open(file, "r+b") as fh:
        fh.seek(info.byte_offset + offset_in_chunk)
        b = fh.read(1)
        fh.seek(info.byte_offset + offset_in_chunk)
        fh.write(bytes([b[0] ^ 0xFF]))


_OPEN_RUNS = textwrap.dedent("""
    import json, sys
    import phasewatch
    for p in sys.argv[1:]:
        try:
            run = phasewatch.open_run(p)
            print(json.dumps({"rows": len(run.steps["step"]), "warnings": run.warnings}))
        except phasewatch.PhasewatchError as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
""")


def open_runs_in_child(paths, python, env, timeout: float = 30.0) -> list[dict]:
    """open_run each path in a child process, so that a hang fails the test instead of the suite."""
    try:
        proc = subprocess.run([python, "-c", _OPEN_RUNS, *map(str, paths)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"open_run hangs on one of {[str(p) for p in paths]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


# ------------------------------------------------------------------------------------------------
# 1. round trip


def test_round_trip_several_tables_flushes_and_segments(tmp_path):
    path = tmp_path / "run"
    with RunWriter(path, {"user": {"note": "round trip"}}, make_tables(),
                   block_rows=16, flush_seconds=1e9, rotate_rows=25) as w:
        write_steps(w, range(1, 41), batch=3)
        w.flush()  # an explicit flush in the middle of a segment
        write_steps(w, range(41, 101), batch=11)
        w.flush()
        write_steps(w, range(101, 104), batch=1)  # left in the buffers: close() must write them
    segs = segments(path)
    assert len(segs) >= 4, segs  # 103 rows, rotation after >= 25 rows of `steps`

    run = open_run(path)
    assert run.warnings == []
    assert [s.error for s in run.segments] == [None] * len(segs)
    assert [s.index for s in run.segments] == list(range(len(segs)))
    # every segment but the last holds >= rotate_rows steps; together they tile 1..103
    firsts = [s.first_step for s in run.segments]
    lasts = [s.last_step for s in run.segments]
    assert firsts[0] == 1 and lasts[-1] == 103
    assert all(b == a + 1 for a, b in zip(lasts[:-1], firsts[1:]))
    assert all(s.rows["steps"] >= 25 for s in run.segments[:-1])
    assert_tables(run, expected([(range(1, 104), 0)]))

    mets = run.metrics()
    assert set(mets) == {"acc", "val_loss"}
    np.testing.assert_array_equal(mets["acc"][0], np.arange(5, 101, 5))
    np.testing.assert_array_equal(mets["val_loss"][1], np.arange(5, 101, 5) / 100.0 + 0.5)

    meta = run.meta
    assert meta["format"] == fmt.FORMAT_NAME and meta["schema_version"] == fmt.SCHEMA_VERSION
    assert meta["user"] == {"note": "round trip"}
    assert len(meta["sessions"]) == 1 and meta["sessions"][0]["first_segment"] == 0
    assert meta["tables"]["band"]["layer_band"] == ["f8", [N_LAYERS, K]]
    # every segment says what it is and carries the metadata, and its datasets are checksummed
    for s in segs:
        with h5py.File(s, "r") as f:
            assert f.attrs["format"] == fmt.FORMAT_NAME
            assert f.attrs["run_id"] == meta["run_id"]
            assert json.loads(f.attrs["meta_json"])["run_id"] == meta["run_id"]
            assert f["band/layer_band"].fletcher32 and f["band/layer_band"].compression is None
            assert f["steps/step"].maxshape == (None,)


def test_writer_validates_appended_columns(tmp_path):
    with RunWriter(tmp_path / "run", {}, make_tables()) as w:
        r = rows("steps", [1, 2])
        with pytest.raises(ValueError, match="missing columns"):
            w.append("steps", **{c: v for c, v in r.items() if c != "loss"})
        with pytest.raises(ValueError, match="different row counts"):
            w.append("steps", **{**r, "loss": np.ones(3)})
        w.append("steps", **r)
    np.testing.assert_array_equal(open_run(tmp_path / "run").steps["step"], [1, 2])
    with pytest.raises(RunFormatError):
        w.append("steps", **r)  # closed


def test_reader_trusts_committed_rows_and_ignores_rows_beyond(tmp_path):
    src = write_run(tmp_path / "run", range(1, 21))
    want = expected([(range(1, 21), 0)])
    bad = tmp_path / "extra"
    shutil.copytree(src, bad)
    seg = segments(bad)[0]
    with h5py.File(seg, "r+") as f:
        assert int(f["steps/committed_rows"][0]) == 20
        for t in ("steps", "band"):
            g = f[t]
            for name, ds in g.items():
                if name == fmt.COMMITTED:
                    continue
                ds.resize(35, axis=0)
                ds[20:] = 99999 if ds.dtype.kind in "if" else b"x"
    run = open_run(bad)
    assert run.warnings == []
    assert_tables(run, want)  # the 15 uncommitted rows are invisible
    assert run.segments[0].rows["steps"] == 20

    # a count larger than the data (data lost after the count was written): trim to the shortest
    short = tmp_path / "short"
    shutil.copytree(src, short)
    with h5py.File(segments(short)[0], "r+") as f:
        f["steps/committed_rows"][0] = 50
        f["steps/loss"].resize(12, axis=0)
    run = open_run(short)
    assert len(run.steps["step"]) == 12
    assert {len(v) for v in run.steps.values()} == {12}
    np.testing.assert_array_equal(run.steps["loss"], want["steps"]["loss"][:12])
    np.testing.assert_array_equal(run.band["step"], np.arange(1, 21))


def test_read_while_the_writer_is_open_swmr(tmp_path):
    path = tmp_path / "live"
    w = RunWriter(path, {}, make_tables(), block_rows=1000, flush_seconds=1e9, rotate_rows=1000)
    try:
        write_steps(w, range(1, 11))
        w.flush()
        run = open_run(path)  # the same process still has the segment open for SWMR writing
        assert run.warnings == []
        assert_tables(run, expected([(range(1, 11), 0)]))

        write_steps(w, range(11, 16))  # buffered, not flushed: not visible yet
        np.testing.assert_array_equal(open_run(path).steps["step"], np.arange(1, 11))
        w.flush()
        np.testing.assert_array_equal(open_run(path).steps["step"], np.arange(1, 16))

        w.rotate()  # a closed segment plus the open one
        write_steps(w, range(16, 21))
        w.flush()
        run = open_run(path)
        assert [s.label for s in run.segments] == ["segment-000000.h5", "segment-000001.h5"]
        assert run.warnings == []
        assert_tables(run, expected([(range(1, 21), 0)]))
        # plain h5py readers can follow too, in SWMR mode
        with h5py.File(path / "segment-000001.h5", "r", swmr=True) as f:
            assert int(f["steps/committed_rows"][0]) == 5
        # the reader closed its handles: the writer keeps writing
        write_steps(w, range(21, 31))
    finally:
        w.close()
    assert_tables(open_run(path), expected([(range(1, 31), 0)]))


@pytest.mark.parametrize("gzip", [None, 4])
def test_packed_file_reads_back_identically(tmp_path, gzip):
    src = write_run(tmp_path / "run", range(1, 81), rotate_rows=30)
    assert len(segments(src)) == 3
    d = open_run(src)
    out = pack_run(src, tmp_path / "packed.h5", gzip=gzip)
    assert out == tmp_path / "packed.h5" and out.is_file()
    assert not list(tmp_path.glob("*.tmp"))
    p = open_run(out)
    assert p.packed and not d.packed
    assert p.warnings == []
    assert p.meta == d.meta
    for t in ("steps", "band", "metrics"):
        a, b = d.table(t), p.table(t)
        assert set(a) == set(b)
        for c in a:
            assert a[c].dtype == b[c].dtype
            np.testing.assert_array_equal(a[c], b[c], err_msg=f"{t}/{c}")
    assert p.metrics().keys() == d.metrics().keys()
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == fmt.PACKED_FORMAT_NAME
        ds = f[f"{fmt.PACKED_SEGMENTS}/000000/band/layer_band"]
        assert ds.fletcher32
        assert ds.compression == ("gzip" if gzip else None)
        if gzip:
            assert ds.compression_opts == gzip
    # a packed file packs again to the same content, and refuses to overwrite its input
    again = open_run(pack_run(out, tmp_path / "again.h5"))
    np.testing.assert_array_equal(again.band["layer_band"], d.band["layer_band"])
    with pytest.raises(RunFormatError) as ei:
        pack_run(out, out)
    one_line_naming(ei.value, out)


def test_open_a_single_segment_file(tmp_path):
    src = write_run(tmp_path / "run", range(1, 56), rotate_rows=20)
    segs = segments(src)
    assert len(segs) == 3
    run = open_run(segs[1])
    assert run.warnings == []
    assert len(run.segments) == 1
    assert run.meta["run_id"] == open_run(src).meta["run_id"]
    want = expected([(range(1, 56), 0)])
    got = run.steps
    sel = (want["steps"]["step"] >= 21) & (want["steps"]["step"] <= 40)
    for c in got:
        np.testing.assert_array_equal(got[c], want["steps"][c][sel])
    np.testing.assert_array_equal(run.band["step"], np.arange(21, 41))


def test_empty_tables_round_trip_and_pack(tmp_path):
    path = tmp_path / "empty"
    RunWriter(path, {}, make_tables()).close()
    run = open_run(path)
    assert run.warnings == []
    assert len(run.steps["step"]) == 0 and run.band["layer_band"].shape == (0, N_LAYERS, K)
    assert run.metrics() == {}
    p = open_run(pack_run(path, tmp_path / "empty.h5"))
    assert len(p.steps["step"]) == 0 and p.band["layer_band"].shape == (0, N_LAYERS, K)


# ------------------------------------------------------------------------------------------------
# 2. resume


def test_resume_continues_in_a_new_segment(tmp_path):
    path = write_run(tmp_path / "run", range(1, 31))
    run_id = open_run(path).meta["run_id"]
    with pytest.raises(RunFormatError) as ei:
        RunWriter(path, {}, make_tables())  # without resume=True an existing run is an error
    one_line_naming(ei.value, path)
    assert len(segments(path)) == 1

    write_run(path, range(31, 51), resume=True)
    assert [p.name for p in segments(path)] == ["segment-000000.h5", "segment-000001.h5"]
    run = open_run(path)
    assert run.warnings == []
    assert run.meta["run_id"] == run_id
    sessions = run.meta["sessions"]
    assert [s["first_segment"] for s in sessions] == [0, 1]
    assert [s["resumed"] for s in sessions] == [False, True]
    assert (run.segments[1].first_step, run.segments[1].last_step) == (31, 50)
    assert_tables(run, expected([(range(1, 51), 0)]))


def test_resume_overlap_is_reported_and_later_rows_win(tmp_path):
    path = write_run(tmp_path / "run", range(1, 41))
    write_run(path, range(31, 61), salt=2, resume=True)  # restarted from a checkpoint at step 30
    run = open_run(path)
    overlap = [w for w in run.warnings if "overlap" in w]
    assert len(overlap) == 1, run.warnings
    assert "segment-000001.h5" in overlap[0] and "overlap of 10 steps" in overlap[0]
    st = run.steps["step"]
    np.testing.assert_array_equal(st, np.arange(1, 61))
    assert_tables(run, expected([(range(1, 41), 0), (range(31, 61), 2)]))
    # later rows won: the loss of steps 31..40 is the second session's
    assert np.all(run.steps["loss"][30:] > 1000)
    assert np.all(run.steps["loss"][:30] < 1000)
    assert run.metrics()["acc"][1][run.metrics()["acc"][0] == 35][0] == pytest.approx(2.35)
    # pack keeps the same choice
    packed = open_run(pack_run(path, tmp_path / "p.h5"))
    np.testing.assert_array_equal(packed.steps["loss"], run.steps["loss"])


def test_resume_gap_is_reported(tmp_path):
    path = write_run(tmp_path / "run", range(1, 41))
    write_run(path, range(51, 61), salt=1, resume=True)
    run = open_run(path)
    gaps = [w for w in run.warnings if "not recorded" in w]
    assert len(gaps) == 1, run.warnings
    assert "segment-000001.h5" in gaps[0] and "10 steps" in gaps[0]
    assert not any("overlap" in w for w in run.warnings)
    np.testing.assert_array_equal(run.steps["step"], np.r_[1:41, 51:61])
    assert_tables(run, expected([(range(1, 41), 0), (range(51, 61), 1)]))


def test_resume_after_an_interrupted_session_drops_its_orphan_rows(tmp_path):
    """A session killed after committing band rows whose steps rows were never committed
    (the recorder hands band rows to the writer one step ahead): when training resumes at the
    next step, the orphan band rows must not duplicate the resumed session's."""
    path = tmp_path / "run"
    w = RunWriter(path, {}, make_tables(), block_rows=1000, flush_seconds=1e9)
    write_steps(w, range(1, 21))
    w.append("band", **rows("band", [21, 22]))  # band ahead of steps, as at a kill
    w.flush()
    w.abandon()
    write_run(path, range(21, 41), salt=1, resume=True)
    run = open_run(path)
    assert run.warnings == []
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, 41))
    np.testing.assert_array_equal(run.band["step"], np.arange(1, 41))
    assert_tables(run, expected([(range(1, 21), 0), (range(21, 41), 1)]))


def test_rotation_keeps_band_rows_ahead_of_steps(tmp_path):
    """Rotation (not a resume) with the band one step ahead: nothing is dropped."""
    path = tmp_path / "run"
    with RunWriter(path, {}, make_tables(), block_rows=1000, flush_seconds=1e9) as w:
        w.append("steps", **rows("steps", range(1, 11)))
        w.append("band", **rows("band", range(1, 12)))
        w.rotate()
        w.append("steps", **rows("steps", range(11, 21)))
        w.append("band", **rows("band", range(12, 21)))
    run = open_run(path)
    assert run.warnings == []
    np.testing.assert_array_equal(run.band["step"], np.arange(1, 21))
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, 21))


def test_resume_with_different_tables_is_a_one_line_error(tmp_path):
    path = write_run(tmp_path / "run", range(1, 11))
    meta_before = (path / fmt.META_FILE).read_text()
    with pytest.raises(RunFormatError) as ei:
        RunWriter(path, {}, make_tables(k=K + 1), resume=True)
    msg = one_line_naming(ei.value, path)
    assert "resume" in msg
    # nothing was touched
    assert len(segments(path)) == 1
    assert (path / fmt.META_FILE).read_text() == meta_before


def test_resume_refuses_a_newer_schema(tmp_path):
    path = write_run(tmp_path / "run", range(1, 11))
    meta = json.loads((path / fmt.META_FILE).read_text())
    meta["schema_version"] = fmt.SCHEMA_VERSION + 1
    (path / fmt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SchemaVersionError) as ei:
        RunWriter(path, {}, make_tables(), resume=True)
    one_line_naming(ei.value, path)
    assert len(segments(path)) == 1


# ------------------------------------------------------------------------------------------------
# 3. bad input: a one-line PhasewatchError naming the path


def test_missing_path(tmp_path):
    p = tmp_path / "nope"
    with pytest.raises(RunFormatError) as ei:
        open_run(p)
    one_line_naming(ei.value, p)


def test_directory_that_is_not_a_run(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    with pytest.raises(RunFormatError) as ei:
        open_run(d)
    assert "not a phasewatch run" in one_line_naming(ei.value, d)


def test_directory_with_a_foreign_segment_and_no_meta(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    with h5py.File(d / "segment-000000.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(RunFormatError) as ei:
        open_run(d)
    one_line_naming(ei.value, d)


@pytest.mark.parametrize("content", [b"step,loss\n1,0.5\n", bytes(range(256)) * 40],
                         ids=["text", "binary"])
def test_file_that_is_not_hdf5(tmp_path, content):
    p = tmp_path / "run.h5"
    p.write_bytes(content)
    with pytest.raises(RunFormatError) as ei:
        open_run(p)
    assert "not an HDF5 file" in one_line_naming(ei.value, p)


def test_foreign_hdf5_file(tmp_path):
    p = tmp_path / "weights.h5"
    with h5py.File(p, "w") as f:
        f["layer1/w"] = np.ones((3, 3))
        f.attrs["format"] = "something-else"
    with pytest.raises(RunFormatError) as ei:
        open_run(p)
    assert "not a phasewatch run" in one_line_naming(ei.value, p)


def test_meta_json_that_is_not_an_object(tmp_path):
    path = write_run(tmp_path / "run", range(1, 5))
    (path / fmt.META_FILE).write_text("[1, 2, 3]")
    # a broken meta.json is recovered from the segments, like an unreadable one
    run = open_run(path)
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, 5))
    (path / fmt.META_FILE).write_text('{"format": "phasewatch-run", "schema_version": "two"}')
    with pytest.raises(RunFormatError) as ei:
        open_run(path)
    one_line_naming(ei.value, path)


def test_truncated_segment_is_skipped_with_a_warning(tmp_path):
    path = write_run(tmp_path / "run", range(1, 86), rotate_rows=30)
    segs = segments(path)
    assert len(segs) == 3
    size = segs[1].stat().st_size
    with open(segs[1], "r+b") as fh:
        fh.truncate(size // 2)
    run = open_run(path)
    skipped = [w for w in run.warnings if w.startswith("skipped")]
    assert len(skipped) == 1 and "segment-000001.h5" in skipped[0], run.warnings
    assert all("\n" not in w for w in run.warnings)
    assert run.segments[1].error and run.segments[1].rows == {}
    want = expected([(range(1, 86), 0)])
    keep = (want["steps"]["step"] <= 30) | (want["steps"]["step"] > 60)
    np.testing.assert_array_equal(run.steps["step"], want["steps"]["step"][keep])
    np.testing.assert_array_equal(run.steps["loss"], want["steps"]["loss"][keep])
    assert any("30 steps are not recorded" in w for w in run.warnings)

    # the segment file itself, opened directly: a one-line error
    with pytest.raises(RunFormatError) as ei:
        open_run(segs[1])
    one_line_naming(ei.value, segs[1])

    # repair sets it aside; then the run reads without the skip warning
    actions = repair_run(path)
    assert any("segment-000001.h5" in a and "unreadable" in a for a in actions), actions
    assert (path / "segment-000001.h5.unreadable").exists()
    run = open_run(path)
    assert not any(w.startswith("skipped") for w in run.warnings)
    np.testing.assert_array_equal(run.steps["step"], want["steps"]["step"][keep])


def test_truncated_only_segment_gives_an_empty_run(tmp_path):
    path = write_run(tmp_path / "run", range(1, 31))
    seg = segments(path)[0]
    with open(seg, "r+b") as fh:
        fh.truncate(seg.stat().st_size // 2)
    run = open_run(path)
    assert len(run.warnings) == 1 and "segment-000000.h5" in run.warnings[0]
    assert len(run.steps["step"]) == 0
    assert run.band["layer_band"].shape == (0, N_LAYERS, K)


def test_truncated_packed_file(tmp_path, python, child_env):
    src = write_run(tmp_path / "run", range(1, 31))
    p = pack_run(src, tmp_path / "p.h5")
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size // 2)
    [res] = open_runs_in_child([p], python, child_env)  # a SWMR open of it would hang
    assert res["error"] == "RunFormatError", res
    with pytest.raises(RunFormatError) as ei:
        open_run(p)
    one_line_naming(ei.value, p)


def test_newer_schema_version_is_a_clear_error(tmp_path):
    path = write_run(tmp_path / "run", range(1, 41), rotate_rows=20)
    segs = segments(path)

    meta_dir = tmp_path / "meta_newer"
    shutil.copytree(path, meta_dir)
    meta = json.loads((meta_dir / fmt.META_FILE).read_text())
    meta["schema_version"] = fmt.SCHEMA_VERSION + 1
    (meta_dir / fmt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SchemaVersionError) as ei:
        open_run(meta_dir)
    assert "upgrade" in one_line_naming(ei.value, meta_dir)

    # a segment newer than meta.json (written by a newer phasewatch on resume)
    seg_dir = tmp_path / "seg_newer"
    shutil.copytree(path, seg_dir)
    with h5py.File(seg_dir / segs[1].name, "r+") as f:
        f.attrs["schema_version"] = fmt.SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError) as ei:
        open_run(seg_dir)
    one_line_naming(ei.value, seg_dir / segs[1].name)
    with pytest.raises(SchemaVersionError) as ei:
        open_run(seg_dir / segs[1].name)  # the segment opened directly
    one_line_naming(ei.value, seg_dir / segs[1].name)

    packed = pack_run(path, tmp_path / "p.h5")
    with h5py.File(packed, "r+") as f:
        f.attrs["schema_version"] = fmt.SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError) as ei:
        open_run(packed)
    one_line_naming(ei.value, packed)


def test_bit_flip_in_a_data_chunk_is_caught_by_fletcher32(tmp_path):
    path = write_run(tmp_path / "run", range(1, 56), rotate_rows=20)
    segs = segments(path)
    assert len(segs) == 3
    flip_byte_in_chunk(segs[1], "steps/loss")
    run = open_run(path)
    bad = [w for w in run.warnings if "segment-000001.h5" in w and "checksum" in w]
    assert len(bad) == 1, run.warnings
    assert "steps" in bad[0] and "loss" in bad[0] and "\n" not in bad[0]
    want = expected([(range(1, 56), 0)])["steps"]
    keep = (want["step"] <= 20) | (want["step"] > 40)
    np.testing.assert_array_equal(run.steps["loss"], want["loss"][keep])

    # repair verifies the checksums and sets the damaged segment aside
    actions = repair_run(path)
    assert any("segment-000001.h5" in a for a in actions), actions
    assert not (path / "segment-000001.h5").exists()
    run = open_run(path)
    assert not any("checksum" in w for w in run.warnings)
    np.testing.assert_array_equal(run.steps["loss"], want["loss"][keep])


def test_bit_flip_in_a_packed_file(tmp_path):
    src = write_run(tmp_path / "run", range(1, 41))
    p = pack_run(src, tmp_path / "p.h5")
    flip_byte_in_chunk(p, f"{fmt.PACKED_SEGMENTS}/000000/band/layer_band")
    try:
        run = open_run(p)
    except PhasewatchError as e:
        msg = one_line_naming(e, p)
    else:
        assert len(run.warnings) == 1
        msg = run.warnings[0]
    assert str(p) in msg and "layer_band" in msg and "checksum" in msg


def test_bit_flip_in_a_wide_table_is_caught_on_access(tmp_path):
    tables = [fmt.steps_table(2, 1), fmt.snapshots_table(50, "float64")]
    path = tmp_path / "run"
    upd = np.random.default_rng(0).standard_normal((10, 50))
    with RunWriter(path, {}, tables) as w:
        w.append("steps", step=np.arange(1, 11), wall_time=np.zeros(10), loss=np.zeros(10),
                 lr=np.zeros((10, 1)), grad_norm=np.zeros(10), layer_grad_norm=np.zeros((10, 2)),
                 update_norm=np.zeros(10), flags=np.zeros(10, "i4"))
        w.append("snapshots", step=np.arange(1, 11), update=upd)
    np.testing.assert_array_equal(open_run(path).table("snapshots")["update"], upd)
    np.testing.assert_array_equal(open_run(path).table("snapshots", steps=[3, 7])["update"], upd[[2, 6]])
    flip_byte_in_chunk(segments(path)[0], "snapshots/update", offset_in_chunk=100)
    run = open_run(path)  # only the step column of wide tables is read up front
    np.testing.assert_array_equal(run.heavy_steps("snapshots"), np.arange(1, 11))
    with pytest.raises(RunFormatError) as ei:
        run.table("snapshots")
    msg = one_line_naming(ei.value, segments(path)[0])
    assert "snapshots" in msg and "update" in msg and "checksum" in msg


def _add_external_link(f: h5py.File, group: str, target: Path) -> None:
    with h5py.File(target, "w") as t:
        t["data"] = np.arange(10, dtype="i8")
    f[group]["stolen"] = h5py.ExternalLink(str(target), "/data")


def _add_virtual_dataset(f: h5py.File, group: str, target: Path) -> None:
    with h5py.File(target, "w") as t:
        t["data"] = np.arange(10, dtype="f8")
    layout = h5py.VirtualLayout(shape=(10,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(target), "data", shape=(10,))
    f[group].create_virtual_dataset("virt", layout)


@pytest.mark.parametrize("add", [_add_external_link, _add_virtual_dataset], ids=["external-link", "virtual"])
@pytest.mark.parametrize("where", ["segment", "packed"])
def test_external_links_and_virtual_datasets_are_refused(tmp_path, add, where):
    src = write_run(tmp_path / "run", range(1, 21))
    if where == "segment":
        target, group = segments(src)[0], "band"
    else:
        target, group = pack_run(src, tmp_path / "p.h5"), f"{fmt.PACKED_SEGMENTS}/000000/band"
    with h5py.File(target, "r+") as f:
        add(f, group, tmp_path / "outside.h5")
    opened = src if where == "segment" else target
    with pytest.raises(RunFormatError) as ei:
        open_run(opened)
    msg = one_line_naming(ei.value, target)
    assert "refuse" in msg


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path[:0] = [sys.argv[2]]
    from test_store import make_tables, write_steps
    from phasewatch.store import RunWriter
    w = RunWriter(sys.argv[1], {}, make_tables(), block_rows=8, flush_seconds=1e9, rotate_rows=30)
    write_steps(w, range(1, 41), batch=4)
    w.flush()                               # steps 1..40 committed
    write_steps(w, range(41, 45), batch=4)  # buffered only: lost with the process
    f = w._file
    # rows beyond committed_rows, as a kill between the data write and the count leaves them
    for t in ("steps", "band"):
        for name, ds in f[t].items():
            if name != "committed_rows":
                ds.resize(ds.shape[0] + 5, axis=0)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_repair_a_segment_left_open_by_a_killed_writer(tmp_path, python, child_env):
    path = tmp_path / "run"
    proc = subprocess.run([python, "-c", _KILLED_WRITER, str(path), str(Path(__file__).parent)],
                          env=child_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    segs = segments(path)
    assert len(segs) == 2  # rotation after >= 30 committed steps rows
    with pytest.raises(OSError):
        h5py.File(segs[1], "r").close()  # the killed writer's flag stops plain readers
    with h5py.File(segs[1], "r", swmr=True) as f:
        assert f["steps/step"].shape[0] > int(f["steps/committed_rows"][0])

    want = expected([(range(1, 41), 0)])
    before = open_run(path)
    assert before.warnings == []
    assert_tables(before, want)

    actions = repair_run(path)
    assert any(a.startswith("segment-000001.h5: rewritten") for a in actions), actions
    assert (path / "segment-000001.h5.orig").exists()
    for s in segments(path):
        with h5py.File(s, "r") as f:  # a plain open works now
            for t in ("steps", "band", "metrics"):
                c = int(f[t][fmt.COMMITTED][0])
                assert all(f[t][d].shape[0] == c for d in f[t] if d != fmt.COMMITTED)
                assert f[t]["step"].fletcher32
    after = open_run(path)
    assert after.warnings == []
    assert_tables(after, want)
    assert after.meta == before.meta
    assert repair_run(path) == ["nothing to repair: every segment is clean"]


def test_truncated_segment_of_a_killed_writer_fails_fast(tmp_path, python, child_env):
    """A segment still flagged open by a killed writer is read in SWMR mode, where HDF5 retries a
    failed metadata read with an exponentially growing sleep: a truncated one must not hang."""
    path = tmp_path / "run"
    proc = subprocess.run([python, "-c", _KILLED_WRITER, str(path), str(Path(__file__).parent)],
                          env=child_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    last0 = open_run(path).segments[0].last_step
    copies = []
    for frac in (0.1, 0.5, 0.9):  # cut through metadata or through data
        d = tmp_path / f"cut{frac}"
        shutil.copytree(path, d)
        seg = segments(d)[1]
        with open(seg, "r+b") as fh:
            fh.truncate(int(seg.stat().st_size * frac))
        copies.append(d)
    for res in open_runs_in_child(copies, python, child_env):
        assert res["rows"] == last0 and len(res["warnings"]) == 1, res  # segment 0 is intact
        assert res["warnings"][0].startswith("skipped segment-000001.h5"), res
    run = open_run(copies[0])
    assert "\n" not in run.warnings[0]
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, last0 + 1))
    actions = repair_run(copies[0])
    assert any("segment-000001.h5" in a and "unreadable" in a for a in actions), actions


def test_no_half_made_segments(tmp_path):
    """Segments are made under a temporary name: none is left behind, and a stale one (a crash
    while a segment was being made) is ignored by readers and by a resuming writer."""
    path = write_run(tmp_path / "run", range(1, 36), rotate_rows=10)
    assert not [p for p in path.iterdir() if p.suffix not in (".h5", ".json")]
    (path / "segment-000009.h5.new").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    run = open_run(path)
    assert run.warnings == [] and len(run.segments) == 4
    write_run(path, range(36, 41), resume=True)
    run = open_run(path)
    assert run.warnings == []
    np.testing.assert_array_equal(run.steps["step"], np.arange(1, 41))


def _wide_run(path: Path, steps, dim: int, salt: float = 0.0, resume: bool = False) -> np.ndarray:
    """A run with a `steps` table and snapshot rows of ``dim`` float64 values (one row per chunk
    when a row is wider than ~256 KiB)."""
    steps = np.asarray(steps, dtype="i8")
    n = len(steps)
    upd = steps[:, None] + np.arange(dim)[None, :] / dim + salt
    with RunWriter(path, {}, [fmt.steps_table(1, 1), fmt.snapshots_table(dim, "float64")],
                   resume=resume, block_rows=4, flush_seconds=1e9) as w:
        w.append("steps", step=steps, wall_time=np.zeros(n), loss=np.zeros(n), lr=np.zeros((n, 1)),
                 grad_norm=np.zeros(n), layer_grad_norm=np.zeros((n, 1)), update_norm=np.zeros(n),
                 flags=np.zeros(n, "i4"))
        w.append("snapshots", step=steps, update=upd)
    return upd


def test_wide_rows_are_read_only_when_asked_for(tmp_path):
    path = tmp_path / "run"
    dim = 40_000  # 320 kB a row: one row per chunk
    upd = _wide_run(path, range(1, 13), dim)
    seg = segments(path)[0]
    with h5py.File(seg, "r") as f:
        assert f["snapshots/update"].chunks == (1, dim)
    flip_byte_in_chunk(seg, "snapshots/update", index=6, offset_in_chunk=1000)  # the row of step 7
    run = open_run(path)
    assert run.warnings == []
    got = run.table("snapshots", steps=[3, 11])  # reads rows 3 and 11 only: no checksum error
    np.testing.assert_array_equal(got["step"], [3, 11])
    np.testing.assert_array_equal(got["update"], upd[[2, 10]])
    assert run.table("snapshots", steps=[99])["update"].shape == (0, dim)
    with pytest.raises(RunFormatError) as ei:
        run.table("snapshots", steps=[7])
    assert "checksum" in one_line_naming(ei.value, seg)

    # pack keeps wide rows in row-sized chunks, so a packed run reads one row without the others
    clean = tmp_path / "clean"
    _wide_run(clean, range(1, 13), dim)
    packed = pack_run(clean, tmp_path / "p.h5")
    with h5py.File(packed, "r") as f:
        assert f[f"{fmt.PACKED_SEGMENTS}/000000/snapshots/update"].chunks == (1, dim)
    np.testing.assert_array_equal(open_run(packed).table("snapshots", steps=[12])["update"], upd[[11]])


def test_wide_rows_after_an_overlapping_resume(tmp_path):
    path = tmp_path / "run"
    first = _wide_run(path, range(1, 11), 8)
    second = _wide_run(path, range(6, 16), 8, salt=0.5, resume=True)
    run = open_run(path)
    assert len([w for w in run.warnings if "overlap of 5 steps" in w]) == 1
    np.testing.assert_array_equal(run.heavy_steps("snapshots"), np.arange(1, 16))
    snap = run.table("snapshots")
    np.testing.assert_array_equal(snap["step"], np.arange(1, 16))
    np.testing.assert_array_equal(snap["update"], np.concatenate([first[:5], second]))
    np.testing.assert_array_equal(run.table("snapshots", steps=[5, 6])["update"], [first[4], second[0]])


def test_torn_chunk_of_a_live_segment_is_reread(tmp_path, python, child_env):
    """A writer rewrites the chunk holding its newest rows in place, so a reader of a segment a
    writer has open may see a torn chunk whose checksum fails for a moment: it must read again
    rather than skip the segment.  A chunk that stays damaged is still reported."""
    path = tmp_path / "run"
    proc = subprocess.run([python, "-c", _KILLED_WRITER, str(path), str(Path(__file__).parent)],
                          env=child_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    want = expected([(range(1, 41), 0)])
    stays, heals = tmp_path / "stays", tmp_path / "heals"
    shutil.copytree(path, stays)
    shutil.copytree(path, heals)

    flip_byte_in_chunk(stays / "segment-000001.h5", "band/band")
    run = open_run(stays)
    assert len(run.warnings) == 1 and "segment-000001.h5" in run.warnings[0], run.warnings
    assert "band/band" in run.warnings[0] and "checksum" in run.warnings[0]

    seg = heals / "segment-000001.h5"
    flip_byte_in_chunk(seg, "band/band")  # band/band is the first dataset the reader reads
    healer = threading.Timer(0.03, flip_byte_in_chunk, (seg, "band/band"))  # the write completes
    healer.start()
    try:
        run = open_run(heals)
    finally:
        healer.join()
    assert run.warnings == []
    assert_tables(run, want)


def test_file_whose_metadata_hangs_hdf5_is_refused(tmp_path, monkeypatch):
    """Found by tests/fuzz/fuzz_reader.py: zeroing bytes 4341-4625 of the packed sample makes HDF5
    2.0 loop forever reading the root attribute; the reader refuses it after a time limit."""
    import time

    sample = Path(__file__).resolve().parents[2] / "data" / "grokking-p71.h5"
    data = bytearray(sample.read_bytes())
    data[4341:4626] = bytes(4626 - 4341)
    bad = tmp_path / "damaged.h5"
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("PHASEWATCH_OPEN_TIMEOUT", "8")
    t0 = time.monotonic()
    try:
        open_run(bad)
    except RunFormatError as e:
        msg = str(e)
    else:  # an HDF5 build that reads it fine (or fails fast) is also acceptable
        msg = None
    assert time.monotonic() - t0 < 8 + 60  # the limit, plus a loaded machine's slack: not a hang
    if msg is not None:
        assert "\n" not in msg and "damaged.h5" in msg
    # an intact file passes the check
    assert open_run(sample).steps["step"].size == 300
