"""`ga-ray bench gpu --quick` on CPU: it runs without Ray and its JSON has the figures (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Ray, numba, threadpoolctl, scipy and scikit-learn made unimportable before anything else runs: the GPU
# machines have torch, transformers, peft, safetensors, numpy and pyarrow only.
_ABSENT = ("ray", "numba", "threadpoolctl", "scipy", "sklearn")
NO_RAY = f"import sys; sys.modules.update(dict.fromkeys({_ABSENT!r})); from ga_ray.bench.gpu import cli; sys.exit(cli(sys.argv[1:]))"


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_gpu_quick_runs_without_ray_and_reports():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", NO_RAY, "--quick", "--reps", "1", "--threads", "1", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["bench"] == "gpu" and res["quick"] is True and res["machine"]["device"] == "cpu"

    g = res["gradients"]
    assert "error" not in g, g
    for key in ("ours", "loop", "step"):
        for f in ("docs_per_s", "tokens_per_s", "time_s", "peak_mem_mb"):
            assert _finite_positive(g[key][f]), (key, f, g[key])
    assert g["ours"]["n_docs"] == 32 and g["sizes"]["doc_tokens"] == 64
    assert _finite_positive(g["ratio_ours_over_loop"]) and _finite_positive(g["ratio_ours_over_step"])
    assert g["ratio_ours_over_loop"] == pytest.approx(g["ours"]["docs_per_s"] / g["loop"]["docs_per_s"])
    assert g["D"] == g["n_blocks"] * g["sizes"]["top_k"]  # 50 pairs kept per block (every block has ≥ 50 entries)
    assert g["lora_params"] == g["sizes"]["n_layers"] * 2 * 2 * g["sizes"]["lora_r"] * g["sizes"]["hidden_size"]

    d = res["dictionary"]
    assert "error" not in d, d
    assert d["sizes"] == {"n_rows": 2000, "dim": 256, "n_atoms": 32, "alpha": 0.1}
    for f in ("s_per_epoch", "epoch_floor_s", "epoch_over_floor", "gemm_flops_per_s", "objective", "peak_mem_mb"):
        assert _finite_positive(d[f]), (f, d[f])
    assert d["epochs"] == pytest.approx(1.0, abs=0.02)
    assert d["epoch_floor_s"] == pytest.approx(2 * 2000 * 32 * 256 / d["gemm_flops_per_s"])
    assert d["objective"] < 0.5  # unit rows: the empty code costs 0.5; a learnt dictionary does better
    assert d["heldout_objective"] is None or 0 < d["heldout_objective"] < 0.5


def test_gpu_is_a_registered_benchmark():
    from ga_ray.cli import BENCHES

    assert "gpu" in BENCHES


def test_random_factors_are_orthonormal_with_top_k_pairs():
    import torch

    from ga_ray.bench.gpu import random_factors
    from ga_ray.factors.projection import Projector
    from ga_ray.kernel.lora_blocks import LoraBlock

    blocks = [LoraBlock(name=f"b{i}", module_name=f"m{i}", layer_name=f"l{i}", kind=k, shape=s, scale=2.0) for i, (k, s) in enumerate([("A", (8, 24)), ("B", (24, 8))])]
    f = random_factors(blocks, top_k=10)
    for fb in f.blocks:
        o, i = fb.shape
        assert torch.allclose(fb.Q_A.T @ fb.Q_A, torch.eye(i, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(fb.Q_S.T @ fb.Q_S, torch.eye(o, dtype=torch.float64), atol=1e-10)
        assert fb.k == 10 and (fb.Lambda > 0).all()
    p = Projector(f)
    G = {b.name: torch.randn(3, *b.shape) for b in blocks}
    z = p.project(G)
    assert z.shape == (3, 20) and torch.isfinite(z).all()
