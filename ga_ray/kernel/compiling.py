"""Optional `torch.compile` of the parts of a LoRA model that the per-document pass does not hook.

The per-document pass hooks every LoRA `lora_A` / `lora_B` submodule with forward hooks registered per
batch and tensor hooks on their outputs; compiled code around those would break its graph (or be
recompiled) at every batch. What holds no LoRA submodule is ordinary code: in a Llama with LoRA on q/v,
each layer's MLP and its two RMSNorms (and the final norm), where compilation fuses the elementwise
work (SiLU·up, the norm's reductions and scaling) that eager mode runs as separate kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ga_ray.kernel.lora_blocks import LoraBlock, block_modules


def compile_unhooked_parts(model: nn.Module, blocks: Sequence[LoraBlock], *, dynamic: bool = True, backend: str = "inductor") -> list[str]:
    """Compile in place (`nn.Module.compile`) every submodule that holds no LoRA block, has parameters,
    is not a bare `nn.Linear` / `nn.Embedding` (nothing to fuse there), and whose parent holds a LoRA
    block (so the largest such parts, not their pieces). Returns the compiled modules' names.

    `dynamic=True`: one compiled graph for every batch shape (documents × padded length vary).
    `backend`: torch.compile's (the tests use "aot_eager": the same tracing, no C++ code generation)."""
    hooked = {id(m) for m in block_modules(model, blocks)}
    holds: dict[int, bool] = {}

    def holds_lora(m: nn.Module) -> bool:
        if id(m) not in holds:
            holds[id(m)] = id(m) in hooked or any(holds_lora(c) for c in m.children())
        return holds[id(m)]

    compiled: list[str] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if holds_lora(child):
                visit(full, child)
            elif any(True for _ in child.parameters()) and type(child) not in (nn.Linear, nn.Embedding):
                child.compile(dynamic=dynamic, backend=backend)
                compiled.append(full)

    if holds_lora(model):
        visit("", model)
    return compiled
