"""Curvature probes after training, on the checkpoints a run stored (arrays, never pickles).

    phasewatch.curvature.posthoc(run, model, batch, loss_fn)          # Python
    phasewatch curvature RUN --model pkg.mod:factory --data pkg.mod:batch_fn   # CLI

The stored θ (float32, in the order of ``meta['model']['params']``) is copied into a model the
user builds; each checkpoint then gets the same probes the recorder computes live
(:class:`~phasewatch.record.curvature.CurvatureProbe`), written as a small run beside the
original (``RUN/posthoc`` or ``RUN.h5.posthoc``) that :func:`phasewatch.analyze` merges.
Adam's preconditioned sharpness needs the optimizer state, which checkpoints do not hold: post hoc
it is NaN and S is reported as unavailable for Adam-type runs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.curvature import stability_threshold
from ..errors import PhasewatchError
from ..store import format as fmt
from ..store import open_run
from ..store.format import posthoc_path
from ..store.writer import RunWriter
from .curvature import CurvatureProbe, rows_to_columns

log = logging.getLogger("phasewatch")


def load_theta(model: torch.nn.Module, meta_params: list[dict], theta: np.ndarray) -> list[torch.Tensor]:
    """Copy a stored flat θ into the model's parameters of the same names; returns them in the
    stored order.  Names, shapes and the total length must match, else a one-line error."""
    named = dict(model.named_parameters())
    params, o = [], 0
    for spec in meta_params:
        name, shape, numel = spec["name"], tuple(spec["shape"]), int(spec["numel"])
        if name not in named:
            raise PhasewatchError(f"the model has no parameter {name!r} that the run recorded; build the same "
                                  "architecture as the recorded run")
        p = named[name]
        if tuple(p.shape) != shape:
            raise PhasewatchError(f"parameter {name}: model shape {tuple(p.shape)} != recorded {shape}; build "
                                  "the same architecture as the recorded run")
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(theta[o: o + numel])).view(shape).to(p.dtype))
        params.append(p)
        o += numel
    if o != theta.size:
        raise PhasewatchError(f"checkpoint has {theta.size} values, the recorded parameters {o}")
    return params


def posthoc(
    run: Any,
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Callable | None,
    *,
    steps: Iterable[int] | None = None,
    out: str | Path | None = None,
    top_k: int = 1,
    tol: float = 1e-6,
    max_iter: int | None = None,
    trace: int | str | None = None,
    mode: str = "eval",
    ntk_inputs: Any = None,
    ntk_outputs: str = "trace",
    ntk_method: str = "auto",
    hvp: str = "auto",
    groups: bool | list[str] = False,
    basis_device: str = "auto",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Probe every stored checkpoint (or those at ``steps``) of a run; returns the path of the
    post-hoc run.  ``batch``/``loss_fn``/``ntk_inputs`` as for the recorder's curvature probes.
    Lanczos is seeded with the checkpoint's step, as the live probe is.  ``hvp``: how
    Hessian-vector products are computed (``"auto"``, ``"autograd"``, ``"fd"``; see
    :class:`~phasewatch.record.curvature.CurvatureProbe`).  ``groups``: True (every layer group
    the run recorded) or a list of group names: λ_max of each group's diagonal Hessian block too
    (column ``group_lambda``, NaN for groups not asked for).  ``basis_device``: where the Lanczos
    basis lives (see :func:`~phasewatch.record.curvature.lanczos`)."""
    if not hasattr(run, "table"):
        run = open_run(run)
    meta = run.meta
    if "checkpoints" not in meta.get("tables", {}):
        raise PhasewatchError(f"{run.path}: the run stored no checkpoints; record with checkpoint_every=N")
    have = run.heavy_steps("checkpoints")
    if not have.size:
        raise PhasewatchError(f"{run.path}: no checkpoints were written; record with checkpoint_every=N")
    want = have if steps is None else np.intersect1d(have, np.asarray(list(steps), dtype="i8"))
    if steps is not None and want.size < len(set(steps)):
        missing = sorted(set(int(s) for s in steps) - set(want.tolist()))
        raise PhasewatchError(f"no checkpoint at step(s) {missing[:5]}; stored: {have[:5].tolist()}...")
    dst = Path(out) if out is not None else posthoc_path(run.path)
    if dst.exists():
        if not overwrite:
            raise PhasewatchError(f"{dst}: exists; pass overwrite=True (--overwrite) or another output")
        shutil.rmtree(dst)
    mparams = meta["model"]["params"]
    opt_meta = meta.get("optimizer", {})
    st = run.steps
    lr_at = dict(zip(st["step"].tolist(), st["lr"][:, 0].tolist())) if len(st["step"]) else {}
    ck = run.table("checkpoints", steps=want[:1])
    params = load_theta(model, mparams, np.asarray(ck["theta"][0]))
    labels = [g["name"] for g in meta["model"].get("groups", [])] or list(dict.fromkeys(
        p.get("group", p["name"]) for p in mparams))
    cgroups = None
    if groups:
        asked = labels if groups is True else [groups] if isinstance(groups, str) else list(groups)
        bad = [g for g in asked if g not in labels]
        if bad:
            raise PhasewatchError(f"groups: the run has no layer group {bad[0]!r}; its groups are {labels[:8]}")
        cgroups = [[i for i, p in enumerate(mparams) if p.get("group", p["name"]) == lbl] if lbl in asked else None
                   for lbl in labels]
    probe = CurvatureProbe(model, params, loss_fn=loss_fn, batch=batch, top_k=top_k, tol=tol, max_iter=max_iter,
                           trace=trace, mode=mode, ntk_inputs=ntk_inputs, ntk_outputs=ntk_outputs,
                           ntk_method=ntk_method, optimizer=None, optimizer_meta=opt_meta, hvp=hvp,
                           groups=cgroups, group_names=labels, basis_device=basis_device)
    tables = []
    if batch is not None:
        tables.append(fmt.curvature_table(probe.top_k, groups=len(cgroups or [])))
    if probe.ntk_size:
        tables.append(fmt.ntk_table(probe.ntk_size))
    if not tables:
        raise PhasewatchError("nothing to probe: give a batch (Hessian) and/or NTK inputs")
    pmeta = {"model": meta.get("model"), "optimizer": opt_meta,
             "recorder": {"posthoc_of": str(run.path), "curvature": probe.config()},
             "user": {"posthoc": True}}
    with RunWriter(dst, pmeta, tables) as w:
        for s in want.tolist():
            theta = np.asarray(run.table("checkpoints", steps=[s])["theta"][0])
            load_theta(model, mparams, theta)
            lr = float(lr_at.get(s, np.nan))
            if batch is not None:
                row = probe.hessian_row(int(s), lr)
                if opt_meta.get("class") and not np.isfinite(row["threshold"]):
                    row["threshold"] = stability_threshold(opt_meta.get("class", ""), lr, opt_meta.get("hyper")).value
                w.append("curvature", **rows_to_columns([row]))
                msg = f"step {s}: lambda_max {row['eigenvalues'][0]:.6g} (residual {row['residuals'][0]:.1e}, " \
                      f"{row['hvps']} HVPs, {row['hvp'].decode()})"
            else:
                msg = f"step {s}"
            if probe.ntk_size:
                w.append("ntk", **rows_to_columns([probe.ntk_row(int(s))]))
            if progress:
                progress(msg)
    return dst
