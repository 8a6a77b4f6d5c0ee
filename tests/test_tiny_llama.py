"""ga_ray.kernel.tiny_llama: the one tiny-Llama builder (demo, benchmarks, tests)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ga_ray.kernel.tiny_llama import add_random_lora, build_tiny_llama, tiny_llama_config

REPO = Path(__file__).resolve().parents[1]


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_config_and_seeded_weights():
    cfg = tiny_llama_config(64, 16, 2, 4, 24, n_kv_heads=2, max_positions=128, pad_id=5, tie_word_embeddings=True)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 16, 2, 4, 2)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (24, 128, 5, 1, 2)
    assert cfg.tie_word_embeddings and cfg.initializer_range == 0.02
    assert tiny_llama_config(64, 16, 2, 4, 24).num_key_value_heads == 4  # default: as many KV heads as heads

    a, b, c = (build_tiny_llama(tiny_llama_config(64, 16, 2, 2, 24), seed=s) for s in (3, 3, 4))
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the seed alone decides the weights
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"])
    assert not a.training and build_tiny_llama(tiny_llama_config(64, 16, 2, 2, 24), eval_mode=False).training
    # transformers' init: N(0, 0.02^2) linear weights
    assert abs(float(wa["model.layers.0.mlp.up_proj.weight"].std()) - 0.02) < 0.004


def test_random_lora_has_the_requested_nonzero_b():
    base = build_tiny_llama(tiny_llama_config(64, 32, 2, 2, 48), seed=0)
    model = add_random_lora(base, r=4, alpha=8.0, target_modules=("q_proj", "v_proj"), b_scale=0.5, b_seed=7)
    bs = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(bs) == 4 and not model.training  # 2 layers x (q, v)
    flat = torch.cat([p.detach().flatten() for p in bs.values()])
    assert abs(float(flat.std()) - 0.5) < 0.1 and float(flat.abs().min()) > 0
    g = torch.Generator().manual_seed(7)  # the first B is exactly the generator's first draw
    first_name, first = next(iter(bs.items()))
    assert torch.equal(first.detach(), torch.randn(first.shape, generator=g) * 0.5), first_name
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8.0


def test_no_other_module_builds_a_llama_config():
    """One builder: `LlamaConfig(` appears in ga_ray/kernel/tiny_llama.py only (package and tests)."""
    users = sorted(
        str(p.relative_to(REPO))
        for folder in ("ga_ray", "tests")
        for p in (REPO / folder).rglob("*.py")
        if re.search(r"\bLlamaConfig\(", p.read_text()) and p.name != "test_tiny_llama.py"
    )
    assert users == ["ga_ray/kernel/tiny_llama.py"], users
