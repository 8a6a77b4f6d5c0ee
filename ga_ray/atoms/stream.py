"""The row stream: which rows form each mini-batch, independent of how many workers read them.

The data is a list of *pieces* (Parquet row groups, or slices of an in-memory tensor) with known row
counts. A `StreamPlan` fixes, from the seed alone:

- the held-out rows (uniform random global row indices, at most `heldout_max_rows`);
- per epoch, a random order of the pieces, cut into *windows* of about `window_rows` rows;
- per window, a random permutation of its training rows.

Concatenating the permuted windows gives the epoch's row stream; mini-batch t is stream positions
[t·n, (t+1)·n) (the last batch of an epoch is smaller, as in scikit-learn). A worker of rank r out
of W loads the pieces at window slots j ≡ r (mod W) and codes the batch rows that fall in them, so
the global batch is the same rows whatever W is, and a worker holds at most two windows' worth of
its rows: memory does not grow with N. Pure numpy/torch (no Ray, no files); the Parquet reader is in
`ga_ray.atoms.io`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ga_ray.atoms import warm as warm_codes
from ga_ray.atoms.compiled import HAVE_NUMBA, njit
from ga_ray.atoms.lasso import lasso_gram, row_objective
from ga_ray.atoms.precision import product_dtype
from ga_ray.atoms.threads import matmul

# A piece reader: piece index → (doc_ids int64 [n], Z float32 [n, P]) of that piece, in stored order.
PieceReader = Callable[[int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Window:
    epoch: int
    index: int
    start: int
    """Stream position of the window's first row within its epoch."""
    pieces: tuple[int, ...]
    n_rows: int
    """Training rows (held-out rows excluded)."""


@dataclass(frozen=True)
class StreamPlan:
    piece_rows: tuple[int, ...]
    batch_size: int
    window_rows: int
    seed: int
    heldout_fraction: float = 0.05
    heldout_max_rows: int = 10_000

    @cached_property
    def piece_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.piece_rows)]).astype(np.int64)

    @property
    def n_rows(self) -> int:
        return int(self.piece_offsets[-1])

    @cached_property
    def heldout(self) -> np.ndarray:
        """Sorted global indices of the held-out rows."""
        n = self.n_rows
        h = min(int(round(self.heldout_fraction * n)), self.heldout_max_rows, max(n - 1, 0))
        if h <= 0:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 0x4E1D])
        return np.sort(rng.choice(n, size=h, replace=False)).astype(np.int64)

    @cached_property
    def _heldout_per_piece(self) -> list[np.ndarray]:
        off = self.piece_offsets
        out = []
        for p in range(len(self.piece_rows)):
            lo, hi = np.searchsorted(self.heldout, [off[p], off[p + 1]])
            out.append(self.heldout[lo:hi] - off[p])
        return out

    def heldout_local(self, piece: int) -> np.ndarray:
        """Held-out rows of a piece (local row indices)."""
        return self._heldout_per_piece[piece]

    def train_local(self, piece: int) -> np.ndarray:
        """Training rows of a piece (local row indices, stored order)."""
        mask = np.ones(self.piece_rows[piece], dtype=bool)
        mask[self.heldout_local(piece)] = False
        return np.nonzero(mask)[0]

    @property
    def n_train(self) -> int:
        return self.n_rows - len(self.heldout)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_train / self.batch_size))

    def batch_bounds(self, global_step: int) -> tuple[int, int, int]:
        """(epoch, start, stop) stream positions of mini-batch `global_step`."""
        epoch, b = divmod(global_step, self.steps_per_epoch)
        start = b * self.batch_size
        return epoch, start, min(start + self.batch_size, self.n_train)

    def windows(self, epoch: int) -> list[Window]:
        order = np.random.default_rng([self.seed, 0xE9, epoch]).permutation(len(self.piece_rows))
        out: list[Window] = []
        cur: list[int] = []
        rows = 0
        start = 0
        for p in order.tolist():
            n_p = self.piece_rows[p] - len(self.heldout_local(p))
            if n_p == 0:
                continue
            cur.append(p)
            rows += n_p
            if rows >= self.window_rows:
                out.append(Window(epoch, len(out), start, tuple(cur), rows))
                start += rows
                cur, rows = [], 0
        if cur:
            out.append(Window(epoch, len(out), start, tuple(cur), rows))
        return out

    def window_permutation(self, w: Window) -> np.ndarray:
        """perm[j] = index (in the window's concatenated training rows) of stream position start + j."""
        return np.random.default_rng([self.seed, 0x5F, w.epoch, w.index]).permutation(w.n_rows)

    def row_ids(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Global row indices (into the concatenated pieces) at stream positions [start, stop) of `epoch`."""
        return self._epoch_row_ids(epoch)[start:stop]

    @functools.lru_cache(maxsize=2)  # this epoch's and the last one's (N int64 each)
    def _epoch_row_ids(self, epoch: int) -> np.ndarray:
        parts = []
        for w in self.windows(epoch):
            ids = np.concatenate([self.piece_offsets[p] + self.train_local(p) for p in w.pieces])
            parts.append(ids[self.window_permutation(w)])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def normalise_rows(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = z / ‖z‖ (zero rows stay zero); returns (X, ‖z‖)."""
    norms = torch.linalg.vector_norm(Z, dim=1)
    X = Z / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    return X, norms


@dataclass
class CodedPart:
    """One worker's share of a mini-batch: numpy arrays, cheap to ship through Ray; or, from
    `BlockCoder.code(on_device=True)`, X, C, rec and l1 as tensors on the coder's device."""

    positions: np.ndarray  # int64 [m] stream positions
    X: np.ndarray | torch.Tensor  # float [m, P] normalised rows
    C: np.ndarray | torch.Tensor  # float [m, K] codes
    rec: np.ndarray | torch.Tensor  # float64 [m] ½‖x − cD‖²
    l1: np.ndarray | torch.Tensor  # float64 [m] α‖c‖₁
    n_unconverged: int = 0
    coder_iters: int = 0


class BlockCoder:
    """A worker: loads its pieces of each window, codes its rows of each mini-batch.

    Stateless across steps except for the cached windows (rebuilt on demand, so a resumed run needs
    nothing else) and its held-out rows.
    """

    def __init__(
        self,
        reader: PieceReader,
        plan: StreamPlan,
        rank: int,
        world: int,
        alpha: float,
        *,
        lasso_tol: float = 1e-6,
        lasso_max_iter: int = 500,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
        matmul_precision: str = "float32",
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.reader = reader
        self.plan = plan
        self.rank = rank
        self.world = world
        self.alpha = alpha
        self.tol = lasso_tol
        self.max_iter = lasso_max_iter
        self.device = torch.device(device)
        self.dtype = dtype
        # the correlations X·Dᵀ in bfloat16 where that is native (`ga_ray.atoms.precision`)
        self.product_dtype = product_dtype(matmul_precision, self.device)
        self._windows: dict[tuple[int, int], tuple[Window, np.ndarray, torch.Tensor]] = {}
        self._spare: np.ndarray | None = None
        self._window_buffers: dict[tuple[int, int], np.ndarray] = {}  # host buffers the cached windows' X share
        self._epoch_windows: dict[int, list[Window]] = {}
        self._heldout: torch.Tensor | None = None

    # ---- data ----------------------------------------------------------------------------------
    def _rows(self, piece: int, local: np.ndarray) -> np.ndarray:
        _, Z = self.reader(piece)
        return np.asarray(Z[local], dtype=np.float32)

    def _window_list(self, epoch: int) -> list[Window]:
        if epoch not in self._epoch_windows:
            self._epoch_windows = {epoch: self.plan.windows(epoch)}
        return self._epoch_windows[epoch]

    def _load_window(self, w: Window) -> tuple[Window, np.ndarray, torch.Tensor]:
        """(window, sorted stream positions of my rows, my rows in that order, normalised)."""
        key = (w.epoch, w.index)
        if key in self._windows:
            return self._windows[key]
        perm = self.plan.window_permutation(w)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        mine: list[tuple[int, np.ndarray, np.ndarray]] = []  # (piece, local rows, stream positions)
        base = 0
        for slot, p in enumerate(w.pieces):
            local = self.plan.train_local(p)
            if slot % self.world == self.rank and len(local):
                mine.append((p, local, inv[base : base + len(local)]))
            base += len(local)
        if mine:
            pos_all = np.concatenate([m[2] for m in mine])
            order = np.argsort(pos_all, kind="stable")
            dest = np.empty_like(order)
            dest[order] = np.arange(len(order))
            out: np.ndarray | None = None
            off = 0
            for p, local, _ in mine:  # each piece's rows go straight to their sorted slots
                _, Z = self.reader(p)
                if out is None:
                    buf = self._buffer(len(order), Z.shape[1])
                    out = buf[: len(order)]
                _gather_rows(Z, local, dest[off : off + len(local)], out)
                off += len(local)
            pos = pos_all[order].astype(np.int64) + w.start
            X = torch.from_numpy(out).to(self.device, self.dtype)
            if X.data_ptr() != out.__array_interface__["data"][0]:
                # a copy (another device or dtype; from pageable memory the copy has finished): the
                # buffer is free for the next window at once
                self._spare = buf
            else:
                self._window_buffers[key] = buf
            norms = torch.linalg.vector_norm(X, dim=1, keepdim=True)
            if not bool(torch.isfinite(norms).all()):
                raise ValueError(f"non-finite values in gradients rows of window {w.index} (pieces {w.pieces}): re-run the gradients stage")
            X.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))
        else:
            pos = np.zeros(0, dtype=np.int64)
            X = torch.zeros(0, 0, device=self.device, dtype=self.dtype)
        entry = (w, pos, X)
        self._windows[key] = entry
        return entry

    def _buffer(self, n_rows: int, dim: int) -> np.ndarray:
        """A float32 array of at least n_rows × dim for a window's rows: the last dropped window's when
        it is large enough. Writing fresh memory costs a page fault per 4 KiB: on the machines we
        measured a new epoch's window took 30-60 ms that way against 3 ms in reused memory. Windows differ
        by a few held-out rows, so a new buffer has a quarter more rows than asked (pages never written
        cost nothing) and later windows fit in it."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.shape[1] == dim and spare.shape[0] >= n_rows:
            return spare
        return np.empty((n_rows + n_rows // 4, dim), dtype=np.float32)

    def rows_at(self, epoch: int, start: int, stop: int) -> tuple[np.ndarray, torch.Tensor]:
        """My rows at stream positions [start, stop) of `epoch`: (positions, normalised rows)."""
        out_pos, out_x = [], []
        needed = []
        for w in self._window_list(epoch):
            if w.start < stop and w.start + w.n_rows > start:
                needed.append(w)
        keys = {(w.epoch, w.index) for w in needed}
        for key in [k for k in self._windows if k not in keys]:  # at most the windows of one batch stay
            del self._windows[key]
            if key in self._window_buffers:
                self._spare = self._window_buffers.pop(key)  # rows_at hands out copies: nothing else holds it
        for w in needed:
            _, pos, X = self._load_window(w)
            lo, hi = np.searchsorted(pos, [start, stop])
            if hi > lo:
                out_pos.append(pos[lo:hi])
                out_x.append(X[lo:hi])
        if not out_pos:
            return np.zeros(0, dtype=np.int64), torch.zeros(0, 0, device=self.device, dtype=self.dtype)
        return np.concatenate(out_pos), torch.cat(out_x, 0)

    def load_heldout(self) -> int:
        """Read my held-out rows (pieces p ≡ rank mod W); returns how many."""
        rows = []
        for p in range(len(self.plan.piece_rows)):
            if p % self.world != self.rank:
                continue
            local = self.plan.heldout_local(p)
            if len(local):
                rows.append(self._rows(p, local))
        if rows:
            self._heldout, _ = normalise_rows(torch.from_numpy(np.concatenate(rows)).to(self.device, self.dtype))
        else:
            self._heldout = torch.zeros(0, 0, device=self.device, dtype=self.dtype)
        return int(self._heldout.shape[0])

    # ---- compute -------------------------------------------------------------------------------
    def _as_tensor(self, a) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a.to(self.device, self.dtype)
        with warnings.catch_warnings():  # read-only object-store views (the dictionary); only read
            warnings.simplefilter("ignore")
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype)

    def _code(self, X: torch.Tensor, D: torch.Tensor, G: torch.Tensor, init: torch.Tensor | None = None):
        # no float64 G here: the compiled coder reads G as it is, the batched one converts it itself
        Bx = matmul(X, D.T, macs=X.shape[0] * D.shape[0] * D.shape[1], precision=self.product_dtype)
        C, info = lasso_gram(G, Bx, self.alpha, tol=self.tol, max_iter=self.max_iter, init=init)
        sq = (X * X).sum(1)
        rec, l1 = row_objective(C, G, Bx, sq, self.alpha, quad=info.quad)
        return C, rec.to(torch.float64), l1.to(torch.float64), info

    def code(self, epoch: int, start: int, stop: int, D, G, warm: tuple[np.ndarray, np.ndarray] | None = None, on_device: bool = False) -> CodedPart:
        """Code my rows of the mini-batch [start, stop) of `epoch` against dictionary D (Gram G).

        `warm`: the batch's stored codes (`ga_ray.atoms.warm`, one row per stream position in
        [start, stop)) to start the coder from. `on_device`: keep X, C, rec and l1 as tensors on this
        coder's device (an in-process learner on a GPU: no round trip of the batch through the host)."""
        pos, X = self.rows_at(epoch, start, stop)
        Dt, Gt = self._as_tensor(D), self._as_tensor(G)
        K = Dt.shape[0]
        if len(pos) == 0:
            z = np.zeros(0)
            return CodedPart(pos, np.zeros((0, Dt.shape[1]), np.float32), np.zeros((0, K), np.float32), z, z)
        init = None
        if warm is not None:
            mine = pos - start
            C0 = warm_codes.dense(warm[0][mine], warm[1][mine], K)
            init = torch.from_numpy(C0).to(self.device, self.dtype) if C0 is not None else None
        C, rec, l1, info = self._code(X, Dt, Gt, init)
        arrays = (X, C, rec, l1) if on_device else (X.cpu().numpy(), C.cpu().numpy(), rec.cpu().numpy(), l1.cpu().numpy())
        return CodedPart(pos, *arrays, n_unconverged=info.n_unconverged, coder_iters=info.n_iter)

    def heldout_cost(self, D, G) -> tuple[float, float, int]:
        """(Σ ½‖x − cD‖², Σ α‖c‖₁, rows) over my held-out rows."""
        if self._heldout is None:
            self.load_heldout()
        H = self._heldout
        if H.shape[0] == 0:
            return 0.0, 0.0, 0
        Dt, Gt = self._as_tensor(D), self._as_tensor(G)
        rec_s = l1_s = 0.0
        for s in range(0, H.shape[0], 1024):
            _, rec, l1, _ = self._code(H[s : s + 1024], Dt, Gt)
            rec_s += float(rec.sum())
            l1_s += float(l1.sum())
        return rec_s, l1_s, int(H.shape[0])


@njit(cache=True, nogil=True)
def _gather_rows_compiled(Z: np.ndarray, local: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
    for i in range(local.shape[0]):
        out[dest[i]] = Z[local[i]]


def _gather_rows(Z: np.ndarray, local: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
    """out[dest[i]] = Z[local[i]] without the temporary array of `out[dest] = Z[local]` (numpy's path,
    taken without numba or for other dtypes and layouts)."""
    if HAVE_NUMBA and Z.dtype == out.dtype and Z.flags.c_contiguous and len(local):
        _gather_rows_compiled(Z, local.astype(np.int64, copy=False), dest.astype(np.int64, copy=False), out)
    else:
        out[dest] = Z[local]


def tensor_reader(Z: np.ndarray | torch.Tensor, piece_rows: Sequence[int]) -> PieceReader:
    """A PieceReader over an in-memory matrix cut into consecutive pieces."""
    Z = Z.detach().cpu().numpy() if isinstance(Z, torch.Tensor) else np.asarray(Z)
    offs = np.concatenate([[0], np.cumsum(piece_rows)]).astype(np.int64)
    ids = np.arange(Z.shape[0], dtype=np.int64)

    def read(p: int) -> tuple[np.ndarray, np.ndarray]:
        return ids[offs[p] : offs[p + 1]], Z[offs[p] : offs[p + 1]]

    return read


def even_pieces(n: int, piece: int) -> list[int]:
    return [min(piece, n - s) for s in range(0, n, piece)] or [0]
