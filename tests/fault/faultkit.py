"""Shared pieces of the fault suite: a small real training child, namespaces, run checks.

Imported by the ``tests/fault/test_*.py`` modules (pytest puts this directory on ``sys.path``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from phasewatch import open_run

K = 6

# A real training loop with a real Recorder; the scenarios to play come in argv[1] as JSON (a
# list, played in order in one process: torch is imported once).  Each scenario trains
# cfg["steps"] steps under its fault (phase 1), removes the fault and resumes the run for
# cfg["more"] steps (phase 2).  Output lines are JSON records or log lines ("LOG ...").
TRAIN_CHILD = textwrap.dedent(f"""
    import json, logging, os, resource, shutil, signal, sys
    scenarios = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s", stream=sys.stdout)
    import torch
    import phasewatch
    torch.set_num_threads(int(os.environ.get("PHASEWATCH_TEST_THREADS", "1")))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(64, 16), torch.randn(64, 4)

    def emit(**o):
        print(json.dumps(o), flush=True)

    def train(rec, n, losses, cfg, watch=0):
        seen = 0
        for i in range(n):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            rec.loss(loss)
            losses.append(loss.item())
            if cfg.get("fault") == "readonly" and len(losses) == cfg["ro_after"]:
                os.chmod(cfg["path"], 0o555)
            if watch and (i + 1) % watch == 0 and rec.enabled:
                # what a reader sees now is committed: it must all survive the fault
                seen = max(seen, len(phasewatch.open_run(cfg["path"]).steps["step"]))
        return seen

    for cfg in scenarios:
        name, fault, path = cfg["name"], cfg["fault"], cfg["path"]
        kw = dict(k={K}, block=4, flush_rows=16, flush_seconds=1e9, **cfg.get("rec", {{}}))
        if fault == "enospc":
            st = os.statvfs(os.path.dirname(path))
            with open(os.path.join(os.path.dirname(path), "filler"), "wb") as fh:
                fh.write(bytes(st.f_bavail * st.f_frsize - cfg["leave"]))
        if fault == "efbig":  # a real file-size limit: writes beyond it fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["limit"], hard))
        if fault == "readonly":  # first: a directory that is read-only from the start
            ro = path + "-ro"
            os.makedirs(ro)
            os.chmod(ro, 0o555)
            try:
                phasewatch.Recorder(ro, model, opt, **kw)
                emit(name=name, phase=0, error=None)
            except phasewatch.PhasewatchError as e:
                emit(name=name, phase=0, error=type(e).__name__, message=str(e))
            os.chmod(ro, 0o755)

        losses = []
        print(f"LOG SCENARIO {{name}}", flush=True)
        rec = phasewatch.Recorder(path, model, opt, **kw)
        seen = train(rec, cfg["steps"], losses, cfg, cfg.get("watch", 0))
        emit(name=name, phase=1, losses=losses, seen=seen, enabled=rec.enabled)
        rec.close()

        # the fault goes away; the run is resumed where training is
        if fault == "enospc":
            os.unlink(os.path.join(os.path.dirname(path), "filler"))
        if fault == "efbig":
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        if fault == "readonly":
            os.chmod(path, 0o755)
        more = []
        rec = phasewatch.Recorder(path, model, opt, resume=True, start_step=len(losses), **kw)
        train(rec, cfg["more"], more, cfg)
        emit(name=name, phase=2, losses=more, enabled=rec.enabled)
        rec.close()
        if cfg.get("out"):
            shutil.copytree(path, cfg["out"])
""")


@functools.cache
def userns_works(map_root: bool) -> bool:
    """Can this machine run a child in a new user (and mount) namespace?"""
    cmd = ["unshare", "--user"] + (["--map-root-user", "--mount", "sh", "-c",
                                    "mount -t tmpfs -o size=1m none /tmp"] if map_root else ["true"])
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_child(script: Path, scenarios: list[dict], env: dict, prefix: list[str] | None = None
                ) -> subprocess.Popen:
    """Start the training child on a list of scenarios (children of a module run side by side)."""
    cmd = [*(prefix or []), sys.executable, str(script), json.dumps(scenarios)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_child(popen: subprocess.Popen, timeout: float = 180
                 ) -> tuple[subprocess.CompletedProcess, dict[str, list[dict]], dict[str, list[str]]]:
    """Wait for a child; returns the process, its JSON records and log lines per scenario."""
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
        raise AssertionError(f"child hung: {out[-2000:]} {err[-2000:]}") from None
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
    records: dict[str, list[dict]] = {}
    logs: dict[str, list[str]] = {}
    name = None
    for line in proc.stdout.splitlines():
        if line.startswith("LOG SCENARIO "):
            name = line.split()[-1]
        elif line.startswith("LOG "):
            logs.setdefault(name, []).append(line)
        elif line.startswith("{"):
            r = json.loads(line)
            records.setdefault(r["name"], []).append(r)
    return proc, records, logs


def assert_clean_exit(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


def check_band(band: dict, session_starts: list[int]) -> None:
    """Band rows: finite exactly where the lag stays within the session, global = sum of layers,
    Cauchy-Schwarz between consecutive rows of a session."""
    st, b, lb = band["step"], band["band"], band["layer_band"]
    assert np.all(np.diff(st) > 0)
    start = np.array([max(s for s in session_starts if s <= t) for t in st], dtype="i8")
    valid = np.arange(b.shape[1])[None, :] <= (st - start)[:, None]
    assert np.isfinite(b[valid]).all() and np.isnan(b[~valid]).all()
    np.testing.assert_allclose(b, lb.sum(axis=1), rtol=1e-12, atol=1e-300, equal_nan=True)
    assert (b[:, 0] > 0).all()
    for j in range(1, b.shape[1]):
        rows = np.nonzero(valid[j:, j] & (st[j:] - st[:-j] == j))[0] + j
        assert (np.abs(b[rows, j]) <= np.sqrt(b[rows, 0] * b[rows - j, 0]) * (1 + 1e-9)).all()


def check_faulted_run(out: Path, phase1: dict, phase2: dict, *, min_lost: int = 1):
    """The run after a fault in session 1 and a resume: every step a reader saw before the fault
    is there with its exact loss, nothing after the fault, then the resumed session."""
    run = open_run(out)
    assert not [w for w in run.warnings if w.startswith("skipped")], run.warnings
    st, loss = run.steps["step"], run.steps["loss"]
    n_taken, more = len(phase1["losses"]), len(phase2["losses"])
    first = st[st <= n_taken]
    n1 = len(first)
    np.testing.assert_array_equal(first, np.arange(1, n1 + 1))  # no holes before the fault
    assert phase1["seen"] <= n1 <= n_taken - min_lost, (phase1["seen"], n1, n_taken)
    np.testing.assert_array_equal(loss[:n1], phase1["losses"][:n1])
    np.testing.assert_array_equal(st[n1:], np.arange(n_taken + 1, n_taken + more + 1))
    np.testing.assert_array_equal(loss[n1:], phase2["losses"])
    gap = [w for w in run.warnings if "not recorded" in w]
    assert len(gap) == 1 and f"{n_taken - n1} steps" in gap[0], run.warnings
    check_band(run.band, [1, n_taken + 1])
    return run, n1


def disabled_lines(logs: list[str]) -> list[str]:
    return [line for line in logs if "recorder disabled" in line]


def write_child(tmp_path: Path) -> Path:
    script = tmp_path / "train_child.py"
    script.write_text(TRAIN_CHILD)
    return script


def child_env_for(env: dict | None = None) -> dict:
    """Environment of a child process: as ``tests/conftest.py``'s ``child_env`` (one BLAS thread,
    unbuffered), with the source tree importable and a short metadata-guard limit."""
    env = dict(os.environ if env is None else env)
    threads = os.environ.get("PHASEWATCH_TEST_THREADS", "1")
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1")
    env.setdefault("PHASEWATCH_OPEN_TIMEOUT", "20")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ------------------------------------------------------------------------------------------------
# Reading hostile files in a child: a hang, a crash of the interpreter or a memory bomb fails the
# test instead of the suite.  The child limits its address space, so that an allocation bomb is a
# MemoryError (reported as unexpected) rather than the machine running out of memory.

READER_WORKER = textwrap.dedent("""
    import json, logging, resource, sys, traceback, warnings
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("phasewatch").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    import phasewatch
    from phasewatch.errors import PhasewatchError

    def peak_kb():
        # VmHWM: peak resident memory of this program (ru_maxrss would include the parent's
        # before exec: a pytest process with torch loaded)
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    print(json.dumps({"status": "ready"}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            run = phasewatch.open_run(req["path"])
            rows = {}
            for name in run.meta.get("tables", {}) if isinstance(run.meta.get("tables"), dict) else []:
                try:
                    t = run.table(name)
                except KeyError:
                    continue
                rows[name] = len(next(iter(t.values()), []))
            run.summary()
            run.metrics()
            out = {"status": "ok", "rows": rows, "warnings": run.warnings}
        except PhasewatchError as e:
            out = {"status": "error", "type": type(e).__name__, "message": str(e)}
        except BaseException as e:
            out = {"status": "unexpected", "type": type(e).__name__, "message": str(e)[:500],
                   "traceback": traceback.format_exc()[-3000:]}
        out["maxrss_kb"] = peak_kb()
        print(json.dumps(out), flush=True)
""")


class ReaderWorker:
    """A child process that opens runs and reads every table on request."""

    def __init__(self, env: dict | None = None, address_space: int = 3 << 30, timeout: float = 30.0):
        self.env = child_env_for(env)
        self.env["PHASEWATCH_OPEN_TIMEOUT"] = self.env.get("PHASEWATCH_FUZZ_OPEN_TIMEOUT", "5")
        self.address_space, self.timeout = address_space, timeout
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", READER_WORKER, str(self.address_space)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=self.env, text=True)
        assert self._line(60.0) == {"status": "ready"}, self.proc.stderr.read()[-2000:]

    def _line(self, timeout: float) -> dict | None:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def read(self, path) -> dict:
        """{"status": "ok" | "error" | "unexpected" | "hang" | "crash", ...}"""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.proc.stdin.flush()
        out = self._line(self.timeout)
        if out is None or out == {}:
            self.proc.kill()
            err = self.proc.stderr.read()[-2000:]
            code = self.proc.wait()
            self.proc = None
            return {"status": "hang" if out is None else "crash", "returncode": code, "stderr": err}
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def small_run(path: Path, steps: int = 40, rotate_rows: int = 1000, dim: int = 24) -> Path:
    """A small numpy-level run with every table kind the reader handles (scalars, band, metrics,
    wide snapshots); ``rotate_rows`` splits it into segments."""
    from phasewatch.store import RunWriter
    from phasewatch.store import format as fmt

    tables = [fmt.steps_table(2, 1), fmt.band_table(2, K), fmt.metrics_table(), fmt.snapshots_table(dim, "float64")]
    rng = np.random.default_rng(0)
    s = np.arange(1, steps + 1)
    with RunWriter(path, {"model": {"n_params": dim}}, tables, block_rows=8, flush_seconds=1e9,
                   rotate_rows=rotate_rows) as w:
        for a in range(0, steps, 8):
            b = s[a: a + 8]
            n = len(b)
            lb = rng.random((n, 2, K))
            w.append("steps", step=b, wall_time=b * 1.0, loss=1.0 / b, lr=np.full((n, 1), 0.1),
                     grad_norm=rng.random(n), layer_grad_norm=rng.random((n, 2)), update_norm=rng.random(n),
                     flags=np.zeros(n, "i4"))
            w.append("band", step=b, lr=np.full(n, 0.1), band=lb.sum(axis=1), layer_band=lb)
            w.append("metrics", step=b, name=np.full(n, b"acc", dtype="S64"), value=b / steps)
            w.append("snapshots", step=b, update=rng.standard_normal((n, dim)))
    return path
