"""`ga-ray bench serve`: the serve app's throughput with many variants against a one-adapter-at-a-time peer.

Same prompts, same concurrency, same greedy max_tokens for every row, after a warm-up:
  (a) one variant       - every request names the same variant, through the serve app (real HTTP);
  (b) all variants      - requests name every variant in random order, through the serve app;
  (c) naive peer        - one PeftModel holding the same adapters in this process, requests served one
                          at a time with `set_adapter` per request and `model.generate` (what a naive
                          multi-adapter server does: no batching across requests or adapters).
Printed: requests/s, generated tokens/s, p50/p95 latency, and the ratios (b)/(a) (goal >= 0.8: mixing
adapters costs little) and (b)/(c) (goal >= 5). Without `--run-dir` a small run is built here: the tiny
Llama of the demo's builder with random LoRA adapters written as steer variants.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ga_ray.bench.common import machine_info, print_table

_WORDS = ("alpha beta gamma delta red green blue cat dog fish one two three list table answer question "
          "short long bullet plain format code json yes no maybe river stone cloud light").split()


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def build_tiny_serve_run(root: str | Path, n_variants: int = 4, seed: int = 0, hidden_size: int = 32, n_layers: int = 2,
                         lora_r: int = 4, b_scale: float = 0.5, max_positions: int = 128) -> dict[str, Any]:
    """A run directory with a tiny Llama (random weights), its BPE tokenizer with a chat template, a
    fine-tuned adapter and `n_variants` random LoRA variants written through `ga_ray.steer.io`.

    Returns {"run": run dir, "model": model folder, "adapter": adapter folder, "variants": [names],
    "overrides": the `--set` list that points a config at them}. Every adapter's lora_B is non-zero
    (N(0, b_scale^2)), so each variant's greedy answers differ from the base model's.
    """
    from ga_ray.demo.tiny_model import make_config, make_model
    from ga_ray.demo.tokenizer import train_tokenizer

    root = Path(root)
    model_dir, run_dir = root / "model", root / "run"
    tok = train_tokenizer(_texts(400, seed), vocab_size=320, out_dir=model_dir, min_frequency=1)
    tok.model_max_length = max_positions
    tok.save_pretrained(model_dir)
    cfg = make_config(len(tok), hidden_size, n_layers, 2, hidden_size * 3, max_positions=max_positions)
    base = make_model(cfg, seed=seed)
    base.save_pretrained(model_dir)
    names = []
    for k in range(n_variants + 1):
        peft = random_lora(cfg, seed * 1000 + k + 1, lora_r=lora_r, b_scale=b_scale, base_seed=seed)
        if k == 0:
            peft.save_pretrained(root / "adapter")
        else:
            names.append(write_lora_variant(peft, run_dir, f"random{k}-toward-a1", k, lora_r))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "manifest.json").write_text('{"stages": {}}\n')
    overrides = [f"model.path={model_dir}", f"model.adapter={root / 'adapter'}", "finetune.enabled=false", "model.dtype=float32"]
    return {"run": run_dir, "model": model_dir, "adapter": root / "adapter", "variants": names, "overrides": overrides,
            "model_config": cfg}


def random_lora(model_config: Any, seed: int, lora_r: int = 4, b_scale: float = 0.5, base_seed: int = 0) -> Any:
    """A PeftModel over the tiny Llama of `model_config` (weights from `base_seed`) with random, non-zero LoRA
    A and B on q_proj, v_proj and down_proj."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ga_ray.demo.tiny_model import make_model

    lcfg = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    peft = get_peft_model(make_model(model_config, seed=base_seed), lcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (b_scale if "lora_B" in name else 0.5))
    return peft


def write_lora_variant(peft: Any, run_dir: str | Path, stem: str, atom: int, lora_r: int = 4) -> str:
    """Write `peft`'s adapter as a steer variant of `run_dir` (atomic folder through ga_ray.steer.io); its name."""
    from ga_ray.steer import io as variants_io

    with tempfile.TemporaryDirectory() as tmp:
        peft.save_pretrained(tmp)
        tensors, acfg = variants_io.load_adapter_tensors(tmp)
    row = variants_io.write_variant(Path(run_dir) / variants_io.VARIANTS_DIR, stem, tensors, acfg, {
        "kind": "random", "atoms": [atom], "weights": [1.0], "sign": "toward", "alpha": 1.0, "units": "absolute",
        "mode": "paper", "rank": lora_r})
    return row["name"]


# ------------------------------------------------------------------------------------------ load


async def _drive(url: str, api_key: str | None, jobs: list[tuple[str, str]], max_tokens: int, concurrency: int) -> dict[str, Any]:
    """Send `jobs` (model id, prompt) with `concurrency` in flight; latency of each, tokens generated."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=300)
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    tokens = 0

    async def one(model: str, prompt: str) -> None:
        nonlocal tokens
        async with sem:
            t0 = time.perf_counter()
            r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
            lat.append(time.perf_counter() - t0)
            tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m, p) for m, p in jobs))
    wall = time.perf_counter() - t0
    await client.close()
    return _row(len(jobs), tokens, wall, lat)


def _row(n: int, tokens: int, wall: float, lat: list[float]) -> dict[str, Any]:
    lat = sorted(lat)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return {"requests": n, "req_per_s": n / wall, "gen_tok_per_s": tokens / wall, "p50_s": statistics.median(lat), "p95_s": p95}


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median generated tokens/s."""
    ranked = sorted(rows, key=lambda r: r["gen_tok_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "reps": len(rows)}


def _naive_peer(cfg: Any, adapter: Path, variants: dict[str, Path], jobs: list[tuple[str, str]], max_tokens: int) -> dict[str, Any]:
    """One request at a time, `set_adapter` before each: what a server without cross-adapter batching does."""
    import torch
    from peft import PeftModel

    from ga_ray.kernel.loading import load_base_model, load_tokenizer

    tok = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_base_model(cfg.model), str(adapter), adapter_name="finetuned")
    # PEFT adapter names are module-dict keys and cannot hold dots (variant names such as `...-a0.25-...` do)
    keys = {"finetuned": "finetuned"} | {name: f"variant{i}" for i, name in enumerate(variants)}
    for name, path in variants.items():
        model.load_adapter(str(path), adapter_name=keys[name])
    model.eval()
    lat, tokens = [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for name, prompt in jobs:
            s = time.perf_counter()
            model.set_adapter(keys[name])
            ids = torch.tensor([tok(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids.shape[1]
            lat.append(time.perf_counter() - s)
    return _row(len(jobs), tokens, time.perf_counter() - t0, lat)


def main(quick: bool = False, run_dir: str | None = None) -> dict[str, Any]:
    import ray

    from ga_ray.config import load_config
    from ga_ray.serve.catalog import VariantCatalog
    from ga_ray.serve.launch import start_local

    n_requests = 48 if quick else 192
    reps = 2 if quick else 3
    concurrency = 16
    max_tokens = 16 if quick else 32
    tmp = None
    if run_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="ga-ray-bench-serve-"))
        world = build_tiny_serve_run(tmp, n_variants=4 if quick else 8, hidden_size=64, n_layers=2)
        run, cfg = world["run"], load_config(None, world["overrides"])
    else:
        run = Path(run_dir)
        cfg = load_config(str(run / "config.yaml") if (run / "config.yaml").exists() else None, [])
    cfg.serve.max_batch_size = concurrency
    cfg.serve.max_ongoing_requests = concurrency
    cfg.serve.max_queued_requests = n_requests
    cfg.serve.cpus_per_worker = 1.0
    try:
        from ga_ray.serve.app import run_adapter

        catalog = VariantCatalog(run, run_adapter(cfg, run))
        variant_ids = [i for i in catalog.ids() if i not in ("base", "finetuned")]
        if not variant_ids:
            raise SystemExit(f"{run} has no variants/: run `ga-ray steer` first, or leave out --run-dir")
        prompts = _texts(n_requests, seed=1)
        rng = random.Random(0)
        one = [(variant_ids[0], p) for p in prompts]
        mixed = [(rng.choice(variant_ids), p) for p in prompts]
        with start_local(run, cfg, port=0, api_key="bench") as h:
            asyncio.run(_drive(h.url, "bench", mixed[:concurrency], max_tokens, concurrency))  # warm-up
            # (a) and (b) interleaved, several times: on a shared machine the load drifts; each row is its median repetition
            reps_a, reps_b = [], []
            for _ in range(reps):
                reps_a.append(asyncio.run(_drive(h.url, "bench", one, max_tokens, concurrency)))
                reps_b.append(asyncio.run(_drive(h.url, "bench", mixed, max_tokens, concurrency)))
            row_a, row_b = _median_row(reps_a), _median_row(reps_b)
        naive_jobs = mixed[: max(16, n_requests // 4)]  # the peer is slow: a quarter of the requests is enough for its rates
        paths = {i: e.path for i in variant_ids if (e := catalog.get(i)) is not None}
        adapter = run_adapter(cfg, run)
        _naive_peer(cfg, adapter, paths, naive_jobs[:2], max_tokens)  # warm-up
        row_c = _naive_peer(cfg, adapter, paths, naive_jobs, max_tokens)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"case": "(a) one variant", **row_a}, {"case": f"(b) {len(variant_ids)} variants mixed", **row_b},
            {"case": "(c) naive set_adapter per request", **row_c}]
    result = {
        "machine": machine_info(), "variants": len(variant_ids), "concurrency": concurrency, "max_tokens": max_tokens,
        "reps": reps, "rows": rows, "mixed_over_one": row_b["gen_tok_per_s"] / row_a["gen_tok_per_s"],
        "mixed_over_naive": row_b["gen_tok_per_s"] / row_c["gen_tok_per_s"],
    }
    print_table(f"serve: {len(variant_ids)} variants, {concurrency} in flight, greedy {max_tokens} new tokens", rows)
    print(f"\n(b)/(a) generated tokens/s: {result['mixed_over_one']:.2f} (goal >= 0.8)")
    print(f"(b)/(c) generated tokens/s: {result['mixed_over_naive']:.2f} (goal >= 5)")
    return result
