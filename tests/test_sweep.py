"""Sparsity sweep on tiny data: one row per α, counts from the refitted codes, coherence from raw gradients."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest


def write_gradients(run: Path, doc_ids: np.ndarray, D: int = 10, seed: int = 0) -> None:
    """A gradients/ folder (the gradients stage's format) with three clusters of directions."""
    from ga_ray.gradients.io import gradients_table

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, D))
    z = centres[np.arange(len(doc_ids)) % 3] + 0.3 * rng.normal(size=(len(doc_ids), D))
    n = len(doc_ids)
    t = gradients_table(doc_ids, z.astype(np.float32), np.ones(n), np.ones(n), np.full(n, 10))
    (run / "gradients").mkdir(parents=True, exist_ok=True)
    pq.write_table(t, run / "gradients" / "part-00000.parquet")


def test_sweep_needs_stored_gradients(tmp_path):
    from ga_ray.coherence.sweep import run_sweep
    from ga_ray.config import load_config
    from ga_ray.pipeline import StageError
    from ga_ray.rundir import RunDir

    with pytest.raises(StageError, match="gradients"):
        run_sweep(load_config(None, []), RunDir(tmp_path / "run"), [0.1])
    rec = RunDir(tmp_path / "run").stage_record("sweep")  # recorded like a stage: it ran, and failed
    assert rec["status"] == "failed" and "gradients" in rec["error"] and rec["fingerprint"] and rec["inputs"]["alphas"] == [0.1]
    with pytest.raises(StageError, match="alphas"):
        run_sweep(load_config(None, []), RunDir(tmp_path / "run"), [])


def test_sweep_fingerprint_follows_its_inputs(tmp_path):
    from ga_ray.coherence.sweep import sweep_fingerprint
    from ga_ray.config import load_config
    from ga_ray.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    base = load_config(None, [])
    fp, _ = sweep_fingerprint(base, rd, [0.1, 1.0])
    assert fp == sweep_fingerprint(load_config(None, ["report.top_atoms=3", "gradients.batch_size=3"]), rd, [0.1, 1.0])[0]  # not read
    assert fp != sweep_fingerprint(base, rd, [0.1, 2.0])[0]
    assert fp != sweep_fingerprint(load_config(None, ["coherence.top_docs=7"]), rd, [0.1, 1.0])[0]
    assert fp != sweep_fingerprint(load_config(None, ["dictionary.n_atoms=9"]), rd, [0.1, 1.0])[0]
    t0 = rd.mark_running("gradients", "abc", {})
    rd.mark_done("gradients", t0, {})
    assert fp != sweep_fingerprint(base, rd, [0.1, 1.0])[0]  # a new gradients run: a new sweep


@pytest.mark.slow
def test_sweep_on_tiny_data(ray_session, tmp_path):
    """Each α is fitted by the atoms stage's own entry point (`run_atoms`) on the stored gradients;
    counts come from the refitted codes, coherence equals a dense brute force on raw gradients."""
    from conftest import make_tiny_lora_model, write_tiny_run
    from test_coherence import _dense_raw_gradients

    from ga_ray.coherence.coherence import dense_coherence
    from ga_ray.coherence.sweep import run_sweep
    from ga_ray.config import load_config
    from ga_ray.kernel.lora_blocks import find_lora_blocks
    from ga_ray.rundir import RunDir

    K, top_n = 5, 6
    paths = write_tiny_run(tmp_path, n_docs=24, seed=4)
    data = pq.read_table(paths["data"])
    doc_ids = data.column("doc_id").to_numpy()
    write_gradients(paths["run"], doc_ids, seed=4)
    cfg = load_config(
        None,
        [
            f"model.path={paths['model']}",
            f"model.adapter={paths['adapter']}",
            "finetune.enabled=false",
            f"dictionary.n_atoms={K}",
            "dictionary.batch_size=8",
            "dictionary.max_epochs=3",
            f"coherence.top_docs={top_n}",
            "coherence.batch_size=4",
        ],
    )
    alphas = [0.05, 0.3, 50.0]
    rows = run_sweep(cfg, RunDir(paths["run"]), alphas)
    assert [r["alpha"] for r in rows] == alphas and [r["n_atoms"] for r in rows] == [K] * 3

    model = make_tiny_lora_model(seed=4)
    G = _dense_raw_gradients(model, find_lora_blocks(model), data.to_pylist())
    pos = {int(d): i for i, d in enumerate(doc_ids)}
    for r in rows:
        folder = paths["run"] / r["atoms_dir"]
        assert (folder / "dictionary.safetensors").exists() and r["objective"] is not None
        codes = pq.read_table(folder / "codes.parquet").to_pandas()
        per_atom = np.bincount(codes.atom[codes.coef != 0], minlength=K)
        assert r["median_docs_per_atom"] == float(np.median(per_atom))
        assert r["dead_atoms"] == int((per_atom == 0).sum())
        for k in range(K):  # coherence of each atom: dense brute force over its oriented top documents
            sub = codes[codes.atom == k]
            oc = sub.coef * (-1.0 if sub.coef.sum() < 0 else 1.0)
            top = sub.assign(oc=oc)[oc > 0].sort_values(["oc", "doc_id"], ascending=[False, True]).doc_id.tolist()[:top_n]
            got = r["coherence"][k]
            if len(top) < 2:
                assert got is None
            else:
                assert abs(got - dense_coherence(G, [[pos[d] for d in top]])[0]) < 1e-5
        c = np.array([x for x in r["coherence"] if x is not None])
        assert r["atoms_coherence_gt_0.1"] == int((c > 0.1).sum()) and r["atoms_coherence_gt_0.5"] == int((c > 0.5).sum())
    assert sum(x is not None for x in rows[0]["coherence"]) >= 3  # the comparison above was not vacuous
    # sparser with larger α; at a huge α every code is zero (the paper's α = 1.0 row)
    assert rows[0]["median_docs_per_atom"] >= rows[1]["median_docs_per_atom"] > 0
    assert rows[2]["median_docs_per_atom"] == 0 and rows[2]["atoms_coherence_gt_0.1"] == 0 and rows[2]["dead_atoms"] == K

    report = paths["run"] / "report"
    saved = json.loads((report / "sweep.json").read_text())
    assert [r["alpha"] for r in saved["rows"]] == alphas
    with open(report / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(t["alpha"]) for t in table] == alphas and table[1]["atoms_coherence_gt_0.1"] == str(rows[1]["atoms_coherence_gt_0.1"])
    assert not (paths["run"] / "atoms").exists()  # the run's own atoms are never touched
    rec = RunDir(paths["run"]).stage_record("sweep")  # in the manifest like a stage
    assert rec["status"] == "done" and rec["wall_time_s"] > 0 and rec["fingerprint"]
    assert [r["alpha"] for r in rec["summary"]["rows"]] == alphas and rec["summary"]["line"].startswith("atoms with coherence")
