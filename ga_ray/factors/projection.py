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

Per-token projection: since `G = Σ_t δ_t a_tᵀ`, `z[b, k] = Σ_t (q_S,i_kᵀ δ_t)(q_A,j_kᵀ a_t) / sqrt(λ_sel,k + ε)`
can be formed from the per-token quantities without materialising G (`project_tokens`, with
`‖G‖²_F = Σ_{t,t'} (δ_t·δ_t')(a_t·a_t')` for the norm). `token_reducers` picks, per block and
batch shape, whichever of the two costs fewer multiply-adds; `project` stays the exact reference.
"""

from __future__ import annotations

from collections.abc import Callable
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
        self.n_ui = int(ui.numel())
        self.n_uj = int(uj.numel())

    def dense_flops(self, n_docs: int, seq_len: int) -> int:
        """Multiply-adds of `G_n` for a `[n_docs, seq_len]` batch, then `project` (and the norm)."""
        o, i = self.shape
        return n_docs * (seq_len * o * i + self.n_ui * o * i + self.n_ui * i * self.n_uj + o * i)

    def token_flops(self, n_docs: int, seq_len: int) -> int:
        """Multiply-adds of `project_tokens` for a `[n_docs, seq_len]` batch (the Gram norm included)."""
        o, i = self.shape
        return n_docs * (seq_len * (o * self.n_ui + i * self.n_uj + self.k) + seq_len * seq_len * (o + i + 1))

    def project_tokens(self, delta: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`δ [B, T, o]` (zero at pads), `a [B, T, i]` → (`z [B, k]` = `project(Σ_t δ_t a_tᵀ)`, `‖G‖²_F [B]` float64)."""
        if delta.shape[-1] != self.shape[0] or a.shape[-1] != self.shape[1]:
            raise ValueError(f"block {self.name}: per-token shapes {tuple(delta.shape)}, {tuple(a.shape)} do not fit {tuple(self.shape)}")
        d32 = delta.to(device=self.QS_u.device, dtype=torch.float32)
        a32 = a.to(device=self.QS_u.device, dtype=torch.float32)
        P = d32 @ self.QS_u  # [B, T, |ui|]: q_S,iᵀ δ_t
        Q = a32 @ self.QA_u  # [B, T, |uj|]: q_A,jᵀ a_t
        z = torch.einsum("btk,btk->bk", P[..., self.inv_i], Q[..., self.inv_j]) / self.sqrt_lam  # selected pairs only
        d64, a64 = delta.double(), a.double()  # the Gram sum cancels: float64
        sq = (torch.bmm(d64, d64.transpose(1, 2)) * torch.bmm(a64, a64.transpose(1, 2))).sum(dim=(1, 2))
        return z, sq

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

    def project(self, grads: dict[str, torch.Tensor], projected: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`{block: [B, o, i]}` → `[B, D]` float32 (blocks in the recorded order).

        `projected`: blocks already projected (`[B, k]`, e.g. by `token_reducers`), taken as they are."""
        projected = projected or {}
        missing = [n for n in self.block_names if n not in grads and n not in projected]
        if missing:
            raise KeyError(f"gradients lack {len(missing)} block(s) of the factors, e.g. {missing[0]}: are factors and model from the same adapter?")
        parts = [projected[bp.name].to(torch.float32) if bp.name in projected else bp.project(grads[bp.name]) for bp in self._blocks]
        return torch.cat(parts, dim=1)

    def token_reducers(self, n_docs: int, seq_len: int, mode: str = "auto") -> dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """Blocks to project from per-token quantities in a `[n_docs, seq_len]` batch (for `per_document_gradients`).

        `mode`: "auto" (where `token_flops < dense_flops`), "never" (the exact `G_n` path everywhere),
        "always" (every block; for tests and benchmarks)."""
        if mode not in ("auto", "never", "always"):
            raise ValueError(f"token projection mode must be 'auto', 'never' or 'always', got {mode!r}")
        if mode == "never":
            return {}
        return {
            bp.name: bp.project_tokens
            for bp in self._blocks
            if mode == "always" or bp.token_flops(n_docs, seq_len) < bp.dense_flops(n_docs, seq_len)
        }

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
