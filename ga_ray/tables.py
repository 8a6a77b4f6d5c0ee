"""Aligned plain-text tables for the terminal (stage summaries, benchmarks): a pure helper at the bottom layer."""

from __future__ import annotations

from typing import Any


def format_cell(v: Any) -> str:
    """Floats to 4 significant digits, everything else as str()."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows (dicts with the same keys) as an aligned text table under `title`."""
    print(f"\n{title}")
    if not rows:
        print("  (no rows)")
        return
    keys = list(rows[0].keys())
    cells = [[format_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  " + "  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  " + "  ".join("-" * w for w in widths))
    for c in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(c, widths)))
