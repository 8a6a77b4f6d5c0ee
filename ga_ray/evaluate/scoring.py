"""Side effects that need log-probs through the endpoint: perplexity of held-out documents and token KL to alpha = 0.

Both send `prompt = prompt_ids + response_ids` with `echo=True, max_tokens=0` and read the echoed per-token
log-probs (`logprobs=k` for the KL's top-k, 0 for perplexity). Only the response positions count (those at or
after `len(prompt_ids)`), as in training, where the loss mask covers the response.

- perplexity of a variant: exp(mean negative log-likelihood over every response token of every document);
- KL of a variant on a prompt set: the mean over the alpha = 0 variant's greedy answers to the NEUTRAL prompts
  (every answer token, pooled over prompts) of KL(P_alpha=0 || P_variant), each position's KL computed from the
  two top-k lists (`stats.topk_kl`: a lower bound, exact when k covers the support).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ga_ray.evaluate import stats
from ga_ray.evaluate.client import CompletionJob, CompletionResult


def response_ids(tokenizer: Any, response: str, stopped: bool) -> list[int]:
    """Token ids of a response as the model would have produced them: its text, then EOS when it stopped."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if stopped and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def score_job(variant: str, item: str, prompt_ids: Sequence[int], resp_ids: Sequence[int], top_k: int) -> CompletionJob:
    return CompletionJob(key=(variant, item), model=variant, prompt=list(prompt_ids) + list(resp_ids), max_tokens=0,
                         echo=True, logprobs=top_k)


def score_row(r: CompletionResult, n_prompt: int) -> dict[str, Any]:
    """A durable row of one scoring request: the response positions' log-probs and top-k lists."""
    row: dict[str, Any] = {"variant": r.key[0], "item": r.key[1], "n_prompt": n_prompt, "error": r.error,
                           "latency_s": r.latency_s, "attempts": r.attempts,
                           "token_logprobs": None, "top_tokens": None, "top_values": None}
    if r.error is None:
        lps = r.token_logprobs or []
        tops = r.top_logprobs or [None] * len(lps)
        row["token_logprobs"] = [float(x) if x is not None else float("nan") for x in lps[n_prompt:]]
        row["top_tokens"] = [list(d.keys()) if d else [] for d in tops[n_prompt:]]
        row["top_values"] = [[float(v) for v in d.values()] if d else [] for d in tops[n_prompt:]]
    return row


def perplexities(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """{variant: perplexity} over the `ppl:` items (a variant with any failed document gets NaN: not comparable)."""
    nll: dict[str, list[float]] = {}
    failed: set[str] = set()
    for r in rows:
        if not str(r["item"]).startswith("ppl:"):
            continue
        if r.get("error") or r.get("token_logprobs") is None:
            failed.add(r["variant"])
            continue
        nll.setdefault(r["variant"], []).extend(r["token_logprobs"])
    return {v: (float("nan") if v in failed else stats.perplexity(lps)) for v, lps in nll.items()} | \
        {v: float("nan") for v in failed}


def _tops(r: Mapping[str, Any]) -> list[dict[str, float]]:
    return [dict(zip(t, v)) for t, v in zip(r["top_tokens"], r["top_values"])]


def mean_kls(rows: Sequence[Mapping[str, Any]], reference: str, item_sets: Mapping[str, Sequence[str]]) -> dict[tuple[str, str], float]:
    """{(variant, prompt set): mean token KL(P_ref || P_variant)} over the `kl:` items of each set."""
    by_key = {(r["variant"], r["item"]): r for r in rows if str(r["item"]).startswith("kl:")}
    out: dict[tuple[str, str], float] = {}
    variants = {v for v, _ in by_key}
    for beh, items in item_sets.items():
        for v in variants:
            total, count, missing = 0.0, 0, False
            for item in items:
                ref, cur = by_key.get((reference, item)), by_key.get((v, item))
                if ref is None or ref.get("error"):
                    continue  # no reference answer scored: this prompt does not count for anyone
                if cur is None:
                    continue  # this variant was not asked on this set
                if cur.get("error"):
                    missing = True
                    break
                s, n = stats.mean_topk_kl(_tops(ref), _tops(cur))
                total, count = total + s, count + n
            if count and not missing:
                out[(v, beh)] = total / count
            elif missing:
                out[(v, beh)] = float("nan")
    return out

