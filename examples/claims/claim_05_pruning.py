"""Claim 5: pruning raises the consolidation ratio: winning tickets p ≈ 0.65–0.70, random masks 0.35–0.40."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np

import phasewatch
from phasewatch.workflows.claims import reproduction, result, save_figure
from phasewatch.workflows.notes import N_SAMPLES, minibatch_gradients, notes_ratio

CLAIM = ("pruning raises the consolidation ratio: winning tickets (magnitude pruning with rewinding) have "
         "p ≈ 0.65–0.70 against 0.35–0.40 for random masks at 90% sparsity")
SOURCE = "notes 000/004"

#: full and quick configurations.  A teacher task whose label depends on 4 of the 128 inputs, with
#: fresh training examples every step (no overfitting): a 90%-sparse random mask connects each
#: first-layer unit to ~0.4 relevant inputs, magnitude pruning keeps the relevant ones.
CONFIG = {
    False: {"seeds": [0, 1, 2], "steps": 1000, "rounds": 3, "width": 128, "every": 50, "probe": 512},
    True: {"seeds": [0, 1], "steps": 400, "rounds": 1, "width": 128, "every": 40, "probe": 256},
}
D_IN, K_REL, N_CLS, BATCH, LR, DENSITY, REWIND, N_TEST = 128, 4, 4, 64, 2e-3, 0.1, 20, 4000
HOLDS_TICKET, HOLDS_RANDOM = (0.60, 0.75), (0.30, 0.45)


class Task:
    """Teacher y = argmax(tanh(x_S W₁) W₂) on the first K_REL of D_IN Gaussian inputs; training
    batches are drawn fresh each step (from a seeded generator), the probe and test sets are fixed."""

    def __init__(self, seed: int, n_probe: int):
        import torch

        g = torch.Generator().manual_seed(10_000 + seed)
        self.w1 = torch.randn(K_REL, 16, generator=g) / K_REL ** 0.5 * 2
        self.w2 = torch.randn(16, N_CLS, generator=g) / 16 ** 0.5 * 2
        self.x_probe, self.y_probe = self.sample(n_probe, g)
        self.x_test, self.y_test = self.sample(N_TEST, g)

    def sample(self, n: int, g):
        import torch

        x = torch.randn(n, D_IN, generator=g)
        return x, (torch.tanh(x[:, :K_REL] @ self.w1) @ self.w2).argmax(1)


def _mlp(width: int):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(D_IN, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, N_CLS))


PRUNABLE = ("0.weight", "2.weight", "4.weight")  # the weight matrices; biases are kept


def train(task: Task, state: dict, masks: dict | None, steps: int, seed: int, path: Path | None = None,
          every: int = 40, width: int = 128, rewind: int | None = None) -> dict:
    """Adam (no weight decay) from ``state``; ``masks`` applied with ``torch.nn.utils.prune`` (the
    optimizer moves ``weight_orig``, whose gradient is masked, so pruned weights stay 0 and the
    recorder's gradient statistics are over the unpruned coordinates).  Recorded if ``path``.
    Returns test/train accuracy, the trained dense-layout weights and θ at step ``rewind``."""
    import torch
    from torch.nn.utils import prune

    torch.manual_seed(seed)
    model = _mlp(width)
    model.load_state_dict(state)
    if masks:
        for name in PRUNABLE:
            prune.custom_from_mask(model.get_submodule(name.split(".")[0]), "weight", masks[name])
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)  # the same batches for every arm of a seed
    ce = torch.nn.functional.cross_entropy
    rec = None
    if path is not None:
        if path.exists():
            shutil.rmtree(path)
        rec = phasewatch.Recorder(path, model, opt, k=16, seeds={"seed": seed}, batch_size=BATCH,
                                  meta={"density": None if not masks else DENSITY},
                                  grad_samples_every=_schedule(steps, every), grad_probe=(task.x_probe, task.y_probe),
                                  grad_loss=lambda o, t: ce(o, t, reduction="none"))
    early = None
    try:
        for step in range(steps):
            if step == rewind:
                early = _dense_state(model)
            x, y = task.sample(BATCH, g)
            opt.zero_grad(set_to_none=True)
            loss = ce(model(x), y)
            loss.backward()
            if rec is not None:
                rec.loss(loss)
            opt.step()
        with torch.no_grad():
            test_acc = (model(task.x_test).argmax(1) == task.y_test).float().mean().item()
        if rec is not None:
            rec.log(steps, test_acc=test_acc)
    finally:
        if rec is not None:
            rec.close()
    return {"test_acc": test_acc, "final": _dense_state(model), "early": early}


def _schedule(steps: int, every: int) -> list[int]:
    """Gradient-sample steps: densely at the start (where p changes fastest), then every ``every``."""
    return sorted({s for s in (1, 5, 10, 20, 35) if s < every} | set(range(every, steps + 1, every)))


def _dense_state(model) -> dict:
    """The model's state in the unpruned layout: ``weight = weight_orig ⊙ weight_mask``."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in [k for k in sd if k.endswith("_orig")]:
        sd[k[:-5]] = sd.pop(k) * sd.pop(k[:-5] + "_mask")
    return sd


def magnitude_masks(weights: dict, masks: dict | None, density: float) -> dict:
    """Per layer, keep the ``density`` fraction (of the whole tensor) of largest |w| among the
    currently unpruned weights (layer-wise magnitude pruning, Frankle & Carbin 2019)."""
    import torch

    out = {}
    for name in PRUNABLE:
        w = weights[name].abs().reshape(-1).clone()
        if masks is not None:
            w[masks[name].reshape(-1) == 0] = -1.0  # already pruned: never kept
        k = int(round(density * w.numel()))
        m = torch.zeros_like(w)
        m[torch.topk(w, k).indices] = 1.0
        out[name] = m.view(weights[name].shape)
    return out


def random_masks(like: dict, seed: int) -> dict:
    """Uniformly random masks with the same number of kept weights per layer as ``like``."""
    import torch

    g = torch.Generator().manual_seed(50_000 + seed)
    out = {}
    for name in PRUNABLE:
        n, k = like[name].numel(), int(like[name].sum())
        m = torch.zeros(n)
        m[torch.randperm(n, generator=g)[:k]] = 1.0
        out[name] = m.view(like[name].shape)
    return out


def _pb(c1):
    """p of the training batch from the per-example ratio: C_B = B·C₁, p = C_B/(1 + C_B) (DEFINITIONS §2)."""
    cb = BATCH * np.asarray(c1, float)
    return cb / (1 + cb)


def _p_series(path: Path) -> dict:
    an = phasewatch.analyze(path, window=10)
    pr = an.probes
    c1 = np.asarray(pr["C_per_example"], float)
    gs = phasewatch.open_run(path).table("grad_samples")  # raw statistics, for the pooled estimate
    return {"step": np.asarray(pr["step"], int), "p_B": _pb(c1), "p_B_hi": _pb(pr["C_hi"]),
            "p_1": np.asarray(pr["p"], float), "clipped": int(np.sum(c1 <= 0)),
            "A": np.asarray(gs["mean_sq_norm"], float), "T": np.asarray(gs["trace"], float),
            "n": np.asarray(gs["n"], float)}


def _summary(s: dict, steps: int) -> dict:
    """Medians of p over the late measurements (last third of training), the whole run and the early
    ones (first tenth); the upper 95% (delta-method) bound, median over the late ones; and the pooled
    late estimate C₁ = Σ(‖ḡ‖² − T/n)/ΣT (the late measurements' statistics added up: far less noisy
    than one measurement, valid while θ moves little)."""
    late, early = s["step"] > (2 * steps) // 3, s["step"] <= steps // 10
    pooled = np.sum(s["A"][late] - s["T"][late] / s["n"][late]) / np.sum(s["T"][late])
    return {"p_B_late": float(np.nanmedian(s["p_B"][late])), "p_B_run": float(np.nanmedian(s["p_B"])),
            "p_B_early": float(np.nanmedian(s["p_B"][early])),
            "p_B_late_hi": float(np.nanmedian(s["p_B_hi"][late])),
            "p_B_late_pooled": float(_pb(max(pooled, 0.0))),
            "p_1_late": float(np.nanmedian(s["p_1"][late])), "p_1_run": float(np.nanmedian(s["p_1"])),
            "n_clipped": s["clipped"], "n_measurements": int(len(s["step"]))}


def notes_p(task: Task, state: dict, masks: dict | None, seed: int, width: int) -> dict:
    """The notes' estimator at θ = ``state``: 20 fresh minibatches of BATCH, gradients of the
    unpruned weights (and all biases) only, naive C (and our canonical C) on them."""
    import torch

    model = _mlp(width)
    model.load_state_dict({k: v * masks[k] if masks is not None and k in masks else v for k, v in state.items()})
    keep = [torch.ones_like(p) if masks is None or n not in masks else masks[n] for n, p in model.named_parameters()]
    g = torch.Generator().manual_seed(90_000 + seed)
    xs, ys = task.sample(N_SAMPLES * BATCH, g)
    return notes_ratio(minibatch_gradients(model, torch.nn.functional.cross_entropy, xs, ys, BATCH, N_SAMPLES, g,
                                           mask=keep), b=BATCH) | {"n_coordinates": int(sum(int(k.sum()) for k in keep))}


def _notes_arms(task: Task, seed: int, width: int, arms) -> dict:
    """The notes' p (:func:`notes_p`) of each ``(arm, final state, start state, masks)`` at its end and start."""
    return {(a, seed): {"end": notes_p(task, final, m, seed, width), "start": notes_p(task, start, m, seed, width)}
            for a, final, start, m in arms}


def _notes_part(notes: dict, acc: dict, quick: bool, out_dir: Path) -> dict:
    """The reproduction part from the notes' p of each arm (:func:`notes_p`) at the end of training."""
    import matplotlib.pyplot as plt

    from phasewatch.plot.style import WIDTHS, paper_style

    p = {a: [v["end"]["p_notes"] for (arm, _), v in notes.items() if arm == a] for a in ("dense", "ticket", "random")}
    po = {a: [v["end"]["p_ours"] for (arm, _), v in notes.items() if arm == a] for a in ("dense", "ticket", "random")}
    p0 = {a: [v["start"]["p_notes"] for (arm, _), v in notes.items() if arm == a] for a in ("ticket", "random")}
    med = {a: float(np.median(v)) for a, v in p.items()}
    with paper_style():
        fig, ax = plt.subplots(figsize=(WIDTHS["column"], 2.2), layout="constrained")
    for j, a in enumerate(("dense", "ticket", "random")):
        ax.plot([j - 0.1] * len(p[a]), p[a], "o", ms=3, color="C0", label="end (notes)" if j == 0 else None)
        ax.plot([j + 0.1] * len(po[a]), po[a], "x", ms=3, color="C2", label="end (ours)" if j == 0 else None)
        if a in p0:
            ax.plot([j] * len(p0[a]), p0[a], "s", ms=3, color="C1", label="rewound start (notes)" if j == 1 else None)
    for lo, hi, c in (HOLDS_TICKET + ("C0",), HOLDS_RANDOM + ("C1",)):
        ax.axhspan(lo, hi, color=c, alpha=0.08, lw=0)
    ax.set_xticks([0, 1, 2], ["dense", "ticket", "random"])
    ax.set(ylabel=f"p ({N_SAMPLES} minibatches of {BATCH})", ylim=(-0.02, 1.02))
    ax.legend(fontsize=5)
    fig_path = save_figure(fig, out_dir, "notes_protocol")
    ok = HOLDS_TICKET[0] <= med["ticket"] <= HOLDS_TICKET[1] and HOLDS_RANDOM[0] <= med["random"] <= HOLDS_RANDOM[1]
    why = (f"the notes' p at the end of training: ticket {_fmt(p['ticket'])}, random {_fmt(p['random'])}, dense "
           f"{_fmt(p['dense'])} (ours: ticket {_fmt(po['ticket'])}, random {_fmt(po['random'])}); at the rewound start: "
           f"ticket {_fmt(p0['ticket'])}, random {_fmt(p0['random'])}; test accuracy ticket {np.mean(acc['ticket']):.3f}, "
           f"random {np.mean(acc['random']):.3f}, dense {np.mean(acc['dense']):.3f}")
    if quick:
        why += " (quick mode: one-shot pruning, fewer steps)"
    setup = (f"90% sparsity, the notes' estimator on the pruned network: {N_SAMPLES} minibatch gradients of {BATCH} "
             "fresh examples over the unpruned weights, naive C, at the end of training (the notes do not say when "
             "p is read, nor the task or network: the beyond part's MLP, teacher task and pruning with rewinding "
             f"to step {REWIND} are our choices); reproduced if the median ticket p is in {list(HOLDS_TICKET)} and "
             f"the random masks' in {list(HOLDS_RANDOM)}")
    return reproduction(setup, "reproduced" if ok else "not reproduced", why,
                        {"p_notes_end": p, "p_ours_end": po, "p_notes_start": p0, "median_p_notes_end": med}, fig_path)


def run(out_dir, quick: bool) -> dict:
    import matplotlib.pyplot as plt
    import torch

    from phasewatch.plot.style import WIDTHS, paper_style

    out_dir = Path(out_dir)
    cfg = CONFIG[bool(quick)]
    steps, rounds, every, width = cfg["steps"], cfg["rounds"], cfg["every"], cfg["width"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: one thread is fastest, and the budget is for one core
    t0, c0 = time.perf_counter(), time.process_time()
    rows, series, notes = [], {}, {}
    try:
        for seed in cfg["seeds"]:
            task = Task(seed, cfg["probe"])
            torch.manual_seed(seed)
            init = _mlp(width).state_dict()
            dense = train(task, init, None, steps, seed, out_dir / "runs" / f"dense-seed{seed}", every, width,
                          rewind=REWIND)
            rewound = dense["early"]
            masks, final = None, dense["final"]
            for r in range(1, rounds + 1):  # iterative pruning: density DENSITY^(r/rounds), rewinding each round
                masks = magnitude_masks(final, masks, DENSITY ** (r / rounds))
                if r < rounds:
                    final = train(task, rewound, masks, steps, seed, None, every, width)["final"]
            ticket = train(task, rewound, masks, steps, seed, out_dir / "runs" / f"ticket-seed{seed}", every, width)
            rmasks = random_masks(masks, seed)
            rnd = train(task, rewound, rmasks, steps, seed, out_dir / "runs" / f"random-seed{seed}",
                        every, width)
            notes.update(_notes_arms(task, seed, width, (("dense", dense["final"], init, None),
                                                         ("ticket", ticket["final"], rewound, masks),
                                                         ("random", rnd["final"], rewound, rmasks))))
            for arm, res in (("dense", dense), ("ticket", ticket), ("random", rnd)):
                s = _p_series(out_dir / "runs" / f"{arm}-seed{seed}")
                series[(arm, seed)] = s
                meta = phasewatch.open_run(out_dir / "runs" / f"{arm}-seed{seed}").meta["recorder"].get("grad_mask")
                rows.append({"arm": arm, "seed": seed, "test_acc": res["test_acc"],
                             "density": 1.0 if meta is None else meta["density"], **_summary(s, steps)})
    finally:
        torch.set_num_threads(threads)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0

    def arm(a, key):
        return np.array([r[key] for r in rows if r["arm"] == a])

    acc = {a: arm(a, "test_acc") for a in ("dense", "ticket", "random")}
    p_late = {a: arm(a, "p_B_late") for a in ("dense", "ticket", "random")}
    p_run = {a: arm(a, "p_B_run") for a in ("dense", "ticket", "random")}
    p_early = {a: arm(a, "p_B_early") for a in ("dense", "ticket", "random")}
    pooled = {a: arm(a, "p_B_late_pooled") for a in ("dense", "ticket", "random")}
    p_hi = {a: arm(a, "p_B_late_hi") for a in ("dense", "ticket", "random")}
    med = {a: float(np.median(v)) for a, v in p_late.items()}

    with paper_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(WIDTHS["text"], 2.2), layout="constrained")
    colors = {"dense": "0.5", "ticket": "C0", "random": "C1"}
    for (a, seed), s in series.items():
        for axis, key in ((ax, "p_B"), (bx, "p_1")):
            axis.plot(s["step"], s[key], color=colors[a], lw=0.7, alpha=0.8, ls="--" if a == "dense" else "-",
                      label=a if seed == cfg["seeds"][0] else None)
    for lo, hi, c in (HOLDS_TICKET + ("C0",), HOLDS_RANDOM + ("C1",)):
        ax.axhspan(lo, hi, color=c, alpha=0.08, lw=0)
    ax.set(xscale="log", xlabel="step", ylabel=f"p of the batch (B = {BATCH})", ylim=(-0.02, 1.02),
           title="canonical C_B = B·C₁, 90% sparse")
    bx.set(xscale="log", xlabel="step", ylabel="p per example (b = 1)", title="canonical C₁")
    ax.legend(fontsize=6, loc="upper right")
    fig_path = save_figure(fig, out_dir, "pruning")

    # is the ticket a winning ticket?  It matches the dense network (mean test accuracy at least
    # the dense mean − 1 point) and beats its random control in every seed, by ≥ 1 point on average.
    match = acc["ticket"].mean() >= acc["dense"].mean() - 0.01
    beats = bool(np.all(acc["ticket"] > acc["random"])) and (acc["ticket"] - acc["random"]).mean() >= 0.01
    desc = (f"test accuracy dense {acc['dense'].mean():.3f}, ticket {acc['ticket'].mean():.3f}, random "
            f"{acc['random'].mean():.3f} (means over {len(cfg['seeds'])} seeds); p_B late (median over the last "
            f"third, median over seeds): ticket {med['ticket']:.2f} (seeds {_fmt(p_late['ticket'])}), random "
            f"{med['random']:.2f} ({_fmt(p_late['random'])}), dense {med['dense']:.2f}; over the whole run: "
            f"ticket {_fmt(p_run['ticket'])}, random {_fmt(p_run['random'])}; pooled late: ticket "
            f"{_fmt(pooled['ticket'])}, random {_fmt(pooled['random'])} (upper 95% bounds, late median: ticket "
            f"{_fmt(p_hi['ticket'])}, random {_fmt(p_hi['random'])}); early (first tenth of training): ticket "
            f"{_fmt(p_early['ticket'])}, random {_fmt(p_early['random'])}")
    in_t = HOLDS_TICKET[0] <= med["ticket"] <= HOLDS_TICKET[1]
    in_r = HOLDS_RANDOM[0] <= med["random"] <= HOLDS_RANDOM[1]
    above = bool(p_late["ticket"].min() > p_late["random"].max())
    crit = (f"criterion: holds iff the median over seeds of the ticket's late p_B lies in [{HOLDS_TICKET[0]}, "
            f"{HOLDS_TICKET[1]}], the random masks' in [{HOLDS_RANDOM[0]}, {HOLDS_RANDOM[1]}], and every ticket "
            "seed lies above every random seed")
    missed = [m for m, ok in (("the ticket's p is outside its band", in_t), ("the random masks' p is outside "
                                                                           "theirs", in_r),
                              ("the ticket's p is not above the random masks' in every seed", above)) if not ok]
    if not (match and beats):
        verdict = "inconclusive"
        why = desc + "; the ticket is not a winning ticket here (" + ("does not match dense" if not match else
                                                                      "does not beat random masks") + ")"
    elif not missed:
        verdict, why = "holds", desc + "; " + crit
    else:
        verdict, why = "fails", desc + f"; {crit}: " + ", ".join(missed)
    if quick:
        why += f" (quick mode: {len(cfg['seeds'])} seeds, {steps} steps, one-shot pruning)"
    setup = (f"MLP {D_IN}-{width}-{width}-{N_CLS} (ReLU) on a teacher task (label from {K_REL} of {D_IN} Gaussian "
             f"inputs; fresh batches of {BATCH} every step), Adam lr {LR:g}, {steps} steps; "
             f"{'iterative (' + str(rounds) + ' rounds)' if rounds > 1 else 'one-shot'} layer-wise magnitude "
             f"pruning of the weight matrices to {1 - DENSITY:.0%} sparsity, rewinding to θ at step {REWIND} "
             f"(Frankle et al. 2019); control: random masks with the same per-layer counts, same rewinding; "
             f"{len(cfg['seeds'])} seeds per arm; torch.nn.utils.prune, so the recorded gradient statistics are "
             f"over the unpruned weights; canonical C from {cfg['probe']} per-example gradients every {every} steps, "
             f"p_B = B·C₁/(1 + B·C₁) with B = {BATCH}; late = last third of training, early = first tenth")
    return result(CLAIM, SOURCE, setup, verdict, why,
                  {"per_run": rows, "p_B_late_median": med,
                   "winning_ticket_criterion": "ticket mean test accuracy >= dense mean - 0.01, and above its "
                                               "random control in every seed by >= 0.01 on average", "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                   "winning_ticket": {"matches_dense": bool(match), "beats_random": beats}}, fig_path,
                  reproduction=_notes_part(notes, acc, quick, out_dir))


def _fmt(v) -> str:
    return "[" + ", ".join("nan" if not math.isfinite(x) else f"{x:.2f}" for x in v) + "]"
