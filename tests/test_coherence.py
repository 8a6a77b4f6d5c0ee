"""Coherence: orientation, the Σu formula, grouping, and the stage against a dense brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ga_ray.coherence.coherence import Group, GroupAccumulator, coherence_from_sums, dense_coherence, flatten_unit, plan_groups
from ga_ray.coherence.orient import active_counts, orient, oriented_coefs, positive_counts, top_documents

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ orientation


def test_orientation_constructed_case():
    # atom 0: active coefs -3, +1  -> sum -2 -> flipped; oriented +3 (doc 10), -1 (doc 11)
    # atom 1: +2, -1               -> kept
    # atom 2: +1, -1               -> sum 0 -> kept (ties keep +1)
    # atom 3: no documents (dead)  -> kept, empty top list
    doc = np.array([10, 11, 10, 12, 13, 14, 15])
    atom = np.array([0, 0, 1, 1, 2, 2, 1])
    coef = np.array([-3.0, 1.0, 2.0, -1.0, 1.0, -1.0, 0.5], dtype=np.float32)
    o = orient(atom, coef, 4)
    assert o.sign.tolist() == [-1.0, 1.0, 1.0, 1.0]
    assert o.flipped.tolist() == [True, False, False, False]
    np.testing.assert_allclose(o.coef_sum, [-2.0, 1.5, 0.0, 0.0])
    oc = oriented_coefs(atom, coef, o)
    np.testing.assert_allclose(oc, [3.0, -1.0, 2.0, -1.0, 1.0, -1.0, 0.5])
    # after orientation every non-dead atom's active coefficients sum to >= 0
    assert (np.bincount(atom, weights=oc, minlength=4) >= 0).all()
    ids, coefs = top_documents(doc, atom, oc, 4, top_n=2)
    assert ids == [[10], [10, 15], [13], []]  # positive oriented coefficients only, by decreasing coefficient
    np.testing.assert_allclose(coefs[1], [2.0, 0.5])
    assert active_counts(atom, coef, 4).tolist() == [2, 3, 2, 0]
    assert positive_counts(atom, oc, 4).tolist() == [1, 2, 1, 0]


def test_orientation_keeps_reconstruction():
    rng = np.random.default_rng(0)
    K, D, N = 5, 7, 30
    Dict = rng.normal(size=(K, D))
    C = rng.normal(size=(N, K)) * (rng.random((N, K)) < 0.4)
    doc, atom = np.nonzero(C)
    o = orient(atom, C[doc, atom], K)
    oc = oriented_coefs(atom, C[doc, atom], o)
    C2 = np.zeros_like(C)
    C2[doc, atom] = oc
    np.testing.assert_allclose(C2 @ (Dict * o.sign[:, None]), C @ Dict, atol=1e-5)


def test_top_documents_ties_and_limit():
    doc = np.array([5, 3, 4, 9, 1])
    atom = np.zeros(5, dtype=int)
    oc = np.array([1.0, 2.0, 2.0, 0.5, 2.0], dtype=np.float32)
    ids, coefs = top_documents(doc, atom, oc, 1, top_n=4)
    assert ids == [[1, 3, 4, 5]]  # equal coefficients: lower doc id first
    assert coefs[0] == [2.0, 2.0, 2.0, 1.0]


# -------------------------------------------------------------------------------------- formula


def test_sum_formula_equals_dense_with_groups():
    rng = np.random.default_rng(1)
    N, P = 40, 23
    G = rng.normal(size=(N, P)) + rng.normal(size=(1, P)) * 0.7  # shared component: non-trivial cosines
    G[7] = 0.0  # a zero gradient: cosine 0 with everything
    G[11] = np.nan  # a non-finite gradient: the same
    top = {a: sorted(rng.choice(N, size=int(rng.integers(0, 9)), replace=False).tolist()) for a in range(12)}
    top[3] = [7, 11, 2, 5]
    top[4] = [1]  # one document: no coherence
    groups = plan_groups(top, max_atoms_per_group=3, min_groups=2)
    got = np.full(12, np.nan)
    for g in groups:
        assert len(g.atoms) <= 3
        acc = GroupAccumulator(g, P)
        order = list(g.doc_ids)
        rng.shuffle(order)
        for s in range(0, len(order), 4):  # batches in an arbitrary order
            ids = order[s : s + 4]
            U, _, valid = flatten_unit({"b": torch.as_tensor(G[ids], dtype=torch.float32).reshape(len(ids), P, 1)}, ["b"])
            acc.add(ids, U, valid)
        res = acc.result()
        got[res["atom"]] = res["coherence"]
        if 3 in res["atom"]:
            assert res["invalid_docs"] == [7, 11]
    Gd = np.nan_to_num(G, nan=0.0)
    want = dense_coherence(Gd, [top[a] for a in range(12)])
    np.testing.assert_allclose(got, want, atol=1e-6, equal_nan=True)
    assert np.isnan(got[4])
    # every atom with >= 2 documents was planned exactly once
    planned = sorted(a for g in groups for a in g.atoms)
    assert planned == sorted(a for a, t in top.items() if len(t) >= 2)


def test_coherence_from_sums_identical_and_orthogonal():
    # k identical unit vectors: ‖Σu‖² = k² -> coherence 1; k orthonormal: ‖Σu‖² = k -> 0
    np.testing.assert_allclose(coherence_from_sums(np.array([25.0, 5.0]), np.array([5.0, 5.0]), np.array([5, 5])), [1.0, 0.0])
    assert np.isnan(coherence_from_sums(np.array([1.0]), np.array([1.0]), np.array([1]))[0])


def test_accumulator_rejects_missing_or_double_documents():
    g = Group(atoms=[0], members=[[1, 2]])
    acc = GroupAccumulator(g, 3)
    U = torch.eye(3)[:1]
    acc.add([1], U, torch.tensor([True]))
    with pytest.raises(RuntimeError, match="exactly once"):
        acc.result()


def test_plan_groups_packs_overlapping_atoms():
    top = {0: [1, 2, 3], 1: [10, 11], 2: [1, 2, 4], 3: [10, 12]}
    groups = plan_groups(top, max_atoms_per_group=2)
    assert [g.atoms for g in groups] == [[0, 2], [1, 3]]
    assert groups[0].doc_ids == [1, 2, 3, 4]


# ------------------------------------------------------------------------- raw gradients, dense


def _dense_raw_gradients(model, blocks, rows) -> np.ndarray:
    """Reference: one document at a time, torch.autograd.grad, flattened in block order (float64)."""
    import torch.nn.functional as F

    params = dict(model.named_parameters())
    ps = [params[b.name] for b in blocks]
    for p in ps:
        p.requires_grad_(True)
    out = []
    for r in rows:
        ids = torch.tensor([r["input_ids"]], dtype=torch.long)
        mask = torch.tensor(r["loss_mask"], dtype=torch.bool)
        logits = model(input_ids=ids).logits[0, :-1].float()
        ce = F.cross_entropy(logits[mask[1:]], ids[0, 1:][mask[1:]], reduction="sum")
        gs = torch.autograd.grad(ce, ps)
        out.append(torch.cat([g.reshape(-1) for g in gs]).double().numpy())
    return np.stack(out)


def test_computer_equals_dense_bruteforce():
    from conftest import make_random_docs, make_tiny_lora_model

    from ga_ray.coherence.stage import CoherenceComputer
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    model = make_tiny_lora_model(seed=3)
    blocks = find_lora_blocks(model)
    rows = make_random_docs(14, vocab_size=model.config.vocab_size, seed=3)
    docs = {r["doc_id"]: (r["input_ids"], r["loss_mask"]) for r in rows}
    G = _dense_raw_gradients(model, blocks, rows)
    assert G.shape[1] == sum(b.numel for b in blocks)
    top = {0: [0, 1, 2, 3, 4], 1: [3, 4, 5, 6], 2: [13, 12, 0], 3: list(range(14))}
    comp = CoherenceComputer(model, blocks, max_docs=3, max_tokens=40)
    got = {}
    for g in plan_groups(top, max_atoms_per_group=2):
        res = comp.run_group(g, docs)
        got.update(dict(zip(res["atom"], res["coherence"])))
    want = dense_coherence(G, [top[a] for a in range(4)])
    np.testing.assert_allclose([got[a] for a in range(4)], want, atol=1e-5)
    assert np.ptp(want) > 1e-3  # the atoms really differ: the test would catch a mix-up


# ------------------------------------------------------------------------------- stage, with Ray


def write_fake_atoms(atoms_dir: Path, doc_ids: np.ndarray, K: int = 6, D: int = 12, seed: int = 0, n_clusters: int = 3) -> None:
    """dictionary.safetensors, codes.parquet, metrics.json, kmeans.parquet as the atoms stage writes them."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    atoms_dir.mkdir(parents=True, exist_ok=True)
    Dm = rng.normal(size=(K, D)).astype(np.float32)
    Dm /= np.linalg.norm(Dm, axis=1, keepdims=True)
    Dm[K - 1] = 0.0  # a dead atom
    save_file({"dictionary": Dm}, str(atoms_dir / "dictionary.safetensors"))
    rows = []
    for d in doc_ids:
        for a in rng.choice(K - 1, size=2, replace=False):
            sign = -1.0 if a % 2 else 1.0  # odd atoms mostly negative: they must be flipped
            c = sign * float(rng.uniform(0.1, 1.0)) * (1 if rng.random() < 0.85 else -1)
            rows.append({"doc_id": int(d), "atom": int(a), "coef": c})
    t = pa.Table.from_pylist(rows, schema=pa.schema([("doc_id", pa.int64()), ("atom", pa.int32()), ("coef", pa.float32())]))
    pq.write_table(t, atoms_dir / "codes.parquet")
    pq.write_table(
        pa.table({"doc_id": pa.array(doc_ids, pa.int64()), "cluster": pa.array(np.arange(len(doc_ids)) % n_clusters, pa.int32())}),
        atoms_dir / "kmeans.parquet",
    )
    (atoms_dir / "metrics.json").write_text(json.dumps({"objective": 0.123, "fvu": 0.5, "dead_atoms": 1, "l0": {"mean": 2.0}}))


def _config(paths, **coh):
    from ga_ray.config import load_config

    sets = [
        f"model.path={paths['model']}",
        f"model.adapter={paths['adapter']}",
        "finetune.enabled=false",
        "ray.num_cpus=2",
        "coherence.top_docs=5",
        "coherence.batch_size=4",
        "coherence.group_memory_mb=0.0001",  # several groups even on a tiny model
    ] + [f"coherence.{k}={v}" for k, v in coh.items()]
    return load_config(None, sets)


def _run_coherence(cfg, run_root: Path) -> dict:
    """The stage function through the runner's StageContext (the coherence entry's declared config view), without
    the runner's upstream checks: the fixture run has no manifest records for prepare and atoms."""
    from ga_ray.coherence.stage import run_coherence
    from ga_ray.pipeline import StageContext
    from ga_ray.rundir import RunDir

    rd = RunDir(run_root)
    out = rd.stage_dir("coherence")
    out.mkdir(parents=True, exist_ok=True)
    return run_coherence(StageContext(cfg=cfg, run_dir=rd, stage="coherence", out=out))


@pytest.mark.slow
def test_coherence_stage_equals_dense_and_label_never_needed(ray_session, tmp_path):
    from conftest import make_tiny_lora_model, write_tiny_run

    from ga_ray.kernel.lora_blocks import find_lora_blocks
    paths = write_tiny_run(tmp_path / "a", n_docs=18, seed=5)
    table = pq.read_table(paths["data"])
    doc_ids = table.column("doc_id").to_numpy()
    write_fake_atoms(paths["run"] / "atoms", doc_ids)
    cfg = _config(paths, num_workers=2, cpus_per_worker=0.5)
    out = _run_coherence(cfg, paths["run"])
    from ga_ray.coherence import io as coherence_io

    atoms = coherence_io.load_atom_table(paths["run"]).to_pylist()
    assert [a["atom"] for a in atoms] == list(range(6))
    assert [a["sign"] for a in atoms] == [-1.0 if a["sign_flipped"] else 1.0 for a in atoms]
    # the coherence stage writes only its own folder: atoms/ holds what the atoms stage wrote
    assert sorted(p.name for p in (paths["run"] / "atoms").iterdir()) == ["codes.parquet", "dictionary.safetensors", "kmeans.parquet", "metrics.json"]
    assert sorted(p.name for p in (paths["run"] / "coherence").iterdir()) == sorted(
        [coherence_io.ATOM_TABLE, coherence_io.ORIENTED_DICTIONARY, coherence_io.CHARACTERISATION, coherence_io.DISCOVERY]
    )
    assert out["compute"]["n_groups"] >= 2

    # dense brute force over ALL documents, top sets and signs from the codes
    model = make_tiny_lora_model(seed=5)
    blocks = find_lora_blocks(model)
    rows = table.to_pylist()
    G = _dense_raw_gradients(model, blocks, rows)
    pos = {int(d): i for i, d in enumerate(doc_ids)}
    codes = pq.read_table(paths["run"] / "atoms" / "codes.parquet").to_pandas()
    for a in atoms:
        sub = codes[codes.atom == a["atom"]]
        s = sub.coef.sum()
        assert a["sign_flipped"] == bool(s < 0)
        oc = sub.coef * (-1 if s < 0 else 1)
        want_top = sub.assign(oc=oc)[oc > 0].sort_values(["oc", "doc_id"], ascending=[False, True]).doc_id.tolist()[:5]
        assert a["top_doc_ids"] == want_top
        assert a["n_active_docs"] == int((sub.coef != 0).sum())
        want = dense_coherence(G, [[pos[d] for d in want_top]])[0]
        if len(want_top) < 2:
            assert a["coherence"] is None or np.isnan(a["coherence"])
        else:
            assert abs(a["coherence"] - want) < 1e-5, (a["atom"], a["coherence"], want)
    assert atoms[5]["n_active_docs"] == 0 and atoms[5]["top_doc_ids"] == []

    # oriented dictionary
    from safetensors.numpy import load_file

    raw = load_file(str(paths["run"] / "atoms" / "dictionary.safetensors"))["dictionary"]
    ori_dictionary, ori_sign = coherence_io.load_oriented_dictionary(paths["run"])
    signs = np.where([a["sign_flipped"] for a in atoms], -1.0, 1.0)
    np.testing.assert_array_equal(ori_sign, signs)
    np.testing.assert_allclose(ori_dictionary, raw * signs[:, None])
    assert any(a["sign_flipped"] for a in atoms)

    char = coherence_io.load_characterisation(paths["run"])
    ex = char["atoms"]["0"]["examples"][0]
    assert ex["doc_id"] == atoms[0]["top_doc_ids"][0] and ex["response"]
    disc = coherence_io.load_discovery(paths["run"])
    assert disc["label_column"] == "task" and disc["n_families"] == 3 and "kmeans" in disc
    assert out["discovery"] is not None

    # the same run with the label column removed: identical atoms, no discovery score
    paths_b = write_tiny_run(tmp_path / "b", n_docs=18, seed=5)
    pq.write_table(table.drop(["task"]), paths_b["data"] / "part-00000.parquet")
    write_fake_atoms(paths_b["run"] / "atoms", doc_ids)
    (paths_b["run"] / "coherence").mkdir()
    (paths_b["run"] / "coherence" / coherence_io.DISCOVERY).write_text("{}")  # stale: must be removed
    # ... and labels from an OpenAI-compatible endpoint: a real local HTTP server
    from test_coherence_characterise import _Handler, serve

    with serve() as url:
        cfg_b = _config(paths_b, label_endpoint=url, label_model="tiny", label_top_atoms=2)
        out_b = _run_coherence(cfg_b, paths_b["run"])
    atoms_b = coherence_io.load_atom_table(paths_b["run"]).to_pylist()
    assert len(_Handler.requests) == 2 and out_b["labels"] == {"requested": 2, "ok": 2, "errors": 0}
    char_b = coherence_io.load_characterisation(paths_b["run"])
    best = max((a for a in atoms_b if a["coherence"] is not None and not np.isnan(a["coherence"])), key=lambda a: a["coherence"])
    got = char_b["atoms"][str(best["atom"])]
    assert got["label"] == "Arithmetic answers" and got["label_request"]["raw"] and "PROMPT:" in got["label_request"]["prompt"]
    for x, y in zip(atoms, atoms_b):
        assert x["top_doc_ids"] == y["top_doc_ids"] and x["sign_flipped"] == y["sign_flipped"]
        if x["coherence"] is not None and not np.isnan(x["coherence"]):
            assert abs(x["coherence"] - y["coherence"]) < 1e-6
    assert coherence_io.load_discovery(paths_b["run"]) is None
    assert not (paths_b["run"] / "coherence" / coherence_io.DISCOVERY).exists()
    assert coherence_io.exists(paths_b["run"]) and coherence_io.load_characterisation(paths_b["run"]) is not None
    assert out_b["discovery"] is None and "discovery score skipped" in out_b["line"]


def test_label_column_is_read_only_by_the_discovery_step():
    """Grep: the label column setting is used only by the discovery code (and defined in config)."""
    root = Path(__file__).resolve().parents[1] / "ga_ray"
    import re

    # the config setting (`cfg.coherence.label_column`) is read in coherence/stage.py (and by the
    # groups stage, which scores its groups against the same families)
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if re.search(r"\.label_column\b", p.read_text()))
    assert "coherence/stage.py" in users and set(users) <= {"coherence/stage.py", "groups/stage.py"}, users
    # and the label reader lives in the discovery module only
    readers = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "read_labels(" in p.read_text())
    assert set(readers) <= {"coherence/discovery.py", "coherence/stage.py", "groups/stage.py", "groups/discovery.py"}, readers
    # inside the coherence stage, code that touches it: the discovery scorer, and run_coherence's
    # summary line, written after the score
    import ast

    tree = ast.parse((root / "coherence" / "stage.py").read_text())
    users = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            lines = [n.lineno for n in ast.walk(fn) if isinstance(n, ast.Attribute) and n.attr == "label_column"]
            if lines:
                users[fn.name] = min(lines)
    assert set(users) == {"score_discovery", "run_coherence"}, users
    run = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "run_coherence")
    call = min(n.lineno for n in ast.walk(run) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "score_discovery")
    assert users["run_coherence"] > call


def test_adapter_num_params_reads_the_safetensors_header(tmp_path):
    from conftest import make_tiny_lora_model

    from ga_ray.finetune.io import adapter_num_params
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    model = make_tiny_lora_model(target_modules=("q_proj", "v_proj", "down_proj"), r=3)
    model.save_pretrained(tmp_path / "adapter")
    assert adapter_num_params(tmp_path / "adapter") == sum(b.numel for b in find_lora_blocks(model))
    assert adapter_num_params(tmp_path / "nowhere") is None
