"""One resource policy for every stage's Ray workers (Ray Train workers and Ray Data / core actors).

Every section that starts workers has the same three fields (`ga_ray.config.Workers`): `num_workers`,
`cpus_per_worker`, `gpus_per_worker`. `plan_workers` turns them into what Ray is asked for, the one
place that answers two questions that otherwise hang a run silently:

- GPUs: `auto` is 1 per worker when the Ray cluster has GPUs, else 0 (the cluster's resources, not the driver's:
  a job's driver often runs on a CPU-only head node while the workers have GPUs); asking for more GPUs per worker
  than the cluster has is an error (Ray would wait forever for them).
- "The workers would take every CPU": a fixed pool that reserves every CPU starves the Ray Data tasks that
  read the documents and the pipeline waits forever (seen with 2 actors × 1 CPU on a 2-core machine). The
  reservation per worker is then shrunk (fractional CPUs) so that `reserve_cpus` stay free; the torch thread
  count is NOT shrunk (it comes from the configured value), so the numbers do not depend on the machine.
  On a cluster the free CPUs must be on ONE node (a read task is not split across nodes; seen on two 2-CPU
  nodes with 2 workers × 1.5 CPU: 1 CPU free in all, 0.5 on each, and the reads never started). So each node's
  reserve is counted: the workers leave at least the sum of the per-node reserves free, and then, wherever
  Ray places them, some node keeps its reserve (if every node had less free, the sum would be smaller).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from ga_ray.errors import StageError

log = logging.getLogger("ga_ray")

MIN_CPUS_PER_WORKER = 0.05
"""The smallest reservation a shrunk worker gets (Ray needs a positive share to place it)."""


class WorkerSettings(Protocol):
    """What `plan_workers` reads: the three fields of `ga_ray.config.Workers`."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: str | float


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken CUDA: treat as no GPU
        return False


def resolve_gpus(value: str | float | bool, cluster_gpus: float | None = None) -> float:
    """`auto` → 1 when the Ray cluster has GPUs (`cluster_gpus`, its `cluster_resources()["GPU"]`), else 0;
    without a cluster to ask (`None`), when CUDA is visible in this process. A number is taken as it is."""
    if value == "auto":
        if cluster_gpus is None:
            return 1.0 if cuda_available() else 0.0
        return 1.0 if cluster_gpus > 0 else 0.0
    return float(value)


def ray_cluster_gpus() -> float | None:
    """GPUs of the Ray cluster this process is connected to, or None when Ray is not initialised."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return float(ray.cluster_resources().get("GPU", 0.0))
    except Exception:  # Ray missing or the cluster unreachable: no answer, the caller falls back
        return None


def default_reserve_cpus(total_cpus: float) -> float:
    """CPUs left free for Ray Data's read tasks and the driver: one, or a quarter of a very small machine."""
    return 1.0 if total_cpus >= 2 else total_cpus / 4


@dataclass(frozen=True)
class WorkerPlan:
    """What one stage asks Ray for, per worker."""

    section: str
    num_workers: int
    cpus_per_worker: float
    """CPUs Ray reserves per worker (possibly shrunk below the configured value)."""
    gpus_per_worker: float
    torch_threads: int
    """Torch intra-op threads per worker: the configured CPUs rounded down, at least 1."""
    shrunk_from: float | None = None
    """The configured CPUs per worker when the reservation was shrunk, else None."""

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    def runs_in_driver(self, size: float, limit: float) -> bool:
        """Whether a stage runs its work in the driver instead of Ray workers: one CPU worker and an input of
        `size` at most `limit` (the stage's `in_driver_*` key), where starting workers costs more than the work."""
        return self.num_workers == 1 and not self.use_gpu and size <= limit

    def actor_options(self) -> dict[str, float]:
        """Keyword arguments for `.options(...)` / `map_batches(...)`."""
        return {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker}

    def train_resources(self) -> dict[str, float]:
        """`resources_per_worker` of a Ray Train `ScalingConfig` (pair it with `use_gpu=plan.use_gpu`)."""
        out = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            out["GPU"] = self.gpus_per_worker
        return out

    def summary(self) -> dict[str, float | int | str | None]:
        return {
            "num_workers": self.num_workers,
            "cpus_per_worker": round(self.cpus_per_worker, 3),
            "gpus_per_worker": self.gpus_per_worker,
            "device": self.device,
            "cpus_shrunk_from": self.shrunk_from,
        }


def plan_workers(
    section: str,
    settings: WorkerSettings,
    *,
    num_workers: int | None = None,
    cluster: Mapping[str, float] | None = None,
    node_cpus: Sequence[float] | None = None,
    reserve_cpus: float | None = None,
) -> WorkerPlan:
    """Decide CPUs/GPUs per worker for the stage whose config section is `section`.

    `num_workers` overrides the configured count (e.g. a pool capped at the number of work items);
    `cluster` is Ray's `cluster_resources()` and `node_cpus` the CPUs of each alive node (both read from the
    running Ray when `cluster` is None; a given `cluster` without `node_cpus` is one node); `reserve_cpus`
    is what each node keeps free (default: `default_reserve_cpus` of the node's CPUs).
    """
    n = int(num_workers if num_workers is not None else settings.num_workers)
    if n < 1:
        raise StageError(f"{section}.num_workers must be at least 1 (got {n})")
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
        node_cpus = [float(nd.get("Resources", {}).get("CPU", 0.0)) for nd in ray.nodes() if nd.get("Alive")]
    total_cpu, total_gpu = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    gpus = resolve_gpus(settings.gpus_per_worker, total_gpu)
    if gpus > 0 and total_gpu < gpus:
        raise StageError(
            f"{section}.gpus_per_worker={gpus:g}, but the Ray cluster has {total_gpu:g} GPU(s): "
            f"set {section}.gpus_per_worker=0 (or auto), or join a GPU cluster with --address / ray.address"
        )
    if gpus > 0 and n * gpus > total_gpu:
        log.warning("%s: %d workers × %g GPU > %g GPUs in the cluster now; the extra workers wait for GPUs", section, n, gpus, total_gpu)
    configured = float(settings.cpus_per_worker)
    cpus, shrunk_from = configured, None
    nodes = [float(c) for c in node_cpus] if node_cpus else [total_cpu]
    reserve = sum(default_reserve_cpus(c) if reserve_cpus is None else min(reserve_cpus, c) for c in nodes)
    spare = total_cpu - reserve
    if total_cpu > 0 and n * cpus > spare:
        cpus = max(MIN_CPUS_PER_WORKER, spare / n)
        shrunk_from = configured
        where = f"of the {total_cpu:g} CPUs" if len(nodes) == 1 else f"of the {total_cpu:g} CPUs ({len(nodes)} nodes, a reserve on each)"
        log.info(
            "%s: %d workers × %g CPU would leave fewer than %g %s for reading the data; reserving %.2f CPU per worker",
            section, n, configured, reserve, where, cpus,
        )
    return WorkerPlan(
        section=section,
        num_workers=n,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        torch_threads=max(1, int(math.floor(configured))),
        shrunk_from=shrunk_from,
    )


def fit_keeping_sigint(trainer: Any) -> Any:
    """`trainer.fit()` with the process's SIGINT handler restored afterwards.

    Ray Train V2's `fit()` installs its own SIGINT handler (abort the training controller) and never puts the old one
    back. Later in the same process, e.g. in the evaluate stage of `ga-ray run`, Ctrl-C then calls that handler on a
    finished controller, which swallows the interrupt: the run could not be stopped with Ctrl-C any more.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        return trainer.fit()
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, before if before is not None else signal.default_int_handler)


@contextmanager
def torch_threads_restored() -> Iterator[None]:
    """For work a stage runs in the driver with a worker's thread count: the driver's count afterwards."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
