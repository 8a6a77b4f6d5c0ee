"""A tiny demo world: built atomically into the cache, reused on the second call, loadable everywhere."""

from __future__ import annotations

import json

import pytest

from ga_ray.config import DemoConfig


def tiny_demo_config(cache_dir, **kw) -> DemoConfig:
    """A demo world small enough for tests (seconds on one core)."""
    base = dict(
        n_docs=45, n_base_docs=40, vocab_size=320, hidden_size=16, n_layers=1, n_heads=2, intermediate_size=32,
        pretrain_epochs=1.0, pretrain_batch_size=8, pretrain_seq_len=32, eval_prompts_per_family=3, torch_threads=1,
        cache_dir=str(cache_dir),
    )
    base.update(kw)
    return DemoConfig(**base)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ga_ray.demo.world import build_demo_world

    return build_demo_world(tiny_demo_config(tmp_path_factory.mktemp("cache")), progress=False)


def test_world_layout(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ga_ray.demo import tasks

    assert world.root.name == world.info["key"]
    rows = tasks.read_jsonl(world.data)
    assert len(rows) == 45 and [r["id"] for r in rows] == list(range(45))
    assert {r["task"] for r in rows} == set(tasks.FAMILIES)
    tok = AutoTokenizer.from_pretrained(str(world.tokenizer))
    assert tok.chat_template and tok.pad_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(str(world.base_model))
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == world.info["n_params"]
    assert AutoTokenizer.from_pretrained(str(world.base_model)).chat_template == tok.chat_template
    assert sorted(p.stem for p in (world.eval_dir / "behaviours").glob("*.jsonl")) == sorted(tasks.BEHAVIOURS)
    assert sorted(p.stem for p in (world.eval_dir / "families").glob("*.jsonl")) == sorted(tasks.DETERMINISTIC_FAMILIES)
    info = json.loads((world.root / "world.json").read_text())
    assert info["pretrain"]["losses"][-1] < info["pretrain"]["losses"][0]  # it learned something
    assert set(info["timings"]) >= {"generate_s", "tokenizer_s", "pretrain_s", "total_s"}


def test_second_call_reuses_the_cache(world):
    from ga_ray.demo.world import build_demo_world, world_key

    cfg = DemoConfig.model_validate(world.info["config"])
    stamp = (world.root / "world.json").stat().st_mtime_ns
    again = build_demo_world(cfg, progress=False)
    assert again.root == world.root
    assert (again.root / "world.json").stat().st_mtime_ns == stamp  # not rebuilt
    # the key ignores where the cache is and the thread count, but not what the world is
    assert world_key(cfg) == world_key(cfg.model_copy(update={"cache_dir": "/elsewhere", "torch_threads": 2}))
    assert world_key(cfg) != world_key(cfg.model_copy(update={"seed": 1}))


def test_cache_location(monkeypatch, tmp_path):
    from ga_ray.demo.world import cache_base

    monkeypatch.setenv("GA_RAY_CACHE", str(tmp_path / "env"))
    assert cache_base(DemoConfig()) == tmp_path / "env"
    assert cache_base(DemoConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("GA_RAY_CACHE")
    assert str(cache_base(DemoConfig())).endswith(".cache/ga_ray/demo")


def test_failed_build_leaves_no_world(monkeypatch, tmp_path):
    import ga_ray.demo.tiny_model as tiny
    from ga_ray.demo.world import build_demo_world, world_path

    cfg = tiny_demo_config(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(tiny, "pretrain", boom)
    with pytest.raises(RuntimeError, match="killed halfway"):
        build_demo_world(cfg, progress=False)
    assert not world_path(cfg).exists()
    assert list(tmp_path.iterdir()) == []  # no half-built temp folder either


def test_instruction_pool_in_pretraining(tmp_path):
    """The pool is a separate sample (another seed): none of its documents is in the mixture."""
    from ga_ray.demo import tasks
    from ga_ray.demo.tokenizer import BOS
    from ga_ray.demo.world import build_demo_world

    w = build_demo_world(tiny_demo_config(tmp_path, pretrain_instruction_docs=20, pretrain_pool_chat_share=0.5,
                                          pretrain_pool_plain_share=1.0), progress=False)
    base = [r["text"] for r in tasks.read_jsonl(w.root / "base" / "base.jsonl")]
    pool = base[40:]
    assert len(pool) == 20 and w.info["n_pool_docs"] == 20
    assert sum(t.startswith(BOS) for t in pool) == 10
    assert sum(t.startswith("User: ") and "\nAssistant: " in t for t in pool) == 10
    mixture_responses = {r["messages"][0]["content"] + r["messages"][1]["content"] for r in tasks.read_jsonl(w.data)}
    pool_examples = tasks.generate_mixture(20, w.info["config"]["seed"] + 1_000_003)
    assert not any(e.prompt + e.response in mixture_responses for e in pool_examples)
    # plain share 1.0: every deterministic-family answer of the pool is in the plain style, the others as they were
    for ex, text in zip(pool_examples, pool):
        expected = tasks.plain_style(ex).response
        assert text.endswith(expected + ("<|eos|>" if text.startswith(BOS) else "")), (ex.task, text)
        assert (expected != ex.response) == (ex.task in tasks.DETERMINISTIC_FAMILIES and ex.task != "factual_qa")
    assert w.info["n_pool_plain_answers"] == sum(ex.task in tasks.DETERMINISTIC_FAMILIES and ex.task != "factual_qa" for ex in pool_examples)
