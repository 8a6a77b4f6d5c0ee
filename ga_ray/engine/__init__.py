"""Generation engines behind one protocol (`ga_ray.engine.protocol`): transformers + PEFT
(`PeftEngine`, CPU or GPU) and vLLM multi-LoRA (`VllmEngine`, GPU). `make_engine` picks one."""

from ga_ray.engine.protocol import (
    BASE,
    FINETUNED,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
    SamplingParams,
    Scored,
    UnknownVariantError,
    chat_prompt_ids,
)

__all__ = [
    "BASE", "FINETUNED", "Engine", "EngineError", "Generation", "GenerationRequest", "SamplingParams", "Scored",
    "UnknownVariantError", "chat_prompt_ids", "make_engine", "resolve_engine_kind", "vllm_available",
]


def vllm_available() -> bool:
    """True when vLLM can be imported and a CUDA device is there (vLLM's GPU path)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def resolve_engine_kind(kind: str) -> str:
    """`auto` -> `vllm` when CUDA and vLLM are there, else `peft`; `peft`/`vllm` as given."""
    if kind not in ("auto", "peft", "vllm"):
        raise EngineError(f"unknown engine {kind!r}; use auto, peft or vllm")
    if kind == "auto":
        return "vllm" if vllm_available() else "peft"
    return kind


def make_engine(kind: str, model_cfg, *, adapter=None, variants=None, **kw) -> Engine:
    """An engine of `kind` (`peft` / `vllm` / `auto`) for `model_cfg` (a `ModelConfig`) with the run's
    `adapter` (variant `finetuned`) and `variants` (name -> PEFT folder). Extra keywords go to the
    engine: `PeftEngine.from_config` (device, dtype, max_batch_size, torch_threads) or
    `VllmEngine.from_config` (gpu_memory_utilization, max_loras, ...)."""
    kind = resolve_engine_kind(kind)
    if kind == "vllm":
        from ga_ray.engine.vllm_engine import VllmEngine

        return VllmEngine.from_config(model_cfg, adapter=adapter, variants=variants, **kw)
    from ga_ray.engine.peft_engine import PeftEngine

    return PeftEngine.from_config(model_cfg, adapter=adapter, variants=variants, **kw)
