"""groups stage: atoms grouped into behaviours without labels (writes `groups/`).

Reads `atoms/codes.parquet` and `atoms/dictionary.safetensors` (the atoms stage), the coherence stage's
atom table (orientation, top documents, coherence), `gradients/` (z of the atoms' top documents), and
`data/` (token ids of the groups' top documents, for their words). Never the label column, except in
the discovery score at the very end, after `groups.parquet` and `tree.json` are written.

Grouping (`ga_ray.groups.grouping`): the atoms' similarity S is the weighted mean of the configured
signals (default: co-activation alone, the cosine of the atoms' positive oriented coefficient columns);
scipy's average linkage on 1 − S builds the tree; the number of groups is the cut in
[groups.min_groups, groups.max_groups] whose partition has the largest Newman modularity in the atom
graph with weights max(S, 0) (`groups.criterion: modularity`, resolution `groups.resolution`; the
alternative is `silhouette`), ties to the coarser cut; `groups.cut` overrides it. tree.json keeps the
whole linkage and both criteria for every candidate cut.

Writes (see `ga_ray.groups.io`): `groups.parquet`, `tree.json`, `characterisation.json` (examples and
words per group), and `discovery.json` (only when `data/` has `coherence.label_column`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ga_ray.errors import StageError
from ga_ray.groups import grouping as gp
from ga_ray.groups import io as gio
from ga_ray.context import StageContext
from ga_ray.rundir import atomic_write_json

log = logging.getLogger("ga_ray")


# ------------------------------------------------------------------------------------------- I/O


def load_atom_table(run_root: Path) -> pa.Table:
    """The coherence stage's atom table (coherence/ once it moved there, else atoms/atoms.parquet)."""
    try:
        from ga_ray.coherence import io as cio

        if cio.exists(run_root):
            return cio.load_atom_table(run_root)
    except ImportError:  # an older tree: the table still lives in atoms/
        pass
    path = run_root / "atoms" / "atoms.parquet"
    if not path.exists():
        raise StageError(f"no coherence results under {run_root}: run the coherence stage first (`ga-ray coherence --run-dir {run_root}`)")
    return pq.read_table(str(path))


def read_codes(atoms_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_id, atom, coef as float64) of the atoms stage's codes."""
    from ga_ray.atoms.io import load_codes

    doc, atom, coef = load_codes(atoms_dir)
    return doc, atom, coef.astype(np.float64)


def read_dictionary(atoms_dir: Path) -> np.ndarray:
    from ga_ray.atoms.io import load_dictionary_array

    return load_dictionary_array(atoms_dir)


def read_z_rows(gradients_dir: Path, doc_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(doc_id, z) of `gradients/`, only the rows of `doc_ids` when given."""
    from ga_ray.gradients.io import read_z_rows as read_rows

    try:
        return read_rows(gradients_dir, doc_ids)
    except FileNotFoundError as exc:
        raise StageError(f"cannot read {gradients_dir} ({exc}): run the gradients stage, or set groups.weight_gradient=0") from None


def read_token_docs(data_dir: Path, doc_ids: list[int] | None) -> dict[int, tuple[list[int], list[int]]]:
    """doc id -> (input_ids, loss_mask) from data/ (only these columns: never the label)."""
    from ga_ray.data import io as data_io

    t = data_io.read_documents(data_dir, doc_ids, columns=data_io.TOKEN_COLUMNS)
    return {int(d): (i, m) for d, i, m in zip(t.column("doc_id").to_pylist(), t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist())}


def all_doc_ids(data_dir: Path) -> np.ndarray:
    from ga_ray.data import io as data_io

    return data_io.read_doc_ids(data_dir)


# ----------------------------------------------------------------------------------- the steps


def characterise_groups(cfg: Any, data_dir: Path, top_ids: list[list[int]]) -> dict[int, dict[str, Any]]:
    """Examples and characteristic words of each group's top documents (as the coherence stage does per atom)."""
    from ga_ray.coherence.characterise import Decoder, characterise_atoms, sample_ids, split_prompt_response

    try:
        from ga_ray.kernel.loading import load_tokenizer

        decoder = Decoder(load_tokenizer(cfg.model))
    except Exception as exc:  # no tokenizer: token ids, and say why
        log.warning("groups: no tokenizer (%s); excerpts show token ids", exc)
        decoder = Decoder(None)
    cc = cfg.coherence
    bg = sample_ids(all_doc_ids(data_dir), cc.background_docs, seed=cfg.seed)
    docs = read_token_docs(data_dir, sorted({d for t in top_ids for d in t} | {int(d) for d in bg}))
    bg_resp = decoder.many([split_prompt_response(*docs[int(d)])[1] for d in bg]) if len(bg) else []
    return characterise_atoms(top_ids, docs, bg_resp, decoder, n_examples=cc.examples_per_atom, excerpt_chars=cc.excerpt_chars, n_keywords=cc.n_keywords)


def similarities(cfg: Any, run_root: Path, K: int, doc, atom, oriented, top_doc_ids: list[list[int]], sign: np.ndarray) -> dict[str, np.ndarray]:
    gc = cfg.groups
    sims: dict[str, np.ndarray] = {}
    if gc.weight_coactivation > 0:
        sims["coactivation"] = gp.coactivation_similarity(doc, atom, oriented, K)
    if gc.weight_gradient > 0:
        union = np.unique(np.asarray([d for t in top_doc_ids for d in t], dtype=np.int64))
        ids, Z = read_z_rows(run_root / "gradients", union)
        sims["gradient"] = gp.cosine_rows(gp.mean_unit_rows(Z, {int(d): i for i, d in enumerate(ids)}, top_doc_ids))
    if gc.weight_dictionary > 0:
        D = read_dictionary(run_root / "atoms").astype(np.float64) * sign[:, None]
        sims["dictionary"] = gp.cosine_rows(D)
    return sims


def weights_of(gc: Any) -> dict[str, float]:
    return {"coactivation": gc.weight_coactivation, "gradient": gc.weight_gradient, "dictionary": gc.weight_dictionary}


def score_discovery(cfg: Any, run_root: Path, data_dir: Path, docs: np.ndarray, scores: np.ndarray, G: int, doc, atom, oriented, K: int) -> dict[str, Any] | None:
    """The group-level discovery score, or None without a label column. The ONLY reader of the label here."""
    from ga_ray.coherence.discovery import Families, read_labels
    from ga_ray.groups.discovery import group_discovery, kmeans_labels

    column = cfg.coherence.label_column
    labels = read_labels(data_dir, column) if column else None
    if labels is None:
        return None
    fam = Families(*labels)
    pos = oriented > 0
    km = None
    if cfg.groups.kmeans_baseline:
        z_ids, Z = read_z_rows(run_root / "gradients")
        km = {
            "kmeans_groups": (z_ids, kmeans_labels(Z, G, cfg.seed)),
            "kmeans_families": (z_ids, kmeans_labels(Z, len(fam.names), cfg.seed)),
        }
    out = group_discovery(fam, docs, scores, G, (atom[pos], doc[pos]), K, kmeans=km)
    out["label_column"] = column
    return out


def _score_at(grouping: gp.Grouping, name: str, n: int) -> float | None:
    x = grouping.all_scores.get(name, {}).get(n)
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def run_groups(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    gc = cfg.groups
    root = ctx.run_dir.root
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    atoms_tab = load_atom_table(root)
    doc, atom, coef = read_codes(root / "atoms")
    K = int(atoms_tab.num_rows)
    atom_ids = atoms_tab.column("atom").to_numpy().astype(np.int64)
    if not np.array_equal(atom_ids, np.arange(K)):
        raise StageError(f"the coherence atom table of {root} does not list atoms 0..{K - 1} in order: re-run the coherence stage")
    sign = np.where(atoms_tab.column("sign_flipped").to_numpy(zero_copy_only=False).astype(bool), -1.0, 1.0)
    oriented = coef * sign[atom]
    atom_top = [[int(d) for d in t] for t in atoms_tab.column("top_doc_ids").to_pylist()]
    atom_coh = np.asarray(atoms_tab.column("coherence").to_numpy(zero_copy_only=False), dtype=np.float64)

    t = time.perf_counter()
    sims = similarities(cfg, root, K, doc, atom, oriented, atom_top, sign)
    timings["similarity_s"] = round(time.perf_counter() - t, 3)
    M, docs = gp.positive_code_matrix(doc, atom, oriented, K)
    n_active = np.asarray(M.getnnz(axis=0)).ravel()
    # atoms with (almost) no positive documents carry no co-activation or gradient signal: left ungrouped
    kept = np.flatnonzero(n_active >= gc.min_docs)
    if len(kept) < 2:
        raise StageError(f"only {len(kept)} of {K} atoms have >= {gc.min_docs} documents with a positive oriented coefficient: nothing to group (lower groups.min_docs)")
    t = time.perf_counter()
    grouping = gp.group_atoms(
        {n: S[np.ix_(kept, kept)] for n, S in sims.items()},
        weights_of(gc),
        method=gc.method,
        n_groups=gc.cut,
        min_groups=gc.min_groups,
        max_groups=gc.max_groups,
        criterion=gc.criterion,
        resolution=gc.resolution,
        graph_neighbours=gc.graph_neighbours,
    )
    timings["cluster_s"] = round(time.perf_counter() - t, 3)
    G = grouping.n_groups
    full = np.full(K, -1, dtype=np.int64)  # group per atom id (-1: ungrouped)
    full[kept] = grouping.labels
    scores = gp.group_document_scores(M[:, kept], grouping.labels, G)
    top = gp.top_group_documents(scores, docs, gc.top_docs)

    # coherence of each group: the members' coherence weighted by their active documents, and (by
    # default) the paper's coherence measured on the raw gradients of the group's own top documents
    mean_coh = np.full(G, np.nan)
    for g in range(G):
        m = np.flatnonzero((full == g) & np.isfinite(atom_coh))
        if len(m):
            w = np.maximum(n_active[m], 1).astype(np.float64)
            mean_coh[g] = float(np.sum(w * atom_coh[m]) / np.sum(w))
    raw_coh = None
    if gc.raw_coherence:
        from ga_ray.coherence.stage import compute_coherence

        t = time.perf_counter()
        raw_coh = compute_coherence(cfg, ctx.data_dir, ctx.adapter_path(), top).coherence
        timings["raw_coherence_s"] = round(time.perf_counter() - t, 3)
    group_coh = raw_coh if raw_coh is not None else mean_coh

    # number groups by coherence, best first; the hierarchy keeps its own leaf order
    key = np.nan_to_num(group_coh, nan=-np.inf)
    order = sorted(range(G), key=lambda g: (-key[g], g))  # order[new] = old
    new_of_old = np.empty(G, dtype=np.int64)
    new_of_old[order] = np.arange(G)
    labels = new_of_old[grouping.labels]  # per leaf (kept atom)
    grouping.labels = labels
    full[kept] = labels
    scores = scores[:, order]
    top = [top[o] for o in order]
    mean_coh, group_coh = mean_coh[order], group_coh[order]

    t = time.perf_counter()
    char = characterise_groups(cfg, ctx.data_dir, top)
    timings["characterise_s"] = round(time.perf_counter() - t, 3)

    parent, coarse_n = gp.coarser_parents(grouping.linkage, labels, G)
    rows = []
    for g in range(G):
        members = np.flatnonzero(full == g)
        mc = atom_coh[members]
        members = members[np.lexsort((members, -np.nan_to_num(mc, nan=-np.inf)))]
        mc = atom_coh[members]
        fin = mc[np.isfinite(mc)]
        col = scores[:, g]
        rows.append(
            {
                "group": g,
                "atoms": [int(a) for a in members],
                "n_atoms": int(len(members)),
                "n_documents": int((col > 0).sum()),
                "top_doc_ids": top[g],
                "top_scores": [float(col[np.searchsorted(docs, d)]) for d in top[g]],
                "coherence": None if not np.isfinite(group_coh[g]) else float(group_coh[g]),
                "coherence_min": float(fin.min()) if len(fin) else None,
                "coherence_max": float(fin.max()) if len(fin) else None,
                "words": list(char.get(g, {}).get("keywords", [])),
                "parent": None if parent is None else int(parent[g]),
                "level": int(G),
                "leader": int(members[0]),
            }
        )
    tree = gp.tree_json(grouping.linkage, kept, grouping, gc.method, weights_of(gc))
    tree["ungrouped"] = [int(a) for a in np.flatnonzero(full < 0)]
    tree["coarser"] = None if parent is None else {"n_groups": int(coarse_n), "assignment": [int(x) for x in gp.cut_tree(grouping.linkage, coarse_n)]}
    tree["coherence"] = "raw gradients of the group's top documents" if raw_coh is not None else "members' coherence weighted by active documents"
    tree["member_mean_coherence"] = [None if not np.isfinite(x) else float(x) for x in mean_coh]
    tree["neighbours"] = gp.nearest_neighbours(gp.combine(sims, weights_of(gc)), gc.neighbours)  # every atom, by atom id
    out = ctx.out
    gio.save_groups(out, rows, tree)
    atomic_write_json(out / "characterisation.json", {"groups": {str(g): v for g, v in char.items()}})

    t = time.perf_counter()
    disc = score_discovery(cfg, root, ctx.data_dir, docs, scores, G, doc, atom, oriented, K)
    if disc is not None:
        gio.save_discovery(out, disc)
    elif (out / gio.DISCOVERY_FILE).exists():
        (out / gio.DISCOVERY_FILE).unlink()  # a score from earlier data must not outlive it
    timings["discovery_s"] = round(time.perf_counter() - t, 3)

    sizes = [r["n_atoms"] for r in rows]
    summary: dict[str, Any] = {
        "n_groups": G,
        "criterion": grouping.criterion,
        "modularity": _score_at(grouping, "modularity", G),
        "silhouette": _score_at(grouping, "silhouette", G),
        "n_ungrouped": int((full < 0).sum()),
        "group_sizes": {"min": int(min(sizes)), "median": float(np.median(sizes)), "max": int(max(sizes))},
        "signals": sorted(sims),
        "timings": timings,
        "wall_s": round(time.perf_counter() - t0, 3),
        "discovery": None,
    }
    line = f"{K} atoms -> {G} groups ({grouping.criterion}; atoms per group {min(sizes)}..{max(sizes)}, median {np.median(sizes):g}"
    line += f"; {summary['n_ungrouped']} ungrouped)" if summary["n_ungrouped"] else ")"
    if disc is not None:
        a, km = disc["groups_best"], [disc[n]["mean_f1"] for n in ("kmeans_groups", "kmeans_families") if n in disc]
        summary["discovery"] = {"mean_best_f1": round(a["mean_f1"], 4), "n_recovered": a["n_recovered"], "n_families": disc["n_families"], "kmeans_mean_f1": [round(x, 4) for x in km]}
        line += f"; discovery: {a['n_recovered']}/{disc['n_families']} families at F1 >= 0.5 by one group, mean best F1 {a['mean_f1']:.3f}"
        if km:
            line += f" vs k-means {max(km):.3f}"
    summary["line"] = line
    return summary
