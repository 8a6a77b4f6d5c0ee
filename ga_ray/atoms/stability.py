"""Atom stability across seeds: Hungarian matching of dictionaries on |cos|."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def match_atoms(D1: np.ndarray, D2: np.ndarray) -> np.ndarray:
    """|cos| of the optimal one-to-one matching of D1's atoms to D2's (Hungarian, maximising Σ|cos|).

    Returns one value per atom of D1 (0 for atoms left unmatched when D2 has fewer atoms).
    """
    def unit(D):
        D = np.asarray(D, dtype=np.float64)
        n = np.linalg.norm(D, axis=1, keepdims=True)
        return D / np.where(n > 0, n, 1.0)

    S = np.abs(unit(D1) @ unit(D2).T)
    rows, cols = linear_sum_assignment(S, maximize=True)
    out = np.zeros(S.shape[0])
    out[rows] = S[rows, cols]
    return out


def stability_report(dictionaries: list[np.ndarray], seeds: list[int], thresholds: tuple[float, ...] = (0.9, 0.7)) -> dict[str, Any]:
    """Every seed's dictionary matched to the first one's; share of atoms matched above each threshold.

    `atoms_reappearing_in_all_above_X`: atoms of the reference found above X in every other seed.
    """
    if len(dictionaries) < 2:
        return {"n_seeds": len(dictionaries), "seeds": seeds}
    ref = dictionaries[0]
    pairs = []
    per_atom = []
    for s, D in zip(seeds[1:], dictionaries[1:]):
        m = match_atoms(ref, D)
        per_atom.append(m)
        pairs.append({"seed": s, "median_abs_cos": float(np.median(m)), **{f"share_above_{t}": float((m > t).mean()) for t in thresholds}})
    per_atom_arr = np.stack(per_atom)
    out: dict[str, Any] = {"n_seeds": len(dictionaries), "seeds": seeds, "reference_seed": seeds[0], "pairs": pairs}
    for t in thresholds:
        out[f"share_above_{t}"] = float(np.mean([p[f"share_above_{t}"] for p in pairs]))
        out[f"atoms_reappearing_in_all_above_{t}"] = int((per_atom_arr > t).all(0).sum())
    return out
