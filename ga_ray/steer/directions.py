"""Steering directions in LoRA weight space (pure compute: tensors in, tensors out; no Ray, no files).

A direction is a dict `{PEFT parameter name: tensor [d_out, d_in]}` over the LoRA A/B weights, keyed
by the names of `factors/` (the model's `named_parameters()` spelling,
`...q_proj.lora_A.default.weight`); `ga_ray.steer.adapters` maps those names onto the adapter file's
keys. Every direction here follows one sign convention: `θ − α·v` is a step that lowers the loss of
the documents the direction came from (to first order), so `toward` = `θ − α·v`.

- `atom_direction`: the pseudo-inverse unprojection of an ORIENTED dictionary row (DESIGN.md):
  scatter `d ⊙ sqrt(λ_sel + ε)` into each block's (i, j) grid and return `Q_S · grid · Q_Aᵀ`. The
  oriented atom points along its documents' normalised projected gradients, so `−v` is a descent
  step on them.
- `combine`: a weighted sum of directions (compositions of atoms; a group is the sum of its members).
- `random_direction`: a seeded Gaussian direction over every LoRA weight of the blocks, scaled to a
  given norm (the control "is the atom better than any perturbation of that size?").
- `supervised_direction`: the unprojected mean of the NORMALISED projected gradients `z_n / ‖z_n‖`
  of a set of documents (the rows the dictionary is fitted on, so it lives where the atoms live),
  scaled to a given norm. Like an atom it points along those documents' gradients, so `toward`
  (`θ − α·v`) lowers their loss to first order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

Direction = dict[str, torch.Tensor]


def direction_norm(v: Mapping[str, torch.Tensor]) -> float:
    """Euclidean norm over every tensor of the direction (float64 accumulation)."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in v.values())).item()) if v else 0.0


def scaled(v: Mapping[str, torch.Tensor], factor: float) -> Direction:
    return {k: t * factor for k, t in v.items()}


def with_norm(v: Mapping[str, torch.Tensor], norm: float) -> Direction:
    """`v` rescaled to Euclidean norm `norm` (a zero direction cannot be)."""
    n = direction_norm(v)
    if not np.isfinite(n) or n == 0.0:
        raise ValueError("cannot rescale a zero (or non-finite) direction")
    return scaled(v, norm / n)


def atom_direction(projector, row: np.ndarray | torch.Tensor, natural: bool = False) -> Direction:
    """Unproject one oriented dictionary row `[D]` with a `ga_ray.factors.projection.Projector`."""
    z = torch.as_tensor(np.asarray(row, dtype=np.float32))
    if z.dim() != 1:
        raise ValueError(f"atom_direction takes one dictionary row [D], got shape {tuple(z.shape)}")
    return {k: t.to(torch.float32) for k, t in projector.unproject(z, natural=natural).items()}


def combine(directions: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Direction:
    """`Σ_i w_i · v_i` (every direction over the same names)."""
    if len(directions) != len(weights) or not directions:
        raise ValueError(f"combine: {len(directions)} direction(s) and {len(weights)} weight(s); need as many of each, at least one")
    names = list(directions[0])
    for d in directions[1:]:
        if set(d) != set(names):
            raise ValueError("combine: directions over different parameter names")
    return {k: sum(float(w) * d[k].double() for d, w in zip(directions, weights)).to(directions[0][k].dtype) for k in names}


def control_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and a label (e.g. the atom id): stable across processes."""
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def random_direction(like: Mapping[str, torch.Tensor], norm: float, seed: int) -> Direction:
    """A Gaussian direction with the shapes of `like` (names in sorted order, so key order does not matter), norm `norm`."""
    g = torch.Generator().manual_seed(int(seed))
    v = {k: torch.randn(tuple(like[k].shape), generator=g, dtype=torch.float64) for k in sorted(like)}
    return {k: t.to(torch.float32) for k, t in with_norm(v, norm).items()}


def mean_unit_rows(z: np.ndarray) -> np.ndarray:
    """Mean of `z_n / ‖z_n‖` over the rows (rows of zero norm are skipped)."""
    z = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(z, axis=1)
    ok = norms > 0
    if not ok.any():
        raise ValueError("every projected gradient of the set is zero")
    return (z[ok] / norms[ok, None]).mean(axis=0)


def supervised_direction(projector, z: np.ndarray, norm: float) -> Direction:
    """Unprojected mean normalised projected gradient of the rows `z [n, D]`, scaled to `norm`."""
    m = mean_unit_rows(z).astype(np.float32)
    return with_norm(atom_direction(projector, m), norm)
