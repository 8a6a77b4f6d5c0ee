"""Planted-atom data: rows made of a few known atoms plus noise (tests and the benchmark)."""

from __future__ import annotations

import numpy as np


def planted_atoms(
    n: int,
    dim: int,
    n_atoms: int,
    per_row: tuple[int, int] = (2, 3),
    noise: float = 0.1,
    seed: int = 0,
    dtype: type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, atoms, codes): X (n × dim) unit rows, each = Σ of `per_row` random atoms + noise.

    Atoms are random unit vectors; each row uses between per_row[0] and per_row[1] distinct atoms
    with coefficients of magnitude U(0.5, 1.5) and random sign; `noise` is the noise norm relative
    to a unit vector (isotropic Gaussian). Rows are then normalised to unit norm, like the pipeline's
    `x = z / ‖z‖`, so codes are the planted ones up to that per-row scale.
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, dim))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, n_atoms))
    lo, hi = per_row
    k = rng.integers(lo, hi + 1, size=n)
    for i in range(n):
        s = rng.choice(n_atoms, size=k[i], replace=False)
        codes[i, s] = rng.uniform(0.5, 1.5, size=k[i]) * rng.choice([-1.0, 1.0], size=k[i])
    X = codes @ atoms + rng.standard_normal((n, dim)) * (noise / np.sqrt(dim))
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X /= norms
    codes /= norms
    return X.astype(dtype), atoms.astype(dtype), codes.astype(dtype)


def recovery(learned: np.ndarray, truth: np.ndarray, threshold: float = 0.9) -> float:
    """Share of true atoms whose best |cos| with a learned atom exceeds `threshold`."""
    L = learned / np.maximum(np.linalg.norm(learned, axis=1, keepdims=True), 1e-12)
    T = truth / np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-12)
    best = np.abs(T @ L.T).max(axis=1)
    return float((best > threshold).mean())
