"""Steered LoRA adapters (pure compute on the adapter file's tensors and its config dict; no files).

Names. The factors (and so every direction) are keyed by the PeftModel's parameter names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`); a saved adapter file
drops the adapter name (`...q_proj.lora_A.weight`). `file_key` maps one to the other explicitly and
`match_direction` checks that every direction tensor lands on a tensor of the file with the same
shape: the file's key order is never used.

Steering (DESIGN.md; `coef` = −α for `toward`, +α for `away`):
- `paper`: every LoRA tensor moved along its part of v: `A' = A + coef·dA`, `B' = B + coef·dB`, so
  `ΔW(α) = s·(B + coef·dB)(A + coef·dA) − s·BA` is quadratic in α.
- `linear`: the exact first-order change `ΔW = coef·s·(dB·A + B·dA)` as a LoRA of rank 2r:
  `B' = [B + coef·dB, coef·B]`, `A' = [A; dA]`, `lora_alpha` set so that the scale s is unchanged
  (`s = alpha/r` → alpha·2; rsLoRA `s = alpha/√r` → alpha·√2).
α units: `absolute` (θ' = θ + coef·v) or `relative` (v rescaled to ‖θ‖, so ‖Δθ‖ = α·‖θ‖, θ being every
LoRA weight of the adapter).

vLLM: a server's `max_lora_rank` must be one of `VLLM_RANKS` and serves adapters of rank ≤ it;
`pad_rank` zero-pads an adapter to the next rank of that set (zero rows of A, zero columns of B,
lora_alpha adjusted so s is unchanged: the same ΔW), so `max_lora_rank = r` always works.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ga_ray.errors import DataError

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's allowed `max_lora_rank` values (vllm/config/lora.py, MaxLoRARanks)."""

_PARAM_RX = re.compile(r"^(?P<prefix>.*)\.(?P<kind>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")
_FILE_RX = re.compile(r"^(?P<prefix>.*)\.(?P<kind>lora_A|lora_B)\.weight$")


# ------------------------------------------------------------------------------------------- names


def adapter_name_of(param_name: str) -> str:
    m = _PARAM_RX.match(param_name)
    if not m:
        raise DataError(f"{param_name!r} is not a PEFT LoRA parameter name (`<module>.lora_A.<adapter>.weight`)")
    return m.group("adapter")


def file_key(param_name: str) -> str:
    """`...q_proj.lora_A.default.weight` (PeftModel) → `...q_proj.lora_A.weight` (adapter file)."""
    m = _PARAM_RX.match(param_name)
    if not m:
        raise DataError(f"{param_name!r} is not a PEFT LoRA parameter name (`<module>.lora_A.<adapter>.weight`)")
    return f"{m.group('prefix')}.{m.group('kind')}.weight"


def match_direction(v: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Re-key a direction from parameter names to the adapter file's keys, checking names and shapes."""
    out: dict[str, torch.Tensor] = {}
    for pname, t in v.items():
        key = file_key(pname)
        if key not in tensors:
            near = [k for k in tensors if k.rsplit(".", 2)[0] == key.rsplit(".", 2)[0]][:1]
            raise DataError(
                f"factors block {pname!r} has no tensor {key!r} in the adapter file"
                + (f" (it has {near[0]!r})" if near else "")
                + ": were the factors computed for another adapter? Re-run `ga-ray factors`."
            )
        if tuple(tensors[key].shape) != tuple(t.shape):
            raise DataError(f"{key}: adapter tensor shape {tuple(tensors[key].shape)} != factors block shape {tuple(t.shape)}; re-run `ga-ray factors`")
        if key in out:
            raise DataError(f"two factors blocks map onto the adapter tensor {key!r} (several adapters in the factors?)")
        out[key] = t
    return out


@dataclass(frozen=True)
class LoraLayer:
    prefix: str
    a_key: str
    b_key: str


def lora_layers(tensors: Mapping[str, torch.Tensor]) -> list[LoraLayer]:
    """The (A, B) pairs of an adapter file, sorted by module prefix; other keys are rejected."""
    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _FILE_RX.match(key)
        if not m:
            raise DataError(f"adapter tensor {key!r} is not a plain LoRA A/B weight (DoRA, biases, embeddings are not supported for steering)")
        pairs.setdefault(m.group("prefix"), {})[m.group("kind")] = key
    out = []
    for prefix in sorted(pairs):
        p = pairs[prefix]
        if set(p) != {"lora_A", "lora_B"}:
            raise DataError(f"adapter layer {prefix!r} has only {', '.join(p)}")
        out.append(LoraLayer(prefix, p["lora_A"], p["lora_B"]))
    return out


# ------------------------------------------------------------------------------------------ config


def lora_rank(config: Mapping[str, Any]) -> int:
    return int(config["r"])


def lora_scale(config: Mapping[str, Any], r: int | None = None) -> float:
    """s = lora_alpha / r (rsLoRA: lora_alpha / √r)."""
    r = lora_rank(config) if r is None else r
    alpha = float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_uniform(config: Mapping[str, Any], what: str) -> None:
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise DataError(f"{what} needs one rank and one lora_alpha for every layer; the adapter has rank_pattern/alpha_pattern")


def config_with_rank(config: Mapping[str, Any], new_r: int) -> dict[str, Any]:
    """The adapter config at rank `new_r` with lora_alpha chosen so the scale s is unchanged."""
    _check_uniform(config, "changing the rank")
    r = lora_rank(config)
    alpha = float(config.get("lora_alpha", 8))
    factor = math.sqrt(new_r / r) if config.get("use_rslora") else new_r / r
    out = dict(config)
    out["r"] = int(new_r)
    new_alpha = alpha * factor
    out["lora_alpha"] = int(new_alpha) if float(new_alpha).is_integer() else new_alpha
    return out


def vllm_rank(r: int) -> int:
    for allowed in VLLM_RANKS:
        if allowed >= r:
            return allowed
    raise DataError(f"LoRA rank {r} is above vLLM's largest max_lora_rank {VLLM_RANKS[-1]}: use steer.mode=paper or a smaller adapter")


def pad_rank(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], new_r: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Zero-pad every layer to rank `new_r` (same ΔW: padded A rows meet zero B columns)."""
    r = lora_rank(config)
    if new_r == r:
        return dict(tensors), dict(config)
    if new_r < r:
        raise ValueError(f"pad_rank: new rank {new_r} < rank {r}")
    out = dict(tensors)
    for layer in lora_layers(tensors):
        A, B = tensors[layer.a_key], tensors[layer.b_key]
        out[layer.a_key] = torch.cat([A, A.new_zeros(new_r - A.shape[0], A.shape[1])], dim=0)
        out[layer.b_key] = torch.cat([B, B.new_zeros(B.shape[0], new_r - B.shape[1])], dim=1)
    return out, config_with_rank(config, new_r)


# ------------------------------------------------------------------------------------------ steering


def theta_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """‖θ‖ over every LoRA weight of the adapter (float64 accumulation)."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())).item())


def step_coefficient(sign: str, alpha: float, units: str, v_norm: float, th_norm: float) -> float:
    """The multiplier c of v in θ' = θ + c·v: −α (toward) or +α (away), in absolute units;
    in relative units α·‖θ‖/‖v‖ instead of α, so that ‖Δθ‖ = α·‖θ‖."""
    if sign not in ("toward", "away"):
        raise ValueError(f"sign must be toward or away, got {sign!r}")
    if units == "absolute":
        mag = float(alpha)
    elif units == "relative":
        if v_norm <= 0:
            raise ValueError("relative units need a non-zero direction")
        mag = float(alpha) * th_norm / v_norm
    else:
        raise ValueError(f"units must be absolute or relative, got {units!r}")
    return -mag if sign == "toward" else mag


def steer_paper(tensors: Mapping[str, torch.Tensor], v_file: Mapping[str, torch.Tensor], coef: float) -> dict[str, torch.Tensor]:
    """θ' = θ + coef·v on every tensor v covers (computed in float64, stored in the adapter's dtype)."""
    out = dict(tensors)
    for key, d in v_file.items():
        t = tensors[key]
        out[key] = (t.double() + coef * d.double()).to(t.dtype)
    return out


def steer_linear(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], v_file: Mapping[str, torch.Tensor], coef: float
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The rank-2r adapter holding exactly `ΔW = coef·s·(dB·A + B·dA)` in every layer (a layer that v does
    not cover gets zero dA, dB: its ΔW is 0)."""
    _check_uniform(config, "steer.mode=linear")
    out: dict[str, torch.Tensor] = {}
    for layer in lora_layers(tensors):
        A, B = tensors[layer.a_key], tensors[layer.b_key]
        dA = v_file.get(layer.a_key)
        dB = v_file.get(layer.b_key)
        dA = torch.zeros_like(A, dtype=torch.float64) if dA is None else dA.double()
        dB = torch.zeros_like(B, dtype=torch.float64) if dB is None else dB.double()
        Bd, Ad = B.double(), A.double()
        out[layer.a_key] = torch.cat([Ad, dA], dim=0).to(A.dtype)  # [2r, d_in]
        out[layer.b_key] = torch.cat([Bd + coef * dB, coef * Bd], dim=1).to(B.dtype)  # [d_out, 2r]
    return out, config_with_rank(config, 2 * lora_rank(config))


def delta_w(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], base: Mapping[str, torch.Tensor], base_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Per layer prefix, `s'·B'A' − s·BA` (float64): the weight change a variant makes."""
    s1, s0 = lora_scale(config), lora_scale(base_config)
    out = {}
    for l1, l0 in zip(lora_layers(tensors), lora_layers(base)):
        W1 = s1 * tensors[l1.b_key].double() @ tensors[l1.a_key].double()
        W0 = s0 * base[l0.b_key].double() @ base[l0.a_key].double()
        out[l1.prefix] = W1 - W0
    return out


@dataclass(frozen=True)
class Steered:
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    coef: float
    """θ' = θ + coef·v (the realised multiplier, after the units)."""
    v_norm: float
    delta_norm: float
    """‖Δθ‖ = |coef|·‖v‖ (the step in the (A, B) parameters; in linear mode the step whose first-order effect the adapter holds)."""
    rel_delta: float
    rank: int


def steer(
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    v_file: Mapping[str, torch.Tensor],
    sign: str,
    alpha: float,
    units: str = "absolute",
    mode: str = "paper",
    vllm_ranks: bool = True,
) -> Steered:
    """One steered adapter from the fine-tuned adapter's tensors/config and a direction keyed by file key."""
    from ga_ray.steer.directions import direction_norm

    v_norm = direction_norm(v_file)
    th = theta_norm(tensors)
    coef = step_coefficient(sign, alpha, units, v_norm, th)
    if mode == "paper":
        new_t, new_c = steer_paper(tensors, v_file, coef), dict(config)
    elif mode == "linear":
        new_t, new_c = steer_linear(tensors, config, v_file, coef)
    else:
        raise ValueError(f"mode must be paper or linear, got {mode!r}")
    if vllm_ranks:
        new_t, new_c = pad_rank(new_t, new_c, vllm_rank(lora_rank(new_c)))
    delta = abs(coef) * v_norm
    return Steered(new_t, new_c, coef, v_norm, delta, delta / th if th > 0 else float("nan"), lora_rank(new_c))
