"""The format table: greedy decoding on a demo world's held-out prompts, scored by the family format
checks (`ga_ray.demo.formats`) and the behaviour detectors (`ga_ray.detectors`).

Targets (issue 2): every deterministic family's format rate >= 80%, every behaviour's rate on its 100
evaluation prompts within [15%, 85%] (headroom for steering in both directions).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ga_ray.detectors import DETECTORS, rate

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


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64,
                    progress: bool = False) -> list[str]:
    """Greedy completions of single-turn user prompts (chat template + generation prompt), batched with
    left padding; prompts are length-sorted so batches pad little. Returns the decoded new text."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="format table: generating", disable=not progress, leave=False):
        T = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):  # left padding
            ids[b, T - len(enc[i]) :] = torch.tensor(enc[i])
            attn[b, T - len(enc[i]) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for b, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[b, T:], skip_special_tokens=True)
    return out


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


def run_format_table(model, tokenizer, eval_dir: str | Path, max_new_tokens: int, limit: int | None = None,
                     batch_size: int = 64, progress: bool = False,
                     format_checks: dict[str, Callable[[str], bool]] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Generate for every held-out prompt in one batched pass and score. Returns (table, generations)."""
    if format_checks is None:
        from ga_ray.demo.formats import FORMAT_CHECKS as format_checks
    eval_set = load_eval_set(eval_dir, limit)
    flat: list[tuple[str, str, dict]] = [(kind, name, row) for kind in ("families", "behaviours")
                                         for name, rows in eval_set[kind].items() for row in rows]
    texts = generate_greedy(model, tokenizer, [row["prompt"] for _, _, row in flat], max_new_tokens, batch_size, progress)
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
