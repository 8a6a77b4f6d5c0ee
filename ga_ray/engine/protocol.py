"""The generation engine: the one extension point of the second half of ga-ray.

Everything that generates or scores text (the finetune stage's format table, the serve app, the serve
benchmark) talks to an `Engine`, the way kronfluence's analyses talk to one `Task`. An engine serves many
*variants* of one base model at once: each variant is a LoRA adapter folder (the steer stage's
`variants/<name>/`), plus two built-in ids, `finetuned` (the run's adapter) and `base` (adapter off).

A batch of requests may mix variants and sampling settings; the engine returns, for every request, what
it would return for that request alone (greedy decoding exactly; sampling up to the request's own seed).

Implementations: `ga_ray.engine.peft_engine.PeftEngine` (transformers + PEFT, CPU or GPU) and
`ga_ray.engine.vllm_engine.VllmEngine` (vLLM multi-LoRA, GPU). `ga_ray.engine.make_engine` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ga_ray.errors import GaRayError

BASE = "base"
"""Variant id of the base model (no adapter)."""
FINETUNED = "finetuned"
"""Variant id of the run's fine-tuned adapter (`RUN_DIR/adapter/`)."""
RESERVED_IDS = (BASE, FINETUNED)

FinishReason = Literal["stop", "length"]


class EngineError(GaRayError, ValueError):
    """A request an engine cannot serve (unknown variant, bad sampling value, prompt too long); the
    message names the field. Serve turns it into an HTTP 400/404."""


class UnknownVariantError(EngineError, KeyError):
    """The request names a variant the engine does not hold (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    `temperature == 0` is greedy (argmax; `top_p` and `seed` are then ignored). Otherwise tokens are
    drawn from softmax(logits / temperature) restricted to the smallest set of tokens whose probability
    reaches `top_p` (nucleus sampling), with a generator seeded by `seed` (None: a fresh random seed),
    so a request's sample does not depend on the other requests of its batch.

    `stop`: strings that end the generation; the returned text is cut before the first one
    (finish_reason "stop"). The end-of-sequence token also stops (and is not part of the text).
    `logprobs`: None returns no log-probs; k >= 0 returns the log-prob of each generated token and the
    k most likely tokens at each step (k = 0: only the chosen token's). Log-probs are of the model's
    distribution before temperature / top-p (what OpenAI and vLLM report by default).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a single string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise EngineError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise EngineError(f"seed must be an integer or null, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise EngineError(f"stop must be non-empty strings, got {self.stop!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise EngineError(f"logprobs must be an integer >= 0 or null, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt for one variant. `prompt` is text (tokenized by the engine's `encode`: the
    tokenizer's own special tokens, e.g. BOS, are added) or token ids (used as they are: what a chat
    template rendered by `chat_prompt_ids` gives)."""

    variant: str
    prompt: str | Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Generation:
    """The result of one request.

    `token_ids`: every generated token, up to and including the stop string's tokens or the EOS token
    that ended it; `text` is the decoded text of the generated tokens, special tokens skipped, cut
    before the first stop string. `logprobs[i]` is the log-prob of `token_ids[i]`, `top_logprobs[i]`
    the (token id, log-prob) pairs of the k most likely tokens at step i, most likely first.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Scored:
    """Per-token log-probs of a given text under a variant (teacher forcing).

    `logprobs[t]` is log p(token_ids[t] | token_ids[:t]); `logprobs[0]` is None (the first token has no
    context, as in OpenAI's echo). `top_logprobs[t]` (when asked) lists the k most likely tokens at
    position t (the distribution that predicted token t), most likely first; None at t = 0.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None] | None = None


@runtime_checkable
class Engine(Protocol):
    """What every generation engine offers (see the module docstring)."""

    @property
    def tokenizer(self) -> Any:
        """The base model's Hugging Face tokenizer (chat templates, decoding token ids)."""
        ...

    @property
    def max_context(self) -> int:
        """Prompt + generated tokens the model can take; a longer request is an `EngineError`."""
        ...

    def variants(self) -> list[str]:
        """Every servable variant id: `base`, `finetuned` (when the engine has the run's adapter) and
        each added variant's name."""
        ...

    def add_variant(self, name: str, path: str | Path) -> None:
        """Load the PEFT LoRA folder at `path` as variant `name` (loaded once, kept). Adding the same
        name with the same folder again is a no-op; a name is never re-bound to other content."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One `Generation` per request, in order. Requests may name different variants."""
        ...

    def score(self, inputs: Sequence[str | Sequence[int]], variant: str, top_logprobs: int = 0) -> list[Scored]:
        """Per-token log-probs of each text (tokenized like a text prompt) or token-id list."""
        ...

    def close(self) -> None:
        """Free the model (GPU memory, background threads)."""
        ...


# ------------------------------------------------------------------------------- shared helpers


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat rendered by the tokenizer's chat template, with the generation prompt (the
    assistant's turn opened). The template already holds the special tokens (BOS), so none are added."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the earliest occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def validate_variant_name(name: str) -> str:
    """A variant id is a non-empty name without path separators; `base`/`finetuned` are reserved."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise EngineError(f"variant name {name!r} is not allowed: use a non-empty name without '/' that does not start with '.'")
    if name in RESERVED_IDS:
        raise EngineError(f"variant name {name!r} is reserved (the ids {', '.join(RESERVED_IDS)} are built in)")
    return name
