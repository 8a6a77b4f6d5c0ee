"""Discovery score against a small case computed by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ga_ray.coherence.discovery import Families, discovery_scores, majority_family, read_labels

# docs 0-3: family a; 4-6: b; 7-8: c; 9: unlabelled
LABELS = ["a", "a", "a", "a", "b", "b", "b", "c", "c", None]
# (doc, atom, oriented coef); negative entries are not active
CODES = [
    (0, 0, 0.9), (1, 0, 0.8), (2, 0, 0.7), (5, 0, 0.1), (6, 0, -0.5),
    (3, 1, 0.9), (5, 1, 0.5), (6, 1, 0.4), (8, 1, -0.2),
    (9, 2, 0.9), (7, 2, 0.5), (8, 2, 0.4),
    (0, 4, 0.7), (3, 4, 0.6), (4, 4, 0.1),
]  # atom 3 is dead
TOP3 = [[0, 1, 2], [3, 5, 6], [9, 7, 8], [], [0, 3, 4]]
COHERENCE = np.array([0.3, 0.9, 0.5, np.nan, 0.1])


def _scores(**kw):
    fam = Families(np.arange(10), np.array(LABELS, dtype=object))
    d, a, c = (np.array(x) for x in zip(*CODES))
    km = (np.arange(10), np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2]), None)
    return discovery_scores(fam, d, a, c, 5, TOP3, COHERENCE, kmeans=km, top_n=3, purity_atoms=3, **kw)


def test_best_single_atom_by_hand():
    s = _scores()
    rows = {r["family"]: r for r in s["atoms_best"]["families"]}
    # a: atom 0 = {0,1,2,5}: P = 3/4, R = 3/4
    assert rows["a"]["atom"] == 0 and rows["a"]["precision"] == pytest.approx(0.75) and rows["a"]["recall"] == pytest.approx(0.75)
    assert rows["a"]["f1"] == pytest.approx(0.75)
    # b: atom 1 = {3,5,6} (doc 8 has a negative coefficient): P = R = 2/3
    assert rows["b"]["atom"] == 1 and rows["b"]["f1"] == pytest.approx(2 / 3)
    # c: atom 2 = {7,8,9}: P = 2/3 (doc 9 unlabelled counts against), R = 1
    assert rows["c"]["atom"] == 2 and rows["c"]["precision"] == pytest.approx(2 / 3) and rows["c"]["recall"] == 1.0
    assert rows["c"]["f1"] == pytest.approx(0.8)
    assert s["atoms_best"]["mean_f1"] == pytest.approx((0.75 + 2 / 3 + 0.8) / 3)
    assert s["atoms_best"]["n_recovered"] == 3
    assert s["n_families"] == 3 and s["n_unlabelled"] == 1 and s["families"] == {"a": 4, "b": 3, "c": 2}


def test_union_of_majority_atoms_by_hand():
    s = _scores()
    rows = {r["family"]: r for r in s["atoms_union"]["families"]}
    # a: atoms 0 (top 3/3 a) and 4 (top 2/3 a): {0,1,2,5} ∪ {0,3,4} = {0..5}: P = 4/6, R = 1
    assert rows["a"]["atoms"] == [0, 4]
    assert rows["a"]["precision"] == pytest.approx(4 / 6) and rows["a"]["recall"] == 1.0 and rows["a"]["f1"] == pytest.approx(0.8)
    assert rows["b"]["atoms"] == [1] and rows["b"]["f1"] == pytest.approx(2 / 3)
    assert rows["c"]["atoms"] == [2] and rows["c"]["f1"] == pytest.approx(0.8)
    assert s["atoms_union"]["mean_f1"] == pytest.approx((0.8 + 2 / 3 + 0.8) / 3)


def test_dominant_atom_view_by_hand():
    s = _scores()
    # dominant atoms: 0 -> {0,1,2}, 1 -> {3,5,6}, 2 -> {7,8,9}, 4 -> {4}
    best = {r["family"]: r for r in s["atoms_best_dominant"]["families"]}
    assert best["a"]["atom"] == 0 and best["a"]["precision"] == 1.0 and best["a"]["f1"] == pytest.approx(6 / 7)
    assert best["b"]["atom"] == 1 and best["b"]["f1"] == pytest.approx(2 / 3)
    assert best["c"]["atom"] == 2 and best["c"]["f1"] == pytest.approx(0.8)
    union = {r["family"]: r for r in s["atoms_union_dominant"]["families"]}
    assert union["a"]["atoms"] == [0, 4] and union["a"]["f1"] == pytest.approx(0.75)  # {0,1,2,4}


def test_purity_of_most_coherent_atoms():
    s = _scores()
    rows = s["purity"]["atoms"]
    assert [r["atom"] for r in rows] == [1, 2, 0]  # by coherence; NaN never ranked
    assert [r["family"] for r in rows] == ["b", "c", "a"]
    np.testing.assert_allclose([r["purity"] for r in rows], [2 / 3, 2 / 3, 1.0])
    assert s["purity"]["mean_purity"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_kmeans_baseline_by_hand():
    km = _scores()["kmeans"]
    best = {r["family"]: r for r in km["best"]["families"]}
    assert best["a"]["cluster"] == 0 and best["a"]["f1"] == pytest.approx(6 / 7)  # {0,1,2}: P 1, R 3/4
    assert best["b"]["cluster"] == 1 and best["b"]["f1"] == pytest.approx(6 / 7)  # {3,4,5,6}: P 3/4, R 1
    assert best["c"]["cluster"] == 2 and best["c"]["f1"] == pytest.approx(0.8)
    union = {r["family"]: r for r in km["union"]["families"]}
    assert union["b"]["clusters"] == [1] and union["b"]["f1"] == pytest.approx(6 / 7)
    assert km["n_clusters"] == 3


def test_kmeans_top_documents_by_distance():
    fam = Families(np.arange(10), np.array(LABELS, dtype=object))
    d, a, c = (np.array(x) for x in zip(*CODES))
    # one big cluster; its 3 nearest documents are b's
    dist = np.array([5, 5, 5, 5, 0.1, 0.2, 0.3, 5, 5, 5])
    km = (np.arange(10), np.zeros(10, dtype=int), dist)
    s = discovery_scores(fam, d, a, c, 5, TOP3, COHERENCE, kmeans=km, top_n=3)
    union = {r["family"]: r for r in s["kmeans"]["union"]["families"]}
    assert union["b"]["clusters"] == [0] and union["a"]["clusters"] == []
    assert union["a"]["f1"] == 0.0


def test_majority_needs_more_than_half():
    fam = Families(np.arange(4), np.array(["a", "a", "b", "b"], dtype=object))
    assert majority_family(fam, [[0, 1], [0, 2], [0, 1, 2], []]) == [0, -1, 0, -1]


def test_read_labels_absent_and_present(tmp_path):
    pq.write_table(pa.table({"doc_id": [1, 2], "input_ids": [[1], [2]], "task": ["x", None]}), tmp_path / "part-00000.parquet")
    (tmp_path / "prepare.json").write_text("{}")  # data/ also holds non-Parquet files
    ids, lab = read_labels(tmp_path, "task")
    assert ids.tolist() == [1, 2] and lab.tolist() == ["x", None]
    assert read_labels(tmp_path, "family") is None
