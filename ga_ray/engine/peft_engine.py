"""`PeftEngine`: the `Engine` protocol on transformers + PEFT, on CPU or GPU.

Every adapter is loaded ONCE as a named adapter of one `PeftModel`; a batch may mix variants: each row
names its adapter through PEFT's mixed-batch argument `adapter_names=` (`"__base__"` = adapter off),
so a LoRA layer adds each adapter's `B A x` to its own rows only. Never one `set_adapter` per request.
Adapters of different ranks and target modules coexist (each is applied to its own sub-batch).
PEFT's constraints for mixed batches: eval mode only, adapters not merged into the weights.

Decoding is our own loop, not `model.generate`, because every request carries its own sampling
settings (greedy or sampled, temperature, top-p, seed, stop strings, max tokens, log-probs), which one
`generate` call cannot mix. Prompts are left-padded (position ids count real tokens only, as
transformers' own `generate` does), one prefill and then one token per step with the KV cache. A
finished row leaves the batch and the KV cache (`Cache.batch_select_indices`), so later steps compute
only the rows still generating. Sampling draws each
row's token with that request's own CPU `torch.Generator`, seeded by its seed, so a sample depends on
the request alone, not on its batch-mates or the device.

PEFT keys adapters by module-dict names, which cannot hold dots (variant names like `...-a0.5-...`
do), so variants map to internal adapter keys `v0`, `v1`, ... .
"""

from __future__ import annotations

import hashlib
import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ga_ray.engine.protocol import (
    BASE,
    FINETUNED,
    EngineError,
    Generation,
    GenerationRequest,
    SamplingParams,
    Scored,
    UnknownVariantError,
    cut_at_stop,
    validate_variant_name,
)

PEFT_BASE = "__base__"
"""PEFT's adapter name for 'no adapter' in a mixed batch."""


@dataclass
class _Variant:
    name: str
    adapter_key: str  # PEFT's adapter name; PEFT_BASE for the base model
    path: Path | None
    content: str | None  # sha256 of the adapter folder's config + weights: a name never changes content


def _folder_digest(path: Path) -> str:
    """sha256 over the adapter folder's config and weight files (name + bytes)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.name == "adapter_config.json" or f.name.startswith("adapter_model.")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class PeftEngine:
    """Generation and scoring for many LoRA variants of one base model in one `PeftModel`.

    `model`: a transformers causal LM (the base model, no adapter) on its device, or a `PeftModel`
    whose adapters become variants under their PEFT adapter names (`default` -> `finetuned`).
    `adapter`: the run's fine-tuned adapter folder (variant `finetuned`), `variants`: name -> folder.
    `max_batch_size`: rows per forward pass (longer request lists are split, length-sorted).
    `torch_threads`: intra-op CPU threads (`torch.set_num_threads`, which is per process).
    `score_token_budget`: padded tokens per scoring forward (its logits are batch x length x vocabulary).
    `stacked_lora`: mixed batches of plain LoRA adapters by gathered matmuls (`ga_ray.engine.stacked_lora`; the
    same numbers as PEFT's `adapter_names=` path, without its per-adapter Python loop; a second copy of the adapter
    matrices); False, or any adapter PEFT treats specially (DoRA, LoRA bias, non-Linear layers): PEFT's path.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        adapter: str | Path | None = None,
        variants: dict[str, str | Path] | None = None,
        max_batch_size: int = 32,
        torch_threads: int | None = None,
        check_fits: bool = True,
        score_token_budget: int = 16384,
        stacked_lora: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if torch_threads is not None:
            if torch_threads < 1:
                raise EngineError(f"torch_threads must be >= 1, got {torch_threads}")
            torch.set_num_threads(int(torch_threads))
        self._tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self.score_token_budget = int(score_token_budget)
        self._check_fits = check_fits
        self._lock = threading.RLock()  # one forward or adapter load at a time; serve calls from several threads
        self._variants: dict[str, _Variant] = {BASE: _Variant(BASE, PEFT_BASE, None, None)}
        self._next_key = 0
        self._peft: Any = None
        self._base: Any = model
        self._use_stacked = bool(stacked_lora)
        self._stacked: Any = None  # StackedLora, built on first use after every adapter load (False: not possible)
        if hasattr(model, "peft_config") and hasattr(model, "base_model"):  # already a PeftModel
            self._peft = model
            self._base = model.get_base_model()
            for key in list(model.peft_config):
                name = FINETUNED if key == "default" else key
                self._variants[name] = _Variant(name, key, None, None)
        self._base.eval()
        if self._peft is not None:
            self._peft.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise EngineError("the tokenizer has neither a pad nor an EOS token; set one (tokenizer.pad_token)")
        self.pad_id = int(pad)
        self.eos_ids = _eos_ids(self._base, tokenizer)
        cfg = getattr(self._base, "config", None)
        # transformers 5 names the KV cache argument `cache` (older and remote-code models: past_key_values)
        params = inspect.signature(self._base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._max_context = int(getattr(cfg, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048))
        if adapter is not None:
            self._add(FINETUNED, Path(adapter))
        for name, path in (variants or {}).items():
            self.add_variant(name, path)

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, model_cfg: Any, *, adapter: str | Path | None = None, variants: dict[str, str | Path] | None = None,
                    device: str | None = None, dtype: str | None = None, tokenizer: Any = None, **kw: Any) -> PeftEngine:
        """Load `model.path` (and its tokenizer, unless given) through `ga_ray.kernel.loading` on
        `device` (None: CUDA when available) and build the engine."""
        from ga_ray.kernel.loading import load_base_model, load_tokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
        model = load_base_model(model_cfg, device=device, dtype=dtype)
        return cls(model, tok, adapter=adapter, variants=variants, **kw)

    # ----------------------------------------------------------------------------- protocol: meta

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def device(self) -> torch.device:
        return next(self._base.parameters()).device

    def variants(self) -> list[str]:
        # no lock: a variant enters the dict only once fully loaded, and copying a dict's keys is atomic
        # in CPython, so listing never waits for a batch that is generating
        return list(self._variants)

    def variant_path(self, name: str) -> Path | None:
        return self._variant(name).path

    def add_variant(self, name: str, path: str | Path) -> None:
        validate_variant_name(name)
        self._add(name, Path(path))

    def _add(self, name: str, path: Path) -> None:
        from ga_ray.kernel.loading import check_adapter_fits, read_adapter_config

        path = path.expanduser().resolve()
        with self._lock:
            digest = _folder_digest(path) if path.is_dir() else None
            old = self._variants.get(name)
            if old is not None:
                if old.path == path and old.content == digest:
                    return
                raise EngineError(f"variant {name!r} is already loaded from {old.path}; a name is never re-bound to other "
                                  f"content (asked to load {path}). Give the new adapter its own name")
            read_adapter_config(path)  # ModelLoadError (a StageError) naming the folder when it is not a LoRA adapter
            if self._check_fits:
                check_adapter_fits(self._base, path)
            key = f"v{self._next_key}"
            self._next_key += 1
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(self._base, str(path), adapter_name=key, is_trainable=False)
            else:
                self._peft.load_adapter(str(path), adapter_name=key, is_trainable=False)
            self._peft.to(self.device)
            self._peft.eval()
            self._stacked = None  # rebuilt with the new adapter on the next mixed batch
            self._variants[name] = _Variant(name, key, path, digest)

    def _variant(self, name: str) -> _Variant:
        v = self._variants.get(name)
        if v is None:
            known = ", ".join(self._variants)
            raise UnknownVariantError(f"unknown variant {name!r}; this engine serves: {known}")
        return v

    def close(self) -> None:
        with self._lock:
            self._peft = None
            self._base = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------- tokens

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt: text through the tokenizer (its special tokens added), ids as given."""
        if isinstance(prompt, str):
            return list(self._tokenizer(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        vocab = int(getattr(self._base.config, "vocab_size", 0) or 0)
        bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise EngineError(f"prompt token ids must be in [0, {vocab}); got {bad[:3]}")
        return ids

    def _forward(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, keys: list[str], past: Any,
                 last_only: bool = False) -> Any:
        """One forward pass; `keys` is each row's PEFT adapter name. `last_only`: logits of the last
        position only (decoding needs no more; saves the vocabulary projection of the whole prompt)."""
        kw: dict[str, Any] = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=past is not False)
        if past is not False:
            kw[self._cache_kw] = past
        if last_only and self._logits_to_keep:
            kw["logits_to_keep"] = 1
        if self._peft is None:  # no adapter loaded: every row is the base model
            return self._base(**kw)
        if all(k == PEFT_BASE for k in keys):
            with self._peft.disable_adapter():
                return self._peft(**kw)
        stacked = self._stacked_lora()
        if stacked is not None and stacked.knows(keys):
            with stacked.rows(keys):
                return self._peft(**kw)
        return self._peft(**kw, adapter_names=keys)

    def _stacked_lora(self) -> Any:
        if not self._use_stacked:
            return None
        if self._stacked is None:
            from ga_ray.engine.stacked_lora import StackedLora

            self._stacked = StackedLora.build(self._peft) or False
        return self._stacked or None

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
            attn[b, T - len(s):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only (as transformers' generate)
        dev = self.device
        return ids.to(dev), attn.to(dev), pos.to(dev)

    # ----------------------------------------------------------------------------- generate

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """One `Generation` per request, in order; requests are length-sorted into batches of at most
        `max_batch_size` rows, variants mixed."""
        prepared = [self._prepare(i, r) for i, r in enumerate(requests)]
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i][0]))
        out: list[Generation | None] = [None] * len(prepared)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start:start + self.max_batch_size]
            for i, g in zip(idx, self._generate_batch([prepared[i] for i in idx])):
                out[i] = g
        return out  # type: ignore[return-value]

    def _prepare(self, i: int, r: GenerationRequest) -> tuple[list[int], str, SamplingParams]:
        if not isinstance(r, GenerationRequest):
            raise EngineError(f"request {i} is a {type(r).__name__}, not a GenerationRequest")
        key = self._variant(r.variant).adapter_key
        ids = self.encode(r.prompt)
        if not ids:
            raise EngineError(f"request {i}: the prompt is empty (no tokens)")
        if len(ids) + r.sampling.max_new_tokens > self.max_context:
            raise EngineError(f"request {i}: prompt ({len(ids)} tokens) + max_new_tokens ({r.sampling.max_new_tokens}) "
                              f"exceeds the model's context of {self.max_context} tokens")
        return ids, key, r.sampling

    @torch.no_grad()
    def _generate_batch(self, batch: list[tuple[list[int], str, SamplingParams]]) -> list[Generation]:
        with self._lock:
            n = len(batch)
            seqs = [b[0] for b in batch]
            keys = [b[1] for b in batch]
            params = [b[2] for b in batch]
            gens = [torch.Generator().manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
                    if not p.greedy else None for p in params]
            new: list[list[int]] = [[] for _ in range(n)]
            lps: list[list[float]] = [[] for _ in range(n)]
            tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
            finish: list[str | None] = [None] * n
            texts: list[str] = [""] * n
            for b, p in enumerate(params):
                if p.max_new_tokens == 0:
                    finish[b] = "length"
            steps = max(p.max_new_tokens for p in params)
            ids, attn, pos = self._left_pad(seqs)
            past = None
            active = list(range(n))  # the batch's rows, as indices of the requests; finished rows leave it
            for _ in range(steps):
                keep = [j for j, b in enumerate(active) if finish[b] is None]
                if not keep:
                    break
                if len(keep) < len(active) and past is not None and hasattr(past, "batch_select_indices"):
                    # drop finished rows from the batch and the KV cache: later steps compute only live rows
                    sel = torch.tensor(keep, dtype=torch.long, device=ids.device)
                    past.batch_select_indices(sel)
                    ids, attn, pos = ids[sel], attn[sel], pos[sel]
                    active = [active[j] for j in keep]
                out = self._forward(ids, attn, pos, [keys[b] for b in active], past, last_only=True)
                past = _cache_of(out)
                logits = out.logits[:, -1, :].float()
                argmax = logits.argmax(-1).tolist()  # every greedy row at once
                logp = torch.log_softmax(logits, -1) if any(params[b].logprobs is not None for b in active) else None
                nxt = [self.pad_id] * len(active)
                for j, b in enumerate(active):
                    if finish[b] is not None:  # kept when the cache cannot drop rows: fed a pad, ignored
                        continue
                    p = params[b]
                    tok = int(argmax[j]) if p.greedy else self._pick(logits[j], p, gens[b])
                    nxt[j] = tok
                    new[b].append(tok)
                    if logp is not None and p.logprobs is not None:
                        lp = logp[j]
                        lps[b].append(float(lp[tok]))
                        if p.logprobs > 0:
                            v, i = lp.topk(min(p.logprobs, lp.numel()))
                            tops[b].append([(int(a), float(c)) for a, c in zip(i.tolist(), v.tolist())])
                        else:
                            tops[b].append([])
                    if tok in self.eos_ids:
                        finish[b] = "stop"
                        texts[b] = self._decode(new[b])
                        continue
                    if p.stop:
                        text, hit = cut_at_stop(self._decode(new[b]), p.stop)
                        if hit:
                            finish[b], texts[b] = "stop", text
                            continue
                    if len(new[b]) >= p.max_new_tokens:
                        finish[b] = "length"
                        texts[b] = self._decode(new[b])
                dev = ids.device
                ids = torch.tensor(nxt, dtype=torch.long, device=dev)[:, None]
                attn = torch.cat([attn, torch.ones((len(active), 1), dtype=attn.dtype, device=dev)], dim=1)
                pos = pos[:, -1:] + 1
            results = []
            for b in range(n):
                want = params[b].logprobs is not None
                results.append(Generation(
                    text=texts[b], token_ids=new[b], finish_reason=finish[b] or "length", prompt_tokens=len(seqs[b]),
                    logprobs=lps[b] if want else None, top_logprobs=tops[b] if want else None,
                ))
            return results

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _pick(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
        """The next token of one row: argmax (greedy), else a draw from the tempered nucleus."""
        if p.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.double().cpu() / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_p, sorted_i = torch.sort(probs, descending=True)
            keep = (sorted_p.cumsum(-1) - sorted_p) < p.top_p  # the smallest prefix whose mass reaches top_p
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
            return int(sorted_i[choice])
        return int(torch.multinomial(probs, 1, generator=gen))

    # ----------------------------------------------------------------------------- score

    def _score_batches(self, order: list[int], seqs: list[list[int]]) -> list[list[int]]:
        """Length-sorted batches of at most `max_batch_size` rows and `score_token_budget` padded tokens
        (a scoring forward holds batch x length x vocabulary logits)."""
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:  # ascending length: the last row added is the longest
            if cur and (len(cur) == self.max_batch_size or (len(cur) + 1) * len(seqs[i]) > self.score_token_budget):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    @torch.no_grad()
    def score(self, inputs: Sequence[str | Sequence[int]], variant: str, top_logprobs: int = 0) -> list[Scored]:
        """Teacher-forced per-token log-probs of each input under `variant` (batched, left-padded)."""
        key = self._variant(variant).adapter_key
        if top_logprobs < 0:
            raise EngineError(f"top_logprobs must be >= 0, got {top_logprobs}")
        seqs = [self.encode(x) for x in inputs]
        for i, s in enumerate(seqs):
            if not s:
                raise EngineError(f"input {i} to score is empty (no tokens)")
            if len(s) > self.max_context:
                raise EngineError(f"input {i} has {len(s)} tokens, more than the model's context of {self.max_context}")
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out: list[Scored | None] = [None] * len(seqs)
        for idx in self._score_batches(order, seqs):
            batch = [seqs[i] for i in idx]
            with self._lock:
                ids, attn, pos = self._left_pad(batch)
                logits = self._forward(ids, attn, pos, [key] * len(idx), False).logits
            T = ids.shape[1]
            for b, i in enumerate(idx):
                s = batch[b]
                off = T - len(s)
                # row t predicts token t + 1; log-softmax per document, in float32, never over the whole batch
                rows = torch.log_softmax(logits[b, off:off + len(s) - 1].float(), -1)
                tgt = torch.tensor(s[1:], dtype=torch.long, device=rows.device)
                chosen = rows.gather(-1, tgt[:, None])[:, 0].tolist() if len(s) > 1 else []
                top: list[list[tuple[int, float]] | None] | None = None
                if top_logprobs > 0:
                    v, ix = rows.topk(min(top_logprobs, rows.shape[-1]), dim=-1)
                    top = [None] + [[(int(a), float(c)) for a, c in zip(ri, rv)] for ri, rv in zip(ix.tolist(), v.tolist())]
                out[i] = Scored(token_ids=list(s), logprobs=[None, *map(float, chosen)], top_logprobs=top)
        return out  # type: ignore[return-value]
