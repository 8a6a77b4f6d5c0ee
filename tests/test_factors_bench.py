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


def test_bench_factors_stage_rows_say_where_the_stage_ran(ray_session, capsys):
    """With one worker the stage's default runs in the driver; the bench then measures Ray Train at one
    worker too (`factors.in_driver_max_docs=0`) and labels each row with where it ran."""
    from ga_ray.bench.factors import main

    threads = torch.get_num_threads()
    try:
        out = main(quick=True, threads=1, n_docs=12, loop_docs=2, workers=[1])
    finally:
        torch.set_num_threads(threads)
    stage = out["factors_stage"]
    assert set(stage) == {"1_driver", "1_train"}
    assert stage["1_driver"]["in_driver"] is True and stage["1_train"]["in_driver"] is False
    for t in stage.values():
        assert t["fit_wall_s"] > 0 and t["covariance_pass_s"] > 0
    printed = capsys.readouterr().out
    assert "stage, in the driver" in printed and "stage, Ray Train" in printed
