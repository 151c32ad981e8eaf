"""phasewatch: record how a neural network learns, and analyse it.

    rec = phasewatch.Recorder("runs/exp", model, optimizer)   # torch side
    run = phasewatch.open_run("runs/exp")                     # numpy side, no torch needed
    res = phasewatch.analyze(run, window=10)
    fig = phasewatch.plots.overview(res)                      # matplotlib

The public API, all of it listed by ``dir(phasewatch)``:

- recording: :class:`Recorder` (:mod:`phasewatch.record`; controllers in
  :mod:`phasewatch.record.control`, framework callbacks in :mod:`phasewatch.record.integrations`)
- the run on disk: :func:`open_run` -> :class:`Run`, :func:`pack_run`, :func:`repair_run`
- analysis: :func:`analyze` -> :class:`Analysis`; :func:`analyze_many` for many runs in parallel
  (a run that fails is an :class:`AnalysisFailure`)
- figures: :mod:`plots` (:mod:`phasewatch.plot`); curvature probes: :mod:`curvature`
- errors: :class:`PhasewatchError` and its subclasses

Importing phasewatch imports neither torch nor matplotlib: ``Recorder``, ``curvature`` and
``plots`` load them when first used, so the analyzer runs without them.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib

from .errors import (
    InvalidArgumentError,
    PhasewatchError,
    RecorderError,
    RunFormatError,
    RunTooShortError,
    SchemaVersionError,
)
from .store import Run, open_run, pack_run, repair_run

# name -> (module, attribute; None: the module itself), imported on first access
_LAZY = {
    "Recorder": ("phasewatch.record.recorder", "Recorder"),
    "analyze": ("phasewatch.analysis.pipeline", "analyze"),
    "Analysis": ("phasewatch.analysis.pipeline", "Analysis"),
    "analyze_many": ("phasewatch.workflows.batch", "analyze_many"),
    "AnalysisFailure": ("phasewatch.workflows.batch", "AnalysisFailure"),
    "plots": ("phasewatch.plot", None),
    "curvature": ("phasewatch.curvature", None),
}


def __getattr__(name: str):
    # torch and matplotlib are imported only when asked for, so the analyzer runs without them
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'phasewatch' has no attribute {name!r}")


__all__ = [
    "Analysis",
    "AnalysisFailure",
    "InvalidArgumentError",
    "PhasewatchError",
    "Recorder",
    "RecorderError",
    "Run",
    "RunFormatError",
    "RunTooShortError",
    "SchemaVersionError",
    "__version__",
    "analyze",
    "analyze_many",
    "curvature",
    "open_run",
    "pack_run",
    "plots",
    "repair_run",
]


def __dir__() -> list[str]:
    return sorted(__all__)
