"""Pass 1 of EKFAC: token sums of the activation and output-gradient covariances of every block.

Pure compute. `C_A = E[a aᵀ]`, `C_S = E[δ δᵀ]` over the non-pad tokens of the data (DESIGN.md):
the per-batch sums come from `per_document_gradients(..., covariances=True)`, accumulate here in
float64, are all-reduced across workers (sums and counts), and are divided by the token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ga_ray.kernel.per_document import PerDocResult
from ga_ray.kernel.lora_blocks import LoraBlock


class NonFiniteTracker:
    """Remembers, per block, the first batch whose contribution was NaN/Inf."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[int, str]] = {}

    def check(self, contributions: dict[str, Sequence[torch.Tensor]], batch_index: int, label: str) -> None:
        names = list(contributions)
        if not names:
            return
        flags = torch.stack([torch.stack([t.isfinite().all() for t in contributions[n]]).all() for n in names]).cpu().tolist()
        for n, ok in zip(names, flags):
            if not ok and n not in self.first:
                self.first[n] = (batch_index, label)

    def to_list(self) -> list[tuple[str, int, str]]:
        return [(n, i, lab) for n, (i, lab) in self.first.items()]


def describe_nonfinite(found: list[tuple[str, int, str]], block_order: Sequence[str], what: str) -> str | None:
    """One message naming the first block (earliest batch, then block order) where NaN/Inf appeared."""
    if not found:
        return None
    order = {n: k for k, n in enumerate(block_order)}
    found = sorted(found, key=lambda x: (x[1], order.get(x[0], 1 << 30)))
    name, _, label = found[0]
    others = sorted({n for n, _, _ in found} - {name}, key=lambda n: order.get(n, 1 << 30))
    more = f" ({len(others)} more block(s) affected, e.g. {others[0]})" if others else ""
    return (
        f"NaN/Inf in the {what} of block {name}, first in {label}{more}. "
        "Check the adapter weights and those documents (a NaN/Inf loss or weight), or use float32 (model.dtype=float32)"
    )


class CovarianceAccumulator:
    """Float64 running sums `Σ a aᵀ`, `Σ δ δᵀ` per block, plus token and document counts."""

    def __init__(self, blocks: Sequence[LoraBlock], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.blocks = list(blocks)
        self.aat = {b.name: torch.zeros((b.d_in, b.d_in), dtype=dtype, device=device) for b in self.blocks}
        self.ddt = {b.name: torch.zeros((b.d_out, b.d_out), dtype=dtype, device=device) for b in self.blocks}
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)  # [n_tokens, n_docs, padded tokens]
        self.nonfinite = NonFiniteTracker()
        self.n_batches = 0

    def update(self, result: PerDocResult, label: str | None = None) -> None:
        if result.aat is None or result.ddt is None or result.n_tok is None:
            raise ValueError("CovarianceAccumulator.update needs per_document_gradients(..., covariances=True)")
        label = label or f"batch {self.n_batches}"
        self.nonfinite.check({n: (result.aat[n], result.ddt[n]) for n in self.aat}, self.n_batches, label)
        for n in self.aat:
            self.aat[n] += result.aat[n].to(self.aat[n].dtype)
            self.ddt[n] += result.ddt[n].to(self.ddt[n].dtype)
        self.counts[0] += float(result.n_tok)
        self.counts[1] += float(result.loss.shape[0])
        self.counts[2] += float(result.targets.numel())
        self.n_batches += 1

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything to sum across workers (in a fixed order)."""
        return [*self.aat.values(), *self.ddt.values(), self.counts]

    @property
    def n_tokens(self) -> int:
        return int(round(self.counts[0].item()))

    @property
    def n_docs(self) -> int:
        return int(round(self.counts[1].item()))

    @property
    def padding_fraction(self) -> float:
        padded = self.counts[2].item()
        return 0.0 if padded == 0 else 1.0 - self.counts[0].item() / padded

    def covariances(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Block → (C_A, C_S) = token sums / number of non-pad tokens (float64)."""
        n = max(self.n_tokens, 1)
        return {name: (self.aat[name] / n, self.ddt[name] / n) for name in self.aat}
