"""Projection into the EKFAC eigenspace and back: formulas, pseudo-inverse, orthogonal projection, files."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_random_docs, make_tiny_lora_model
from ga_ray.kernel.collate import collate
from ga_ray.factors.compute import FactorSettings, compute_factors
from ga_ray.factors.eigen import eigen_scores, select_top_k
from ga_ray.factors.factors import FactorBlock, Factors, short_block_name
from ga_ray.factors.projection import FactorsError, Projector
from ga_ray.kernel.per_document import per_document_gradients
from ga_ray.kernel.lora_blocks import find_lora_blocks

SHAPES = [("blk.lora_A", "A", (3, 7)), ("blk.lora_B", "B", (5, 3)), ("other.lora_A", "A", (2, 4))]


def _orth(n: int, g: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q


def synthetic_factors(top_k: int | None, mode: str = "ekfac", eps: float = 1e-6, seed: int = 0) -> Factors:
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for name, kind, (o, i) in SHAPES:
        lS = torch.rand(o, generator=g, dtype=torch.float64) + 0.1
        lA = torch.rand(i, generator=g, dtype=torch.float64) + 0.1
        Lam = torch.rand(o, i, generator=g, dtype=torch.float64) * 3 + 0.01
        k = o * i if top_k is None else top_k
        sel = select_top_k(eigen_scores(mode, Lam, lS, lA), k)
        blocks.append(FactorBlock(name, kind, (o, i), 2.0, _orth(i, g), lA, _orth(o, g), lS, Lam, sel))
    return Factors(blocks, {"eigenvalues": mode, "epsilon": eps, "top_k": top_k, "fisher": "true"})


def _grads(B: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(B, o, i, generator=g) for name, _, (o, i) in SHAPES}


@pytest.mark.parametrize("mode", ["ekfac", "kfac"])
def test_project_is_the_formula(mode):
    eps = 1e-3
    f = synthetic_factors(top_k=4, mode=mode, eps=eps)
    p = Projector(f)
    G = _grads(6)
    z = p.project(G)
    assert z.shape == (6, p.D) and z.dtype == torch.float32 and p.D == 12
    for fb in f.blocks:
        R = fb.Q_S.T @ G[fb.name].double() @ fb.Q_A  # [B, o, i], dense float64
        o, i = fb.shape
        ii, jj = fb.selected // i, fb.selected % i
        if mode == "ekfac":
            lam = fb.Lambda[ii, jj]
        else:
            lam = fb.lambda_S[ii] * fb.lambda_A[jj]
        ref = R[:, ii, jj] / torch.sqrt(lam + eps)
        assert torch.allclose(z[:, p.block_slices[fb.name]].double(), ref, rtol=1e-5, atol=1e-6)
        # the selection ranks by the mode's eigenvalue, descending
        scores = fb.Lambda if mode == "ekfac" else torch.outer(fb.lambda_S, fb.lambda_A)
        top = torch.sort(scores.flatten(), descending=True).values[:4]
        assert torch.equal(scores.flatten()[fb.selected], top)


def test_full_k_round_trip_is_identity():
    f = synthetic_factors(top_k=None)
    p = Projector(f)
    G = _grads(3)
    back = p.unproject(p.project(G))
    for name, g in G.items():
        assert back[name].shape == g.shape
        assert torch.allclose(back[name], g, atol=1e-5, rtol=1e-5)
    # one vector [D] gives one tensor per block
    single = p.unproject(p.project(G)[1])
    assert all(torch.allclose(single[n], G[n][1], atol=1e-5) for n in G)


def test_small_k_is_orthogonal_projection_onto_selected_subspace():
    f = synthetic_factors(top_k=5)
    p = Projector(f)
    G = _grads(4, seed=7)
    back = p.unproject(p.project(G))
    for fb in f.blocks:
        o, i = fb.shape
        ii, jj = fb.selected // i, fb.selected % i
        V = torch.stack([torch.outer(fb.Q_S[:, a], fb.Q_A[:, b]).flatten() for a, b in zip(ii.tolist(), jj.tolist())])  # [k, o*i]
        assert torch.allclose(V @ V.T, torch.eye(len(ii), dtype=torch.float64), atol=1e-12)
        P = V.T @ V  # dense orthogonal projector
        ref = (G[fb.name].double().flatten(1) @ P).reshape(-1, o, i)
        assert torch.allclose(back[fb.name].double(), ref, atol=1e-5)
        # idempotent, and the residual is orthogonal to the kept part
        again = p.unproject(p.project(back))[fb.name]
        assert torch.allclose(again, back[fb.name], atol=1e-5)
        resid = G[fb.name].double() - back[fb.name].double()
        assert (resid.flatten(1) * back[fb.name].double().flatten(1)).sum(1).abs().max() < 1e-4


def test_unproject_natural_divides():
    f = synthetic_factors(top_k=3, eps=0.0)
    p = Projector(f)
    z = torch.randn(p.D, generator=torch.Generator().manual_seed(3))
    nat = p.unproject(z, natural=True)
    for fb in f.blocks:
        o, i = fb.shape
        ii, jj = fb.selected // i, fb.selected % i
        grid = torch.zeros(o, i, dtype=torch.float64)
        grid[ii, jj] = z[p.block_slices[fb.name]].double() / torch.sqrt(fb.Lambda[ii, jj])
        assert torch.allclose(nat[fb.name].double(), fb.Q_S @ grid @ fb.Q_A.T, atol=1e-5)


def test_errors_name_the_problem(tmp_path):
    p = Projector(synthetic_factors(top_k=2))
    G = _grads(2)
    with pytest.raises(KeyError, match="other.lora_A"):
        p.project({k: v for k, v in G.items() if k != "other.lora_A"})
    with pytest.raises(ValueError, match="shape"):
        p.project({**G, "blk.lora_A": torch.zeros(2, 7, 3)})
    with pytest.raises(ValueError, match="D="):
        p.unproject(torch.zeros(p.D + 1))
    with pytest.raises(FactorsError, match="ga-ray factors"):
        Factors.load(tmp_path)


def test_real_factors_save_load_and_project(tmp_path):
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=("q_proj", "up_proj"))
    blocks = find_lora_blocks(model)
    docs = make_random_docs(8, vocab_size=model.config.vocab_size, seed=6)
    f = compute_factors(model, blocks, lambda: [collate(docs[:5]), collate(docs[5:])], FactorSettings(top_k=6, fisher="empirical"))
    f.save(tmp_path)
    meta = json.loads((tmp_path / "factors.json").read_text())
    for key in ("block_order", "blocks", "fisher", "n_tokens", "n_docs", "n_docs_lambda", "top_k", "epsilon", "eigenvalues", "D"):
        assert key in meta, key
    assert meta["block_order"] == [b.name for b in blocks] and meta["D"] == 6 * len(blocks)
    assert [tuple(b["shape"]) for b in meta["blocks"]] == [b.shape for b in blocks]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "factors.safetensors"), framework="pt") as st:
        keys = set(st.keys())
        assert st.get_tensor(f"{blocks[0].name}.selected").dtype == torch.int64
    assert keys == {f"{b.name}.{k}" for b in blocks for k in ("C_A", "C_S", "Q_A", "lambda_A", "Q_S", "lambda_S", "Lambda", "selected")}
    g = Factors.load(tmp_path, covariances=True)
    assert g.block_names == f.block_names and g.meta["n_docs"] == 8
    for a, b in zip(f.blocks, g.blocks):
        assert torch.equal(a.selected, b.selected)
        assert torch.allclose(a.Q_A.float(), b.Q_A) and torch.allclose(a.C_S.float(), b.C_S)
        assert torch.equal(a.Lambda, b.Lambda)
    assert Factors.load(tmp_path).blocks[0].C_A is None, "covariances are only read when asked"
    # the gradients-stage path: per-document gradients of a batch, projected at once
    res = per_document_gradients(model, blocks, collate(docs[:3]))
    z = Projector(tmp_path).project(res.grads)
    z_mem = Projector(f).project(res.grads)
    assert z.shape == (3, g.D) and torch.allclose(z, z_mem, rtol=1e-5, atol=1e-6)
    rows = g.summary_rows()
    assert len(rows) == len(blocks) and all(0 < r["Lambda kept"] <= 1 for r in rows)
    assert short_block_name(blocks[0].name) == "layers.0.self_attn.q_proj.A"
