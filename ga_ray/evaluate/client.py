"""Async OpenAI-compatible client: bounded concurrency, retries with backoff, every request accounted for.

One `CompletionJob` is one `POST /v1/completions` (prompt as token ids, so the evaluation controls the chat
template and the tokens scored exactly). A job that still fails after `retries` retries comes back as a result
with `error` set: it is counted as a failure by the statistics, never dropped. Client errors that a retry cannot
fix (400, 401, 403, 404, 422) fail at once. Results are handed to `on_result` as they finish, so the caller can
append them to durable chunks (a killed evaluation then resumes without redoing them).
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


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _parse(job: CompletionJob, resp: Any) -> CompletionResult:
    choice = resp.choices[0]
    out = CompletionResult(key=job.key, text=choice.text, finish_reason=choice.finish_reason)
    if getattr(resp, "usage", None) is not None:
        out.completion_tokens = resp.usage.completion_tokens
    lp = getattr(choice, "logprobs", None)
    if lp is not None:
        out.tokens = list(lp.tokens or [])
        out.token_logprobs = list(lp.token_logprobs or [])
        out.top_logprobs = [dict(d) if d is not None else None for d in (lp.top_logprobs or [])]
    return out


async def _one(client: Any, job: CompletionJob, s: ClientSettings, sem: asyncio.Semaphore) -> CompletionResult:
    last = "not attempted"
    attempts = 0
    async with sem:
        t0 = time.perf_counter()
        for attempt in range(s.retries + 1):
            attempts = attempt + 1
            try:
                kwargs: dict[str, Any] = {"model": job.model, "prompt": job.prompt, "max_tokens": job.max_tokens,
                                          "temperature": 0.0, "echo": job.echo}
                if job.logprobs is not None:
                    kwargs["logprobs"] = job.logprobs
                if job.stop:
                    kwargs["stop"] = list(job.stop)
                resp = await client.completions.create(**kwargs)
                out = _parse(job, resp)
                out.latency_s, out.attempts = time.perf_counter() - t0, attempts
                return out
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, whatever it is
                last = f"{type(exc).__name__}: {exc}"[:500]
                if _status(exc) in NON_RETRYABLE_STATUS:
                    break
                if attempt < s.retries:
                    await asyncio.sleep(s.backoff_s * (2**attempt))
        log.warning("request %s failed after %d attempt(s): %s", job.key, attempts, last)
        return CompletionResult(key=job.key, latency_s=time.perf_counter() - t0, attempts=attempts, error=last)


async def run_jobs_async(jobs: Sequence[CompletionJob], s: ClientSettings,
                         on_result: Callable[[CompletionResult], None] | None = None) -> list[CompletionResult]:
    """Run every job (at most `s.concurrency` in flight); results in job order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=s.base_url, api_key=s.api_key or "EMPTY", max_retries=0, timeout=s.timeout_s)
    sem = asyncio.Semaphore(s.concurrency)
    try:
        tasks = [asyncio.create_task(_one(client, j, s, sem)) for j in jobs]
        results: list[CompletionResult | None] = [None] * len(jobs)
        index = {id(t): i for i, t in enumerate(tasks)}
        for fut in asyncio.as_completed(tasks):
            r = await fut
            if on_result is not None:
                on_result(r)
        for t in tasks:
            results[index[id(t)]] = t.result()
        return [r for r in results if r is not None]
    finally:
        await client.close()


def run_jobs(jobs: Sequence[CompletionJob], s: ClientSettings,
             on_result: Callable[[CompletionResult], None] | None = None) -> list[CompletionResult]:
    """Synchronous wrapper (the stage is synchronous)."""
    if not jobs:
        return []
    return asyncio.run(run_jobs_async(jobs, s, on_result))
