"""Coherence of an atom: the mean off-diagonal cosine of its top documents' RAW gradients.

Pure compute (no Ray, no files). For atom k with top documents T_k (|T_k| = k), u_i = g_i/‖g_i‖:

    coherence_k = (1 / (k(k-1))) Σ_{i≠j ∈ T_k} u_i·u_j = (‖Σ_i u_i‖² − Σ_i ‖u_i‖²) / (k(k−1))

`Σ_i ‖u_i‖²` is k when every gradient is non-zero; a document whose gradient is zero or not finite
contributes u = 0 (its cosines count as 0, and it is reported). Atoms with fewer than two top
documents have no coherence (NaN).

Memory: never an N × P matrix. The work is split into groups of atoms (`plan_groups`); a group's
documents (the union of its atoms' top documents) are pushed through in batches, and a
`GroupAccumulator` keeps one P-vector Σu per atom of the group. So memory is
(atoms per group + batch) × P, whatever N, K and the union are; a document shared by atoms of
different groups is recomputed once per group (`plan_groups` packs overlapping atoms together to keep
that small).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


def coherence_from_sums(sq_norm_sum: np.ndarray, unit_count: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(‖Σu‖² − Σ‖u‖²) / (k(k−1)) elementwise; NaN where k < 2."""
    sq = np.asarray(sq_norm_sum, dtype=np.float64)
    n1 = np.asarray(unit_count, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    out = np.full(sq.shape, np.nan, dtype=np.float64)
    ok = k >= 2
    out[ok] = (sq[ok] - n1[ok]) / (k[ok] * (k[ok] - 1.0))
    return out


def dense_coherence(G: np.ndarray | torch.Tensor, top_rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Reference: the mean off-diagonal cosine of rows `top_rows[k]` of a dense G [N, P] (float64).

    Zero rows have cosine 0 with everything (the same convention as `GroupAccumulator`).
    """
    G = torch.as_tensor(np.asarray(G) if not isinstance(G, torch.Tensor) else G).to(torch.float64)
    norms = G.norm(dim=1, keepdim=True)
    U = torch.where(norms > 0, G / norms.clamp_min(1e-300), torch.zeros_like(G))
    out = np.full(len(top_rows), np.nan)
    for a, rows in enumerate(top_rows):
        k = len(rows)
        if k < 2:
            continue
        u = U[list(rows)]
        C = u @ u.T
        off = C.sum() - torch.diagonal(C).sum()
        out[a] = float(off) / (k * (k - 1))
    return out


def flatten_unit(grads: Mapping[str, torch.Tensor], order: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-document gradients {block: [B, o, i]} → (U [B, P] float32 unit rows, norms [B] float64, valid [B] bool).

    Rows whose gradient is zero or not finite come back as zeros with `valid` False.
    """
    flat = torch.cat([grads[name].reshape(grads[name].shape[0], -1).float() for name in order], dim=1)
    norms = flat.double().norm(dim=1)
    valid = torch.isfinite(norms) & (norms > 0)
    scale = torch.where(valid, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms)).to(flat.dtype)
    U = torch.where(valid[:, None], flat * scale[:, None], torch.zeros_like(flat))
    return U, norms, valid


@dataclass
class Group:
    """A unit of coherence work: some atoms and the union of their top documents."""

    atoms: list[int]
    members: list[list[int]]  # per atom of the group, its top document ids (in rank order)
    doc_ids: list[int] = field(default_factory=list)  # the union, in first-seen order

    def __post_init__(self) -> None:
        if not self.doc_ids:
            seen: dict[int, None] = {}
            for m in self.members:
                for d in m:
                    seen.setdefault(int(d), None)
            self.doc_ids = list(seen)


def plan_groups(top_docs: Mapping[int, Sequence[int]], max_atoms_per_group: int, min_groups: int = 1) -> list[Group]:
    """Pack atoms (with ≥ 2 top documents) into groups of at most `max_atoms_per_group`.

    Greedy: a group starts with the lowest-numbered unassigned atom and grows with the unassigned atom
    that shares the most documents with the group's union so far (ties: lowest atom number), so
    documents shared by several atoms are computed once. At least `min_groups` groups when there are
    that many atoms (so every actor of the pool has work). Deterministic.
    """
    atoms = sorted(a for a, docs in top_docs.items() if len(docs) >= 2)
    if not atoms:
        return []
    cap = max(1, int(max_atoms_per_group))
    if min_groups > 1:
        cap = max(1, min(cap, -(-len(atoms) // min_groups)))
    pos = {a: i for i, a in enumerate(atoms)}
    doc_to_atoms: dict[int, list[int]] = {}
    for a in atoms:
        for d in top_docs[a]:
            doc_to_atoms.setdefault(int(d), []).append(pos[a])
    unassigned = np.ones(len(atoms), dtype=bool)
    groups: list[Group] = []
    while unassigned.any():
        first = int(np.flatnonzero(unassigned)[0])
        overlap = np.zeros(len(atoms), dtype=np.int64)
        union: set[int] = set()
        chosen: list[int] = []

        def take(i: int) -> None:
            unassigned[i] = False
            chosen.append(i)
            for d in top_docs[atoms[i]]:
                d = int(d)
                if d not in union:
                    union.add(d)
                    for j in doc_to_atoms[d]:
                        overlap[j] += 1

        take(first)
        while len(chosen) < cap and unassigned.any():
            score = np.where(unassigned, overlap, -1)
            best = int(np.argmax(score))  # first maximum: lowest atom number on ties
            take(best)
        chosen_atoms = [atoms[i] for i in chosen]
        groups.append(Group(atoms=chosen_atoms, members=[[int(d) for d in top_docs[a]] for a in chosen_atoms]))
    return groups


class GroupAccumulator:
    """Σu per atom of one group, fed batch by batch; memory = atoms of the group × P."""

    def __init__(self, group: Group, n_params: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.group = group
        self.device = torch.device(device)
        self.sums = torch.zeros(len(group.atoms), n_params, dtype=dtype, device=self.device)
        self.unit_count = np.zeros(len(group.atoms), dtype=np.float64)
        self.k = np.asarray([len(m) for m in group.members], dtype=np.int64)
        self.seen: dict[int, int] = {}  # doc id -> times added (each must be exactly once)
        self.invalid_docs: list[int] = []
        self._col = {d: c for c, d in enumerate(group.doc_ids)}
        member = np.zeros((len(group.atoms), len(group.doc_ids)), dtype=np.float32)
        for r, m in enumerate(group.members):
            for d in m:
                member[r, self._col[int(d)]] = 1.0
        self.membership = torch.from_numpy(member)

    def add(self, doc_ids: Sequence[int], U: torch.Tensor, valid: torch.Tensor) -> None:
        """Add a batch of unit rows U [B, P] (zeros where not valid) for documents `doc_ids`."""
        cols = [self._col[int(d)] for d in doc_ids]
        for d in doc_ids:
            self.seen[int(d)] = self.seen.get(int(d), 0) + 1
        M = self.membership[:, cols]  # [A, B]
        v = valid.detach().cpu().numpy().astype(bool)
        self.invalid_docs.extend(int(d) for d, ok in zip(doc_ids, v) if not ok)
        self.unit_count += M.numpy() @ v.astype(np.float64)
        self.sums += M.to(device=U.device, dtype=self.sums.dtype) @ U.to(self.sums.dtype)

    def result(self) -> dict[str, list]:
        missing = [d for d in self.group.doc_ids if self.seen.get(d, 0) != 1]
        if missing:
            raise RuntimeError(f"coherence group: documents not added exactly once: {missing[:10]}")
        sq = (self.sums.double() ** 2).sum(dim=1).cpu().numpy()
        coh = coherence_from_sums(sq, self.unit_count, self.k)
        return {
            "atom": list(self.group.atoms),
            "sq_norm_sum": sq.tolist(),
            "unit_count": self.unit_count.tolist(),
            "k": self.k.tolist(),
            "coherence": coh.tolist(),
            "invalid_docs": sorted(set(self.invalid_docs)),
        }
