"""The per-layer stage of :func:`~phasewatch.analysis.pipeline.analyze` (``layers=True``).

The recorder stores a band per layer group, ``layer_band`` (T, G, K), whose sum over groups is the
global band (DEFINITIONS §1, "Stored per layer").  Each group's band is the band of that group's
own updates u_t^(g) (its coordinates of u_t), so the per-window table of a group — σ_j, k*, gap
ratio, g₂₃, A, A_dk, the rotation and the momentum-null columns — is computed by the same code as
the global table (:func:`~phasewatch.analysis.pipeline.band_table_chunked`) on that band, with the
group's recorded dimension (``meta["model"]["groups"][g]["dim"]``) as P of the BBP reference and
d_eff of the null's finite-dimension band.  The spectra are those of an SVD of the group's true
updates over each window.

Streaming: the layer band is read once per block of windows (all groups from the same rows, plus
the W rows before the block its first windows need) and every group's table is computed from that
block, so a lazy run is read once whatever the number of groups; each window depends on its own
rows only, so the tables are the same value for value for every block size.

Per group, :func:`layer_summary` gives the fraction of valid windows above the null's band and the
*lock-in* step: the first step at which the gap ratio is above the band for ``LOCK_IN_WINDOWS``
consecutive valid windows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PhasewatchError

log = logging.getLogger("phasewatch")

__all__ = ["LOCK_IN_WINDOWS", "group_dims", "layer_lines", "layer_tables", "layer_summary", "layers_to_csv",
           "run_layer_tables"]

#: consecutive windows above the null's band that count as a group "locking in"
LOCK_IN_WINDOWS = 5


def group_dims(meta: dict) -> tuple[list[str], list[float]]:
    """Names and recorded dimensions of the layer groups of a run's meta (``dim``: the numbers of
    coordinates in the group's band — the projected dimension for projected tensors; ``numel``
    when an older run has no ``dim``; inf when neither is recorded: the null without a band)."""
    groups = (meta.get("model") or {}).get("groups") or []
    names = [str(g.get("name", f"group{i}")) for i, g in enumerate(groups)]
    dims = [float(g.get("dim") or g.get("numel") or math.inf) for g in groups]
    return names, dims


def layer_tables(read_layers, steps: np.ndarray, K: int, window: int, names: list[str], dims: list[float],
                 *, chunk_windows: int, table_fn, inner_windows: int = 100_000,
                 **opts) -> dict[str, dict[str, np.ndarray]]:
    """Per-group per-window tables.

    ``read_layers(lo, hi)`` returns the layer band rows ``lo <= r < hi`` (``(hi - lo, G, K)``) and
    their learning rates; ``table_fn`` is :func:`~phasewatch.analysis.pipeline.band_table_chunked`
    (passed in: this module is a stage of the pipeline, not a second copy of it); ``opts`` its
    options (``null_dim`` and ``n_params`` are replaced by each group's dimension).  The layer band
    is read ``chunk_windows`` windows at a time, each group's table of a block computed
    ``inner_windows`` at a time; the window ending at row r is computed from rows r−W … r, as in
    the global table.
    """
    steps = np.asarray(steps)
    if window > K:
        raise PhasewatchError(f"{opts.get('where', 'run')}: window W={window} exceeds the recorded band K={K}; "
                              f"pass --window {K - 1} or less")
    opts = {k: v for k, v in opts.items() if k not in ("null_dim", "n_params")}
    pieces: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in names}
    quiet = _Once() if K < window + 1 else None  # the global table has said K < W+1 already
    if quiet is not None:
        log.addFilter(quiet)
    try:
        _blocks(read_layers, steps, K, window, names, dims, int(chunk_windows), int(inner_windows), table_fn,
                opts, pieces)
    finally:
        if quiet is not None:
            log.removeFilter(quiet)
    return {n: (p[0] if len(p) == 1 else {k: np.concatenate([q[k] for q in p]) for k in p[0]})
            for n, p in pieces.items()}


class _Once(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "K=" not in str(record.msg)


def _blocks(read_layers, steps, K, window, names, dims, chunk_windows, inner_windows, table_fn, opts, pieces):
    T, G = len(steps), len(names)
    for a in range(window - 1, T, max(1, int(chunk_windows))):  # a: first window end of the block
        b = min(T, a + int(chunk_windows))
        s = max(0, a - window)
        lb, lr = read_layers(s, b)
        lb = np.asarray(lb, dtype=np.float64)
        lr = np.asarray(lr, dtype=float)
        if lb.shape != (b - s, G, K):
            raise PhasewatchError(f"{opts.get('where', 'run')}: layer band rows {s}:{b} came back with shape "
                                  f"{lb.shape}, not ({b - s}, {G}, {K}); the run's groups do not match its band")
        drop = a - (s + window - 1)  # windows of the block's first rows that end before a (0 or 1)
        for g, name in enumerate(names):
            band_g = lb[:, g, :]
            dim = dims[g]
            t = table_fn(lambda lo, hi, _b=band_g, _lr=lr: (_b[lo:hi], _lr[lo:hi]), steps[s:b], K, window,
                         chunk_windows=min(b - s, inner_windows), n_params=int(dim) if math.isfinite(dim) else None,
                         null_dim=dim, **opts)
            pieces[name].append({k: v[drop:] for k, v in t.items()} if drop else t)


def run_layer_tables(run, bt, window: int, chunk: int | None, memory_budget: int | None, *, table_fn,
                     chunk_default: int, **opts) -> dict[str, dict[str, np.ndarray]]:
    """:func:`layer_tables` of a recorded run's band table ``bt`` (lazy or in memory): streamed in
    blocks of ``chunk`` windows when given, else of ``chunk_default`` windows when the whole layer
    band (T·(G·K + 2) float64) would take more than ``memory_budget`` bytes, else read whole."""
    where = str(run.path)
    names, dims = group_dims(run.meta)
    if "layer_band" not in bt:
        raise PhasewatchError(f"{where}: the run has no per-layer band; analyse it without layers=True "
                              "(--layers), or record it with this phasewatch")
    spec = (run.meta.get("tables", {}).get("band", {}) or {}).get("layer_band")
    shape = tuple(spec[1]) if spec and len(spec) > 1 else tuple(np.asarray(bt["layer_band"]).shape[1:])
    G, K = int(shape[0]), int(shape[-1])
    if len(names) != G:
        raise PhasewatchError(f"{where}: the run's meta names {len(names)} layer groups but its band has {G}; "
                              "the meta and the segments do not belong together")
    T = len(bt["step"])
    if chunk is None and memory_budget is not None and T * (G * K + 2) * 8 > memory_budget:
        chunk = int(chunk_default)
    if hasattr(bt, "rows") and chunk is not None:
        def read(lo: int, hi: int):
            r = bt.rows(lo, hi, ("layer_band", "lr"))
            return r["layer_band"], r["lr"]
    else:
        lb, lrs = bt["layer_band"], bt["lr"]

        def read(lo: int, hi: int):
            return lb[lo:hi], lrs[lo:hi]
    return layer_tables(read, bt["step"], K, window, names, dims, chunk_windows=chunk or max(T, 1),
                        table_fn=table_fn, inner_windows=chunk_default, **opts)


def _lock_in(steps: np.ndarray, above: np.ndarray, valid: np.ndarray, n: int) -> int | None:
    """The step of the first window that starts ``n`` consecutive valid windows above the band."""
    hit = (np.asarray(above, bool) & np.asarray(valid, bool)).astype(np.int64)
    if hit.size < n:
        return None
    run = np.convolve(hit, np.ones(n, dtype=np.int64), mode="valid")  # windows i .. i+n-1 all above
    idx = np.flatnonzero(run == n)
    return int(steps[idx[0]]) if idx.size else None


def layer_summary(layers: dict[str, dict[str, np.ndarray]], n: int = LOCK_IN_WINDOWS) -> dict[str, Any]:
    """Per group: ``windows``, ``valid_windows``, ``above_null_fraction`` (of the valid windows),
    ``gap_excess_median``, ``kstar_mode``, ``rotation_median`` (radians) and ``lock_in_step`` (the
    first step whose window starts ``n`` consecutive valid windows with the gap ratio above the
    null's band; None if never); and ``first_lock_in``: the group(s) with the earliest lock-in."""
    groups: dict[str, dict[str, Any]] = {}
    for name, t in layers.items():
        v = np.asarray(t["valid"], bool)
        d: dict[str, Any] = {"windows": int(v.size), "valid_windows": int(v.sum())}
        if "above_null" in t and v.any():
            d["above_null_fraction"] = float(np.mean(np.asarray(t["above_null"], bool)[v]))
            ex = np.asarray(t["gap_excess"], float)[v]
            d["gap_excess_median"] = float(np.nanmedian(ex)) if np.isfinite(ex).any() else None
            d["lock_in_step"] = _lock_in(t["step"], t["above_null"], v, n)
        if v.any():
            k = np.asarray(t["kstar"])[v]
            vals, counts = np.unique(k[k > 0], return_counts=True)
            d["kstar_mode"] = int(vals[np.argmax(counts)]) if vals.size else None
            rot = np.asarray(t.get("rotation", np.full(v.size, np.nan)), float)[v]
            d["rotation_median"] = float(np.nanmedian(rot)) if np.isfinite(rot).any() else None
        groups[name] = d
    locked = {g: d["lock_in_step"] for g, d in groups.items() if d.get("lock_in_step") is not None}
    first = min(locked.values()) if locked else None
    return {"groups": groups, "lock_in_windows": n, "first_lock_in_step": first,
            "first_lock_in": [g for g, s in locked.items() if s == first]}


def layer_lines(summary: dict[str, Any]) -> list[str]:
    """Markdown lines of :func:`layer_summary`: per group the fraction of windows above the null's
    band, the lock-in step, the median gap excess and rotation; then the first group to lock in."""
    n = summary["lock_in_windows"]
    lines = []
    for g, d in summary["groups"].items():
        if "above_null_fraction" not in d:
            lines.append(f"- {g}: {d['valid_windows']} valid windows of {d['windows']}; no null reading")
            continue
        lock = d.get("lock_in_step")
        ex, rot = d.get("gap_excess_median"), d.get("rotation_median")
        lines.append(f"- {g}: {100 * d['above_null_fraction']:.0f}% of {d['valid_windows']} valid windows above the "
                     f"momentum null's band; " + (f"locks in at step {lock}" if lock is not None else
                                                   f"never {n} consecutive windows above it")
                     + (f"; median gap excess x{ex:.3g}" if ex is not None else "")
                     + (f"; median rotation {rot:.3g} rad" if rot is not None else ""))
    first = summary.get("first_lock_in") or []
    if first:
        lines.append(f"- first group to lock in: {', '.join(first)} (step {summary['first_lock_in_step']}; the gap "
                     f"ratio above the null's band for {n} consecutive windows)")
    else:
        lines.append(f"- no group locks in (no group's gap ratio is above the null's band for {n} consecutive windows)")
    return lines


def layers_to_csv(layers: dict[str, dict[str, np.ndarray]], path: str | Path, header: str = "") -> Path:
    """All groups' per-window tables in one CSV, a ``group`` column first, ``sigma`` and
    ``stability`` split into ``sigma_1`` … (as :meth:`Analysis.to_csv` does)."""
    path = Path(path)
    with open(path, "w") as fh:
        fh.write("# phasewatch per-layer analysis" + (f"; {header}" if header else "") + "\n")
        names: list[str] | None = None
        for group, t in layers.items():
            cols = {k: np.asarray(v) for k, v in t.items() if np.asarray(v).ndim == 1}
            for key in ("sigma", "stability"):
                if key in t:
                    for j in range(np.asarray(t[key]).shape[1]):
                        cols[f"{key}_{j + 1}"] = np.asarray(t[key])[:, j]
            if names is None:
                names = list(cols)
                fh.write(",".join(["group", *names]) + "\n")
            ints = {n for n in names if cols[n].dtype.kind in "iub"}
            data = {n: cols[n].astype(float) for n in names}
            for i in range(len(cols["step"])):
                fh.write(",".join([group.replace(",", ";")] + [
                    str(int(data[n][i])) if n in ints else ("" if math.isnan(data[n][i]) else repr(float(data[n][i])))
                    for n in names]) + "\n")
    return path
