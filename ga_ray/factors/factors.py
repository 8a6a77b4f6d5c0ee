"""The factors artifact: per-block EKFAC tensors in memory, and `factors/` on disk.

`factors/factors.safetensors` keys `"{block}.{C_A|C_S|Q_A|lambda_A|Q_S|lambda_S|Lambda|selected}"`
(`selected`: int64 flat indices `i*d_in + j` into the `(i, j)` grid of `Q_Sᵀ G Q_A`, by descending
eigenvalue). Eigenvectors and covariances are stored in float32 (they are used in float32; the
eigendecomposition itself ran in float64), eigenvalues and Λ in float64. `factors/factors.json`:
block order and shapes, fisher type, token and document counts, k, ε, eigenvalue mode, D, and
per-block clamping counts and Λ mass kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ga_ray.errors import GaRayError

from ga_ray.factors.eigen import eigen_scores, lambda_mass_kept

FORMAT_VERSION = 1
TENSORS = ("C_A", "C_S", "Q_A", "lambda_A", "Q_S", "lambda_S", "Lambda", "selected")
MATRIX_DTYPE = torch.float32
VECTOR_DTYPE = torch.float64


class FactorsError(GaRayError, ValueError):
    """`factors/` is missing, incomplete or inconsistent; the message says what to re-run."""


@dataclass
class FactorBlock:
    name: str
    kind: str
    shape: tuple[int, int]
    scale: float
    Q_A: torch.Tensor
    lambda_A: torch.Tensor
    Q_S: torch.Tensor
    lambda_S: torch.Tensor
    Lambda: torch.Tensor
    selected: torch.Tensor
    C_A: torch.Tensor | None = None
    C_S: torch.Tensor | None = None
    module_name: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    """Per-block statistics (clamped eigenvalue counts, Λ mass kept)."""

    @property
    def k(self) -> int:
        return int(self.selected.numel())

    def sel_ij(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row (eigenvector of C_S) and column (eigenvector of C_A) of each selected pair."""
        d_in = self.shape[1]
        return self.selected // d_in, self.selected % d_in

    def selected_eigenvalues(self, mode: str) -> torch.Tensor:
        """λ_sel (float64): Λ[i,j] (`ekfac`) or λ_S[i]·λ_A[j] (`kfac`) of the selected pairs."""
        if mode == "ekfac":
            return self.Lambda.reshape(-1)[self.selected].to(torch.float64)
        i, j = self.sel_ij()
        return self.lambda_S.to(torch.float64)[i] * self.lambda_A.to(torch.float64)[j]

    def scores(self, mode: str) -> torch.Tensor:
        return eigen_scores(mode, self.Lambda, self.lambda_S, self.lambda_A)


@dataclass
class Factors:
    blocks: list[FactorBlock]
    meta: dict[str, Any]
    """fisher, eigenvalues, top_k, epsilon, reduction, seed, n_tokens, n_docs, n_docs_lambda, …"""

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def eigenvalues(self) -> str:
        return str(self.meta.get("eigenvalues", "ekfac"))

    @property
    def epsilon(self) -> float:
        return float(self.meta.get("epsilon", 1e-6))

    @property
    def D(self) -> int:
        return sum(b.k for b in self.blocks)

    @property
    def block_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for b in self.blocks:
            out[b.name] = slice(start, start + b.k)
            start += b.k
        return out

    def __getitem__(self, name: str) -> FactorBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    # ---------------------------------------------------------------- on disk
    def to_json(self) -> dict[str, Any]:
        slices = self.block_slices
        return {
            "format_version": FORMAT_VERSION,
            **self.meta,
            "D": self.D,
            "block_order": self.block_names,
            "blocks": [
                {
                    "name": b.name,
                    "module_name": b.module_name,
                    "kind": b.kind,
                    "shape": list(b.shape),
                    "scale": b.scale,
                    "k": b.k,
                    "slice": [slices[b.name].start, slices[b.name].stop],
                    **b.info,
                }
                for b in self.blocks
            ],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for b in self.blocks:
            for key in TENSORS:
                t = getattr(b, key)
                if t is None:
                    continue
                if key == "selected":
                    t = t.to(torch.int64)
                elif key in ("C_A", "C_S", "Q_A", "Q_S"):
                    t = t.to(MATRIX_DTYPE)
                else:
                    t = t.to(VECTOR_DTYPE)
                out[f"{b.name}.{key}"] = t.detach().cpu().contiguous()
        return out

    def save(self, directory: str | Path) -> None:
        """Write `factors.safetensors` then `factors.json` (each atomically; the json last)."""
        from safetensors.torch import save as st_save

        from ga_ray.rundir import atomic_write_bytes, atomic_write_json

        directory = Path(directory)
        atomic_write_bytes(directory / "factors.safetensors", st_save(self.tensors(), metadata={"format": "ga-ray-factors"}))
        atomic_write_json(directory / "factors.json", self.to_json())

    @classmethod
    def load(cls, directory: str | Path, covariances: bool = False, device: str | torch.device = "cpu") -> Factors:
        """Read `factors/` (covariances only when asked: they are not needed to project)."""
        from safetensors import safe_open

        directory = Path(directory)
        jpath, tpath = directory / "factors.json", directory / "factors.safetensors"
        if not jpath.exists() or not tpath.exists():
            raise FactorsError(f"{directory}: no factors.json / factors.safetensors here; run `ga-ray factors` first")
        meta = json.loads(jpath.read_text())
        blocks_meta = meta.pop("blocks")
        meta.pop("block_order", None)
        meta.pop("D", None)
        blocks = []
        with safe_open(str(tpath), framework="pt", device=str(device)) as f:
            keys = set(f.keys())
            for bm in blocks_meta:
                name = bm["name"]
                want = [k for k in TENSORS if covariances or k not in ("C_A", "C_S")]
                missing = [k for k in want if f"{name}.{k}" not in keys and k not in ("C_A", "C_S")]
                if missing:
                    raise FactorsError(f"{tpath}: block {name} lacks {', '.join(missing)}; re-run `ga-ray factors`")
                t = {k: (f.get_tensor(f"{name}.{k}") if f"{name}.{k}" in keys else None) for k in want}
                info = {k: v for k, v in bm.items() if k not in ("name", "module_name", "kind", "shape", "scale", "k", "slice")}
                blocks.append(
                    FactorBlock(
                        name=name,
                        kind=bm["kind"],
                        shape=(int(bm["shape"][0]), int(bm["shape"][1])),
                        scale=float(bm["scale"]),
                        module_name=bm.get("module_name", ""),
                        info=info,
                        Q_A=t["Q_A"],
                        lambda_A=t["lambda_A"],
                        Q_S=t["Q_S"],
                        lambda_S=t["lambda_S"],
                        Lambda=t["Lambda"],
                        selected=t["selected"],
                        C_A=t.get("C_A"),
                        C_S=t.get("C_S"),
                    )
                )
        return cls(blocks, meta)

    # ---------------------------------------------------------------- summary
    def summary_rows(self, n_top: int = 3) -> list[dict[str, Any]]:
        """One row per block: shape, top eigenvalues, k, share of Λ mass kept by the top-k."""
        rows = []
        for b in self.blocks:
            top = lambda v: ", ".join(f"{x:.3g}" for x in v[:n_top].tolist())  # noqa: E731
            rows.append(
                {
                    "block": short_block_name(b.name),
                    "shape": f"{b.shape[0]}x{b.shape[1]}",
                    "top lambda_A": top(b.lambda_A),
                    "top lambda_S": top(b.lambda_S),
                    "top Lambda": top(torch.sort(b.Lambda.reshape(-1), descending=True).values),
                    "k": b.k,
                    "Lambda kept": round(lambda_mass_kept(b.Lambda, b.selected), 4),
                    "clamped": int(b.info.get("n_clamped_A", 0)) + int(b.info.get("n_clamped_S", 0)),
                }
            )
        return rows


def short_block_name(name: str) -> str:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight` → `layers.3.self_attn.q_proj.A`."""
    s = name
    for prefix in ("base_model.model.model.", "base_model.model."):
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    parts = s.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] in ("lora_A", "lora_B"):
        s = ".".join(parts[:-3] + [parts[-3][-1]])
    return s
