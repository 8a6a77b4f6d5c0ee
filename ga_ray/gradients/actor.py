"""What one gradients actor does: per-document LoRA gradients, projected at once, batch by batch.

Two layers, kept apart:
- `GradientComputer` (pure compute, no Ray, no files): holds the model, its LoRA blocks and the
  projector; `run(columns)` takes one window of documents, buckets it into token-budget batches
  (`batching.plan_batches`), and for each batch runs ONE forward and ONE backward pass
  (`per_document_gradients`), projects the batch's raw gradients at once, keeps the norms, and drops
  the raw gradients before the next batch. Memory is bounded by one batch, never by the window.
- `GradientsActor` (the Ray Data callable class): loads model + adapter + factors ONCE per actor
  (re-done only if Ray restarts the actor), writes the finite rows of each window to its own Parquet
  file in the stage's temporary folder, and returns only small per-document metadata (doc id, loss,
  norm, finite flag, padded length, file name) to the driver, which keeps exactly the files that the
  rows it received point to (see `stage.py`): that is what makes the output exactly-once even when an
  actor dies after writing a file but before Ray recorded its result.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ga_ray.kernel.batching import PaddingStats, padding_stats, plan_batches
from ga_ray.kernel.compiling import compile_unhooked_parts
from ga_ray.errors import StageError

# Fault injection for the tests: a flag-file path. The first window that any incarnation of any
# actor processes dies (os._exit) right after writing its Parquet file and before returning it, the
# hardest moment for exactly-once output; the flag file, created atomically first, stops the others.
FAULT_ENV = "GA_RAY_GRADIENTS_FAULT"

def proc_status_mb(field: str) -> float | None:
    """`VmHWM` (peak resident memory of this process image) or `VmRSS` from /proc (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:  # not Linux
        return None
    return None


def _peak_mem_mb(device: Any) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak resident set on CPU.

    (`VmHWM`, not `ru_maxrss`: the latter carries over the parent's peak across fork + exec.)
    """
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = proc_status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class WindowResult:
    """Per-document results of one window, in the window's row order."""

    doc_id: np.ndarray  # int64 [n]
    n_tokens: np.ndarray  # int32 [n]
    loss: np.ndarray  # float32 [n]
    grad_norm: np.ndarray  # float32 [n] (NaN/Inf for non-finite documents)
    finite: np.ndarray  # bool [n]: loss, raw gradient and z all finite
    padded_len: np.ndarray  # int32 [n]: padded length of the batch the document was in
    z: np.ndarray  # float32 [n, D]
    raw: np.ndarray | None  # float16 [n, P] when store_raw
    compute_s: float = 0.0
    padding: PaddingStats = field(default_factory=lambda: PaddingStats(0, 0, 0))


class GradientComputer:
    """Projected per-document gradients for windows of documents (no Ray, no files)."""

    def __init__(
        self,
        model: Any,
        blocks: list[Any],
        projector: Any,
        *,
        max_docs: int,
        max_tokens: int,
        reduction: str = "sum",
        store_raw: bool = False,
        autocast_dtype: Any = None,
        pad_id: int | None = None,
        token_projection: str = "auto",
        fast: bool = True,
        compile: bool = False,
    ):
        """`token_projection`: "auto" projects a block from per-token quantities where that costs fewer
        multiply-adds than materialising `G_n` (`Projector.token_reducers`), "never" / "always" force
        one path; the raw gradients (`store_raw`) need `G_n`, so they imply "never". `fast=False` runs
        the reference pass of `per_document_gradients` (same numbers; the benchmark's "before")."""
        import torch

        self.model = model
        self.blocks = blocks
        self.projector = projector
        self.max_docs = int(max_docs)
        self.max_tokens = int(max_tokens)
        self.reduction = reduction
        self.store_raw = store_raw
        self.device = next(model.parameters()).device
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None
        if pad_id is None:
            pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.pad_id = int(pad_id) if pad_id is not None else 0
        self.token_projection = "never" if store_raw else token_projection
        self.fast = bool(fast)
        # `compile`: torch.compile the model's parts that the pass does not hook (each layer's MLP and
        # norms; `ga_ray.kernel.compiling`); the first batches of each new shape pay the compilation
        self.compiled = compile_unhooked_parts(model, blocks) if compile else []
        self.D = int(projector.D)
        self.P = int(sum(b.numel for b in blocks))
        self._torch = torch

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return self._torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def run(self, columns: Mapping[str, Any]) -> WindowResult:
        """One window: columns `doc_id`, `input_ids`, `loss_mask` (lists per row), as Ray Data gives them."""
        from ga_ray.kernel.collate import collate
        from ga_ray.kernel.per_document import per_document_gradients

        torch = self._torch
        doc_ids = np.asarray(columns["doc_id"], dtype=np.int64)
        n = len(doc_ids)
        input_ids = columns["input_ids"]
        loss_mask = columns["loss_mask"]
        lengths = np.fromiter((len(x) for x in input_ids), dtype=np.int64, count=n)

        out = WindowResult(
            doc_id=doc_ids,
            n_tokens=lengths.astype(np.int32),
            loss=np.zeros(n, np.float32),
            grad_norm=np.zeros(n, np.float32),
            finite=np.zeros(n, bool),
            padded_len=np.zeros(n, np.int32),
            z=np.zeros((n, self.D), np.float32),
            raw=np.zeros((n, self.P), np.float16) if self.store_raw else None,
        )
        batches = plan_batches(lengths, self.max_docs, self.max_tokens)
        # Per-batch results stay on the device, in batch order, and come to the host once per window:
        # on a GPU nothing in the loop waits for the device (the batch goes up from pinned memory, the
        # target positions come from the host, see `collate`), so the host queues batch b + 1 while the
        # device still runs batch b. Only `store_raw` copies each batch's raw gradients down at once.
        dev = self.device
        z_dev = torch.zeros((n, self.D), dtype=torch.float32, device=dev)
        sq_dev = torch.zeros(n, dtype=torch.float64, device=dev)
        loss_dev = torch.zeros(n, dtype=torch.float32, device=dev)
        ok_dev = torch.ones(n, dtype=torch.bool, device=dev)
        order = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        t0 = time.perf_counter()
        at = 0
        for idx in batches:
            rows = [{"doc_id": int(doc_ids[i]), "input_ids": input_ids[i], "loss_mask": loss_mask[i]} for i in idx]
            batch = collate(rows, pad_id=self.pad_id).to(dev, non_blocking=True)
            reducers = self.projector.token_reducers(*batch.input_ids.shape, mode=self.token_projection)
            with self._autocast():
                res = per_document_gradients(self.model, self.blocks, batch, labels="empirical", reduction=self.reduction, token_reducers=reducers, fast=self.fast)
            grads = {name: g.float() for name, g in res.grads.items()}  # projections accumulate in float32
            z = self.projector.project(grads, projected=res.projected)
            sl = slice(at, at + len(idx))
            sq, ok = sq_dev[sl], ok_dev[sl]  # views: the in-place updates below write the window's rows
            for g in grads.values():
                flat = g.flatten(1)
                ok &= torch.isfinite(flat).all(dim=1)
                sq += torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64).square()
            for s2 in res.sq_norms.values():  # blocks projected per token: no G_n, its norm from the Gram sum
                ok &= torch.isfinite(s2)
                sq += s2.to(torch.float64)
            loss = res.loss.detach().float()
            ok &= torch.isfinite(z).all(dim=1) & torch.isfinite(loss)
            z_dev[sl] = z
            loss_dev[sl] = loss
            out.padded_len[idx] = int(batch.input_ids.shape[1])
            if out.raw is not None:
                out.raw[idx] = torch.cat([grads[b.name].flatten(1) for b in self.blocks], dim=1).half().cpu().numpy()
            at += len(idx)
            del res, grads, z, batch  # nothing raw survives the batch
        # one copy per array for the whole window (each waits for the device to finish the window)
        out.z[order] = z_dev.cpu().numpy()
        out.grad_norm[order] = sq_dev.sqrt().float().cpu().numpy()
        out.loss[order] = loss_dev.cpu().numpy()
        out.finite[order] = ok_dev.cpu().numpy()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out.compute_s = time.perf_counter() - t0
        out.padding = padding_stats(lengths, batches)
        return out


def load_computer(
    model_cfg: Any,
    adapter_path: str | Path,
    factors_dir: str | Path,
    *,
    device: str,
    max_docs: int,
    max_tokens: int,
    reduction: str = "sum",
    store_raw: bool = False,
    compile: bool = False,
) -> GradientComputer:
    """Load model + adapter + factors onto `device` and check that their LoRA blocks agree."""
    import torch

    from ga_ray.factors.projection import Factors, Projector
    from ga_ray.kernel.loading import load_lora_model
    from ga_ray.kernel.lora_blocks import find_lora_blocks

    dev = torch.device(device)
    model = load_lora_model(model_cfg, adapter_path, device=dev, dtype=None)
    blocks = find_lora_blocks(model)
    factors = Factors.load(factors_dir)
    names = [b.name for b in blocks]
    fnames = list(factors.block_names)
    if names != fnames:
        missing = sorted(set(fnames) - set(names))[:3]
        extra = sorted(set(names) - set(fnames))[:3]
        raise StageError(
            f"the factors in {factors_dir} were computed for other LoRA blocks than the adapter {adapter_path} has "
            f"(factors only: {missing}, adapter only: {extra}, or a different order): re-run the factors stage"
        )
    projector = Projector(factors, dev)
    autocast = torch.bfloat16 if dev.type == "cuda" and next(model.parameters()).dtype != torch.float32 else None
    return GradientComputer(
        model, blocks, projector, max_docs=max_docs, max_tokens=max_tokens, reduction=reduction, store_raw=store_raw, autocast_dtype=autocast,
        compile=compile,
    )


def write_window(result: WindowResult, out_dir: str | Path) -> str:
    """The finite rows of a window as one Parquet file (atomic rename); returns its name ('' if none)."""
    import pyarrow.parquet as pq

    from ga_ray.gradients.io import gradients_table

    keep = np.flatnonzero(result.finite)
    if len(keep) == 0:
        return ""
    table = gradients_table(
        result.doc_id[keep],
        result.z[keep],
        result.grad_norm[keep],
        result.loss[keep],
        result.n_tokens[keep],
        raw=None if result.raw is None else result.raw[keep],
    )
    name = f"part-{uuid.uuid4().hex}.parquet"
    out_dir = Path(out_dir)
    tmp = out_dir / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out_dir / name)
    return name


def _maybe_fault(flag: str | None) -> None:
    """Test hook: die as a crash or an OOM kill would, once (see FAULT_ENV)."""
    if not flag:
        return
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # an earlier incarnation already died once
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(17)


def _process_age_s() -> float | None:
    """Seconds since this process started (psutil, a Ray dependency); None where it cannot tell."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # psutil missing or /proc unreadable: the figure is only reported
        return None


def _whereabouts() -> tuple[str, str]:
    """(Ray node id, Ray actor id) of this process; empty strings outside Ray."""
    try:
        import ray

        rc = ray.get_runtime_context()
        return rc.get_node_id() or "", rc.get_actor_id() or ""
    except Exception:  # not inside a Ray worker (the in-process tests)
        return "", ""


class GradientsActor:
    """Ray Data callable class: `map_batches(GradientsActor, compute=ActorPoolStrategy(...))`."""

    def __init__(
        self,
        model_cfg: Any,
        adapter_path: str,
        factors_dir: str,
        out_dir: str,
        *,
        max_docs: int,
        max_tokens: int,
        reduction: str = "sum",
        store_raw: bool = False,
        device: str = "cpu",
        torch_threads: int | None = None,
        fault: str | None = None,
        compile: bool = False,
        in_driver: bool = False,
    ):
        t_init = time.perf_counter()
        # worker process start, Ray, unpickling this actor: before our code (none in the driver)
        self.boot_s = 0.0 if in_driver else _process_age_s()
        import torch

        if torch_threads and device == "cpu":
            torch.set_num_threads(max(1, int(torch_threads)))
        self.computer = load_computer(
            model_cfg, adapter_path, factors_dir, device=device, max_docs=max_docs, max_tokens=max_tokens, reduction=reduction, store_raw=store_raw,
            compile=compile,
        )
        self.out_dir = out_dir
        self.fault = fault
        self.node_id, self.actor_id = _whereabouts()
        if in_driver:
            self.actor_id = "driver"
        self.init_s = time.perf_counter() - t_init  # imports (torch, transformers, peft) and model load
        self._start_reported = False

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        result = self.computer.run(batch)
        t_write = time.perf_counter()
        name = write_window(result, self.out_dir)
        write_s = time.perf_counter() - t_write
        _maybe_fault(self.fault)
        n = len(result.doc_id)
        # this incarnation's start-up, spread over the rows of its first batch (so that sums over rows
        # are sums over actors, restarts included)
        first = n > 0 and not self._start_reported
        if first:
            self._start_reported = True
        return {
            "doc_id": result.doc_id,
            "n_tokens": result.n_tokens,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "finite": result.finite,
            "padded_len": result.padded_len,
            "file": np.array([name if f else "" for f in result.finite], dtype=object),
            "compute_s": np.full(n, result.compute_s / max(n, 1), dtype=np.float64),
            "peak_mem_mb": np.full(n, _peak_mem_mb(self.computer.device), dtype=np.float32),
            "write_s": np.full(n, write_s / max(n, 1), dtype=np.float64),
            "actor_init_s": np.full(n, self.init_s / n if first else 0.0, dtype=np.float64),
            "actor_boot_s": np.full(n, (self.boot_s or 0.0) / n if first else 0.0, dtype=np.float64),
            # where each document was computed: the stage records the actors' nodes in its metadata
            "node_id": np.array([self.node_id] * n, dtype=object),
            "actor_id": np.array([self.actor_id] * n, dtype=object),
        }
