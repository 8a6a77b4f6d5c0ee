"""The artifacts of the coherence stage (`RUN_DIR/coherence/`): the one module that writes and reads them.

Files, each written atomically:
- `atoms.parquet` (`ATOM_TABLE_SCHEMA`): one row per atom: `atom`, `coherence` (NaN: fewer than two
  top documents), `n_active_docs` (non-zero codes, the paper's "active docs"), `n_positive_docs`
  (oriented coefficient > 0), `top_doc_ids`, `top_coefs` (oriented), `sign_flipped`, `coef_sum` (raw
  sum over active documents), `n_invalid_top_docs` (zero / non-finite raw gradient);
- `dictionary_oriented.safetensors`: `dictionary` (K×D, row k multiplied by its sign) and `sign` (K);
  steering uses this one, so that "toward" an atom means "more like its documents";
- `characterisation.json`: per atom, excerpts of its top documents, characteristic words, optional labels;
- `discovery.json`: the discovery score, only when `data/` has the label column (absent otherwise).

The sparsity sweep (`ga-ray sweep`, `coherence/sweep.py`) writes `report/sweep.json` and `report/sweep.csv`
(`save_sweep`, `load_sweep`); its refitted atoms folders lie under `report/sweep/alpha_<α>/`.

Readers take the run directory (a `RunDir`, or its root path) and never list the folder themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ga_ray.errors import StageError
from ga_ray.rundir import RunDir, atomic_write_bytes, atomic_write_json

STAGE_DIR = "coherence"
ATOM_TABLE = "atoms.parquet"
ORIENTED_DICTIONARY = "dictionary_oriented.safetensors"
CHARACTERISATION = "characterisation.json"
DISCOVERY = "discovery.json"
SWEEP_DIR = "report"
SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"

ATOM_TABLE_SCHEMA = pa.schema(
    [
        ("atom", pa.int32()),
        ("coherence", pa.float64()),
        ("n_active_docs", pa.int64()),
        ("n_positive_docs", pa.int64()),
        ("top_doc_ids", pa.list_(pa.int64())),
        ("top_coefs", pa.list_(pa.float32())),
        ("sign_flipped", pa.bool_()),
        ("coef_sum", pa.float64()),
        ("n_invalid_top_docs", pa.int64()),
    ]
)

_RUN_HINT = "run the coherence stage first (`ga-ray coherence RUN_DIR`)"


def _root(run_dir: RunDir | str | Path) -> Path:
    return run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)


def stage_dir(run_dir: RunDir | str | Path) -> Path:
    """`RUN_DIR/coherence/`."""
    return _root(run_dir) / STAGE_DIR


def exists(run_dir: RunDir | str | Path) -> bool:
    """Whether the coherence stage's atom table is there (the stage writes it before the JSON files)."""
    return (stage_dir(run_dir) / ATOM_TABLE).is_file()


# ------------------------------------------------------------------------------------------ write


def save_atom_table(out: Path, table: pa.Table) -> None:
    """Write `out/atoms.parquet` atomically; the table must have exactly `ATOM_TABLE_SCHEMA`."""
    if not table.schema.equals(ATOM_TABLE_SCHEMA):
        raise ValueError(f"atom table schema differs from ATOM_TABLE_SCHEMA:\n{table.schema}\nwanted:\n{ATOM_TABLE_SCHEMA}")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(Path(out) / ATOM_TABLE, sink.getvalue().to_pybytes())


def save_oriented_dictionary(out: Path, dictionary: np.ndarray, sign: np.ndarray) -> None:
    """`out/dictionary_oriented.safetensors`: row k of `dictionary` times `sign[k]`, and `sign` itself."""
    from safetensors.numpy import save

    sign = np.asarray(sign, dtype=np.float32)
    tensors = {"dictionary": np.ascontiguousarray((np.asarray(dictionary) * sign[:, None]).astype(np.float32)), "sign": np.ascontiguousarray(sign)}
    meta = {"note": "row k = sign[k] * dictionary.safetensors row k; active documents' coefficients sum >= 0"}
    atomic_write_bytes(Path(out) / ORIENTED_DICTIONARY, save(tensors, metadata=meta))


def save_characterisation(out: Path, characterisation: dict[str, Any]) -> None:
    atomic_write_json(Path(out) / CHARACTERISATION, characterisation)


def save_discovery(out: Path, discovery: dict[str, Any] | None) -> None:
    """Write the discovery score, or remove an old one when there is none (it must not outlive its data)."""
    path = Path(out) / DISCOVERY
    if discovery is not None:
        atomic_write_json(path, discovery)
    elif path.exists():
        path.unlink()


def save_sweep(run_dir: RunDir | str | Path, payload: dict[str, Any], csv_text: str) -> Path:
    """`report/sweep.json` (the rows and the settings) and `report/sweep.csv`; returns the folder."""
    from ga_ray.rundir import atomic_write_text

    out = _root(run_dir) / SWEEP_DIR
    atomic_write_json(out / SWEEP_JSON, payload)
    atomic_write_text(out / SWEEP_CSV, csv_text)
    return out


# ------------------------------------------------------------------------------------------- read


def load_atom_table(run_dir: RunDir | str | Path) -> pa.Table:
    """The atom table, plus a derived `sign` column (float64: -1.0 where the atom was flipped, else +1.0)."""
    path = stage_dir(run_dir) / ATOM_TABLE
    if not path.is_file():
        raise StageError(f"{path} is missing: {_RUN_HINT}")
    try:
        table = pq.read_table(str(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise StageError(f"{path} is not a readable Parquet file ({exc}): re-run the coherence stage (`ga-ray coherence RUN_DIR --force`)") from None
    missing = [f.name for f in ATOM_TABLE_SCHEMA if f.name not in table.column_names]
    if missing:
        raise StageError(f"{path} lacks column(s) {', '.join(missing)}: re-run the coherence stage (`ga-ray coherence RUN_DIR --force`)")
    flipped = table.column("sign_flipped").to_numpy(zero_copy_only=False).astype(bool)
    return table.append_column("sign", pa.array(np.where(flipped, -1.0, 1.0)))


def load_oriented_dictionary(run_dir: RunDir | str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(oriented dictionary K×D float32, sign K float32)."""
    from safetensors.numpy import load_file

    path = stage_dir(run_dir) / ORIENTED_DICTIONARY
    if not path.is_file():
        raise StageError(f"{path} is missing: {_RUN_HINT}")
    tensors = load_file(str(path))
    if "dictionary" not in tensors or "sign" not in tensors:
        raise StageError(f"{path} lacks the 'dictionary' or 'sign' tensor (keys: {', '.join(tensors)}): re-run the coherence stage")
    return tensors["dictionary"], tensors["sign"]


def _load_json(path: Path, missing_ok: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if missing_ok:
            return None
        raise StageError(f"{path} is missing: {_RUN_HINT}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise StageError(f"{path} is not valid JSON ({exc}): re-run the coherence stage (`ga-ray coherence RUN_DIR --force`)") from None


def load_characterisation(run_dir: RunDir | str | Path, missing_ok: bool = False) -> dict[str, Any] | None:
    """characterisation.json (None when absent and `missing_ok`)."""
    return _load_json(stage_dir(run_dir) / CHARACTERISATION, missing_ok)


def load_discovery(run_dir: RunDir | str | Path) -> dict[str, Any] | None:
    """discovery.json, or None: the score exists only when data/ has the label column."""
    return _load_json(stage_dir(run_dir) / DISCOVERY, missing_ok=True)


def load_sweep(run_dir: RunDir | str | Path) -> dict[str, Any] | None:
    """`report/sweep.json`, or None when no sweep ran (or the file is not valid JSON: the report then shows none)."""
    try:
        return _load_json(_root(run_dir) / SWEEP_DIR / SWEEP_JSON, missing_ok=True)
    except StageError:
        return None
