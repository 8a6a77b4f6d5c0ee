"""The demo world's base model: a small Llama (built by `ga_ray.kernel.tiny_llama`, the one tiny-Llama
builder) pre-trained from scratch on CPU on the base split, saved with `save_pretrained`.

Pre-training packs the base documents (`<|bos|> text <|eos|>`, concatenated) into fixed-length
blocks and trains with AdamW (linear warm-up, cosine decay) on plain next-token prediction.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ga_ray.kernel.tiny_llama import build_tiny_llama, tiny_llama_config


@dataclass
class PretrainResult:
    n_params: int
    n_tokens: int
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per 10% of the steps


def make_config(vocab_size: int, hidden_size: int, n_layers: int, n_heads: int, intermediate_size: int,
                pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, max_positions: int = 512):
    """The demo model's config: the shared tiny-Llama config with tied embeddings and 512 positions."""
    return tiny_llama_config(vocab_size, hidden_size, n_layers, n_heads, intermediate_size, max_positions=max_positions,
                             pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, tie_word_embeddings=True)


def make_model(config, seed: int = 0):
    """A seeded random model of `config`, in training mode (pre-training starts from it)."""
    return build_tiny_llama(config, seed=seed, eval_mode=False)


def pack_blocks(docs: Sequence[Sequence[int]], seq_len: int, seed: int = 0) -> torch.Tensor:
    """Concatenate tokenised documents (each already wrapped in bos/eos) in a seeded order and cut the
    stream into [n_blocks, seq_len] (the tail shorter than a block is dropped)."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream = np.concatenate([np.asarray(docs[i], dtype=np.int64) for i in order]) if docs else np.zeros(0, np.int64)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"pack_blocks: {len(stream)} tokens is less than one block of {seq_len}")
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).copy())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, blocks: torch.Tensor, epochs: float, batch_size: int, lr: float, seed: int = 0,
             weight_decay: float = 0.1, warmup_fraction: float = 0.05, progress: bool = True) -> PretrainResult:
    """Next-token pre-training on packed blocks; returns loss trace and timing."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    n = blocks.shape[0]
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = max(1, int(warmup_fraction * total))
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    window: list[float] = []
    step = 0
    perm = torch.randperm(n, generator=g)
    pos = 0
    bar = tqdm(total=total, desc="pre-training the demo model", disable=not progress, leave=False)
    while step < total:
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = blocks[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, lr, warmup)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(float(out.loss.detach()))
        step += 1
        if step % max(1, total // 10) == 0 or step == total:
            losses.append(float(np.mean(window)))
            window = []
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1] if window else losses[-1]:.3f}")
    bar.close()
    model.eval()
    return PretrainResult(
        n_params=sum(p.numel() for p in model.parameters()),
        n_tokens=int(total * batch_size * blocks.shape[1]),
        steps=total,
        seconds=time.perf_counter() - t0,
        losses=losses,
    )
