"""Response-only masks on templated chats, checked against an independent reference (pure, no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_prepare_helpers import TEMPLATE_MERGE, TEMPLATE_NO_SYSTEM, TEMPLATE_SYSTEM, make_tokenizer

from ga_ray.data.errors import RowProblem
from ga_ray.data.tokenize import MESSAGE_TYPE, encode_conversation, encode_many, tokenize_table

SINGLE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer the question."}] + SINGLE
MULTI = [
    {"role": "system", "content": "Answer yes or no."},
    {"role": "user", "content": "Is Paris the capital of France?"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "Rewrite the sentence in the past tense."},
    {"role": "assistant", "content": "The cat sat on the mat."},
]


def reference_mask(tok, messages):
    """Slow reference: render the prompt (with generation prompt) and the rest of the text, tokenise
    the two pieces SEPARATELY, and mask exactly the second piece's tokens. Valid when the boundary is
    clean (the two pieces tokenise the same apart as together, which the test asserts)."""
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    assert p_ids + r_ids == tok(full, add_special_tokens=False)["input_ids"], "boundary not clean: reference not valid"
    return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)


@pytest.mark.parametrize(
    "template,messages",
    [
        (TEMPLATE_SYSTEM, SINGLE),
        (TEMPLATE_SYSTEM, WITH_SYSTEM),
        (TEMPLATE_SYSTEM, MULTI),
        (TEMPLATE_NO_SYSTEM, SINGLE),
        (TEMPLATE_NO_SYSTEM, MULTI[1:]),
    ],
    ids=["system-tpl-single", "system-tpl-with-system", "system-tpl-multi-turn", "no-system-tpl-single", "no-system-tpl-multi-turn"],
)
def test_mask_matches_separate_tokenisation(template, messages):
    tok = make_tokenizer(template)
    enc = encode_conversation(tok, messages, max_length=1000)
    ids, mask = reference_mask(tok, messages)
    assert enc.input_ids == ids
    assert enc.loss_mask == mask
    assert not enc.truncated
    # The masked tokens decode to the final response (plus what the template closes the turn with).
    response = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    assert response.strip().startswith(messages[-1]["content"])


def test_multi_turn_masks_only_the_final_assistant_turn():
    tok = make_tokenizer(TEMPLATE_SYSTEM)
    enc = encode_conversation(tok, MULTI, max_length=1000)
    masked = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])
    unmasked = tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if not m])
    assert masked == "The cat sat on the mat.<|end|>"
    assert "<|assistant|>yes<|end|>" in unmasked  # the earlier assistant turn is prompt
    assert unmasked.endswith("<|assistant|>")
    # The mask is one contiguous block at the end.
    first = enc.loss_mask.index(1)
    assert all(enc.loss_mask[first:]) and not any(enc.loss_mask[:first])


def test_bpe_merge_across_the_boundary_counts_as_response():
    """Generation prompt "A", assistant turn rendered "A<content>": the token "Answer" straddles the
    boundary, so the longest common prefix stops before it and it is a response token."""
    tok = make_tokenizer(TEMPLATE_MERGE)
    msgs = [{"role": "user", "content": "Compute 12 plus 7."}, {"role": "assistant", "content": "nswer is 19."}]
    enc = encode_conversation(tok, msgs, max_length=1000)
    prompt_ids = tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(prompt_ids[-1]) == "A"
    n_prompt = len(prompt_ids) - 1  # everything but the lone "A"
    assert enc.input_ids[:n_prompt] == prompt_ids[:n_prompt]
    assert tok.convert_ids_to_tokens(enc.input_ids[n_prompt]) == "Answer"
    assert enc.loss_mask == [0] * n_prompt + [1] * (len(enc.input_ids) - n_prompt)
    assert enc.n_prompt == n_prompt


def test_truncation_keeps_the_head_and_counts():
    tok = make_tokenizer(TEMPLATE_SYSTEM)
    full = encode_conversation(tok, SINGLE, max_length=1000)
    n = full.n_prompt + 2
    cut = encode_conversation(tok, SINGLE, max_length=n)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:n]
    assert cut.loss_mask == full.loss_mask[:n]
    assert sum(cut.loss_mask) == 2
    assert cut.n_full == len(full.input_ids)


def test_no_response_token_after_truncation_is_a_problem():
    tok = make_tokenizer(TEMPLATE_SYSTEM)
    n_prompt = encode_conversation(tok, SINGLE, max_length=1000).n_prompt
    with pytest.raises(RowProblem) as err:
        encode_conversation(tok, SINGLE, max_length=n_prompt)
    assert err.value.kind == "no_response_after_truncation"
    assert err.value.reason == (
        f"no response token left after truncation to data.max_length={n_prompt}: the prompt alone is {n_prompt} tokens "
        "(raise data.max_length or shorten the prompt)"
    )


def test_template_without_system_role_rejects_system_turns():
    tok = make_tokenizer(TEMPLATE_NO_SYSTEM)
    with pytest.raises(RowProblem) as err:
        encode_conversation(tok, WITH_SYSTEM, max_length=1000)
    assert err.value.kind == "template_error"
    assert err.value.reason == "the chat template failed on this conversation: System role not supported"


def test_template_that_drops_the_response_is_a_problem():
    tok = make_tokenizer("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}")
    with pytest.raises(RowProblem) as err:
        encode_conversation(tok, SINGLE, max_length=1000)
    assert err.value.kind == "no_response_tokens"
    assert err.value.reason == "the templated conversation has no token after the prompt (the chat template drops the response?)"


def test_tokenize_table_schema_order_and_sidecars():
    tok = make_tokenizer(TEMPLATE_NO_SYSTEM)
    convs = [SINGLE, WITH_SYSTEM, MULTI[1:]]
    table = pa.table(
        {
            "doc_id": pa.array([5, 7, 9], type=pa.int64()),
            "__ga_messages": pa.array(convs, type=MESSAGE_TYPE),
            "__ga_file": ["f", "f", "f"],
            "__ga_where": ["line 1", "line 2", "line 3"],
            "__ga_pos": pa.array([0, 1, 2], type=pa.int64()),
            "task": ["qa", "qa", "edit"],
        }
    )
    out = tokenize_table(tok, table, max_length=1000)
    assert out.schema.field("doc_id").type == pa.int64()
    assert out.schema.field("input_ids").type == pa.list_(pa.int32())
    assert out.schema.field("loss_mask").type == pa.list_(pa.int8())
    assert out.schema.field("n_tokens").type == pa.int32()
    assert out.column("doc_id").to_pylist() == [5, 7, 9]
    assert out.column("task").to_pylist() == ["qa", "qa", "edit"]
    assert out.column("__ga_kind").to_pylist() == [None, "template_error", None]
    assert out.column("input_ids")[1].as_py() == []
    expected = encode_many(tok, [SINGLE, MULTI[1:]], 1000)
    assert out.column("input_ids")[0].as_py() == expected[0].input_ids
    assert out.column("loss_mask")[2].as_py() == expected[1].loss_mask
    assert out.column("n_tokens").to_pylist() == [len(expected[0].input_ids), 0, len(expected[1].input_ids)]
