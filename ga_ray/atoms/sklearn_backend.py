"""The `sklearn` backend: the paper's exact call, for faithful reproduction (in memory, one process).

    MiniBatchDictionaryLearning(n_components=K, alpha=α, batch_size=batch, max_iter=100,
                                transform_algorithm="lasso_lars", random_state=seed)

fitted on the unit-normalised rows. K, α, batch and seed come from the config (the paper: 500, 0.1,
256, 42). The stage then codes every document against the learned dictionary with the same exact
lasso pass as the torch backend (lasso_lars solves the same problem), so both backends' codes and
metrics are comparable number for number.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def paper_estimator(n_atoms: int, alpha: float, batch_size: int, seed: int, max_iter: int = 100, verbose: bool = False):
    from sklearn.decomposition import MiniBatchDictionaryLearning

    return MiniBatchDictionaryLearning(
        n_components=n_atoms,
        alpha=alpha,
        batch_size=batch_size,
        max_iter=max_iter,
        transform_algorithm="lasso_lars",
        random_state=seed,
        verbose=verbose,
    )


def normalise(Z: np.ndarray) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float32)
    n = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.where(n > 0, n, 1.0)


def fit_sklearn(X: np.ndarray, n_atoms: int, alpha: float, batch_size: int, seed: int, max_iter: int = 100, transform: bool = False) -> dict[str, Any]:
    """Fit the paper's estimator on normalised rows X; returns the dictionary (and its lasso_lars codes
    when `transform`), with counters and timings."""
    est = paper_estimator(n_atoms, alpha, batch_size, seed, max_iter)
    t0 = time.perf_counter()
    est.fit(X)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = est.transform(X) if transform else None
    transform_s = time.perf_counter() - t0
    return {
        "dictionary": np.asarray(est.components_, dtype=np.float32),
        "codes": None if codes is None else np.asarray(codes, dtype=np.float32),
        "n_steps": int(est.n_steps_),
        "n_iter": float(est.n_iter_),
        "fit_s": fit_s,
        "transform_s": transform_s,
    }
