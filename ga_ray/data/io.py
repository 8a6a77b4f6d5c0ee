"""The artifacts of the prepare stage (`data/`): the one module that lists and reads them.

`data/` holds `part-NNNNN.parquet` (doc_id order) next to `prepare.json` and `rejected.jsonl`. Every
reader of prepared documents goes through these helpers (Ray Data too: `ray.data.read_parquet(
parquet_paths(data_dir))`); a bare `pyarrow.parquet.read_table(dir)` would also try to open the JSON
files and fail. Columns: `doc_id` int64, `input_ids` list<int32>, `loss_mask` list<int8>, `n_tokens`
int32, plus the source's sidecar columns (e.g. a label column that only the discovery score reads).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ga_ray.errors import StageError

PART_GLOB = "part-*.parquet"
REPORT_FILE = "prepare.json"
TOKEN_COLUMNS = ("doc_id", "input_ids", "loss_mask")
"""What the per-document kernels read: never a label or sidecar column."""


def part_files(data_dir: str | Path) -> list[Path]:
    """The Parquet parts of a `data/` folder, in doc_id order."""
    files = sorted(Path(data_dir).glob(PART_GLOB))
    if not files:
        raise StageError(f"{data_dir} has no {PART_GLOB} files: run the prepare stage first (`ga-ray prepare`)")
    return files


def parquet_paths(data_dir: str | Path) -> list[str]:
    """`part_files` as strings (for `ray.data.read_parquet` and `pyarrow.dataset`)."""
    return [str(f) for f in part_files(data_dir)]


def exists(data_dir: str | Path) -> bool:
    return Path(data_dir).is_dir() and any(Path(data_dir).glob(PART_GLOB))


def _dataset(data_dir: str | Path):
    import pyarrow.dataset as pads

    return pads.dataset(parquet_paths(data_dir), format="parquet")


def column_names(data_dir: str | Path) -> list[str]:
    return list(_dataset(data_dir).schema.names)


def read_documents(data_dir: str | Path, doc_ids: Sequence[int] | np.ndarray | None = None, columns: Sequence[str] = TOKEN_COLUMNS) -> pa.Table:
    """`columns` of the prepared documents (only the rows of `doc_ids` when given), in file order."""
    import pyarrow.compute as pc

    flt = None if doc_ids is None else pc.field("doc_id").isin(pa.array(np.asarray(list(doc_ids), dtype=np.int64)))
    return _dataset(data_dir).to_table(columns=list(columns), filter=flt)


def read_doc_ids(data_dir: str | Path) -> np.ndarray:
    """Every doc_id (int64), in file order."""
    return read_documents(data_dir, columns=["doc_id"]).column("doc_id").to_numpy().astype(np.int64)


def iter_token_windows(data_dir: str | Path, rows: int) -> Iterator[dict[str, np.ndarray]]:
    """TOKEN_COLUMNS in windows of at most `rows` rows, file by file in doc_id order, as numpy columns the way
    Ray Data's numpy batches hold them (list columns as object arrays of arrays): what the stages that run in
    the driver feed the same code their Ray workers run."""
    for f in part_files(data_dir):
        for rb in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=list(TOKEN_COLUMNS)):
            yield {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}


def count_documents(data_dir: str | Path) -> int:
    """Number of prepared documents, from the Parquet footers (no data read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in part_files(data_dir))


def read_prepared(data_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All prepared documents as one Arrow table (rows in doc_id order)."""
    return pq.read_table(parquet_paths(data_dir), columns=columns)


def read_prepare_report(data_dir: str | Path) -> dict[str, Any]:
    """The counts of `data/prepare.json`."""
    return json.loads((Path(data_dir) / REPORT_FILE).read_text())
