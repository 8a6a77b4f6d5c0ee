"""Group atoms into behaviours without labels (pure numpy / scipy / scikit-learn; no Ray, no files).

One behaviour of the fine-tune (a task family) is usually split by the dictionary into many atoms. Atoms
of one behaviour share three things that the run already has, and none of them is the label:
- `coactivation`: they fire on the same documents: cosine similarity of the atoms' columns of the
  oriented, positive code matrix (documents × atoms, the coefficients as weights);
- `gradient`: their top documents have similar gradients: cosine similarity of the atoms' mean unit
  gradient over their top documents (rows of `z`, the projected gradients the dictionary was fitted on);
- `dictionary`: the atoms' own directions: cosine similarity of the oriented dictionary rows.
The similarities are averaged with the configured weights into one atom × atom similarity S (by default
co-activation alone: on the demo world the gradient and dictionary cosines of two atoms are near zero
whether or not they share a behaviour, and averaging them in drowns co-activation), and atoms are
clustered hierarchically (scipy `linkage`, average linkage on the distance 1 − S). The number of groups
is the cut of the dendrogram whose partition has the largest modularity (Newman's, weights max(S, 0)) in
the atom graph S, among the candidate cuts; silhouette is the other criterion offered (it keeps rising
as the cuts get finer on sparse co-activation, so it picks the finest cut allowed). The whole linkage is
kept so users can cut coarser or finer.
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


def affinity(S: np.ndarray, n_neighbours: int | None = None) -> np.ndarray:
    """Weights of the atom graph: max(S, 0) off the diagonal, and with `n_neighbours`, only the edges
    i–j where j is among i's `n_neighbours` most similar atoms or i among j's (ties: lower atom)."""
    S = np.asarray(S, dtype=np.float64)
    W = np.clip(0.5 * (S + S.T), 0.0, None)
    np.fill_diagonal(W, 0.0)
    K = W.shape[0]
    if n_neighbours is not None and 0 < int(n_neighbours) < K - 1:
        keep = np.zeros_like(W, dtype=bool)
        idx = np.arange(K)
        for i in range(K):
            others = np.delete(idx, i)
            order = others[np.lexsort((others, -W[i, others]))][: int(n_neighbours)]
            keep[i, order] = True
        W = np.where(keep | keep.T, W, 0.0)
    return W


def modularity(W: np.ndarray, labels: np.ndarray, resolution: float = 1.0) -> float:
    """Newman's modularity of a partition of the weighted undirected graph W (symmetric, >= 0):

        Q = Σ_c [ L_c / (2m) − γ (d_c / (2m))² ],

    with 2m = Σ_ij W_ij, L_c = Σ_{i,j ∈ c} W_ij (both orders) and d_c = Σ_{i ∈ c} Σ_j W_ij.
    NaN for a graph without edges."""
    W = np.asarray(W, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    two_m = float(W.sum())
    if two_m <= 0:
        return float("nan")
    n = int(labels.max()) + 1 if len(labels) else 0
    P = np.zeros((W.shape[0], n))
    P[np.arange(W.shape[0]), labels] = 1.0
    inside = float(np.einsum("ic,ij,jc->", P, W, P))
    deg = np.bincount(labels, weights=W.sum(axis=1), minlength=n)
    return inside / two_m - float(resolution) * float(np.sum((deg / two_m) ** 2))


def merge_gaps(Z: np.ndarray, n_leaves: int) -> dict[int, float]:
    """Per number of groups n (1 < n < leaves), the jump in merge distance that a cut into n groups
    leaves unmade: the height of the merge that would join two of the n groups minus the height of the
    last merge made (scipy linkage heights, ascending for a monotone method)."""
    h = np.asarray(Z, dtype=np.float64)[:, 2]
    out = {}
    for n in range(2, int(n_leaves)):
        # after n_leaves - n merges there are n groups; merge index n_leaves - n is the next one
        out[n] = float(h[n_leaves - n] - h[n_leaves - n - 1])
    return out


def candidate_cuts(n_atoms: int, min_groups: int, max_groups: int) -> list[int]:
    hi = min(int(max_groups), n_atoms - 1)
    lo = max(2, int(min_groups))
    return list(range(lo, hi + 1)) if hi >= lo else []


CRITERIA = ("modularity", "silhouette")


def cuts_of(Z: np.ndarray, ns: Sequence[int]) -> dict[int, np.ndarray]:
    """Leaf -> group for each cut in `ns` (one scipy call for all of them), canonically numbered."""
    from scipy.cluster.hierarchy import cut_tree as scipy_cut

    ns = [int(n) for n in ns]
    if not ns:
        return {}
    raw = scipy_cut(Z, n_clusters=ns)
    return {n: relabel(raw[:, i]) for i, n in enumerate(ns)}


def choose(scores: Mapping[int, float]) -> int | None:
    """The cut with the largest finite score; ties go to the coarser cut (fewer groups)."""
    finite = {n: s for n, s in scores.items() if np.isfinite(s)}
    if not finite:
        return None
    return min(finite, key=lambda n: (-round(finite[n], 12), n))


@dataclass
class Grouping:
    """The hierarchy of atoms and the chosen cut."""

    linkage: np.ndarray  # (K-1)×4
    distance: np.ndarray  # K×K
    labels: np.ndarray  # group per atom at the chosen cut
    n_groups: int
    criterion: str
    scores: dict[int, float] = field(default_factory=dict)  # the criterion per candidate cut
    all_scores: dict[str, dict[int, float]] = field(default_factory=dict)  # every criterion per candidate cut
    score_name: str = ""  # the criterion `scores` holds

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
    criterion: str = "modularity",
    resolution: float = 1.0,
    graph_neighbours: int | None = None,
) -> Grouping:
    """Hierarchical clustering of the atoms; the cut is `n_groups` when given, else the cut in
    [min_groups, max_groups] with the best `criterion`:
    - `modularity` (default): Newman's modularity (resolution `resolution`) of the cut as a partition of
      the atom graph `affinity(S, graph_neighbours)` (weights max(S, 0); S the combined similarity);
    - `silhouette`: scikit-learn's silhouette on the distances 1 − S.
    Both are computed for every candidate cut (kept in `all_scores`)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown grouping criterion {criterion!r} (one of {', '.join(CRITERIA)})")
    S = combine(similarities, weights)
    K = S.shape[0]
    D = distance_matrix(S)
    if K < 2:
        return Grouping(np.zeros((0, 4)), D, np.zeros(K, dtype=np.int64), K, "single atom")
    Z = linkage_tree(D, method)
    cuts = cuts_of(Z, candidate_cuts(K, min_groups, max_groups))
    W = affinity(S, graph_neighbours)
    all_scores = {
        "modularity": {n: modularity(W, lab, resolution) for n, lab in cuts.items()},
        "silhouette": {n: silhouette(D, lab) for n, lab in cuts.items()},
    }
    scores = all_scores[criterion]
    if n_groups is not None:
        chosen, name = max(1, min(int(n_groups), K)), "given (--cut)"
    else:
        best = choose(scores)
        if criterion == "modularity" and not float(W.sum()) > 0:
            # no two atoms are similar at all: every atom is its own behaviour
            chosen, name = K, "no similar atoms (one group per atom)"
        elif best is not None:
            chosen = best
            name = f"{criterion} (max over cuts" + (f", resolution {resolution:g}" if criterion == "modularity" and resolution != 1.0 else "") + ")"
        else:
            chosen, name = 1, "no candidate cut"
    labels = cuts[chosen] if chosen in cuts else cut_tree(Z, chosen)
    return Grouping(Z, D, labels, int(chosen), name, scores, all_scores, criterion)


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


def _rounded(scores: Mapping[int, float]) -> dict[str, float | None]:
    return {str(n): (None if not np.isfinite(x) else round(float(x), 6)) for n, x in scores.items()}


def tree_json(Z: np.ndarray, atom_ids: Sequence[int], grouping: Grouping, method: str, weights: Mapping[str, float]) -> dict[str, Any]:
    return {
        "atoms": [int(a) for a in atom_ids],  # the atom id of each leaf of the linkage
        "linkage": [[int(r[0]), int(r[1]), float(r[2]), int(r[3])] for r in np.asarray(Z)],
        "method": method,
        "metric": "1 - weighted mean cosine similarity",
        "weights": {k: float(v) for k, v in weights.items()},
        "criterion": grouping.criterion,
        "chosen": int(grouping.n_groups),
        "score_name": grouping.score_name,  # what `scores` holds
        "scores": _rounded(grouping.scores),
        "all_scores": {c: _rounded(v) for c, v in grouping.all_scores.items()},
        "assignment": [int(x) for x in grouping.labels],
    }
