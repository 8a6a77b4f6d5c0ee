"""Starting or joining Ray, quietly.

`init_ray` joins `ray.address` when it is set, and otherwise starts a LOCAL Ray in-process
(`ray.init(address="local")`), even when a `ray start` cluster runs on this machine (a plain
`ray.init()` would silently join it). It says in one line which Ray the run uses.

Output: unless `configure_output(verbose=True)` was called (the CLI's `--verbose`), the workers' logs
stay out of the terminal (`log_to_driver=False`; the local Ray's log folder is linked as
`RUN_DIR/logs/ray`), and Ray Data's progress bars are off (the stages draw their own).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ga_ray.config import RayConfig
from ga_ray.resources import cuda_available, resolve_gpus  # noqa: F401  (the one resource policy lives there)

log = logging.getLogger("ga_ray")

ACTOR_START_TIMEOUT_S = 600
"""How long a Ray Data actor pool waits for all its actors to start before it fails (Ray: "Timed out while starting actors")."""


@dataclass
class OutputSettings:
    verbose: bool = False
    log_dir: Path | None = None
    show_details: bool = True
    """Print a stage's detail tables (e.g. the factors stage's per-block table) on the terminal; the CLI turns this
    off without --verbose, and they go to the log file instead."""


OUTPUT = OutputSettings()
"""Set by the CLI before a run (`configure_output`); read when Ray starts."""


def configure_output(verbose: bool, log_dir: Path | None) -> None:
    OUTPUT.verbose = verbose
    OUTPUT.log_dir = Path(log_dir) if log_dir is not None else None
    OUTPUT.show_details = verbose


DETAIL_LOGGER = "ga_ray.detail"
"""Lines for the log file only (unless --verbose): the CLI's terminal filter drops this logger."""


def show_detail(text: str) -> None:
    """A stage's detail table: printed when details are shown, else into the log file."""
    if OUTPUT.show_details:
        print(text)
    else:
        logging.getLogger(DETAIL_LOGGER).info(text.strip("\n"))


_NOISY_WITHOUT_DASHBOARD = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Worker set-up hook of the local Ray: silence loggers that only report the missing dashboard."""
    for name in _NOISY_WITHOUT_DASHBOARD:
        logging.getLogger(name).setLevel(logging.ERROR)


def init_kwargs(cfg: RayConfig, verbose: bool) -> dict:
    """The `ray.init` arguments for `cfg` (pure, so the choice of Ray is testable without starting one)."""
    kwargs: dict = {"log_to_driver": verbose, "include_dashboard": False, "logging_level": logging.INFO if verbose else logging.WARNING}
    if cfg.address:
        kwargs["address"] = cfg.address
    else:
        # "local": a new Ray for this process, never an already running `ray start` cluster (what the help promises)
        kwargs["address"] = "local"
        # a local Ray without the dashboard has no State API; Ray Train's placement-group cleaner
        # would then warn every few seconds that it cannot query it (nothing is wrong)
        kwargs["runtime_env"] = {"worker_process_setup_hook": "ga_ray.raycluster.quiet_worker_logs"}
        if cfg.num_cpus is not None:
            kwargs["num_cpus"] = cfg.num_cpus
    return kwargs


def describe_ray(address: str | None, resources: dict[str, float]) -> str:
    """The one line that says which Ray a run uses."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    size = f"{cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
    if address:
        return f"Ray: joined the cluster at {address} ({size})"
    return f"Ray: a local Ray started in-process ({size}); use --address to join a cluster"


def _link_ray_logs() -> None:
    """RUN_DIR/logs/ray -> this local Ray's log folder (the workers' stdout/stderr)."""
    if OUTPUT.log_dir is None:
        return
    try:
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path())  # type: ignore[attr-defined]
        link = OUTPUT.log_dir / "ray"
        OUTPUT.log_dir.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session / "logs", target_is_directory=True)
    except Exception as exc:  # a private Ray API: the link is a convenience, never a reason to fail
        log.debug("could not link the Ray logs: %s", exc)


def route_raylet_messages() -> None:
    """Send the raylet's messages to the driver (e.g. "N PYTHON worker processes have been started ... on a busy
    machine) to the log file instead of the terminal. Ray prints them with `print_to_stdstream` from a listener
    thread whatever `log_to_driver` says; wrapping that function (looked up by name at each call) is the only hook."""
    import ray._private.worker as ray_worker

    original = getattr(ray_worker.print_to_stdstream, "_ga_ray_original", ray_worker.print_to_stdstream)

    def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and not OUTPUT.verbose:
            for line in data.get("lines", []):
                logging.getLogger(f"{DETAIL_LOGGER}.raylet").warning("(raylet) %s", line)
            return
        original(data, ignore_prefix)

    print_to_stdstream._ga_ray_original = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join `cfg.address`, or start a local Ray in-process; idempotent."""
    import ray
    import ray.data

    cfg = cfg or RayConfig()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        ray.init(**init_kwargs(cfg, OUTPUT.verbose))
        log.info(describe_ray(cfg.address, ray.cluster_resources()))
        if OUTPUT.log_dir is not None:  # a CLI run: there is a log file to send them to
            route_raylet_messages()
        if not cfg.address:
            _link_ray_logs()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.verbose_progress = False
    if not OUTPUT.verbose:
        ctx.enable_progress_bars = False
    # a fixed actor pool starts work only once all its actors are up: otherwise the first actor ready takes every
    # window of a short stage while the others still load the model (seen on two nodes: one actor, one node, did all)
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    try:  # name of the option in Ray 2.60's DataContext
        ctx.execution_no_progress_timeout_s = cfg.execution_no_progress_timeout_s  # type: ignore[attr-defined]
    except Exception:  # older Ray without the option: nothing to set
        pass
