"""Projection of per-document LoRA gradients into the EKFAC eigenspace, and back.

For block b with selected pairs (i_k, j_k), k = 1..k_b, and λ_sel = Λ[i,j] (`ekfac`) or
λ_S[i]·λ_A[j] (`kfac`):
- project:   `z[b, k] = q_S,i_kᵀ G q_A,j_k / sqrt(λ_sel,k + ε)`  — the (i_k, j_k) entry of
  `Q_Sᵀ G Q_A`, computed from the selected eigenvector columns only (never the full rotation);
  blocks concatenated in the recorded order into `D = Σ_b k_b`.
- unproject: `Q_S · grid · Q_Aᵀ` with `grid[i_k, j_k] = z[b, k]·sqrt(λ_sel,k + ε)` (the
  pseudo-inverse), computed as `(Q_S[:, I] ⊙ w) Q_A[:, J]ᵀ`. `natural=True` divides instead of
  multiplying (a curvature-aware step; experimental).
`unproject(project(G))` is the orthogonal projection of G onto span{q_S,i q_A,jᵀ : (i, j) selected}
(these rank-one matrices are orthonormal in the Frobenius inner product).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ga_ray.factors.factors import Factors, FactorsError

__all__ = ["Factors", "FactorsError", "Projector"]


class _BlockProj:
    def __init__(self, fb, mode: str, epsilon: float, device: torch.device):
        self.name = fb.name
        self.shape = fb.shape
        i, j = fb.sel_ij()
        ui, inv_i = torch.unique(i, return_inverse=True)
        uj, inv_j = torch.unique(j, return_inverse=True)
        self.QS_u = fb.Q_S[:, ui].to(device=device, dtype=torch.float32).contiguous()  # [o, |ui|]
        self.QA_u = fb.Q_A[:, uj].to(device=device, dtype=torch.float32).contiguous()  # [i, |uj|]
        self.inv_i = inv_i.to(device)
        self.inv_j = inv_j.to(device)
        self.QS_sel = fb.Q_S[:, i].to(device=device, dtype=torch.float32).contiguous()  # [o, k]
        self.QA_sel = fb.Q_A[:, j].to(device=device, dtype=torch.float32).contiguous()  # [i, k]
        lam = fb.selected_eigenvalues(mode)
        self.sqrt_lam = torch.sqrt(lam + epsilon).to(device=device, dtype=torch.float32)  # [k]
        self.k = int(fb.selected.numel())

    def project(self, G: torch.Tensor) -> torch.Tensor:
        """`G [B, o, i]` → `[B, k]`."""
        if tuple(G.shape[-2:]) != tuple(self.shape):
            raise ValueError(f"block {self.name}: gradient shape {tuple(G.shape[-2:])} != factors shape {tuple(self.shape)}")
        G = G.to(device=self.QS_u.device, dtype=torch.float32)
        R = self.QS_u.T @ G @ self.QA_u  # [B, |ui|, |uj|]
        vals = R[:, self.inv_i, self.inv_j]  # [B, k]
        return vals / self.sqrt_lam

    def unproject(self, z: torch.Tensor, natural: bool = False) -> torch.Tensor:
        """`z [N, k]` → `[N, o, i]`."""
        w = z / self.sqrt_lam if natural else z * self.sqrt_lam
        return torch.einsum("ok,nk,ik->noi", self.QS_sel, w, self.QA_sel)


class Projector:
    """Projects per-document gradients with saved factors; holds only the selected eigenvector columns."""

    def __init__(self, factors: Factors | str | Path, device: str | torch.device = "cpu", eigenvalues: str | None = None, epsilon: float | None = None):
        """`factors`: a `Factors` or a `factors/` folder. `eigenvalues` / `epsilon` default to the saved ones."""
        if not isinstance(factors, Factors):
            factors = Factors.load(factors)
        self.factors = factors
        self.device = torch.device(device)
        self.mode = eigenvalues or factors.eigenvalues
        self.epsilon = factors.epsilon if epsilon is None else float(epsilon)
        self._blocks = [_BlockProj(fb, self.mode, self.epsilon, self.device) for fb in factors.blocks]
        self.block_names = [b.name for b in self._blocks]
        self.block_slices: dict[str, slice] = factors.block_slices
        self.D = factors.D

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """`{block: [B, o, i]}` → `[B, D]` float32 (blocks in the recorded order)."""
        missing = [n for n in self.block_names if n not in grads]
        if missing:
            raise KeyError(f"gradients lack {len(missing)} block(s) of the factors, e.g. {missing[0]}: are factors and model from the same adapter?")
        return torch.cat([bp.project(grads[bp.name]) for bp in self._blocks], dim=1)

    def unproject(self, z: torch.Tensor, natural: bool = False) -> dict[str, torch.Tensor]:
        """`z [D]` (or `[N, D]`) → `{parameter name: [o, i]}` (or `[N, o, i]`), float32."""
        single = z.dim() == 1
        zz = z.reshape(1, -1) if single else z
        if zz.shape[1] != self.D:
            raise ValueError(f"z has {zz.shape[1]} dims, the factors have D={self.D}")
        zz = zz.to(device=self.device, dtype=torch.float32)
        out = {}
        for bp in self._blocks:
            s = self.block_slices[bp.name]
            v = bp.unproject(zz[:, s], natural=natural)
            out[bp.name] = v[0] if single else v
        return out
