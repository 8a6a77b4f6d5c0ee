"""What a stage function receives, defined below the stages so that they never import the runner.

`StageContext` is the interface (a Protocol) every `run_X(ctx)` is written against. The runner
(`ga_ray.pipeline.StageContext`) implements it with the stage's declared view of the config.
`LocalStageContext` implements it with the whole config, for running a stage function outside the
runner on a folder of one's own choosing: the sparsity sweep refits dictionaries into scratch folders,
the benchmarks run one stage on a scratch run directory. Neither records anything in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ga_ray.config import RunConfig
from ga_ray.errors import StageError
from ga_ray.rundir import RunDir


class StageContext(Protocol):
    """A stage's view of the run: its config, the run directory, the folder it writes (`out`)."""

    cfg: RunConfig
    run_dir: RunDir
    stage: str
    out: Path

    def stage_dir(self, stage: str) -> Path:
        """The folder of another stage (by its folder name, e.g. "atoms", "data")."""
        ...

    @property
    def data_dir(self) -> Path:
        """The prepare stage's `data/` folder."""
        ...

    def adapter_path(self) -> Path:
        """The adapter under analysis."""
        ...


def resolve_adapter(cfg: RunConfig, run_dir: RunDir) -> Path | None:
    """The adapter under analysis: the run's own fine-tune (`adapter/`), or the one `model.adapter` names."""
    if cfg.finetune.enabled:
        return run_dir.stage_dir("adapter")
    return Path(cfg.model.adapter) if cfg.model.adapter else None


@dataclass
class LocalStageContext:
    """A `StageContext` over the whole config, for a stage function run outside the runner (no manifest record)."""

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
        adapter = resolve_adapter(self.cfg, self.run_dir)
        if adapter is None:
            raise StageError("no adapter: set model.adapter to a PEFT adapter folder, or enable the finetune stage")
        return adapter
