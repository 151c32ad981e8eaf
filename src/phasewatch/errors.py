"""The error hierarchy: every error phasewatch raises on purpose is a :class:`PhasewatchError`.

Messages are one line and name the file, the problem and the fix, so that the command line can
print ``str(err)`` and exit non-zero without a traceback.
"""

from __future__ import annotations


class PhasewatchError(Exception):
    """Base class of every error phasewatch raises on purpose."""


class InvalidArgumentError(PhasewatchError, ValueError):
    """An argument is out of range, of the wrong kind or inconsistent with another.

    Also a :class:`ValueError`, so code that catches ``ValueError`` keeps working."""


class RunFormatError(PhasewatchError):
    """A run directory or file is missing, foreign, corrupted or of an unknown schema."""


class SchemaVersionError(RunFormatError):
    """The run was written by a newer phasewatch than this reader knows."""


class RunTooShortError(PhasewatchError):
    """The run has fewer usable rows than the analysis window needs."""


class RecorderError(PhasewatchError):
    """The recorder was configured or used in a way it cannot honour."""

