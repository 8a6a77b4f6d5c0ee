"""gradients stage: per-document projected gradients, streamed by a Ray Data actor pool.

Ray wiring (thin): `read_parquet(data/)` → streaming `repartition` into blocks of one window →
`map_batches(GradientsActor, compute=ActorPoolStrategy)` with an integer batch size (`window_docs`),
`gpus_per_worker` per actor, and actor restarts + task retries so that a dead actor's window is recomputed.
Each actor writes the finite rows of each window to its own Parquet file in a temporary sibling of
`gradients/` and streams back only per-document metadata. The driver then keeps exactly the files
that the metadata it received names (a file written by an attempt that died before Ray recorded its
result is an orphan and is deleted), checks that every input document appears exactly once (written,
or excluded as non-finite), renames the files in doc-id order, writes `_gradients.json`, and swaps
the folder into place atomically.

Why the actors write the files rather than `Dataset.write_parquet`: the driver must learn which
documents were excluded (non-finite) and the padding and memory figures, in the same single pass.
(Checked on Ray 2.60: a UDF returning numpy `z` makes `write_parquet` store Ray's own
`ray.data.arrow_tensor_v2` extension, which plain pyarrow reads as `large_list<float>`; returning a
pyarrow table with a native `FixedShapeTensorArray` keeps the native type. We write with
`ga_ray.gradients.io.gradients_table`, i.e. the native type, in any case.)
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ga_ray.gradients.actor import FAULT_ENV, GradientsActor
from ga_ray.kernel.batching import naive_batches, padding_stats
from ga_ray.context import StageContext
from ga_ray.data import io as data_io
from ga_ray.errors import StageError
from ga_ray.raycluster import init_ray
from ga_ray.resources import WorkerPlan, plan_workers, torch_threads_restored
from ga_ray.rundir import atomic_dir, atomic_write_json

log = logging.getLogger("ga_ray")

INFO_FILE = "_gradients.json"  # leading underscore: `pq.read_table("gradients/")` skips it
"""The stage's report beside the Parquet files: D, N, padding, the excluded non-finite documents."""

SUMMARY_MAX_IDS = 20
"""Excluded doc ids quoted in the manifest summary (all of them are in _gradients.json)."""




def _check_factors(factors_dir: Path, reduction: str) -> None:
    path = factors_dir / "factors.json"
    if not path.exists():
        raise StageError(f"no EKFAC factors in {factors_dir}: run the factors stage first (`ga-ray factors`)")
    made_with = json.loads(path.read_text()).get("reduction")
    if made_with and made_with != reduction:
        log.warning(
            "gradients: gradients.reduction=%s but the factors were estimated with reduction=%s; "
            "the preconditioning is then off by the per-document token counts: use the same reduction",
            reduction, made_with,
        )


def _json_float(x: float) -> float | str:
    """A float for JSON: non-finite values as the strings 'nan', 'inf', '-inf' (JSON has no NaN)."""
    x = float(x)
    return x if np.isfinite(x) else str(x)


def _check_config(gc: Any) -> None:
    if gc.window_docs < gc.batch_size:
        raise StageError(f"gradients.window_docs ({gc.window_docs}) must be >= gradients.batch_size ({gc.batch_size})")


def _actor_kwargs(gc: Any, cfg: Any, adapter: Path, factors_dir: Path, out_dir: Path, workers: WorkerPlan) -> dict[str, Any]:
    return {
        "model_cfg": cfg.model,
        "adapter_path": str(adapter),
        "factors_dir": str(factors_dir),
        "out_dir": str(out_dir),
        "max_docs": gc.batch_size,
        "max_tokens": gc.max_tokens_per_batch,
        "reduction": gc.reduction,
        "store_raw": gc.store_raw,
        "device": workers.device,
        "torch_threads": workers.torch_threads,
        "fault": os.environ.get(FAULT_ENV),
        "compile": gc.compile,
    }


def _map(ds: Any, gc: Any, cfg: Any, adapter: Path, factors_dir: Path, out_dir: Path, workers: WorkerPlan) -> Any:
    """The actor pool over the documents; each call gets one window of `window_docs` rows."""
    import ray.data

    return ds.map_batches(
        GradientsActor,
        fn_constructor_kwargs=_actor_kwargs(gc, cfg, adapter, factors_dir, out_dir, workers),
        batch_size=gc.window_docs,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers.num_workers),
        num_cpus=workers.cpus_per_worker,
        num_gpus=workers.gpus_per_worker,
        max_restarts=gc.max_retries,
        max_task_retries=gc.max_retries,
    )


def _collect(ds: Any, n_docs: int) -> dict[str, np.ndarray]:
    """Drive the pipeline; gather the actors' per-document metadata (small) with a progress bar."""
    return _gather(ds.iter_batches(batch_format="numpy", batch_size=None), n_docs)


def _in_driver(data_dir: Path, gc: Any, cfg: Any, adapter: Path, factors_dir: Path, out_dir: Path, workers: WorkerPlan, n_docs: int) -> dict[str, np.ndarray]:
    """The same pass in this process: one `GradientsActor`, fed the data files' windows of `window_docs`
    rows in order (`data_io.iter_token_windows`); torch's threads restored."""
    with torch_threads_restored():
        # no fault injection here: it tests the actor pool's restarts, and would end this process
        kwargs = {**_actor_kwargs(gc, cfg, adapter, factors_dir, out_dir, workers), "fault": None}
        actor = GradientsActor(**kwargs, in_driver=True)
        return _gather((actor(w) for w in data_io.iter_token_windows(data_dir, gc.window_docs)), n_docs)


def _gather(batches: Any, n_docs: int) -> dict[str, np.ndarray]:
    from tqdm.auto import tqdm

    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=n_docs, desc="gradients", unit="doc") as bar:
        for b in batches:
            for k, v in b.items():
                parts.setdefault(k, []).append(np.asarray(v))
            bar.update(len(b["doc_id"]))
    if not parts:
        return {}
    meta = {k: np.concatenate(v) for k, v in parts.items()}
    meta["finite"] = meta["finite"].astype(bool)
    return meta


def _actor_nodes(meta: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per actor that computed documents: its Ray actor id, node id and document count."""
    if "actor_id" not in meta:
        return []
    rows: dict[tuple[str, str], int] = {}
    for a, n in zip(meta["actor_id"], meta["node_id"]):
        rows[(str(a), str(n))] = rows.get((str(a), str(n)), 0) + 1
    return [{"actor_id": a, "node_id": n, "documents": c} for (a, n), c in sorted(rows.items())]


def _check_exactly_once(meta: dict[str, np.ndarray], doc_ids: np.ndarray) -> None:
    """Every input document (sorted unique `doc_ids`) came back exactly once."""
    got = meta.get("doc_id", np.zeros(0, np.int64)).astype(np.int64)
    got_u, got_c = np.unique(got, return_counts=True)
    if len(got) != len(doc_ids) or not np.array_equal(got_u, doc_ids):
        dup = got_u[got_c > 1][:5].tolist()
        missing = np.setdiff1d(doc_ids, got_u)[:5].tolist()
        raise RuntimeError(f"gradients: {len(got)} results for {len(doc_ids)} documents (duplicated: {dup}, missing: {missing}); this is a bug")


def _excluded(meta: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """The documents with a non-finite loss, gradient or z, by doc_id, with their loss."""
    bad = np.flatnonzero(~meta["finite"])
    excluded = sorted(({"doc_id": int(meta["doc_id"][i]), "loss": _json_float(meta["loss"][i])} for i in bad), key=lambda r: r["doc_id"])
    if excluded and len(excluded) == len(meta["finite"]):
        raise StageError(
            f"every one of the {len(excluded)} documents has a non-finite gradient (e.g. losses {[r['loss'] for r in excluded[:3]]}): "
            "the model or adapter is broken (NaN weights?) or the dtype overflows; try model.dtype=float32"
        )
    if excluded:
        log.warning("gradients: %d document(s) with a non-finite gradient excluded: %s", len(excluded), [r["doc_id"] for r in excluded[:SUMMARY_MAX_IDS]])
    return excluded


def _finalise_files(tmp: Path, meta: dict[str, np.ndarray]) -> tuple[list[str], int]:
    """Delete orphans, check the kept files hold each finite document once, rename in doc-id order."""
    referenced = {str(f) for f, ok in zip(meta["file"], meta["finite"]) if ok}
    unseen = sorted(n for n in referenced if not (tmp / n).exists())
    if unseen:
        raise StageError(
            f"the actors wrote {len(unseen)} file(s) (e.g. {unseen[0]}) that this driver cannot see in {tmp}: "
            "on a multi-node Ray cluster the run directory must be on a filesystem shared by every node"
        )
    orphans = 0
    for p in list(tmp.iterdir()):
        if p.name not in referenced:
            p.unlink()
            orphans += 1
    firsts = []
    seen: list[np.ndarray] = []
    for name in referenced:
        ids = pq.read_table(tmp / name, columns=["doc_id"]).column("doc_id").to_numpy()
        seen.append(ids)
        firsts.append((int(ids.min()), name))
    written = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    expected = np.sort(meta["doc_id"][meta["finite"]])
    if len(written) != len(expected) or not np.array_equal(np.sort(written), expected):
        raise RuntimeError(
            f"gradients: the written files hold {len(written)} rows but {len(expected)} finite documents were reported; "
            "this is a bug (please report it with the run directory)"
        )
    names = []
    for i, (_, name) in enumerate(sorted(firsts)):
        final = f"part-{i:05d}.parquet"
        os.replace(tmp / name, tmp / final)
        names.append(final)
    return names, orphans


def run_gradients(ctx: StageContext) -> dict[str, Any]:
    import ray.data

    cfg = ctx.cfg
    gc = cfg.gradients
    _check_config(gc)
    files = data_io.parquet_paths(ctx.data_dir)  # the prepare stage's parts (data/ also holds JSON reports)
    factors_dir = ctx.stage_dir("factors")
    _check_factors(factors_dir, gc.reduction)
    adapter = Path(ctx.adapter_path())
    if not adapter.exists():
        raise StageError(f"adapter folder {adapter} not found: run the finetune stage, or set model.adapter")
    init_ray(cfg.ray)

    index = data_io.read_documents(ctx.data_dir, columns=["doc_id", "n_tokens"])
    doc_ids = index.column("doc_id").to_numpy().astype(np.int64)
    n_docs = len(doc_ids)
    if n_docs == 0:
        raise StageError(f"{ctx.data_dir} holds no documents: check the prepare stage's report (data/prepare.json)")
    uniq, counts = np.unique(doc_ids, return_counts=True)
    if len(uniq) != n_docs:
        raise StageError(f"data/ has duplicate doc_id values (e.g. {uniq[counts > 1][:5].tolist()}): re-run prepare")
    lengths = index.column("n_tokens").to_numpy().astype(np.int64)
    naive = padding_stats(lengths, naive_batches(n_docs, gc.batch_size))

    # one policy for every stage's workers: GPUs that the cluster lacks are an error, a pool that would
    # take every CPU (and starve the read tasks) is shrunk; the torch threads are not
    workers = plan_workers("gradients", gc)
    device = workers.device
    t0 = time.perf_counter()
    in_driver = workers.runs_in_driver(n_docs, gc.in_driver_max_docs)
    with atomic_dir(ctx.out) as tmp:
        if in_driver:
            log.info("gradients: %d documents on one CPU worker: computed in the driver (gradients.in_driver_max_docs = %d)", n_docs, gc.in_driver_max_docs)
            meta = _in_driver(ctx.data_dir, gc, cfg, adapter, factors_dir, tmp, workers, n_docs)
        else:
            # Blocks of one window each (a streaming split): a prepared data/ file is often one block,
            # and one block feeds one actor task, so without it a pool of several actors sits idle.
            ds = (
                ray.data.read_parquet(files)
                .select_columns(["doc_id", "input_ids", "loss_mask"])
                .repartition(target_num_rows_per_block=gc.window_docs)
            )
            with warnings.catch_warnings():
                # Ray 2.60 takes max_restarts / max_task_retries only through **ray_remote_args, which it
                # flags as deprecated (to be replaced by named parameters in 2.64).
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
                out = _map(ds, gc, cfg, adapter, factors_dir, tmp, workers)
            meta = _collect(out, n_docs)
        wall = time.perf_counter() - t0

        _check_exactly_once(meta, uniq)
        excluded = _excluded(meta)
        part_files, orphans = _finalise_files(tmp, meta)

        n_written = int(meta["finite"].sum())
        real_tokens = int(meta["n_tokens"].astype(np.int64).sum())
        padded_tokens = int(meta["padded_len"].astype(np.int64).sum())  # each document counts its batch's padded length
        D = int(pq.read_schema(tmp / part_files[0]).field("z").type.shape[0])
        info = {
            "N": n_written,
            "D": D,
            "n_documents": n_docs,
            "n_excluded_nonfinite": len(excluded),
            "excluded_nonfinite": excluded,
            "padding_fraction": round(1.0 - real_tokens / padded_tokens, 6),
            "padding_fraction_naive": round(naive.padding_fraction, 6),
            "real_tokens": real_tokens,
            "padded_tokens": padded_tokens,
            "labels": "empirical",
            "reduction": gc.reduction,
            "store_raw": gc.store_raw,
            "batch_size": gc.batch_size,
            "max_tokens_per_batch": gc.max_tokens_per_batch,
            "window_docs": gc.window_docs,
            "in_driver": in_driver,
            "num_actors": 0 if in_driver else workers.num_workers,
            "num_gpus_per_actor": workers.gpus_per_worker,
            "cpus_per_actor": round(workers.cpus_per_worker, 3),
            "device": device,
            "wall_time_s": round(wall, 3),
            "docs_per_s": round(n_docs / wall, 3) if wall > 0 else None,
            "tokens_per_s": round(real_tokens / wall, 3) if wall > 0 else None,
            "actor_compute_s": round(float(meta["compute_s"].sum()), 3),
            # where the rest of the wall time went (summed over actors): process start to our code,
            # imports and model load, writing the windows
            "actor_boot_s": round(float(meta["actor_boot_s"].sum()), 3),
            "actor_init_s": round(float(meta["actor_init_s"].sum()), 3),
            "actor_write_s": round(float(meta["write_s"].sum()), 3),
            "peak_mem_mb_per_actor": round(float(meta["peak_mem_mb"].max()), 1),
            "files": part_files,
            "orphan_files_removed": orphans,
            "actors": _actor_nodes(meta),
        }
        atomic_write_json(tmp / INFO_FILE, info)

    summary = {k: v for k, v in info.items() if k not in ("excluded_nonfinite", "files", "actors")}
    summary["nodes"] = sorted({a["node_id"] for a in info["actors"]})
    summary["excluded_doc_ids"] = [r["doc_id"] for r in excluded[:SUMMARY_MAX_IDS]]
    summary["n_files"] = len(part_files)
    summary["line"] = (
        f"{n_written} documents → z[{D}] ({len(excluded)} non-finite excluded), "
        f"{info['docs_per_s']} docs/s, {info['tokens_per_s']} tok/s "
        f"{'in the driver' if in_driver else f'on {workers.num_workers} actor(s)'} ({device}), "
        f"padding {100 * info['padding_fraction']:.1f}% (naive {100 * naive.padding_fraction:.1f}%)"
    )
    return summary
