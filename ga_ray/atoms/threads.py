"""Threading policy of the learner on CPU: one thread for the many small ops, all for the big GEMMs.

Intra-op parallelism on small tensors gains little, and on a shared machine every parallel op waits at
its barrier for its slowest (descheduled) thread: measured on a loaded 2-core machine, a fit with 2
torch threads everywhere ran 8× slower than with 1. Inside `small_ops()` torch runs single-threaded
and only the few large matrix products (Gram matrix, B − A·D, X·Dᵀ) enter `gemm()` to use all threads.
Inside `small_ops()` on CPU those large products go through numpy's BLAS (`matmul()`), which is
held to one thread except while it runs one of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

_gemm_threads = 0
_numpy_blas = None
#: Products smaller than this (multiply-adds) stay single-threaded: for them the parallel start-up
#: and the threads' spin-waiting afterwards cost more than they save, and on a loaded machine a parallel
#: product waits for its descheduled thread. (Measured on 2 cores: with torch's threads, 25 M made the
#: demo's fit 10% faster in wall time for 20% more CPU time; with numpy's, 20% faster at the same CPU
#: time on a quiet machine, but each product took ~4 ms instead of ~1 while another job ran.)
GEMM_PARALLEL_MIN = 200_000_000


@contextlib.contextmanager
def small_ops(device: torch.device | str = "cpu") -> Iterator[None]:
    """Single-threaded torch for the block, remembering the thread count for `gemm()`."""
    global _gemm_threads, _numpy_blas
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n <= 1 or _gemm_threads:
        yield
        return
    _gemm_threads = n
    torch.set_num_threads(1)
    blas = _numpy_blas_controller()
    limiter = blas.limit(limits=1) if blas is not None else None
    _numpy_blas = blas
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _gemm_threads = 0
        _numpy_blas = None
        if limiter is not None:
            limiter.restore_original_limits()


def _numpy_blas_controller():
    """threadpoolctl's handle on numpy's BLAS, or None where threadpoolctl is missing (the GPU machines'
    minimal environment: the products then stay on torch)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas")
    return blas if blas.lib_controllers else None


def numpy_blas_active() -> bool:
    """Whether the learner's products go through numpy's BLAS now (inside `small_ops()` on CPU)."""
    return _numpy_blas is not None


def uses_numpy(t: torch.Tensor) -> bool:
    """Whether the learner's products on `t` go through numpy's BLAS (inside `small_ops()`, CPU, float)."""
    return _numpy_blas is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def parallel(macs: float | None) -> bool:
    """Whether a product of `macs` multiply-adds runs on more than one thread (inside `small_ops()`)."""
    return _gemm_threads > 1 and (macs is None or macs >= GEMM_PARALLEL_MIN)


def matmul(a: torch.Tensor, b: torch.Tensor, macs: float | None = None, precision: torch.dtype | None = None) -> torch.Tensor:
    """a @ b for the learner's large products.

    `precision` (bfloat16, from `ga_ray.atoms.precision.product_dtype`): both operands rounded to it,
    the product in torch (`rounded_matmul`). Otherwise:

    Inside `small_ops()` on CPU: numpy's BLAS (views, no copies; `a @ a.T` becomes a symmetric rank-k
    update), on all threads when `parallel(macs)`. Measured on a 2-core AMD EPYC against torch's MKL at
    the learner's shapes: 15-25% less time on one thread and on two, and on two it stays efficient where
    torch's is not (256×800·800×500: 0.96 vs 5.3 ms). torch is then single-threaded throughout, so the
    two libraries' thread pools never run side by side. Elsewhere: torch, under `gemm(macs)`.
    """
    if precision is not None and precision != a.dtype:
        return rounded_matmul(a, b, precision, macs)
    if uses_numpy(a) and b.dtype == a.dtype and b.device == a.device:
        return torch.from_numpy(blas_matmul(a.detach().numpy(), b.detach().numpy(), macs))
    with gemm(macs):
        return a @ b


def rounded_matmul(a: torch.Tensor, b: torch.Tensor, precision: torch.dtype, macs: float | None = None) -> torch.Tensor:
    """a @ b with both operands rounded to `precision`, the result (rounded to `precision` by torch's
    kernels) returned in a's dtype; on all threads for a large product (`gemm`)."""
    with gemm(macs):
        return (a.to(precision) @ b.to(precision)).to(a.dtype)


def blas_matmul(a: np.ndarray, b: np.ndarray, macs: float | None = None) -> np.ndarray:
    """a @ b of numpy arrays, on all threads when `parallel(macs)` (numpy's BLAS held to one otherwise)."""
    if _numpy_blas is not None and parallel(macs):
        with _numpy_blas.limit(limits=_gemm_threads):
            return a @ b
    return a @ b


@contextlib.contextmanager
def gemm(macs: float | None = None) -> Iterator[None]:
    """All threads for one large product of `macs` multiply-adds (inside `small_ops()`; a no-op
    elsewhere or for products below GEMM_PARALLEL_MIN)."""
    if not parallel(macs):
        yield
        return
    torch.set_num_threads(_gemm_threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def cpu_threads() -> int:
    """The threads this process gave torch (also inside `small_ops()`, where torch itself runs on one)."""
    return _gemm_threads or torch.get_num_threads()
