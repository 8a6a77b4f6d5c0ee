"""Stage registry and the runner that skips, forces and resumes stages.

A stage is a function `run(ctx: StageContext) -> dict` that writes its artifacts under `ctx.out`
(with the atomic helpers of `ga_ray.rundir`) and returns a JSON-serialisable summary for the
manifest. The runner fingerprints each stage's inputs (its config sections, the fingerprints of the
upstream stages it reads, and the external files it reads); a stage whose fingerprint matches a
finished record is skipped, so a re-run after a crash resumes at the first unfinished stage.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel

from ga_ray.context import resolve_adapter  # noqa: F401  (one copy; the runner and LocalStageContext share it)
from ga_ray.errors import StageError
from ga_ray.config import RunConfig, dump_config, section_fingerprint_data
from ga_ray.rundir import RunDir, atomic_write_text, fingerprint_obj, fingerprint_path

log = logging.getLogger("ga_ray")


RUNTIME_SECTIONS = ("ray",)
"""Config every stage may read without fingerprinting it: where and how to run (the Ray to join, its CPUs,
timeouts), never what is computed."""


class _Declared:
    """A read-only view of one config object that lets a stage read only what its Stage entry declares.

    `allowed` maps an attribute to None (readable whole) or to the set of its fields the stage declared
    (e.g. prepare declares `model.path`, not all of `model`). Anything else is a StageError that names
    the stage and the attribute, so that a stage can never depend on a value its fingerprint misses.
    """

    __slots__ = ("_obj", "_stage", "_prefix", "_allowed")

    def __init__(self, obj: Any, stage: str, prefix: str, allowed: dict[str, frozenset[str] | None]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_allowed", allowed)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        allowed = object.__getattribute__(self, "_allowed")
        stage, prefix = object.__getattribute__(self, "_stage"), object.__getattribute__(self, "_prefix")
        if name not in allowed:
            dotted = f"{prefix}{name}"
            raise StageError(
                f"stage {stage!r} read the config value {dotted!r}, which its Stage entry in ga_ray/pipeline.py does not "
                f"declare: add {dotted!r} to its config_sections (a top-level value such as the seed: to its globals), so "
                "that a change to it re-runs the stage"
            )
        value = getattr(object.__getattribute__(self, "_obj"), name)
        fields = allowed[name]
        if fields is None:
            return value
        return _Declared(value, stage, f"{prefix}{name}.", {f: None for f in fields})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the config a stage sees is read-only (tried to set {name!r})")

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles what a stage hands to its workers
        return (_Declared, tuple(object.__getattribute__(self, k) for k in _Declared.__slots__))

    def __repr__(self) -> str:
        allowed = object.__getattribute__(self, "_allowed")
        return f"<config of stage {object.__getattribute__(self, '_stage')!r}: {', '.join(sorted(allowed))}>"

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The declared part as a RunConfig dump (undeclared values at their defaults), for handing to a worker or a
        service that validates a RunConfig: nothing the stage did not declare leaks through."""
        obj = object.__getattribute__(self, "_obj")
        full = obj.model_dump(**kwargs)
        default = type(obj)().model_dump(**kwargs) if isinstance(obj, BaseModel) else {}
        out = dict(default)
        for name, fields in object.__getattribute__(self, "_allowed").items():
            if fields is None:
                out[name] = full[name]
            else:
                out[name] = {**default[name], **{f: full[name][f] for f in fields}}
        return out


def declared_view(cfg: RunConfig, stage: "Stage") -> RunConfig:
    """What `stage` may read of `cfg`: its config sections (whole, or `section.field`), its globals and the runtime
    sections. Typed as a RunConfig for the stage's code; at run time any other read is a StageError."""
    allowed: dict[str, set[str] | None] = {name: None for name in (*RUNTIME_SECTIONS, *stage.globals)}
    for item in stage.config_sections:
        section, _, fld = item.partition(".")
        if not fld:
            allowed[section] = None
        elif allowed.get(section, set()) is not None:
            allowed.setdefault(section, set()).add(fld)  # type: ignore[union-attr]
    frozen = {k: (None if v is None else frozenset(v)) for k, v in allowed.items()}
    return cast(RunConfig, _Declared(cfg, stage.name, "", frozen))


@dataclass
class StageContext:
    """What a stage gets: the config it declared (a view; see `declared_view`), the run directory, its output folder.

    Constructed with the full RunConfig; when `stage` names a Stage (in `declared`, else in STAGES), `cfg` is
    replaced by that stage's view and `adapter_path()` answers only if the stage declares `adapter=True`.
    """

    cfg: RunConfig
    run_dir: RunDir
    stage: str
    out: Path
    declared: "Stage | None" = None
    _adapter: Path | None = field(default=None, init=False, repr=False)
    _reads_adapter: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        entry = self.declared or next((s for s in STAGES if s.name == self.stage), None)
        if entry is None or isinstance(self.cfg, _Declared):  # an ad-hoc context: the whole config
            if not isinstance(self.cfg, _Declared):
                self._adapter = resolve_adapter(self.cfg, self.run_dir)
            return
        self._reads_adapter = entry.adapter
        self._adapter = resolve_adapter(self.cfg, self.run_dir) if entry.adapter else None
        self.cfg = declared_view(self.cfg, entry)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir.stage_dir(stage)

    @property
    def data_dir(self) -> Path:
        return self.run_dir.stage_dir("data")

    def adapter_path(self) -> Path:
        """The adapter under analysis: the run's own fine-tune, or the one `model.adapter` names."""
        if not self._reads_adapter:
            raise StageError(f"stage {self.stage!r} asked for the adapter without declaring it: set adapter=True in its Stage entry")
        if self._adapter is None:
            raise StageError("no adapter: set model.adapter to a PEFT adapter folder, or enable the finetune stage")
        return self._adapter


@dataclass(frozen=True)
class Stage:
    name: str
    target: str | Callable[[StageContext], dict[str, Any]]  # "module:function", or the function itself
    out_dir: str  # folder inside the run directory
    config_sections: tuple[str, ...]
    """Config the stage reads and fingerprints: whole sections (`model`) or single fields (`model.path`)."""
    upstream: tuple[str, ...] = ()
    external: Callable[[RunConfig], list[str | None]] = field(default=lambda cfg: [])
    enabled: Callable[[RunConfig], bool] = field(default=lambda cfg: True)
    globals: tuple[str, ...] = ()
    """Top-level config values the stage reads and fingerprints (e.g. `seed`, `name`)."""
    adapter: bool = False
    """The stage reads the adapter under analysis (`ctx.adapter_path()`): the run's `adapter/` when finetune is
    enabled (then finetune is an upstream stage), else `model.adapter` (fingerprinted as an external folder)."""

    def load(self) -> Callable[[StageContext], dict[str, Any]]:
        if callable(self.target):
            return self.target
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "ga_ray.data.stage:run_prepare",
        "data",
        ("data", "model.path", "model.tokenizer", "model.trust_remote_code"),
        external=lambda c: [c.data.path, c.model.tokenizer or c.model.path],
    ),
    Stage(
        "finetune",
        "ga_ray.finetune.stage:run_finetune",
        "adapter",
        ("model", "finetune"),
        upstream=("prepare",),
        external=lambda c: [c.model.path, c.finetune.format_eval_set],
        enabled=lambda c: c.finetune.enabled,
    ),
    Stage(
        "factors",
        "ga_ray.factors.stage:run_factors",
        "factors",
        ("model", "factors"),
        upstream=("prepare", "finetune"),
        external=lambda c: [c.model.path, None if c.finetune.enabled else c.model.adapter],
        adapter=True,
    ),
    Stage(
        "gradients",
        "ga_ray.gradients.stage:run_gradients",
        "gradients",
        ("model", "gradients"),
        upstream=("prepare", "finetune", "factors"),
        external=lambda c: [c.model.path, None if c.finetune.enabled else c.model.adapter],
        adapter=True,
    ),
    Stage(
        "atoms",
        "ga_ray.atoms.stage:run_atoms",
        "atoms",
        ("dictionary",),
        upstream=("gradients",),
    ),
    Stage(
        "coherence",
        "ga_ray.coherence.stage:run_coherence",
        "coherence",
        ("model", "coherence"),
        upstream=("prepare", "finetune", "atoms"),
        external=lambda c: [c.model.path, None if c.finetune.enabled else c.model.adapter],
        globals=("seed",),  # the background sample of the characteristic words
        adapter=True,
    ),
    Stage(
        "groups",
        "ga_ray.groups.stage:run_groups",
        "groups",
        ("model", "coherence", "groups"),
        upstream=("prepare", "finetune", "gradients", "atoms", "coherence"),
        external=lambda c: [c.model.path, None if c.finetune.enabled else c.model.adapter],
        enabled=lambda c: c.groups.enabled,
        globals=("seed",),
        adapter=True,
    ),
    Stage(
        "steer",
        "ga_ray.steer.stage:run_steer",
        "variants",
        ("model", "steer", "detectors"),
        upstream=("prepare", "finetune", "factors", "gradients", "atoms", "coherence", "groups"),
        external=lambda c: [c.model.path, c.model.tokenizer, None if c.finetune.enabled else c.model.adapter],
        adapter=True,
    ),
    Stage(
        "evaluate",
        "ga_ray.evaluate.stage:run_evaluate",
        "eval",
        # the serve app it starts finds the adapter from finetune.enabled / model.adapter; steer: the controls it adds
        ("model", "serve", "evaluation", "detectors", "steer", "finetune.enabled", "finetune.format_eval_set", "demo.seed"),
        upstream=("prepare", "finetune", "steer"),
        external=lambda c: [c.model.path, c.evaluation.prompts, c.finetune.format_eval_set],
        adapter=True,
    ),
    Stage(
        "report",
        "ga_ray.report.stage:run_report",
        "report",
        ("report",),
        upstream=("prepare", "finetune", "factors", "gradients", "atoms", "coherence", "groups", "steer", "evaluate"),
        globals=("name",),
    ),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str, registry: tuple[Stage, ...] = STAGES) -> Stage:
    for s in registry:
        if s.name == name:
            return s
    raise StageError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")


def available_stages(registry: tuple[Stage, ...] = STAGES) -> list[Stage]:
    """Stages whose module is present in this build (later issues add more)."""
    out = []
    for s in registry:
        if callable(s.target) or importlib.util.find_spec(s.target.split(":")[0]) is not None:
            out.append(s)
    return out


def _fingerprint(stage: Stage, cfg: RunConfig, run_dir: RunDir, registry: tuple[Stage, ...]) -> tuple[str, dict[str, Any]]:
    manifest = run_dir.read_manifest()["stages"]
    upstream = {}
    for u in stage.upstream:
        rec = manifest.get(u)
        if rec is None and not get_stage(u, registry).enabled(cfg):
            continue
        # the finish time too: a forced re-run of an upstream stage invalidates what reads it
        upstream[u] = f"{rec.get('fingerprint')}@{rec.get('finished_at')}" if rec else None
    external = {p: fingerprint_path(Path(p)) for p in stage.external(cfg) if p}
    inputs: dict[str, Any] = {"config": section_fingerprint_data(cfg, *stage.config_sections), "upstream": upstream, "files": external}
    if stage.globals:  # only when declared, so that the other stages keep their fingerprints
        inputs["globals"] = {g: getattr(cfg, g) for g in stage.globals}
    return fingerprint_obj(inputs), {"upstream": upstream, "files": external}


def check_upstream_done(stage: Stage, cfg: RunConfig, run_dir: RunDir, registry: tuple[Stage, ...], available: set[str]) -> None:
    """Refuse to run `stage` unless every upstream stage it reads finished (`done`) with the inputs it recorded.

    A failed, interrupted (`running`) or stale upstream stage may have left the previous run's outputs in its
    folder: reading them as current would compute on stale data, with exit code 0.
    """
    stages = run_dir.read_manifest()["stages"]
    for name in stage.upstream:
        up = get_stage(name, registry)
        if name not in available or not up.enabled(cfg):
            continue
        rec = stages.get(name)
        status = rec.get("status") if rec else None
        if status == "done":
            continue
        what = {
            None: "has not run in this run directory",
            "failed": "failed in its last run",
            "running": "did not finish (it is running, or was interrupted)",
            "stale": "is out of date",
        }.get(status, f"is {status}")
        raise StageError(
            f"{stage.name} reads the output of {name}, which {what}: its {up.out_dir}/ is not current. "
            f"Re-run it first: ga-ray {name} --run-dir {run_dir.root} (or ga-ray run, which runs every stage in order)"
        )


def _check_cluster_storage(cfg: RunConfig, run_dir: RunDir) -> None:
    """On a cluster, stop at once unless every node sees the run directory (stages read each other's files)."""
    from ga_ray.raycluster import init_ray
    from ga_ray.storage import check_shared_storage

    init_ray(cfg.ray)
    views = check_shared_storage(run_dir.root)
    if views:
        log.info("run directory %s is visible from all %d nodes", run_dir.root, len(views))


def run_pipeline(
    cfg: RunConfig,
    run_dir: RunDir,
    stages: list[str] | None = None,
    force: str | None = None,
    on_summary: Callable[[str, str], None] | None = None,
    registry: tuple[Stage, ...] = STAGES,
    saved_config: RunConfig | None = None,
) -> dict[str, Any]:
    """Run the named stages (default: all available) in order; returns {stage: summary}.

    `saved_config` is what RUN_DIR/config.yaml records (default: `cfg`); the CLI passes the config without its
    one-run flags (`prepare --skip-bad-rows`), so a later run does not inherit them.
    """
    atomic_write_text(run_dir.root / "config.yaml", dump_config(saved_config or cfg))
    available = available_stages(registry)
    if force is not None and force not in {s.name for s in registry}:
        raise StageError(f"--force {force!r}: unknown stage; stages are: {', '.join(s.name for s in registry)}")
    if stages:
        missing = [n for n in stages if n not in {s.name for s in available}]
        if missing:
            raise StageError(f"stage(s) {', '.join(missing)} not available; available: {', '.join(s.name for s in available)}")
    chosen = [s for s in available if s.enabled(cfg) and (stages is None or s.name in stages)]
    if cfg.ray.address and chosen:
        _check_cluster_storage(cfg, run_dir)
    forcing = False
    results: dict[str, Any] = {}
    for stage in chosen:
        if force is not None and stage.name == force:
            forcing = True
        fp, inputs = _fingerprint(stage, cfg, run_dir, registry)
        # a done record counts only while its folder is there (a run made before a stage's folder moved, e.g.
        # coherence/ out of atoms/, or a folder deleted by hand, runs that stage again)
        if not forcing and run_dir.is_done(stage.name, fp) and run_dir.stage_dir(stage.out_dir).is_dir():
            rec = run_dir.stage_record(stage.name) or {}
            results[stage.name] = rec.get("summary", {})
            if on_summary:
                on_summary(stage.name, "skipped (inputs unchanged)")
            continue
        check_upstream_done(stage, cfg, run_dir, registry, {s.name for s in available})
        fn = stage.load()
        out = run_dir.stage_dir(stage.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = run_dir.mark_running(stage.name, fp, inputs)
        ctx = StageContext(cfg=cfg, run_dir=run_dir, stage=stage.name, out=out, declared=stage)
        try:
            summary = fn(ctx) or {}
        except BaseException as exc:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            run_dir.mark_failed(stage.name, t0, detail)
            raise
        run_dir.mark_done(stage.name, t0, summary)
        results[stage.name] = summary
        if on_summary:
            rec = run_dir.stage_record(stage.name) or {}
            on_summary(stage.name, f"done in {rec.get('wall_time_s', 0):.1f}s: {summary.get('line', '')}")
    return results

