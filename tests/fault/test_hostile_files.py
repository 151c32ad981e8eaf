"""Hostile and damaged files beyond what ``tests/store/test_store.py`` covers: enormous declared sizes
(no allocation bomb), counts that are not counts, foreign filters and dtypes, hard-link cycles,
absurdly nested metadata.  Every file is read in a child with a limited address space (a bomb
would be a MemoryError there, a hang a timeout): in a run directory the damaged segment is
skipped with a one-line warning naming it and the problem; a packed file is a one-line error.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from faultkit import ReaderWorker, small_run

from phasewatch.store import pack_run


@pytest.fixture(scope="module")
def worker():
    w = ReaderWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("hostile") / "clean", rotate_rows=16)  # 3 segments


def _resize_table(g, table, n, count=True):
    for c in g[table]:
        if c != "committed_rows":
            g[table][c].resize(n, axis=0)  # a declared size: nothing is written or allocated
    if count:
        g[table]["committed_rows"][0] = n


def _count_dataset(g):
    del g["steps/committed_rows"]
    g["steps"].create_dataset("committed_rows", shape=(10**12,), maxshape=(None,), chunks=(1024,), dtype="i8")


def _replace(g, name, **kw):
    n = g[name].shape[0]
    data = kw.pop("data", None)
    del g[name]
    g.create_dataset(name, data=data if data is not None else np.zeros(n), maxshape=(None,), chunks=(8,), **kw)


CASES = {
    "10^12 rows declared and counted": (lambda g: _resize_table(g, "steps", 10**12), "cannot fit in a file"),
    "10^12 rows counted, 16 stored": (lambda g: g["steps/committed_rows"].__setitem__(0, 10**12), "cannot fit in a file"),
    "wide table, 10^9 rows declared": (lambda g: _resize_table(g, "snapshots", 10**9), "cannot fit in a file"),
    "500k rows declared, 16 stored": (lambda g: _resize_table(g, "steps", 500_000), "declares 500,000 rows"),
    "count of 10^12 elements": (_count_dataset, "not a one-element integer count"),
    "negative count": (lambda g: g["band/committed_rows"].__setitem__(0, -5), "negative count"),
    "lzf filter": (lambda g: _replace(g, "steps/loss", compression="lzf"), "filter"),
    "variable-length strings": (lambda g: _replace(g, "steps/loss", data=np.array(["x"] * 16, dtype=object),
                                                   dtype=h5py.string_dtype()), "unsupported dtype"),
    "hard-link cycle": (lambda g: g["band"].__setitem__("loop", g["band"]), "hard-link cycle"),
}


@pytest.mark.parametrize("packed", [False, True], ids=["directory", "packed"])
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_segment(case, packed, clean, worker, tmp_path):
    mutate, phrase = CASES[case]
    d = tmp_path / "run"
    shutil.copytree(clean, d)
    target = pack_run(d, tmp_path / "p.h5") if packed else sorted(d.glob("segment-*.h5"))[1]
    with h5py.File(target, "r+") as f:
        mutate(f["segments/000000"] if packed else f)
    res = worker.read(tmp_path / "p.h5" if packed else d)
    assert res["maxrss_kb"] < 400_000, res  # nothing was allocated for the declared sizes
    if packed:
        assert res["status"] == "error" and res["type"] == "RunFormatError", res
        msg = res["message"]
    else:
        assert res["status"] == "ok", res
        assert res["rows"]["steps"] == 24  # segments 0 and 2 read; 1 skipped
        skipped = [w for w in res["warnings"] if w.startswith("skipped")]
        assert len(skipped) == 1 and "segment-000001.h5" in skipped[0], res["warnings"]
        msg = skipped[0]
    assert phrase in msg and str(target) in msg and "\n" not in msg, msg


def test_absurdly_nested_metadata(clean, worker, tmp_path):
    """json.loads raises RecursionError on deep nesting: a one-line error, and in a directory
    the segments' own copy of the metadata is used instead."""
    deep = "[" * 200_000 + "]" * 200_000
    d = tmp_path / "run"
    shutil.copytree(clean, d)
    packed = pack_run(d, tmp_path / "p.h5")
    with h5py.File(packed, "r+") as f:
        f.attrs["meta_json"] = deep
    res = worker.read(packed)
    assert res["status"] == "error" and "unreadable metadata" in res["message"], res
    assert "\n" not in res["message"] and str(packed) in res["message"]

    (d / "meta.json").write_text(deep)
    res = worker.read(d)
    assert res["status"] == "ok" and res["rows"]["steps"] == 40 and res["warnings"] == [], res
