"""Loading a user model folder, its tokenizer and a LoRA adapter; every mismatch is a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_lora_model

from ga_ray.config import ModelConfig
from ga_ray.kernel.loading import (
    ModelLoadError,
    check_adapter_fits,
    load_base_model,
    load_lora_model,
    load_tokenizer,
    resolve_dtype,
)
from ga_ray.pipeline import StageError

FIT_HINT = "Use the base model the adapter was trained on (model.path), or the adapter made for this model."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny Llama and a LoRA adapter trained on it (non-zero lora_B)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    peft_model = make_tiny_lora_model(save_base_to=root / "base")
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "base": root / "base", "adapter": root / "adapter", "peft": peft_model}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as err:
        fn(*args, **kwargs)
    assert isinstance(err.value, StageError)
    return str(err.value)


def test_lora_model_loads_in_eval_mode_with_the_saved_weights(world):
    model = load_lora_model(ModelConfig(path=str(world["base"])), world["adapter"])
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    assert not model.training and not any(m.training for m in model.modules())
    ref = dict(world["peft"].named_parameters())
    got = dict(model.named_parameters())
    lora = [n for n in ref if "lora_" in n]
    assert lora and all(torch.equal(ref[n], got[n]) for n in lora)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, world["peft"](ids).logits, atol=1e-6)
    assert next(model.parameters()).dtype == torch.float32  # dtype auto on CPU


def test_base_model_dtype_and_device(world):
    cfg = ModelConfig(path=str(world["base"]), dtype="bfloat16")
    model = load_base_model(cfg)
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert next(load_base_model(cfg, dtype="float32").parameters()).dtype == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32


def test_adapter_for_a_module_the_model_lacks(world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32, bos_token_id=1, eos_token_id=2))
    get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"])).save_pretrained(tmp_path / "gpt2_adapter")
    msg = _error(load_lora_model, ModelConfig(path=str(world["base"])), tmp_path / "gpt2_adapter")
    assert msg == (
        f"adapter {tmp_path / 'gpt2_adapter'} does not fit model {world['base']}: the adapter targets module 'c_attn', "
        "which the model does not have (its linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, "
        f"up_proj, v_proj). {FIT_HINT}"
    )


def test_adapter_with_weights_of_the_wrong_shape(world, tmp_path):
    make_tiny_lora_model(hidden_size=32).save_pretrained(tmp_path / "wide")  # same names, hidden 32 instead of 16
    msg = _error(load_lora_model, ModelConfig(path=str(world["base"])), tmp_path / "wide")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert msg == (
        f"adapter {tmp_path / 'wide'} does not fit model {world['base']}: "
        f"weight '{q}.lora_A.weight' has shape (4, 32) but module 'model.layers.0.self_attn.q_proj' takes 16 input features, so it needs (4, 16); "
        f"weight '{q}.lora_B.weight' has shape (32, 4) but module 'model.layers.0.self_attn.q_proj' has 16 output features, so it needs (16, 4); "
        "weight 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight' has shape (4, 32) but module "
        "'model.layers.0.self_attn.v_proj' takes 16 input features, so it needs (4, 16) "
        f"(and 5 more). {FIT_HINT}"
    )


def test_adapter_for_more_layers_than_the_model_has(world, tmp_path):
    make_tiny_lora_model(n_layers=3).save_pretrained(tmp_path / "deep")
    base = load_base_model(ModelConfig(path=str(world["base"])))
    msg = _error(check_adapter_fits, base, tmp_path / "deep", world["base"])
    k = "base_model.model.model.layers.2.self_attn"
    assert msg == (
        f"adapter {tmp_path / 'deep'} does not fit model {world['base']}: "
        f"weight '{k}.q_proj.lora_A.weight' is for module 'model.layers.2.self_attn.q_proj', which the model does not have; "
        f"weight '{k}.q_proj.lora_B.weight' is for module 'model.layers.2.self_attn.q_proj', which the model does not have; "
        f"weight '{k}.v_proj.lora_A.weight' is for module 'model.layers.2.self_attn.v_proj', which the model does not have "
        f"(and 1 more). {FIT_HINT}"
    )


def test_folder_errors(world, tmp_path):
    assert _error(load_base_model, ModelConfig()) == "model.path is not set: point it to a local model folder"
    missing = tmp_path / "missing"
    assert _error(load_base_model, ModelConfig(path=str(missing))) == f"model folder {missing} does not exist (model.path)"
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    assert _error(load_base_model, ModelConfig(path=str(a_file))) == f"model.path {a_file} is a file; it must be a model folder"
    assert _error(load_base_model, ModelConfig(path=str(tmp_path))) == (
        f"{tmp_path} is not a transformers model folder: it has no config.json. "
        "Point model.path to a folder written by save_pretrained() (config.json + weights)"
    )
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(world["base"] / "config.json", no_weights / "config.json")
    assert _error(load_base_model, ModelConfig(path=str(no_weights))).startswith(f"could not load a causal LM from {no_weights} (OSError: ")

    cfg = ModelConfig(path=str(world["base"]))
    assert _error(load_lora_model, cfg, None) == "model.adapter is not set: point it to a local adapter folder"
    assert _error(load_lora_model, cfg, missing) == f"adapter folder {missing} does not exist (model.adapter)"
    assert _error(load_lora_model, cfg, world["base"]) == f"{world['base']} is not a PEFT adapter folder: it has no adapter_config.json"
    no_w = tmp_path / "adapter_no_weights"
    no_w.mkdir()
    shutil.copy(world["adapter"] / "adapter_config.json", no_w / "adapter_config.json")
    assert _error(load_lora_model, cfg, no_w) == f"{no_w} has no adapter weights (adapter_model.safetensors or adapter_model.bin)"


def test_non_lora_adapter(world, tmp_path):
    from peft import IA3Config, get_peft_model

    get_peft_model(make_tiny_llama(), IA3Config(target_modules=["q_proj", "v_proj"], feedforward_modules=[])).save_pretrained(tmp_path / "ia3")
    msg = _error(load_lora_model, ModelConfig(path=str(world["base"])), tmp_path / "ia3")
    assert msg == f"adapter {tmp_path / 'ia3'} is of type IA3; ga-ray analyses LoRA adapters only"


def test_remote_code_stays_off_unless_enabled(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = {"model_type": "my_custom", "auto_map": {"AutoConfig": "configuration_x.C", "AutoModelForCausalLM": "modeling_x.M"}}
    (folder / "config.json").write_text(json.dumps(config))
    # The code it names would fail loudly if it ran.
    (folder / "configuration_x.py").write_text("raise RuntimeError('remote code ran')\n")
    msg = _error(load_base_model, ModelConfig(path=str(folder)))
    assert msg == (
        f"{folder} needs model code shipped with the checkpoint (auto_map in config.json); "
        "set model.trust_remote_code: true if you trust this folder"
    )


def test_tokenizer_loading(world, tmp_path):
    from test_prepare_helpers import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(ModelConfig(path=str(world["base"]), tokenizer=str(tmp_path / "tok")))
    assert loaded.pad_token == loaded.eos_token == "</s>"  # pad falls back to EOS
    assert loaded.chat_template == tok.chat_template
    assert loaded("Paris", add_special_tokens=False)["input_ids"] == tok("Paris", add_special_tokens=False)["input_ids"]
    assert _error(load_tokenizer, ModelConfig(path=str(world["base"]))) == (
        f"{world['base']} has no tokenizer (no tokenizer.json or tokenizer_config.json); "
        "set model.tokenizer to the folder written by the tokenizer's save_pretrained()"
    )
    assert _error(load_tokenizer, ModelConfig()) == "model.path is not set: point it to a local tokenizer folder"
