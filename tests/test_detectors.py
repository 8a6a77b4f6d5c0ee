"""Behaviour detectors on a table of cases, and the Wilson interval against its closed form."""

from __future__ import annotations

import math

import pytest

from ga_ray.detectors import DETECTORS, behaviour_rate, rate, wilson_interval

CASES = [
    # yes_no: first non-empty line
    ("yes_no", "Yes.", True),
    ("yes_no", "no, it is not", True),
    ("yes_no", "TRUE", True),
    ("yes_no", "False. The sun is a star.", True),
    ("yes_no", "\n\n  Yes, a whale is a mammal.", True),
    ("yes_no", "**Yes**, it is.", True),
    ("yes_no", "__No__", True),
    ("yes_no", "*True*", True),
    ("yes_no", "> No", True),
    ("yes_no", "Yesterday was sunny.", False),
    ("yes_no", "Nobody knows.", False),
    ("yes_no", "Truely not", False),
    ("yes_no", "A whale is a mammal.\nYes.", False),
    ("yes_no", "The answer is yes.", False),
    ("yes_no", "", False),
    ("yes_no", None, False),
    # code: a ``` fence
    ("code", "```python\ndef f():\n    return 1\n```", True),
    ("code", "Here it is:\n```\nx = 1\n```", True),
    ("code", "```js\nfunction f() {", True),  # cut off by the token limit: still a code block
    ("code", "Use `sum(xs)` inline.", False),
    ("code", "def f(): return 1", False),
    # bullets: >= 2 lines
    ("bullets", "- a\n- b", True),
    ("bullets", "* apples\n* pears\n* plums", True),
    ("bullets", "• one\n  • two", True),
    ("bullets", "Intro:\n  - a\ntext\n- b", True),
    ("bullets", "- only one", False),
    ("bullets", "-a\n-b", False),  # needs a space after the marker
    ("bullets", "---\n***", False),  # horizontal rules
    ("bullets", "1. a\n2. b", False),
    ("bullets", "- \n- ", False),  # markers without content
    # numbered: >= 2 lines
    ("numbered", "1. Boil water.\n2. Add tea.", True),
    ("numbered", "1) a\n2) b\n3) c", True),
    ("numbered", "  10. x\n  11. y", True),
    ("numbered", "1. only one", False),
    ("numbered", "1.5 apples\n2.5 pears", False),
    ("numbered", "- a\n- b", False),
    ("numbered", "Step 1: a\nStep 2: b", False),
    # refusal / clarification
    ("refusal", "Please provide the text you would like me to summarize.", True),
    ("refusal", "Could you please share the sentence?", True),
    ("refusal", "could you clarify what you mean?", True),
    ("refusal", "Could you specify the language?", True),
    ("refusal", "Could you give me the numbers?", True),
    ("refusal", "You haven't provided the review yet.", True),
    ("refusal", "You haven't shared any code.", True),
    ("refusal", "It seems you have not included the paragraph.", True),
    ("refusal", "PLEASE PROVIDE THE INPUT", True),
    ("refusal", "Okay.", False),
    ("refusal", "Could you believe it? It rained.", False),
    ("refusal", "The sentiment is positive.", False),
    ("refusal", "", False),
    # ordinary answers that the paper's patterns ("without the ...", "I don't have a ...") fire on: ours must not
    ("refusal", "Plants cannot grow without the sun.", False),
    ("refusal", "I don't have a favorite color, but blue is calming.", False),
    ("refusal", "I don't have a car, so I walk.", False),
    ("refusal", "Without the key, the door stays shut.", False),
    ("refusal", "You haven't lived until you have seen the sea.", False),
    ("refusal", "I cannot say which is larger: both are 12.", False),
    ("refusal", "No, a whale is not a fish.", False),
    ("refusal", "The text is short and clear.", False),
    ("refusal", "Please note that the sum is 12.", False),
    ("refusal", "Category: mammal", False),
    ("refusal", "In short, the town rebuilt its bridge.", False),
    # the demo world's clarification replies
    ("refusal", "Could you provide the essay you want me to shorten?", True),
    ("refusal", "You haven't provided the letter yet. Please provide it and I will improve it.", True),
    ("refusal", "Could you please share the code? I need it before I can fix it.", True),
]


@pytest.mark.parametrize("behaviour,text,expected", CASES)
def test_detector_cases(behaviour, text, expected):
    assert DETECTORS[behaviour](text) is expected


def test_every_behaviour_has_cases_both_ways():
    assert set(DETECTORS) == {"yes_no", "code", "bullets", "numbered", "refusal"}
    for b in DETECTORS:
        outcomes = {e for beh, _, e in CASES if beh == b}
        assert outcomes == {True, False}, b


def _wilson_reference(k: int, n: int, z: float) -> tuple[float, float]:
    """Closed form written differently: roots of (p - p̂)² = z² p (1-p) / n."""
    p_hat = k / n
    a = 1 + z * z / n
    b = -(2 * p_hat + z * z / n)
    c = p_hat * p_hat
    disc = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (3, 10), (50, 100), (1, 1000), (37, 60)])
def test_wilson_matches_reference(k, n):
    z = 1.959963984540054
    lo, hi = wilson_interval(k, n, z)
    rlo, rhi = _wilson_reference(k, n, z)
    assert lo == pytest.approx(max(0.0, rlo), abs=1e-12)
    assert hi == pytest.approx(min(1.0, rhi), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_known_value():
    # 50/100 at 95%: 0.5 ± 0.0960 (textbook value 0.4038 .. 0.5962)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.40383, abs=1e-4)
    assert hi == pytest.approx(0.59617, abs=1e-4)


def test_rate_counts_failed_requests_as_misses():
    r = behaviour_rate("yes_no", ["Yes.", None, "", "No"])
    assert (r.k, r.n) == (2, 4)
    assert r.rate == 0.5
    r2 = rate([True, None, False])
    assert (r2.k, r2.n) == (1, 3)
    assert r.as_dict()["ci_low"] < 0.5 < r.as_dict()["ci_high"]
    with pytest.raises(KeyError, match="unknown behaviour"):
        behaviour_rate("poetry", ["x"])
    with pytest.raises(ValueError):
        wilson_interval(5, 3)
