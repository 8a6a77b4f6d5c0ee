"""Files of the evaluate stage (`RUN_DIR/eval/`).

- `parts/<settings key>/<store>/part-*.parquet`: finished requests in durable chunks, keyed by (variant, item), in a
  folder named by a hash of what the requests depend on (max_tokens, k, model, adapter, prompts); each chunk is
  written to a dot-prefixed temporary file, fsynced and renamed, so a killed evaluation leaves only whole chunks,
  and a resumed one skips every key already there (failures are retried on resume; successes never redone).
- `generations.parquet`: one row per (variant, prompt): response, detector flags, latency, error.
- `metrics.parquet` / `metrics.csv`: one row per (variant, behaviour prompt set) with rates, intervals, tests,
  side effects. `table2.parquet` / `table2.csv`: the paper's Table 2 layout, one row per steered direction.
- `summary.json`: settings (max_tokens, KL's k, ...) and the goal check.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ga_ray.rundir import RunDir, atomic_write_bytes

EVAL_DIR = "eval"
GENERATIONS = "generations.parquet"
METRICS = "metrics.parquet"
TABLE2 = "table2.parquet"
SUMMARY = "summary.json"


def eval_dir(run_dir: RunDir | str | Path) -> Path:
    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    return root / EVAL_DIR


class PartStore:
    """Append-only rows in Parquet chunks under `folder`, keyed by the `key` columns.

    `add(row)` buffers; every `chunk_rows` rows (and on `flush()`) the buffer becomes one part file. `rows()` reads
    every part and keeps, per key, a success over a failure and a later row over an earlier one."""

    def __init__(self, folder: Path, key: Sequence[str] = ("variant", "item"), chunk_rows: int = 64,
                 schema: pa.Schema | None = None):
        self.folder = Path(folder)
        self.key = tuple(key)
        self.chunk_rows = chunk_rows
        self.schema = schema
        self._buf: list[dict[str, Any]] = []
        self.folder.mkdir(parents=True, exist_ok=True)

    def parts(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("part-*.parquet") if not p.name.startswith("."))

    def rows(self) -> list[dict[str, Any]]:
        best: dict[tuple, dict[str, Any]] = {}
        for p in self.parts():
            for row in pq.read_table(p).to_pylist():
                k = tuple(row[c] for c in self.key)
                old = best.get(k)
                if old is None or not row.get("error") or old.get("error"):
                    best[k] = row
        return list(best.values())

    def done_keys(self) -> set[tuple]:
        """Keys finished without error (what a resumed run skips)."""
        return {tuple(r[c] for c in self.key) for r in self.rows() if not r.get("error")}

    def add(self, row: Mapping[str, Any]) -> None:
        self._buf.append(dict(row))
        if len(self._buf) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        table = pa.Table.from_pylist(self._buf, schema=self.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        name = f"part-{len(self.parts()):05d}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_bytes(self.folder / name, sink.getvalue().to_pybytes())
        self._buf = []


def write_table(path: Path, rows: Iterable[Mapping[str, Any]], csv: bool = False, schema: pa.Schema | None = None) -> None:
    """A Parquet file (and a CSV beside it) written atomically; list columns are left out of the CSV."""
    rows = list(rows)
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    if csv:
        import pyarrow.csv as pacsv

        flat = table.select([i for i, f in enumerate(table.schema) if not pa.types.is_nested(f.type)])
        out = pa.BufferOutputStream()
        pacsv.write_csv(flat, out)
        atomic_write_bytes(path.with_suffix(".csv"), out.getvalue().to_pybytes())


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist() if Path(path).is_file() else []


def load_generations(run_dir: RunDir | str | Path) -> list[dict[str, Any]]:
    return read_rows(eval_dir(run_dir) / GENERATIONS)


def load_metrics(run_dir: RunDir | str | Path) -> list[dict[str, Any]]:
    return read_rows(eval_dir(run_dir) / METRICS)


def load_table2(run_dir: RunDir | str | Path) -> list[dict[str, Any]]:
    return read_rows(eval_dir(run_dir) / TABLE2)


def load_summary(run_dir: RunDir | str | Path) -> dict[str, Any] | None:
    import json

    p = eval_dir(run_dir) / SUMMARY
    return json.loads(p.read_text()) if p.is_file() else None


def exists(run_dir: RunDir | str | Path) -> bool:
    return (eval_dir(run_dir) / METRICS).is_file()

