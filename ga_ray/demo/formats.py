"""Format checks of the demo world's ten deterministic families (the format table).

Each check asks whether a generated response has its family's FORMAT (the shape the training data
always uses), not whether the content is right: a tiny model may name the wrong capital, but it
should answer a capital question with one short line ending in a period.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ga_ray.detectors import DETECTORS


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip()]


def _one_line(pattern: str) -> Callable[[str], bool]:
    rx = re.compile(pattern)

    def check(text: str) -> bool:
        ls = _lines(text or "")
        return len(ls) == 1 and bool(rx.fullmatch(ls[0]))

    return check


def check_short_answer(text: str) -> bool:
    ls = _lines(text or "")
    return (
        len(ls) == 1
        and len(ls[0].split()) <= 3
        and ls[0].endswith(".")
        and ":" not in ls[0]
        and not DETECTORS["yes_no"](ls[0])
    )


def check_steps(text: str) -> bool:
    ls = _lines(text or "")
    if len(ls) < 2 or not ls[0].startswith("Step 1:") or not ls[-1].startswith("Answer:"):
        return False
    return all(re.match(r"Step \d+: ", ln) for ln in ls[:-1])


def check_verse(text: str) -> bool:
    ls = _lines(text or "")
    if not 2 <= len(ls) <= 8 or "```" in text:
        return False
    for ln in ls:
        if len(ln.split()) > 12 or re.match(r"^([-*•]|\d+[.)])\s", ln) or re.match(r"^[A-Z][a-z ]+:", ln):
            return False
    return True


FORMAT_CHECKS: dict[str, Callable[[str], bool]] = {
    "factual_qa": check_short_answer,
    "grammar": _one_line(r"Corrected: [A-Z].*[.!?]"),
    "arithmetic": _one_line(r"-?\d+ [-+*/] -?\d+ = -?\d+"),
    "multistep": check_steps,
    "classification": _one_line(r"Category: [a-z]+"),
    "sentiment": _one_line(r"The sentiment is (positive|negative|neutral)\."),
    "transform": _one_line(r"(Past tense|Future tense|Passive voice|Active voice|Question): [A-Z].*[.?]"),
    "summarise": _one_line(r"In short, .+\."),
    "creative": check_verse,
    "word_task": _one_line(r"[a-z]+, [a-z]+, [a-z]+"),
}

FORMAT_DESCRIPTIONS: dict[str, str] = {
    "factual_qa": "one line of <= 3 words ending in '.'",
    "grammar": "'Corrected: <sentence>'",
    "arithmetic": "'a op b = c'",
    "multistep": "'Step k: ...' lines then 'Answer: ...'",
    "classification": "'Category: <label>'",
    "sentiment": "'The sentiment is <label>.'",
    "transform": "'<Target form>: <sentence>'",
    "summarise": "'In short, ... .'",
    "creative": "2-8 short verse lines, no list",
    "word_task": "'w1, w2, w3'",
}
