"""What an atom is: excerpts of its top documents, characteristic words, and an optional LLM label.

- Excerpts: a document's prompt is its tokens with loss_mask 0, its response those with loss_mask 1,
  decoded with the run's tokenizer (token ids are shown when no tokenizer can be loaded).
- Characteristic words: weighted log-odds with an informative Dirichlet prior (Monroe, Colaresi &
  Quinn 2008) of the words of the atom's top responses against the responses of the whole data set;
  words ranked by z-score.
- Label (off unless `coherence.label_endpoint` is set): one POST to an OpenAI-compatible
  `/v1/chat/completions` with the excerpts and the words; the prompt, the raw answer and any error are
  kept beside the label.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

WORD_RE = re.compile(r"[^\W\d_][\w'\-]*|\d+", re.UNICODE)

# English function words, never "characteristic" (numbers and content words such as "four" stay)
FUNCTION_WORDS = frozenset(
    """a an the and or but if of to in on at by for with from as into onto than then so that this these those
    it its it's is are was were be been being am do does did has have had will would can could shall should may
    might must i you he she we they me him her us them my your his our their there here what which who whom
    whose not no nor also just very too""".split()
)


def split_prompt_response(input_ids: Sequence[int], loss_mask: Sequence[int]) -> tuple[list[int], list[int]]:
    ids = [int(x) for x in input_ids]
    mask = [int(x) for x in loss_mask]
    return [t for t, m in zip(ids, mask) if m == 0], [t for t, m in zip(ids, mask) if m != 0]


class Decoder:
    """Token ids → text with a tokenizer, or `⟨id⟩` strings when there is none."""

    def __init__(self, tokenizer: Any | None = None):
        self.tokenizer = tokenizer

    def __call__(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(f"t{int(i)}" for i in ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def many(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        if self.tokenizer is None:
            return [self(s) for s in seqs]
        return list(self.tokenizer.batch_decode([list(s) for s in seqs], skip_special_tokens=True))


def excerpt(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[: max(0, max_chars - 1)].rstrip() + "…"


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def word_counts(texts: Iterable[str]) -> Counter:
    c: Counter = Counter()
    for t in texts:
        c.update(words(t))
    return c


def log_odds_keywords(target: Counter, corpus: Counter, top: int = 8, prior_strength: float = 500.0, min_count: int = 2) -> list[tuple[str, float]]:
    """Words over-represented in `target` against `corpus` (which includes the target), by z-score;
    English function words (`FUNCTION_WORDS`) are left out.

    δ_w = log((y_w+a_w)/(n+a0−y_w−a_w)) − log((r_w+a_w)/(m+a0−r_w−a_w)), σ² ≈ 1/(y_w+a_w) + 1/(r_w+a_w),
    with y the target counts, r = corpus − target the rest, a_w = a0 · corpus_w / |corpus|.
    """
    n_corpus = sum(corpus.values())
    n_t = sum(target.values())
    if n_corpus == 0 or n_t == 0:
        return []
    a0 = float(prior_strength)
    rest_total = max(n_corpus - n_t, 0)
    out = []
    for w, y in target.items():
        if y < min_count or w in FUNCTION_WORDS:
            continue
        cw = max(corpus.get(w, 0), y)
        r = max(cw - y, 0)
        a = a0 * cw / max(n_corpus, 1)
        d = math.log((y + a) / (n_t + a0 - y - a)) - math.log((r + a) / (rest_total + a0 - r - a))
        var = 1.0 / (y + a) + 1.0 / (r + a)
        out.append((w, d / math.sqrt(var)))
    out.sort(key=lambda x: (-x[1], x[0]))
    return [(w, round(z, 3)) for w, z in out[:top] if z > 0]


# ---------------------------------------------------------------------------------------- labeller

LABEL_SYSTEM = (
    "You name the shared behaviour of a group of training documents of a fine-tuned language model. "
    "The documents were grouped without labels because their training gradients point the same way."
)


def label_prompt(examples: Sequence[dict[str, str]], keywords: Sequence[str]) -> str:
    lines = ["Documents (prompt → response):"]
    for i, ex in enumerate(examples, 1):
        lines.append(f"{i}. PROMPT: {ex.get('prompt', '')}\n   RESPONSE: {ex.get('response', '')}")
    if keywords:
        lines.append("Characteristic words of the responses: " + ", ".join(keywords))
    lines.append(
        "In at most 8 words, what task or behaviour do these documents have in common? "
        "Answer with the label only, on one line."
    )
    return "\n".join(lines)


def chat_completions_url(endpoint: str) -> str:
    base = endpoint.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


def clean_label(text: str, max_chars: int = 80) -> str:
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(label\s*:\s*)", "", line, flags=re.IGNORECASE)
    line = line.strip().strip("\"'`*").strip()
    return excerpt(line, max_chars)


def request_label(
    endpoint: str,
    model: str | None,
    prompt: str,
    *,
    timeout_s: float = 30.0,
    api_key: str | None = None,
    max_tokens: int = 32,
    retries: int = 1,
) -> dict[str, Any]:
    """POST one chat completion; returns {label, prompt, raw, error, seconds}. Never raises on HTTP errors."""
    url = chat_completions_url(endpoint)
    body = {
        "model": model or "default",
        "messages": [{"role": "system", "content": LABEL_SYSTEM}, {"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    out: dict[str, Any] = {"label": None, "prompt": prompt, "raw": None, "error": None, "url": url}
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read().decode("utf-8", errors="replace")
            out["raw"] = raw
            try:
                content = json.loads(raw)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                out["error"] = f"unexpected answer ({type(exc).__name__}: {exc})"
                break
            out["label"] = clean_label(str(content or ""))
            out["error"] = None if out["label"] else "empty label"
            break
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:500]
            out["raw"] = detail
            out["error"] = f"HTTP {exc.code} {exc.reason}: {detail}"
            if exc.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            out["error"] = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if attempt < retries:
            time.sleep(0.5 * (attempt + 1))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# ------------------------------------------------------------------------------ characterisation


def characterise_atoms(
    top_doc_ids: Sequence[Sequence[int]],
    docs: dict[int, tuple[Sequence[int], Sequence[int]]],
    background_responses: Sequence[str],
    decoder: Decoder,
    *,
    n_examples: int = 5,
    excerpt_chars: int = 300,
    n_keywords: int = 8,
    atoms: Sequence[int] | None = None,
) -> dict[int, dict[str, Any]]:
    """Per atom: `examples` (doc_id, prompt, response excerpts of its first `n_examples` top docs) and
    `keywords` (from the responses of all its top docs against `background_responses`).

    `docs`: doc id → (input_ids, loss_mask) for at least every top document.
    """
    corpus = word_counts(background_responses)
    decoded: dict[int, tuple[str, str]] = {}
    needed = sorted({int(d) for ids in top_doc_ids for d in ids})
    prompts, responses = [], []
    for d in needed:
        p, r = split_prompt_response(*docs[d])
        prompts.append(p)
        responses.append(r)
    for d, p, r in zip(needed, decoder.many(prompts) if prompts else [], decoder.many(responses) if responses else []):
        decoded[d] = (p, r)
    out: dict[int, dict[str, Any]] = {}
    which = range(len(top_doc_ids)) if atoms is None else atoms
    for k in which:
        ids = [int(d) for d in top_doc_ids[k]]
        target = word_counts(decoded[d][1] for d in ids)
        kw = log_odds_keywords(target, corpus_with(corpus, target), top=n_keywords)
        out[int(k)] = {
            "examples": [
                {"doc_id": d, "prompt": excerpt(decoded[d][0], excerpt_chars), "response": excerpt(decoded[d][1], excerpt_chars)}
                for d in ids[:n_examples]
            ],
            "keywords": [w for w, _ in kw],
            "keyword_scores": [z for _, z in kw],
        }
    return out


def corpus_with(corpus: Counter, target: Counter) -> Counter:
    """The background must contain the target's words at least as often as the target (a sample may not)."""
    missing = Counter({w: c - corpus.get(w, 0) for w, c in target.items() if corpus.get(w, 0) < c})
    return corpus + missing if missing else corpus


def sample_ids(doc_ids: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    doc_ids = np.asarray(doc_ids)
    if len(doc_ids) <= n:
        return doc_ids
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(doc_ids, size=n, replace=False))


def label_atoms(
    characterised: dict[int, dict[str, Any]],
    atoms: Sequence[int],
    endpoint: str,
    model: str | None,
    *,
    timeout_s: float = 30.0,
    api_key_env: str | None = None,
    n_examples: int = 5,
) -> dict[int, dict[str, Any]]:
    """Label each atom of `atoms` from its excerpts; results are also stored under `label_request`."""
    from tqdm.auto import tqdm

    api_key = os.environ.get(api_key_env) if api_key_env else None
    results = {}
    for k in tqdm(list(atoms), desc="labelling atoms", unit="atom", disable=len(atoms) < 5):
        info = characterised[int(k)]
        prompt = label_prompt(info["examples"][:n_examples], info["keywords"])
        res = request_label(endpoint, model, prompt, timeout_s=timeout_s, api_key=api_key)
        info["label"] = res["label"]
        info["label_request"] = res
        results[int(k)] = res
    return results
