"""`ray job submit` entrypoint: run the whole pipeline (or some stages) on the cluster it is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run_pipeline.py paper --run-dir /shared/runs/exp1 --set model.path=/shared/models/gemma

Thin on purpose: it joins the cluster (`ray.address=auto`) and calls the package's CLI.
"""

from __future__ import annotations

import sys

from ga_ray.cli import app

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        sys.exit("usage: python jobs/run_pipeline.py CONFIG [--run-dir DIR] [--set key=value ...] [--stage NAME]")
    stage = "run"
    if "--stage" in args:
        i = args.index("--stage")
        stage = args[i + 1]
        del args[i : i + 2]
    if "--address" not in args:
        args += ["--address", "auto"]
    app([stage, *args], standalone_mode=True)
