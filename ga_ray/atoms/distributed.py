"""Ray wiring (thin): `BlockCoder`s as Ray actors behind the trainer's `Pool` interface.

Each actor reads its own pieces of the `gradients/` Parquet files directly with pyarrow (the
deterministic equivalent of `ray.data.read_parquet(...).streaming_split(W, equal=True)`: the piece →
worker assignment is a pure function of the seed, so the global mini-batch is the same rows for any
W, which `streaming_split`'s dynamic assignment does not guarantee). Per step the driver `ray.put`s
the dictionary and its Gram matrix once; every actor codes its rows of the batch and returns them
with their codes and costs; the driver merges the parts in stream order and updates (see
`ga_ray.atoms.trainer`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from ga_ray.atoms.io import ParquetPieceReader, Piece
from ga_ray.atoms.stream import BlockCoder, CodedPart, StreamPlan
from ga_ray.atoms.trainer import _merge_rows


class CoderActorImpl:
    """The actor body: a BlockCoder over Parquet pieces."""

    def __init__(self, pieces: list[Piece], plan: StreamPlan, rank: int, world: int, alpha: float, opts: dict[str, Any]):
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        threads = int(opts.pop("num_threads", 0) or 0)
        if threads:
            torch.set_num_threads(threads)
        self.coder = BlockCoder(ParquetPieceReader(pieces), plan, rank, world, alpha, **opts)

    def ready(self) -> int:
        return os.getpid()

    def code(self, epoch: int, start: int, stop: int, D: np.ndarray, G: np.ndarray, warm: tuple[np.ndarray, np.ndarray] | None) -> CodedPart:
        return self.coder.code(epoch, start, stop, D, G, warm)

    def heldout(self, D: np.ndarray, G: np.ndarray) -> tuple[float, float, int]:
        return self.coder.heldout_cost(D, G)

    def rows(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        pos, X = self.coder.rows_at(epoch, start, stop)
        return pos, X.cpu().numpy()


class RayPool:
    """W CoderActors; the trainer's Pool interface."""

    def __init__(
        self,
        pieces: list[Piece],
        plan: StreamPlan,
        world: int,
        alpha: float,
        *,
        lasso_tol: float,
        lasso_max_iter: int,
        use_gpu: bool = False,
        cpus_per_worker: float = 1.0,
        num_threads: int | None = None,
        matmul_precision: str = "float32",
    ):
        import ray

        self.ray = ray
        actor_cls = ray.remote(CoderActorImpl)
        opts = {
            "lasso_tol": lasso_tol,
            "lasso_max_iter": lasso_max_iter,
            "device": "cuda" if use_gpu else "cpu",
            "num_threads": num_threads or max(1, int(cpus_per_worker)),
            "matmul_precision": matmul_precision,
        }
        self.actors = [
            actor_cls.options(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0).remote(pieces, plan, r, world, alpha, dict(opts))
            for r in range(world)
        ]
        ray.get([a.ready.remote() for a in self.actors])

    def broadcast(self, D: torch.Tensor, G: torch.Tensor) -> Any:
        return (self.ray.put(D.detach().cpu().numpy()), self.ray.put(G.detach().cpu().numpy()))

    def code(self, handle: Any, epoch: int, start: int, stop: int, warm: tuple[np.ndarray, np.ndarray] | None = None) -> list[CodedPart]:
        D, G = handle
        w = self.ray.put(warm) if warm is not None else None  # once for all actors
        return self.ray.get([a.code.remote(epoch, start, stop, D, G, w) for a in self.actors])

    def heldout(self, handle: Any) -> tuple[float, float, int]:
        D, G = handle
        parts = self.ray.get([a.heldout.remote(D, G) for a in self.actors])
        return sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts)

    def rows(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return _merge_rows(self.ray.get([a.rows.remote(epoch, start, stop) for a in self.actors]))

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
