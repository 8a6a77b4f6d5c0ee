"""The bottom layer: every error a user can act on derives from `GaRayError`.

The CLI catches `GaRayError` (also when Ray wraps it in a worker's exception) and prints its message
as one red line with exit code 2; anything else is a bug and keeps its traceback. No module here
imports any other ga_ray module.
"""

from __future__ import annotations


class GaRayError(Exception):
    """A problem the user can fix; the message says what, where, and what to do."""


class ConfigError(GaRayError, ValueError):
    """A configuration problem: the message names the key, the value and the allowed range or keys."""


class StageError(GaRayError, RuntimeError):
    """A stage cannot run or failed for a reason the user can act on."""


class DataError(GaRayError, ValueError):
    """Input documents that cannot be prepared: the message names the file, the line and the problem."""
