"""Build (or reuse) the embedded demo world: instruction mixture, evaluation prompts, tokenizer and a
pre-trained tiny Llama, all made locally and deterministically from a `DemoConfig`.

The world lives in `<cache>/<key>` where `<cache>` is `demo_cfg.cache_dir`, else `$GA_RAY_CACHE`,
else `~/.cache/ga_ray/demo`, and `<key>` hashes the demo config (minus `cache_dir` and
`torch_threads`), `CODE_VERSION` and the source of the modules that make the world. It is built under a temporary name and renamed into place when complete
(`ga_ray.rundir.atomic_dir`), so a killed build never leaves a world that a later run would trust;
a second call with the same config returns the cached world at once.

Layout:
    data/mixture.jsonl     the instruction mixture: id, messages (user, assistant), task, style
    base/base.jsonl        the base (pre-training) split: {"text": ...}
    tokenizer/             byte-level BPE as PreTrainedTokenizerFast, with chat template
    base_model/            LlamaForCausalLM (+ the tokenizer files), save_pretrained
    eval/behaviours/*.jsonl  100 held-out prompts per behaviour: prompt, invites, source
    eval/families/*.jsonl    held-out prompts per deterministic family: prompt, task
    world.json             config, counts, parameters, timings, pre-training loss trace
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ga_ray.config import DemoConfig
from ga_ray.rundir import atomic_dir, atomic_write_json

CODE_VERSION = "demo-world-2"
"""Bump to force a rebuild; the key also hashes the source of the modules that make the world."""
_WORLD_SOURCES = ("tasks.py", "vocab.py", "tokenizer.py", "tiny_model.py", "world.py")


def _sources_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _WORLD_SOURCES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


@dataclass
class DemoWorld:
    root: Path
    data: Path
    tokenizer: Path
    base_model: Path
    eval_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


def world_key(demo_cfg: DemoConfig) -> str:
    dumped = demo_cfg.model_dump(mode="json", exclude={"cache_dir", "torch_threads"})
    blob = json.dumps({"config": dumped, "code": CODE_VERSION, "sources": _sources_hash()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_base(demo_cfg: DemoConfig) -> Path:
    if demo_cfg.cache_dir:
        return Path(demo_cfg.cache_dir).expanduser()
    env = os.environ.get("GA_RAY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ga_ray" / "demo"


def world_path(demo_cfg: DemoConfig) -> Path:
    return cache_base(demo_cfg) / world_key(demo_cfg)


def _world(root: Path) -> DemoWorld:
    info = json.loads((root / "world.json").read_text())
    return DemoWorld(
        root=root,
        data=root / "data" / "mixture.jsonl",
        tokenizer=root / "tokenizer",
        base_model=root / "base_model",
        eval_dir=root / "eval",
        info=info,
    )


def build_demo_world(demo_cfg: DemoConfig, progress: bool = True) -> DemoWorld:
    """The demo world for `demo_cfg`: built once, then reused from the cache."""
    root = world_path(demo_cfg)
    if (root / "world.json").exists():
        return _world(root)
    with atomic_dir(root) as tmp:
        _build(demo_cfg, tmp, progress)
    return _world(root)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[demo] {msg}", flush=True)


def _build(cfg: DemoConfig, root: Path, progress: bool) -> None:
    import torch

    from ga_ray.demo import tasks
    from ga_ray.demo.tiny_model import make_config, make_model, pack_blocks, pretrain
    from ga_ray.demo.tokenizer import BOS, EOS, render_chat, train_tokenizer

    t_start, cpu_start = time.perf_counter(), time.process_time()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads or os.cpu_count() or 1)
    try:
        timings: dict[str, float] = {}

        # 1. texts: mixture, base split, evaluation prompts
        t = time.perf_counter()
        mixture = tasks.generate_mixture(cfg.n_docs, cfg.seed)
        (root / "data").mkdir()
        tasks.write_jsonl(root / "data" / "mixture.jsonl", (tasks.to_row(ex, i) for i, ex in enumerate(mixture)))
        base_texts = tasks.generate_base_texts(cfg.n_base_docs, cfg.seed)
        pool: list[str] = []
        n_plain = 0
        if cfg.pretrain_instruction_docs > 0:  # a separate pool: another seed, never the mixture's documents
            pool_examples = tasks.generate_mixture(cfg.pretrain_instruction_docs, cfg.seed + 1_000_003)
            style_rng = random.Random(f"pool-style-{cfg.seed}")
            pool_examples = [tasks.plain_style(ex) if style_rng.random() < cfg.pretrain_pool_plain_share else ex
                             for ex in pool_examples]
            n_plain = sum(ex.style == "plain" for ex in pool_examples)
            n_chat = round(cfg.pretrain_pool_chat_share * len(pool_examples))
            pool = [render_chat([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}])
                    if i < n_chat else f"User: {ex.prompt}\nAssistant: {ex.response}"
                    for i, ex in enumerate(pool_examples)]
        (root / "base").mkdir()
        tasks.write_jsonl(root / "base" / "base.jsonl", ({"text": x} for x in base_texts + pool))
        eval_counts = tasks.write_eval_dir(root / "eval", cfg.seed, cfg.eval_prompts_per_family)
        timings["generate_s"] = time.perf_counter() - t
        _log(progress, f"mixture: {len(mixture)} documents, {len(tasks.FAMILIES)} families; base split: {len(base_texts)} + {len(pool)} "
                       f"instruction-pool documents ({timings['generate_s']:.1f}s)")

        # 2. tokenizer, trained on the mixture (rendered as chats) and the base split
        t = time.perf_counter()
        chats = [render_chat([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}]) for ex in mixture]
        tok = train_tokenizer(chats + base_texts + pool, cfg.vocab_size, root / "tokenizer")
        timings["tokenizer_s"] = time.perf_counter() - t
        _log(progress, f"tokenizer: byte-level BPE, {len(tok)} tokens ({timings['tokenizer_s']:.1f}s)")

        # 3. pre-training on the base split
        t = time.perf_counter()
        # chat-template texts already start with <|bos|> and end the reply with <|eos|>; plain texts get both
        docs = [tok(x, add_special_tokens=False)["input_ids"] if x.startswith(BOS)
                else [tok.bos_token_id, *tok(x, add_special_tokens=False)["input_ids"], tok.eos_token_id]
                for x in base_texts + pool]
        assert all(d[-1] == tok.convert_tokens_to_ids(EOS) for d in docs)
        blocks = pack_blocks(docs, cfg.pretrain_seq_len, seed=cfg.seed)
        mcfg = make_config(len(tok), cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.intermediate_size,
                           pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
        model = make_model(mcfg, seed=cfg.seed)
        res = pretrain(model, blocks, cfg.pretrain_epochs, cfg.pretrain_batch_size, cfg.pretrain_learning_rate,
                       seed=cfg.seed, progress=progress)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(root / "base_model")
        tok.save_pretrained(root / "base_model")
        timings["pretrain_s"] = time.perf_counter() - t
        _log(progress, f"base model: Llama {res.n_params / 1e6:.2f}M parameters, {res.steps} steps over {res.n_tokens / 1e6:.2f}M tokens, "
                       f"loss {res.losses[0]:.2f} -> {res.losses[-1]:.2f} ({timings['pretrain_s']:.1f}s)")

        timings["total_s"] = time.perf_counter() - t_start
        timings["cpu_s"] = time.process_time() - cpu_start  # CPU seconds of this process (all threads): less noisy on a shared machine
        atomic_write_json(root / "world.json", {
            "key": world_key(cfg),
            "code_version": CODE_VERSION,
            "config": cfg.model_dump(mode="json"),
            "n_docs": len(mixture),
            "families": list(tasks.FAMILIES),
            "deterministic_families": list(tasks.DETERMINISTIC_FAMILIES),
            "behaviours": dict(tasks.BEHAVIOUR_FAMILIES),
            "n_base_docs": len(base_texts),
            "n_pool_docs": len(pool),
            "n_pool_plain_answers": n_plain,
            "eval": eval_counts,
            "vocab_size": len(tok),
            "n_params": res.n_params,
            "pretrain": {"steps": res.steps, "tokens": res.n_tokens, "blocks": int(blocks.shape[0]), "losses": res.losses},
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "torch_threads": torch.get_num_threads(),
        })
    finally:
        torch.set_num_threads(threads_before)


def configure_run(cfg, world: DemoWorld):
    """A copy of the RunConfig `cfg` pointed at `world`: data.path, model.path, model.tokenizer and
    finetune.format_eval_set (what `ga-ray demo` sets before running the stages)."""
    data = cfg.data.model_copy(update={"path": str(world.data)})
    model = cfg.model.model_copy(update={"path": str(world.base_model), "tokenizer": str(world.tokenizer)})
    finetune = cfg.finetune.model_copy(update={"format_eval_set": str(world.eval_dir)})
    return cfg.model_copy(update={"data": data, "model": model, "finetune": finetune})
