"""report stage: `report/report.html` (self-contained) and its PNG figures, from the run's artifacts alone.

Reads whatever is there, and says so when something is not:
- `coherence/atoms.parquet` + `coherence/characterisation.json` (coherence stage) → the coherence histogram
  (the paper's Figure 1) and the top-atom table (the paper's Table 4 layout);
- `report/sweep.json` (`ga-ray sweep`) → the sparsity sweep table (the paper's Table 1);
- `coherence/discovery.json` (coherence stage, only with a label column) → discovery vs k-means;
- `adapter/format_table.json` + `format_table_base.json` (finetune stage on a demo world) → the
  formats and behaviour rates before and after the fine-tune;
- `manifest.json` and `atoms/metrics.json` → the run's metrics and timings.
Every file is written atomically; `ga-ray report` rebuilds the page without recomputing anything.
Each stage's files are read through that stage's io module (e.g. `ga_ray.coherence.io`).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ga_ray.atoms import io as atoms_io
from ga_ray.coherence import io as coherence_io
from ga_ray.errors import StageError
from ga_ray.finetune import io as finetune_io
from ga_ray.report import figures
from ga_ray.report.groups_section import load_groups_artifacts, section_groups
from ga_ray.report.steering import load_steering_artifacts, section_steering
from ga_ray.report.html import absent, esc, fmt, img, page, table
from ga_ray.rundir import atomic_write_bytes, atomic_write_text

PAPER = {"n_atoms": 500, "gt_0.5": 5, "gt_0.1": 43}


def _json(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text()) if Path(path).exists() else None
    except ValueError:
        return None


def _finite(x: Any) -> float | None:
    return float(x) if x is not None and isinstance(x, (int, float)) and math.isfinite(x) else None


def _excerpt(text: str, n: int) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: max(0, n - 1)].rstrip() + "…"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(d, list):
        if len(d) <= 8 and all(not isinstance(x, (dict, list)) for x in d):
            out.append((prefix, ", ".join(fmt(x) if isinstance(x, float) else str(x) for x in d)))
        else:
            out.append((prefix, f"[{len(d)} items]"))
    else:
        out.append((prefix, d))
    return out


# ------------------------------------------------------------------------------------- sections


def _atoms_rows(run_root: Path) -> list[dict[str, Any]] | None:
    """The coherence stage's atom table as rows, or None when it is absent or unreadable."""
    if not coherence_io.exists(run_root):
        return None
    try:
        return coherence_io.load_atom_table(run_root).to_pylist()
    except StageError:
        return None


def _optional(load: Any, run_root: Path) -> Any | None:
    """A JSON artifact through its io loader; None when it is absent or not valid JSON (the page says so)."""
    try:
        return load(run_root)
    except StageError:
        return None


def section_coherence(rows: list[dict[str, Any]] | None, out_dir: Path, figs: dict[str, bytes]) -> str:
    if rows is None:
        return absent("No coherence results: coherence/atoms.parquet is missing (run `ga-ray coherence`).")
    coh = np.asarray([_finite(r["coherence"]) if _finite(r["coherence"]) is not None else np.nan for r in rows])
    fin = coh[np.isfinite(coh)]
    png = figures.coherence_histogram(fin.tolist())
    figs["coherence_histogram.png"] = png
    n05, n01 = int((fin > 0.5).sum()), int((fin > 0.1).sum())
    body = img(png, "Histogram of atom coherence", "Distribution of atom coherence, with lines at 0.1 and 0.5 (the paper's Figure 1).")
    body += table(
        ["", "atoms", "coherence > 0.5", "coherence > 0.1", "coherence ≤ 0.1", "median coherence"],
        [
            ["this run", len(rows), n05, n01, int(fin.size - n01), float(np.median(fin)) if fin.size else None],
            ["paper (Gemma-3 4B, K = 500)", PAPER["n_atoms"], PAPER["gt_0.5"], PAPER["gt_0.1"], PAPER["n_atoms"] - PAPER["gt_0.1"], None],
        ],
        num_cols=(1, 2, 3, 4, 5),
    )
    n_nan = int(len(rows) - fin.size)
    if n_nan:
        body += f'<p class="muted">{n_nan} atoms have fewer than two documents with a positive oriented coefficient and no coherence.</p>'
    return body


def section_atoms(rows: list[dict[str, Any]] | None, char: dict[str, Any] | None, top: int, n_examples: int, chars: int) -> str:
    if rows is None:
        return absent("No atom table: coherence/atoms.parquet is missing (run `ga-ray coherence`).")
    ranked = sorted((r for r in rows if _finite(r["coherence"]) is not None), key=lambda r: (-r["coherence"], r["atom"]))[:top]
    per_atom = (char or {}).get("atoms", {})
    body_rows = []
    for rank, r in enumerate(ranked, 1):
        info = per_atom.get(str(r["atom"]), {})
        label = info.get("label")
        kws = info.get("keywords") or []
        desc = ""
        if label:
            desc += f"<strong>{esc(label)}</strong><br>"
        desc += f'<span class="kw">{esc(", ".join(kws))}</span>' if kws else ('<span class="muted">no keywords</span>' if not label else "")
        exs = []
        for ex in (info.get("examples") or [])[:n_examples]:
            exs.append(
                f'<div class="ex"><span class="muted">#{esc(ex.get("doc_id"))}</span> '
                f'<span class="p">{esc(_excerpt(ex.get("prompt", ""), chars))}</span> → {esc(_excerpt(ex.get("response", ""), chars))}</div>'
            )
        atom_cell = f"#{r['atom']}" + (' <span class="muted">(flipped)</span>' if r.get("sign_flipped") else "")
        body_rows.append([rank, atom_cell, r["coherence"], r["n_active_docs"], desc, "".join(exs) or '<span class="muted">—</span>'])
    body = f"<p>The {len(ranked)} most coherent atoms (of {len(rows)}). Active docs: documents with a non-zero code (the paper's count); "
    body += "examples are the documents with the largest oriented coefficient. "
    body += (
        "Labels were written by the configured model from the excerpts.</p>"
        if any(per_atom.get(str(r["atom"]), {}).get("label") for r in ranked)
        else "Descriptions are the most characteristic words of the top documents' responses (no label endpoint configured).</p>"
    )
    if char is None:
        body += absent("coherence/characterisation.json is missing: no keywords or examples to show.")
    body += table(["Rank", "Atom", "Coherence", "Active docs", "Label / keywords", "Example documents"], body_rows, num_cols=(0, 2, 3), raw_cols=(1, 4, 5))
    return body


def section_sweep(sweep: Any, figs: dict[str, bytes]) -> str:
    if not sweep:
        return absent("No sparsity sweep in this run (run `ga-ray sweep --alphas 0.01,0.1,1.0` to add the paper's Table 1).")
    rows = sweep["rows"] if isinstance(sweep, dict) else sweep
    png = figures.sweep_plot(rows) if len(rows) > 1 else None
    body = ""
    if png:
        figs["sweep.png"] = png
        body += img(png, "Sparsity sweep", "Median documents per atom and coherent atoms for each α.")
    body += table(
        ["α", "atoms", "dead atoms", "median docs per atom", "atoms coh > 0.5", "atoms coh > 0.1", "mean L0", "objective", "fit s", "coherence s"],
        [
            [
                r.get("alpha"),
                r.get("n_atoms"),
                r.get("dead_atoms"),
                r.get("median_docs_per_atom"),
                r.get("atoms_coherence_gt_0.5"),
                r.get("atoms_coherence_gt_0.1"),
                r.get("mean_l0"),
                r.get("objective"),
                r.get("fit_s"),
                r.get("coherence_s"),
            ]
            for r in rows
        ],
        num_cols=tuple(range(10)),
    )
    body += '<p class="muted">Paper (Table 1, K = 500): at α = 0.1, 5 atoms with coherence > 0.5 and 43 with > 0.1; at α = 1.0 every coefficient is zero.</p>'
    return body


def _prf_rows(s: dict[str, Any], key: str) -> list[list[Any]]:
    out = []
    for r in s["families"]:
        who = r.get(key)
        if isinstance(who, list):
            who = ", ".join(f"#{x}" for x in who) or "—"
        else:
            who = f"#{who}" if who is not None and who >= 0 else "—"
        out.append([r["family"], r["n_family"], who, r["n_active"], r["precision"], r["recall"], r["f1"]])
    return out


def section_discovery(disc: Any, figs: dict[str, bytes]) -> str:
    if not disc:
        return absent("No discovery score: the data have no label column (the score is computed only when one exists).")
    png = figures.discovery_bars(disc)
    figs["discovery_f1.png"] = png
    a, b = disc["atoms_best"], disc["atoms_union"]
    summary = [["atoms (oriented, active = coef > 0)", disc["n_atoms"], a["mean_f1"], a["n_recovered"], b["mean_f1"], b["n_recovered"]]]
    if "atoms_best_dominant" in disc:
        ad, bd = disc["atoms_best_dominant"], disc["atoms_union_dominant"]
        summary.append(["atoms, each document in its dominant atom only", disc["n_atoms"], ad["mean_f1"], ad["n_recovered"], bd["mean_f1"], bd["n_recovered"]])
    if "kmeans" in disc:
        km = disc["kmeans"]
        summary.append([f"k-means baseline ({km['top_documents']})", km["n_clusters"], km["best"]["mean_f1"], km["best"]["n_recovered"], km["union"]["mean_f1"], km["union"]["n_recovered"]])
    nf = disc["n_families"]
    body = f"<p>{nf} families in the label column <code>{esc(disc.get('label_column'))}</code> ({disc['n_documents']} documents, {disc['n_unlabelled']} unlabelled). "
    body += "(a): the single best atom per family; (b): the union of the atoms whose top documents are mostly (&gt; 50 %) that family. "
    body += "The dominant-atom row scores the atoms as a hard clustering (each document in the atom with its largest coefficient), as k-means is.</p>"
    body += table(["method", "atoms / clusters", "(a) mean best F1", f"(a) families F1 ≥ 0.5 (of {nf})", "(b) mean F1", f"(b) families F1 ≥ 0.5 (of {nf})"], summary, num_cols=(1, 2, 3, 4, 5))
    if "kmeans" not in disc:
        body += absent("No k-means baseline: atoms/kmeans.parquet is missing.")
    body += img(png, "Per-family F1 of atoms and k-means", "Per-family F1: atoms against the k-means baseline; dotted line at 0.5.")
    heads = ["family", "docs", "atom(s)", "active docs", "precision", "recall", "F1"]
    body += "<h3>(a) best single atom per family</h3>" + table(heads, _prf_rows(a, "atom"), num_cols=(1, 3, 4, 5, 6))
    body += "<h3>(b) union of the family's majority atoms</h3>" + table(heads, _prf_rows(b, "atoms"), num_cols=(1, 3, 4, 5, 6))
    if "kmeans" in disc:
        kh = ["family", "docs", "cluster(s)", "docs in cluster(s)", "precision", "recall", "F1"]
        body += "<h3>k-means (a) best cluster per family</h3>" + table(kh, _prf_rows(disc["kmeans"]["best"], "cluster"), num_cols=(1, 3, 4, 5, 6))
        body += "<h3>k-means (b) union of majority clusters</h3>" + table(kh, _prf_rows(disc["kmeans"]["union"], "clusters"), num_cols=(1, 3, 4, 5, 6))
    pur = disc["purity"]
    body += f"<h3>(c) label purity of the top documents of the {len(pur['atoms'])} most coherent atoms (mean {fmt(pur['mean_purity'])})</h3>"
    body += table(["rank", "atom", "coherence", "majority family", "purity", "top docs"], [[r["rank"], f"#{r['atom']}", r["coherence"], r["family"], r["purity"], r["n_top"]] for r in pur["atoms"]], num_cols=(0, 2, 4, 5))
    return body


def section_format_table(tuned: Any, base: Any) -> str:
    """The finetune stage's format table (demo world): the base model and the fine-tuned one, side by side."""
    if not tuned:
        return absent("No format table: adapter/format_table.json is missing (it is written by the finetune stage when "
                      "finetune.format_eval_set points at a demo world's held-out prompts, as `ga-ray demo` does).")
    from ga_ray.demo.formats import FORMAT_DESCRIPTIONS

    base = base or {}
    tgt = tuned.get("targets", {})
    lo, hi = (int(100 * x) for x in tgt.get("behaviour_range", (0.15, 0.85)))

    def pct(x: Any) -> str:
        return "—" if _finite(x) is None else f"{100 * x:.0f}%"

    def ci(r: dict[str, Any]) -> str:
        return f"[{pct(r.get('ci_low'))}, {pct(r.get('ci_high'))}]"

    fam_rows = [[fam, FORMAT_DESCRIPTIONS.get(fam, ""), pct(base.get("families", {}).get(fam, {}).get("rate")), pct(r["rate"]), ci(r), r["n"],
                 "ok" if r["ok"] else "MISS"] for fam, r in tuned["families"].items()]
    beh_rows = [[beh, pct(base.get("behaviours", {}).get(beh, {}).get("rate")), pct(r["rate"]), ci(r), pct(r.get("invite_rate")),
                 pct(r.get("neutral_rate")), r["n"], "ok" if r["ok"] else "MISS"] for beh, r in tuned["behaviours"].items()]
    body = ("<p>Greedy decoding on held-out prompts (templates and vocabulary the fine-tune never saw). "
            f"Each deterministic family's format should reach {int(100 * tgt.get('family_min', 0.8))}% after the fine-tune; each behaviour's "
            f"rate on its evaluation prompts should stay within {lo}–{hi}%, leaving room to steer it either way. "
            "<em>Base</em> is the model before the fine-tune (adapter off)" + ("" if base else ", not measured in this run") + ".</p>")
    body += "<h3>Formats of the deterministic families</h3>" + table(
        ["family", "format", "base", "fine-tuned", "95% CI (fine-tuned)", "prompts", "target"], fam_rows, num_cols=(2, 3, 5))
    body += "<h3>The five steerable behaviours</h3>" + table(
        ["behaviour", "base", "fine-tuned", "95% CI (fine-tuned)", "on inviting prompts", "on neutral prompts", "prompts", "target"], beh_rows, num_cols=(1, 2, 4, 5, 6))
    return body


def section_metrics(manifest: Any, metrics: Any, char: Any) -> str:
    body = ""
    if manifest and manifest.get("stages"):
        rows = []
        for name, rec in manifest["stages"].items():
            if name == "report" and rec.get("status") == "running":
                continue  # this very build: its record is finished only after the page is written
            rows.append([name, rec.get("status"), _finite(rec.get("wall_time_s")), rec.get("finished_at") or rec.get("started_at"), (rec.get("summary") or {}).get("line", "")])
        body += "<h3>Stages (manifest.json)</h3>" + table(["stage", "status", "wall time (s)", "finished", "summary"], rows, num_cols=(2,))
        versions = next((rec.get("versions") for rec in manifest["stages"].values() if rec.get("versions")), None)
        if versions:
            body += '<p class="muted">' + esc(", ".join(f"{k} {v}" for k, v in versions.items())) + "</p>"
    else:
        body += absent("No manifest.json: stage timings unavailable.")
    if metrics:
        body += "<h3>Dictionary learning (atoms/metrics.json)</h3>" + table(["metric", "value"], [[k, v] for k, v in _flatten(metrics)], num_cols=(1,))
    else:
        body += absent("No atoms/metrics.json: dictionary metrics unavailable (run `ga-ray atoms`).")
    if char:
        labels = char.get("labels") or {}
        body += (
            f'<p class="muted">Characterisation: tokenizer {esc(char.get("tokenizer"))}; keywords against {esc(char.get("background_docs"))} responses; '
            f"labels requested {esc(labels.get('requested', 0))}, ok {esc(labels.get('ok', 0))}, errors {esc(labels.get('errors', 0))}.</p>"
        )
    return body


# ----------------------------------------------------------------------------------------- build


def build_report(run_root: Path, out_dir: Path | None = None, *, top_atoms: int = 50, examples_per_atom: int = 2, excerpt_chars: int = 160, title: str | None = None) -> dict[str, Any]:
    """Write report.html and the PNGs into `out_dir` (default RUN/report) from the artifacts of `run_root`."""
    run_root = Path(run_root)
    out_dir = Path(out_dir) if out_dir is not None else run_root / "report"
    manifest = _json(run_root / "manifest.json")
    metrics = atoms_io.load_metrics(run_root / "atoms")
    char = _optional(lambda r: coherence_io.load_characterisation(r, missing_ok=True), run_root)
    disc = _optional(coherence_io.load_discovery, run_root)
    sweep = coherence_io.load_sweep(run_root)
    fmt_tuned, fmt_base = finetune_io.load_format_tables(run_root)
    rows = _atoms_rows(run_root)
    groups_art = load_groups_artifacts(run_root)
    steering_art = load_steering_artifacts(run_root)
    explorer = _build_explorer(run_root, out_dir) if rows is not None else None
    figs: dict[str, bytes] = {}
    sections = [
        ("groups", "Behaviours found (atom groups)", section_groups(groups_art, explorer=explorer is not None)),
        ("coherence", "Coherence distribution", section_coherence(rows, out_dir, figs)),
        ("atoms", f"Top {top_atoms} atoms", section_atoms(rows, char, top_atoms, examples_per_atom, excerpt_chars)),
        ("sweep", "Sparsity sweep", section_sweep(sweep, figs)),
        ("discovery", "Discovery score against k-means", section_discovery(disc, figs)),
        ("steering", "Steering: rates against alpha, Table 2, side effects, controls", section_steering(steering_art, out_dir, figs)),
        ("format_table", "Fine-tune: formats and behaviours, before and after", section_format_table(fmt_tuned, fmt_base)),
        ("metrics", "Run metrics and timings", section_metrics(manifest, metrics, char)),
    ]
    present = {
        "groups": groups_art is not None,
        "coherence": rows is not None,
        "atoms": rows is not None,
        "sweep": bool(sweep),
        "discovery": bool(disc),
        "format_table": bool(fmt_tuned),
        "steering": steering_art is not None,
        "metrics": bool(manifest) or bool(metrics),
    }
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = title or run_root.name
    html_text = page(f"Gradient Atoms report: {name}", f"Run directory {run_root} · built {when} by ga-ray from the run's artifacts", sections)
    for fname, png in figs.items():
        atomic_write_bytes(out_dir / fname, png)
    atomic_write_text(out_dir / "report.html", html_text)
    return {"html": str(out_dir / "report.html"), "figures": sorted(figs), "sections": present, "explorer": explorer}


def _build_explorer(run_root: Path, out_dir: Path) -> str | None:
    """report/explorer.html (the atom explorer); None when the coherence results cannot be read."""
    from ga_ray.report.explorer import build_explorer

    try:
        return str(build_explorer(run_root, out_dir))
    except StageError:
        return None


def run_report(ctx: Any) -> dict[str, Any]:
    rc = ctx.cfg.report
    res = build_report(ctx.run_dir.root, ctx.out, top_atoms=rc.top_atoms, examples_per_atom=rc.examples_per_atom, excerpt_chars=rc.excerpt_chars, title=ctx.cfg.name)
    missing = [k for k, v in res["sections"].items() if not v]
    res["line"] = f"{res['html']} ({len(res['figures'])} figures" + (f"; without {', '.join(missing)})" if missing else ")")
    return res
