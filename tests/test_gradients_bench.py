"""`ga-ray bench gradients --quick` runs end to end and returns the figures it prints."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_bench_quick_returns_figures(ray_session):
    from ga_ray.bench.gradients import main

    result = main(quick=True, actors=[1], reps=1)
    json.dumps(result)  # JSON-serialisable
    w = result["world"]
    assert w["n_docs"] == 64 and w["D"] > 0 and w["lora_params"] > 0
    assert 0 <= result["padding_fraction"] < result["padding_fraction_naive"]
    for key in ("a_inproc", "b_paper", "c_train"):
        assert result[key]["docs_per_s"] > 0 and result[key]["tokens_per_s"] > 0
    (a,) = result["a_stage"]
    assert a["actors"] == 1 and a["docs_per_s"] > 0 and a["steady_docs_per_s"] >= a["docs_per_s"]
    r = {row["a"]: row for row in result["ratios"]}
    a_b = r["1 actor(s), steady"]["a/b (goal>=10)"]
    assert np.isclose(a_b, a["steady_docs_per_s"] / result["b_paper"]["docs_per_s"])


def test_memory_table_measures_both_modes_in_fresh_processes():
    """Extraction and the training step are measured for the same tiny model, each in its own
    process; the raw per-document gradients of the batch are accounted by shape."""
    from ga_ray.bench.gradients import memory_table

    (row,) = memory_table([{"vocab": 128, "layers": 1, "r": 4, "seq": 16, "hidden": 40, "batch": 4}])
    assert row["lora_params"] == 1 * 2 * 4 * (40 + 40)  # q_proj and v_proj: r·(d_in + d_out) each
    assert row["raw_grads_mb"] == round(4 * row["lora_params"] * 4 / 2**20, 2)
    assert row["model_rss_mb"] > 50  # torch + the model are resident
    assert row["train_mb"] >= 0 and row["extract_mb"] >= 0
