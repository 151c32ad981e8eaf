#!/usr/bin/env python
"""Training time with vs without ``phasewatch.Recorder``, measured side by side in one run.

    .venv/bin/python benchmarks/recorder_overhead.py            # full run (< 5 min on 2 cores)
    .venv/bin/python benchmarks/recorder_overhead.py --quick    # fast variant (< 60 s)

Workloads
  demo  the grokking MLP  y = (x W)^2 V  (no biases), p = 71, x = one-hot(a) ++ one-hot(b) so the
        first layer is the gather W[a] + W[p+b]; hidden 2048, MSE against a zero-mean one-hot
        target of (a+b) mod p, Adam(lr 1e-3, weight_decay 2e-4), full batch over 40% of the p^2
        pairs (2016 examples).  The default recorder settings pick the exact ring.
  mlp   784-2048-2048-10 ReLU MLP (5.8M parameters), batch 128 of random inputs / random labels,
        AdamW, cross-entropy.  The default settings pick projected mode (an exact ring would be
        2.2 GB > 512 MiB); it is also run with mode="exact" unless --no-exact.

Method
  Every configuration has its own model, optimizer (same seed) and recorder in a temporary directory.
  After a warm-up (excluded; it covers at least one band GEMM and lazily created optimizer state),
  the configurations of a workload are run in rounds of --steps optimizer steps each, in
  alternating order (A B C, C B A, ...) so slow drift and neighbour noise hit all of them alike.
  --steps is rounded up to a multiple of the recorder's block B so every round holds the same
  number of band GEMMs.  Reported: median per-step time over rounds, the ratio of the medians,
  and the median of the per-round (paired) ratios.  Rounds during which other processes used a
  noticeable share of the cpus (/proc/stat minus our own CPU time) are dropped when enough quiet
  rounds remain (--quiet-cpus).

  A profile phase follows (skip with --no-profile): fresh recorders on the same models with the
  recorder's internal methods wrapped in time.perf_counter (in this process only), to show where
  the recorder's per-step time goes.  --ops adds a torch.profiler breakdown of the aten ops run
  inside those methods.

Memory: the recorder's big temporaries (and training's own) are, with glibc's default settings,
often returned to the kernel when freed and page-faulted in again on the next allocation; the
"page faults/step" column shows it.  --tuned-malloc sets mallopt thresholds that stop this churn.

The thread count is left as torch sets it.  The CPU time used by other processes during each
workload is printed, because a busy neighbour on a 2-core machine inflates everything (the paired
ratios suffer least).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import phasewatch
from phasewatch.record import drain as pw_drain
from phasewatch.record import recorder as pw_recorder
from phasewatch.record import ring as pw_ring
from phasewatch.store import writer as pw_writer
from phasewatch.workflows.demo import QuadraticMLP, modular_addition

BLOCK = 16  # the recorder's default B; --steps is rounded up to a multiple of it


# ----------------------------------------------------------------------------------------------
# workloads
def make_demo(seed: int):
    """The demo's grokking model and data (phasewatch.workflows.demo), one full-batch Adam step per call."""
    torch.manual_seed(seed)
    p = 71
    data = modular_addition(p, train_fraction=0.4, seed=seed)
    model = QuadraticMLP(p, 2048, torch.Generator().manual_seed(seed + 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=2e-4)
    target = F.one_hot(data.train_y, p).float() - 1.0 / p

    def step(rec):
        loss = ((model(data.train_x) - target) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rec is not None:
            rec.loss(loss)
        opt.step()

    return model, opt, step


def make_mlp(seed: int, batch: int = 128, pool: int = 64, d_in: int = 784):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                          nn.Linear(2048, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1234)
    xs = torch.randn(pool, batch, d_in, generator=g)  # a pool of batches: no data cost in the loop
    ys = torch.randint(0, 10, (pool, batch), generator=g)
    it = [0]

    def step(rec):
        i = it[0] % pool
        it[0] += 1
        loss = F.cross_entropy(model(xs[i]), ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if rec is not None:
            rec.loss(loss)
        opt.step()

    return model, opt, step


BATCH = {"mlp": 128}  # --batch


def make_mlp10(seed: int):
    """Issue 21's 3072-2048-2048-10 MLP (10.5M parameters), batch --batch."""
    return make_mlp(seed, batch=BATCH["mlp"], d_in=3072)


WORKLOADS = {"demo": make_demo, "mlp": lambda seed: make_mlp(seed, batch=BATCH["mlp"]), "mlp10": make_mlp10}


class UFoldRecorder(phasewatch.Recorder):
    """The recorder with projected mode's previous route: the fold of u_t = θ_t − θ_{t−1} (a copy
    of θ, a full-size difference and sign product a step), for --ufold side-by-side comparisons."""

    _FOLD_THETA = False


# ----------------------------------------------------------------------------------------------
class Config:
    """One model + optimizer, with or without a recorder."""

    def __init__(self, workload: str, label: str, rec_kwargs: dict | None, tmp: Path) -> None:
        self.workload, self.label, self.rec_kwargs, self.tmp = workload, label, rec_kwargs, tmp
        self.model, self.opt, self.step_fn = WORKLOADS[workload](seed=0)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.rec = None
        self.rec_path = None
        self.init_seconds = 0.0
        self.times: list[float] = []  # seconds per step, one entry per round
        self.faults: list[float] = []  # minor page faults per step (fresh memory from the kernel)
        self.steps_done = 0

    def open_recorder(self, suffix: str = "") -> None:
        if self.rec_kwargs is None:
            return
        self.rec_path = self.tmp / f"{self.workload}-{self.label}{suffix}"
        kw = dict(self.rec_kwargs)
        cls = kw.pop("_cls", phasewatch.Recorder)
        t0 = time.perf_counter()
        self.rec = cls(self.rec_path, self.model, self.opt, strict=True, **kw)
        self.init_seconds = time.perf_counter() - t0

    def run(self, n: int) -> float:
        step, rec = self.step_fn, self.rec
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(n):
            step(rec)
        dt = time.perf_counter() - t0
        self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n)
        self.steps_done += n
        return dt

    def recorder_info(self) -> dict:
        r = self.rec
        if r is None:
            return {"mode": "-", "ring": 0, "state": 0, "dim": 0}
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        state = (nbytes([r._ring]) + nbytes(r._prev.values()) + nbytes(r._signs.values())
                 + nbytes(getattr(r, "_scratch", {}).values()) + nbytes(getattr(r, "_fold_out", {}).values())
                 + nbytes([t for pair in getattr(r, "_theta_fold", {}).values() for t in pair])
                 + (nbytes([r._fold_buf]) if getattr(r, "_fold_buf", None) is not None else 0))
        return {"mode": r.mode, "ring": nbytes([r._ring]), "state": state, "dim": r.dim,
                "rows": r.rows, "enabled": r.enabled}

    def close_recorder(self) -> dict:
        """Close the recorder, check what it wrote, free its memory."""
        out = {}
        if self.rec is not None:
            out["enabled"] = self.rec.enabled
            t0 = time.perf_counter()
            self.rec.close()
            out["close_seconds"] = time.perf_counter() - t0
            out["disk_bytes"] = sum(f.stat().st_size for f in self.rec_path.rglob("*") if f.is_file())
            try:
                run = phasewatch.open_run(self.rec_path)
                out["rows_steps"] = len(run.steps["step"])
                out["rows_band"] = len(run.band["step"])
            except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
                out["read_error"] = f"{type(e).__name__}: {e}"
            self.rec = None
            gc.collect()
        return out


def tune_malloc() -> bool:
    """Stop glibc malloc from handing freed memory back to the kernel (mmap threshold 32 MiB,
    trim threshold 1 GiB), so big temporaries are reused instead of page-faulted in afresh."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class CpuMeter:
    """CPU used by *other* processes while we run: machine busy time (/proc/stat) minus our own
    CPU time (os.times), in cpus.  On a shared 2-core box this says how much the numbers suffered."""

    def __init__(self) -> None:
        self.ok = os.path.exists("/proc/stat")
        self.hz = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self.start()

    def _machine(self) -> tuple[float, float]:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        busy = sum(v[:8]) - v[3] - v[4]  # all but idle and iowait (guest time is inside user)
        return busy / self.hz, time.monotonic()

    def start(self) -> None:
        if self.ok:
            t = os.times()
            self._m0, self._own0 = self._machine(), t.user + t.system

    def others(self) -> float | None:
        """Average cpus used by other processes since start()."""
        if not self.ok:
            return None
        (b1, w1), t = self._machine(), os.times()
        (b0, w0) = self._m0
        own = t.user + t.system - self._own0
        return max(0.0, (b1 - b0 - own) / max(w1 - w0, 1e-9))


def others_str(meter: CpuMeter) -> str:
    o = meter.others()
    return "other processes: n/a" if o is None else f"other processes used {o:.2f} of {os.cpu_count()} cpus"


def bench_workload(workload: str, labels_kwargs: list[tuple[str, dict | None]], steps: int,
                   rounds: int, warmup: int, tmp: Path) -> tuple[list[Config], list[float | None]]:
    """Run the rounds; return the configurations (with per-round times) and, per round, the cpus
    other processes used meanwhile."""
    cfgs = [Config(workload, lbl, kw, tmp) for lbl, kw in labels_kwargs]
    for c in cfgs:
        c.open_recorder()
        c.run(warmup)
        c.faults.clear()
    gc.collect()
    meter, others = CpuMeter(), []
    for r in range(rounds):
        order = cfgs if r % 2 == 0 else cfgs[::-1]
        meter.start()
        for c in order:
            c.times.append(c.run(steps) / steps)
        others.append(meter.others())
    return cfgs, others


def quiet_rounds(others: list[float | None], limit: float) -> list[int]:
    """Rounds during which other processes used less than ``limit`` cpus, if there are enough of
    them (at least 3 and a third of all); otherwise all rounds."""
    quiet = [i for i, o in enumerate(others) if o is not None and o < limit]
    return quiet if len(quiet) >= max(3, len(others) // 3) else list(range(len(others)))


# ----------------------------------------------------------------------------------------------
# profile: wrap the recorder's internals (class attributes, this process only)
WRAPPED = [
    (pw_recorder.Recorder, "_pre_hook"),
    (pw_recorder.Recorder, "_post_hook"),
    (pw_ring.RingMixin, "_record_update"),
    (pw_drain.DrainMixin, "_drain"),
    (pw_recorder.Recorder, "loss"),
    (pw_writer.RunWriter, "append"),
    (pw_writer.RunWriter, "flush"),
    (pw_ring, "fold_float64"),  # the projection (of θ_t), looked up as a module global by _record_update
    (pw_ring, "fold_sum"),  # the projection of u_t (--ufold, FSDP)
]
LABEL = {"fold_float64": "fold of θ_t (float64)", "fold_sum": "fold of u_t (sum)", "append": "writer.append", "flush": "writer.flush (HDF5)",
         "loss": "rec.loss()"}
# who is called inside whom (for exclusive times)
PARENT = {"_record_update": "_post_hook", "_drain": "_post_hook", "fold_float64": "_record_update",
          "fold_sum": "_record_update",
          "append": "_drain", "flush": "append"}


@contextlib.contextmanager
def wrapped_internals(acc: dict, use_record_function: bool):
    saved = []

    def wrap(name, fn):
        rf = f"pw::{name}"

        @functools.wraps(fn)
        def w(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                if use_record_function:
                    with torch.profiler.record_function(rf):
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                a = acc[name]
                a[0] += time.perf_counter() - t0
                a[1] += 1

        return w

    try:
        for owner, name in WRAPPED:
            fn = owner.__dict__[name]
            saved.append((owner, name, fn))
            setattr(owner, name, wrap(name, fn))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def profile_config(c: Config, steps: int, warmup: int, ops: bool) -> dict:
    acc: dict = defaultdict(lambda: [0.0, 0])
    prof_table = None
    with wrapped_internals(acc, use_record_function=ops):
        c.open_recorder(suffix="-profile")  # hooks bind the wrapped methods
        c.run(warmup)
        acc.clear()
        t_total = c.run(steps)
        snapshot = {k: tuple(v) for k, v in acc.items()}  # before the torch.profiler pass
        if ops:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                c.run(2 * BLOCK)
            prof_table = ops_under_recorder(prof, 2 * BLOCK)
        info = c.recorder_info()
        c.close_recorder()
    return {"acc": snapshot, "steps": steps, "total": t_total, "info": info, "ops": prof_table}


def ops_under_recorder(prof, n_steps: int) -> list[tuple[str, str, float, int]]:
    """Self CPU time of the aten ops whose innermost pw:: scope is a recorder method."""
    agg: dict = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.name.startswith("pw::"):
            continue
        parent, scope = ev.cpu_parent, None
        while parent is not None:
            if parent.name.startswith("pw::"):
                scope = parent.name[4:]
                break
            parent = parent.cpu_parent
        if scope is None:
            continue
        a = agg[(scope, ev.name)]
        a[0] += ev.self_cpu_time_total / 1e3 / n_steps  # ms per step
        a[1] += 1
    rows = sorted(((s, n, t, k) for (s, n), (t, k) in agg.items()), key=lambda r: -r[2])
    return rows


def print_profile(c: Config, prof: dict, base_ms: float) -> None:
    acc, n = prof["acc"], prof["steps"]
    info = prof["info"]
    print(f"\n  {c.workload} / {c.label}  (mode={info['mode']}, {n} steps, wrapped; baseline step "
          f"{base_ms:.2f} ms)")
    print(f"    {'method':<22}{'calls/step':>11}{'incl ms/step':>14}{'excl ms/step':>14}{'% of base':>11}")
    incl = {k: v[0] / n * 1e3 for k, v in acc.items()}
    children = defaultdict(float)
    for k, v in incl.items():
        if k in PARENT:
            children[PARENT[k]] += v
    order = ["_pre_hook", "_post_hook", "_record_update", "fold_float64", "fold_sum", "_drain", "append", "flush",
             "loss"]
    for k in order:
        if k not in acc:
            continue
        excl = incl[k] - children.get(k, 0.0)
        name = LABEL.get(k, k)
        indent = {"_record_update": 2, "_drain": 2, "fold_float64": 4, "fold_sum": 4, "append": 4,
                  "flush": 6}.get(k, 0)
        print(f"    {' ' * indent + name:<22}{acc[k][1] / n:>11.3f}{incl[k]:>14.3f}{excl:>14.3f}"
              f"{100 * excl / base_ms:>10.1f}%")
    total = incl.get("_pre_hook", 0) + incl.get("_post_hook", 0) + incl.get("loss", 0)
    print(f"    {'total recorder':<22}{'':>11}{total:>14.3f}{'':>14}{100 * total / base_ms:>10.1f}%")
    if prof["ops"]:
        print("    aten ops inside the recorder (torch.profiler, self CPU ms/step, top 12):")
        for scope, name, t, _k in prof["ops"][:12]:
            print(f"      {scope:<16}{name:<36}{t:>9.3f}")


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per round per configuration "
                    "(rounded up to a multiple of 16; default 32, quick 16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, quick 5)")
    ap.add_argument("--quick", action="store_true", help="fast variant (< 60 s)")
    ap.add_argument("--workloads", default="demo,mlp", help="comma list of: demo, mlp, mlp10 (10.5M)")
    ap.add_argument("--batch", type=int, default=128, help="batch size of the mlp workloads (128)")
    ap.add_argument("--ufold", action="store_true", help="mlp workloads: also projected mode's previous route "
                    "(fold of u_t, UFoldRecorder), side by side with the current one (fold of θ_t)")
    ap.add_argument("--no-exact", action="store_true", help="skip mode='exact' on the mlp (2.2 GB ring)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-method profile")
    ap.add_argument("--ops", action="store_true", help="add a torch.profiler op breakdown to the profile (its record_function scopes add a "
                    "little to the wrapped timings)")
    ap.add_argument("--tuned-malloc", action="store_true", help="set glibc mallopt thresholds so freed "
                    "temporaries are reused, not page-faulted in again (separates the recorder's compute cost "
                    "from allocator effects; the default measures what an untuned process sees)")
    ap.add_argument("--quiet-cpus", type=float, default=0.25, help="drop rounds in which other processes "
                    "used at least this many cpus, if enough quiet rounds remain (default 0.25)")
    args = ap.parse_args(argv)

    BATCH["mlp"] = args.batch
    steps = args.steps or (16 if args.quick else 32)
    steps = max(BLOCK, -(-steps // BLOCK) * BLOCK)
    rounds = args.rounds or (5 if args.quick else 15)
    warmup = BLOCK + 4
    prof_steps = 2 * BLOCK if args.quick else 4 * BLOCK
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")

    import logging

    logging.getLogger("phasewatch").setLevel(logging.WARNING)  # the projected-mode notice is expected
    malloc = "glibc default"
    if args.tuned_malloc:
        malloc = "tuned (mallopt: mmap threshold 32 MiB, trim threshold 1 GiB)" if tune_malloc() else \
            "tuning FAILED, glibc default"
    meter = CpuMeter()
    time.sleep(1.0)  # idle for a second: what does the rest of the machine use?
    print(f"phasewatch {phasewatch.__version__}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, cpus {os.cpu_count()}; before start: {others_str(meter)}")
    print(f"{rounds} rounds x {steps} steps per configuration, warm-up {warmup} steps, alternating order; "
          f"malloc {malloc}")
    busy = meter.others() or 0.0
    if busy > 0.3:
        print(f"WARNING: other processes busy ({busy:.1f} cpus): absolute times are inflated and "
              "ratios noisier; prefer the paired ratios")
    t_start = time.perf_counter()

    mlp_plan = ([("no recorder", None), ("recorder (auto)", {})]
                + ([("auto, fold of u_t", {"_cls": UFoldRecorder})] if args.ufold else [])
                + ([] if args.no_exact else [("recorder (exact)", {"mode": "exact"})]))
    plan = {"demo": [("no recorder", None), ("recorder (auto)", {})], "mlp": mlp_plan, "mlp10": mlp_plan}
    results = []
    with tempfile.TemporaryDirectory(prefix="phasewatch-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for w in workloads:
            t0 = time.perf_counter()
            meter.start()
            cfgs, others = bench_workload(w, plan[w], steps, rounds, warmup, tmp)
            use = quiet_rounds(others, args.quiet_cpus)
            for c in cfgs:
                c.times = [c.times[i] for i in use]
            base = cfgs[0]
            base_med = statistics.median(base.times)
            print(f"\n[{w}] {base.n_params:,} parameters, {time.perf_counter() - t0:.1f} s, {others_str(meter)}; "
                  f"rounds used {len(use)}/{rounds}"
                  + (f" (dropped rounds where others used >= {args.quiet_cpus} cpus)" if len(use) < rounds else ""))
            for c in cfgs:
                med = statistics.median(c.times)
                q = statistics.quantiles(c.times, n=4) if len(c.times) >= 2 else [med, med, med]
                info = c.recorder_info()
                row = {"workload": w, "label": c.label, "n_params": c.n_params, "median_ms": med * 1e3,
                       "iqr_ms": (q[0] * 1e3, q[2] * 1e3), **info, "init_s": c.init_seconds}
                if c is not base:
                    row["ratio"] = med / base_med
                    row["paired"] = statistics.median(t / b for t, b in zip(c.times, base.times))
                row["faults"] = statistics.median(c.faults)
                print(f"  {c.label:<18} median {med * 1e3:8.2f} ms/step  (IQR {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f}, "
                      f"{row['faults']:.0f} page faults/step)"
                      + (f"  ratio {row['ratio']:.3f}  paired {row['paired']:.3f}" if c is not base else ""))
                if c.rec is not None:
                    row.update(c.close_recorder())
                    print(f"    mode={row['mode']} ring {fmt_bytes(row['ring'])} ({row['rows']} x {row['dim']:,} "
                          f"float64), recorder state {fmt_bytes(row['state'])}, init {row['init_s']:.2f} s, "
                          f"close {row['close_seconds']:.2f} s, disk {fmt_bytes(row['disk_bytes'])} "
                          f"({row['disk_bytes'] / max(c.steps_done, 1) / 1024:.1f} KiB/step), "
                          f"rows {row.get('rows_steps')}/{row.get('rows_band')} of {c.steps_done}"
                          + ("" if row["enabled"] else "  ** RECORDER DISABLED ITSELF **")
                          + (f"  ** {row['read_error']} **" if "read_error" in row else ""))
                results.append(row)

            if not args.no_profile:
                print(f"\n[{w}] profile: recorder internals wrapped with time.perf_counter")
                for c in cfgs[1:]:
                    prof = profile_config(c, prof_steps, warmup, args.ops)
                    print_profile(c, prof, base_med * 1e3)
            del cfgs, base
            gc.collect()

    # ------------------------------------------------------------------------------------------
    print(f"\nSummary ({rounds} rounds x {steps} steps, medians; ratio = with / without recorder;"
          f" paired = median of per-round ratios; malloc {malloc.split(' (')[0]})")
    hdr = f"{'workload':<9}{'params':>11}  {'configuration':<18}{'mode':<10}{'ring':>11}{'ms/step':>10}" \
          f"{'ratio':>8}{'paired':>8}{'faults/step':>13}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        ring = fmt_bytes(r["ring"]) if r["ring"] else "-"
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else "1"
        paired = f"{r['paired']:.3f}" if "paired" in r else ""
        print(f"{r['workload']:<9}{r['n_params']:>11,}  {r['label']:<18}{r['mode']:<10}{ring:>11}"
              f"{r['median_ms']:>10.2f}{ratio:>8}{paired:>8}{r['faults']:>13.0f}")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
