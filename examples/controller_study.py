"""Do the framework's controllers help?  The grokking recipe over several seeds, with no controller
and with each controller of :mod:`phasewatch.record.control` at its framework defaults (p-band learning
rate, C-rule, Kramers escape, early stopping), side by side.

    python examples/controller_study.py --out controller-study          # ~3-6 min on 2 CPU cores
    python examples/controller_study.py --out controller-study --reuse  # re-analyse the recorded runs

The recipe is :func:`phasewatch.workflows.demo.train_grokking` (modular addition mod 71, Adam lr 1e-3, weight
decay 2e-4, full batch) at width 512 (default 2048 is ~20x slower here; 512 groks too, at ~185 steps),
400 steps.  Every arm, including "none", records the same gradient-noise measurements: per-example
gradients of 64 fixed training pairs every 5 steps (b = 1), from which the controllers read C and
p = C/(1+C) (canonical, bias-corrected; DEFINITIONS §2).  Measuring does not change training, so
"none" is the plain recipe.

Reported per arm: runs that grokked (first evaluation with test accuracy >= 0.95; evaluations
every 5 steps), the step of grokking per seed, final train and test accuracy (at the last step
trained: an early-stopped run ends where it stopped), divergences (the training loss became
non-finite or exceeded 10x its initial value), early stops, interventions, the final learning rate,
and the median measured p.  Writes OUT/study.md, OUT/study.json, OUT/controller_study.pdf/.png and
the recordings under OUT/runs/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

import phasewatch  # noqa: E402
from phasewatch.record.control import CRuleLR, EarlyStopping, KramersEscape, PBandLR  # noqa: E402

ARMS = {
    "none": None,
    "p_band": lambda opt: [PBandLR(opt)],
    "c_rule": lambda opt: [CRuleLR(opt)],
    "kramers": lambda opt: [KramersEscape(opt)],
    "early_stop": lambda opt: [EarlyStopping(opt)],
}
RULES = {"p_band": "p_band", "c_rule": "c_rule", "kramers": "kramers_escape", "early_stop": "early_stopping"}


def _diverged(loss: np.ndarray) -> bool:
    loss = np.asarray(loss, dtype=float)
    if not loss.size:
        return False
    first = loss[np.isfinite(loss)][:1]
    return bool((~np.isfinite(loss)).any() or (first.size and (loss[np.isfinite(loss)] > 10 * first[0]).any()))


def _last(metrics: dict, name: str) -> float:
    s, v = metrics.get(name, (np.zeros(0), np.zeros(0)))
    return float(v[-1]) if len(v) else math.nan


def run_arm(arm: str, seed: int, path: Path, a, reuse: bool) -> dict:
    from phasewatch.workflows.demo import train_grokking

    t0 = time.perf_counter()
    if not (reuse and (path / "meta.json").exists()):
        if path.exists():
            shutil.rmtree(path)
        train_grokking(path, p=71, width=a.width, steps=a.steps, seed=seed, eval_every=5,
                       grad_samples_every=a.every, grad_probe=a.probe, controllers=ARMS[arm],
                       recorder_kwargs={"k": 8})
    res = phasewatch.analyze(path, window=5)
    m = res.metrics
    grok = next((e.step for e in res.events if e.kind == "grokking"), None)
    iv = res.interventions or {}
    lr = np.asarray(res.scalars["lr"], dtype=float)[:, 0]
    stop = [int(s) for s, p in zip(iv.get("step", []), iv.get("param", [])) if p == "stop"]
    p = np.asarray(res.probes.get("p", []), dtype=float)
    row = {
        "arm": arm, "seed": seed, "grok_step": None if grok is None else int(grok),
        "final_train_acc": _last(m, "train_acc"), "final_test_acc": _last(m, "test_acc"),
        "diverged": _diverged(res.scalars["loss"]), "stop_step": stop[0] if stop else None,
        "last_step": int(res.scalars["step"][-1]), "interventions": int(len(iv.get("step", []))),
        "final_lr": float(lr[-1]), "max_lr": float(np.nanmax(lr)), "min_lr": float(np.nanmin(lr)),
        "median_p": float(np.nanmedian(p)) if np.isfinite(p).any() else math.nan,
        "p_zero_fraction": float(np.mean(p[np.isfinite(p)] == 0)) if np.isfinite(p).any() else math.nan,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"{arm:>10} seed {seed}: grok {row['grok_step']}, train {row['final_train_acc']:.3f}, "
          f"test {row['final_test_acc']:.3f}, diverged {row['diverged']}, stop {row['stop_step']}, "
          f"{row['interventions']} interventions, lr {row['min_lr']:.3g}..{row['max_lr']:.3g} "
          f"({row['seconds']} s)", flush=True)
    return {"row": row, "analysis": res}


def _fmt(x, f="{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f.format(x)


def table(rows: list[dict]) -> list[str]:
    lines = ["| controller | grokked | step of grokking per seed | final train acc | final test acc | diverged | "
             "stopped early at | interventions per run | lr range over runs | median p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        g = [r["grok_step"] for r in rs]
        tr = np.array([r["final_train_acc"] for r in rs])
        te = np.array([r["final_test_acc"] for r in rs])
        stops = [r["stop_step"] for r in rs if r["stop_step"] is not None]
        lines.append(
            f"| {arm} | {sum(x is not None for x in g)}/{len(rs)} | "
            + ", ".join("never" if x is None else str(x) for x in g)
            + f" | {tr.mean():.3f} ({', '.join(f'{x:.2f}' for x in tr)}) | {te.mean():.3f} "
            f"({', '.join(f'{x:.2f}' for x in te)}) | {sum(r['diverged'] for r in rs)}/{len(rs)} | "
            + (", ".join(map(str, stops)) if stops else "–")
            + f" | {', '.join(str(r['interventions']) for r in rs)} | "
            f"{_fmt(min(r['min_lr'] for r in rs), '{:.3g}')} – {_fmt(max(r['max_lr'] for r in rs), '{:.3g}')} | "
            f"{_fmt(float(np.nanmedian([r['median_p'] for r in rs])), '{:.3g}')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="controller-study")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--every", type=int, default=5, help="gradient-noise measurement every N steps (5)")
    ap.add_argument("--probe", type=int, default=64, help="training pairs whose per-example gradients are sampled")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--reuse", action="store_true", help="re-analyse the runs recorded under OUT/runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a busy 2-core machine two threads ran this model 4x slower)")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)

    out = Path(a.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for arm in a.arms:
        for seed in range(a.seeds):
            r = run_arm(arm, seed, out / "runs" / f"{arm}-seed{seed}", a, a.reuse)
            results.setdefault(arm, []).append(r)
    seconds = time.perf_counter() - t0
    rows = [r["row"] for arm in results for r in results[arm]]

    head = [
        "# Controller study: the grokking recipe with and without the framework's controllers", "",
        f"{a.seeds} seeds per arm, {a.steps} steps, modular addition mod 71, width {a.width}, Adam lr 1e-3, "
        f"weight decay 2e-4, full batch; test accuracy every 5 steps; gradient noise from per-example gradients "
        f"of {a.probe} training pairs every {a.every} steps (b = 1; the controllers' default key, canonical C); "
        f"every controller at its framework defaults. Wall time {seconds / 60:.1f} min on this machine.", "",
    ]
    lines = head + table(rows) + [
        "", "Grokked: test accuracy >= 0.95 at an evaluation. Diverged: training loss non-finite or > 10x its "
        "initial value. Final accuracies at the last step trained. median p: median over the run's "
        "measurements of p = C/(1+C), C clipped at 0.", ""]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps({
        "config": {"seeds": a.seeds, "steps": a.steps, "width": a.width, "p": 71, "every": a.every,
                   "probe": a.probe, "lr": 1e-3, "weight_decay": 2e-4, "seconds": seconds},
        "runs": rows}, indent=1, default=lambda x: None))

    from phasewatch.plot import save
    from phasewatch.plot.controls import controller_study

    fig = controller_study({arm: [{**r["row"], "analysis": r["analysis"], "rule": RULES.get(arm)}
                                  for r in results[arm]] for arm in results})
    for ext in ("pdf", "png"):
        save(fig, out / f"controller_study.{ext}")
    print("\n".join(lines))
    print(f"wrote {out}/study.md, study.json, controller_study.pdf/.png ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
