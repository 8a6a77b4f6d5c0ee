"""Mixed-adapter LoRA by gathered batched matmuls: every row adds its own adapter's B A x in two `bmm`s.

PEFT's mixed batches (`adapter_names=`) loop in Python, per LoRA layer and per step, over the adapters present
(finding each one's rows with a list comprehension), and register forward hooks on every module at every call;
on a small model decoding 64 rows of ~10 variants that is about half the time of a step. A multi-LoRA server
(vLLM's punica kernels, S-LoRA) instead stacks the adapters' matrices and gathers them per row. This module does
the same for plain LoRA on `nn.Linear` layers, exactly:

    y_b = W x_b + s_k B_k (A_k x_b),   k = the adapter of row b  (s_k = lora_alpha / r, B_k s_k stored folded)

with A_k zero-padded to the largest rank (zero rows add nothing) and the base model (`__base__`) as an all-zero
adapter. The layers compute their base output with the adapters switched off (PEFT's own `disable_adapters`
flag, which returns `base_layer(x)`), and a forward hook adds the gathered delta.

Only layers PEFT would treat as vanilla LoRA qualify (a `peft.tuners.lora.layer.Linear` with no DoRA or other
variant, no LoRA bias, not merged); `StackedLora.build` returns None otherwise and the engine uses PEFT's path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

BASE_KEY = "__base__"


def _lora_linears(model: Any) -> list[Any]:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _vanilla(m: Any) -> bool:
    from peft.tuners.lora.layer import Linear

    if type(m) is not Linear or getattr(m, "merged", False):
        return False
    if any(getattr(m, "lora_variant", {}).get(k) is not None for k in m.lora_A):
        return False
    return not any(bool(getattr(m, "lora_bias", {}).get(k, False)) for k in m.lora_A)


class _Layer:
    """One LoRA Linear's stacked matrices: A [n, r, d_in] and B·s [n, d_out, r] (index 0: the base model's zeros)."""

    def __init__(self, module: Any, keys: Sequence[str]) -> None:
        self.module = module
        base = module.get_base_layer()
        d_in, d_out = base.in_features, base.out_features
        ranks = [module.lora_A[k].weight.shape[0] for k in keys if k in module.lora_A]
        r = max(ranks, default=1)
        # the adapters' own dtype, as PEFT computes the LoRA path (x cast to it, the sum cast back)
        w = next((module.lora_A[k].weight for k in keys if k in module.lora_A), base.weight)
        A = torch.zeros((len(keys) + 1, r, d_in), dtype=w.dtype, device=w.device)
        B = torch.zeros((len(keys) + 1, d_out, r), dtype=w.dtype, device=w.device)
        for i, k in enumerate(keys, start=1):
            if k not in module.lora_A:  # this adapter does not target the layer: it adds nothing here
                continue
            a, b = module.lora_A[k].weight, module.lora_B[k].weight
            A[i, : a.shape[0]] = a.detach().to(A.dtype)
            B[i, :, : b.shape[1]] = (b.detach() * module.scaling[k]).to(B.dtype)
        self.A, self.B = A, B
        self.A_rows: torch.Tensor | None = None  # gathered per row, refreshed when the rows change
        self.B_rows: torch.Tensor | None = None

    def gather(self, idx: torch.Tensor) -> None:
        self.A_rows = self.A.index_select(0, idx).transpose(1, 2)  # [b, d_in, r]
        self.B_rows = self.B.index_select(0, idx).transpose(1, 2)  # [b, r, d_out]

    def hook(self, _module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        squeeze = x.dim() == 2
        if squeeze:
            x = x[:, None, :]
        delta = torch.bmm(torch.bmm(x.to(self.A_rows.dtype), self.A_rows), self.B_rows)  # type: ignore[union-attr]
        if squeeze:
            delta = delta[:, 0, :]
        return output + delta.to(output.dtype)


class StackedLora:
    """Every adapter of a `PeftModel`, stacked per LoRA layer; `rows(keys)` applies them to a mixed batch."""

    def __init__(self, layers: list[_Layer], keys: Sequence[str]) -> None:
        self._layers = layers
        self._index = {k: i for i, k in enumerate(keys, start=1)} | {BASE_KEY: 0}
        self._current: tuple[str, ...] | None = None

    @classmethod
    def build(cls, peft_model: Any) -> StackedLora | None:
        """The stacked form of `peft_model`'s adapters, or None when some LoRA layer is not vanilla LoRA."""
        modules = _lora_linears(peft_model)
        if not modules or not all(_vanilla(m) for m in modules):
            return None
        keys = list(peft_model.peft_config)
        return cls([_Layer(m, keys) for m in modules], keys)

    def knows(self, keys: Sequence[str]) -> bool:
        return all(k in self._index for k in keys)

    @contextmanager
    def rows(self, keys: Sequence[str]) -> Iterator[None]:
        """For the block: the LoRA layers compute their base output only, plus row b's adapter keys[b]."""
        keys = tuple(keys)
        if keys != self._current:
            idx = torch.tensor([self._index[k] for k in keys], dtype=torch.long, device=self._layers[0].A.device)
            for layer in self._layers:
                layer.gather(idx)
            self._current = keys
        handles = []
        before = [layer.module._disable_adapters for layer in self._layers]
        try:
            for layer in self._layers:
                layer.module._disable_adapters = True  # PEFT's flag: forward returns base_layer(x)
                handles.append(layer.module.register_forward_hook(layer.hook))
            yield
        finally:
            for h in handles:
                h.remove()
            for layer, was in zip(self._layers, before):
                layer.module._disable_adapters = was
