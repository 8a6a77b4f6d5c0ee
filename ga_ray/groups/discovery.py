"""Discovery score at group level (only when the data carry a label column; pure numpy + scikit-learn).

The groups are fixed before this runs; the label is read by the stage only to call these functions.
Definitions (families, precision, recall, F1 as in `ga_ray.coherence.discovery`):
- `groups_best` (the headline): per family, the single best GROUP, a group's documents being those
  whose largest share of oriented coefficient mass falls in the group (each document in exactly one
  group, the groups used as a hard clustering, as k-means is);
- `groups_best_union`: the same, a group's documents being the union of its members' active sets
  (any positive oriented coefficient of any member);
- `atoms_best`: the atoms' (a), for comparison: per family the single best atom by its active set;
- `kmeans_groups` / `kmeans_families`: scikit-learn k-means on the unit rows of z with as many clusters
  as groups and as families, scored the same way (one cluster per document).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ga_ray.coherence.discovery import Families, score_best


def kmeans_labels(Z: np.ndarray, n_clusters: int, seed: int, n_init: int = 4) -> np.ndarray:
    """k-means (scikit-learn, k-means++ and `n_init` restarts) on the unit rows of Z."""
    from sklearn.cluster import KMeans

    Z = np.asarray(Z, dtype=np.float64)
    n = np.linalg.norm(Z, axis=1, keepdims=True)
    U = Z / np.where(n > 0, n, 1.0)
    k = int(max(1, min(n_clusters, len(U))))
    return KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit_predict(U).astype(np.int64)


def summary_row(name: str, res: dict[str, Any], n_sets: int) -> dict[str, Any]:
    return {"method": name, "n_sets": int(n_sets), "mean_f1": round(float(res["mean_f1"]), 4), "n_recovered": int(res["n_recovered"])}


def group_discovery(
    families: Families,
    doc_ids: np.ndarray,
    group_scores: np.ndarray,
    n_groups: int,
    atom_pairs: tuple[np.ndarray, np.ndarray],
    n_atoms: int,
    kmeans: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Every score above.

    `doc_ids`, `group_scores`: rows of the documents × groups coefficient mass (documents with no positive
    coefficient may be absent: they belong to no group); `atom_pairs`: (atom, doc_id) of the positive
    oriented codes; `kmeans`: name -> (doc_id, cluster).
    """
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    S = np.asarray(group_scores, dtype=np.float64)
    has = S.max(axis=1, initial=0.0) > 0 if S.size else np.zeros(len(doc_ids), dtype=bool)
    dom = np.argmax(S, axis=1) if S.shape[1] else np.zeros(len(doc_ids), dtype=np.int64)
    out: dict[str, Any] = {
        "n_families": len(families.names),
        "n_groups": int(n_groups),
        "groups_best": score_best(families, dom[has], doc_ids[has], n_groups, "group"),
    }
    r, c = np.nonzero(S > 0)
    out["groups_best_union"] = score_best(families, c, doc_ids[r], n_groups, "group")
    out["atoms_best"] = score_best(families, atom_pairs[0], atom_pairs[1], n_atoms, "atom")
    table = [
        summary_row("groups (best single group, dominant documents)", out["groups_best"], n_groups),
        summary_row("groups (best single group, union of members' active documents)", out["groups_best_union"], n_groups),
        summary_row("atoms (best single atom, active documents)", out["atoms_best"], n_atoms),
    ]
    for name, (k_doc, k_cluster) in (kmeans or {}).items():
        n_clusters = int(np.max(k_cluster)) + 1 if len(k_cluster) else 0
        out[name] = score_best(families, np.asarray(k_cluster), np.asarray(k_doc), n_clusters, "cluster")
        out[name]["n_clusters"] = n_clusters
        table.append(summary_row(f"k-means, {n_clusters} clusters ({name})", out[name], n_clusters))
    out["table"] = table
    best_km = max((out[n]["mean_f1"] for n in (kmeans or {})), default=None)
    out["goal"] = {
        "families_at_f1_0.5": int(out["groups_best"]["n_recovered"]),
        "families_needed": 12 if len(families.names) == 15 else None,
        "margin_over_best_kmeans": None if best_km is None else round(float(out["groups_best"]["mean_f1"] - best_km), 4),
        "margin_needed": 0.2,
    }
    return out
