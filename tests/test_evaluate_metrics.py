"""Cells, Holm families and Table 2 rows on a constructed evaluation (pure: no server)."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from ga_ray.detectors import DETECTORS
from ga_ray.demo.formats import FORMAT_CHECKS
from ga_ray.evaluate import metrics, stats

BULLETS = "- a\n- b"
PLAIN = "Category: mammal"


def _variants():
    v = {
        "baseline-x": {"name": "baseline-x", "kind": "baseline", "sign": "none", "alpha": 0.0, "atoms": [], "behaviour": None},
        "finetuned": {"name": "finetuned", "kind": "finetuned", "sign": "none", "alpha": 0.0, "atoms": []},
        "base": {"name": "base", "kind": "base", "sign": "none", "alpha": 0.0, "atoms": []},
    }
    for kind in ("atom", "random"):
        for sign in ("toward", "away"):
            for a in (1.0, 2.0):
                name = f"{'atom' if kind == 'atom' else 'random'}7-{sign}-a{a:g}"
                v[name] = {"name": name, "kind": kind, "sign": sign, "alpha": a, "atoms": [7], "weights": [1.0],
                           "group": None, "behaviour": "bullets", "mode": "paper", "units": "absolute"}
    return v


def _gens(variants, fire):
    """60 invite + 40 neutral prompts; `fire(variant, i)` says whether the answer is a bullet list."""
    rows = []
    for name in variants:
        for i in range(100):
            kind = "invite" if i < 60 else "neutral"
            err = "APIConnectionError: boom" if (name == "atom7-toward-a1" and i == 0) else None
            rows.append({"variant": name, "item": f"bullets/b{i:03d}", "prompt_id": f"b{i:03d}", "behaviour": "bullets",
                         "kind": kind, "source": "classification" if kind == "neutral" else "bullets",
                         "response": None if err else (BULLETS if fire(name, i) else PLAIN), "finish_reason": "stop",
                         "error": err})
    return rows


def _fire(name, i):
    if name.startswith("atom7-toward"):
        return i < (90 if name.endswith("a2") else 40) or i in (0,)  # i = 0 fails for a1: must count as a miss
    if name.startswith("atom7-away"):
        return False
    if name.startswith("random7"):
        return i < 30
    return i < 30  # baseline, finetuned, base: 30%


def test_cells_count_failures_and_holm_runs_over_each_curve():
    v = _variants()
    kl = {(n, "bullets"): (0.05 if n.endswith("a1") else 0.5) for n in v}
    rows, flagged = metrics.cell_metrics(_gens(v, _fire), v, "baseline-x", DETECTORS, FORMAT_CHECKS, kl, {})
    by = {r["variant"]: r for r in rows}
    a1 = by["atom7-toward-a1"]
    assert a1["all_n"] == 100 and a1["n_failed"] == 1 and a1["all_k"] == 39  # the failure stays in n, not in k
    assert a1["delta_pp"] == pytest.approx(9.0)
    # Holm over the atom curve's four cells, p from Fisher on the same prompts
    curve = [by[n] for n in v if n.startswith("atom7")]
    raw = [sps.fisher_exact([[r["all_k"], 100 - r["all_k"]], [30, 70]]).pvalue for r in curve]
    for r, ph in zip(curve, stats.holm(raw)):
        assert r["p_holm"] == pytest.approx(ph)
    assert math.isnan(by["baseline-x"]["p_holm"])
    # the format checks run on the neutral prompts of a family with a check
    assert by["baseline-x"]["format_rate"] == 1.0 and by["baseline-x"]["format_n"] == 40
    assert by["atom7-toward-a2"]["format_rate"] == pytest.approx(10 / 40)
    assert by["atom7-toward-a2"]["collapsed"]  # the format broke: a format drop of 75 pp
    assert not by["atom7-toward-a1"]["collapsed"]


def test_table2_row():
    v = _variants()
    kl = {(n, "bullets"): (0.05 if n.endswith("a1") else 0.5) for n in v}
    rows, flagged = metrics.cell_metrics(_gens(v, _fire), v, "baseline-x", DETECTORS, FORMAT_CHECKS, kl, {})
    table = metrics.table2(rows, flagged, v, "baseline-x", {7: 0.42})
    atom = next(r for r in table if r["kind"] == "atom")
    assert atom["coherence"] == 0.42 and atom["base_rate"] == 0.3 and atom["alpha0_rate"] == 0.3
    assert atom["best_up_variant"] == "atom7-toward-a2" and atom["best_down_variant"] == "atom7-away-a1"
    assert atom["best_down_rate"] == 0.0
    assert atom["recommended_alpha_toward"] == 1.0 and atom["recommended_alpha_away"] == 1.0
    # goal: away-a1 moves -30 pp within the KL budget; the random control at away-a1 does not move
    assert atom["goal_met"] and atom["goal_variant"] == "atom7-away-a1" and atom["goal_random_delta_pp"] == 0.0
    rnd = next(r for r in table if r["kind"] == "random")
    assert not rnd["goal_met"]


def test_plan_who_answers_what():
    from ga_ray.evaluate.prompts import PromptRow
    from ga_ray.evaluate.stage import plan

    sets = {b: [PromptRow(f"{b}-000", b, "invite", "p")] for b in ("bullets", "code")}
    vs = [{"name": "baseline-1", "kind": "baseline"}, {"name": "atom7-toward-a2-x", "kind": "atom", "behaviour": "bullets"},
          {"name": "atom7-toward-a10-x", "kind": "atom", "behaviour": "bullets"}, {"name": "group3-toward-a1-x", "kind": "group", "behaviour": None},
          {"name": "atom9-away-a2-x", "kind": "atom", "behaviour": "numbered"}]
    meta, ref, asked = plan(vs, sets)
    assert ref == "baseline-1" and asked["baseline-1"] == ["bullets", "code"] and asked["base"] == asked["finetuned"] == ["bullets", "code"]
    assert asked["atom7-toward-a2-x"] == ["bullets"] and asked["group3-toward-a1-x"] == ["bullets", "code"]
    assert "atom9-away-a2-x" not in asked  # no prompt set for its behaviour here
    _, _, asked = plan(vs, sets, ["*-a2-*"], ["base"])
    assert set(asked) == {"baseline-1", "atom7-toward-a2-x", "base"}
    _, ref, asked = plan(vs[1:2], sets, (), ())
    assert ref == "finetuned" and asked["finetuned"] == ["bullets", "code"]


def test_finished_requests_are_reused_only_for_the_same_requests(tmp_path):
    from ga_ray.config import RunConfig
    from ga_ray.evaluate.prompts import PromptRow
    from ga_ray.evaluate.stage import parts_key

    sets = {"bullets": [PromptRow("b-000", "bullets", "invite", "List fruits.")]}
    cfg = RunConfig()
    k = parts_key(cfg, tmp_path, sets, [])
    assert parts_key(RunConfig(), tmp_path, sets, []) == k
    assert parts_key(RunConfig.model_validate({"evaluation": {"max_tokens": 50}}), tmp_path, sets, []) != k
    other = {"bullets": [PromptRow("b-000", "bullets", "invite", "List vegetables.")]}
    assert parts_key(cfg, tmp_path, other, []) != k
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert parts_key(cfg, tmp_path, sets, []) != k  # a new fine-tune: `finetuned` answers differently
