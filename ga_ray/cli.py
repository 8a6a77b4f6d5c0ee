"""The `ga-ray` command line: one command per stage, `run` for all of them, `demo` for the demo world."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ga_ray.config import RunConfig, load_config
from ga_ray.errors import ConfigError, GaRayError, StageError
from ga_ray.pipeline import STAGE_NAMES, run_pipeline
from ga_ray.rundir import RunDir

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help=(
        "ga-ray: find what a LoRA fine-tune taught a model (Gradient Atoms), on Ray.\n\n"
        "Stages, in order: prepare -> finetune -> factors -> gradients -> atoms -> coherence -> report.\n"
        "`ga-ray demo` builds the embedded demo world and runs them all; `ga-ray run CONFIG` runs them on your data.\n"
        "Each stage records itself in RUN_DIR/manifest.json; a re-run skips stages whose inputs are unchanged."
    ),
)

RunDirOpt = Annotated[Path, typer.Option("--run-dir", "-r", help="Run directory (config.yaml, manifest.json, one folder per stage).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a config value, e.g. --set dictionary.n_atoms=1000 (repeatable)."),
]
ForceOpt = Annotated[
    Optional[str], typer.Option("--force", help=f"Redo this stage and every one after it ({', '.join(STAGE_NAMES)}).")
]
AddressOpt = Annotated[
    Optional[str], typer.Option("--address", help="Join this Ray cluster (e.g. 'auto'); default: a local Ray started in-process.")
]
ConfigArg = Annotated[
    Optional[str],
    typer.Argument(help="YAML config file or packaged config name (demo, paper). Default: RUN_DIR/config.yaml if present."),
]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _user_error(exc: BaseException) -> str | None:
    """The actionable message inside an exception chain (Ray wraps errors raised in workers)."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, GaRayError):
            return str(cur)
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    text = str(exc)
    for marker in ("StageError: ", "ModelLoadError: "):
        if marker in text:
            return text.split(marker, 1)[1].strip().splitlines()[0]
    return None


def _load(config: str | None, run_dir: Path, sets: list[str] | None, address: str | None) -> RunConfig:
    if config is None and (run_dir / "config.yaml").exists():
        config = str(run_dir / "config.yaml")
    overrides = list(sets or [])
    if address:
        overrides.append(f"ray.address={address}")
    return load_config(config, overrides)


def _print_summary(stage: str, text: str) -> None:
    typer.secho(f"[{stage}] {text}", fg=typer.colors.GREEN if "done" in text else typer.colors.BLUE)


def _run(cfg: RunConfig, run_dir: Path, stages: list[str] | None, force: str | None) -> None:
    # our own INFO lines; other libraries only from WARNING (dask-ml logs every k-means iteration at INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ga_ray").setLevel(logging.INFO)
    try:
        run_pipeline(cfg, RunDir(run_dir), stages=stages, force=force, on_summary=_print_summary)
    except GaRayError as exc:
        _fail(str(exc))
    except Exception as exc:
        msg = _user_error(exc)
        if msg is None:
            raise
        _fail(msg)
    typer.echo(f"run directory: {run_dir}")


def _stage_command(name: str, help_text: str, always: bool = False) -> None:
    """Register a stage command; `always` stages (the report) rebuild on every call."""
    def command(
        config: ConfigArg = None,
        run_dir: RunDirOpt = Path("runs/run"),
        set_: SetOpt = None,
        force: Annotated[bool, typer.Option("--force", help="Redo this stage even if its inputs are unchanged.")] = False,
        address: AddressOpt = None,
    ) -> None:
        try:
            cfg = _load(config, run_dir, set_, address)
        except ConfigError as exc:
            _fail(str(exc))
        _run(cfg, run_dir, [name], name if (force or always) else None)

    command.__doc__ = help_text
    app.command(name, help=help_text)(command)


@app.command("prepare")
def prepare_cmd(
    config: ConfigArg = None,
    run_dir: RunDirOpt = Path("runs/run"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the stage even if its inputs are unchanged.")] = False,
    skip_bad_rows: Annotated[
        bool, typer.Option("--skip-bad-rows", help="Write bad rows to data/rejected.jsonl with their reason instead of stopping.")
    ] = False,
    address: AddressOpt = None,
) -> None:
    """Tokenise documents (JSONL, Parquet, or a datasets folder) into data/ with response-only loss masks."""
    try:
        cfg = _load(config, run_dir, (set_ or []) + (["data.skip_bad_rows=true"] if skip_bad_rows else []), address)
    except ConfigError as exc:
        _fail(str(exc))
    _run(cfg, run_dir, ["prepare"], "prepare" if force else None)


_stage_command("finetune", "LoRA fine-tune the base model on data/ with Ray Train (writes adapter/, a PEFT folder).")
_stage_command("factors", "EKFAC factors of every LoRA block with Ray Train (writes factors/).")
_stage_command("gradients", "Per-document projected gradients with a Ray Data actor pool (writes gradients/).")


@app.command("atoms")
def atoms_cmd(
    config: ConfigArg = None,
    run_dir: RunDirOpt = Path("runs/run"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the stage even if its inputs are unchanged.")] = False,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Fit this many seeds and report atom stability.")] = None,
    address: AddressOpt = None,
) -> None:
    """Sparse dictionary learning on the projected gradients (writes atoms/)."""
    extra = [f"dictionary.n_seeds={seeds}"] if seeds else []
    try:
        cfg = _load(config, run_dir, (set_ or []) + extra, address)
    except ConfigError as exc:
        _fail(str(exc))
    _run(cfg, run_dir, ["atoms"], "atoms" if force else None)


_stage_command("coherence", "Orient atoms, score coherence on raw gradients, characterise (writes coherence/atoms.parquet).")
_stage_command("report", "Build report/report.html and its figures from the run's artifacts.", always=True)


@app.command("groups")
def groups_cmd(
    config: ConfigArg = None,
    run_dir: RunDirOpt = Path("runs/run"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the stage even if its inputs are unchanged.")] = False,
    cut: Annotated[
        Optional[int], typer.Option("--cut", min=1, help="Cut the atom hierarchy into this many groups (default: the best silhouette).")
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Group atoms into behaviours without labels: hierarchical clustering (writes groups/)."""
    extra = [f"groups.cut={cut}"] if cut else []
    try:
        cfg = _load(config, run_dir, (set_ or []) + extra, address)
    except ConfigError as exc:
        _fail(str(exc))
    _run(cfg, run_dir, ["groups"], "groups" if force else None)


@app.command("run")
def run_cmd(
    config: Annotated[str, typer.Argument(help="YAML config file or packaged config name (demo, paper).")],
    run_dir: RunDirOpt = Path("runs/run"),
    set_: SetOpt = None,
    force: ForceOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run every stage in order; finished stages with unchanged inputs are skipped, a crashed run resumes."""
    try:
        cfg = _load(config, run_dir, set_, address)
    except ConfigError as exc:
        _fail(str(exc))
    _run(cfg, run_dir, None, force)


def demo_config(cfg: RunConfig) -> RunConfig:
    """Point the data, model and format-table paths at the demo world (built or reused from cache)."""
    from ga_ray.demo.world import build_demo_world

    world = build_demo_world(cfg.demo, progress=True)
    cfg = cfg.model_copy(deep=True)
    cfg.data.path = str(world.data)
    cfg.model.path = str(world.base_model)
    cfg.model.tokenizer = str(world.tokenizer)
    cfg.finetune.format_eval_set = str(world.eval_dir)
    return cfg


@app.command("demo")
def demo_cmd(
    run_dir: RunDirOpt = Path("runs/demo"),
    set_: SetOpt = None,
    force: ForceOpt = None,
    address: AddressOpt = None,
    config: Annotated[str, typer.Option("--config", help="Config to start from.")] = "demo",
) -> None:
    """Build the embedded demo world (cached) and run the whole pipeline on it."""
    try:
        cfg = load_config(config, list(set_ or []) + ([f"ray.address={address}"] if address else []))
    except ConfigError as exc:
        _fail(str(exc))
    try:
        cfg = demo_config(cfg)
    except (ConfigError, StageError) as exc:
        _fail(str(exc))
    _run(cfg, run_dir, None, force)


@app.command("sweep")
def sweep_cmd(
    alphas: Annotated[str, typer.Option("--alphas", help="Comma-separated L1 penalties, e.g. 0.01,0.1,1.0.")] = "0.01,0.1,1.0",
    run_dir: RunDirOpt = Path("runs/run"),
    config: ConfigArg = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """Sparsity sweep on stored gradients: docs per atom and coherent atoms per alpha (the paper's Table 1)."""
    try:
        cfg = _load(config, run_dir, set_, address)
        values = [float(a) for a in alphas.split(",") if a.strip()]
    except ConfigError as exc:
        _fail(str(exc))
    except ValueError:
        _fail(f"--alphas {alphas!r}: expected comma-separated numbers, e.g. 0.01,0.1,1.0")
    from ga_ray.coherence.sweep import run_sweep

    try:
        run_sweep(cfg, RunDir(run_dir), values)
        report_dir = RunDir(run_dir).stage_dir("report")
        if (report_dir / "report.html").exists():  # an existing report picks the sweep up at once
            from ga_ray.report.stage import build_report

            rc = cfg.report
            build_report(RunDir(run_dir).root, report_dir, top_atoms=rc.top_atoms, examples_per_atom=rc.examples_per_atom, excerpt_chars=rc.excerpt_chars, title=cfg.name)
    except (ConfigError, StageError) as exc:
        _fail(str(exc))


BENCHES = ("factors", "gradients", "dictionary")


@app.command("bench")
def bench_cmd(
    name: Annotated[str, typer.Argument(help=f"Benchmark: {', '.join(BENCHES)}.")],
    run_dir: Annotated[
        Optional[Path], typer.Option("--run-dir", "-r", help="Use this run's demo-world artifacts (default: synthetic inputs).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes, for a smoke test.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the figures as one JSON object on the last line.")] = False,
) -> None:
    """Measure one stage against its peer in the same run and print ratios."""
    if name not in BENCHES:
        _fail(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHES)}")
    import importlib

    module = importlib.import_module(f"ga_ray.bench.{name}")
    opts = {"run_dir": str(run_dir)} if run_dir else {}
    result = module.main(quick=quick, **opts)
    if as_json:
        print(json.dumps(result, default=float))


@app.command("validate-manifests")
def validate_manifests_cmd(
    files: Annotated[
        Optional[list[Path]], typer.Argument(help="Manifests to check (default: every cluster/*.yaml under the current folder).")
    ] = None,
) -> None:
    """Validate cluster manifests offline: Ray launcher YAML by Ray's schema, KubeRay RayJob/RayService by the CRD
    schemas (unknown keys are errors), Serve configs by Ray Serve's schema."""
    from ga_ray.manifests import validate_manifest

    paths = list(files or sorted(Path("cluster").glob("*.yaml")))
    if not paths:
        _fail("no manifests given and no cluster/*.yaml here; name the files to check")
    bad = 0
    for path in paths:
        problems = validate_manifest(path)
        bad += bool(problems)
        for p in problems:
            typer.secho(p, fg=typer.colors.RED, err=True)
        if not problems:
            typer.echo(f"{path}: valid")
    if bad:
        raise typer.Exit(1)


@app.command("config")
def config_cmd(
    config: ConfigArg = None,
    set_: SetOpt = None,
    fields: Annotated[bool, typer.Option("--fields", help="List every field with its type, default and meaning.")] = False,
) -> None:
    """Print the resolved configuration as YAML (or document every field with --fields)."""
    from ga_ray.config import dump_config

    if fields:
        _print_fields(RunConfig, "")
        return
    try:
        cfg = load_config(config, set_)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(dump_config(cfg))


def _print_fields(model: type, prefix: str) -> None:
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            typer.secho(f"{prefix}{name}: {field.description or ''}", bold=True)
            _print_fields(ann, f"{prefix}{name}.")
        else:
            typer.echo(f"  {prefix}{name} = {field.default!r}  -- {field.description or ''}")


def main() -> None:  # pragma: no cover - console entry
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
