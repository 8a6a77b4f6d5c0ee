"""One resource policy for every stage's workers (ga_ray.resources.plan_workers)."""

from __future__ import annotations

import pytest

from ga_ray.config import load_config
from ga_ray.errors import StageError
from ga_ray.resources import plan_workers


def test_fits_unchanged_and_train_resources():
    cfg = load_config(None, ["gradients.num_workers=2", "gradients.cpus_per_worker=1.5", "gradients.gpus_per_worker=0"])
    plan = plan_workers("gradients", cfg.gradients, cluster={"CPU": 8.0})
    assert (plan.num_workers, plan.cpus_per_worker, plan.gpus_per_worker, plan.torch_threads) == (2, 1.5, 0.0, 1)
    assert plan.shrunk_from is None and plan.device == "cpu" and not plan.use_gpu
    assert plan.train_resources() == {"CPU": 1.5}
    assert plan.actor_options() == {"num_cpus": 1.5, "num_gpus": 0.0}


def test_workers_that_take_every_cpu_are_shrunk_but_keep_their_threads():
    # 2 actors x 1 CPU on a 2-core machine starved Ray Data's read tasks: one CPU stays free
    cfg = load_config(None, ["factors.num_workers=2", "factors.cpus_per_worker=1", "factors.gpus_per_worker=0"])
    plan = plan_workers("factors", cfg.factors, cluster={"CPU": 2.0})
    assert plan.cpus_per_worker == pytest.approx(0.5) and plan.shrunk_from == 1.0
    assert plan.torch_threads == 1, "threads come from the configured CPUs, so numbers do not depend on the machine"
    # a 1-CPU machine keeps a quarter free
    plan = plan_workers("factors", cfg.factors, cluster={"CPU": 1.0})
    assert plan.cpus_per_worker == pytest.approx(0.375)
    # an explicit pool size (capped at the work items) is what is planned
    plan = plan_workers("coherence", cfg.coherence, num_workers=3, cluster={"CPU": 4.0})
    assert plan.num_workers == 3 and plan.cpus_per_worker == pytest.approx(1.0)


def _placements(n: int, cpus: float, nodes: list[float]):
    """Every way to put n workers of `cpus` CPUs on nodes of those capacities (the reference: brute force)."""
    if n == 0:
        yield [0] * len(nodes)
        return
    for counts in _placements(n - 1, cpus, nodes):
        for j in range(len(nodes)):
            if (counts[j] + 1) * cpus <= nodes[j] + 1e-9:
                yield [c + (i == j) for i, c in enumerate(counts)]


def _some_node_keeps_its_reserve(n: int, cpus: float, nodes: list[float]) -> bool:
    from ga_ray.resources import default_reserve_cpus

    return all(any(cap - k * cpus >= default_reserve_cpus(cap) - 1e-9 for cap, k in zip(nodes, counts))
               for counts in _placements(n, cpus, nodes))


def test_on_a_cluster_the_free_cpus_are_on_one_node_wherever_the_workers_land():
    # seen on two 2-CPU nodes: 2 workers x 1.5 CPU left 1 CPU free in all but 0.5 per node, and the reads never ran
    cfg = load_config(None, ["gradients.num_workers=2", "gradients.cpus_per_worker=1.5", "gradients.gpus_per_worker=0"])
    assert not _some_node_keeps_its_reserve(2, 1.5, [2.0, 2.0])
    plan = plan_workers("gradients", cfg.gradients, cluster={"CPU": 4.0}, node_cpus=[2.0, 2.0])
    assert plan.cpus_per_worker == pytest.approx(1.0) and plan.shrunk_from == 1.5
    assert plan_workers("gradients", cfg.gradients, cluster={"CPU": 4.0}).cpus_per_worker == 1.5, "one node of 4: fits"
    # against the brute-force reference on a few shapes (a CPU-less head node among them)
    for nodes in ([2.0, 2.0], [3.0, 3.0], [8.0] * 4, [0.0, 4.0, 4.0], [1.0, 2.0, 6.0]):
        for n in (1, 2, 3, 5, 8):
            for configured in (0.5, 1.0, 1.5, 1.6, 2.0, 4.0):
                cfg = load_config(None, [f"gradients.num_workers={n}", f"gradients.cpus_per_worker={configured}", "gradients.gpus_per_worker=0"])
                plan = plan_workers("gradients", cfg.gradients, cluster={"CPU": sum(nodes)}, node_cpus=nodes)
                assert _some_node_keeps_its_reserve(n, plan.cpus_per_worker, nodes), (nodes, n, configured, plan)
                if plan.shrunk_from is None:
                    assert plan.cpus_per_worker == configured
    # 3-CPU nodes, 2 workers x 1.6 CPU: kept (one per node, 1.4 free on each)
    cfg = load_config(None, ["gradients.num_workers=2", "gradients.cpus_per_worker=1.6", "gradients.gpus_per_worker=0"])
    assert plan_workers("gradients", cfg.gradients, cluster={"CPU": 6.0}, node_cpus=[3.0, 3.0]).shrunk_from is None


def test_gpus_the_cluster_lacks_are_an_error_and_auto_follows_the_clusters_gpus(monkeypatch):
    cfg = load_config(None, ["gradients.gpus_per_worker=1"])
    with pytest.raises(StageError, match=r"gradients.gpus_per_worker=1, but the Ray cluster has 0 GPU"):
        plan_workers("gradients", cfg.gradients, cluster={"CPU": 4.0})
    plan = plan_workers("gradients", cfg.gradients, cluster={"CPU": 4.0, "GPU": 2.0})
    assert plan.use_gpu and plan.device == "cuda" and plan.train_resources() == {"CPU": 1.0, "GPU": 1.0}
    import ga_ray.resources as res

    # `auto` asks the cluster, not the driver: a CPU-only head node (no CUDA here) with GPU workers gets GPU workers,
    # and a driver that sees CUDA on a cluster without GPU resources gets CPU workers (Ray would wait forever)
    auto = load_config(None).dictionary
    monkeypatch.setattr(res, "cuda_available", lambda: False)
    assert plan_workers("dictionary", auto, cluster={"CPU": 4.0}).gpus_per_worker == 0.0
    assert plan_workers("dictionary", auto, cluster={"CPU": 4.0, "GPU": 8.0}).gpus_per_worker == 1.0
    monkeypatch.setattr(res, "cuda_available", lambda: True)
    assert plan_workers("dictionary", auto, cluster={"CPU": 4.0, "GPU": 1.0}).gpus_per_worker == 1.0
    assert plan_workers("dictionary", auto, cluster={"CPU": 4.0}).gpus_per_worker == 0.0
    # without a cluster to ask, CUDA in this process decides
    assert res.resolve_gpus("auto") == 1.0 and res.resolve_gpus("auto", 0.0) == 0.0 and res.resolve_gpus(2) == 2.0
    monkeypatch.setattr(res, "cuda_available", lambda: False)
    assert res.resolve_gpus("auto") == 0.0 and res.resolve_gpus("auto", 4.0) == 1.0


def test_every_worker_section_names_its_resources_the_same():
    cfg = load_config(None)
    for section in ("finetune", "factors", "gradients", "dictionary", "coherence"):
        fields = set(type(getattr(cfg, section)).model_fields)
        assert {"num_workers", "cpus_per_worker", "gpus_per_worker"} <= fields, section
        assert not fields & {"use_gpu", "num_gpus", "num_actors", "cpus_per_actor"}, section


def test_fit_keeping_sigint_restores_the_handler_a_trainer_installs():
    """Ray Train V2's fit() installs its own SIGINT handler and leaves it; ours puts the old one back, also on error."""
    import signal

    from ga_ray.resources import fit_keeping_sigint

    class InstallsHandler:  # what TorchTrainer.fit does to the process's SIGINT handler
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def fit(self) -> str:
            signal.signal(signal.SIGINT, lambda *_: None)
            if self.fail:
                raise RuntimeError("worker died")
            return "result"

    def mine(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGINT, mine)
    try:
        assert fit_keeping_sigint(InstallsHandler(False)) == "result"
        assert signal.getsignal(signal.SIGINT) is mine
        with pytest.raises(RuntimeError):
            fit_keeping_sigint(InstallsHandler(True))
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, old)


def test_runs_in_driver_only_for_one_cpu_worker_on_a_small_input():
    from ga_ray.resources import WorkerPlan

    one_cpu = WorkerPlan("gradients", num_workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0, torch_threads=1)
    assert one_cpu.runs_in_driver(10, 10) and not one_cpu.runs_in_driver(11, 10)
    assert not one_cpu.runs_in_driver(1, 0), "a limit of 0 forces the Ray path (what `<stage>.in_driver_max_docs=0` means)"
    assert not WorkerPlan("gradients", 2, 1.0, 0.0, 1).runs_in_driver(1, 10)
    assert not WorkerPlan("gradients", 1, 1.0, 1.0, 1).runs_in_driver(1, 10)


def test_torch_threads_restored_whatever_happens():
    import torch

    from ga_ray.resources import torch_threads_restored

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads_restored():
            torch.set_num_threads(1 if before > 1 else 2)
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
