"""The prepare stage end to end through Ray Data: Parquet out, counts, bad rows stop or are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare_helpers import TEMPLATE_NO_SYSTEM, TEMPLATE_SYSTEM, make_tokenizer, save_tokenizer

from ga_ray.config import RunConfig
from ga_ray.kernel.collate import collate
from ga_ray.data.errors import SKIP_HINT
from ga_ray.data.io import read_prepare_report, read_prepared
from ga_ray.data.tokenize import encode_conversation
from ga_ray.errors import DataError, StageError
from ga_ray.pipeline import run_pipeline
from ga_ray.rundir import RunDir

pytestmark = pytest.mark.slow


def chat(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def config(tmp_path: Path, data_path: Path, tok: Path, **data) -> RunConfig:
    return RunConfig.model_validate({"data": {"path": str(data_path), **data}, "model": {"tokenizer": str(tok)}})


def test_prepare_jsonl_end_to_end(ray_session, tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_SYSTEM)
    tok = make_tokenizer(TEMPLATE_SYSTEM)
    rows = []
    for i in range(24):
        msgs = chat(f"What is {i} plus {i}?", f"The result is {2 * i}." + (" Answer yes or no." * 6 if i % 5 == 0 else ""))
        if i % 4 == 1:  # multi-turn, with a system turn
            msgs = [{"role": "system", "content": "Be brief."}] + chat("Hello?", "yes") + msgs
        rows.append({"id": 1000 - 7 * i, "messages": msgs, "task": f"t{i % 3}", "score": i})
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_length = 40
    cfg = config(tmp_path, src, tok_dir, max_length=max_length, num_blocks=3, batch_size=4)
    run = RunDir(tmp_path / "run")
    summary = run_pipeline(cfg, run, stages=["prepare"])["prepare"]

    data = run.stage_dir("data")
    names = sorted(p.name for p in data.iterdir())
    parts = names[:-2]
    assert names[-2:] == ["prepare.json", "rejected.jsonl"]
    assert len(parts) >= 1 and parts == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    assert (data / "rejected.jsonl").read_text() == ""
    table = read_prepared(data)
    assert table.schema.field("doc_id").type == pa.int64()
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("loss_mask").type == pa.list_(pa.int8())
    assert table.schema.field("n_tokens").type == pa.int32()
    assert table.column_names == ["doc_id", "input_ids", "loss_mask", "n_tokens", "task", "score"]
    # rows in doc_id order; each equals the pure reference; sidecars untouched
    by_id = {r["id"]: r for r in rows}
    assert table.column("doc_id").to_pylist() == sorted(by_id)
    n_trunc = 0
    for rec in table.to_pylist():
        src_row = by_id[rec["doc_id"]]
        ref = encode_conversation(tok, src_row["messages"], max_length)
        assert rec["input_ids"] == ref.input_ids and rec["loss_mask"] == ref.loss_mask
        assert rec["n_tokens"] == len(ref.input_ids)
        assert (rec["task"], rec["score"]) == (src_row["task"], src_row["score"])
        n_trunc += ref.truncated
    assert n_trunc > 0
    report = read_prepare_report(data)
    expected = {
        "rows_read": 24,
        "documents": 24,
        "tokens": sum(table.column("n_tokens").to_pylist()),
        "response_tokens": sum(sum(m) for m in table.column("loss_mask").to_pylist()),
        "truncated": n_trunc,
        "rejected": 0,
        "rejected_by_reason": {},
        "doc_ids": "column 'id'",
        "sidecars": ["task", "score"],
    }
    assert {k: report[k] for k in expected} == expected
    assert summary["line"] == (
        f"24 documents, {expected['tokens']:,} tokens ({expected['response_tokens']:,} response), {n_trunc} truncated to 40, 0 rejected"
    )
    assert run.stage_record("prepare")["summary"]["documents"] == 24
    batch = collate(table.slice(0, 3).to_pylist(), pad_id=tok.pad_token_id)
    assert batch.doc_ids.tolist() == table.column("doc_id").to_pylist()[:3]


def _bad_source(tmp_path: Path) -> tuple[Path, int]:
    """Good rows plus: one line that is not JSON (found while reading), one system turn the template
    rejects and one prompt too long for max_length (both found by the Ray tokeniser)."""
    lines = [json.dumps({"messages": chat(f"q{i}", f"r{i}"), "task": "ok"}) for i in range(6)]
    lines.insert(2, '{"messages": [')
    lines.insert(4, json.dumps({"messages": [{"role": "system", "content": "s"}] + chat("q", "a"), "task": "sys"}))
    lines.insert(6, json.dumps({"messages": chat("word " * 60, "a"), "task": "long"}))
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p, 30


def test_bad_rows_stop_the_stage_with_every_problem(ray_session, tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_NO_SYSTEM)
    src, max_length = _bad_source(tmp_path)
    cfg = config(tmp_path, src, tok_dir, max_length=max_length, num_blocks=2)
    run = RunDir(tmp_path / "run")
    with pytest.raises(DataError) as err:
        run_pipeline(cfg, run, stages=["prepare"])
    n_prompt = encode_conversation(make_tokenizer(TEMPLATE_NO_SYSTEM), chat("word " * 60, "a"), 10_000).n_prompt
    assert str(err.value) == "\n".join(
        [
            f"3 bad rows in {src}:",
            f"  {src} line 3: not valid JSON: Expecting value at column 15",
            f"  {src} line 5: the chat template failed on this conversation: System role not supported",
            f"  {src} line 7: no response token left after truncation to data.max_length={max_length}: the prompt alone is "
            f"{n_prompt} tokens (raise data.max_length or shorten the prompt)",
            SKIP_HINT,
        ]
    )
    assert list(run.stage_dir("data").iterdir()) == []  # nothing half-written
    assert run.stage_record("prepare")["status"] == "failed"


def test_skip_bad_rows_writes_rejected_jsonl_and_counts(ray_session, tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_NO_SYSTEM)
    src, max_length = _bad_source(tmp_path)
    cfg = config(tmp_path, src, tok_dir, max_length=max_length, num_blocks=2, skip_bad_rows=True, max_rejected_share=0.5)
    run = RunDir(tmp_path / "run")
    summary = run_pipeline(cfg, run, stages=["prepare"])["prepare"]
    data = run.stage_dir("data")
    table = read_prepared(data)
    assert table.column("doc_id").to_pylist() == [0, 1, 3, 5, 7, 8]  # positions; rejected rows leave gaps
    assert set(table.column("task").to_pylist()) == {"ok"}
    rejected = [json.loads(x) for x in (data / "rejected.jsonl").read_text().splitlines()]
    assert [(r["line"], r["doc_id"], r["kind"]) for r in rejected] == [
        (3, 2, "invalid_json"),
        (5, 4, "template_error"),
        (7, 6, "no_response_after_truncation"),
    ]
    assert rejected[0]["text"] == '{"messages": ['
    assert rejected[1]["row"] == {"messages": [{"role": "system", "content": "s"}] + chat("q", "a"), "task": "sys"}
    assert rejected[1]["reason"] == "the chat template failed on this conversation: System role not supported"
    assert all(r["file"] == str(src) for r in rejected)
    report = read_prepare_report(data)
    assert report["rejected"] == 3 and report["documents"] == 6 and report["rows_read"] == 9
    assert report["rejected_by_reason"] == {"invalid_json": 1, "no_response_after_truncation": 1, "template_error": 1}
    assert summary["rejected_by_reason"] == report["rejected_by_reason"]
    assert summary["line"].endswith(", 3 rejected (see data/rejected.jsonl)")


def test_prepare_parquet_folder_keeps_sidecar_types(ray_session, tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_SYSTEM)
    folder = tmp_path / "src"
    folder.mkdir()
    for k in range(2):
        pq.write_table(
            pa.table(
                {
                    "prompt": [f"p{k}{i}" for i in range(5)],
                    "response": [f"The result is {i}." for i in range(5)],
                    "label": pa.array(range(5), type=pa.int16()),
                }
            ),
            folder / f"part-{k}.parquet",
        )
    cfg = config(tmp_path, folder, tok_dir, system_prompt="Be brief.", num_blocks=3)
    run = RunDir(tmp_path / "run")
    run_pipeline(cfg, run, stages=["prepare"])
    table = pq.read_table([str(p) for p in sorted(run.stage_dir("data").glob("part-*.parquet"))])
    assert table.column("doc_id").to_pylist() == list(range(10))
    assert table.schema.field("label").type == pa.int16()
    assert table.column("label").to_pylist() == list(range(5)) * 2
    tok = make_tokenizer(TEMPLATE_SYSTEM)
    first = tok.decode(table.column("input_ids")[0].as_py())
    assert first == "<s><|system|>Be brief.<|end|><|user|>p00<|end|><|assistant|>The result is 0.<|end|>"


def test_no_document_left_is_an_error_even_when_skipping(ray_session, tmp_path):
    tok_dir = save_tokenizer(tmp_path / "tok", TEMPLATE_SYSTEM)
    src = tmp_path / "d.jsonl"
    src.write_text("{oops\n")
    cfg = config(tmp_path, src, tok_dir, skip_bad_rows=True)
    with pytest.raises(DataError) as err:
        run_pipeline(cfg, RunDir(tmp_path / "run"), stages=["prepare"])
    assert str(err.value) == "\n".join(
        [
            f"1 bad row in {src}:",
            f"  {src} line 1: not valid JSON: Expecting property name enclosed in double quotes at column 2",
            "No document is left to prepare: fix these rows.",
        ]
    )


def test_tokenizer_without_chat_template(ray_session, tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"messages": chat("q", "a")}) + "\n")
    with pytest.raises(StageError) as err:
        run_pipeline(config(tmp_path, src, tmp_path / "tok"), RunDir(tmp_path / "run"), stages=["prepare"])
    assert str(err.value) == (
        f"the tokenizer at {tmp_path / 'tok'} has no chat template; prepare needs one to build prompts and "
        "response masks. Save one with tokenizer.chat_template = ...; tokenizer.save_pretrained(...)"
    )


def test_rows_written_out_of_doc_id_order_are_sorted_not_fatal(tmp_path, ray_session):
    """Ray Data may deliver blocks out of order; the parts are then sorted on the driver, every row kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from ga_ray.data.stage import _write_ordered_parts

    ds = ray.data.from_arrow([pa.table({"doc_id": [3, 1, 5], "x": [30, 10, 50]}), pa.table({"doc_id": [2, 4], "x": [20, 40]})])
    names = _write_ordered_parts(ds, tmp_path)
    table = pa.concat_tables([pq.read_table(tmp_path / n) for n in names])
    assert names[0] == "part-00000.parquet"
    assert table.column("doc_id").to_pylist() == [1, 2, 3, 4, 5]
    assert table.column("x").to_pylist() == [10, 20, 30, 40, 50]
    assert not (tmp_path / "_ray_parts").exists()
