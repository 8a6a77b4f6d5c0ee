"""Reading what the prepare stage wrote (`data/`).

`data/` holds `part-*.parquet` next to `prepare.json` and `rejected.jsonl`, so read the folder with
these helpers (or `ray.data.read_parquet(dir)`, which keeps to `.parquet` files): a bare
`pyarrow.parquet.read_table(dir)` would also try to open the two JSON files and fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"


def part_files(data_dir: str | Path) -> list[Path]:
    """The Parquet parts of a `data/` folder, in doc_id order."""
    files = sorted(Path(data_dir).glob(PART_GLOB))
    if not files:
        raise FileNotFoundError(f"{data_dir} has no {PART_GLOB} files: run the prepare stage first")
    return files


def read_prepared(data_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All prepared documents as one Arrow table (rows in doc_id order)."""
    return pq.read_table([str(f) for f in part_files(data_dir)], columns=columns)


def read_prepare_report(data_dir: str | Path) -> dict[str, Any]:
    """The counts of `data/prepare.json`."""
    return json.loads((Path(data_dir) / "prepare.json").read_text())
