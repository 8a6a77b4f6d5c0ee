"""ga_ray.data.io: the one reader of data/ (parts only, never the JSON reports; filtered reads; errors say what to run)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ga_ray.data import io as data_io
from ga_ray.errors import StageError


def _data(tmp_path):
    from conftest import make_random_docs

    d = tmp_path / "data"
    d.mkdir()
    t = pa.Table.from_pylist(make_random_docs(30, seed=1))
    for k in range(3):
        pq.write_table(t.slice(10 * k, 10), d / f"part-{k:05d}.parquet")
    (d / "prepare.json").write_text('{"documents": 30}')
    (d / "rejected.jsonl").write_text("")
    return d, t


def test_reads_equal_plain_pyarrow_over_the_parts(tmp_path):
    d, t = _data(tmp_path)
    parts = [str(d / f"part-{k:05d}.parquet") for k in range(3)]
    assert data_io.parquet_paths(d) == parts and data_io.exists(d)
    want = pads.dataset(parts, format="parquet").to_table(columns=["doc_id", "n_tokens"])
    assert data_io.read_documents(d, columns=["doc_id", "n_tokens"]).equals(want)
    ids = data_io.read_doc_ids(d)
    assert ids.dtype == np.int64 and ids.tolist() == t.column("doc_id").to_pylist()
    assert data_io.count_documents(d) == 30 and "task" in data_io.column_names(d)
    sub = data_io.read_documents(d, [25, 3, 7])  # only these rows, only the token columns
    assert sorted(sub.column("doc_id").to_pylist()) == [3, 7, 25] and sub.column_names == list(data_io.TOKEN_COLUMNS)
    assert data_io.read_prepare_report(d) == {"documents": 30}


def test_token_windows_hold_every_row_in_order_as_numpy_columns(tmp_path):
    d, t = _data(tmp_path)
    windows = list(data_io.iter_token_windows(d, 4))
    assert [len(w["doc_id"]) for w in windows] == [4, 4, 2] * 3  # windows never cross a part file
    assert all(sorted(w) == sorted(data_io.TOKEN_COLUMNS) for w in windows)
    assert np.concatenate([w["doc_id"] for w in windows]).tolist() == t.column("doc_id").to_pylist()
    ids = [a for w in windows for a in w["input_ids"]]
    assert all(isinstance(a, np.ndarray) for a in ids)
    assert [a.tolist() for a in ids] == t.column("input_ids").to_pylist()


def test_no_prepared_data_says_run_prepare(tmp_path):
    assert not data_io.exists(tmp_path / "data")
    with pytest.raises(StageError, match="ga-ray prepare"):
        data_io.read_documents(tmp_path / "data")
