"""Loading any user model: a local transformers causal LM folder, its tokenizer, and a PEFT LoRA adapter.

Nothing is downloaded (`local_files_only=True`): every path is a local folder. Model code shipped
with a checkpoint runs only when `model.trust_remote_code` is true. Every problem a user can fix
(missing folder, a folder that is not a model / tokenizer / adapter, an adapter that does not fit
the model) is a `ModelLoadError` that names the paths and what to do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ga_ray.config import ModelConfig
from ga_ray.errors import StageError

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_MAX_SHOWN = 3
_FIT_HINT = "Use the base model the adapter was trained on (model.path), or the adapter made for this model."


class ModelLoadError(StageError):
    """A model, tokenizer or adapter folder that cannot be used; the message says which and why."""


# ------------------------------------------------------------------------------------------ dtypes


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """`auto` → bfloat16 on a CUDA device, float32 elsewhere; names → torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


# ------------------------------------------------------------------------------------------ checks


def _folder(path: str | Path | None, what: str, key: str) -> Path:
    if not path:
        raise ModelLoadError(f"{key} is not set: point it to a local {what} folder")
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"{what} folder {p} does not exist ({key})")
    if not p.is_dir():
        raise ModelLoadError(f"{key} {p} is a file; it must be a {what} folder")
    return p


def _model_folder(model_cfg: ModelConfig) -> Path:
    p = _folder(model_cfg.path, "model", "model.path")
    if not (p / "config.json").exists():
        raise ModelLoadError(
            f"{p} is not a transformers model folder: it has no config.json. "
            f"Point model.path to a folder written by save_pretrained() (config.json + weights)"
        )
    return p


def _remote_code_hint(p: Path, model_cfg: ModelConfig, exc: Exception) -> str | None:
    """The message for a checkpoint that needs its own code, when that is the problem."""
    if model_cfg.trust_remote_code:
        return None
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if "auto_map" in cfg or "trust_remote_code" in str(exc):
        return (
            f"{p} needs model code shipped with the checkpoint (auto_map in config.json); "
            f"set model.trust_remote_code: true if you trust this folder"
        )
    return None


# -------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """The tokenizer of `model.tokenizer` (or `model.path`); pad token = EOS when it has none."""
    from transformers import AutoTokenizer

    key = "model.tokenizer" if model_cfg.tokenizer else "model.path"
    p = _folder(model_cfg.tokenizer or model_cfg.path, "tokenizer", key)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(
            f"{p} has no tokenizer (no tokenizer.json or tokenizer_config.json); "
            f"set model.tokenizer to the folder written by the tokenizer's save_pretrained()"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=model_cfg.trust_remote_code, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unusable folders
        hint = _remote_code_hint(p, model_cfg, exc) if (p / "config.json").exists() else None
        raise ModelLoadError(hint or f"could not load a tokenizer from {p} ({type(exc).__name__}: {exc})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------ model


def load_base_model(model_cfg: ModelConfig, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> Any:
    """The causal LM of `model.path` on `device`, in eval mode (`dtype` None: `model.dtype`)."""
    from transformers import AutoModelForCausalLM

    p = _model_folder(model_cfg)
    torch_dtype = resolve_dtype(dtype if dtype is not None else model_cfg.dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=torch_dtype, trust_remote_code=model_cfg.trust_remote_code, local_files_only=True
        )
    except Exception as exc:  # OSError (no weights), ValueError (unknown architecture), ...
        hint = _remote_code_hint(p, model_cfg, exc)
        raise ModelLoadError(hint or f"could not load a causal LM from {p} ({type(exc).__name__}: {exc})") from None
    model.to(device)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------ adapter


def _adapter_folder(adapter_path: str | Path | None) -> Path:
    p = _folder(adapter_path, "adapter", "model.adapter")
    if not (p / "adapter_config.json").exists():
        raise ModelLoadError(f"{p} is not a PEFT adapter folder: it has no adapter_config.json")
    if not any((p / w).exists() for w in ADAPTER_WEIGHTS):
        raise ModelLoadError(f"{p} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return p


def _linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear or transformers Conv1D; None for other modules."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2:
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _target_matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def read_adapter_config(adapter_path: str | Path) -> Any:
    """The adapter's `LoraConfig`; `ModelLoadError` when the folder is not a readable LoRA adapter."""
    from peft import PeftConfig

    p = _adapter_folder(adapter_path)
    try:
        cfg = PeftConfig.from_pretrained(str(p))
    except Exception as exc:  # malformed adapter_config.json
        raise ModelLoadError(f"{p / 'adapter_config.json'} cannot be read ({type(exc).__name__}: {exc})") from None
    peft_type = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if peft_type != "LORA":
        raise ModelLoadError(f"adapter {p} is of type {peft_type}; ga-ray analyses LoRA adapters only")
    return cfg


def check_adapter_fits(base: torch.nn.Module, adapter_path: str | Path, model_path: str | Path | None = None) -> None:
    """Raise `ModelLoadError` when the adapter's target modules or weight shapes do not fit `base`.

    Checked before PEFT touches the model: every `target_modules` name must be a module of the
    model, every saved `lora_A`/`lora_B` weight must belong to a module the model has, with shapes
    `lora_A: (r, in_features)` and `lora_B: (out_features, r)`.
    """
    from peft.utils import load_peft_weights

    p = Path(adapter_path)
    where = f"adapter {p} does not fit model {model_path or type(base).__name__}"
    cfg = read_adapter_config(p)
    modules = dict(base.named_modules())
    targets = cfg.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        if not any(re.fullmatch(targets, n) for n in modules):
            raise ModelLoadError(f"{where}: no module name of the model matches the adapter's target_modules pattern {targets!r}. {_FIT_HINT}")
    elif targets and not isinstance(targets, str):
        missing = [t for t in sorted(targets) if not any(_target_matches(t, n) for n in modules)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _linear_shape(m) is not None})
            names = ", ".join(repr(t) for t in missing)
            raise ModelLoadError(
                f"{where}: the adapter targets module{'s' if len(missing) > 1 else ''} {names}, which the model does not have "
                f"(its linear layers are: {', '.join(linear)}). {_FIT_HINT}"
            )

    try:
        weights = load_peft_weights(str(p), device="cpu")
    except Exception as exc:  # damaged safetensors / pickle
        raise ModelLoadError(f"the weights of adapter {p} cannot be read ({type(exc).__name__}: {exc})") from None
    problems: list[str] = []
    pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_[AB])(?:\.[^.]+)?\.weight$")
    for key, tensor in weights.items():
        m = pattern.match(key)
        if not m:
            continue
        module_name, kind = m.group("module"), m.group("kind")
        module = modules.get(module_name)
        if module is None:
            problems.append(f"weight '{key}' is for module '{module_name}', which the model does not have")
            continue
        io = _linear_shape(module)
        if io is None:
            continue
        d_in, d_out = io
        shape = tuple(int(s) for s in tensor.shape)
        if kind == "lora_A" and (len(shape) != 2 or shape[1] != d_in):
            r = shape[0] if shape else "r"
            problems.append(f"weight '{key}' has shape {shape} but module '{module_name}' takes {d_in} input features, so it needs ({r}, {d_in})")
        elif kind == "lora_B" and (len(shape) != 2 or shape[0] != d_out):
            r = shape[1] if len(shape) == 2 else "r"
            problems.append(f"weight '{key}' has shape {shape} but module '{module_name}' has {d_out} output features, so it needs ({d_out}, {r})")
    if problems:
        shown = "; ".join(problems[:_MAX_SHOWN])
        more = f" (and {len(problems) - _MAX_SHOWN} more)" if len(problems) > _MAX_SHOWN else ""
        raise ModelLoadError(f"{where}: {shown}{more}. {_FIT_HINT}")


def load_lora_model(
    model_cfg: ModelConfig, adapter_path: str | Path | None, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> Any:
    """The base model with the PEFT LoRA adapter at `adapter_path`, on `device`, in eval mode (dropout off).

    The adapter is checked against the model first (`check_adapter_fits`). PEFT keeps adapter
    weights in float32 when the base model is in half precision (`autocast_adapter_dtype`).
    """
    from peft import PeftModel

    p = _adapter_folder(adapter_path)
    read_adapter_config(p)  # before the (possibly large) base model is loaded
    model_path = _model_folder(model_cfg)
    base = load_base_model(model_cfg, device=device, dtype=dtype)
    check_adapter_fits(base, p, model_path)
    try:
        model = PeftModel.from_pretrained(base, str(p), is_trainable=False)
    except Exception as exc:  # anything check_adapter_fits did not foresee (exotic PEFT options)
        raise ModelLoadError(f"adapter {p} could not be loaded onto model {model_path} ({type(exc).__name__}: {exc}). {_FIT_HINT}") from None
    model.to(device)
    model.eval()
    return model
