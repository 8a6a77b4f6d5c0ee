"""numba when it is installed (it is a dependency), plain Python when it is not.

The borrowed GPU machines have torch but no numba, and `ga-ray bench gpu` must run there: code that
uses `njit` still imports, `HAVE_NUMBA` tells callers to take their torch/numpy path instead.
"""

from __future__ import annotations

from typing import Any

try:
    import numba as _numba

    HAVE_NUMBA = True
    njit = _numba.njit

except ImportError:  # pragma: no cover - exercised by the no-numba subprocess test of bench gpu
    HAVE_NUMBA = False

    def njit(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda f: f
