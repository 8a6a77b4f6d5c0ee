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
from typing import Any

from ga_ray.errors import StageError
from ga_ray.config import RunConfig, dump_config, section_fingerprint_data
from ga_ray.rundir import RunDir, atomic_write_text, fingerprint_obj, fingerprint_path

log = logging.getLogger("ga_ray")


@dataclass
class StageContext:
    cfg: RunConfig
    run_dir: RunDir
    stage: str
    out: Path

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir.stage_dir(stage)

    @property
    def data_dir(self) -> Path:
        return self.run_dir.stage_dir("data")

    def adapter_path(self) -> Path:
        """The adapter under analysis: the run's own fine-tune, or the one the config names."""
        if self.cfg.finetune.enabled:
            return self.run_dir.stage_dir("adapter")
        if not self.cfg.model.adapter:
            raise StageError("no adapter: set model.adapter to a PEFT adapter folder, or enable the finetune stage")
        return Path(self.cfg.model.adapter)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str | Callable[[StageContext], dict[str, Any]]  # "module:function", or the function itself
    out_dir: str  # folder inside the run directory
    config_sections: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    external: Callable[[RunConfig], list[str | None]] = field(default=lambda cfg: [])
    enabled: Callable[[RunConfig], bool] = field(default=lambda cfg: True)

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
        ("data",),
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
    ),
    Stage(
        "gradients",
        "ga_ray.gradients.stage:run_gradients",
        "gradients",
        ("model", "gradients"),
        upstream=("prepare", "finetune", "factors"),
        external=lambda c: [c.model.path, None if c.finetune.enabled else c.model.adapter],
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
    ),
    Stage(
        "groups",
        "ga_ray.groups.stage:run_groups",
        "groups",
        ("model", "coherence", "groups"),
        upstream=("prepare", "finetune", "gradients", "atoms", "coherence"),
        external=lambda c: [c.model.path, None if c.finetune.enabled else c.model.adapter],
        enabled=lambda c: c.groups.enabled,
    ),
    Stage(
        "steer",
        "ga_ray.steer.stage:run_steer",
        "variants",
        ("model", "steer", "detectors"),
        upstream=("prepare", "finetune", "factors", "gradients", "atoms", "coherence", "groups"),
        external=lambda c: [c.model.path, c.model.tokenizer, None if c.finetune.enabled else c.model.adapter],
    ),
    Stage(
        "evaluate",
        "ga_ray.evaluate.stage:run_evaluate",
        "eval",
        ("model", "serve", "evaluation", "detectors"),
        upstream=("prepare", "finetune", "steer"),
        external=lambda c: [c.model.path, c.evaluation.prompts, c.finetune.format_eval_set],
    ),
    Stage(
        "report",
        "ga_ray.report.stage:run_report",
        "report",
        ("report",),
        upstream=("prepare", "finetune", "factors", "gradients", "atoms", "coherence", "groups", "steer", "evaluate"),
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
    inputs = {"config": section_fingerprint_data(cfg, *stage.config_sections), "upstream": upstream, "files": external}
    return fingerprint_obj(inputs), {"upstream": upstream, "files": external}


def run_pipeline(
    cfg: RunConfig,
    run_dir: RunDir,
    stages: list[str] | None = None,
    force: str | None = None,
    on_summary: Callable[[str, str], None] | None = None,
    registry: tuple[Stage, ...] = STAGES,
) -> dict[str, Any]:
    """Run the named stages (default: all available) in order; returns {stage: summary}."""
    atomic_write_text(run_dir.root / "config.yaml", dump_config(cfg))
    available = available_stages(registry)
    if force is not None and force not in {s.name for s in registry}:
        raise StageError(f"--force {force!r}: unknown stage; stages are: {', '.join(s.name for s in registry)}")
    if stages:
        missing = [n for n in stages if n not in {s.name for s in available}]
        if missing:
            raise StageError(f"stage(s) {', '.join(missing)} not available; available: {', '.join(s.name for s in available)}")
    chosen = [s for s in available if s.enabled(cfg) and (stages is None or s.name in stages)]
    forcing = False
    results: dict[str, Any] = {}
    for stage in chosen:
        if force is not None and stage.name == force:
            forcing = True
        fp, inputs = _fingerprint(stage, cfg, run_dir, registry)
        if not forcing and run_dir.is_done(stage.name, fp):
            rec = run_dir.stage_record(stage.name) or {}
            results[stage.name] = rec.get("summary", {})
            if on_summary:
                on_summary(stage.name, "skipped (inputs unchanged)")
            continue
        fn = stage.load()
        out = run_dir.stage_dir(stage.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        t0 = run_dir.mark_running(stage.name, fp, inputs)
        ctx = StageContext(cfg=cfg, run_dir=run_dir, stage=stage.name, out=out)
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

