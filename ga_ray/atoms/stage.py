"""atoms stage: dictionary learning on the unit-normalised projected gradients.

Reads `gradients/`, writes into `atoms/`:
- `dictionary.safetensors` (key "dictionary", K × D float32),
- `codes.parquet` (sparse `doc_id`, `atom`, `coef`) from a final encoding pass (Ray Data map_batches),
- `metrics.json` (objective, FVU, L0, documents per atom, dead atoms, mutual coherence, timings,
  training history, k-means baseline, stability across seeds),
- `kmeans.parquet` (`doc_id`, `cluster`) from dask-ml k-means on Ray (unless disabled).

Backends: `torch` (default; the distributed online learner, checkpointed in `atoms/checkpoint/` and
resumed after a kill) and `sklearn` (the paper's exact MiniBatchDictionaryLearning call).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ga_ray.config import DictionaryConfig, RayConfig
from ga_ray.atoms.io import (
    CODES_FILE,
    DICTIONARY_FILE,
    KMEANS_FILE,
    METRICS_FILE,
    ParquetPieceReader,
    gradient_dim,
    gradient_files,
    gradients_bytes,
    list_pieces,
    load_checkpoint,
    read_all,
    remove_checkpoint,
    save_checkpoint,
    write_dictionary,
)
from ga_ray.atoms.online import OnlineState, mutual_coherence
from ga_ray.atoms.precision import precision_name, product_dtype
from ga_ray.atoms.stream import BlockCoder, StreamPlan
from ga_ray.atoms.trainer import AUTO_BATCH_MIN, FitResult, FitSettings, LocalPool, TrainerState, fit, resolve_batch_size
from ga_ray.context import StageContext
from ga_ray.errors import StageError
from ga_ray.raycluster import init_ray
from ga_ray.resources import cuda_available, plan_workers
from ga_ray.rundir import atomic_write_json

log = logging.getLogger("ga_ray")


def seeds_override(seeds: int) -> list[str]:
    """What `ga-ray atoms --seeds N` means: `--set dictionary.n_seeds=N`."""
    if seeds < 1:
        raise StageError(f"--seeds must be at least 1 (got {seeds})")
    return [f"dictionary.n_seeds={int(seeds)}"]


def batch_rows(cfg: DictionaryConfig, n_rows: int) -> int:
    """The configured batch in rows for `n_rows` documents (`auto`: 256 for the sklearn backend, the
    paper's; `auto_batch_size` for ours), before the plan clamps it to the rows there are."""
    if cfg.batch_size == "auto" and cfg.backend == "sklearn":
        return AUTO_BATCH_MIN
    return resolve_batch_size(cfg.batch_size, cfg.n_atoms, n_rows)


def make_plan(cfg: DictionaryConfig, piece_rows: list[int], dim: int, seed: int) -> StreamPlan:
    n = int(sum(piece_rows))
    batch = batch_rows(cfg, n)
    window_rows = max(batch, int(cfg.shuffle_buffer_mb * 2**20 / (4 * max(dim, 1))))
    return StreamPlan(
        piece_rows=tuple(int(r) for r in piece_rows),
        batch_size=max(1, min(batch, n)),
        window_rows=window_rows,
        seed=seed,
        heldout_fraction=cfg.heldout_fraction,
        heldout_max_rows=cfg.heldout_max_rows,
    )


def fit_settings(cfg: DictionaryConfig, seed: int, n_rows: int) -> FitSettings:
    return FitSettings(
        n_atoms=cfg.n_atoms,
        alpha=cfg.alpha,
        batch_size=batch_rows(cfg, n_rows),
        max_epochs=cfg.max_epochs,
        tol=cfg.tol,
        patience=cfg.patience,
        eval_every=cfg.eval_every,
        init=cfg.init,
        seed=seed,
        dup_threshold=cfg.dup_threshold,
        checkpoint_every=cfg.checkpoint_every,
        stop_on=cfg.stop_on,
        warm_start=cfg.warm_start,
        forget_exponent=cfg.forget_exponent,
        matmul_precision=cfg.matmul_precision,
    )


def _fingerprint(cfg: DictionaryConfig, seed: int, pieces: list, dim: int, device: str = "cpu") -> str:
    keys = (
        "n_atoms alpha batch_size max_epochs tol patience heldout_fraction lasso_tol lasso_max_iter init "
        "eval_every heldout_max_rows shuffle_buffer_mb max_piece_rows dup_threshold stop_on warm_start forget_exponent"
    ).split()
    data = {k: getattr(cfg, k) for k in keys}
    data["batch_size"] = batch_rows(cfg, sum(p.n_rows for p in pieces))  # `auto` as the rows it resolves to
    # `auto` as the type it resolves to on the driver's device (a checkpoint moved to other hardware is
    # resumed only when the products run alike)
    data["matmul_precision"] = precision_name(product_dtype(cfg.matmul_precision, device))
    files = sorted({p.path for p in pieces})
    data.update(seed=seed, dim=dim, pieces=[(Path(p.path).name, p.row_group, p.start, p.n_rows) for p in pieces])
    data["sizes"] = [Path(f).stat().st_size for f in files]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fit_torch(
    gradients_dir: Path,
    cfg: DictionaryConfig,
    seed: int,
    *,
    out_dir: Path | None = None,
    checkpoint_name: str = "checkpoint",
    progress: bool = True,
    on_step=None,
) -> tuple[FitResult, StreamPlan]:
    """The distributed online learner on `gradients/` (Ray must be initialised); checkpoints into
    `out_dir/<checkpoint_name>/` every `checkpoint_every` steps and resumes from a matching one."""
    from tqdm.auto import tqdm

    from ga_ray.atoms.distributed import RayPool

    pieces = list_pieces(gradients_dir, cfg.max_piece_rows)
    dim = gradient_dim(gradients_dir)
    plan = make_plan(cfg, [p.n_rows for p in pieces], dim, seed)
    settings = fit_settings(cfg, seed, plan.n_rows)
    workers = plan_workers("dictionary", cfg)
    # the driver sums the workers' statistics and updates the atoms on ITS device: a GPU cluster's head node
    # often has none (the actors get theirs from the plan)
    device = workers.device if cuda_available() else "cpu"
    fp = _fingerprint(cfg, seed, pieces, dim, device)
    resume = None
    on_ckpt: Callable[[OnlineState, TrainerState], None] | None = None
    if out_dir is not None:
        saved = load_checkpoint(out_dir, checkpoint_name)
        if saved is not None:
            tensors, prog = saved
            if prog.get("fingerprint") == fp:
                resume = (OnlineState.restore(tensors, prog["counters"]), TrainerState.from_json(prog["trainer"]))
                log.info("atoms: resuming from checkpoint at step %d", resume[0].step)
            else:
                log.info("atoms: ignoring a checkpoint made with other inputs or settings")

        def save(state: OnlineState, ts: TrainerState) -> None:
            save_checkpoint(out_dir, state.tensors(), {"fingerprint": fp, "counters": state.counters(), "trainer": ts.to_json()}, checkpoint_name)

        on_ckpt = save

    pool: LocalPool | RayPool
    size = gradients_bytes(gradients_dir)
    if workers.runs_in_driver(size, in_driver_bytes(cfg)):
        # small gradients: the one coder in the driver (the same BlockCoder the actor would run), no actor to start
        log.info("atoms: %.1f MB of gradients: the learner codes them in the driver (dictionary.in_driver_mb = %g)", size / 2**20, cfg.in_driver_mb)
        coder = BlockCoder(
            ParquetPieceReader(pieces), plan, 0, 1, cfg.alpha, lasso_tol=cfg.lasso_tol, lasso_max_iter=cfg.lasso_max_iter, matmul_precision=cfg.matmul_precision
        )
        pool = LocalPool([coder])
    else:
        pool = RayPool(
            pieces,
            plan,
            workers.num_workers,
            cfg.alpha,
            lasso_tol=cfg.lasso_tol,
            lasso_max_iter=cfg.lasso_max_iter,
            use_gpu=workers.use_gpu,
            cpus_per_worker=workers.cpus_per_worker,
            num_threads=workers.torch_threads,
            matmul_precision=cfg.matmul_precision,
        )
    bar = tqdm(desc=f"atoms (seed {seed})", unit="step", disable=not progress)
    try:
        result = fit(pool, plan, settings, device=device, resume=resume, on_checkpoint=on_ckpt, on_step=on_step, progress=bar)
    finally:
        bar.close()
        if isinstance(pool, RayPool):
            pool.shutdown()
    return result, plan


def in_driver_bytes(cfg: DictionaryConfig) -> int:
    """Gradients up to this many bytes on disk are coded in the driver (`dictionary.in_driver_mb`)."""
    return int(cfg.in_driver_mb * 2**20)


def _last_heldout(history: list[dict[str, Any]]) -> float | None:
    """The last held-out objective recorded (None when no rows were held out)."""
    for h in reversed(history):
        if "heldout_objective" in h:
            return h["heldout_objective"]
        if h.get("objective_kind") == "heldout":
            return h["objective"]
    return None


def _training_summary(r: FitResult, plan: StreamPlan) -> dict[str, Any]:
    return {
        "steps": r.steps,
        "epochs": round(r.epochs, 4),
        "stop_reason": r.stop_reason,
        "heldout_rows": int(len(plan.heldout)),
        "train_rows": int(plan.n_train),
        "batch_size": plan.batch_size,
        "matmul_precision": r.matmul_precision,
        "dead_atoms_resampled": r.state.n_dead_resampled,
        "duplicate_atoms_resampled": r.state.n_dup_resampled,
        "unconverged_coder_rows": r.n_unconverged_rows,
        "objective": r.history[-1]["objective"] if r.history else None,
        "objective_kind": r.history[-1].get("objective_kind") if r.history else None,
        "heldout_objective": _last_heldout(r.history),
        "history": r.history,
    }


def _fit_one(gradients_dir: Path, cfg: DictionaryConfig, seed: int, out_dir: Path | None, ckpt: str) -> tuple[np.ndarray, dict[str, Any], dict[str, float]]:
    """(dictionary, training summary, timings) for one seed with the configured backend."""
    if cfg.backend == "sklearn":
        from ga_ray.atoms.sklearn_backend import fit_sklearn, normalise

        t0 = time.perf_counter()
        _, Z = read_all(gradients_dir)
        X = normalise(Z)
        read_s = time.perf_counter() - t0
        res = fit_sklearn(X, cfg.n_atoms, cfg.alpha, min(batch_rows(cfg, X.shape[0]), X.shape[0]), seed, cfg.sklearn_max_iter)
        return res["dictionary"], {"steps": res["n_steps"], "epochs": res["n_iter"], "stop_reason": "sklearn"}, {"read_s": read_s, "fit_s": res["fit_s"]}
    t0 = time.perf_counter()
    r, plan = fit_torch(gradients_dir, cfg, seed, out_dir=out_dir, checkpoint_name=ckpt)
    timings = {f"fit_{k}": round(v, 3) for k, v in r.timings.items()}
    timings["fit_s"] = time.perf_counter() - t0
    return r.state.D.cpu().numpy(), _training_summary(r, plan), timings


def run_atoms(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.dictionary
    grad_dir = ctx.stage_dir("gradients")
    if not grad_dir.exists() or not gradient_files(grad_dir):
        raise StageError(f"no projected gradients in {grad_dir}: run the gradients stage first (`ga-ray gradients`)")
    pieces = list_pieces(grad_dir, cfg.max_piece_rows)
    n_docs = sum(p.n_rows for p in pieces)
    if n_docs < 2:
        raise StageError(f"{grad_dir} holds {n_docs} document(s): dictionary learning needs at least 2")
    if cfg.n_atoms < 1:
        raise StageError(f"dictionary.n_atoms must be at least 1 (got {cfg.n_atoms})")
    dim = gradient_dim(grad_dir)
    init_ray(ctx.cfg.ray)
    out = ctx.out
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    seeds = [cfg.seed + i for i in range(max(1, cfg.n_seeds))]
    D, training, t = _fit_one(grad_dir, cfg, seeds[0], out, "checkpoint")
    timings.update(t)
    write_dictionary(out / DICTIONARY_FILE, D, metadata={"backend": cfg.backend, "alpha": str(cfg.alpha), "seed": str(seeds[0])})

    # final encoding pass (Ray Data map_batches, or in the driver for small gradients) → codes.parquet + metrics
    t0 = time.perf_counter()
    from ga_ray.atoms.encode import encode_dataset

    workers = plan_workers("dictionary", cfg)
    enc = encode_dataset(
        grad_dir,
        torch.from_numpy(D),
        cfg.alpha,
        tol=cfg.lasso_tol,
        max_iter=cfg.lasso_max_iter,
        codes_path=out / CODES_FILE,
        num_workers=workers.num_workers,
        use_gpu=workers.use_gpu,
        batch_size=cfg.encode_batch_size,
        cpus_per_worker=workers.cpus_per_worker,
        num_threads=workers.torch_threads,
        in_driver_max_bytes=in_driver_bytes(cfg),
    )
    timings["encode_s"] = time.perf_counter() - t0
    coh = mutual_coherence(D)

    kmeans_info: dict[str, Any] | None = None
    if cfg.kmeans_clusters:
        from ga_ray.atoms.kmeans import kmeans_clusters, write_kmeans

        t0 = time.perf_counter()
        small = gradients_bytes(grad_dir) <= in_driver_bytes(cfg)
        km = kmeans_clusters(grad_dir, cfg.kmeans_clusters, cfg.seed, cfg.max_piece_rows, in_driver=small)
        write_kmeans(out / KMEANS_FILE, km["doc_ids"], km["labels"])
        sizes = np.bincount(km["labels"], minlength=km["n_clusters"])
        kmeans_info = {"n_clusters": km["n_clusters"], "inertia": km["inertia"], "n_iter": km["n_iter"], "cluster_sizes": sizes.tolist()}
        timings["kmeans_s"] = time.perf_counter() - t0
    elif (out / KMEANS_FILE).exists():  # a baseline from an earlier configuration would mislead
        (out / KMEANS_FILE).unlink()

    stability: dict[str, Any] | None = None
    if len(seeds) > 1:
        from ga_ray.atoms.stability import stability_report

        t0 = time.perf_counter()
        dicts = [D]
        for i, s in enumerate(seeds[1:], start=1):
            Di, _, _ = _fit_one(grad_dir, cfg, s, out, f"checkpoint_seed{i}")
            dicts.append(Di)
        stability = stability_report(dicts, seeds)
        timings["stability_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    timings = {k: round(float(v), 3) for k, v in timings.items()}

    metrics = {
        "backend": cfg.backend,
        "n_docs": enc["n_docs"],
        "dim": dim,
        "n_atoms": int(D.shape[0]),
        "alpha": cfg.alpha,
        "objective": enc["objective"],
        "reconstruction": enc["reconstruction"],
        "l1": enc["l1"],
        "fvu": enc["fvu"],
        "fvu_uncentred": enc["fvu_uncentred"],
        "l0_per_doc": {"mean": enc["l0_mean"], "median": enc["l0_median"], "p99": enc["l0_p99"]},
        "docs_per_atom_median": enc["docs_per_atom_median"],
        "docs_per_atom_median_used": enc["docs_per_atom_median_used"],
        "dead_atoms": enc["dead_atoms"],
        "mutual_coherence": coh,
        "training": training,
        "kmeans": kmeans_info,
        "stability": stability,
        "timings_s": timings,
    }
    atomic_write_json(out / METRICS_FILE, metrics)
    for i in range(len(seeds)):
        remove_checkpoint(out, "checkpoint" if i == 0 else f"checkpoint_seed{i}")
    fit = f"{cfg.backend}, {training['steps']} steps of {training['batch_size']} rows" if "batch_size" in training else cfg.backend
    if training.get("matmul_precision") == "bfloat16":
        fit += ", bfloat16 products"
    line = (
        f"{D.shape[0]} atoms over {enc['n_docs']} docs (D={dim}, {fit}): objective {enc['objective']:.4f}, "
        f"FVU {enc['fvu']:.3f}, L0 {enc['l0_mean']:.1f}/doc, {enc['dead_atoms']} dead, coherence max {coh['max']:.3f}"
    )
    if stability:
        line += f", stable>0.9 {stability['share_above_0.9']:.0%}"
    return {
        "line": line,
        "objective": enc["objective"],
        "fvu": enc["fvu"],
        "l0_mean": enc["l0_mean"],
        "dead_atoms": enc["dead_atoms"],
        "steps": training.get("steps"),
        "epochs": training.get("epochs"),
        "wall_s": timings["total_s"],
    }


def run_stability(gradients_dir: Path, cfg: DictionaryConfig, ray_cfg: RayConfig | None = None, seeds: int = 3) -> dict[str, Any]:
    """Fit `seeds` seeds (cfg.seed, cfg.seed+1, …) and report atom stability (no files written)."""
    from ga_ray.atoms.stability import stability_report

    init_ray(ray_cfg or RayConfig())
    ss = [cfg.seed + i for i in range(seeds)]
    dicts = [_fit_one(Path(gradients_dir), cfg, s, None, "")[0] for s in ss]
    return stability_report(dicts, ss)


__all__ = ["run_atoms", "run_stability", "seeds_override", "fit_torch", "make_plan", "fit_settings"]
