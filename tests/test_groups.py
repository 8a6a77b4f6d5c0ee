"""Groups: similarities against dense references, a constructed case grouped right, determinism, the
stage on a small run directory without a label column, and the group discovery score on hand-made cases."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ga_ray.coherence.discovery import Families
from ga_ray.groups import grouping as gp
from ga_ray.groups import io as gio
from ga_ray.groups.discovery import group_discovery


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(gp.relabel(a), gp.relabel(b))


def constructed_world(seed: int = 0, n_fam: int = 4, atoms_per_fam: int = 5, docs_per_fam: int = 40, D: int = 32):
    """Atoms built from known directions: family f's atoms = base_f + small noise; each document of family f
    uses two or three of its family's atoms (positive coefficients) and its gradient z is their combination."""
    rng = np.random.default_rng(seed)
    base = np.linalg.qr(rng.normal(size=(D, n_fam)))[0].T  # orthonormal family directions
    K = n_fam * atoms_per_fam
    fam_of_atom = np.repeat(np.arange(n_fam), atoms_per_fam)
    dictionary = base[fam_of_atom] + 0.35 * rng.normal(size=(K, D)) / np.sqrt(D)
    # shuffle atom ids so that families are not contiguous
    perm = rng.permutation(K)
    dictionary, fam_of_atom = dictionary[perm], fam_of_atom[perm]
    doc, atom, coef, Z, doc_fam = [], [], [], [], []
    for f in range(n_fam):
        mine = np.flatnonzero(fam_of_atom == f)
        for _ in range(docs_per_fam):
            d = len(doc_fam)
            used = rng.choice(mine, size=int(rng.integers(2, 4)), replace=False)
            c = rng.uniform(0.3, 1.0, size=len(used))
            doc += [d] * len(used)
            atom += used.tolist()
            coef += c.tolist()
            Z.append(c @ dictionary[used] + 0.05 * rng.normal(size=D))
            doc_fam.append(f)
    return {
        "dictionary": dictionary,
        "fam_of_atom": fam_of_atom,
        "doc": np.asarray(doc, dtype=np.int64),
        "atom": np.asarray(atom, dtype=np.int64),
        "coef": np.asarray(coef),
        "Z": np.asarray(Z),
        "doc_fam": np.asarray(doc_fam),
        "K": K,
    }


def _top_docs(doc, atom, coef, K, n=20):
    out = []
    for k in range(K):
        sel = np.flatnonzero(atom == k)
        out.append(doc[sel][np.lexsort((doc[sel], -coef[sel]))][:n].tolist())
    return out


# ------------------------------------------------------------------------------- similarities


def test_coactivation_matches_dense_reference():
    rng = np.random.default_rng(1)
    N, K = 30, 7
    dense = np.where(rng.random((N, K)) < 0.3, rng.normal(size=(N, K)), 0.0)
    dense[:, 6] = 0.0  # a dead atom
    d, a = np.nonzero(dense)
    S = gp.coactivation_similarity(d, a, dense[d, a], K)
    P = np.clip(dense, 0, None)  # only positive oriented coefficients count
    n = np.linalg.norm(P, axis=0)
    ref = (P.T @ P) / np.where(np.outer(n, n) > 0, np.outer(n, n), 1.0)
    np.fill_diagonal(ref, 1.0)
    np.testing.assert_allclose(S, ref, atol=1e-12)
    assert S[6, :6].tolist() == [0.0] * 6


def test_mean_unit_rows_and_cosine_reference():
    rng = np.random.default_rng(2)
    Z = rng.normal(size=(10, 4)) * rng.uniform(0.1, 5, size=(10, 1))
    row_of = {100 + i: i for i in range(10)}
    tops = [[100, 101, 102], [105], [], [109, 999]]  # 999 unknown: ignored
    M = gp.mean_unit_rows(Z, row_of, tops)
    U = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    np.testing.assert_allclose(M[0], U[:3].mean(0))
    np.testing.assert_allclose(M[1], U[5])
    assert not M[2].any()
    np.testing.assert_allclose(M[3], U[9])
    S = gp.cosine_rows(M)
    from sklearn.metrics.pairwise import cosine_similarity

    ref = cosine_similarity(M)
    np.fill_diagonal(ref, 1.0)
    np.testing.assert_allclose(S, ref, atol=1e-12)


def test_combine_weights():
    A, B = np.full((3, 3), 0.2), np.full((3, 3), 0.8)
    S = gp.combine({"coactivation": A, "gradient": B, "dictionary": -A}, {"coactivation": 1.0, "gradient": 3.0, "dictionary": 0.0})
    assert S[0, 1] == pytest.approx(0.65) and S[0, 0] == 1.0
    with pytest.raises(ValueError, match="positive weight"):
        gp.combine({"coactivation": A}, {"coactivation": 0.0})


# ------------------------------------------------------------------------ the constructed case


@pytest.mark.parametrize("criterion", ["modularity", "silhouette"])
@pytest.mark.parametrize("signals", [("coactivation",), ("gradient",), ("coactivation", "gradient")])
def test_constructed_atoms_group_by_family(signals, criterion):
    w = constructed_world()
    K = w["K"]
    sims = {
        "coactivation": gp.coactivation_similarity(w["doc"], w["atom"], w["coef"], K),
        "gradient": gp.cosine_rows(gp.mean_unit_rows(w["Z"], {i: i for i in range(len(w["Z"]))}, _top_docs(w["doc"], w["atom"], w["coef"], K))),
    }
    g = gp.group_atoms(sims, {s: 1.0 for s in signals}, max_groups=10, criterion=criterion)
    assert g.n_groups == 4 and g.criterion.startswith(criterion) and g.score_name == criterion
    assert g.scores == g.all_scores[criterion] and set(g.all_scores) == {"modularity", "silhouette"}
    assert _same_partition(g.labels, w["fam_of_atom"])
    assert g.linkage.shape == (K - 1, 4)
    # the hierarchy can be cut finer or coarser
    assert len(np.unique(g.labels_at(2))) == 2 and len(np.unique(g.labels_at(8))) == 8


def test_dictionary_geometry_alone_groups_the_constructed_atoms():
    w = constructed_world(seed=3)
    g = gp.group_atoms({"dictionary": gp.cosine_rows(w["dictionary"])}, {"dictionary": 1.0}, max_groups=10)
    assert _same_partition(g.labels, w["fam_of_atom"])


def test_grouping_is_deterministic_and_cut_can_be_given():
    w = constructed_world(seed=5)
    K = w["K"]
    sims = {"coactivation": gp.coactivation_similarity(w["doc"], w["atom"], w["coef"], K)}
    a = gp.group_atoms(sims, {"coactivation": 1.0})
    b = gp.group_atoms({k: v.copy() for k, v in sims.items()}, {"coactivation": 1.0})
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.linkage, b.linkage) and a.scores == b.scores
    c = gp.group_atoms(sims, {"coactivation": 1.0}, n_groups=6)
    assert c.n_groups == 6 and c.criterion.startswith("given") and len(np.unique(c.labels)) == 6


def test_silhouette_matches_sklearn_on_features():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(4)
    X = rng.normal(size=(15, 3))
    labels = np.arange(15) % 3
    D = np.linalg.norm(X[:, None] - X[None], axis=2)
    assert gp.silhouette(D, labels) == pytest.approx(silhouette_score(X, labels))


def test_group_document_scores_top_and_dominant():
    # 3 docs × 3 atoms; atoms 0, 1 in group 0, atom 2 in group 1
    doc = np.array([10, 10, 11, 12, 12])
    atom = np.array([0, 2, 1, 2, 0])
    coef = np.array([0.5, 0.7, 0.2, 0.1, -0.4])  # the negative one is not active
    M, docs = gp.positive_code_matrix(doc, atom, coef, 3)
    assert docs.tolist() == [10, 11, 12]
    S = gp.group_document_scores(M, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(S, [[0.5, 0.7], [0.2, 0.0], [0.0, 0.1]])
    assert gp.top_group_documents(S, docs, 5) == [[10, 11], [10, 12]]
    assert gp.dominant_group(S).tolist() == [1, 0, 1]


# -------------------------------------------------------------------- the score, by hand


def test_group_discovery_on_a_hand_computed_case():
    # families: A = docs 0-3, B = docs 4-7 (8 and 9 unlabelled)
    fam = Families(np.arange(10), np.array(["A"] * 4 + ["B"] * 4 + [None, None], dtype=object))
    docs = np.arange(10)
    # group 0 holds docs 0,1,2 (+ 4 by union only); group 1 holds 4..9 and doc 3
    S = np.zeros((10, 2))
    S[[0, 1, 2], 0] = 1.0
    S[4, 0] = 0.2
    S[[3, 4, 5, 6, 7, 8, 9], 1] = 1.0
    atom_pairs = (np.array([0, 0, 1]), np.array([0, 4, 5]))
    km = {"kmeans_groups": (np.arange(10), np.array([0, 1] * 5))}
    out = group_discovery(fam, docs, S, 2, atom_pairs, 2, kmeans=km)
    a = {r["family"]: r for r in out["groups_best"]["families"]}
    # A: group 0 dominant docs {0,1,2}: P = 1, R = 3/4, F1 = 6/7
    assert a["A"]["group"] == 0 and a["A"]["precision"] == 1.0 and a["A"]["recall"] == 0.75
    assert a["A"]["f1"] == pytest.approx(6 / 7)
    # B: group 1 dominant docs {3,4,5,6,7,8,9}: P = 4/7, R = 1, F1 = 8/11
    assert a["B"]["group"] == 1 and a["B"]["f1"] == pytest.approx(8 / 11)
    u = {r["family"]: r for r in out["groups_best_union"]["families"]}
    # union: group 0 = {0,1,2,4}: A: P = 3/4, R = 3/4
    assert u["A"]["f1"] == pytest.approx(0.75)
    at = {r["family"]: r for r in out["atoms_best"]["families"]}
    # atom 0 = {0, 4}: A P=1/2 R=1/4 F1=1/3; atom 1 = {5}: B P=1 R=1/4 F1=0.4
    assert at["A"]["f1"] == pytest.approx(1 / 3) and at["B"]["f1"] == pytest.approx(0.4)
    k = {r["family"]: r for r in out["kmeans_groups"]["families"]}
    # cluster 0 = {0,2,4,6,8}: A P=2/5 R=1/2 -> 4/9; B: 2/5, 1/2 -> 4/9 (cluster 1 the same)
    assert k["A"]["f1"] == pytest.approx(4 / 9) and k["B"]["f1"] == pytest.approx(4 / 9)
    assert out["groups_best"]["mean_f1"] == pytest.approx((6 / 7 + 8 / 11) / 2)
    assert out["goal"]["margin_over_best_kmeans"] == pytest.approx((6 / 7 + 8 / 11) / 2 - 4 / 9, abs=1e-4)
    assert [r["method"].split(" ")[0] for r in out["table"]] == ["groups", "groups", "atoms", "k-means,"]


# --------------------------------------------------------------------- the stage, no label


def make_stage_run(root, w, with_label: bool):
    """A run directory with what the groups stage reads: atoms/, coherence table, gradients/, data/."""
    from safetensors.numpy import save_file

    from ga_ray.gradients.io import gradients_table

    K, N = w["K"], len(w["Z"])
    (root / "atoms").mkdir(parents=True)
    (root / "gradients").mkdir()
    (root / "data").mkdir()
    # flip the sign of two atoms: the stage must orient with the coherence table's sign
    flip = np.zeros(K, dtype=bool)
    flip[[1, 4]] = True
    raw = w["coef"] * np.where(flip, -1.0, 1.0)[w["atom"]]
    pq.write_table(pa.table({"doc_id": pa.array(w["doc"]), "atom": pa.array(w["atom"].astype(np.int32)), "coef": pa.array(raw.astype(np.float32))}), root / "atoms" / "codes.parquet")
    save_file({"dictionary": (w["dictionary"] * np.where(flip, -1.0, 1.0)[:, None]).astype(np.float32)}, str(root / "atoms" / "dictionary.safetensors"))
    tops = _top_docs(w["doc"], w["atom"], w["coef"], K)
    pq.write_table(
        pa.table(
            {
                "atom": pa.array(np.arange(K, dtype=np.int32)),
                "coherence": pa.array(np.linspace(0.9, 0.1, K)),
                "top_doc_ids": pa.array(tops, pa.list_(pa.int64())),
                "sign_flipped": pa.array(flip),
            }
        ),
        root / "atoms" / "atoms.parquet",
    )
    ids = np.arange(N)
    pq.write_table(gradients_table(ids, w["Z"], np.ones(N), np.ones(N), np.ones(N)), root / "gradients" / "part-0.parquet")
    data = {"doc_id": pa.array(ids), "input_ids": pa.array([[1, 2, 3, 4 + int(f)] for f in w["doc_fam"]]), "loss_mask": pa.array([[0, 0, 1, 1]] * N)}
    if with_label:
        data["task"] = pa.array([f"fam{f}" for f in w["doc_fam"]])
    pq.write_table(pa.table(data), root / "data" / "part-0.parquet")
    return root


def _run_stage(root, **groups):
    from ga_ray.config import RunConfig
    from ga_ray.groups.stage import run_groups
    from ga_ray.pipeline import StageContext
    from ga_ray.rundir import RunDir

    cfg = RunConfig.model_validate({"groups": {"raw_coherence": False, **groups}, "coherence": {"background_docs": 50}})
    rd = RunDir(root)
    return run_groups(StageContext(cfg, rd, "groups", rd.stage_dir("groups"))), cfg


def test_stage_without_label_column(tmp_path):
    w = constructed_world(seed=7)
    root = make_stage_run(tmp_path / "run", w, with_label=False)
    summary, _ = _run_stage(root)
    assert summary["n_groups"] == 4 and summary["discovery"] is None
    t = gio.load_groups(root).to_pylist()
    assert len(t) == 4 and t[0]["group"] == 0
    assert sorted(a for r in t for a in r["atoms"]) == list(range(w["K"]))
    for r in t:  # every group is one family
        assert len({int(w["fam_of_atom"][a]) for a in r["atoms"]}) == 1
        assert r["n_atoms"] == len(r["atoms"]) and r["leader"] == r["atoms"][0]
        assert r["top_scores"] == sorted(r["top_scores"], reverse=True)
    coh = [r["coherence"] for r in t]
    assert coh == sorted(coh, reverse=True)
    tree = gio.load_tree(root)
    assert tree["chosen"] == 4 and len(tree["linkage"]) == w["K"] - 1
    assert tree["score_name"] == "modularity" and tree["criterion"].startswith("modularity")
    assert set(tree["all_scores"]) == {"modularity", "silhouette"} and tree["scores"] == tree["all_scores"]["modularity"]
    assert summary["modularity"] == pytest.approx(tree["scores"]["4"], abs=1e-4)
    assert len(tree["neighbours"]) == w["K"] and all(len(n) == 5 for n in tree["neighbours"])
    assert not (root / "groups" / gio.DISCOVERY_FILE).exists()
    # deterministic: a second run writes the same table
    summary2, _ = _run_stage(root)
    assert gio.load_groups(root).to_pylist() == t


def test_stage_label_only_reaches_the_score(tmp_path):
    w = constructed_world(seed=7)
    a = make_stage_run(tmp_path / "a", w, with_label=False)
    b = make_stage_run(tmp_path / "b", w, with_label=True)
    _run_stage(a, kmeans_baseline=True)
    s, _ = _run_stage(b, kmeans_baseline=True)
    assert gio.load_groups(a).to_pylist() == gio.load_groups(b).to_pylist()
    disc = gio.load_discovery(b)
    assert disc["n_families"] == 4 and disc["groups_best"]["n_recovered"] == 4
    assert disc["groups_best"]["mean_f1"] == pytest.approx(1.0)
    assert disc["kmeans_families"]["n_clusters"] == 4 and disc["kmeans_groups"]["n_clusters"] == 4
    assert "discovery: 4/4 families" in s["line"]
    json.dumps(disc)  # plain JSON


def test_stage_cut_override(tmp_path):
    w = constructed_world(seed=7)
    root = make_stage_run(tmp_path / "run", w, with_label=False)
    s, _ = _run_stage(root, cut=2, weight_dictionary=1.0)
    assert s["n_groups"] == 2 and "given" in s["criterion"]
    assert gio.load_groups(root).num_rows == 2


def test_nearest_neighbours():
    S = np.array([[1.0, 0.2, 0.9, 0.2], [0.2, 1.0, 0.1, 0.5], [0.9, 0.1, 1.0, 0.0], [0.2, 0.5, 0.0, 1.0]])
    nb = gp.nearest_neighbours(S, 2)
    assert nb[0] == [[2, 0.9], [1, 0.2]]  # tie between 1 and 3 at 0.2: lower atom first
    assert nb[3] == [[1, 0.5], [0, 0.2]]


def test_stage_leaves_atoms_without_documents_ungrouped(tmp_path):
    w = constructed_world(seed=7)
    K = w["K"]
    # one more atom, active on a single document only
    w = dict(w, K=K + 1, dictionary=np.vstack([w["dictionary"], w["dictionary"][:1]]), fam_of_atom=np.r_[w["fam_of_atom"], 0],
             doc=np.r_[w["doc"], 0], atom=np.r_[w["atom"], K], coef=np.r_[w["coef"], 0.5])
    root = make_stage_run(tmp_path / "run", w, with_label=False)
    s, _ = _run_stage(root)
    assert s["n_groups"] == 4 and s["n_ungrouped"] == 1 and "1 ungrouped" in s["line"]
    tree = gio.load_tree(root)
    assert tree["ungrouped"] == [K] and K not in tree["atoms"] and len(tree["neighbours"]) == K + 1
    assert K not in {a for r in gio.load_groups(root).to_pylist() for a in r["atoms"]}


# ------------------------------------------------------------ graph criteria against slow references


def _brute_modularity(W, labels, resolution=1.0):
    """Newman's Q by the double sum over every pair: (1/2m) Σ_ij [W_ij − γ k_i k_j / 2m] δ(c_i, c_j)."""
    K = len(labels)
    two_m = sum(W[i][j] for i in range(K) for j in range(K))
    k = [sum(W[i][j] for j in range(K)) for i in range(K)]
    q = 0.0
    for i in range(K):
        for j in range(K):
            if labels[i] == labels[j]:
                q += W[i][j] - resolution * k[i] * k[j] / two_m
    return q / two_m


@pytest.mark.parametrize("resolution", [1.0, 0.5, 2.0])
def test_modularity_matches_brute_force(resolution):
    rng = np.random.default_rng(11)
    K = 12
    A = rng.random((K, K))
    W = np.where(rng.random((K, K)) < 0.5, A + A.T, 0.0)
    W = np.triu(W, 1) + np.triu(W, 1).T
    for labels in (rng.integers(0, 4, size=K), np.zeros(K, dtype=int), np.arange(K)):
        labels = gp.relabel(labels)
        assert gp.modularity(W, labels, resolution) == pytest.approx(_brute_modularity(W.tolist(), labels.tolist(), resolution), abs=1e-12)
    assert np.isnan(gp.modularity(np.zeros((3, 3)), np.array([0, 0, 1])))


def test_modularity_matches_networkx():
    nx = pytest.importorskip("networkx")
    rng = np.random.default_rng(12)
    K = 10
    W = np.triu(rng.random((K, K)) * (rng.random((K, K)) < 0.6), 1)
    W = W + W.T
    labels = gp.relabel(rng.integers(0, 3, size=K))
    g = nx.Graph()
    g.add_nodes_from(range(K))
    g.add_weighted_edges_from((i, j, W[i, j]) for i in range(K) for j in range(i + 1, K) if W[i, j] > 0)
    parts = [set(np.flatnonzero(labels == c).tolist()) for c in range(labels.max() + 1)]
    assert gp.modularity(W, labels) == pytest.approx(nx.community.modularity(g, parts, weight="weight"), abs=1e-12)


def test_affinity_knn_graph():
    S = np.array([[1.0, 0.9, 0.1, -0.5], [0.9, 1.0, 0.3, 0.2], [0.1, 0.3, 1.0, 0.8], [-0.5, 0.2, 0.8, 1.0]])
    W = gp.affinity(S)
    assert W[0, 3] == 0.0 and W[0, 0] == 0.0 and W[1, 2] == pytest.approx(0.3)
    W1 = gp.affinity(S, 1)  # each atom's single nearest: 0-1, 1-0, 2-3, 3-2
    expect = np.zeros((4, 4))
    expect[0, 1] = expect[1, 0] = 0.9
    expect[2, 3] = expect[3, 2] = 0.8
    np.testing.assert_allclose(W1, expect)
    assert np.array_equal(W1, W1.T)


def test_merge_gaps_by_hand():
    # leaves 0..3; merges at heights 0.1 (0+1), 0.2 (2+3), 0.9 (the two pairs)
    Z = np.array([[0, 1, 0.1, 2], [2, 3, 0.2, 2], [4, 5, 0.9, 4]])
    gaps = gp.merge_gaps(Z, 4)
    assert gaps == {2: pytest.approx(0.7), 3: pytest.approx(0.1)}


def test_modularity_cut_is_the_brute_force_best_cut():
    from scipy.cluster.hierarchy import cut_tree as scipy_cut

    w = constructed_world(seed=9, n_fam=5, atoms_per_fam=4)
    K = w["K"]
    S = gp.coactivation_similarity(w["doc"], w["atom"], w["coef"], K)
    g = gp.group_atoms({"coactivation": S}, {"coactivation": 1.0}, max_groups=15)
    W = np.clip(S, 0, None)
    np.fill_diagonal(W, 0.0)
    brute = {n: _brute_modularity(W.tolist(), scipy_cut(g.linkage, n_clusters=n).ravel().tolist()) for n in range(2, 16)}
    best = max(brute.values())
    assert g.n_groups == min(n for n, q in brute.items() if q > best - 1e-12)
    assert all(g.scores[n] == pytest.approx(q, abs=1e-12) for n, q in brute.items())
    assert _same_partition(g.labels, w["fam_of_atom"])
    with pytest.raises(ValueError, match="unknown grouping criterion"):
        gp.group_atoms({"coactivation": S}, {"coactivation": 1.0}, criterion="gap")


def test_choose_prefers_the_coarser_cut_on_ties():
    assert gp.choose({3: 0.5, 2: 0.5, 4: 0.1}) == 2
    assert gp.choose({2: float("nan"), 5: 0.2}) == 5
    assert gp.choose({2: float("nan")}) is None


def test_atoms_that_are_never_similar_stay_apart():
    g = gp.group_atoms({"coactivation": np.eye(5)}, {"coactivation": 1.0})
    assert g.n_groups == 5 and sorted(g.labels.tolist()) == [0, 1, 2, 3, 4] and g.criterion.startswith("no similar atoms")
