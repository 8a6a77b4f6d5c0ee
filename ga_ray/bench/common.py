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

from ga_ray.tables import print_table  # noqa: F401  (the benchmarks print their tables with it)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "gpu": "none"}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # torch without CUDA support
        pass
    info.update(numpy_blas())
    return info


def numpy_blas() -> dict[str, Any]:
    """numpy's BLAS and the kernels it runs (the learner's CPU products go through it), and an
    OPENBLAS_CORETYPE the environment forces: a pinned older core type can halve the GEMM rate."""
    out: dict[str, Any] = {}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # the GPU machines have no threadpoolctl
        return out
    import numpy  # noqa: F401  (loads its BLAS, so that threadpoolctl sees it)

    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in str(lib.get("filepath", "")):
            out["numpy_blas"] = f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')} kernels)"
            break
    if os.environ.get("OPENBLAS_CORETYPE"):
        out["openblas_coretype_env"] = os.environ["OPENBLAS_CORETYPE"]
    return out


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


def emit(result: dict[str, Any], as_json: bool) -> None:
    """With --json, the figures as one JSON object on the last line."""
    if as_json:
        print(json.dumps(result, default=float))


def scratch_stage(root: Path, name: str, stage: str, world: dict[str, Any], links: dict[str, Path], overrides: list[str]):
    """A LocalStageContext (whole config, no manifest record) over a scratch run directory `root/name` that runs `stage` on the benchmark world's model
    and adapter: `links` (run-directory folder -> existing folder) are symlinked in, `overrides` go on top of
    the model settings. The caller removes `ctx.run_dir.root` when done."""
    from ga_ray.config import load_config
    from ga_ray.context import LocalStageContext
    from ga_ray.rundir import RunDir

    rd = RunDir(root / name)
    for folder, target in links.items():
        (rd.root / folder).symlink_to(Path(target).resolve(), target_is_directory=True)
    cfg = load_config(None, [f"model.path={world['model_path']}", f"model.adapter={world['adapter']}", "model.dtype=float32",
                             "finetune.enabled=false", *overrides])
    out = rd.stage_dir(stage)
    out.mkdir()
    return LocalStageContext(cfg=cfg, run_dir=rd, stage=stage, out=out)
