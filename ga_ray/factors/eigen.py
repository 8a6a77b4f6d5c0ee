"""Eigendecompositions, the EKFAC eigenvalue correction Λ (pass 2), and top-k selection.

Pure compute, float64 where it matters.
- `eigendecompose(C)`: `C = Q diag(λ) Qᵀ`, eigenvalues descending, each eigenvector's sign fixed so
  that its largest-magnitude entry is positive (reproducible across machines and worker counts),
  negative eigenvalues (round-off of a PSD matrix) clamped to 0 and counted.
- `LambdaAccumulator`: `Λ[i,j] = mean_n ((Q_Sᵀ G_n Q_A)[i,j])²`.
- `eigen_scores` / `select_top_k`: rank the (i, j) pairs by Λ (`ekfac`) or `λ_S[i]·λ_A[j]` (`kfac`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ga_ray.factors.covariance import NonFiniteTracker


@dataclass
class Eigen:
    Q: torch.Tensor
    """`[d, d]` float64, column k is the k-th eigenvector (descending eigenvalues)."""
    values: torch.Tensor
    """`[d]` float64 eigenvalues, descending, negatives clamped to 0."""
    n_clamped: int
    """How many eigenvalues were negative (set to 0)."""
    min_raw: float
    """The smallest eigenvalue before clamping (how negative the round-off got)."""


def canonical_signs(Q: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive."""
    if Q.numel() == 0:
        return Q
    idx = Q.abs().argmax(dim=0)
    signs = torch.sign(Q.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs[signs == 0] = 1
    return Q * signs


def eigendecompose(C: torch.Tensor) -> Eigen:
    """Symmetric eigendecomposition in float64 (see module docstring)."""
    C64 = C.to(torch.float64)
    C64 = 0.5 * (C64 + C64.T)
    values, Q = torch.linalg.eigh(C64)
    values = values.flip(0)
    Q = canonical_signs(Q.flip(1))
    neg = values < 0
    n_clamped = int(neg.sum().item())
    min_raw = float(values[-1].item()) if values.numel() else 0.0
    values = values.clamp(min=0)
    return Eigen(Q.contiguous(), values.contiguous(), n_clamped, min_raw)


def rotate(G: torch.Tensor, Q_S: torch.Tensor, Q_A: torch.Tensor) -> torch.Tensor:
    """`Q_Sᵀ G Q_A` for a batch `G [B, o, i]` (or one `[o, i]`)."""
    return Q_S.T @ G @ Q_A


class LambdaAccumulator:
    """Float64 running sum of `(Q_Sᵀ G_n Q_A)²` over documents, per block."""

    def __init__(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32):
        """`bases`: block → (Q_S, Q_A) (any float dtype; used in `compute_dtype`)."""
        self.names = list(bases)
        self.Q = {n: (qs.to(device=device, dtype=compute_dtype), qa.to(device=device, dtype=compute_dtype)) for n, (qs, qa) in bases.items()}
        self.sums = {n: torch.zeros((qs.shape[0], qa.shape[0]), dtype=torch.float64, device=device) for n, (qs, qa) in bases.items()}
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.compute_dtype = compute_dtype
        self.nonfinite = NonFiniteTracker()
        self.n_batches = 0

    def update(self, grads: dict[str, torch.Tensor], label: str | None = None, n_docs: int | None = None) -> None:
        label = label or f"batch {self.n_batches}"
        contrib = {}
        B = None
        for n in self.names:
            G = grads[n]
            B = G.shape[0]
            qs, qa = self.Q[n]
            R = rotate(G.to(qs.dtype), qs, qa)
            contrib[n] = (R.square().sum(0, dtype=torch.float64),)
        self.nonfinite.check(contrib, self.n_batches, label)
        for n in self.names:
            self.sums[n] += contrib[n][0]
        self.count += float(n_docs if n_docs is not None else (B or 0))
        self.n_batches += 1

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.sums.values(), self.count]

    @property
    def n_docs(self) -> int:
        return int(round(self.count.item()))

    def lambdas(self) -> dict[str, torch.Tensor]:
        n = max(self.n_docs, 1)
        return {k: v / n for k, v in self.sums.items()}


def eigen_scores(mode: str, Lambda: torch.Tensor, lambda_S: torch.Tensor, lambda_A: torch.Tensor) -> torch.Tensor:
    """`[o, i]` eigenvalue of each (i, j) pair: Λ (`ekfac`) or `λ_S[i]·λ_A[j]` (`kfac`)."""
    if mode == "ekfac":
        return Lambda.to(torch.float64)
    if mode == "kfac":
        return torch.outer(lambda_S.to(torch.float64), lambda_A.to(torch.float64))
    raise ValueError(f"eigenvalues mode must be 'ekfac' or 'kfac', got {mode!r}")


def select_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat int64 indices `i*d_in + j` of the k largest scores, descending (ties: lower index first)."""
    flat = scores.reshape(-1)
    k = min(int(k), flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    return order[:k].to(torch.int64).contiguous()


def lambda_mass_kept(Lambda: torch.Tensor, selected: torch.Tensor) -> float:
    """Share of Σ Λ carried by the selected pairs (1.0 when Λ is all zero)."""
    total = float(Lambda.sum().item())
    if total <= 0:
        return 1.0
    return float(Lambda.reshape(-1)[selected].sum().item()) / total


def decompose_all(covs: dict[str, tuple[torch.Tensor, torch.Tensor]], names: Sequence[str] | None = None) -> dict[str, tuple[Eigen, Eigen]]:
    """Block → (eig of C_A, eig of C_S) for `names` (default: all)."""
    names = list(covs) if names is None else list(names)
    return {n: (eigendecompose(covs[n][0]), eigendecompose(covs[n][1])) for n in names}
