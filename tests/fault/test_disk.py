"""Faults of the disk while recording, produced for real in child processes that train a small
model with a real Recorder: a full file system (a small tmpfs in a user+mount namespace), a
file-size limit (RLIMIT_FSIZE: writes fail with EFBIG inside HDF5), and a directory that is or
turns read-only.  Each time: training finishes, the recorder says so once and stops, every step
a reader had seen before the fault is still there with its exact loss, and the run resumes
afterwards.  The three children run side by side (started once for the module).
"""

from __future__ import annotations

import os

import pytest
from faultkit import (
    assert_clean_exit,
    check_faulted_run,
    child_env_for,
    disabled_lines,
    finish_child,
    start_child,
    userns_works,
    write_child,
)

STEPS, MORE = 300, 20


def _unprivileged() -> list[str] | None:
    """A prefix under which directory permissions apply (root ignores them): a user namespace
    without a uid mapping, or nothing for a non-root user."""
    if os.geteuid() != 0:
        return []
    return ["unshare", "--user"] if userns_works(map_root=False) else None


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Start the children once: a file-size limit then a read-only directory in one (under a user
    namespace when root, so that permissions apply), a full tmpfs in another (in a user+mount
    namespace, to mount it without root)."""
    base = tmp_path_factory.mktemp("disk")
    script = write_child(base)
    env = child_env_for()
    started = {}
    if userns_works(map_root=True):
        # A 24 MiB tmpfs filled up to 6 MiB; the recorder keeps 4 MiB free.  The run is copied
        # out before the namespace (and its mount) goes away.
        mnt = base / "mnt"
        mnt.mkdir()
        prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                  'mount -t tmpfs -o size=24m none "$0" && exec "$@"', str(mnt)]
        cfg = dict(name="enospc", fault="enospc", path=str(mnt / "run"), out=str(base / "enospc"),
                   leave=6 << 20, steps=STEPS, more=MORE, watch=10,
                   rec=dict(snapshot_every=1, min_free_bytes=4 << 20))  # ~10 kB of snapshot a step
        started["enospc"] = (start_child(script, [cfg], env, prefix), {"enospc": cfg})
    scen = [dict(name="efbig", fault="efbig", path=str(base / "efbig"), limit=1_500_000, steps=STEPS,
                 more=MORE, watch=10, rec=dict(snapshot_every=1, min_free_bytes=0))]
    prefix = _unprivileged()
    if prefix is not None:
        scen.append(dict(name="readonly", fault="readonly", path=str(base / "readonly"), ro_after=100,
                         steps=STEPS, more=MORE, rec=dict(rotate_rows=64)))
    popen = start_child(script, scen, env, prefix or [])
    for c in scen:
        started[c["name"]] = (popen, {c["name"]: c for c in scen})
    yield started
    for popen, _ in started.values():
        if popen.poll() is None:
            popen.kill()
            popen.wait()


_done: dict = {}


def _result(children, name):
    if name not in children:
        pytest.skip({"enospc": "no user+mount namespace here (to mount a small tmpfs without root)",
                     "readonly": "root without user namespaces: permissions cannot be enforced"}[name])
    popen, cfgs = children[name]
    if popen not in _done:
        _done[popen] = finish_child(popen)
    proc, records, logs = _done[popen]
    assert_clean_exit(proc)
    return cfgs[name], records[name], logs.get(name, [])


def test_disk_full_stops_recording_keeps_committed_steps_and_resumes(children):
    """It must stop cleanly before the file system is full, with training going on."""
    cfg, (p1, p2), logs = _result(children, "enospc")
    assert len(p1["losses"]) == STEPS and not p1["enabled"] and p2["enabled"]
    [line] = disabled_lines(logs)
    assert "disk nearly full" in line and "resume" in line
    run, n1 = check_faulted_run(cfg["out"], p1, p2)
    assert n1 >= 50  # it did record until the disk was nearly full
    assert list(run.heavy_steps("snapshots")[:n1]) == list(range(1, n1 + 1))


def test_file_size_limit_fails_inside_hdf5_without_crashing(children):
    """RLIMIT_FSIZE makes HDF5's own write fail (EFBIG), past the free-space check: the error path
    of HDF5 itself (in HDF5 2.0 a failed write then a flush or close can crash the process, or
    leave a file that reads as truncated)."""
    cfg, (p1, p2), logs = _result(children, "efbig")
    assert len(p1["losses"]) == STEPS and not p1["enabled"] and p2["enabled"]
    [line] = disabled_lines(logs)
    assert "File too large" in line, line
    run, n1 = check_faulted_run(cfg["path"], p1, p2)
    assert n1 >= 40


def test_directory_read_only_at_start_then_turning_read_only_mid_run(children):
    """At start: a one-line error before any training.  Mid-run (chmod a-w at step 100): the open
    segment goes on, the next rotation (after 64 more steps rows) cannot create a file;
    everything up to the rotation is kept."""
    cfg, (p0, p1, p2), logs = _result(children, "readonly")
    assert p0["error"] == "RunWriteError" and "\n" not in p0["message"]
    assert cfg["path"] + "-ro" in p0["message"] and "Permission denied" in p0["message"]
    assert os.listdir(cfg["path"] + "-ro") == []  # nothing was left behind

    assert not p1["enabled"] and p2["enabled"]
    [line] = disabled_lines(logs)
    assert "Permission denied" in line and "segment-000002.h5" in line, line
    run, n1 = check_faulted_run(cfg["path"], p1, p2)
    assert n1 >= 128
    assert [s.rows["steps"] >= 64 for s in run.segments[:2]] == [True, True]
    assert run.segments[0].last_step + 1 == run.segments[1].first_step
    assert run.segments[1].last_step == n1 and run.segments[2].first_step == STEPS + 1
    assert sorted(os.listdir(cfg["path"])) == [  # no half-made segment, no lock left behind
        "meta.json", "segment-000000.h5", "segment-000001.h5", "segment-000002.h5"]


def test_fsync_policies(tmp_path, monkeypatch):
    """The three policies write the same run; what differs is when the data is forced to disk:
    counted with a spy on the real os.fsync (every call still goes through)."""
    import numpy as np
    from faultkit import small_run

    from phasewatch import open_run
    from phasewatch.store import writer as writer_mod

    calls = []
    real = writer_mod.os.fsync
    monkeypatch.setattr(writer_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    counts, runs = {}, {}
    for policy in writer_mod.FSYNC_POLICIES:
        calls.clear()
        monkeypatch.setattr(writer_mod.RunWriter.__init__, "__kwdefaults__",
                            {**writer_mod.RunWriter.__init__.__kwdefaults__, "fsync": policy})
        runs[policy] = open_run(small_run(tmp_path / policy, steps=40, rotate_rows=16))
        counts[policy] = len(calls)
    # 40 steps in blocks of 8 rows of 4 tables: 20 flushes, 3 segments (rotation every 16 steps rows)
    assert counts["never"] == 1  # meta.json's temporary file only
    assert counts["segment"] == 1 + 1 + 3 + 3  # + its directory entry; each segment: directory, file
    assert counts["flush"] == counts["segment"] + 2 * 20  # data, then the count that vouches for it
    for t in ("steps", "band", "snapshots"):
        for c, v in runs["never"].table(t).items():
            for p in ("segment", "flush"):
                np.testing.assert_array_equal(runs[p].table(t)[c], v)
    with pytest.raises(writer_mod.RunFormatError, match="fsync"):
        writer_mod.RunWriter(tmp_path / "bad", {}, [], fsync="always")
