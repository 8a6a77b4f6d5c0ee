"""The format table: greedy decoding on a demo world's held-out prompts, scored by the family format
checks (`ga_ray.demo.formats`) and the behaviour detectors (`ga_ray.detectors`).

Generation goes through the project's one generation engine (`ga_ray.engine`): the fine-tuned
model is variant `finetuned`, the base model `base` (adapter off), of one engine.

Targets (issue 2): every deterministic family's format rate >= 80%, every behaviour's rate on its 100
evaluation prompts within [15%, 85%] (headroom for steering in both directions).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ga_ray.detectors import DETECTORS, rate
from ga_ray.engine import BASE, FINETUNED, Engine, GenerationRequest, SamplingParams, chat_prompt_ids

FAMILY_TARGET = 0.80
BEHAVIOUR_RANGE = (0.15, 0.85)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_eval_set(eval_dir: str | Path, limit: int | None = None) -> dict[str, dict[str, list[dict]]]:
    """{"families": {family: rows}, "behaviours": {behaviour: rows}} from a demo world's eval folder."""
    root = Path(eval_dir)
    if not (root / "families").is_dir() or not (root / "behaviours").is_dir():
        raise FileNotFoundError(f"{root} is not a demo evaluation folder (it needs families/ and behaviours/)")
    out: dict[str, dict[str, list[dict]]] = {"families": {}, "behaviours": {}}
    for kind in ("families", "behaviours"):
        for f in sorted((root / kind).glob("*.jsonl")):
            rows = _read_jsonl(f)
            out[kind][f.stem] = rows[:limit] if limit else rows
    return out


def engine_greedy(engine: Engine, prompts: Sequence[str], max_new_tokens: int, variant: str = FINETUNED,
                  batch_size: int = 64, progress: bool = False) -> list[str]:
    """Greedy completions of single-turn user prompts (chat template + generation prompt) by `variant`
    of `engine`. Prompts are length-sorted into batches of `batch_size` so batches pad little; the
    engine decodes each batch (left padding, KV cache). Returns the generated text of each prompt."""
    from tqdm.auto import tqdm

    enc = [chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="format table: generating", disable=not progress, leave=False):
        gens = engine.generate([GenerationRequest(variant, enc[i], sampling) for i in idx])
        for i, g in zip(idx, gens):
            out[i] = g.text
    return out


def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64,
                    progress: bool = False) -> list[str]:
    """`engine_greedy` for a loaded transformers model: a plain model generates as the base model, a
    `PeftModel` with its active adapter."""
    from ga_ray.engine.peft_engine import PeftEngine

    engine = PeftEngine(model, tokenizer, max_batch_size=batch_size)
    active = getattr(model, "active_adapter", None) if hasattr(model, "peft_config") else None
    variant = BASE if active is None else (FINETUNED if active == "default" else active)
    return engine_greedy(engine, prompts, max_new_tokens, variant, batch_size, progress)


def compute_format_table(
    eval_set: dict[str, dict[str, list[dict]]],
    responses: dict[str, dict[str, list[str]]],
    format_checks: dict[str, Callable[[str], bool]],
) -> dict[str, Any]:
    """Score responses: family format rates (by `format_checks`) and behaviour rates (by `DETECTORS`),
    each with a Wilson 95% interval; behaviours also split into inviting / neutral prompts."""
    fam_rows: dict[str, Any] = {}
    for fam, rows in eval_set["families"].items():
        check = format_checks.get(fam)
        if check is None:
            raise KeyError(f"no format check for family {fam!r}; known: {', '.join(format_checks)}")
        r = rate(check(x) for x in responses["families"][fam])
        fam_rows[fam] = {**r.as_dict(), "ok": r.rate >= FAMILY_TARGET}
    beh_rows: dict[str, Any] = {}
    for beh, rows in eval_set["behaviours"].items():
        det = DETECTORS[beh]
        flags = [det(x) for x in responses["behaviours"][beh]]
        r = rate(flags)
        inv = rate(f for f, row in zip(flags, rows) if row.get("invites"))
        neu = rate(f for f, row in zip(flags, rows) if not row.get("invites"))
        beh_rows[beh] = {
            **r.as_dict(),
            "invite_rate": inv.rate, "n_invite": inv.n,
            "neutral_rate": neu.rate, "n_neutral": neu.n,
            "ok": BEHAVIOUR_RANGE[0] <= r.rate <= BEHAVIOUR_RANGE[1],
        }
    return {
        "families": fam_rows,
        "behaviours": beh_rows,
        "targets": {"family_min": FAMILY_TARGET, "behaviour_range": list(BEHAVIOUR_RANGE)},
        "families_ok": sum(v["ok"] for v in fam_rows.values()),
        "behaviours_ok": sum(v["ok"] for v in beh_rows.values()),
        "targets_met": all(v["ok"] for v in fam_rows.values()) and all(v["ok"] for v in beh_rows.values()),
    }


def run_format_table(engine: Engine, eval_dir: str | Path, max_new_tokens: int, variant: str = FINETUNED,
                     limit: int | None = None, batch_size: int = 64, progress: bool = False,
                     format_checks: dict[str, Callable[[str], bool]] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Generate (greedy, `variant` of `engine`) for every held-out prompt and score. Returns (table, generations)."""
    if format_checks is None:
        from ga_ray.demo.formats import FORMAT_CHECKS as format_checks
    eval_set = load_eval_set(eval_dir, limit)
    flat: list[tuple[str, str, dict]] = [(kind, name, row) for kind in ("families", "behaviours")
                                         for name, rows in eval_set[kind].items() for row in rows]
    texts = engine_greedy(engine, [row["prompt"] for _, _, row in flat], max_new_tokens, variant, batch_size, progress)
    responses: dict[str, dict[str, list[str]]] = {"families": {}, "behaviours": {}}
    for (kind, name, _), text in zip(flat, texts):
        responses[kind].setdefault(name, []).append(text)
    table = compute_format_table(eval_set, responses, format_checks)
    generations = [{"kind": kind[:-1] if kind == "behaviours" else "family", "name": name, **row, "response": text}
                   for (kind, name, row), text in zip(flat, texts)]
    return table, generations


def format_table_text(table: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """The table as fixed-width text; with `base` (the same table for the base model, adapter off) a
    "base" column shows what the fine-tune changed."""
    from ga_ray.demo.formats import FORMAT_DESCRIPTIONS

    def base_col(kind: str, name: str) -> str:
        if base is None:
            return ""
        row = base.get(kind, {}).get(name)
        return f"{100 * row['rate']:6.1f}%  " if row else f"{'-':>7}  "

    base_head = f"{'base':>7}  " if base is not None else ""
    lines = [f"{'family':<16}{'format':<40}{base_head}{'tuned' if base is not None else 'rate':>7}  {'95% CI':<14}  "
             f"target >= {int(100 * FAMILY_TARGET)}%"]
    for fam, r in table["families"].items():
        ci = f"[{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"
        lines.append(f"{fam:<16}{FORMAT_DESCRIPTIONS.get(fam, ''):<40}{base_col('families', fam)}{100 * r['rate']:6.1f}%  {ci:<14}  "
                     f"{'ok' if r['ok'] else 'MISS'}")
    lo, hi = (int(100 * x) for x in BEHAVIOUR_RANGE)
    lines.append("")
    lines.append(f"{'behaviour':<16}{base_head}{'tuned (n)' if base is not None else 'rate (n)':<16}{'95% CI':<14}"
                 f"{'inviting':>10}{'neutral':>10}  target {lo}-{hi}%")
    for beh, r in table["behaviours"].items():
        ci = f"[{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"
        pct = f"{100 * r['rate']:.1f}% ({r['n']})"
        lines.append(
            f"{beh:<16}{base_col('behaviours', beh)}{pct:<16}{ci:<14}{100 * r['invite_rate']:9.1f}%{100 * r['neutral_rate']:9.1f}%  "
            f"{'ok' if r['ok'] else 'MISS'}"
        )
    return "\n".join(lines)
