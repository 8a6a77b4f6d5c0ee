"""`VllmEngine`: the `Engine` protocol on vLLM's multi-LoRA engine (GPU).

Coded against the vLLM V1 engine API as read from vLLM's source (the 0.12/0.13 line: the one whose
`AsyncLLM.processor` is deprecated for removal in v0.14):
- `vllm.v1.engine.async_llm.AsyncLLM.from_engine_args(AsyncEngineArgs(...))`; `AsyncLLM.generate(prompt,
  sampling_params, request_id, lora_request=...)` is an async generator of `RequestOutput`;
  `AsyncLLM.add_lora(LoRARequest)` preloads an adapter; `AsyncLLM.shutdown()`.
- `AsyncEngineArgs(model, tokenizer, dtype, max_model_len, gpu_memory_utilization, enable_lora=True,
  max_loras, max_cpu_loras, max_lora_rank, seed, enable_prefix_caching)`; `max_lora_rank` must be one
  of vLLM's `MaxLoRARanks` (1, 8, 16, 32, 64, 128, 256, 320, 512) and at least every adapter's rank;
  `max_cpu_loras >= max_loras`.
- `vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)`: `lora_int_id` must be unique per
  adapter (vLLM caches adapters by it), so ids here are derived from the variant NAME, never reused.
- `vllm.SamplingParams(temperature, top_p, seed, max_tokens, stop, logprobs, prompt_logprobs,
  skip_special_tokens, output_kind)`; `RequestOutput.outputs[0]` is a `CompletionOutput(text, token_ids,
  finish_reason, logprobs)`; `logprobs[i]` / `prompt_logprobs[i]` map token id -> `Logprob(logprob, rank,
  decoded_token)` (`prompt_logprobs[0]` is None). Log-probs are of the raw model distribution (vLLM's
  default `logprobs_mode`), as in `PeftEngine`.

vLLM cannot be installed on our CPU machines (no CPU wheel on the package index), so vLLM is imported
only inside `VllmEngine` (the GPU path). What runs here is tested (tests/test_vllm_engine.py): the
engine arguments built from the variants, LoRA ids, the sampling mapping and the conversion of vLLM's
output objects. The engine call itself was NOT run on CPU machines.

Prompts are always sent as token ids (`TokensPrompt`), tokenized here exactly as `PeftEngine` does, so
both engines see the same tokens for the same request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ga_ray.engine.protocol import (
    BASE,
    FINETUNED,
    EngineError,
    Generation,
    GenerationRequest,
    SamplingParams,
    Scored,
    UnknownVariantError,
    validate_variant_name,
)

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's allowed `max_lora_rank` values (`vllm.config.lora.MaxLoRARanks`)."""
VLLM_VERSION_CODED_AGAINST = "vLLM V1 engine API, 0.12/0.13 line"


# ------------------------------------------------------------------------------- pure helpers


def adapter_rank(path: str | Path) -> int:
    """The largest LoRA rank of a PEFT adapter folder: `r` and every `rank_pattern` value."""
    p = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{p} cannot be read as a PEFT adapter config ({type(exc).__name__}: {exc})") from None
    ranks = [int(cfg.get("r", 0) or 0), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    if max(ranks) < 1:
        raise EngineError(f"{p} has no LoRA rank r >= 1")
    return max(ranks)


def vllm_lora_rank(ranks: Iterable[int]) -> int:
    """The smallest of vLLM's allowed `max_lora_rank` values that holds every rank."""
    need = max(ranks, default=1)
    for r in VLLM_MAX_LORA_RANKS:
        if r >= need:
            return r
    raise EngineError(f"a LoRA rank of {need} exceeds vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]})")


def lora_int_id(name: str, taken: Mapping[int, str] | None = None) -> int:
    """A positive 31-bit id derived from the variant name (the same on every replica and restart);
    on the (unlikely) collision with an id of another name, the next free one."""
    i = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") & 0x7FFFFFFF or 1
    taken = taken or {}
    while i in taken and taken[i] != name:
        i = i % 0x7FFFFFFF + 1
    return i


def build_engine_args(
    model: str | Path,
    *,
    tokenizer: str | Path | None = None,
    lora_ranks: Iterable[int] = (),
    n_variants: int = 0,
    max_loras: int = 8,
    max_lora_rank: int | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.85,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.AsyncEngineArgs` for a base model and its LoRA variants.

    `max_lora_rank`: vLLM's allowed rank that holds the largest adapter rank (or the given value, which
    must itself be allowed and large enough: adapters added later must fit it). `max_loras` (adapters in
    one batch) is capped by the number of variants; `max_cpu_loras` holds every variant, so none is
    re-read from disk while serving. `extra`: more engine arguments, passed through (they win).
    """
    ranks = list(lora_ranks)
    need = vllm_lora_rank(ranks) if ranks else 8
    if max_lora_rank is not None:
        if max_lora_rank not in VLLM_MAX_LORA_RANKS:
            raise EngineError(f"max_lora_rank {max_lora_rank} is not one of vLLM's allowed ranks {VLLM_MAX_LORA_RANKS}")
        if max_lora_rank < need:
            raise EngineError(f"max_lora_rank {max_lora_rank} is below the largest adapter rank ({max(ranks)})")
        need = max_lora_rank
    if max_loras < 1:
        raise EngineError(f"max_loras must be >= 1, got {max_loras}")
    if not 0 < gpu_memory_utilization <= 1:
        raise EngineError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    n = max(int(n_variants), 1)
    args: dict[str, Any] = dict(
        model=str(model),
        tokenizer=str(tokenizer or model),
        dtype=dtype,
        seed=seed,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_lora=True,
        max_loras=min(max_loras, n),
        max_cpu_loras=max(n, min(max_loras, n)),
        max_lora_rank=need,
        enable_prefix_caching=True,
    )
    if max_model_len is not None:
        args["max_model_len"] = int(max_model_len)
    args.update(dict(extra or {}))
    return args


def sampling_kwargs(p: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request (max_new_tokens >= 1).

    Greedy is temperature 0 (vLLM then ignores top_p and seed, so they are not sent); stop strings are
    cut from the text (`include_stop_str_in_output=False`, vLLM's default); `logprobs=k` returns the
    chosen token and the top k at each step."""
    kw: dict[str, Any] = dict(max_tokens=p.max_new_tokens, temperature=float(p.temperature), skip_special_tokens=True)
    if not p.greedy:
        kw["top_p"] = float(p.top_p)
        if p.seed is not None:
            kw["seed"] = int(p.seed)
    if p.stop:
        kw["stop"] = list(p.stop)
    if p.logprobs is not None:
        kw["logprobs"] = int(p.logprobs)
    return kw


def score_kwargs(top_logprobs: int) -> dict[str, Any]:
    """`vllm.SamplingParams` keywords for scoring a given text: one greedy token (vLLM needs
    max_tokens >= 1; it is discarded) and the prompt's log-probs with the top k at each position."""
    return dict(max_tokens=1, temperature=0.0, prompt_logprobs=int(top_logprobs), skip_special_tokens=True)


def _value(lp: Any) -> float:
    return float(lp.logprob if hasattr(lp, "logprob") else lp)


def _top(position: Mapping[int, Any], k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, log-prob) of one position's vLLM map (it also holds the chosen
    token, which may lie outside the top k), most likely first."""
    items = sorted(position.items(), key=lambda kv: (-_value(kv[1]), kv[0]))
    return [(int(t), _value(v)) for t, v in items[:k]]


def generation_from_output(output: Any, prompt_tokens: int, p: SamplingParams) -> Generation:
    """Our `Generation` from a finished vLLM `RequestOutput` (its first `CompletionOutput`)."""
    c = output.outputs[0]
    reason = c.finish_reason
    if reason not in ("stop", "length"):
        raise EngineError(f"vLLM ended request {getattr(output, 'request_id', '?')} with finish_reason {reason!r}")
    ids = [int(t) for t in c.token_ids]
    lps: list[float] | None = None
    tops: list[list[tuple[int, float]]] | None = None
    if p.logprobs is not None:
        if c.logprobs is None:
            raise EngineError("vLLM returned no logprobs although they were asked for")
        lps, tops = [], []
        for tok, position in zip(ids, c.logprobs):
            lps.append(_value(position[tok]))
            tops.append(_top(position, p.logprobs))
    return Generation(text=c.text, token_ids=ids, finish_reason=reason, prompt_tokens=prompt_tokens,
                      logprobs=lps, top_logprobs=tops)


def scored_from_output(output: Any, token_ids: Sequence[int], top_logprobs: int) -> Scored:
    """Our `Scored` from a vLLM `RequestOutput` with `prompt_logprobs` (position 0 is None)."""
    plp = output.prompt_logprobs
    if plp is None or len(plp) != len(token_ids):
        raise EngineError(f"vLLM returned {None if plp is None else len(plp)} prompt log-probs for {len(token_ids)} tokens")
    lps: list[float | None] = [None]
    tops: list[list[tuple[int, float]] | None] = [None]
    for t in range(1, len(token_ids)):
        position = plp[t]
        lps.append(_value(position[int(token_ids[t])]))
        tops.append(_top(position, top_logprobs))
    return Scored(token_ids=[int(t) for t in token_ids], logprobs=lps, top_logprobs=tops if top_logprobs > 0 else None)


# ------------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class _Lora:
    name: str
    int_id: int
    path: Path
    rank: int


class VllmEngine:
    """vLLM `AsyncLLM` with one `LoRARequest` per variant. The engine runs on its own event loop in
    a background thread; `generate`/`score` (sync) and `agenerate`/`ascore` (from any event loop,
    e.g. a Ray Serve replica's) all submit to that loop, so vLLM's output handler lives on one loop.
    Requests go to vLLM concurrently, which batches them continuously, adapters mixed."""

    def __init__(self, model: str | Path, tokenizer: Any, *, adapter: str | Path | None = None,
                 variants: Mapping[str, str | Path] | None = None, max_model_len: int | None = None,
                 request_timeout_s: float = 600.0, **engine_kw: Any) -> None:
        self._tokenizer = tokenizer
        self._loras: dict[str, _Lora] = {}
        self._lock = threading.RLock()
        self.request_timeout_s = request_timeout_s
        pending: dict[str, Path] = {}
        if adapter is not None:
            pending[FINETUNED] = Path(adapter).expanduser().resolve()
        for name, path in (variants or {}).items():
            pending[validate_variant_name(name)] = Path(path).expanduser().resolve()
        for name, path in pending.items():
            self._register(name, path)
        self.engine_args = build_engine_args(
            model, lora_ranks=[lo.rank for lo in self._loras.values()], n_variants=len(self._loras),
            max_model_len=max_model_len, **engine_kw,
        )
        self._max_lora_rank = int(self.engine_args["max_lora_rank"])

        try:  # GPU path only: vLLM has no CPU wheel on our package index
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(f"the vLLM engine needs vLLM on a CUDA machine ({exc}); install vllm there, "
                              f"or use engine: peft (transformers + PEFT, CPU or GPU)") from None

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()

        async def start() -> Any:
            # built on our loop: AsyncLLM starts its output handler on the running loop it is created in
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))

        self._llm = self._run(start())
        self._max_context = int(self._llm.model_config.max_model_len)
        for lo in self._loras.values():  # preload every adapter once (vLLM keeps max_cpu_loras in memory)
            self._run(self._llm.add_lora(self._lora_request(lo)))

    @classmethod
    def from_config(cls, model_cfg: Any, *, adapter: str | Path | None = None,
                    variants: Mapping[str, str | Path] | None = None, tokenizer: Any = None, **kw: Any) -> VllmEngine:
        from ga_ray.kernel.loading import load_tokenizer

        tok = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
        kw.setdefault("dtype", model_cfg.dtype if getattr(model_cfg, "dtype", None) else "auto")
        return cls(model_cfg.path, tok, adapter=adapter, variants=variants, **kw)

    # ----------------------------------------------------------------------------- variants

    def _register(self, name: str, path: Path) -> _Lora:
        if not (path / "adapter_config.json").is_file():
            raise EngineError(f"{path} is not a PEFT adapter folder: it has no adapter_config.json")
        lo = _Lora(name, lora_int_id(name, {x.int_id: x.name for x in self._loras.values()}), path, adapter_rank(path))
        self._loras[name] = lo
        return lo

    @staticmethod
    def _lora_request(lo: _Lora) -> Any:
        from vllm.lora.request import LoRARequest

        return LoRARequest(lo.name, lo.int_id, str(lo.path))

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_context(self) -> int:
        return self._max_context

    def variants(self) -> list[str]:
        with self._lock:
            return [BASE, *self._loras]

    def add_variant(self, name: str, path: str | Path) -> None:
        validate_variant_name(name)
        path = Path(path).expanduser().resolve()
        with self._lock:
            old = self._loras.get(name)
            if old is not None:
                if old.path == path:
                    return
                raise EngineError(f"variant {name!r} is already served from {old.path}; a name is never re-bound (asked: {path})")
            rank = adapter_rank(path)
            if rank > self._max_lora_rank:
                raise EngineError(f"variant {name!r} has LoRA rank {rank} but this vLLM engine was started with max_lora_rank "
                                  f"{self._max_lora_rank}; restart the server (it sizes max_lora_rank from the variants)")
            lo = self._register(name, path)
        self._run(self._llm.add_lora(self._lora_request(lo)))

    def _lora_for(self, variant: str) -> Any:
        if variant == BASE:
            return None
        lo = self._loras.get(variant)
        if lo is None:
            raise UnknownVariantError(f"unknown variant {variant!r}; this engine serves: {', '.join(self.variants())}")
        return self._lora_request(lo)

    # ----------------------------------------------------------------------------- requests

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.request_timeout_s)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    async def _one(self, ids: list[int], kw: dict[str, Any], lora: Any) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        final = None
        params = VSamplingParams(**kw, output_kind=RequestOutputKind.FINAL_ONLY)
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex, lora_request=lora):
            final = out
        if final is None:
            raise EngineError("vLLM returned no output")
        return final

    async def _generate_all(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        jobs = []
        for i, r in enumerate(requests):
            ids = self.encode(r.prompt)
            if not ids:
                raise EngineError(f"request {i}: the prompt is empty (no tokens)")
            if len(ids) + r.sampling.max_new_tokens > self._max_context:
                raise EngineError(f"request {i}: prompt ({len(ids)} tokens) + max_new_tokens ({r.sampling.max_new_tokens}) "
                                  f"exceeds the model's context of {self._max_context} tokens")
            jobs.append((ids, r.sampling, self._lora_for(r.variant)))

        async def run(ids: list[int], p: SamplingParams, lora: Any) -> Generation:
            if p.max_new_tokens == 0:  # vLLM needs max_tokens >= 1
                return Generation(text="", token_ids=[], finish_reason="length", prompt_tokens=len(ids),
                                  logprobs=[] if p.logprobs is not None else None, top_logprobs=[] if p.logprobs is not None else None)
            return generation_from_output(await self._one(ids, sampling_kwargs(p), lora), len(ids), p)

        return list(await asyncio.gather(*(run(*j) for j in jobs)))

    async def _score_all(self, inputs: Sequence[str | Sequence[int]], variant: str, top_logprobs: int) -> list[Scored]:
        lora = self._lora_for(variant)
        seqs = [self.encode(x) for x in inputs]
        for i, s in enumerate(seqs):
            if not s:
                raise EngineError(f"input {i} to score is empty (no tokens)")
            if len(s) + 1 > self._max_context:
                raise EngineError(f"input {i} has {len(s)} tokens; scoring needs at most {self._max_context - 1}")
        outs = await asyncio.gather(*(self._one(s, score_kwargs(top_logprobs), lora) for s in seqs))
        return [scored_from_output(o, s, top_logprobs) for o, s in zip(outs, seqs)]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return self._run(self._generate_all(list(requests)))

    def score(self, inputs: Sequence[str | Sequence[int]], variant: str, top_logprobs: int = 0) -> list[Scored]:
        return self._run(self._score_all(list(inputs), variant, top_logprobs))

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """`generate` awaited from another event loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._generate_all(list(requests)), self._loop))

    async def ascore(self, inputs: Sequence[str | Sequence[int]], variant: str, top_logprobs: int = 0) -> list[Scored]:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._score_all(list(inputs), variant, top_logprobs), self._loop))

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.shutdown()
            self._llm = None
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
