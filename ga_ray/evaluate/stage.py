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
from dataclasses import dataclass, field
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


def plan(variants: Sequence[Mapping[str, Any]], sets: Mapping[str, Sequence[PromptRow]], patterns: Sequence[str] = (),
         builtins: Sequence[str] = (FINETUNED, BASE)) -> tuple[dict[str, dict], str, dict[str, list[str]]]:
    """(model id -> metadata, the alpha = 0 reference id, model id -> prompt sets to answer). `patterns`: shell
    patterns of the variant names to evaluate (empty: all; the baseline always)."""
    import fnmatch

    variants = [v for v in variants if v.get("kind") == "baseline" or not patterns
                or any(fnmatch.fnmatchcase(v["name"], pat) for pat in patterns)]
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
    for builtin in builtins:
        meta[builtin] = {"name": builtin, "kind": builtin, "sign": "none", "alpha": 0.0, "atoms": [], "behaviour": None}
        asked[builtin] = everything
    if reference is None:  # no baseline variant: the fine-tuned adapter itself is alpha = 0
        reference = FINETUNED
        meta[FINETUNED] = {"name": FINETUNED, "kind": FINETUNED, "sign": "none", "alpha": 0.0, "atoms": [], "behaviour": None}
        asked[FINETUNED] = everything
    return meta, reference, asked


# -------------------------------------------------------------------------------------------- endpoint


@contextlib.contextmanager
def endpoint(cfg: RunConfig, run_dir: Path) -> Iterator[tuple[str, Callable[[], list[str]]]]:
    """(OpenAI base URL, a function listing the model ids served now): `evaluation.endpoint`, or the run's own serve app for the block."""
    if cfg.evaluation.endpoint:
        url, key = cfg.evaluation.endpoint, api_key(cfg)
        yield url, lambda: list_models(url, key)
        return
    from ga_ray.serve.launch import start_local

    with start_local(run_dir, cfg, port=0) as handle:  # a free port: never clash with another server
        yield handle.url, handle.refresh_model_ids


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
                to_row: Callable[[CompletionResult], dict[str, Any]], desc: str = "evaluate") -> int:
    """Run the jobs whose key the store has not finished (successes are never redone; failures are retried),
    appending each result to the store as it finishes. Returns how many jobs were skipped as done.
    One progress bar on the terminal (redrawn in place) and one summary line per call."""
    from tqdm.auto import tqdm

    done = store.done_keys()
    pending = [j for j in jobs if j.key not in done]
    t0, failed = time.perf_counter(), [0]
    bar = tqdm(total=len(pending), desc=desc, unit="req", disable=not pending)

    def on_result(r: CompletionResult) -> None:
        store.add(to_row(r))
        failed[0] += r.error is not None
        bar.update(1)
        if r.error is not None:
            bar.set_postfix(failed=failed[0], refresh=False)

    try:
        run_jobs(pending, settings, on_result=on_result)
    finally:
        bar.close()
        store.flush()
    if pending:
        log.info("%s: %d requests (%d failed) in %.0f s; %d already done", desc, len(pending), failed[0],
                 time.perf_counter() - t0, len(jobs) - len(pending))
    return len(jobs) - len(pending)


def parts_key(cfg: RunConfig, run_root: Path, sets: Mapping[str, Sequence[PromptRow]], docs: Sequence[Any]) -> str:
    """The folder under `eval/parts/` for these settings: finished requests are reused only by a run that would send
    the same requests to the same models (variant names are content-addressed; `finetuned` is the adapter folder's
    fingerprint; `base` the model path's)."""
    from ga_ray.rundir import fingerprint_obj, fingerprint_path

    ev = cfg.evaluation
    adapter = run_root / "adapter" if cfg.finetune.enabled else (Path(cfg.model.adapter) if cfg.model.adapter else None)
    return fingerprint_obj({
        "max_tokens": ev.max_tokens, "kl_top_k": ev.kl_top_k, "endpoint": ev.endpoint, "model": cfg.model.path,
        "model_fp": fingerprint_path(Path(cfg.model.path)) if cfg.model.path and Path(cfg.model.path).exists() else None,
        "adapter": fingerprint_path(adapter) if adapter is not None and adapter.exists() else None,
        "prompts": [(p.prompt_id, p.behaviour, p.kind, p.prompt) for rows in sets.values() for p in rows],
        "docs": [(d.doc_id, d.prompt, d.response) for d in docs],
    })


def _item(p: PromptRow) -> str:
    return f"{p.behaviour}/{p.prompt_id}"


# ------------------------------------------------------------------------------------------------ stage


@dataclass
class _Inputs:
    """What every pass of the evaluation shares: prompt sets, their token ids, documents, durable stores."""

    ev: Any
    tok: Any
    sets: dict[str, list[PromptRow]]
    prompt_ids: dict[str, list[int]]
    by_item: dict[str, PromptRow]
    docs: list[Any]
    gen_store: io.PartStore
    score_store: io.PartStore
    kl_sets: dict[str, list[str]] = field(default_factory=dict)
    score_items: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)


def _pass(inp: _Inputs, settings: ClientSettings, asked: Mapping[str, list[str]], reference: str,
          timings: dict[str, float]) -> int:
    """Generate what is not done yet, then score it; returns how many generations were already done."""
    ev, sets = inp.ev, inp.sets
    from ga_ray.engine.protocol import chat_prompt_ids

    order = [reference] + sorted(m for m in asked if m != reference)  # the reference first: the KL needs its answers
    jobs = [CompletionJob(key=(m, _item(p)), model=m, prompt=inp.prompt_ids[_item(p)], max_tokens=ev.max_tokens)
            for m in order for b in asked[m] for p in sets[b]]
    log.info("evaluate: %d generations over %d model ids", len(jobs), len(asked))
    t0 = time.perf_counter()
    n_resumed = run_pending(jobs, inp.gen_store, settings, lambda r: generation_row(r, inp.by_item[r.key[1]]), desc="evaluate: generate")
    timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t0
    # scoring: held-out documents (perplexity), and the reference's answers to the neutral prompts (KL)
    ref_answers = {g["item"]: g for g in inp.gen_store.rows() if g["variant"] == reference and not g.get("error")}
    inp.kl_sets.clear()
    for b, rows in sets.items():
        for p in rows:
            g = ref_answers.get(_item(p))
            if p.kind == "neutral" and g is not None:
                item = f"kl:{_item(p)}"
                inp.score_items[item] = (inp.prompt_ids[_item(p)],
                                         response_ids(inp.tok, g["response"] or "", g["finish_reason"] == "stop"))
                inp.kl_sets.setdefault(b, []).append(item)
    for d in inp.docs:
        inp.score_items[f"ppl:{d.doc_id}"] = (chat_prompt_ids(inp.tok, [{"role": "user", "content": d.prompt}]),
                                              response_ids(inp.tok, d.response, True))
    ppl_items = [i for i in inp.score_items if i.startswith("ppl:")]
    sjobs = []
    for m in order:
        for item in [i for b in asked[m] for i in inp.kl_sets.get(b, [])] + ppl_items:
            pids, rids = inp.score_items[item]
            sjobs.append(score_job(m, item, pids, rids, ev.kl_top_k if item.startswith("kl:") else 0))
    t0 = time.perf_counter()
    run_pending(sjobs, inp.score_store, settings, lambda r: score_row(r, len(inp.score_items[r.key[1]][0])), desc="evaluate: score")
    timings["score_s"] = timings.get("score_s", 0.0) + time.perf_counter() - t0
    return n_resumed


def _compute(inp: _Inputs, meta: Mapping[str, dict], reference: str, asked: Mapping[str, list[str]], registry: Mapping[str, Any],
             ms: metrics.Settings, coherence: Mapping[int, float]) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    from ga_ray.demo.formats import FORMAT_CHECKS

    wanted = {(m, _item(p)) for m in asked for b in asked[m] for p in inp.sets[b]}
    gens = [g for g in inp.gen_store.rows() if (g["variant"], g["item"]) in wanted]
    scores = inp.score_store.rows()
    kl = mean_kls(scores, reference, inp.kl_sets)
    ppl = perplexities(scores)
    rows, flagged = metrics.cell_metrics(gens, meta, reference, registry, FORMAT_CHECKS, kl, ppl, ms)
    table = metrics.table2(rows, flagged, meta, reference, coherence, ms)
    return rows, flagged, table, scores


def _add_controls(run_dir: Path, cfg: RunConfig, table: Sequence[Mapping[str, Any]], meta: Mapping[str, dict]) -> tuple[list[str], list[str]]:
    """Random and supervised controls at each atom's recommended alpha (both signs) where the steer stage did not
    write one; returns (names added, reasons for controls that could not be written)."""
    from ga_ray.steer.stage import add_variant

    have = {(m.get("kind"), tuple(m.get("atoms") or ()), m.get("behaviour"), m.get("sign"), float(m.get("alpha") or 0.0))
            for m in meta.values()}
    added, skipped = [], []
    for r in table:
        if r["kind"] != "atom" or len(r["atoms"]) != 1:
            continue
        atom, beh = int(r["atoms"][0]), r["behaviour"]
        for sign in ("toward", "away"):
            alpha = r.get(f"recommended_alpha_{sign}")
            if alpha is None or not math.isfinite(alpha):
                continue
            for kind in ("random", "supervised"):
                if (kind, (atom,), beh, sign, float(alpha)) in have:
                    continue
                try:
                    row = add_variant(run_dir, cfg, kind, sign, float(alpha), atom=atom, behaviour=beh,
                                      mode=r.get("mode"), units=r.get("units"))
                    added.append(row["name"])
                except Exception as exc:  # noqa: BLE001 - a control that cannot be written is reported, not fatal
                    skipped.append(f"{kind} {sign} a{alpha:g} for atom {atom}: {type(exc).__name__}: {exc}")
    return added, skipped


def _wait_served(list_ids: Callable[[], list[str]], names: Sequence[str], timeout_s: float = 120.0) -> list[str]:
    """Model ids once every name is served (the serve app lists new variant folders on its own)."""
    deadline = time.monotonic() + timeout_s
    ids = list_ids()
    while not set(names) <= set(ids) and time.monotonic() < deadline:
        time.sleep(1.0)
        ids = list_ids()
    return ids


def run_evaluate(ctx) -> dict[str, Any]:
    cfg: RunConfig = ctx.cfg
    ev = cfg.evaluation
    t_start = time.perf_counter()
    registry = detector_registry(cfg.detectors)
    sets = load_prompt_sets(ev.prompts, cfg.finetune.format_eval_set, set(registry), ev.behaviours or None)
    from ga_ray.engine.protocol import chat_prompt_ids
    from ga_ray.kernel.loading import load_tokenizer
    from ga_ray.steer.io import list_variants

    run_root = ctx.run_dir.root
    meta, reference, asked = plan(list_variants(run_root), sets, ev.variants, ev.builtins)
    tok = load_tokenizer(cfg.model)
    docs: list[Any] = []
    if ev.perplexity_docs:
        docs = load_documents(ev.perplexity_docs)
    elif cfg.finetune.format_eval_set and ev.perplexity_docs_per_family > 0:
        docs = demo_heldout_documents(cfg.demo.seed, ev.perplexity_docs_per_family)
    key = parts_key(cfg, run_root, sets, docs)
    inp = _Inputs(ev=ev, tok=tok, sets=sets, docs=docs,
                  prompt_ids={_item(p): chat_prompt_ids(tok, [{"role": "user", "content": p.prompt}]) for rows in sets.values() for p in rows},
                  by_item={_item(p): p for rows in sets.values() for p in rows},
                  gen_store=io.PartStore(ctx.out / "parts" / key / "generations", chunk_rows=ev.chunk_rows),
                  score_store=io.PartStore(ctx.out / "parts" / key / "scores", chunk_rows=ev.chunk_rows))
    ms = metrics.Settings(kl_budget=ev.kl_budget, collapse_degenerate_rise=ev.collapse_degenerate_rise,
                          collapse_format_drop=ev.collapse_format_drop, goal_delta_pp=ev.goal_delta_pp, goal_p=ev.goal_p,
                          split_seed=ev.split_seed)
    coherence = _coherence(run_root)
    timings: dict[str, float] = {}
    added: list[str] = []
    skipped: list[str] = []
    with endpoint(cfg, run_root) as (url, list_ids):
        model_ids = list_ids()
        missing = sorted(set(asked) - set(model_ids))
        if missing:
            raise StageError(f"the endpoint {url} does not serve {len(missing)} model id(s) the evaluation needs: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (it serves {len(model_ids)})")
        settings = ClientSettings(base_url=url, api_key=api_key(cfg), concurrency=ev.concurrency, retries=ev.retries,
                                  backoff_s=ev.backoff_s, timeout_s=ev.timeout_s, prompts_per_request=ev.prompts_per_request)
        n_resumed = _pass(inp, settings, asked, reference, timings)
        rows, flagged, table, scores = _compute(inp, meta, reference, asked, registry, ms, coherence)
        if ev.controls_at_recommended and cfg.steer.controls:
            t0 = time.perf_counter()
            added, skipped = _add_controls(run_root, cfg, table, meta)
            for why in skipped:
                log.warning("evaluate: control not written: %s", why)
            if added:
                served = _wait_served(list_ids, added)
                meta, reference, asked = plan(list_variants(run_root), sets, [*ev.variants, *added] if ev.variants else (), ev.builtins)
                asked = {m: b for m, b in asked.items() if m in served}
                _pass(inp, settings, asked, reference, timings)  # its skips are this run's first pass, not a resume
                rows, flagged, table, scores = _compute(inp, meta, reference, asked, registry, ms, coherence)
            timings["controls_s"] = time.perf_counter() - t0
    gen_out = [{k: g[k] for k in ("variant", "prompt_id", "behaviour", "kind", "source", "prompt", "response", "finish_reason",
                                  "completion_tokens", "latency_s", "attempts", "error", "failed", "fired", "format_ok",
                                  "empty", "looping", "no_stop", "degenerate")} for g in flagged]
    for g, f in zip(gen_out, flagged):  # every detector's flag on every answer (the prompt set's own is `fired`)
        text = None if f["failed"] else f.get("response")
        for name, det in registry.items():
            g[f"flag_{name}"] = bool(det(text))
    io.write_table(ctx.out / io.GENERATIONS, gen_out)
    io.write_table(ctx.out / io.METRICS, rows, csv=True)
    io.write_table(ctx.out / io.TABLE2, table, csv=True)
    n_failed = sum(g["failed"] for g in gen_out)
    atom_rows = [r for r in table if r["kind"] not in metrics.CONTROL_KINDS]
    behaviours_met = sorted({r["behaviour"] for r in atom_rows if r.get("goal_met")})
    summary = {
        "endpoint": cfg.evaluation.endpoint or "own serve app",
        "reference": reference,
        "model_ids": len(asked),
        "generations": len(gen_out), "failed": n_failed, "resumed": n_resumed,
        "scores": len(scores), "kl_top_k": ev.kl_top_k, "kl_direction": "KL(P_alpha=0 || P_variant), nats per token",
        "max_tokens": ev.max_tokens, "kl_budget": ev.kl_budget, "perplexity_docs": len(docs),
        "controls_added": added, "controls_skipped": skipped,
        "behaviours": list(sets), "goal": {"behaviours_met": behaviours_met, "n_met": len(behaviours_met),
                                           "n_behaviours": len({r["behaviour"] for r in atom_rows}),
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
