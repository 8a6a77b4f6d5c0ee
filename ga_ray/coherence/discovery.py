"""Discovery score: how well the atoms found known families (only when the data carry a label column).

This is the ONLY module of the pipeline that reads the label column of `data/`; it runs at the very
end of the coherence stage, after atoms, orientation, coherence and characterisation are fixed, so
the label cannot influence them. Everything here is pure numpy apart from `read_labels`.

Definitions (all on ORIENTED atoms; a document is active in atom k when its oriented coefficient is
> 0; families are the distinct non-null label values; the universe is every document of data/):
- (a) `best`: per family f, the single atom whose active set A_k best matches F (max F1; ties: lower
  atom number), with precision |A∩F|/|A|, recall |A∩F|/|F| and F1; the mean best F1 over families
  and the number of families with best F1 ≥ 0.5.
- (b) `union`: per family, the union of the active sets of every atom whose top documents are mostly
  (> 50 %) that family, scored the same way (F1 = 0 when no atom qualifies).
- (c) `purity`: for the 20 most coherent atoms, the share of their top documents that carry their
  most common family.
- an extra view beside (a) and (b), `atoms_best_dominant` / `atoms_union_dominant`: the same scores
  when each document counts only in its dominant atom (largest oriented coefficient), i.e. the
  atoms used as a hard clustering, which is what k-means is;
- the k-means baseline (atoms/kmeans.parquet, one cluster per document) scored by (a) and (b): a
  cluster's "top documents" are all its documents, or its `top_n` nearest to the centre when the file
  has a `distance` column.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def read_labels(data_dir: Path, column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(doc_id, label as str or None) from data/, or None when the column is absent."""
    from ga_ray.data import io as data_io

    if not data_io.exists(data_dir) or column not in data_io.column_names(data_dir):
        return None
    t = data_io.read_documents(data_dir, columns=["doc_id", column])
    labels = np.asarray([None if v is None else str(v) for v in t.column(column).to_pylist()], dtype=object)
    return t.column("doc_id").to_numpy().astype(np.int64), labels


def _prf(inter: np.ndarray, size_a: np.ndarray, size_f: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inter = inter.astype(np.float64)
    precision = np.divide(inter, size_a, out=np.zeros_like(inter), where=size_a > 0)
    recall = inter / size_f if size_f > 0 else np.zeros_like(inter)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(inter), where=denom > 0)
    return precision, recall, f1


class Families:
    def __init__(self, doc_id: np.ndarray, label: np.ndarray):
        self.doc_id = np.asarray(doc_id, dtype=np.int64)
        label = np.asarray(label, dtype=object)
        self.names = sorted({str(x) for x in label if x is not None})
        index = {n: i for i, n in enumerate(self.names)}
        self.code = np.asarray([-1 if x is None else index[str(x)] for x in label], dtype=np.int64)
        self.by_doc = dict(zip(self.doc_id.tolist(), self.code.tolist()))
        self.size = np.bincount(self.code[self.code >= 0], minlength=len(self.names)).astype(np.float64)

    def codes_of(self, doc_ids: Sequence[int]) -> np.ndarray:
        return np.asarray([self.by_doc.get(int(d), -1) for d in doc_ids], dtype=np.int64)


def _memberships(fam: Families, set_id: np.ndarray, doc_id: np.ndarray, n_sets: int) -> tuple[np.ndarray, np.ndarray]:
    """(intersection counts [n_sets, F], set sizes [n_sets]) from (set, doc) membership pairs."""
    set_id = np.asarray(set_id, dtype=np.int64)
    fcode = fam.codes_of(doc_id)
    F = len(fam.names)
    inter = np.zeros((n_sets, F), dtype=np.float64)
    ok = fcode >= 0
    np.add.at(inter, (set_id[ok], fcode[ok]), 1.0)
    sizes = np.bincount(set_id, minlength=n_sets).astype(np.float64)
    return inter, sizes


def score_best(fam: Families, set_id: np.ndarray, doc_id: np.ndarray, n_sets: int, kind: str = "atom") -> dict[str, Any]:
    """(a): per family, the best single set by F1."""
    inter, sizes = _memberships(fam, set_id, doc_id, n_sets)
    rows = []
    for f, name in enumerate(fam.names):
        p, r, f1 = _prf(inter[:, f], sizes, fam.size[f])
        best = int(np.argmax(f1)) if n_sets else -1
        rows.append(
            {
                "family": name,
                "n_family": int(fam.size[f]),
                kind: best,
                "n_active": int(sizes[best]) if best >= 0 else 0,
                "precision": float(p[best]) if best >= 0 else 0.0,
                "recall": float(r[best]) if best >= 0 else 0.0,
                "f1": float(f1[best]) if best >= 0 else 0.0,
            }
        )
    f1s = [r["f1"] for r in rows]
    return {"families": rows, "mean_f1": float(np.mean(f1s)) if f1s else 0.0, "n_recovered": int(sum(x >= 0.5 for x in f1s))}


def majority_family(fam: Families, top_doc_ids: Sequence[Sequence[int]], threshold: float = 0.5) -> list[int]:
    """Per set, the family that MORE than `threshold` of its top documents carry, else −1."""
    out = []
    for ids in top_doc_ids:
        codes = fam.codes_of(ids)
        if len(codes) == 0:
            out.append(-1)
            continue
        c = Counter(int(x) for x in codes if x >= 0)
        if not c:
            out.append(-1)
            continue
        f, n = min(c.items(), key=lambda kv: (-kv[1], kv[0]))
        out.append(f if n / len(codes) > threshold else -1)
    return out


def score_union(
    fam: Families, set_id: np.ndarray, doc_id: np.ndarray, n_sets: int, top_doc_ids: Sequence[Sequence[int]], kind: str = "atom"
) -> dict[str, Any]:
    """(b): per family, the union of the sets whose top documents are mostly that family."""
    owner = np.asarray(majority_family(fam, top_doc_ids), dtype=np.int64)
    set_id = np.asarray(set_id, dtype=np.int64)
    doc_id = np.asarray(doc_id, dtype=np.int64)
    rows = []
    for f, name in enumerate(fam.names):
        members = np.flatnonzero(owner == f)
        docs = np.unique(doc_id[np.isin(set_id, members)])
        fcode = fam.codes_of(docs)
        inter = float((fcode == f).sum())
        size = float(len(docs))
        p, r, f1 = _prf(np.asarray([inter]), np.asarray([size]), fam.size[f])
        rows.append(
            {
                "family": name,
                "n_family": int(fam.size[f]),
                f"{kind}s": [int(x) for x in members],
                "n_active": int(size),
                "precision": float(p[0]),
                "recall": float(r[0]),
                "f1": float(f1[0]),
            }
        )
    f1s = [r["f1"] for r in rows]
    return {"families": rows, "mean_f1": float(np.mean(f1s)) if f1s else 0.0, "n_recovered": int(sum(x >= 0.5 for x in f1s))}


def score_purity(fam: Families, top_doc_ids: Sequence[Sequence[int]], coherence: np.ndarray, n_top: int = 20) -> dict[str, Any]:
    """(c): label purity of the top documents of the `n_top` most coherent atoms."""
    coherence = np.asarray(coherence, dtype=np.float64)
    order = [int(k) for k in np.argsort(-np.nan_to_num(coherence, nan=-np.inf), kind="stable") if np.isfinite(coherence[k])][:n_top]
    rows = []
    for rank, k in enumerate(order, 1):
        codes = fam.codes_of(top_doc_ids[k])
        c = Counter(int(x) for x in codes if x >= 0)
        if c:
            f, n = min(c.items(), key=lambda kv: (-kv[1], kv[0]))
            name, purity = fam.names[f], n / len(codes)
        else:
            name, purity = None, 0.0
        rows.append({"rank": rank, "atom": k, "coherence": float(coherence[k]), "family": name, "purity": float(purity), "n_top": int(len(codes))})
    return {"atoms": rows, "mean_purity": float(np.mean([r["purity"] for r in rows])) if rows else 0.0}


def dominant_atoms(doc_id: np.ndarray, atom: np.ndarray, coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's atom with the largest (oriented, positive) coefficient; ties: lower atom."""
    doc_id, atom, coef = np.asarray(doc_id, dtype=np.int64), np.asarray(atom, dtype=np.int64), np.asarray(coef, dtype=np.float64)
    order = np.lexsort((atom, -coef, doc_id))
    d, a = doc_id[order], atom[order]
    first = np.r_[True, d[1:] != d[:-1]] if len(d) else np.zeros(0, dtype=bool)
    return d[first], a[first]


def discovery_scores(
    families: Families,
    code_doc_id: np.ndarray,
    code_atom: np.ndarray,
    oriented_coef: np.ndarray,
    n_atoms: int,
    top_doc_ids: Sequence[Sequence[int]],
    coherence: np.ndarray,
    kmeans: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    top_n: int = 20,
    purity_atoms: int = 20,
) -> dict[str, Any]:
    """Every score above. `kmeans`: (doc_id, cluster, distance or None)."""
    pos = np.asarray(oriented_coef) > 0
    a_doc = np.asarray(code_doc_id, dtype=np.int64)[pos]
    a_set = np.asarray(code_atom, dtype=np.int64)[pos]
    out: dict[str, Any] = {
        "n_families": len(families.names),
        "families": {n: int(s) for n, s in zip(families.names, families.size)},
        "n_documents": int(len(families.doc_id)),
        "n_unlabelled": int((families.code < 0).sum()),
        "n_atoms": int(n_atoms),
        "atoms_best": score_best(families, a_set, a_doc, n_atoms, "atom"),
        "atoms_union": score_union(families, a_set, a_doc, n_atoms, [list(t)[:top_n] for t in top_doc_ids], "atom"),
        "purity": score_purity(families, [list(t)[:top_n] for t in top_doc_ids], coherence, purity_atoms),
    }
    # extra view (not the definition): each document only in its dominant atom
    d_doc, d_set = dominant_atoms(a_doc, a_set, np.asarray(oriented_coef, dtype=np.float64)[pos])
    out["atoms_best_dominant"] = score_best(families, d_set, d_doc, n_atoms, "atom")
    out["atoms_union_dominant"] = score_union(families, d_set, d_doc, n_atoms, [list(t)[:top_n] for t in top_doc_ids], "atom")
    if kmeans is not None:
        k_doc, k_cluster, k_dist = (np.asarray(kmeans[0], dtype=np.int64), np.asarray(kmeans[1], dtype=np.int64), kmeans[2])
        n_clusters = int(k_cluster.max()) + 1 if len(k_cluster) else 0
        tops = []
        for c in range(n_clusters):
            sel = np.flatnonzero(k_cluster == c)
            if k_dist is not None:
                sel = sel[np.lexsort((k_doc[sel], np.asarray(k_dist)[sel]))][:top_n]
            tops.append(k_doc[sel].tolist())
        out["kmeans"] = {
            "n_clusters": n_clusters,
            "top_documents": "nearest to the centre" if k_dist is not None else "all documents of the cluster",
            "best": score_best(families, k_cluster, k_doc, n_clusters, "cluster"),
            "union": score_union(families, k_cluster, k_doc, n_clusters, tops, "cluster"),
        }
    return out
