"""Sparsity sweep (the paper's Table 1): for each α, refit the dictionary on the STORED projected
gradients, then count documents per atom and coherent atoms.

`ga-ray sweep --alphas 0.01,0.1,1.0` calls `run_sweep(cfg, RunDir(run_dir), alphas)`. For each α the
atoms stage's own entry point (`ga_ray.atoms.stage:run_atoms`, with `dictionary.alpha = α`,
no k-means, one seed) writes a full atoms folder to `report/sweep/alpha_<α>/` (the run's own
`atoms/` is never touched); the atoms are oriented and ranked as in the coherence stage, and the
coherence of every α's atoms is computed in ONE pass of the coherence actor pool (the model is loaded
once per actor, only the union of top documents is recomputed). Results: `report/sweep.csv` and
`report/sweep.json`, which the report shows (`ga-ray sweep` rebuilds an existing report at once).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ga_ray.coherence.stage import coherence_counts, compute_coherence, orient_and_rank
from ga_ray.context import LocalStageContext
from ga_ray.errors import StageError
from ga_ray.coherence.io import save_sweep
from ga_ray.rundir import RunDir

FitFn = Callable[[Any, RunDir, Path], dict[str, Any]]

COLUMNS = [
    "alpha",
    "n_atoms",
    "dead_atoms",
    "median_docs_per_atom",
    "mean_docs_per_atom",
    "atoms_coherence_gt_0.5",
    "atoms_coherence_gt_0.1",
    "atoms_scored",
    "mean_l0",
    "objective",
    "fit_s",
    "coherence_s",
]


def fit_with_atoms_stage(cfg: Any, run_dir: RunDir, out: Path) -> dict[str, Any]:
    """Fit one dictionary with the atoms stage's entry point, writing into `out` (an atoms-like folder)."""
    try:
        from ga_ray.atoms.stage import run_atoms
    except ImportError as exc:
        raise StageError(f"the atoms stage (ga_ray.atoms.stage:run_atoms) is not available in this build ({exc})") from None
    out.mkdir(parents=True, exist_ok=True)
    return run_atoms(LocalStageContext(cfg=cfg, run_dir=run_dir, stage="atoms", out=out)) or {}


def alpha_dirname(alpha: float) -> str:
    return f"alpha_{alpha:g}"


def _objective(metrics: Any) -> float | None:
    if not isinstance(metrics, dict):
        return None
    for key in ("objective", "final_objective", "heldout_objective"):
        v = metrics.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):
            for sub in ("final", "value", "train", "all"):
                if isinstance(v.get(sub), (int, float)):
                    return float(v[sub])
    return None


def sweep_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return buf.getvalue()


MANIFEST_NAME = "sweep"
"""The sweep's record in manifest.json (status, fingerprint, inputs, wall time, summary), as a stage's; it is not
in the pipeline's stage order, so `ga-ray run` never runs it and no stage reads it."""
SWEEP_SECTIONS = ("model", "finetune.enabled", "dictionary", "coherence")
SWEEP_UPSTREAM = ("prepare", "finetune", "gradients")


def sweep_fingerprint(cfg: Any, run_dir: RunDir, alphas: Sequence[float]) -> tuple[str, dict[str, Any]]:
    """(fingerprint, inputs) of a sweep, made as the runner makes a stage's: the config it reads, the α list, the
    records of the stages whose output it reads (fingerprint @ finish time), and a given adapter folder."""
    from ga_ray.config import section_fingerprint_data
    from ga_ray.rundir import fingerprint_obj, fingerprint_path

    stages = run_dir.read_manifest()["stages"]
    upstream = {u: f"{rec.get('fingerprint')}@{rec.get('finished_at')}" for u in SWEEP_UPSTREAM if (rec := stages.get(u))}
    adapter = None if cfg.finetune.enabled else cfg.model.adapter
    files = {p: fingerprint_path(Path(p)) for p in (cfg.model.path, adapter) if p}
    inputs = {"config": section_fingerprint_data(cfg, *SWEEP_SECTIONS), "alphas": [float(a) for a in alphas], "upstream": upstream, "files": files}
    return fingerprint_obj(inputs), {"alphas": inputs["alphas"], "upstream": upstream, "files": files}


def sweep_line(rows: Sequence[dict[str, Any]]) -> str:
    """The one-line summary: per α, atoms with coherence > 0.5 / > 0.1 and the median documents per atom."""
    parts = [f"α={r['alpha']:g}: {r['atoms_coherence_gt_0.5']}/{r['atoms_coherence_gt_0.1']} (median {r['median_docs_per_atom']:g} docs)" for r in rows]
    return "atoms with coherence > 0.5/> 0.1 per α: " + "; ".join(parts) + " (report/sweep.csv)"


def run_sweep(cfg: Any, run_dir: RunDir | str | Path, alphas: Sequence[float], fit: FitFn | None = None) -> list[dict[str, Any]]:
    """One row per α: atoms, dead atoms, median/mean active documents per atom, atoms with coherence
    > 0.5 and > 0.1, mean L0, objective, times. Writes report/sweep.csv and report/sweep.json, and records
    itself in manifest.json under "sweep" like a stage (running, then done with its summary, or failed)."""
    import traceback

    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise StageError("sweep: no alphas given (e.g. --alphas 0.01,0.1,1.0)")
    if any(a < 0 for a in alphas):
        raise StageError(f"sweep: alphas must be >= 0, got {alphas}")
    fp, inputs = sweep_fingerprint(cfg, run_dir, alphas)
    t0 = run_dir.mark_running(MANIFEST_NAME, fp, inputs)
    try:
        rows, stats = _sweep(cfg, run_dir, alphas, fit)
    except BaseException as exc:
        run_dir.mark_failed(MANIFEST_NAME, t0, "".join(traceback.format_exception_only(type(exc), exc)).strip())
        raise
    summary = {
        "line": sweep_line(rows),
        "rows": [{k: r.get(k) for k in COLUMNS} for r in rows],
        "coherence_stats": stats,
    }
    run_dir.mark_done(MANIFEST_NAME, t0, summary)
    return rows


def _sweep(cfg: Any, run_dir: RunDir, alphas: list[float], fit: FitFn | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ga_ray.atoms.io import load_metrics
    from ga_ray.gradients import io as gradients_io
    from ga_ray.gradients.io import read_gradients
    from ga_ray.raycluster import init_ray

    grads = run_dir.stage_dir("gradients")
    if not gradients_io.exists(grads):
        raise StageError(f"no stored gradients in {grads}: run the pipeline up to the gradients stage first (`ga-ray gradients`)")
    fit = fit or fit_with_atoms_stage
    init_ray(cfg.ray)
    n_docs = read_gradients(grads, columns=["doc_id"]).num_rows
    report_dir = run_dir.stage_dir("report")
    sweep_dir = report_dir / "sweep"
    top_n = cfg.coherence.top_docs

    from tqdm.auto import tqdm

    fitted = []
    for a in tqdm(alphas, desc="sweep: fitting dictionaries", unit="alpha"):
        c = cfg.model_copy(deep=True)
        c.dictionary.alpha = a
        c.dictionary.kmeans_clusters = None
        c.dictionary.n_seeds = 1
        out = sweep_dir / alpha_dirname(a)
        t0 = time.perf_counter()
        summary = fit(c, run_dir, out)
        fit_s = time.perf_counter() - t0
        r = orient_and_rank(out, top_n)
        metrics = load_metrics(out) or summary
        fitted.append((a, r, fit_s, metrics))

    # one coherence pass for every α: items are (α, atom) pairs
    items: list[list[int]] = []
    offsets = []
    for _, r, _, _ in fitted:
        offsets.append(len(items))
        items.extend(r["top_ids"])
    t0 = time.perf_counter()
    res = compute_coherence(cfg, run_dir.stage_dir("data"), _adapter(cfg, run_dir), items)
    coh_s = time.perf_counter() - t0

    slots = [sum(len(t) for t in r["top_ids"] if len(t) >= 2) for _, r, _, _ in fitted]  # documents each α's atoms cost
    rows = []
    for i, ((a, r, fit_s, metrics), off) in enumerate(zip(fitted, offsets)):
        K = r["K"]
        coh = res.coherence[off : off + K]
        counts = coherence_counts(coh)
        n_active = r["n_active"]
        rows.append(
            {
                "alpha": a,
                "n_atoms": K,
                "dead_atoms": int((n_active == 0).sum()),
                "median_docs_per_atom": float(np.median(n_active)) if K else 0.0,
                "mean_docs_per_atom": round(float(np.mean(n_active)), 3) if K else 0.0,
                "atoms_coherence_gt_0.5": counts["gt_0.5"],
                "atoms_coherence_gt_0.1": counts["gt_0.1"],
                "atoms_scored": counts["scored"],
                "mean_l0": round(float(n_active.sum()) / max(1, n_docs), 4),
                "objective": _objective(metrics),
                "fit_s": round(fit_s, 3),
                "coherence_s": round(coh_s * slots[i] / max(1, sum(slots)), 3),  # share of the joint pass
                "atoms_dir": str((sweep_dir / alpha_dirname(a)).relative_to(run_dir.root)),
                "coherence": [None if not np.isfinite(x) else round(float(x), 6) for x in coh],
            }
        )
    payload = {"alphas": alphas, "n_docs": n_docs, "top_docs": top_n, "coherence_stats": res.stats, "rows": rows}
    save_sweep(run_dir, payload, sweep_csv(rows))
    return rows, res.stats


def _adapter(cfg: Any, run_dir: RunDir) -> Path:
    ctx = LocalStageContext(cfg=cfg, run_dir=run_dir, stage="coherence", out=run_dir.stage_dir("coherence"))
    return ctx.adapter_path()
