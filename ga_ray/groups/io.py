"""I/O of the groups stage: `groups/groups.parquet`, `groups/tree.json`, `groups/discovery.json`.

`groups.parquet`, one row per group (a behaviour: atoms that act as one), columns:
- `group` int64 (0..G-1, ordered by coherence of the group's top documents, best first),
- `atoms` list<int64> (member atom ids, the strongest member first), `n_atoms` int64,
- `n_documents` int64 (documents on which any member is active, oriented coefficient > 0),
- `top_doc_ids` list<int64> (the group's top documents by summed oriented coefficient of its members),
- `top_scores` list<float64> (those sums),
- `coherence` float64 (mean of the member atoms' coherence, weighted by their active documents),
- `coherence_min`, `coherence_max` float64 (over members),
- `words` list<string> (characteristic words of the group's top documents, when characterisation exists),
- `parent` int64 (the group of the next coarser cut that holds this one; null at the root level),
- `level` int64 (number of groups of the cut this row belongs to; the chosen cut is `tree.json`'s `chosen`),
- `leader` int64 (the member atom with the largest coherence; what the report shows first).

`tree.json`: `atoms` (atom id per leaf, in linkage order), `linkage` (scipy's (K-1)×4 matrix as lists),
`method`, `metric`, `criterion`, `chosen` (the number of groups of the chosen cut), `scores` (criterion per
candidate cut), `assignment` (group per leaf at the chosen cut).

Everything is written atomically; a reader either sees the previous complete files or the new ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ga_ray.errors import StageError
from ga_ray.rundir import atomic_write_bytes, atomic_write_json

GROUPS_DIR = "groups"
GROUPS_FILE = "groups.parquet"
TREE_FILE = "tree.json"
DISCOVERY_FILE = "discovery.json"

GROUPS_SCHEMA = pa.schema(
    [
        ("group", pa.int64()),
        ("atoms", pa.list_(pa.int64())),
        ("n_atoms", pa.int64()),
        ("n_documents", pa.int64()),
        ("top_doc_ids", pa.list_(pa.int64())),
        ("top_scores", pa.list_(pa.float64())),
        ("coherence", pa.float64()),
        ("coherence_min", pa.float64()),
        ("coherence_max", pa.float64()),
        ("words", pa.list_(pa.string())),
        ("parent", pa.int64()),
        ("level", pa.int64()),
        ("leader", pa.int64()),
    ]
)


def groups_dir(run_dir: str | Path) -> Path:
    """`RUN_DIR/groups` (also accepts the groups folder itself)."""
    p = Path(run_dir)
    if p.name == GROUPS_DIR and (p / GROUPS_FILE).exists():
        return p
    return p / GROUPS_DIR


def exists(run_dir: str | Path) -> bool:
    d = groups_dir(run_dir)
    return (d / GROUPS_FILE).exists() and (d / TREE_FILE).exists()


def groups_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the schema's keys) -> a table with exactly GROUPS_SCHEMA."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in GROUPS_SCHEMA}
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in GROUPS_SCHEMA}, schema=GROUPS_SCHEMA)


def save_groups(out_dir: str | Path, rows: list[dict[str, Any]] | pa.Table, tree: dict[str, Any]) -> None:
    """Write `groups.parquet` (rows of the chosen cut) and `tree.json` into `out_dir` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = rows if isinstance(rows, pa.Table) else groups_table(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table.cast(GROUPS_SCHEMA), sink)
    atomic_write_bytes(out / GROUPS_FILE, sink.getvalue().to_pybytes())
    atomic_write_json(out / TREE_FILE, tree)


def load_groups(run_dir: str | Path) -> pa.Table:
    """The groups of the chosen cut (`groups.parquet`), as a pyarrow table (`.to_pandas()` for a frame)."""
    path = groups_dir(run_dir) / GROUPS_FILE
    if not path.exists():
        raise StageError(f"{path} is missing: run the groups stage first (`ga-ray groups --run-dir {Path(run_dir)}`)")
    return pq.read_table(str(path))


def load_tree(run_dir: str | Path) -> dict[str, Any]:
    path = groups_dir(run_dir) / TREE_FILE
    if not path.exists():
        raise StageError(f"{path} is missing: run the groups stage first (`ga-ray groups --run-dir {Path(run_dir)}`)")
    return json.loads(path.read_text())


def group_members(run_dir: str | Path) -> dict[int, list[int]]:
    """group id -> member atom ids (strongest first), for the steer stage."""
    t = load_groups(run_dir)
    return {int(g): [int(a) for a in atoms] for g, atoms in zip(t.column("group").to_pylist(), t.column("atoms").to_pylist())}


def save_discovery(out_dir: str | Path, result: dict[str, Any]) -> None:
    atomic_write_json(Path(out_dir) / DISCOVERY_FILE, result)


def load_discovery(run_dir: str | Path) -> dict[str, Any] | None:
    path = groups_dir(run_dir) / DISCOVERY_FILE
    return json.loads(path.read_text()) if path.exists() else None
