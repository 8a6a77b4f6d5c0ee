"""The artifacts of the finetune stage (`RUN_DIR/adapter/`): the one module that knows its files.

`adapter/` is a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) and, on a demo
world, the format table of the fine-tuned model (`format_table.json`, `format_generations.jsonl`) and of
the base model (`format_table_base.json`, `format_generations_base.jsonl`). A user-given adapter
(`model.adapter`, finetune disabled) is a PEFT folder too, so the adapter helpers take any folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ga_ray.rundir import RunDir

STAGE_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT_TABLE = "format_table.json"
FORMAT_TABLE_BASE = "format_table_base.json"
FORMAT_GENERATIONS = "format_generations.jsonl"
FORMAT_GENERATIONS_BASE = "format_generations_base.jsonl"


def stage_dir(run_dir: RunDir | str | Path) -> Path:
    """`RUN_DIR/adapter/`."""
    root = run_dir.root if isinstance(run_dir, RunDir) else Path(run_dir)
    return root / STAGE_DIR


def is_adapter(folder: str | Path) -> bool:
    """Whether `folder` is a complete PEFT adapter folder (config and weights)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file() and (Path(folder) / ADAPTER_WEIGHTS).is_file()


def exists(run_dir: RunDir | str | Path) -> bool:
    """Whether the run's own fine-tuned adapter is there."""
    return is_adapter(stage_dir(run_dir))


def adapter_num_params(adapter_path: str | Path) -> int | None:
    """P = number of LoRA weights (lora_A and lora_B) of the adapter, from its safetensors header (no model load);
    None when there is no weights file or no LoRA weights in it."""
    f = Path(adapter_path) / ADAPTER_WEIGHTS
    if not f.exists():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(f), framework="numpy") as fh:
        for key in fh.keys():
            if "lora_A" in key or "lora_B" in key:
                total += int(np.prod(fh.get_slice(key).get_shape()))
    return total or None


def _json_or_none(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def load_format_tables(run_dir: RunDir | str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(fine-tuned model's format table, base model's), each None when absent or not valid JSON."""
    d = stage_dir(run_dir)
    return _json_or_none(d / FORMAT_TABLE), _json_or_none(d / FORMAT_TABLE_BASE)
