"""Manifest behaviour: skip unchanged stages, --force, resume after a crash or a kill, atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ga_ray.config import load_config
from ga_ray.pipeline import Stage, StageError, run_pipeline
from ga_ray.rundir import RunDir, atomic_dir, atomic_write_text, fingerprint_path

CALLS: list[str] = []


def _writer(name: str, section: str):
    def run(ctx):
        CALLS.append(name)
        # a stage reads only the section it declares
        atomic_write_text(ctx.out / f"{name}.txt", f"{name} {section}={getattr(ctx.cfg, section).model_dump()}")
        return {"line": f"{name} ok"}

    return run


def _registry(fail_b: bool = False) -> tuple[Stage, ...]:
    def b(ctx):
        if fail_b:
            raise StageError("b broke")
        return _writer("b", "dictionary")(ctx)

    return (
        Stage("a", _writer("a", "data"), "a", ("data",)),
        Stage("b", b, "b", ("dictionary",), upstream=("a",)),
        Stage("c", _writer("c", "report"), "c", ("report",), upstream=("b",)),
    )


def test_skip_unchanged_and_rerun_changed(tmp_path):
    CALLS.clear()
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None)
    run_pipeline(cfg, rd, registry=_registry())
    assert CALLS == ["a", "b", "c"]
    run_pipeline(cfg, rd, registry=_registry())
    assert CALLS == ["a", "b", "c"], "unchanged inputs must be skipped"
    cfg2 = load_config(None, ["dictionary.n_atoms=7"])
    run_pipeline(cfg2, rd, registry=_registry())
    assert CALLS == ["a", "b", "c", "b", "c"], "a changed section reruns its stage and those after it"
    m = json.loads((rd.root / "manifest.json").read_text())
    assert {k: v["status"] for k, v in m["stages"].items()} == {"a": "done", "b": "done", "c": "done"}
    rec = m["stages"]["b"]
    for key in ("fingerprint", "wall_time_s", "versions", "host", "inputs", "summary"):
        assert key in rec
    assert "torch" in rec["versions"] and "ray" in rec["versions"]
    assert (rd.root / "config.yaml").read_text().count("n_atoms: 7") == 1


def test_force_redoes_stage_and_everything_after(tmp_path):
    CALLS.clear()
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None)
    run_pipeline(cfg, rd, registry=_registry())
    CALLS.clear()
    run_pipeline(cfg, rd, force="b", registry=_registry())
    assert CALLS == ["b", "c"]
    CALLS.clear()
    # a single-stage command after a forced upstream re-run: the upstream's new finish time invalidates it
    time.sleep(1.1)
    run_pipeline(cfg, rd, stages=["a"], force="a", registry=_registry())
    run_pipeline(cfg, rd, stages=["b"], registry=_registry())
    assert CALLS == ["a", "b"]
    with pytest.raises(StageError, match="unknown stage"):
        run_pipeline(cfg, rd, force="nope", registry=_registry())


def test_failed_stage_resumes_from_last_finished(tmp_path):
    CALLS.clear()
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None)
    with pytest.raises(StageError, match="b broke"):
        run_pipeline(cfg, rd, registry=_registry(fail_b=True))
    m = rd.read_manifest()["stages"]
    assert m["a"]["status"] == "done" and m["b"]["status"] == "failed" and "b broke" in m["b"]["error"]
    assert "c" not in m
    CALLS.clear()
    run_pipeline(cfg, rd, registry=_registry())
    assert CALLS == ["b", "c"], "the finished stage is not redone"


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ga_ray.config import load_config
    from ga_ray.pipeline import Stage, run_pipeline
    from ga_ray.rundir import RunDir, atomic_dir, atomic_write_text

    def a(ctx):
        atomic_write_text(ctx.out / "a.txt", "a")
        return {"line": "a"}

    def slow(ctx):
        marker = Path(sys.argv[2])
        with atomic_dir(ctx.out / "parts") as tmp:
            (tmp / "part-0").write_text("half")
            if not marker.exists():
                marker.write_text("started")
                time.sleep(600)  # killed here, halfway
            (tmp / "part-1").write_text("done")
        return {"line": "slow"}

    reg = (Stage("a", a, "a", ("data",)), Stage("slow", slow, "slow", ("report",), upstream=("a",)))
    run_pipeline(load_config(None), RunDir(sys.argv[1]), registry=reg)
    print("FINISHED")
    """
)


def test_stage_killed_halfway_leaves_nothing_trusted_and_resumes(tmp_path):
    script = tmp_path / "pipe.py"
    script.write_text(KILL_SCRIPT)
    run, marker = tmp_path / "run", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(marker)], env=env)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the stage never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = RunDir(run).read_manifest()["stages"]
    assert m["a"]["status"] == "done" and m["slow"]["status"] == "running"
    assert not (run / "slow" / "parts").exists(), "a killed stage must not leave a trusted half-written folder"
    a_finished = m["a"]["finished_at"]
    out = subprocess.run([sys.executable, str(script), str(run), str(marker)], env=env, capture_output=True, text=True, timeout=120)
    assert "FINISHED" in out.stdout, out.stderr
    m = RunDir(run).read_manifest()["stages"]
    assert m["slow"]["status"] == "done" and m["a"]["finished_at"] == a_finished, "resume skips the finished stage"
    assert sorted(p.name for p in (run / "slow" / "parts").iterdir()) == ["part-0", "part-1"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("2")
            raise RuntimeError("boom")
    assert (target / "x").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temp folder left behind"
    fp = fingerprint_path(target)
    (target / "x").write_text("3")
    assert fingerprint_path(target) != fp


def test_failed_or_unfinished_upstream_is_never_read(tmp_path):
    CALLS.clear()
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None)
    run_pipeline(cfg, rd, registry=_registry())
    cfg2 = load_config(None, ["dictionary.n_atoms=9"])
    with pytest.raises(StageError, match="b broke"):
        run_pipeline(cfg2, rd, registry=_registry(fail_b=True))
    CALLS.clear()
    # b/ still holds the previous run's output: c must refuse to read it, and say what to re-run
    with pytest.raises(StageError, match=r"c reads the output of b, which failed in its last run: its b/ is not current\. Re-run it first: ga-ray b"):
        run_pipeline(cfg2, rd, stages=["c"], registry=_registry())
    assert CALLS == []
    # a stage that never ran
    with pytest.raises(StageError, match="which has not run in this run directory"):
        run_pipeline(cfg, RunDir(tmp_path / "fresh"), stages=["b"], registry=_registry())
    # once b is done again, c runs
    run_pipeline(cfg2, rd, stages=["b", "c"], registry=_registry())
    assert CALLS == ["b", "c"]


def test_a_stage_sees_exactly_what_it_declares(tmp_path):
    seen = {}

    def reader(ctx):
        seen["path"] = ctx.cfg.model.path
        seen["seed"] = ctx.cfg.seed
        seen["ray"] = ctx.cfg.ray.num_cpus  # the runtime section: readable, not fingerprinted
        seen["dump"] = ctx.cfg.model_dump(mode="json")
        with pytest.raises(StageError, match=r"stage 'r' read the config value 'model.dtype'.*add 'model.dtype' to its config_sections"):
            ctx.cfg.model.dtype
        with pytest.raises(StageError, match=r"stage 'r' read the config value 'dictionary'"):
            ctx.cfg.dictionary
        with pytest.raises(StageError, match="asked for the adapter without declaring it"):
            ctx.adapter_path()
        return {"line": "ok"}

    reg = (Stage("r", reader, "r", ("model.path", "report"), globals=("seed",)),)
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None, ["model.path=/m", "model.dtype=float32", "seed=3", "ray.num_cpus=1", "dictionary.n_atoms=5"])
    run_pipeline(cfg, rd, registry=reg)
    assert seen["path"] == "/m" and seen["seed"] == 3 and seen["ray"] == 1
    # the dump hands on only what was declared: the rest is at its defaults
    assert seen["dump"]["model"]["path"] == "/m" and seen["dump"]["model"]["dtype"] == "auto"
    assert seen["dump"]["dictionary"]["n_atoms"] == 500 and seen["dump"]["seed"] == 3
    fp = rd.stage_record("r")["fingerprint"]
    # what it declares is fingerprinted (a global too); what it does not declare is not
    run_pipeline(load_config(None, ["model.path=/m", "model.dtype=bfloat16", "seed=3", "dictionary.n_atoms=6"]), rd, registry=reg)
    assert rd.stage_record("r")["fingerprint"] == fp
    run_pipeline(load_config(None, ["model.path=/m", "seed=4"]), rd, registry=reg)
    assert rd.stage_record("r")["fingerprint"] != fp


def test_registered_stages_declare_the_seed_and_the_adapter():
    from ga_ray.pipeline import STAGES, StageContext, get_stage

    assert "seed" in get_stage("coherence").globals, "coherence samples its background documents with the global seed"
    assert {s.name for s in STAGES if s.adapter} >= {"factors", "gradients", "coherence", "steer"}
    assert not get_stage("atoms").adapter and not get_stage("report").adapter


def test_adapter_is_the_declared_input(tmp_path):
    from ga_ray.pipeline import StageContext

    rd = RunDir(tmp_path / "run")
    ctx = StageContext(cfg=load_config(None), run_dir=rd, stage="factors", out=rd.stage_dir("factors"))
    assert ctx.adapter_path() == rd.stage_dir("adapter")
    with pytest.raises(StageError, match="read the config value 'finetune'"):
        ctx.cfg.finetune.enabled  # the adapter is the declared input, not the finetune section
    ctx = StageContext(cfg=load_config(None, ["finetune.enabled=false", "model.adapter=/a"]), run_dir=rd, stage="gradients", out=rd.root)
    assert ctx.adapter_path() == Path("/a")
    ctx = StageContext(cfg=load_config(None, ["finetune.enabled=false"]), run_dir=rd, stage="coherence", out=rd.root)
    with pytest.raises(StageError, match="no adapter: set model.adapter"):
        ctx.adapter_path()
