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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ga_ray.data.errors import BAD_MESSAGES, NO_RESPONSE_AFTER_TRUNCATION, NO_RESPONSE_TOKENS, TEMPLATE_ERROR, RowProblem

# Internal columns that travel with the rows through Ray and are dropped before writing.
COL_MESSAGES = "__ga_messages"
COL_FILE = "__ga_file"
COL_WHERE = "__ga_where"
COL_POS = "__ga_pos"
COL_TRUNCATED = "__ga_truncated"
COL_KIND = "__ga_kind"
COL_REASON = "__ga_reason"
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


def encode_conversation(tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int) -> Encoded:
    """Template, tokenise, mask and truncate one conversation; raises `RowProblem`."""
    result = encode_many(tokenizer, [messages], max_length)[0]
    if isinstance(result, RowProblem):
        raise result
    return result


def encode_many(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], max_length: int) -> list[Encoded | RowProblem]:
    """`encode_conversation` over many conversations with one tokenizer call; problems are returned, not raised."""
    fulls: list[str] = []
    prompts: list[str] = []
    ok: list[int] = []
    out: list[Encoded | RowProblem | None] = [None] * len(conversations)
    for i, msgs in enumerate(conversations):
        try:
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
    for k, i in enumerate(ok):
        try:
            out[i] = mask_from_ids(full_ids[k], prompt_ids[k], max_length)
        except RowProblem as p:
            out[i] = p
    return out  # type: ignore[return-value]


def tokenize_table(tokenizer: Any, table: pa.Table, max_length: int) -> pa.Table:
    """Rows read by `ga_ray.data.readers` → the `data/` schema plus internal status columns.

    Input: `doc_id`, `__ga_messages`, `__ga_file`, `__ga_where`, `__ga_pos`, sidecars. Output: `doc_id`
    int64, `input_ids` list<int32>, `loss_mask` list<int8>, `n_tokens` int32, `__ga_truncated` bool,
    `__ga_kind`/`__ga_reason` (null on good rows; a bad row has empty lists), the location and
    message columns (for the rejected rows), and the sidecars untouched. Row order is kept.
    """
    n = table.num_rows
    conversations = table.column(COL_MESSAGES).to_pylist() if n else []
    results = encode_many(tokenizer, conversations, max_length)
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
        else:
            ids_values.extend(r.input_ids)
            mask_values.extend(r.loss_mask)
            kinds.append(None)
            reasons.append(None)
            n_tokens.append(len(r.input_ids))
            truncated.append(r.truncated)
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
    }
    for name in table.column_names:
        if name not in cols and name != "doc_id":
            cols[name] = table.column(name)
    return pa.table(cols)
