"""The `gradients/` Parquet format: readable by plain pyarrow, no Ray needed.

Columns: `doc_id` int64, `z` float32[D] as Arrow's native `fixed_shape_tensor`, `grad_norm` float32
(norm of the raw LoRA-space gradient), `loss` float32, `n_tokens` int32; optional `raw` float16[P].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def tensor_column(x: np.ndarray) -> pa.Array:
    """(N, D) array → Arrow native fixed_shape_tensor column."""
    x = np.ascontiguousarray(x)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(x)


def gradients_table(
    doc_id: np.ndarray, z: np.ndarray, grad_norm: np.ndarray, loss: np.ndarray, n_tokens: np.ndarray, raw: np.ndarray | None = None
) -> pa.Table:
    cols = {
        "doc_id": pa.array(np.asarray(doc_id, dtype=np.int64)),
        "z": tensor_column(np.asarray(z, dtype=np.float32)),
        "grad_norm": pa.array(np.asarray(grad_norm, dtype=np.float32)),
        "loss": pa.array(np.asarray(loss, dtype=np.float32)),
        "n_tokens": pa.array(np.asarray(n_tokens, dtype=np.int32)),
    }
    if raw is not None:
        cols["raw"] = tensor_column(np.asarray(raw, dtype=np.float16))
    return pa.table(cols)


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_shape_tensor (or fixed-size-list) column → (N, D) numpy array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    if hasattr(col, "storage"):  # another tensor extension type (e.g. Ray's): fall back to its storage
        return column_to_numpy(col.storage)
    return np.stack([np.asarray(v, dtype=np.float32) for v in col.to_pylist()])


def gradient_files(gradients_dir: str | Path) -> list[Path]:
    """The Parquet parts of a `gradients/` folder in name order (never `_gradients.json` or a dot-prefixed temp file)."""
    return sorted(p for p in Path(gradients_dir).glob("*.parquet") if not p.name.startswith((".", "_")))


def exists(gradients_dir: str | Path) -> bool:
    return Path(gradients_dir).is_dir() and bool(gradient_files(gradients_dir))


def parquet_files(path: str | Path) -> list[str]:
    """The Parquet files of a gradients folder (it also holds JSON metadata that pyarrow must not parse), or one file."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    files = [str(f) for f in gradient_files(p)]
    if not files:
        raise FileNotFoundError(f"no Parquet files in {p}")
    return files


def read_gradients(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read the `gradients/` folder (or one file) with plain pyarrow, rows sorted by doc_id."""
    table = pq.ParquetDataset(parquet_files(path)).read(columns=columns)
    if "doc_id" in table.column_names:
        table = table.sort_by("doc_id")
    return table


def read_z(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids, Z) with Z of shape (N, D), float32."""
    t = read_gradients(path, columns=["doc_id", "z"])
    return t.column("doc_id").to_numpy(), column_to_numpy(t.column("z")).astype(np.float32, copy=False)


def read_z_rows(path: str | Path, doc_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids int64, Z float32) in file order, only the rows of `doc_ids` when given (a filtered scan)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    flt = None if doc_ids is None else pc.field("doc_id").isin(pa.array(np.asarray(doc_ids, dtype=np.int64)))
    t = pads.dataset(parquet_files(path), format="parquet").to_table(columns=["doc_id", "z"], filter=flt)
    return t.column("doc_id").to_numpy().astype(np.int64), column_to_numpy(t.column("z")).astype(np.float32, copy=False)
