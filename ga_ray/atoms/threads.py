"""Threading policy of the learner on CPU: one thread for the many small ops, all for the big GEMMs.

Intra-op parallelism on small tensors gains little, and on a shared machine every parallel op waits at
its barrier for its slowest (descheduled) thread: measured on a loaded 2-core machine, a fit with 2
torch threads everywhere ran 8× slower than with 1. Inside `small_ops()` torch runs single-threaded
and only the few large matrix products (Gram matrix, B − A·D, X·Dᵀ) enter `gemm()` to use all threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_gemm_threads = 0
#: Products smaller than this (multiply-adds) stay single-threaded: for them the parallel start-up
#: and the threads' spin-waiting afterwards cost more than they save. (Measured on a quiet 2-core VM:
#: lowering it to 25 M made the demo's fit 10% faster in wall time but cost 20% more CPU time.)
GEMM_PARALLEL_MIN = 200_000_000


@contextlib.contextmanager
def small_ops(device: torch.device | str = "cpu") -> Iterator[None]:
    """Single-threaded torch for the block, remembering the thread count for `gemm()`."""
    global _gemm_threads
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n <= 1 or _gemm_threads:
        yield
        return
    _gemm_threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _gemm_threads = 0


@contextlib.contextmanager
def gemm(macs: float | None = None) -> Iterator[None]:
    """All threads for one large product of `macs` multiply-adds (inside `small_ops()`; a no-op
    elsewhere or for products below GEMM_PARALLEL_MIN)."""
    n = _gemm_threads
    if n <= 1 or (macs is not None and macs < GEMM_PARALLEL_MIN):
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def cpu_threads() -> int:
    """The threads this process gave torch (also inside `small_ops()`, where torch itself runs on one)."""
    return _gemm_threads or torch.get_num_threads()
