"""The evaluate stage end to end through the real serve app (Ray Serve over HTTP, PeftEngine) on a tiny model:
every request accounted for, perplexity through the endpoint equal to a local forward, token KL a lower bound of
the exact KL computed locally, and a second run that resumes everything."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_llama

VOCAB = 300
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, n_layers=2, n_heads=4, intermediate_size=48)


def _adapter(path, seed, scale=0.5):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(make_tiny_llama(seed=0, **LLAMA), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * scale
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ga_ray.demo.tokenizer import train_tokenizer
    from ga_ray.steer import io as vio

    root = tmp_path_factory.mktemp("evaluate")
    texts = ["- apples\n- pears", "Category: mammal", "please provide the text", "the cat sat on the mat"] * 40
    tok = train_tokenizer(texts, VOCAB, root / "tok")
    make_tiny_llama(seed=0, **LLAMA).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    run = root / "run"
    _adapter(run / "adapter", seed=1)
    t, c = vio.load_adapter_tensors(run / "adapter")
    vdir = run / "variants"
    vio.write_variant(vdir, "baseline", t, c, {"kind": "baseline", "sign": "none", "alpha": 0.0, "rank": 4})
    for sign, s in (("toward", 1.0), ("away", -1.0)):
        g = torch.Generator().manual_seed(7)
        moved = {k: v + s * 0.3 * torch.randn(v.shape, generator=g) for k, v in t.items()}
        vio.write_variant(vdir, vio.variant_stem("atom", sign, 1.0, [5]), moved, c,
                          {"kind": "atom", "atoms": [5], "weights": [1.0], "behaviour": "bullets", "sign": sign, "alpha": 1.0,
                           "units": "absolute", "mode": "paper", "rank": 4})
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"List {w} fruits.", "behaviour": "bullets", "kind": "invite"} for w in ("two", "three", "some", "red")]
    rows += [{"prompt": f"Classify the {w}.", "behaviour": "bullets", "kind": "neutral", "source": "classification"} for w in ("cat", "owl")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in
                            [("Classify the cat.", "Category: mammal"), ("List fruits.", "- apples\n- pears"), ("Hi", "the cat sat")]))
    return root, run


def _cfg(root, run):
    from ga_ray.config import RunConfig

    return RunConfig.model_validate({
        "model": {"path": str(root / "base")},
        "finetune": {"enabled": True},
        "evaluation": {"prompts": str(root / "prompts.jsonl"), "perplexity_docs": str(root / "docs.jsonl"), "max_tokens": 8,
                       "concurrency": 4, "kl_top_k": 20, "chunk_rows": 4, "timeout_s": 120},
    })


def _ctx(cfg, run):
    from ga_ray.pipeline import StageContext
    from ga_ray.rundir import RunDir

    out = run / "eval"
    out.mkdir(exist_ok=True)
    return StageContext(cfg=cfg, run_dir=RunDir(run), stage="evaluate", out=out)


def _local_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)  # row t predicts token t + 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stage_through_the_serve_app(ray_session, tiny_run):
    from peft import PeftModel

    from ga_ray.engine.protocol import chat_prompt_ids
    from ga_ray.evaluate import io
    from ga_ray.evaluate.prompts import load_documents
    from ga_ray.evaluate.scoring import response_ids
    from ga_ray.evaluate.stage import run_evaluate
    from ga_ray.kernel.loading import load_tokenizer
    from ga_ray.steer.io import list_variants

    root, run = tiny_run
    cfg = _cfg(root, run)
    summary = run_evaluate(_ctx(cfg, run))
    gens = io.load_generations(run)
    # baseline, finetuned, base: 6 prompts each; the two atom variants: their behaviour's 6 prompts
    assert len(gens) == 5 * 6 and summary["failed"] == 0 and summary["resumed"] == 0
    by = {(g["variant"], g["prompt_id"]): g for g in gens}
    vs = {v["kind"] + v.get("sign", ""): v["name"] for v in list_variants(run)}
    baseline, toward = vs["baselinenone"], vs["atomtoward"]
    for pid in {g["prompt_id"] for g in gens}:  # the baseline variant IS the fine-tuned adapter
        assert by[(baseline, pid)]["response"] == by[("finetuned", pid)]["response"]
    metrics = {(m["variant"], m["behaviour"]): m for m in io.load_metrics(run)}
    assert (run / "eval" / "metrics.csv").is_file() and io.load_table2(run)

    # perplexity through the endpoint equals a local forward of the same variant
    tok = load_tokenizer(cfg.model)
    docs = load_documents(root / "docs.jsonl")
    for name, folder in ((toward, run / "variants" / toward), ("finetuned", run / "adapter")):
        model = PeftModel.from_pretrained(make_tiny_llama(seed=0, **LLAMA), str(folder)).eval()
        nll = []
        for d in docs:
            p = chat_prompt_ids(tok, [{"role": "user", "content": d.prompt}])
            ids = p + response_ids(tok, d.response, True)
            lp = _local_logprobs(model, ids)
            nll += [float(lp[t - 1, ids[t]]) for t in range(len(p), len(ids))]
        local = math.exp(-sum(nll) / len(nll))
        assert metrics[(name, "bullets")]["perplexity"] == pytest.approx(local, rel=1e-4)

    # token KL: zero for alpha = 0 itself, and a lower bound of the exact KL over the full vocabulary
    assert metrics[(baseline, "bullets")]["kl"] == pytest.approx(0.0, abs=1e-9)
    ref = PeftModel.from_pretrained(make_tiny_llama(seed=0, **LLAMA), str(run / "adapter")).eval()
    var = PeftModel.from_pretrained(make_tiny_llama(seed=0, **LLAMA), str(run / "variants" / toward)).eval()
    total, n = 0.0, 0
    for g in gens:
        if g["variant"] != baseline or g["kind"] != "neutral":
            continue
        p = chat_prompt_ids(tok, [{"role": "user", "content": g["prompt"]}])
        ids = p + response_ids(tok, g["response"], g["finish_reason"] == "stop")
        lp, lq = _local_logprobs(ref, ids), _local_logprobs(var, ids)
        for t in range(len(p), len(ids)):
            total += float((lp[t - 1].exp() * (lp[t - 1] - lq[t - 1])).sum())
            n += 1
    exact = total / n
    est = metrics[(toward, "bullets")]["kl"]
    assert 0.0 < est <= exact + 1e-5

    # a second run redoes nothing
    again = run_evaluate(_ctx(cfg, run))
    assert again["resumed"] == 30 and again["generations"] == 30
