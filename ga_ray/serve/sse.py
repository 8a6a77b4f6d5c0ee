"""Server-sent events for `stream: true`, in the format OpenAI's clients read.

The engine protocol returns whole generations, so a stream is the generation cut into per-token
pieces after it is done: same text, same finish reason, same usage, delivered as OpenAI chunks. The
first byte therefore comes when the whole answer is ready (a real token-by-token stream needs an
engine that yields tokens, e.g. vLLM's AsyncLLM; the protocol would need a `stream` method).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

DONE = b"data: [DONE]\n\n"


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n\n"


def text_pieces(token_ids: Sequence[int], text: str, decode: Callable[[list[int]], str]) -> list[str]:
    """`text` cut into one piece per generated token where the decoded prefixes allow it.

    A piece is what decoding one more token adds. Where a prefix does not decode to a prefix of
    `text` (a multi-byte character split across tokens, the stop string cut off), nothing is sent
    until it does; whatever is left is the last piece. The pieces always join to `text` exactly.
    """
    pieces: list[str] = []
    sent = 0
    for i in range(1, len(token_ids) + 1):
        prefix = decode(list(token_ids[:i]))
        if len(prefix) > sent and text.startswith(prefix):
            pieces.append(prefix[sent:])
            sent = len(prefix)
        if sent >= len(text):
            break
    if sent < len(text):
        pieces.append(text[sent:])
    return pieces


def completion_chunks(rid: str, created: int, model: str, per_choice: list[dict[str, Any]],
                      usage: dict[str, int] | None) -> Iterator[bytes]:
    """/v1/completions chunks: `per_choice[i]` = {"pieces": [...], "finish_reason": ..., "prefix": echo text}."""
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    for index, c in enumerate(per_choice):
        pieces = ([c["prefix"]] if c.get("prefix") else []) + list(c["pieces"])
        for piece in pieces:
            yield event({**base, "choices": [{"index": index, "text": piece, "logprobs": None, "finish_reason": None}]})
        yield event({**base, "choices": [{"index": index, "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}]})
    if usage is not None:
        yield event({**base, "choices": [], "usage": usage})
    yield DONE


def chat_chunks(rid: str, created: int, model: str, pieces: list[str], finish_reason: str,
                usage: dict[str, int] | None) -> Iterator[bytes]:
    """/v1/chat/completions chunks: the role first, then content deltas, then the finish reason."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
    for piece in pieces:
        yield event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}]})
    yield event({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}]})
    if usage is not None:
        yield event({**base, "choices": [], "usage": usage})
    yield DONE
