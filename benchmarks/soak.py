#!/usr/bin/env python
"""Soak: record thousands of steps under random kills, resume every time, check what survives.

    .venv/bin/python benchmarks/soak.py                     # ~3 minutes
    .venv/bin/python benchmarks/soak.py --minutes 20 --seed 7
    .venv/bin/python benchmarks/soak.py --fsync-cost        # what each fsync policy costs

Each *run* is a run directory recorded by a sequence of *sessions*: a child process trains a small
MLP with a real ``phasewatch.Recorder`` (resuming the run from the second session on) and is
killed at a random moment: SIGKILL (50%), SIGTERM (30%, what schedulers send) or SIGINT (20%,
Ctrl-C), usually while training (after a random 0.05-2 s), sometimes while it is still building
the recorder (segment, lock and meta.json being written).  The last session of a run ends
normally.  The recorder's configuration is drawn per run (flush every 4-64 rows, rotation every
40-400 steps, fsync policy), so kills land anywhere: inside a block write, between a block and
its count, inside a rotation, inside the SIGTERM handler's own flush.

The child tells the parent, through a small memory-mapped file, the last step it took and the last
step up to which ``rec.flush()`` had returned (every few steps, at random).  After every session
the parent opens the run (this process never imports torch) and checks:

  - it opens, no segment is skipped (else: an *unreadable run*);
  - steps are exactly 1..n, band rows are consistent (finite exactly where the lag stays within a
    session, global band = sum of the layer bands, Cauchy-Schwarz), else an *inconsistent run*;
  - steps lost beyond the last flush: max(0, last flushed step - n), whatever the signal: must
    be 0;
  - buffered steps not written: after SIGTERM or SIGINT (the recorder's handler, or the exit
    handler after KeyboardInterrupt, writes what is buffered) and after a normal end,
    max(0, last step taken - n) beyond the above: must be 0 too;
  - the child died of the signal sent (the default action was re-raised), a finished one exits 0.

At the end of each run, ``pack_run`` and ``repair_run`` (on a copy) must give the same steps.
The report: runs tried, sessions, faults injected (by kind), steps recorded, steps lost beyond
the last flush, buffered steps not written, unreadable runs, inconsistent runs, and the slowest
resume.  Exit status 1 if any of the must-be-zero counts is not zero.

``--fsync-cost`` instead measures, in this process, the time the writer spends per flush (and per
closed segment) under each fsync policy, flushing every 256 rows (the default) and every 16, on
the file system of --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from phasewatch import open_run, pack_run, repair_run  # noqa: E402
from phasewatch.errors import PhasewatchError  # noqa: E402

K = 8

CHILD = f"""
import faulthandler, json, mmap, signal, struct, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for a stack dump on a hang
cfg = json.loads(sys.argv[1])
fh = open(cfg["progress"], "r+b")
mm = mmap.mmap(fh.fileno(), 16)
print("importing", flush=True)
import torch
import phasewatch
torch.set_num_threads(1)
torch.manual_seed(cfg["seed"])
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
x, y = torch.randn(256, 32), torch.randn(256, 8)
print("constructing", flush=True)
rec = phasewatch.Recorder(cfg["path"], model, opt, k={K}, block=4, flush_rows=cfg["flush_rows"],
                          flush_seconds=cfg["flush_seconds"], rotate_rows=cfg["rotate_rows"],
                          fsync=cfg["fsync"], resume=cfg["resume"], strict=True)
mm[0:16] = struct.pack("<qq", rec.step, rec.step)
print("ready", rec.step, flush=True)
for i in range(cfg["steps"]):
    idx = torch.randint(0, 256, (32,))
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    rec.loss(loss)
    mm[0:8] = struct.pack("<q", rec.step)  # the last step taken
    if rec.step % cfg["flush_every"] == 0:
        rec.flush()
        mm[8:16] = struct.pack("<q", rec.step)  # every step up to here is committed
rec.close()
mm[8:16] = struct.pack("<q", rec.step)
print("done", rec.step, flush=True)
"""


def check_band(band: dict, starts: list[int], n: int) -> str | None:
    """Band rows of a run with ``n`` steps rows whose sessions started at ``starts``.  Rows beyond
    the last steps row (committed by a killed session ahead of its steps rows; dropped by the
    reader once a resumed session writes) are checked except for their session boundary."""
    st, b, lb = band["step"], band["band"], band["layer_band"]
    if len(st) == 0:
        return None
    if np.any(np.diff(st) <= 0):
        return "band steps do not increase"
    start = np.array([max(s for s in starts if s <= t) for t in st], dtype="i8")
    valid = np.arange(b.shape[1])[None, :] <= (st - start)[:, None]
    wrong = (np.isfinite(b) != valid) & (st <= n)[:, None]
    if wrong.any():
        i, j = np.argwhere(wrong)[0]
        return (f"band NaN pattern does not match the sessions (sessions start at {starts}; step "
                f"{st[i]}, lag {j}: {'NaN' if np.isnan(b[i, j]) else 'finite'}, {int(wrong.sum())} entries)")
    if not np.allclose(b, lb.sum(axis=1), rtol=1e-12, atol=1e-300, equal_nan=True):
        return "global band != sum of layer bands"
    for j in range(1, b.shape[1]):
        rows = np.nonzero(valid[j:, j] & (st[j:] - st[:-j] == j))[0] + j
        if not (np.abs(b[rows, j]) <= np.sqrt(b[rows, 0] * b[rows - j, 0]) * (1 + 1e-9)).all():
            return f"Cauchy-Schwarz fails at lag {j}"
    return None


def check_run(path: Path, starts: list[int]) -> tuple[int, str | None, str | None]:
    """(steps, unreadable reason, inconsistency)"""
    try:
        run = open_run(path)
    except PhasewatchError as e:
        return 0, str(e), None
    skipped = [w for w in run.warnings if w.startswith("skipped")]
    if skipped:
        return 0, skipped[0], None
    st = run.steps["step"]
    n = len(st)
    if not np.array_equal(st, np.arange(1, n + 1)):
        return n, None, f"steps are not 1..{n}"
    if {len(v) for v in run.steps.values()} != {n}:
        return n, None, "columns of different lengths"
    return n, None, check_band(run.band, starts, n)


def soak(args) -> int:
    rng = random.Random(args.seed)
    root = Path(args.dir or tempfile.mkdtemp(prefix="phasewatch-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    script = root / "child.py"
    script.write_text(CHILD)
    progress = root / "progress"
    progress.write_bytes(bytes(16))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    c = dict(runs=0, sessions=0, sigkill=0, sigterm=0, sigint=0, during_startup=0, finished=0, steps=0,
             lost_beyond_last_flush=0, unwritten_sigterm=0, unwritten_sigint=0, unwritten_finished=0,
             unreadable_runs=0, inconsistent_runs=0, bad_exit=0,
             child_errors=0)
    problems: list[str] = []
    slowest_resume = 0.0
    deadline = time.monotonic() + 60 * args.minutes
    while time.monotonic() < deadline and (args.runs is None or c["runs"] < args.runs):
        c["runs"] += 1
        path = root / f"run{c['runs']:03d}"
        conf = dict(flush_rows=rng.choice([4, 8, 16, 64]), flush_seconds=rng.choice([0.05, 0.5, 5.0]),
                    rotate_rows=rng.choice([40, 100, 400]), fsync=rng.choice(["never", "segment", "flush"]))
        starts: list[int] = [1]
        n_read, bad_run, incons = 0, None, None
        n_sessions = rng.randint(2, args.sessions)
        for s in range(n_sessions):
            last = s == n_sessions - 1
            cfg = dict(conf, path=str(path), progress=str(progress), resume=s > 0, seed=rng.randrange(10**6),
                       steps=rng.randint(200, 600) if last else 10**7, flush_every=rng.randint(3, 50))
            progress.write_bytes(bytes(16))
            t0 = time.monotonic()
            proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
            c["sessions"] += 1
            kind = None
            try:
                startup_kill = not last and rng.random() < 0.15
                line = ""
                while not line.startswith("constructing" if startup_kill else "ready"):
                    ready, _, _ = select.select([proc.stdout], [], [], 120)
                    line = proc.stdout.readline() if ready else ""
                    if not line:
                        raise RuntimeError(f"child died or stalled: {proc.stderr.read()[-1500:]}")
                if line.startswith("ready"):
                    slowest_resume = max(slowest_resume, time.monotonic() - t0)
                if not last:
                    time.sleep(rng.uniform(0.0, 0.3) if startup_kill else rng.uniform(0.05, 2.0))
                    u = rng.random()
                    kind = signal.SIGKILL if u < 0.5 else signal.SIGTERM if u < 0.8 else signal.SIGINT
                    proc.send_signal(kind)
                    c[kind.name.lower()] += 1
                    c["during_startup"] += startup_kill
                out, err = proc.communicate(timeout=120)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                what = str(e)
                if isinstance(e, subprocess.TimeoutExpired):  # a hang: where is it stuck?
                    proc.send_signal(signal.SIGUSR1)
                    time.sleep(2)
                    proc.kill()
                    _, err = proc.communicate()
                    what = f"did not end within 120 s after {getattr(kind, 'name', 'starting')}:\n{err[-4000:]}"
                else:
                    proc.kill()
                    proc.wait()
                c["child_errors"] += 1
                problems.append(f"{path.name} session {s}: {what}")
                n_read = check_run(path, sorted({*starts, n_read + 1}))[0]
                break
            mm = progress.read_bytes()
            taken, flushed = struct.unpack("<qq", mm[:16])
            if taken == 0 and flushed == 0:  # killed before the recorder was built
                taken = flushed = n_read
            want = 0 if kind is None else -kind
            if proc.returncode != want:
                if "Traceback" in err and "KeyboardInterrupt" not in err:
                    c["child_errors"] += 1
                    problems.append(f"{path.name} session {s}: child error: {err.strip().splitlines()[-1]}")
                else:
                    c["bad_exit"] += 1
                    problems.append(f"{path.name} session {s}: exit {proc.returncode}, expected {want}")
            n, bad, inc = check_run(path, sorted({*starts, n_read + 1}))
            if bad:
                bad_run = bad_run or f"{path.name} after session {s}: {bad}"
                break
            if inc:
                incons = incons or f"{path.name} after session {s}: {inc}"
            lost = max(0, flushed - n)  # any kind: what rec.flush() had committed
            if kind in (signal.SIGTERM, signal.SIGINT, None):  # the handlers write what is buffered
                unwritten = max(0, taken - n) - lost
                c[f"unwritten_{getattr(kind, 'name', 'finished').lower()}"] += unwritten
                if unwritten:
                    problems.append(f"{path.name} session {s} ({getattr(kind, 'name', 'finished')}): "
                                    f"{unwritten} buffered steps not written (took {taken}, read {n})")
            if lost:
                c["lost_beyond_last_flush"] += lost
                problems.append(f"{path.name} session {s} ({getattr(kind, 'name', 'finished')}): "
                                f"{lost} steps lost beyond the last flush (flushed {flushed}, read {n})")
            c["finished"] += kind is None
            if n > n_read:  # a session that wrote steps rows began right after the last one read
                starts.append(n_read + 1)
            n_read = n
        if bad_run is None and path.exists():
            try:
                packed = open_run(pack_run(path, root / "packed.h5"))
                copy = root / "copy"
                shutil.copytree(path, copy)
                repair_run(copy)
                repaired = open_run(copy)
                for other, what in ((packed, "pack"), (repaired, "repair")):
                    if not np.array_equal(other.steps["step"], np.arange(1, n_read + 1)):
                        incons = incons or f"{path.name}: {what} changed the steps"
            except PhasewatchError as e:
                bad_run = f"{path.name}: pack/repair: {e}"
            finally:
                shutil.rmtree(root / "copy", ignore_errors=True)
                (root / "packed.h5").unlink(missing_ok=True)
        if bad_run:
            c["unreadable_runs"] += 1
            problems.append(bad_run)
        if incons:
            c["inconsistent_runs"] += 1
            problems.append(incons)
        c["steps"] += n_read
        if not args.keep and not (bad_run or incons):  # a run with a problem is kept to look at
            shutil.rmtree(path, ignore_errors=True)
        print(f"run {c['runs']:3d}: {n_sessions} sessions, {n_read:6d} steps  {conf}", flush=True)

    print("\nsoak report")
    print(f"  runs tried                     {c['runs']}")
    print(f"  sessions                       {c['sessions']} ({c['finished']} finished normally)")
    print(f"  faults injected                {c['sigkill'] + c['sigterm'] + c['sigint']} (SIGKILL {c['sigkill']}, "
          f"SIGTERM {c['sigterm']}, SIGINT {c['sigint']}; {c['during_startup']} while the recorder "
          "was being built)")
    print(f"  steps recorded                 {c['steps']}")
    print(f"  steps lost beyond last flush   {c['lost_beyond_last_flush']}   (must be 0)")
    print(f"  buffered steps not written     SIGTERM {c['unwritten_sigterm']}, SIGINT {c['unwritten_sigint']}, "
          f"normal end {c['unwritten_finished']}   (must be 0: the handlers write them)")
    print(f"  unreadable runs                {c['unreadable_runs']}   (must be 0)")
    print(f"  inconsistent runs              {c['inconsistent_runs']}   (must be 0)")
    print(f"  wrong exit status              {c['bad_exit']}   (must be 0)")
    print(f"  recorder errors in a child     {c['child_errors']}   (must be 0)")
    print(f"  slowest start or resume        {slowest_resume:.1f} s (child start-up to recorder ready)")
    for p in problems[:20]:
        print("  problem:", p)
    if problems:
        print(f"  runs with a problem are kept in {root}")
    elif not args.keep and not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    zero = ("lost_beyond_last_flush", "unwritten_sigterm", "unwritten_sigint", "unwritten_finished",
            "unreadable_runs", "inconsistent_runs", "bad_exit", "child_errors")
    return 1 if any(c[k] for k in zero) else 0


def fsync_cost(args) -> int:
    """Time spent in the writer's flush (block writes, counts, and the policy's fsyncs) per flush,
    and in closing a segment, for each policy; policies alternate round by round (A B C, C B A)
    so that a busy neighbour hits them alike."""
    import torch

    import phasewatch

    torch.set_num_threads(1)
    root = Path(args.dir or tempfile.mkdtemp(prefix="phasewatch-fsync-"))
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 10))
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    policies = ("never", "segment", "flush")
    print(f"file system of {root}; {sum(p.numel() for p in model.parameters()):,} parameters, K=16, "
          f"{args.steps} steps a round, {args.rounds} rounds")
    for flush_rows in (256, 16):
        flush_ms: dict[str, list[float]] = {p: [] for p in policies}
        close_ms: dict[str, list[float]] = {p: [] for p in policies}
        for r in range(args.rounds):
            for policy in policies if r % 2 == 0 else policies[::-1]:
                opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                path = root / f"{policy}-{flush_rows}-{r}"
                rec = phasewatch.Recorder(path, model, opt, k=16, flush_rows=flush_rows, flush_seconds=1e9,
                                          fsync=policy, strict=True)
                w = rec.writer
                spent = []
                inner = w.flush

                def timed(*a, _inner=inner, _spent=spent, **kw):
                    t0 = time.perf_counter()
                    _inner(*a, **kw)
                    _spent.append(time.perf_counter() - t0)

                w.flush = timed  # the instance attribute shadows the method: append() calls it
                for _ in range(args.steps):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(x), y).backward()
                    opt.step()
                rec.flush()
                w.flush = inner
                t0 = time.perf_counter()
                rec.close()  # the last (empty) flush, closing the segment and its fsync
                close_ms[policy].append((time.perf_counter() - t0) * 1e3)
                flush_ms[policy].append(float(np.mean(spent[:-1])) * 1e3)  # the block flushes
                shutil.rmtree(path)
        print(f"  flush every {flush_rows} rows:")
        base = np.median(flush_ms["never"])
        for p in policies:
            f, c = float(np.median(flush_ms[p])), float(np.median(close_ms[p]))
            print(f"    fsync={p:8s} {f:7.2f} ms per flush (+{f - base:6.2f} ms, +{(f - base) * 1e3 / flush_rows:7.1f}"
                  f" us per step), closing a segment {c:6.2f} ms")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="time budget (a run in progress finishes)")
    ap.add_argument("--runs", type=int, default=None, help="stop after this many runs")
    ap.add_argument("--sessions", type=int, default=6, help="at most this many sessions (kills + 1) per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the runs")
    ap.add_argument("--fsync-cost", action="store_true", help="measure the fsync policies instead")
    ap.add_argument("--steps", type=int, default=1024, help="steps per round of --fsync-cost")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of --fsync-cost")
    args = ap.parse_args()
    return fsync_cost(args) if args.fsync_cost else soak(args)


if __name__ == "__main__":
    sys.exit(main())
