"""Token-budget batching with length bucketing (pure numpy: no torch, no Ray).

The gradients stage receives documents in windows (one Ray Data batch of `window_docs` rows) and
packs each window into forward/backward batches here: sort the window by length (longest first),
then cut greedily so that every batch has at most `max_docs` documents and at most `max_tokens`
padded tokens (documents × longest length). Documents of similar length land together, so padding
stays small; a batch of long documents holds fewer of them, so memory per pass stays bounded.

Padding fraction = 1 − real tokens / padded tokens, where a batch of B documents padded to length T
costs B·T padded tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PaddingStats:
    n_batches: int
    real_tokens: int
    padded_tokens: int

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.padded_tokens == 0 else 1.0 - self.real_tokens / self.padded_tokens

    def __add__(self, other: PaddingStats) -> PaddingStats:
        return PaddingStats(self.n_batches + other.n_batches, self.real_tokens + other.real_tokens, self.padded_tokens + other.padded_tokens)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n_batches": self.n_batches,
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "padding_fraction": round(self.padding_fraction, 6),
        }


def _check(max_docs: int, max_tokens: int) -> None:
    if max_docs < 1:
        raise ValueError(f"max_docs must be >= 1, got {max_docs}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")


def plan_batches(lengths: np.ndarray, max_docs: int, max_tokens: int) -> list[np.ndarray]:
    """Group positions 0..n-1 of `lengths` into batches, longest documents first.

    Every batch has at most `max_docs` documents and `len(batch) * max(lengths[batch]) <= max_tokens`,
    except that a document longer than `max_tokens` gets a batch of its own. Every position appears
    in exactly one batch. Deterministic (stable sort).
    """
    _check(max_docs, max_tokens)
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, n = 0, len(order)
    while start < n:
        longest = max(int(lengths[order[start]]), 1)  # sorted descending: the first is the batch's padded length
        size = max(1, min(max_docs, max_tokens // longest))
        batches.append(order[start : start + size])
        start += size
    return batches


def naive_batches(n: int, max_docs: int) -> list[np.ndarray]:
    """Consecutive chunks of `max_docs` documents in data order (what a plain fixed batch size gives)."""
    _check(max_docs, 1)
    return [np.arange(i, min(i + max_docs, n)) for i in range(0, n, max_docs)]


def padding_stats(lengths: np.ndarray, batches: list[np.ndarray]) -> PaddingStats:
    """Real and padded token counts of a batching of `lengths`."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = padded = 0
    for b in batches:
        if len(b) == 0:
            continue
        lb = lengths[b]
        real += int(lb.sum())
        padded += int(lb.max()) * len(b)
    return PaddingStats(len([b for b in batches if len(b)]), real, padded)


def plan_windowed(lengths: np.ndarray, window: int, max_docs: int, max_tokens: int) -> list[np.ndarray]:
    """What the stage does when documents arrive in consecutive windows of `window`: bucket each window.

    Returns batches of global positions (used by the benchmark and to predict the padding fraction).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    lengths = np.asarray(lengths, dtype=np.int64)
    out: list[np.ndarray] = []
    for s in range(0, len(lengths), window):
        out.extend(b + s for b in plan_batches(lengths[s : s + window], max_docs, max_tokens))
    return out
