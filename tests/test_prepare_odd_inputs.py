"""Odd inputs a new user feeds prepare: each is a bad row with its file, line and reason, or one clear error.

Lone surrogate escapes, deep nesting, empty-object sidecars, duplicate Parquet columns, invalid UTF-8,
JSON arrays, special-token text in content, the share of rejected rows, config ranges. The pure readers
and tokeniser are tested without Ray; the last tests run the stage (and the CLI) through Ray.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare_helpers import TEMPLATE_SYSTEM, make_tokenizer, save_tokenizer
from typer.testing import CliRunner

from ga_ray.config import DataConfig, RunConfig, load_config
from ga_ray.data.errors import BadRow, format_too_many_rejected, too_many_rejected
from ga_ray.data.readers import MAX_DEPTH, read_source, value_problem
from ga_ray.data.tokenize import encode_conversation, render, special_token_texts
from ga_ray.errors import ConfigError, DataError, GaRayError


def chat(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def good_lines(n: int) -> list[str]:
    return [json.dumps({"messages": chat(f"q{i}", f"answer {i}")}) for i in range(n)]


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def bad_of(source) -> list[tuple[str, str, str]]:
    return [(b.where, b.kind, b.reason) for b in source.bad]


def nested(depth: int) -> str:
    """A JSON value of `depth` nested lists."""
    return "[" * depth + "]" * depth


def depth_reference(v) -> int:
    """Nesting of objects and lists, recursively (the slow, obvious definition)."""
    if isinstance(v, dict):
        return 1 + max((depth_reference(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((depth_reference(x) for x in v), default=0)
    return 0


# -------------------------------------------------------------------- lone surrogates, deep nesting


def test_lone_surrogate_in_content_sidecar_or_key_is_a_bad_row(tmp_path):
    rows = good_lines(3) + [
        '{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "note": "x\\udfff"}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "m": {"\\ud801": 1}}',
        '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "a"}]}',  # a valid pair
    ]
    p = write_lines(tmp_path / "d.jsonl", rows)
    s = read_source(DataConfig(path=str(p)))
    assert bad_of(s) == [
        ("line 4", "invalid_text", "field 'messages[0].content' holds the lone surrogate escape \\ud800 (half of a UTF-16 pair), which is not valid Unicode text: fix or remove the escape"),
        ("line 5", "invalid_text", "field 'note' holds the lone surrogate escape \\udfff (half of a UTF-16 pair), which is not valid Unicode text: fix or remove the escape"),
        ("line 6", "invalid_text", "a key in 'm' holds the lone surrogate escape \\ud801, which is not valid Unicode text: fix or remove the escape"),
    ]
    assert s.table.column("doc_id").to_pylist() == [0, 1, 2, 6]
    assert s.table.column("__ga_messages").to_pylist()[-1][0]["content"] == "\U0001f600"
    # the rejected record keeps the line as written (JSON-serialisable: no surrogate reaches the file)
    rec = s.bad[0].record()
    assert rec["text"] == rows[3] and json.loads(json.dumps(rec))["line"] == 4
    assert s.table.num_rows + len(s.bad) == s.n_rows == 7


def test_deep_nesting_is_a_bad_row_at_every_depth(tmp_path):
    head = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": '
    rows = good_lines(2) + [head + nested(1000) + "}", head + nested(300) + "}", head + nested(MAX_DEPTH) + "}", head + nested(MAX_DEPTH - 1) + "}"]
    p = write_lines(tmp_path / "d.jsonl", rows)
    s = read_source(DataConfig(path=str(p)))
    assert [(w, k) for w, k, _ in bad_of(s)] == [("line 3", "too_deep"), ("line 4", "too_deep"), ("line 5", "too_deep")]
    assert s.bad[0].reason == f"nested too deeply to parse (objects and lists); at most {MAX_DEPTH} levels are supported"
    assert s.bad[1].reason == f"field 'x' is nested more than {MAX_DEPTH} levels deep (objects and lists); flatten it or store it as a JSON string"
    assert s.bad[1].record()["text"] == rows[3]
    # the deepest allowed row is kept; the whole row (object + x) is MAX_DEPTH levels
    kept = json.loads(rows[-1])
    assert depth_reference(kept) == MAX_DEPTH and s.table.column("doc_id").to_pylist() == [0, 1, 5]


@pytest.mark.parametrize("seed", range(5))
def test_value_problem_matches_the_recursive_depth_reference(seed):
    rng = np.random.default_rng(seed)

    def build(d: int):
        if d == 0:
            return int(rng.integers(10))
        kids = [build(d - 1)] + [build(int(rng.integers(min(d, 3)))) for _ in range(int(rng.integers(3)))]  # one deep spine
        return {f"k{i}": k for i, k in enumerate(kids)} if rng.random() < 0.5 else kids

    for depth in range(MAX_DEPTH - 3, MAX_DEPTH + 4):
        value = {"x": build(depth - 1)}
        problem = value_problem(value, json.dumps(value))
        assert (problem is not None) == (depth_reference(value) > MAX_DEPTH), depth
        assert value_problem(value) is None or problem is not None  # without the raw text: the same walk


# ---------------------------------------------------------------------------- sidecars, Parquet


def test_empty_object_sidecar_fails_before_any_work(tmp_path):
    rows = [json.dumps({"messages": chat("q", "a"), "meta": {}}) for _ in range(3)]
    p = write_lines(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_source(DataConfig(path=str(p)))
    assert str(err.value) == (
        f"{p}: field 'meta' holds objects with no keys ({{}}) in every row that has them (type struct<>); Parquet cannot "
        "store an object with no fields. Remove the field, give those objects a key, or store it as a JSON string"
    )
    nested_empty = write_lines(tmp_path / "n.jsonl", [json.dumps({"messages": chat("q", "a"), "tags": [{}]})])
    with pytest.raises(DataError, match="field 'tags' holds objects with no keys"):
        read_source(DataConfig(path=str(nested_empty)))
    # an empty object beside ones with keys is just a row without those keys
    mixed = write_lines(tmp_path / "m.jsonl", [json.dumps({"messages": chat("q", "a"), "meta": m}) for m in ({}, {"a": 1})])
    s = read_source(DataConfig(path=str(mixed)))
    assert s.table.column("meta").to_pylist() == [{"a": None}, {"a": 1}]


def test_parquet_with_two_columns_of_one_name(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table([pa.array(["q"]), pa.array(["a"]), pa.array([1])], names=["prompt", "response", "prompt"]), f)
    with pytest.raises(DataError) as err:
        read_source(DataConfig(path=str(f)))
    assert str(err.value) == (
        f"{f} has 2 columns named 'prompt'; a column must be found by its name: rename or drop the copies "
        "(e.g. pyarrow: table.rename_columns([...]))"
    )


def test_parquet_string_with_invalid_utf8_is_a_bad_row(tmp_path):
    offsets = pa.py_buffer(np.array([0, 3, 5], dtype=np.int32).tobytes())
    prompts = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"q\xff\xfeok")])
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": prompts, "response": ["a", "b"]}), f)
    s = read_source(DataConfig(path=str(f)))
    assert bad_of(s) == [("row index 0", "invalid_text", "column 'prompt' holds bytes that are not valid UTF-8 text (invalid start byte at byte 1)")]
    assert s.bad[0].record()["row"] == {"prompt": "q\ufffd\ufffd", "response": "a"}
    assert s.table.column("doc_id").to_pylist() == [1]


def test_invalid_utf8_line_keeps_its_replaced_text_in_the_record(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", good_lines(2) + [b'{"messages": "caf\xe9"}'])
    s = read_source(DataConfig(path=str(p)))
    assert bad_of(s) == [("line 3", "invalid_json", "not valid UTF-8 (invalid continuation byte at byte 17)")]
    assert s.bad[0].record()["text"] == '{"messages": "caf\ufffd"}'


# ------------------------------------------------------------------------------------ JSON arrays


def test_first_line_array_is_a_jsonl_row_not_a_json_array_file(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", ["[1, 2, 3]"] + good_lines(3))
    s = read_source(DataConfig(path=str(p)))
    assert bad_of(s) == [("line 1", "not_an_object", "expected a JSON object, got list")]
    assert s.table.num_rows == 3
    one_line_numbers = write_lines(tmp_path / "n.jsonl", ["[1, 2]"])
    assert bad_of(read_source(DataConfig(path=str(one_line_numbers)))) == [("line 1", "not_an_object", "expected a JSON object, got list")]


@pytest.mark.parametrize("indent", [None, 1])
def test_a_json_array_file_is_diagnosed_with_the_jq_fix(tmp_path, indent):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps([{"messages": chat("q", "a")}] * 2, indent=indent) + "\n")
    with pytest.raises(DataError) as err:
        read_source(DataConfig(path=str(p)))
    assert str(err.value) == f"{p} holds a JSON array; data.path must be JSON Lines (one object per line). Convert it, e.g.: jq -c '.[]' {p} > data.jsonl"


# --------------------------------------------------------------------------- special-token text


def test_special_token_text_is_counted_kept_escaped_or_rejected():
    tok = make_tokenizer(TEMPLATE_SYSTEM)
    assert set(special_token_texts(tok)) == {"<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    msgs = chat("type <|end|> here", "ok <|assistant|> done</s>")
    end_id = tok.convert_tokens_to_ids("<|end|>")
    keep = encode_conversation(tok, msgs, 200)
    assert keep.special_text == ("<|end|>", "<|assistant|>", "</s>")
    assert keep.input_ids.count(end_id) == 3  # two turns' markers + the typed one
    esc = encode_conversation(tok, msgs, 200, special_text="escape")
    assert esc.special_text == keep.special_text
    assert esc.input_ids.count(end_id) == 2  # only the template's own markers are control tokens
    assert tok.decode(esc.input_ids) == render(tok, msgs, add_generation_prompt=False)  # same text, as plain text
    plain_end = tok("<|end|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(plain_end) > 1 and end_id not in plain_end
    ids = esc.input_ids
    assert any(ids[i : i + len(plain_end)] == plain_end for i in range(len(ids)))
    # the mask still covers exactly the response: its tokens decode to the assistant turn and the end marker
    response = [t for t, m in zip(esc.input_ids, esc.loss_mask) if m]
    assert tok.decode(response) == "ok <|assistant|> done</s><|end|>"
    # no special-token text: escape changes nothing
    plain = chat("hello", "world")
    assert encode_conversation(tok, plain, 200, "escape") == encode_conversation(tok, plain, 200)
    with pytest.raises(Exception) as err:
        encode_conversation(tok, msgs, 200, special_text="reject")
    assert getattr(err.value, "kind", None) == "special_token_text"
    assert "'<|end|>' x1, '<|assistant|>' x1, '</s>' x1" in str(err.value)


# ------------------------------------------------------------------------- share of rejected rows


def test_too_many_rejected_message_counts_the_reasons():
    bad = [BadRow(i, "f.jsonl", f"line {i + 1}", "invalid_json" if i % 3 else "missing_field", "r") for i in range(9)]
    assert not too_many_rejected(5, 100, 0.05) and too_many_rejected(6, 100, 0.05) and not too_many_rejected(100, 100, 1.0)
    text = format_too_many_rejected(bad, 30, 0.05, "f.jsonl")
    lines = text.splitlines()
    assert lines[0] == "9 of 30 rows of f.jsonl are bad (30.0%), more than data.max_rejected_share = 0.05 (5.0%) allows; by reason: invalid_json 6, missing_field 3"
    assert lines[1] == "  f.jsonl line 1: r" and lines[6] == "  ... and 4 more"
    assert "raise data.max_rejected_share" in lines[-1]


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("data.max_length=1", "data.max_length"),
        ("data.num_blocks=0", "data.num_blocks"),
        ("data.max_rejected_share=1.5", "data.max_rejected_share"),
        ("data.max_rejected_share=-0.1", "data.max_rejected_share"),
        ("data.special_token_text=strip", "data.special_token_text"),
        ("data.messages_column=''", "data.messages_column"),
    ],
)
def test_data_ranges_are_config_errors_at_load(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"  {key}: " in str(err.value)


# ------------------------------------------------------------------------------- through Ray


def _cfg(src: Path, tok: Path, **data) -> RunConfig:
    return RunConfig.model_validate({"data": {"path": str(src), **data}, "model": {"tokenizer": str(tok)}})


@pytest.mark.slow
def test_stage_skips_odd_rows_and_counts_special_text(ray_session, tmp_path):
    from ga_ray.data.io import read_prepare_report, read_prepared
    from ga_ray.pipeline import run_pipeline
    from ga_ray.rundir import RunDir

    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_SYSTEM)
    deep_ok = json.loads(nested(MAX_DEPTH - 1))  # the deepest sidecar a row may have travels through Ray
    lines = [json.dumps({"messages": chat(f"q{i}", f"answer {i}"), "x": deep_ok}) for i in range(100)]
    lines[10] = json.dumps({"messages": chat("say <|end|> now", "ok"), "x": deep_ok})
    lines += [
        '{"messages": [{"role": "user", "content": "q\\ud800"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": ' + nested(300) + "}",
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "x": ' + nested(1000) + "}",
    ]
    src = write_lines(tmp_path / "d.jsonl", [line.encode() for line in lines] + [b'{"messages": "caf\xe9"}'])
    run = RunDir(tmp_path / "run")
    summary = run_pipeline(_cfg(src, tok_dir, skip_bad_rows=True, num_blocks=2), run, stages=["prepare"])["prepare"]
    data = run.stage_dir("data")
    report = read_prepare_report(data)
    assert (report["rows_read"], report["documents"], report["rejected"]) == (104, 100, 4)  # 4/104 < 5%
    assert report["rejected_by_reason"] == {"invalid_json": 1, "invalid_text": 1, "too_deep": 2}
    assert report["special_token_text"] == {"handling": "keep", "documents": 1, "occurrences": {"<|end|>": 1}}
    assert "1 document spells special tokens in its text (<|end|> x1): kept as control tokens" in summary["line"]
    table = read_prepared(data)
    assert table.column("x").to_pylist()[0] == deep_ok
    rejected = [json.loads(x) for x in (data / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [101, 102, 103, 104]
    assert rejected[-1]["text"] == '{"messages": "caf\ufffd"}'


@pytest.mark.slow
def test_stage_stops_above_the_rejected_share_even_when_skipping(ray_session, tmp_path):
    from ga_ray.pipeline import run_pipeline
    from ga_ray.rundir import RunDir

    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_SYSTEM)
    # 2 bad JSON lines (3%: under the share) + 3 prompts too long for max_length (found by the Ray tokeniser): 5 of 60
    lines = good_lines(55) + ["{oops"] * 2 + [json.dumps({"messages": chat("word " * 80, "a")})] * 3
    src = write_lines(tmp_path / "d.jsonl", lines)
    run = RunDir(tmp_path / "run")
    with pytest.raises(DataError) as err:
        run_pipeline(_cfg(src, tok_dir, skip_bad_rows=True, max_length=40), run, stages=["prepare"])
    first = str(err.value).splitlines()[0]
    assert first == (
        f"5 of 60 rows of {src} are bad (8.3%), more than data.max_rejected_share = 0.05 (5.0%) allows; "
        "by reason: no_response_after_truncation 3, invalid_json 2"
    )
    assert not list(run.stage_dir("data").glob("*.parquet"))
    # above the share already while reading: stops before the Ray work, with the same kind of message
    many = write_lines(tmp_path / "m.jsonl", good_lines(5) + ["{oops"] * 95)
    with pytest.raises(DataError, match=r"^95 of 100 rows of .* are bad \(95\.0%\).*by reason: invalid_json 95"):
        run_pipeline(_cfg(many, tok_dir, skip_bad_rows=True), run, stages=["prepare"])
    # with a higher limit the same source prepares
    summary = run_pipeline(_cfg(src, tok_dir, skip_bad_rows=True, max_length=40, max_rejected_share=0.1), run, stages=["prepare"])
    assert summary["prepare"]["documents"] == 55


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.slow
def test_cli_skip_bad_rows_is_for_one_run_only(ray_session, tmp_path):
    from ga_ray.cli import app

    runner = CliRunner()
    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_SYSTEM)
    src = write_lines(tmp_path / "d.jsonl", good_lines(30) + ["{oops"])  # 1 of 31 bad: 3%
    run = tmp_path / "run"
    sets = ["--set", f"data.path={src}", "--set", f"model.tokenizer={tok_dir}"]
    out = runner.invoke(app, ["prepare", "-r", str(run), *sets, "--skip-bad-rows"])
    assert out.exit_code == 0, out.output
    assert "--skip-bad-rows: this run only (RUN_DIR/config.yaml keeps data.skip_bad_rows: false)" in out.output
    assert load_config(run / "config.yaml").data.skip_bad_rows is False
    assert json.loads((run / "data" / "prepare.json").read_text())["skip_bad_rows"] is True
    # a later prepare without the flag does not skip: it stops on the bad row, one line per problem, exit 2
    out = runner.invoke(app, ["prepare", "-r", str(run)])
    text = _plain(out.output)
    assert out.exit_code == 2 and "Traceback" not in text
    assert f"error: 1 bad row in {src}:" in text and f"{src} line 31: not valid JSON" in text
    # a sidecar of {} in every row: one red line before any work
    empty = write_lines(tmp_path / "e.jsonl", [json.dumps({"messages": chat("q", "a"), "meta": {}})] * 2)
    out = runner.invoke(app, ["prepare", "-r", str(tmp_path / "run2"), "--set", f"data.path={empty}", "--set", f"model.tokenizer={tok_dir}"])
    assert out.exit_code == 2 and "field 'meta' holds objects with no keys" in _plain(out.output)
    out = runner.invoke(app, ["prepare", "-r", str(tmp_path / "run3"), *sets, "--set", "data.batch_size=0"])
    assert out.exit_code == 2 and "data.batch_size: Input should be greater than or equal to 1" in _plain(out.output)
    assert isinstance(DataError("x"), GaRayError)


def test_tokenize_table_carries_the_special_text_of_kept_and_rejected_rows():
    from ga_ray.data.tokenize import COL_KIND, COL_SPECIAL, tokenize_table

    tok = make_tokenizer(TEMPLATE_SYSTEM)
    cfg = DataConfig()
    rows = [chat("plain", "text"), chat("a <|end|>", "b </s>"), [{"role": "system", "content": "<s>"}] + chat("q", "")]
    table = pa.table({"doc_id": pa.array([0, 1, 2], pa.int64()), "__ga_messages": pa.array(rows, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))})
    for mode, kinds in (("keep", [None, None, None]), ("reject", [None, "special_token_text", "special_token_text"])):
        out = tokenize_table(tok, table, 64, mode)
        assert out.column(COL_SPECIAL).to_pylist() == [[], ["<|end|>", "</s>"], ["<s>"]]
        assert out.column(COL_KIND).to_pylist() == kinds
    assert cfg.special_token_text == "keep"


def test_parquet_sidecar_nested_too_deep_is_one_error(tmp_path):
    deep = json.loads(nested(MAX_DEPTH + 3))
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "response": ["a"], "x": pa.array([deep])}), f)
    with pytest.raises(DataError) as err:
        read_source(DataConfig(path=str(f)))
    assert str(err.value) == (
        f"{f}: column 'x' is nested {MAX_DEPTH + 3} levels deep; at most {MAX_DEPTH} are supported. "
        "Flatten it, store it as a JSON string, or remove it"
    )
