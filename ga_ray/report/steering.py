"""The report's steering section, from the evaluate stage's `eval/` files (read through `ga_ray.evaluate.io`):

- per steered atom, the behaviour rate against alpha for both signs with Wilson 95% intervals, the alpha = 0
  baseline and the base model marked, the random and supervised controls dashed (the paper's Figure 2);
- the paper's Table 2 layout (atom, behaviour, coherence, base, best up / best down with the change in pp and p,
  recommended alpha) plus the side-effect columns; the best alphas were chosen on one half of the prompts and
  are reported on the other;
- example answers at the recommended alpha beside the alpha = 0 baseline's answer to the SAME prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ga_ray.report.html import absent, esc, fmt, img, table

MAX_FIGURES = 12


def load_steering_artifacts(run_root: Path) -> dict[str, Any] | None:
    from ga_ray.evaluate import io as eio

    if not eio.exists(run_root):
        return None
    try:
        return {"metrics": eio.load_metrics(run_root), "table": eio.load_table2(run_root),
                "generations": eio.load_generations(run_root), "summary": eio.load_summary(run_root) or {}}
    except (OSError, ValueError):
        return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _pp(x: Any) -> str:
    return f"{x:+.0f}" if _finite(x) else "—"


def _pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if _finite(x) else "—"


def _p(x: Any) -> str:
    if not _finite(x):
        return "—"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def steering_figure(curve: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]], reference: str) -> bytes:
    """Rate against alpha (toward: +alpha, away: -alpha) on the curve's own prompt set."""
    from ga_ray.report.figures import _plt, _png

    plt = _plt()
    beh = curve["behaviour"]
    on = [m for m in metrics if m["behaviour"] == beh]
    ref = next((m for m in on if m["variant"] == reference), None)
    base = next((m for m in on if m["variant"] == "base"), None)

    def points(rows):
        pts = []
        for m in rows:
            x = m["alpha"] if m["sign"] == "toward" else -m["alpha"]
            pts.append((x, m["all_rate"], m["all_ci_low"], m["all_ci_high"], m.get("collapsed")))
        if ref is not None:
            pts.append((0.0, ref["all_rate"], ref["all_ci_low"], ref["all_ci_high"], False))
        return sorted(pts)

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    own = [m for m in on if m["curve"] == curve["curve"] and m["kind"] == curve["kind"]]
    pts = points(own)
    xs = [p[0] for p in pts]
    ax.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], fmt="o-", color="C0",
                capsize=3, label=curve["curve"])
    for p in pts:
        if p[4]:
            ax.plot(p[0], p[1], "x", color="red", markersize=10)
    for kind, color in (("random", "C1"), ("supervised", "C2")):
        ctrl = [m for m in on if m["kind"] == kind and m.get("steered_behaviour") == beh
                and (kind != "random" or list(m["atoms"]) == list(curve["atoms"]) or not curve["atoms"])]
        if ctrl:
            cp = points(ctrl)
            ax.errorbar([p[0] for p in cp], [p[1] for p in cp], yerr=[[p[1] - p[2] for p in cp], [p[3] - p[1] for p in cp]],
                        fmt="s--", color=color, capsize=2, alpha=0.8, label=f"{kind} control")
    if ref is not None:
        ax.plot([0], [ref["all_rate"]], "D", color="black", label="α = 0 (fine-tuned)")
    if base is not None:
        ax.axhline(base["all_rate"], color="grey", linestyle=":", label="base model")
    ax.set_xscale("symlog", linthresh=0.5)
    ticks = sorted({0.0, *xs})
    ax.set_xticks(ticks)
    ax.set_xticklabels([("0" if t == 0 else f"{'↑' if t > 0 else '↓'}{abs(t):g}") for t in ticks], fontsize=7)
    ax.minorticks_off()
    lim = max([abs(t) for t in ticks] + [1.0])
    ax.set_xlim(-lim * 1.5, lim * 1.5)
    ax.set_xlabel("α  (↓ away, ↑ toward; symmetric log scale)")
    ax.set_ylabel(f"{beh} rate")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{curve['curve']} on {beh} prompts (95% Wilson)")
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _examples(curve: Mapping[str, Any], gens: Sequence[Mapping[str, Any]], reference: str, n: int, chars: int) -> str:
    name = curve.get("rec_toward_variant") or curve.get("best_up_variant")
    other = curve.get("rec_away_variant") or curve.get("best_down_variant")
    out = []
    for variant in [v for v in (name, other) if v]:
        mine = {g["prompt_id"]: g for g in gens if g["variant"] == variant and g["behaviour"] == curve["behaviour"]}
        ref = {g["prompt_id"]: g for g in gens if g["variant"] == reference and g["behaviour"] == curve["behaviour"]}
        changed = [pid for pid in sorted(mine) if pid in ref and mine[pid]["fired"] != ref[pid]["fired"]]
        pids = (changed or [pid for pid in sorted(mine) if pid in ref])[:n]
        for pid in pids:
            a, b = ref[pid], mine[pid]
            out.append([esc(variant), esc(_cut(a["prompt"], chars)), _answer(a, chars), _answer(b, chars)])
    if not out:
        return ""
    return table(["variant", "prompt", "α = 0 answer", "steered answer (same prompt)"], out, raw_cols=(0, 1, 2, 3))


def _cut(text: Any, n: int) -> str:
    text = str(text or "")
    return text if len(text) <= n else text[: n - 1] + "…"


def _answer(g: Mapping[str, Any], chars: int) -> str:
    if g.get("error"):
        return f'<span class="absent">failed: {esc(_cut(g["error"], 80))}</span>'
    mark = " ✓" if g.get("fired") else ""
    return f"<pre>{esc(_cut(g.get('response'), chars))}</pre>{mark}"


def section_steering(art: dict[str, Any] | None, out_dir: Path, figs: dict[str, bytes], n_examples: int = 2,
                     chars: int = 240) -> str:
    if art is None:
        return absent("No steering evaluation: eval/metrics.parquet is missing (run `ga-ray steer` then `ga-ray evaluate`).")
    s = art["summary"]
    ref = s.get("reference", "finetuned")
    table2 = art["table"]
    goal = s.get("goal", {})
    body = (
        f"<p>{fmt(s.get('generations'))} greedy answers ({fmt(s.get('failed'))} failed requests, counted as misses) from "
        f"{fmt(s.get('model_ids'))} model ids through {esc(s.get('endpoint'))}; at most {fmt(s.get('max_tokens'))} new tokens. "
        f"α = 0 is <code>{esc(ref)}</code>. Best ↑ / ↓: α chosen on one half of each prompt set (seeded, stratified by "
        "invite/neutral) and reported on the other half, p from Fisher's exact test there (Holm over the two directions). "
        f"Recommended α: the largest |α| whose mean token KL to α = 0 on the neutral prompts stays within "
        f"{fmt(s.get('kl_budget'))} nats/token ({esc(s.get('kl_direction', ''))}, from the top-{fmt(s.get('kl_top_k'))} "
        "log-probs of the endpoint: a lower bound of the exact KL). A suppression that comes with collapse (degenerate "
        "answers or broken formats on neutral prompts) is marked collapsed and not counted.</p>"
    )
    if goal:
        body += (f"<p><b>Goal</b> (≥ {fmt(goal.get('delta_pp'))} pp from α = 0 at Holm p &lt; {fmt(goal.get('p'))}, within "
                 f"the KL budget, beyond the random control): met for {fmt(goal.get('n_met'))} of {fmt(goal.get('n_behaviours'))} "
                 f"behaviours{(' (' + esc(', '.join(goal.get('behaviours_met') or [])) + ')') if goal.get('behaviours_met') else ''}.</p>")
    atoms = [r for r in table2 if r["kind"] not in ("random", "supervised")]
    rows = []
    for r in table2:
        up = f"{_pct(r['best_up_rate'])} ({_pp(r['best_up_delta_pp'])} pp, p {_p(r['best_up_p'])}) @ {r['best_up_sign'] or '—'} {fmt(r['best_up_alpha'], 2)}"
        dn = f"{_pct(r['best_down_rate'])} ({_pp(r['best_down_delta_pp'])} pp, p {_p(r['best_down_p'])}) @ {r['best_down_sign'] or '—'} {fmt(r['best_down_alpha'], 2)}"
        rec = f"↑ {fmt(r['recommended_alpha_toward'], 2)} / ↓ {fmt(r['recommended_alpha_away'], 2)}"
        rows.append([r["curve"], r["behaviour"], r["coherence"], _pct(r["base_rate"]), _pct(r["alpha0_rate"]), up, dn, rec,
                     r["rec_toward_kl"], r["rec_toward_perplexity_ratio"], _pct(r["rec_toward_format_rate"]),
                     _pct(r["rec_toward_degenerate_share"]), _pp(r.get("goal_random_delta_pp")),
                     "yes" if r.get("goal_met") else "no"])
    body += "<h3>Table 2: steering per atom, with side effects at the recommended toward-α</h3>"
    body += table(["atom", "behaviour", "coherence", "base", "α = 0", "best ↑ (held out)", "best ↓ (held out)", "recommended α",
                   "KL", "ppl ratio", "format", "degenerate", "random Δpp", "goal"], rows, num_cols=(2, 8, 9))
    for i, r in enumerate(atoms[:MAX_FIGURES]):
        fname = "steering_" + re.sub(r"[^A-Za-z0-9]+", "_", f"{r['curve']}_{r['behaviour']}").strip("_") + ".png"
        figs[fname] = steering_figure(r, art["metrics"], ref)
        body += img(figs[fname], f"{r['curve']} steering curve", f"{r['curve']}: {r['behaviour']} rate against α (red ×: collapsed variant)")
        ex = _examples(r, art["generations"], ref, n_examples, chars)
        if ex:
            body += f"<h4>{esc(r['curve'])}: answers at the recommended α beside α = 0 (same prompts)</h4>" + ex
    return body
