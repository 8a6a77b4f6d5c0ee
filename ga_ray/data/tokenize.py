"""Chat templating, truncation and the response-only loss mask (pure: no Ray, no files).

A document is a chat: a list of `{role, content}` turns whose LAST turn is the assistant's response.
Only that final assistant turn is the response; every turn before it (system, user, and in a
multi-turn chat the earlier assistant turns too) is prompt. This is the paper's single-turn setting
(one instruction, one response) carried over to multi-turn data: the loss, hence the gradient, is
exactly what the fine-tune learned from the final answer given its whole context.

Token-level split: with `full` = the templated whole conversation and `prompt` = the templated
prompt turns with `add_generation_prompt=True`, the prompt tokens are the longest common token
prefix of `full` and `prompt`; every token of `full` after it is a response token. So the mask is
right even when the template's generation prompt differs from how it renders an assistant turn, or
when a BPE merge crosses the prompt/response boundary (the straddling token counts as response).
`loss_mask[t] == 1` iff token t is a response token, i.e. a prediction target:
`L = Σ_{t≥1} loss_mask[t]·CE(logits[t-1], input_ids[t])`. Template-added tokens after the response
(end-of-turn, EOS) are response tokens: the model learned to emit them.

Texts are rendered with `tokenize=False` and tokenised with `add_special_tokens=False`, as
`apply_chat_template(tokenize=True)` does: templates write their own BOS.

Special-token text in content: a tokenizer turns the text of a special token (`<|eos|>`, `<|assistant|>`)
into that control token wherever it appears, also inside a document's own words. Every occurrence in a
turn's content is found and counted (`Encoded.special_text`); `data.special_token_text` decides what
happens: `keep` (the tokenizer's parse: control tokens), `escape` (the occurrence is tokenised as plain
text, `split_special_tokens=True`, while the template's own markers stay control tokens) or `reject`.
Escaping works on the rendered text: each occurrence is swapped for a private-use placeholder before
templating, and the rendered text is tokenised piece by piece around the placeholders.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ga_ray.data.errors import (
    BAD_MESSAGES,
    NO_RESPONSE_AFTER_TRUNCATION,
    NO_RESPONSE_TOKENS,
    SPECIAL_TOKEN_TEXT,
    TEMPLATE_ERROR,
    RowProblem,
)

# Internal columns that travel with the rows through Ray and are dropped before writing.
COL_MESSAGES = "__ga_messages"
COL_FILE = "__ga_file"
COL_WHERE = "__ga_where"
COL_POS = "__ga_pos"
COL_TRUNCATED = "__ga_truncated"
COL_KIND = "__ga_kind"
COL_REASON = "__ga_reason"
COL_SPECIAL = "__ga_special"
INTERNAL_PREFIX = "__ga_"

OUTPUT_COLUMNS = ("doc_id", "input_ids", "loss_mask", "n_tokens")
MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@dataclass
class Encoded:
    """One templated, truncated document."""

    input_ids: list[int]
    loss_mask: list[int]
    n_prompt: int
    """Prompt tokens (the common prefix), before truncation."""
    n_full: int
    """Tokens of the whole templated conversation, before truncation."""
    special_text: tuple[str, ...] = ()
    """Special-token texts found in the turns' content, one entry per occurrence (see the module docstring)."""

    @property
    def truncated(self) -> bool:
        return self.n_full > len(self.input_ids)


def split_conversation(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """(prompt turns, the final assistant turn). The final turn must have role `assistant`."""
    if not messages or messages[-1].get("role") != "assistant":
        raise RowProblem(BAD_MESSAGES, "the last turn must be the response, with role 'assistant'")
    return list(messages[:-1]), messages[-1]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text; a template error becomes a `RowProblem`."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2 TemplateError (raise_exception), or a template bug on this row
        detail = str(exc) if type(exc).__name__ == "TemplateError" else f"{type(exc).__name__}: {exc}"
        raise RowProblem(TEMPLATE_ERROR, f"the chat template failed on this conversation: {detail}") from None


def mask_from_ids(full_ids: Sequence[int], prompt_ids: Sequence[int], max_length: int) -> Encoded:
    """Response-only mask from the two token sequences, then truncation to `max_length`."""
    n_prompt = common_prefix_len(full_ids, prompt_ids)
    n_full = len(full_ids)
    if n_prompt >= n_full:
        raise RowProblem(
            NO_RESPONSE_TOKENS,
            "the templated conversation has no token after the prompt (the chat template drops the response?)",
        )
    if n_prompt >= max_length:
        raise RowProblem(
            NO_RESPONSE_AFTER_TRUNCATION,
            f"no response token left after truncation to data.max_length={max_length}: the prompt alone is "
            f"{n_prompt} tokens (raise data.max_length or shorten the prompt)",
        )
    n = min(n_full, max_length)
    ids = list(full_ids[:n])
    mask = [0] * n_prompt + [1] * (n - n_prompt)
    return Encoded(input_ids=ids, loss_mask=mask, n_prompt=n_prompt, n_full=n_full)


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


SPECIAL_TEXT_MODES = ("keep", "escape", "reject")
_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")
_PATTERNS: dict[int, tuple[Any, re.Pattern[str] | None]] = {}


def special_token_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts the tokenizer parses as special (control) tokens wherever they appear, longest first."""
    texts = {t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t}
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False) and getattr(added, "content", ""):
            texts.add(added.content)
    return tuple(sorted(texts, key=lambda t: (-len(t), t)))


def special_text_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """A regex matching any special-token text (longest first); None when the tokenizer has none. Cached per tokenizer."""
    hit = _PATTERNS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    texts = special_token_texts(tokenizer)
    pattern = re.compile("|".join(re.escape(t) for t in texts)) if texts else None
    _PATTERNS[id(tokenizer)] = (tokenizer, pattern)
    return pattern


def find_special_text(messages: Sequence[dict[str, str]], pattern: re.Pattern[str] | None) -> tuple[str, ...]:
    """Every special-token text in the turns' content, in order (one entry per occurrence)."""
    if pattern is None:
        return ()
    return tuple(m.group() for turn in messages for m in pattern.finditer(turn.get("content") or ""))


def _with_placeholders(messages: Sequence[dict[str, str]], pattern: re.Pattern[str]) -> tuple[list[dict[str, str]], list[str]]:
    """The turns with each special-token text swapped for a numbered private-use placeholder, and the texts in order."""
    literals: list[str] = []

    def swap(m: re.Match[str]) -> str:
        literals.append(m.group())
        return f"\ue000{len(literals) - 1}\ue001"

    return [{**turn, "content": pattern.sub(swap, turn.get("content") or "")} for turn in messages], literals


def _escaped_ids(tokenizer: Any, text: str, literals: list[str]) -> list[int]:
    """Token ids of a rendered text with placeholders: the pieces between them as usual, each placeholder's
    special-token text as plain text."""
    pieces = _PLACEHOLDER.split(text)  # even indices: template text and content; odd: placeholder numbers
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            if piece:
                ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        elif int(piece) < len(literals):
            ids.extend(tokenizer(literals[int(piece)], add_special_tokens=False, split_special_tokens=True)["input_ids"])
        else:  # the content itself spelled a placeholder: keep it as the text it is
            ids.extend(tokenizer(f"\ue000{piece}\ue001", add_special_tokens=False)["input_ids"])
    return ids


def _special_text_problem(found: tuple[str, ...]) -> RowProblem:
    counts: dict[str, int] = {}
    for t in found:
        counts[t] = counts.get(t, 0) + 1
    listed = ", ".join(f"{t!r} x{n}" for t, n in counts.items())
    return RowProblem(
        SPECIAL_TOKEN_TEXT,
        f"the content spells special tokens of the tokenizer ({listed}); data.special_token_text is reject. "
        f"Set it to escape to tokenise them as plain text, or keep to let them become control tokens",
    )


def encode_conversation(tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int, special_text: str = "keep") -> Encoded:
    """Template, tokenise, mask and truncate one conversation; raises `RowProblem`."""
    result = encode_many(tokenizer, [messages], max_length, special_text)[0]
    if isinstance(result, RowProblem):
        raise result
    return result


def encode_many(
    tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], max_length: int, special_text: str = "keep"
) -> list[Encoded | RowProblem]:
    """`encode_conversation` over many conversations with one tokenizer call; problems are returned, not raised.

    `special_text` (`keep`, `escape`, `reject`) says what special-token text in content becomes (module docstring).
    """
    if special_text not in SPECIAL_TEXT_MODES:
        raise ValueError(f"special_text must be one of {SPECIAL_TEXT_MODES}, got {special_text!r}")
    pattern = special_text_pattern(tokenizer)
    fulls: list[str] = []
    prompts: list[str] = []
    ok: list[int] = []
    escaped: dict[int, tuple[list[int], list[int]]] = {}  # conversation -> (full ids, prompt ids), tokenised piecewise
    found: list[tuple[str, ...]] = [()] * len(conversations)
    out: list[Encoded | RowProblem | None] = [None] * len(conversations)
    for i, msgs in enumerate(conversations):
        try:
            found[i] = find_special_text(msgs, pattern)
            if found[i] and special_text == "reject":
                problem = _special_text_problem(found[i])
                problem.special_text = found[i]  # type: ignore[attr-defined]  (counted in prepare.json)
                raise problem
            if found[i] and special_text == "escape":
                assert pattern is not None
                placed, literals = _with_placeholders(msgs, pattern)
                prompt_turns, _ = split_conversation(placed)
                full_text = render(tokenizer, placed, add_generation_prompt=False)
                prompt_text = render(tokenizer, prompt_turns, add_generation_prompt=True)
                escaped[i] = (_escaped_ids(tokenizer, full_text, literals), _escaped_ids(tokenizer, prompt_text, literals))
                continue
            prompt_turns, _ = split_conversation(msgs)
            full_text = render(tokenizer, msgs, add_generation_prompt=False)
            prompt_text = render(tokenizer, prompt_turns, add_generation_prompt=True)
        except RowProblem as p:
            out[i] = p
            continue
        fulls.append(full_text)
        prompts.append(prompt_text)
        ok.append(i)
    full_ids = _token_ids(tokenizer, fulls)
    prompt_ids = _token_ids(tokenizer, prompts)
    pairs = {i: (full_ids[k], prompt_ids[k]) for k, i in enumerate(ok)} | escaped
    for i, (f_ids, p_ids) in pairs.items():
        try:
            enc = mask_from_ids(f_ids, p_ids, max_length)
        except RowProblem as p:
            out[i] = p
            continue
        enc.special_text = found[i]
        out[i] = enc
    return out  # type: ignore[return-value]


def tokenize_table(tokenizer: Any, table: pa.Table, max_length: int, special_text: str = "keep") -> pa.Table:
    """Rows read by `ga_ray.data.readers` → the `data/` schema plus internal status columns.

    Input: `doc_id`, `__ga_messages`, `__ga_file`, `__ga_where`, `__ga_pos`, sidecars. Output: `doc_id`
    int64, `input_ids` list<int32>, `loss_mask` list<int8>, `n_tokens` int32, `__ga_truncated` bool,
    `__ga_kind`/`__ga_reason` (null on good rows; a bad row has empty lists), `__ga_special` (the
    special-token texts found in a good row's content), the location and message columns (for the
    rejected rows), and the sidecars untouched. Row order is kept.
    """
    n = table.num_rows
    conversations = table.column(COL_MESSAGES).to_pylist() if n else []
    results = encode_many(tokenizer, conversations, max_length, special_text)
    specials: list[list[str]] = []
    ids_values: list[int] = []
    mask_values: list[int] = []
    offsets = [0]
    n_tokens: list[int] = []
    truncated: list[bool] = []
    kinds: list[str | None] = []
    reasons: list[str | None] = []
    for r in results:
        if isinstance(r, RowProblem):
            kinds.append(r.kind)
            reasons.append(r.reason)
            n_tokens.append(0)
            truncated.append(False)
            specials.append(list(getattr(r, "special_text", ())))  # only a special_token_text rejection has them
        else:
            ids_values.extend(r.input_ids)
            mask_values.extend(r.loss_mask)
            kinds.append(None)
            reasons.append(None)
            n_tokens.append(len(r.input_ids))
            truncated.append(r.truncated)
            specials.append(list(r.special_text))
        offsets.append(len(ids_values))
    offs = pa.array(offsets, type=pa.int32())
    input_ids = pa.ListArray.from_arrays(offs, pa.array(ids_values, type=pa.int32()))
    loss_mask = pa.ListArray.from_arrays(offs, pa.array(mask_values, type=pa.int8()))
    cols: dict[str, pa.Array | pa.ChunkedArray] = {
        "doc_id": table.column("doc_id").cast(pa.int64()),
        "input_ids": input_ids,
        "loss_mask": loss_mask,
        "n_tokens": pa.array(n_tokens, type=pa.int32()),
        COL_TRUNCATED: pa.array(truncated, type=pa.bool_()),
        COL_KIND: pa.array(kinds, type=pa.string()),
        COL_REASON: pa.array(reasons, type=pa.string()),
        COL_SPECIAL: pa.array(specials, type=pa.list_(pa.string())),
    }
    for name in table.column_names:
        if name not in cols and name != "doc_id":
            cols[name] = table.column(name)
    return pa.table(cols)
