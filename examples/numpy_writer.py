"""Write a phasewatch run from a training loop that is not PyTorch, then analyse it.

    python examples/numpy_writer.py                   (~2 s; torch is never imported)
    python examples/numpy_writer.py --out runs/logreg --steps 500

The run format is numpy-level: :class:`phasewatch.store.RunWriter` appends rows of plain arrays to
the tables declared in :mod:`phasewatch.store.format`, and everything downstream (``phasewatch
info/analyze/plot``, :func:`phasewatch.analyze`) reads it like a recorder's run.  Here the loop is
plain-numpy logistic regression with momentum SGD; a JAX loop does the same with ``np.asarray`` of
its (device) arrays: compute the update u_t = θ_t − θ_{t−1} per layer (e.g. per leaf of the
parameter pytree, ``jax.tree_util.tree_leaves``), keep the last K−1 updates, and append the band row
b_t[j] = <u_t, u_{t−j}> in float64.  Gradient-noise measurements go to the ``grad_samples`` table
as the sufficient statistics of :func:`phasewatch.analysis.noise.sufficient_statistics`, here from
closed-form per-example gradients (with JAX: ``jax.vmap(jax.grad(loss))`` over a batch).

What this writes, per step: the ``steps`` row (loss, lr, gradient and update norms per layer), the
``band`` row (global and per layer, NaN where t − j < 1); every ``--eval-every`` steps the test
accuracy (``metrics``) and a gradient-noise measurement (``grad_samples``, per-example, b = 1);
optionally (``--snapshots``) the raw updates, which the analysis can use instead of the band.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.analysis.noise import sufficient_statistics
from phasewatch.store import RunWriter
from phasewatch.store import format as fmt

LAYERS = ("weight", "bias")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for any z


def record_logistic_regression(out: str | Path, *, steps: int = 300, k: int = 16, dim: int = 20, batch: int = 64,
                               lr: float = 0.5, momentum: float = 0.9, eval_every: int = 10,
                               snapshots: bool = False, n_max: int = 64, seed: int = 0) -> Path:
    """Train logistic regression on a synthetic teacher problem and record it to ``out``."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=dim) * 2.0 / np.sqrt(dim)
    test_x = rng.normal(size=(2048, dim))
    test_y = (test_x @ w_true + 0.3 > 0).astype(float)
    theta = {"weight": np.zeros(dim), "bias": np.zeros(1)}
    velocity = {n: np.zeros_like(v) for n, v in theta.items()}
    sizes = [theta[n].size for n in LAYERS]
    P = sum(sizes)
    cols = np.cumsum([0, *sizes])

    tables = [fmt.steps_table(len(LAYERS), 1), fmt.band_table(len(LAYERS), k), fmt.metrics_table(),
              fmt.grad_samples_table(len(LAYERS), n_max)]
    if snapshots:
        tables.append(fmt.snapshots_table(P, "float64"))
    meta = {
        "model": {"class": "LogisticRegression (numpy)", "n_params": P,
                  "params": [{"name": n, "shape": [s], "numel": s, "dtype": "float64", "group": n,
                              "projected_dim": None} for n, s in zip(LAYERS, sizes)],
                  "groups": [{"name": n, "numel": s, "dim": s} for n, s in zip(LAYERS, sizes)]},
        "optimizer": {"class": "SGD", "hyper": {"lr": lr, "momentum": momentum},
                      "param_groups": [{"lr": lr, "momentum": momentum}]},
        "recorder": {"k": k, "stride": 1, "mode": "exact", "accumulate": "float64", "framework": "numpy",
                     "snapshot_kind": "raw" if snapshots else None, "grad_samples_source": "per_example"},
        "versions": {"phasewatch": phasewatch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "seeds": {"numpy": seed},
    }

    ring = np.full((k, P), np.nan)  # ring[j] = u_{t-j} after the shift below; NaN = no such update
    with RunWriter(out, meta, tables) as writer:
        for step in range(1, steps + 1):
            x = rng.normal(size=(batch, dim))
            y = (x @ w_true + 0.3 > 0).astype(float)
            p = _sigmoid(x @ theta["weight"] + theta["bias"][0])
            eps = 1e-12
            loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
            r = p - y  # d loss_i / d logit_i
            per_example = np.concatenate([r[:, None] * x, r[:, None]], axis=1)  # (batch, P), closed form
            grad = per_example.mean(axis=0)

            if step % eval_every == 0:  # gradient noise at the θ this step starts from
                st = sufficient_statistics(per_example, b=1)
                layer = [sufficient_statistics(per_example[:, cols[i]:cols[i + 1]], b=1) for i in range(len(LAYERS))]
                norms = np.full(n_max, np.nan)
                norms[:min(n_max, batch)] = np.linalg.norm(per_example, axis=1)[:n_max]
                writer.append("grad_samples", step=[step], n=[st.n], b=[1.0], source=[b"per_example"],
                              mean_sq_norm=[st.mean_sq_norm], trace=[st.trace], quad=[st.quad],
                              trace_sq=[st.trace_sq], fourth=[st.fourth], third=[st.third],
                              layer_mean_sq_norm=[[s.mean_sq_norm for s in layer]],
                              layer_trace=[[s.trace for s in layer]], sample_norms=[norms])

            # the optimizer (any framework's): heavy-ball SGD
            g = {"weight": grad[:dim], "bias": grad[dim:]}
            old = np.concatenate([theta[n] for n in LAYERS])
            for n in LAYERS:
                velocity[n] = momentum * velocity[n] + g[n]
                theta[n] = theta[n] - lr * velocity[n]
            u = np.concatenate([theta[n] for n in LAYERS]) - old  # u_t = θ_t − θ_{t−1}

            # the band: <u_t, u_{t-j}> per layer, j = 0..K-1, from the last K-1 updates
            ring = np.roll(ring, 1, axis=0)
            ring[0] = u
            layer_band = np.stack([ring[:, cols[i]:cols[i + 1]] @ u[cols[i]:cols[i + 1]]
                                   for i in range(len(LAYERS))])  # (L, K), NaN where t - j < 1
            layer_grad = [np.linalg.norm(grad[cols[i]:cols[i + 1]]) for i in range(len(LAYERS))]
            writer.append("band", step=[step], lr=[lr], band=layer_band.sum(axis=0)[None], layer_band=layer_band[None])
            writer.append("steps", step=[step], wall_time=[time.time()], loss=[loss], lr=[[lr]],
                          grad_norm=[np.linalg.norm(grad)], layer_grad_norm=[layer_grad],
                          update_norm=[np.linalg.norm(u)], flags=[0])
            if snapshots:
                writer.append("snapshots", step=[step], update=u[None])
            if step % eval_every == 0:
                acc = float(np.mean((test_x @ theta["weight"] + theta["bias"][0] > 0) == test_y))
                writer.append("metrics", step=[step], name=[b"test_acc"], value=[acc])
    return Path(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--snapshots", action="store_true", help="also store the raw updates")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="phasewatch-numpy-") + "/run"
    record_logistic_regression(out, steps=args.steps, eval_every=args.eval_every, snapshots=args.snapshots)
    print(f"run: {out}")
    run = phasewatch.open_run(out)
    print(run.summary())
    print(phasewatch.analyze(run, window=8).summary())


if __name__ == "__main__":
    main()
