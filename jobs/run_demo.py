"""`ray job submit` entrypoint for the demo world: `python jobs/run_demo.py --run-dir /shared/runs/demo`."""

from __future__ import annotations

import sys

from ga_ray.cli import app

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    app(["demo", *args], standalone_mode=True)
