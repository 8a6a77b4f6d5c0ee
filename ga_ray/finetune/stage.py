"""The finetune stage: LoRA fine-tuning of the base model on `data/` with a Ray Train `TorchTrainer`.

- Data: `ray.data.read_parquet(data/)` passed to the trainer; each worker loads its equal shard
  (`ray.train.get_dataset_shard`) once, sorted by doc_id, and shuffles it per epoch from the seed
  (`epoch_batches`), in length-sorted buckets so that batches pad little, padded with
  `ga_ray.kernel.collate.collate`. With one worker a fine-tune is reproducible bit for bit; with several,
  Ray Data's split decides which worker holds which document.
- Loss: next-token cross-entropy over response tokens only (`loss_mask[t] == 1` means token t is a
  target predicted from t-1), averaged over the batch's response tokens.
- DDP through `ray.train.torch.prepare_model` (gloo on CPU, NCCL on GPU); AdamW over the LoRA
  parameters, linear warm-up then cosine decay.
- Output: rank 0 saves the PEFT adapter (`save_pretrained`) and hands it to the driver as a Ray Train
  checkpoint; the driver writes it into `adapter/` atomically, so the folder works across nodes.
- Small runs skip Ray Train: with one CPU worker and at most `finetune.in_driver_max_docs` documents the
  same loop (`train_adapter`) runs in the driver on the same rows, and gives the same adapter bit for
  bit (tested). Starting a TorchTrainer (its controller, worker and data-split actors) cost ~15 s here,
  more than the demo's tiny fine-tunes themselves.
- With `finetune.format_eval_set` (a demo world's `eval/` folder) the stage ends with the FORMAT
  TABLE: batched greedy decoding on held-out prompts, format rates per deterministic family and the
  five behaviours' rates, printed and returned in the summary (so it lands in the manifest). With
  `finetune.format_eval_base` (default) the base model (the same PEFT model with the adapter off) is
  scored on the same prompts and shown in a "base" column: what the fine-tune changed.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ga_ray.config import FinetuneConfig, ModelConfig
from ga_ray.context import StageContext
from ga_ray.errors import StageError
from ga_ray.finetune import io as finetune_io
from ga_ray.rundir import atomic_dir, atomic_write_json, atomic_write_text

log = logging.getLogger("ga_ray")

BUCKET_BATCHES = 16
"""Batches per length-sorted bucket (rows are shuffled, then sorted by length inside a bucket)."""


# ------------------------------------------------------------------------------------------ pure compute


def response_loss(logits, input_ids, loss_mask):
    """Mean next-token cross-entropy over response targets: Σ_t m[t]·CE(logits[t-1], ids[t]) / Σ_t m[t]."""
    import torch.nn.functional as F

    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    ce = ce.view_as(targets).to(mask.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def bucket_batches(rows: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Sort a bucket of rows by length, cut into batches, shuffle the batch order."""
    rows = sorted(rows, key=lambda r: len(r["input_ids"]))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(batches)
    return batches


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    bucket = batch_size * BUCKET_BATCHES
    full, rem = divmod(n_rows, bucket)
    return full * BUCKET_BATCHES + math.ceil(rem / batch_size)


def make_lora_config(lora) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _torch_threads(ft: FinetuneConfig) -> int:
    return ft.torch_threads or max(1, math.ceil(ft.cpus_per_worker))


# --------------------------------------------------------------------------------- Ray Train worker loop


def load_shard(shard) -> list[dict]:
    """Every row of this worker's shard, sorted by doc_id. Ray Data delivers blocks in whatever order they
    finish, so the epoch order is made from the seed alone (`epoch_batches`): with one worker the fine-tune
    is reproducible bit for bit. The shard is held in memory (token ids only: 5,000 documents of 512 tokens
    are ~10 MB), which also gives every epoch a full shuffle instead of a shuffle buffer's."""
    return rows_sorted(shard.iter_batches(batch_size=4096, batch_format="numpy"))


def rows_sorted(batches) -> list[dict]:
    """Rows of numpy column batches (doc_id, input_ids, loss_mask), sorted by doc_id."""
    rows: list[dict] = []
    for cols in batches:
        rows.extend({"doc_id": int(d), "input_ids": ids, "loss_mask": mask}
                    for d, ids, mask in zip(cols["doc_id"], cols["input_ids"], cols["loss_mask"]))
    rows.sort(key=lambda r: r["doc_id"])
    return rows


def epoch_batches(rows: list[dict], batch_size: int, seed: int, epoch: int, rank: int) -> list[list[dict]]:
    """One epoch's batches: the rows shuffled by (seed, epoch, rank), cut into buckets of BUCKET_BATCHES
    batches, each bucket sorted by length and cut into batches (little padding), batch order shuffled."""
    rng = random.Random(f"{seed}-{epoch}-{rank}")
    order = list(rows)
    rng.shuffle(order)
    bucket = batch_size * BUCKET_BATCHES
    return [b for i in range(0, len(order), bucket) for b in bucket_batches(order[i : i + bucket], batch_size, rng)]


def _train_loop(conf: dict) -> None:
    """One Ray Train worker: its shard, `train_adapter`, and rank 0 hands the adapter over as a checkpoint."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rows_here = load_shard(ray.train.get_dataset_shard("train"))

    def report_epoch(metrics: dict) -> None:  # every worker reports the same number of times (it is a barrier)
        ray.train.report(metrics)

    model, metrics = train_adapter(conf, rows_here, rank=rank, world=world, device=ray.train.torch.get_device(),
                                   prepare_model=ray.train.torch.prepare_model, report_epoch=report_epoch)
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="ga-ray-adapter-") as tmp:
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_adapter(conf: dict, rows_here: list[dict], *, rank: int, world: int, device: Any, prepare_model: Any, report_epoch: Any,
                  on_step: Any = None) -> tuple[Any, dict]:
    """The training loop of one worker on its rows (sorted by doc_id); returns (model, final metrics).

    Shared by the Ray Train workers and the in-driver path (`prepare_model` identity, no reports), so
    the two give the same adapter bit for bit with one worker. `on_step(step, total, loss)`, if given, is
    called after every optimiser step (the driver's progress bar).
    """
    import torch
    from peft import get_peft_model

    from ga_ray.kernel.collate import collate
    from ga_ray.kernel.loading import load_base_model

    ft = FinetuneConfig.model_validate(conf["finetune"])
    model_cfg = ModelConfig.model_validate(conf["model"])
    torch.set_num_threads(_torch_threads(ft))
    if not rows_here:
        raise RuntimeError(f"finetune: the data shard of worker {rank} is empty")

    torch.manual_seed(ft.seed)  # identical LoRA initialisation on every worker (DDP also broadcasts it)
    base = load_base_model(model_cfg, device=device)
    model = get_peft_model(base, make_lora_config(ft.lora))
    model.train()
    model = prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay)

    per_worker = max(1, ft.batch_size // world)
    rows_per_worker = conf["n_rows"] // world
    steps_epoch = batches_per_epoch(rows_per_worker, per_worker)
    total = max(1, math.ceil(ft.epochs * steps_epoch))
    warmup = max(1, int(ft.warmup_fraction * total))
    pad_id = conf["pad_id"]

    step, epoch, t0 = 0, 0, time.perf_counter()
    history: list[dict] = []
    tokens = 0
    while step < total:
        losses: list[float] = []
        for rows in epoch_batches(rows_here, per_worker, ft.seed, epoch, rank):
            if step >= total:  # a fractional last epoch
                break
            batch = collate(rows, pad_id=pad_id).to(device)
            for g in opt.param_groups:
                g["lr"] = ft.learning_rate * lr_factor(step, total, warmup)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = response_loss(logits, batch.input_ids, batch.loss_mask)
            loss.backward()
            if ft.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, ft.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            tokens += int(batch.attention_mask.sum())
            step += 1
            if on_step is not None:
                on_step(step, total, losses[-1])
        epoch += 1
        history.append({"epoch": epoch, "step": step, "loss": sum(losses) / max(1, len(losses))})
        if step < total:
            report_epoch({**history[-1], "total_steps": total})

    metrics = {**history[-1], "total_steps": total, "history": history, "train_seconds": time.perf_counter() - t0,
               "tokens_per_worker": tokens, "world_size": world, "per_worker_batch": per_worker}
    return model, metrics


# ------------------------------------------------------------------------------------------ the stage


def _check_inputs(ctx: StageContext) -> tuple[Path, int]:
    from ga_ray.data import io as data_io

    cfg = ctx.cfg
    if not cfg.model.path:
        raise StageError("finetune needs a base model: set model.path to a local transformers model folder")
    data = ctx.data_dir
    if not data_io.exists(data):
        raise StageError(f"finetune: no prepared data in {data}; run the prepare stage first (ga-ray prepare CONFIG --run-dir ...)")
    n_rows = data_io.count_documents(data)
    if n_rows == 0:
        raise StageError(f"finetune: {data} holds no documents")
    ft = cfg.finetune
    if ft.batch_size < ft.num_workers:
        raise StageError(f"finetune.batch_size ({ft.batch_size}) must be at least finetune.num_workers ({ft.num_workers})")
    if n_rows < ft.num_workers:
        raise StageError(f"finetune: {n_rows} documents cannot be split over {ft.num_workers} workers")
    if ft.format_eval_set and not (Path(ft.format_eval_set) / "families").is_dir():
        raise StageError(f"finetune.format_eval_set {ft.format_eval_set} is not a demo evaluation folder (families/, behaviours/)")
    return data, n_rows


def run_finetune(ctx: StageContext) -> dict[str, Any]:
    from ga_ray.kernel.loading import load_tokenizer
    from ga_ray.raycluster import init_ray
    from ga_ray.resources import plan_workers

    cfg = ctx.cfg
    ft = cfg.finetune
    data_dir, n_rows = _check_inputs(ctx)
    tok = load_tokenizer(cfg.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    init_ray(cfg.ray)
    workers = plan_workers("finetune", ft)
    use_gpu = workers.use_gpu
    conf = {"finetune": ft.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"), "n_rows": n_rows, "pad_id": pad_id}
    in_driver = workers.runs_in_driver(n_rows, ft.in_driver_max_docs)
    t0 = time.perf_counter()
    if in_driver:
        log.info("finetune: %d documents on one CPU worker: trained in the driver (finetune.in_driver_max_docs = %d)", n_rows, ft.in_driver_max_docs)
        model, metrics = _train_in_driver(conf, data_dir)
        save_adapter = model.save_pretrained
    else:
        metrics, save_adapter = _train_on_ray(conf, ft, workers, data_dir, ctx)
    train_s = time.perf_counter() - t0

    summary: dict[str, Any] = {
        "documents": n_rows,
        "epochs": ft.epochs,
        "steps": metrics.get("total_steps"),
        "final_loss": metrics.get("loss"),
        "loss_history": metrics.get("history"),
        "num_workers": ft.num_workers,
        "in_driver": in_driver,
        "use_gpu": use_gpu,
        "train_seconds": round(train_s, 2),
        "lora": ft.lora.model_dump(mode="json"),
    }
    with atomic_dir(ctx.out) as tmp:
        save_adapter(str(tmp))
        n_trainable = _count_adapter_params(tmp)
        summary["trainable_parameters"] = n_trainable
        if ft.format_eval_set:
            table, gens, base_table, base_gens, eval_s = _format_table(cfg, tmp, tok)
            summary["format_table"] = table
            summary["format_eval_seconds"] = round(eval_s, 2)
            atomic_write_json(tmp / finetune_io.FORMAT_TABLE, table)
            atomic_write_text(tmp / finetune_io.FORMAT_GENERATIONS, _jsonl(gens))
            if base_table is not None:
                summary["format_table_base"] = base_table
                atomic_write_json(tmp / finetune_io.FORMAT_TABLE_BASE, base_table)
                atomic_write_text(tmp / finetune_io.FORMAT_GENERATIONS_BASE, _jsonl(base_gens))
    loss = summary["final_loss"]
    line = (f"LoRA r={ft.lora.r} on {','.join(ft.lora.target_modules)}: {n_rows} docs x {ft.epochs:g} epochs, "
            f"{summary['steps']} steps, final loss {loss if loss is None else round(loss, 3)}, {train_s:.0f}s")
    if "format_table" in summary:
        t = summary["format_table"]
        line += (f"; formats >= 80%: {t['families_ok']}/{len(t['families'])}, "
                 f"behaviours in 15-85%: {t['behaviours_ok']}/{len(t['behaviours'])}")
        if "format_table_base" in summary:
            b = summary["format_table_base"]
            line += f" (base model: {b['families_ok']}/{len(b['families'])}, {b['behaviours_ok']}/{len(b['behaviours'])})"
    summary["line"] = line
    return summary


def _train_in_driver(conf: dict, data_dir: Path) -> tuple[Any, dict]:
    """`train_adapter` in this process on every row (`data_io.iter_token_windows`); torch's threads and global
    RNG state restored afterwards."""
    import torch
    from tqdm.auto import tqdm

    from ga_ray.data import io as data_io
    from ga_ray.resources import torch_threads_restored

    bar = tqdm(desc="finetune", unit="step")

    def on_step(step: int, total: int, loss: float) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.update(step - bar.n)
        if step % 10 == 0 or step == total:
            bar.set_postfix(loss=f"{loss:.3f}")

    rng = torch.get_rng_state()
    try:
        with torch_threads_restored():
            return train_adapter(conf, rows_sorted(data_io.iter_token_windows(data_dir, 4096)), rank=0, world=1, device=torch.device("cpu"),
                                 prepare_model=lambda m: m, report_epoch=lambda metrics: None, on_step=on_step)
    finally:
        bar.close()
        torch.set_rng_state(rng)


def _train_on_ray(conf: dict, ft: FinetuneConfig, workers: Any, data_dir: Path, ctx: StageContext) -> tuple[dict, Any]:
    """A Ray Train `TorchTrainer` over Ray Data's read of data/; returns (final metrics, a function that
    writes the adapter into a folder and then removes the trainer's storage, unless `finetune.storage_path`
    names it: the checkpoint lives there until it is copied)."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ga_ray.data import io as data_io
    from ga_ray.resources import fit_keeping_sigint

    # only the Parquet parts: data/ also holds prepare.json and rejected.jsonl
    ds = ray.data.read_parquet(data_io.parquet_paths(data_dir)).select_columns(list(data_io.TOKEN_COLUMNS))
    storage = Path(ft.storage_path) if ft.storage_path else ctx.run_dir.root / ".ray_train"
    name = f"finetune-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        train_loop_per_worker=_train_loop,
        train_loop_config=conf,
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu, resources_per_worker=workers.train_resources()),
        datasets={"train": ds},
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    try:
        result = fit_keeping_sigint(trainer)
    except Exception as exc:  # Ray wraps worker errors; keep the cause readable
        raise StageError(f"finetune: training failed: {type(exc).__name__}: {exc}") from exc
    if result.checkpoint is None:
        raise StageError("finetune: training finished without an adapter checkpoint")

    def save_adapter(folder: str) -> None:
        result.checkpoint.to_directory(folder)
        if not ft.storage_path:
            shutil.rmtree(storage / name, ignore_errors=True)
            try:
                storage.rmdir()
            except OSError:
                pass

    return dict(result.metrics or {}), save_adapter


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _count_adapter_params(folder: Path) -> int:
    from safetensors import safe_open

    f = folder / "adapter_model.safetensors"
    if not f.exists():
        return 0
    with safe_open(str(f), "pt") as st:
        return int(sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys()))


def _format_table(cfg, adapter_dir: Path, tok) -> tuple[dict, list[dict], dict | None, list[dict], float]:
    """(table, generations, base table or None, base generations, seconds): the fine-tuned model, and with
    `finetune.format_eval_base` the base model on the same prompts (the same PEFT model, adapter off)."""
    import torch

    from ga_ray.engine import BASE, FINETUNED, make_engine
    from ga_ray.finetune.format_table import format_table_text, run_format_table

    ft = cfg.finetune
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(_torch_threads(ft))
    base_table, base_gens = None, []
    try:
        # one engine, the adapter loaded once: variant `finetuned`, and `base` = the same model, adapter off
        engine = make_engine("peft", cfg.model, adapter=adapter_dir, tokenizer=tok, max_batch_size=ft.eval_batch_size)
        kw = dict(limit=ft.eval_prompts, batch_size=ft.eval_batch_size, progress=True)
        if ft.format_eval_base:
            base_table, base_gens = run_format_table(engine, ft.format_eval_set, ft.max_new_tokens, BASE, **kw)
        table, gens = run_format_table(engine, ft.format_eval_set, ft.max_new_tokens, FINETUNED, **kw)
        engine.close()
    finally:
        torch.set_num_threads(threads)
    print("\nformat table (greedy decoding on held-out prompts" + ("; base = the model before the fine-tune" if base_table else "")
          + ")\n" + format_table_text(table, base_table), flush=True)
    return table, gens, base_table, base_gens, time.perf_counter() - t0
