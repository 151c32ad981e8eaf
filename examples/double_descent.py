"""Double descent with random ReLU features, each fit a recorded run, compared with ``phasewatch compare``.

Data: n = 200 training and 1000 test points x ~ N(0, I_20), y = ⟨β, x⟩ + 0.5·noise (‖β‖ = 1).
Features: φ(x) = ReLU(W x)/√m with W ~ N(0, 1/20) fixed per m, for m from 50 to 3200.  The
minimum-norm least-squares fit (pseudo-inverse) has a test error that peaks where m = n
(Belkin et al. 2019, PNAS 116:15849; Mei & Montanari 2022, CPAM 75:667).

Each m is a recorded run: full-batch gradient descent from zero on the same least-squares loss
(which stays in the row space, so it heads for the same min-norm solution), recorded with
per-example gradient samples on the training set on a log schedule (steps 1, 2, 3, …), so each run
carries C and p; at
the end the min-norm solution's train and test errors are logged as metrics, and m is a user
attribute (``meta={"features": m}``).  Then one table and one figure over m:

    python examples/double_descent.py --out double-descent     # ~1 min on CPU

Writes: runs/m<m>/ (recordings), compare.md/.csv/.json and double_descent.pdf/.png.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import phasewatch  # noqa: E402
from phasewatch.workflows.compare import compare_table, to_csv, to_json, to_markdown  # noqa: E402

FEATURES = [50, 100, 150, 180, 200, 220, 250, 300, 400, 800, 1600, 3200]


def fit(path: Path, m: int, X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray, *, steps: int,
        seed: int) -> dict:
    rng = np.random.default_rng(seed + m)
    d = X.shape[1]
    W = rng.standard_normal((d, m)) / np.sqrt(d)
    F = np.maximum(X @ W, 0) / np.sqrt(m)
    Ft = np.maximum(Xt @ W, 0) / np.sqrt(m)
    # min-norm least squares: the answer the double-descent curve is about
    w_mn = np.linalg.pinv(F) @ y
    mn_train = float(np.mean((F @ w_mn - y) ** 2))
    mn_test = float(np.mean((Ft @ w_mn - yt) ** 2))

    Ft_, yt_ = torch.from_numpy(Ft), torch.from_numpy(yt)[:, None]
    F_, y_ = torch.from_numpy(F), torch.from_numpy(y)[:, None]
    model = torch.nn.Linear(m, 1, bias=False).double()
    torch.nn.init.zeros_(model.weight)
    lam = float(np.linalg.eigvalsh(F.T @ F / len(y))[-1]) if m <= len(y) else \
        float(np.linalg.eigvalsh(F @ F.T / len(y))[-1])
    opt = torch.optim.SGD(model.parameters(), lr=1.0 / lam)
    with phasewatch.Recorder(path, model, opt, k=16, grad_samples_every="log", grad_probe=(F_, y_),
                             grad_loss=lambda o, t: 0.5 * ((o - t) ** 2).sum(-1),
                             meta={"features": m, "n_train": len(y), "task": "random ReLU features"}) as rec:
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss = 0.5 * ((model(F_) - y_) ** 2).sum(-1).mean()
            loss.backward()
            rec.loss(loss)
            opt.step()
            if step % 10 == 0 or step == steps:
                with torch.no_grad():
                    tr = float(((model(F_) - y_) ** 2).mean())
                    te = float(((model(Ft_) - yt_) ** 2).mean())
                rec.log(step, train_mse=tr, test_mse=te)
        rec.log(steps, minnorm_train_mse=mn_train, minnorm_test_mse=mn_test)
    return {"m": m, "minnorm_test": mn_test, "minnorm_train": mn_train, "gd_test": te}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="double-descent")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", type=int, nargs="+", default=FEATURES)
    a = ap.parse_args(argv)
    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    n, n_test, d = 200, 1000, 20
    beta = rng.standard_normal(d)
    beta /= np.linalg.norm(beta)
    X, Xt = rng.standard_normal((n, d)), rng.standard_normal((n_test, d))
    y = X @ beta + 0.5 * rng.standard_normal(n)
    yt = Xt @ beta + 0.5 * rng.standard_normal(n_test)
    paths = []
    for m in a.features:
        path = out / "runs" / f"m{m}"
        if path.exists():
            shutil.rmtree(path)
        r = fit(path, m, X, y, Xt, yt, steps=a.steps, seed=a.seed)
        print(f"m = {m:5d}: min-norm test MSE {r['minnorm_test']:.3g} (train {r['minnorm_train']:.2g}); "
              f"gradient descent after {a.steps} steps: test MSE {r['gd_test']:.3g}", flush=True)
        paths.append(path)

    rows, cols = compare_table(paths, "features")
    (out / "compare.md").write_text(to_markdown(rows, cols))
    (out / "compare.csv").write_text(to_csv(rows, cols))
    (out / "compare.json").write_text(to_json(rows, "features"))
    from phasewatch.plot.multirun import sweep
    from phasewatch.plot.style import save

    x = [r["features"] for r in rows]
    # the recorder measures per-example gradients (b = 1); gradient descent uses the full batch B = n,
    # whose consolidation ratio is C_B = B·C_1 (DEFINITIONS §2), p_B = C_B/(1 + C_B)
    c1 = np.array([r.get("C_per_example_first", np.nan) for r in rows])
    fig = sweep(x, {"final_minnorm_test_mse": [r["final_minnorm_test_mse"] for r in rows],
                    "final_test_mse": [r["final_test_mse"] for r in rows],
                    "C1": c1, "pB": n * c1 / (1 + n * c1)},
                xlabel="features m (n = 200)",
                labels={"final_minnorm_test_mse": "test MSE, min-norm",
                        "final_test_mse": f"test MSE, GD {a.steps} steps",
                        "C1": "C_1 at step 1 (canonical, per example)", "pB": "p_B = n·C_1/(1 + n·C_1)"})
    for ax in fig.axes[:2]:
        ax.set_yscale("log")
    for ax in fig.axes:
        ax.axvline(n, color="0.4", lw=0.6, ls=":")
    for f in ("pdf", "png"):
        save(fig, out / f"double_descent.{f}", f)
    plt.close(fig)
    peak = max(rows, key=lambda r: r["final_minnorm_test_mse"])
    print(f"min-norm test MSE peaks at m = {peak['features']} (n = {n}); wrote {out}/compare.md, "
          f"{out}/double_descent.pdf")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
