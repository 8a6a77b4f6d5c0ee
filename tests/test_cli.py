"""The command line: help lists the stages, user errors are one clear line and exit code 2."""

from __future__ import annotations

import re

import pytest

from typer.testing import CliRunner

from ga_ray.cli import app

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_stages():
    out = runner.invoke(app, ["--help"])
    assert out.exit_code == 0
    for stage in ("prepare", "finetune", "factors", "gradients", "atoms", "coherence", "report", "run", "demo", "bench"):
        assert re.search(rf"^\s+{stage}\s", _plain(out.output), re.M), stage


def test_config_error_is_one_clear_line(tmp_path):
    out = runner.invoke(app, ["config", "demo", "--set", "dictionary.n_atom=3"])
    assert out.exit_code == 2
    text = _plain(out.output)
    assert "unknown key 'dictionary.n_atom'" in text and "Traceback" not in text


def test_config_prints_resolved_yaml():
    out = runner.invoke(app, ["config", "paper", "--set", "dictionary.n_atoms=1000"])
    assert out.exit_code == 0, out.output
    assert "n_atoms: 1000" in out.output and "top_k: 50" in out.output


def test_config_fields_documents_everything():
    out = runner.invoke(app, ["config", "--fields"])
    assert out.exit_code == 0
    assert "dictionary.alpha = 0.1  -- L1 penalty" in _plain(out.output)


def test_unknown_bench_and_force():
    out = runner.invoke(app, ["bench", "nope"])
    assert out.exit_code == 2 and "unknown benchmark 'nope'" in _plain(out.output)


def test_missing_data_path_is_actionable(tmp_path):
    out = runner.invoke(app, ["run", "demo", "--run-dir", str(tmp_path / "r"), "--set", "data.path=/no/such/file.jsonl"])
    assert out.exit_code == 2, out.output
    assert "error: model.path is not set" in _plain(out.output) and "Traceback" not in out.output
    out = runner.invoke(
        app, ["prepare", "demo", "--run-dir", str(tmp_path / "r"), "--set", "data.path=/no/such/file.jsonl", "--set", f"model.path={tmp_path}"]
    )
    assert out.exit_code == 2 and "has no tokenizer" in _plain(out.output) and "set model.tokenizer" in out.output, out.output


def test_failed_prepare_blocks_later_stages_with_one_line(tmp_path):
    run = tmp_path / "r"
    # a real prepare that fails inside the stage (no tokenizer in the model folder)
    out = runner.invoke(app, ["prepare", "demo", "--run-dir", str(run), "--set", "data.path=/no/such/file.jsonl", "--set", f"model.path={tmp_path}"])
    assert out.exit_code == 2, out.output
    from ga_ray.rundir import RunDir

    assert RunDir(run).stage_record("prepare")["status"] == "failed"
    (run / "data").mkdir(exist_ok=True)  # what a previous run would have left behind
    out = runner.invoke(app, ["finetune", "--run-dir", str(run)])
    text = _plain(out.output)
    assert out.exit_code == 2, text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "finetune reads the output of prepare, which failed in its last run" in errors[0], text
    assert f"ga-ray prepare --run-dir {run.resolve()}" in errors[0] and "Traceback" not in text
    assert RunDir(run).stage_record("finetune") is None, "the refused stage did not start"


def test_status_prints_the_manifest_as_a_table(tmp_path):
    from ga_ray.rundir import RunDir

    rd = RunDir(tmp_path / "r")
    t0 = rd.mark_running("prepare", "fp1", {})
    rd.mark_done("prepare", t0, {"line": "5,000 documents,\n 0 rejected"})
    t0 = rd.mark_running("finetune", "fp2", {})
    rd.mark_failed("finetune", t0, "StageError: out of memory")
    rd.mark_running("sweep", "fp3", {})
    out = runner.invoke(app, ["status", str(rd.root)])
    assert out.exit_code == 0, out.output
    lines = _plain(out.output).splitlines()
    assert lines[0].split() == ["stage", "status", "wall", "summary"]
    assert re.match(r"prepare\s+done\s+\d+\.\ds\s+5,000 documents, 0 rejected$", lines[1]), lines[1]
    assert re.match(r"finetune\s+failed\s+\d+\.\ds\s+StageError: out of memory$", lines[2]), lines[2]
    assert re.match(r"sweep\s+running\s*$", lines[3]), lines[3]
    out = runner.invoke(app, ["status", str(tmp_path / "nothing")])
    assert out.exit_code == 2 and "has no manifest.json" in _plain(out.output)


def test_user_errors_are_found_inside_rays_wrappers(ray_session):
    import ray

    from ga_ray.cli import _user_error
    from ga_ray.errors import DataError, StageError

    @ray.remote(num_cpus=0.1)
    def broken():
        raise DataError("docs.jsonl line 3: not JSON")

    with pytest.raises(Exception) as info:
        ray.get(broken.remote(), timeout=120)
    assert type(info.value).__name__.startswith("RayTaskError"), "Ray wraps the worker's error"
    assert _user_error(info.value) == "docs.jsonl line 3: not JSON", "the message, not Ray's traceback text"

    try:
        try:
            raise StageError("worker 0: no adapter")
        except StageError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        assert _user_error(exc) == "worker 0: no adapter", "found through __cause__"
    assert _user_error(ValueError("StageError: looks like one")) is None, "messages are never matched as text"


def test_quiet_output_keeps_library_lines_in_the_log_file(tmp_path, capsys):
    import logging
    import sys
    import warnings

    from ga_ray.cli import _HANDLER_TAG, LIBRARY_LOGGERS, setup_logging

    serve = logging.getLogger("ray.serve")
    late = logging.StreamHandler(sys.stderr)  # what Ray Serve adds when it is first imported, inside a stage
    try:
        log_file = setup_logging(tmp_path, verbose=False)
        serve.addHandler(late)
        serve.setLevel(logging.INFO)
        logging.getLogger("ga_ray").info("[prepare] done")
        serve.info("Started Serve in namespace")
        logging.getLogger("ray.data").info("Starting execution of Dataset")
        logging.getLogger("distributed.worker").info("dask chatter")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("old API", DeprecationWarning)
        serve.error("a real serve error")
        from ga_ray.raycluster import show_detail

        show_detail("\nEKFAC factors: per-block table")  # a stage's detail table
        import ray._private.worker as ray_worker

        from ga_ray.raycluster import route_raylet_messages

        route_raylet_messages()  # what Ray's listener thread calls for the raylet's messages to the driver
        ray_worker.print_to_stdstream({"lines": ["16 PYTHON worker processes have been started"], "pid": "raylet", "is_err": False}, False)
        captured = capsys.readouterr()
        err = captured.err
        assert "per-block table" not in captured.out + err and "PYTHON worker" not in captured.out + err
        assert "[prepare] done" in err and "a real serve error" in err
        for quiet in ("Started Serve", "Starting execution", "dask chatter", "old API"):
            assert quiet not in err, quiet
        text = log_file.read_text()
        for line in ("[prepare] done", "Started Serve in namespace", "Starting execution of Dataset", "dask chatter", "old API", "per-block table", "(raylet) 16 PYTHON worker"):
            assert line in text, line
        assert log_file == tmp_path / "logs" / "ga-ray.log"
    finally:
        from ga_ray.raycluster import OUTPUT, OutputSettings

        for k, v in vars(OutputSettings()).items():  # a CLI command's settings must not leak into later tests
            setattr(OUTPUT, k, v)
        serve.removeHandler(late)
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = getattr(ray_worker.print_to_stdstream, "_ga_ray_original", ray_worker.print_to_stdstream)
        root = logging.getLogger()
        for lg in [root, *(logging.getLogger(n) for n in LIBRARY_LOGGERS)]:
            for h in [h for h in lg.handlers if getattr(h, _HANDLER_TAG, False)]:
                lg.removeHandler(h)
                h.close()
            for f in list(lg.filters):
                lg.removeFilter(f)
        logging.captureWarnings(False)
