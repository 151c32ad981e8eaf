"""λ_max and trace: phasewatch (Lanczos, Hutchinson with a t-interval) against PyHessian (power
iteration, Hutchinson with a relative-change stop), side by side on the same model and batch.

    pip install pyhessian          # only for the side-by-side part (skipped if absent)
    python benchmarks/curvature.py [--quick] [--no-cost]

First the cost of the products themselves, measured side by side in one run (CPU time of this
process, one thread, median of repeats; CPU time is what a loaded machine does not inflate): HVP
time ÷ gradient time, by double backward (autograd) and by central differences (fd; its measured
error against autograd along a random vector and along the top eigenvector), on the tanh MLP and on
a small GPT-2 (transformers, built from a config, float32); a Lanczos iteration ÷ its HVP; HVPs to
1e-3 / 1e-6 relative error by Lanczos and by power iteration on the same operator.  With
``--compile``, also a compiled HVP (``torch.func`` forward-over-reverse ``jvp(grad(f))`` through
``torch.compile``, the route curvlinops times; double backward itself does not compile) ÷ the eager
and the compiled gradient, its compile time and its error against autograd; and the peak memory
of one HVP ÷ that of one gradient (the peak resident-set growth of a forked child, Linux only).

Cases (float64 models, so 1e-6 relative is well above round-off):
  * eos: the tanh MLP 64-200-200-10 of examples/edge_of_stability.py after full-batch GD with
    η = 0.2 has brought λ_max to 2/η = 10 (λ₂/λ₁ close to 1: the hard case for power iteration);
  * init: the same network at initialisation.
Reference λ_max: Lanczos at tol 1e-12 (measured residual printed).  PyHessian draws its probe
vectors in float32 (``torch.randn`` default dtype) even for a float64 model, which floors its
accuracy; that is part of what it does at its settings, and is reported as such.  For each method: Hessian-vector
products (HVPs) and wall time to reach 1e-6 relative error, and the error each reaches at its
default settings.  Trace: on a smaller MLP whose exact trace is computed from P HVPs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from edge_of_stability import make_data, make_model, mse  # noqa: E402

from phasewatch import curvature as cv  # noqa: E402


def eos_model(steps: int):
    x, y = make_data()
    x, y = x.double(), y.double()
    model = make_model(0).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(steps):
        loss = mse(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, (x, y)


def ours_to_accuracy(op, ref, target=1e-6):
    """Smallest HVP count for which Lanczos' λ_max is within ``target`` of the reference (Lanczos
    checks its own residual every iteration; here tol is lowered until the error meets target)."""
    for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        t0 = time.perf_counter()
        r = cv.lanczos(op, op.n, tol=tol, verify=False, seed=1)
        dt = time.perf_counter() - t0
        if abs(r.lambda_max - ref) <= target * abs(ref):
            return r.n_matvec, dt, abs(r.lambda_max - ref) / abs(ref), tol
    return r.n_matvec, dt, abs(r.lambda_max - ref) / abs(ref), tol


def pyhessian_run(model, loss_fn, batch, max_iter, tol):
    from pyhessian import hessian

    torch.manual_seed(1)
    h = hessian(model, loss_fn, data=batch, cuda=False)
    t0 = time.perf_counter()
    ev, _ = h.eigenvalues(maxIter=max_iter, tol=tol)
    dt = time.perf_counter() - t0
    return ev[0], dt


def pyhessian_to_accuracy(model, loss_fn, batch, ref, target=1e-6, cap=4000):
    """Fewest power iterations (= HVPs) reaching ``target`` (same seed each time; bisection)."""
    def err(n):
        lam, dt = pyhessian_run(model, loss_fn, batch, n, 0.0)
        return abs(lam - ref) / abs(ref), dt

    lo, hi = 1, 8
    e, dt = err(hi)
    while e > target and hi < cap:
        lo, hi = hi, min(cap, hi * 2)
        e, dt = err(hi)
    if e > target:
        return None, dt, e
    while hi - lo > max(1, hi // 50):
        mid = (lo + hi) // 2
        e_mid, dt_mid = err(mid)
        if e_mid <= target:
            hi, e, dt = mid, e_mid, dt_mid
        else:
            lo = mid
    return hi, dt, e


def _cpu_median(fn, reps: int = 7) -> float:
    """Median CPU seconds of ``fn()`` over ``reps`` calls, after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return float(np.median(ts))


def _gradient_fn(model, loss_fn, batch):
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        return torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)

    return grad


def _small_gpt2():
    """A small GPT-2 from a config (no download) and a batch of token ids, float32; None without
    transformers."""
    try:
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=512, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, ids):
            return self.hf(input_ids=ids).logits

    def lm_loss(logits, ids):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    return LM(), lm_loss, (ids, ids)


def hvp_costs(name, model, loss_fn, batch, reps=7):
    """One line: gradient time, autograd HVP ÷ gradient, FD HVP ÷ gradient and its error, Lanczos
    iteration ÷ its HVP (the products timed inside Lanczos, the rest is its bookkeeping)."""
    t_grad = _cpu_median(_gradient_fn(model, loss_fn, batch), reps)
    t0 = time.process_time()
    op = cv.HessianOperator(model, loss_fn, batch)
    t_setup = time.process_time() - t0
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.n, generator=gen, dtype=torch.float64)
    v /= v.norm()
    t_ag = _cpu_median(lambda: op.matvec(v), reps)
    fd = cv.FiniteDifferenceHessian(model, loss_fn, batch)
    t_fd = _cpu_median(lambda: fd.matvec(v), reps)
    spent = []

    def timed(x):
        t1 = time.process_time()
        r = op.matvec(x)
        spent.append(time.process_time() - t1)
        return r

    per_it = []
    for _ in range(3):
        spent.clear()
        t1 = time.process_time()
        top = cv.lanczos(timed, op.n, tol=1e-6, max_iter=60, seed=1, return_vectors=True)
        per_it.append(((time.process_time() - t1) / top.n_matvec, float(np.mean(spent))))
    it, it_hvp = np.median(per_it, axis=0)
    hv = op.matvec(v)
    y = top.eigenvectors[0]
    err_v = float((fd.matvec(v) - hv).norm()) / abs(top.lambda_max)
    err_y = float((fd.matvec(y) - op.matvec(y)).norm()) / abs(top.lambda_max)
    dt = str(next(model.parameters()).dtype).replace("torch.", "")
    print(f"{name:10} {dt:8} {op.n:9d} | {t_grad * 1e3:8.2f} {t_setup / t_grad:6.2f} {t_ag / t_grad:6.2f} "
          f"{t_fd / t_grad:6.2f} | {err_v:8.1e} {err_y:8.1e} | {it * 1e3:8.2f} {it / it_hvp:6.3f} ({top.n_matvec} HVPs)")
    pyhessian_costs(model, loss_fn, batch, v, t_grad, t_ag, it, reps)
    m_grad = _peak_growth(_gradient_fn(model, loss_fn, batch))
    m_ag = _peak_growth(lambda: cv.HessianOperator(model, loss_fn, batch).matvec(v))
    m_fd = _peak_growth(lambda: fd.matvec(v))
    print(f"  peak memory above the model ÷ one gradient's ({m_grad / 2**20:.1f} MiB): autograd HVP (setup + one "
          f"product) {m_ag / m_grad:.2f}, FD HVP {m_fd / m_grad:.2f}")
    if COMPILE:
        compiled_hvp_cost(model, loss_fn, batch, t_grad, reps)


COMPILE = False  # set by --compile (inductor needs a C++ compiler and ~30-120 s per model)


def pyhessian_costs(model, loss_fn, batch, v, t_grad, t_ag, it, reps):
    """PyHessian on the same model and batch (if installed): its HVP ÷ the gradient, its power
    iteration's time per iteration ÷ its HVP, and ours ÷ its, per HVP and per iteration."""
    try:
        from pyhessian import hessian
        from pyhessian.utils import hessian_vector_product
    except ImportError:
        return
    was = model.training
    note = ""
    for attempt in range(2):
        # as PyHessian runs (fused attention: its double backward raises), then inside our math context
        ctx = cv.double_differentiable_attention() if attempt else contextlib.nullcontext()
        try:
            with ctx:
                h = hessian(model, loss_fn, data=batch, cuda=False)
                parts = list(torch.split(v, [p.numel() for p in h.params]))
                vs = [x.view(p.shape).to(p.dtype) for x, p in zip(parts, h.params)]
                t_hvp = _cpu_median(lambda h=h, vs=vs: hessian_vector_product(h.gradsH, h.params, vs), reps)
                n_it = 30
                torch.manual_seed(1)
                t0 = time.process_time()
                h.eigenvalues(maxIter=n_it, tol=0.0)  # tol 0: exactly n_it power iterations
                t_it = (time.process_time() - t0) / n_it
            break
        except RuntimeError as e:
            note = f" (as shipped it fails: {str(e).splitlines()[0][:70]}; timed in the math backend)"
        finally:
            model.zero_grad(set_to_none=True)  # PyHessian leaves the create_graph gradient in .grad
            model.train(was)
    print(f"{'  PyHessian':19} {'':9} | {'':8} {'':6} {t_hvp / t_grad:6.2f} {'':6} | {'':17} | {t_it * 1e3:8.2f} "
          f"{t_it / t_hvp:6.3f}   ours/PyHessian: HVP {t_ag / t_hvp:.2f}, iteration {it / t_it:.2f}{note}")


def _peak_growth(fn) -> float:
    """Bytes by which the resident set of a forked child peaks above its start while it runs ``fn()``
    (Linux: VmHWM after resetting it through /proc/self/clear_refs; glibc told to mmap every block of
    64 KiB or more, so freed temporaries leave and the peak is the working set's); NaN elsewhere."""
    if not Path("/proc/self/clear_refs").exists():
        return float("nan")
    import ctypes
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, write, leave without running the parent's exit handlers
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD (also stops its growth)
            Path("/proc/self/clear_refs").write_text("5")

            def kib(key):
                line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
                return int(line.split()[1])

            start = kib("VmRSS:")
            fn()
            os.write(w, str((kib("VmHWM:") - start) * 1024).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    return float(out) if out else float("nan")


def compiled_hvp_cost(model, loss_fn, batch, t_grad, reps=7) -> None:
    """One line: a ``torch.compile``d forward-over-reverse HVP ÷ the eager gradient and ÷ the
    compiled gradient (both in CPU seconds), the compile time, and the error against the eager
    ``torch.func`` HVP; or the first line of why it does not compile here."""
    from torch.func import functional_call, grad, jvp

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    vs = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}

    def f(ps):
        return loss_fn(functional_call(model, ps, (batch[0],)), batch[1])

    def hvp(ps, v):
        return jvp(grad(f), (ps,), (v,))[1]

    try:
        with cv.double_differentiable_attention():
            t0 = time.perf_counter()
            c_hvp = torch.compile(hvp)
            out = c_hvp(params, vs)
            t_compile = time.perf_counter() - t0
            c_grad = torch.compile(grad(f))
            t_c_grad = _cpu_median(lambda: c_grad(params), reps)
            t_c_hvp = _cpu_median(lambda: c_hvp(params, vs), reps)
            ref = hvp(params, vs)
    except Exception as e:  # noqa: BLE001 - a benchmark reports what it could not measure
        print(f"  compiled HVP: does not compile here ({type(e).__name__}: {str(e).splitlines()[0][:90]})")
        return
    err = max(float((ref[n] - out[n]).norm() / ref[n].norm().clamp_min(1e-300)) for n in params)
    print(f"  compiled HVP (torch.func jvp(grad), inductor): ÷ eager gradient {t_c_hvp / t_grad:.2f}, "
          f"÷ compiled gradient {t_c_hvp / t_c_grad:.2f} (compile {t_compile:.0f} s; relative error vs eager "
          f"{err:.1e})")


def power_iteration_hvps(op, ref, target, cap=4000, seed=1):
    """HVPs until the Rayleigh quotient vᵀHv of power iteration is within ``target`` of ``ref``."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(op.n, generator=gen, dtype=torch.float64)
    v /= v.norm()
    for i in range(1, cap + 1):
        hv = op.matvec(v)
        if abs(float(v @ hv) - ref) <= target * abs(ref):
            return i
        v = hv / hv.norm()
    return None


def cost_section(quick: bool) -> None:
    torch.set_num_threads(1)
    print(f"{'model':10} {'dtype':8} {'P':>9} | {'grad ms':>8} {'setup':>6} {'HVP':>6} {'FD HVP':>6} | "
          f"{'FD err v':>8} {'FD err y':>8} | {'iter ms':>8} {'it/HVP':>6}")
    print(f"{'':10} {'':8} {'':9} | {'':8} {'(all ÷ one gradient)':>20} | {'(÷ lambda_max)':>17} | (Lanczos)")
    mlp64, batch64 = eos_model(0)
    hvp_costs("tanh MLP", mlp64, mse, batch64)
    mlp32 = eos_model(0)[0].float()
    hvp_costs("tanh MLP", mlp32, mse, (batch64[0].float(), batch64[1].float()))
    gpt = _small_gpt2()
    if gpt is None:
        print("small GPT-2: transformers is not installed (pip install phasewatch[hf]); skipped")
    else:
        hvp_costs("GPT-2", *gpt, reps=3)
    model, batch = eos_model(400 if quick else 800)
    op = cv.HessianOperator(model, mse, batch)
    ref = cv.lanczos(op, op.n, k=2, tol=1e-12, max_iter=300, seed=7)
    print(f"\nHVPs to a relative error of lambda_max (EoS MLP, lambda_max {ref.lambda_max:.6f}, "
          f"l2/l1 {ref.eigenvalues[1] / ref.lambda_max:.4f}):")
    for target in (1e-3, 1e-6):
        n_l = ours_to_accuracy(op, ref.lambda_max, target)[0]
        n_p = power_iteration_hvps(op, ref.lambda_max, target)
        print(f"  {target:.0e}: Lanczos {n_l} HVPs, power iteration {n_p if n_p else '>4000'} HVPs")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer GD steps before the EoS case")
    ap.add_argument("--no-cost", action="store_true", help="skip the per-product cost section")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd HVP (slow to compile)")
    a = ap.parse_args()
    global COMPILE
    COMPILE = a.compile
    if not a.no_cost:
        cost_section(a.quick)
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("pyhessian is not installed: pip install pyhessian for the side-by-side comparison; skipped")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loss_fn = mse
    cases = []
    t0 = time.perf_counter()
    cases.append(("init", *eos_model(0)))
    cases.append(("eos", *eos_model(400 if a.quick else 800)))
    print(f"(training the cases: {time.perf_counter() - t0:.1f} s)\n")
    print(f"{'case':5} {'P':>7} {'lambda_max':>12} {'l2/l1':>7} | {'method':10} {'HVPs->1e-6':>10} {'s->1e-6':>8} "
          f"| {'default: HVPs':>13} {'s':>6} {'rel. error':>10}")
    ratios = []
    for name, model, batch in cases:
        op = cv.HessianOperator(model, loss_fn, batch)
        ref = cv.lanczos(op, op.n, k=2, tol=1e-12, max_iter=300, seed=7)
        lam = ref.lambda_max
        gap = ref.eigenvalues[1] / lam
        # ours at default settings (tol 1e-6, verified)
        n0 = op.n_matvec
        t1 = time.perf_counter()
        d = cv.lanczos(op, op.n, seed=1)
        d_t = time.perf_counter() - t1
        d_n = op.n_matvec - n0
        o_n, o_t, o_e, _ = ours_to_accuracy(op, lam)
        o4_n, o4_t, _, _ = ours_to_accuracy(op, lam, 1e-4)
        p_def_lam, p_def_t = pyhessian_run(model, loss_fn, batch, 100, 1e-3)
        p_n, p_t, p_e = pyhessian_to_accuracy(model, loss_fn, batch, lam)
        p4_n, p4_t, _ = pyhessian_to_accuracy(model, loss_fn, batch, lam, 1e-4)
        head = f"{name:5} {op.n:7d} {lam:12.8f} {gap:7.4f} |"
        print(f"{head} {'phasewatch':10} {o_n:10d} {o_t:8.2f} | {d_n:13d} {d_t:6.2f} "
              f"{abs(d.lambda_max - lam) / lam:10.1e}   (to 1e-4: {o4_n} HVPs, {o4_t:.2f} s)")
        p_n_s = f"{p_n:10d}" if p_n else f"{'>4000':>10}"
        p4 = f"{p4_n} HVPs, {p4_t:.2f} s" if p4_n else "not reached in 4000"
        print(f"{'':{len(head) - 1}}| {'pyhessian':10} {p_n_s} {p_t:8.2f} | {'<=100':>13} {p_def_t:6.2f} "
              f"{abs(p_def_lam - lam) / lam:10.1e}   (to 1e-4: {p4}; best error {p_e:.1e})")
        if p4_n:
            ratios.append((name + " (1e-4)", p4_n / o4_n, p4_t / o4_t))
        print(f"{'':{len(head) - 1}}  reference residual {ref.residuals[0]:.1e}; S = 2/0.2 - lambda_max = "
              f"{10 - lam:+.6f} (pyhessian default gives {10 - p_def_lam:+.6f})")
        if p_n:
            ratios.append((name + " (1e-6)", p_n / o_n, p_t / o_t))
    for name, rn, rt in ratios:
        print(f"ratio pyhessian/phasewatch on {name}: {rn:.1f}x HVPs, {rt:.1f}x wall time")

    # trace on a small MLP with an exact reference
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(), torch.nn.Linear(40, 10)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (256,), generator=g)
    ce = torch.nn.functional.cross_entropy
    op = cv.HessianOperator(small, ce, (x, y))
    exact = float(np.trace(op.dense()))
    t1 = time.perf_counter()
    tr = cv.hutchinson_trace(op, op.n, rtol=0.01, seed=0)
    t_ours = time.perf_counter() - t1
    from pyhessian import hessian

    torch.manual_seed(0)
    h = hessian(small, ce, data=(x, y), cuda=False)
    t1 = time.perf_counter()
    ptr = h.trace()
    t_p = time.perf_counter() - t1
    print(f"\ntrace, P={op.n}: exact {exact:.4f}")
    print(f"  phasewatch adaptive (1% half-width): {tr.estimate:.4f}  95% CI [{tr.ci[0]:.4f}, {tr.ci[1]:.4f}]  "
          f"{tr.n_probes} HVPs  {t_ours:.2f} s  error {abs(tr.estimate - exact) / exact:.1e}  "
          f"covers: {tr.ci[0] <= exact <= tr.ci[1]}")
    print(f"  pyhessian default (rel. change < 1e-3): {np.mean(ptr):.4f}  no interval  {len(ptr)} HVPs  "
          f"{t_p:.2f} s  error {abs(np.mean(ptr) - exact) / exact:.1e}")


if __name__ == "__main__":
    main()
