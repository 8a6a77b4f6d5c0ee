"""`ga-ray bench factors`: the factors stage and the one-pass per-document gradients, against their peers.

On the same documents, in the same process and run:
- per-document gradients: our batched pass (`per_document_gradients`: one forward + one backward
  per padded batch, hooks) against the paper code's method (one forward/backward per document,
  reading `param.grad`). Throughput in docs/s and the ratio (goal ≥ 10×); the two are checked to
  agree on a few documents.
- EKFAC factors in this process (no Ray: the kernel cost of the passes), then the real stage
  (`run_factors`) with 1 and 2 workers, where one worker on few documents computes in the driver
  (`factors.in_driver_max_docs`), so one worker is also run on a Ray Train `TorchTrainer`: covariance pass,
  eigendecomposition and Λ pass times (measured inside the workers, slowest worker), and the job's
  wall time (worker start and model loading included).

Inputs: the demo world of `run_dir` (a run directory with `config.yaml`, `data/` and the adapter),
or `model_path` + `adapter` + `data` folders, else a synthetic ~2M-parameter Llama with a random
LoRA r=8 on q_proj/v_proj and documents of log-normal length (median ~100 tokens).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ga_ray.bench.common import machine_info, print_table, scratch_stage

SYNTH = {"vocab_size": 2048, "hidden_size": 160, "n_layers": 4, "n_heads": 4, "intermediate_size": 432}
QUICK = {"vocab_size": 256, "hidden_size": 32, "n_layers": 2, "n_heads": 2, "intermediate_size": 64}


# ------------------------------------------------------------------------------------------ inputs
def _synthetic_world(root: Path, quick: bool, n_docs: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ga_ray.kernel.tiny_llama import add_random_lora, build_tiny_llama, tiny_llama_config

    dims = QUICK if quick else SYNTH
    base = build_tiny_llama(tiny_llama_config(dims["vocab_size"], dims["hidden_size"], dims["n_layers"], dims["n_heads"], dims["intermediate_size"], max_positions=1024), seed=0)
    base.save_pretrained(root / "base_model")
    n_params = sum(p.numel() for p in base.parameters())
    model = add_random_lora(base, r=8, alpha=16, b_scale=0.02, b_seed=1)  # a fine-tuned adapter has non-zero B
    model.save_pretrained(root / "adapter")
    rng = np.random.default_rng(0)
    median, max_len = (30, 64) if quick else (100, 400)
    lengths = np.clip(rng.lognormal(np.log(median), 0.5, size=n_docs), 8, max_len).astype(int)
    rows = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, dims["vocab_size"], size=n).astype(np.int32)
        mask = np.zeros(n, np.int8)
        mask[int(n * rng.uniform(0.2, 0.6)) :] = 1
        rows.append({"doc_id": i, "input_ids": ids.tolist(), "loss_mask": mask.tolist(), "n_tokens": int(n)})
    data = root / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), data / "part-00000.parquet")
    return {"kind": "synthetic", "model_path": root / "base_model", "adapter": root / "adapter", "data": data, "model_params": int(n_params)}


def _given_world(opts: dict[str, Any]) -> dict[str, Any]:
    if opts.get("run_dir"):
        from ga_ray.config import load_config

        run_dir = Path(opts["run_dir"])
        cfg = load_config(run_dir / "config.yaml")
        adapter = run_dir / "adapter" if cfg.finetune.enabled else Path(cfg.model.adapter or "")
        world = {"kind": f"run {run_dir}", "model_path": Path(cfg.model.path or ""), "adapter": adapter, "data": run_dir / "data"}
    else:
        world = {"kind": "given", "model_path": Path(opts["model_path"]), "adapter": Path(opts["adapter"]), "data": Path(opts["data"])}
    for key in ("model_path", "adapter", "data"):
        if not world[key].exists():
            raise FileNotFoundError(f"{world[key]} is missing ({key}); run the pipeline up to the finetune stage first")
    world["model_params"] = None
    return world


def _subset(world: dict[str, Any], root: Path, n_docs: int) -> tuple[Path, list[dict]]:
    import pyarrow.parquet as pq

    from ga_ray.data import io as data_io

    table = data_io.read_documents(world["data"], columns=["doc_id", "input_ids", "loss_mask", "n_tokens"]).sort_by("doc_id")
    table = table.slice(0, min(n_docs, table.num_rows))
    out = root / "bench_data"
    out.mkdir()
    step = -(-table.num_rows // 4)
    for k in range(4):  # a few files: the stage's shards
        pq.write_table(table.slice(k * step, step), out / f"part-{k:05d}.parquet")
    return out, table.to_pylist()


# ------------------------------------------------------------------------------------------ methods
def paper_loop_gradients(model, blocks, rows: list[dict]) -> list[dict]:
    """The paper code's method: one forward/backward per document, gradients read from `param.grad`."""
    import torch
    import torch.nn.functional as F

    params = dict(model.named_parameters())
    lora = [params[b.name] for b in blocks]
    saved = [p.requires_grad for p in lora]
    out = []
    try:
        for p in lora:
            p.requires_grad_(True)
        for r in rows:
            ids = torch.as_tensor(np.asarray(r["input_ids"]), dtype=torch.long)[None]
            mask = torch.as_tensor(np.asarray(r["loss_mask"]), dtype=torch.bool)[1:]
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            loss = F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum")
            loss.backward()
            out.append({b.name: p.grad.detach().clone() for b, p in zip(blocks, lora)})
        model.zero_grad(set_to_none=True)
    finally:
        for p, f in zip(lora, saved):
            p.requires_grad_(f)
    return out


def _run_stage(world: dict[str, Any], data_dir: Path, root: Path, workers: int, cpus_per_worker: float, batch_size: int, max_tokens: int, top_k: int, ray_train: bool = False) -> dict[str, Any]:
    """One run of the real stage. With one CPU worker and few documents it computes in the driver
    (`factors.in_driver_max_docs`); `ray_train=True` forces the Ray Train `TorchTrainer` (`=0`)."""
    from ga_ray.factors.stage import run_factors

    tag = f"w{workers}" + ("_train" if ray_train else "")
    ctx = scratch_stage(root, f"run_{tag}", "factors", world, {"data": data_dir}, [
        *(["factors.in_driver_max_docs=0"] if ray_train else []),
        f"factors.num_workers={workers}",
        f"factors.cpus_per_worker={cpus_per_worker}",
        f"factors.batch_size={batch_size}",
        f"factors.max_tokens_per_batch={max_tokens}",
        f"factors.top_k={top_k}",
        "factors.gpus_per_worker=0",
    ])
    summary = run_factors(ctx)
    shutil.rmtree(ctx.run_dir.root, ignore_errors=True)
    return summary


def stage_runs(workers: list[int]) -> list[tuple[int, bool]]:
    """(workers, force Ray Train) for each stage run: every requested worker count with the stage's
    defaults, and with one worker (whose default may run in the driver) also Ray Train forced."""
    runs = [(w, False) for w in workers]
    if 1 in workers:
        runs.insert(workers.index(1) + 1, (1, True))
    return runs


def stage_label(in_driver: bool, cpus_per_worker: float) -> str:
    """The table's name for a stage run: where it computed (a driver run has no worker CPU share)."""
    return "stage, in the driver" if in_driver else f"stage, Ray Train ({cpus_per_worker:g} CPU/worker)"


def _interleaved_medians(fns: dict[str, Any], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, repetitions interleaved (a busy machine slows all alike)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


# ------------------------------------------------------------------------------------------ main
def main(quick: bool = False, **opts: Any) -> dict[str, Any]:
    """Options: run_dir | (model_path, adapter, data); n_docs, loop_docs, batch_size, max_tokens_per_batch, reps, workers
    (e.g. [1, 2]; default [] with quick), cpus_per_worker, top_k, threads."""
    import torch

    from ga_ray.config import ModelConfig
    from ga_ray.kernel.collate import collate
    from ga_ray.factors.compute import FactorSettings, bucketed_batches, compute_factors
    from ga_ray.kernel.per_document import per_document_gradients
    from ga_ray.kernel.loading import load_lora_model
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    n_docs = int(opts.get("n_docs", 32 if quick else 512))
    loop_docs = int(opts.get("loop_docs", 8 if quick else 64))
    batch_size = int(opts.get("batch_size", 16))
    reps = int(opts.get("reps", 1 if quick else 3))
    workers = list(opts.get("workers", [] if quick else [1, 2]))
    top_k = int(opts.get("top_k", 50))
    max_tokens = int(opts.get("max_tokens_per_batch", 4096))
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    cores = os.cpu_count() or 1
    cpus_per_worker = float(opts.get("cpus_per_worker", min(1.0, max(0.25, (cores - 1) / max(workers or [1])))))

    tmp = Path(tempfile.mkdtemp(prefix="ga-ray-bench-factors-"))
    try:
        if opts.get("run_dir") or opts.get("model_path"):
            world = _given_world(opts)
        else:
            world = _synthetic_world(tmp, quick, n_docs)
        data_dir, rows = _subset(world, tmp, n_docs)
        model = load_lora_model(ModelConfig(path=str(world["model_path"]), dtype="float32"), world["adapter"])
        blocks = find_lora_blocks(model)
        n_tokens = int(sum(len(r["input_ids"]) for r in rows))
        window = 16 * batch_size  # as the stage does: sort each window by length, cut by a token budget
        cols = [{k: [r[k] for r in rows[i : i + window]] for k in ("doc_id", "input_ids", "loss_mask")} for i in range(0, len(rows), window)]
        batches = list(bucketed_batches(cols, batch_size, max_tokens))
        padded = int(sum(b.input_ids.numel() for b in batches))
        loop_rows = rows[:: max(1, len(rows) // loop_docs)][:loop_docs]

        # -- per-document gradients: batched one-pass vs one backward per document
        med = _interleaved_medians(
            {"batched": lambda: [per_document_gradients(model, blocks, b) for b in batches], "loop": lambda: paper_loop_gradients(model, blocks, loop_rows)},
            reps=reps,
        )
        t_batched, t_loop = med["batched"], med["loop"]
        check_rows = loop_rows[:3]
        ours = per_document_gradients(model, blocks, collate(check_rows))
        ref = paper_loop_gradients(model, blocks, check_rows)
        max_rel = max(
            float((ours.grads[b.name][n] - ref[n][b.name]).norm() / ref[n][b.name].norm().clamp_min(1e-30)) for n in range(len(check_rows)) for b in blocks
        )
        batched_dps = len(rows) / t_batched
        loop_dps = len(loop_rows) / t_loop
        grad_rows = [
            {"method": "batched one-pass (ours)", "docs": len(rows), "median_s": t_batched, "docs_per_s": batched_dps, "tokens_per_s": n_tokens / t_batched},
            {
                "method": "one backward per doc (paper)",
                "docs": len(loop_rows),
                "median_s": t_loop,
                "docs_per_s": loop_dps,
                "tokens_per_s": sum(len(r["input_ids"]) for r in loop_rows) / t_loop,
            },
        ]
        ratio = batched_dps / loop_dps
        print_table(f"per-document gradients ({len(blocks)} LoRA blocks, batch {batch_size}, padding {1 - n_tokens / padded:.1%}): ratio {ratio:.1f}x", grad_rows)

        # -- factors in this process (no Ray)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        compute_factors(model, blocks, lambda: iter(batches), FactorSettings(top_k=top_k), timings=timings)
        timings["total_s"] = time.perf_counter() - t0
        factor_rows = [{"run": "in-process (no Ray)", "workers": 1, **{k: round(v, 3) for k, v in timings.items()}}]

        # -- the real stage: defaults (one worker and few documents: in the driver), then Ray Train
        stage = {}
        if workers:
            from ga_ray.config import RayConfig
            from ga_ray.raycluster import init_ray

            init_ray(RayConfig(address=opts.get("address")))
            for w, ray_train in stage_runs(workers):
                s = _run_stage(world, data_dir, tmp, w, cpus_per_worker, batch_size, max_tokens, top_k, ray_train=ray_train)
                in_driver = bool(s.get("in_driver"))
                if in_driver and ray_train:
                    raise RuntimeError("factors.in_driver_max_docs=0 did not force Ray Train")
                t = s["timings"]
                stage[f"{w}_{'driver' if in_driver else 'train'}"] = {**t, "in_driver": in_driver}
                factor_rows.append(
                    {
                        "run": stage_label(in_driver, cpus_per_worker),
                        "workers": w,
                        "covariance_pass_s": t.get("covariance_pass_s"),
                        "eigendecomposition_s": t.get("eigendecomposition_s"),
                        "lambda_pass_s": t.get("lambda_pass_s"),
                        "total_s": t.get("fit_wall_s"),
                    }
                )
        for r in factor_rows:
            for k in ("covariance_pass_s", "eigendecomposition_s", "lambda_pass_s", "total_s"):
                r.setdefault(k, None)
        print_table(f"EKFAC factors over {len(rows)} docs / {n_tokens} tokens (total_s of a stage run: the whole Ray job)", factor_rows)
        info = machine_info()
        print(f"\nmachine: {info}; world: {world['kind']}, model params: {world.get('model_params')}")
        return {
            "machine": info,
            "world": world["kind"],
            "model_params": world.get("model_params"),
            "n_docs": len(rows),
            "n_tokens": n_tokens,
            "n_blocks": len(blocks),
            "batch_size": batch_size,
            "padding_fraction": 1 - n_tokens / padded,
            "per_doc_grads": {
                "batched_docs_per_s": batched_dps,
                "loop_docs_per_s": loop_dps,
                "ratio": ratio,
                "goal_ratio": 10.0,
                "max_rel_diff_vs_loop": max_rel,
            },
            "factors_in_process": timings,
            "factors_stage": {str(w): t for w, t in stage.items()},
            "cpus_per_worker": cpus_per_worker,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(main(quick=False), default=float))
