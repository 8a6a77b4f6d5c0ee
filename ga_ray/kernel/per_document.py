"""Exact per-document gradients of every LoRA weight from ONE forward and ONE backward pass.

Pure compute: tensors in, tensors out; no Ray, no files.

How. PEFT computes a LoRA layer as `h = W0 x + lora_B(lora_A(dropout(x))) * s`. Hooking the two
`nn.Linear` submodules gives, per token t, exactly the quantities of DESIGN.md:
- `lora_A`: input `a_t = x_t` (dropout is the identity in eval), output gradient
  `δ_t = ∂L/∂(A x_t) = s·Bᵀ g_t`  (the scale enters through the chain rule),
- `lora_B`: input `a_t = A x_t`, output gradient `δ_t = ∂L/∂(B A x_t) = s·g_t`,
so the gradient of a weight is `Σ_t δ_t a_tᵀ`. A forward hook stores each submodule's input and
registers a tensor hook on its output; in the backward pass the tensor hook receives `δ` for the
whole batch and forms `G_n = Σ_{t ∈ doc n, non-pad} δ_t a_tᵀ` for every document with one batched
matmul, then drops the stored input. The backward pass is `torch.autograd.grad(Σ_n L_n, lora_A
outputs)`: documents of a batch do not interact (attention is per sequence, padding masked or, with
right padding, never attended to), so `∂(Σ_m L_m)/∂h_t = ∂L_n/∂h_t` at every position t of document n.
Differentiating w.r.t. the hooked outputs rather than the weights makes autograd skip the LoRA
weight-gradient GEMMs (nobody reads them); nothing is written to `param.grad`.

Memory: the stored inputs are the tensors autograd keeps for the weight gradients anyway; the
output is `B × Σ_blocks d_out·d_in` floats, bounded by the batch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ga_ray.kernel.collate import Batch
from ga_ray.kernel.lora_blocks import LoraBlock, block_modules, block_parameters

IGNORE = -100


@dataclass
class PerDocResult:
    grads: dict[str, torch.Tensor]
    """Block name → `[B, d_out, d_in]` per-document gradients, float32 (float64 for a float64 model);
    empty with `per_doc=False`."""
    loss: torch.Tensor
    """`[B]` float32 per-document loss (with the labels used: data's or sampled)."""
    n_tokens: torch.Tensor
    """`[B]` long: non-pad tokens per document."""
    n_targets: torch.Tensor
    """`[B]` long: response targets per document (the terms of the loss)."""
    targets: torch.Tensor
    """`[B, T]` long: the label of token position t (predicted from t-1), IGNORE where not a target."""
    aat: dict[str, torch.Tensor] | None = None
    """With `covariances=True`: block → `Σ a aᵀ` over the batch's non-pad tokens, `[d_in, d_in]`."""
    ddt: dict[str, torch.Tensor] | None = None
    """With `covariances=True`: block → `Σ δ δᵀ` over the batch's non-pad tokens, `[d_out, d_out]`."""
    n_tok: int | None = None
    """With `covariances=True`: non-pad tokens in the batch (the covariances' denominator)."""
    projected: dict[str, torch.Tensor] = field(default_factory=dict)
    """With `token_reducers`: block → `[B, k]` projections computed from the per-token quantities
    (those blocks are absent from `grads`)."""
    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    """With `token_reducers`: block → `[B]` squared Frobenius norm of `G_n` (float64)."""
    extras: dict = field(default_factory=dict)


def doc_seed(seed: int, doc_id: int) -> int:
    """A 63-bit seed that depends only on (seed, doc_id): stable across processes, shards, batches."""
    h = hashlib.blake2b(f"ga-ray:{int(seed)}:{int(doc_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def doc_uniforms(seed: int, doc_id: int, length: int) -> torch.Tensor:
    """`length` float64 uniforms in [0, 1) for the positions 0..length-1 of one document (CPU)."""
    g = torch.Generator().manual_seed(doc_seed(seed, doc_id))
    return torch.rand(int(length), generator=g, dtype=torch.float64)


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Inverse-CDF draws: row r gets the first k with `cdf_r[k] > u_r · cdf_r[-1]` (u in [0,1)).

    `logits [R, V]`, `u [R]` → labels `[R]` long. A label with zero probability is never drawn.
    Rows are processed in chunks (default: about 2^26 floats of CDF at a time).
    """
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    V = logits.shape[-1]
    if chunk_rows is None:
        chunk_rows = max(1, min(4096, (1 << 26) // max(V, 1)))
    for s in range(0, logits.shape[0], chunk_rows):
        rows = logits[s : s + chunk_rows].detach().float()
        cdf = torch.softmax(rows, dim=-1).cumsum_(dim=-1)
        v = u[s : s + chunk_rows].to(device=cdf.device, dtype=cdf.dtype) * cdf[:, -1]
        idx = torch.searchsorted(cdf, v.unsqueeze(1), right=True).squeeze(1)
        out[s : s + chunk_rows] = idx.clamp_(max=V - 1)
    return out


TokenReducer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""`(δ [B, T, d_out] with pad positions zeroed, a [B, T, d_in]) → (z [B, k], ‖G_n‖² [B])`: a block's
projection computed from per-token quantities instead of `G_n = Σ_t δ_t a_tᵀ`
(`ga_ray.factors.projection.Projector.token_reducers` makes them)."""

# Architectures whose causal-LM logits are exactly `lm_head(decoder(...).last_hidden_state)` (no
# soft-capping or logit scaling): for them the head runs on the target positions only.
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, lm_head) when the logits are a plain `nn.Linear` of the decoder's last hidden state, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in _PLAIN_HEAD:
        return None
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return None
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear:  # e.g. LoRA on lm_head: its hooks expect [B, T, d] inputs
        return None
    return base.get_decoder(), head


def _is_right_padded(attn: torch.Tensor) -> bool:
    """Every row is ones then zeros (what `collate` builds)."""
    return bool((attn[:, 1:] <= attn[:, :-1]).all())


_CAUSAL_SDPA = "ga_ray_causal_sdpa"


@functools.cache
def _causal_sdpa_registered() -> bool:
    """Register `_CAUSAL_SDPA` (transformers' own SDPA attention called without a mask, so with
    `is_causal`) once per process; False where transformers has no attention registry (< 4.48, which
    has no packed-sequence check either)."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return False

    def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register(_CAUSAL_SDPA, causal_sdpa)
    return True


@contextlib.contextmanager
def _mask_free_attention(model: nn.Module) -> Iterator[None]:
    """While inside: a model on transformers' `sdpa` attention runs it as `_CAUSAL_SDPA`.

    Why: given no mask, transformers still checks the position ids for packed sequences, a `.all()`
    read back from the device in every forward (a host sync per batch on a GPU). An attention
    implementation without a registered mask function gets no mask built and no check, and this one is
    the same SDPA call with `is_causal`. Other implementations (eager, flash, flex) are left as they are.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not _causal_sdpa_registered():
        yield
        return
    config._attn_implementation = _CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def _target_logits(
    model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, b_idx: torch.Tensor, p_idx: torch.Tensor, fast: bool = True, right_padded: bool | None = None
) -> torch.Tensor:
    """`[R, V]` logits at the predicting positions `(b_idx, p_idx)` only.

    Two savings over `model(ids, attention_mask).logits[b_idx, p_idx]`, neither changing a target's
    logit: (1) with right padding no real token can attend to a pad (pads come later, attention is
    causal), so the padding mask is dropped and SDPA runs its causal kernel instead of an explicit
    mask; pad positions then hold other values, but no loss reads them and their gradient is exactly
    zero. (2) for plain-head architectures the vocabulary projection (and its backward) runs on the
    target rows only, not on every prompt and pad position. `fast=False`: neither (the reference).
    `right_padded`: known from how the batch was built (None: checked here, a device-to-host sync on GPU).
    """
    padded_right = fast and (right_padded if right_padded is not None else _is_right_padded(attn))
    mask = None if padded_right else attn
    split = _split_head(model) if fast else None
    if split is None:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[b_idx, p_idx]
    decoder, head = split
    with _mask_free_attention(decoder) if mask is None else contextlib.nullcontext():
        out = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden[b_idx, p_idx])


class _Capture:
    """Forward hooks on the LoRA `nn.Linear` submodules; tensor hooks on their outputs."""

    def __init__(
        self,
        blocks: Sequence[LoraBlock],
        modules: Sequence[nn.Module],
        token_mask: torch.Tensor,
        per_doc: bool,
        covariances: bool,
        cov_dtype: torch.dtype,
        token_reducers: Mapping[str, TokenReducer] | None = None,
    ):
        self.blocks = list(blocks)
        self.modules = list(modules)
        self.mask_f = token_mask.to(torch.float32)  # [B, T]
        self.mask_b = token_mask.bool()
        self.per_doc = per_doc
        self.covariances = covariances
        self.cov_dtype = cov_dtype
        self.inputs: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.reduced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reducers = {i: token_reducers[b.name] for i, b in enumerate(self.blocks) if token_reducers and b.name in token_reducers}
        self.outputs: dict[int, torch.Tensor] = {}  # the hooked outputs that require grad, until the backward
        self.aat: dict[int, torch.Tensor] = {}
        self.ddt: dict[int, torch.Tensor] = {}
        self.fired: set[int] = set()
        self.handles: list = []

    def __enter__(self) -> _Capture:
        for i, m in enumerate(self.modules):
            self.handles.append(m.register_forward_hook(self._forward_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.inputs.clear()
        self.outputs.clear()

    def _forward_hook(self, i: int):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return None
            if i in self.fired:
                raise RuntimeError(
                    f"{self.blocks[i].module_name} ran twice in one forward pass (gradient checkpointing or a shared module); "
                    "per-document gradients need each LoRA module to run once: disable gradient checkpointing"
                )
            self.fired.add(i)
            a = args[0].detach()
            if a.dim() != 3 or a.shape[:2] != self.mask_b.shape:
                raise RuntimeError(f"{self.blocks[i].module_name}: expected input [B, T, d], got {tuple(a.shape)}")
            if self.covariances:
                af = a[self.mask_b].to(self.cov_dtype)  # [N_tok, d_in] non-pad tokens
                self.aat[i] = af.T @ af
            if self.per_doc or self.covariances:
                self.inputs[i] = a
                output.register_hook(self._grad_hook(i))
                if output.requires_grad:
                    self.outputs[i] = output
            return None

        return hook

    def wrt(self) -> list[torch.Tensor]:
        """What the backward differentiates with respect to: the lora_A outputs, and a lora_B output
        only where its layer's lora_A is not hooked. A lora_B output lies on the path to its lora_A
        output, so every hooked output's tensor hook fires, while autograd skips the weight-gradient
        GEMMs that nobody reads; only small `[B, T, r]` gradients come back."""
        hooked_a = {self.blocks[i].layer_name for i in self.outputs if self.blocks[i].kind == "A"}
        return [t for i, t in self.outputs.items() if self.blocks[i].kind == "A" or self.blocks[i].layer_name not in hooked_a]

    def _grad_hook(self, i: int):
        def hook(g: torch.Tensor):
            a = self.inputs.pop(i)
            if self.per_doc:
                dt = torch.promote_types(a.dtype, torch.float32)  # float32 (float64 for a float64 model)
                gm = g.to(dt) * self.mask_f.to(dt).unsqueeze(-1)  # [B, T, d_out], pad positions zeroed
                reducer = self.reducers.get(i)
                if reducer is not None:  # projected straight from the per-token quantities, no G_n
                    self.reduced[i] = reducer(gm, a.to(dt))
                else:
                    self.grads[i] = torch.bmm(gm.transpose(1, 2), a.to(dt))  # [B, d_out, d_in]
            if self.covariances:
                gf = g[self.mask_b].to(self.cov_dtype)
                self.ddt[i] = gf.T @ gf
            return None

        return hook


def per_document_gradients(
    model: nn.Module,
    blocks: Sequence[LoraBlock],
    batch: Batch,
    *,
    labels: Literal["empirical", "true"] = "empirical",
    seed: int = 0,
    reduction: Literal["sum", "mean"] = "sum",
    covariances: bool = False,
    per_doc: bool = True,
    cov_dtype: torch.dtype = torch.float32,
    token_reducers: Mapping[str, TokenReducer] | None = None,
    fast: bool = True,
) -> PerDocResult:
    """Every document's gradient of every LoRA block, from one forward and one backward pass.

    `batch` is right-padded (`ga_ray.kernel.collate`), on the model's device. The loss of document n
    is `L_n = Σ_{t≥1} loss_mask[t]·CE(logits[t-1], y_t)` (`mean`: divided by Σ loss_mask), with
    `y` the data's tokens (`labels="empirical"`) or draws from the model's own next-token
    distribution (`labels="true"`), the draw at position t of document n depending only on
    `(seed, doc_id, t)`. Returns float32 `G_n` per block `[B, d_out, d_in]`; with
    `covariances=True` also the batch's token sums `Σ a aᵀ`, `Σ δ δᵀ` over non-pad tokens (in
    `cov_dtype`) for EKFAC. `per_doc=False` skips the per-document gradients (covariance pass).
    `token_reducers` (block name → `TokenReducer`): those blocks are reduced from the per-token
    quantities (`projected`, `sq_norms`) instead of materialising `G_n`.
    The model must be in eval mode (dropout off); `param.grad` is never touched, and no LoRA weight
    gradient is computed (the backward differentiates w.r.t. the hooked lora_A outputs).
    `fast=False` is the plain reference pass (full logits under the padding mask, backward w.r.t.
    the LoRA weights): the same numbers, kept for the tests and the benchmark's before/after.
    """
    if labels not in ("empirical", "true"):
        raise ValueError(f"labels must be 'empirical' or 'true', got {labels!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if model.training:
        raise ValueError("per_document_gradients needs the model in eval mode (dropout must be off): call model.eval()")
    blocks = list(blocks)
    modules = block_modules(model, blocks)
    params = block_parameters(model, blocks)
    device = params[0].device if params else batch.input_ids.device
    ids = batch.input_ids.to(device)
    attn = batch.attention_mask.to(device)
    lmask = batch.loss_mask.to(device)
    B, T = ids.shape

    # targets: token t (t ≥ 1) predicted from position t-1, where loss_mask[t] = 1 on a real token
    tmask = (lmask[:, 1:] > 0) & (attn[:, 1:] > 0)  # [B, T-1]
    if batch.targets is not None:  # found on the host by collate: no device-to-host nonzero here
        b_idx, p_idx = (t.to(device, non_blocking=True) for t in batch.targets)
    else:
        b_idx, p_idx = tmask.nonzero(as_tuple=True)  # p_idx: predicting position; target at p_idx + 1
    n_targets = tmask.sum(1)
    n_tokens = attn.sum(1)

    saved_flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad(), _Capture(blocks, modules, attn, per_doc, covariances, cov_dtype, token_reducers) as cap:
            rows = _target_logits(model, ids, attn, b_idx, p_idx, fast, batch.right_padded)  # [R, V], the predicting positions only
            if labels == "empirical":
                y = ids[b_idx, p_idx + 1]
            else:
                u = _uniforms_for_rows(batch.doc_ids, n_tokens, b_idx, p_idx + 1, seed)
                y = sample_from_logits(rows, u)
            rows = rows if rows.dtype == torch.float64 else rows.float()
            ce = F.cross_entropy(rows, y, reduction="none")
            loss = torch.zeros(B, dtype=ce.dtype, device=device).index_add(0, b_idx, ce)
            if reduction == "mean":
                loss = loss / n_targets.clamp(min=1).to(loss.dtype)
            total = loss.sum()
            wrt = cap.wrt() if fast else params
            cap.outputs.clear()
            if total.requires_grad and wrt:
                torch.autograd.grad(total, wrt, allow_unused=True)
            del wrt
            grads: dict[str, torch.Tensor] = {}
            projected: dict[str, torch.Tensor] = {}
            sq_norms: dict[str, torch.Tensor] = {}
            if per_doc:
                for i, blk in enumerate(blocks):
                    if i in cap.reducers:
                        if i in cap.reduced:
                            projected[blk.name], sq_norms[blk.name] = cap.reduced[i]
                        else:  # the block never ran: zero gradient, zero projection
                            G0 = torch.zeros((B, *blk.shape), dtype=torch.promote_types(params[i].dtype, torch.float32), device=device)
                            projected[blk.name], sq_norms[blk.name] = cap.reducers[i](G0.new_zeros((B, 1, blk.d_out)), G0.new_zeros((B, 1, blk.d_in)))
                        continue
                    G = cap.grads.get(i)
                    grads[blk.name] = G if G is not None else torch.zeros((B, *blk.shape), dtype=torch.promote_types(params[i].dtype, torch.float32), device=device)
            aat = ddt = None
            n_tok = None
            if covariances:
                aat, ddt = {}, {}
                for i, blk in enumerate(blocks):
                    aat[blk.name] = cap.aat.get(i, torch.zeros((blk.d_in, blk.d_in), dtype=cov_dtype, device=device))
                    ddt[blk.name] = cap.ddt.get(i, torch.zeros((blk.d_out, blk.d_out), dtype=cov_dtype, device=device))
                n_tok = int(n_tokens.sum().item())
    finally:
        for p, flag in zip(params, saved_flags):
            p.requires_grad_(flag)

    targets = torch.full((B, T), IGNORE, dtype=torch.long, device=device)
    targets[b_idx, p_idx + 1] = y.detach()
    return PerDocResult(
        grads=grads,
        loss=loss.detach(),
        n_tokens=n_tokens.detach(),
        n_targets=n_targets.detach(),
        targets=targets,
        aat=aat,
        ddt=ddt,
        n_tok=n_tok,
        projected=projected,
        sq_norms=sq_norms,
    )


def _uniforms_for_rows(doc_ids: torch.Tensor, n_tokens: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor, seed: int) -> torch.Tensor:
    """The uniform of each target row: document `doc_ids[b]`'s stream at position t (CPU float64)."""
    b_cpu = b_idx.cpu()
    t_cpu = t_idx.cpu()
    lengths = n_tokens.cpu().tolist()
    ids = doc_ids.cpu().tolist()
    u = torch.empty(b_cpu.shape[0], dtype=torch.float64)
    for b in torch.unique(b_cpu).tolist():
        sel = b_cpu == b
        stream = doc_uniforms(seed, ids[b], lengths[b])
        u[sel] = stream[t_cpu[sel]]
    return u


def one_document_gradients_reference(
    model: nn.Module,
    blocks: Sequence[LoraBlock],
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The slow obvious reference: one unpadded document, `torch.autograd.grad` on the LoRA weights.

    `input_ids [T]`, `loss_mask [T]`; `targets [T]` (IGNORE off-target) overrides the labels (used to
    replay true-Fisher draws). Returns ({block: [d_out, d_in]}, loss). Used by the tests and by the
    benchmark's one-backward-per-document loop.
    """
    params = block_parameters(model, blocks)
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            ids = input_ids.unsqueeze(0)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            logits = logits if logits.dtype == torch.float64 else logits.float()
            m = loss_mask[1:].to(torch.bool)
            y = input_ids[1:] if targets is None else targets[1:]
            ce = F.cross_entropy(logits[m], y[m], reduction="sum")
            if reduction == "mean":
                ce = ce / m.sum().clamp(min=1)
            gs = torch.autograd.grad(ce, params, allow_unused=True)
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return {b.name: (g.detach() if g is not None else torch.zeros(b.shape, dtype=p.dtype)) for b, g, p in zip(blocks, gs, params)}, ce.detach()
