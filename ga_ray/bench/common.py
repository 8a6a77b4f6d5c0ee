"""Shared benchmark plumbing: warm-up, repetitions, medians, a small table, the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "gpu": "none"}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # torch without CUDA support
        pass
    return info


def time_median(fn: Callable[[], Any], reps: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `reps` runs after `warmup` unmeasured runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows (dicts with the same keys) as an aligned text table."""
    print(f"\n{title}")
    if not rows:
        print("  (no rows)")
        return
    keys = list(rows[0].keys())
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  " + "  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("  " + "  ".join("-" * w for w in widths))
    for c in cells:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def emit(result: dict[str, Any], as_json: bool) -> None:
    """With --json, the figures as one JSON object on the last line."""
    if as_json:
        print(json.dumps(result, default=float))


def scratch_stage(root: Path, name: str, stage: str, world: dict[str, Any], links: dict[str, Path], overrides: list[str]):
    """A StageContext over a scratch run directory `root/name` that runs `stage` on the benchmark world's model
    and adapter: `links` (run-directory folder -> existing folder) are symlinked in, `overrides` go on top of
    the model settings. The caller removes `ctx.run_dir.root` when done."""
    from ga_ray.config import load_config
    from ga_ray.pipeline import StageContext
    from ga_ray.rundir import RunDir

    rd = RunDir(root / name)
    for folder, target in links.items():
        (rd.root / folder).symlink_to(Path(target).resolve(), target_is_directory=True)
    cfg = load_config(None, [f"model.path={world['model_path']}", f"model.adapter={world['adapter']}", "model.dtype=float32",
                             "finetune.enabled=false", *overrides])
    out = rd.stage_dir(stage)
    out.mkdir()
    return StageContext(cfg=cfg, run_dir=rd, stage=stage, out=out)
