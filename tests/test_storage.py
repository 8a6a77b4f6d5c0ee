"""The shared-storage check: what a node that cannot see the run directory is told, and the probe itself."""

from __future__ import annotations

from ga_ray.storage import MARKER_PREFIX, NodeView, probe, problems


def test_problems_name_the_node_and_the_path():
    views = [
        NodeView("a" * 8, "10.0.0.1", "head", True),
        NodeView("b" * 8, "10.0.0.2", "gpu-1", False),
        NodeView("c" * 8, "10.0.0.3", "gpu-2", True, "cannot write: Read-only file system"),
    ]
    out = problems(views, "/shared/runs/x")
    assert len(out) == 2
    assert "10.0.0.2 (gpu-1)" in out[0] and "/shared/runs/x" in out[0] and "node-local" in out[0]
    assert "10.0.0.3 (gpu-2)" in out[1] and "Read-only" in out[1]
    assert problems(views[:1], "/x") == []


def test_probe_reads_the_driver_marker_and_writes_its_own(tmp_path):
    token = "t0k3n"
    seen, err, _ = probe(str(tmp_path), token)
    assert not seen and "FileNotFoundError" in err  # no driver marker: a different folder
    (tmp_path / f"{MARKER_PREFIX}.{token}.driver").write_text(token)
    seen, err, _ = probe(str(tmp_path), token)
    assert seen and err is None
    assert len(list(tmp_path.glob(f"{MARKER_PREFIX}.{token}.*"))) == 2


def test_single_node_needs_no_probe(ray_session, tmp_path):
    from ga_ray.storage import check_shared_storage

    assert check_shared_storage(tmp_path) == []
    assert not list(tmp_path.iterdir())
