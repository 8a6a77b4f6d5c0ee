"""coherence stage: orient the atoms, score their coherence on raw gradients, characterise them, score discovery.

- `orient`, `coherence`, `characterise`, `discovery`: pure compute (numpy/torch, no Ray, no files).
- `stage`: `run_coherence(ctx)`, the Ray Data actor pool that recomputes the top documents' raw gradients.
- `io`: the one owner of `RUN_DIR/coherence/` (`save_*`, `load_atom_table`, `load_oriented_dictionary`,
  `load_characterisation`, `load_discovery`, `exists`) and of the sweep's `report/sweep.json`.
- `sweep`: `ga-ray sweep` (the paper's Table 1), recorded in the manifest as "sweep".
"""
