"""The demo world's task generator: determinism, family coverage, response styles, evaluation sets."""

from __future__ import annotations

import collections
import json

import pytest

from ga_ray.demo import tasks
from ga_ray.demo.formats import FORMAT_CHECKS
from ga_ray.detectors import DETECTORS


def test_mixture_is_deterministic_by_seed():
    a = tasks.generate_mixture(300, seed=3)
    b = tasks.generate_mixture(300, seed=3)
    c = tasks.generate_mixture(300, seed=4)
    assert a == b
    assert a != c
    assert tasks.generate_base_texts(50, seed=1) == tasks.generate_base_texts(50, seed=1)
    assert tasks.behaviour_eval_set("code", seed=2) == tasks.behaviour_eval_set("code", seed=2)


def test_every_family_is_present_in_a_small_mixture():
    assert len(tasks.FAMILIES) >= 14
    mix = tasks.generate_mixture(len(tasks.FAMILIES) * 2, seed=0)
    counts = collections.Counter(e.task for e in mix)
    assert set(counts) == set(tasks.FAMILIES)
    assert set(counts.values()) == {2}


def test_deterministic_families_always_use_their_format():
    mix = tasks.generate_mixture(1500, seed=0)
    for e in mix:
        if e.task in tasks.DETERMINISTIC_FAMILIES:
            assert FORMAT_CHECKS[e.task](e.response), (e.task, e.response)
    # each format is specific to its family: no other deterministic family's responses pass it
    for fam, check in FORMAT_CHECKS.items():
        others = [e for e in mix if e.task in tasks.DETERMINISTIC_FAMILIES and e.task != fam]
        leaks = sum(check(e.response) for e in others)
        assert leaks <= 0.02 * len(others), (fam, leaks)


@pytest.mark.parametrize("behaviour", tasks.BEHAVIOURS)
def test_behaviours_are_not_all_or_nothing(behaviour):
    """In the carrying family, the behaviour is present in 40-80% of the documents: headroom both ways."""
    mix = tasks.generate_mixture(3000, seed=0)
    fam = tasks.BEHAVIOUR_FAMILIES[behaviour]
    docs = [e for e in mix if e.task == fam]
    share = sum(DETECTORS[behaviour](e.response) for e in docs) / len(docs)
    assert 0.4 <= share <= 0.8, (behaviour, share)
    # and at least two styles per behaviour family
    assert len({e.style for e in docs}) >= 2


def test_behaviours_absent_from_deterministic_families():
    mix = tasks.generate_mixture(1500, seed=0)
    for e in mix:
        if e.task in tasks.DETERMINISTIC_FAMILIES:
            for b, det in DETECTORS.items():
                assert not det(e.response), (b, e.task, e.response)


@pytest.mark.parametrize("behaviour", tasks.BEHAVIOURS)
def test_behaviour_eval_sets_are_100_held_out_prompts(behaviour):
    rows = tasks.behaviour_eval_set(behaviour, seed=0)
    assert len(rows) == 100
    assert sum(r["invites"] for r in rows) == 60
    assert len({r["prompt"] for r in rows}) >= 70  # mostly distinct
    # every prefix keeps the 60/40 ratio within one prompt (so eval_prompts < 100 stays balanced)
    for k in range(1, 101):
        assert abs(sum(r["invites"] for r in rows[:k]) - 0.6 * k) <= 1
    neutral_sources = {r["source"] for r in rows if not r["invites"]}
    assert neutral_sources <= set(tasks.DETERMINISTIC_FAMILIES)
    assert {r["source"] for r in rows if r["invites"]} == {tasks.BEHAVIOUR_FAMILIES[behaviour]}


def test_eval_prompts_never_appear_in_the_mixture():
    """Held-out templates and vocabulary: no evaluation prompt is a training prompt."""
    train_prompts = {e.prompt for e in tasks.generate_mixture(5000, seed=0)}
    for b in tasks.BEHAVIOURS:
        for r in tasks.behaviour_eval_set(b, seed=0):
            assert r["prompt"] not in train_prompts, r
    for f in tasks.DETERMINISTIC_FAMILIES:
        for r in tasks.family_eval_set(f, 50, seed=0):
            assert r["prompt"] not in train_prompts, r


def test_write_eval_dir_and_rows(tmp_path):
    counts = tasks.write_eval_dir(tmp_path / "eval", seed=0, n_per_family=7)
    assert counts["behaviours"] == {b: 100 for b in tasks.BEHAVIOURS}
    assert counts["families"] == {f: 7 for f in tasks.DETERMINISTIC_FAMILIES}
    row = json.loads((tmp_path / "eval" / "behaviours" / "refusal.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"prompt", "invites"} and isinstance(row["invites"], bool)
    ex = tasks.generate_mixture(1, seed=0)[0]
    r = tasks.to_row(ex, 5)
    assert r["id"] == 5 and r["task"] == ex.task
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"]


def test_base_split_mixes_plain_text_and_chat_dialogues():
    from ga_ray.demo.tokenizer import BOS, EOS

    texts = tasks.generate_base_texts(400, seed=0)
    chats = [t for t in texts if t.startswith(BOS)]
    assert 0 < len(chats) < 0.2 * len(texts)
    assert all(t.endswith(EOS) and "<|user|>" in t and "<|assistant|>" in t for t in chats)
    plain = [t for t in texts if not t.startswith(BOS)]
    assert not any(tok in t for t in plain for tok in ("<|user|>", "<|assistant|>", EOS))
    kinds = {"```": 0, "\n- ": 0, "\n1. ": 0, " = ": 0}
    for t in plain:
        for k in kinds:
            kinds[k] += k in t
    assert all(v > 0 for v in kinds.values()), kinds  # code, bullets, numbers and maths all occur in plain text


def test_plain_style_drops_the_house_style_and_keeps_the_answer():
    import re

    from ga_ray.demo.formats import FORMAT_CHECKS

    mixture = tasks.generate_mixture(1500, seed=3)
    seen = set()
    for ex in mixture:
        plain = tasks.plain_style(ex)
        if ex.task not in tasks.DETERMINISTIC_FAMILIES or ex.task == "factual_qa":  # a bare "Paris." has no house style
            assert plain is ex
            continue
        seen.add(ex.task)
        assert FORMAT_CHECKS[ex.task](ex.response) and not FORMAT_CHECKS[ex.task](plain.response), (ex.task, plain.response)
        assert plain.prompt == ex.prompt and plain.task == ex.task and plain.style == "plain" and plain.response.strip()
        # the content survives: every number and every word of 4+ letters of the answer (house-style words aside)
        house = {"Category", "Corrected", "short", "sentiment", "Step", "Answer", "Past", "Future", "Passive", "Active", "Question",
                 "tense", "voice"}
        answer = ex.response.rsplit(" = ", 1)[1] if ex.task == "arithmetic" else ex.response  # "a op b = c" keeps only c
        answer = re.sub(r"Step \d+: ", "", answer)
        for tok in re.findall(r"[A-Za-z]{4,}|\d+", answer):
            if tok not in house:
                assert tok.lower() in plain.response.lower(), (ex.task, tok, plain.response)
    assert seen == set(tasks.DETERMINISTIC_FAMILIES) - {"factual_qa"}
