"""The few collectives the factors computation needs, with a no-op single-process version.

`get_comm()` returns a `TorchDistComm` inside a `torch.distributed` process group of more than one
rank (Ray Train's workers: gloo on CPU, NCCL on GPU) and a `LocalComm` otherwise (one worker, or
plain tests), so the same compute code runs in both.
"""

from __future__ import annotations

from typing import Any

import torch


class LocalComm:
    rank = 0
    world = 1

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over ranks, in place."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass


class TorchDistComm(LocalComm):
    """Bucketed all-reduce over an initialised `torch.distributed` default group."""

    def __init__(self, bucket_elems: int = 1 << 25):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        backend = str(dist.get_backend()).lower()
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.bucket_elems = bucket_elems

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            bucket: list[torch.Tensor] = []
            size = 0
            for t in group:
                if bucket and size + t.numel() > self.bucket_elems:
                    self._reduce_bucket(bucket)
                    bucket, size = [], 0
                bucket.append(t)
                size += t.numel()
            if bucket:
                self._reduce_bucket(bucket)

    def _reduce_bucket(self, bucket: list[torch.Tensor]) -> None:
        flat = torch.cat([t.reshape(-1).to(self.device) for t in bucket])
        self.dist.all_reduce(flat, op=self.dist.ReduceOp.SUM)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.device))
            offset += n

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()


def get_comm() -> LocalComm:
    try:
        import torch.distributed as dist
    except ImportError:  # torch built without distributed support
        return LocalComm()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistComm()
    return LocalComm()
