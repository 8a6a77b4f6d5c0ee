"""The OpenAI request bodies this server accepts, their validation, and the response bodies it sends.

Pure: pydantic and plain dicts, no Ray, no HTTP, no model. Validation is strict (a string where a
number belongs is an error, not coerced) and every problem becomes a 400 `ApiError` whose `param`
names the field (`max_tokens`, `messages[0].content`, ...), the way OpenAI's own API reports it.

Supported beyond the basics: a list of prompts on /v1/completions (one choice per prompt, batched
together), `echo` (the prompt's own tokens and log-probs; with `max_tokens: 0` it scores given text),
`logprobs` / `top_logprobs`, `stop`, `seed`, `stream` with `stream_options.include_usage`.
Not supported (400 naming the field): `n` or `best_of` other than 1, `suffix`, non-zero penalties,
`logit_bias`, tools. Defaults follow OpenAI (temperature 1, top_p 1, completions max_tokens 16; chat
max_tokens: what the context leaves, capped by the server's limit).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ga_ray.serve.errors import ApiError, bad_request

MAX_STOP_STRINGS = 16


class _Body(BaseModel):
    # extra keys (user, metadata, ...) are ignored as OpenAI's SDKs send some; strict types: no coercion
    model_config = ConfigDict(extra="ignore", strict=True)


Number = StrictInt | StrictFloat


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Common(_Body):
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = 1
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: text, or token ids (one prompt per list entry)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt given as token ids
        return [x if isinstance(x, str) else list(x) for x in p]


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None

    def chat(self) -> list[dict[str, str]]:
        """The messages as {role, content} dicts (`developer` is OpenAI's new name for `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ------------------------------------------------------------------------------------- parsing


def _param(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as OpenAI names a field: `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]",
                      "function-after", "union", "literal"):
            continue  # pydantic's union-branch labels are not fields
        elif "[" in str(part) or str(part).startswith(("Strict", "lax-or-strict")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """The request body as `model`, or a 400 naming the first bad field."""
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON ({exc}); send a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        # a union field reports one error per branch: name the field once, with the first reason
        first = errs[0]
        param = _param(tuple(first["loc"]))
        if first["type"] == "missing":
            raise bad_request(f"Missing required field '{param}'", param=param, code="missing_field") from None
        got = first.get("input")
        shown = json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]
        # a union field (e.g. a number: int or float) fails once per branch: say every accepted form
        msgs = list(dict.fromkeys(e["msg"] for e in errs if _param(tuple(e["loc"])) == param))
        raise bad_request(f"Invalid value for '{param}': {' or '.join(msgs)} (got {shown})", param=param) from None


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """What one server allows (from ServeConfig)."""

    max_tokens: int = 4096
    max_top_logprobs: int = 20
    max_prompts: int = 64


@dataclass(frozen=True)
class Decoding:
    """A validated request's decoding settings, engine-agnostic."""

    max_tokens: int | None  # None: what the context leaves (chat without max_tokens)
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: int | None  # None: none; k >= 0: chosen token's log-prob and k alternatives
    echo: bool
    stream: bool
    include_usage: bool


def _check_common(req: _Common, limits: Limits, max_tokens: int | None, max_tokens_field: str) -> None:
    if req.n not in (None, 1):
        raise bad_request(f"Invalid value for 'n': only n = 1 is supported (got {req.n}); send one request per sample", param="n")
    if max_tokens is not None:
        if max_tokens < 0:
            raise bad_request(f"Invalid value for '{max_tokens_field}': it must be >= 0 (got {max_tokens})", param=max_tokens_field)
        if max_tokens > limits.max_tokens:
            raise bad_request(f"Invalid value for '{max_tokens_field}': at most {limits.max_tokens} on this server (got {max_tokens})",
                              param=max_tokens_field)
    if req.temperature is not None and not (0 <= req.temperature <= 2):
        raise bad_request(f"Invalid value for 'temperature': it must be in [0, 2] (got {req.temperature})", param="temperature")
    if req.top_p is not None and not (0 < req.top_p <= 1):
        raise bad_request(f"Invalid value for 'top_p': it must be in (0, 1] (got {req.top_p})", param="top_p")
    stops = req.stops()
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"Invalid value for 'stop': at most {MAX_STOP_STRINGS} strings (got {len(stops)})", param="stop")
    if any(not s for s in stops):
        raise bad_request("Invalid value for 'stop': stop strings must not be empty", param="stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise bad_request(f"'{name}' is not supported by this server (send 0 or leave it out)", param=name, code="unsupported")
    if req.logit_bias:
        raise bad_request("'logit_bias' is not supported by this server", param="logit_bias", code="unsupported")


def _check_k(k: int | None, field: str, limits: Limits) -> None:
    if k is not None and not (0 <= k <= limits.max_top_logprobs):
        raise bad_request(f"Invalid value for '{field}': it must be between 0 and {limits.max_top_logprobs} (got {k})", param=field)


def completion_decoding(req: CompletionRequest, limits: Limits) -> Decoding:
    """Validate a /v1/completions request against the server's limits."""
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    _check_common(req, limits, max_tokens, "max_tokens")
    _check_k(req.logprobs, "logprobs", limits)
    if req.best_of not in (None, 1):
        raise bad_request(f"Invalid value for 'best_of': only 1 is supported (got {req.best_of})", param="best_of")
    if req.suffix:
        raise bad_request("'suffix' is not supported by this server", param="suffix", code="unsupported")
    prompts = req.prompts()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise bad_request("Invalid value for 'prompt': it must not be empty", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise bad_request(f"Invalid value for 'prompt': at most {limits.max_prompts} prompts per request (got {len(prompts)})",
                          param="prompt")
    if max_tokens == 0 and not req.echo:
        raise bad_request("Invalid value for 'max_tokens': 0 is only meaningful with echo=true (scoring the prompt)",
                          param="max_tokens")
    if req.stream and max_tokens == 0:
        raise bad_request("'stream' needs max_tokens >= 1 (nothing would be streamed)", param="stream")
    return Decoding(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p), seed=req.seed, stop=req.stops(), logprobs=req.logprobs,
        echo=bool(req.echo), stream=bool(req.stream), include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def chat_decoding(req: ChatCompletionRequest, limits: Limits) -> Decoding:
    """Validate a /v1/chat/completions request against the server's limits."""
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    _check_common(req, limits, max_tokens, field)
    if max_tokens == 0:
        raise bad_request(f"Invalid value for '{field}': it must be >= 1", param=field)
    if req.tools:
        raise bad_request("'tools' are not supported by this server", param="tools", code="unsupported")
    _check_k(req.top_logprobs, "top_logprobs", limits)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    k = (req.top_logprobs or 0) if req.logprobs else None
    return Decoding(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p), seed=req.seed, stop=req.stops(), logprobs=k, echo=False,
        stream=bool(req.stream), include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def resolve_max_tokens(dec: Decoding, prompt_len: int, max_context: int, limits: Limits, prompt_field: str) -> int:
    """New tokens for one prompt, or a 400: a prompt longer than the context names `prompt_field`,
    a prompt + max_tokens over it names `max_tokens`."""
    if prompt_len > max_context or (prompt_len == max_context and dec.max_tokens != 0):
        raise ApiError(400, f"This model's maximum context length is {max_context} tokens; the prompt ('{prompt_field}') has "
                            f"{prompt_len}. Shorten it", param=prompt_field, code="context_length_exceeded")
    if dec.max_tokens is None:
        return min(limits.max_tokens, max_context - prompt_len)
    if prompt_len + dec.max_tokens > max_context:
        raise ApiError(400, f"This model's maximum context length is {max_context} tokens; the prompt has {prompt_len} and "
                            f"max_tokens asks for {dec.max_tokens} more. Lower max_tokens to at most {max_context - prompt_len}",
                       param="max_tokens", code="context_length_exceeded")
    return dec.max_tokens


# ------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], logprobs: list[float | None], top: list[dict[str, float] | None] | None,
                        start_offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, pos = [], start_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: list[list[tuple[str, float]]] | None) -> dict[str, Any]:
    """The chat `logprobs` object: `content` entries with token, logprob, bytes, top_logprobs."""
    content = []
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        alts = [] if top is None else [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))} for s, v in top[i]]
        content.append({"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": alts})
    return {"content": content, "refusal": None}


def completion_body(rid: str, created: int, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": use}


def chat_body(rid: str, created: int, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": use}


def models_body(ids: list[str], created: int, owned_by: str = "ga-ray") -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": owned_by} for i in ids]}
