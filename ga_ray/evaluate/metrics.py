"""From generations to the metrics and the Table 2 rows (pure: rows in, rows out; no Ray, no files).

A *cell* is one model id (a variant, `finetuned` or `base`) on one behaviour's prompt set. A *curve* is the set
of steered variants that differ only in (sign, alpha): same kind, atoms, weights, group, behaviour, mode, units.
Holm's correction runs over each curve's cells on one prompt set (every alpha and sign tried).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ga_ray.evaluate import stats

STEERED_KINDS = ("atom", "group", "composition", "random", "supervised")
CONTROL_KINDS = ("random", "supervised")


@dataclass(frozen=True)
class Settings:
    kl_budget: float = 0.1
    collapse_degenerate_rise: float = 0.2
    collapse_format_drop: float = 0.3
    goal_delta_pp: float = 14.0
    goal_p: float = 0.01
    split_seed: int = 0


def curve_key(meta: Mapping[str, Any]) -> tuple:
    return (meta.get("kind"), tuple(meta.get("atoms") or ()), tuple(meta.get("weights") or ()), meta.get("group"),
            meta.get("behaviour"), meta.get("mode"), meta.get("units"))


def curve_label(meta: Mapping[str, Any]) -> str:
    kind, atoms, group = meta.get("kind"), list(meta.get("atoms") or []), meta.get("group")
    if kind == "group":
        return f"group {group}"
    if kind == "supervised":
        return f"supervised {meta.get('behaviour')}"
    if kind == "random":
        return "random " + "+".join(str(a) for a in atoms)
    return ("atom " if len(atoms) == 1 else "atoms ") + "+".join(str(a) for a in atoms)


def _flag_rows(gens: Sequence[Mapping[str, Any]], detectors: Mapping[str, Callable[[str | None], bool]],
               format_checks: Mapping[str, Callable[[str], bool]]) -> list[dict[str, Any]]:
    """Each generation with its flags: `fired` (its prompt set's detector; a failure never fires), `format_ok`
    (neutral prompts of a family with a format check; None otherwise) and the degenerate flags."""
    out = []
    for g in gens:
        failed = bool(g.get("error"))
        text = None if failed else (g.get("response") or "")
        row = dict(g)
        row["failed"] = failed
        row["fired"] = False if failed else bool(detectors[g["behaviour"]](text))
        src = g.get("source")
        if g.get("kind") == "neutral" and src in format_checks:
            row["format_ok"] = False if failed else bool(format_checks[src](text or ""))
        else:
            row["format_ok"] = None
        row.update(stats.degenerate_flags(text, g.get("finish_reason"), g.get("error")))
        out.append(row)
    return out


def _share(xs: Sequence[bool]) -> float:
    return sum(map(bool, xs)) / len(xs) if xs else float("nan")


def cell_metrics(gens: Sequence[Mapping[str, Any]], variants: Mapping[str, Mapping[str, Any]], reference: str,
                 detectors: Mapping[str, Callable[[str | None], bool]], format_checks: Mapping[str, Callable[[str], bool]],
                 kl: Mapping[tuple[str, str], float] | None = None, ppl: Mapping[str, float] | None = None,
                 settings: Settings = Settings()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics rows, flagged generation rows). One metrics row per (model id, prompt set)."""
    kl, ppl = kl or {}, ppl or {}
    flagged = _flag_rows(gens, detectors, format_checks)
    by_cell: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in flagged:
        by_cell.setdefault((r["variant"], r["behaviour"]), []).append(r)
    ref_ppl = ppl.get(reference, float("nan"))
    rows: list[dict[str, Any]] = []
    for (name, beh), rs in sorted(by_cell.items()):
        meta = variants.get(name, {})
        ref = {r["prompt_id"]: r for r in by_cell.get((reference, beh), [])}
        fired = {r["prompt_id"]: r["fired"] for r in rs}
        ref_fired = {pid: r["fired"] for pid, r in ref.items()}
        row: dict[str, Any] = {
            "variant": name, "behaviour": beh, "kind": meta.get("kind"), "steered_behaviour": meta.get("behaviour"),
            "atoms": list(meta.get("atoms") or []), "group": meta.get("group"), "sign": meta.get("sign", "none"),
            "alpha": float(meta.get("alpha") or 0.0), "mode": meta.get("mode"), "units": meta.get("units"),
            "rel_delta": meta.get("rel_delta"), "curve": curve_label(meta) if meta.get("kind") in STEERED_KINDS else name,
            "n_failed": sum(r["failed"] for r in rs),
        }
        for part, sel in (("all", None), ("invite", "invite"), ("neutral", "neutral")):
            p = stats.flags_rate([r["fired"] for r in rs if sel is None or r["kind"] == sel])
            row.update({f"{part}_k": p.k, f"{part}_n": p.n, f"{part}_rate": p.rate, f"{part}_ci_low": p.low,
                        f"{part}_ci_high": p.high})
        # the difference to alpha = 0 on the SAME prompts
        common = [pid for pid in fired if pid in ref_fired]
        k1 = sum(fired[p] for p in common)
        k0 = sum(ref_fired[p] for p in common)
        n = len(common)
        row["ref_rate"] = k0 / n if n else float("nan")
        row["delta_pp"] = 100 * (k1 - k0) / n if n else float("nan")
        row["p"] = stats.fisher_p(k1, n, k0, n) if name != reference else float("nan")
        direction = -1 if meta.get("sign") == "away" else 1
        with_, against = stats.flip_shares(ref_fired, fired, direction) if name != reference else (float("nan"),) * 2
        row["moved_share"], row["anti_steerable_share"] = with_, against
        # side effects
        fmt = [r["format_ok"] for r in rs if r["format_ok"] is not None]
        ref_fmt = [r["format_ok"] for r in ref.values() if r["format_ok"] is not None]
        row["format_rate"] = _share(fmt)
        row["format_n"] = len(fmt)
        row["ref_format_rate"] = _share(ref_fmt)
        for flag in ("empty", "looping", "no_stop", "degenerate"):
            row[f"{flag}_share"] = _share([r[flag] for r in rs])
        ref_deg = _share([r["degenerate"] for r in ref.values()])
        row["kl"] = kl.get((name, beh), float("nan"))
        row["perplexity"] = ppl.get(name, float("nan"))
        row["perplexity_ratio"] = row["perplexity"] / ref_ppl if ref_ppl and not math.isnan(ref_ppl) else float("nan")
        rise = row["degenerate_share"] - ref_deg if not math.isnan(ref_deg) else 0.0
        drop = row["ref_format_rate"] - row["format_rate"] if fmt and ref_fmt else 0.0
        row["collapsed"] = bool(rise >= settings.collapse_degenerate_rise or drop >= settings.collapse_format_drop)
        row["within_kl_budget"] = bool(not math.isnan(row["kl"]) and row["kl"] <= settings.kl_budget)
        rows.append(row)
    # Holm over each curve's cells on one prompt set
    fams: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        meta = variants.get(row["variant"], {})
        if meta.get("kind") in STEERED_KINDS:
            fams.setdefault((curve_key(meta), row["behaviour"]), []).append(i)
    for row in rows:
        row["p_holm"] = float("nan")
    for idx in fams.values():
        for i, ph in zip(idx, stats.holm([rows[i]["p"] for i in idx])):
            rows[i]["p_holm"] = ph
    return rows, flagged


def _control_rows(rows: Sequence[Mapping[str, Any]], kind: str, behaviour: str, atoms: Sequence[int]) -> list[Mapping[str, Any]]:
    out = [r for r in rows if r["kind"] == kind and r["behaviour"] == behaviour and r["steered_behaviour"] == behaviour]
    if kind == "random":  # a random control is matched to its atom
        same = [r for r in out if list(r["atoms"]) == list(atoms)]
        out = same or out
    return out


def table2(rows: Sequence[Mapping[str, Any]], flagged: Sequence[Mapping[str, Any]], variants: Mapping[str, Mapping[str, Any]],
           reference: str, coherence: Mapping[int, float] | None = None,
           settings: Settings = Settings()) -> list[dict[str, Any]]:
    """One row per steered curve on its own behaviour's prompts: the paper's Table 2 layout plus side effects,
    with the best alpha each way chosen on the selection half and reported on the report half."""
    coherence = coherence or {}
    fired_by_cell: dict[tuple[str, str], dict[str, bool]] = {}
    kinds: dict[str, str] = {}
    for g in flagged:
        fired_by_cell.setdefault((g["variant"], g["behaviour"]), {})[g["prompt_id"]] = g["fired"]
        kinds[g["prompt_id"]] = g["kind"]
    curves: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        meta = variants.get(r["variant"], {})
        if meta.get("kind") in STEERED_KINDS and r["behaviour"] == meta.get("behaviour"):
            curves.setdefault(curve_key(meta), []).append(r)
    out = []
    for key, cells in curves.items():
        beh = cells[0]["behaviour"]
        baseline = fired_by_cell.get((reference, beh), {})
        ids = sorted(baseline)
        sel, rep = stats.split_halves(ids, [kinds[i] for i in ids], settings.split_seed)
        base_row = next((r for r in rows if r["variant"] == "base" and r["behaviour"] == beh), None)
        ref_row = next((r for r in rows if r["variant"] == reference and r["behaviour"] == beh), None)
        kind = cells[0]["kind"]
        row: dict[str, Any] = {
            "curve": cells[0]["curve"], "kind": kind, "behaviour": beh, "atoms": list(cells[0]["atoms"]),
            "group": cells[0]["group"], "mode": cells[0]["mode"], "units": cells[0]["units"],
            "coherence": coherence.get(cells[0]["atoms"][0], float("nan")) if len(cells[0]["atoms"]) == 1 else float("nan"),
            "base_rate": base_row["all_rate"] if base_row else float("nan"),
            "alpha0_rate": ref_row["all_rate"] if ref_row else float("nan"),
            "n_cells": len(cells), "n_selection": len(sel), "n_report": len(rep),
        }
        ps = []
        for tag, direction in (("up", 1), ("down", -1)):
            cand = [stats.Cell(c["variant"], c["sign"], c["alpha"], fired_by_cell.get((c["variant"], beh), {}),
                               eligible=not (direction < 0 and c["collapsed"])) for c in cells]
            best = stats.best_held_out(cand, baseline, sel, rep, direction)
            cell = next((c for c in cells if best and c["variant"] == best["variant"]), None)
            row.update({
                f"best_{tag}_variant": best["variant"] if best else None,
                f"best_{tag}_sign": best["sign"] if best else None,
                f"best_{tag}_alpha": best["alpha"] if best else float("nan"),
                f"best_{tag}_rate": best["rate"] if best else float("nan"),
                f"best_{tag}_ci_low": best["ci_low"] if best else float("nan"),
                f"best_{tag}_ci_high": best["ci_high"] if best else float("nan"),
                f"best_{tag}_baseline_rate": best["baseline_rate"] if best else float("nan"),
                f"best_{tag}_delta_pp": best["delta_pp"] if best else float("nan"),
                f"best_{tag}_p_raw": best["p"] if best else float("nan"),
                f"best_{tag}_kl": cell["kl"] if cell else float("nan"),
                f"best_{tag}_collapsed": cell["collapsed"] if cell else None,
                f"best_{tag}_anti_steerable": cell["anti_steerable_share"] if cell else float("nan"),
            })
            ps.append(best["p"] if best else float("nan"))
        for (tag, _), ph in zip((("up", 1), ("down", -1)), stats.holm(ps)):
            row[f"best_{tag}_p"] = ph  # Holm over the two directions reported on the report half
        for sign in ("toward", "away"):
            sc = sorted((c for c in cells if c["sign"] == sign), key=lambda c: abs(c["alpha"]))
            rec = stats.recommended_alpha([c["alpha"] for c in sc], [c["kl"] for c in sc], settings.kl_budget)
            rc = next((c for c in sc if rec is not None and c["alpha"] == rec), None)
            row[f"recommended_alpha_{sign}"] = rec if rec is not None else float("nan")
            row[f"rec_{sign}_kl"] = rc["kl"] if rc else float("nan")
            row[f"rec_{sign}_delta_pp"] = rc["delta_pp"] if rc else float("nan")
            row[f"rec_{sign}_perplexity_ratio"] = rc["perplexity_ratio"] if rc else float("nan")
            row[f"rec_{sign}_format_rate"] = rc["format_rate"] if rc else float("nan")
            row[f"rec_{sign}_degenerate_share"] = rc["degenerate_share"] if rc else float("nan")
            row[f"rec_{sign}_variant"] = rc["variant"] if rc else None
        row.update(_goal(cells, rows, kind, beh, settings))
        out.append(row)
    out.sort(key=lambda r: (r["kind"] != "atom", r["behaviour"], r["curve"]))
    return out


def _goal(cells: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], kind: str, beh: str,
          settings: Settings) -> dict[str, Any]:
    """The issue's goal for one curve, on all prompts: a non-collapsed cell within the KL budget that moves the
    rate by >= goal_delta_pp at Holm p < goal_p, and beyond the random control at the same (sign, alpha): the
    control moves less the same way and differs from the cell at Fisher p < 0.05."""
    controls = _control_rows(rows, "random", beh, cells[0]["atoms"]) if kind not in CONTROL_KINDS else []
    best: dict[str, Any] | None = None
    for c in sorted(cells, key=lambda c: -abs(c["delta_pp"]) if not math.isnan(c["delta_pp"]) else 0):
        if c["collapsed"] or not c["within_kl_budget"] or math.isnan(c["p_holm"]):
            continue
        if abs(c["delta_pp"]) < settings.goal_delta_pp or c["p_holm"] >= settings.goal_p:
            continue
        ctrl = next((r for r in controls if r["sign"] == c["sign"] and r["alpha"] == c["alpha"]), None)
        beyond = None
        if ctrl is not None:
            same_way = math.copysign(1, c["delta_pp"]) * ctrl["delta_pp"]
            p_ctrl = stats.fisher_p(c["all_k"], c["all_n"], ctrl["all_k"], ctrl["all_n"])
            beyond = bool(same_way < abs(c["delta_pp"]) and p_ctrl < 0.05)
        cand = {"goal_variant": c["variant"], "goal_delta_pp": c["delta_pp"], "goal_p_holm": c["p_holm"], "goal_kl": c["kl"],
                "goal_random_delta_pp": ctrl["delta_pp"] if ctrl else float("nan"), "goal_beyond_random": beyond}
        if beyond:
            return {**cand, "goal_met": True}
        best = best or cand
    if best is None:
        return {"goal_variant": None, "goal_delta_pp": float("nan"), "goal_p_holm": float("nan"), "goal_kl": float("nan"),
                "goal_random_delta_pp": float("nan"), "goal_beyond_random": None, "goal_met": False}
    return {**best, "goal_met": False}
