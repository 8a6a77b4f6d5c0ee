"""Final encoding pass: every document coded against the learned dictionary, as Ray Data `map_batches`
(or, for gradients small enough, by the same `Encoder` in the driver: an actor pool's start costs more
than coding a few thousand rows).

The encoder actors return one row per document (doc_id, its nonzero atoms and coefficients, its
reconstruction and L1 terms) plus one summary row per batch (doc_id −1) carrying Σx of the batch for
the centred variance. The driver streams the result (`iter_batches`), explodes it into the sparse
long format `doc_id, atom, coef` written straight to `codes.parquet`, and accumulates the metrics in
memory that does not grow with N (histograms of L0 and of documents per atom).
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ga_ray.atoms.io import CODES_SCHEMA
from ga_ray.atoms.lasso import gram, lasso_gram, row_objective
from ga_ray.atoms.stream import normalise_rows
from ga_ray.gradients.io import column_to_numpy

ENC_SCHEMA = pa.schema(
    [
        ("doc_id", pa.int64()),
        ("atoms", pa.list_(pa.int32())),
        ("coefs", pa.list_(pa.float32())),
        ("rec", pa.float64()),
        ("l1", pa.float64()),
        ("sq", pa.float64()),
        ("xsum", pa.list_(pa.float64())),
    ]
)


def encode_arrays(X: torch.Tensor, D: torch.Tensor, G: torch.Tensor, G64: torch.Tensor, alpha: float, tol: float, max_iter: int):
    """Codes of normalised rows X: (C dense, rec, l1, sq, n_unconverged)."""
    Bx = X @ D.T
    C, info = lasso_gram(G, Bx, alpha, tol=tol, max_iter=max_iter, G64=G64)
    sq = (X.double() ** 2).sum(1)
    rec, l1 = row_objective(C, G, Bx, (X * X).sum(1), alpha, quad=info.quad)
    return C, rec.double(), l1.double(), sq, info.n_unconverged


def sparse_table(doc_ids: np.ndarray, C: torch.Tensor, rec, l1, sq, xsum: np.ndarray) -> pa.Table:
    """Per-document rows (list columns) + one summary row (doc_id −1, xsum)."""
    C = C.detach().cpu()
    nz = C.nonzero()
    counts = torch.bincount(nz[:, 0], minlength=C.shape[0]).numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    atoms = nz[:, 1].numpy().astype(np.int32)
    coefs = C[nz[:, 0], nz[:, 1]].numpy().astype(np.float32)
    n = len(doc_ids)
    empty = pa.array([[] for _ in range(n)], type=pa.list_(pa.float64()))
    t = pa.table(
        {
            "doc_id": pa.array(np.asarray(doc_ids, dtype=np.int64)),
            "atoms": pa.ListArray.from_arrays(pa.array(offsets), pa.array(atoms)),
            "coefs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(coefs)),
            "rec": pa.array(np.asarray(rec.cpu(), dtype=np.float64)),
            "l1": pa.array(np.asarray(l1.cpu(), dtype=np.float64)),
            "sq": pa.array(np.asarray(sq.cpu(), dtype=np.float64)),
            "xsum": empty,
        },
        schema=ENC_SCHEMA,
    )
    summary = pa.table(
        {
            "doc_id": pa.array([-1], pa.int64()),
            "atoms": pa.array([[]], pa.list_(pa.int32())),
            "coefs": pa.array([[]], pa.list_(pa.float32())),
            "rec": pa.array([0.0]),
            "l1": pa.array([0.0]),
            "sq": pa.array([0.0]),
            "xsum": pa.array([xsum.astype(np.float64).tolist()], pa.list_(pa.float64())),
        },
        schema=ENC_SCHEMA,
    )
    return pa.concat_tables([t, summary])


class Encoder:
    """Ray Data callable class: codes batches of `gradients/` rows against a fixed dictionary."""

    def __init__(self, dictionary_ref: list, alpha: float, tol: float, max_iter: int, device: str = "cpu", num_threads: int = 0):
        import ray

        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if num_threads:
            torch.set_num_threads(num_threads)
        D = dictionary_ref[0]
        if isinstance(D, ray.ObjectRef):
            D = ray.get(D)
        self.device = torch.device(device)
        self.D = torch.as_tensor(np.asarray(D, dtype=np.float32)).to(self.device)
        self.G = gram(self.D)
        self.G64 = self.G.double()
        self.alpha, self.tol, self.max_iter = alpha, tol, max_iter

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("doc_id").to_numpy()
        Z = torch.from_numpy(np.ascontiguousarray(column_to_numpy(batch.column("z")), dtype=np.float32)).to(self.device)
        X, _ = normalise_rows(Z)
        C, rec, l1, sq, _ = encode_arrays(X, self.D, self.G, self.G64, self.alpha, self.tol, self.max_iter)
        return sparse_table(ids, C, rec, l1, sq, X.double().sum(0).cpu().numpy())


class CodesAccumulator:
    """Streams encoder output into codes.parquet and the metrics (bounded memory)."""

    def __init__(self, n_atoms: int, path: Path | None):
        self.K = n_atoms
        self.path = Path(path) if path is not None else None
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}") if self.path else None
        self.writer = pq.ParquetWriter(str(self.tmp), CODES_SCHEMA) if self.tmp else None
        self.l0_hist = np.zeros(n_atoms + 1, dtype=np.int64)
        self.docs_per_atom = np.zeros(n_atoms, dtype=np.int64)
        self.coef_abs_sum = np.zeros(n_atoms, dtype=np.float64)
        self.rec = self.l1 = self.sq = 0.0
        self.xsum: np.ndarray | None = None
        self.n = 0

    def add(self, t: pa.Table) -> None:
        is_sum = pc.equal(t.column("doc_id"), -1)
        summ = t.filter(is_sum)
        for xs in summ.column("xsum").to_pylist():
            v = np.asarray(xs, dtype=np.float64)
            self.xsum = v if self.xsum is None else self.xsum + v
        t = t.filter(pc.invert(is_sum))
        if t.num_rows == 0:
            return
        self.n += t.num_rows
        self.rec += float(pc.sum(t.column("rec")).as_py() or 0.0)
        self.l1 += float(pc.sum(t.column("l1")).as_py() or 0.0)
        self.sq += float(pc.sum(t.column("sq")).as_py() or 0.0)
        atoms_col = t.column("atoms").combine_chunks()
        lengths = pc.list_value_length(atoms_col).to_numpy(zero_copy_only=False)
        self.l0_hist += np.bincount(lengths, minlength=self.K + 1)[: self.K + 1]
        flat_atoms = pc.list_flatten(atoms_col).to_numpy(zero_copy_only=False)
        flat_coefs = pc.list_flatten(t.column("coefs").combine_chunks()).to_numpy(zero_copy_only=False)
        if len(flat_atoms):
            self.docs_per_atom += np.bincount(flat_atoms, minlength=self.K)
            self.coef_abs_sum += np.bincount(flat_atoms, weights=np.abs(flat_coefs), minlength=self.K)
        if self.writer is not None:
            parents = pc.list_parent_indices(atoms_col).to_numpy(zero_copy_only=False)
            ids = t.column("doc_id").to_numpy()[parents]
            self.writer.write_table(
                pa.table({"doc_id": pa.array(ids, pa.int64()), "atom": pa.array(flat_atoms, pa.int32()), "coef": pa.array(flat_coefs, pa.float32())}, schema=CODES_SCHEMA)
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            os.replace(self.tmp, self.path)
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            if self.tmp and self.tmp.exists():
                self.tmp.unlink()

    def metrics(self) -> dict[str, Any]:
        n = max(self.n, 1)
        centred = self.sq - (float(self.xsum @ self.xsum) / n if self.xsum is not None else 0.0)
        cdf = np.cumsum(self.l0_hist) / n
        def q(p: float) -> float:
            return float(np.searchsorted(cdf, p - 1e-12)) if self.n else 0.0
        used = self.docs_per_atom > 0
        return {
            "n_docs": self.n,
            "objective": (self.rec + self.l1) / n,
            "reconstruction": self.rec / n,
            "l1": self.l1 / n,
            "fvu": (2 * self.rec) / centred if centred > 0 else float("nan"),
            "fvu_uncentred": (2 * self.rec) / self.sq if self.sq > 0 else float("nan"),
            "l0_mean": float((self.l0_hist * np.arange(self.K + 1)).sum() / n),
            "l0_median": q(0.5),
            "l0_p99": q(0.99),
            "docs_per_atom_median": float(np.median(self.docs_per_atom)) if self.K else 0.0,
            "docs_per_atom_median_used": float(np.median(self.docs_per_atom[used])) if used.any() else 0.0,
            "dead_atoms": int((~used).sum()),
        }


def encode_dataset(
    gradients_dir: Path,
    D: torch.Tensor,
    alpha: float,
    *,
    tol: float,
    max_iter: int,
    codes_path: Path | None,
    num_workers: int = 1,
    use_gpu: bool = False,
    batch_size: int = 1024,
    cpus_per_worker: float = 1.0,
    num_threads: int | None = None,
    in_driver_max_bytes: int = 0,
) -> dict[str, Any]:
    """Run the encoding pass with Ray Data and write codes (atomically); returns the metrics.

    `num_threads`: torch threads per actor (None: `cpus_per_worker` rounded down, at least 1).
    `in_driver_max_bytes`: gradient files of at most this many bytes in all are coded in this process
    instead (CPU only): the same `Encoder`, the same batches, so the same codes row for row."""
    import ray
    import ray.data

    from ga_ray.atoms.io import gradient_files, gradients_bytes

    files = [str(f) for f in gradient_files(gradients_dir)]
    threads = num_threads or max(1, int(cpus_per_worker))
    if not use_gpu and gradients_bytes(gradients_dir) <= in_driver_max_bytes:
        return _encode_in_driver(files, D, alpha, tol, max_iter, codes_path, batch_size, threads)
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # codes.parquet in gradients/ order, run after run
    try:
        return _encode(files, D, alpha, tol, max_iter, codes_path, num_workers, use_gpu, batch_size, cpus_per_worker, threads)
    finally:
        ctx.execution_options.preserve_order = old_order


def _encode(files, D, alpha, tol, max_iter, codes_path, num_workers, use_gpu, batch_size, cpus_per_worker, num_threads) -> dict[str, Any]:
    import ray
    import ray.data

    ds = ray.data.read_parquet(files).select_columns(["doc_id", "z"])
    ref = ray.put(D.detach().cpu().numpy().astype(np.float32))
    ds = ds.map_batches(
        Encoder,
        fn_constructor_args=([ref], alpha, tol, max_iter),
        fn_constructor_kwargs={"device": "cuda" if use_gpu else "cpu", "num_threads": num_threads},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=max(1, num_workers)),
        num_cpus=cpus_per_worker,
        num_gpus=1 if use_gpu else 0,
    )
    acc = CodesAccumulator(D.shape[0], codes_path)
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            acc.add(batch)
    except BaseException:
        acc.abort()
        raise
    acc.close()
    return acc.metrics()


def _encode_in_driver(files, D, alpha, tol, max_iter, codes_path, batch_size, num_threads) -> dict[str, Any]:
    """The pass in this process, file by file in `gradients/` order, batches of `batch_size` rows."""
    from ga_ray.resources import torch_threads_restored

    with torch_threads_restored():
        encoder = Encoder([D.detach().cpu().numpy()], alpha, tol, max_iter, num_threads=num_threads)
        acc = CodesAccumulator(D.shape[0], codes_path)
        try:
            for f in files:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["doc_id", "z"]):
                    acc.add(encoder(pa.Table.from_batches([rb])))
        except BaseException:
            acc.abort()
            raise
        acc.close()
        return acc.metrics()


def encode_local(Z: np.ndarray, doc_ids: np.ndarray, D: torch.Tensor, alpha: float, *, tol: float, max_iter: int, codes_path: Path | None, batch_size: int = 2048) -> dict[str, Any]:
    """The same pass in-process (no Ray), for in-memory matrices."""
    D = D.to(torch.float32)
    G = gram(D)
    G64 = G.double()
    acc = CodesAccumulator(D.shape[0], codes_path)
    for s in range(0, Z.shape[0], batch_size):
        X, _ = normalise_rows(torch.from_numpy(np.ascontiguousarray(Z[s : s + batch_size], dtype=np.float32)))
        C, rec, l1, sq, _ = encode_arrays(X, D, G, G64, alpha, tol, max_iter)
        acc.add(sparse_table(doc_ids[s : s + batch_size], C, rec, l1, sq, X.double().sum(0).numpy()))
    acc.close()
    return acc.metrics()
