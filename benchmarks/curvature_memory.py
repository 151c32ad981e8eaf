"""Peak memory of one curvature probe against the memory model of :func:`phasewatch.record.curvature.lanczos`.

    python benchmarks/curvature_memory.py [--width 3000] [--iters 20] [--basis-dtype float64]

One fresh process per configuration: a float32 tanh MLP (P parameters), one HessianOperator and
one Lanczos run of exactly ``--iters`` basis vectors (tol unreachable), each phase's peak RSS growth
(the kernel's high-water mark, reset at the phase's start).  Prints the measured growth beside the model's prediction
graph + 8P (flat gradient) + (8 + 2·4)P (one product) + (m·s + 16 + 8k)P (basis, work vectors, Ritz
vectors), the graph being measured as the growth of building the operator.  CPU only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class _Phase:
    """Peak RSS growth of a block over the RSS at its start: the kernel's high-water mark is reset
    on entry (``/proc/self/clear_refs`` = 5, Linux ≥ 4.0), so an earlier, freed peak does not hide it."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.bytes = _status("VmHWM") - self.start


def child(width: int, iters: int, basis_dtype: str) -> dict:
    import torch

    from phasewatch.record.curvature import HessianOperator, lanczos

    torch.manual_seed(0)
    d = width // 3
    model = torch.nn.Sequential(torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, 10))
    x, y = torch.randn(32, d), torch.randint(0, 10, (32,))
    p = sum(q.numel() for q in model.parameters())
    ce = torch.nn.functional.cross_entropy
    ce(model(x), y).backward()  # warm the allocator with one ordinary gradient
    model.zero_grad(set_to_none=True)
    with _Phase() as build:
        op = HessianOperator(model, ce, (x, y))
    v = torch.randn(op.n, dtype=torch.float64)
    with _Phase() as one:
        op.matvec(v)  # one product alone: the double backward's own transients
    del v
    dt = getattr(torch, basis_dtype)
    with _Phase() as lz:
        res = lanczos(op, op.n, k=1, tol=1e-30, max_iter=iters, basis_dtype=dt, memory_budget=1 << 40)
    s = torch.empty((), dtype=dt).element_size()
    m = res.iterations
    hvp = one.bytes + 8 * p  # (+ its float64 input)
    # basis + w, q + one product's peak (its input q is w's twin, its output copied into w) + the
    # verification (the Ritz vector and its residual, 16P) — whichever of the last two is larger
    lanczos_model = (m * s + 16) * p + max(hvp, 16 * p + hvp)
    return {"P": p, "iterations": m, "n_hvp": res.n_matvec, "basis_dtype": basis_dtype, "hvp_bytes": hvp,
            "operator_bytes": build.bytes, "lanczos_bytes": lz.bytes, "lanczos_model_bytes": lanczos_model,
            "basis_bytes": m * s * p, "probe_bytes": build.bytes + lz.bytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=3000)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--basis-dtype", default="float64")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.width, a.iters, a.basis_dtype)))
        return
    out = subprocess.run([sys.executable, __file__, "--child", "--width", str(a.width), "--iters", str(a.iters),
                          "--basis-dtype", a.basis_dtype], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    print(f"P = {r['P']:,}  m = {r['iterations']} basis vectors ({r['basis_dtype']}), {r['n_hvp']} HVPs")
    print(f"  operator (kept graph + flat gradient): {r['operator_bytes'] * mb:8.1f} MiB")
    print(f"  one HVP's peak (measured alone): {r['hvp_bytes'] * mb:8.1f} MiB = {r['hvp_bytes'] / r['P']:.1f} B/param")
    print(f"  Lanczos measured {r['lanczos_bytes'] * mb:8.1f} MiB, model {r['lanczos_model_bytes'] * mb:8.1f} MiB "
          f"(basis alone {r['basis_bytes'] * mb:.1f} MiB), ratio {r['lanczos_bytes'] / r['lanczos_model_bytes']:.3f}")
    print(f"  whole probe: {r['probe_bytes'] * mb:8.1f} MiB = {r['probe_bytes'] / r['P']:.1f} bytes per parameter")


if __name__ == "__main__":
    main()
