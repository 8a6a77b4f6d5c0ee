"""Is the run directory one folder for every node of the cluster?

Stages on different nodes read each other's files, so the run directory must be shared storage (NFS, a PVC). On a
cluster, `check_shared_storage` runs one tiny task pinned to each alive node: it reads the marker the driver wrote
and writes its own, which the driver then reads back. A node that cannot see the folder stops the run at once with
its address and the path, instead of Ray Train's late "A local path on the head node is not accessible by worker
nodes" halfway through a stage.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from ga_ray.errors import StageError

MARKER_PREFIX = ".ga_ray_storage_check"


@dataclass(frozen=True)
class NodeView:
    node_id: str
    address: str
    hostname: str
    sees_driver_marker: bool
    error: str | None = None


def probe(run_dir: str, token: str) -> tuple[bool, str | None, str]:
    """On a node: does the driver's marker exist with its token? Then write this node's own marker."""
    root = Path(run_dir)
    host = socket.gethostname()
    try:
        seen = (root / f"{MARKER_PREFIX}.{token}.driver").read_text() == token
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc.strerror or exc}", host
    try:
        mine = root / f"{MARKER_PREFIX}.{token}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        mine.write_text(token)
    except OSError as exc:
        return seen, f"cannot write: {exc.strerror or exc}", host
    return seen, None, host


def problems(views: list[NodeView], run_dir: str) -> list[str]:
    """One line per node that does not share `run_dir`."""
    out = []
    for v in views:
        if not v.sees_driver_marker or v.error:
            why = v.error or "the driver's marker file is not there (a different, node-local folder)"
            out.append(f"node {v.address} ({v.hostname}) does not see the run directory {run_dir}: {why}")
    return out


def check_shared_storage(run_dir: str | Path, timeout_s: float = 60.0) -> list[NodeView]:
    """Raise StageError unless every alive node of the joined Ray cluster sees `run_dir`; returns what each saw.

    Needs Ray initialised. One node (a laptop, the local Ray) is trivially fine and returns without a task."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return []
    root = Path(run_dir).resolve()
    token = uuid.uuid4().hex
    driver_marker = root / f"{MARKER_PREFIX}.{token}.driver"
    driver_marker.write_text(token)
    remote_probe = ray.remote(num_cpus=0, max_retries=0)(probe)
    try:
        refs = {
            n["NodeID"]: remote_probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(root), token)
            for n in nodes
        }
        views = []
        for n in nodes:
            try:
                seen, err, host = ray.get(refs[n["NodeID"]], timeout=timeout_s)
            except Exception as exc:  # the node died, or the task could not start there
                seen, err, host = False, f"probe failed: {type(exc).__name__}: {exc}", "?"
            views.append(NodeView(n["NodeID"], n.get("NodeManagerAddress", "?"), host, seen, err))
        written = list(root.glob(f"{MARKER_PREFIX}.{token}.*"))
        # the driver must also see what every node wrote (one marker per node besides its own)
        if len(written) - 1 < len(nodes) and not problems(views, str(root)):
            views.append(NodeView("driver", "driver", socket.gethostname(), False,
                                  f"only {len(written) - 1} of {len(nodes)} node markers are visible to the driver"))
    finally:
        for p in root.glob(f"{MARKER_PREFIX}.{token}.*"):
            p.unlink(missing_ok=True)
    bad = problems(views, str(root))
    if bad:
        raise StageError(
            "the run directory must be shared storage that every node mounts at the same path (NFS, a PVC):\n  "
            + "\n  ".join(bad)
        )
    return views
