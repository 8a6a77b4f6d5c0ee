"""Shared test fixtures: one local Ray per session, tiny models built from configs in milliseconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs, no GPU, no-progress timeout)."""
    import ray

    from ga_ray.config import RayConfig
    from ga_ray.raycluster import init_ray

    init_ray(RayConfig(num_cpus=2, execution_no_progress_timeout_s=120))
    yield ray
    ray.shutdown()


def make_tiny_llama(
    vocab_size: int = 64,
    hidden_size: int = 16,
    n_layers: int = 2,
    n_heads: int = 2,
    n_kv_heads: int | None = None,
    intermediate_size: int = 24,
    seed: int = 0,
):
    """A random Llama model (about 10^4 parameters), float32, eval mode (ga_ray.kernel.tiny_llama builds it)."""
    from ga_ray.kernel.tiny_llama import build_tiny_llama, tiny_llama_config

    cfg = tiny_llama_config(vocab_size, hidden_size, n_layers, n_heads, intermediate_size, n_kv_heads=n_kv_heads, max_positions=128)
    return build_tiny_llama(cfg, seed=seed)


def make_tiny_lora_model(
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8.0,
    use_rslora: bool = False,
    seed: int = 0,
    save_base_to: Path | None = None,
    **llama_kwargs,
):
    """A tiny Llama wrapped in a PEFT LoRA with NON-zero lora_B (so every gradient is non-trivial)."""
    from ga_ray.kernel.tiny_llama import add_random_lora

    base = make_tiny_llama(seed=seed, **llama_kwargs)
    if save_base_to is not None:
        base.save_pretrained(save_base_to)
    return add_random_lora(base, r=r, alpha=alpha, target_modules=target_modules, use_rslora=use_rslora, b_scale=0.1, b_seed=seed + 1)


def make_random_docs(n_docs: int, vocab_size: int = 64, min_len: int = 5, max_len: int = 20, seed: int = 0) -> list[dict]:
    """Rows in the data/ schema: variable lengths, a prompt part then a response part."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_docs):
        n = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(3, vocab_size, size=n).astype(np.int32)
        n_prompt = int(rng.integers(1, n - 1))
        mask = np.zeros(n, dtype=np.int8)
        mask[n_prompt:] = 1
        rows.append({"doc_id": i, "input_ids": ids.tolist(), "loss_mask": mask.tolist(), "n_tokens": n, "task": f"t{i % 3}"})
    return rows


def write_tiny_run(root: Path, n_docs: int = 24, seed: int = 0, **lora_kwargs) -> dict[str, Path]:
    """A ready-made run directory for stages after finetune: base model folder, adapter folder, data/.

    Returns {"model": ..., "adapter": ..., "data": ..., "run": ...}. The config to use is
    `model.path=<model>`, `model.adapter=<adapter>`, `finetune.enabled=false`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"run": root / "run", "model": root / "base_model", "adapter": root / "adapter", "data": root / "run" / "data"}
    model = make_tiny_lora_model(seed=seed, save_base_to=paths["model"], **lora_kwargs)
    model.save_pretrained(paths["adapter"])
    paths["data"].mkdir(parents=True, exist_ok=True)
    rows = make_random_docs(n_docs, vocab_size=model.config.vocab_size, seed=seed)
    pq.write_table(pa.Table.from_pylist(rows), paths["data"] / "part-00000.parquet")
    return paths
