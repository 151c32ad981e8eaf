"""Ghost Grams vs torch.func per-example gradients: cost of one measurement and of training with
gradient statistics every N steps.

Models: MLP 784-256-256-10 (≈270k parameters, batch 128, cross-entropy on random data) and a small
GPT-2 from a config (4 layers, width 128, vocab 1000, 32 tokens, batch 32; tied embeddings, so the
tied wte/lm_head tensor and the position embedding go through torch.func: ``grad_method_used`` =
"mixed").  Part 1: median time of one 64-example measurement (Grams + statistics) by each route.
Part 2: ms/step of plain training, and with a recorder measuring gradient statistics on a
64-example probe every ``--every`` steps by each route (and a recorder without them, the band's own
cost), interleaved rounds; ratios vs plain training without a recorder.

    python benchmarks/ghost_grams.py [--every 10] [--rounds 5] [--steps 20] [--cpu-time]

Measured (2026-12-02, 2-core machine shared with other jobs, OMP_NUM_THREADS=1, --cpu-time,
3 rounds x 20 steps; ms of one 64-example measurement, ghost / func; training ratios vs plain):
  MLP     3.5 / 127 ms (36x);  recorder alone 1.60x, + ghost stats 1.73x, + func stats 5.00x
  3C3D    282 / 543 ms (1.9x); recorder alone 1.05x, + ghost stats 1.15x, + func stats 1.31x
  GPT-2   673 / 562 ms (0.8x); recorder alone 1.06x, + ghost stats 1.58x, + func stats 1.56x
At GPT-2's width 128 and T = 32 the explicit per-example form is cheaper than the T×T Grams for
every matrix, so both routes pay the n²·P float64 Gram; the T×T ghost form wins when T² < p·q/(p + q) (roughly).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

import phasewatch
from phasewatch.record.ghost import ghost_grams, ghost_plan, unbatched_modules
from phasewatch.record.probes import gram_matrix_statistics, gram_statistics, per_example_gradients


def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)

    def data(n):
        return torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)

    def loss(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    return "MLP 784-256-256-10", model, data, loss, 128


def cnn():
    """A 3C3D-like CNN (DeepOBS CIFAR-10 3c3d layout, ≈895k parameters) on 32×32 inputs."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(1)

    def data(n):
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def loss(out, t):
        return torch.nn.functional.cross_entropy(out, t, reduction="none")

    return "3C3D-like CNN", model, data, loss, 128


def gpt2():
    import transformers

    cfg = transformers.GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=1000, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(cfg)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    g = torch.Generator().manual_seed(1)

    def data(n):
        ids = torch.randint(0, 1000, (n, 32), generator=g)
        return ids, ids

    def loss(logits, ids):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return "GPT-2 4x128, T=32", Logits(), data, loss, 32


def one_measurement(model, data, loss, clock, reps=5):
    names = [n for n, _ in model.named_parameters()]
    x, y = data(64)
    covered, fallback = ghost_plan(model, names)
    group = {n: 0 for n in names}

    def ghost():
        skipped, broadcast = unbatched_modules(model, covered, x[:2])
        Ms, _ = ghost_grams(model, {k: v for k, v in covered.items() if k not in skipped}, group, 1, x, y,
                            loss, broadcast)
        rest = fallback + skipped
        if rest:
            for s_ in per_example_gradients(model, rest, x, y, loss):
                g = s_.reshape(64, -1).double()
                Ms[0] += g @ g.T
        return gram_matrix_statistics(Ms, 64)

    def func():
        return gram_statistics(per_example_gradients(model, names, x, y, loss), [0] * len(names), 1, 64)

    out = {}
    for name, f in (("ghost", ghost), ("func", func)):
        f()
        ts = []
        for _ in range(reps):
            t0 = clock()
            st = f()
            ts.append(clock() - t0)
        out[name] = (statistics.median(ts) * 1e3, st)
    rel = abs(out["ghost"][1]["trace"] - out["func"][1]["trace"]) / abs(out["func"][1]["trace"])
    return out["ghost"][0], out["func"][0], rel


def training(make, every, rounds, steps, clock, tmp):
    label, _, data, loss, batch = make()
    x, y = data(batch)
    probe = data(64)
    state = {}
    for cfg in ("plain", "recorder", "ghost", "func"):
        _, model, _, _, _ = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rec = None
        if cfg == "recorder":
            rec = phasewatch.Recorder(f"{tmp}/{cfg}{id(model)}", model, opt)
        elif cfg != "plain":
            rec = phasewatch.Recorder(f"{tmp}/{cfg}{id(model)}", model, opt, grad_samples_every=every,
                                      grad_probe=probe, grad_loss=loss,
                                      grad_method="auto" if cfg == "ghost" else "func")
        state[cfg] = (model, opt, rec)

    def run(cfg, n):
        model, opt, rec = state[cfg]
        t0 = clock()
        for _ in range(n):
            opt.zero_grad()
            lo = loss(model(x), y).mean()
            lo.backward()
            opt.step()
            if rec is not None:
                rec.loss(lo)
        return (clock() - t0) / n

    for cfg in state:
        run(cfg, every)
    times = {k: [] for k in state}
    order = list(state)
    for r in range(rounds):
        for cfg in order if r % 2 == 0 else order[::-1]:
            times[cfg].append(run(cfg, steps))
    for _, _, rec in state.values():
        if rec is not None:
            rec.close()
    return label, {k: (statistics.median(v) * 1e3, min(v) * 1e3, max(v) * 1e3) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time (with OMP_NUM_THREADS=1: robust on a machine others load)")
    a = ap.parse_args()
    clock = time.process_time if a.cpu_time else time.perf_counter
    print(f"{torch.get_num_threads()} thread(s), {'process CPU time' if a.cpu_time else 'wall time'}")
    print(f"{'model':<22} {'ghost ms':>9} {'func ms':>9} {'func/ghost':>10} {'rel diff trace':>15}")
    for make in (mlp, cnn, gpt2):
        label, model, data, loss, _ = make()
        tg, tf, rel = one_measurement(model, data, loss, clock)
        print(f"{label:<22} {tg:9.1f} {tf:9.1f} {tf / tg:10.2f} {rel:15.2e}")
    tmp = tempfile.mkdtemp(prefix="pw-ghost-")
    print(f"\ntraining, gradient statistics on 64 examples every {a.every} steps; {a.rounds} rounds x {a.steps} steps")
    print("ratios vs plain training (recorder off); in brackets the min-max over rounds")
    print(f"{'model':<22} {'plain ms':>9} {'recorder, no grad stats':>26} {'+ ghost grad stats':>26} "
          f"{'+ func grad stats':>26}")
    for make in (mlp, cnn, gpt2):
        label, t = training(make, a.every, a.rounds, a.steps, clock, tmp)
        p = t["plain"][0]
        cells = [f"{t[k][0]:6.1f} ({t[k][0] / p:.2f}, {t[k][1] / p:.2f}-{t[k][2] / p:.2f})" for k in ("recorder", "ghost", "func")]
        print(f"{label:<22} {p:9.1f} {cells[0]:>26} {cells[1]:>26} {cells[2]:>26}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
