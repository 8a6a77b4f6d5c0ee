"""LoRA block discovery: names, order, shapes, scales, unsupported layouts."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_lora_model
from ga_ray.kernel.lora_blocks import LoraBlockError, block_modules, block_parameters, find_lora_blocks

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "targets, r, alpha, rslora, kw",
    [
        (("q_proj", "v_proj"), 4, 8.0, False, {}),
        (ALL, 2, 3.0, True, {"hidden_size": 24, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 40}),
        (("down_proj", "k_proj"), 8, 16.0, False, {"n_layers": 3, "n_kv_heads": 1}),
    ],
)
def test_blocks_follow_named_parameters(targets, r, alpha, rslora, kw):
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=targets, r=r, alpha=alpha, use_rslora=rslora, **kw)
    blocks = find_lora_blocks(model)
    lora_names = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    assert [b.name for b in blocks] == lora_names
    n_layers = kw.get("n_layers", 2)
    assert len(blocks) == 2 * len(targets) * n_layers
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    params = block_parameters(model, blocks)
    modules = block_modules(model, blocks)
    base_modules = dict(model.named_modules())
    for b, p, m in zip(blocks, params, modules):
        assert b.scale == pytest.approx(scale)
        assert tuple(p.shape) == b.shape
        assert m.weight is p
        assert b.kind == ("A" if ".lora_A." in b.name else "B")
        base = base_modules[b.layer_name].base_layer
        if b.kind == "A":
            assert b.shape == (r, base.in_features)
        else:
            assert b.shape == (base.out_features, r)
        assert b.to_json()["shape"] == list(b.shape)


def test_names_match_a_reloaded_adapter(tmp_path):
    """Factors and gradients stages match blocks by name: a saved and reloaded adapter gives the same names."""
    from peft import PeftModel

    model = make_tiny_lora_model(target_modules=("q_proj", "up_proj"), save_base_to=tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert [b.name for b in find_lora_blocks(reloaded)] == [b.name for b in find_lora_blocks(model)]


def test_no_lora_is_an_error():
    with pytest.raises(LoraBlockError, match="no PEFT LoRA layer"):
        find_lora_blocks(make_tiny_llama())


@pytest.mark.parametrize("option, match", [({"use_dora": True}, "DoRA"), ({"lora_bias": True}, "bias")])
def test_unsupported_layouts_are_named(option, match):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], **option))
    with pytest.raises(LoraBlockError, match=match):
        find_lora_blocks(model)
