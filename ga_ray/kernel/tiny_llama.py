"""The one builder of small random Llama models (transformers `LlamaConfig`) and of LoRA adapters with
random, non-zero `lora_B`: used by the demo world's base model, the benchmarks' synthetic worlds and
the tests' tiny models.

The weights depend only on the config and the seed: `torch.manual_seed(seed)` right before the model
is built (transformers' default init, `initializer_range` 0.02), and for the adapter PEFT's init of
`lora_A` (global RNG, continuing from there) plus a `torch.Generator` seeded `b_seed` for `lora_B`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int,
    n_layers: int,
    n_heads: int,
    intermediate_size: int,
    *,
    n_kv_heads: int | None = None,
    max_positions: int = 1024,
    pad_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    tie_word_embeddings: bool = False,
) -> Any:
    """A `LlamaConfig` with the token ids ga-ray's tiny tokenizers use (pad 0, bos 1, eos 2)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.02,
    )


def build_tiny_llama(config: Any, seed: int = 0, eval_mode: bool = True) -> Any:
    """A randomly initialised `LlamaForCausalLM` (float32) of `config`, seeded; in eval mode unless asked."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval() if eval_mode else model


def add_random_lora(
    base: Any,
    *,
    r: int,
    alpha: float,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    b_scale: float,
    b_seed: int,
) -> Any:
    """`base` wrapped in a PEFT LoRA whose `lora_B` is N(0, b_scale²) from a generator seeded `b_seed`
    (a fresh LoRA has B = 0, so every gradient through A would vanish; a fine-tuned one has B ≠ 0). Eval mode."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, use_rslora=use_rslora)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(b_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    return model.eval()
