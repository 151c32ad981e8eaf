"""phasewatch: record how a neural network learns, and analyse it.

    rec = phasewatch.Recorder("runs/exp", model, optimizer)   # torch side
    run = phasewatch.open_run("runs/exp")                     # numpy side, no torch needed
    res = phasewatch.analyze(run, window=10)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import PhasewatchError, RecorderError, RunFormatError, RunTooShortError, SchemaVersionError
from .store import open_run, pack_run, repair_run


def __getattr__(name: str):
    # torch and matplotlib are imported only when asked for, so the analyzer runs without them
    if name == "Recorder":
        from .record.recorder import Recorder

        return Recorder
    if name in ("analyze", "Analysis"):
        from .analysis import pipeline

        return getattr(pipeline, name)
    if name in ("analyze_many", "AnalysisFailure"):
        from .workflows import batch

        return getattr(batch, name)
    if name == "plots":
        from . import plot

        return plot
    raise AttributeError(f"module 'phasewatch' has no attribute {name!r}")


__all__ = [
    "Analysis",
    "AnalysisFailure",
    "PhasewatchError",
    "Recorder",
    "RecorderError",
    "RunFormatError",
    "RunTooShortError",
    "SchemaVersionError",
    "__version__",
    "analyze",
    "analyze_many",
    "open_run",
    "pack_run",
    "plots",
    "repair_run",
]
