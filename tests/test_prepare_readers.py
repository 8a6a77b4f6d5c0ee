"""Every input format, doc ids, sidecars, and every bad-input case with its exact message (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ga_ray.config import DataConfig
from ga_ray.data.errors import MAX_SHOWN, SKIP_HINT, format_bad_rows
from ga_ray.data.readers import read_source
from ga_ray.errors import DataError, GaRayError


def chat(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def messages_of(source) -> list:
    return source.table.column("__ga_messages").to_pylist()


# ------------------------------------------------------------------------------------------ formats


def test_jsonl_messages_positional_ids_and_sidecars(tmp_path):
    multi = [{"role": "system", "content": "Be brief."}] + chat("a", "b") + chat("c", "d")
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": chat("q0", "r0"), "task": "qa", "meta": {"k": 1}},
            "",  # blank lines are not rows
            {"messages": multi, "task": "edit", "meta": {"k": 2}, "score": 0.5},
            {"messages": chat("q2", "r2"), "task": "qa", "meta": {"k": 3}},
        ],
    )
    s = read_source(DataConfig(path=str(p)))
    assert (s.format, s.mode, s.n_rows, s.id_column, s.bad) == ("jsonl", "messages", 3, None, [])
    assert s.table.column("doc_id").to_pylist() == [0, 1, 2]
    assert messages_of(s) == [chat("q0", "r0"), multi, chat("q2", "r2")]
    assert s.sidecars == ["task", "meta", "score"]
    assert s.table.column("task").to_pylist() == ["qa", "edit", "qa"]
    assert s.table.column("meta").to_pylist() == [{"k": 1}, {"k": 2}, {"k": 3}]
    assert s.table.column("score").to_pylist() == [None, 0.5, None]
    assert s.table.column("__ga_where").to_pylist() == ["line 1", "line 3", "line 4"]


def test_jsonl_prompt_response_with_system_prompt_and_id_column(tmp_path):
    p = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": 30, "instruction": "p30", "output": "r30", "task": "x"},
            {"id": 10, "instruction": "p10", "output": "r10", "task": "y"},
            {"id": 20, "instruction": "p20", "output": "r20", "task": "z"},
        ],
    )
    cfg = DataConfig(path=str(p), prompt_column="instruction", response_column="output", system_prompt="You help.")
    s = read_source(cfg)
    assert (s.mode, s.id_column, s.sidecars) == ("prompt_response", "id", ["task"])
    assert s.table.column("doc_id").to_pylist() == [10, 20, 30]  # doc_id order
    assert s.table.column("task").to_pylist() == ["y", "z", "x"]
    assert messages_of(s)[0] == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "p10"},
        {"role": "assistant", "content": "r10"},
    ]
    assert s.table.column("__ga_where").to_pylist() == ["line 2", "line 3", "line 1"]


def test_parquet_file_messages_keeps_sidecar_types(tmp_path):
    msg_type = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    t = pa.table(
        {
            "conversation": pa.array([chat("q0", "r0"), chat("q1", "r1")], type=msg_type),
            "id": pa.array([7, 3], type=pa.int32()),
            "label": pa.array([1, 2], type=pa.int16()),
            "tags": pa.array([["a"], []], type=pa.list_(pa.string())),
        }
    )
    pq.write_table(t, tmp_path / "d.parquet")
    s = read_source(DataConfig(path=str(tmp_path / "d.parquet"), messages_column="conversation"))
    assert (s.format, s.mode, s.id_column, s.bad) == ("parquet", "messages", "id", [])
    assert s.table.column("doc_id").to_pylist() == [3, 7]
    assert s.table.schema.field("label").type == pa.int16()
    assert s.table.schema.field("tags").type == pa.list_(pa.string())
    assert s.table.column("tags").to_pylist() == [[], ["a"]]
    assert messages_of(s) == [chat("q1", "r1"), chat("q0", "r0")]


def test_parquet_folder_positions_run_across_files_in_name_order(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["p0", "p1"], "response": ["r0", "r1"], "task": ["a", "b"]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"prompt": ["p2"], "response": ["r2"]}), folder / "part-1.parquet")
    pq.write_table(pa.table({"prompt": ["ignored"], "response": ["x"]}), folder / "_hidden.parquet")
    s = read_source(DataConfig(path=str(folder)))
    assert (s.format, s.mode, s.n_rows) == ("parquet", "prompt_response", 3)
    assert s.table.column("doc_id").to_pylist() == [0, 1, 2]
    assert s.table.column("task").to_pylist() == ["a", "b", None]
    assert s.table.column("__ga_file").to_pylist() == [str(folder / "part-0.parquet")] * 2 + [str(folder / "part-1.parquet")]
    assert s.table.column("__ga_where").to_pylist() == ["row index 0", "row index 1", "row index 0"]


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"messages": [chat(f"q{i}", f"r{i}") for i in range(3)], "task": ["a", "b", "c"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    s = read_source(DataConfig(path=str(tmp_path / "hf")))
    assert (s.format, s.mode, s.n_rows, s.sidecars) == ("hf_disk", "messages", 3, ["task"])
    assert s.table.column("doc_id").to_pylist() == [0, 1, 2]
    assert messages_of(s)[2] == chat("q2", "r2")
    assert s.table.column("task").to_pylist() == ["a", "b", "c"]

    pr = datasets.Dataset.from_dict({"prompt": ["p", "q"], "response": ["r", "s"], "id": [5, 6]})
    datasets.DatasetDict({"train": pr, "test": pr.select([1])}).save_to_disk(str(tmp_path / "dd"))
    s = read_source(DataConfig(path=str(tmp_path / "dd")))  # `train` by default
    assert (s.description, s.table.column("doc_id").to_pylist()) == (f"{tmp_path / 'dd'} (split train)", [5, 6])
    s = read_source(DataConfig(path=str(tmp_path / "dd"), split="test"))
    assert s.table.column("doc_id").to_pylist() == [6]

    datasets.DatasetDict({"a": pr, "b": pr}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(DataError) as err:
        read_source(DataConfig(path=str(tmp_path / "ab")))
    assert str(err.value) == f"{tmp_path / 'ab'} is a DatasetDict with splits a, b; set data.split to the one to prepare"


def test_hf_rows_are_located_by_dataset_index(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "response": ["r0", "", "r2"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    s = read_source(DataConfig(path=str(tmp_path / "hf")))
    assert [b.describe() for b in s.bad] == [f"{tmp_path / 'hf'} row index 1: empty response: field 'response' is blank"]
    assert s.table.column("doc_id").to_pylist() == [0, 2]


# ---------------------------------------------------------------------------------------- bad rows

MSG = "messages"
BAD_JSONL_CASES = [
    ('{"messages": [', "invalid_json", "not valid JSON: Expecting value at column 15"),
    ("[1, 2]", "not_an_object", "expected a JSON object, got list"),
    ({"task": "x"}, "missing_field", "missing field 'messages'"),
    ({"messages": None}, "missing_field", "missing field 'messages'"),
    ({"messages": "hello"}, "bad_messages", "field 'messages' must be a list of {role, content} turns, got str"),
    ({"messages": []}, "bad_messages", "field 'messages' has no turns"),
    ({"messages": ["hi"]}, "bad_messages", "messages[0] must be an object with 'role' and 'content', got str"),
    ({"messages": [{"role": "user"}]}, "missing_field", "messages[0] has no 'content'"),
    ({"messages": [{"content": "x"}]}, "missing_field", "messages[0] has no 'role'"),
    ({"messages": [{"role": "user", "content": 5}]}, "wrong_type", "messages[0].content must be a string, got int"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
        "wrong_type",
        "messages[1].content must be a string, got list",
    ),
    ({"messages": [{"role": 1, "content": "q"}]}, "wrong_type", "messages[0].role must be a string, got int"),
    ({"messages": chat("q", "a")[:1]}, "bad_messages", "the last turn of 'messages' must be the response, with role 'assistant'; got role 'user'"),
    ({"messages": chat("q", " \n")}, "empty_response", "empty response: the final assistant turn of 'messages' is blank"),
]


@pytest.mark.parametrize("row,kind,reason", BAD_JSONL_CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(BAD_JSONL_CASES)])
def test_bad_jsonl_row_is_named_by_file_and_line(tmp_path, row, kind, reason):
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat("q", "a")}, "", row, {"messages": chat("q", "a")}])
    s = read_source(DataConfig(path=str(p)))
    assert len(s.bad) == 1
    b = s.bad[0]
    assert (b.kind, b.reason, b.where, b.pos, b.doc_id) == (kind, reason, "line 3", 1, 1)
    assert b.describe() == f"{p} line 3: {reason}"
    assert s.table.column("doc_id").to_pylist() == [0, 2]  # positions are not shifted by the bad row


BAD_PROMPT_RESPONSE_CASES = [
    ({"id": 3, "response": "a"}, "missing_field", "missing field 'prompt'"),
    ({"id": 3, "prompt": "q"}, "missing_field", "missing field 'response'"),
    ({"id": 3, "prompt": ["q"], "response": "a"}, "wrong_type", "field 'prompt' must be a string, got list"),
    ({"id": 3, "prompt": "q", "response": 3.5}, "wrong_type", "field 'response' must be a string, got float"),
    ({"id": 3, "prompt": "q", "response": ""}, "empty_response", "empty response: field 'response' is blank"),
    ({"prompt": "q", "response": "a", "id": "x7"}, "bad_id", "field 'id' must be an integer document id, got str 'x7'"),
    ({"prompt": "q", "response": "a", "id": True}, "bad_id", "field 'id' must be an integer document id, got bool True"),
    ({"prompt": "q", "response": "a", "id": 1.0}, "bad_id", "field 'id' must be an integer document id, got float 1.0"),
    ({"prompt": "q", "response": "a"}, "missing_field", "missing field 'id' (the document id)"),
    ({"prompt": "q", "response": "a", "id": 1}, "duplicate_id", "duplicate id 1 (also at line 1)"),
]


@pytest.mark.parametrize("row,kind,reason", BAD_PROMPT_RESPONSE_CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(BAD_PROMPT_RESPONSE_CASES)])
def test_bad_prompt_response_row(tmp_path, row, kind, reason):
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "prompt": "q", "response": "a"}, row, {"id": 2, "prompt": "q", "response": "a"}])
    s = read_source(DataConfig(path=str(p)))
    assert [(b.kind, b.reason, b.where) for b in s.bad] == [(kind, reason, "line 2")]
    assert s.table.column("doc_id").to_pylist() == [1, 2]


def test_bad_parquet_rows_are_named_by_file_and_row_index(tmp_path):
    t = pa.table(
        {
            "id": pa.array([1, 2, 1, None, 5], type=pa.int64()),
            "prompt": ["p", None, "p", "p", "p"],
            "response": ["r", "r", "r", "r", "  "],
            "task": ["a", "b", "c", "d", "e"],
        }
    )
    f = tmp_path / "d.parquet"
    pq.write_table(t, f)
    s = read_source(DataConfig(path=str(f)))
    assert [b.describe() for b in s.bad] == [
        f"{f} row index 1: missing field 'prompt'",
        f"{f} row index 2: duplicate id 1 (also at row index 0)",
        f"{f} row index 3: missing field 'id' (the document id)",
        f"{f} row index 4: empty response: field 'response' is blank",
    ]
    assert s.bad[0].record() == {
        "file": str(f),
        "row_index": 1,
        "doc_id": 2,
        "kind": "missing_field",
        "reason": "missing field 'prompt'",
        "row": {"id": 2, "prompt": None, "response": "r", "task": "b"},
    }
    assert s.table.column("doc_id").to_pylist() == [1]


def test_duplicate_id_across_parquet_files_names_the_other_file(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "prompt": ["p", "p"], "response": ["r", "r"]}), folder / "a.parquet")
    pq.write_table(pa.table({"id": [3, 2], "prompt": ["p", "p"], "response": ["r", "r"]}), folder / "b.parquet")
    s = read_source(DataConfig(path=str(folder)))
    assert [b.describe() for b in s.bad] == [f"{folder / 'b.parquet'} row index 1: duplicate id 2 (also at {folder / 'a.parquet'} row index 1)"]


def test_invalid_json_record_keeps_the_raw_text(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ['{"messages": oops}', {"messages": chat("q", "a")}])
    s = read_source(DataConfig(path=str(p)))
    assert s.bad[0].record() == {
        "file": str(p),
        "line": 1,
        "doc_id": 0,
        "kind": "invalid_json",
        "reason": "not valid JSON: Expecting value at column 14",
        "text": '{"messages": oops}',
    }


def test_not_utf8_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps({"messages": chat("q", "a")}).encode() + b"\n" + b'{"messages": "\xff"}\n')
    s = read_source(DataConfig(path=str(p)))
    assert [b.describe() for b in s.bad] == [f"{p} line 2: not valid UTF-8 (invalid start byte at byte 14)"]


def test_error_message_lists_the_first_rows_and_counts_the_rest(tmp_path):
    rows = [{"messages": chat("q", "a")}] + [{"messages": chat("q", "")} for _ in range(MAX_SHOWN + 2)]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    s = read_source(DataConfig(path=str(p)))
    reason = "empty response: the final assistant turn of 'messages' is blank"
    assert format_bad_rows(s.bad, s.description) == "\n".join(
        [f"{MAX_SHOWN + 2} bad rows in {p}:"]
        + [f"  {p} line {i}: {reason}" for i in range(2, 2 + MAX_SHOWN)]
        + ["  ... and 2 more", SKIP_HINT]
    )
    assert SKIP_HINT == (
        "Fix these rows, or set data.skip_bad_rows: true (CLI: --skip-bad-rows) to write them to "
        "data/rejected.jsonl with their reasons and prepare the other rows."
    )


# --------------------------------------------------------------------------- whole-source problems


def _source_error(cfg: DataConfig) -> str:
    with pytest.raises(GaRayError) as err:  # DataError for the source, ConfigError for the settings
        read_source(cfg)
    return str(err.value)


def test_source_level_errors(tmp_path):
    assert _source_error(DataConfig()) == (
        "data.path is not set: point it to a JSONL file, a Parquet file or folder, or a datasets.save_to_disk folder"
    )
    missing = tmp_path / "nope.jsonl"
    assert _source_error(DataConfig(path=str(missing))) == (
        f"data.path {missing} does not exist: point it to a JSONL file, a Parquet file or folder, or a datasets.save_to_disk folder"
    )
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    assert _source_error(DataConfig(path=str(csv))) == (
        f"cannot tell the format of {csv} from its name: name it .jsonl or .parquet, or set data.format to jsonl or parquet"
    )
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert _source_error(DataConfig(path=str(empty_dir))) == (
        f"{empty_dir} is a folder with neither .parquet files nor a datasets.save_to_disk layout (state.json or dataset_dict.json)"
    )
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"messages": chat("q", "a")}], indent=1))
    assert _source_error(DataConfig(path=str(arr))) == (
        f"{arr} holds a JSON array; data.path must be JSON Lines (one object per line). Convert it, e.g.: jq -c '.[]' {arr} > data.jsonl"
    )
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    assert _source_error(DataConfig(path=str(blank))) == f"{blank} has no rows"
    neither = write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "label": 1}])
    assert _source_error(DataConfig(path=str(neither))) == (
        f"{neither} has neither a 'messages' field nor 'prompt'/'response' fields (fields: label, text). "
        "Set data.messages_column, or data.prompt_column and data.response_column, to your names."
    )
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "n.parquet")
    assert _source_error(DataConfig(path=str(tmp_path / "n.parquet"))) == (
        f"{tmp_path / 'n.parquet'} has neither a 'messages' column nor 'prompt'/'response' columns (columns: text). "
        "Set data.messages_column, or data.prompt_column and data.response_column, to your names."
    )
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"messages": chat("q", "a"), "task": "x"}, {"messages": chat("q", "a"), "task": 3}])
    assert _source_error(DataConfig(path=str(mixed))) == (
        f"{mixed}: field 'task' is str at line 1 but int at line 2; a column needs one type: make the values consistent or remove the field"
    )
    clash = write_jsonl(tmp_path / "c.jsonl", [{"messages": chat("q", "a"), "n_tokens": 3}])
    assert _source_error(DataConfig(path=str(clash))) == (
        f"{clash}: column 'n_tokens' clashes with a column that prepare writes (doc_id, input_ids, loss_mask, n_tokens); "
        "rename it in the source (or set data.id_column to it if it is the document id)"
    )
    assert _source_error(DataConfig(path=str(tmp_path / "m.jsonl"), format="hf_disk")) == (
        f"data.format is hf_disk but {tmp_path / 'm.jsonl'} is not a datasets.save_to_disk folder (no state.json or dataset_dict.json)"
    )
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    assert _source_error(DataConfig(path=str(broken))).startswith(f"{broken} is not a readable Parquet file (")


def test_id_column_named_doc_id_is_consumed_not_a_clash(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"doc_id": 9, "messages": chat("q", "a")}])
    s = read_source(DataConfig(path=str(p), id_column="doc_id"))
    assert s.table.column("doc_id").to_pylist() == [9]
    assert s.sidecars == []
