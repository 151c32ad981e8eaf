"""Fuzz the reader with hypothesis-generated corruptions, in CI: byte-level damage (bit flips,
zeroed or random runs, truncation) biased towards the HDF5 metadata at both ends of the file, of a
packed run, a closed segment, a segment still flagged open by its writer and the shipped sample;
and structural damage made with h5py (counts, declared sizes, attributes of every type, deleted
or retyped columns, metadata JSON).  Each file is read (every table, the summary) in a child
process (faultkit.ReaderWorker): only the project's own errors, one-line messages, no hang, no
crash of the interpreter, no allocation bomb.

A bounded number of examples (``PHASEWATCH_FUZZ_EXAMPLES``, default 60 per test), derandomized
so that CI is reproducible; set ``PHASEWATCH_FUZZ_RANDOM=1`` to explore new ones.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from faultkit import ReaderWorker, small_run
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from phasewatch.store import RunWriter, pack_run
from phasewatch.store import format as fmt

EXAMPLES = int(os.environ.get("PHASEWATCH_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=os.environ.get("PHASEWATCH_FUZZ_RANDOM") != "1",
                phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its case
                suppress_health_check=list(HealthCheck))
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "grokking-p71.h5"


class _Sources(tuple):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "<fuzz sources>"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (kind, bytes): the files corrupted below, and a scratch directory."""
    base = tmp_path_factory.mktemp("fuzz")
    clean = small_run(base / "clean", rotate_rows=16)
    packed = pack_run(clean, base / "clean.h5", gzip=4)
    # a segment copied while its writer has it open: the SWMR-written, "killed writer" state
    live = RunWriter(base / "live", {}, [fmt.steps_table(2, 1), fmt.band_table(2, 6)], block_rows=8,
                     flush_seconds=1e9)
    s = np.arange(1, 25)
    live.append("steps", step=s, wall_time=s * 1.0, loss=1.0 / s, lr=np.ones((24, 1)), grad_norm=np.ones(24),
                layer_grad_norm=np.ones((24, 2)), update_norm=np.ones(24), flags=np.zeros(24, "i4"))
    live.append("band", step=s, lr=np.ones(24), band=np.ones((24, 6)), layer_band=np.full((24, 2, 6), 0.5))
    live.flush()
    flagged = (base / "live" / "segment-000000.h5").read_bytes()
    live.close()
    out = {
        "packed": ("file", packed.read_bytes()),
        "segment": ("dir", sorted(clean.glob("segment-*.h5"))[1].read_bytes()),
        "flagged": ("dir", flagged),
        "sample": ("file", SAMPLE.read_bytes()),
    }
    return _Sources((out, (clean / fmt.META_FILE).read_text(), clean, packed, base))


@pytest.fixture(scope="module")
def worker():
    env = dict(os.environ)
    env.setdefault("PHASEWATCH_FUZZ_OPEN_TIMEOUT", "0.5")  # the guard's limit in the child (a refusal is fine)
    w = ReaderWorker(env, timeout=60.0)
    yield w
    w.close()


def check(res: dict, target: Path) -> None:
    note(json.dumps({k: v for k, v in res.items() if k != "traceback"})[:2000])
    assert res["status"] in ("ok", "error"), res.get("traceback") or res
    if res["status"] == "error":
        assert "\n" not in res["message"], res["message"]
        assert str(target) in res["message"], res["message"]
    else:
        assert all("\n" not in w for w in res["warnings"]), res["warnings"]
    assert res["maxrss_kb"] < 500_000, res


def _place(data: bytes, kind: str, meta: str, scratch: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=scratch))
    if kind == "file":
        target = d / "run.h5"
        target.write_bytes(data)
        return target
    (d / fmt.META_FILE).write_text(meta)
    (d / "segment-000000.h5").write_bytes(data)
    return d


@FUZZ
@given(data=st.data())
def test_byte_level_corruption(sources, worker, data):
    files, meta, _, _, scratch = sources
    name = data.draw(st.sampled_from(sorted(files)), "source")
    kind, blob = files[name]
    b = bytearray(blob)
    n = len(b)
    region = data.draw(st.sampled_from(["head", "tail", "anywhere"]), "region")
    span = {"head": min(n, 4096), "tail": min(n, 8192), "anywhere": n}[region]
    off = data.draw(st.integers(0, span - 1), "offset")
    pos = off if region != "tail" else n - 1 - off
    how = data.draw(st.sampled_from(["flip", "zero", "random", "truncate"]), "how")
    if how == "flip":
        for j, bit in data.draw(st.lists(st.tuples(st.integers(-32, 32), st.integers(0, 7)), min_size=1,
                                         max_size=4), "flips"):
            k = min(n - 1, max(0, pos + j))
            b[k] ^= 1 << bit
    elif how == "zero":
        end = min(n, pos + data.draw(st.integers(1, 512), "length"))
        b[pos:end] = bytes(end - pos)
    elif how == "random":
        payload = data.draw(st.binary(min_size=1, max_size=64), "payload")
        b[pos: pos + len(payload)] = payload[: n - pos]
    else:
        del b[pos:]
    target = _place(bytes(b), kind, meta, scratch)
    try:
        check(worker.read(target), target)
    finally:
        shutil.rmtree(target if target.is_dir() else target.parent)


_ATTR_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(-5, 5), min_size=0, max_size=4),
    st.sampled_from([fmt.FORMAT_NAME, fmt.PACKED_FORMAT_NAME, "{}", "[]", "null", '{"tables": 7}']),
)


def _attr(value):
    return np.array(value, dtype="i8") if isinstance(value, list) else value


@FUZZ
@given(data=st.data())
def test_structural_damage(sources, worker, data):
    _, meta, clean, packed, scratch = sources
    where = data.draw(st.sampled_from(["directory", "packed"]), "where")
    d = Path(tempfile.mkdtemp(dir=scratch))
    if where == "directory":
        shutil.copytree(clean, d / "run")
        target = d / "run"
        file = sorted(target.glob("segment-*.h5"))[data.draw(st.integers(0, 2), "segment")]
    else:
        target = file = d / "run.h5"
        shutil.copyfile(packed, file)
    table = data.draw(st.sampled_from(["steps", "band", "metrics", "snapshots"]), "table")
    op = data.draw(st.sampled_from(["count", "resize", "attribute", "delete", "retype", "meta"]), "op")
    try:
        with h5py.File(file, "r+") as f:
            g = f[f"{fmt.PACKED_SEGMENTS}/000000"] if where == "packed" else f
            cols = [c for c in g[table] if c != fmt.COMMITTED]
            if op == "count":
                g[table][fmt.COMMITTED][0] = data.draw(
                    st.one_of(st.integers(-5, 100), st.integers(-(2**63), 2**63 - 1)), "count")
            elif op == "resize":
                n = data.draw(st.one_of(st.integers(0, 100), st.integers(0, 2**40)), "rows")
                for c in data.draw(st.lists(st.sampled_from(cols), min_size=1, unique=True), "columns"):
                    g[table][c].resize(n, axis=0)
                if data.draw(st.booleans(), "count too"):
                    g[table][fmt.COMMITTED][0] = n
            elif op == "attribute":
                holder = data.draw(st.sampled_from(["file", "table"]), "holder")
                obj = f if holder == "file" else g[table]
                name = data.draw(st.sampled_from(["format", "schema_version", "meta_json", "segment"]), "name")
                obj.attrs[name] = _attr(data.draw(_ATTR_VALUES, "value"))
            elif op == "delete":
                victim = data.draw(st.sampled_from([*cols, fmt.COMMITTED, None]), "victim")
                if victim is None:
                    del g[table]
                else:
                    del g[table][victim]
            elif op == "retype":
                c = data.draw(st.sampled_from(cols), "column")
                dtype = data.draw(st.sampled_from(["f4", "i1", "u8", "S3", "f8", "c16"]), "dtype")
                shape = g[table][c].shape
                del g[table][c]
                if data.draw(st.booleans(), "wrong row shape"):
                    shape = (shape[0], 3)
                g[table].create_dataset(c, shape=shape, maxshape=(None, *shape[1:]), dtype=dtype,
                                        chunks=(4, *shape[1:]))
            else:
                m = json.loads(meta if where == "directory" else f.attrs["meta_json"])
                spec = m["tables"][table]
                c = data.draw(st.sampled_from(sorted(spec)), "column")
                spec[c] = data.draw(st.sampled_from([["f8", [10**9]], ["S64", []], ["O", []], "x", [1],
                                                     ["f8", "x"], None]), "spec")
                text = json.dumps(m)
                if where == "directory":
                    (target / fmt.META_FILE).write_text(text)
                else:
                    f.attrs["meta_json"] = text
        check(worker.read(target), target)
    finally:
        shutil.rmtree(d)
