#!/usr/bin/env python
"""The recorder on a CUDA device: overhead, HVP cost, and the band's bytes/s against the device.

    .venv/bin/python benchmarks/gpu.py              # on a CUDA machine (< 5 min)
    .venv/bin/python benchmarks/gpu.py --quick      # smaller models, fewer rounds (< 1 min)
    .venv/bin/python benchmarks/gpu.py --device cpu --quick   # the same code on the CPU (a check of
                                                    # the script; the figures are not a GPU's)

Without CUDA (and without ``--device cpu``) it prints one line saying it needs CUDA and exits 0, so
CI runs it everywhere (tests/test_gpu_benchmark.py).

What it prints, per workload
  mlp    3072-2048-2048-10 ReLU MLP (10.5M parameters), SGD momentum 0.9, cross-entropy on random
         inputs/labels, batch 128 and 32 (the rows of issue 21's table).
  gpt2   a small GPT-2 built from a config (transformers, no download): 4 layers, 4 heads, width 256,
         vocabulary 8192, 16 sequences of 128 tokens, AdamW; skipped with one line without transformers.
  1. Overhead: recorder on (default settings: ``phasewatch.Recorder(path, model, opt)``) vs off, each
     with its own model and optimizer from the same seed, after a warm-up of two blocks, in
     interleaved rounds (A B, B A, ...) of --steps steps, each round timed between two
     ``torch.cuda.synchronize()`` (the benchmark's, not the recorder's).  Median time per step over
     rounds with min–max, ratio of the medians, and the median (min–max) of the per-round ratios.
  2. HVP ÷ gradient: one Hessian-vector product of
     :class:`phasewatch.record.curvature.HessianOperator` on a training batch (its graph built once,
     outside the timing) ÷ one forward + backward on the same batch (median of --reps each).
  3. Bandwidth: the device's memory bandwidth measured with a large tensor copy (read + write of
     256 MiB, median of 10); the bytes the recorder's per-step code reads and writes (a count from
     its code: see ``recorder_bytes``), its added time per step (median paired on − off), the
     bytes/s that makes, and the floor of that traffic at the device's bandwidth.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import phasewatch
from phasewatch.record.curvature import HessianOperator

BLOCK = 16  # the recorder's default B: rounds hold whole blocks


# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_mlp(device, seed=0, batch=128, width=2048, d_in=3072, pool=8):
    """The MLP of issue 21 (10.5M parameters at width 2048), one SGD step per call."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1234)
    xs = torch.randn(pool, batch, d_in, generator=g).to(device)
    ys = torch.randint(0, 10, (pool, batch), generator=g).to(device)
    return model, opt, xs, ys, F.cross_entropy


def make_gpt2(device, seed=0, batch=16, seq=128, width=256, layers=4, vocab=8192, pool=8):
    """A small GPT-2 from a config and AdamW; None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=layers, n_head=4, n_embd=width, vocab_size=vocab, n_positions=seq,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, ids):
            return self.hf(input_ids=ids).logits

    def lm_loss(logits, ids):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    model = LM().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids = torch.randint(0, vocab, (pool, batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    return model, opt, ids, ids, lm_loss


class Config:
    """One model + optimizer (+ recorder when ``on``), stepping through its pool of batches."""

    def __init__(self, make, on: bool, tmp: Path, label: str) -> None:
        self.model, self.opt, self.xs, self.ys, self.loss_fn = make()
        self.device = next(self.model.parameters()).device
        self.rec = phasewatch.Recorder(tmp / label, self.model, self.opt, strict=True) if on else None
        self.i = 0
        self.times: list[float] = []

    def run(self, n: int) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            k = self.i % len(self.xs)
            self.i += 1
            loss = self.loss_fn(self.model(self.xs[k]), self.ys[k])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.rec is not None:
                self.rec.loss(loss)
            self.opt.step()
        _sync(self.device)
        return (time.perf_counter() - t0) / n

    def close(self) -> None:
        if self.rec is not None:
            ok = self.rec.enabled
            self.rec.close()
            if not ok:
                raise RuntimeError("the recorder disabled itself during the benchmark (see the log)")


def _mmm(xs: list[float], scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    """median (min–max)."""
    return (fmt.format(statistics.median(xs) * scale) + " (" + fmt.format(min(xs) * scale) + "–"
            + fmt.format(max(xs) * scale) + ")")


def overhead(make, steps: int, rounds: int, tmp: Path, label: str) -> tuple[dict, Config]:
    off, on = Config(make, False, tmp, label + "-off"), Config(make, True, tmp, label + "-on")
    for c in (off, on):
        c.run(2 * BLOCK)  # warm-up: kernels, allocator, optimizer state, the first band GEMMs
    for r in range(rounds):
        for c in ((off, on) if r % 2 == 0 else (on, off)):
            c.times.append(c.run(steps))
    ratios = [b / a for a, b in zip(off.times, on.times)]
    added = [b - a for a, b in zip(off.times, on.times)]
    res = {"off": off.times, "on": on.times, "ratios": ratios, "added": added,
           "ratio_of_medians": statistics.median(on.times) / statistics.median(off.times)}
    off.close()
    return res, on


def recorder_bytes(rec) -> dict:
    """Bytes the recorder's per-step code reads + writes, counted from its code (record/ring.py):
    gradient norms read every gradient once; an exact tensor of n elements of s bytes costs
    u = θ − θ_prev (read 2ns, write 8n into the float64 ring) and θ_prev ← θ (2ns); a folded one
    the fold of θ_t (projection.fold_float64: read θ and the signs, 2ns; its float64 chunk scratch
    stays in cache), or with the fold of u_t (FSDP, --ufold) u = θ − θ_prev into scratch (3ns),
    θ_prev ← θ (2ns), u ⊙ signs (3ns) and the sum (ns); once per block of B the GEMM reads the ring
    (R × dim × 8 bytes), amortised over B steps."""
    grad = sum(p.numel() * p.element_size() for p in rec.params)
    exact = sum(4 * rec.params[i].numel() * rec.params[i].element_size() + 8 * rec.params[i].numel()
                for i in rec._exact)
    per = 2 if getattr(rec, "_fold_theta", False) else 9
    folded = sum(per * rec.params[i].numel() * rec.params[i].element_size() for i in rec._folded)
    gemm = rec.rows * rec.dim * 8 / rec.block
    theta = sum(p.numel() * p.element_size() for p in rec.params)
    return {"total": grad + exact + folded + gemm, "grad": grad, "exact": exact, "folded": folded,
            "gemm": gemm, "theta": theta}


def bandwidth(device: torch.device, nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Device memory bandwidth in bytes/s: dst.copy_(src) of ``nbytes`` (read + write), median."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(ts)


def hvp_ratio(make, reps: int) -> tuple[float, float]:
    """(median HVP seconds ÷ median gradient seconds, gradient seconds) on the first batch."""
    model, _, xs, ys, loss_fn = make()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    batch = (xs[0], ys[0])

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_grad = timed(lambda: torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params))
    op = HessianOperator(model, loss_fn, batch, params=params, mode="train")
    v = torch.randn(op.n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    t_hvp = timed(lambda: op.matvec(v))
    return t_hvp / t_grad, t_grad


def report(name: str, make, args, tmp: Path, bw: float) -> None:
    res, on = overhead(make, args.steps, args.rounds, tmp, name)
    rec = on.rec
    n_params = sum(p.numel() for p in rec.params)
    print(f"\n{name}: {n_params / 1e6:.2f}M parameters, recorder mode {rec.mode}"
          + (f" (d={rec.proj_dim} per folded tensor)" if rec.mode == "projected" else ""))
    print(f"  ms/step  off {_mmm(res['off'], 1e3)}   on {_mmm(res['on'], 1e3)}")
    print(f"  overhead ratio of medians {res['ratio_of_medians']:.3f}; per-round ratios "
          f"{_mmm(res['ratios'], fmt='{:.3f}')} over {len(res['ratios'])} rounds of {args.steps} steps")
    b = recorder_bytes(rec)
    add = statistics.median(res["added"])
    print(f"  recorder traffic {b['total'] / 1e6:.1f} MB/step (gradient norms {b['grad'] / 1e6:.1f}, exact "
          f"{b['exact'] / 1e6:.1f}, folded {b['folded'] / 1e6:.1f}, block GEMM {b['gemm'] / 1e6:.1f} amortised); "
          f"one read of θ {b['theta'] / 1e6:.1f} MB")
    floor = b["total"] / bw
    rate = b["total"] / add if add > 0 else float("inf")
    print(f"  added {add * 1e3:.3f} ms/step (median paired) -> {rate / 1e9:.1f} GB/s = {rate / bw:.0%} of the "
          f"device's {bw / 1e9:.1f} GB/s; floor of that traffic {floor * 1e3:.3f} ms, of one read of θ "
          f"{b['theta'] / bw * 1e3:.3f} ms")
    on.close()
    try:
        ratio, t_grad = hvp_ratio(make, args.reps)
        print(f"  HVP ÷ gradient {ratio:.2f} (gradient {t_grad * 1e3:.2f} ms; HessianOperator, double backward)")
    except Exception as e:  # noqa: BLE001 - report, go on with the next workload
        print(f"  HVP ÷ gradient: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script only)")
    ap.add_argument("--quick", action="store_true", help="width 512 MLP, 2-layer GPT-2, 3 rounds")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per round (a multiple of 16)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of HVP and gradient (15, quick 5)")
    ap.add_argument("--workloads", default="mlp128,mlp32,gpt2", help="comma list of mlp128, mlp32, gpt2")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device (torch.cuda.is_available() is False); nothing measured")
        return 0
    device = torch.device(args.device)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.steps = BLOCK * -(-(args.steps or (16 if args.quick else 64)) // BLOCK)
    args.reps = args.reps or (5 if args.quick else 15)
    width, layers, vocab = (512, 2, 2048) if args.quick else (2048, 4, 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"phasewatch {phasewatch.__version__}, torch {torch.__version__}, device {name}")
    bw = bandwidth(device, (64 << 20) if args.quick else (256 << 20))
    print(f"device memory bandwidth (tensor copy, read + write): {bw / 1e9:.1f} GB/s")
    makers = {
        "mlp128": lambda: make_mlp(device, batch=128, width=width),
        "mlp32": lambda: make_mlp(device, batch=32, width=width),
        "gpt2": lambda: make_gpt2(device, layers=layers, vocab=vocab, batch=8 if args.quick else 16),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pw-gpu-") as tmp:
        for w in args.workloads.split(","):
            make = makers[w.strip()]
            if w.strip() == "gpt2" and importlib.util.find_spec("transformers") is None:
                print("\ngpt2: transformers is not installed (pip install phasewatch[hf]); skipped")
                continue
            report(w.strip(), make, args, Path(tmp), bw)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
