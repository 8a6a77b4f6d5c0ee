"""k-means baseline (dask-ml) on the same normalised rows, scheduled on Ray (`ray_dask_get`), or on dask's
threads in the driver for small gradients (the same graph, so the same result: 7 s against 22 s for the demo's).

The gradient-clustering baseline of related work: one cluster per document, to compare with the
atoms' document groups. Each `gradients/` piece is a dask chunk read by a delayed task (so the
driver never holds Z); dask-ml's `KMeans` (k-means|| initialisation) runs its passes as Ray tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ga_ray.atoms.io import KMEANS_SCHEMA, ParquetPieceReader, list_pieces
from ga_ray.rundir import atomic_write_bytes


def _normalised_piece(pieces, p: int) -> np.ndarray:
    _, Z = ParquetPieceReader(pieces)(p)
    Z = np.asarray(Z, dtype=np.float64)
    n = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.where(n > 0, n, 1.0)


def _piece_ids(pieces, p: int) -> np.ndarray:
    ids, _ = ParquetPieceReader(pieces)(p)
    return np.asarray(ids, dtype=np.int64)


def kmeans_clusters(gradients_dir: Path, n_clusters: int, seed: int, max_piece_rows: int = 8192, in_driver: bool = False) -> dict[str, Any]:
    """dask-ml KMeans over the normalised rows, on Ray (or on dask's threads in this process when
    `in_driver`); returns doc_ids, labels, inertia, iterations."""
    import dask
    import dask.array as da
    from dask_ml.cluster import KMeans  # loads scikit-learn's and scipy's BLAS before the limit below
    from threadpoolctl import threadpool_limits

    if in_driver:
        scheduler: Any = "threads"
    else:
        from ray.util.dask import ray_dask_get

        scheduler = ray_dask_get

    from ga_ray.atoms.io import gradient_dim

    pieces = list_pieces(gradients_dir, max_piece_rows)
    P = gradient_dim(gradients_dir)
    chunks = [da.from_delayed(dask.delayed(_normalised_piece)(pieces, i), shape=(pc.n_rows, P), dtype=np.float64) for i, pc in enumerate(pieces)]
    X = da.concatenate(chunks, axis=0)
    n = X.shape[0]
    k = int(min(n_clusters, n))
    # dask's threads run scikit-learn's OpenMP loops, which call BLAS: with BLAS's own threads inside them
    # OpenBLAS printed "Detect OpenMP Loop and this application may hang" 861 times in a demo run. One BLAS
    # thread per call in this process (a limit set before
    # scipy's BLAS is loaded would miss it): the same clusters in the same time (5.4-5.7 s against 4.9-5.8 s on
    # the demo's gradients, imports included, 3 runs each).
    with dask.config.set(scheduler=scheduler), threadpool_limits(limits=1, user_api="blas"):
        km = KMeans(n_clusters=k, random_state=seed, init_max_iter=3)
        km.fit(X)
        labels = np.asarray(km.predict(X).compute(), dtype=np.int32)
        ids = np.concatenate(dask.compute(*[dask.delayed(_piece_ids)(pieces, i) for i in range(len(pieces))]))
    return {"doc_ids": ids, "labels": labels, "inertia": float(km.inertia_), "n_iter": int(km.n_iter_), "n_clusters": k}


def write_kmeans(path: Path, doc_ids: np.ndarray, labels: np.ndarray) -> None:
    order = np.argsort(doc_ids, kind="stable")
    t = pa.table({"doc_id": pa.array(doc_ids[order], pa.int64()), "cluster": pa.array(labels[order], pa.int32())}, schema=KMEANS_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    atomic_write_bytes(Path(path), sink.getvalue().to_pybytes())
