"""Prompt sets of the evaluation and held-out documents for the perplexity side effect.

A prompt set is one behaviour's prompts, each `invite` (it invites the behaviour) or `neutral`:
- the demo world's held-out sets `<world>/eval/behaviours/<behaviour>.jsonl` (`prompt`, `invites`, `source`;
  100 = 60 + 40, held-out templates and vocabulary); a neutral prompt's `source` is the deterministic family it
  was drawn from, so the format checks of that family apply to it (the format table under each variant);
- or a user JSONL, one object a line: `prompt` (text), `behaviour` (a detector name), `kind` (`invite` |
  `neutral`), optional `id` and `source`. Every line is validated; an error names the file, line and field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ga_ray.errors import ConfigError, DataError

KINDS = ("invite", "neutral")


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    behaviour: str
    kind: str  # invite | neutral
    prompt: str
    source: str | None = None  # the task family a neutral prompt came from (format checks), when known


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            out.append((lineno, obj))
    return out


def load_demo_sets(eval_dir: str | Path) -> dict[str, list[PromptRow]]:
    """{behaviour: rows} from a demo world's `eval/behaviours/*.jsonl`."""
    root = Path(eval_dir) / "behaviours"
    if not root.is_dir():
        raise ConfigError(f"{eval_dir} has no behaviours/ folder: point finetune.format_eval_set at a demo world's eval/ "
                          "or give evaluation.prompts (JSONL of prompt, behaviour, kind)")
    sets: dict[str, list[PromptRow]] = {}
    for f in sorted(root.glob("*.jsonl")):
        rows = []
        for i, (lineno, obj) in enumerate(_read_jsonl(f)):
            if not isinstance(obj.get("prompt"), str) or "invites" not in obj:
                raise DataError(f"{f}:{lineno}: a demo behaviour prompt needs `prompt` (text) and `invites` (bool)")
            rows.append(PromptRow(f"{f.stem}-{i:03d}", f.stem, "invite" if obj["invites"] else "neutral", obj["prompt"],
                                  obj.get("source")))
        sets[f.stem] = rows
    return sets


def load_user_sets(path: str | Path, known_behaviours: set[str] | None = None) -> dict[str, list[PromptRow]]:
    """{behaviour: rows} from a user JSONL (validated line by line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"evaluation.prompts: {path} does not exist (a JSONL of prompt, behaviour, kind)")
    sets: dict[str, list[PromptRow]] = {}
    seen: set[str] = set()
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        prompt, behaviour, kind = obj.get("prompt"), obj.get("behaviour"), obj.get("kind")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: `prompt` must be a non-empty string")
        if not isinstance(behaviour, str) or not behaviour:
            raise DataError(f"{where}: `behaviour` must name a detector")
        if known_behaviours is not None and behaviour not in known_behaviours:
            raise DataError(f"{where}: behaviour {behaviour!r} has no detector; known: {', '.join(sorted(known_behaviours))} "
                            "(add a user detector under `detectors:` in the config)")
        if kind not in KINDS:
            raise DataError(f"{where}: `kind` must be 'invite' or 'neutral', got {kind!r}")
        rows = sets.setdefault(behaviour, [])
        pid = str(obj.get("id", f"{behaviour}-{len(rows):03d}"))
        if pid in seen:
            raise DataError(f"{where}: id {pid!r} is used twice; prompt ids must be unique")
        seen.add(pid)
        source = obj.get("source")
        rows.append(PromptRow(pid, behaviour, kind, prompt, source if isinstance(source, str) else None))
    if not sets:
        raise DataError(f"{path}: no prompts")
    return sets


def load_prompt_sets(prompts: str | None, format_eval_set: str | None, known_behaviours: set[str],
                     only: list[str] | None = None) -> dict[str, list[PromptRow]]:
    """The evaluation's prompt sets: the user's JSONL when given, else the demo world's held-out sets."""
    if prompts:
        sets = load_user_sets(prompts, known_behaviours)
    elif format_eval_set:
        sets = load_demo_sets(format_eval_set)
    else:
        raise ConfigError("evaluate: no prompts. Set evaluation.prompts to a JSONL of prompt, behaviour, kind "
                          "(or run `ga-ray demo`, whose world provides held-out sets)")
    unknown = sorted(set(sets) - known_behaviours)
    if unknown:
        raise DataError(f"prompt sets {', '.join(unknown)} have no detector; known: {', '.join(sorted(known_behaviours))}")
    if only:
        missing = [b for b in only if b not in sets]
        if missing:
            raise ConfigError(f"evaluation.behaviours: {', '.join(missing)} not among the prompt sets ({', '.join(sets)})")
        sets = {b: sets[b] for b in only}
    return sets


# ------------------------------------------------------------------------------ perplexity documents


@dataclass(frozen=True)
class Document:
    doc_id: str
    prompt: str
    response: str
    source: str | None = None


def demo_heldout_documents(seed: int, per_family: int) -> list[Document]:
    """Fresh documents of every demo task family from its HELD-OUT templates and vocabulary (never in the
    mixture the adapter was trained on), `per_family` each, seeded."""
    from ga_ray.demo import tasks
    from ga_ray.demo.vocab import Vocab

    v = Vocab(heldout=True)
    docs = []
    for fam in tasks.FAMILIES:
        rng = random.Random(f"eval-perplexity-{fam}-{seed}")
        for i in range(per_family):
            ex = tasks.GENERATORS[fam](rng, v, True)
            docs.append(Document(f"{fam}-{i:02d}", ex.prompt, ex.response, fam))
    return docs


def load_documents(path: str | Path) -> list[Document]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"evaluation.perplexity_docs: {path} does not exist (a JSONL of prompt, response)")
    docs = []
    for lineno, obj in _read_jsonl(path):
        if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("response"), str) or not obj["response"]:
            raise DataError(f"{path}:{lineno}: a document needs `prompt` and a non-empty `response` (strings)")
        docs.append(Document(str(obj.get("id", f"doc-{len(docs):04d}")), obj["prompt"], obj["response"], obj.get("source")))
    return docs
