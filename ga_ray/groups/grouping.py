"""Group atoms into behaviours without labels (pure numpy / scipy / scikit-learn; no Ray, no files).

One behaviour of the fine-tune (a task family) is usually split by the dictionary into many atoms. Atoms
of one behaviour share three things that the run already has, and none of them is the label:
- `coactivation`: they fire on the same documents: cosine similarity of the atoms' columns of the
  oriented, positive code matrix (documents × atoms, the coefficients as weights);
- `gradient`: their top documents have similar gradients: cosine similarity of the atoms' mean unit
  gradient over their top documents (rows of `z`, the projected gradients the dictionary was fitted
  on; or the raw-gradient Σu that the coherence pass keeps);
- `dictionary`: the atoms' own directions: cosine similarity of the oriented dictionary rows.
The similarities are averaged with the configured weights into one atom × atom similarity S, and atoms
are clustered hierarchically (scipy `linkage`, average linkage on the distance 1 − S). The number of
groups is the cut of the dendrogram with the largest silhouette score (scikit-learn, precomputed
distances) among the candidate cuts; the whole linkage is kept so users can cut coarser or finer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SIGNALS = ("coactivation", "gradient", "dictionary")


def cosine_rows(X: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of X (zero rows: similarity 0 to everything, 1 to themselves)."""
    X = np.asarray(X, dtype=np.float64)
    n = np.linalg.norm(X, axis=1, keepdims=True)
    U = X / np.where(n > 0, n, 1.0)
    S = U @ U.T
    np.fill_diagonal(S, 1.0)
    return np.clip(S, -1.0, 1.0)


def positive_code_matrix(doc_id: np.ndarray, atom: np.ndarray, oriented_coef: np.ndarray, n_atoms: int):
    """Sparse (documents × atoms) matrix of the positive oriented coefficients, and its row doc ids."""
    from scipy.sparse import csr_matrix

    doc_id = np.asarray(doc_id, dtype=np.int64)
    atom = np.asarray(atom, dtype=np.int64)
    coef = np.asarray(oriented_coef, dtype=np.float64)
    pos = coef > 0
    docs, row = np.unique(doc_id[pos], return_inverse=True)
    M = csr_matrix((coef[pos], (row, atom[pos])), shape=(len(docs), int(n_atoms)))
    M.sum_duplicates()
    return M, docs


def coactivation_similarity(doc_id: np.ndarray, atom: np.ndarray, oriented_coef: np.ndarray, n_atoms: int) -> np.ndarray:
    """Cosine similarity of the atoms' (weighted) document-activation columns."""
    M, _ = positive_code_matrix(doc_id, atom, oriented_coef, n_atoms)
    G = np.asarray((M.T @ M).todense(), dtype=np.float64)
    d = np.sqrt(np.clip(np.diag(G), 0.0, None))
    S = G / np.where(np.outer(d, d) > 0, np.outer(d, d), 1.0)
    np.fill_diagonal(S, 1.0)
    return np.clip(S, -1.0, 1.0)


def mean_unit_rows(Z: np.ndarray, row_of: Mapping[int, int], top_doc_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Per atom, the mean of the unit rows of Z over its top documents (zero when it has none)."""
    Z = np.asarray(Z, dtype=np.float64)
    n = np.linalg.norm(Z, axis=1, keepdims=True)
    U = Z / np.where(n > 0, n, 1.0)
    out = np.zeros((len(top_doc_ids), Z.shape[1]), dtype=np.float64)
    for k, ids in enumerate(top_doc_ids):
        rows = [row_of[int(d)] for d in ids if int(d) in row_of]
        if rows:
            out[k] = U[rows].mean(axis=0)
    return out


def combine(similarities: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted mean of the similarity matrices whose weight is > 0."""
    used = [(n, float(weights.get(n, 0.0))) for n in similarities if float(weights.get(n, 0.0)) > 0]
    if not used:
        raise ValueError(f"no similarity signal with a positive weight (have {sorted(similarities)}, weights {dict(weights)})")
    total = sum(w for _, w in used)
    S = sum(w * np.asarray(similarities[n], dtype=np.float64) for n, w in used) / total
    S = 0.5 * (S + S.T)
    np.fill_diagonal(S, 1.0)
    return S


def distance_matrix(S: np.ndarray) -> np.ndarray:
    D = np.clip(1.0 - np.asarray(S, dtype=np.float64), 0.0, 2.0)
    D = 0.5 * (D + D.T)
    np.fill_diagonal(D, 0.0)
    return D


def linkage_tree(D: np.ndarray, method: str = "average") -> np.ndarray:
    """scipy's (K−1)×4 linkage matrix of the atoms from their distance matrix."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    return linkage(squareform(D, checks=False), method=method)


def cut_tree(Z: np.ndarray, n_groups: int) -> np.ndarray:
    """Leaf -> group (0..n-1) for the cut with `n_groups` clusters; groups numbered by their smallest leaf."""
    from scipy.cluster.hierarchy import cut_tree as scipy_cut

    raw = scipy_cut(Z, n_clusters=int(n_groups)).ravel()
    return relabel(raw)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Number clusters 0.. in order of first appearance (a canonical form, so equal partitions compare equal)."""
    labels = np.asarray(labels)
    mapping: dict[int, int] = {}
    out = np.empty(len(labels), dtype=np.int64)
    for i, x in enumerate(labels.tolist()):
        out[i] = mapping.setdefault(int(x), len(mapping))
    return out


def silhouette(D: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    n = len(np.unique(labels))
    if n < 2 or n >= len(labels):
        return float("nan")
    return float(silhouette_score(D, labels, metric="precomputed"))


def candidate_cuts(n_atoms: int, min_groups: int, max_groups: int) -> list[int]:
    hi = min(int(max_groups), n_atoms - 1)
    lo = max(2, int(min_groups))
    return list(range(lo, hi + 1)) if hi >= lo else []


@dataclass
class Grouping:
    """The hierarchy of atoms and the chosen cut."""

    linkage: np.ndarray  # (K-1)×4
    distance: np.ndarray  # K×K
    labels: np.ndarray  # group per atom at the chosen cut
    n_groups: int
    criterion: str
    scores: dict[int, float] = field(default_factory=dict)  # silhouette per candidate cut

    def labels_at(self, n_groups: int) -> np.ndarray:
        return cut_tree(self.linkage, n_groups)


def group_atoms(
    similarities: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    *,
    method: str = "average",
    n_groups: int | None = None,
    min_groups: int = 2,
    max_groups: int = 100,
) -> Grouping:
    """Hierarchical clustering of the atoms; the cut is `n_groups` when given, else the best silhouette."""
    S = combine(similarities, weights)
    K = S.shape[0]
    D = distance_matrix(S)
    if K < 2:
        return Grouping(np.zeros((0, 4)), D, np.zeros(K, dtype=np.int64), K, "single atom")
    Z = linkage_tree(D, method)
    scores: dict[int, float] = {}
    for n in candidate_cuts(K, min_groups, max_groups):
        scores[n] = silhouette(D, cut_tree(Z, n))
    if n_groups is not None:
        chosen, criterion = max(1, min(int(n_groups), K)), "given (--cut)"
    else:
        finite = {n: s for n, s in scores.items() if np.isfinite(s)}
        if finite:
            # largest silhouette; ties go to the coarser cut (fewer groups)
            chosen = min(finite, key=lambda n: (-round(finite[n], 12), n))
            criterion = "silhouette (max over cuts)"
        else:
            chosen, criterion = 1, "no candidate cut"
    return Grouping(Z, D, cut_tree(Z, chosen), int(chosen), criterion, scores)


# ------------------------------------------------------------------ group members, documents, ranks


def group_document_scores(M, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """(documents × groups) sum of the members' positive oriented coefficients (M: documents × atoms)."""
    from scipy.sparse import csr_matrix

    K = M.shape[1]
    P = csr_matrix((np.ones(K), (np.arange(K), np.asarray(labels, dtype=np.int64))), shape=(K, int(n_groups)))
    return np.asarray((M @ P).todense(), dtype=np.float64)


def top_group_documents(scores: np.ndarray, doc_ids: np.ndarray, top_n: int) -> list[list[int]]:
    """Per group, the doc ids of its `top_n` largest scores (> 0), ties by doc id."""
    out = []
    for g in range(scores.shape[1]):
        col = scores[:, g]
        nz = np.flatnonzero(col > 0)
        order = nz[np.lexsort((doc_ids[nz], -col[nz]))][:top_n]
        out.append([int(doc_ids[i]) for i in order])
    return out


def dominant_group(scores: np.ndarray) -> np.ndarray:
    """Each document's group with the largest score (ties: lower group); −1 when none > 0."""
    g = np.argmax(scores, axis=1) if scores.shape[1] else np.zeros(scores.shape[0], dtype=np.int64)
    return np.where(scores.max(axis=1, initial=0.0) > 0, g, -1).astype(np.int64)


def order_groups(labels: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Renumber groups so that group 0 has the largest `key` (e.g. coherence), ties by old number."""
    key = np.nan_to_num(np.asarray(key, dtype=np.float64), nan=-np.inf)
    order = sorted(range(len(key)), key=lambda g: (-key[g], g))
    new = np.empty(len(key), dtype=np.int64)
    new[order] = np.arange(len(key))
    return new[np.asarray(labels, dtype=np.int64)]


def coarser_parents(Z: np.ndarray, labels: np.ndarray, n_groups: int) -> tuple[np.ndarray, int] | tuple[None, None]:
    """Per group of `labels`, its group in the next coarser cut (about half as many groups)."""
    if n_groups <= 1 or Z.shape[0] == 0:
        return None, None
    coarse_n = max(1, n_groups // 2)
    coarse = cut_tree(Z, coarse_n)
    parent = np.zeros(n_groups, dtype=np.int64)
    for g in range(n_groups):
        members = np.flatnonzero(labels == g)
        parent[g] = int(np.bincount(coarse[members]).argmax())
    return parent, coarse_n


def nearest_neighbours(S: np.ndarray, n: int) -> list[list[list[float]]]:
    """Per atom, its `n` most similar other atoms as [atom, similarity] (ties: lower atom)."""
    S = np.asarray(S, dtype=np.float64)
    out = []
    for k in range(S.shape[0]):
        others = np.delete(np.arange(S.shape[0]), k)
        order = others[np.lexsort((others, -S[k, others]))][:n]
        out.append([[int(j), round(float(S[k, j]), 6)] for j in order])
    return out


def tree_json(Z: np.ndarray, atom_ids: Sequence[int], grouping: Grouping, method: str, weights: Mapping[str, float]) -> dict[str, Any]:
    return {
        "atoms": [int(a) for a in atom_ids],  # the atom id of each leaf of the linkage
        "linkage": [[int(r[0]), int(r[1]), float(r[2]), int(r[3])] for r in np.asarray(Z)],
        "method": method,
        "metric": "1 - weighted mean cosine similarity",
        "weights": {k: float(v) for k, v in weights.items()},
        "criterion": grouping.criterion,
        "chosen": int(grouping.n_groups),
        "scores": {str(n): (None if not np.isfinite(s) else round(float(s), 6)) for n, s in grouping.scores.items()},
        "assignment": [int(x) for x in grouping.labels],
    }
