"""The whole EKFAC computation for one process or one of W workers (no Ray, no files).

`compute_factors(model, blocks, batches, ...)`: pass 1 (covariances, all-reduced), float64
eigendecompositions spread over the workers (block i on rank i % W; the results are shared with a
sum-all-reduce of disjoint contributions, which is exact), pass 2 (Λ, all-reduced), top-k
selection. With `LocalComm` (the default) it is the plain single-process computation the tests use
as the reference; inside Ray Train workers the stage passes a `TorchDistComm`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ga_ray.errors import GaRayError
from torch import nn

from ga_ray.kernel.collate import Batch
from ga_ray.factors.covariance import CovarianceAccumulator, describe_nonfinite
from ga_ray.factors.distributed import LocalComm
from ga_ray.factors.eigen import LambdaAccumulator, eigendecompose, eigen_scores, lambda_mass_kept, select_top_k
from ga_ray.factors.factors import FactorBlock, Factors
from ga_ray.kernel.per_document import per_document_gradients
from ga_ray.kernel.lora_blocks import LoraBlock


class NonFiniteFactorError(GaRayError, ValueError):
    """A NaN/Inf in a factor; the message names the block and the first batch where it appeared."""


@dataclass
class FactorSettings:
    fisher: Literal["true", "empirical"] = "true"
    reduction: Literal["sum", "mean"] = "sum"
    seed: int = 0
    eigenvalues: Literal["ekfac", "kfac"] = "ekfac"
    top_k: int = 50
    epsilon: float = 1e-6
    cov_dtype: torch.dtype = torch.float32
    """dtype of the per-batch token sums (accumulated across batches in float64)."""
    keep_covariances: bool = True
    """Keep C_A, C_S in the result (they are saved; not needed to project)."""


def batch_label(rank: int, index: int, batch: Batch, loss: torch.Tensor | None = None) -> str:
    """`worker R batch I (doc_ids a..b)`, plus the documents whose loss is NaN/Inf, if any."""
    ids = batch.doc_ids.tolist()
    span = f"doc_ids {ids[0]}..{ids[-1]}" if len(ids) > 1 else f"doc_id {ids[0]}"
    if loss is not None:
        bad = (~torch.isfinite(loss)).nonzero().flatten().cpu().tolist()
        if bad:
            span += f"; non-finite loss for doc_id(s) {', '.join(str(ids[i]) for i in bad[:10])}"
    return f"worker {rank} batch {index} ({span})"


def covariance_pass(
    model: nn.Module, blocks: Sequence[LoraBlock], batches: Iterable[Batch], settings: FactorSettings, *, device: torch.device | str = "cpu", rank: int = 0, progress: Callable | None = None
) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(blocks, device=device)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        res = per_document_gradients(
            model, blocks, batch, labels=settings.fisher, seed=settings.seed, reduction=settings.reduction, covariances=True, per_doc=False, cov_dtype=settings.cov_dtype
        )
        acc.update(res, batch_label(rank, i, batch, res.loss))
        if progress:
            progress(batch.n_docs)
    return acc


def lambda_pass(
    model: nn.Module,
    blocks: Sequence[LoraBlock],
    batches: Iterable[Batch],
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    settings: FactorSettings,
    *,
    device: torch.device | str = "cpu",
    rank: int = 0,
    progress: Callable | None = None,
) -> LambdaAccumulator:
    acc = LambdaAccumulator(bases, device=device)
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        res = per_document_gradients(model, blocks, batch, labels=settings.fisher, seed=settings.seed, reduction=settings.reduction)
        acc.update(res.grads, batch_label(rank, i, batch, res.loss), n_docs=batch.n_docs)
        if progress:
            progress(batch.n_docs)
    return acc


def _raise_nonfinite(comm, trackers_found: list, names: Sequence[str], what: str) -> None:
    gathered = comm.all_gather_object(trackers_found)
    found = [x for part in gathered for x in part]
    msg = describe_nonfinite(found, names, what)
    if msg:
        raise NonFiniteFactorError(msg)


def distributed_eigen(covs: dict[str, tuple[torch.Tensor, torch.Tensor]], names: Sequence[str], comm, device: torch.device | str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Eigendecompose every block's (C_A, C_S): block i on rank i % W, then share (sum of disjoint parts).

    Returns block → {Q_A, lambda_A, Q_S, lambda_S (float64), stats [n_clamped_A, n_clamped_S, min_A, min_S]}.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for idx, name in enumerate(names):
        C_A, C_S = covs[name]
        dA, dS = C_A.shape[0], C_S.shape[0]
        if idx % comm.world == comm.rank:
            eA, eS = eigendecompose(C_A), eigendecompose(C_S)
            out[name] = {
                "Q_A": eA.Q.to(device),
                "lambda_A": eA.values.to(device),
                "Q_S": eS.Q.to(device),
                "lambda_S": eS.values.to(device),
                "stats": torch.tensor([eA.n_clamped, eS.n_clamped, eA.min_raw, eS.min_raw], dtype=torch.float64, device=device),
            }
        else:
            z = lambda *s: torch.zeros(s, dtype=torch.float64, device=device)  # noqa: E731
            out[name] = {"Q_A": z(dA, dA), "lambda_A": z(dA), "Q_S": z(dS, dS), "lambda_S": z(dS), "stats": z(4)}
    if comm.world > 1:
        comm.all_reduce_sum([t for name in names for t in out[name].values()])
    return out


def compute_factors(
    model: nn.Module,
    blocks: Sequence[LoraBlock],
    batches: Callable[[], Iterable[Batch]],
    settings: FactorSettings,
    *,
    lambda_batches: Callable[[], Iterable[Batch]] | None = None,
    comm: LocalComm | None = None,
    device: torch.device | str = "cpu",
    timings: dict[str, float] | None = None,
    progress: Callable[[str], Callable | None] | None = None,
) -> Factors:
    """EKFAC factors of `model`'s LoRA blocks over the documents `batches()` yields (see module doc).

    `batches` / `lambda_batches` are callables returning a fresh iterator (each pass re-reads);
    `lambda_batches` (default: `batches`) feeds the Λ pass, e.g. a seeded subsample. With several
    workers each yields its own shard and `comm` sums. Raises `NonFiniteFactorError`.
    """
    comm = comm or LocalComm()
    timings = timings if timings is not None else {}
    names = [b.name for b in blocks]
    progress = progress or (lambda what: None)

    t0 = time.perf_counter()
    cov = covariance_pass(model, blocks, batches(), settings, device=device, rank=comm.rank, progress=progress("covariances"))
    local_docs = cov.n_docs
    comm.all_reduce_sum(cov.state_tensors())
    _raise_nonfinite(comm, cov.nonfinite.to_list(), names, "covariances (pass 1)")
    comm.barrier()
    timings["covariance_pass_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    covs = cov.covariances()
    eig = distributed_eigen(covs, names, comm, device=device)
    bad = [n for n in names if not all(bool(t.isfinite().all()) for t in eig[n].values())]
    if bad:
        raise NonFiniteFactorError(f"NaN/Inf in the eigendecomposition of block {bad[0]}; the covariances were finite, so this is a numerical failure: try model.dtype=float32")
    comm.barrier()
    timings["eigendecomposition_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bases = {n: (eig[n]["Q_S"], eig[n]["Q_A"]) for n in names}
    lam = lambda_pass(model, blocks, (lambda_batches or batches)(), bases, settings, device=device, rank=comm.rank, progress=progress("lambda"))
    comm.all_reduce_sum(lam.state_tensors())
    _raise_nonfinite(comm, lam.nonfinite.to_list(), names, "EKFAC eigenvalue correction Λ (pass 2)")
    comm.barrier()
    timings["lambda_pass_s"] = time.perf_counter() - t0

    Lambdas = lam.lambdas()
    out_blocks = []
    for b in blocks:
        e = eig[b.name]
        scores = eigen_scores(settings.eigenvalues, Lambdas[b.name], e["lambda_S"], e["lambda_A"])
        sel = select_top_k(scores, settings.top_k)
        stats = e["stats"].cpu().tolist()
        info = {
            "n_clamped_A": int(round(stats[0])),
            "n_clamped_S": int(round(stats[1])),
            "min_eig_A_raw": stats[2],
            "min_eig_S_raw": stats[3],
            "lambda_kept": lambda_mass_kept(Lambdas[b.name], sel),
        }
        out_blocks.append(
            FactorBlock(
                name=b.name,
                kind=b.kind,
                shape=b.shape,
                scale=b.scale,
                module_name=b.module_name,
                Q_A=e["Q_A"],
                lambda_A=e["lambda_A"],
                Q_S=e["Q_S"],
                lambda_S=e["lambda_S"],
                Lambda=Lambdas[b.name],
                selected=sel,
                C_A=covs[b.name][0] if settings.keep_covariances else None,
                C_S=covs[b.name][1] if settings.keep_covariances else None,
                info=info,
            )
        )
    meta = {
        "fisher": settings.fisher,
        "eigenvalues": settings.eigenvalues,
        "top_k": settings.top_k,
        "epsilon": settings.epsilon,
        "reduction": settings.reduction,
        "seed": settings.seed,
        "n_tokens": cov.n_tokens,
        "n_docs": cov.n_docs,
        "n_docs_lambda": lam.n_docs,
        "padding_fraction": round(cov.padding_fraction, 6),
        "n_clamped_eigenvalues": sum(ob.info["n_clamped_A"] + ob.info["n_clamped_S"] for ob in out_blocks),
        "num_workers": comm.world,
        "docs_per_worker": [int(x) for x in comm.all_gather_object(local_docs)],
    }
    return Factors(out_blocks, meta)


# ------------------------------------------------------------------ Λ subsample (seeded, shard-independent)
def bucketed_batches(columns_iter: Iterable[dict], batch_size: int, max_tokens: int, pad_id: int = 0) -> Iterable[Batch]:
    """Batches from windows of rows (dicts of columns, as Ray Data gives): each window sorted by length
    and cut by `ga_ray.kernel.batching.plan_batches` (≤ batch_size docs, ≤ max_tokens padded tokens)."""
    from ga_ray.kernel.collate import collate
    from ga_ray.kernel.batching import plan_batches

    for cols in columns_iter:
        n = len(cols["doc_id"])
        if n == 0:
            continue
        lengths = np.fromiter((len(x) for x in cols["input_ids"]), dtype=np.int64, count=n)
        for idx in plan_batches(lengths, batch_size, max_tokens):
            rows = [{"doc_id": int(cols["doc_id"][i]), "input_ids": cols["input_ids"][i], "loss_mask": cols["loss_mask"][i]} for i in idx]
            yield collate(rows, pad_id=pad_id)


def subsample_keys(doc_ids: Iterable[int], seed: int) -> np.ndarray:
    """A pseudo-random 63-bit key per doc_id that depends only on (seed, doc_id)."""
    out = []
    for d in doc_ids:
        h = hashlib.blake2b(f"ga-ray-lambda:{int(seed)}:{int(d)}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return np.asarray(out, dtype=np.int64)


def subsample_threshold(doc_ids: Sequence[int] | np.ndarray, seed: int, max_docs: int | None) -> int | None:
    """Key threshold keeping exactly `max_docs` of `doc_ids` (keep key ≤ threshold); None keeps all."""
    if max_docs is None or max_docs >= len(doc_ids):
        return None
    if max_docs <= 0:
        raise ValueError(f"lambda_max_docs must be positive, got {max_docs}")
    keys = np.sort(subsample_keys(doc_ids, seed))
    return int(keys[max_docs - 1])


def in_subsample(doc_ids: Iterable[int], seed: int, threshold: int | None) -> np.ndarray:
    keys = subsample_keys(doc_ids, seed)
    if threshold is None:
        return np.ones(len(keys), dtype=bool)
    return keys <= threshold
