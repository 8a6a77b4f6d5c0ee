"""The command line: help lists the stages, user errors are one clear line and exit code 2."""

from __future__ import annotations

import re

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
