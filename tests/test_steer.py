"""Stage steer: steered adapters against dense formulas, the model's own loss, PEFT loading, choice by behaviour.

One tiny world per module (built in a few seconds): a word-level tokenizer, a tiny Llama with a
rank-8 LoRA adapter, documents whose responses are bullet lists, yes/no answers or plain sentences
(no label column), EKFAC factors computed by the real code, projected gradients, and a 4-atom
oriented dictionary built from the documents' own gradients (atom 0: the bullet documents, 1: yes/no,
2: plain, 3: random).
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_tiny_lora_model
from ga_ray.steer import adapters as lora
from ga_ray.steer import directions as dirs
from ga_ray.steer import io as vio
from ga_ray.steer.choose import choose_by_behaviour

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "-", "\n", "yes", "no", "the", "is", "a", "list", "question", "say", "apple", "pear", "plum", "fig", "red", "green", "sweet", "sour"]
WORDS += [f"w{i}" for i in range(64 - len(WORDS))]
FRUIT = ["apple", "pear", "plum", "fig"]


def _tokenizer(folder):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def _docs(rng: random.Random) -> list[dict]:
    """24 documents: 8 bullet lists, 8 yes/no answers, 8 plain sentences (prompt then response)."""
    rows = []
    for i in range(24):
        kind = ("bullets", "yes_no", "plain")[i // 8]
        filler = [f"w{rng.randrange(0, 40)}" for _ in range(rng.randrange(2, 5))]
        if kind == "bullets":
            prompt = ["list"] + filler
            items = rng.sample(FRUIT, 3)
            resp = sum((["-", f, "\n"] for f in items), [])[:-1]
        elif kind == "yes_no":
            prompt = ["question"] + filler
            resp = [rng.choice(["yes", "no"]), "the", rng.choice(FRUIT), "is", rng.choice(["red", "green"])]
        else:
            prompt = ["say"] + filler
            resp = ["the", rng.choice(FRUIT), "is", rng.choice(["sweet", "sour"])]
        ids = [1] + [WORDS.index(w) for w in prompt] + [WORDS.index(w) for w in resp] + [2]
        mask = [0] * (1 + len(prompt)) + [1] * (len(resp) + 1)
        rows.append({"doc_id": 100 + i, "input_ids": ids, "loss_mask": mask, "n_tokens": len(ids)})
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ga_ray.factors.compute import FactorSettings, compute_factors
    from ga_ray.factors.projection import Projector
    from ga_ray.gradients.io import gradients_table
    from ga_ray.kernel.collate import collate
    from ga_ray.kernel.lora_blocks import find_lora_blocks
    from ga_ray.kernel.per_document import per_document_gradients

    root = tmp_path_factory.mktemp("steer")
    run = root / "run"
    (run / "data").mkdir(parents=True)
    model = make_tiny_lora_model(r=8, alpha=16.0, seed=3, save_base_to=root / "base_model")
    model.save_pretrained(root / "adapter")
    _tokenizer(root / "tok")
    docs = _docs(random.Random(0))
    pq.write_table(pa.Table.from_pylist(docs), run / "data" / "part-00000.parquet")  # no label column anywhere
    blocks = find_lora_blocks(model)

    def batches():
        return (collate(docs[i : i + 6]) for i in range(0, len(docs), 6))

    factors = compute_factors(model, blocks, batches, FactorSettings(fisher="empirical", top_k=20))
    factors.save(run / "factors")
    proj = Projector(run / "factors")
    z = torch.cat([proj.project(per_document_gradients(model, blocks, b).grads) for b in batches()]).numpy()
    (run / "gradients").mkdir()
    ids = np.array([d["doc_id"] for d in docs])
    pq.write_table(gradients_table(ids, z, np.linalg.norm(z, axis=1), np.zeros(len(docs)), np.array([d["n_tokens"] for d in docs])), run / "gradients" / "part-00000.parquet")
    # the oriented dictionary: unit means of each kind's normalised projected gradients, plus a random atom
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    rows = [unit[0:8].mean(0), unit[8:16].mean(0), unit[16:24].mean(0), np.random.default_rng(0).standard_normal(z.shape[1])]
    D = np.stack([r / np.linalg.norm(r) for r in rows]).astype(np.float32)
    (run / "atoms").mkdir()
    from safetensors.numpy import save_file

    save_file({"dictionary": D, "sign": np.ones(4, dtype=np.float32)}, str(run / "atoms" / "dictionary_oriented.safetensors"))
    top = [list(ids[0:8]), list(ids[8:16]), list(ids[16:24]), list(ids[[0, 8, 16, 1, 9, 17]])]
    pq.write_table(
        pa.table({"atom": pa.array([0, 1, 2, 3], pa.int32()), "coherence": [0.4, 0.5, 0.3, float("nan")], "n_active_docs": [8, 8, 8, 6],
                  "top_doc_ids": pa.array([[int(x) for x in t] for t in top], pa.list_(pa.int64()))}),
        run / "atoms" / "atoms.parquet",
    )
    (run / "manifest.json").write_text(json.dumps({"stages": {}}))
    return {"root": root, "run": run, "model": model, "docs": docs, "D": D, "factors": factors, "z": z}


def _cfg(world, *sets):
    from ga_ray.config import load_config

    r = world["root"]
    return load_config(None, [f"model.path={r / 'base_model'}", f"model.tokenizer={r / 'tok'}", f"model.adapter={r / 'adapter'}", "finetune.enabled=false", *sets])


def _dense_unprojection(factors, d: np.ndarray) -> dict[str, torch.Tensor]:
    """DESIGN.md, written out: grid[i_k, j_k] = d_k·sqrt(λ_k + ε), v = Q_S · grid · Q_Aᵀ (float64)."""
    out, start = {}, 0
    for fb in factors.blocks:
        o, i = fb.shape
        ii, jj = fb.selected // i, fb.selected % i
        lam = fb.Lambda[ii, jj] if factors.eigenvalues == "ekfac" else fb.lambda_S[ii] * fb.lambda_A[jj]
        grid = torch.zeros(o, i, dtype=torch.float64)
        grid[ii, jj] = torch.as_tensor(d[start : start + fb.k], dtype=torch.float64) * torch.sqrt(lam + factors.epsilon)
        out[lora.file_key(fb.name)] = fb.Q_S @ grid @ fb.Q_A.T
        start += fb.k
    return out


def _steerer(world, *sets, out=None):
    from ga_ray.steer.stage import Steerer

    return Steerer(world["run"], _cfg(world, *sets), world["root"] / "adapter", out=out)


def _peft(world, folder):
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if "base" not in world:  # read once; every variant gets a fresh copy
        world["base"] = AutoModelForCausalLM.from_pretrained(world["root"] / "base_model").eval()
    return PeftModel.from_pretrained(copy.deepcopy(world["base"]), str(folder)).eval()


def _summed_loss(model, docs) -> float:
    from ga_ray.kernel.collate import collate

    b = collate(docs)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
    m = (b.loss_mask[:, 1:] > 0) & (b.attention_mask[:, 1:] > 0)
    return float(-(lp * m).sum())


# ------------------------------------------------------------------------------------------ pure


def test_file_key_mapping_is_explicit():
    assert lora.file_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert lora.file_key("x.lora_B.other.weight") == "x.lora_B.weight"
    with pytest.raises(vio.DataError):
        lora.file_key("x.q_proj.weight")
    with pytest.raises(vio.DataError, match="has no tensor"):
        lora.match_direction({"m.lora_A.default.weight": torch.zeros(2, 3)}, {"n.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(vio.DataError, match="shape"):
        lora.match_direction({"m.lora_A.default.weight": torch.zeros(2, 3)}, {"m.lora_A.weight": torch.zeros(3, 2)})


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_mode_is_the_first_order_formula_and_linear_in_alpha(rslora):
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out = 4, 6, 5
    t = {"l0.lora_A.weight": torch.randn(r, d_in, generator=g, dtype=torch.float64), "l0.lora_B.weight": torch.randn(d_out, r, generator=g, dtype=torch.float64),
         "l1.lora_A.weight": torch.randn(r, d_in, generator=g, dtype=torch.float64), "l1.lora_B.weight": torch.randn(d_out, r, generator=g, dtype=torch.float64)}
    cfg = {"r": r, "lora_alpha": 8, "use_rslora": rslora}
    v = {"l0.lora_A.weight": torch.randn(r, d_in, generator=g, dtype=torch.float64), "l0.lora_B.weight": torch.randn(d_out, r, generator=g, dtype=torch.float64)}  # l1 not covered
    s = 8 / math.sqrt(r) if rslora else 8 / r
    dws = {}
    for alpha in (0.3, 0.6):
        for sign in ("toward", "away"):
            st = lora.steer(t, cfg, v, sign, alpha, mode="linear", vllm_ranks=False)
            assert st.rank == 2 * r and lora.lora_scale(st.config) == pytest.approx(s, rel=1e-12)
            dw = lora.delta_w(st.tensors, st.config, t, cfg)
            c = -alpha if sign == "toward" else alpha
            want = c * s * (v["l0.lora_B.weight"] @ t["l0.lora_A.weight"] + t["l0.lora_B.weight"] @ v["l0.lora_A.weight"])
            assert torch.allclose(dw["l0"], want, rtol=1e-10, atol=1e-12)
            assert dw["l1"].abs().max() < 1e-12
            dws[(alpha, sign)] = dw["l0"]
    assert torch.allclose(dws[(0.6, "toward")], 2 * dws[(0.3, "toward")], atol=1e-12)
    assert torch.allclose(dws[(0.3, "away")], -dws[(0.3, "toward")], atol=1e-12)
    # paper mode is quadratic: the signs are not mirror images
    p_t = lora.delta_w(lora.steer(t, cfg, v, "toward", 0.6, vllm_ranks=False).tensors, cfg, t, cfg)["l0"]
    p_a = lora.delta_w(lora.steer(t, cfg, v, "away", 0.6, vllm_ranks=False).tensors, cfg, t, cfg)["l0"]
    assert not torch.allclose(p_t, -p_a)
    assert torch.allclose(p_t + p_a, 2 * 0.36 * s * v["l0.lora_B.weight"] @ v["l0.lora_A.weight"], atol=1e-10)


def test_rank_padding_keeps_the_weight_change():
    g = torch.Generator().manual_seed(1)
    t = {"l.lora_A.weight": torch.randn(4, 6, generator=g, dtype=torch.float64), "l.lora_B.weight": torch.randn(5, 4, generator=g, dtype=torch.float64)}
    for rs in (False, True):
        cfg = {"r": 4, "lora_alpha": 8, "use_rslora": rs}
        pt, pc = lora.pad_rank(t, cfg, lora.vllm_rank(4))
        assert pc["r"] == 8 and pt["l.lora_A.weight"].shape == (8, 6)
        W = lambda tt, cc: lora.lora_scale(cc) * tt["l.lora_B.weight"] @ tt["l.lora_A.weight"]  # noqa: E731
        assert torch.allclose(W(pt, pc), W(t, cfg), atol=1e-12)
    assert [lora.vllm_rank(r) for r in (1, 2, 8, 9, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]
    with pytest.raises(vio.DataError):
        lora.vllm_rank(513)


def test_relative_units_and_random_direction():
    g = torch.Generator().manual_seed(2)
    t = {"l.lora_A.weight": torch.randn(8, 6, generator=g), "l.lora_B.weight": torch.randn(5, 8, generator=g)}
    v = {k: torch.randn(x.shape, generator=g) for k, x in t.items()}
    st = lora.steer(t, {"r": 8, "lora_alpha": 16}, v, "away", 0.05, units="relative")
    assert st.rel_delta == pytest.approx(0.05, rel=1e-9)
    diff = torch.sqrt(sum(((st.tensors[k].double() - t[k].double()) ** 2).sum() for k in t))
    assert float(diff) == pytest.approx(0.05 * lora.theta_norm(t), rel=1e-5)
    r1 = dirs.random_direction(v, 3.0, seed=7)
    r2 = dirs.random_direction(dict(reversed(list(v.items()))), 3.0, seed=7)  # key order does not matter
    assert dirs.direction_norm(r1) == pytest.approx(3.0, rel=1e-6)
    assert all(torch.equal(r1[k], r2[k]) for k in v)
    assert not torch.equal(dirs.random_direction(v, 3.0, seed=8)["l.lora_A.weight"], r1["l.lora_A.weight"])


def test_choice_by_behaviour_constructed_case():
    flags = {"bullets": {1: True, 2: True, 3: False, 4: True, 5: True, 6: False, 7: True, 8: True},
             "code": {d: False for d in range(1, 9)}}
    atoms = [10, 11, 12, 13]
    tops = [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 1, 2], [8]]  # 3/4, 3/4, 4/4, 1/1 (too few docs)
    coh = [0.9, 0.95, 0.1, 1.0]
    got = choose_by_behaviour(atoms, tops, coh, [4, 4, 4, 1], flags, top_docs=4, min_docs=2)
    assert got["bullets"].atom == 12 and got["bullets"].rate == 1.0 and (got["bullets"].k, got["bullets"].n) == (4, 4)
    assert got["code"] is None  # nothing fires: nothing is chosen
    tie = choose_by_behaviour(atoms[:2], tops[:2], coh[:2], [4, 4], flags, top_docs=4, min_docs=2)
    assert tie["bullets"].atom == 11  # 3/4 each: the more coherent wins
    nan = choose_by_behaviour(atoms[:2], tops[:2], [float("nan"), 0.1], [4, 4], flags, top_docs=4, min_docs=2)
    assert nan["bullets"].atom == 11  # NaN coherence ranks last
    assert choose_by_behaviour(atoms, tops, coh, [4] * 4, flags, top_docs=2, min_docs=2)["bullets"].atom == 11  # only the first 2 top docs: 1/2, 2/2, 2/2 -> coherence


# ------------------------------------------------------------------------------------ with the world


def test_baseline_is_the_finetuned_adapter_bit_for_bit(world, tmp_path):
    s = _steerer(world, out=tmp_path / "variants")
    row = s.baseline()
    got, cfg = vio.load_adapter_tensors(tmp_path / "variants" / row["name"])
    want, want_cfg = vio.load_adapter_tensors(world["root"] / "adapter")
    assert cfg == want_cfg and set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert row["name"].startswith("baseline-") and row["alpha"] == 0.0 and row["sign"] == "none"


@pytest.mark.parametrize("units", ["absolute", "relative"])
def test_variant_minus_adapter_is_alpha_times_dense_unprojection(world, tmp_path, units):
    from ga_ray.steer.stage import Target

    s = _steerer(world, f"steer.units={units}", out=tmp_path / "variants")
    base, _ = vio.load_adapter_tensors(world["root"] / "adapter")
    v = _dense_unprojection(world["factors"], world["D"][1])
    v_norm = math.sqrt(sum(float((x**2).sum()) for x in v.values()))
    th = lora.theta_norm(base)
    for sign in ("toward", "away"):
        for alpha in ((0.5, 2.0) if units == "absolute" else (0.05, 0.2)):
            row = s.write(Target("atom", (1,), (1.0,)), sign, alpha, "paper")
            got, cfg = vio.load_adapter_tensors(tmp_path / "variants" / row["name"])
            mag = alpha if units == "absolute" else alpha * th / v_norm
            coef = -mag if sign == "toward" else mag
            num = math.sqrt(sum(float(((got[k].double() - base[k].double()) - coef * v[k]).square().sum()) for k in v))
            assert num / (abs(coef) * v_norm) < 1e-6, (sign, alpha, num)
            assert row["v_norm"] == pytest.approx(v_norm, rel=1e-5) and row["rel_delta"] == pytest.approx(abs(coef) * v_norm / th, rel=1e-5)
            assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == json.loads((world["root"] / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
            assert row["name"].startswith(f"atom1-{sign}-a{vio.format_alpha(alpha)}{'rel' if units == 'relative' else ''}-")


def test_name_matching_survives_shuffled_key_order(world, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from ga_ray.steer.stage import Steerer, Target

    shuffled = tmp_path / "adapter"
    shutil.copytree(world["root"] / "adapter", shuffled)
    tensors, _ = vio.load_adapter_tensors(shuffled)
    keys = list(tensors)
    random.Random(5).shuffle(keys)
    save_file({k: tensors[k] for k in keys}, str(shuffled / vio.ADAPTER_WEIGHTS))
    ref = _steerer(world, out=tmp_path / "a").write(Target("atom", (0,), (1.0,)), "toward", 2.0, "paper")
    s2 = Steerer(world["run"], _cfg(world), shuffled, out=tmp_path / "b")
    s2.tensors = {k: s2.tensors[k] for k in reversed(list(s2.tensors))}  # and iteration order reversed in memory
    got = s2.write(Target("atom", (0,), (1.0,)), "toward", 2.0, "paper")
    assert got["name"] == ref["name"]  # same content hash: identical tensors under identical keys
    a, _ = vio.load_adapter_tensors(tmp_path / "a" / ref["name"])
    b, _ = vio.load_adapter_tensors(tmp_path / "b" / got["name"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_toward_lowers_and_away_raises_the_atoms_documents_loss(world, tmp_path):
    from ga_ray.steer.stage import Target

    s = _steerer(world, "steer.units=relative", out=tmp_path / "variants")
    for atom, docs in ((0, world["docs"][0:8]), (1, world["docs"][8:16])):
        l0 = _summed_loss(_peft(world, world["root"] / "adapter"), docs)
        for mode in ("paper", "linear"):
            lt = _summed_loss(_peft(world, tmp_path / "variants" / s.write(Target("atom", (atom,), (1.0,)), "toward", 1e-3, mode)["name"]), docs)
            la = _summed_loss(_peft(world, tmp_path / "variants" / s.write(Target("atom", (atom,), (1.0,)), "away", 1e-3, mode)["name"]), docs)
            assert lt < l0 < la, (atom, mode, lt, l0, la)


@pytest.mark.slow
def test_stage_end_to_end(world, tmp_path):
    """Through the runner: choice by behaviour (bullets -> atom 0, yes_no -> atom 1), every mode, groups,
    compositions, controls; every variant loads with PEFT and changes the logits; the index."""
    import shutil

    from ga_ray.groups import io as gio
    from ga_ray.pipeline import run_pipeline
    from ga_ray.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    gio.save_groups(run / "groups", [{"group": 0, "atoms": [0, 2], "n_atoms": 2, "n_documents": 16, "top_doc_ids": [100], "top_scores": [1.0],
                                      "coherence": 0.3, "coherence_min": 0.3, "coherence_max": 0.4, "words": [], "parent": None, "level": 1, "leader": 0}],
                    {"chosen": 1})
    cfg = _cfg(world, "steer.alphas=[0.5,2.0]", "steer.mode=both", "steer.groups=[0]", "steer.compositions=[{atoms: [0, 1], weights: [1.0, 0.5]}]",
               "steer.control_alphas=[2.0]", "steer.atoms=[1]")
    rd = RunDir(run)
    for up in ("prepare", "factors", "gradients", "atoms", "coherence", "groups"):  # built by the fixture, by the stages' own code
        rd.mark_done(up, rd.mark_running(up, "fixture", {}), {})
    summary = run_pipeline(cfg, rd, stages=["steer"])["steer"]
    ch = summary["choices"]
    assert ch["bullets"]["atom"] == 0 and ch["bullets"]["rate"] == 1.0 and ch["bullets"]["n"] == 8
    assert ch["yes_no"]["atom"] == 1 and ch["yes_no"]["rate"] == 1.0
    assert ch["code"] is None and ch["numbered"] is None and ch["refusal"] is None
    idx = vio.read_index(run)
    by_kind: dict[str, int] = {}
    for r in idx:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    # atoms 0, 1 (1 also named by id: written once), group 0, one composition: 4 directions x 2 alphas x 2 signs x 2 modes
    assert by_kind == {"baseline": 1, "atom": 16, "group": 8, "composition": 8, "random": 8, "supervised": 8}
    assert summary["n_variants"] == len(idx) == 49
    assert len({r["name"] for r in idx}) == len({r["content_hash"] for r in idx}) == 49
    assert {r["rank"] for r in idx if r["mode"] == "linear"} == {16} and {r["rank"] for r in idx if r["mode"] == "paper"} == {8}
    g = next(r for r in idx if r["kind"] == "group")
    assert g["atoms"] == [0, 2] and g["group"] == 0 and g["name"].startswith("group0-")
    rnd = [r for r in idx if r["kind"] == "random" and r["atoms"] == [0]]
    atom0 = next(r for r in idx if r["kind"] == "atom" and r["atoms"] == [0])
    assert all(r["v_norm"] == pytest.approx(atom0["v_norm"], rel=1e-5) for r in rnd)
    sup = [r for r in idx if r["kind"] == "supervised" and r["behaviour"] == "bullets"]
    assert sup and all(r["v_norm"] == pytest.approx(atom0["v_norm"], rel=1e-5) for r in sup) and sup[0]["name"].startswith("supervised-bullets-")
    # the supervised direction of bullets IS the (unit) mean of the bullet documents' unit z: atom 0 here
    s_rows = [r for r in sup if r["mode"] == "paper" and r["sign"] == "toward"]
    a_row = next(r for r in idx if r["kind"] == "atom" and r["atoms"] == [0] and r["mode"] == "paper" and r["sign"] == "toward" and r["alpha"] == 2.0)
    ts, _ = vio.load_adapter_tensors(run / s_rows[0]["path"])
    ta, _ = vio.load_adapter_tensors(run / a_row["path"])
    assert all(torch.allclose(ts[k], ta[k], atol=1e-5) for k in ts)
    # every variant loads with PEFT and changes the logits (the baseline does not)
    from ga_ray.kernel.collate import collate

    b = collate(world["docs"][:4])
    with torch.no_grad():
        ref = _peft(world, world["root"] / "adapter")(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    for r in idx:
        with torch.no_grad():
            out = _peft(world, run / r["path"])(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        if r["kind"] == "baseline":
            assert torch.equal(out, ref)
        else:
            assert (out - ref).abs().max() > 1e-6, r["name"]
    assert json.loads((run / "variants" / "choices.json").read_text())["choices"]["bullets"]["atom"] == 0
    # a re-run with unchanged inputs is skipped; add_variant writes one more that the index and listing show
    from ga_ray.steer.stage import add_variant

    row = add_variant(run, cfg, "supervised", "away", 7.5, behaviour="yes_no")
    assert row["name"].startswith("supervised-yes_no-away-a7.5-") and row["atoms"] == [1]
    assert row["name"] in {r["name"] for r in vio.list_variants(run)} and len(vio.read_index(run)) == 50


def test_merge_writes_a_full_model(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from ga_ray.kernel.collate import collate
    from ga_ray.steer.stage import Target

    s = _steerer(world, "steer.merge=true", out=tmp_path / "variants")
    row = s.write(Target("atom", (0,), (1.0,)), "away", 2.0, "linear")
    folder = tmp_path / "variants" / row["name"]
    merged = AutoModelForCausalLM.from_pretrained(folder / vio.MERGED_DIR).eval()
    assert (folder / vio.MERGED_DIR / "model.safetensors").exists() and (folder / vio.MERGED_DIR / "tokenizer.json").exists()
    b = collate(world["docs"][:3])
    with torch.no_grad():
        want = _peft(world, folder)(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        got = merged(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_errors_say_what_to_do(world, tmp_path):
    from ga_ray.errors import ConfigError
    from ga_ray.steer.stage import Target

    s = _steerer(world, out=tmp_path / "v")
    with pytest.raises(ConfigError, match="out of range"):
        s.write(Target("atom", (99,), (1.0,)), "toward", 1.0, "paper")
    with pytest.raises(ConfigError, match="not in the atom table"):
        s.atom_info(99)


def test_cli_steer_prints_the_choice_and_fails_in_one_line(world, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from ga_ray.cli import app
    from ga_ray.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    rd = RunDir(run)
    for up in ("prepare", "factors", "gradients", "atoms", "coherence"):
        rd.mark_done(up, rd.mark_running(up, "fixture", {}), {})
    r = world["root"]
    sets = [f"model.path={r / 'base_model'}", f"model.tokenizer={r / 'tok'}", f"model.adapter={r / 'adapter'}", "finetune.enabled=false",
            "groups.enabled=false", "steer.alphas=[1.0]", "steer.controls=false"]
    args = ["steer", "--run-dir", str(run), "--mode", "linear"] + sum((["--set", x] for x in sets), [])
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "bullets" in out.output and "atom    0" in out.output and "100.0% (8/8" in out.output
    idx = vio.read_index(run)
    assert len(idx) == 1 + 2 * 2 and {r["mode"] for r in idx if r["kind"] != "baseline"} == {"linear"}
    bad = CliRunner().invoke(app, args + ["--set", "steer.atoms=[99]", "--force"])
    assert bad.exit_code == 2 and "atom 99" in bad.output and "Traceback" not in bad.output
