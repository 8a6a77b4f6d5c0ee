"""The evaluate stage: every variant's answers to its behaviour's prompts, through an OpenAI-compatible endpoint.

1. plan: each steered variant gets its behaviour's prompt set (a variant without a behaviour gets every set);
   the alpha = 0 baseline, `finetuned` and `base` get every set;
2. generate: greedy, `evaluation.max_tokens` new tokens, async client with bounded concurrency and retries; every
   finished request is appended to durable chunks, so a killed evaluation resumes where it was;
3. score: held-out documents (perplexity) under every model id, and the baseline's answers to the neutral prompts
   (token KL to alpha = 0) under every model id evaluated on that set;
4. metrics (`ga_ray.evaluate.metrics`), written to `eval/` (`ga_ray.evaluate.io`).

The endpoint is the run's own serve app (`ga_ray.serve.launch.start_local`), started here and stopped at the
end, or `evaluation.endpoint` (any running OpenAI-compatible server that serves the same variant ids).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ga_ray.config import RunConfig
from ga_ray.detectors import detector_registry
from ga_ray.errors import GaRayError, StageError
from ga_ray.evaluate import io, metrics
from ga_ray.evaluate.client import ClientSettings, CompletionJob, CompletionResult, run_jobs
from ga_ray.evaluate.prompts import PromptRow, demo_heldout_documents, load_documents, load_prompt_sets
from ga_ray.evaluate.scoring import mean_kls, perplexities, response_ids, score_job, score_row

log = logging.getLogger("ga_ray")

BASE, FINETUNED = "base", "finetuned"


# ------------------------------------------------------------------------------------------------ plan


def plan(variants: Sequence[Mapping[str, Any]], sets: Mapping[str, Sequence[PromptRow]]) -> tuple[dict[str, dict], str, dict[str, list[str]]]:
    """(model id -> metadata, the alpha = 0 reference id, model id -> prompt sets to answer)."""
    meta: dict[str, dict] = {}
    asked: dict[str, list[str]] = {}
    everything = list(sets)
    reference = None
    for v in variants:
        m = dict(v)
        meta[m["name"]] = m
        if m.get("kind") == "baseline" and reference is None:
            reference = m["name"]
            asked[m["name"]] = everything
        elif m.get("behaviour") in sets:
            asked[m["name"]] = [m["behaviour"]]
        elif m.get("behaviour") is None:
            asked[m["name"]] = everything
        # a variant steered for a behaviour without a prompt set here is not evaluated
    for builtin in (FINETUNED, BASE):
        meta[builtin] = {"name": builtin, "kind": builtin, "sign": "none", "alpha": 0.0, "atoms": [], "behaviour": None}
        asked[builtin] = everything
    if reference is None:  # no baseline variant: the fine-tuned adapter itself is alpha = 0
        reference = FINETUNED
    return meta, reference, asked


# -------------------------------------------------------------------------------------------- endpoint


@contextlib.contextmanager
def endpoint(cfg: RunConfig, run_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(OpenAI base URL, model ids): `evaluation.endpoint`, or the run's own serve app for the block."""
    if cfg.evaluation.endpoint:
        yield cfg.evaluation.endpoint, list_models(cfg.evaluation.endpoint, api_key(cfg))
        return
    from ga_ray.serve.launch import start_local

    with start_local(run_dir, cfg, port=0) as handle:  # a free port: never clash with another server
        yield handle.url, list(handle.model_ids)


def api_key(cfg: RunConfig) -> str:
    env = cfg.serve.api_key_env
    return (os.environ.get(env) if env else None) or "EMPTY"


def list_models(base_url: str, key: str) -> list[str]:
    from openai import OpenAI

    try:
        with OpenAI(base_url=base_url, api_key=key, max_retries=2, timeout=30) as client:
            return [m.id for m in client.models.list()]
    except Exception as exc:  # noqa: BLE001 - any failure here means the endpoint cannot be used
        raise StageError(f"evaluation.endpoint {base_url}: cannot list models ({type(exc).__name__}: {exc}); "
                         "is the server running and is the URL its /v1 base?") from None


# ------------------------------------------------------------------------------------------------ rows


def generation_row(r: CompletionResult, p: PromptRow) -> dict[str, Any]:
    return {"variant": r.key[0], "item": r.key[1], "prompt_id": p.prompt_id, "behaviour": p.behaviour, "kind": p.kind,
            "source": p.source, "prompt": p.prompt, "response": r.text, "finish_reason": r.finish_reason,
            "completion_tokens": r.completion_tokens, "latency_s": r.latency_s, "attempts": r.attempts, "error": r.error}


def run_pending(jobs: Sequence[CompletionJob], store: io.PartStore, settings: ClientSettings,
                to_row: Callable[[CompletionResult], dict[str, Any]]) -> int:
    """Run the jobs whose key the store has not finished (successes are never redone; failures are retried),
    appending each result to the store as it finishes. Returns how many jobs were skipped as done."""
    done = store.done_keys()
    pending = [j for j in jobs if j.key not in done]
    try:
        run_jobs(pending, settings, on_result=lambda r: store.add(to_row(r)))
    finally:
        store.flush()
    return len(jobs) - len(pending)


def _item(p: PromptRow) -> str:
    return f"{p.behaviour}/{p.prompt_id}"


# ------------------------------------------------------------------------------------------------ stage


def run_evaluate(ctx) -> dict[str, Any]:
    cfg: RunConfig = ctx.cfg
    ev = cfg.evaluation
    t_start = time.perf_counter()
    registry = detector_registry(cfg.detectors)
    sets = load_prompt_sets(ev.prompts, cfg.finetune.format_eval_set, set(registry), ev.behaviours or None)
    from ga_ray.steer.io import list_variants

    variants = list_variants(ctx.run_dir.root)
    meta, reference, asked = plan(variants, sets)
    from ga_ray.kernel.loading import load_tokenizer
    from ga_ray.engine.protocol import chat_prompt_ids

    tok = load_tokenizer(cfg.model)
    prompt_ids = {(_item(p)): chat_prompt_ids(tok, [{"role": "user", "content": p.prompt}]) for rows in sets.values() for p in rows}
    by_item = {_item(p): p for rows in sets.values() for p in rows}
    docs = []
    if ev.perplexity_docs:
        docs = load_documents(ev.perplexity_docs)
    elif cfg.finetune.format_eval_set and ev.perplexity_docs_per_family > 0:
        docs = demo_heldout_documents(cfg.demo.seed, ev.perplexity_docs_per_family)

    parts = ctx.out / "parts"
    gen_store = io.PartStore(parts / "generations", chunk_rows=ev.chunk_rows)
    score_store = io.PartStore(parts / "scores", chunk_rows=ev.chunk_rows)
    timings: dict[str, float] = {}
    with endpoint(cfg, ctx.run_dir.root) as (url, model_ids):
        missing = sorted(set(asked) - set(model_ids))
        if missing:
            raise StageError(f"the endpoint {url} does not serve {len(missing)} model id(s) the evaluation needs: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (it serves {len(model_ids)})")
        settings = ClientSettings(base_url=url, api_key=api_key(cfg), concurrency=ev.concurrency, retries=ev.retries,
                                  backoff_s=ev.backoff_s, timeout_s=ev.timeout_s)
        # 1. generations (the reference first: the KL needs its answers)
        order = [reference] + sorted(m for m in asked if m != reference)
        jobs = [CompletionJob(key=(m, _item(p)), model=m, prompt=prompt_ids[_item(p)], max_tokens=ev.max_tokens)
                for m in order for b in asked[m] for p in sets[b]]
        log.info("evaluate: %d generations over %d model ids, endpoint %s", len(jobs), len(asked), url)
        t0 = time.perf_counter()
        n_resumed = run_pending(jobs, gen_store, settings, lambda r: generation_row(r, by_item[r.key[1]]))
        timings["generate_s"] = time.perf_counter() - t0
        gens = gen_store.rows()
        # 2. scoring: perplexity documents, and the reference's answers to neutral prompts (KL)
        ref_answers = {g["item"]: g for g in gens if g["variant"] == reference and not g.get("error")}
        score_items: dict[str, tuple[list[int], list[int]]] = {}
        kl_sets: dict[str, list[str]] = {}
        for b, rows in sets.items():
            for p in rows:
                g = ref_answers.get(_item(p))
                if p.kind == "neutral" and g is not None:
                    item = f"kl:{_item(p)}"
                    score_items[item] = (prompt_ids[_item(p)], response_ids(tok, g["response"] or "", g["finish_reason"] == "stop"))
                    kl_sets.setdefault(b, []).append(item)
        for d in docs:
            score_items[f"ppl:{d.doc_id}"] = (chat_prompt_ids(tok, [{"role": "user", "content": d.prompt}]),
                                              response_ids(tok, d.response, True))
        sjobs = []
        for m in order:
            items = [i for b in asked[m] for i in kl_sets.get(b, [])] + [i for i in score_items if i.startswith("ppl:")]
            for item in items:
                pids, rids = score_items[item]
                sjobs.append(score_job(m, item, pids, rids, ev.kl_top_k if item.startswith("kl:") else 0))
        t0 = time.perf_counter()
        run_pending(sjobs, score_store, settings, lambda r: score_row(r, len(score_items[r.key[1]][0])))
        timings["score_s"] = time.perf_counter() - t0
    scores = score_store.rows()
    # 3. metrics
    from ga_ray.demo.formats import FORMAT_CHECKS

    t0 = time.perf_counter()
    ms = metrics.Settings(kl_budget=ev.kl_budget, collapse_degenerate_rise=ev.collapse_degenerate_rise,
                          collapse_format_drop=ev.collapse_format_drop, goal_delta_pp=ev.goal_delta_pp, goal_p=ev.goal_p,
                          split_seed=ev.split_seed)
    wanted = {(m, _item(p)) for m in asked for b in asked[m] for p in sets[b]}
    gens = [g for g in gens if (g["variant"], g["item"]) in wanted]
    kl = mean_kls(scores, reference, kl_sets)
    ppl = perplexities(scores)
    rows, flagged = metrics.cell_metrics(gens, meta, reference, registry, FORMAT_CHECKS, kl, ppl, ms)
    table = metrics.table2(rows, flagged, meta, reference, _coherence(ctx.run_dir.root), ms)
    timings["metrics_s"] = time.perf_counter() - t0
    gen_out = [{k: g[k] for k in ("variant", "prompt_id", "behaviour", "kind", "source", "prompt", "response", "finish_reason",
                                  "completion_tokens", "latency_s", "attempts", "error", "failed", "fired", "format_ok",
                                  "empty", "looping", "no_stop", "degenerate")} for g in flagged]
    # each detector's flag on every answer (a prompt set's own detector is `fired`)
    for g, f in zip(gen_out, flagged):
        text = None if f["failed"] else f.get("response")
        for name, det in registry.items():
            g[f"flag_{name}"] = bool(det(text))
    io.write_table(ctx.out / io.GENERATIONS, gen_out)
    io.write_table(ctx.out / io.METRICS, rows, csv=True)
    io.write_table(ctx.out / io.TABLE2, table, csv=True)
    n_failed = sum(g["failed"] for g in gen_out)
    atom_rows = [r for r in table if r["kind"] not in metrics.CONTROL_KINDS]
    met = [r for r in atom_rows if r.get("goal_met")]
    behaviours_met = sorted({r["behaviour"] for r in met})
    summary = {
        "endpoint": cfg.evaluation.endpoint or "own serve app",
        "reference": reference,
        "model_ids": len(asked),
        "generations": len(gen_out), "failed": n_failed, "resumed": n_resumed,
        "scores": len(scores), "kl_top_k": ev.kl_top_k, "kl_direction": "KL(P_alpha=0 || P_variant), nats per token",
        "max_tokens": ev.max_tokens, "kl_budget": ev.kl_budget, "perplexity_docs": len(docs),
        "behaviours": list(sets), "goal": {"behaviours_met": behaviours_met, "n_met": len(behaviours_met),
                                           "n_behaviours": len({r['behaviour'] for r in atom_rows}),
                                           "delta_pp": ev.goal_delta_pp, "p": ev.goal_p},
        "timings_s": {k: round(v, 2) for k, v in timings.items()} | {"total_s": round(time.perf_counter() - t_start, 2)},
    }
    from ga_ray.rundir import atomic_write_json

    atomic_write_json(ctx.out / io.SUMMARY, summary)
    summary["line"] = (f"{len(gen_out)} generations ({n_failed} failed, {n_resumed} resumed) over {len(asked)} model ids; "
                       f"goal met for {len(behaviours_met)}/{summary['goal']['n_behaviours']} behaviours"
                       + (f" ({', '.join(behaviours_met)})" if behaviours_met else ""))
    return summary


def _coherence(run_dir: Path) -> dict[int, float]:
    """{atom: coherence} from the coherence stage's atom table (empty when absent)."""
    try:
        from ga_ray.coherence.io import load_atom_table

        t = load_atom_table(run_dir)
    except (GaRayError, OSError):  # the coherence column is context; without the table it stays empty
        return {}
    d = t.select(["atom", "coherence"]).to_pydict()
    return {int(a): float(c) for a, c in zip(d["atom"], d["coherence"]) if c is not None and not math.isnan(c)}
