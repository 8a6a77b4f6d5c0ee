"""Statistics of the steering evaluation: pure functions on flags and log-probabilities (no Ray, no files).

- rates with Wilson 95% intervals (statsmodels `proportion_confint(method="wilson")`);
- the difference of a cell (one variant) to the alpha = 0 baseline on the SAME prompts with Fisher's exact test
  (scipy), Holm-corrected over every (sign, alpha) tried for one atom (statsmodels `multipletests`);
- the "best" alpha chosen on one half of the prompts (a seeded split, stratified by kind) and reported on the other
  half, so no maximum is taken on the prompts it is reported on;
- the anti-steerable share: prompts whose flag the steering moved against its intended direction;
- token KL from top-k log-probs (a lower bound that is exact when k covers the support) and perplexity;
- degenerate output (empty, looping n-grams, no stop within the limit).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import fisher_exact
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from ga_ray.detectors import Rate as Proportion  # k of n with a Wilson interval: one type for both

# ------------------------------------------------------------------------------------------------ rates


def wilson(k: int, n: int, alpha: float = 0.05) -> Proportion:
    """k of n with a Wilson score interval (95% by default); n = 0 gives the whole [0, 1]."""
    if n == 0:
        return Proportion(0, 0, 0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return Proportion(int(k), int(n), float(lo), float(hi))


def flags_rate(flags: Sequence[bool | None]) -> Proportion:
    """Rate of True; None (a failed request) counts as a failure: it stays in n."""
    f = [bool(x) for x in flags]
    return wilson(sum(f), len(f))


def fisher_p(k1: int, n1: int, k0: int, n0: int) -> float:
    """Two-sided Fisher exact test of k1/n1 against k0/n0."""
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float(fisher_exact([[k1, n1 - k1], [k0, n0 - k0]], alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (NaN entries stay NaN and do not count in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out.tolist()


# ------------------------------------------------------------------------------------------ held-out split


def split_halves(prompt_ids: Sequence[str], kinds: Sequence[str], seed: int) -> tuple[set[str], set[str]]:
    """A seeded split of the prompts into (selection half, report half), stratified by kind: each kind's prompts
    are shuffled and cut in two, so both halves keep the invite/neutral ratio (odd counts: the extra prompt goes
    to the selection half)."""
    by_kind: dict[str, list[str]] = {}
    for pid, kind in zip(prompt_ids, kinds):
        by_kind.setdefault(kind, []).append(pid)
    rng = random.Random(f"split-{seed}")
    sel: set[str] = set()
    rep: set[str] = set()
    for kind in sorted(by_kind):
        ids = sorted(by_kind[kind])
        rng.shuffle(ids)
        cut = (len(ids) + 1) // 2
        sel.update(ids[:cut])
        rep.update(ids[cut:])
    return sel, rep


@dataclass(frozen=True)
class Cell:
    """One steered variant on one behaviour's prompts: its flags and the baseline's, aligned by prompt id."""

    name: str
    sign: str  # toward | away
    alpha: float
    flags: Mapping[str, bool]  # prompt id -> detector fired (a failed request: False)
    eligible: bool = True  # False: collapsed, or outside the KL budget where that is required


def rate_on(flags: Mapping[str, bool], ids: set[str] | None = None) -> Proportion:
    keys = [k for k in flags if ids is None or k in ids]
    return flags_rate([flags[k] for k in keys])


def best_held_out(cells: Sequence[Cell], baseline: Mapping[str, bool], selection: set[str], report: set[str],
                  direction: int) -> dict | None:
    """The cell that moves the rate most in `direction` (+1 up, -1 down) on the SELECTION half, reported on the
    REPORT half: its rate, the baseline's, the difference (pp) and Fisher's p there. Ineligible cells are skipped;
    ties go to the smaller |alpha| (the gentler intervention). None when no cell is eligible."""
    base_sel = rate_on(baseline, selection).rate
    best, best_gain = None, -math.inf
    for c in sorted(cells, key=lambda c: (abs(c.alpha), c.sign)):
        if not c.eligible:
            continue
        gain = direction * (rate_on(c.flags, selection).rate - base_sel)
        if gain > best_gain + 1e-12:
            best, best_gain = c, gain
    if best is None:
        return None
    r, b = rate_on(best.flags, report), rate_on(baseline, report)
    return {
        "variant": best.name, "sign": best.sign, "alpha": best.alpha,
        "selection_delta_pp": 100 * direction * best_gain,
        "rate": r.rate, "k": r.k, "n": r.n, "ci_low": r.low, "ci_high": r.high,
        "baseline_rate": b.rate, "delta_pp": 100 * (r.rate - b.rate),
        "p": fisher_p(r.k, r.n, b.k, b.n),
    }


def flip_shares(baseline: Mapping[str, bool], steered: Mapping[str, bool], direction: int) -> tuple[float, float]:
    """(share moved the intended way, share moved the WRONG way: anti-steerable) over the prompts both answered.
    `direction` +1: the steering should make the detector fire; -1: stop it firing."""
    keys = [k for k in steered if k in baseline]
    if not keys:
        return float("nan"), float("nan")
    up = sum(1 for k in keys if steered[k] and not baseline[k])
    down = sum(1 for k in keys if baseline[k] and not steered[k])
    with_, against = (up, down) if direction > 0 else (down, up)
    return with_ / len(keys), against / len(keys)


def recommended_alpha(alphas: Sequence[float], kls: Sequence[float], budget: float) -> float | None:
    """The largest |alpha| whose mean neutral-prompt token KL to alpha = 0 stays within `budget` (Arditi et al.'s
    rule); None when none does. NaN KL (not measured) is never within budget."""
    ok = [a for a, k in zip(alphas, kls) if not math.isnan(k) and k <= budget]
    return max(ok, key=abs) if ok else None


# --------------------------------------------------------------------------------------------- KL, perplexity


def topk_kl(p_top: Mapping[str, float], q_top: Mapping[str, float]) -> float:
    """KL(P || Q) in nats from the top-k log-probs of each distribution at one position.

    The partition "each token in both top-k lists, and everything else" coarsens the vocabulary; KL on a
    coarsening is a LOWER bound of the true KL (data-processing inequality) and equals it when the top-k
    lists cover both supports. Tokens in only one list fall into the "everything else" bucket."""
    common = [t for t in p_top if t in q_top]
    p = np.array([math.exp(p_top[t]) for t in common])
    q = np.array([math.exp(q_top[t]) for t in common])
    kl = float(np.sum(p * (np.log(p) - np.log(q)))) if common else 0.0
    p_rest, q_rest = max(0.0, 1.0 - float(p.sum())), max(0.0, 1.0 - float(q.sum()))
    if p_rest > 1e-12:
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, 1e-12)))
    return max(kl, 0.0)


def mean_topk_kl(p_positions: Sequence[Mapping[str, float]], q_positions: Sequence[Mapping[str, float]]) -> tuple[float, int]:
    """(sum of per-position KL, positions) over aligned positions (callers pool sums over prompts)."""
    if len(p_positions) != len(q_positions):
        raise ValueError(f"KL: {len(p_positions)} positions against {len(q_positions)}")
    return float(sum(topk_kl(p, q) for p, q in zip(p_positions, q_positions))), len(p_positions)


def perplexity(token_logprobs: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) of the tokens given."""
    if len(token_logprobs) == 0:
        return float("nan")
    return float(math.exp(-float(np.mean(token_logprobs))))


# --------------------------------------------------------------------------------------------- degenerate

_WORD = re.compile(r"\S+")


def is_looping(text: str, n: int = 4, min_repeats: int = 3, min_cover: float = 0.4) -> bool:
    """A word n-gram occurs at least `min_repeats` times AND the repeated n-grams cover at least `min_cover` of the
    words (a list that legitimately repeats a short phrase twice is not a loop; "the cat the cat the cat ..." is)."""
    words = _WORD.findall(text or "")
    if len(words) < n * min_repeats:
        return False
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts: dict[tuple[str, ...], int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    if max(counts.values()) < min_repeats:
        return False
    covered = np.zeros(len(words), dtype=bool)
    for i, g in enumerate(grams):
        if counts[g] >= 2:
            covered[i : i + n] = True
    return float(covered.mean()) >= min_cover


def degenerate_flags(response: str | None, finish_reason: str | None, error: str | None) -> dict[str, bool]:
    """empty / looping / no stop within the limit (a failed request is none of these: it is a failure)."""
    if error:
        return {"empty": False, "looping": False, "no_stop": False, "degenerate": False}
    text = response or ""
    empty = not text.strip()
    looping = is_looping(text)
    no_stop = finish_reason == "length"
    return {"empty": empty, "looping": looping, "no_stop": no_stop, "degenerate": empty or looping or no_stop}
