"""Fuzzing prepare's inputs with Hypothesis: nothing crashes, and good rows + rejected rows = source rows.

Generated JSON Lines files mix good chats, chats with odd content (special-token text, lone surrogate
escapes, NUL, emoji), arbitrary JSON values, deep nesting, text that is not JSON, invalid UTF-8 and
blank lines, with sidecar fields of arbitrary JSON. Every file must give either one `GaRayError`
(a problem of the whole file, e.g. a sidecar of mixed types) or a `Source` whose good and bad rows add
up to the source's rows, whose bad rows serialise into `rejected.jsonl`, and whose good rows tokenise
(the pure tokeniser, no Ray) and go into Parquet. Config values: any `--set data.KEY=VALUE` loads or is
one `ConfigError`. A few examples go through the real Ray stage.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_prepare_helpers import TEMPLATE_NO_SYSTEM, TEMPLATE_SYSTEM, make_tokenizer

from ga_ray.config import DataConfig, RunConfig, load_config
from ga_ray.data.readers import MAX_DEPTH, read_source
from ga_ray.data.tokenize import COL_KIND, INTERNAL_PREFIX, tokenize_table
from ga_ray.errors import ConfigError, GaRayError

TOKENIZERS = {"system": make_tokenizer(TEMPLATE_SYSTEM), "no_system": make_tokenizer(TEMPLATE_NO_SYSTEM)}

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3), max_leaves=8)
content = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["<|end|>", "say <|assistant|> now", "</s>", "<s><pad>", "a\x00b", "\U0001f600", "   ", ""]),
    st.text(max_size=10).map(lambda t: t + "<|user|>" + t),
)
roles = st.sampled_from(["user", "assistant", "system", "tool", ""])
turns = st.lists(st.fixed_dictionaries({"role": roles, "content": content}), min_size=1, max_size=4)


@st.composite
def chat_line(draw) -> str:
    msgs = draw(turns)
    if draw(st.booleans()):  # usually a well-formed chat ending with the response
        msgs = msgs + [{"role": "assistant", "content": draw(content)}]
    row: dict = {"messages": msgs}
    for key in draw(st.lists(st.sampled_from(["task", "meta", "score", "id"]), max_size=2, unique=True)):
        row[key] = draw(st.integers(0, 5)) if key == "id" else draw(json_values)
    text = json.dumps(row)
    if draw(st.integers(0, 9)) == 0:  # a lone surrogate escape in the content (json.dumps never writes one)
        text = text.replace('"content": "', '"content": "\\ud800', 1)
    return text


line = st.one_of(
    chat_line(),
    chat_line(),
    chat_line(),
    json_values.map(json.dumps),
    st.integers(1, 1200).map(lambda d: '{"messages": [], "x": ' + "[" * d + "]" * d + "}"),
    st.text(max_size=20),
    st.sampled_from(["", "   ", "{", "[1, 2]", '{"messages": "x"}', "\ufeff{}", '{"a": 1}{"b": 2}']),
)


@st.composite
def jsonl_file(draw) -> bytes:
    lines = [x.encode("utf-8", errors="surrogatepass") for x in draw(st.lists(line, min_size=1, max_size=12))]
    if draw(st.booleans()):  # a line that is not valid UTF-8
        lines.insert(draw(st.integers(0, len(lines))), b'{"messages": "caf\xe9"}')
    return b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")


def source_rows(data: bytes) -> int:
    """Rows of a JSONL file by the documented rule: every line that is not blank (a line that is not UTF-8 counts)."""
    n = 0
    for i, raw in enumerate(data.split(b"\n")):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            n += 1
            continue
        if i == 0:
            text = text.lstrip("\ufeff")
        n += bool(text.strip())
    return n


def check_file(data: bytes, folder: Path, template: str) -> None:
    path = folder / "d.jsonl"
    path.write_bytes(data)
    try:
        source = read_source(DataConfig(path=str(path)))
    except GaRayError as exc:  # a problem of the whole file: one line, naming it
        assert str(exc) and (str(path) in str(exc) or "data." in str(exc))
        return
    assert source.table.num_rows + len(source.bad) == source.n_rows == source_rows(data)
    for bad in source.bad:  # what rejected.jsonl holds, as the stage writes it
        json.loads(json.dumps(bad.record(), default=str))
        assert bad.where.startswith("line ") and bad.file == str(path) and bad.reason
    tokenised = tokenize_table(TOKENIZERS[template], source.table, max_length=64, special_text="escape")
    assert tokenised.num_rows == source.table.num_rows
    good = tokenised.filter(pc.is_null(tokenised.column(COL_KIND)))
    out = good.drop_columns([c for c in good.column_names if c.startswith(INTERNAL_PREFIX)])
    pq.write_table(out, io.BytesIO())  # the final write cannot fail on what the reader let through
    for ids, mask in zip(out.column("input_ids").to_pylist(), out.column("loss_mask").to_pylist()):
        assert len(ids) == len(mask) <= 64 and 0 < sum(mask)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=jsonl_file(), template=st.sampled_from(sorted(TOKENIZERS)))
def test_fuzz_jsonl_reader_and_tokeniser(data, template):
    with tempfile.TemporaryDirectory() as d:
        check_file(data, Path(d), template)


def test_fuzz_covers_the_deep_and_surrogate_cases():
    # the generated lines reach both limits: deeper than MAX_DEPTH and than Python's JSON parser
    deep = '{"messages": [], "x": ' + "[" * 1100 + "]" * 1100 + "}"
    with tempfile.TemporaryDirectory() as d:
        check_file(deep.encode() + b"\n" + b'{"messages": [{"role": "user", "content": "\\ud800"}]}\n', Path(d), "system")
    assert MAX_DEPTH < 1100


data_keys = st.sampled_from(sorted(DataConfig.model_fields)) | st.text(min_size=1, max_size=6).filter(lambda k: "=" not in k and "." not in k)
yaml_values = st.one_of(
    st.text(max_size=12),
    st.integers().map(str),
    st.floats().map(str),
    st.sampled_from(["", "null", "[]", "{}", "true", "-1", "0", "1e9", ".inf", "!!python/object:os.system", "[1, [2]]", "{a: 1}", "'", "~"]),
)


@settings(max_examples=200, deadline=None)
@given(key=data_keys, value=yaml_values, top=st.booleans())
def test_fuzz_config_values(key, value, top):
    override = f"{key}={value}" if top else f"data.{key}={value}"
    try:
        cfg = load_config(None, [override])
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(cfg, RunConfig)
    d = cfg.data
    assert d.batch_size >= 1 and d.max_length >= 2 and 0.0 <= d.max_rejected_share <= 1.0 and (d.num_blocks is None or d.num_blocks >= 1)


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=jsonl_file())
def test_fuzz_through_the_ray_stage(ray_session, data):
    from test_prepare_helpers import save_tokenizer

    from ga_ray.data.io import read_prepare_report
    from ga_ray.pipeline import run_pipeline
    from ga_ray.rundir import RunDir

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        src = folder / "d.jsonl"
        good = "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}) + "\n" for i in range(8))
        data = good.encode() + data  # some documents always reach the Ray tokeniser
        src.write_bytes(data)
        tok = save_tokenizer(folder / "tok", TEMPLATE_SYSTEM)
        cfg = RunConfig.model_validate(
            {"data": {"path": str(src), "skip_bad_rows": True, "max_rejected_share": 1.0, "max_length": 64}, "model": {"tokenizer": str(tok)}}
        )
        run = RunDir(folder / "run")
        try:
            run_pipeline(cfg, run, stages=["prepare"])
        except GaRayError:
            return  # a problem of the whole file, or no document left: one line
        report = read_prepare_report(run.stage_dir("data"))
        rejected = (run.stage_dir("data") / "rejected.jsonl").read_text().splitlines()
        assert report["documents"] + report["rejected"] == report["rows_read"] == source_rows(data)
        assert len(rejected) == report["rejected"]
