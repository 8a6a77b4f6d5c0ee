"""Behaviour detectors (the paper's regexes) and rates with Wilson confidence intervals.

`DETECTORS[name](response) -> bool` for the five steered behaviours:

- `yes_no`: the first non-empty line starts with yes/no/true/false (case-insensitive), also behind
  markdown emphasis or a quote (`**Yes**`, `_No_`, `> True`).
- `code`: the response contains a ``` fence (as the paper's detector; a block cut off by the token
  limit still counts).
- `bullets`: at least two lines `^\\s*[-*•]\\s+\\S` (a markdown horizontal rule `---`/`***` is not a bullet).
- `numbered`: at least two lines `^\\s*\\d+[.)]\\s+\\S`.
- `refusal`: a clarification-seeking pattern (`please provide`, `could you (please )?(provide|share|
  clarify|specify|give)`, `you haven't (provided|shared|given|included)`, ...).

A failed request is a failure: callers pass `""` (or None) for it and every detector returns False.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_EMPH = r"[\s>*_`~\"'(\[]*"  # markdown emphasis / quote / bracket openers before the word
_YES_NO = re.compile(rf"^{_EMPH}(yes|no|true|false)(?![A-Za-z0-9])", re.IGNORECASE)  # like \b, but `__No__` counts too
_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
_RULE = re.compile(r"^\s*([-*])(\s*\1){2,}\s*$")  # --- or * * * : a horizontal rule, not a bullet
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
_REFUSAL = re.compile(
    r"please (provide|share|specify|clarify|send|give|include|paste|supply)"
    r"|could you (please )?(provide|share|clarify|specify|give|send|paste|tell me)"
    r"|can you (please )?(provide|share|clarify|specify|give|send|paste)"
    r"|would you (please )?(provide|share|clarify|specify|give|send|paste)"
    r"|you (haven't|have not|did not|didn't) (provide|provided|share|shared|give|given|include|included|attach|attached)"
    r"|(no|missing) (text|input|sentence|code|content|paragraph|review|article) (was |has been )?(provided|given|included)"
    r"|i (need|would need) (the|more|some) (text|input|details|information|content)",
    re.IGNORECASE,
)


def _text(response: str | None) -> str:
    return response if isinstance(response, str) else ""


def detect_yes_no(response: str | None) -> bool:
    for line in _text(response).splitlines():
        if line.strip():
            return bool(_YES_NO.match(line.strip()))
    return False


def detect_code(response: str | None) -> bool:
    return "```" in _text(response)


def detect_bullets(response: str | None) -> bool:
    n = 0
    for line in _text(response).splitlines():
        if _BULLET.match(line) and not _RULE.match(line):
            n += 1
    return n >= 2


def detect_numbered(response: str | None) -> bool:
    return len(_NUMBERED.findall(_text(response))) >= 2


def detect_refusal(response: str | None) -> bool:
    return bool(_REFUSAL.search(_text(response)))


DETECTORS: dict[str, Callable[[str], bool]] = {
    "yes_no": detect_yes_no,
    "code": detect_code,
    "bullets": detect_bullets,
    "numbered": detect_numbered,
    "refusal": detect_refusal,
}


@dataclass(frozen=True)
class Rate:
    """k successes out of n, with a Wilson score interval."""

    k: int
    n: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def as_dict(self) -> dict:
        return {"k": self.k, "n": self.n, "rate": self.rate, "ci_low": self.low, "ci_high": self.high}

    def __str__(self) -> str:
        return f"{100 * self.rate:5.1f}% [{100 * self.low:4.1f}, {100 * self.high:4.1f}] ({self.k}/{self.n})"


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%; statsmodels' `proportion_confint`)."""
    from scipy.stats import norm
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    lo, hi = proportion_confint(k, n, alpha=2 * float(norm.sf(z)), method="wilson")
    p = k / n  # the interval always contains p-hat (clamped against rounding at k = 0 or k = n)
    return (max(0.0, min(p, float(lo))), min(1.0, max(p, float(hi))))


def rate(flags: Iterable[bool | None], z: float = 1.959963984540054) -> Rate:
    """Rate of True among `flags`; None (a failed request) counts as a failure, never dropped."""
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n, z)
    return Rate(k, n, lo, hi)


def behaviour_rate(behaviour: str, responses: Iterable[str | None]) -> Rate:
    """Rate of `behaviour` over responses (None or "" for failed requests: counted as misses)."""
    try:
        det = DETECTORS[behaviour]
    except KeyError:
        raise KeyError(f"unknown behaviour {behaviour!r}; known: {', '.join(DETECTORS)}") from None
    return rate(det(r) for r in responses)


RULES = ("first_line", "any_line", "at_least_n_lines")
"""How a user detector's regex is applied: to the first non-empty line, to any line, or to at least n lines."""


def regex_detector(pattern: str, rule: str = "any_line", n: int = 1, ignore_case: bool = True) -> Callable[[str | None], bool]:
    """A detector from a regex and a rule (the user detectors of the config)."""
    if rule not in RULES:
        raise ValueError(f"detector rule {rule!r}: choose one of {', '.join(RULES)}")
    rx = re.compile(pattern, re.IGNORECASE if ignore_case else 0)

    def detect(response: str | None) -> bool:
        lines = _text(response).splitlines()
        if rule == "first_line":
            first = next((ln.strip() for ln in lines if ln.strip()), "")
            return bool(rx.search(first))
        hits = sum(1 for ln in lines if rx.search(ln))
        return hits >= (n if rule == "at_least_n_lines" else 1)

    return detect


def detector_registry(user: Iterable[object] = ()) -> dict[str, Callable[[str | None], bool]]:
    """The five built-in detectors plus the user's (objects with `name`, `pattern`, `rule`, `n`, `ignore_case`,
    e.g. `config.DetectorSpec`); a user detector may not reuse a built-in name."""
    out: dict[str, Callable[[str | None], bool]] = dict(DETECTORS)
    for spec in user:
        name = getattr(spec, "name")
        if name in out:
            raise ValueError(f"detector {name!r} is defined twice (built-ins: {', '.join(DETECTORS)})")
        out[name] = regex_detector(getattr(spec, "pattern"), getattr(spec, "rule", "any_line"), getattr(spec, "n", 1),
                                   getattr(spec, "ignore_case", True))
    return out
