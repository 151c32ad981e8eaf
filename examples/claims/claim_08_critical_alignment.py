"""Claim 8: the three critical observables align rarely, and the tail index α falls in critical windows."""

from __future__ import annotations

import json
import math
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.analysis.curvature import CriticalityConstants, criticality
from phasewatch.workflows.claims import reproduction, result, save_figure
from phasewatch.workflows.notes import modular_runs, modular_setup

CLAIM = ("all three critical observables (C ≈ 1, S ≈ 0, |dρ/dt| large) align rarely: P ≈ 0.001–0.002, "
         "within 3× of the product of the marginals; α falls by 0.1–0.3 during critical windows")
SOURCE = "note 001"

#: The runs.  MLP family: a tanh MLP 20-64-64-5 on a teacher task (N = 256 training points), MSE,
#: plain SGD at batch sizes that put the training batch's C near 1 (32, 64) and full-batch GD
#: (256, the edge of stability), two learning rates.  Grokking: the demo model (x W)^2 V on
#: (a+b) mod 71, Adam, full batch (fast NTK growth while features form).  Every run probes C
#: (per-example gradients on 64 training points), λ_max (Lanczos on the training set) and the NTK
#: (on the same 64 points) on one schedule, every ``every`` steps.
CONFIG = {
    False: {"batches": (32, 64, 256), "lrs": (0.5, 1.0), "seeds": (0, 1, 2, 3), "steps": 1000, "every": 10,
            "grok": {"width": 128, "steps": 300}},
    True: {"batches": (32, 256), "lrs": (0.5, 1.0), "seeds": (0,), "steps": 600, "every": 10,
           "grok": None},
}
N_TRAIN, D_IN, N_CLS, N_PROBE = 256, 20, 5, 64
HALF_WINDOW = 1  # a critical window: the critical probes ± this many probes (± 10 steps) of the same run
K = CriticalityConstants()  # the box 0.8 ≤ C ≤ 1.2, |S| ≤ 0.1, |r| > 0.5 (the analysis's constants)
P_RANGE = (0.0005, 0.004)  # "P ≈ 0.001–0.002", with slack
RATIO_RANGE = (1 / 3, 3.0)
DROP_RANGE = (0.1, 0.3)  # α falls by this much in critical windows
MIN_JOINT = 5  # fewer joint events than this: too few to tell
N_BOOT = 2000


# --------------------------------------------------------------------------------------------- #
# the runs
# --------------------------------------------------------------------------------------------- #
def _teacher(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, D_IN, generator=g)
    w1 = torch.randn(D_IN, 32, generator=g) / D_IN ** 0.5 * 2
    w2 = torch.randn(32, N_CLS, generator=g) / 32 ** 0.5 * 2
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    return x, torch.nn.functional.one_hot(y, N_CLS).float()


def _mse(out, target):
    return 0.5 * ((out - target) ** 2).sum(-1).mean()


def _mse_each(out, target):
    return 0.5 * ((out - target) ** 2).sum(-1)


def train_mlp(path: Path, batch: int, lr: float, seed: int, steps: int, every: int) -> dict:
    """SGD on the teacher task with batches of ``batch`` (without replacement within a step; full
    batch at N), all three probes every ``every`` steps."""
    import torch

    x, y = _teacher(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, N_CLS))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if path.exists():
        shutil.rmtree(path)
    g = torch.Generator().manual_seed(1000 + seed)
    with phasewatch.Recorder(path, model, opt, k=16, seeds={"seed": seed}, batch_size=batch,
                             meta={"task": "teacher MLP", "batch": batch},
                             grad_samples_every=every, grad_probe=(x[:N_PROBE], y[:N_PROBE]), grad_loss=_mse_each,
                             curvature_every=every, curvature_batch=(x, y), curvature_loss=_mse, curvature_tol=3e-3,
                             ntk_inputs=x[:N_PROBE]) as rec:
        for _ in range(steps):
            idx = torch.randperm(N_TRAIN, generator=g)[:batch] if batch < N_TRAIN else slice(None)
            loss = _mse(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            rec.loss(loss)
            opt.step()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y.argmax(1)).float().mean().item()
        rec.log(steps, train_acc=acc)
    return {"train_acc": acc, "final_loss": loss.item()}


def train_grok(path: Path, width: int, steps: int, every: int) -> dict:
    """The demo grokking run (Adam lr 1e-3, weight decay 2e-4, full batch) with the three probes."""
    import torch

    from phasewatch.workflows.demo import modular_addition, train_grokking

    p = 71
    data = modular_addition(p, 0.4, 0)
    target = torch.nn.functional.one_hot(data.train_y, p).float() - 1.0 / p
    if path.exists():
        shutil.rmtree(path)
    s = train_grokking(path, p=p, width=width, steps=steps, lr=1e-3, weight_decay=2e-4, seed=0,
                       grad_samples_every=every, grad_probe=N_PROBE,
                       recorder_kwargs={"curvature_every": every, "curvature_batch": (data.train_x[:512], target[:512]),
                                        "curvature_loss": lambda o, t: ((o - t) ** 2).sum(-1).mean(),
                                        "curvature_tol": 3e-3, "ntk_inputs": data.train_x[:N_PROBE], "ntk_method": "jacobian",
                                        "batch_size": len(data.train_x)})
    return {**s, "batch": len(data.train_x)}


# --------------------------------------------------------------------------------------------- #
# statistics (plain numpy)
# --------------------------------------------------------------------------------------------- #
def probe_table(an, batch: int) -> dict[str, np.ndarray]:
    """The per-probe observables of one analysed run: C of the training batch C_B = B·C₁ (C₁ the
    per-example C of the probe), S, r = dρ/dt, α, and the three criticality flags.  The analysis's
    own ``C``/``all_critical`` columns use the probe's C (b = 1 here): kept as ``C1``/``all_tool``."""
    cv = an.curvature
    c1 = np.asarray(cv["C"], float)
    cb = batch * c1
    s = np.asarray(cv["S"], float)
    r = np.asarray(cv["ntk_rate"], float)
    phi, all3 = criticality(cb, s, r, K)
    with np.errstate(invalid="ignore"):
        fc = (cb >= K.c_lo) & (cb <= K.c_hi)
        fs = np.abs(s) <= K.s_max
        fr = np.abs(r) > K.r_min
        fc1 = (c1 >= K.c_lo) & (c1 <= K.c_hi)
    rank = np.asarray(cv["ntk_rank"], float)
    rank_jump = np.r_[False, np.diff(rank) != 0] & np.isfinite(rank)
    return {"step": np.asarray(cv["step"], int), "C_B": cb, "C1": c1, "S": s, "r": r,
            "alpha": np.asarray(cv["alpha"], float), "phi": phi,
            "complete": np.isfinite(cb) & np.isfinite(s) & np.isfinite(r),
            "fC": fc, "fS": fs, "fr": fr, "all": all3, "fC1": fc1,
            "all_tool": np.asarray(cv["all_critical"], bool), "rank_jump": rank_jump}


def counts(t: dict[str, np.ndarray]) -> np.ndarray:
    """[n complete probes, #C critical, #S critical, #r critical, #all three, #≥2 of 3, #all (per-example C)]."""
    m = t["complete"]
    k = t["fC"].astype(int) + t["fS"].astype(int) + t["fr"].astype(int)
    return np.array([m.sum(), (t["fC"] & m).sum(), (t["fS"] & m).sum(), (t["fr"] & m).sum(), (t["all"] & m).sum(),
                     ((k >= 2) & m).sum(), (t["fC1"] & t["fS"] & t["fr"] & m).sum()], dtype=float)


def rates(c: np.ndarray) -> dict[str, float]:
    """Pooled frequencies from summed :func:`counts`: marginals, joint, product, ratio joint/product."""
    n = c[0]
    if n <= 0:
        return {k: math.nan for k in ("P_C", "P_S", "P_r", "P_all", "product", "ratio", "P_2of3", "P_all_C1")}
    pc, ps, pr, pa = c[1] / n, c[2] / n, c[3] / n, c[4] / n
    prod = pc * ps * pr
    return {"P_C": pc, "P_S": ps, "P_r": pr, "P_all": pa, "product": prod,
            "ratio": pa / prod if prod > 0 else math.nan, "P_2of3": c[5] / n, "P_all_C1": c[6] / n}


def within_run_expected(per_run: np.ndarray) -> float:
    """Joint events expected if the three flags were independent *within* each run:
    Σ_runs n_r·P_r(C)·P_r(S)·P_r(r) (the pooled product also counts differences between runs)."""
    n = per_run[:, 0]
    ok = n > 0
    return float(np.sum(per_run[ok, 1] * per_run[ok, 2] * per_run[ok, 3] / n[ok] ** 2))


def dilate(flag: np.ndarray, half: int) -> np.ndarray:
    """A window of ± ``half`` probes around every True of ``flag`` (one run's probes in order)."""
    f = np.asarray(flag, bool)
    out = f.copy()
    for j in range(1, half + 1):
        out[j:] |= f[:-j]
        out[:-j] |= f[j:]
    return out


def alpha_shift(tabs: list[dict], key: str, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Per run: (median α in the windows − median α outside, number of in-window probes with a finite α);
    NaN/0 where a run has no window or no outside probe with a finite α."""
    d, w = np.full(len(tabs), np.nan), np.zeros(len(tabs))
    for i, t in enumerate(tabs):
        win = dilate(t[key] & t["complete"], half)
        a = t["alpha"]
        fin = np.isfinite(a)
        if (win & fin).any() and (~win & fin).any():
            d[i] = np.median(a[win & fin]) - np.median(a[~win & fin])
            w[i] = (win & fin).sum()
    return d, w


def weighted(d: np.ndarray, w: np.ndarray) -> float:
    ok = np.isfinite(d) & (w > 0)
    return float(np.sum(d[ok] * w[ok]) / np.sum(w[ok])) if ok.any() else math.nan


def run_bootstrap(per_run: np.ndarray, d_all: np.ndarray, w_all: np.ndarray, d_two: np.ndarray, w_two: np.ndarray,
                  seed: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals from resampling whole runs (probes within a run are autocorrelated,
    so runs, not probes, are the independent units): P_all, ratio, Δα (all three) and Δα (≥ 2 of 3)."""
    rng = np.random.default_rng(seed)
    m = len(per_run)
    out = {"P_all": [], "ratio": [], "P_2of3": [], "dalpha_all": [], "dalpha_2of3": []}
    for _ in range(N_BOOT):
        i = rng.integers(0, m, m)
        r = rates(per_run[i].sum(0))
        out["P_all"].append(r["P_all"])
        out["ratio"].append(r["ratio"])
        out["P_2of3"].append(r["P_2of3"])
        out["dalpha_all"].append(weighted(d_all[i], w_all[i]))
        out["dalpha_2of3"].append(weighted(d_two[i], w_two[i]))
    ci = {}
    for k, v in out.items():
        if k.startswith("dalpha") and np.sum(np.isfinite(d_all if k == "dalpha_all" else d_two)) < 2:
            ci[k] = (math.nan, math.nan)  # one run (or none) with a window: nothing to resample
            continue
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]
        ci[k] = (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if v.size >= N_BOOT // 2 \
            else (math.nan, math.nan)
    return ci


def poisson_upper(k: int, level: float = 0.95) -> float:
    """One-sided upper bound of a Poisson mean after observing k events: χ²_{level}(2k+2)/2."""
    from scipy import stats

    return float(stats.chi2.ppf(level, 2 * k + 2) / 2)


# --------------------------------------------------------------------------------------------- #
# the experiment
# --------------------------------------------------------------------------------------------- #
def _cached(path: Path, config: dict, train) -> tuple[dict, bool]:
    """Train into ``path`` unless a finished run with the same configuration is there (its
    ``<path>.summary.json`` holds the configuration and the training summary).  Returns (summary, reused)."""
    done = path.with_name(path.name + ".summary.json")
    if done.exists() and (path / "meta.json").exists():
        old = json.loads(done.read_text())
        if old.get("config") == config:
            return old["summary"], True
    c0 = time.process_time()
    s = train()
    s = {**s, "cpu_seconds": time.process_time() - c0}
    done.write_text(json.dumps({"config": config, "summary": s}))
    return s, False


def _record(out_dir: Path, quick: bool, log) -> list[dict]:
    cfg = CONFIG[bool(quick)]
    base = out_dir / "runs"
    base.mkdir(parents=True, exist_ok=True)
    runs = []
    for batch in cfg["batches"]:
        for lr in cfg["lrs"]:
            for seed in cfg["seeds"]:
                name = f"mlp-b{batch}-lr{lr:g}-seed{seed}"
                conf = {"family": "mlp", "batch": batch, "lr": lr, "seed": seed, "steps": cfg["steps"],
                        "every": cfg["every"], "n_train": N_TRAIN, "n_probe": N_PROBE}
                s, reused = _cached(base / name, conf, partial(train_mlp, base / name, batch, lr, seed, cfg["steps"],
                                                               cfg["every"]))
                runs.append({"name": name, **conf, **s, "reused": reused})
                log(f"  {name}: " + ("reused" if reused else f"{s['cpu_seconds']:.1f} s CPU"))
    if cfg["grok"]:
        name = "grok-wd"
        conf = {"family": "grokking", "lr": 1e-3, "seed": 0, "every": cfg["every"], "n_probe": N_PROBE, **cfg["grok"]}
        s, reused = _cached(base / name, conf, partial(train_grok, base / name, cfg["grok"]["width"],
                                                       cfg["grok"]["steps"], cfg["every"]))
        runs.append({"name": name, **conf, **s, "reused": reused})
        log(f"  {name}: " + ("reused" if reused else f"{s['cpu_seconds']:.1f} s CPU"))
    return runs


def _fmt_ci(ci) -> str:
    return "[–]" if not all(math.isfinite(x) for x in ci) else f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def _notes_protocol(out_dir: Path, quick: bool) -> dict:
    """What of note 001's protocol runs with the notes' estimator: C in its critical band and the
    notes' tail index (Hill on the top 100 |gradient coordinates|, clipped to [1, 2]) there."""
    runs = modular_runs(out_dir, quick)
    c = np.concatenate([r["log"]["C_notes"] for r in runs])
    a = np.concatenate([r["log"]["alpha"] for r in runs])
    band = (c >= 0.8) & (c <= 1.2)
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import WIDTHS, paper_style

    with paper_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(WIDTHS["text"], 2.2), layout="constrained")
    for r in runs:
        ls = "-" if r["group"] == "wd" else "--"
        ax.plot(r["log"]["step"], r["log"]["C_notes"], ls, color="C0", lw=0.8)
        bx.plot(r["log"]["step"], r["log"]["alpha"], ls, color="C1", lw=0.8)
    ax.axhspan(0.8, 1.2, color="C3", alpha=0.1, lw=0)
    ax.set(xlabel="step", ylabel="C (notes: 20 minibatches, naive)")
    bx.set(xlabel="step", ylabel="α (notes' Hill, clipped to [1, 2])", ylim=(0.9, 2.1))
    fig_path = save_figure(fig, out_dir, "notes_protocol")
    numbers = {"measurements": int(c.size), "in_C_band": int(band.sum()),
               "C_notes_range": [float(np.nanmin(c)), float(np.nanmax(c))],
               "alpha_notes_median": float(np.nanmedian(a)), "alpha_notes_fraction_at_clip_2": float(np.mean(a >= 2.0)),
               "delta_alpha_in_band": float(np.nanmedian(a[band]) - np.nanmedian(a[~band])) if band.any() else None}
    why = (f"{int(band.sum())}/{c.size} measurements have the notes' C in the critical band 0.8–1.2 (C ranges "
           f"{numbers['C_notes_range'][0]:.3g}–{numbers['C_notes_range'][1]:.3g}); the notes' α is at its clip 2 in "
           f"{100 * numbers['alpha_notes_fraction_at_clip_2']:.0f}% of measurements, so it cannot fall by 0.1–0.3 there "
           "unless it leaves the clip; the three-way alignment needs the note's S (Hessian) and dρ/dt (NTK) "
           "computed its way, and the note's windowing and thresholds for them are not stated in the public "
           "write-ups: it would take the note's own code for S and ρ (our beyond part runs our versions)")
    if quick:
        why += " (quick mode: CI-sized)"
    return reproduction(modular_setup(quick) + "; critical band of C as DEFINITIONS §6 (0.8 ≤ C ≤ 1.2); α by the "
                        "notes' Hill (top 100 |g| of one minibatch gradient, clipped to [1, 2])",
                        "not feasible here", why, numbers, fig_path)


def run(out_dir, quick: bool, log=lambda *a: None) -> dict:
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the time budget is for one core
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        runs = _record(out_dir, quick, log)
    finally:
        torch.set_num_threads(threads)
    t_rec, c_rec = time.perf_counter() - t0, time.process_time() - c0
    tabs = []
    for r in runs:
        an = phasewatch.analyze(out_dir / "runs" / r["name"], window=10)
        tabs.append(probe_table(an, r["batch"]))
    per_run = np.stack([counts(t) for t in tabs])
    tot = per_run.sum(0)
    rt = rates(tot)
    n, n_joint, n_two = int(tot[0]), int(tot[4]), int(tot[5])
    expected_pooled = rt["product"] * n
    expected_within = within_run_expected(per_run)
    d_all, w_all = alpha_shift(tabs, "all", HALF_WINDOW)
    two = [{**t, "two": (t["fC"].astype(int) + t["fS"].astype(int) + t["fr"].astype(int)) >= 2} for t in tabs]
    d_two, w_two = alpha_shift(two, "two", HALF_WINDOW)
    da_all, da_two = weighted(d_all, w_all), weighted(d_two, w_two)
    ci = run_bootstrap(per_run, d_all, w_all, d_two, w_two)
    a_all = np.concatenate([t["alpha"] for t in tabs])
    frac_a_gt2 = float(np.mean(a_all[np.isfinite(a_all)] > 2)) if np.isfinite(a_all).any() else math.nan
    r_rank = int(sum((t["fr"] & t["rank_jump"] & t["complete"]).sum() for t in tabs))
    pairs = {k: int(sum((t[a] & t[b] & t["complete"]).sum() for t in tabs))
             for k, (a, b) in {"C&S": ("fC", "fS"), "C&r": ("fC", "fr"), "S&r": ("fS", "fr")}.items()}

    per_run_rows = []
    for r, c in zip(runs, per_run):
        q = rates(c)
        per_run_rows.append({"name": r["name"], "probes": int(c[0]), "P_C": q["P_C"], "P_S": q["P_S"], "P_r": q["P_r"],
                             "joint": int(c[4]), "two_of_three": int(c[5]), "final_loss": r.get("final_loss"),
                             "grok_step": r.get("grok_step"), "cpu_seconds": round(r["cpu_seconds"], 1),
                             "reused": r["reused"]})
    by_setup: dict[str, np.ndarray] = {}
    for r, c in zip(runs, per_run):
        key = f"B{r['batch']} lr{r['lr']:g}" if r["family"] == "mlp" else r["family"]
        by_setup[key] = by_setup.get(key, 0) + c
    setups = {k: {"probes": int(c[0]), "joint": int(c[4]), "P_all": rates(c)["P_all"], "ratio": rates(c)["ratio"]}
              for k, c in by_setup.items()}
    hi = max(setups, key=lambda k: setups[k]["P_all"])
    numbers = {"probes": n, "runs": len(runs), **{k: rt[k] for k in ("P_C", "P_S", "P_r", "P_all", "product", "ratio",
                                                                      "P_2of3", "P_all_C1")},
               "joint_count": n_joint, "two_of_three_count": n_two, "pair_counts": pairs,
               "expected_joint_pooled_independence": expected_pooled,
               "expected_joint_within_run_independence": expected_within,
               "joint_poisson_upper95": poisson_upper(n_joint),
               "ratio_within_run": n_joint / expected_within if expected_within > 0 else math.nan,
               "by_setup": setups,
               "P_all_ci": ci["P_all"], "ratio_ci": ci["ratio"], "P_2of3_ci": ci["P_2of3"],
               "dalpha_all3": da_all, "dalpha_all3_ci": ci["dalpha_all"], "dalpha_all3_runs": int(np.sum(w_all > 0)),
               "dalpha_all3_probes": int(w_all.sum()),
               "dalpha_2of3": da_two, "dalpha_2of3_ci": ci["dalpha_2of3"], "dalpha_2of3_runs": int(np.sum(w_two > 0)),
               "dalpha_2of3_probes": int(w_two.sum()),
               "alpha_fraction_above_2": frac_a_gt2, "alpha_median": float(np.nanmedian(a_all)),
               "r_critical_at_ntk_rank_change": r_rank,
               "record_seconds": t_rec, "record_cpu_seconds": c_rec, "reused_runs": sum(r["reused"] for r in runs),
               "per_run": per_run_rows}
    fig_path = _figure(out_dir, runs, tabs, d_all, w_all, d_two, w_two)

    # ------------------------------------------------------------------ verdict
    desc = (f"{n} probes in {len(runs)} runs: P(C_B crit) = {rt['P_C']:.3f}, P(S crit) = {rt['P_S']:.3f}, "
            f"P(r crit) = {rt['P_r']:.3f}; all three at {n_joint} probes, P = {rt['P_all']:.4f} "
            f"{_fmt_ci(ci['P_all'])}, product of marginals {rt['product']:.2g} ({expected_pooled:.1f} events; "
            f"{expected_within:.1f} under independence within runs), ratio {rt['ratio']:.3g} {_fmt_ci(ci['ratio'])}; "
            f"P(all) by setup from {min(v['P_all'] for v in setups.values()):.3g} to {setups[hi]['P_all']:.3g} ({hi}); "
            f"pairs C&S {pairs['C&S']}, C&r {pairs['C&r']}, S&r {pairs['S&r']}; ≥2 of 3 at {n_two} probes; "
            f"with the analysis's own C (per-example C₁) all three hold at {int(tot[6])} probes; "
            f"Δα in windows (all three ±{HALF_WINDOW} probe) {da_all:.3g} {_fmt_ci(ci['dalpha_all'])}, "
            f"(≥2 of 3) {da_two:.3g} {_fmt_ci(ci['dalpha_2of3'])} over {int(np.sum(w_two > 0))} runs; "
            f"{100 * frac_a_gt2:.0f}% of α > 2 (no evidence of a stable heavy tail)")
    crit = (f"holds iff P(all) in [{P_RANGE[0]:g}, {P_RANGE[1]:g}], joint/product in [1/3, 3] and Δα in "
            f"[−{DROP_RANGE[1]:g}, −{DROP_RANGE[0]:g}] (point estimates), with ≥ {MIN_JOINT} joint events")
    if n_joint < MIN_JOINT:
        verdict = "inconclusive"
        why = (f"only {n_joint} joint event(s) (95% Poisson upper bound {poisson_upper(n_joint):.1f}, "
               f"P(all) ≤ {poisson_upper(n_joint) / max(n, 1):.2g}): too few to tell; " + desc)
    else:
        ok_p = P_RANGE[0] <= rt["P_all"] <= P_RANGE[1]
        ok_r = math.isfinite(rt["ratio"]) and RATIO_RANGE[0] <= rt["ratio"] <= RATIO_RANGE[1]
        ok_a = math.isfinite(da_all) and -DROP_RANGE[1] <= da_all <= -DROP_RANGE[0]
        verdict = "holds" if ok_p and ok_r and ok_a else "fails"
        p_dir = "above" if rt["P_all"] > P_RANGE[1] else "below"
        a_dir = "α rises" if da_all > 0 else "α falls by more than 0.3" if da_all < -DROP_RANGE[1] else \
            "α falls by less than 0.1" if math.isfinite(da_all) else "no Δα"
        bad = [s for s, ok in ((f"P(all) {p_dir} the range", ok_p), ("ratio out of [1/3, 3]", ok_r),
                               (f"{a_dir} in the windows", ok_a)) if not ok]
        why = desc + ("" if not bad else "; " + ", ".join(bad))
    why += f" ({crit})"
    if quick:
        why += f" (quick mode: {len(runs)} runs, no grokking run; indicative only)"
    cfg = CONFIG[bool(quick)]
    setup = (f"tanh MLP 20-64-64-5 on a teacher task (N = {N_TRAIN}), MSE, SGD at batch sizes {cfg['batches']} "
             f"({N_TRAIN} = full-batch GD at the edge of stability) × lr {cfg['lrs']} × seeds {cfg['seeds']}, "
             f"{cfg['steps']} steps"
             + (f"; plus the demo grokking run ((x W)^2 V, p = 71, width {cfg['grok']['width']}, Adam, "
                f"{cfg['grok']['steps']} steps)" if cfg["grok"] else "")
             + f". Every {cfg['every']} steps, on one schedule: C from {N_PROBE} per-example gradients, judged as "
             "C_B = B·C₁ (the training batch's SNR; the analysis's C column is the probe's C₁), S = 2/η − λ_max "
             "(Lanczos, training set; Adam: preconditioned), r = dρ/dt of the NTK log-det on the same "
             f"{N_PROBE} inputs (backward difference per step). Critical: 0.8 ≤ C_B ≤ 1.2, |S| ≤ 0.1, |r| > 0.5. "
             f"Critical window (the claim's): probes with all three critical ± {HALF_WINDOW} probe; also ≥ 2 of 3. "
             "α: Hill on the top 10% of the last 100 gradient norms; Δα = run-weighted mean of per-run "
             "(median α in windows − median outside). CIs: 95% bootstrap over whole runs")
    res = result(CLAIM, SOURCE, setup, verdict, why, numbers, fig_path,
                 reproduction=_notes_protocol(out_dir, quick))
    (out_dir / "numbers.json").write_text(json.dumps(res["numbers"], indent=1))
    return res


def _figure(out_dir: Path, runs: list[dict], tabs: list[dict], d_all, w_all, d_two, w_two) -> Path:
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import PALETTE, WIDTHS, paper_style

    # the run shown: most joint events, then most ≥2-of-3 probes
    def score(t):
        k = t["fC"].astype(int) + t["fS"].astype(int) + t["fr"].astype(int)
        return (int((t["all"] & t["complete"]).sum()), int(((k >= 2) & t["complete"]).sum()))

    i = max(range(len(tabs)), key=lambda j: score(tabs[j]))
    t, name = tabs[i], runs[i]["name"]
    with paper_style():
        fig = plt.figure(figsize=(WIDTHS["full"], 4.2), layout="constrained")
        gs = fig.add_gridspec(3, 2, width_ratios=[2.2, 1])
        axs = [fig.add_subplot(gs[0, 0])]
        axs += [fig.add_subplot(gs[j, 0], sharex=axs[0]) for j in (1, 2)]
        bx = fig.add_subplot(gs[:, 1])
    st = t["step"]
    k = t["fC"].astype(int) + t["fS"].astype(int) + t["fr"].astype(int)
    rmax = max(1.5 * K.r_min, 1.1 * float(np.nanmax(np.abs(t["r"])))) if np.isfinite(t["r"]).any() else 1.5 * K.r_min
    spec = [("C_B", "C_B = B·C₁", [(K.c_lo, K.c_hi)], "log"),
            ("S", "S = 2/η − λ_max", [(-K.s_max, K.s_max)], "linear"),
            ("r", "r = dρ/dt", [(K.r_min, rmax), (-rmax, -K.r_min)], "linear")]
    for ax, (col, label, bands, scale) in zip(axs, spec):
        y = t[col]
        if scale == "log":
            y = np.where(y > 0, y, np.nan)  # C clipped to 0 is not drawn on the log axis
        ax.plot(st, y, color=PALETTE[0], lw=0.8, marker=".", ms=2)
        for band in bands:
            ax.axhspan(*band, color=PALETTE[2], alpha=0.25, lw=0)
        for s in st[(k >= 2) & t["complete"]]:
            ax.axvline(s, color=PALETTE[1], lw=0.5, ls="--")
        for s in st[t["all"] & t["complete"]]:
            ax.axvline(s, color=PALETTE[3], lw=1.2)
        ax.set_yscale(scale)
        ax.set_ylabel(label)
        ax.set_xlim(0, st[-1] + st[0])
    axs[0].set_title(f"{name}: critical bands shaded; red: all three, orange dashed: ≥ 2 of 3", fontsize="small")
    axs[-1].set_xlabel("step")
    for ax in axs[:-1]:
        ax.tick_params(labelbottom=False)
    # α inside vs outside, per run
    for j, (d, w, lab) in enumerate(((d_all, w_all, "all three"), (d_two, w_two, "≥ 2 of 3"))):
        ok = np.isfinite(d)
        xs = np.full(ok.sum(), j) + np.linspace(-0.15, 0.15, max(ok.sum(), 1))[: ok.sum()]
        bx.scatter(xs, d[ok], s=6 + 2 * np.sqrt(w[ok]), color=PALETTE[j], label=f"{lab} ({ok.sum()} runs)")
        if ok.any():
            bx.hlines(weighted(d, w), j - 0.25, j + 0.25, color="k", lw=1.5)
    bx.axhspan(-DROP_RANGE[1], -DROP_RANGE[0], color=PALETTE[2], alpha=0.25, lw=0, label="claimed fall")
    bx.axhline(0, color="0.5", lw=0.5)
    bx.set_xticks([0, 1], ["all three", "≥ 2 of 3"])
    bx.set_xlim(-0.6, 1.6)
    bx.set_yscale("symlog", linthresh=1)
    bx.set_ylabel("α in windows − α outside (per run; bar: weighted mean)")
    bx.legend(fontsize="x-small", loc="lower left")
    return save_figure(fig, out_dir, "critical_alignment")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="claim08-out")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t = time.perf_counter()
    res = run(a.out, a.quick, log=print)
    print(json.dumps({k: res[k] for k in ("verdict", "reason")}, indent=1, ensure_ascii=False))
    print(f"{time.perf_counter() - t:.0f} s")
