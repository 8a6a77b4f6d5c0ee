"""Padding prepared documents into a batch (right padding)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    loss_mask: torch.Tensor  # [B, T] float, 1 where token t is a response target (predicted from t-1)
    doc_ids: torch.Tensor  # [B] long
    targets: tuple[torch.Tensor, torch.Tensor] | None = None
    """(b, p) of every target row: document b's token p + 1 is a response target predicted from position
    p, in row-major order (what `nonzero` of the target mask gives). `collate` computes it on the host,
    so that a pass on a GPU does not wait for a device-to-host `nonzero` in every batch."""
    right_padded: bool | None = None
    """Every row is real tokens then padding (`collate` builds it so); None: not known, check."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On `device`. `non_blocking` to a GPU copies from pinned host memory without waiting for the
        device (a plain host-to-GPU copy from pageable memory synchronises the stream)."""
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=non_blocking)

        targets = None if self.targets is None else (move(self.targets[0]), move(self.targets[1]))
        return Batch(*(move(t) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.doc_ids)), targets, self.right_padded)

    @property
    def n_docs(self) -> int:
        return int(self.input_ids.shape[0])


def target_positions(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, p): token p + 1 of document b is a response target (loss_mask > 0 on a real token)."""
    tmask = (loss_mask[:, 1:] > 0) & (attention_mask[:, 1:] > 0)
    b, p = tmask.nonzero(as_tuple=True)
    return b, p


def _rows_from_columns(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    n = len(batch["doc_id"])
    return [{"doc_id": batch["doc_id"][i], "input_ids": batch["input_ids"][i], "loss_mask": batch["loss_mask"][i]} for i in range(n)]


def collate(rows: Sequence[Mapping[str, Any]] | Mapping[str, Any], pad_id: int = 0) -> Batch:
    """Rows of the `data/` schema (a list of dicts, or a dict of columns as Ray Data gives) → Batch."""
    if isinstance(rows, Mapping):
        rows = _rows_from_columns(rows)
    if len(rows) == 0:
        raise ValueError("collate: empty batch")
    lengths = [len(r["input_ids"]) for r in rows]
    T = max(lengths)
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    attn = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.float32)
    for b, r in enumerate(rows):
        n = lengths[b]
        ids[b, :n] = np.asarray(r["input_ids"], dtype=np.int64)
        attn[b, :n] = 1
        mask[b, :n] = np.asarray(r["loss_mask"], dtype=np.float32)
    doc_ids = np.asarray([int(r["doc_id"]) for r in rows], dtype=np.int64)
    attn_t, mask_t = torch.from_numpy(attn), torch.from_numpy(mask)
    return Batch(torch.from_numpy(ids), attn_t, mask_t, torch.from_numpy(doc_ids), target_positions(attn_t, mask_t), right_padded=True)
