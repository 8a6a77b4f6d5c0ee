"""gradients stage: z of every document against an independent reference, plain-pyarrow output,
exactly-once under an actor kill, non-finite exclusion.

The reference is written out here on purpose, sharing nothing with the code under test: one
document at a time, unpadded, `torch.autograd.grad` of the summed response-token cross-entropy
with respect to the LoRA weights, then `(Q_Sᵀ G Q_A)[selected] / sqrt(λ_sel + ε)` in float64 from
the raw arrays of `factors.safetensors`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_tiny_run

from ga_ray.config import load_config
from ga_ray.gradients.actor import FAULT_ENV
from ga_ray.gradients.stage import INFO_FILE
from ga_ray.gradients.io import column_to_numpy
from ga_ray.pipeline import run_pipeline
from ga_ray.rundir import RunDir

N_DOCS = 24
TOP_K = 10


# ------------------------------------------------------------------------------------ the tiny world
def _load_model(model_path: Path, adapter: Path):
    from ga_ray.config import ModelConfig
    from ga_ray.kernel.loading import load_lora_model

    return load_lora_model(ModelConfig(path=str(model_path), dtype="float32"), adapter)


def _rows(data_dir: Path) -> list[dict]:
    return pq.read_table(data_dir / "part-00000.parquet").to_pylist()


def _write_factors(model, rows: list[dict], out: Path) -> None:
    """EKFAC factors of the tiny world, computed in-process with the factors machinery."""
    from ga_ray.kernel.collate import collate
    from ga_ray.factors.compute import FactorSettings, compute_factors
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    blocks = find_lora_blocks(model)
    batches = lambda: (collate(rows[i : i + 6]) for i in range(0, len(rows), 6))  # noqa: E731
    factors = compute_factors(model, blocks, batches, FactorSettings(fisher="empirical", top_k=TOP_K))
    out.mkdir(parents=True, exist_ok=True)
    factors.save(out)


def _config(paths: dict[str, Path], *extra: str):
    return load_config(
        None,
        [
            f"model.path={paths['model']}",
            f"model.adapter={paths['adapter']}",
            "model.dtype=float32",
            "finetune.enabled=false",
            "gradients.batch_size=4",
            "gradients.max_tokens_per_batch=48",
            "gradients.window_docs=8",
            "gradients.cpus_per_worker=1",
            "ray.execution_no_progress_timeout_s=120",
            *extra,
        ],
    )


def _reference(model, factors_dir: Path, rows: list[dict]) -> dict[int, dict]:
    """Per document: raw gradient (block order), loss, and z, the slow obvious way."""
    from safetensors.numpy import load_file

    info = json.loads((factors_dir / "factors.json").read_text())
    tensors = load_file(str(factors_dir / "factors.safetensors"))
    names = info["block_order"]
    eps = float(info["epsilon"])
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    for w in weights:
        w.requires_grad_(True)
    out = {}
    for r in rows:
        ids = torch.tensor(r["input_ids"], dtype=torch.long)[None]
        mask = torch.tensor(r["loss_mask"], dtype=torch.bool)
        logits = model(input_ids=ids).logits[0].double()
        ce = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        loss = (ce * mask[1:]).sum()
        grads = torch.autograd.grad(loss, weights)
        zs, raws = [], []
        for name, g in zip(names, grads):
            G = g.detach().double().numpy()
            QS, QA = tensors[f"{name}.Q_S"].astype(np.float64), tensors[f"{name}.Q_A"].astype(np.float64)
            sel = tensors[f"{name}.selected"]
            if info["eigenvalues"] == "ekfac":
                lam = tensors[f"{name}.Lambda"].reshape(-1)[sel]
            else:
                lam = np.outer(tensors[f"{name}.lambda_S"], tensors[f"{name}.lambda_A"]).reshape(-1)[sel]
            zs.append((QS.T @ G @ QA).reshape(-1)[sel] / np.sqrt(lam + eps))
            raws.append(G.reshape(-1))
        raw = np.concatenate(raws)
        out[int(r["doc_id"])] = {"z": np.concatenate(zs), "raw": raw, "loss": float(loss.detach()), "norm": float(np.linalg.norm(raw))}
    for w in weights:
        w.requires_grad_(False)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gradworld")
    paths = write_tiny_run(root, n_docs=N_DOCS)
    model = _load_model(paths["model"], paths["adapter"])
    rows = _rows(paths["data"])
    _write_factors(model, rows, paths["run"] / "factors")
    ref = _reference(model, paths["run"] / "factors", rows)
    return {"paths": paths, "rows": rows, "ref": ref, "model": model}


def _fresh_run(world, name: str) -> RunDir:
    """A new run directory sharing the world's data/ and factors/."""
    root = world["paths"]["run"].parent / name
    root.mkdir()
    for sub in ("data", "factors"):
        shutil.copytree(world["paths"]["run"] / sub, root / sub)
    rd = RunDir(root)
    for stage in ("prepare", "factors"):  # built by the fixture: recorded as done, or the runner refuses to read them
        rd.mark_done(stage, rd.mark_running(stage, f"fixture-{stage}", {}), {"line": "built by the test fixture"})
    return rd


def _read(gdir: Path) -> pa.Table:
    """gradients/ with plain pyarrow: the folder reads as one table (its _gradients.json is skipped)."""
    return pq.read_table(gdir).sort_by("doc_id")


def _check_against_reference(gdir: Path, ref: dict[int, dict], *, expect_ids: list[int], raw: bool = False) -> None:
    t = _read(gdir)
    ids = t.column("doc_id").to_numpy()
    assert ids.tolist() == sorted(expect_ids), "every document exactly once"
    Z = column_to_numpy(t.column("z"))
    D = len(next(iter(ref.values()))["z"])
    assert Z.shape == (len(expect_ids), D) and Z.dtype == np.float32
    for row, d in enumerate(ids.tolist()):
        zr = ref[d]["z"]
        assert np.linalg.norm(Z[row] - zr) <= 1e-4 * np.linalg.norm(zr), (d, np.abs(Z[row] - zr).max())
        assert np.abs(Z[row] - zr).max() <= 1e-4 * np.abs(zr).max()
    np.testing.assert_allclose(t.column("loss").to_numpy(), [ref[d]["loss"] for d in ids], rtol=1e-5)
    np.testing.assert_allclose(t.column("grad_norm").to_numpy(), [ref[d]["norm"] for d in ids], rtol=1e-5)
    if raw:
        R = column_to_numpy(t.column("raw"))
        assert R.dtype == np.float16
        for row, d in enumerate(ids.tolist()):
            np.testing.assert_allclose(R[row].astype(np.float64), ref[d]["raw"], rtol=2e-3, atol=1e-4)


# ------------------------------------------------------------------------------ compute, without Ray
def test_computer_matches_reference_without_ray(world):
    from ga_ray.gradients.actor import load_computer

    paths = world["paths"]
    cfg = _config(paths)
    comp = load_computer(cfg.model, paths["adapter"], paths["run"] / "factors", device="cpu", max_docs=4, max_tokens=48, store_raw=True)
    rows = world["rows"][:10]
    res = comp.run({k: [r[k] for r in rows] for k in ("doc_id", "input_ids", "loss_mask")})
    assert res.finite.all()
    for i, r in enumerate(rows):
        ref = world["ref"][r["doc_id"]]
        np.testing.assert_allclose(res.z[i], ref["z"], rtol=1e-4, atol=1e-4 * np.abs(ref["z"]).max())
        np.testing.assert_allclose(res.raw[i].astype(np.float64), ref["raw"], rtol=2e-3, atol=1e-4)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    assert res.padding.real_tokens == lengths.sum()
    assert (res.padded_len >= lengths).all() and (res.padded_len <= 48).all()


# ------------------------------------------------------------------------------------ the Ray stage
@pytest.mark.slow
def test_stage_z_equals_reference_and_plain_pyarrow_reads_it(world, ray_session):
    rd = _fresh_run(world, "run_main")
    cfg = _config(world["paths"], "gradients.num_workers=1", "gradients.in_driver_max_docs=0")  # the actor pool
    summary = run_pipeline(cfg, rd, stages=["gradients"])["gradients"]
    gdir = rd.root / "gradients"
    ids = [r["doc_id"] for r in world["rows"]]
    _check_against_reference(gdir, world["ref"], expect_ids=ids)

    info = json.loads((gdir / INFO_FILE).read_text())
    D = len(world["ref"][0]["z"])
    assert (info["N"], info["D"], info["n_documents"], info["n_excluded_nonfinite"]) == (N_DOCS, D, N_DOCS, 0)
    assert info["real_tokens"] == sum(len(r["input_ids"]) for r in world["rows"])
    assert 0 <= info["padding_fraction"] < info["padding_fraction_naive"]
    # the start-up breakdown: every actor's imports + model load, its process start, its writes, all measured
    assert info["actor_init_s"] > 0 and info["actor_boot_s"] > 0 and info["actor_write_s"] > 0
    assert info["actor_init_s"] + info["actor_compute_s"] < info["wall_time_s"] * info["num_actors"]
    assert summary["N"] == N_DOCS and "line" in summary
    manifest = json.loads((rd.root / "manifest.json").read_text())
    assert manifest["stages"]["gradients"]["status"] == "done"
    assert manifest["stages"]["gradients"]["summary"]["n_excluded_nonfinite"] == 0
    assert not [p for p in rd.root.iterdir() if p.name.startswith(".gradients")], "no temp folder left behind"

    # plain pyarrow in a fresh interpreter, no Ray imported, gets (N, D) from the native tensor type
    code = (
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n"
        f"t = pq.read_table({str(gdir)!r})\n"
        "assert isinstance(t.schema.field('z').type, pa.FixedShapeTensorType), t.schema.field('z').type\n"
        "z = t.column('z').combine_chunks().to_numpy_ndarray()\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)\n"
        "print(z.shape[0], z.shape[1], t.column('doc_id').type)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(N_DOCS), str(D), "int64"]


@pytest.mark.slow
def test_few_documents_on_one_cpu_worker_run_in_the_driver(world, ray_session, monkeypatch):
    """Up to `in_driver_max_docs` documents on one CPU worker: the same pass in the driver, no actor pool
    (Ray Data's map_batches is never called), the same gradients and report, and torch's threads restored."""
    import ray.data
    import torch

    def no_pool(*a, **k):
        raise AssertionError("an actor pool was started for a small run")

    monkeypatch.setattr(ray.data.Dataset, "map_batches", no_pool)
    threads = torch.get_num_threads()
    rd = _fresh_run(world, "run_driver")
    cfg = _config(world["paths"], "gradients.num_workers=1", "gradients.window_docs=7", f"gradients.in_driver_max_docs={N_DOCS}")
    summary = run_pipeline(cfg, rd, stages=["gradients"])["gradients"]
    assert torch.get_num_threads() == threads
    gdir = rd.root / "gradients"
    _check_against_reference(gdir, world["ref"], expect_ids=[r["doc_id"] for r in world["rows"]])
    info = json.loads((gdir / INFO_FILE).read_text())
    assert info["in_driver"] is True and info["num_actors"] == 0 and info["N"] == N_DOCS
    assert info["actor_boot_s"] == 0 and info["actor_init_s"] > 0 and info["actor_write_s"] > 0
    assert [a["actor_id"] for a in info["actors"]] == ["driver"] and len(info["files"]) == -(-N_DOCS // 7)
    assert "in the driver" in summary["line"]


@pytest.mark.slow
def test_actor_killed_mid_run_every_document_once(world, ray_session, monkeypatch, tmp_path):
    """An actor dies (os._exit) right after writing its first window's file: Ray restarts it and
    retries the window; the orphaned file is dropped and every document is written exactly once."""
    rd = _fresh_run(world, "run_kill")
    flag = tmp_path / "killed.flag"
    monkeypatch.setenv(FAULT_ENV, str(flag))
    cfg = _config(world["paths"], "gradients.num_workers=2", "gradients.store_raw=true", "gradients.window_docs=6")
    run_pipeline(cfg, rd, stages=["gradients"])
    assert flag.exists(), "the fault was injected (an actor died)"
    info = json.loads((rd.root / "gradients" / INFO_FILE).read_text())
    assert info["orphan_files_removed"] >= 1
    _check_against_reference(rd.root / "gradients", world["ref"], expect_ids=[r["doc_id"] for r in world["rows"]], raw=True)


@pytest.mark.slow
def test_nonfinite_documents_are_reported_and_excluded(world, ray_session):
    """Token 63's embedding is NaN in this copy of the base model and only docs 3 and 10 contain it:
    they are excluded and reported with their loss; every other document (some in the same batch)
    keeps its exact z."""
    paths = world["paths"]
    bad_token, bad_docs = 63, (3, 10)
    rd = _fresh_run(world, "run_nan")
    rows = []
    for r in world["rows"]:
        ids = [t if t != bad_token else bad_token - 1 for t in r["input_ids"]]
        if r["doc_id"] in bad_docs:
            ids[len(ids) // 2] = bad_token
        rows.append({**r, "input_ids": ids})
    pq.write_table(pa.Table.from_pylist(rows), rd.root / "data" / "part-00000.parquet")
    nan_model = paths["model"].parent / "base_model_nan"
    shutil.copytree(paths["model"], nan_model)
    from safetensors.torch import load_file, save_file

    st = nan_model / "model.safetensors"
    w = load_file(str(st))
    key = next(k for k in w if k.endswith("embed_tokens.weight"))
    w[key][bad_token] = float("nan")
    save_file(w, str(st), metadata={"format": "pt"})

    cfg = _config({**paths, "model": nan_model}, "gradients.num_workers=1")
    summary = run_pipeline(cfg, rd, stages=["gradients"])["gradients"]
    gdir = rd.root / "gradients"
    info = json.loads((gdir / INFO_FILE).read_text())
    assert info["n_excluded_nonfinite"] == 2 and info["N"] == N_DOCS - 2
    assert [e["doc_id"] for e in info["excluded_nonfinite"]] == list(bad_docs)
    assert all(e["loss"] == "nan" for e in info["excluded_nonfinite"])
    assert summary["excluded_doc_ids"] == list(bad_docs)
    manifest = json.loads((rd.root / "manifest.json").read_text())
    assert manifest["stages"]["gradients"]["summary"]["n_excluded_nonfinite"] == 2

    # the clean model gives the same gradients as the NaN model on documents without the bad token
    good = [r for r in rows if r["doc_id"] not in bad_docs]
    ref = _reference(world["model"], rd.root / "factors", good)
    _check_against_reference(gdir, ref, expect_ids=[r["doc_id"] for r in good])


def test_missing_inputs_and_bad_settings_are_clear_errors(tmp_path):
    from ga_ray.gradients.stage import run_gradients
    from ga_ray.pipeline import StageContext, StageError

    rd = RunDir(tmp_path / "run")
    cfg = load_config(None, [f"model.adapter={tmp_path / 'adapter'}", "finetune.enabled=false"])

    def ctx(c):
        return StageContext(cfg=c, run_dir=rd, stage="gradients", out=rd.root / "gradients")

    with pytest.raises(StageError, match="run the prepare stage"):
        run_gradients(ctx(cfg))
    (rd.root / "data").mkdir()
    pq.write_table(pa.table({"doc_id": [0], "n_tokens": [3]}), rd.root / "data" / "part-00000.parquet")
    with pytest.raises(StageError, match="run the factors stage"):
        run_gradients(ctx(cfg))
    (rd.root / "factors").mkdir()
    (rd.root / "factors" / "factors.json").write_text("{}")
    with pytest.raises(StageError, match="adapter folder"):
        run_gradients(ctx(cfg))
    bad = load_config(None, ["gradients.window_docs=4", "gradients.batch_size=8"])
    with pytest.raises(StageError, match="window_docs"):
        run_gradients(ctx(bad))
