"""Discovery of the LoRA weight blocks of a PEFT model.

Every `lora_A` and every `lora_B` weight is its own block (EKFAC treats each as a linear map with
input activations `a` and output gradients `δ`). Blocks are keyed by their PEFT parameter name
exactly as `model.named_parameters()` spells it, and listed in `named_parameters()` order: that
order is recorded in `factors/factors.json` and fixes the layout of the projected vector.

Supported: PEFT LoRA on `nn.Linear` base layers (and transformers' `Conv1D`, whose LoRA A/B are
still `nn.Linear`), any `target_modules`, standard (`alpha/r`) or rsLoRA (`alpha/√r`) scaling, one
adapter (default name `"default"`). Not supported (a clear `LoraBlockError`): DoRA and other LoRA
variants, LoRA biases, LoRA on embeddings or convolutions, several adapters active at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ga_ray.errors import GaRayError
from torch import nn


class LoraBlockError(GaRayError, ValueError):
    """The model's LoRA layout is not one this tool can analyse; the message says why."""


@dataclass(frozen=True)
class LoraBlock:
    name: str
    """PEFT parameter name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`."""
    module_name: str
    """Name of the `lora_A.<adapter>` / `lora_B.<adapter>` `nn.Linear` submodule (hooks attach here)."""
    layer_name: str
    """Name of the PEFT LoRA layer that owns the block (e.g. `...self_attn.q_proj`)."""
    kind: str
    """`"A"` or `"B"`."""
    shape: tuple[int, int]
    """Weight shape `(d_out, d_in)` of the block: A: `(r, d_in)`, B: `(d_out, r)`."""
    scale: float
    """LoRA scale s of the owning layer (alpha/r, or alpha/√r with rsLoRA)."""

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_json(self) -> dict:
        return {"name": self.name, "module_name": self.module_name, "layer_name": self.layer_name, "kind": self.kind, "shape": list(self.shape), "scale": self.scale}


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and isinstance(getattr(module, "lora_A"), nn.ModuleDict)


def find_lora_blocks(model: nn.Module, adapter: str | None = None) -> list[LoraBlock]:
    """Every LoRA A/B weight of `model`, in `named_parameters()` order.

    `adapter` defaults to the model's single adapter (usually `"default"`). Raises `LoraBlockError`
    when there is no LoRA weight, or the layout uses a feature whose gradient is not `δ aᵀ` of a
    plain linear map (DoRA and other variants, LoRA bias, embedding/conv LoRA).
    """
    layers: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if _is_lora_layer(m)}
    if not layers:
        raise LoraBlockError("no PEFT LoRA layer found in the model: load it with peft (PeftModel.from_pretrained) first")
    adapters = set()
    for m in layers.values():
        adapters.update(m.lora_A.keys())
    if adapter is None:
        if len(adapters) != 1:
            raise LoraBlockError(f"the model has several LoRA adapters ({', '.join(sorted(adapters))}); pass adapter=NAME")
        adapter = next(iter(adapters))
    elif adapter not in adapters:
        raise LoraBlockError(f"adapter {adapter!r} not in the model (adapters: {', '.join(sorted(adapters)) or 'none'})")

    for lname, m in layers.items():
        if adapter not in m.lora_A:
            continue
        variants = getattr(m, "lora_variant", {}) or {}
        if adapter in variants:
            raise LoraBlockError(f"{lname}: LoRA variant {type(variants[adapter]).__name__} (e.g. DoRA) is not supported; use plain LoRA")
        if getattr(m, "lora_embedding_A", None) is not None and adapter in getattr(m, "lora_embedding_A", {}):
            raise LoraBlockError(f"{lname}: LoRA on embeddings is not supported; drop it from target_modules")
        for kind, sub in (("A", m.lora_A[adapter]), ("B", m.lora_B[adapter])):
            if type(sub) is not nn.Linear:
                raise LoraBlockError(f"{lname}: lora_{kind} is {type(sub).__name__}, only nn.Linear LoRA (attention/MLP projections) is supported")
            if sub.bias is not None:
                raise LoraBlockError(f"{lname}: LoRA bias (lora_bias=True) is not supported")

    # map parameter identity -> (layer name, kind, module name) for the adapter's weights
    owner: dict[int, tuple[str, str, str, float]] = {}
    for lname, m in layers.items():
        if adapter not in m.lora_A:
            continue
        scale = float(m.scaling[adapter])
        for kind, key in (("A", "lora_A"), ("B", "lora_B")):
            owner[id(getattr(m, key)[adapter].weight)] = (lname, kind, f"{lname}.{key}.{adapter}" if lname else f"{key}.{adapter}", scale)

    blocks: list[LoraBlock] = []
    seen: set[int] = set()
    for pname, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in owner and key not in seen:
            seen.add(key)
            lname, kind, mname, scale = owner[key]
            blocks.append(LoraBlock(pname, mname, lname, kind, (int(p.shape[0]), int(p.shape[1])), scale))
    if len(blocks) != len(owner):
        raise LoraBlockError("some LoRA weights are not reachable through model.named_parameters()")
    return blocks


def block_parameters(model: nn.Module, blocks: list[LoraBlock]) -> list[torch.nn.Parameter]:
    """The weight parameters of `blocks`, in block order."""
    params = dict(model.named_parameters(remove_duplicate=False))
    try:
        return [params[b.name] for b in blocks]
    except KeyError as exc:
        raise LoraBlockError(f"parameter {exc.args[0]!r} not in the model (blocks from another model?)") from None


def block_modules(model: nn.Module, blocks: list[LoraBlock]) -> list[nn.Linear]:
    """The `nn.Linear` LoRA submodules of `blocks`, in block order."""
    modules = dict(model.named_modules())
    try:
        return [modules[b.module_name] for b in blocks]  # type: ignore[misc]
    except KeyError as exc:
        raise LoraBlockError(f"module {exc.args[0]!r} not in the model (blocks from another model?)") from None
