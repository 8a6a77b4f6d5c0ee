"""The generation engine (`ga_ray.engine`): PeftEngine against transformers' own `generate` one prompt at a
time (PEFT `set_adapter`), against a manual forward for scoring, mixed-variant batches against one request
at a time, sampling against the exact nucleus distribution, and the protocol's validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from ga_ray.engine import BASE, FINETUNED, EngineError, GenerationRequest, SamplingParams, UnknownVariantError
from ga_ray.engine.protocol import Engine, chat_prompt_ids, cut_at_stop, validate_variant_name

VOCAB = 300
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48)
PROMPTS = ["hello world", "the cat sat on the mat and", "yes", "one two three four five six seven"]


def _base():
    return make_tiny_llama(seed=0, **LLAMA)


def _save_adapter(path: Path, r: int, targets: list[str], seed: int, scale: float = 0.6) -> Path:
    """A LoRA adapter with large random A and B (so every variant visibly changes the model)."""
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(_base(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=g) * scale
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest (and fair on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ga_ray.demo.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("engine")
    texts = ["hello world the cat sat on the mat", "yes no maybe so", "one two three four five six seven eight nine"] * 30
    tok = train_tokenizer(texts, VOCAB, root / "tok")
    _base().save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    adapters = {
        FINETUNED: _save_adapter(root / "ft", 4, ["q_proj", "v_proj"], seed=1),
        # different rank (linear mode doubles r) and different target modules, in the same PeftModel
        "atom3-toward-a0.5-0123abcd": _save_adapter(root / "a3", 8, ["q_proj", "v_proj", "o_proj"], seed=2),
        "group1-away-a2-89abcdef": _save_adapter(root / "g1", 2, ["up_proj", "down_proj"], seed=3),
    }
    return root, tok, adapters


@pytest.fixture(scope="module")
def engine(world):
    from ga_ray.engine.peft_engine import PeftEngine

    root, tok, adapters = world
    others = {k: v for k, v in adapters.items() if k != FINETUNED}
    return PeftEngine(_base(), tok, adapter=adapters[FINETUNED], variants=others, max_batch_size=8)


@pytest.fixture(scope="module")
def reference(world):
    """transformers + PEFT the plain way: one PeftModel with every adapter, `set_adapter` per prompt."""
    from peft import PeftModel

    root, tok, adapters = world
    names = list(adapters)
    ref = PeftModel.from_pretrained(_base(), str(adapters[names[0]]), adapter_name="r0")
    for i, n in enumerate(names[1:], 1):
        ref.load_adapter(str(adapters[n]), adapter_name=f"r{i}")
    ref.eval()
    return ref, {n: f"r{i}" for i, n in enumerate(names)}


def _hf_greedy(ref, keys, tok, variant: str, prompt: str, max_new: int, eos: int | None = None) -> list[int]:
    """`generate` for one prompt (no padding), cut after the first EOS (kept, as the engine keeps it)."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    eos = tok.eos_token_id if eos is None else eos
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
              pad_token_id=tok.pad_token_id, eos_token_id=eos)
    with torch.no_grad():
        if variant == BASE:
            with ref.disable_adapter():
                out = ref.generate(**kw)
        else:
            ref.set_adapter(keys[variant])
            out = ref.generate(**kw)
    new = out[0, ids.shape[1]:].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def _all_variants(engine) -> list[str]:
    return [BASE, FINETUNED, "atom3-toward-a0.5-0123abcd", "group1-away-a2-89abcdef"]


# ----------------------------------------------------------------------------------- pure parts


def test_sampling_params_validate_and_normalise():
    assert SamplingParams(stop="x").stop == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy
    for bad in (dict(max_new_tokens=-1), dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                dict(top_p=1.5), dict(stop=[""]), dict(logprobs=-1), dict(seed="7"), dict(max_new_tokens=2.5)):
        with pytest.raises(EngineError):
            SamplingParams(**bad)


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("abc. def\n", [".", "\n"]) == ("abc", True)
    assert cut_at_stop("abc\n. def", [".", "\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert cut_at_stop("xabc", ["x"]) == ("", True)


def test_variant_names():
    assert validate_variant_name("atom469-away-a0.5-0011aabb") == "atom469-away-a0.5-0011aabb"
    for bad in ("", "a/b", "..", ".hidden", BASE, FINETUNED):
        with pytest.raises(EngineError):
            validate_variant_name(bad)


def test_nucleus_sampling_draws_from_the_exact_tempered_truncated_distribution():
    """`_pick` on fixed logits: the empirical frequencies of 2500 draws match softmax(l/T) restricted to
    the top-p nucleus (chi-square), tokens outside the nucleus are never drawn; a seed repeats a draw."""
    from scipy.stats import chisquare

    from ga_ray.engine.peft_engine import PeftEngine

    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    T, top_p = 0.8, 0.9
    p = torch.softmax(logits.double() / T, -1)
    order = torch.argsort(p, descending=True)
    cum = p[order].cumsum(0)
    n_keep = int((cum - p[order] < top_p).sum())
    nucleus = order[:n_keep].tolist()
    expected = p[nucleus] / p[nucleus].sum()
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=T, top_p=top_p, seed=0)
    draws = [PeftEngine._pick(logits, params, g) for _ in range(2500)]
    assert set(draws) <= set(nucleus) and n_keep < len(logits)  # the truncation is exercised
    counts = [draws.count(t) for t in nucleus]
    assert chisquare(counts, (expected * len(draws)).tolist()).pvalue > 1e-3
    # and without truncation, the whole tempered softmax
    draws = [PeftEngine._pick(logits, SamplingParams(temperature=T), g) for _ in range(2500)]
    assert chisquare([draws.count(t) for t in range(6)], (p * 2500).tolist()).pvalue > 1e-3
    a = [PeftEngine._pick(logits, params, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1


# ----------------------------------------------------------------------------------- PeftEngine


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.variants() == _all_variants(engine)
    assert engine.max_context == 128
    assert engine.tokenizer.eos_token_id == 2


def test_greedy_equals_transformers_generate_one_prompt_at_a_time(engine, reference, world):
    """Every (variant, prompt) of ONE mixed batch equals `generate` with `set_adapter` for that prompt alone."""
    ref, keys = reference
    tok = world[1]
    reqs = [GenerationRequest(v, p, SamplingParams(max_new_tokens=10)) for p in PROMPTS for v in _all_variants(engine)]
    out = engine.generate(reqs)
    for r, g in zip(reqs, out):
        want = _hf_greedy(ref, keys, tok, r.variant, r.prompt, 10)
        assert g.token_ids == want, (r.variant, r.prompt)
        assert g.prompt_tokens == len(tok(r.prompt)["input_ids"])
        assert g.text == tok.decode(want, skip_special_tokens=True)
        assert g.finish_reason == ("stop" if want[-1:] == [tok.eos_token_id] else "length")
    # the adapters are not silently ignored: every variant's answers differ from the base model's
    by = {v: [g.token_ids for r, g in zip(reqs, out) if r.variant == v] for v in _all_variants(engine)}
    for v in _all_variants(engine)[1:]:
        assert by[v] != by[BASE], v


def test_mixed_batch_equals_one_request_at_a_time_with_logprobs(engine):
    """Shuffled variants, different lengths, sampling and greedy mixed: each result equals the same request
    alone (tokens exactly, log-probs to float tolerance)."""
    import random

    rng = random.Random(0)
    reqs = []
    for i, p in enumerate(PROMPTS * 3):
        v = rng.choice(_all_variants(engine))
        sampling = SamplingParams(max_new_tokens=rng.randint(1, 9), logprobs=3,
                                  **(dict(temperature=0.9, top_p=0.95, seed=i) if i % 2 else {}))
        reqs.append(GenerationRequest(v, p, sampling))
    batched = engine.generate(reqs)
    for r, g in zip(reqs, batched):
        alone = engine.generate([r])[0]
        assert g.token_ids == alone.token_ids and g.text == alone.text and g.finish_reason == alone.finish_reason
        assert len(g.logprobs) == len(g.token_ids) == len(g.top_logprobs)
        assert g.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert [[t for t, _ in step] for step in g.top_logprobs] == [[t for t, _ in step] for step in alone.top_logprobs]
        assert len(g.token_ids) <= r.sampling.max_new_tokens


def test_generated_logprobs_equal_the_score_of_prompt_plus_completion(engine):
    v = "atom3-toward-a0.5-0123abcd"
    g = engine.generate([GenerationRequest(v, PROMPTS[1], SamplingParams(max_new_tokens=6, logprobs=2, temperature=1.0, seed=3))])[0]
    prompt_ids = engine.encode(PROMPTS[1])
    s = engine.score([prompt_ids + g.token_ids], v, top_logprobs=2)[0]
    assert s.logprobs[len(prompt_ids):] == pytest.approx(g.logprobs, abs=1e-4)
    assert [[t for t, _ in x] for x in s.top_logprobs[len(prompt_ids):]] == [[t for t, _ in x] for x in g.top_logprobs]
    for step in g.top_logprobs:  # most likely first
        assert [lp for _, lp in step] == sorted((lp for _, lp in step), reverse=True)


def test_score_equals_a_manual_forward(engine, reference, world):
    """score(): log_softmax of one unpadded forward with `set_adapter`, gathered at the next tokens;
    top-k by torch.topk; a batch of different lengths (left padding) changes nothing."""
    ref, keys = reference
    tok = world[1]
    for v in (BASE, FINETUNED, "group1-away-a2-89abcdef"):
        got = engine.score(PROMPTS, v, top_logprobs=3)
        for text, s in zip(PROMPTS, got):
            ids = tok(text)["input_ids"]
            with torch.no_grad():
                if v == BASE:
                    with ref.disable_adapter():
                        logits = ref(input_ids=torch.tensor([ids])).logits[0]
                else:
                    ref.set_adapter(keys[v])
                    logits = ref(input_ids=torch.tensor([ids])).logits[0]
            lp = torch.log_softmax(logits.double(), -1)
            want = [lp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
            assert s.token_ids == ids and s.logprobs[0] is None and s.top_logprobs[0] is None
            assert s.logprobs[1:] == pytest.approx(want, abs=1e-4)
            for t in range(1, len(ids)):
                top = torch.topk(lp[t - 1], 3)
                assert [i for i, _ in s.top_logprobs[t]] == top.indices.tolist()
    # token ids in, the same as text in
    assert engine.score([tok(PROMPTS[0])["input_ids"]], FINETUNED)[0].logprobs == pytest.approx(
        engine.score([PROMPTS[0]], FINETUNED)[0].logprobs, abs=1e-6)


def test_stop_strings_and_eos(engine, reference, world):
    ref, keys = reference
    tok = world[1]
    v = FINETUNED
    full = engine.generate([GenerationRequest(v, PROMPTS[0], SamplingParams(max_new_tokens=12))])[0]
    assert full.finish_reason == "length" and len(full.text) > 3
    stop = full.text[2:4]
    cut = engine.generate([GenerationRequest(v, PROMPTS[0], SamplingParams(max_new_tokens=12, stop=(stop, "\x00never")))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < len(full.token_ids)
    # EOS: generation with a token of the greedy answer as EOS stops there, as transformers' generate does
    eos = full.token_ids[4]
    saved = engine.eos_ids
    try:
        engine.eos_ids = {eos}
        g = engine.generate([GenerationRequest(v, PROMPTS[0], SamplingParams(max_new_tokens=12))])[0]
    finally:
        engine.eos_ids = saved
    assert g.token_ids == _hf_greedy(ref, keys, tok, v, PROMPTS[0], 12, eos=eos)
    assert g.token_ids[-1] == eos and g.finish_reason == "stop"


def test_sampling_is_seeded_per_request(engine):
    v = FINETUNED
    s = SamplingParams(max_new_tokens=8, temperature=1.5, seed=11)
    alone = engine.generate([GenerationRequest(v, PROMPTS[2], s)])[0]
    crowd = engine.generate([GenerationRequest(BASE, PROMPTS[3], SamplingParams(max_new_tokens=8, temperature=1.5, seed=1)),
                             GenerationRequest(v, PROMPTS[2], s),
                             GenerationRequest(v, PROMPTS[0], SamplingParams(max_new_tokens=3, temperature=1.5))])[1]
    assert crowd.token_ids == alone.token_ids
    others = {tuple(engine.generate([GenerationRequest(v, PROMPTS[2], SamplingParams(max_new_tokens=8, temperature=1.5, seed=k))])[0].token_ids)
              for k in range(4)}
    assert len(others) > 1  # different seeds, different samples
    tiny_p = engine.generate([GenerationRequest(v, PROMPTS[2], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-9, seed=0))])[0]
    greedy = engine.generate([GenerationRequest(v, PROMPTS[2], SamplingParams(max_new_tokens=8))])[0]
    assert tiny_p.token_ids == greedy.token_ids  # a nucleus of one token is the argmax


def test_edge_cases_and_errors(engine, world):
    root, tok, adapters = world
    g = engine.generate([GenerationRequest(FINETUNED, "hello", SamplingParams(max_new_tokens=0))])[0]
    assert g.token_ids == [] and g.text == "" and g.finish_reason == "length" and g.prompt_tokens > 0
    assert engine.generate([]) == []
    with pytest.raises(UnknownVariantError, match="unknown variant 'nope'.*finetuned"):
        engine.generate([GenerationRequest("nope", "hello")])
    with pytest.raises(UnknownVariantError):
        engine.score(["hello"], "nope")
    with pytest.raises(EngineError, match="context of 128"):
        engine.generate([GenerationRequest(BASE, list(range(3, 120)), SamplingParams(max_new_tokens=20))])
    with pytest.raises(EngineError, match="empty"):
        engine.generate([GenerationRequest(BASE, [])])
    with pytest.raises(EngineError, match="token ids"):
        engine.generate([GenerationRequest(BASE, [5, VOCAB + 3])])
    # a variant name is bound once: same folder again is a no-op, other content under that name is refused
    engine.add_variant("atom3-toward-a0.5-0123abcd", adapters["atom3-toward-a0.5-0123abcd"])
    with pytest.raises(EngineError, match="never re-bound"):
        engine.add_variant("atom3-toward-a0.5-0123abcd", adapters["group1-away-a2-89abcdef"])
    with pytest.raises(EngineError, match="reserved"):
        engine.add_variant(FINETUNED, adapters[FINETUNED])
    from ga_ray.errors import GaRayError

    (root / "not-an-adapter").mkdir(exist_ok=True)
    with pytest.raises(GaRayError, match="adapter_config.json"):
        engine.add_variant("broken", root / "not-an-adapter")
    assert engine.variants() == _all_variants(engine)


def test_a_variant_added_later_is_served_and_equals_its_own_peft_model(engine, world, tmp_path):
    from peft import PeftModel

    root, tok, _ = world
    path = _save_adapter(tmp_path / "late", 6, ["k_proj", "gate_proj"], seed=9)
    engine.add_variant("late-one", path)
    assert "late-one" in engine.variants()
    got = engine.generate([GenerationRequest("late-one", PROMPTS[1], SamplingParams(max_new_tokens=8)),
                           GenerationRequest(FINETUNED, PROMPTS[1], SamplingParams(max_new_tokens=8))])
    alone = PeftModel.from_pretrained(_base(), str(path)).eval()
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        out = alone.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    want = out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out
    assert got[0].token_ids == want
    assert got[0].token_ids != got[1].token_ids


def test_make_engine_from_a_model_folder_with_chat_prompts(world):
    from ga_ray.config import ModelConfig
    from ga_ray.engine import make_engine, resolve_engine_kind

    root, tok, adapters = world
    assert resolve_engine_kind("peft") == "peft"
    if not torch.cuda.is_available():  # auto picks vLLM only with CUDA (and vLLM installed)
        assert resolve_engine_kind("auto") == "peft"
    with pytest.raises(EngineError, match="unknown engine"):
        resolve_engine_kind("tgi")
    threads = torch.get_num_threads()
    try:
        e = make_engine("peft", ModelConfig(path=str(root / "base")), adapter=adapters[FINETUNED], device="cpu", torch_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    ids = chat_prompt_ids(e.tokenizer, [{"role": "user", "content": "hello world"}])
    assert ids[0] == e.tokenizer.bos_token_id and e.tokenizer.decode(ids).endswith("<|assistant|>\n")
    a, b = e.generate([GenerationRequest(FINETUNED, ids, SamplingParams(max_new_tokens=5)),
                       GenerationRequest(BASE, ids, SamplingParams(max_new_tokens=5))])
    assert a.prompt_tokens == len(ids) and a.token_ids != b.token_ids
    e.close()


def test_a_loaded_peft_model_becomes_an_engine_with_its_adapters(world, reference):
    """`PeftEngine(PeftModel)`: its `default` adapter is variant `finetuned`, other adapters keep their names."""
    from peft import PeftModel

    from ga_ray.engine.peft_engine import PeftEngine

    root, tok, adapters = world
    ref, keys = reference
    model = PeftModel.from_pretrained(_base(), str(adapters[FINETUNED])).eval()
    model.load_adapter(str(adapters["group1-away-a2-89abcdef"]), adapter_name="other")
    e = PeftEngine(model, tok)
    assert e.variants() == [BASE, FINETUNED, "other"]
    got = e.generate([GenerationRequest(v, PROMPTS[1], SamplingParams(max_new_tokens=6)) for v in (FINETUNED, "other", BASE)])
    assert got[0].token_ids == _hf_greedy(ref, keys, tok, FINETUNED, PROMPTS[1], 6)
    assert got[1].token_ids == _hf_greedy(ref, keys, tok, "group1-away-a2-89abcdef", PROMPTS[1], 6)
    assert got[2].token_ids == _hf_greedy(ref, keys, tok, BASE, PROMPTS[1], 6)


def test_score_batches_respect_the_token_budget(engine):
    seqs = [[3] * n for n in (2, 3, 5, 8, 9, 20, 21)]
    saved = engine.score_token_budget
    try:
        engine.score_token_budget = 20
        batches = engine._score_batches(list(range(len(seqs))), seqs)
        assert sorted(i for b in batches for i in b) == list(range(len(seqs)))
        # every batch within the budget (a single row longer than the budget goes alone)
        assert all(len(b) * max(len(seqs[i]) for i in b) <= 20 or len(b) == 1 for b in batches)
        small = engine.score(PROMPTS, FINETUNED, top_logprobs=2)
    finally:
        engine.score_token_budget = saved
    big = engine.score(PROMPTS, FINETUNED, top_logprobs=2)
    for a, b in zip(small, big):
        assert a.token_ids == b.token_ids and a.logprobs[1:] == pytest.approx(b.logprobs[1:], abs=1e-5)


def test_stacked_lora_equals_peft_mixed_batches_and_per_row_adapters(engine, reference, world):
    """The gathered-matmul path (ga_ray.engine.stacked_lora) against PEFT's own `adapter_names=` forward and
    against each row run alone with `set_adapter`: adapters of ranks 2, 4 and 8 on different modules and the base
    model in one left-padded batch (a wrong rank pad, scaling or transpose would show in the logits)."""
    from ga_ray.engine.peft_engine import PEFT_BASE
    from ga_ray.engine.stacked_lora import StackedLora

    ref, keys = reference
    names = _all_variants(engine) * 2
    seqs = [engine.encode(p) for p in (PROMPTS * 2)]
    ids, attn, pos = engine._left_pad(seqs)
    row_keys = [engine._variant(n).adapter_key for n in names]
    stacked = StackedLora.build(engine._peft)
    assert stacked is not None and stacked.knows(row_keys)
    with torch.no_grad():
        with stacked.rows(row_keys):
            ours = engine._peft(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        peft = engine._peft(input_ids=ids, attention_mask=attn, position_ids=pos, adapter_names=row_keys).logits
        assert not any(m._disable_adapters for m in engine._peft.modules() if hasattr(m, "_disable_adapters"))
        torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-5)
        for b, n in enumerate(names):  # each row alone, unpadded, through the reference PeftModel
            x = torch.tensor([seqs[b]])
            if n == BASE:
                with ref.disable_adapter():
                    alone = ref(input_ids=x).logits[0]
            else:
                ref.set_adapter(keys[n])
                alone = ref(input_ids=x).logits[0]
            torch.testing.assert_close(ours[b, -len(seqs[b]):], alone, rtol=1e-4, atol=1e-4)
    assert PEFT_BASE in row_keys


def test_stacked_lora_declines_adapters_peft_treats_specially(tmp_path):
    """DoRA is not plain LoRA: no stacked form, the engine keeps PEFT's path (and still answers)."""
    from peft import LoraConfig, get_peft_model

    from ga_ray.engine.stacked_lora import StackedLora

    m = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)).eval()
    assert StackedLora.build(m) is None
    plain = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).eval()
    assert StackedLora.build(plain) is not None
