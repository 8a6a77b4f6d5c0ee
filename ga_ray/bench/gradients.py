"""`ga-ray bench gradients`: the gradients stage against the paper code's method and a training step.

On the same documents, in the same process and run:
- (a) this stage: `run_gradients` (Ray Data actor pool, bucketed token-budget batches, one forward +
  one backward per batch, projection at once) with 1 and 2 actors. Throughput from the stage's wall
  time (actor start and model loading included: `startup_s` is the rest of the wall time; transformers and
  peft are imported before, once per process, as in `ga-ray run`, and that time is `imports_s`), and from
  the actors' compute time alone ("steady state"). Also (a·inproc): the same per-window computation
  (`GradientComputer`) in this process, no Ray, and (a·ref) the same with the reference pass
  (`fast=False`: full logits under the padding mask, backward w.r.t. the LoRA weights, the dense
  projection everywhere), the "before" of the fast pass in the same run.
- (b) the paper code's method: one document per forward/backward pass, reading `param.grad`, then
  projecting (on an evenly spaced sample of the documents).
- (c) a plain batched training step (forward, summed response-token loss, backward into `param.grad`,
  AdamW step) over the same bucketed batches.
Ratios in docs/s: ours/step = a/c (CPU goal ≥ 0.9) and ours/loop = a/b (CPU goal ≥ 1.5).

Memory per actor: in a fresh subprocess per configuration, the growth of peak resident memory over
the loaded model for one extraction batch vs one training step, across batch sizes and model sizes.

Inputs: the demo world of `run_dir` (its data/, adapter and factors/; all its documents, 48 with
--quick), else a synthetic Llama of the demo's size (hidden 128, 4 layers, LoRA r=8 on
q_proj/v_proj, D = 800) with log-normal document lengths like the demo's (median ~33 tokens):
5,000 documents, the demo's full size (64 with --quick).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ga_ray.bench.common import machine_info, print_table, scratch_stage, time_median

SYNTH = {"vocab_size": 2048, "hidden_size": 128, "n_layers": 4, "n_heads": 4, "intermediate_size": 384}  # the demo model (configs/demo.yaml)


# ----------------------------------------------------------------------------------------- worlds
def _llama(vocab_size: int, hidden_size: int, n_layers: int, n_heads: int, intermediate_size: int, seed: int = 0):
    from ga_ray.kernel.tiny_llama import build_tiny_llama, tiny_llama_config

    return build_tiny_llama(tiny_llama_config(vocab_size, hidden_size, n_layers, n_heads, intermediate_size, max_positions=1024), seed=seed)


def _add_lora(base, r: int = 8, alpha: float = 16.0, seed: int = 0):
    from ga_ray.kernel.tiny_llama import add_random_lora

    return add_random_lora(base, r=r, alpha=alpha, b_scale=0.02, b_seed=seed + 1)  # a fine-tuned adapter has non-zero B


def synthetic_docs(n: int, vocab_size: int, median: float, max_len: int, seed: int = 0) -> list[dict]:
    """Instruction-like documents: log-normal lengths, a prompt then a response (loss on the response)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.7, size=n), 8, max_len).astype(int)
    rows = []
    for i, n_tok in enumerate(lengths):
        ids = rng.integers(3, vocab_size, size=n_tok).astype(np.int32)
        n_prompt = int(n_tok * rng.uniform(0.2, 0.6))
        mask = np.zeros(n_tok, np.int8)
        mask[n_prompt:] = 1
        rows.append({"doc_id": i, "input_ids": ids.tolist(), "loss_mask": mask.tolist(), "n_tokens": int(n_tok)})
    return rows


def _build_synthetic(root: Path, quick: bool) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ga_ray.kernel.collate import collate
    from ga_ray.factors.compute import FactorSettings, compute_factors
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    base = _llama(**SYNTH)
    base.save_pretrained(root / "base_model")
    model = _add_lora(base)
    model.save_pretrained(root / "adapter")
    rows = synthetic_docs(64 if quick else 5000, SYNTH["vocab_size"], median=40 if quick else 33, max_len=128)
    (root / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "part-00000.parquet")
    blocks = find_lora_blocks(model)
    sub = rows[: min(len(rows), 128)]
    batches = lambda: (collate(sub[i : i + 8]) for i in range(0, len(sub), 8))  # noqa: E731
    compute_factors(model, blocks, batches, FactorSettings(top_k=50)).save(root / "factors")
    n_params = sum(p.numel() for p in base.parameters())
    return {
        "kind": "synthetic",
        "model_path": root / "base_model",
        "adapter": root / "adapter",
        "data": root / "data",
        "factors": root / "factors",
        "gradients": {"batch_size": 16, "max_tokens_per_batch": 4096, "window_docs": 256},
        "model_params": int(n_params),
    }


def _demo_world(run_dir: Path) -> dict[str, Any]:
    from ga_ray.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    adapter = run_dir / "adapter" if cfg.finetune.enabled else Path(cfg.model.adapter or "")
    for need in (run_dir / "data", run_dir / "factors" / "factors.json", adapter):
        if not need.exists():
            raise FileNotFoundError(f"{need} is missing: run the pipeline up to the factors stage in {run_dir} first")
    g = cfg.gradients
    return {
        "kind": f"run {run_dir}",
        "model_path": Path(cfg.model.path),
        "adapter": adapter,
        "data": run_dir / "data",
        "factors": run_dir / "factors",
        "gradients": {"batch_size": g.batch_size, "max_tokens_per_batch": g.max_tokens_per_batch, "window_docs": g.window_docs},
        "model_params": None,
    }


def _subset_data(world: dict[str, Any], root: Path, n_docs: int | None) -> tuple[Path, list[dict]]:
    """The documents the bench uses (all, or the first n_docs), as a data/ folder and as rows."""
    import pyarrow.parquet as pq

    from ga_ray.data import io as data_io

    table = data_io.read_documents(world["data"], columns=["doc_id", "input_ids", "loss_mask", "n_tokens"])
    if n_docs is not None and n_docs < table.num_rows:
        table = table.slice(0, n_docs)
    out = root / "bench_data"
    out.mkdir()
    pq.write_table(table, out / "part-00000.parquet")
    return out, table.to_pylist()


# ------------------------------------------------------------------------------------- the methods
def _model_cfg(world: dict[str, Any]):
    from ga_ray.config import ModelConfig

    return ModelConfig(path=str(world["model_path"]), adapter=str(world["adapter"]), dtype="float32")


def run_stage(world: dict[str, Any], data_dir: Path, root: Path, n_actors: int, tag: str) -> dict[str, Any]:
    """(a) one run of the real stage over a scratch run directory; returns _gradients.json."""
    from ga_ray.gradients.stage import INFO_FILE, run_gradients

    g = world["gradients"]
    ctx = scratch_stage(root, f"run_{tag}", "gradients", world, {"data": data_dir, "factors": Path(world["factors"])}, [
        f"gradients.num_workers={n_actors}",
        "gradients.cpus_per_worker=1",
        f"gradients.batch_size={g['batch_size']}",
        f"gradients.max_tokens_per_batch={g['max_tokens_per_batch']}",
        f"gradients.window_docs={g['window_docs']}",
    ])
    run_gradients(ctx)
    info = json.loads((ctx.out / INFO_FILE).read_text())
    shutil.rmtree(ctx.run_dir.root, ignore_errors=True)
    return info


def _masked_ce(model, batch):
    import torch.nn.functional as F

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1), reduction="none").view_as(batch.loss_mask[:, 1:])
    m = batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]
    return (ce * m).sum(dim=1)  # [B] per-document summed loss


def paper_method(model, blocks, projector, rows: list[dict]) -> None:
    """(b) one document per forward/backward pass, reading `param.grad`, then projecting."""
    from ga_ray.kernel.collate import collate

    params = dict(model.named_parameters())
    weights = [params[b.name] for b in blocks]
    for r in rows:
        model.zero_grad(set_to_none=True)
        batch = collate([r])
        _masked_ce(model, batch).sum().backward()
        grads = {b.name: w.grad.detach().clone().unsqueeze(0) for b, w in zip(blocks, weights)}
        projector.project(grads)


def train_steps(model, optimizer, rows: list[dict], batches: list[np.ndarray]) -> None:
    """(c) plain batched training steps over the given batches of `rows`."""
    from ga_ray.kernel.collate import collate

    for idx in batches:
        batch = collate([rows[i] for i in idx])
        loss = _masked_ce(model, batch).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _trainable_lora_model(model_cfg: Any, adapter: Path):
    """The model with only its LoRA weights trainable (as when fine-tuning), and its LoRA blocks."""
    import torch

    from ga_ray.kernel.loading import load_lora_model
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    model = load_lora_model(model_cfg, adapter, "cpu", torch.float32)
    blocks = find_lora_blocks(model)
    names = {b.name for b in blocks}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model, blocks


# ------------------------------------------------------------------------------------------ memory
def _memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: growth of the peak resident set over the loaded, warmed-up model
    during one batch of `spec["mode"]`: "extract" (per-document gradients + projection, the stage's
    `GradientComputer`) or "train" (forward, backward into param.grad, AdamW step)."""
    import torch

    from ga_ray.factors.factors import FactorBlock, Factors
    from ga_ray.factors.projection import Projector
    from ga_ray.gradients.actor import GradientComputer, proc_status_mb
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    torch.set_num_threads(1)
    h = spec["hidden"]
    model = _add_lora(_llama(spec["vocab"], h, spec["layers"], max(1, h // 40), int(h * 2.7)), r=spec["r"])
    blocks = find_lora_blocks(model)
    fbs = []
    for b in blocks:  # identity eigenbases, k = 50: the projection's cost depends on the shapes only
        o, i = b.shape
        ones = lambda *s: torch.ones(*s, dtype=torch.float64)  # noqa: E731
        fbs.append(FactorBlock(b.name, b.kind, b.shape, b.scale, torch.eye(i), ones(i), torch.eye(o), ones(o), ones(o, i), torch.arange(min(50, o * i))))
    projector = Projector(Factors(fbs, {"eigenvalues": "ekfac", "epsilon": 1e-6}), "cpu")
    rng = np.random.default_rng(0)
    B, T = spec["batch"], spec["seq"]
    rows = [{"doc_id": n, "input_ids": rng.integers(3, spec["vocab"], T).tolist(), "loss_mask": [0] * (T // 2) + [1] * (T - T // 2)} for n in range(B)]
    cols = {k: [r[k] for r in rows] for k in ("doc_id", "input_ids", "loss_mask")}

    if spec["mode"] == "extract":
        comp = GradientComputer(model, blocks, projector, max_docs=B, max_tokens=B * T)
        step = lambda rs: comp.run({k: v[: len(rs)] for k, v in cols.items()})  # noqa: E731
    else:
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        step = lambda rs: train_steps(model, opt, rs, [np.arange(len(rs))])  # noqa: E731
    step(rows[:1])  # warm-up: optimizer state, autograd and allocator first-use costs
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident set
    except OSError:  # not Linux
        pass
    base = proc_status_mb("VmRSS") or 0.0
    step(rows)
    peak = proc_status_mb("VmHWM") or 0.0
    return {
        "mode": spec["mode"],
        "hidden": h,
        "batch": B,
        "seq": T,
        "model_params": int(sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)),
        "lora_params": int(sum(b.numel for b in blocks)),
        "model_rss_mb": round(base, 1),
        "batch_peak_growth_mb": round(peak - base, 1),
        "raw_grads_mb": round(B * sum(b.numel for b in blocks) * 4 / 2**20, 2),
    }


def memory_table(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One fresh process per (configuration, mode), so no peak leaks from one into the next."""
    ctx = mp.get_context("spawn")
    out = []
    for spec in specs:
        row = {}
        for mode in ("train", "extract"):
            with ctx.Pool(1) as pool:
                r = pool.apply(_memory_probe, ({**spec, "mode": mode},))
            row.update({k: v for k, v in r.items() if k not in ("mode", "batch_peak_growth_mb")})
            row[f"{mode}_mb"] = r["batch_peak_growth_mb"]
        out.append(row)
    return out


# -------------------------------------------------------------------------------------------- main
def profile_top(fn, rows: int = 12) -> list[dict[str, Any]]:
    """torch.profiler over one call of `fn`: the ops with the most self CPU time, with their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key[:60], "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:rows]]


def main(quick: bool = False, **opts: Any) -> dict[str, Any]:
    """Options: run_dir (a demo-world run), n_docs, actors (e.g. [1, 2]), reps, threads, paper_docs, memory,
    profile (print the top ops of ours, the reference pass and the training step on one window)."""
    import torch

    from ga_ray.config import RayConfig
    from ga_ray.factors.projection import Projector
    from ga_ray.gradients.actor import GradientComputer, load_computer
    from ga_ray.kernel.batching import naive_batches, padding_stats, plan_windowed
    from ga_ray.raycluster import init_ray

    actors = [int(a) for a in opts.get("actors", [1, 2])]
    reps = int(opts.get("reps", 1))
    threads = int(opts.get("threads", 1))
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="ga_ray_bench_gradients_"))
    try:
        world = _demo_world(Path(opts["run_dir"])) if opts.get("run_dir") else _build_synthetic(tmp, quick)
        # all of the demo world's documents (5,000: the demo's full size; 48 with --quick) unless told; the synthetic world is sized already
        n_docs = opts.get("n_docs", 48 if quick and opts.get("run_dir") else None)
        data_dir, rows = _subset_data(world, tmp, n_docs)
        lengths = np.array([len(r["input_ids"]) for r in rows])
        N, tokens = len(rows), int(lengths.sum())
        g = world["gradients"]
        plan = plan_windowed(lengths, g["window_docs"], g["batch_size"], g["max_tokens_per_batch"])
        pad = padding_stats(lengths, plan)
        pad_naive = padding_stats(lengths, naive_batches(N, g["batch_size"]))
        a_rows: list[dict[str, Any]] = []
        # The model libraries are imported once per process, before any stage runs: `ga-ray run` has
        # imported them in its first model stage, so the stage's start-up below is what each stage pays.
        # Measured here (0 when something imported them already) and reported beside it.
        t_imp = time.perf_counter()
        import peft  # noqa: F401
        import transformers  # noqa: F401

        import ga_ray.kernel.loading  # noqa: F401

        imports_s = time.perf_counter() - t_imp
        if actors:
            init_ray(RayConfig(num_cpus=opts.get("num_cpus")))

        # (a) the stage, 1 and 2 actors
        # Repetitions are interleaved (1 actor, 2 actors, 1 actor, ...) so that a machine whose load
        # changes over the run biases every method alike.
        infos: dict[int, list[dict[str, Any]]] = {n: [] for n in actors}
        for i in range(reps):
            for n_act in actors:
                infos[n_act].append(run_stage(world, data_dir, tmp, n_act, f"{n_act}_{i}"))
        for n_act in actors:
            wall = statistics.median(i["wall_time_s"] for i in infos[n_act])
            compute = statistics.median(i["actor_compute_s"] for i in infos[n_act]) / n_act  # per actor, in parallel
            a_rows.append(
                {
                    "actors": n_act,
                    # with one CPU worker and few documents the stage runs in the driver (gradients.in_driver_max_docs)
                    "where": "1 worker, in the driver" if infos[n_act][0].get("in_driver") else f"{n_act} actor(s)",
                    "wall_s": wall,
                    "compute_s": compute,
                    "startup_s": wall - compute,  # Ray, actor start, model load, scheduling, writing
                    # of which (per actor, medians): process start until our code ran, imports + model
                    # load, writing the windows; the rest is Ray Data's start, reading and scheduling
                    "boot_s": statistics.median(i["actor_boot_s"] for i in infos[n_act]) / n_act,
                    "init_s": statistics.median(i["actor_init_s"] for i in infos[n_act]) / n_act,
                    "write_s": statistics.median(i["actor_write_s"] for i in infos[n_act]) / n_act,
                    "docs_per_s": N / wall,
                    "tokens_per_s": tokens / wall,
                    "steady_docs_per_s": N / compute,
                    "steady_tokens_per_s": tokens / compute,
                    "padding_fraction": infos[n_act][0]["padding_fraction"],
                    "peak_mem_mb_per_actor": infos[n_act][0]["peak_mem_mb_per_actor"],
                }
            )

        # in-process methods on the same model files, `threads` torch threads, interleaved repetitions
        mcfg = _model_cfg(world)
        comp = load_computer(mcfg, world["adapter"], world["factors"], device="cpu", max_docs=g["batch_size"], max_tokens=g["max_tokens_per_batch"])
        # the reference pass (the "before"): the same loaded model, blocks and projector, the slow path
        comp_ref = GradientComputer(comp.model, comp.blocks, comp.projector, max_docs=g["batch_size"], max_tokens=g["max_tokens_per_batch"],
                                    pad_id=comp.pad_id, token_projection="never", fast=False)
        cols = {k: [r[k] for r in rows] for k in ("doc_id", "input_ids", "loss_mask")}
        W = g["window_docs"]
        model_b, blocks = _trainable_lora_model(mcfg, world["adapter"])
        projector = Projector(world["factors"], "cpu")
        n_b = min(N, int(opts.get("paper_docs", 16 if quick else 256)))
        sample = [rows[i] for i in np.linspace(0, N - 1, n_b).astype(int)]
        b_tokens = sum(len(r["input_ids"]) for r in sample)
        model_c, _ = _trainable_lora_model(mcfg, world["adapter"])
        opt = torch.optim.AdamW([p for p in model_c.parameters() if p.requires_grad], lr=1e-5)

        def windows(c, n: int) -> None:
            for s in range(0, n, W):
                c.run({k: v[s : min(s + W, n)] for k, v in cols.items()})

        n_warm = min(N, 64)
        warm_plan = [b for b in plan if b.max() < n_warm] or plan[:1]
        methods = {
            "a": (lambda: windows(comp, N), lambda: windows(comp, n_warm)),
            "a_ref": (lambda: windows(comp_ref, N), lambda: windows(comp_ref, n_warm)),
            "b": (lambda: paper_method(model_b, blocks, projector, sample), lambda: paper_method(model_b, blocks, projector, sample[:4])),
            "c": (lambda: train_steps(model_c, opt, rows, plan), lambda: train_steps(model_c, opt, rows, warm_plan)),
        }
        for _, warm in methods.values():  # warm-up: first-use costs of autograd, the allocator, AdamW's state
            warm()
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(reps):
            for key, (fn, _) in methods.items():
                t, _ = time_median(fn, reps=1, warmup=0)
                times[key].append(t)
        t_a, t_ref, t_b, t_c = (statistics.median(times[k]) for k in ("a", "a_ref", "b", "c"))

        b_dps, c_dps, a_dps, ref_dps = n_b / t_b, N / t_c, N / t_a, N / t_ref
        rows_out = [
            {"method": f"(a) stage, {r['where']}, wall", "docs_per_s": r["docs_per_s"], "tokens_per_s": r["tokens_per_s"]} for r in a_rows
        ]
        rows_out += [
            {"method": f"(a) stage, {r['where']}, steady", "docs_per_s": r["steady_docs_per_s"], "tokens_per_s": r["steady_tokens_per_s"]}
            for r in a_rows
        ]
        rows_out += [
            {"method": "(a) in-process, no Ray", "docs_per_s": a_dps, "tokens_per_s": tokens / t_a},
            {"method": "(a·ref) in-process, reference pass", "docs_per_s": ref_dps, "tokens_per_s": tokens / t_ref},
            {"method": "(b) paper: 1 doc/backward + param.grad", "docs_per_s": b_dps, "tokens_per_s": b_tokens / t_b},
            {"method": "(c) batched training step", "docs_per_s": c_dps, "tokens_per_s": tokens / t_c},
        ]
        ratios = []
        for r in a_rows:
            for kind, dps in (("wall", r["docs_per_s"]), ("steady", r["steady_docs_per_s"])):
                ratios.append({"a": f"{r['where']}, {kind}", "ours/step (goal>=0.9)": dps / c_dps, "ours/loop (goal>=1.5)": dps / b_dps})
        ratios.append({"a": "in-process, no Ray", "ours/step (goal>=0.9)": a_dps / c_dps, "ours/loop (goal>=1.5)": a_dps / b_dps})
        ratios.append({"a": "in-process, reference pass", "ours/step (goal>=0.9)": ref_dps / c_dps, "ours/loop (goal>=1.5)": ref_dps / b_dps})

        profiles: dict[str, list[dict[str, Any]]] = {}
        if opts.get("profile"):
            n_p = min(N, W)
            p_plan = [b for b in plan if b.max() < n_p]
            profiles = {
                "ours": profile_top(lambda: windows(comp, n_p)),
                "reference pass": profile_top(lambda: windows(comp_ref, n_p)),
                "training step": profile_top(lambda: train_steps(model_c, opt, rows, p_plan)),
            }

        memory: list[dict[str, Any]] = []
        if opts.get("memory", not quick):
            base = {"vocab": 2048, "layers": 4, "r": 8, "seq": 128}
            specs = [{**base, "hidden": 160, "batch": b} for b in (4, 16, 64)] + [{**base, "hidden": h, "batch": 16} for h in (320, 640)]
            memory = memory_table(specs)

        info = machine_info()
        print_table(
            f"gradients bench on {world['kind']}: {N} docs, {tokens} tokens, padding {100 * pad.padding_fraction:.1f}% bucketed vs {100 * pad_naive.padding_fraction:.1f}% naive; {info}",
            rows_out,
        )
        print_table("ratios (docs/s on the same documents; ours/step = a/c, ours/loop = a/b)", ratios)
        if a_rows:
            print_table(
                f"stage start-up (wall time less the actors' compute; importing transformers and peft in this process took {imports_s:.1f} s "
                "before, once per process, as `ga-ray run` pays it in its first model stage)",
                [{k: r[k] for k in ("actors", "wall_s", "compute_s", "startup_s", "boot_s", "init_s", "write_s")} for r in a_rows],
            )
        for name, top in profiles.items():
            print_table(f"profile, {name}: self CPU time by op (first {min(N, W)} documents)", top)
        if memory:
            print_table("memory per actor: peak-RSS growth over the loaded model for one batch (MB)", memory)
        return {
            "machine": info,
            "world": {"kind": world["kind"], "n_docs": N, "tokens": tokens, "model_params": world["model_params"], "gradients": g, "D": comp.D, "lora_params": comp.P},
            "torch_threads": threads,
            "reps": reps,
            "padding_fraction": pad.padding_fraction,
            "padding_fraction_naive": pad_naive.padding_fraction,
            "a_stage": a_rows,
            "imports_s": imports_s,
            "a_inproc": {"docs_per_s": a_dps, "tokens_per_s": tokens / t_a, "time_s": t_a},
            "a_reference": {"docs_per_s": ref_dps, "tokens_per_s": tokens / t_ref, "time_s": t_ref},
            "b_paper": {"docs_per_s": b_dps, "tokens_per_s": b_tokens / t_b, "n_docs": n_b, "time_s": t_b},
            "c_train": {"docs_per_s": c_dps, "tokens_per_s": tokens / t_c, "time_s": t_c},
            "ratios": ratios,
            "profiles": profiles,
            "memory": memory,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
