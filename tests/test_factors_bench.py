"""`ga-ray bench factors` in quick mode: runs, agrees with the paper-method loop, returns its figures."""

from __future__ import annotations

import json

import torch


def test_bench_factors_quick(capsys):
    from ga_ray.bench.factors import main

    threads = torch.get_num_threads()
    try:
        out = main(quick=True, threads=1, n_docs=24, loop_docs=6)
    finally:
        torch.set_num_threads(threads)
    json.dumps(out)  # JSON-serialisable
    g = out["per_doc_grads"]
    assert g["batched_docs_per_s"] > 0 and g["loop_docs_per_s"] > 0
    assert g["ratio"] == g["batched_docs_per_s"] / g["loop_docs_per_s"]
    assert g["max_rel_diff_vs_loop"] < 1e-5, "the two methods compute the same gradients"
    assert out["n_docs"] == 24 and 0 <= out["padding_fraction"] < 0.5
    assert {"covariance_pass_s", "eigendecomposition_s", "lambda_pass_s"} <= set(out["factors_in_process"])
    printed = capsys.readouterr().out
    assert "one backward per doc (paper)" in printed and "EKFAC factors over 24 docs" in printed



def test_stage_runs_force_ray_train_beside_the_one_worker_default_and_labels_say_where():
    """With one worker the stage's default runs in the driver (`factors.in_driver_max_docs`), so the bench
    adds a run with Ray Train forced; each row is labelled with where it computed. (The forcing itself,
    `in_driver_max_docs=0`, is `WorkerPlan.runs_in_driver`'s rule, tested in test_resources.py; the bench
    raises if a forced run ever reports the driver.)"""
    from ga_ray.bench.factors import stage_label, stage_runs

    assert stage_runs([1, 2]) == [(1, False), (1, True), (2, False)]
    assert stage_runs([2, 1]) == [(2, False), (1, False), (1, True)]
    assert stage_runs([2]) == [(2, False)] and stage_runs([]) == []
    assert stage_label(True, 0.5) == "stage, in the driver"
    assert stage_label(False, 0.5) == "stage, Ray Train (0.5 CPU/worker)"
