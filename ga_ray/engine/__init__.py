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
    "UnknownVariantError", "chat_prompt_ids",
]
