"""The evaluation's statistics against slow, obviously-correct references (scipy, closed forms, dense sums)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as sps

from ga_ray.evaluate import stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (33, 100), (94, 100), (1, 1), (17, 40)])
def test_wilson_equals_scipy_and_closed_form(k, n):
    p = stats.wilson(k, n)
    ref = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert p.low == pytest.approx(ref.low, abs=1e-12) and p.high == pytest.approx(ref.high, abs=1e-12)
    z = sps.norm.ppf(0.975)
    ph = k / n
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert p.low == pytest.approx(max(0.0, centre - half), abs=1e-9)
    assert p.high == pytest.approx(min(1.0, centre + half), abs=1e-9)


def test_failure_stays_in_the_denominator():
    p = stats.flags_rate([True, None, False, True])  # None: a failed request
    assert (p.k, p.n) == (2, 4)


def _fisher_reference(k1, n1, k0, n0):
    """Two-sided Fisher: sum of hypergeometric probabilities not above the observed one (dense enumeration)."""
    K, N = k1 + k0, n1 + n0
    probs = [sps.hypergeom.pmf(x, N, K, n1) for x in range(max(0, K - n0), min(K, n1) + 1)]
    obs = sps.hypergeom.pmf(k1, N, K, n1)
    return min(1.0, sum(pr for pr in probs if pr <= obs * (1 + 1e-7)))


@pytest.mark.parametrize("k1,n1,k0,n0", [(94, 100, 33, 100), (0, 100, 50, 100), (30, 60, 20, 60), (5, 40, 5, 40), (12, 50, 3, 50)])
def test_fisher_equals_hypergeometric_sum(k1, n1, k0, n0):
    assert stats.fisher_p(k1, n1, k0, n0) == pytest.approx(_fisher_reference(k1, n1, k0, n0), rel=1e-6)


def test_holm_equals_step_down_reference():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, size=9)
    p[3] = np.nan  # not tested: not in the family
    got = stats.holm(p)
    ok = [i for i in range(9) if not np.isnan(p[i])]
    m = len(ok)
    order = sorted(ok, key=lambda i: p[i])
    ref, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        ref[i] = running
    for i in range(9):
        if i == 3:
            assert math.isnan(got[i])
        else:
            assert got[i] == pytest.approx(ref[i], rel=1e-12)


def test_split_is_stratified_seeded_and_disjoint():
    ids = [f"p{i:03d}" for i in range(100)]
    kinds = ["invite" if i % 5 < 3 else "neutral" for i in range(100)]
    sel, rep = stats.split_halves(ids, kinds, seed=3)
    assert sel.isdisjoint(rep) and sel | rep == set(ids)
    kind = dict(zip(ids, kinds))
    assert sum(kind[i] == "invite" for i in sel) == 30 and sum(kind[i] == "neutral" for i in sel) == 20
    assert stats.split_halves(ids, kinds, seed=3) == (sel, rep)
    assert stats.split_halves(ids, kinds, seed=4)[0] != sel


def test_best_alpha_is_chosen_on_one_half_and_reported_on_the_other():
    ids = [f"p{i:02d}" for i in range(40)]
    kinds = ["invite"] * 24 + ["neutral"] * 16
    sel, rep = stats.split_halves(ids, kinds, seed=0)
    baseline = {i: False for i in ids}
    # alpha 5 fires on every selection prompt and on none of the report prompts (it looks best where it is chosen);
    # alpha 2 fires on half of both halves
    lucky = {i: i in sel for i in ids}
    steady = {i: (int(i[1:]) % 2 == 0) for i in ids}
    cells = [stats.Cell("a2", "toward", 2.0, steady), stats.Cell("a5", "toward", 5.0, lucky)]
    best = stats.best_held_out(cells, baseline, sel, rep, direction=+1)
    assert best["variant"] == "a5"  # chosen on the selection half ...
    assert best["rate"] == 0.0 and best["delta_pp"] == 0.0  # ... and its report-half rate shows it does not replicate
    assert best["selection_delta_pp"] == pytest.approx(100.0)
    # the report half never influences the choice
    flipped = {i: (not v) if i in rep else v for i, v in steady.items()}
    best2 = stats.best_held_out([stats.Cell("a2", "toward", 2.0, flipped), cells[1]], baseline, sel, rep, +1)
    assert best2["variant"] == "a5"
    # the report-half p-value is Fisher's on the report half's counts
    r_k = sum(steady[i] for i in rep)
    best3 = stats.best_held_out([cells[0]], baseline, sel, rep, +1)
    assert best3["k"] == r_k and best3["n"] == len(rep)
    assert best3["p"] == pytest.approx(sps.fisher_exact([[r_k, len(rep) - r_k], [0, len(rep)]]).pvalue)
    # an ineligible (collapsed) cell is never chosen
    assert stats.best_held_out([stats.Cell("a5", "toward", 5.0, lucky, eligible=False)], baseline, sel, rep, +1) is None


def test_flip_shares_and_recommended_alpha():
    base = {"a": True, "b": False, "c": True, "d": False}
    steer = {"a": False, "b": True, "c": True, "d": True}
    assert stats.flip_shares(base, steer, +1) == (0.5, 0.25)
    assert stats.flip_shares(base, steer, -1) == (0.25, 0.5)
    assert stats.recommended_alpha([0.5, 1, 2, 5], [0.01, 0.05, 0.2, 0.9], 0.1) == 1
    assert stats.recommended_alpha([0.5, 1], [0.3, float("nan")], 0.1) is None


def _kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def test_topk_kl_is_exact_with_full_support_and_a_lower_bound_otherwise():
    rng = np.random.default_rng(1)
    vocab = [f"t{i}" for i in range(50)]
    for _ in range(20):
        p = rng.dirichlet(np.full(50, 0.3))
        q = rng.dirichlet(np.full(50, 0.3))
        full_p = {t: math.log(x) for t, x in zip(vocab, p)}
        full_q = {t: math.log(x) for t, x in zip(vocab, q)}
        assert stats.topk_kl(full_p, full_q) == pytest.approx(_kl(p, q), rel=1e-9, abs=1e-12)
        k = 5
        top_p = dict(sorted(full_p.items(), key=lambda kv: -kv[1])[:k])
        top_q = dict(sorted(full_q.items(), key=lambda kv: -kv[1])[:k])
        assert stats.topk_kl(top_p, top_q) <= _kl(p, q) + 1e-12
    assert stats.topk_kl(full_p, full_p) == pytest.approx(0.0, abs=1e-12)


def test_perplexity_and_looping():
    lps = [math.log(0.5), math.log(0.25)]
    assert stats.perplexity(lps) == pytest.approx(math.sqrt(8))
    assert stats.is_looping("the cat sat on " * 6)
    assert not stats.is_looping("- apples are red\n- pears are green\n- plums are purple")
    assert not stats.is_looping("Step 1: 2 + 3 = 5\nStep 2: 5 * 2 = 10\nAnswer: 10")
    assert stats.degenerate_flags("", "stop", None)["empty"]
    assert stats.degenerate_flags("abc", "length", None) == {"empty": False, "looping": False, "no_stop": True, "degenerate": True}
    assert not stats.degenerate_flags(None, None, "APIConnectionError")["degenerate"]  # a failure, not degenerate


def test_split_ignores_the_global_rng():
    ids = [f"x{i}" for i in range(11)]
    kinds = ["invite"] * 7 + ["neutral"] * 4
    a = stats.split_halves(ids, kinds, 0)
    random.seed(123)  # the global RNG does not matter
    assert stats.split_halves(ids, kinds, 0) == a
    assert len(a[0]) == 4 + 2 and len(a[1]) == 3 + 2
