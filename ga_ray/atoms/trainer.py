"""The driver loop of the online learner: broadcast D, gather coded parts, update, evaluate, stop.

Pure torch (no Ray, no files). The workers are behind a small `Pool` interface: `LocalPool` runs
`BlockCoder`s in this process (the core learner, tests), `ga_ray.atoms.distributed.RayPool`
runs them as Ray actors. The loop is the same for both, so one worker and W workers follow the same
trajectory: parts are merged in stream order before anything is summed.

Stopping (`stop_on`), checked every `eval_every` steps (default for `train`: at epoch ends when the
stopping window is the epoch, else every half window):

- `train` (default): the objective `(1/N) Σ ½‖x − cD‖² + α‖c‖₁` of the training stream itself, each
  batch costed by the exact coder against the dictionary *before* the update on that batch (free: the
  step computes it anyway), averaged over the last W = min(one epoch, `stop_window`) steps. The run
  stops when that objective improved by less than `tol` (relative, per epoch: the improvement over the
  last W steps × steps-per-epoch / W) at `patience` consecutive checks, or after `max_epochs`. This is
  the objective of the documents the stage encodes (scikit-learn's, on the same rows); held-out rows,
  when kept (`heldout_fraction` > 0), are still coded at each check and recorded.
- `heldout`: the objective of the held-out rows (exact coder) at each check; stops when it has not
  improved by more than `tol` (relative to the best so far) for `patience` checks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ga_ray.atoms import warm as warm_codes
from ga_ray.atoms.lasso import gram
from ga_ray.atoms.online import (
    OnlineState,
    StepResult,
    init_dictionary_from_rows,
    init_dictionary_svd,
    online_step,
)
from ga_ray.atoms.precision import precision_name, product_dtype
from ga_ray.atoms.stream import BlockCoder, CodedPart, StreamPlan
from ga_ray.atoms.threads import small_ops


class Pool(Protocol):
    def broadcast(self, D: torch.Tensor, G: torch.Tensor) -> Any: ...

    def code(self, handle: Any, epoch: int, start: int, stop: int, warm: tuple[np.ndarray, np.ndarray] | None = None) -> list[CodedPart]: ...

    def heldout(self, handle: Any) -> tuple[float, float, int]: ...

    def rows(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]: ...


class LocalPool:
    """BlockCoders in this process (world = len(coders))."""

    def __init__(self, coders: list[BlockCoder]):
        self.coders = coders

    def broadcast(self, D: torch.Tensor, G: torch.Tensor) -> Any:
        return (D, G)

    def code(self, handle: Any, epoch: int, start: int, stop: int, warm: tuple[np.ndarray, np.ndarray] | None = None) -> list[CodedPart]:
        D, G = handle
        # one coder: its part is the batch, so it stays on the device (several parts are merged as numpy)
        on_device = len(self.coders) == 1
        return [c.code(epoch, start, stop, D, G, warm, on_device=on_device) for c in self.coders]

    def heldout(self, handle: Any) -> tuple[float, float, int]:
        D, G = handle
        parts = [c.heldout_cost(D, G) for c in self.coders]
        return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)

    def rows(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [c.rows_at(epoch, start, stop) for c in self.coders]
        return _merge_rows([(p, x.cpu().numpy()) for p, x in parts])


def _merge_rows(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    pos = np.concatenate([p[0] for p in parts])
    X = np.concatenate([p[1] for p in parts])
    order = np.argsort(pos, kind="stable")
    return pos[order], X[order]


#: The smallest batch `auto` picks: scikit-learn's and the paper's batch.
AUTO_BATCH_MIN = 256


def auto_batch_size(n_atoms: int, n_rows: int) -> int:
    """Rows per online step for `batch_size: auto`: 2·K, at least 256, at most a quarter of the rows
    (but never below 256; the plan then clamps to the rows there are).

    Why 2·K: whatever the batch, each step costs the Gram matrix and the sweep's B − A·D, 3·K²·D
    flop, against 2·B·K·D for the batch's correlations X·Dᵀ, so at B = 256 and K = 500 the
    per-step part is 2.9× the per-row part, and at B = 2·K it is 0.75×, for any K and D. The objective per
    epoch barely moves with B while steps are many per epoch, hence the cap (at least 4 steps per epoch).
    Measured with the stage's stopping rule (2-core AMD EPYC, K 500, `docs/benchmarks.md`): on planted atoms
    (N 5,000, D 6,800) batch 1,024 took 6.4 s of CPU against 14.4 s for 256, at an objective of 0.1514
    against 0.1464 (scikit-learn, batch 256: 0.1652); on the demo gradients (D 800) 1.4 s against 2.6 s,
    at 0.3114 against 0.3103 (scikit-learn: 0.3134).
    """
    return int(max(AUTO_BATCH_MIN, min(2 * n_atoms, n_rows // 4)))


def resolve_batch_size(batch_size: int | str, n_atoms: int, n_rows: int) -> int:
    """A configured `batch_size` (rows, or "auto": `auto_batch_size`) as rows."""
    if batch_size == "auto":
        return auto_batch_size(n_atoms, n_rows)
    if isinstance(batch_size, str) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive number of rows or 'auto' (got {batch_size!r})")
    return int(batch_size)


@dataclass
class FitSettings:
    """What the learner needs from `DictionaryConfig` (plus a few internals)."""

    n_atoms: int
    alpha: float
    batch_size: int = 256
    max_epochs: float = 20.0
    tol: float = 1e-4
    patience: int = 3
    eval_every: int | None = None
    init: str = "data"
    seed: int = 42
    block: int = 16
    dup_threshold: float | None = 0.99
    checkpoint_every: int = 0
    svd_rows: int = 20_000
    stop_on: str = "train"
    """`train` (the stage's default) or `heldout`: which objective the stopping rule watches."""
    stop_window: int = 500
    """`train` rule: the objective is averaged over the last min(epoch, stop_window) steps."""
    warm_start: bool = True
    """Start each row's coder from its codes of the previous epoch (`ga_ray.atoms.warm`)."""
    forget_exponent: float = 4.0
    """ρ of the statistics' forgetting weights (`online.update_stats`; 1: scikit-learn's exactly; the
    default is the stage's, `DictionaryConfig.forget_exponent`)."""
    matmul_precision: str = "float32"
    """The driver's sweep products and (through `learn_dictionary`) the coders' correlations:
    `float32`, `bfloat16`, or `auto` (bfloat16 where native; `ga_ray.atoms.precision`). Float32 here, the
    exact reference; the stage's default is `auto` (`DictionaryConfig.matmul_precision`)."""


@dataclass
class FitResult:
    state: OnlineState
    G: torch.Tensor
    history: list[dict[str, Any]]
    stop_reason: str
    timings: dict[str, float]
    steps: int
    epochs: float
    n_unconverged_rows: int = 0
    matmul_precision: str = "float32"
    """The driver's sweep products as run (`auto` resolved on its device)."""


@dataclass
class TrainerState:
    """Counters of the stopping rule (JSON-serialisable, saved in checkpoints)."""

    best: float | None = None
    bad_checks: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    cost_sum: float = 0.0
    cost_rows: int = 0
    n_unconverged_rows: int = 0
    stopped: str | None = None
    recent: list[list[float]] = field(default_factory=list)
    """`train` rule: [Σ batch cost × rows, rows] of the last steps (at most the stopping window)."""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainerState":
        return cls(**d)


def initial_dictionary(pool: Pool, plan: StreamPlan, s: FitSettings, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """From the first rows of epoch 0's stream: K rows (`data`) or a randomized SVD of a sample (`svd`)."""
    if s.init == "svd":
        n = min(plan.n_train, max(2 * s.n_atoms, 1), s.svd_rows)
        _, X = pool.rows(0, 0, n)
        rows = torch.from_numpy(X).to(device, dtype)
        return init_dictionary_svd(rows, s.n_atoms, s.seed)
    _, X = pool.rows(0, 0, min(s.n_atoms, plan.n_train))
    return init_dictionary_from_rows(torch.from_numpy(X).to(device, dtype), s.n_atoms, s.seed)


def fit(
    pool: Pool,
    plan: StreamPlan,
    s: FitSettings,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    resume: tuple[OnlineState, TrainerState] | None = None,
    on_checkpoint: Callable[[OnlineState, TrainerState], None] | None = None,
    on_step: Callable[[OnlineState, StepResult], None] | None = None,
    progress: Any = None,
) -> FitResult:
    """Run the online learner until the held-out objective stops improving or `max_epochs`."""
    with small_ops(device):
        return _fit(pool, plan, s, dtype=dtype, device=device, resume=resume, on_checkpoint=on_checkpoint, on_step=on_step, progress=progress)


def _fit(pool, plan, s, *, dtype, device, resume, on_checkpoint, on_step, progress) -> FitResult:
    device = torch.device(device)
    timings = {"init_s": 0.0, "code_s": 0.0, "update_s": 0.0, "heldout_s": 0.0, "checkpoint_s": 0.0}
    t0 = time.perf_counter()
    if resume is not None:
        state, ts = resume
        state.D, state.A, state.Bt = (t.to(device, dtype) for t in (state.D, state.A, state.Bt))
    else:
        D0 = initial_dictionary(pool, plan, s, dtype, device)
        state, ts = OnlineState.from_dictionary(D0), TrainerState()
    if not s.warm_start:
        state.warm = None
    elif state.warm is None or state.warm[0].shape[0] != plan.n_rows:
        width = warm_codes.store_width(plan.n_rows, s.n_atoms)
        state.warm = warm_codes.empty_store(plan.n_rows, width) if width else None
    G = gram(state.D)
    precision = product_dtype(s.matmul_precision, device)
    timings["init_s"] += time.perf_counter() - t0
    spe = plan.steps_per_epoch
    max_steps = max(1, math.ceil(s.max_epochs * spe))
    if s.stop_on not in ("train", "heldout"):
        raise ValueError(f"stop_on must be 'train' or 'heldout' (got {s.stop_on!r})")
    window = max(1, min(spe, s.stop_window))
    if s.stop_on == "train":
        # a window of one epoch checked at epoch ends holds every row exactly once, so two checks differ
        # only by what the dictionary learned, not by which rows the windows hold (at mid-epoch checks
        # that difference moved the demo world's objective by ~0.5%, half the default tol)
        eval_every = s.eval_every or (spe if window == spe else max(1, math.ceil(window / 2)))
    else:
        eval_every = s.eval_every or min(spe, 200)
    has_heldout = len(plan.heldout) > 0
    if progress is not None:
        progress.reset(total=max_steps)
        progress.update(state.step)
    while ts.stopped is None and state.step < max_steps:
        epoch, start, stop = plan.batch_bounds(state.step)
        t = time.perf_counter()
        handle = pool.broadcast(state.D, G)
        ids = plan.row_ids(epoch, start, stop) if state.warm is not None else None
        warm = warm_codes.take(*state.warm, ids) if state.warm is not None and state.step >= plan.steps_per_epoch else None
        parts = pool.code(handle, epoch, start, stop, warm)
        timings["code_s"] += time.perf_counter() - t
        t = time.perf_counter()
        X, C, rec, l1, unconv = _merge_parts(parts, device, dtype)
        if state.warm is not None:
            warm_codes.put(*state.warm, ids, C.cpu().numpy())
        ts.n_unconverged_rows += unconv
        result, G = online_step(state, X, C, rec, l1, block=s.block, dup_threshold=s.dup_threshold, forget_exponent=s.forget_exponent, precision=precision)
        ts.cost_sum += result.batch_cost * result.n_rows
        ts.cost_rows += result.n_rows
        ts.recent.append([result.batch_cost * result.n_rows, float(result.n_rows)])
        del ts.recent[:-window]
        timings["update_s"] += time.perf_counter() - t
        if on_step is not None:
            on_step(state, result)
        if progress is not None:
            progress.update(1)
        last = state.step >= max_steps
        if state.step % eval_every == 0 or last:
            t = time.perf_counter()
            train_cost = ts.cost_sum / max(ts.cost_rows, 1)
            heldout_obj = None
            if has_heldout:
                rec_s, l1_s, n_h = pool.heldout(pool.broadcast(state.D, G))
                heldout_obj = (rec_s + l1_s) / max(n_h, 1)
            entry = {"step": state.step, "epoch": round(state.step / spe, 4)}
            if s.stop_on == "train":
                obj = stream_objective(ts.recent)
                entry.update(objective=obj, objective_kind="train_stream")
                if heldout_obj is not None:
                    entry["heldout_objective"] = heldout_obj
            else:
                obj = heldout_obj if heldout_obj is not None else train_cost
                entry.update(objective=obj, objective_kind="heldout" if heldout_obj is not None else "train_batches")
            entry.update(train_batch_cost=train_cost, elapsed_s=round(time.perf_counter() - t0, 3))
            ts.history.append(entry)
            ts.cost_sum, ts.cost_rows = 0.0, 0
            if s.stop_on == "train":
                rate = improvement_per_epoch(ts.history, window, spe)
                if rate is not None:
                    if rate < s.tol:
                        ts.bad_checks += 1
                        if ts.bad_checks >= s.patience:
                            ts.stopped = "converged"
                    else:
                        ts.bad_checks = 0
                if ts.best is None or obj < ts.best:
                    ts.best = obj
            elif ts.best is None or obj < ts.best - s.tol * abs(ts.best):
                ts.best, ts.bad_checks = obj, 0
            else:
                ts.bad_checks += 1
                if ts.bad_checks >= s.patience:
                    ts.stopped = "converged"
            if progress is not None:
                progress.set_postfix(objective=f"{obj:.5f}")
            timings["heldout_s"] += time.perf_counter() - t
        if ts.stopped is None and state.step >= max_steps:
            ts.stopped = "max_epochs"
        if on_checkpoint is not None and s.checkpoint_every and (state.step % s.checkpoint_every == 0) and ts.stopped is None:
            t = time.perf_counter()
            on_checkpoint(state, ts)
            timings["checkpoint_s"] += time.perf_counter() - t
    if ts.stopped is None:
        ts.stopped = "max_epochs"
    return FitResult(
        state=state,
        G=G,
        history=ts.history,
        stop_reason=ts.stopped,
        timings=timings,
        steps=state.step,
        epochs=state.step / spe,
        n_unconverged_rows=ts.n_unconverged_rows,
        matmul_precision=precision_name(precision),
    )


def stream_objective(recent: list[list[float]]) -> float:
    """Mean cost per row of the recorded steps ([Σ cost × rows, rows] each)."""
    rows = sum(r[1] for r in recent)
    return sum(r[0] for r in recent) / max(rows, 1.0)


def improvement_per_epoch(history: list[dict[str, Any]], window: int, steps_per_epoch: int) -> float | None:
    """`train` rule: relative improvement of the stream objective over the last `window` steps, per
    epoch: (o_then − o_now) / |o_then| × steps_per_epoch / lag, where o_then is the latest check at
    least `window` steps back (lag = the steps between the two checks). None before such a check exists.
    """
    now = history[-1]
    then = next((h for h in reversed(history[:-1]) if h["step"] <= now["step"] - window), None)
    if then is None or then["objective"] == 0:
        return None
    lag = now["step"] - then["step"]
    return (then["objective"] - now["objective"]) / abs(then["objective"]) * steps_per_epoch / lag


def _merge_parts(parts: list[CodedPart], device: torch.device, dtype: torch.dtype):
    parts = [p for p in parts if len(p.positions)]
    pos = np.concatenate([p.positions for p in parts])
    order = np.argsort(pos, kind="stable")
    if len(parts) == 1:
        X, C, rec, l1 = parts[0].X, parts[0].C, parts[0].rec, parts[0].l1
    else:
        X = np.concatenate([p.X for p in parts])[order]
        C = np.concatenate([p.C for p in parts])[order]
        rec = np.concatenate([p.rec for p in parts])[order]
        l1 = np.concatenate([p.l1 for p in parts])[order]
    unconv = sum(p.n_unconverged for p in parts)

    def t(a):
        if isinstance(a, torch.Tensor):
            return a.to(device, dtype)
        with warnings.catch_warnings():  # read-only object-store views; only read
            warnings.simplefilter("ignore")
            return torch.as_tensor(a).to(device, dtype)

    # the per-row costs on the host, as before (resample_atoms reads them row by row)
    return t(X), t(C), torch.as_tensor(rec).to("cpu", torch.float64), torch.as_tensor(l1).to("cpu", torch.float64), unconv


def learn_dictionary(
    Z: np.ndarray | torch.Tensor,
    s: FitSettings,
    *,
    heldout_fraction: float = 0.05,
    heldout_max_rows: int = 10_000,
    window_rows: int | None = None,
    piece_rows: int = 4096,
    lasso_tol: float = 1e-6,
    lasso_max_iter: int = 500,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    world: int = 1,
    **fit_kwargs: Any,
) -> FitResult:
    """The core learner on an in-memory matrix Z (rows are normalised here): no Ray, no files.

    `world` > 1 splits the rows over that many in-process coders (same trajectory as 1).
    """
    from ga_ray.atoms.stream import even_pieces, tensor_reader

    Z = Z.detach().cpu().numpy() if isinstance(Z, torch.Tensor) else np.asarray(Z)
    n = Z.shape[0]
    pieces = even_pieces(n, piece_rows)
    plan = StreamPlan(
        piece_rows=tuple(pieces),
        batch_size=min(s.batch_size, max(n, 1)),
        window_rows=window_rows or max(n, 1),
        seed=s.seed,
        heldout_fraction=heldout_fraction,
        heldout_max_rows=heldout_max_rows,
    )
    reader = tensor_reader(Z, pieces)
    coders = [
        BlockCoder(
            reader, plan, r, world, s.alpha, lasso_tol=lasso_tol, lasso_max_iter=lasso_max_iter, device=device, dtype=dtype, matmul_precision=s.matmul_precision
        )
        for r in range(world)
    ]
    return fit(LocalPool(coders), plan, s, dtype=dtype, device=device, **fit_kwargs)
