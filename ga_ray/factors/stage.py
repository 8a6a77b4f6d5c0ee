"""factors stage: EKFAC factors of every LoRA block, computed by a Ray Train `TorchTrainer` job.

Layers: the math is in `ga_ray.factors.compute` (pure, collectives abstracted by a `comm`); this file
is the Ray wiring (trainer, dataset shards, the worker loop) and the I/O (`factors/`).

Workers (`factors.num_workers`, gloo on CPU / NCCL on GPU) each read their shard of `data/`
(`ray.train.get_dataset_shard("train")`; split without dropping rows, unlike Ray Train's default
equal split), run pass 1 (covariances) and pass 2 (Λ, over the `"lambda"` dataset, a seeded
subsample, when `lambda_max_docs` is set) and all-reduce; eigendecompositions are spread over the
workers. Where the result goes (`factors.save_from`): by default rank 0 writes `factors/` itself,
which assumes the run directory is on a filesystem every node sees (true locally, and required on
a cluster anyway: the gradients actors read `factors/` from any node); with `driver`, rank 0
returns the tensors through Ray Train's return value and the driver writes them.

Small runs skip Ray Train: with one CPU worker and at most `factors.in_driver_max_docs` documents the same
computation (`factors_of_windows`, one rank) runs in the driver on the data files' windows; tested equal to
the two-worker Ray Train result and to the in-process reference (rtol 1e-6). A TorchTrainer's start-up (controller, worker, data-split actors) was
~15 s of a ~20 s stage on the tiny test worlds.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ga_ray.context import StageContext
from ga_ray.data import io as data_io
from ga_ray.errors import StageError

_COLUMNS = ["doc_id", "input_ids", "loss_mask"]
log = logging.getLogger("ga_ray")


# ------------------------------------------------------------------------------------ driver side
def _parquet_files(data_dir: Path) -> list[str]:
    return data_io.parquet_paths(data_dir)  # the prepare stage's parts (data/ also holds JSON reports)


def read_doc_ids(data_dir: Path) -> np.ndarray:
    return data_io.read_doc_ids(data_dir)


class _SubsampleFilter:
    """Batch filter keeping the seeded Λ subsample (depends only on seed and doc_id): a Ray Data `map_batches`
    function on Ray Train, applied to each window in the driver."""

    def __init__(self, seed: int, threshold: int):
        self.seed = seed
        self.threshold = threshold

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ga_ray.factors.compute import in_subsample

        keep = in_subsample(batch["doc_id"], self.seed, self.threshold)
        return {k: v[keep] for k, v in batch.items()}


def _no_drop_data_config():
    """Ray Train's DataConfig, splitting shards with `equal=False` so that no document is dropped."""
    from ray.train import DataConfig

    class NoDropDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            return output

    return NoDropDataConfig()


def _worker_failure_message(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank = sorted(failures)[0]
        inner = failures[rank]
        text = str(inner).strip().splitlines()
        # Ray wraps the worker's exception with its traceback; the last line is "Type: message"
        last = next((ln for ln in reversed(text) if ln.strip()), str(inner))
        return f"worker {rank}: {last.strip()}"
    return f"{type(exc).__name__}: {exc}"


def run_factors(ctx: StageContext) -> dict[str, Any]:
    """The factors stage (see the module docstring). Returns the summary (per-block table under `blocks`)."""
    from ga_ray.tables import print_table
    from ga_ray.factors.compute import subsample_threshold
    from ga_ray.factors.factors import Factors
    from ga_ray.raycluster import init_ray, show_detail
    from ga_ray.resources import plan_workers

    init_ray(ctx.cfg.ray)
    fcfg = ctx.cfg.factors
    adapter = ctx.adapter_path()
    if not Path(adapter).exists():
        raise StageError(f"adapter folder {adapter} does not exist: run the finetune stage or set model.adapter")
    data_dir = ctx.data_dir
    doc_ids = read_doc_ids(data_dir)
    if len(doc_ids) == 0:
        raise StageError(f"{data_dir} holds no documents; check the prepare stage's output")
    threshold = subsample_threshold(doc_ids, fcfg.seed, fcfg.lambda_max_docs)

    # Train workers that take every CPU leave none to read the data (Ray Data would wait forever): the policy shrinks them
    workers = plan_workers("factors", fcfg)
    use_gpu = workers.use_gpu
    out_dir = Path(ctx.out)
    config = {
        "model": ctx.cfg.model.model_dump(mode="json"),
        "adapter": str(adapter),
        "out": str(out_dir),
        "factors": fcfg.model_dump(mode="json"),
        "has_lambda": threshold is not None,
        "n_docs_total": int(len(doc_ids)),
    }
    in_driver = workers.runs_in_driver(len(doc_ids), fcfg.in_driver_max_docs)
    subsample = _SubsampleFilter(fcfg.seed, threshold) if threshold is not None else None  # the Λ pass's documents
    t0 = time.perf_counter()
    if in_driver:
        log.info("factors: %d documents on one CPU worker: computed in the driver (factors.in_driver_max_docs = %d)", len(doc_ids), fcfg.in_driver_max_docs)
        rv = _in_driver(config, data_dir, subsample)
    else:
        rv = _on_ray_train(config, data_dir, subsample, workers, ctx)
    wall = time.perf_counter() - t0
    rv = rv or {}
    if rv.get("error"):
        raise StageError(rv["error"])
    if fcfg.save_from == "driver":
        factors = _factors_from_payload(rv["payload"])
        factors.save(out_dir)
    factors = Factors.load(out_dir)
    rows = factors.summary_rows()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        print_table(f"EKFAC factors: {len(rows)} LoRA blocks, D={factors.D} ({factors.eigenvalues}, fisher={factors.meta.get('fisher')})", rows)
    show_detail(table.getvalue())  # the per-block table: on the terminal with --verbose, else in RUN_DIR/logs/
    timings = {k: round(float(v), 4) for k, v in (rv.get("timings") or {}).items()}
    timings["fit_wall_s"] = round(wall, 3)
    kept = [r["Lambda kept"] for r in rows]
    meta = factors.meta
    line = (
        f"{len(rows)} blocks, D={factors.D}, {meta['n_docs']} docs / {meta['n_tokens']} tokens, fisher={meta['fisher']}, "
        f"{factors.eigenvalues}, {fcfg.num_workers} worker(s); Λ mass kept by top-{fcfg.top_k}: median {float(np.median(kept)):.3f}; "
        f"{meta.get('n_clamped_eigenvalues', 0)} negative eigenvalue(s) clamped"
    )
    return {
        "line": line,
        "n_blocks": len(rows),
        "D": factors.D,
        "n_docs": meta["n_docs"],
        "n_docs_lambda": meta["n_docs_lambda"],
        "n_tokens": meta["n_tokens"],
        "fisher": meta["fisher"],
        "eigenvalues": factors.eigenvalues,
        "top_k": fcfg.top_k,
        "num_workers": fcfg.num_workers,
        "in_driver": in_driver,
        "n_clamped_eigenvalues": meta.get("n_clamped_eigenvalues", 0),
        "padding_fraction": meta.get("padding_fraction"),
        "timings": timings,
        "blocks": rows,
    }


def _on_ray_train(config: dict[str, Any], data_dir: Path, subsample: _SubsampleFilter | None, workers: Any, ctx: StageContext) -> dict[str, Any] | None:
    """A Ray Train `TorchTrainer` over Ray Data's read of data/ (and the Λ subsample); rank 0's return value."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ga_ray.resources import fit_keeping_sigint

    n_workers = workers.num_workers
    ds = ray.data.read_parquet(_parquet_files(data_dir)).select_columns(_COLUMNS)
    if n_workers > 1:
        # small blocks, so that every worker gets documents (Parquet files are read whole, in one block)
        rows_per_block = max(1, min(1024, -(-int(config["n_docs_total"]) // (4 * n_workers))))
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    datasets = {"train": ds}
    if subsample is not None:
        datasets["lambda"] = ds.map_batches(subsample, batch_format="numpy")
    storage = ctx.run_dir.root / ".ray_train"
    name = f"factors-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=workers.use_gpu, resources_per_worker=workers.train_resources()),
        datasets=datasets,
        dataset_config=_no_drop_data_config(),
        run_config=RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=0)),
    )
    try:
        result = fit_keeping_sigint(trainer)
    except Exception as exc:  # Ray Train wraps worker exceptions (TrainingFailedError)
        raise StageError(f"factors job failed: {_worker_failure_message(exc)}") from exc
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)
        try:
            storage.rmdir()
        except OSError:  # another job's folder is still there
            pass
    return result.return_value


# ------------------------------------------------------------------------------------ worker side
def _train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: its shards' windows into `factors_of_windows` (rank 0 saves or returns them)."""
    import ray.train
    import ray.train.torch

    from ga_ray.factors.distributed import get_comm

    fcfg_batch = int(config["factors"]["batch_size"])
    ctx = ray.train.get_context()
    train_it = ray.train.get_dataset_shard("train")
    lambda_it = ray.train.get_dataset_shard("lambda") if config["has_lambda"] else None

    def windows_of(it):
        return lambda: it.iter_batches(batch_size=16 * fcfg_batch, batch_format="numpy", prefetch_batches=1)

    return factors_of_windows(config, windows_of(train_it), windows_of(lambda_it) if lambda_it is not None else None,
                              rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device(),
                              comm_factory=get_comm)


def factors_of_windows(config: dict[str, Any], train_windows: Any, lambda_windows: Any, *, rank: int, world: int, device: Any, comm_factory: Any) -> dict[str, Any] | None:
    """Load the model, compute the factors with the other ranks (`comm_factory()`), rank 0 saves.

    `train_windows` / `lambda_windows`: functions returning an iterable of numpy column windows (each pass
    calls them again). Shared by the Ray Train workers and the in-driver path (one rank, `LocalComm`).
    """
    import torch

    from ga_ray.config import FactorsConfig, ModelConfig
    from ga_ray.factors.compute import FactorSettings, NonFiniteFactorError, bucketed_batches, compute_factors
    from ga_ray.kernel.loading import load_lora_model
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    fcfg = FactorsConfig(**config["factors"])
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(fcfg.cpus_per_worker)))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model = load_lora_model(ModelConfig(**config["model"]), config["adapter"], device=device)
    blocks = find_lora_blocks(model)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else 0
    timings["load_model_s"] = time.perf_counter() - t0

    def batches_of(windows):
        return lambda: bucketed_batches(windows(), fcfg.batch_size, fcfg.max_tokens_per_batch, pad_id)

    bar_total = max(1, config["n_docs_total"] // world)

    def progress(what: str):
        if rank != 0:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=bar_total, desc=f"factors {what} (rank 0)", unit="doc", mininterval=5.0, leave=False)
        return bar.update

    settings = FactorSettings(
        fisher=fcfg.fisher,
        reduction=fcfg.reduction,
        seed=fcfg.seed,
        eigenvalues=fcfg.eigenvalues,
        top_k=fcfg.top_k,
        epsilon=fcfg.epsilon,
        cov_dtype=torch.float64 if fcfg.covariance_dtype == "float64" else torch.float32,
        keep_covariances=fcfg.save_covariances,
    )
    comm = comm_factory()
    try:
        factors = compute_factors(
            model,
            blocks,
            batches_of(train_windows),
            settings,
            lambda_batches=batches_of(lambda_windows) if lambda_windows is not None else None,
            comm=comm,
            device=device,
            timings=timings,
            progress=progress,
        )
    except NonFiniteFactorError as exc:  # raised on every rank alike (after the collective)
        return {"error": str(exc)} if rank == 0 else None
    factors.meta["lambda_max_docs"] = fcfg.lambda_max_docs
    factors.meta["device"] = str(device.type)
    if rank != 0:
        return None
    t0 = time.perf_counter()
    out: dict[str, Any] = {"timings": timings}
    if fcfg.save_from == "worker":
        factors.save(Path(config["out"]))
    else:
        out["payload"] = _factors_payload(factors)
    timings["save_s"] = time.perf_counter() - t0
    return out


def _in_driver(config: dict[str, Any], data_dir: Path, subsample: _SubsampleFilter | None) -> dict[str, Any] | None:
    """`factors_of_windows` in this process: the data files' windows (`data_io.iter_token_windows`), the Λ
    subsample by the same filter; torch's threads restored afterwards."""
    import torch

    from ga_ray.factors.distributed import LocalComm
    from ga_ray.resources import torch_threads_restored

    rows = 16 * int(config["factors"]["batch_size"])

    def windows():
        return data_io.iter_token_windows(data_dir, rows)

    def lambda_windows():
        for w in windows():
            kept = subsample(w)
            if len(kept["doc_id"]):
                yield kept

    with torch_threads_restored():
        return factors_of_windows(config, windows, lambda_windows if subsample is not None else None, rank=0, world=1,
                                  device=torch.device("cpu"), comm_factory=LocalComm)


def _factors_payload(factors) -> dict[str, Any]:
    return {"meta": factors.to_json(), "tensors": {k: v.numpy() for k, v in factors.tensors().items()}}


def _factors_from_payload(payload: dict[str, Any]):
    import tempfile

    import torch
    from safetensors.torch import save_file

    from ga_ray.factors.factors import Factors
    from ga_ray.rundir import atomic_write_json

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in payload["tensors"].items()}, str(Path(tmp) / "factors.safetensors"))
        atomic_write_json(Path(tmp) / "factors.json", payload["meta"])
        return Factors.load(tmp, covariances=True)
