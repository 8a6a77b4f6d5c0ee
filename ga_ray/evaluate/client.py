"""Async OpenAI-compatible client: bounded concurrency, retries with backoff, every request accounted for.

One `CompletionJob` is one prompt of a `POST /v1/completions` (prompt as token ids, so the evaluation controls the chat
template and the tokens scored exactly). A job that still fails after `retries` retries comes back as a result
with `error` set: it is counted as a failure by the statistics, never dropped. Client errors that a retry cannot
fix (400, 401, 403, 404, 422) fail at once. Results are handed to `on_result` as they finish, so the caller can
append them to durable chunks (a killed evaluation then resumes without redoing them). With
`prompts_per_request` > 1, consecutive jobs of one model go in one request as a list of prompts (OpenAI's batch
form; fewer HTTP round trips); a request that fails fails each of its jobs, each recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ga_ray")

NON_RETRYABLE_STATUS = {400, 401, 403, 404, 422}


@dataclass(frozen=True)
class CompletionJob:
    key: tuple[str, str]  # (variant, item id): what the result is stored under
    model: str
    prompt: list[int]
    max_tokens: int
    echo: bool = False
    logprobs: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class CompletionResult:
    key: tuple[str, str]
    text: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    tokens: list[str] | None = None  # echo + logprobs: every token's text (prompt, then completion)
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None
    latency_s: float = 0.0
    attempts: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientSettings:
    base_url: str
    api_key: str = "EMPTY"
    concurrency: int = 16
    retries: int = 3
    backoff_s: float = 0.5  # first wait; doubled after each failed attempt
    timeout_s: float = 120.0  # per request
    prompts_per_request: int = 1  # consecutive jobs of one model sent as one request's prompt list


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _retry_after(exc: BaseException, cap_s: float = 30.0) -> float:
    """Seconds an overloaded server (429/503) asks the client to wait (its Retry-After header), else 0."""
    if _status(exc) not in (429, 503):
        return 0.0
    try:
        return min(cap_s, float(exc.response.headers.get("retry-after", 0)))  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return 0.0


def _parse_choice(job: CompletionJob, choice: Any, completion_tokens: int | None) -> CompletionResult:
    out = CompletionResult(key=job.key, text=choice.text, finish_reason=choice.finish_reason, completion_tokens=completion_tokens)
    lp = getattr(choice, "logprobs", None)
    if lp is not None:
        out.tokens = list(lp.tokens or [])
        out.token_logprobs = list(lp.token_logprobs or [])
        out.top_logprobs = [dict(d) if d is not None else None for d in (lp.top_logprobs or [])]
    return out


async def _group(client: Any, jobs: Sequence[CompletionJob], s: ClientSettings, sem: asyncio.Semaphore) -> list[CompletionResult]:
    """One request for jobs that share model and settings (one prompt each, `prompt` sent as a list when there are
    several); a failure after the retries fails every job of the group, each recorded with the error."""
    job = jobs[0]
    last = "not attempted"
    attempts = 0
    async with sem:
        t0 = time.perf_counter()
        for attempt in range(s.retries + 1):
            attempts = attempt + 1
            try:
                kwargs: dict[str, Any] = {"model": job.model, "prompt": job.prompt if len(jobs) == 1 else [j.prompt for j in jobs],
                                          "max_tokens": job.max_tokens, "temperature": 0.0, "echo": job.echo}
                if job.logprobs is not None:
                    kwargs["logprobs"] = job.logprobs
                if job.stop:
                    kwargs["stop"] = list(job.stop)
                resp = await client.completions.create(**kwargs)
                choices = sorted(resp.choices, key=lambda c: c.index)
                if len(choices) != len(jobs):
                    raise ValueError(f"{len(choices)} choices for {len(jobs)} prompts")
                usage = getattr(resp, "usage", None)
                ct = usage.completion_tokens if usage is not None and len(jobs) == 1 else None
                outs = [_parse_choice(j, c, ct) for j, c in zip(jobs, choices)]
                for o in outs:
                    o.latency_s, o.attempts = time.perf_counter() - t0, attempts
                return outs
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, whatever it is
                last = f"{type(exc).__name__}: {exc}"[:500]
                if _status(exc) in NON_RETRYABLE_STATUS:
                    break
                if attempt < s.retries:
                    await asyncio.sleep(max(s.backoff_s * (2**attempt), _retry_after(exc)))
        log.warning("request %s%s failed after %d attempt(s): %s", job.key, f" (+{len(jobs) - 1} more)" if len(jobs) > 1 else "",
                    attempts, last)
        dt = time.perf_counter() - t0
        return [CompletionResult(key=j.key, latency_s=dt, attempts=attempts, error=last) for j in jobs]


def group_jobs(jobs: Sequence[CompletionJob], per_request: int) -> list[list[CompletionJob]]:
    """Consecutive jobs with the same model and settings, at most `per_request` per group."""
    groups: list[list[CompletionJob]] = []
    for j in jobs:
        g = groups[-1] if groups else None
        if (g is not None and len(g) < per_request and g[0].model == j.model and g[0].max_tokens == j.max_tokens
                and g[0].echo == j.echo and g[0].logprobs == j.logprobs and g[0].stop == j.stop):
            g.append(j)
        else:
            groups.append([j])
    return groups


async def run_jobs_async(jobs: Sequence[CompletionJob], s: ClientSettings,
                         on_result: Callable[[CompletionResult], None] | None = None) -> list[CompletionResult]:
    """Run every job (at most `s.concurrency` requests in flight, `s.prompts_per_request` prompts each); results in
    job order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=s.base_url, api_key=s.api_key or "EMPTY", max_retries=0, timeout=s.timeout_s)
    sem = asyncio.Semaphore(s.concurrency)
    try:
        tasks = [asyncio.create_task(_group(client, g, s, sem)) for g in group_jobs(jobs, s.prompts_per_request)]
        for fut in asyncio.as_completed(tasks):
            for r in await fut:
                if on_result is not None:
                    on_result(r)
        return [r for t in tasks for r in t.result()]
    finally:
        await client.close()


def run_jobs(jobs: Sequence[CompletionJob], s: ClientSettings,
             on_result: Callable[[CompletionResult], None] | None = None) -> list[CompletionResult]:
    """Synchronous wrapper (the stage is synchronous)."""
    if not jobs:
        return []
    return asyncio.run(run_jobs_async(jobs, s, on_result))
