"""EKFAC pure compute: covariances, eigendecompositions, Λ, top-k, NaN detection, against dense references."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_random_docs, make_tiny_lora_model
from ga_ray.kernel.collate import collate
from ga_ray.factors.compute import (
    FactorSettings,
    NonFiniteFactorError,
    compute_factors,
    covariance_pass,
    in_subsample,
    subsample_threshold,
)
from ga_ray.factors.eigen import canonical_signs, eigen_scores, eigendecompose, lambda_mass_kept, select_top_k
from ga_ray.kernel.per_document import IGNORE, one_document_gradients_reference, per_document_gradients
from ga_ray.kernel.lora_blocks import block_modules, find_lora_blocks

TARGETS = ("q_proj", "v_proj", "down_proj")


def _model(**kw):
    torch.set_num_threads(1)
    return make_tiny_lora_model(target_modules=TARGETS, r=3, alpha=6.0, **kw)


def _batches(docs, size):
    return lambda: [collate(docs[i : i + size]) for i in range(0, len(docs), size)]


def _per_token_reference(model, blocks, doc, targets):
    """Per-token a and δ of every block for one unpadded document, by a path independent of ours:
    forward hooks keep each LoRA Linear's input and output, and δ = autograd.grad(L, outputs)."""
    modules = block_modules(model, blocks)
    ins, outs = {}, {}
    def keep(i):
        def hook(mod, args, out):
            ins[i], outs[i] = args[0], out

        return hook

    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    ids = torch.tensor(doc["input_ids"]).long()
    m = torch.tensor(doc["loss_mask"])[1:].bool()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        logits = model(input_ids=ids[None]).logits[0, :-1]
        loss = F.cross_entropy(logits[m], targets[1:][m], reduction="sum")
        deltas = torch.autograd.grad(loss, [outs[i] for i in range(len(blocks))], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    return {b.name: (ins[i][0].detach().double(), (deltas[i][0] if deltas[i] is not None else torch.zeros_like(outs[i][0])).double()) for i, b in enumerate(blocks)}


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_covariances_equal_per_token_dense_reference(fisher):
    model = _model(hidden_size=12, n_heads=3, n_kv_heads=1, intermediate_size=20)
    blocks = find_lora_blocks(model)
    docs = make_random_docs(11, vocab_size=model.config.vocab_size, seed=1)
    settings = FactorSettings(fisher=fisher, seed=5)
    acc = covariance_pass(model, blocks, _batches(docs, 4)(), settings)
    aat = {b.name: 0 for b in blocks}
    ddt = {b.name: 0 for b in blocks}
    n_tok = 0
    for d in docs:
        res = per_document_gradients(model, blocks, collate([d]), labels=fisher, seed=5)  # the labels to replay
        targets = res.targets[0]
        ids = torch.tensor(d["input_ids"]).long()
        targets = torch.where(targets == IGNORE, ids, targets)
        ref = _per_token_reference(model, blocks, d, targets)
        grads, _ = one_document_gradients_reference(model, blocks, ids, torch.tensor(d["loss_mask"]), targets=targets)
        for b in blocks:
            a, delta = ref[b.name]
            assert torch.allclose(delta.T @ a, grads[b.name].double(), rtol=1e-4, atol=1e-7), "Σ δ aᵀ must be the weight gradient"
            aat[b.name] = aat[b.name] + a.T @ a
            ddt[b.name] = ddt[b.name] + delta.T @ delta
        n_tok += len(d["input_ids"])
    assert acc.n_tokens == n_tok and acc.n_docs == len(docs)
    covs = acc.covariances()
    for b in blocks:
        C_A, C_S = covs[b.name]
        assert C_A.shape == (b.d_in, b.d_in) and C_S.shape == (b.d_out, b.d_out)
        assert torch.allclose(C_A, aat[b.name] / n_tok, rtol=1e-5, atol=1e-9 * aat[b.name].abs().max().item())
        assert torch.allclose(C_S, ddt[b.name] / n_tok, rtol=1e-4, atol=1e-6 * ddt[b.name].abs().max().item())
        assert (C_S - ddt[b.name] / n_tok).norm() / C_S.norm() < 1e-5


def test_eigendecompose_sorted_signed_clamped():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 6, generator=g, dtype=torch.float64)
    C = X.T @ X / 30
    e = eigendecompose(C)
    assert torch.allclose(e.Q @ torch.diag(e.values) @ e.Q.T, C, atol=1e-12)
    assert torch.allclose(e.Q.T @ e.Q, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.all(e.values[:-1] >= e.values[1:])
    idx = e.Q.abs().argmax(0)
    assert torch.all(e.Q[idx, torch.arange(6)] > 0)
    assert torch.equal(canonical_signs(-e.Q), e.Q)
    # a PSD matrix with round-off below zero: the negative eigenvalue is clamped and counted
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    C2 = Q @ torch.diag(torch.tensor([3.0, 1.0, 0.0, -1e-13], dtype=torch.float64)) @ Q.T
    e2 = eigendecompose(C2.float())
    assert e2.n_clamped >= 1 and e2.min_raw < 0 and e2.values.min() == 0
    assert e2.values.dtype == torch.float64


def test_top_k_and_kfac_scores():
    Lam = torch.tensor([[0.5, 3.0, 1.0], [3.0, 0.1, 2.0]], dtype=torch.float64)
    sel = select_top_k(Lam, 4)
    assert sel.tolist() == [1, 3, 5, 2], "descending, ties in flat order"
    assert select_top_k(Lam, 100).numel() == 6
    lS = torch.tensor([2.0, 0.5], dtype=torch.float64)
    lA = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    kf = eigen_scores("kfac", Lam, lS, lA)
    assert torch.equal(kf, torch.tensor([[2.0, 8.0, 0.5], [0.5, 2.0, 0.125]], dtype=torch.float64))
    assert torch.equal(eigen_scores("ekfac", Lam, lS, lA), Lam)
    assert lambda_mass_kept(Lam, sel) == pytest.approx((3 + 3 + 2 + 1) / Lam.sum().item())
    with pytest.raises(ValueError):
        eigen_scores("nope", Lam, lS, lA)


@pytest.mark.parametrize("mode, reduction", [("ekfac", "sum"), ("kfac", "mean")])
def test_compute_factors_equals_dense_reference(mode, reduction):
    model = _model()
    blocks = find_lora_blocks(model)
    docs = make_random_docs(10, vocab_size=model.config.vocab_size, seed=2)
    settings = FactorSettings(fisher="empirical", reduction=reduction, eigenvalues=mode, top_k=7)
    f = compute_factors(model, blocks, _batches(docs, 3), settings)
    # dense references: covariances from the accumulator's definition, Λ from the autograd loop
    ref_grads = [one_document_gradients_reference(model, blocks, torch.tensor(d["input_ids"]).long(), torch.tensor(d["loss_mask"]), reduction=reduction)[0] for d in docs]
    assert f.meta["n_docs"] == 10 and f.meta["n_docs_lambda"] == 10
    assert f.meta["n_tokens"] == sum(len(d["input_ids"]) for d in docs)
    for fb in f.blocks:
        eA, eS = eigendecompose(fb.C_A), eigendecompose(fb.C_S)
        assert torch.allclose(fb.Q_A, eA.Q) and torch.allclose(fb.lambda_S, eS.values)
        R = torch.stack([fb.Q_S.T @ g[fb.name].double() @ fb.Q_A for g in ref_grads])
        Lam_ref = R.square().mean(0)
        assert (fb.Lambda - Lam_ref).norm() / Lam_ref.norm() < 1e-5
        if mode == "ekfac":
            scores = Lam_ref
        else:
            scores = fb.lambda_S[:, None] * fb.lambda_A[None, :]
        order = torch.argsort(scores.flatten(), descending=True)[:7]
        assert torch.allclose(scores.flatten()[fb.selected], scores.flatten()[order], rtol=1e-5)
        if mode == "kfac":
            assert torch.equal(fb.selected, order)
        assert fb.info["lambda_kept"] == pytest.approx(lambda_mass_kept(fb.Lambda, fb.selected))


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return (x - y).norm().item() / max(y.norm().item(), 1e-300)


def assert_same_factors(f1, f2, rtol: float = 1e-6) -> None:
    """Same factors to `rtol` relative, in the sense that is well-posed for an eigendecomposition.

    Covariances, eigenvalues and the top-k selection: to `rtol` (selection exactly). Eigenvectors:
    column by column to `rtol · λ_max / gap` (Davis–Kahan: an eigenvector is determined only as well as
    its eigenvalue is separated; a near-degenerate pair may rotate in its plane under a perturbation of
    relative size rtol that moves no covariance or eigenvalue). Λ: to `rtol` plus what those eigenvector
    differences can move it by (Cauchy–Schwarz: |ΔΛ_ij| ≤ 2·sqrt(Λ_ij)·(e_i + e_j)·sqrt(ΣΛ) + (e_i + e_j)²·ΣΛ,
    e = the measured column differences, ΣΛ = mean ‖G‖², which no rotation changes)."""
    assert f1.block_names == f2.block_names
    for b1, b2 in zip(f1.blocks, f2.blocks):
        for key in ("C_A", "C_S", "lambda_A", "lambda_S"):
            x, y = getattr(b1, key), getattr(b2, key)
            if x is not None or y is not None:
                assert _rel(x, y) < rtol, f"{b1.name}.{key}: {_rel(x, y):.2e}"
        assert torch.equal(b1.selected, b2.selected), b1.name
        col_err = {}
        for Qk, lk in (("Q_A", "lambda_A"), ("Q_S", "lambda_S")):
            Q1, Q2, lam = getattr(b1, Qk).double(), getattr(b2, Qk).double(), getattr(b2, lk).double()
            d = lam[:, None] - lam[None, :]
            d.fill_diagonal_(float("inf"))
            gap = d.abs().min(1).values.clamp(min=1e-300)
            err = (Q1 - Q2).norm(dim=0)
            bound = torch.clamp(rtol * lam.max().item() / gap, min=rtol)
            assert torch.all(err <= bound), f"{b1.name}.{Qk}: column errors {err.max().item():.2e} above the gap bound"
            col_err[Qk] = err
        L1, L2 = b1.Lambda.double(), b2.Lambda.double()
        total = L2.sum().item()
        assert abs(L1.sum().item() - total) <= rtol * total, f"{b1.name}: Σ Λ differs"
        e = col_err["Q_S"][:, None] + col_err["Q_A"][None, :]
        allowed = rtol * L2.abs().max() + 2 * L2.sqrt() * e * total**0.5 + e.square() * total
        assert torch.all((L1 - L2).abs() <= allowed), f"{b1.name}.Lambda: {_rel(L1, L2):.2e} not explained by the eigenvectors"


def test_factors_do_not_depend_on_batching_or_order():
    model = _model()
    blocks = find_lora_blocks(model)
    docs = make_random_docs(12, vocab_size=model.config.vocab_size, seed=3)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    s = FactorSettings(fisher="true", seed=9, top_k=5)
    f1 = compute_factors(model, blocks, _batches(docs, 5), s)
    f2 = compute_factors(model, blocks, _batches(shuffled, 2), s)
    assert_same_factors(f1, f2, 1e-6)
    # the bounds are not vacuous: overall the factors agree closely outright
    for b1, b2 in zip(f1.blocks, f2.blocks):
        assert _rel(b1.Lambda, b2.Lambda) < 2e-5 and _rel(b1.Q_A, b2.Q_A) < 2e-5


def test_nan_names_block_and_first_batch():
    model = _model()
    blocks = find_lora_blocks(model)
    docs = make_random_docs(9, vocab_size=model.config.vocab_size, seed=4)
    bad_token = model.config.vocab_size - 1
    for d in docs:
        d["input_ids"] = [t if t != bad_token else 5 for t in d["input_ids"]]
    docs[7]["input_ids"][1] = bad_token
    with torch.no_grad():
        model.get_input_embeddings().weight[bad_token] = float("nan")
    with pytest.raises(NonFiniteFactorError) as err:
        compute_factors(model, blocks, _batches(docs, 3), FactorSettings(fisher="empirical"))
    msg = str(err.value)
    assert blocks[0].name in msg, "names the first block in the recorded order"
    assert "batch 2" in msg and "doc_ids 6..8" in msg and "non-finite loss for doc_id(s) 7" in msg


def test_lambda_subsample_is_seeded_exact_and_order_free():
    ids = list(range(100, 160))
    thr = subsample_threshold(ids, seed=1, max_docs=17)
    keep = in_subsample(ids, 1, thr)
    assert keep.sum() == 17
    rev = in_subsample(ids[::-1], 1, subsample_threshold(ids[::-1], 1, 17))
    assert list(keep) == list(rev[::-1])
    assert in_subsample(ids, 2, subsample_threshold(ids, 2, 17)).tolist() != keep.tolist()
    assert subsample_threshold(ids, 1, None) is None and subsample_threshold(ids, 1, 60) is None
