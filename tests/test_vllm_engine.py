"""The vLLM engine up to the engine call. vLLM cannot be installed on these CPU machines (no CPU wheel on
the package index), so the engine itself never runs here; what is tested is everything around it: engine
arguments built from real PEFT adapter folders, LoRA ids, the sampling mapping, and the conversion of
vLLM-shaped output objects (plain dataclasses with the fields of vLLM's `RequestOutput`,
`CompletionOutput` and `Logprob`) into our `Generation` / `Scored`, checked against PeftEngine's own
numbers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from ga_ray.engine import EngineError, GenerationRequest, SamplingParams
from ga_ray.engine.vllm_engine import (
    VLLM_MAX_LORA_RANKS,
    adapter_rank,
    build_engine_args,
    generation_from_output,
    lora_int_id,
    sampling_kwargs,
    score_kwargs,
    scored_from_output,
    vllm_lora_rank,
)


# vLLM's output shapes (vllm/outputs.py, vllm/logprobs.py), as plain dataclasses
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def _vllm_position(logp: torch.Tensor, chosen: int, k: int) -> dict[int, Logprob]:
    """What vLLM returns at one position: the top k by rank, plus the chosen token (with its own rank)."""
    order = torch.argsort(logp, descending=True).tolist()
    ranks = {t: r + 1 for r, t in enumerate(order)}
    out = {t: Logprob(float(logp[t]), ranks[t]) for t in order[:k]}
    out[chosen] = Logprob(float(logp[chosen]), ranks[chosen])
    return out


def _adapter(path: Path, r: int, rank_pattern: dict | None = None) -> Path:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], rank_pattern=rank_pattern or {})
    get_peft_model(make_tiny_llama(), cfg).save_pretrained(path)
    return path


def test_adapter_rank_and_vllm_max_lora_rank(tmp_path):
    assert adapter_rank(_adapter(tmp_path / "a", 4)) == 4
    # paper mode keeps r, linear mode doubles it; a rank_pattern raises the largest rank
    assert adapter_rank(_adapter(tmp_path / "b", 4, {"v_proj": 12})) == 12
    with pytest.raises(EngineError, match="adapter config"):
        adapter_rank(tmp_path / "missing")
    assert [vllm_lora_rank([r]) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]
    assert vllm_lora_rank([4, 8, 16]) == 16  # r = 8 (paper) and 2r = 16 (linear) in one engine
    assert all(vllm_lora_rank([r]) in VLLM_MAX_LORA_RANKS and vllm_lora_rank([r]) >= r for r in range(1, 513))
    with pytest.raises(EngineError, match="exceeds"):
        vllm_lora_rank([600])


def test_lora_ids_are_stable_per_name_and_unique():
    names = [f"atom{i}-toward-a2-{i:08x}" for i in range(300)] + ["finetuned", "group3-away-a0.5-0badf00d"]
    ids = {n: lora_int_id(n) for n in names}
    assert ids == {n: lora_int_id(n) for n in names}  # the same on every call (replica, restart)
    assert all(0 < i < 2**31 for i in ids.values())
    assert len(set(ids.values())) == len(names)
    # a collision with another name's id moves on to a free id; the owner keeps its own
    taken = {ids["finetuned"]: "someone-else"}
    other = lora_int_id("finetuned", taken)
    assert other != ids["finetuned"] and other not in taken
    assert lora_int_id("finetuned", {ids["finetuned"]: "finetuned"}) == ids["finetuned"]


def test_engine_args_from_variants(tmp_path):
    args = build_engine_args("/models/base", lora_ranks=[8, 16, 4], n_variants=12, max_loras=4, max_model_len=2048,
                             gpu_memory_utilization=0.5)
    assert args["enable_lora"] is True and args["model"] == "/models/base" and args["tokenizer"] == "/models/base"
    assert args["max_lora_rank"] == 16
    assert args["max_loras"] == 4 and args["max_cpu_loras"] == 12  # every variant stays in CPU memory
    assert args["max_cpu_loras"] >= args["max_loras"]  # vLLM's LoRAConfig check
    assert args["max_model_len"] == 2048 and args["gpu_memory_utilization"] == 0.5
    few = build_engine_args("/m", lora_ranks=[4], n_variants=2, max_loras=8)
    assert few["max_loras"] == 2 and few["max_cpu_loras"] == 2 and few["max_lora_rank"] == 8
    assert "max_model_len" not in few  # vLLM then takes the model's own
    assert build_engine_args("/m", lora_ranks=[4], max_lora_rank=64)["max_lora_rank"] == 64  # room for later variants
    assert build_engine_args("/m", extra={"tensor_parallel_size": 2, "max_loras": 3})["max_loras"] == 3
    with pytest.raises(EngineError, match="allowed ranks"):
        build_engine_args("/m", max_lora_rank=24)
    with pytest.raises(EngineError, match="below"):
        build_engine_args("/m", lora_ranks=[32], max_lora_rank=16)
    with pytest.raises(EngineError):
        build_engine_args("/m", gpu_memory_utilization=1.5)


def test_sampling_mapping():
    assert sampling_kwargs(SamplingParams(max_new_tokens=7)) == dict(max_tokens=7, temperature=0.0, skip_special_tokens=True)
    kw = sampling_kwargs(SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, seed=5, stop=("\n", "##"), logprobs=2))
    assert kw == dict(max_tokens=3, temperature=0.7, top_p=0.9, seed=5, stop=["\n", "##"], logprobs=2, skip_special_tokens=True)
    assert "seed" not in sampling_kwargs(SamplingParams(temperature=1.0))
    assert sampling_kwargs(SamplingParams(logprobs=0))["logprobs"] == 0
    assert score_kwargs(3) == dict(max_tokens=1, temperature=0.0, prompt_logprobs=3, skip_special_tokens=True)


@pytest.fixture(scope="module")
def peft_engine(tmp_path_factory):
    from ga_ray.demo.tokenizer import train_tokenizer
    from ga_ray.engine.peft_engine import PeftEngine

    root = tmp_path_factory.mktemp("vllm")
    tok = train_tokenizer(["hello world the cat sat on the mat", "one two three four"] * 30, 300, root / "tok")
    return PeftEngine(make_tiny_llama(vocab_size=300, hidden_size=32, n_heads=4), tok)


def test_output_conversion_equals_peft_engine_numbers(peft_engine):
    """vLLM-shaped outputs built from the model's own log-probs convert to exactly what PeftEngine returns."""
    e = peft_engine
    p = SamplingParams(max_new_tokens=6, logprobs=3)
    g = e.generate([GenerationRequest("base", "hello world", p)])[0]
    ids = e.encode("hello world")
    full = ids + g.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(e._base(input_ids=torch.tensor([full])).logits[0].double(), -1)
    # generation: position i predicts full[len(ids) + i]; chosen tokens are the greedy ones (rank 1)
    positions = [_vllm_position(logp[len(ids) - 1 + i], tok, 3) for i, tok in enumerate(g.token_ids)]
    out = RequestOutput("r0", None, ids, None, [CompletionOutput(0, g.text, g.token_ids, None, positions, "length")])
    conv = generation_from_output(out, len(ids), p)
    assert conv.token_ids == g.token_ids and conv.text == g.text and conv.finish_reason == g.finish_reason
    assert conv.prompt_tokens == g.prompt_tokens
    assert conv.logprobs == pytest.approx(g.logprobs, abs=1e-4)
    assert [[t for t, _ in s] for s in conv.top_logprobs] == [[t for t, _ in s] for s in g.top_logprobs]
    # scoring: vLLM's prompt_logprobs (None first) -> our Scored
    plp = [None] + [_vllm_position(logp[t - 1], full[t], 2) for t in range(1, len(full))]
    scored = scored_from_output(RequestOutput("r1", None, full, plp, [CompletionOutput(0, "", [5], None, None, "length")]), full, 2)
    mine = e.score([full], "base", top_logprobs=2)[0]
    assert scored.token_ids == mine.token_ids and scored.logprobs[0] is None and scored.top_logprobs[0] is None
    assert scored.logprobs[1:] == pytest.approx(mine.logprobs[1:], abs=1e-4)
    assert [[t for t, _ in s] for s in scored.top_logprobs[1:]] == [[t for t, _ in s] for s in mine.top_logprobs[1:]]
    assert scored_from_output(RequestOutput("r2", None, full, plp, []), full, 0).top_logprobs is None


def test_output_conversion_edge_cases():
    # a sampled token outside the top k: its own log-prob is reported, and the top k stay the top k
    pos = {7: Logprob(-0.1, 1), 9: Logprob(-2.0, 2), 4: Logprob(-6.5, 40)}
    c = CompletionOutput(0, "x", [4], None, [pos], "stop", stop_reason="\n")
    g = generation_from_output(RequestOutput("r", None, [1, 2], None, [c]), 2, SamplingParams(logprobs=2, temperature=1.0))
    assert g.logprobs == [-6.5] and g.top_logprobs == [[(7, -0.1), (9, -2.0)]] and g.finish_reason == "stop"
    assert generation_from_output(RequestOutput("r", None, [1], None, [c]), 1, SamplingParams()).logprobs is None
    with pytest.raises(EngineError, match="abort"):
        generation_from_output(RequestOutput("r", None, [1], None, [CompletionOutput(0, "", [], None, None, "abort")]), 1, SamplingParams())
    with pytest.raises(EngineError, match="no logprobs"):
        generation_from_output(RequestOutput("r", None, [1], None, [CompletionOutput(0, "", [3], None, None, "length")]), 1,
                               SamplingParams(logprobs=1))
    with pytest.raises(EngineError, match="prompt log-probs"):
        scored_from_output(RequestOutput("r", None, [1, 2], None, []), [1, 2], 0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_engine_says_what_to_do(tmp_path):
    from ga_ray.engine.vllm_engine import VllmEngine

    a = _adapter(tmp_path / "a", 4)
    with pytest.raises(EngineError, match="engine: peft"):
        VllmEngine(str(tmp_path), tokenizer=None, adapter=a, variants={"atom1-toward-a2-00000000": a})
    with pytest.raises(EngineError, match="adapter_config.json"):  # arguments are checked before vLLM is needed
        VllmEngine(str(tmp_path), tokenizer=None, variants={"x": tmp_path})
