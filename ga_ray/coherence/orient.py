"""Atom orientation and top documents (pure numpy; no Ray, no files).

Dictionary learning leaves each atom's sign arbitrary (c·d = (−c)·(−d)). We orient atom k so that
the coefficients of its active documents (non-zero codes) sum to ≥ 0: "toward" the atom then means
"more like its documents". Oriented dictionary row = sign_k · D_k, oriented coefficient = sign_k · c;
reconstruction is unchanged. A sum of exactly 0 (or a dead atom) keeps sign +1.

Top documents of an atom: its documents with oriented coefficient > 0, by decreasing oriented
coefficient (ties: lower doc id first), at most `top_n`. Documents pulled the other way (oriented
coefficient < 0) are not "the atom's documents", so they never enter the top list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Orientation:
    sign: np.ndarray  # [K] float32, +1 or −1
    coef_sum: np.ndarray  # [K] float64, sum of the raw coefficients of the atom's active documents

    @property
    def flipped(self) -> np.ndarray:
        return self.sign < 0


def orient(atom: np.ndarray, coef: np.ndarray, n_atoms: int) -> Orientation:
    """Signs from sparse codes (parallel arrays atom[i], coef[i]; zeros are ignored)."""
    atom = np.asarray(atom, dtype=np.int64)
    coef = np.asarray(coef, dtype=np.float64)
    if atom.size and (atom.min() < 0 or atom.max() >= n_atoms):
        raise ValueError(f"codes name atom {int(atom.max())} outside 0..{n_atoms - 1}")
    s = np.bincount(atom, weights=coef, minlength=n_atoms).astype(np.float64)
    sign = np.where(s < 0, -1.0, 1.0).astype(np.float32)
    return Orientation(sign=sign, coef_sum=s)


def oriented_coefs(atom: np.ndarray, coef: np.ndarray, orientation: Orientation) -> np.ndarray:
    return np.asarray(coef, dtype=np.float32) * orientation.sign[np.asarray(atom, dtype=np.int64)]


def active_counts(atom: np.ndarray, coef: np.ndarray, n_atoms: int) -> np.ndarray:
    """Documents with a non-zero coefficient, per atom (the paper's "active docs")."""
    atom = np.asarray(atom, dtype=np.int64)
    nz = np.asarray(coef) != 0
    return np.bincount(atom[nz], minlength=n_atoms).astype(np.int64)


def positive_counts(atom: np.ndarray, oriented: np.ndarray, n_atoms: int) -> np.ndarray:
    atom = np.asarray(atom, dtype=np.int64)
    return np.bincount(atom[np.asarray(oriented) > 0], minlength=n_atoms).astype(np.int64)


def top_documents(
    doc_id: np.ndarray, atom: np.ndarray, oriented: np.ndarray, n_atoms: int, top_n: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Per atom, (doc ids, oriented coefficients) of its top documents (oriented coefficient > 0)."""
    doc_id = np.asarray(doc_id, dtype=np.int64)
    atom = np.asarray(atom, dtype=np.int64)
    oriented = np.asarray(oriented, dtype=np.float32)
    keep = oriented > 0
    d, a, c = doc_id[keep], atom[keep], oriented[keep]
    # sort by atom, then coefficient descending, then doc id ascending
    order = np.lexsort((d, -c.astype(np.float64), a))
    d, a, c = d[order], a[order], c[order]
    starts = np.searchsorted(a, np.arange(n_atoms), side="left")
    ends = np.searchsorted(a, np.arange(n_atoms), side="right")
    ids: list[list[int]] = []
    coefs: list[list[float]] = []
    for k in range(n_atoms):
        s, e = starts[k], min(ends[k], starts[k] + top_n)
        ids.append([int(x) for x in d[s:e]])
        coefs.append([float(x) for x in c[s:e]])
    return ids, coefs
