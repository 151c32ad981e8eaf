#!/usr/bin/env python
"""The redesign (issue 16), old against new: recorder overhead and ``analyze()`` time of an old
commit and of this tree, side by side in one run, and whether the two analyse the same files alike.

    .venv/bin/python benchmarks/redesign.py                  # old = 5302a15 (~6 min on 2 loaded cores)
    .venv/bin/python benchmarks/redesign.py --quick          # smoke run (~2-3 min)
    .venv/bin/python benchmarks/redesign.py --old REV        # another old commit (a detached worktree)
    .venv/bin/python benchmarks/redesign.py --old-src PATH   # an old tree already checked out (PATH/src)

Method.  The old commit is checked out with ``git worktree add --detach`` into a temporary directory
(removed at the end).  Two long-lived worker processes run this file with ``--worker`` under the same
interpreter, one with ``PYTHONPATH=<old tree>/src``, one with ``PYTHONPATH=<this tree>/src``, both with
OMP/MKL/OpenBLAS and torch pinned to ``--threads`` threads (default 1).  The driver sends each
measurement to one worker at a time, alternating old/new (ABAB..., the order reversed every round,
the configurations too), so slow drift and neighbours' load hit both versions alike.  Reported:
medians over ``--rounds`` rounds with min-max, of process CPU time (robust on a shared machine;
with one thread it is the work done) and of wall time; new÷old is the median of the per-round
ratios of adjacent measurements.

Recorder.  The same seeded model, data and optimizer per configuration: no recorder, the recorder at
its defaults, and with per-example gradient samples (a 64-example probe every 16 steps; keyword
arguments both versions accept).  Rounds are whole multiples of the recorder's block (16) so each
holds the same band GEMMs and probes.  Workloads: ``mlp`` 784-256-256-10 ReLU (269 k parameters,
batch 128, AdamW), also with ``grad_method="func"`` in the new version (the old version's only
route: the like-for-like figure, since the new default takes the ghost-Gram route on Linear layers);
``demo`` the grokking model of ``phasewatch demo`` (436 k parameters, full batch of 2016, Adam; exact
mode); ``wide`` 784-2048-2048-10 (5.8 M, projected mode; not in the default list).  Besides the
step times: the recorder's own CPU time, timed where its hooks run (``rec.loss()`` and
``optimizer.step()``, minus ``optimizer.step()`` without a recorder in the same round), which keeps
the forward and backward passes' noise out, and page faults per step.  The files the old and new
recorders wrote for the same training are then compared column by column.

Analyzer.  ``analyze(path, window=8)`` (opening the run included) on a synthetic run of 10^5 steps
written by the OLD version's RunWriter (updates in R^1024, two layer groups: a rank-3 slowly rotating
signal plus noise, K = 16, Adam meta, so the momentum null is that of beta1 = 0.9 at d_eff = 1024) and
on 5000 steps of the ``mlp`` recorded by the NEW recorder (gradient samples every 100 steps, a test
accuracy every 500; d_eff from the gradient noise), with each version's defaults and, like for like,
the new one without the work it added (``null="off"``: no momentum null, neither its band nor its
expected spectrum per window; ``rotation=False``: no subspace-rotation column), and ``analyze_band()`` alone on the
synthetic band in memory (the numerical core; new: ``rotation=False``, no null).  A first, untimed call per version warms up
imports and caches and saves the tables; every column both versions produce is then compared (the
old ``regime``, classified on A, against the new ``regime_A``: the new ``regime`` is on A_dk by design).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
BLOCK = 16  # the recorder's default block B
GRAD_EVERY = 16  # per-example probe schedule in the recorder benchmark
HOOKED = [0.0]  # worker: CPU seconds spent in rec.loss() + optimizer.step() (the recorder's hooks run there)
TABLES = ("table", "scalars", "probes", "tail_index", "curvature", "interventions")
SEP = "::"  # npz key = f"{table}{SEP}{column}"


# ==============================================================================================
# worker side (runs under PYTHONPATH=<tree>/src; imports phasewatch and torch lazily)
# ==============================================================================================
def _make_mlp(widths, batch=128, pool=16, probe=64):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1234)
    xs = torch.randn(pool, batch, widths[0], generator=g)  # a pool of batches: no data cost in the loop
    ys = torch.randint(0, widths[-1], (pool, batch), generator=g)
    it = [0]

    def step(rec):
        i = it[0] % pool
        it[0] += 1
        loss = F.cross_entropy(model(xs[i]), ys[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.process_time()
        if rec is not None:
            rec.loss(loss)
        opt.step()  # with the recorder's hooks
        HOOKED[0] += time.process_time() - t0

    grad = {"grad_probe": (torch.randn(probe, widths[0], generator=g),
                           torch.randint(0, widths[-1], (probe,), generator=g)),
            "grad_loss": lambda out, y: F.cross_entropy(out, y, reduction="none")}
    return model, opt, step, grad


def _make_demo(p=71, width=2048, probe=64):
    """The demo's grokking model y = (x W)^2 V on one-hot(a) ++ one-hot(b), MSE, full-batch Adam."""
    import torch
    import torch.nn.functional as F

    class QuadraticMLP(torch.nn.Module):
        def __init__(self, gen):
            super().__init__()
            self.p = p
            self.W = torch.nn.Parameter(torch.randn(2 * p, width, generator=gen) / (2 * (2 * p) ** 0.5))
            self.V = torch.nn.Parameter(torch.randn(width, p, generator=gen) / width ** 0.5)

        def forward(self, ab):
            h = self.W[ab[:, 0]] + self.W[self.p + ab[:, 1]]
            return (h * h) @ self.V

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)[torch.randperm(p * p, generator=g)]
    x = x[: round(0.4 * p * p)]
    target = F.one_hot((x[:, 0] + x[:, 1]) % p, p).float() - 1.0 / p
    model = QuadraticMLP(torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=2e-4)

    def step(rec):
        loss = ((model(x) - target) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t0 = time.process_time()
        if rec is not None:
            rec.loss(loss)
        opt.step()  # with the recorder's hooks
        HOOKED[0] += time.process_time() - t0

    grad = {"grad_probe": (x[:probe], target[:probe]), "grad_loss": lambda out, y: ((out - y) ** 2).sum(1)}
    return model, opt, step, grad


WORKLOADS = {
    "mlp": lambda: _make_mlp((784, 256, 256, 10)),
    "demo": _make_demo,
    "wide": lambda: _make_mlp((784, 2048, 2048, 10)),
}


def _clock():
    return time.perf_counter(), time.process_time()


def w_hello(state, threads, tuned_malloc=False):
    if tuned_malloc:  # glibc: keep freed temporaries for reuse instead of returning them to the kernel
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD 32 MiB
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD 1 GiB
    import torch

    import phasewatch

    torch.set_num_threads(threads)
    import logging

    logging.getLogger("phasewatch").setLevel(logging.ERROR)  # the projected-mode notice is expected
    return {"src": str(Path(phasewatch.__file__).parents[1]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "numpy": np.__version__}


def w_rec_setup(state, workload, configs, tmp, warmup):
    """Build every configuration of a workload (own model, optimizer and recorder), warm each up."""
    import phasewatch

    state["rec"] = {}
    for c in configs:
        model, opt, step, grad = WORKLOADS[workload]()
        rec = None
        if c["recorder"]:
            kw = dict(c.get("kwargs", {}))
            if c.get("grad"):
                kw.update(grad, grad_samples_every=GRAD_EVERY)
            path = Path(tmp) / f"{workload}-{c['label'].replace(' ', '_')}"
            rec = phasewatch.Recorder(path, model, opt, strict=True, **kw)
        for _ in range(warmup):
            step(rec)
        state["rec"][c["label"]] = (step, rec)
    return {}


def w_rec_run(state, label, n):
    import resource

    step, rec = state["rec"][label]
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    HOOKED[0] = 0.0
    w0, c0 = _clock()
    for _ in range(n):
        step(rec)
    w1, c1 = _clock()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n
    return {"wall": (w1 - w0) / n, "cpu": (c1 - c0) / n, "faults": faults, "hooked": HOOKED[0] / n}


def w_rec_close(state):
    out = {}
    for label, (_, rec) in state.pop("rec").items():
        if rec is not None:
            rec.close()
            out[label] = {"path": str(rec.path), "enabled": bool(rec.enabled), "mode": getattr(rec, "mode", "?")}
    return out


def _save(file, tables: dict[str, dict]) -> None:
    arrays = {}
    for name, cols in tables.items():
        for k, v in dict.items(cols or {}):
            a = np.asarray(v)
            if a.dtype == object or a.dtype.metadata:  # h5py strings: plain numpy ones
                a = a.astype(str) if a.dtype == object else a.astype(a.dtype.str)
            arrays[f"{name}{SEP}{k}"] = a
    np.savez(file, **arrays)


def w_read_run(state, path, out, tables):
    """The stored columns of ``tables`` (this version's reader), to an npz."""
    import phasewatch

    run = phasewatch.open_run(path)
    have = run.meta.get("tables", {})
    _save(out, {t: run.table(t) for t in tables if t in have})
    return {"steps": int(len(run.table("steps")["step"]))}


def _synthetic_layer_band(T: int, Q: int, K: int, layers: int, rng) -> np.ndarray:
    """(T, L, K) per-layer band of updates u_t in R^Q: a rank-3 signal whose directions rotate slowly,
    plus isotropic noise; made in chunks of rows (the K-1 rows before each carried over)."""
    basis = np.linalg.qr(rng.normal(size=(Q, 6)))[0]
    cols = np.array_split(np.arange(Q), layers)
    layer = np.full((T, layers, K), np.nan)
    carry = np.zeros((0, Q))
    for a in range(0, T, 8192):
        t = np.arange(a, min(a + 8192, T))[:, None]
        angle = 6 * np.pi * t / T
        coef = rng.normal(size=(len(t), 3)) * np.array([4.0, 2.0, 1.0])
        u = 0.3 * rng.normal(size=(len(t), Q))
        for i in range(3):
            u += coef[:, i: i + 1] * (np.cos(angle) * basis[:, i] + np.sin(angle) * basis[:, i + 3])
        u = np.concatenate([carry, u * 1e-3])
        off = len(carry)  # row r of u is step a - off + r
        for li, c in enumerate(cols):
            uc = u[:, c]
            for j in range(K):
                lo = max(off, j)
                layer[a - off + lo: a - off + len(u), li, j] = np.einsum("ij,ij->i", uc[lo:], uc[lo - j: len(u) - j])
        carry = u[-(K - 1):]
    return layer


def w_write_synth(state, path, T, Q=1024, K=16, layers=2, seed=0):
    """A synthetic run (RunWriter, no torch): band, per-step scalars and a test accuracy."""
    from phasewatch.store import RunWriter
    from phasewatch.store import format as fmt

    rng = np.random.default_rng(seed)
    layer = _synthetic_layer_band(T, Q, K, layers, rng)
    band = layer.sum(axis=1)
    steps = np.arange(1, T + 1, dtype="i8")
    loss = 2.0 * np.exp(-steps / (T / 3)) + 0.05 * rng.random(T)
    grad = np.abs(rng.standard_t(3, size=T)) + 0.1
    groups = [{"name": f"layer{i}", "numel": Q // layers, "dim": Q // layers} for i in range(layers)]
    meta = {"model": {"class": "synthetic", "n_params": Q, "groups": groups,
                      "params": [{"name": g["name"], "shape": [g["numel"]], "numel": g["numel"], "dtype": "float64",
                                  "group": g["name"], "projected_dim": None} for g in groups]},
            "optimizer": {"class": "Adam", "hyper": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8},
                          "param_groups": [{"lr": 1e-3}]},
            "recorder": {"k": K, "stride": 1, "mode": "exact", "framework": "synthetic (numpy)"}}
    tables = [fmt.steps_table(layers, 1), fmt.band_table(layers, K), fmt.metrics_table()]
    with RunWriter(path, meta, tables, block_rows=1 << 16, flush_seconds=1e9, fsync="never") as w:
        w.append("band", step=steps, lr=np.full(T, 1e-3), band=band, layer_band=layer)
        w.append("steps", step=steps, wall_time=np.zeros(T), loss=loss, lr=np.full((T, 1), 1e-3), grad_norm=grad,
                 layer_grad_norm=np.stack([grad / np.sqrt(layers)] * layers, axis=1),
                 update_norm=np.sqrt(band[:, 0]), flags=np.zeros(T, dtype="i4"))
        ms = steps[::max(T // 100, 1)]
        w.append("metrics", step=ms, name=np.array([b"test_acc"] * len(ms)), value=np.minimum(1.0, ms / T * 1.5))
    return {}


def w_record_run(state, path, T, every=100, log_every=500):
    """A run of the ``mlp`` workload recorded at the recorder's defaults plus gradient samples."""
    import torch

    import phasewatch

    model, opt, step, grad = WORKLOADS["mlp"]()
    rec = phasewatch.Recorder(path, model, opt, grad_samples_every=every, **grad)
    px, py = grad["grad_probe"]
    for t in range(1, T + 1):
        step(rec)
        if t % log_every == 0:
            with torch.no_grad():
                rec.log(test_acc=float((model(px).argmax(1) == py).float().mean()))
    rec.close()
    return {}


def w_analyze(state, path, kwargs, save=None):
    import phasewatch

    w0, c0 = _clock()
    res = phasewatch.analyze(path, **kwargs)
    w1, c1 = _clock()
    if save:
        _save(save, {t: getattr(res, t, None) or {} for t in TABLES})
        Path(save + ".events.json").write_text(json.dumps(sorted((e.kind, e.metric, int(e.step)) for e in res.events)))
    return {"wall": w1 - w0, "cpu": c1 - c0, "windows": int(len(res.table["step"]))}


def w_analyze_band(state, path, kwargs, save=None):
    """``analyze_band`` (the per-window spectra, A and regimes: the numerical core) on the run's band in
    memory; the new version's added columns are switched off by ``kwargs`` (null=None is its default)."""
    import phasewatch
    from phasewatch.analysis.pipeline import analyze_band

    if state.get("band_path") != path:
        run = phasewatch.open_run(path)
        state["band_path"], state["band"] = path, ({k: np.asarray(run.band[k]) for k in ("band", "lr", "step")},
                                                   run.n_params)
    bt, n_params = state["band"]
    w0, c0 = _clock()
    table = analyze_band(bt["band"], bt["lr"], bt["step"], n_params=n_params, **kwargs)
    w1, c1 = _clock()
    if save:
        _save(save, {"table": table})
    return {"wall": w1 - w0, "cpu": c1 - c0}


HANDLERS = {"hello": w_hello, "rec_setup": w_rec_setup, "rec_run": w_rec_run, "rec_close": w_rec_close,
            "read_run": w_read_run, "write_synth": w_write_synth, "record_run": w_record_run, "analyze": w_analyze,
            "analyze_band": w_analyze_band}


def worker_main() -> None:
    """Serve JSON requests, one a line on stdin, answers on the original stdout (prints go to stderr)."""
    if sys.path and Path(sys.path[0]).resolve() == HERE.parent:
        sys.path.pop(0)  # benchmarks/ holds modules (tails.py, curvature.py) that must not shadow anything
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    state: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "quit":
            break
        try:
            out = HANDLERS[cmd](state, **req)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which stops
            out = {"error": f"{cmd}: {type(e).__name__}: {e}", "trace": traceback.format_exc()}
        proto.write(json.dumps(out) + "\n")


# ==============================================================================================
# driver side (numpy only)
# ==============================================================================================
class Worker:
    """One version's long-lived worker process."""

    def __init__(self, name: str, src: Path, threads: int, cwd: str, tuned_malloc: bool = False) -> None:
        t = str(threads)
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=t, MKL_NUM_THREADS=t,
                   OPENBLAS_NUM_THREADS=t, PYTHONHASHSEED="0")
        self.name = name
        self.p = subprocess.Popen([sys.executable, str(HERE), "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=env, text=True, cwd=cwd)
        self.info = self("hello", threads=threads, tuned_malloc=tuned_malloc)

    def __call__(self, cmd: str, **kw):
        self.p.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited (see its stderr above)")
        out = json.loads(line)
        if "error" in out:
            sys.stderr.write(out.get("trace", ""))
            raise RuntimeError(f"{self.name} worker: {out['error']}")
        return out

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.close()
            self.p.wait(timeout=60)


def machine_busy() -> tuple[float, float, float]:
    """(machine busy CPU seconds from /proc/stat, wall clock, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        busy = float("nan")
    t = os.times()
    return busy, time.monotonic(), t.user + t.system


def own_cpu(workers) -> float:
    """CPU seconds of the workers so far (from /proc/<pid>/stat)."""
    s = 0.0
    for w in workers:
        try:
            f = Path(f"/proc/{w.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            s += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return s


class Meter:
    """Average CPUs used by processes other than the workers and this driver, over a phase."""

    def __init__(self, workers) -> None:
        self.workers = workers
        self.t0 = machine_busy()
        self.own0 = own_cpu(workers)

    def others(self) -> float:
        b1, w1, me1 = machine_busy()
        own = own_cpu(self.workers) - self.own0 + me1 - self.t0[2]
        return max(0.0, (b1 - self.t0[0] - own) / max(w1 - self.t0[1], 1e-9))


def stat(xs) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def fmt_range(xs, scale=1.0, nd=2) -> str:
    m, lo, hi = stat([x * scale for x in xs])
    return f"{m:.{nd}f} ({lo:.{nd}f}–{hi:.{nd}f})"


def interleaved(rounds: int, jobs: list, run) -> dict:
    """Run ``jobs`` (each a (config, version) pair) ``rounds`` times; the order reverses every round.
    Returns {(config, version): [result, ...]}."""
    out: dict = {j: [] for j in jobs}
    for r in range(rounds):
        for j in (jobs if r % 2 == 0 else jobs[::-1]):
            out[j].append(run(*j))
    return out


# -- recorder ------------------------------------------------------------------------------------
REC_CONFIGS = {
    "mlp": [
        {"label": "no recorder", "recorder": False},
        {"label": "recorder", "recorder": True},
        {"label": "grad samples", "recorder": True, "grad": True},
        {"label": "grad samples, func", "recorder": True, "grad": True, "new_kwargs": {"grad_method": "func"}},
    ],
    "demo": [
        {"label": "no recorder", "recorder": False},
        {"label": "recorder", "recorder": True},
        {"label": "grad samples", "recorder": True, "grad": True},
    ],
    "wide": [
        {"label": "no recorder", "recorder": False},
        {"label": "recorder", "recorder": True},
    ],
}
STEPS = {"mlp": 64, "demo": 32, "wide": 16}  # steps per measurement (multiples of BLOCK and GRAD_EVERY)


def _configs_for(version: str, workload: str) -> list[dict]:
    out = []
    for c in REC_CONFIGS[workload]:
        d = {k: c[k] for k in ("label", "recorder", "grad") if k in c}
        d["kwargs"] = c.get("new_kwargs", {}) if version == "new" else {}
        out.append(d)
    return out


def bench_recorder(workers: dict, workload: str, rounds: int, steps_scale: float, tmp: Path) -> dict:
    n = max(BLOCK, int(STEPS[workload] * steps_scale) // BLOCK * BLOCK)
    for v, w in workers.items():
        w("rec_setup", workload=workload, configs=_configs_for(v, workload), tmp=str(tmp / v), warmup=BLOCK + 4)
    labels = [c["label"] for c in REC_CONFIGS[workload]]
    jobs = [(lbl, v) for lbl in labels for v in ("old", "new")]
    meter = Meter(list(workers.values()))
    t0 = time.perf_counter()
    res = interleaved(rounds, jobs, lambda lbl, v: workers[v]("rec_run", label=lbl, n=n))
    info = {"steps": n, "seconds": time.perf_counter() - t0, "others": meter.others(),
            "files": {v: w("rec_close") for v, w in workers.items()}}
    return {"times": res, "labels": labels, **info}


def recorder_rows(workload: str, r: dict, clock: str) -> list[list[str]]:
    """Markdown rows: ms/step old and new (median, min-max), overhead ratios, new÷old paired."""
    t = {k: [x[clock] for x in v] for k, v in r["times"].items()}
    rows = []
    for lbl in r["labels"]:
        old, new = t[(lbl, "old")], t[(lbl, "new")]
        row = [workload, lbl, fmt_range(old, 1e3), fmt_range(new, 1e3)]
        if lbl == "no recorder":
            row += ["1", "1"]
        else:
            row += [f"{statistics.median(old) / statistics.median(t[('no recorder', 'old')]):.3f}",
                    f"{statistics.median(new) / statistics.median(t[('no recorder', 'new')]):.3f}"]
        row.append(fmt_range([b / a for a, b in zip(old, new)], nd=3))
        row.append(" / ".join(f"{statistics.median(x['faults'] for x in r['times'][(lbl, v)]):.0f}" for v in ("old", "new")))
        rows.append(row)
    return rows


def hook_rows(workload: str, r: dict) -> list[list[str]]:
    """Markdown rows: the recorder's own CPU time a step, measured where it runs (rec.loss() and
    optimizer.step() with the recorder's hooks, minus optimizer.step() without a recorder in the same
    round), so the forward and backward passes' noise stays out of it."""
    h = {k: [x["hooked"] for x in v] for k, v in r["times"].items()}
    rows = []
    for lbl in r["labels"][1:]:
        own = {v: [a - b for a, b in zip(h[(lbl, v)], h[("no recorder", v)])] for v in ("old", "new")}
        rows.append([workload, lbl, fmt_range(own["old"], 1e3), fmt_range(own["new"], 1e3),
                     f"{statistics.median(own['new']) / statistics.median(own['old']):.3f}",
                     fmt_range([b / a for a, b in zip(own["old"], own["new"])], nd=3)])
    return rows


def compare_recorded(workers: dict, r: dict, tmp: Path) -> list[str]:
    """The tables the old and the new recorder wrote for the same training, both read by the new reader."""
    lines = []
    for lbl, fo in r["files"]["old"].items():
        fn = r["files"]["new"][lbl]
        got = {}
        for v, f in (("old", fo), ("new", fn)):
            out = str(tmp / f"rec-{v}-{lbl.replace(' ', '_')}.npz")
            workers["new"]("read_run", path=f["path"], out=out, tables=["steps", "band", "grad_samples"])
            got[v] = out
        lines += [f"{lbl} ({fo['mode']}): {s}" for s in compare_npz(got["old"], got["new"], skip={"wall_time"})]
    return lines


# -- analyzer ------------------------------------------------------------------------------------
LIKE = {"null": "off", "rotation": False}
ANALYZER_MODES = {  # label: (version, worker command, keyword arguments besides the window)
    "old": ("old", "analyze", {}),
    "new": ("new", "analyze", {}),
    "new, like for like": ("new", "analyze", LIKE),
    "band only, old": ("old", "analyze_band", {}),
    "band only, new": ("new", "analyze_band", {"rotation": False}),
}
CHECKS = {"like for like": ("old", "new, like for like"), "defaults": ("old", "new"),
          "band only": ("band only, old", "band only, new")}


def bench_analyzer(workers: dict, runs: dict, window: int, rounds: int, tmp: Path) -> dict:
    """analyze() of each run: old defaults, new defaults, new like for like, and analyze_band alone in
    both; then the result checks."""
    out = {}
    for name, path in runs.items():
        modes = [m for m in ANALYZER_MODES if "band only" not in m or name.startswith("synthetic")]
        files = {m: str(tmp / f"an-{name.split()[0]}-{m.replace(' ', '_').replace(',', '')}.npz") for m in modes}

        def call(m, save=None, path=path):
            v, cmd, kw = ANALYZER_MODES[m]
            return workers[v](cmd, path=path, kwargs={"window": window, **kw}, save=save)

        for m in modes:  # warm-up (imports, first-call caches), and the tables
            call(m, save=files[m])
        meter = Meter(list(workers.values()))
        res = interleaved(rounds, [(name, m) for m in modes], lambda n, m: call(m))
        out[name] = {"times": res, "modes": modes, "others": meter.others(), "check": {}}
        for what, (a, b) in CHECKS.items():
            if a in files and b in files:
                out[name]["check"][what] = compare_npz(files[a], files[b], alias=ALIAS)
        ev = [Path(files[m] + ".events.json").read_text() for m in ("old", "new")]
        out[name]["check"]["events"] = "same" if ev[0] == ev[1] else f"DIFFERENT: old {ev[0]}, new {ev[1]}"
    return out


def analyzer_rows(name: str, r: dict, clock: str) -> list[list[str]]:
    t = {m: [x[clock] for x in r["times"][(name, m)]] for m in r["modes"]}
    rows = []
    for m in r["modes"]:
        ref = "band only, old" if m.startswith("band only") else "old"
        ratio = "1" if m == ref else fmt_range([b / a for a, b in zip(t[ref], t[m])], nd=3)
        rows.append([name, m, fmt_range(t[m], 1.0, 3), ratio])
    return rows


# -- result comparison ---------------------------------------------------------------------------
# the old ``regime`` was classified on A; the new ``regime`` is on A_dk by design, A's is ``regime_A``
ALIAS = {"table::regime": "table::regime_A"}


def diff(a: np.ndarray, b: np.ndarray) -> str | None:
    """None if equal (NaN where NaN), else how they differ."""
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    if a.dtype.kind in "fciub" and b.dtype.kind in "fciub":
        a, b = a.astype(float), b.astype(float)
        if np.array_equal(a, b, equal_nan=True):
            return None
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return f"NaN in different places ({int((np.isnan(a) != np.isnan(b)).sum())} cells)"
        ok = np.isfinite(a) & np.isfinite(b)
        d = np.abs(a - b)[ok]
        s = np.maximum(np.abs(a), np.abs(b))[ok]
        rel = float(np.max(d / np.where(s > 0, s, 1.0))) if d.size else 0.0
        return f"max |Δ| {float(d.max()) if d.size else 0:.3g}, max rel {rel:.3g}, {int((d > 0).sum())}/{d.size} cells"
    if np.array_equal(a.astype(str), b.astype(str)):
        return None
    return f"{int((a.astype(str) != b.astype(str)).sum())} cells differ"


def compare_npz(old: str, new: str, alias: dict | None = None, skip: frozenset | set = frozenset()) -> list[str]:
    """One line per table: columns bit-exact, columns that differ (and how), columns of one version only."""
    alias = alias or {}
    with np.load(old) as fo, np.load(new) as fn:
        a = {k: fo[k] for k in fo.files}
        b = {k: fn[k] for k in fn.files}
    lines = []
    for t in sorted({k.split(SEP)[0] for k in a} | {k.split(SEP)[0] for k in b}):
        ka = sorted(k for k in a if k.split(SEP)[0] == t and k.split(SEP)[1] not in skip)
        kb = {k for k in b if k.split(SEP)[0] == t and k.split(SEP)[1] not in skip}
        exact, bad, used, only_old, rows = [], [], set(), [], 0
        for k in ka:
            kn = alias[k] if alias.get(k) in b else k
            if kn not in b:
                only_old.append(k.split(SEP)[1])
                continue
            used.add(kn)
            d = diff(a[k], b[kn])
            col = k.split(SEP)[1] + (f" (new {kn.split(SEP)[1]})" if kn != k else "")
            (exact if d is None else bad).append(col if d is None else f"{col}: {d}")
            rows = len(a[k])
        only_new = sorted(k.split(SEP)[1] for k in kb - used)
        verdict = "bit-exact" if not bad else "DIFFER"
        line = f"{t} ({rows} rows): {len(exact)}/{len(exact) + len(bad)} common columns {verdict}"
        line += "".join(f" ({c.replace(' (new ', ' = new ')}" for c in exact if " (new " in c)
        line += "".join(f"; {x}" for x in bad)
        if only_new:
            line += f"; new only: {', '.join(only_new)}"
        if only_old:
            line += f"; old only: {', '.join(only_old)}"
        lines.append(line)
    return lines


# -- main ----------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def old_tree(args, tmp: Path) -> tuple[Path, bool]:
    """The old tree: --old-src, or a detached worktree of --old (True: remove it at the end)."""
    if args.old_src:
        return Path(args.old_src).resolve(), False
    dest = tmp / "old-tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(dest), args.old],
                   check=True)
    return dest, True


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="5302a15", help="old commit (default 5302a15, before the redesign)")
    ap.add_argument("--old-src", default=None, help="an old tree already checked out (uses PATH/src)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL/OpenBLAS and torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, steps and windows")
    ap.add_argument("--workloads", default="mlp,demo", help="recorder workloads: mlp, demo, wide (5.8 M, projected)")
    ap.add_argument("--synth-steps", type=int, default=None, help="steps of the synthetic run (default 1e5, quick 1e4)")
    ap.add_argument("--recorded-steps", type=int, default=None,
                    help="steps of the recorded mlp run analysed (default 5000, quick 1000)")
    ap.add_argument("--no-recorder", action="store_true", help="skip the recorder part")
    ap.add_argument("--no-analyzer", action="store_true", help="skip the analyzer part")
    ap.add_argument("--tuned-malloc", action="store_true", help="glibc mallopt in the workers (mmap threshold 32 "
                    "MiB, trim 1 GiB): freed temporaries are reused, not page-faulted in anew")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="the clock of the main tables")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.synth_steps = args.synth_steps or (10_000 if args.quick else 100_000)
    args.recorded_steps = args.recorded_steps or (1000 if args.quick else 5000)
    return args


def describe(workers: dict, args, old_src: Path) -> None:
    rev = subprocess.run(["git", "-C", str(old_src), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "?"
    new_rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True,
                           text=True).stdout.strip()
    print(f"old: {rev} ({workers['old'].info['src']}); new: {new_rev}{' + uncommitted src changes' if dirty else ''} "
          f"({workers['new'].info['src']})")
    i = workers["new"].info
    print(f"python {sys.version.split()[0]}, torch {i['torch']}, numpy {i['numpy']}, threads {i['threads']} per "
          f"worker, {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}; {args.rounds} interleaved rounds; "
          f"malloc {'tuned (mallopt)' if args.tuned_malloc else 'glibc default'}")


def run_recorder_part(workers, args, tmp) -> None:
    rows = {"cpu": [], "wall": []}
    own, checks = [], []
    for wl in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        r = bench_recorder(workers, wl, args.rounds, 0.5 if args.quick else 1.0, tmp)
        print(f"[recorder {wl}] {r['steps']} steps a measurement, {r['seconds']:.0f} s; other processes used "
              f"{r['others']:.2f} of {os.cpu_count()} cpus meanwhile", flush=True)
        for clock in rows:
            rows[clock] += recorder_rows(wl, r, clock)
        own += hook_rows(wl, r)
        checks += [f"{wl} / {s}" for s in compare_recorded(workers, r, tmp)]
    hdr = ["workload", "configuration", "old ms/step", "new ms/step", "old ÷ no rec.", "new ÷ no rec.", "new ÷ old",
           "page faults/step old / new"]
    for clock in (args.clock, "wall" if args.clock == "cpu" else "cpu"):
        print(f"\nRecorder, {'process CPU' if clock == 'cpu' else 'wall'} time: median (min–max) over rounds; "
              "new ÷ old = median (min–max) of the per-round ratios\n")
        print(md_table(hdr, rows[clock]))
    print("\nThe recorder's own CPU time, ms/step: rec.loss() + optimizer.step() (where its hooks run) minus "
          "optimizer.step() without a recorder, per round; median (min–max)\n")
    print(md_table(["workload", "configuration", "old", "new", "new ÷ old (medians)", "new ÷ old (per round)"], own))
    print("\nWhat the old and the new recorder wrote for the same training (read by the new reader; "
          "wall_time left out):")
    for s in checks:
        print(f"  {s}")


def run_analyzer_part(workers, args, tmp) -> None:
    t0 = time.perf_counter()
    runs = {f"synthetic {args.synth_steps:.0e} steps": str(tmp / "synth"),
            f"recorded mlp {args.recorded_steps:.0e} steps": str(tmp / "recorded")}
    workers["old"]("write_synth", path=runs[next(iter(runs))], T=args.synth_steps)
    workers["new"]("record_run", path=list(runs.values())[1], T=args.recorded_steps)
    print(f"\n[analyzer] runs written in {time.perf_counter() - t0:.0f} s (synthetic by the old RunWriter, "
          "recorded by the new Recorder)", flush=True)
    res = bench_analyzer(workers, runs, 8, args.rounds, tmp)
    rows = {"cpu": [], "wall": []}
    for name, r in res.items():
        print(f"[analyzer {name}] other processes used {r['others']:.2f} of {os.cpu_count()} cpus")
        for clock in rows:
            rows[clock] += analyzer_rows(name, r, clock)
    for clock in (args.clock, "wall" if args.clock == "cpu" else "cpu"):
        print(f"\nanalyze(path, window=8), {'process CPU' if clock == 'cpu' else 'wall'} seconds: median "
              "(min–max); 'like for like' = null='off', rotation=False; 'band only' = analyze_band() on the band in "
              "memory (new: rotation=False and, its default, no null)\n")
        print(md_table(["run", "version", "seconds", "÷ old"], rows[clock]))
    for name, r in res.items():
        for what in CHECKS:
            if what not in r["check"]:
                continue
            print(f"\nSame results? {name}, old against new {what}:")
            for s in r["check"][what]:
                print(f"  {s}")
        print(f"\nEvents found in the metrics, {name}, old against new defaults: {r['check']['events']}")


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        worker_main()
        return 0
    args = parse(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pw-redesign-") as d:
        tmp = Path(d)
        old_src, remove = old_tree(args, tmp)
        workers = {}
        try:
            for v, src in (("old", old_src / "src"), ("new", REPO / "src")):
                (tmp / v).mkdir()
                workers[v] = Worker(v, src, args.threads, cwd=str(tmp), tuned_malloc=args.tuned_malloc)
            describe(workers, args, old_src)
            if not args.no_recorder:
                run_recorder_part(workers, args, tmp)
            if not args.no_analyzer:
                run_analyzer_part(workers, args, tmp)
        finally:
            for w in workers.values():
                w.close()
            if remove:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_src)], check=False)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
