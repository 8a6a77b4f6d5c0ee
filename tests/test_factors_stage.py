"""The factors stage on Ray Train: 1 and 2 workers agree, match the in-process computation, NaN is named."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import write_tiny_run
from ga_ray.config import load_config
from ga_ray.factors.factors import Factors
from ga_ray.pipeline import StageContext, StageError
from ga_ray.rundir import RunDir
from test_ekfac import assert_same_factors


def _split_data(data_dir, n_files: int = 4) -> None:
    """Several Parquet files, so that both workers of a 2-worker job get documents."""
    table = pq.read_table(data_dir / "part-00000.parquet")
    (data_dir / "part-00000.parquet").unlink()
    step = -(-table.num_rows // n_files)
    for k in range(n_files):
        pq.write_table(table.slice(k * step, step), data_dir / f"part-{k:05d}.parquet")
    (data_dir / "prepare.json").write_text(json.dumps({"n_docs": table.num_rows}))  # non-Parquet files are ignored


def _run(paths, root_name: str, overrides: list[str]):
    from ga_ray.factors.stage import run_factors

    cfg = load_config(
        None, [f"model.path={paths['model']}", f"model.adapter={paths['adapter']}", "finetune.enabled=false", "factors.cpus_per_worker=0.5", *overrides]
    )
    rd = RunDir(paths["run"].parent / root_name)
    if not (rd.root / "data").exists():
        (rd.root / "data").symlink_to(paths["data"], target_is_directory=True)
    out = rd.stage_dir("factors")
    out.mkdir(parents=True, exist_ok=True)
    summary = run_factors(StageContext(cfg=cfg, run_dir=rd, stage="factors", out=out))
    return summary, out


@pytest.mark.slow
def test_one_and_two_workers_agree_with_in_process(tmp_path, ray_session, capsys):
    paths = write_tiny_run(tmp_path, n_docs=24, target_modules=("q_proj", "v_proj", "up_proj"))
    _split_data(paths["data"])
    common = ["factors.top_k=5", "factors.batch_size=4", "factors.lambda_max_docs=16", "factors.seed=3"]
    s1, out1 = _run(paths, "w1", [*common, "factors.num_workers=1"])
    printed = capsys.readouterr().out
    assert "Lambda kept" in printed and "layers.0.self_attn.q_proj.A" in printed, "the per-block table is printed"
    s2, out2 = _run(paths, "w2", [*common, "factors.num_workers=2", "factors.save_from=driver"])
    assert s1["in_driver"] and not s2["in_driver"], "one CPU worker on few documents runs in the driver, two on Ray Train"
    f1, f2 = Factors.load(out1, covariances=True), Factors.load(out2, covariances=True)
    assert f1.meta["n_docs"] == f2.meta["n_docs"] == 24, "no document dropped by the split"
    assert f1.meta["n_docs_lambda"] == f2.meta["n_docs_lambda"] == 16
    assert f2.meta["num_workers"] == 2 and min(f2.meta["docs_per_worker"]) > 0, f2.meta["docs_per_worker"]
    assert_same_factors(f1, f2, rtol=1e-6)

    # the same numbers from the plain in-process computation (LocalComm), on the same subsample
    from ga_ray.kernel.collate import collate
    from ga_ray.factors.compute import FactorSettings, compute_factors, in_subsample, subsample_threshold
    from ga_ray.kernel.loading import load_lora_model
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    cfg = load_config(None, [f"model.path={paths['model']}"])
    model = load_lora_model(cfg.model, paths["adapter"])
    blocks = find_lora_blocks(model)
    import pyarrow.dataset as pads

    rows = pads.dataset(sorted(str(f) for f in paths["data"].glob("*.parquet")), format="parquet").to_table().sort_by("doc_id").to_pylist()
    keep = in_subsample([r["doc_id"] for r in rows], 3, subsample_threshold([r["doc_id"] for r in rows], 3, 16))
    sub = [r for r, k in zip(rows, keep) if k]
    ref = compute_factors(
        model,
        blocks,
        lambda: [collate(rows[i : i + 5]) for i in range(0, len(rows), 5)],
        FactorSettings(fisher="true", seed=3, top_k=5),
        lambda_batches=lambda: [collate(sub[i : i + 3]) for i in range(0, len(sub), 3)],
    )
    assert_same_factors(f1, ref, rtol=1e-6)
    # the 2-worker Λ, all-reduced over both shards, is exactly the in-process Λ in its own eigenbasis
    from ga_ray.factors.compute import lambda_pass

    lam = lambda_pass(model, blocks, [collate(sub[i : i + 4]) for i in range(0, len(sub), 4)], {b.name: (b.Q_S, b.Q_A) for b in f2.blocks}, FactorSettings(fisher="true", seed=3))
    assert lam.n_docs == 16
    for b in f2.blocks:
        ref_lam = lam.lambdas()[b.name]
        assert (b.Lambda - ref_lam).norm() / ref_lam.norm() < 1e-6, b.name

    for s in (s1, s2):
        assert s["D"] == 5 * len(blocks) and s["n_blocks"] == len(blocks) and "line" in s
        assert {"covariance_pass_s", "eigendecomposition_s", "lambda_pass_s"} <= set(s["timings"])
        assert len(s["blocks"]) == len(blocks) and {"shape", "top lambda_A", "Lambda kept"} <= set(s["blocks"][0])
    meta = json.loads((out1 / "factors.json").read_text())
    assert meta["fisher"] == "true" and meta["eigenvalues"] == "ekfac" and meta["top_k"] == 5 and meta["epsilon"] == 1e-6


@pytest.mark.slow
def test_nan_in_factors_names_block_and_batch(tmp_path, ray_session):
    paths = write_tiny_run(tmp_path, n_docs=12)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(paths["model"])
    bad = base.config.vocab_size - 1
    with torch.no_grad():
        base.get_input_embeddings().weight[bad] = float("nan")
    base.save_pretrained(paths["model"])
    rows = pq.read_table(paths["data"]).to_pylist()
    for r in rows:
        r["input_ids"] = [t if t != bad else 5 for t in r["input_ids"]]
    rows[9]["input_ids"][0] = bad
    pq.write_table(pa.Table.from_pylist(rows), paths["data"] / "part-00000.parquet")
    with pytest.raises(StageError) as err:
        _run(paths, "nan", ["factors.batch_size=4", "factors.num_workers=1"])
    msg = str(err.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in msg
    assert re.search(r"first in worker 0 batch \d+ \(doc_ids [^)]*non-finite loss for doc_id\(s\) 9\)", msg), msg
