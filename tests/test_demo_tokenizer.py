"""The demo tokenizer: byte-level round trip, special tokens, chat template and its prefix property."""

from __future__ import annotations

import pytest

from ga_ray.demo import tasks
from ga_ray.demo.tokenizer import BOS, EOS, PAD, ROLE_TOKENS, render_chat, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    mix = tasks.generate_mixture(150, seed=0)
    texts = [render_chat([{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.response}]) for e in mix]
    texts += tasks.generate_base_texts(100, seed=0)
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=400, out_dir=out)
    return AutoTokenizer.from_pretrained(str(out))  # what the pipeline loads


def test_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for t in ROLE_TOKENS.values():
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, t  # roles are single tokens
    assert 300 < len(tok) <= 400


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "```python\ndef f(x):\n    return x * 2\n```", "  leading and trailing  ", "Ünïcödé ☃ – ok", "1. a\n2. b\n\n- c", ""],
)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte level: any string survives


def test_chat_template_matches_python_rendering(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "3 + 3 = 6"},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == render_chat(msgs)
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True) == render_chat(msgs[:2], True)
    assert render_chat(msgs[:2], True).endswith("<|assistant|>\n")
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _ids(tok, msgs, gen):
    return tok.apply_chat_template(msgs, tokenize=True, return_dict=False, add_generation_prompt=gen)


@pytest.mark.parametrize("seed", [0, 1])
def test_generation_prompt_is_a_token_prefix(tok, seed):
    """prepare builds loss masks from this: prompt+generation prompt is a prefix of the full chat."""
    replies = ["Paris.", " leading space", "\nleading newline", "- a\n- b", "```python\nx = 1\n```", "Yes, it is.", ""]
    for e in tasks.generate_mixture(25, seed=seed):
        for reply in (e.response, *replies):
            for system in (None, "You are terse."):
                msgs = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": e.prompt},
                    {"role": "assistant", "content": reply},
                ]
                full = _ids(tok, msgs, False)
                prompt = _ids(tok, msgs[:-1], True)
                assert full[: len(prompt)] == prompt, (e.prompt, reply)
                assert full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id
                assert tok.decode(full[len(prompt) : -1]) == reply


def test_multi_turn_prefix(tok):
    msgs = [{"role": "user", "content": "List two fruits."}, {"role": "assistant", "content": "- Apples\n- Pears"},
            {"role": "user", "content": "Thanks! And one more?"}, {"role": "assistant", "content": "- Plums"}]
    full = _ids(tok, msgs, False)
    prompt = _ids(tok, msgs[:-1], True)
    assert full[: len(prompt)] == prompt
