"""The cluster path, run for real: a two-node Ray cluster started with `ray start` on this machine.

One test, in the order a user meets it: the tiny demo world's pipeline submitted with `ray job submit --working-dir .
-- <python> jobs/run_pipeline.py ...` and stopped with `ray job stop` while its gradients stage runs; submitted again:
it resumes (the finished stages are skipped) and every document's gradient is there exactly once, computed by
actors on both nodes; submitted a third time: every stage is skipped; then the serve app `serve deploy`ed to the same
cluster answers the `openai` client.

The cluster has its own temp dir (short: Unix socket paths are limited to ~107 characters), its own ports and
`RAY_AUTH_MODE` set explicitly, so it never meets the in-process Ray of the other tests (tests/conftest.py's
`ray_session`), nor any other Ray on the machine; it is torn down whatever happens: its jobs stopped, its process
groups killed (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_e2e import TINY_STAGES, TINY_WORLD

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["prepare", "finetune", "factors", "gradients", "atoms", "coherence", "groups", "steer", "evaluate", "report"]

# Two gradients actors of 1.6 CPUs on nodes of 3 (logical) CPUs: one fits per node, so they run on both nodes, and
# each node keeps the 1 CPU a Ray Data read task needs (ga_ray.resources counts that reserve per node); windows of
# 16 documents give both of them work.
NODE_CPUS = 3
# (dask-ml k-means is off: it is tested in-process elsewhere, and on this cluster it took a minute of the job)
# The fine-tune stays on Ray Train (its checkpoint hand-off across nodes is what a cluster can break); the factors
# stage runs in the job's driver (one CPU worker, few documents), its Ray Train path is tested in-process.
MULTINODE_STAGES = ["gradients.num_workers=2", "gradients.cpus_per_worker=1.6", "gradients.window_docs=16",
                    "ray.execution_no_progress_timeout_s=150", "dictionary.kmeans_clusters=null", "finetune.in_driver_max_docs=0"]


from test_raycluster import _free_ports  # noqa: E402  (one copy of the free-port helper)


def _node_ports() -> list[str]:
    """Every fixed port a Ray node opens, free ones: two nodes on one machine (and any other Ray here) never clash."""
    nm, om, agent, agent_grpc, metrics, rt_env = _free_ports(6)
    return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}"]


class TwoNodeCluster:
    """`ray start --head --block` and `ray start --address ... --block`, each in its own process group."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        # a temp dir per node (short: Ray's socket paths have a length limit). Two nodes on one machine must not share
        # one: each node's runtime-env agent deletes the job packages it no longer uses from its runtime_resources/,
        # and in a shared folder that pulls the working dir away from under a job's driver on the other node
        self.temp_dirs = {n: tempfile.mkdtemp(prefix=f"gr{n[0]}", dir="/tmp") for n in ("head", "worker")}
        self.gcs_port, self.dash_port, self.client_port, self.serve_port = _free_ports(4)
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",  # explicit: an auth token written by an earlier ray.init() must not be demanded
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",
            "TOKENIZERS_PARALLELISM": "false",
            "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def start(self, name: str, args: list[str]) -> None:
        log = self.log_dir / f"ray-{name}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--num-gpus=0",
                 *_node_ports(), *args],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            ))

    def start_head(self) -> None:
        self.start("head", [
            "--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dirs['head']}", f"--num-cpus={NODE_CPUS}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash_port}",
            f"--ray-client-server-port={self.client_port}",
        ])

    def start_worker(self) -> None:
        self.start("worker", [f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.temp_dirs['worker']}", f"--num-cpus={NODE_CPUS}",
                              '--resources={"second_node": 1}'])

    def alive_nodes(self) -> list[str]:
        from ray.util.state import list_nodes

        return [n.node_id for n in list_nodes(address=self.address, timeout=10) if n.state == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 240.0) -> list[str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"`ray start` exited early ({p.returncode}):\n{self.dump_logs()}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) >= n:
                    return nodes
            except Exception:  # the dashboard is not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"the cluster did not reach {n} nodes in {timeout:.0f}s:\n{self.dump_logs()}")

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.logs if p.exists())

    def _stop_jobs(self) -> None:
        """Stop this cluster's unfinished jobs: a job's driver runs in a session of its own, outside our process groups."""
        from ray.job_submission import JobSubmissionClient

        try:
            client = JobSubmissionClient(self.address)
            live = [j.submission_id for j in client.list_jobs() if not j.status.is_terminal() and j.submission_id]
            for job in live:
                client.stop_job(job)
            deadline = time.time() + 20
            while live and time.time() < deadline:
                live = [j for j in live if not client.get_job_status(j).is_terminal()]
                time.sleep(0.5)
        except Exception:  # the dashboard is gone already: nothing to stop through it
            pass

    def _leftover_pids(self) -> list[int]:
        """Processes of this cluster still alive (their command line names one of its private temp dirs)."""
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmdline = (d / "cmdline").read_bytes()
                    if any(t.encode() in cmdline for t in self.temp_dirs.values()):
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        self._stop_jobs()
        for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            for p in reversed(self.procs):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait_s
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for t in self.temp_dirs.values():
            shutil.rmtree(t, ignore_errors=True)


def _tiny_world_paths(cache: Path) -> list[str]:
    """Build (no Ray) the tiny demo world of the e2e test; the `--set`s that point a `demo` config at it."""
    from ga_ray.cli import demo_config
    from ga_ray.config import load_config

    cfg = demo_config(load_config("demo", TINY_WORLD + [f"demo.cache_dir={cache}"]))
    return [f"data.path={cfg.data.path}", f"model.path={cfg.model.path}", f"model.tokenizer={cfg.model.tokenizer}",
            f"finetune.format_eval_set={cfg.finetune.format_eval_set}"]


class Jobs:
    """`ray job submit --working-dir . -- <the venv's python> jobs/run_pipeline.py demo ...`, as the README prints it."""

    def __init__(self, cluster: TwoNodeCluster, run_dir: Path, sets: list[str]):
        from ray.job_submission import JobSubmissionClient

        self.cluster, self.run_dir, self.sets = cluster, run_dir, sets
        self.client = JobSubmissionClient(cluster.address)
        self.n = 0

    def submit(self) -> str:
        self.n += 1
        job_id = f"ga-ray-{self.n}-{os.getpid()}"
        cmd = [str(BIN / "ray"), "job", "submit", f"--address={self.cluster.address}", "--working-dir=.", "--no-wait",
               f"--submission-id={job_id}", "--", sys.executable, "jobs/run_pipeline.py", "demo",
               "--run-dir", str(self.run_dir), *[x for s in self.sets for x in ("--set", s)]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.cluster.env, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
        return job_id

    def wait(self, job_id: str, timeout: float = 900.0) -> str:
        """Wait until the job ends; it must have SUCCEEDED. Returns its logs."""
        from ray.job_submission import JobStatus

        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.client.get_job_status(job_id)
            if status.is_terminal():
                logs = self.client.get_job_logs(job_id)
                assert status == JobStatus.SUCCEEDED, f"job {job_id} {status}:\n{logs[-6000:]}\n{self.cluster.dump_logs()}"
                return logs
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s:\n{self.client.get_job_logs(job_id)[-4000:]}")

    def stop_when_running(self, job_id: str, stage: str, timeout: float = 600.0) -> str:
        """`ray job stop` the job as soon as the manifest says `stage` runs; returns the job's logs."""
        manifest = self.run_dir / "manifest.json"
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if json.loads(manifest.read_text())["stages"].get(stage, {}).get("status") == "running":
                    break
            except (OSError, ValueError, KeyError):  # not written yet
                pass
            if self.client.get_job_status(job_id).is_terminal():
                pytest.fail(f"job {job_id} ended before {stage} ran:\n{self.client.get_job_logs(job_id)[-6000:]}")
            time.sleep(0.2)
        else:
            pytest.fail(f"{stage} never started:\n{self.client.get_job_logs(job_id)[-4000:]}")
        out = subprocess.run([str(BIN / "ray"), "job", "stop", f"--address={self.cluster.address}", job_id],
                             capture_output=True, text=True, env=self.cluster.env, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        while not self.client.get_job_status(job_id).is_terminal():
            time.sleep(0.5)
        return self.client.get_job_logs(job_id)


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def _gradient_ids(run_dir: Path) -> list[int]:
    return pq.read_table(run_dir / "gradients", columns=["doc_id"]).column("doc_id").to_pylist()


def _serve_config(path: Path, run_dir: Path, port: int) -> Path:
    # HeadOnly: both nodes have the address 127.0.0.1 here, so a proxy per node would contend for one port
    path.write_text(
        "proxy_location: HeadOnly\n"
        f"http_options: {{host: 127.0.0.1, port: {port}}}\n"
        "applications:\n"
        "  - name: ga-ray\n"
        "    route_prefix: /\n"
        "    import_path: ga_ray.serve.app:build_app\n"
        f"    args: {{run_dir: {run_dir}}}\n"
    )
    return path


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three jobs on a 2-core machine: 8.4 min when measured
def test_two_node_cluster_job_submit_stop_resume_skip_and_serve(tmp_path):
    t_start = time.time()
    run_dir = tmp_path / "run"
    cluster = TwoNodeCluster(tmp_path)
    timings: dict[str, float] = {}
    try:
        cluster.start_head()
        world = _tiny_world_paths(tmp_path / "cache")  # while the head starts
        cluster.wait_nodes(1)
        cluster.start_worker()
        nodes = cluster.wait_nodes(2)
        timings["cluster_up"] = time.time() - t_start
        jobs = Jobs(cluster, run_dir, world + TINY_STAGES + MULTINODE_STAGES)

        # 1. the pipeline, stopped with `ray job stop` while its gradients stage runs
        t = time.time()
        logs = jobs.stop_when_running(jobs.submit(), "gradients")
        timings["job_stopped"] = time.time() - t
        assert f"Ray: joined the cluster at auto ({2 * NODE_CPUS} CPUs)" in logs, logs[-3000:]
        assert "run directory" in logs and "is visible from all 2 nodes" in (run_dir / "logs" / "ga-ray.log").read_text()
        manifest = _manifest(run_dir)
        assert [s for s in STAGES[:3] if manifest[s]["status"] == "done"] == STAGES[:3], manifest
        assert manifest["gradients"]["status"] != "done", "the stop came too late: gradients had finished"
        assert not (run_dir / "gradients" / "_gradients.json").exists()

        # 2. submitted again: it resumes at gradients, every document exactly once, actors on both nodes
        t = time.time()
        logs = jobs.wait(jobs.submit())
        timings["job_resumed"] = time.time() - t
        for stage in STAGES[:3]:
            assert f"[{stage}] skipped (inputs unchanged)" in logs, (stage, logs[-3000:])
        for stage in STAGES[3:]:
            assert f"[{stage}] done in" in logs, (stage, logs[-3000:])
        manifest = _manifest(run_dir)
        assert [s for s in STAGES if manifest[s]["status"] == "done"] == STAGES
        # every artifact
        assert (run_dir / "data" / "prepare.json").exists()
        assert (run_dir / "adapter" / "adapter_config.json").exists()
        assert (run_dir / "factors" / "factors.safetensors").exists()
        assert (run_dir / "atoms" / "dictionary.safetensors").exists()
        from ga_ray.coherence import io as coherence_io

        assert coherence_io.load_atom_table(run_dir).num_rows == 8
        assert (run_dir / "groups").is_dir() and any((run_dir / "groups").iterdir())
        variants = sorted(p.name for p in (run_dir / "variants").iterdir() if p.is_dir())
        assert variants
        assert (run_dir / "eval").is_dir() and any((run_dir / "eval").iterdir())
        assert "data:image/png;base64," in (run_dir / "report" / "report.html").read_text()
        # the gradients: every document exactly once, from actors on both nodes, no half-written folder left
        info = json.loads((run_dir / "gradients" / "_gradients.json").read_text())
        from ga_ray.data.io import read_doc_ids

        docs = read_doc_ids(run_dir / "data").tolist()
        excluded = {r["doc_id"] for r in info["excluded_nonfinite"]}
        ids = _gradient_ids(run_dir)
        assert len(ids) == len(set(ids)) and sorted(set(ids) | excluded) == sorted(docs)
        assert {a["node_id"] for a in info["actors"]} == set(nodes), (info["actors"], nodes)
        assert sum(a["documents"] for a in info["actors"]) == len(docs)
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"

        # 3. the same job again: every stage skipped
        t = time.time()
        logs = jobs.wait(jobs.submit())
        timings["job_skipped"] = time.time() - t
        assert logs.count("skipped (inputs unchanged)") == len(STAGES), logs[-3000:]
        assert _gradient_ids(run_dir) == ids

        # 4. the serve app deployed to the same cluster from a Serve config file, answering the openai client
        t = time.time()
        cfg_file = _serve_config(tmp_path / "serve.yaml", run_dir, cluster.serve_port)
        from ga_ray.manifests import validate_manifest

        assert validate_manifest(cfg_file) == []
        out = subprocess.run([str(BIN / "serve"), "deploy", str(cfg_file), f"--address={cluster.address}"],
                             capture_output=True, text=True, env=cluster.env, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        import openai

        ai = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.serve_port}/v1", api_key="unused", timeout=60, max_retries=0)
        deadline, served = time.time() + 300, []
        while time.time() < deadline:
            try:
                served = [m.id for m in ai.models.list().data]
                if served:
                    break
            except openai.APIError:  # the proxy or the app is not up yet
                pass
            time.sleep(1)
        assert {"finetuned", "base", *variants} <= set(served), (served, variants, cluster.dump_logs())
        for model in ("finetuned", variants[0]):
            answer = ai.completions.create(model=model, prompt="What is 2 + 3?", max_tokens=4, temperature=0)
            assert answer.model == model and answer.usage.completion_tokens >= 1 and isinstance(answer.choices[0].text, str)
        timings["serve"] = time.time() - t
    finally:
        cluster.stop()
    timings["total"] = time.time() - t_start
    print("two-node cluster timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
