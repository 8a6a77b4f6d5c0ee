"""The faster per-document paths against their slow references.

- the fast pass of `per_document_gradients` (padding mask dropped under right padding, the vocabulary
  head on the target rows only, the backward w.r.t. the lora_A outputs instead of the weights) ==
  the reference pass (`fast=False`) == one-document autograd;
- per-token projection (`Projector.project_tokens` / `token_reducers`) == the dense projection of the
  materialised `G_n`, and its Gram norm == `‖G_n‖_F`;
- `GradientComputer` gives the same z, norms and flags whichever path each block takes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_random_docs, make_tiny_lora_model
from ga_ray.factors.projection import Projector
from ga_ray.gradients.actor import GradientComputer
from ga_ray.kernel import per_document as pdm
from ga_ray.kernel.collate import Batch, collate
from ga_ray.kernel.lora_blocks import find_lora_blocks
from ga_ray.kernel.per_document import one_document_gradients_reference, per_document_gradients
from test_projection import SHAPES, synthetic_factors

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _docs(vocab: int, n: int = 7, seed: int = 0) -> list[dict]:
    docs = make_random_docs(n, vocab_size=vocab, min_len=3, max_len=23, seed=seed)
    docs[1]["loss_mask"] = [0] * len(docs[1]["loss_mask"])  # no response: zero gradient
    docs[3]["loss_mask"][1::2] = [0] * len(docs[3]["loss_mask"][1::2])  # holes in the response
    return docs


def _relerr(x: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.norm().item()
    return (x - ref).norm().item() / scale if scale > 0 else x.norm().item()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("labels", ["empirical", "true"])
def test_fast_pass_equals_reference_pass(dtype, tol, labels):
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=ALL, r=3, alpha=5.0, hidden_size=24, n_heads=4, n_kv_heads=2, intermediate_size=40, seed=2).to(dtype)
    blocks = find_lora_blocks(model)
    batch = collate(_docs(model.config.vocab_size), pad_id=0)
    assert batch.attention_mask.sum(1).min() < batch.input_ids.shape[1], "the batch must contain padding"
    fast = per_document_gradients(model, blocks, batch, labels=labels, seed=4, covariances=True)
    ref = per_document_gradients(model, blocks, batch, labels=labels, seed=4, covariances=True, fast=False)
    assert torch.equal(fast.targets, ref.targets)
    assert torch.allclose(fast.loss, ref.loss, rtol=tol, atol=tol)
    for b in blocks:
        assert _relerr(fast.grads[b.name], ref.grads[b.name]) < tol, b.name
        assert _relerr(fast.aat[b.name], ref.aat[b.name]) < tol and _relerr(fast.ddt[b.name], ref.ddt[b.name]) < tol
    # and against one-document autograd (no padding at all), document by document
    for n, d in enumerate(_docs(model.config.vocab_size)):
        L = len(d["input_ids"])
        one, _ = one_document_gradients_reference(model, blocks, torch.tensor(d["input_ids"]).long(), torch.tensor(d["loss_mask"]), targets=fast.targets[n, :L])
        for b in blocks:
            if one[b.name].norm() == 0:
                assert fast.grads[b.name][n].norm() == 0
            else:
                assert _relerr(fast.grads[b.name][n], one[b.name]) < tol


def test_any_subset_of_blocks():
    """Only some blocks hooked (e.g. the B blocks alone, or one layer's A): the same gradients as with all."""
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj"), seed=4)
    blocks = find_lora_blocks(model)
    batch = collate(_docs(model.config.vocab_size, seed=2))
    full = per_document_gradients(model, blocks, batch)
    for subset in ([b for b in blocks if b.kind == "B"], [blocks[0]], blocks[1::3]):
        part = per_document_gradients(model, subset, batch)
        assert set(part.grads) == {b.name for b in subset}
        for b in subset:
            assert part.grads[b.name].abs().max() > 0
            assert _relerr(part.grads[b.name], full.grads[b.name]) < 1e-6, b.name


def test_head_fallback_for_other_architectures(monkeypatch):
    """A model type without a known plain head takes the full-logits path: same gradients."""
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj", "down_proj"), seed=1)
    blocks = find_lora_blocks(model)
    batch = collate(_docs(model.config.vocab_size, seed=3))
    assert pdm._split_head(model) is not None
    split = per_document_gradients(model, blocks, batch)
    monkeypatch.setattr(pdm, "_PLAIN_HEAD", frozenset())
    assert pdm._split_head(model) is None
    full = per_document_gradients(model, blocks, batch)
    for b in blocks:
        assert _relerr(split.grads[b.name], full.grads[b.name]) < 1e-5


def test_fast_pass_skips_the_weight_gradient_gemms():
    from torch.profiler import profile

    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj"), n_layers=3)
    blocks = find_lora_blocks(model)
    batch = collate(_docs(model.config.vocab_size))

    def n_mm(fast: bool) -> int:
        with profile() as prof:
            per_document_gradients(model, blocks, batch, fast=fast)
        return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))

    # the reference does one weight-gradient GEMM per block that the fast pass leaves out (and more)
    assert n_mm(False) - n_mm(True) >= len(blocks)


def _token_inputs(B: int, T: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    out = {}
    for name, _, (o, i) in SHAPES:
        delta = torch.randn(B, T, o, generator=g) * mask[..., None]  # zero at pads, as the kernel passes it
        a = torch.randn(B, T, i, generator=g)  # pads carry activations: they must not count
        out[name] = (delta, a)
    return out


@pytest.mark.parametrize("mode", ["ekfac", "kfac"])
@pytest.mark.parametrize("top_k", [2, 5, None])
def test_project_tokens_equals_dense_projection(mode, top_k):
    f = synthetic_factors(top_k=top_k, mode=mode, eps=1e-3)
    p = Projector(f)
    inputs = _token_inputs(B=5, T=9, seed=top_k or 0)
    G = {name: torch.einsum("bto,bti->boi", d.double(), a.double()) for name, (d, a) in inputs.items()}
    z_dense = p.project({k: v.float() for k, v in G.items()})
    reducers = p.token_reducers(5, 9, mode="always")
    assert set(reducers) == set(p.block_names)
    projected, norms = {}, {}
    for name, (d, a) in inputs.items():
        projected[name], norms[name] = reducers[name](d, a)
        assert norms[name].dtype == torch.float64
        assert torch.allclose(norms[name], G[name].flatten(1).square().sum(1), rtol=1e-10)
    z_tok = p.project({}, projected=projected)
    assert torch.allclose(z_tok, z_dense, rtol=1e-5, atol=1e-5)
    # against the formula in float64: z = (Q_Sᵀ G Q_A)[i, j] / sqrt(λ + ε)
    for fb in f.blocks:
        o, i = fb.shape
        ii, jj = fb.selected // i, fb.selected % i
        lam = fb.Lambda[ii, jj] if mode == "ekfac" else fb.lambda_S[ii] * fb.lambda_A[jj]
        ref = (fb.Q_S.T @ G[fb.name] @ fb.Q_A)[:, ii, jj] / torch.sqrt(lam + 1e-3)
        assert torch.allclose(z_tok[:, p.block_slices[fb.name]].double(), ref, rtol=1e-5, atol=1e-5)


def test_token_reducers_follow_the_flop_count():
    p = Projector(synthetic_factors(top_k=2))
    with pytest.raises(ValueError, match="auto"):
        p.token_reducers(4, 8, mode="sometimes")
    assert p.token_reducers(4, 8, mode="never") == {}
    for B, T in ((1, 1), (4, 2), (16, 64), (2, 500)):
        chosen = set(p.token_reducers(B, T))
        expect = {bp.name for bp in p._blocks if bp.token_flops(B, T) < bp.dense_flops(B, T)}
        assert chosen == expect
    # the Gram norm grows as T²: long documents always take the dense path, one-token ones the token path
    assert p.token_reducers(2, 500) == {}
    assert set(p.token_reducers(4, 1)) == set(p.block_names)


def _kernel_factors(model, blocks, top_k: int = 6):
    from ga_ray.factors.compute import FactorSettings, compute_factors

    docs = make_random_docs(8, vocab_size=model.config.vocab_size, seed=6)
    return compute_factors(model, blocks, lambda: [collate(docs[:4]), collate(docs[4:])], FactorSettings(top_k=top_k, fisher="empirical"))


def test_per_document_token_reducers_equal_projected_gradients():
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj", "up_proj"), n_layers=2, seed=5)
    blocks = find_lora_blocks(model)
    p = Projector(_kernel_factors(model, blocks))
    batch = collate(_docs(model.config.vocab_size, seed=8))
    ref = per_document_gradients(model, blocks, batch, fast=False)
    z_ref = p.project(ref.grads)
    B, T = batch.input_ids.shape
    res = per_document_gradients(model, blocks, batch, token_reducers=p.token_reducers(B, T, mode="always"))
    assert res.grads == {} and set(res.projected) == {b.name for b in blocks}
    assert torch.allclose(p.project(res.grads, projected=res.projected), z_ref, rtol=1e-4, atol=1e-5)
    for b in blocks:
        assert torch.allclose(res.sq_norms[b.name], ref.grads[b.name].double().flatten(1).square().sum(1), rtol=1e-5, atol=1e-12)
    # half the blocks each way
    half = {k: v for n, (k, v) in enumerate(p.token_reducers(B, T, mode="always").items()) if n % 2 == 0}
    mixed = per_document_gradients(model, blocks, batch, token_reducers=half)
    assert set(mixed.grads) | set(mixed.projected) == {b.name for b in blocks} and not set(mixed.grads) & set(mixed.projected)
    assert torch.allclose(p.project(mixed.grads, projected=mixed.projected), z_ref, rtol=1e-4, atol=1e-5)


def _window(n_docs: int = 13, seed: int = 9):
    """A tiny q/v LoRA model, its blocks, a projector on real factors, and one window of documents."""
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj"), n_layers=2, seed=7)
    blocks = find_lora_blocks(model)
    p = Projector(_kernel_factors(model, blocks))
    docs = make_random_docs(n_docs, vocab_size=model.config.vocab_size, min_len=3, max_len=30, seed=seed)
    cols = {k: [d[k] for d in docs] for k in ("doc_id", "input_ids", "loss_mask")}
    return model, blocks, p, docs, cols


def test_gradient_computer_same_results_on_every_path():
    torch.set_num_threads(1)
    model, blocks, p, docs, cols = _window()
    out = {}
    for key, kw in {"ref": {"fast": False, "token_projection": "never"}, "dense": {"token_projection": "never"}, "tokens": {"token_projection": "always"}, "auto": {}}.items():
        out[key] = GradientComputer(model, blocks, p, max_docs=4, max_tokens=64, **kw).run(cols)
    for key in ("dense", "tokens", "auto"):
        np.testing.assert_array_equal(out[key].finite, out["ref"].finite)
        np.testing.assert_allclose(out[key].z, out["ref"].z, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[key].grad_norm, out["ref"].grad_norm, rtol=1e-5)
        np.testing.assert_allclose(out[key].loss, out["ref"].loss, rtol=1e-6)
    assert GradientComputer(model, blocks, p, max_docs=4, max_tokens=64, store_raw=True, token_projection="always").token_projection == "never"


# ---- nothing read back from the device inside the loop (what a GPU pass needs to queue ahead) ----------
def test_collate_finds_the_targets_on_the_host_and_the_pass_uses_them():
    """`collate` gives each batch its target positions (the target mask's nonzero, row-major) and says
    it is right-padded; the pass run with them equals the pass that finds both itself, bit for bit."""
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj"), n_layers=2, seed=3)
    blocks = find_lora_blocks(model)
    batch = collate(_docs(model.config.vocab_size), pad_id=0)
    tmask = (batch.loss_mask[:, 1:] > 0) & (batch.attention_mask[:, 1:] > 0)
    b, p = tmask.nonzero(as_tuple=True)
    assert batch.right_padded is True
    assert torch.equal(batch.targets[0], b) and torch.equal(batch.targets[1], p) and len(b) > 0
    bare = Batch(batch.input_ids, batch.attention_mask, batch.loss_mask, batch.doc_ids)
    got = per_document_gradients(model, blocks, batch)
    want = per_document_gradients(model, blocks, bare)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.targets, want.targets)
    for blk in blocks:
        assert torch.equal(got.grads[blk.name], want.grads[blk.name]), blk.name


def test_mask_free_attention_is_transformers_sdpa_with_is_causal():
    """The registered attention is transformers' SDPA called without a mask: the same hidden states
    bit for bit, and the model's attention setting is back afterwards (also after an error)."""
    torch.set_num_threads(1)
    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj"), n_layers=2, seed=3)
    decoder = model.get_base_model().get_decoder()
    assert decoder.config._attn_implementation == "sdpa"
    ids = collate(_docs(model.config.vocab_size), pad_id=0).input_ids
    with torch.no_grad():
        plain = decoder(input_ids=ids, use_cache=False).last_hidden_state
        with pdm._mask_free_attention(decoder):
            assert decoder.config._attn_implementation == pdm._CAUSAL_SDPA
            ours = decoder(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(plain, ours)
    with pytest.raises(RuntimeError, match="boom"), pdm._mask_free_attention(decoder):
        raise RuntimeError("boom")
    assert decoder.config._attn_implementation == "sdpa"


def test_gradient_computer_reads_results_back_once_per_window_not_per_batch(monkeypatch):
    """Inside `GradientComputer.run`, outside the host-side `collate`, the only reads of tensor values
    are the window's final copies: the same number for 13 one-document batches as for one batch of 13.
    Each row still equals its document computed alone (the window's rows come back in window order)."""
    from ga_ray.kernel import collate as collate_module

    torch.set_num_threads(1)
    model, blocks, p, docs, cols = _window()
    reads = {"n": 0, "on": False}
    for name in ("cpu", "item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _f=original, **k):
            reads["n"] += reads["on"]
            return _f(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    host_collate = collate_module.collate

    def collate_uncounted(*a, **k):  # collate builds the batch on the host: its reads are not device reads
        on, reads["on"] = reads["on"], False
        try:
            return host_collate(*a, **k)
        finally:
            reads["on"] = on

    monkeypatch.setattr(collate_module, "collate", collate_uncounted)
    counts, results = {}, {}
    for max_docs in (1, 13):
        comp = GradientComputer(model, blocks, p, max_docs=max_docs, max_tokens=10_000)
        reads.update(n=0, on=True)
        results[max_docs] = comp.run(cols)
        reads["on"] = False
        counts[max_docs] = reads["n"]
    assert counts[1] == counts[13] <= 8, counts
    for i, d in enumerate(docs):
        alone = GradientComputer(model, blocks, p, max_docs=1, max_tokens=10_000).run({k: [v[i]] for k, v in cols.items()})
        for r in results.values():
            np.testing.assert_allclose(r.z[i], alone.z[0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(r.loss[i], alone.loss[0], rtol=1e-5)
            assert r.finite[i] == alone.finite[0]


def test_compiled_unhooked_parts_give_the_same_gradients(monkeypatch):
    """`compile=True` compiles what holds no LoRA block (each layer's MLP and norms, the final norm),
    never a hooked module or its parents, and the projected gradients stay those of eager mode.
    (torch.compile's `aot_eager` backend: dynamo's tracing and AOT autograd as with the default
    inductor, without a minute of C++ code generation on this CPU.)"""
    import functools

    from ga_ray.gradients import actor as actor_module
    from ga_ray.kernel.compiling import compile_unhooked_parts

    monkeypatch.setattr(actor_module, "compile_unhooked_parts", functools.partial(compile_unhooked_parts, backend="aot_eager"))
    torch.set_num_threads(1)
    model, blocks, p, docs, cols = _window(9, seed=4)
    eager = GradientComputer(model, blocks, p, max_docs=4, max_tokens=64).run(cols)
    twin = make_tiny_lora_model(target_modules=("q_proj", "v_proj"), n_layers=2, seed=7)
    comp = GradientComputer(twin, find_lora_blocks(twin), p, max_docs=4, max_tokens=64, compile=True)
    names = comp.compiled
    assert any(n.endswith("layers.0.mlp") for n in names) and any(n.endswith("layers.1.input_layernorm") for n in names), names
    assert not any("self_attn" in n or "lora" in n or n.endswith("lm_head") for n in names), names
    got = comp.run(cols)
    np.testing.assert_array_equal(got.finite, eager.finite)
    np.testing.assert_allclose(got.z, eager.z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.loss, eager.loss, rtol=1e-5)
    assert compile_unhooked_parts(nn.Linear(2, 2), []) == []  # nothing LoRA in it: nothing compiled


def test_mask_free_attention_leaves_older_transformers_alone(monkeypatch):
    """Without transformers' attention registry (before 4.48) the context changes nothing."""
    import builtins

    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj"), n_layers=1, seed=3)
    decoder = model.get_base_model().get_decoder()
    real_import = builtins.__import__

    def no_registry(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "transformers" and fromlist and "AttentionInterface" in fromlist:
            raise ImportError("cannot import name 'AttentionInterface'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_registry)
    pdm._causal_sdpa_registered.cache_clear()  # registered once per process: forget an earlier test's
    try:
        with pdm._mask_free_attention(decoder):
            assert decoder.config._attn_implementation == "sdpa"
    finally:
        pdm._causal_sdpa_registered.cache_clear()  # later tests register it again
