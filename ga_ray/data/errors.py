"""Bad input rows: what is wrong with one row, where it is, and the message that lists them all.

A bad row never crashes the stage with a traceback and never disappears: every problem is collected
(with its file and its location: the 1-based line of a JSONL file, the 0-based row index of a
Parquet file or a `datasets` folder, as `df.iloc[i]` / `ds[i]` take it), then either reported
together in one `StageError` (the first few rows and the count, so the user fixes them in one go)
or, with `data.skip_bad_rows: true`, written to `data/rejected.jsonl` and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_SHOWN = 5
"""Bad rows quoted in the error message; the rest are counted."""

# Kinds of problem (the keys of `rejected` in data/prepare.json).
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_MESSAGES = "bad_messages"
EMPTY_RESPONSE = "empty_response"
BAD_ID = "bad_id"
DUPLICATE_ID = "duplicate_id"
TEMPLATE_ERROR = "template_error"
NO_RESPONSE_TOKENS = "no_response_tokens"
NO_RESPONSE_AFTER_TRUNCATION = "no_response_after_truncation"
INVALID_TEXT = "invalid_text"
TOO_DEEP = "too_deep"
SPECIAL_TOKEN_TEXT = "special_token_text"

KINDS = (
    INVALID_JSON,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    WRONG_TYPE,
    BAD_MESSAGES,
    EMPTY_RESPONSE,
    BAD_ID,
    DUPLICATE_ID,
    TEMPLATE_ERROR,
    NO_RESPONSE_TOKENS,
    NO_RESPONSE_AFTER_TRUNCATION,
    INVALID_TEXT,
    TOO_DEEP,
    SPECIAL_TOKEN_TEXT,
)

SKIP_HINT = (
    "Fix these rows, or set data.skip_bad_rows: true (CLI: --skip-bad-rows) to write them to "
    "data/rejected.jsonl with their reasons and prepare the other rows."
)


class RowProblem(Exception):
    """What is wrong with one row (raised by the pure validators and tokenisers)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


@dataclass
class BadRow:
    """One rejected row."""

    pos: int
    """The row's position in the whole source (0-based, counting every row, bad ones included)."""
    file: str
    """The file it came from (for a `datasets` folder: the folder)."""
    where: str
    """`line N` (JSONL, 1-based) or `row index N` (Parquet, `datasets`; 0-based)."""
    kind: str
    """One of `KINDS`."""
    reason: str
    """The problem, in words."""
    doc_id: int | None = None
    """The document id it would have had (None when it could not be read)."""
    row: Any = field(default=None, repr=False)
    """The row as read (a dict), or the raw text of a line that is not valid JSON."""

    def describe(self) -> str:
        return f"{self.file} {self.where}: {self.reason}"

    def record(self) -> dict[str, Any]:
        """The line written to `data/rejected.jsonl`."""
        rec: dict[str, Any] = {"file": self.file}
        kind, _, num = self.where.rpartition(" ")
        rec["line" if kind == "line" else "row_index"] = int(num)
        rec.update({"doc_id": self.doc_id, "kind": self.kind, "reason": self.reason})
        if isinstance(self.row, str):
            rec["text"] = self.row
        else:
            rec["row"] = self.row
        return rec


def format_bad_rows(bad: list[BadRow], source: str, footer: str = SKIP_HINT) -> str:
    """The message that lists bad rows: a header with the count, the first `MAX_SHOWN`, a footer."""
    bad = sorted(bad, key=lambda b: b.pos)
    n = len(bad)
    lines = [f"{n} bad row{'s' if n != 1 else ''} in {source}:"]
    lines += [f"  {b.describe()}" for b in bad[:MAX_SHOWN]]
    if n > MAX_SHOWN:
        lines.append(f"  ... and {n - MAX_SHOWN} more")
    if footer:
        lines.append(footer)
    return "\n".join(lines)


def count_by_kind(bad: list[BadRow]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in bad:
        out[b.kind] = out.get(b.kind, 0) + 1
    return dict(sorted(out.items()))


def too_many_rejected(n_bad: int, n_rows: int, max_share: float) -> bool:
    """More than `max_share` of the source's rows rejected (a share of 1.0 never stops)."""
    return n_rows > 0 and n_bad / n_rows > max_share


def format_too_many_rejected(bad: list[BadRow], n_rows: int, max_share: float, source: str) -> str:
    """The message that stops prepare when too many rows are bad: the share, the count per reason, the first rows."""
    n = len(bad)
    counts = count_by_kind(bad)
    lines = [
        f"{n:,} of {n_rows:,} rows of {source} are bad ({n / n_rows:.1%}), more than data.max_rejected_share = "
        f"{max_share:g} ({max_share:.1%}) allows; by reason: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])),
    ]
    bad = sorted(bad, key=lambda b: b.pos)
    lines += [f"  {b.describe()}" for b in bad[:MAX_SHOWN]]
    if n > MAX_SHOWN:
        lines.append(f"  ... and {n - MAX_SHOWN:,} more")
    lines.append(
        "Nothing was written. Fix the source (is data.path the file you meant, and are the column settings right?), "
        "or raise data.max_rejected_share (1.0: no limit) to prepare the remaining rows anyway."
    )
    return "\n".join(lines)
