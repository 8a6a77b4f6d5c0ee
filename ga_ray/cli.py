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
    Optional[str], typer.Option("--address", help="Join this Ray cluster (e.g. 'auto'); default: a local Ray started in-process, even when a `ray start` cluster runs here.")
]
ConfigArg = Annotated[
    Optional[str],
    typer.Argument(help="YAML config file or packaged config name (demo, paper). Default: RUN_DIR/config.yaml if present."),
]


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _user_error(exc: BaseException) -> str | None:
    """The message of the first `GaRayError` in an exception's chain, or None (a bug: keep the traceback).

    Ray wraps an error raised in a worker: a task's `RayTaskError` keeps it as `.cause` (and may itself
    subclass the error's type, with the worker's traceback as its text); the rest chain through
    `__cause__` / `__context__`. Types only: the text of a message is never matched.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        cause = getattr(cur, "cause", None)
        if isinstance(cause, BaseException) and cause is not cur:
            todo.insert(0, cause)  # the worker's own exception, not Ray's wrapper text
            continue
        if isinstance(cur, GaRayError):
            return str(cur)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return None


VERBOSE = {"on": os.environ.get("GA_RAY_VERBOSE") == "1"}
"""`ga-ray --verbose ...` (or GA_RAY_VERBOSE=1): Ray's own logs, progress bars, warnings and worker output on the terminal too."""

LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air")
_HANDLER_TAG = "_ga_ray_handler"


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also show Ray's own logs and progress bars, warnings and the workers' output (always kept in RUN_DIR/logs/)."),
    ] = False,
) -> None:
    VERBOSE["on"] = verbose or os.environ.get("GA_RAY_VERBOSE") == "1"


class _StderrHandler(logging.StreamHandler):
    """A terminal handler that writes to whatever `sys.stderr` is now (a test runner swaps it per command)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging(run_dir: Path, verbose: bool) -> Path:
    """Everything (all loggers from INFO, warnings) into RUN_DIR/logs/ga-ray.log; on the terminal only our own lines
    and errors, unless `verbose`. Returns the log file."""
    from ga_ray.raycluster import DETAIL_LOGGER, configure_output

    from ga_ray.rundir import cannot_write

    log_dir = Path(run_dir) / "logs"
    log_file = log_dir / "ga-ray.log"
    try:  # an unwritable run directory is one line (StageError), not a traceback
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
    except OSError as exc:
        raise cannot_write(log_file, exc) from None
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:  # a previous command in this process
        root.removeHandler(h)
        h.close()
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = _StderrHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    if not verbose:
        console.addFilter(
            lambda r: r.levelno >= logging.ERROR or ((r.name == "ga_ray" or r.name.startswith("ga_ray.")) and not r.name.startswith(DETAIL_LOGGER))
        )
    for h in (file_handler, console):
        setattr(h, _HANDLER_TAG, True)
        root.addHandler(h)
    root.setLevel(logging.INFO)
    logging.getLogger("ga_ray").setLevel(logging.INFO)
    logging.captureWarnings(False)  # reset first: once something else restored warnings.showwarning, True alone is a no-op
    logging.captureWarnings(True)  # deprecation and future warnings: into the log file (the console filter drops them)
    if not verbose:
        # transformers' and huggingface_hub's own bars ("Loading weights", "Writing model shards"); read at their import,
        # and inherited by the local Ray's workers
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # already imported (e.g. by the demo world): switch its bars off directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    quiet_library_loggers(verbose, file_handler)
    configure_output(verbose, log_dir)
    return log_file


class _OnlyToLogFile(logging.Filter):
    """A logger filter: the record goes to the log file, and to the logger's own (terminal) handlers only if it is an error.

    On the logger itself, so it holds also for handlers a library adds later (Ray Serve adds its terminal handler
    when `ray.serve` is first imported, inside a stage)."""

    def __init__(self, file_handler: logging.Handler | None):
        super().__init__()
        self.file_handler = file_handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True  # errors: the logger's handlers (or the root's, with the log file) as usual
        if self.file_handler is not None and record.levelno >= self.file_handler.level:
            self.file_handler.handle(record)
        return False


def quiet_library_loggers(verbose: bool, file_handler: logging.Handler | None = None) -> None:
    """Ray's loggers have their own terminal handlers and do not propagate: send them to the log file instead."""
    import ray  # noqa: F401  (configures Ray's loggers)
    import ray.data  # noqa: F401

    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for f in [f for f in lg.filters if isinstance(f, _OnlyToLogFile)]:
            lg.removeFilter(f)
        if not verbose and name != "ray":  # (the `ray` logger's own records: through its handlers below)
            lg.addFilter(_OnlyToLogFile(file_handler))
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and not getattr(h, _HANDLER_TAG, False):
                h.setLevel(logging.INFO if verbose else logging.ERROR)
        if file_handler is not None and not lg.propagate and file_handler not in lg.handlers:
            for old in [h for h in lg.handlers if getattr(h, _HANDLER_TAG, False)]:
                lg.removeHandler(old)
            lg.addHandler(file_handler)


def _load(config: str | None, run_dir: Path, sets: list[str] | None, address: str | None) -> RunConfig:
    if config is None and (run_dir / "config.yaml").exists():
        config = str(run_dir / "config.yaml")
    overrides = list(sets or [])
    if address:
        overrides.append(f"ray.address={address}")
    return load_config(config, overrides)


def _print_summary(stage: str, text: str) -> None:
    typer.secho(f"[{stage}] {text}", fg=typer.colors.GREEN if "done" in text else typer.colors.BLUE)


def _run(cfg: RunConfig, run_dir: Path, stages: list[str] | None, force: str | None, saved: RunConfig | None = None) -> None:
    from ga_ray.raycluster import OUTPUT

    output = dict(vars(OUTPUT))
    try:
        rd = RunDir(run_dir)
        setup_logging(rd.root, VERBOSE["on"])
        run_pipeline(cfg, rd, stages=stages, force=force, on_summary=_print_summary, saved_config=saved)
    except Exception as exc:
        msg = _user_error(exc)
        if msg is None:
            raise
        _fail(msg)
    finally:
        vars(OUTPUT).update(output)  # per command (a test runner runs several commands in one process)
    typer.echo(f"run directory: {run_dir} (logs in {Path(run_dir) / 'logs'}; `ga-ray status {run_dir}` for the table)")


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
        Optional[bool],
        typer.Option(
            "--skip-bad-rows/--no-skip-bad-rows",
            help="This run only: write bad rows to data/rejected.jsonl with their reason instead of stopping (or not). "
            "RUN_DIR/config.yaml keeps data.skip_bad_rows as the config says (set it there, or with --set, to keep it).",
        ),
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Tokenise documents (JSONL, Parquet, or a datasets folder) into data/ with response-only loss masks."""
    try:
        cfg = _load(config, run_dir, set_, address)
    except ConfigError as exc:
        _fail(str(exc))
    run_cfg = cfg
    if skip_bad_rows is not None and skip_bad_rows != cfg.data.skip_bad_rows:
        # a one-run flag: this run uses it, the saved config.yaml does not record it
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.data.skip_bad_rows = skip_bad_rows
        typer.echo(
            f"--{'' if skip_bad_rows else 'no-'}skip-bad-rows: this run only "
            f"(RUN_DIR/config.yaml keeps data.skip_bad_rows: {str(cfg.data.skip_bad_rows).lower()})"
        )
    _run(run_cfg, run_dir, ["prepare"], "prepare" if force else None, saved=cfg)


_stage_command("finetune", "LoRA fine-tune the base model on data/ with Ray Train (writes adapter/, a PEFT folder). "
               "One CPU worker on at most finetune.in_driver_max_docs documents trains in the driver instead: the same adapter.")
_stage_command("factors", "EKFAC factors of every LoRA block with Ray Train (writes factors/). "
               "One CPU worker on at most factors.in_driver_max_docs documents computes in the driver instead.")
_stage_command("gradients", "Per-document projected gradients with a Ray Data actor pool (writes gradients/). "
               "One CPU worker on at most gradients.in_driver_max_docs documents computes in the driver instead.")


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


@app.command("steer")
def steer_cmd(
    config: ConfigArg = None,
    run_dir: RunDirOpt = Path("runs/run"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the stage even if its inputs are unchanged.")] = False,
    mode: Annotated[Optional[str], typer.Option("--mode", help="paper, linear or both (steer.mode).")] = None,
    units: Annotated[Optional[str], typer.Option("--units", help="absolute or relative (steer.units).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Also write a merged full-model folder per variant.")] = False,
    address: AddressOpt = None,
) -> None:
    """Steered PEFT adapters along atoms chosen by behaviour, by id, groups, compositions, plus controls (writes variants/)."""
    extra = ([f"steer.mode={mode}"] if mode else []) + ([f"steer.units={units}"] if units else []) + (["steer.merge=true"] if merge else [])
    try:
        cfg = _load(config, run_dir, (set_ or []) + extra, address)
    except ConfigError as exc:
        _fail(str(exc))
    _run(cfg, run_dir, ["steer"], "steer" if force else None)


_stage_command("evaluate", "Every variant's answers to its behaviour's prompts through an OpenAI-compatible endpoint (the "
               "run's own serve app, or evaluation.endpoint): rates, intervals, tests, side effects (writes eval/).")
_stage_command("report", "Build report/report.html and its figures from the run's artifacts.", always=True)


@app.command("groups")
def groups_cmd(
    config: ConfigArg = None,
    run_dir: RunDirOpt = Path("runs/run"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the stage even if its inputs are unchanged.")] = False,
    cut: Annotated[
        Optional[int], typer.Option("--cut", min=1, help="Cut the atom hierarchy into this many groups (default: the cut of largest modularity, groups.criterion).")
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


@app.command("serve")
def serve_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory whose variants/ to serve (plus `finetuned` and `base`).")],
    config: Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config (default: RUN_DIR/config.yaml).")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Bind address (default serve.host = 127.0.0.1; 0.0.0.0 warns).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="HTTP port (default serve.port; 0 picks a free one).")] = None,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' (default: the serve.api_key_env variable).")
    ] = None,
    set_: SetOpt = None,
    address: AddressOpt = None,
) -> None:
    """OpenAI-compatible endpoints for every variant on Ray Serve, until Ctrl-C (new variant folders appear live)."""
    import time as _time

    from ga_ray.serve.launch import public_bind_warning, start_local

    try:
        cfg = _load(config, run_dir, set_, address)
    except ConfigError as exc:
        _fail(str(exc))
    warning = public_bind_warning(host or cfg.serve.host)
    if warning:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    try:
        handle = start_local(run_dir, cfg, port=port, host=host, api_key=api_key)
    except GaRayError as exc:
        _fail(str(exc))
    try:
        typer.secho(f"[serve] {handle.url}  ({len(handle.model_ids)} models; Ctrl-C stops)", fg=typer.colors.GREEN)
        for mid in handle.model_ids:
            typer.echo(f"  {mid}")
        while True:
            _time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("[serve] stopping")
    finally:
        handle.shutdown()


BENCHES = ("factors", "gradients", "dictionary", "serve", "gpu")


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


def status_rows(manifest: dict) -> list[tuple[str, str, str, str]]:
    """(stage, status, wall time, summary line) per recorded stage, in pipeline order (then any other record)."""
    stages = manifest.get("stages", {})
    order = [n for n in STAGE_NAMES if n in stages] + [n for n in stages if n not in STAGE_NAMES]
    rows = []
    for name in order:
        rec = stages[name] or {}
        wall = rec.get("wall_time_s")
        wall_s = "" if wall is None else (f"{wall:.1f}s" if wall < 120 else f"{wall / 60:.1f}min")
        status = rec.get("status", "?")
        summary = rec.get("summary") or {}
        line = (rec.get("error") or "") if status == "failed" else (summary.get("line", "") if isinstance(summary, dict) else "")
        rows.append((name, status, wall_s, " ".join(str(line).split())))
    return rows


@app.command("status")
def status_cmd(run_dir: Annotated[Path, typer.Argument(help="Run directory.")]) -> None:
    """Print the run's manifest as a table: stage, status, wall time, summary line."""
    if not (run_dir / "manifest.json").is_file():
        _fail(f"{run_dir} has no manifest.json: not a run directory (or no stage has run in it yet)")
    try:
        manifest = RunDir(run_dir).read_manifest()
    except Exception as exc:
        msg = _user_error(exc)
        if msg is None:
            raise
        _fail(msg)
    rows = status_rows(manifest)
    header = ("stage", "status", "wall", "summary")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    colours = {"done": typer.colors.GREEN, "failed": typer.colors.RED, "running": typer.colors.YELLOW}
    typer.echo("  ".join(h.ljust(w) for h, w in zip(header[:3], widths)) + "  " + header[3])
    for r in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(r[:3], widths))
        typer.secho(f"{cells}  {r[3]}", fg=colours.get(r[1]))


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
