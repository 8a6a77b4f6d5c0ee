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
    assert a["where"] == "1 worker, in the driver"  # 64 documents on one CPU worker: the stage runs in the driver
    a_b = r["1 worker, in the driver, steady"]["ours/loop (goal>=1.5)"]
    assert np.isclose(a_b, a["steady_docs_per_s"] / result["b_paper"]["docs_per_s"])
    assert np.isclose(a["startup_s"], a["wall_s"] - a["compute_s"]) and a["compute_s"] > 0
    assert result["imports_s"] >= 0  # transformers and peft, imported before the stage (0 when already imported)


def test_bench_in_process_part_without_ray():
    """With no actors the bench runs only its in-process methods (no Ray): ours, the reference pass,
    the loop and the training step, their ratios, and the profile tables."""
    from ga_ray.bench.gradients import main

    result = main(quick=True, actors=[], reps=1, memory=False, profile=True)
    assert result["a_stage"] == [] and result["world"]["n_docs"] == 64
    r = {row["a"]: row for row in result["ratios"]}
    c = result["c_train"]["docs_per_s"]
    assert np.isclose(r["in-process, no Ray"]["ours/step (goal>=0.9)"], result["a_inproc"]["docs_per_s"] / c)
    assert np.isclose(r["in-process, reference pass"]["ours/loop (goal>=1.5)"], result["a_reference"]["docs_per_s"] / result["b_paper"]["docs_per_s"])
    assert set(result["profiles"]) == {"ours", "reference pass", "training step"}
    for top in result["profiles"].values():
        assert top and all(0 < row["share"] <= 1 for row in top)


def test_memory_table_measures_both_modes_in_fresh_processes():
    """Extraction and the training step are measured for the same tiny model, each in its own
    process; the raw per-document gradients of the batch are accounted by shape."""
    from ga_ray.bench.gradients import memory_table

    (row,) = memory_table([{"vocab": 128, "layers": 1, "r": 4, "seq": 16, "hidden": 40, "batch": 4}])
    assert row["lora_params"] == 1 * 2 * 4 * (40 + 40)  # q_proj and v_proj: r·(d_in + d_out) each
    assert row["raw_grads_mb"] == round(4 * row["lora_params"] * 4 / 2**20, 2)
    assert row["model_rss_mb"] > 50  # torch + the model are resident
    assert row["train_mb"] >= 0 and row["extract_mb"] >= 0
