"""The report's first section: the behaviours found (atom groups), one row each with its atoms folded in,
how the number of groups was chosen, and (with a label column) the group-level discovery score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ga_ray.errors import StageError
from ga_ray.report.html import absent, esc, fmt, table


def _excerpt(text: str, n: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: max(0, n - 1)].rstrip() + "…"


def load_groups_artifacts(run_root: Path) -> dict[str, Any] | None:
    """groups.parquet rows, tree.json, groups/characterisation.json and discovery.json; None without groups."""
    import json

    from ga_ray.groups import io as gio

    if not gio.exists(run_root):
        return None
    try:
        rows = gio.load_groups(run_root).to_pylist()
        tree = gio.load_tree(run_root)
        disc = gio.load_discovery(run_root)
    except (StageError, ValueError, OSError):
        return None
    char_path = gio.groups_dir(run_root) / "characterisation.json"
    try:
        char = json.loads(char_path.read_text()).get("groups", {}) if char_path.exists() else {}
    except ValueError:
        char = {}
    return {"rows": rows, "tree": tree, "discovery": disc, "char": char}


def section_groups(art: dict[str, Any] | None, n_examples: int = 1, chars: int = 160, explorer: bool = False) -> str:
    if art is None:
        return absent("No atom groups: groups/groups.parquet is missing (run `ga-ray groups`).")
    rows, tree = art["rows"], art["tree"]
    n_atoms = sum(r["n_atoms"] for r in rows)
    crit = tree.get("criterion", "")
    sil = (tree.get("scores") or {}).get(str(tree.get("chosen")))
    body = (
        f"<p>{len(rows)} behaviours: the {n_atoms} atoms grouped without labels by hierarchical clustering "
        f"({esc(tree.get('method'))} linkage on 1 − similarity; similarity = weighted mean of "
        + esc(", ".join(f"{k} ×{fmt(v)}" for k, v in (tree.get("weights") or {}).items() if v))
        + f"). Number of groups: {esc(crit)}"
        + (f", {esc(tree.get('score_name') or 'silhouette')} {fmt(sil)}" if sil is not None else "")
        + ". Cut coarser or finer with <code>ga-ray groups --cut N</code>. Coherence: "
        + esc(tree.get("coherence", ""))
        + ".</p>"
    )
    if explorer:
        body += '<p>Explore every atom and group, with their documents: <a href="explorer.html">explorer.html</a>.</p>'
    out_rows = []
    for r in rows:
        info = art["char"].get(str(r["group"]), {})
        atoms = " ".join(f"#{a}" for a in r["atoms"])
        folded = f"<details><summary>{r['n_atoms']} atom{'' if r['n_atoms'] == 1 else 's'} (lead #{r['leader']})</summary>{esc(atoms)}</details>"
        words = r.get("words") or []
        exs = []
        for ex in (info.get("examples") or [])[:n_examples]:
            exs.append(
                f'<div class="ex"><span class="muted">#{esc(ex.get("doc_id"))}</span> '
                f'<span class="p">{esc(_excerpt(ex.get("prompt", ""), chars))}</span> → {esc(_excerpt(ex.get("response", ""), chars))}</div>'
            )
        out_rows.append([r["group"], folded, r["coherence"], r["n_documents"], f'<span class="kw">{esc(", ".join(words))}</span>' if words else "—", "".join(exs) or "—"])
    body += table(["Group", "Atoms", "Coherence", "Documents", "Characteristic words", "Top document"], out_rows, num_cols=(0, 2, 3), raw_cols=(1, 4, 5))
    disc = art.get("discovery")
    if disc:
        nf = disc["n_families"]
        body += (
            f"<h3>Discovery by group ({nf} families of <code>{esc(disc.get('label_column'))}</code>; the label was read only here, after grouping)</h3>"
            "<p>The single best group per family. A group's documents: those whose largest share of oriented coefficient mass "
            "falls in the group (a hard clustering, as k-means is), or the union of its members' active documents.</p>"
        )
        body += table(["method", "groups / atoms / clusters", "mean best F1", f"families F1 ≥ 0.5 (of {nf})"],
                      [[t["method"], t["n_sets"], t["mean_f1"], t["n_recovered"]] for t in disc["table"]], num_cols=(1, 2, 3))
        fam_rows = [[f["family"], f["n_family"], f"#{f['group']}", f["n_active"], f["precision"], f["recall"], f["f1"]] for f in disc["groups_best"]["families"]]
        body += table(["family", "docs", "best group", "group docs", "precision", "recall", "F1"], fam_rows, num_cols=(1, 3, 4, 5, 6))
    return body
