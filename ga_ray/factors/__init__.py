"""ekfac stage: EKFAC factors of every LoRA block, and projection into their eigenbasis.

- `compute`: the whole computation (covariance pass, distributed float64 eigendecompositions, Λ
  pass, top-k), pure tensors; `covariance`, `eigen`: its pieces; `distributed`: the collectives.
- `factors`: the `Factors` artifact (`factors/factors.safetensors` + `factors.json`).
- `projection`: `Projector` (project per-document gradients to z, unproject z to LoRA tensors).
- `stage`: `run_factors(ctx)`, the Ray Train `TorchTrainer` job.
"""
