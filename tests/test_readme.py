"""The README opens with the install-and-demo command and the test command; CI runs exactly the latter."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_readme_starts_with_install_demo_then_tests():
    cmds = _readme_commands()
    assert "pip install torch==2.13.0" in cmds[0] and cmds[0].endswith("ga-ray demo")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_cmd = _readme_commands()[1]
    assert ci[-1].strip() == test_cmd, "the last line of .ci/run must be the README's test command"
    install = _readme_commands()[0].split(" && ")
    for step in install[1:-1]:  # the pip steps, without the venv creation and the demo
        assert step in "\n".join(ci), f"CI does not install like the README: {step}"
