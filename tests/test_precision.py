"""The learner's bfloat16 products (`ga_ray.atoms.precision`): where `auto` picks them, their rounding
against float64 references, and a fit that ends where the float32 one does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ga_ray.atoms import precision
from ga_ray.atoms.online import OnlineState, _rounded_residual, update_dictionary, update_dictionary_reference, update_stats
from ga_ray.atoms.synthetic import planted_atoms, recovery
from ga_ray.atoms.threads import matmul, rounded_matmul
from ga_ray.atoms.trainer import FitSettings, learn_dictionary
from ga_ray.bench.dictionary import exact_scores

BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits: a rounding moves a value by at most 2⁻⁸ of it (relative)

ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_fp16\n"
SAPPHIRE = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd asimdhp\n"


def test_cpu_flags_that_mean_native_bfloat16():
    assert precision.cpuinfo_has_bf16(ZEN4) and precision.cpuinfo_has_bf16(SAPPHIRE) and precision.cpuinfo_has_bf16(GRAVITON3)
    assert not precision.cpuinfo_has_bf16(SKYLAKE)  # AVX-512 without BF16: emulated, slower than float32
    assert not precision.cpuinfo_has_bf16(GRAVITON2) and not precision.cpuinfo_has_bf16("")
    assert precision.cpu_has_bf16("/nonexistent/cpuinfo") is False


def test_auto_is_bfloat16_only_where_native(monkeypatch):
    assert precision.product_dtype("float32") is None and precision.product_dtype("bfloat16") is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.product_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.product_dtype("auto", "cpu") is None
    assert precision.precision_name(None) == "float32" and precision.precision_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(ValueError, match="matmul_precision must be one of auto, float32, bfloat16"):
        precision.product_dtype("fp16")


def test_rounded_matmul_is_the_product_to_bfloat16_rounding():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((37, 300)), rng.standard_normal((300, 11))  # not square: a transpose would not run
    ref = a @ b
    got = rounded_matmul(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), torch.bfloat16)
    assert got.dtype == torch.float32 and got.shape == (37, 11)
    err = np.abs(got.double().numpy() - ref)
    # operands: 2⁻⁸ each, random signs over 300 terms; the result: 2⁻⁸ of itself
    bound = BF16_EPS * (np.abs(ref) + 2 * np.sqrt((a**2) @ (b**2)))
    assert (err <= bound).all()
    assert err.max() > 1e-4  # it did round (float32 would be ~1e-5 here)
    same = matmul(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), precision=torch.bfloat16)
    assert torch.equal(same, got)
    exact = matmul(torch.tensor(a), torch.tensor(b))  # no precision: the operands' own type
    np.testing.assert_allclose(exact.numpy(), ref, rtol=1e-12, atol=1e-12)


def _stats(K: int, P: int, n: int, seed: int):
    """Statistics of sparse codes, like the learner's: A is dominated by its diagonal."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((K, P))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    C = rng.standard_normal((n, K)) * (rng.random((n, K)) < 0.05)
    X = C @ D + 0.05 * rng.standard_normal((n, P))
    st = OnlineState.from_dictionary(torch.tensor(D, dtype=torch.float32))
    update_stats(st, torch.tensor(X, dtype=torch.float32), torch.tensor(C, dtype=torch.float32))
    return st


def test_rounded_residual_keeps_the_diagonal_term_exact():
    """B_S − A_S·D: the error is the rounding of the off-diagonal part only, several times below what
    rounding all of A_S·D would cost."""
    st = _stats(60, 200, 400, seed=1)
    A, B, D = st.A.double().numpy(), st.Bt.double().numpy(), st.D.double().numpy()
    s0, s1 = 16, 48
    ref = B[s0:s1] - A[s0:s1] @ D
    diag = np.diag(A).copy()
    got = _rounded_residual(st.Bt.numpy(), st.A.numpy(), st.D.numpy(), st.D.to(torch.bfloat16), diag, s0, s1)
    assert isinstance(got, np.ndarray) and got.shape == ref.shape
    off = A[s0:s1].copy()
    off[np.arange(s1 - s0), np.arange(s0, s1)] = 0
    err = np.abs(got - ref)
    assert err.max() <= 3 * BF16_EPS * np.abs(off @ D).max() + 1e-6
    full = np.abs(A[s0:s1] @ D).max()
    assert err.max() < 0.25 * BF16_EPS * full  # rounding the whole product would allow up to 2⁻⁸ of this
    same = _rounded_residual(st.Bt, st.A, st.D, st.D.to(torch.bfloat16), diag, s0, s1)  # tensors (the GPU path)
    assert isinstance(same, torch.Tensor)
    np.testing.assert_allclose(same.numpy(), got, rtol=0, atol=1e-6)


def test_bfloat16_sweep_is_the_atom_by_atom_loop_to_bfloat16_accuracy():
    st = _stats(70, 90, 300, seed=4)
    D0 = st.D.clone()
    ref = D0.double().clone()
    update_dictionary_reference(ref, st.A.double(), st.Bt.double())
    low = D0.clone()
    update_dictionary(low, st.A, st.Bt, block=8, super_block=24, precision=torch.bfloat16)
    assert float((ref - D0.double()).abs().max()) > 5e-2  # the sweep moved the atoms
    err = float((low.double() - ref).abs().max())
    assert err < 2e-3, err  # entries ~0.1: a wrong term or scale would be off by ~0.1
    assert float(torch.linalg.vector_norm(low, dim=1).max()) <= 1 + 1e-6


def test_a_bfloat16_fit_ends_where_the_float32_fit_does():
    """Same data, settings and stopping rule; the shared exact judge scores both dictionaries."""
    X, T, _ = planted_atoms(1200, 256, 24, seed=3)
    base = FitSettings(n_atoms=24, alpha=0.1, batch_size=128, tol=1e-2, patience=1, forget_exponent=4.0)
    f32 = learn_dictionary(X, base)
    b16 = learn_dictionary(X, FitSettings(**{**base.__dict__, "matmul_precision": "bfloat16"}))
    assert f32.matmul_precision == "float32" and b16.matmul_precision == "bfloat16"
    o32 = exact_scores(X, f32.state.D.numpy(), 0.1)["objective"]
    o16 = exact_scores(X, b16.state.D.numpy(), 0.1)["objective"]
    assert abs(o16 - o32) <= 0.01 * o32, (o16, o32)
    assert recovery(b16.state.D.numpy(), T) >= recovery(f32.state.D.numpy(), T) - 0.05


def test_the_stage_passes_the_precision_and_fingerprints_it_as_resolved(tmp_path, monkeypatch):
    """`dictionary.matmul_precision` reaches the learner (the stage and the GPU bench alike); the checkpoint
    fingerprint holds the type `auto` resolves to, so `auto` resumes the explicit setting it runs as."""
    from types import SimpleNamespace

    from ga_ray.atoms.stage import _fingerprint, fit_settings
    from ga_ray.bench.gpu import DictSizes, dict_settings
    from ga_ray.config import DictionaryConfig

    c = DictionaryConfig()
    assert c.matmul_precision == "auto" and fit_settings(c, 0, 100).matmul_precision == "auto"
    assert dict_settings(DictSizes(n_atoms=3, dim=4, n_rows=5))[0].matmul_precision == "auto"
    assert FitSettings(n_atoms=3, alpha=0.1).matmul_precision == "float32"  # the core learner's exact reference
    f = tmp_path / "z.parquet"
    f.write_bytes(b"x")
    pieces = [SimpleNamespace(path=str(f), row_group=0, start=0, n_rows=1)]
    f32, b16 = (c.model_copy(update={"matmul_precision": p}) for p in ("float32", "bfloat16"))
    assert _fingerprint(f32, 0, pieces, 4) != _fingerprint(b16, 0, pieces, 4)
    for native, twin in ((True, b16), (False, f32)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda native=native: native)
        assert _fingerprint(c, 0, pieces, 4, "cpu") == _fingerprint(twin, 0, pieces, 4, "cpu")
