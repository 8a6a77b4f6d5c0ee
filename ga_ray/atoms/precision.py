"""Which floating-point type the learner's two largest products run in: float32, or bfloat16 where the
hardware multiplies bfloat16 natively.

The products are the batch's correlations X·Dᵀ (the coder's input) and the sweep's A·D (its residuals);
together they are most of an online step's multiply-adds. In bfloat16 both operands are rounded to 8
significant bits and the product comes back rounded to bfloat16 (torch's CPU kernels have no float32
output for bfloat16 operands). Everything else stays float32: the dictionary, its statistics A and B,
the Gram matrix (so the coder solves an exact lasso for the rounded correlations), the stopping
objective's norms, and the final encoding pass, which codes every document in float32. On this
project's 2-core AMD EPYC (AVX512-BF16), a bfloat16 product ran at 2.1× the float32 rate, and a planted-atom
fit ended at the same objective (`docs/benchmarks.md`).

`auto` picks bfloat16 only where it is native: a CUDA device that supports it, or a CPU that reports
AVX512-BF16 or AMX-BF16 (x86) or BF16 (aarch64). Elsewhere bfloat16 is emulated and slower than float32,
so `auto` keeps float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

MATMUL_PRECISIONS = ("auto", "float32", "bfloat16")


def product_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype of the large products for a `matmul_precision` setting on `device`; None: the
    operands' own dtype (no rounding)."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)} (got {precision!r})")
    if precision == "float32" or (precision == "auto" and not native_bf16(torch.device(device))):
        return None
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """`product_dtype`'s answer as a setting's name (None: float32, the operands' own)."""
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


_X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """From the kernel's CPU flags (Linux); False where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return cpuinfo_has_bf16(text)


def cpuinfo_has_bf16(text: str) -> bool:
    """Whether a /proc/cpuinfo text lists a bfloat16 matrix instruction set."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags" and _X86_BF16_FLAGS & set(value.split()):
            return True
        if key == "features" and "bf16" in value.split():
            return True
    return False
