"""``phasewatch curvature RUN --model pkg.mod:factory --data pkg.mod:batch_fn``: post-hoc probes.

Hessian and NTK probes on a run's stored checkpoints, after training."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import PhasewatchError

LOSSES = ("cross_entropy", "mse")


def load_object(spec: str, what: str):
    """``pkg.module:attr`` or ``path/to/file.py:attr`` → the object (one-line error otherwise)."""
    if ":" not in spec:
        raise PhasewatchError(f"--{what} {spec}: use module:attribute or file.py:attribute")
    mod_name, attr = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.exists():
                raise PhasewatchError(f"--{what} {spec}: no file {path}")
            sys.path.insert(0, str(path.parent.resolve()))
            ms = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(ms)
            ms.loader.exec_module(mod)
        else:
            sys.path.insert(0, str(Path.cwd()))
            mod = importlib.import_module(mod_name)
    except PhasewatchError:
        raise
    except Exception as e:  # noqa: BLE001 - user code: report, do not crash
        raise PhasewatchError(f"--{what} {spec}: cannot import ({type(e).__name__}: {e})") from None
    if not hasattr(mod, attr):
        raise PhasewatchError(f"--{what} {spec}: {mod_name} has no attribute {attr!r}")
    return getattr(mod, attr)


def _loss(spec: str):
    import torch

    if spec == "cross_entropy":
        return torch.nn.functional.cross_entropy
    if spec == "mse":
        return torch.nn.functional.mse_loss
    return load_object(spec, "loss")


def cmd_curvature(a: argparse.Namespace) -> int:
    """Run ``phasewatch curvature`` with the parsed arguments; return the exit status."""
    from ..record.posthoc import posthoc

    factory = load_object(a.model, "model")
    model = factory()
    batch = load_object(a.data, "data")() if a.data else None
    ntk = load_object(a.ntk, "ntk")() if a.ntk else None
    if batch is None and ntk is None:
        raise PhasewatchError("give --data (Hessian probes) and/or --ntk (NTK Gram)")
    steps = None
    if a.steps:
        steps = [int(x) for x in a.steps.replace(",", " ").split()]
    trace = None
    if a.trace:
        trace = "adaptive" if a.trace == "adaptive" else int(a.trace)
    dst = posthoc(a.run, model, batch, _loss(a.loss) if batch is not None else None, steps=steps, out=a.out,
                  top_k=a.topk, tol=a.tol, trace=trace, mode=a.mode, ntk_inputs=ntk, overwrite=a.overwrite, hvp=a.hvp,
                  progress=lambda m: print("  " + m, flush=True))
    print(f"wrote {dst} (phasewatch analyze/plot/report on the run include it)")
    return 0


def register(sub) -> None:
    """Add ``phasewatch curvature`` and its options to the CLI's subparsers."""
    s = sub.add_parser("curvature", help="Hessian (Lanczos, trace) and NTK probes on stored checkpoints",
                       description="Load each stored checkpoint (arrays, no pickle) into a model you build, "
                                   "and compute lambda_max (top-k, Lanczos), optionally the Hutchinson trace "
                                   "and the NTK Gram, as the recorder's live probes do.",
                       epilog="example: phasewatch curvature runs/eos --model examples/edge_of_stability.py:"
                              "make_model --data examples/edge_of_stability.py:make_data --loss "
                              "examples/edge_of_stability.py:mse")
    s.add_argument("run")
    s.add_argument("--model", required=True, help="module:factory or file.py:factory; factory() -> nn.Module")
    s.add_argument("--data", help="module:fn; fn() -> (inputs, targets), the fixed probe batch")
    s.add_argument("--loss", default="cross_entropy",
                   help="cross_entropy (default), mse, or module:fn with fn(outputs, targets) -> mean loss")
    s.add_argument("--ntk", help="module:fn; fn() -> inputs for the NTK Gram (optional)")
    s.add_argument("--steps", help="checkpoint steps to probe (default: all), e.g. '100,200'")
    s.add_argument("--topk", type=int, default=1, help="top eigenvalues (default 1)")
    s.add_argument("--tol", type=float, default=1e-6, help="Lanczos residual tolerance, relative (1e-6)")
    s.add_argument("--trace", help="Hutchinson probes: an int, or 'adaptive' (default: no trace)")
    s.add_argument("--mode", choices=["eval", "train"], default="eval", help="model mode for the loss (eval)")
    s.add_argument("--hvp", choices=["auto", "autograd", "fd"], default="auto",
                   help="Hessian-vector products: double backward (autograd), central differences of "
                        "gradients (fd), or autograd checked against fd and replaced by it if it fails (auto)")
    s.add_argument("--out", "-o", help="output run (default RUN/posthoc, or RUN.h5.posthoc for a packed run)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_curvature)
