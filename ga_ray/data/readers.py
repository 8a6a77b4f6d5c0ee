"""Reading training documents: JSONL, Parquet (a file or a folder) and `datasets.save_to_disk` folders.

Every row becomes a chat (`messages`: a list of `{role, content}` turns ending with the assistant's
response), either from a messages column or from prompt/response columns (plus `data.system_prompt`
when set). Column names come from `DataConfig`. Which form a source uses is decided once per source:
messages when any row has the messages column, else prompt/response.

`doc_id` is the row's position in the source (0-based, counting every row, bad ones included, so
fixing or skipping a bad row never renumbers the others; blank JSONL lines are not rows; a Parquet
folder is read file by file in name order), unless the source has the `data.id_column` column
(default `id`): then that integer is the `doc_id`, and ids must be unique. Every other column is a
sidecar, passed through untouched (Parquet and `datasets` columns keep their Arrow type; JSONL
fields get the type Arrow infers from all rows).

Validation happens here, on the driver, while the file is read anyway, so every problem carries its
file and location: `line N` (1-based) for JSONL, `row index N` (0-based, as `df.iloc[N]` and
`ds[N]` take it) for Parquet and `datasets` folders. Problems found later by the tokeniser (template
errors, nothing left after truncation) carry the same location through Ray.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ga_ray.config import DataConfig
from ga_ray.data.errors import (
    BAD_ID,
    BAD_MESSAGES,
    DUPLICATE_ID,
    EMPTY_RESPONSE,
    INVALID_JSON,
    INVALID_TEXT,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    TOO_DEEP,
    WRONG_TYPE,
    BadRow,
    RowProblem,
    type_name,
)
from ga_ray.data.tokenize import COL_FILE, COL_MESSAGES, COL_POS, COL_WHERE, INTERNAL_PREFIX, MESSAGE_TYPE, OUTPUT_COLUMNS
from ga_ray.errors import ConfigError, DataError

MESSAGES = "messages"
PROMPT_RESPONSE = "prompt_response"

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
_ARROW_BATCH = 8192
_INT64 = (-(2**63), 2**63)
MAX_DEPTH = 32
"""Deepest nesting of objects and lists a row may have (a chat needs 3). Deeper values cannot travel through
Ray and Parquet reliably (Python's JSON parser itself gives up near 1000)."""
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass
class Source:
    """The rows of one source, validated: the good ones as an Arrow table, the bad ones listed."""

    description: str
    """The path (and split), as messages name it."""
    format: str
    """`jsonl`, `parquet` or `hf_disk`."""
    mode: str
    """`messages` or `prompt_response`."""
    table: pa.Table
    """Good rows in doc_id order: `doc_id` int64, the internal `__ga_*` columns, then the sidecars."""
    bad: list[BadRow]
    """Rows rejected while reading, in source order."""
    n_rows: int
    """Rows in the source (good and bad)."""
    id_column: str | None
    """The column the doc ids come from (None: positions)."""
    sidecars: list[str] = field(default_factory=list)
    """Columns passed through untouched."""


# ----------------------------------------------------------------------------------------- formats


def detect_format(path: Path, fmt: str = "auto") -> str:
    """`jsonl`, `parquet` or `hf_disk` for a path (checking that it exists and fits the format)."""
    if not path.exists():
        raise DataError(f"data.path {path} does not exist: point it to a JSONL file, a Parquet file or folder, or a datasets.save_to_disk folder")
    is_hf = path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())
    if fmt == "auto":
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix in JSONL_SUFFIXES:
                return "jsonl"
            if suffix in PARQUET_SUFFIXES:
                return "parquet"
            raise DataError(f"cannot tell the format of {path} from its name: name it .jsonl or .parquet, or set data.format to jsonl or parquet")
        if is_hf:
            return "hf_disk"
        if _parquet_files(path):
            return "parquet"
        raise DataError(f"{path} is a folder with neither .parquet files nor a datasets.save_to_disk layout (state.json or dataset_dict.json)")
    if fmt == "jsonl" and not path.is_file():
        raise ConfigError(f"data.format is jsonl but {path} is a folder; point data.path to the .jsonl file")
    if fmt == "hf_disk" and not is_hf:
        raise ConfigError(f"data.format is hf_disk but {path} is not a datasets.save_to_disk folder (no state.json or dataset_dict.json)")
    return fmt


def _parquet_files(folder: Path) -> list[Path]:
    """Parquet files under a folder, in name order, skipping hidden and `_`-prefixed paths."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES and not any(s.startswith((".", "_")) for s in rel):
            out.append(p)
    return sorted(out, key=lambda p: str(p.relative_to(folder)))


def read_source(cfg: DataConfig) -> Source:
    """Read and validate `cfg.path` (bad rows are listed in `Source.bad`, never raised)."""
    if not cfg.path:
        raise ConfigError("data.path is not set: point it to a JSONL file, a Parquet file or folder, or a datasets.save_to_disk folder")
    path = Path(cfg.path).expanduser()
    fmt = detect_format(path, cfg.format)
    if fmt == "jsonl":
        return _read_jsonl(path, cfg)
    if fmt == "parquet":
        return _read_parquet(path, cfg)
    return _read_hf_disk(path, cfg)


# ---------------------------------------------------------------------------------- row validation


class _Validator:
    """Turns one row into (doc_id, messages), or raises `RowProblem` (with `.doc_id` when known)."""

    def __init__(self, cfg: DataConfig, mode: str, id_column: str | None):
        self.cfg = cfg
        self.mode = mode
        self.id_column = id_column
        self.seen: dict[int, tuple[str, str]] = {}

    def check(self, pos: int, file: str, where: str, get: Callable[[str], Any]) -> tuple[int, list[dict[str, str]]]:
        doc_id = self._doc_id(pos, file, where, get)
        try:
            return doc_id, self._messages(get)
        except RowProblem as p:
            p.doc_id = doc_id  # type: ignore[attr-defined]
            raise

    def _doc_id(self, pos: int, file: str, where: str, get: Callable[[str], Any]) -> int:
        col = self.id_column
        if col is None:
            return pos
        v = get(col)
        if v is None:
            raise RowProblem(MISSING_FIELD, f"missing field '{col}' (the document id)")
        if isinstance(v, bool) or not isinstance(v, int):
            raise RowProblem(BAD_ID, f"field '{col}' must be an integer document id, got {type_name(v)} {v!r}")
        if not _INT64[0] <= v < _INT64[1]:
            raise RowProblem(BAD_ID, f"field '{col}' must be an integer document id that fits in int64, got {v}")
        if v in self.seen:
            first_file, first_where = self.seen[v]
            at = first_where if first_file == file else f"{first_file} {first_where}"
            raise RowProblem(DUPLICATE_ID, f"duplicate {col} {v} (also at {at})")
        self.seen[v] = (file, where)
        return v

    def _messages(self, get: Callable[[str], Any]) -> list[dict[str, str]]:
        if self.mode == MESSAGES:
            return check_messages(get(self.cfg.messages_column), self.cfg.messages_column)
        return prompt_response_messages(get(self.cfg.prompt_column), get(self.cfg.response_column), self.cfg)


def check_messages(value: Any, col: str = "messages") -> list[dict[str, str]]:
    """Validate a chat: a non-empty list of `{role, content}` string turns ending with a non-blank assistant turn."""
    if value is None:
        raise RowProblem(MISSING_FIELD, f"missing field '{col}'")
    if not isinstance(value, (list, tuple)):
        raise RowProblem(BAD_MESSAGES, f"field '{col}' must be a list of {{role, content}} turns, got {type_name(value)}")
    if len(value) == 0:
        raise RowProblem(BAD_MESSAGES, f"field '{col}' has no turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowProblem(BAD_MESSAGES, f"{col}[{i}] must be an object with 'role' and 'content', got {type_name(turn)}")
        for key in ("role", "content"):
            if turn.get(key) is None:
                raise RowProblem(MISSING_FIELD, f"{col}[{i}] has no '{key}'")
            if not isinstance(turn[key], str):
                raise RowProblem(WRONG_TYPE, f"{col}[{i}].{key} must be a string, got {type_name(turn[key])}")
        out.append({"role": turn["role"], "content": turn["content"]})
    last = out[-1]
    if last["role"] != "assistant":
        raise RowProblem(BAD_MESSAGES, f"the last turn of '{col}' must be the response, with role 'assistant'; got role '{last['role']}'")
    if not last["content"].strip():
        raise RowProblem(EMPTY_RESPONSE, f"empty response: the final assistant turn of '{col}' is blank")
    return out


def prompt_response_messages(prompt: Any, response: Any, cfg: DataConfig) -> list[dict[str, str]]:
    """[system?] + user(prompt) + assistant(response), after checking both are strings (response non-blank)."""
    for col, v in ((cfg.prompt_column, prompt), (cfg.response_column, response)):
        if v is None:
            raise RowProblem(MISSING_FIELD, f"missing field '{col}'")
        if not isinstance(v, str):
            raise RowProblem(WRONG_TYPE, f"field '{col}' must be a string, got {type_name(v)}")
    if not response.strip():
        raise RowProblem(EMPTY_RESPONSE, f"empty response: field '{cfg.response_column}' is blank")
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else []
    return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _decide_mode(columns: set[str], cfg: DataConfig, description: str, what: str = "columns") -> str:
    if cfg.messages_column in columns:
        return MESSAGES
    if cfg.prompt_column in columns or cfg.response_column in columns:
        return PROMPT_RESPONSE
    found = ", ".join(sorted(columns)) or "none"
    raise DataError(
        f"{description} has neither a '{cfg.messages_column}' {what[:-1]} nor '{cfg.prompt_column}'/'{cfg.response_column}' "
        f"{what} ({what}: {found}). Set data.messages_column, or data.prompt_column and data.response_column, to your names."
    )


def _consumed(cfg: DataConfig, mode: str, id_column: str | None) -> set[str]:
    used = {cfg.messages_column} if mode == MESSAGES else {cfg.prompt_column, cfg.response_column}
    if id_column:
        used.add(id_column)
    return used


def _check_reserved(names: list[str], description: str) -> None:
    clash = [n for n in names if n in OUTPUT_COLUMNS or n.startswith(INTERNAL_PREFIX)]
    if clash:
        raise DataError(
            f"{description}: column '{clash[0]}' clashes with a column that prepare writes "
            f"({', '.join(OUTPUT_COLUMNS)}); rename it in the source (or set data.id_column to it if it is the document id)"
        )


class _Collector:
    """Good rows (as column lists) and bad rows, in source order."""

    def __init__(self) -> None:
        self.doc_ids: list[int] = []
        self.messages: list[list[dict[str, str]]] = []
        self.files: list[str] = []
        self.wheres: list[str] = []
        self.pos: list[int] = []
        self.bad: list[BadRow] = []

    def good(self, doc_id: int, msgs: list[dict[str, str]], file: str, where: str, pos: int) -> None:
        self.doc_ids.append(doc_id)
        self.messages.append(msgs)
        self.files.append(file)
        self.wheres.append(where)
        self.pos.append(pos)

    def columns(self) -> dict[str, pa.Array]:
        return {
            "doc_id": pa.array(self.doc_ids, type=pa.int64()),
            COL_MESSAGES: pa.array(self.messages, type=MESSAGE_TYPE),
            COL_FILE: pa.array(self.files, type=pa.string()),
            COL_WHERE: pa.array(self.wheres, type=pa.string()),
            COL_POS: pa.array(self.pos, type=pa.int64()),
        }


def _finish(table: pa.Table, id_column: str | None) -> pa.Table:
    return table.sort_by("doc_id") if id_column is not None and table.num_rows > 1 else table


# ------------------------------------------------------------------------------------------- JSONL


def _iter_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(1-based line, text, decode error or None) for every non-blank line.

    A line that is not valid UTF-8 comes with its text decoded with replacement characters, so its
    record in `rejected.jsonl` shows what the line held.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, raw.decode("utf-8", errors="replace").rstrip("\r\n"), f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
                continue
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if text.strip():
                yield lineno, text, None


def _is_json_array_file(path: Path) -> bool:
    """True when the whole file is one JSON array of rows (pretty-printed, or on one line), not JSON Lines.

    JSON Lines whose first row happens to be an array (`[1, 2]` then `{...}`) is not one: its rows
    are then diagnosed one by one ("expected a JSON object, got list").
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return False
    text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    try:
        whole = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    if not isinstance(whole, list):
        return False
    one_line = len([line for line in text.splitlines() if line.strip()]) == 1
    # a one-line array of non-objects is a single (bad) JSONL row; of objects, the rows of a JSON array file
    return not one_line or (len(whole) > 0 and all(isinstance(x, dict) for x in whole))


def _lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in a string (`"\ud800"` parses to one; it is not text), as an escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None


def value_problem(value: Any, raw: str | None = None) -> RowProblem | None:
    """What makes a parsed JSON row unusable although it parsed: a lone surrogate in a string or a key
    (not valid Unicode: Arrow, Parquet and the tokenizer reject it), or nesting deeper than `MAX_DEPTH`.

    `raw` (the line's text) allows a fast path: without a surrogate escape and with few brackets the
    value cannot have either problem. Iterative, so any depth that parsed is walked without recursion.
    """
    if raw is not None and _SURROGATE_ESCAPE.search(raw) is None and raw.count("[") + raw.count("{") <= MAX_DEPTH:
        return None
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        v, depth, where = stack.pop()
        if isinstance(v, str):
            bad = _lone_surrogate(v)
            if bad is not None:
                return RowProblem(
                    INVALID_TEXT,
                    f"field '{where}' holds the lone surrogate escape {bad} (half of a UTF-16 pair), which is not valid "
                    f"Unicode text: fix or remove the escape",
                )
            continue
        if isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                top = where.split(".")[0].split("[")[0]
                return RowProblem(
                    TOO_DEEP,
                    f"field '{top}' is nested more than {MAX_DEPTH} levels deep (objects and lists); flatten it or store it "
                    f"as a JSON string",
                )
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str) and _lone_surrogate(k) is not None:
                    return RowProblem(
                        INVALID_TEXT,
                        f"a key in '{where or 'the row'}' holds the lone surrogate escape {_lone_surrogate(k)}, which is not "
                        f"valid Unicode text: fix or remove the escape",
                    )
                child = (f"{where}.{k}" if where else str(k)) if isinstance(v, dict) else f"{where}[{k}]"
                stack.append((x, depth + 1, child))
    return None


def _read_jsonl(path: Path, cfg: DataConfig) -> Source:
    file = str(path)
    if _is_json_array_file(path):
        raise DataError(
            f"{path} holds a JSON array; data.path must be JSON Lines (one object per line). "
            f"Convert it, e.g.: jq -c '.[]' {path} > data.jsonl"
        )
    entries: list[tuple[int, str, Any]] = []  # (line, raw text, parsed object | RowProblem)
    for lineno, text, decode_error in _progress(_iter_lines(path), f"reading {path.name}", "lines"):
        if decode_error is not None:
            entries.append((lineno, text, RowProblem(INVALID_JSON, decode_error)))
            continue
        text = text.rstrip("\r\n")
        try:
            obj: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            obj = RowProblem(INVALID_JSON, f"not valid JSON: {exc.msg} at column {exc.colno}")
        except RecursionError:
            obj = RowProblem(TOO_DEEP, f"nested too deeply to parse (objects and lists); at most {MAX_DEPTH} levels are supported")
        else:
            if not isinstance(obj, dict):
                obj = RowProblem(NOT_AN_OBJECT, f"expected a JSON object, got {type_name(obj)}")
            else:
                obj = value_problem(obj, text) or obj
        entries.append((lineno, text, obj))
    if not entries:
        raise DataError(f"{path} has no rows")
    objects = [o for _, _, o in entries if isinstance(o, dict)]
    keys: dict[str, None] = {}
    for o in objects:
        keys.update(dict.fromkeys(o))
    mode = _decide_mode(set(keys), cfg, str(path), "fields") if objects else MESSAGES
    id_column = cfg.id_column if cfg.id_column in keys else None
    consumed = _consumed(cfg, mode, id_column)
    sidecar_names = [k for k in keys if k not in consumed]
    _check_reserved(sidecar_names, str(path))

    validator = _Validator(cfg, mode, id_column)
    col = _Collector()
    good_rows: list[dict[str, Any]] = []
    good_lines: list[int] = []
    for pos, (lineno, text, obj) in enumerate(entries):
        where = f"line {lineno}"
        if isinstance(obj, RowProblem):
            col.bad.append(BadRow(pos, file, where, obj.kind, obj.reason, doc_id=None if id_column else pos, row=text))
            continue
        try:
            doc_id, msgs = validator.check(pos, file, where, obj.get)
        except RowProblem as p:
            col.bad.append(BadRow(pos, file, where, p.kind, p.reason, doc_id=getattr(p, "doc_id", None), row=obj))
            continue
        col.good(doc_id, msgs, file, where, pos)
        good_rows.append(obj)
        good_lines.append(lineno)

    columns = col.columns()
    for name in sidecar_names:
        columns[name] = _sidecar_array(name, [r.get(name) for r in good_rows], good_lines, path)
        check_storable(name, columns[name], str(path), "field")
    table = _finish(pa.table(columns), id_column)
    return Source(str(path), "jsonl", mode, table, col.bad, len(entries), id_column, sidecar_names)


def _sidecar_array(name: str, values: list[Any], lines: list[int], path: Path) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as exc:
        first: tuple[int, str] | None = None
        for v, line in zip(values, lines):
            if v is None:
                continue
            if first is None:
                first = (line, type_name(v))
            elif type_name(v) != first[1]:
                raise DataError(
                    f"{path}: field '{name}' is {first[1]} at line {first[0]} but {type_name(v)} at line {line}; "
                    f"a column needs one type: make the values consistent or remove the field"
                ) from None
        raise DataError(f"{path}: field '{name}' cannot be stored as a column ({exc}); make its values consistent or remove the field") from None


def _has_empty_struct(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.num_fields == 0 or any(_has_empty_struct(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t):
        return _has_empty_struct(t.value_type)
    if pa.types.is_map(t):
        return _has_empty_struct(t.key_type) or _has_empty_struct(t.item_type)
    return False


def _type_depth(t: pa.DataType) -> int:
    if pa.types.is_struct(t):
        return 1 + max((_type_depth(t.field(i).type) for i in range(t.num_fields)), default=0)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_list_view(t):
        return 1 + _type_depth(t.value_type)
    if pa.types.is_map(t):
        return 1 + max(_type_depth(t.key_type), _type_depth(t.item_type))
    return 0


def check_storable(name: str, column: pa.Array | pa.ChunkedArray, description: str, what: str = "column") -> None:
    """Fail now, with the column's name, if a sidecar cannot go through Ray and into `data/*.parquet`
    (rather than after the tokenisation, at the final write)."""
    t = column.type
    if _has_empty_struct(t):
        raise DataError(
            f"{description}: {what} '{name}' holds objects with no keys ({{}}) in every row that has them (type {t}); "
            f"Parquet cannot store an object with no fields. Remove the {what}, give those objects a key, or store it as a JSON string"
        )
    if _type_depth(t) > MAX_DEPTH:
        raise DataError(
            f"{description}: {what} '{name}' is nested {_type_depth(t)} levels deep; at most {MAX_DEPTH} are supported. "
            f"Flatten it, store it as a JSON string, or remove it"
        )
    try:
        pq.write_table(pa.table({name: column.slice(0, 16)}), io.BytesIO())
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{description}: {what} '{name}' cannot be stored in Parquet ({type(exc).__name__}: {exc}); remove it or "
            f"convert it to a plain type"
        ) from None


# ----------------------------------------------------------------------------------- Arrow sources


@dataclass
class _ArrowPart:
    file: str
    schema: pa.Schema
    batches: Callable[[], Iterator[pa.RecordBatch]]


def _read_arrow_parts(parts: list[_ArrowPart], description: str, fmt: str, cfg: DataConfig) -> Source:
    names: dict[str, None] = {}
    for part in parts:
        dupes = [n for n, c in Counter(part.schema.names).items() if c > 1]
        if dupes:
            raise DataError(
                f"{part.file} has {Counter(part.schema.names)[dupes[0]]} columns named '{dupes[0]}'; a column must be found by "
                f"its name: rename or drop the copies (e.g. pyarrow: table.rename_columns([...]))"
            )
        names.update(dict.fromkeys(part.schema.names))
    mode = _decide_mode(set(names), cfg, description)
    id_column = cfg.id_column if cfg.id_column in names else None
    consumed = _consumed(cfg, mode, id_column)
    sidecar_names = [n for n in names if n not in consumed]
    _check_reserved(sidecar_names, description)
    needed = sorted(consumed)
    types = {n: next(p.schema.field(n).type for p in parts if n in p.schema.names) for n in sidecar_names}

    validator = _Validator(cfg, mode, id_column)
    col = _Collector()
    tables: list[pa.Table] = []
    pos = 0
    for part in parts:
        row_index = 0
        part_sidecars = [n for n in sidecar_names if n in part.schema.names]
        for batch in _progress(_guarded(part), f"reading {Path(part.file).name}", "batches"):
            values = {c: _column_values(batch.column(c)) for c in needed if c in batch.schema.names}
            keep: list[int] = []
            for i in range(batch.num_rows):
                where = f"row index {row_index + i}"

                def get(name: str, i: int = i) -> Any:
                    v = values.get(name)
                    if v is not None and isinstance(v[i], _NotUtf8):
                        raise RowProblem(INVALID_TEXT, f"column '{name}' holds bytes that are not valid UTF-8 text ({v[i].reason})")
                    return None if v is None else v[i]

                try:
                    doc_id, msgs = validator.check(pos, part.file, where, get)
                except RowProblem as p:
                    row = _row_as_py(batch, i)
                    col.bad.append(BadRow(pos, part.file, where, p.kind, p.reason, doc_id=getattr(p, "doc_id", None), row=row))
                else:
                    col.good(doc_id, msgs, part.file, where, pos)
                    keep.append(i)
                pos += 1
            row_index += batch.num_rows
            if keep and sidecar_names:
                idx = pa.array(keep, type=pa.int64())
                tables.append(
                    pa.table(
                        {  # a column this file lacks: nulls of the other files' type
                            n: batch.column(n).take(idx) if n in part_sidecars else pa.nulls(len(keep), type=types[n])
                            for n in sidecar_names
                        }
                    )
                )
    base = pa.table(col.columns())
    if sidecar_names:
        try:
            side = pa.concat_tables(tables, promote_options="default") if tables else pa.schema([(n, types[n]) for n in sidecar_names]).empty_table()
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"the files of {description} disagree on column types ({exc}); give every file the same schema") from None
        for name in sidecar_names:
            check_storable(name, side.column(name), description)
            base = base.append_column(name, side.column(name))
    table = _finish(base, id_column)
    return Source(description, fmt, mode, table, col.bad, pos, id_column, sidecar_names)


@dataclass
class _NotUtf8:
    """A cell whose string bytes are not valid UTF-8 (Arrow stores them; Python cannot decode them)."""

    reason: str


def _column_values(column: pa.Array) -> list[Any]:
    """`column.to_pylist()`, except that a cell with invalid UTF-8 becomes `_NotUtf8` instead of failing the whole column."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        out: list[Any] = []
        for k in range(len(column)):
            try:
                out.append(column[k].as_py())
            except UnicodeDecodeError as exc:
                out.append(_NotUtf8(f"{exc.reason} at byte {exc.start}"))
        return out


def _row_as_py(batch: pa.RecordBatch, i: int) -> dict[str, Any]:
    """Row `i` as a dict for `rejected.jsonl`; a string with invalid UTF-8 is shown decoded with replacement characters."""
    row: dict[str, Any] = {}
    for name, column in zip(batch.schema.names, batch.columns):
        cell = column[i]
        try:
            row[name] = cell.as_py()
        except UnicodeDecodeError:
            raw = cell.cast(pa.binary()).as_py() if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else None
            row[name] = raw.decode("utf-8", errors="replace") if raw is not None else "<not valid UTF-8>"
    return row


def _guarded(part: _ArrowPart) -> Iterator[pa.RecordBatch]:
    """The part's batches; a file damaged halfway is a `DataError`, not a traceback."""
    it = part.batches()
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{part.file} could not be read ({type(exc).__name__}: {exc})") from None
        yield batch


def _read_parquet(path: Path, cfg: DataConfig) -> Source:
    files = [path] if path.is_file() else _parquet_files(path)
    if not files:
        raise DataError(f"{path} has no .parquet files")
    parts = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as exc:  # pyarrow raises several types for a damaged or non-Parquet file
            raise DataError(f"{f} is not a readable Parquet file ({exc})") from None
        parts.append(_ArrowPart(str(f), pf.schema_arrow, lambda pf=pf: pf.iter_batches(batch_size=_ARROW_BATCH)))
    source = _read_arrow_parts(parts, str(path), "parquet", cfg)
    if source.n_rows == 0:
        raise DataError(f"{path} has no rows")
    return source


def _read_hf_disk(path: Path, cfg: DataConfig) -> Source:
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError / ValueError / arrow errors for damaged folders
        raise DataError(f"{path} could not be read as a datasets.save_to_disk folder ({type(exc).__name__}: {exc})") from None
    description = str(path)
    if isinstance(obj, datasets.DatasetDict):
        splits = list(obj.keys())
        split = cfg.split
        if split is None:
            split = splits[0] if len(splits) == 1 else ("train" if "train" in splits else None)
        if split is None or split not in obj:
            raise DataError(f"{path} is a DatasetDict with splits {', '.join(splits)}; set data.split to the one to prepare")
        obj = obj[split]
        description = f"{path} (split {split})"
    table: pa.Table = obj.with_format("arrow")[:] if len(obj) else obj.data.table.slice(0, 0)
    part = _ArrowPart(description, table.schema, lambda: iter(table.to_batches(max_chunksize=_ARROW_BATCH)))
    source = _read_arrow_parts([part], description, "hf_disk", cfg)
    if source.n_rows == 0:
        raise DataError(f"{description} has no rows")
    return source


def _progress(it: Any, desc: str, unit: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; without it, no bar
        return it
    return tqdm(it, desc=desc, unit=unit, disable=None, leave=False)
