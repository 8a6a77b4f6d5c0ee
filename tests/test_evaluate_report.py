"""The report's steering section from eval/ files (constructed metrics; no server)."""

from __future__ import annotations

from test_evaluate_metrics import _fire, _gens, _variants

from ga_ray.detectors import DETECTORS
from ga_ray.demo.formats import FORMAT_CHECKS
from ga_ray.evaluate import io, metrics
from ga_ray.rundir import atomic_write_json


def test_steering_section_renders_curves_table_and_same_prompt_examples(tmp_path):
    from ga_ray.report.steering import load_steering_artifacts, section_steering

    v = _variants()
    kl = {(n, "bullets"): (0.05 if n.endswith("a1") else 0.5) for n in v}
    rows, flagged = metrics.cell_metrics(_gens(v, _fire), v, "baseline-x", DETECTORS, FORMAT_CHECKS, kl, {})
    table = metrics.table2(rows, flagged, v, "baseline-x", {7: 0.42})
    out = tmp_path / "eval"
    io.write_table(out / io.GENERATIONS, [{**g, "prompt": f"prompt {g['prompt_id']}"} for g in flagged])
    io.write_table(out / io.METRICS, rows, csv=True)
    io.write_table(out / io.TABLE2, table, csv=True)
    atomic_write_json(out / io.SUMMARY, {"reference": "baseline-x", "generations": len(flagged), "failed": 1, "model_ids": len(v),
                                         "goal": {"n_met": 1, "n_behaviours": 1, "behaviours_met": ["bullets"], "delta_pp": 14, "p": 0.01}})
    art = load_steering_artifacts(tmp_path)
    figs: dict[str, bytes] = {}
    html = section_steering(art, tmp_path / "report", figs)
    assert len(figs) == 1 and next(iter(figs.values())).startswith(b"\x89PNG")
    assert "Table 2" in html and "atom 7" in html and "best ↑ (held out)" in html
    # the example pairs show the baseline's and the variant's answer to the same prompt, side by side
    assert "prompt b0" in html and "steered answer (same prompt)" in html
    assert load_steering_artifacts(tmp_path / "nothing") is None
    assert "No steering evaluation" in section_steering(None, tmp_path, {})
