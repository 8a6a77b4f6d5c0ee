"""Which Ray a run uses: the default is a local Ray started in-process, even with a `ray start` cluster running."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ga_ray.config import RayConfig
from ga_ray.raycluster import describe_ray, init_kwargs

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_local_and_an_address_joins():
    kw = init_kwargs(RayConfig(num_cpus=2), verbose=False)
    assert kw["address"] == "local", "a plain ray.init() would join a `ray start` cluster on this machine"
    assert kw["num_cpus"] == 2 and kw["log_to_driver"] is False, "worker output stays out of the terminal"
    kw = init_kwargs(RayConfig(address="10.0.0.1:6379"), verbose=True)
    assert kw["address"] == "10.0.0.1:6379" and "num_cpus" not in kw and kw["log_to_driver"] is True
    assert describe_ray(None, {"CPU": 2.0}) == "Ray: a local Ray started in-process (2 CPUs); use --address to join a cluster"
    assert describe_ray("auto", {"CPU": 16.0, "GPU": 2.0}) == "Ray: joined the cluster at auto (16 CPUs, 2 GPUs)"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_head(ray_bin: Path, tmp: Path, env: dict[str, str], attempts: int = 3) -> tuple[subprocess.Popen, int, object]:
    """`ray start --head --block` on free ports, listening; (process, GCS port, its log file).

    The ports are free when picked, but another Ray of this test session can take one (or one of the 20
    worker ports after the first) before the head binds it; the head then exits at once, and we start it
    again on new ports, at most `attempts` times, failing with its log.
    """
    for attempt in range(attempts):
        port, client, nm, om, agent, agent_grpc, metrics, rt_env, wmin = _free_ports(9)
        log_path = tmp / f"head-{attempt}.log"
        log = log_path.open("w")
        # --block: the head lives as long as this process, and stopping it stops only this cluster (never `ray
        # stop`, which would stop every Ray on the machine)
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", f"--temp-dir={tmp}", "--num-cpus=1",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={client}",
             f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
             f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 20}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline and head.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return head, port, log
            time.sleep(0.5)
        _stop_head(head)
        log.close()
        if time.time() >= deadline:
            pytest.fail(f"the ray start head never listened: {log_path.read_text()[-3000:]}")
    pytest.fail(f"ray start --head exited {attempts} times; the last log: {log_path.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen) -> None:
    if head.poll() is not None:
        return
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, 9)
        head.wait(timeout=30)


PROBE = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
import ray
from ga_ray.config import RayConfig
from ga_ray.raycluster import init_ray
init_ray(RayConfig(address=sys.argv[1] or None, num_cpus=None if sys.argv[1] else 2))
print("CPUS", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def _probe(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", PROBE, address], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"init_ray({address!r}) hung: {(exc.stdout or b'')[-2000:]!r} {(exc.stderr or b'')[-3000:]!r}")


@pytest.mark.slow
def test_default_does_not_join_a_running_ray_start_cluster():
    ray_bin = Path(sys.executable).with_name("ray")
    # a short temp dir: Ray's socket paths must stay under 108 characters
    tmp = Path(tempfile.mkdtemp(prefix="gah", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    try:
        head, port, log = _start_head(ray_bin, tmp, env)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        # the default (no address): a local Ray of its own, with 2 CPUs, not the 1-CPU cluster
        local = _probe("", env)
        assert local.returncode == 0, local.stderr[-3000:]
        assert "Ray: a local Ray started in-process (2 CPUs)" in local.stdout and "CPUS 2.0" in local.stdout, local.stdout
        # an address joins it, and says so
        joined = _probe(f"127.0.0.1:{port}", env)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert f"Ray: joined the cluster at 127.0.0.1:{port} (1 CPUs)" in joined.stdout and "CPUS 1.0" in joined.stdout, joined.stdout
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
