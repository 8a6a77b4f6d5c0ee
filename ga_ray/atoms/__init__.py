"""atoms stage: dictionary learning on the unit-normalised projected gradients.

Layers (DESIGN.md): pure torch compute, thin Ray wiring, I/O.

- `lasso`: exact lasso coder on the Gram matrix (feature-sign search): `sparse_encode(X, D, alpha)`,
  `lasso_gram(G, XDᵀ, alpha)`, `kkt_violation`, `gram`; on CPU it runs `lasso_rows` (the same search
  row by row, compiled with numba), elsewhere its batched lock-step torch version.
- `compiled`: numba's `njit` when installed, plain Python otherwise (the GPU machines have no numba).
- `online`: scikit-learn's online statistics and forgetting weights (`forgetting_beta`,
  `update_stats`), the blocked BCD sweep (`update_dictionary`), dead/duplicate resampling,
  initialisation, `online_step`, `mutual_coherence`.
- `stream`: `StreamPlan` (held-out rows, shuffled windows, W-independent batches) and `BlockCoder`.
- `trainer`: the driver loop `fit(pool, plan, settings)` with held-out stopping and checkpoint hooks;
  `learn_dictionary(Z, settings)` runs it in memory (no Ray, no files).
- `distributed`: `RayPool`, the BlockCoders as Ray actors.
- `encode`: the final encoding pass (Ray Data `map_batches`) → `codes.parquet` + metrics.
- `io`: Parquet pieces, safetensors/JSON checkpoints, and the one owner of the atoms/ files
  (`write_dictionary`, `load_dictionary_array`, `load_codes`, `load_kmeans`, `load_metrics`).
- `sklearn_backend`, `kmeans` (dask-ml on Ray), `stability` (Hungarian matching), `synthetic`.
- `stage`: `run_atoms(ctx)`, `run_stability(...)`, `seeds_override(n)`.
"""
