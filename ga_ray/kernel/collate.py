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

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.doc_ids)))

    @property
    def n_docs(self) -> int:
        return int(self.input_ids.shape[0])


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
    return Batch(torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(mask), torch.from_numpy(doc_ids))
