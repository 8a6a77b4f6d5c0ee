"""Starting or joining Ray, and resource decisions that must not hang on a CPU machine."""

from __future__ import annotations

import logging
import os

from ga_ray.config import RayConfig

log = logging.getLogger("ga_ray")


from ga_ray.resources import cuda_available, resolve_gpus  # noqa: F401  (the one resource policy lives there)


_NOISY_WITHOUT_DASHBOARD = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Worker set-up hook of the local Ray: silence loggers that only report the missing dashboard."""
    for name in _NOISY_WITHOUT_DASHBOARD:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join `cfg.address`, or start a local Ray in-process; idempotent."""
    import ray
    import ray.data

    cfg = cfg or RayConfig()
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": True, "include_dashboard": False}
        if cfg.address:
            kwargs["address"] = cfg.address
        else:
            # a local Ray without the dashboard has no State API; Ray Train's placement-group cleaner
            # would then warn every few seconds that it cannot query it (nothing is wrong)
            kwargs["runtime_env"] = {"worker_process_setup_hook": "ga_ray.raycluster.quiet_worker_logs"}
            if cfg.num_cpus is not None:
                kwargs["num_cpus"] = cfg.num_cpus
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.verbose_progress = False
    try:  # name of the option in Ray 2.60's DataContext
        ctx.execution_no_progress_timeout_s = cfg.execution_no_progress_timeout_s  # type: ignore[attr-defined]
    except Exception:  # older Ray without the option: nothing to set
        pass
