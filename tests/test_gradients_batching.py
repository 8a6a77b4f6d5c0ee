"""Token-budget batching with length bucketing: every document once, budgets kept, little padding."""

from __future__ import annotations

import numpy as np
import pytest

from ga_ray.kernel.batching import naive_batches, padding_stats, plan_batches, plan_windowed


def _realistic_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(120), sigma=0.7, size=n), 8, 512).astype(np.int64)


@pytest.mark.parametrize(("max_docs", "max_tokens"), [(1, 10_000), (4, 64), (16, 4096), (8, 10), (3, 1)])
def test_every_document_once_and_budgets_kept(max_docs, max_tokens):
    lengths = np.array([5, 1, 9, 9, 3, 20, 7, 2, 2, 11, 4, 6, 30, 8])
    batches = plan_batches(lengths, max_docs, max_tokens)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= max_docs
        padded = len(b) * lengths[b].max()
        assert padded <= max_tokens or len(b) == 1, (b, padded)


def test_padding_stats_by_hand():
    lengths = np.array([3, 5, 2, 5])
    st = padding_stats(lengths, [np.array([0, 1]), np.array([2, 3])])
    assert (st.real_tokens, st.padded_tokens, st.n_batches) == (15, 20, 2)
    assert st.padding_fraction == pytest.approx(0.25)
    # bucketing puts the two 5s together: [5,5] and [3,2] -> padded 10 + 6
    st2 = padding_stats(lengths, plan_batches(lengths, 2, 100))
    assert st2.padded_tokens == 16


def test_bucketing_keeps_padding_small_against_naive():
    lengths = _realistic_lengths(4000)
    naive = padding_stats(lengths, naive_batches(len(lengths), 16))
    bucketed = padding_stats(lengths, plan_windowed(lengths, window=1024, max_docs=16, max_tokens=4096))
    assert bucketed.real_tokens == naive.real_tokens == int(lengths.sum())
    assert naive.padding_fraction > 0.3  # lognormal lengths: a fixed batch of 16 pads a lot
    assert bucketed.padding_fraction < 0.05
    assert bucketed.padding_fraction < naive.padding_fraction / 8


def test_windowed_plan_covers_all_and_stays_inside_windows():
    lengths = _realistic_lengths(250, seed=1)
    batches = plan_windowed(lengths, window=64, max_docs=8, max_tokens=1024)
    assert sorted(np.concatenate(batches).tolist()) == list(range(250))
    for b in batches:
        assert len(set((b // 64).tolist())) == 1  # a batch never spans two windows


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_batches(np.array([1, 2]), 0, 10)
    with pytest.raises(ValueError):
        plan_windowed(np.array([1, 2]), 0, 1, 10)
    assert plan_batches(np.array([], dtype=np.int64), 4, 10) == []
