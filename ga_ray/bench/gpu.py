"""`ga-ray bench gpu` (or `python -m ga_ray.bench.gpu`): one prepared check for a lent GPU machine.

Needs only torch, transformers, peft, safetensors, numpy and pyarrow: no Ray (the machines we borrow
have none), no pydantic config, no ga_ray module that imports either. Device: cuda when available.
Every figure is the median of a few repetitions after a warm-up; each method's peak memory is
`torch.cuda.max_memory_allocated` on GPU (peak RSS, VmHWM, on CPU). One JSON object on the last line.

1. Per-document gradients on a Llama built from a config (default ~0.95 B parameters, bf16 on GPU,
   LoRA r = 8 on q_proj/v_proj with non-zero B, 512-token documents, loss on the last 3/4):
   - ours: the gradients stage's per-window computation (`ga_ray.gradients.actor.GradientComputer`:
     `ga_ray.kernel.per_document` — one forward + one backward per batch — then the projection). The
     EKFAC factors are random orthonormal eigenbases of the right shapes with the top_k = 50 pairs of
     random positive Λ (the projection's cost depends on the shapes only);
   - loop: the paper's method, one document per forward/backward, reading `param.grad`, projecting;
   - step: a plain batched training step on the same batches (forward, summed response loss,
     backward into `param.grad` of the LoRA weights, no optimizer).
   Ratios in docs/s: ours/loop and ours/step. On CUDA also: the host syncs of one call of ours
   (torch's sync debug mode; by design only the window's final copies) and, after the eager methods,
   ours with `compile=True` (`--no-compile` skips it): compile time and compiled/eager.
2. The dictionary learner (`ga_ray.atoms.trainer.learn_dictionary`, pure torch: exact lasso coder +
   online step) on planted-atom rows at K = 1,000, D = 6,800, N = 50,000 on the device: seconds per
   epoch (one epoch per repetition), the stopping rule's objective and the held-out one, and the floor of an epoch: its
   correlation GEMMs, 2·N·K·D flop, at the GEMM rate measured in this run (bfloat16 when the products ran in it). scikit-learn is NOT
   run here (at that size it takes hours on CPU; `ga-ray bench dictionary` compares with it).

`--quick`: a tiny Llama, 32 documents of 64 tokens, K = 32, D = 256, N = 2,000 (CPU, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch


# --------------------------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class GradSizes:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    n_docs: int
    doc_tokens: int
    batch_size: int
    loop_docs: int
    lora_r: int = 8
    top_k: int = 50


@dataclass(frozen=True)
class DictSizes:
    n_rows: int
    dim: int
    n_atoms: int
    alpha: float = 0.1


FULL_GRAD = GradSizes(32000, 2048, 16, 16, 16, 5632, n_docs=256, doc_tokens=512, batch_size=16, loop_docs=64)
QUICK_GRAD = GradSizes(512, 64, 2, 4, 4, 128, n_docs=32, doc_tokens=64, batch_size=8, loop_docs=8)
FULL_DICT = DictSizes(50_000, 6800, 1000)
QUICK_DICT = DictSizes(2000, 256, 32)


# ------------------------------------------------------------------------------------ device, memory
def pick_device(name: str | None = None) -> torch.device:
    if name and name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset VmHWM to the current resident set
    except OSError:
        pass


def peak_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since `reset_peak` (cuda), else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def count_host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """How many times `fn` makes the host wait for the GPU (torch's sync debug mode warns at each
    synchronising call: `.item()`, `.cpu()`, `nonzero`, a blocking copy). None off CUDA."""
    import warnings

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in seen)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        import transformers
        import peft

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------- gradients
def build_model(s: GradSizes, device: torch.device, dtype: torch.dtype):
    """A seeded random Llama of `s` (ga_ray.kernel.tiny_llama) on `device` in `dtype`, with a LoRA on q/v."""
    from ga_ray.kernel.tiny_llama import add_random_lora, build_tiny_llama, tiny_llama_config

    cfg = tiny_llama_config(s.vocab_size, s.hidden_size, s.n_layers, s.n_heads, s.intermediate_size, n_kv_heads=s.n_kv_heads, max_positions=max(1024, s.doc_tokens))
    with torch.device(device):  # initialise on the device: a 1 B model's init on the CPU takes a while
        base = build_tiny_llama(cfg, seed=0)
    base = base.to(dtype)
    n_params = sum(p.numel() for p in base.parameters())
    model = add_random_lora(base, r=s.lora_r, alpha=2.0 * s.lora_r, b_scale=0.02, b_seed=1).to(device)
    return model, int(n_params)


def random_factors(blocks, top_k: int, seed: int = 0):
    """Factors of the right shapes: random orthonormal Q_A, Q_S (QR of Gaussians), random positive Λ, top_k pairs."""
    from ga_ray.factors.factors import FactorBlock, Factors

    g = torch.Generator().manual_seed(seed)
    out = []
    for b in blocks:
        o, i = b.shape
        QA, _ = torch.linalg.qr(torch.randn(i, i, generator=g, dtype=torch.float64))
        QS, _ = torch.linalg.qr(torch.randn(o, o, generator=g, dtype=torch.float64))
        Lam = torch.rand(o, i, generator=g, dtype=torch.float64) + 1e-3
        sel = torch.topk(Lam.reshape(-1), min(top_k, o * i)).indices
        out.append(FactorBlock(b.name, b.kind, b.shape, b.scale, QA, torch.ones(i, dtype=torch.float64), QS, torch.ones(o, dtype=torch.float64), Lam, sel, module_name=b.module_name))
    return Factors(out, {"eigenvalues": "ekfac", "epsilon": 1e-6, "top_k": top_k})


def make_docs(s: GradSizes, seed: int = 0) -> list[dict[str, Any]]:
    """`n_docs` documents of exactly `doc_tokens` random tokens; the loss on the last 3/4 (the response)."""
    rng = np.random.default_rng(seed)
    n_prompt = s.doc_tokens // 4
    mask = [0] * n_prompt + [1] * (s.doc_tokens - n_prompt)
    return [{"doc_id": n, "input_ids": rng.integers(3, s.vocab_size, s.doc_tokens).tolist(), "loss_mask": mask} for n in range(s.n_docs)]


def masked_doc_loss(model, batch) -> torch.Tensor:
    """`[B]` summed response-token cross-entropy (the loss per_document_gradients differentiates, reduction sum)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1), reduction="none").view_as(batch.loss_mask[:, 1:])
    m = (batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]).to(ce.dtype)
    return (ce * m).sum(dim=1)


def loop_method(model, blocks, projector, docs, device) -> None:
    """The paper's method: one document per forward/backward, reading `param.grad`, then projecting."""
    from ga_ray.kernel.collate import collate

    params = dict(model.named_parameters())
    weights = [params[b.name] for b in blocks]
    for r in docs:
        model.zero_grad(set_to_none=True)
        batch = collate([r]).to(device)
        masked_doc_loss(model, batch).sum().backward()
        projector.project({b.name: w.grad.detach().float().unsqueeze(0) for b, w in zip(blocks, weights)})
    model.zero_grad(set_to_none=True)


def step_method(model, docs, batch_size: int, device) -> None:
    """A plain batched training step per batch: forward, summed loss, backward into param.grad (no optimizer)."""
    from ga_ray.kernel.collate import collate

    for s in range(0, len(docs), batch_size):
        model.zero_grad(set_to_none=True)
        batch = collate(docs[s : s + batch_size]).to(device)
        masked_doc_loss(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def _throughput(times: list[float], n_docs: int, doc_tokens: int, peak_mem_mb: float) -> dict[str, Any]:
    """One method's figures from its timed repetitions (median)."""
    t = statistics.median(times)
    return {"time_s": t, "times_s": times, "n_docs": n_docs, "docs_per_s": n_docs / t, "tokens_per_s": n_docs * doc_tokens / t, "peak_mem_mb": peak_mem_mb}


def _ours_compiled(model, blocks, projector, s: GradSizes, cols, head, device: torch.device, reps: int) -> dict[str, Any]:
    """Ours with `compile=True` (the model's unhooked parts compiled in place, so this runs after
    every eager method): compilation time (the first call), then the same timing as ours."""
    from ga_ray.gradients.actor import GradientComputer

    try:
        t = time.perf_counter()
        comp = GradientComputer(model, blocks, projector, max_docs=s.batch_size, max_tokens=s.batch_size * s.doc_tokens, compile=True)
        comp.run(head)
        sync(device)
        compile_s = time.perf_counter() - t
        reset_peak(device)
        times = [timed(lambda: comp.run(cols), device) for _ in range(reps)]
        return {"compiled_modules": len(comp.compiled), "compile_s": compile_s, **_throughput(times, s.n_docs, s.doc_tokens, peak_mb(device))}
    except Exception as exc:  # a compiler failure must not cost the rest of the check
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def bench_gradients(s: GradSizes, device: torch.device, reps: int, budget_s: float, compile_too: bool = True) -> dict[str, Any]:
    from ga_ray.factors.projection import Projector
    from ga_ray.gradients.actor import GradientComputer
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model, n_params = build_model(s, device, dtype)
    blocks = find_lora_blocks(model)
    projector = Projector(random_factors(blocks, s.top_k), device)
    build_s = time.perf_counter() - t0
    docs = make_docs(s)
    cols = {k: [r[k] for r in docs] for k in ("doc_id", "input_ids", "loss_mask")}
    loop_docs = docs[: min(s.loop_docs, len(docs))]
    comp = GradientComputer(model, blocks, projector, max_docs=s.batch_size, max_tokens=s.batch_size * s.doc_tokens)
    methods: dict[str, Callable[[], Any]] = {
        "ours": lambda: comp.run(cols),
        "loop": lambda: loop_method(model, blocks, projector, loop_docs, device),
        "step": lambda: step_method(model, docs, s.batch_size, device),
    }
    n_of = {"ours": len(docs), "loop": len(loop_docs), "step": len(docs)}
    # warm-up on a slice (kernels, allocator, cuBLAS handles), untimed
    head = {k: v[: s.batch_size] for k, v in cols.items()}
    comp.run(head)
    loop_method(model, blocks, projector, docs[:2], device)
    step_method(model, docs[: s.batch_size], s.batch_size, device)
    syncs = count_host_syncs(lambda: comp.run(cols), device)
    times: dict[str, list[float]] = {k: [] for k in methods}
    peaks: dict[str, float] = {k: 0.0 for k in methods}
    start = time.perf_counter()
    for i in range(reps):  # interleaved, so a drifting machine biases every method alike
        for key, fn in methods.items():
            reset_peak(device)
            times[key].append(timed(fn, device))
            peaks[key] = max(peaks[key], peak_mb(device))
        if i + 1 < reps and time.perf_counter() - start > budget_s:
            break
    out: dict[str, Any] = {
        "sizes": asdict(s),
        "model_params": n_params,
        "lora_params": int(sum(b.numel for b in blocks)),
        "n_blocks": len(blocks),
        "D": int(projector.D),
        "dtype": str(dtype).replace("torch.", ""),
        "factors": "random orthonormal eigenbases of the right shapes, top_k pairs of random positive Lambda",
        "build_s": build_s,
        "reps": len(times["ours"]),
        # host syncs in one call of ours (one window of n_docs documents in n_docs / batch_size batches),
        # as torch.cuda.set_sync_debug_mode reports them; the design has only the window's final copies
        "ours_host_syncs_per_window": syncs,
        "ours_batches_per_window": math.ceil(s.n_docs / s.batch_size),
    }
    for key in methods:
        out[key] = _throughput(times[key], n_of[key], s.doc_tokens, peaks[key])
    out["ratio_ours_over_loop"] = out["ours"]["docs_per_s"] / out["loop"]["docs_per_s"]
    out["ratio_ours_over_step"] = out["ours"]["docs_per_s"] / out["step"]["docs_per_s"]
    if device.type == "cuda" and compile_too:
        out["ours_compiled"] = _ours_compiled(model, blocks, projector, s, cols, head, device, reps)
        if "docs_per_s" in out["ours_compiled"]:
            out["ratio_compiled_over_ours"] = out["ours_compiled"]["docs_per_s"] / out["ours"]["docs_per_s"]
    del model, comp, projector
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------- dictionary
def gemm_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """Measured flop/s of `[m, k] @ [k, n]` on `device` (the shape of an epoch's correlations X Dᵀ)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up
    times = [timed(lambda: a @ b, device) for _ in range(reps)]
    return 2.0 * m * k * n / statistics.median(times)


def dict_settings(d: DictSizes) -> tuple[Any, dict[str, Any], str]:
    """The atoms stage's default settings (from ga_ray.config when importable) at this K and alpha:
    (FitSettings, learn_dictionary keyword arguments, where they came from)."""
    from ga_ray.atoms.trainer import FitSettings, auto_batch_size, resolve_batch_size

    try:  # pydantic may be absent on a borrowed GPU machine: then FitSettings' and learn_dictionary's own defaults
        from ga_ray.config import DictionaryConfig
    except Exception:
        s = FitSettings(n_atoms=d.n_atoms, alpha=d.alpha, batch_size=auto_batch_size(d.n_atoms, d.n_rows), matmul_precision="auto")
        # the config's defaults differ only in the stopping rule (tol, patience: not timed here) and in
        # holding out no rows; this check holds out 5% to report a held-out objective
        return s, {}, "FitSettings defaults, batch auto, products auto, 5% held out (ga_ray.config not importable)"
    c = DictionaryConfig()
    s = FitSettings(n_atoms=d.n_atoms, alpha=d.alpha, batch_size=resolve_batch_size(c.batch_size, d.n_atoms, d.n_rows), tol=c.tol, patience=c.patience, eval_every=c.eval_every,
                    init=c.init, seed=c.seed, dup_threshold=c.dup_threshold, stop_on=c.stop_on, warm_start=c.warm_start,
                    forget_exponent=c.forget_exponent, matmul_precision=c.matmul_precision)
    kw = {"heldout_fraction": c.heldout_fraction, "heldout_max_rows": c.heldout_max_rows, "lasso_tol": c.lasso_tol, "lasso_max_iter": c.lasso_max_iter}
    return s, kw, "ga_ray.config.DictionaryConfig defaults"


def bench_dictionary(d: DictSizes, device: torch.device, reps: int, budget_s: float) -> dict[str, Any]:
    from ga_ray.atoms.synthetic import planted_atoms, recovery
    from ga_ray.atoms.trainer import learn_dictionary

    t0 = time.perf_counter()
    X, T, _ = planted_atoms(d.n_rows, d.dim, d.n_atoms, seed=2)
    data_s = time.perf_counter() - t0
    s, kw, source = dict_settings(d)
    s = replace(s, max_epochs=1.0)  # one epoch per repetition: the stopping rule is not what is timed here
    # warm-up on a slice (one epoch of 8 batches); its time per step also guards the budget: if a full
    # epoch would not fit, each repetition runs the fraction that does and s_per_epoch is extrapolated
    sync(device)
    t = time.perf_counter()
    warm = learn_dictionary(X[: min(len(X), 8 * s.batch_size)], s, device=str(device), **kw)
    sync(device)
    warm_step_s = (time.perf_counter() - t) / max(warm.steps, 1)
    steps_per_epoch = math.ceil(len(X) * (1.0 - kw.get("heldout_fraction", 0.05)) / s.batch_size)
    projected_epoch_s = warm_step_s * steps_per_epoch
    if projected_epoch_s > budget_s:
        s = replace(s, max_epochs=max(0.05, budget_s / projected_epoch_s))
    walls, peaks, runs = [], [], []
    start = time.perf_counter()
    for i in range(reps):
        reset_peak(device)
        sync(device)
        t = time.perf_counter()
        r = learn_dictionary(X, s, device=str(device), **kw)
        sync(device)
        walls.append(time.perf_counter() - t)
        peaks.append(peak_mb(device))
        runs.append(r)
        if i + 1 < reps and time.perf_counter() - start > budget_s:
            break
    r = runs[-1]
    low = r.matmul_precision == "bfloat16"  # the correlations ran in bfloat16: the floor at that rate
    rate = gemm_rate(min(8192, d.n_rows), d.dim, d.n_atoms, device, torch.bfloat16 if low else torch.float32)
    epoch_s = statistics.median(w / max(x.epochs, 1e-9) for w, x in zip(walls, runs))
    floor_s = 2.0 * d.n_rows * d.n_atoms * d.dim / rate
    return {
        "sizes": asdict(d),
        "settings": {**s.__dict__, **kw},
        "settings_source": source,
        "data": "planted atoms (ga_ray.atoms.synthetic.planted_atoms, seed 2): unit rows of 2-3 of K random atoms + noise",
        "data_s": data_s,
        "reps": len(walls),
        "wall_s": walls,
        "s_per_epoch": epoch_s,
        "steps": r.steps,
        "epochs": r.epochs,
        "partial_epoch": r.epochs < 0.999,
        "warmup_s_per_step": warm_step_s,
        "projected_epoch_s": projected_epoch_s,
        # the stopping rule's objective (the training stream's, by default) and the 5% held-out rows'
        "objective": r.history[-1]["objective"] if r.history else None,
        "objective_kind": r.history[-1].get("objective_kind") if r.history else None,
        "heldout_objective": r.history[-1].get("heldout_objective") if r.history else None,  # None: no rows held out
        "recovery_0.9": recovery(r.state.D.cpu().numpy(), T),
        "timings": r.timings,
        "peak_mem_mb": max(peaks),
        "gemm_flops_per_s": rate,
        "matmul_precision": r.matmul_precision,
        "gemm_dtype": ("bfloat16" if low else "float32") + (f" (allow_tf32={torch.backends.cuda.matmul.allow_tf32})" if device.type == "cuda" and not low else ""),
        "epoch_floor_s": floor_s,
        "epoch_over_floor": epoch_s / floor_s,
        "sklearn": "not run: scikit-learn at this size takes hours on CPU; see `ga-ray bench dictionary`",
    }


# --------------------------------------------------------------------------------------------- main
def _guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part; on failure keep the traceback's last line so the other part's figures still come back."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (a GPU check must report, not crash)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def main(quick: bool = False, **opts: Any) -> dict[str, Any]:
    """Options: device (auto|cuda|cpu), reps (3), parts ("gradients,dictionary"), budget_s per part
    (no further repetition starts after it), threads (torch CPU threads; default unchanged).

    `run_dir` (from `ga-ray bench gpu --run-dir`) is ignored: this check builds its own inputs."""
    device = pick_device(opts.get("device"))
    if opts.get("threads") is not None:
        torch.set_num_threads(int(opts["threads"]))
    reps = int(opts.get("reps", 2 if quick else 3))
    parts = [p.strip() for p in str(opts.get("parts", "gradients,dictionary")).split(",") if p.strip()]
    budget = float(opts.get("budget_s", 30 if quick else 150))
    t0 = time.perf_counter()
    result: dict[str, Any] = {"bench": "gpu", "quick": bool(quick), "machine": machine(device)}
    if "gradients" in parts:
        result["gradients"] = _guarded("gradients", lambda: bench_gradients(QUICK_GRAD if quick else FULL_GRAD, device, reps, budget, compile_too=bool(opts.get("compile", True))))
    if "dictionary" in parts:
        result["dictionary"] = _guarded("dictionary", lambda: bench_dictionary(QUICK_DICT if quick else FULL_DICT, device, reps, budget))
    result["total_s"] = time.perf_counter() - t0
    _print(result)
    return result


def _print(res: dict[str, Any]) -> None:
    from ga_ray.tables import print_table

    m = res["machine"]
    print(f"\ngpu bench on {m.get('gpu', m['device'])} (torch {m['torch']}), {res['total_s']:.1f} s")
    g = res.get("gradients", {})
    if "error" in g:
        print(f"gradients: FAILED: {g['error']}")
    elif g:
        sz = g["sizes"]
        rows = [{"method": k, "docs_per_s": g[k]["docs_per_s"], "tokens_per_s": g[k]["tokens_per_s"], "time_s": g[k]["time_s"], "peak_mem_mb": g[k]["peak_mem_mb"]} for k in ("ours", "loop", "step")]
        print_table(
            f"per-document gradients: Llama {g['model_params'] / 1e9:.3g} B params {g['dtype']}, LoRA r={sz['lora_r']} q/v, "
            f"{sz['n_docs']} docs x {sz['doc_tokens']} tokens, batch {sz['batch_size']}, D={g['D']}; "
            f"ours/loop {g['ratio_ours_over_loop']:.3g}x, ours/step {g['ratio_ours_over_step']:.3g}x",
            rows,
        )
        oc = g.get("ours_compiled")
        if oc:
            print(f"ours compiled: FAILED: {oc['error']}" if "error" in oc else
                  f"ours with compile=True ({oc['compiled_modules']} modules, {oc['compile_s']:.0f} s to compile): "
                  f"{oc['docs_per_s']:.4g} docs/s, {g['ratio_compiled_over_ours']:.3g}x eager ours, peak {oc['peak_mem_mb']:.0f} MB")
        if g.get("ours_host_syncs_per_window") is not None:
            print(f"ours: {g['ours_host_syncs_per_window']} host syncs in one window of {g['ours_batches_per_window']} batches")
    d = res.get("dictionary", {})
    if "error" in d:
        print(f"dictionary: FAILED: {d['error']}")
    elif d:
        sz = d["sizes"]
        print_table(
            f"dictionary learner: N={sz['n_rows']}, D={sz['dim']}, K={sz['n_atoms']} (scikit-learn not run at this size)",
            [{"s_per_epoch": d["s_per_epoch"], "of_it_init_s": d["timings"].get("init_s", 0.0), "floor_s": d["epoch_floor_s"], "over_floor": d["epoch_over_floor"], "gemm_tflops": d["gemm_flops_per_s"] / 1e12,
              "objective": d["objective"], "heldout_objective": d["heldout_objective"] if d["heldout_objective"] is not None else "-", "recovery": d["recovery_0.9"], "peak_mem_mb": d["peak_mem_mb"]}],
        )


def cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ga_ray.bench.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU, seconds)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per method (default 3; 2 with --quick)")
    ap.add_argument("--parts", default="gradients,dictionary", help="comma-separated: gradients, dictionary")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds per part after which no further repetition starts (default 150; 30 with --quick); "
                    "a dictionary epoch projected past it runs as the fraction that fits")
    ap.add_argument("--no-compile", action="store_true", help="skip the extra timing of ours with compile=True (CUDA only; compiling takes ~1 minute)")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry with `ga-ray bench`: the JSON line is always printed")
    a = ap.parse_args(argv)
    opts: dict[str, Any] = {"device": a.device, "parts": a.parts, "compile": not a.no_compile}
    if a.reps is not None:
        opts["reps"] = a.reps
    if a.threads is not None:
        opts["threads"] = a.threads
    if a.budget_s is not None:
        opts["budget_s"] = a.budget_s
    res = main(quick=a.quick, **opts)
    print(json.dumps(res, default=float))
    return 0 if not any("error" in res.get(p, {}) for p in ("gradients", "dictionary")) else 1


if __name__ == "__main__":
    sys.exit(cli())
