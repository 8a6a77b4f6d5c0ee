"""Batched per-document gradients == one-document-at-a-time torch.autograd.grad, and the true-Fisher draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_random_docs, make_tiny_lora_model
from ga_ray.kernel.collate import collate
from ga_ray.kernel.per_document import (
    IGNORE,
    doc_seed,
    doc_uniforms,
    one_document_gradients_reference,
    per_document_gradients,
    sample_from_logits,
)
from ga_ray.kernel.lora_blocks import find_lora_blocks

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CASES = [
    # (model kwargs, target modules, r, alpha, rslora, reduction, labels)
    ({}, ("q_proj", "v_proj"), 4, 8.0, False, "sum", "empirical"),
    ({"hidden_size": 24, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 40}, ("q_proj", "k_proj", "v_proj", "o_proj"), 4, 8.0, True, "mean", "empirical"),
    ({"n_layers": 1, "intermediate_size": 20}, ("gate_proj", "up_proj", "down_proj", "q_proj"), 2, 3.0, False, "sum", "true"),
    ({"hidden_size": 32, "n_heads": 4, "n_kv_heads": 1, "intermediate_size": 48, "n_layers": 3}, ALL, 8, 4.0, True, "sum", "empirical"),
    ({"hidden_size": 8, "n_heads": 1, "intermediate_size": 12, "vocab_size": 40}, ALL, 3, 5.0, False, "mean", "true"),
]


def _docs(vocab: int, seed: int = 0) -> list[dict]:
    docs = make_random_docs(7, vocab_size=vocab, min_len=3, max_len=23, seed=seed)
    docs[1]["loss_mask"] = [0] * len(docs[1]["loss_mask"])  # no response: zero gradient
    docs[2]["loss_mask"] = [1] * len(docs[2]["loss_mask"])  # loss_mask[0] = 1 has no predictor: ignored
    docs[3]["loss_mask"][1::2] = [0] * len(docs[3]["loss_mask"][1::2])  # holes in the response
    return docs


def _relerr(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.norm().item()
    return (x - ref).norm().item() / scale if scale > 0 else x.norm().item()


def _compare_to_loop(model, blocks, docs, res, reduction):
    worst = 0.0
    for n, d in enumerate(docs):
        L = len(d["input_ids"])
        ref, loss = one_document_gradients_reference(
            model, blocks, torch.tensor(d["input_ids"]).long(), torch.tensor(d["loss_mask"]), targets=res.targets[n, :L], reduction=reduction
        )
        assert res.loss[n].item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        for b in blocks:
            assert res.grads[b.name][n].shape == b.shape
            if ref[b.name].norm() == 0:
                assert res.grads[b.name][n].norm() == 0
                continue
            worst = max(worst, _relerr(res.grads[b.name][n], ref[b.name]))
    return worst


@pytest.mark.parametrize("kw, targets, r, alpha, rslora, reduction, labels", CASES)
def test_batched_equals_autograd_loop(kw, targets, r, alpha, rslora, reduction, labels):
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=targets, r=r, alpha=alpha, use_rslora=rslora, seed=3, **kw)
    blocks = find_lora_blocks(model)
    docs = _docs(model.config.vocab_size)
    batch = collate(docs, pad_id=0)
    assert batch.attention_mask.sum(1).min() < batch.input_ids.shape[1], "the batch must contain padding"
    res = per_document_gradients(model, blocks, batch, labels=labels, reduction=reduction, seed=11)
    assert set(res.grads) == {b.name for b in blocks}
    assert all(g.dtype == torch.float32 for g in res.grads.values())
    assert _compare_to_loop(model, blocks, docs, res, reduction) < 1e-5
    # doc 1 has no response token, so no loss and no gradient
    assert res.loss[1] == 0 and all(res.grads[b.name][1].abs().max() == 0 for b in blocks)
    assert res.n_targets.tolist() == [int(sum(d["loss_mask"][1:])) for d in docs]
    assert res.n_tokens.tolist() == [len(d["input_ids"]) for d in docs]
    if labels == "empirical":
        ids = batch.input_ids
        t = res.targets
        assert torch.equal(t[t != IGNORE], ids[t != IGNORE])


def test_float64_is_exact_and_no_param_grad():
    """In float64 the one-pass gradients equal autograd to round-off (catches any missing scale or transpose)."""
    model = make_tiny_lora_model(target_modules=ALL, r=3, alpha=7.0, use_rslora=True, hidden_size=12, n_heads=3, n_kv_heads=1).double()
    blocks = find_lora_blocks(model)
    for p in model.parameters():  # as PeftModel.from_pretrained(is_trainable=False) leaves them
        p.requires_grad_(False)
    docs = _docs(model.config.vocab_size, seed=5)
    res = per_document_gradients(model, blocks, collate(docs), labels="true", seed=2)
    assert all(g.dtype == torch.float64 for g in res.grads.values())
    assert _compare_to_loop(model, blocks, docs, res, "sum") < 1e-11
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters()), "requires_grad flags must be restored"


def test_sum_of_per_document_grads_is_the_batch_gradient():
    model = make_tiny_lora_model(target_modules=("q_proj", "down_proj"))
    blocks = find_lora_blocks(model)
    batch = collate(_docs(model.config.vocab_size))
    res = per_document_gradients(model, blocks, batch)
    # the batch gradient from a plain loss over the padded batch (HF's own shift and masking)
    labels = batch.input_ids.masked_fill(batch.loss_mask == 0, -100).masked_fill(batch.attention_mask == 0, -100)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum", ignore_index=-100)
    params = [p for n, p in model.named_parameters() if n in res.grads]
    full = torch.autograd.grad(ce, params)
    for b, g in zip(blocks, full):
        assert _relerr(res.grads[b.name].sum(0), g) < 1e-5
    assert res.loss.sum().item() == pytest.approx(ce.item(), rel=1e-5)


def test_train_mode_is_refused():
    model = make_tiny_lora_model()
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        per_document_gradients(model, find_lora_blocks(model), collate(make_random_docs(2)))


def test_true_fisher_reproducible_and_independent_of_batch_composition():
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj", "up_proj"))
    blocks = find_lora_blocks(model)
    docs = make_random_docs(9, min_len=6, max_len=30, seed=4)
    for i, d in enumerate(docs):
        d["doc_id"] = 1000 + 7 * i
    a1 = per_document_gradients(model, blocks, collate(docs[:5]), labels="true", seed=3)
    a2 = per_document_gradients(model, blocks, collate(docs[:5]), labels="true", seed=3)
    for b in blocks:
        assert torch.equal(a1.grads[b.name], a2.grads[b.name])
    assert torch.equal(a1.targets, a2.targets)
    # doc 2 again, in another batch, at another position, with other padding
    other = [docs[8], docs[2], docs[6]]
    c = per_document_gradients(model, blocks, collate(other), labels="true", seed=3)
    L = len(docs[2]["input_ids"])
    assert torch.equal(c.targets[1, :L], a1.targets[2, :L])
    for b in blocks:
        assert _relerr(c.grads[b.name][1], a1.grads[b.name][2]) < 1e-5
    # another seed draws other labels; the model's labels differ from the data's
    d = per_document_gradients(model, blocks, collate(docs[:5]), labels="true", seed=4)
    mask = a1.targets != IGNORE
    assert (d.targets[mask] != a1.targets[mask]).any()
    e = per_document_gradients(model, blocks, collate(docs[:5]), labels="empirical")
    assert (e.targets[mask] != a1.targets[mask]).any()
    # the draw depends on (seed, doc_id), not on the row: another doc_id gives other labels
    moved = [dict(docs[0], doc_id=5)]
    f = per_document_gradients(model, blocks, collate(moved), labels="true", seed=3)
    L0 = len(docs[0]["input_ids"])
    assert not torch.equal(f.targets[0, :L0], a1.targets[0, :L0])


def test_sampler_follows_the_model_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0]]).repeat(40000, 1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = sample_from_logits(logits, u, chunk_rows=7000)
    freq = torch.bincount(y, minlength=5).double() / len(y)
    p = torch.softmax(logits[0].double(), -1)
    assert (freq - p).abs().max() < 0.01
    assert freq[3] == 0, "a token of zero probability is never drawn"
    # the inverse CDF of the vocabulary order
    grid = torch.linspace(0, 0.999999, 50, dtype=torch.float64)
    ys = sample_from_logits(logits[:50], grid)
    assert torch.all(ys[1:] >= ys[:-1])
    cdf = torch.softmax(logits[0].double(), -1).cumsum(0)
    assert ys.tolist() == torch.searchsorted(cdf, grid, right=True).clamp(max=4).tolist()


def test_doc_seed_is_stable():
    assert doc_seed(0, 1) == doc_seed(0, 1) != doc_seed(1, 1) != doc_seed(0, 2)
    # fixed values: the draws must not change between releases or machines
    assert doc_seed(0, 0) == 1000389964151683062
    assert doc_seed(3, 12345) == 4388394848506610914
    u = doc_uniforms(0, 42, 5)
    assert u[:3].tolist() == pytest.approx([0.4048918795785972, 0.034143988462305264, 0.17422109463437874], abs=0)
    assert u.dtype == torch.float64 and u.shape == (5,)
    assert torch.equal(u, doc_uniforms(0, 42, 9)[:5]), "positions keep their draw whatever the document length"
    assert np.all((u.numpy() >= 0) & (u.numpy() < 1))
