"""End to end: a tiny demo world through every stage via the CLI, then a re-run that skips everything."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ga_ray.cli import app

TINY_WORLD = [
    "demo.n_docs=160",
    "demo.n_base_docs=60",
    "demo.vocab_size=320",
    "demo.hidden_size=16",
    "demo.n_layers=1",
    "demo.n_heads=2",
    "demo.intermediate_size=32",
    "demo.pretrain_epochs=1.0",
    "demo.pretrain_batch_size=8",
    "demo.pretrain_seq_len=32",
    "demo.eval_prompts_per_family=3",
    "demo.torch_threads=1",
]
TINY_STAGES = [
    "data.max_length=320",
    "finetune.epochs=1",
    "finetune.batch_size=16",
    "finetune.cpus_per_worker=0.5",
    "finetune.eval_prompts=3",
    "finetune.max_new_tokens=16",
    "factors.top_k=4",
    "factors.cpus_per_worker=0.5",
    "gradients.cpus_per_worker=0.5",
    "dictionary.n_atoms=8",
    "dictionary.batch_size=32",
    "dictionary.max_epochs=3",
    "dictionary.kmeans_clusters=4",
    "coherence.top_docs=5",
    "report.top_atoms=8",
    "steer.alphas=[2.0]",
    "steer.controls=false",
    "evaluation.behaviours=[bullets]",
    "evaluation.max_tokens=8",
    "evaluation.controls_at_recommended=false",
    "evaluation.perplexity_docs_per_family=1",
    "ray.execution_no_progress_timeout_s=300",
]


@pytest.mark.slow
def test_demo_pipeline_end_to_end_and_rerun_skips(tmp_path, ray_session):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    sets = [x for s in TINY_WORLD + TINY_STAGES + [f"demo.cache_dir={tmp_path / 'cache'}"] for x in ("--set", s)]
    out = runner.invoke(app, ["demo", "--run-dir", str(run_dir), *sets], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    expected = ["prepare", "finetune", "factors", "gradients", "atoms", "coherence", "groups", "steer", "evaluate", "report"]
    assert [s for s in expected if manifest.get(s, {}).get("status") == "done"] == expected
    for stage in expected:
        assert re.search(rf"\[{stage}\] done in", out.output), f"no one-line summary for {stage}"
    # the artifacts a user opens
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "factors" / "factors.safetensors").exists()
    grads = pq.read_table(run_dir / "gradients", columns=["doc_id"]) if (run_dir / "gradients").is_dir() else None
    n_docs = manifest["prepare"]["summary"]["documents"]
    assert grads is not None and grads.num_rows + manifest["gradients"]["summary"]["n_excluded_nonfinite"] == n_docs
    assert (run_dir / "atoms" / "dictionary.safetensors").exists()
    from ga_ray.coherence import io as coherence_io

    assert coherence_io.load_atom_table(run_dir).num_rows == 8
    html = (run_dir / "report" / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html
    # the finetune stage kept the format table in the manifest
    assert manifest["finetune"]["summary"].get("format_table")

    again = runner.invoke(app, ["demo", "--run-dir", str(run_dir), *sets], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped (inputs unchanged)") == len(expected)
