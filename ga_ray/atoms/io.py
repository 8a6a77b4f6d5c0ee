"""I/O of the atoms stage: gradients/ pieces, checkpoints, and the one owner of the atoms/ files.

Files of an atoms folder (`RUN_DIR/atoms/`, or a sweep's `report/sweep/alpha_<α>/`):
`dictionary.safetensors` (key "dictionary", K × D float32), `codes.parquet` (`CODES_SCHEMA`: sparse
`doc_id`, `atom`, `coef`), `metrics.json`, and `kmeans.parquet` (`KMEANS_SCHEMA`, optional). Readers of
another stage (coherence, groups, report) use `load_dictionary_array`, `load_codes`, `load_kmeans`,
`load_metrics` and never open these files themselves.

Pieces: every row group of every `gradients/*.parquet` file (split into sub-pieces of at most
`max_piece_rows` rows), in file-name order. Readers decode one piece at a time, so memory is bounded
by the piece size whatever N is.

Checkpoints (`atoms/checkpoint/`): `state.safetensors` (dictionary, A, Bt) and `progress.json`
(step counters, stopping-rule state, a fingerprint of the inputs and settings). No pickle. The
folder is replaced atomically, so a kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from ga_ray.errors import StageError
from ga_ray.gradients.io import column_to_numpy, gradient_files  # noqa: F401  (gradient_files: the stage and encode use it)
from ga_ray.rundir import atomic_dir, atomic_write_bytes

CHECKPOINT_DIR = "checkpoint"
CODES_SCHEMA = pa.schema([("doc_id", pa.int64()), ("atom", pa.int32()), ("coef", pa.float32())])
KMEANS_SCHEMA = pa.schema([("doc_id", pa.int64()), ("cluster", pa.int32())])
DICTIONARY_FILE = "dictionary.safetensors"
CODES_FILE = "codes.parquet"
METRICS_FILE = "metrics.json"
KMEANS_FILE = "kmeans.parquet"
_RUN_HINT = "run the atoms stage first (`ga-ray atoms`)"


@dataclass(frozen=True)
class Piece:
    path: str
    row_group: int
    start: int
    """First row inside the row group."""
    n_rows: int


def gradients_bytes(gradients_dir: str | Path) -> int:
    """Bytes on disk of the `gradients/` Parquet files: what decides whether the atoms stage codes them in
    the driver (`dictionary.in_driver_mb`)."""
    return sum(f.stat().st_size for f in gradient_files(gradients_dir))


def list_pieces(gradients_dir: Path, max_piece_rows: int = 8192) -> list[Piece]:
    """All row groups (split to at most `max_piece_rows` rows) of the gradients files, in order."""
    out: list[Piece] = []
    for f in gradient_files(gradients_dir):
        md = pq.ParquetFile(f).metadata
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            for s in range(0, n, max_piece_rows):
                out.append(Piece(str(f), rg, s, min(max_piece_rows, n - s)))
    return out


def gradient_dim(gradients_dir: Path) -> int:
    files = gradient_files(gradients_dir)
    t = pq.read_schema(files[0]).field("z").type
    if isinstance(t, pa.FixedShapeTensorType):
        return int(np.prod(t.shape))
    if pa.types.is_fixed_size_list(t):
        return int(t.list_size)
    storage = getattr(t, "storage_type", None)
    if storage is not None and pa.types.is_fixed_size_list(storage):
        return int(storage.list_size)
    return int(column_to_numpy(pq.ParquetFile(files[0]).read_row_group(0, columns=["z"]).column("z")).shape[1])


class ParquetPieceReader:
    """piece index → (doc_ids, Z float32), decoding only that piece (memory bounded by the piece)."""

    def __init__(self, pieces: list[Piece]):
        self.pieces = pieces
        self._files: dict[str, pq.ParquetFile] = {}

    def _file(self, path: str) -> pq.ParquetFile:
        if path not in self._files:
            if len(self._files) > 64:
                self._files.clear()
            self._files[path] = pq.ParquetFile(path)
        return self._files[path]

    def __call__(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        piece = self.pieces[p]
        f = self._file(piece.path)
        if piece.start == 0 and piece.n_rows == f.metadata.row_group(piece.row_group).num_rows:
            t = f.read_row_group(piece.row_group, columns=["doc_id", "z"])
        else:  # a slice of a large row group: stream it, keeping only the wanted rows
            parts, seen = [], 0
            for batch in f.iter_batches(batch_size=4096, row_groups=[piece.row_group], columns=["doc_id", "z"]):
                lo, hi = max(piece.start - seen, 0), min(piece.start + piece.n_rows - seen, batch.num_rows)
                if hi > lo:
                    parts.append(batch.slice(lo, hi - lo))
                seen += batch.num_rows
                if seen >= piece.start + piece.n_rows:
                    break
            t = pa.Table.from_batches(parts)
        return t.column("doc_id").to_numpy(), column_to_numpy(t.column("z")).astype(np.float32, copy=False)


def read_all(gradients_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids, Z) of the whole folder in piece order (the sklearn backend needs it in memory)."""
    pieces = list_pieces(gradients_dir)
    reader = ParquetPieceReader(pieces)
    ids, zs = [], []
    for p in range(len(pieces)):
        i, z = reader(p)
        ids.append(i)
        zs.append(z)
    return np.concatenate(ids), np.concatenate(zs)


# ---- checkpoints --------------------------------------------------------------------------------
def save_checkpoint(out_dir: Path, tensors: dict[str, torch.Tensor], progress: dict[str, Any], name: str = CHECKPOINT_DIR) -> None:
    """Write `out_dir/<name>/` atomically (safetensors + JSON)."""
    with atomic_dir(Path(out_dir) / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "progress.json").write_text(json.dumps(progress, indent=1, default=_json_default))


def load_checkpoint(out_dir: Path, name: str = CHECKPOINT_DIR) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    d = Path(out_dir) / name
    if not (d / "state.safetensors").exists() or not (d / "progress.json").exists():
        return None
    return load_file(str(d / "state.safetensors")), json.loads((d / "progress.json").read_text())


def remove_checkpoint(out_dir: Path, name: str = CHECKPOINT_DIR) -> None:
    import shutil

    shutil.rmtree(Path(out_dir) / name, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- outputs ------------------------------------------------------------------------------------
def write_dictionary(path: Path, D: torch.Tensor | np.ndarray, metadata: dict[str, str] | None = None) -> None:
    """`dictionary.safetensors` with key "dictionary" (K × P float32), written atomically."""
    from safetensors.torch import save

    t = torch.as_tensor(D).detach().to(torch.float32).cpu().contiguous()
    atomic_write_bytes(Path(path), save({"dictionary": t}, metadata=metadata))


def read_dictionary(path: Path) -> torch.Tensor:
    return load_file(str(path))["dictionary"]


def load_dictionary_array(atoms_dir: Path) -> np.ndarray:
    """The dictionary (K × D float32) of an atoms folder, as numpy."""
    from safetensors.numpy import load_file

    path = Path(atoms_dir) / DICTIONARY_FILE
    if not path.is_file():
        raise StageError(f"{path} is missing: {_RUN_HINT}")
    tensors = load_file(str(path))
    if "dictionary" not in tensors:
        raise StageError(f"{path} has no 'dictionary' tensor (keys: {', '.join(tensors)}): re-run the atoms stage")
    return tensors["dictionary"]


def load_codes(atoms_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_id int64, atom int64, coef float32) of `codes.parquet`, in file order (one row per non-zero code)."""
    path = Path(atoms_dir) / CODES_FILE
    if not path.is_file():
        raise StageError(f"{path} is missing: {_RUN_HINT}")
    t = pq.read_table(str(path), columns=["doc_id", "atom", "coef"])
    return (
        t.column("doc_id").to_numpy().astype(np.int64),
        t.column("atom").to_numpy().astype(np.int64),
        t.column("coef").to_numpy().astype(np.float32),
    )


def load_kmeans(atoms_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(doc_id int64, cluster int64, distance or None) of the k-means baseline, or None when it was not run."""
    path = Path(atoms_dir) / KMEANS_FILE
    if not path.is_file():
        return None
    t = pq.read_table(str(path))
    dist = t.column("distance").to_numpy() if "distance" in t.column_names else None
    return t.column("doc_id").to_numpy().astype(np.int64), t.column("cluster").to_numpy().astype(np.int64), dist


def load_metrics(atoms_dir: Path) -> dict[str, Any] | None:
    """`metrics.json` (objective, FVU, L0, ...), or None when absent or not valid JSON."""
    path = Path(atoms_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def pieces_json(pieces: list[Piece]) -> list[dict[str, Any]]:
    return [asdict(p) for p in pieces]
