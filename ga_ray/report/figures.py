"""The report's figures as PNG bytes (matplotlib, Agg backend; no display, no files here)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def coherence_histogram(coherence: Sequence[float], title: str = "Atom coherence") -> bytes:
    """The paper's Figure 1: histogram of atom coherence with lines at 0.1 and 0.5."""
    plt = _plt()
    c = np.asarray([x for x in coherence if x is not None and np.isfinite(x)], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    lo = min(-0.05, float(c.min()) if c.size else 0.0)
    hi = max(1.0, float(c.max()) if c.size else 1.0)
    bins = np.linspace(lo, hi, 51)
    ax.hist(c, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.4)
    for x, label, color in ((0.1, "0.1", "#dd8452"), (0.5, "0.5", "#c44e52")):
        n = int((c > x).sum())
        ax.axvline(x, color=color, linestyle="--", linewidth=1.2, label=f"coherence > {label}: {n}")
    ax.set_xlabel("coherence (mean pairwise cosine of the top documents' raw gradients)")
    ax.set_ylabel("atoms")
    ax.set_title(f"{title} ({c.size} atoms scored)")
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def discovery_bars(disc: dict[str, Any]) -> bytes:
    """Per-family F1: atoms (best single, union) against k-means (best, union)."""
    plt = _plt()
    fams = [r["family"] for r in disc["atoms_best"]["families"]]
    series = [("atoms: best single", disc["atoms_best"]), ("atoms: union", disc["atoms_union"])]
    if "kmeans" in disc:
        series += [("k-means: best cluster", disc["kmeans"]["best"]), ("k-means: union", disc["kmeans"]["union"])]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#dd8452"]
    x = np.arange(len(fams))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(fams) + 2), 3.6))
    for i, (name, s) in enumerate(series):
        f1 = [r["f1"] for r in s["families"]]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, f1, w, label=f"{name} (mean {s['mean_f1']:.2f})", color=colors[i % len(colors)])
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x, fams, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title("Discovery of the known families")
    ax.legend(frameon=False, fontsize=7, ncol=2)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def sweep_plot(rows: Sequence[dict[str, Any]]) -> bytes:
    """Median documents per atom and coherent atoms against α (log x)."""
    plt = _plt()
    a = [float(r["alpha"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    ax.plot(a, [r["median_docs_per_atom"] for r in rows], "o-", label="median docs per atom", color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("α (L1 penalty)")
    ax.set_ylabel("median docs per atom")
    ax2 = ax.twinx()
    ax2.plot(a, [r["atoms_coherence_gt_0.1"] for r in rows], "s--", label="atoms, coherence > 0.1", color="#dd8452")
    ax2.plot(a, [r["atoms_coherence_gt_0.5"] for r in rows], "^--", label="atoms, coherence > 0.5", color="#c44e52")
    ax2.set_ylabel("atoms")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], frameon=False, fontsize=8)
    ax.set_title("Sparsity sweep")
    return _png(fig)
