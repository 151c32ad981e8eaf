"""The run format on disk: the only part of phasewatch that touches h5py."""

from .format import SCHEMA_VERSION
from .pack import pack_run, repair_run
from .reader import Run, open_run
from .writer import RunWriter

__all__ = ["SCHEMA_VERSION", "Run", "RunWriter", "open_run", "pack_run", "repair_run"]
