"""A run directory that cannot be used is one clear line (StageError; exit 2 from the CLI), never a traceback."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ga_ray.errors import StageError
from ga_ray.rundir import RunDir, atomic_dir, atomic_write_text

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_run_dir_that_is_a_file_or_lies_under_one(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(StageError) as err:
        RunDir(f)
    assert str(err.value) == f"run directory {f} is a file, not a folder: choose another --run-dir, or move the file away"
    with pytest.raises(StageError) as err:
        RunDir(f / "a" / "run")
    assert str(err.value) == f"run directory {f / 'a' / 'run'} lies under {f}, which is a file: choose another --run-dir"
    assert f.read_text() == "x"


def test_writes_into_a_read_only_place_are_one_line():
    # /proc/self is a real folder nobody may create files in, root included
    proc = Path("/proc/self").resolve()
    if not proc.is_dir():
        pytest.skip("no /proc")
    with pytest.raises(StageError) as err:
        atomic_write_text(proc / "config.yaml", "a: 1\n")
    assert str(err.value).startswith(f"cannot write {proc / 'config.yaml'} (")
    assert str(err.value).endswith(f"make {proc} writable (or free disk space), or choose another --run-dir")
    with pytest.raises(StageError, match=r"^cannot write .*/\.data\.tmp-"):
        with atomic_dir(proc / "data"):
            pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StageError, match=r"^cannot write .*manifest\.json \(Permission denied\)"):
            RunDir(ro).update_stage("prepare", status="running")
        with pytest.raises(StageError, match=r"^cannot create run directory .* \(Permission denied\)"):
            RunDir(ro / "sub")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize(
    "text, detail",
    [
        ('{"stages": {', "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 13"),
        ("", "not valid JSON: Expecting value at line 1 column 1"),
        ("[1, 2]", "the top level is a JSON list, not an object"),
        ('{"stages": []}', "'stages' must map each stage name to an object"),
        ('{"stages": {"prepare": "done"}}', "'stages' must map each stage name to an object"),
    ],
)
def test_damaged_manifest_names_the_file_and_what_to_do(tmp_path, text, detail):
    run = RunDir(tmp_path / "run")
    run.manifest_path.write_text(text)
    with pytest.raises(StageError) as err:
        run.stage_record("prepare")
    m = run.manifest_path
    assert str(err.value) == (
        f"{m} is damaged ({detail}). It records which stages finished: restore it, or move it away "
        f"(mv {m} {m}.broken) to run every stage again, or choose another --run-dir"
    )


def test_manifest_with_invalid_utf8_and_one_without_stages(tmp_path):
    run = RunDir(tmp_path / "run")
    run.manifest_path.write_bytes(b'{"stages": {"\xff": {}}}')
    with pytest.raises(StageError, match=r"is damaged \(cannot be read: .*codec can't decode"):
        run.read_manifest()
    run.manifest_path.write_text("{}")  # an empty object is a manifest with no stage yet
    assert run.read_manifest() == {"stages": {}}
    run.update_stage("prepare", status="done")
    assert json.loads(run.manifest_path.read_text()) == {"stages": {"prepare": {"status": "done"}}}


def test_cli_run_dir_problems_are_one_red_line(tmp_path):
    from ga_ray.cli import app

    f = tmp_path / "f.txt"
    f.write_text("x")
    for run_dir in (f, f / "run"):
        out = runner.invoke(app, ["prepare", "-r", str(run_dir), "--set", "data.path=x.jsonl"])
        text = _plain(out.output)
        assert out.exit_code == 2, text
        assert text.startswith("error: run directory ") and "Traceback" not in text
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{oops")
    out = runner.invoke(app, ["prepare", "-r", str(run), "--set", "data.path=x.jsonl"])
    text = _plain(out.output)
    assert out.exit_code == 2 and f"error: {run / 'manifest.json'} is damaged (not valid JSON" in text and "Traceback" not in text
    # a run directory nobody can write into (/proc/self: also for root), and a config.yaml that is a folder
    out = runner.invoke(app, ["prepare", "-r", "/proc/self", "--set", "data.path=x.jsonl"])
    text = _plain(out.output)
    assert out.exit_code == 2 and text.startswith("error: cannot write /proc/") and "Traceback" not in text
    odd = tmp_path / "odd"
    (odd / "config.yaml").mkdir(parents=True)
    out = runner.invoke(app, ["prepare", "-r", str(odd)])
    text = _plain(out.output)
    assert out.exit_code == 2 and f"error: {odd / 'config.yaml'}: cannot be read as a YAML config" in text
