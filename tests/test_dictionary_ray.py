"""atoms stage over Ray: worker parity, resume after a kill, the stage's outputs (both backends)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ga_ray.config import load_config
from ga_ray.atoms.synthetic import planted_atoms, recovery
from ga_ray.gradients.io import gradients_table


def write_gradients(root: Path, n: int = 480, dim: int = 48, n_atoms: int = 12, files: int = 3, row_group: int = 70, seed: int = 0):
    """A gradients/ folder of planted-atom rows with random norms (several files and row groups)."""
    X, T, _ = planted_atoms(n, dim, n_atoms, seed=seed)
    Z = X * np.random.default_rng(seed + 1).uniform(0.2, 5.0, size=(n, 1)).astype(np.float32)
    g = root / "gradients"
    g.mkdir(parents=True, exist_ok=True)
    per = -(-n // files)
    for i, s in enumerate(range(0, n, per)):
        e = min(n, s + per)
        t = gradients_table(np.arange(s, e) + 1000, Z[s:e], np.linalg.norm(Z[s:e], axis=1), np.ones(e - s), np.full(e - s, 7))
        pq.write_table(t, g / f"part-{i:05d}.parquet", row_group_size=row_group)
    return g, T, Z


def _cfg(*overrides: str):
    base = [
        "dictionary.n_atoms=12",
        "dictionary.batch_size=48",
        "dictionary.max_epochs=3",
        "dictionary.heldout_fraction=0.1",
        "dictionary.eval_every=4",
        "dictionary.tol=0",
        "dictionary.kmeans_clusters=null",
        "dictionary.shuffle_buffer_mb=0.03",  # windows of ~160 rows: several windows per epoch
        "dictionary.seed=5",
        "dictionary.in_driver_mb=0",  # the Ray actors (the in-driver coder has its own test below)
    ]
    return load_config(None, base + list(overrides))


def test_one_and_two_ray_workers_follow_the_same_trajectory(ray_session, tmp_path):
    from ga_ray.atoms.stage import fit_torch

    g, _, _ = write_gradients(tmp_path, n=320)
    r1, plan = fit_torch(g, _cfg("dictionary.num_workers=1", "dictionary.max_epochs=2").dictionary, 5, progress=False)
    r2, _ = fit_torch(g, _cfg("dictionary.num_workers=2", "dictionary.max_epochs=2").dictionary, 5, progress=False)
    assert r1.steps == r2.steps == 2 * plan.steps_per_epoch
    assert len(plan.windows(0)) > 1
    torch.testing.assert_close(r1.state.D, r2.state.D, atol=1e-5, rtol=0)
    torch.testing.assert_close(r1.state.A, r2.state.A, atol=1e-5, rtol=1e-5)
    assert [h["step"] for h in r1.history] == [h["step"] for h in r2.history]
    np.testing.assert_allclose([h["objective"] for h in r1.history], [h["objective"] for h in r2.history], rtol=1e-5)


@pytest.mark.slow
def test_resume_after_kill_equals_unbroken_stage_fit(ray_session, tmp_path):
    from ga_ray.atoms.io import load_checkpoint
    from ga_ray.atoms.stage import fit_torch

    g, _, _ = write_gradients(tmp_path)
    cfg = _cfg("dictionary.checkpoint_every=5", "dictionary.tol=1e-3", "dictionary.patience=2").dictionary
    unbroken, _ = fit_torch(g, cfg, 5, progress=False)

    class Killed(Exception):
        pass

    def kill(state, res):
        if state.step == 12:
            raise Killed

    out = tmp_path / "atoms"
    out.mkdir()
    with pytest.raises(Killed):
        fit_torch(g, cfg, 5, out_dir=out, on_step=kill, progress=False)
    _, prog = load_checkpoint(out)
    assert prog["counters"]["step"] == 10
    resumed, _ = fit_torch(g, cfg, 5, out_dir=out, progress=False)
    assert resumed.steps == unbroken.steps
    assert torch.equal(resumed.state.D, unbroken.state.D)
    # a checkpoint from other settings is not used
    steps_seen: list[int] = []
    fit_torch(g, cfg.model_copy(update={"alpha": 0.2}), 5, out_dir=out, on_step=lambda s, r: steps_seen.append(s.step), progress=False)
    assert steps_seen[0] == 1  # started from scratch


def _run_stage(tmp_path: Path, *overrides: str):
    from ga_ray.atoms.stage import run_atoms
    from ga_ray.pipeline import StageContext
    from ga_ray.rundir import RunDir

    cfg = _cfg(*overrides)
    rd = RunDir(tmp_path / "run")
    out = rd.stage_dir("atoms")
    out.mkdir(parents=True, exist_ok=True)
    summary = run_atoms(StageContext(cfg=cfg, run_dir=rd, stage="atoms", out=out))
    return summary, out


@pytest.mark.slow
def test_stage_writes_dictionary_codes_metrics_kmeans_and_stability(ray_session, tmp_path):
    from ga_ray.atoms.io import read_dictionary

    g, T, Z = write_gradients(tmp_path / "run")
    summary, out = _run_stage(tmp_path, "dictionary.kmeans_clusters=4", "dictionary.n_seeds=2", "dictionary.max_epochs=8")
    assert "line" in summary and "objective" in summary["line"]
    D = read_dictionary(out / "dictionary.safetensors")
    assert D.shape == (12, 48) and D.dtype == torch.float32
    assert float(torch.linalg.vector_norm(D, dim=1).max()) <= 1 + 1e-5
    assert recovery(D.numpy(), T, 0.9) >= 0.5  # learned something real (full recovery: test_dictionary.py)
    codes = pq.read_table(out / "codes.parquet")
    assert [f.name for f in codes.schema] == ["doc_id", "atom", "coef"]
    assert str(codes.schema.field("atom").type) == "int32"
    assert set(np.unique(codes.column("doc_id").to_numpy())) <= set(range(1000, 1480))
    assert (codes.column("coef").to_numpy() != 0).all()
    m = json.loads((out / "metrics.json").read_text())
    for key in ("objective", "fvu", "l0_per_doc", "docs_per_atom_median", "dead_atoms", "mutual_coherence", "timings_s", "training"):
        assert key in m
    assert m["n_docs"] == 480 and 0 < m["fvu"] < 1
    assert f"{m['training']['steps']} steps of {m['training']['batch_size']} rows" in summary["line"]  # the resolved batch
    assert m["l0_per_doc"]["mean"] == pytest.approx(codes.num_rows / 480)
    # the stored codes reproduce the objective: ½‖x − cD‖² + α‖c‖₁ averaged over documents
    X = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    C = np.zeros((480, 12))
    C[codes.column("doc_id").to_numpy() - 1000, codes.column("atom").to_numpy()] = codes.column("coef").to_numpy()
    obj = (0.5 * ((X - C @ D.numpy()) ** 2).sum() + 0.1 * np.abs(C).sum()) / 480
    assert m["objective"] == pytest.approx(obj, rel=1e-4)
    km = pq.read_table(out / "kmeans.parquet")
    assert km.num_rows == 480 and set(km.column("cluster").to_numpy()) <= set(range(4))
    st = m["stability"]
    assert st["n_seeds"] == 2 and 0 <= st["share_above_0.9"] <= st["share_above_0.7"] <= 1
    assert not (out / "checkpoint").exists()


@pytest.mark.slow
def test_sklearn_backend_has_the_same_outputs(ray_session, tmp_path):
    write_gradients(tmp_path / "run", n=200, dim=24, n_atoms=6)
    summary, out = _run_stage(tmp_path, "dictionary.backend=sklearn", "dictionary.n_atoms=6", "dictionary.sklearn_max_iter=5")
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "sklearn" and m["n_docs"] == 200
    assert (out / "codes.parquet").exists() and (out / "dictionary.safetensors").exists()


def test_encoding_in_the_driver_equals_the_actor_pool(ray_session, tmp_path):
    """Small gradients are coded in the driver (`in_driver_mb`): the same codes, row for row and in
    `gradients/` order, and the same metrics as the Ray Data actor pool, over several files and batches."""
    from ga_ray.atoms.encode import encode_dataset

    g, T, _ = write_gradients(tmp_path, n=300, files=3, row_group=40)
    D = torch.from_numpy(T + 0.05 * np.random.default_rng(2).standard_normal(T.shape).astype(np.float32))
    D = D / torch.linalg.vector_norm(D, dim=1, keepdim=True)
    size = sum(f.stat().st_size for f in g.iterdir())
    kw = dict(tol=1e-6, max_iter=500, batch_size=64, cpus_per_worker=0.5)
    threads = torch.get_num_threads()
    local = encode_dataset(g, D, 0.1, codes_path=tmp_path / "local.parquet", in_driver_max_bytes=size, **kw)
    assert torch.get_num_threads() == threads  # the driver's torch threads are left as they were
    actors = encode_dataset(g, D, 0.1, codes_path=tmp_path / "actors.parquet", in_driver_max_bytes=size - 1, **kw)
    a, b = pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "actors.parquet")
    assert a.num_rows > 300 and a.column("doc_id").to_pylist() == b.column("doc_id").to_pylist()
    assert a.column("atom").to_pylist() == b.column("atom").to_pylist()
    np.testing.assert_array_equal(a.column("coef").to_numpy(), b.column("coef").to_numpy())
    assert local.keys() == actors.keys() and local["n_docs"] == actors["n_docs"] == 300
    for k, v in local.items():
        assert v == pytest.approx(actors[k], rel=1e-9, abs=1e-12), k


def test_learning_in_the_driver_follows_the_actors_trajectory(ray_session, tmp_path, monkeypatch):
    """With one worker and small gradients the learner's coder runs in the driver (`in_driver_mb`): the same
    trajectory as the Ray actor, the same steps and checks, and no actor pool is made."""
    from ga_ray.atoms import distributed
    from ga_ray.atoms.stage import fit_torch

    g, _, _ = write_gradients(tmp_path, n=320)
    with monkeypatch.context() as m:
        def no_pool(*a, **k):
            raise AssertionError("an actor pool was started for small gradients")

        m.setattr(distributed.RayPool, "__init__", no_pool)
        local, plan = fit_torch(g, _cfg("dictionary.in_driver_mb=64", "dictionary.max_epochs=2").dictionary, 5, progress=False)
    actor, _ = fit_torch(g, _cfg("dictionary.max_epochs=2").dictionary, 5, progress=False)
    assert local.steps == actor.steps == 2 * plan.steps_per_epoch
    torch.testing.assert_close(local.state.D, actor.state.D, atol=1e-5, rtol=0)
    assert [h["step"] for h in local.history] == [h["step"] for h in actor.history]
    np.testing.assert_allclose([h["objective"] for h in local.history], [h["objective"] for h in actor.history], rtol=1e-5)


def test_kmeans_in_the_driver_equals_kmeans_on_ray(ray_session, tmp_path):
    """The k-means baseline on dask's threads in the driver (small gradients) gives Ray's clusters exactly."""
    from ga_ray.atoms.kmeans import kmeans_clusters

    g, _, _ = write_gradients(tmp_path, n=300, files=3, row_group=40)
    on_ray = kmeans_clusters(g, 5, 3, max_piece_rows=50)
    local = kmeans_clusters(g, 5, 3, max_piece_rows=50, in_driver=True)
    np.testing.assert_array_equal(local["doc_ids"], on_ray["doc_ids"])
    np.testing.assert_array_equal(local["labels"], on_ray["labels"])
    assert local["inertia"] == on_ray["inertia"] and local["n_iter"] == on_ray["n_iter"]
    assert len(np.unique(local["labels"])) == 5


def test_kmeans_in_the_driver_keeps_blas_off_scikit_learns_openmp_threads(tmp_path):
    """In a fresh process (scikit-learn and scipy's BLAS not loaded yet) the in-driver k-means runs BLAS
    single-threaded inside scikit-learn's OpenMP loops: OpenBLAS warned "Detect OpenMP Loop and this
    application may hang" hundreds of times per demo run before."""
    import os
    import subprocess
    import sys

    g, _, _ = write_gradients(tmp_path, n=2000, dim=200, n_atoms=12, files=2, row_group=500)
    code = (
        "from pathlib import Path; from ga_ray.atoms.kmeans import kmeans_clusters; "
        f"r = kmeans_clusters(Path({str(g)!r}), 15, 42, in_driver=True); print(r['n_clusters'])"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "15"
    assert "Detect OpenMP Loop" not in r.stdout + r.stderr
