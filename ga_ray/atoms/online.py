"""Online dictionary learning (Mairal et al. 2010) with scikit-learn's exact update rules.

Pure torch: no Ray, no files. The learner keeps the sufficient statistics

    A = Σ_t w_t C_tᵀC_t / n_t      (K × K)
    B = Σ_t w_t X_tᵀC_t / n_t      (P × K; stored transposed as Bt, K × P)

with scikit-learn's forgetting weights (`MiniBatchDictionaryLearning._update_inner_stats`) and
updates the atoms by one Gauss–Seidel sweep of block-coordinate descent per mini-batch
(scikit-learn's `_update_dict`):  d_k ← d_k + (B_k − A_k D)/A_kk,  d_k ← d_k / max(‖d_k‖, 1).

The sweep is computed in blocks of atoms: for a block J the residuals B_J − A_J D are one GEMM
against the current dictionary, and inside the block each atom corrects its residual for the atoms of
the block already updated (a small GEMV). Same result as the atom-by-atom loop, at GEMM speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ga_ray.atoms.compiled import HAVE_NUMBA, njit
from ga_ray.atoms.lasso import gram, sparse_csr
from ga_ray.atoms.threads import blas_matmul, gemm, matmul, uses_numpy

#: An atom whose A_kk is at most this is unused (scikit-learn's and SPAMS' threshold).
DEAD_THRESHOLD = 1e-6


def forgetting_beta(step: int, batch_size: int) -> float:
    """scikit-learn's forgetting factor for mini-batch `step` (0-based) of `batch_size` rows.

    `A ← beta·A + CᵀC / batch_size` with
    theta = (step+1)·batch_size if step < batch_size − 1 else batch_size² + step + 1 − batch_size,
    beta = (theta + 1 − batch_size) / (theta + 1)   (`batch_size` is the size of *this* batch).
    """
    if step < batch_size - 1:
        theta = (step + 1) * batch_size
    else:
        theta = batch_size**2 + step + 1 - batch_size
    return (theta + 1 - batch_size) / (theta + 1)


@dataclass
class OnlineState:
    """Everything the learner carries from one mini-batch to the next."""

    D: torch.Tensor
    """Dictionary, K × P, rows of norm ≤ 1."""
    A: torch.Tensor
    """Σ w CᵀC / n, K × K."""
    Bt: torch.Tensor
    """(Σ w XᵀC / n)ᵀ, K × P."""
    step: int = 0
    """Mini-batches seen (scikit-learn's `step`)."""
    n_dead_resampled: int = 0
    n_dup_resampled: int = 0
    warm: tuple[np.ndarray, np.ndarray] | None = None
    """The coder's warm starts (`ga_ray.atoms.warm`: per row, atom indices and values; host memory)."""

    @classmethod
    def from_dictionary(cls, D: torch.Tensor) -> "OnlineState":
        K, P = D.shape
        return cls(D=D.clone(), A=torch.zeros(K, K, dtype=D.dtype, device=D.device), Bt=torch.zeros(K, P, dtype=D.dtype, device=D.device))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"dictionary": self.D, "A": self.A, "Bt": self.Bt}
        if self.warm is not None:
            out["warm_indices"], out["warm_values"] = (torch.from_numpy(a) for a in self.warm)
        return out

    def counters(self) -> dict[str, int]:
        return {"step": self.step, "n_dead_resampled": self.n_dead_resampled, "n_dup_resampled": self.n_dup_resampled}

    @classmethod
    def restore(cls, tensors: dict[str, torch.Tensor], counters: dict[str, int]) -> "OnlineState":
        warm = None
        if "warm_indices" in tensors:
            warm = (tensors["warm_indices"].numpy().copy(), tensors["warm_values"].numpy().copy())
        # fresh copies: tensors read from a file can sit at any offset of its buffer, and BLAS rounds
        # differently off its alignment (a resumed run would drift from the unbroken one in the last bits)
        D, A, Bt = (tensors[k].clone() for k in ("dictionary", "A", "Bt"))
        return cls(D=D, A=A, Bt=Bt, warm=warm, **{k: int(v) for k, v in counters.items()})


def update_stats(state: OnlineState, X: torch.Tensor, C: torch.Tensor, forget_exponent: float = 1.0) -> float:
    """scikit-learn's `_update_inner_stats` for one batch (any size, incl. a last smaller one), with the
    old statistics weighted by `forgetting_beta(step, n) ** forget_exponent` (1: scikit-learn's exactly).

    While step < batch − 1, scikit-learn's beta is ≈ 1 − 1/t (t = step + 1: the batches seen, this one
    included), so batch s of t carries weight ≈ s/t in A and B: the rule A_t = (1 − 1/t)^ρ A_{t−1} +
    α_t α_tᵀ of Mairal et al. (JMLR 2010, §3.4, "scaling the past data") with ρ = 1. `forget_exponent`
    ρ gives weights ≈ (s/t)^ρ: the early batches, coded against a poor dictionary, fade faster. Later
    (step ≥ batch − 1) scikit-learn's beta is ≈ 1 − 1/batch, a memory of about `batch` steps, which ρ
    shortens about ρ-fold.
    Scaling A and B together leaves the atom update unchanged, so only these relative weights matter.
    """
    n = X.shape[0]
    beta = forgetting_beta(state.step, n) ** forget_exponent
    if _sparse_kernel_applies(state, X, C):
        # sparse codes on CPU: one compiled pass over the nonzeros. Measured at 256 rows, K 500, P 800,
        # 15 nonzeros per row: 0.40 ms against 0.96 ms for the CSR products below, half of which was
        # building torch's CSR matrix
        A = state.A.numpy()
        real = A.dtype.type  # scalars in the arrays' dtype, so that float32 loops stay float32 (SIMD)
        _scale_and_add_sparse_stats(A, state.Bt.numpy(), C.numpy(), X.numpy(), real(beta), real(1.0 / n))
        return beta
    state.A.mul_(beta)
    state.Bt.mul_(beta)
    CT = sparse_csr(C.T)
    if CT is not None:
        # sparse codes: CᵀC and CᵀX as CSR × dense products (nnz·K and nnz·P multiply-adds), no gather of
        # the used atoms' columns and no scatter back (measured 3× the gather path at K = 500, 7 per row)
        state.A.addmm_(CT, C, alpha=1.0 / n)
        with gemm(CT.values().numel() * X.shape[1]):
            state.Bt.addmm_(CT, X, alpha=1.0 / n)
    else:
        state.A.addmm_(C.T, C, alpha=1.0 / n)
        with gemm(C.numel() * X.shape[1]):
            state.Bt.addmm_(C.T, X, alpha=1.0 / n)
    return beta


def _sparse_kernel_applies(state: OnlineState, X: torch.Tensor, C: torch.Tensor) -> bool:
    """Whether `update_stats` takes the compiled path: numba, CPU, one float dtype, contiguous, and codes
    under 1/16 nonzero (denser codes go to BLAS, which beats a scalar loop there)."""
    tensors = (state.A, state.Bt, X, C)
    return (
        HAVE_NUMBA
        and all(t.device.type == "cpu" and t.dtype == state.A.dtype and t.is_contiguous() for t in tensors)
        and state.A.dtype in (torch.float32, torch.float64)
        and np.count_nonzero(C.numpy()) * 16 < C.numel()
    )


@njit(cache=True, nogil=True)
def _scale_and_add_sparse_stats(A: np.ndarray, Bt: np.ndarray, C: np.ndarray, X: np.ndarray, beta: float, scale: float) -> None:
    """A ← beta·A + scale·CᵀC and Bt ← beta·Bt + scale·CᵀX in place, visiting only C's nonzeros.

    Bt is updated atom by atom from the rows that use the atom (C's columns gathered first), so that each
    row of Bt is read and written once, scaled and accumulated in the same pass.
    """
    n, K = C.shape
    P = X.shape[1]
    for i in range(K):
        for j in range(K):
            A[i, j] *= beta
    counts = np.zeros(K + 1, np.int64)
    idx = np.empty(K, np.int64)
    for r in range(n):  # CᵀC row by row from each row's nonzeros; counts per atom for the CSC below
        m = 0
        for k in range(K):
            if C[r, k] != 0:
                idx[m] = k
                counts[k + 1] += 1
                m += 1
        for a in range(m):
            i = idx[a]
            ci = C[r, i] * scale
            for b in range(m):
                A[i, idx[b]] += ci * C[r, idx[b]]
    for k in range(K):
        counts[k + 1] += counts[k]
    rows = np.empty(counts[K], np.int64)
    vals = np.empty(counts[K], C.dtype)
    fill = counts[:K].copy()
    for r in range(n):  # C's columns: the rows that use each atom, in increasing order
        for k in range(K):
            c = C[r, k]
            if c != 0:
                rows[fill[k]] = r
                vals[fill[k]] = c
                fill[k] += 1
    for k in range(K):
        row = Bt[k]
        for p in range(P):
            row[p] *= beta
        for e in range(counts[k], counts[k + 1]):
            s = vals[e] * scale
            x = X[rows[e]]
            for p in range(P):
                row[p] += s * x[p]


def update_dictionary(
    D: torch.Tensor,
    A: torch.Tensor,
    Bt: torch.Tensor,
    block: int = 16,
    super_block: int = 128,
    skip: torch.Tensor | None = None,
    precision: torch.dtype | None = None,
) -> None:
    """One Gauss–Seidel BCD sweep over the atoms, in place (scikit-learn's `_update_dict` with A, B).

    Atoms with A_kk ≤ DEAD_THRESHOLD (or flagged in `skip`) are left unchanged (the caller resamples
    dead atoms before the sweep, as scikit-learn replaces them during it).

    Blocked: for a super-block S of atoms, R_S = B_S − A_S D is one large GEMM against the current
    dictionary; each block J inside S corrects its rows for the atoms of S updated before it (a small
    GEMM). Inside a block every vector the sweep touches lies in the span of the 2|J| rows
    V = [D_J; R_J], so the sequential atom-by-atom recurrence runs on coefficient vectors of length
    2|J| with norms from the small Gram matrix V Vᵀ (float64), and the block's new atoms are
    materialised by one more GEMM. V is one buffer, so each of the two is a single product. Same result as the atom-by-atom loop up to rounding, without K
    passes over P-long vectors.

    `precision` (bfloat16; `ga_ray.atoms.precision`): each R_S's large product in that type
    (`_rounded_residual`); the rest of the sweep, and D itself, stay in D's dtype.
    """
    K = D.shape[0]
    diag = A.diagonal().double().cpu().numpy()
    skipped = skip.cpu().numpy() if skip is not None else np.zeros(K, dtype=bool)
    live_all = (diag > DEAD_THRESHOLD) & ~skipped
    if not live_all.any():
        return
    P = D.shape[1]
    # On CPU inside the learner the sweep runs on numpy views of the same memory (numpy's BLAS, see
    # `threads.matmul`; each of its ~10 small products per block also costs a few µs less to call)
    on_numpy = uses_numpy(D) and D.is_contiguous()
    # the recurrence reads only A's diagonal blocks in float64: on numpy each block is widened when its
    # turn comes (exact, so the same values) instead of the whole K × K matrix per sweep
    A64 = None if on_numpy else A.double().cpu().numpy()
    Dw, Aw, Bw = (D.numpy(), A.numpy(), Bt.numpy()) if on_numpy else (D, A, Bt)
    large = blas_matmul if on_numpy else matmul
    dS = np.empty((min(super_block, K), P), Dw.dtype) if on_numpy else torch.empty(min(super_block, K), P, dtype=D.dtype, device=D.device)
    V = np.empty((2 * block, P), Dw.dtype) if on_numpy else torch.empty(2 * block, P, dtype=D.dtype, device=D.device)
    recurrence = _block_recurrence if HAVE_NUMBA else _block_recurrence_numpy
    D_low = D.to(precision) if precision is not None else None  # rows refreshed as their super-block changes
    for s0 in range(0, K, super_block):
        s1 = min(K, s0 + super_block)
        if not live_all[s0:s1].any():
            continue
        if D_low is None:
            RS = Bw[s0:s1] - large(Aw[s0:s1], Dw, macs=(s1 - s0) * K * P)  # B_S − A_S D with the current D
        else:
            RS = _rounded_residual(Bw, Aw, Dw, D_low, diag, s0, s1)
        for j0 in range(s0, s1, block):
            j1 = min(s1, j0 + block)
            b = j1 - j0
            DJ = Dw[j0:j1]
            if not live_all[j0:j1].any():
                dS[j0 - s0 : j1 - s0] = 0
                continue
            # the basis V = [D_J; R_J] in one buffer: its Gram matrix is one product, the new atoms another
            Vb = V[: 2 * b]
            Vb[:b] = DJ
            if j0 > s0:  # R_J corrected for the atoms of S already updated in this sweep
                Vb[b:] = RS[j0 - s0 : j1 - s0] - Aw[j0:j1, s0:j0] @ dS[: j0 - s0]
            else:
                Vb[b:] = RS[j0 - s0 : j1 - s0]
            M = Vb @ Vb.T
            M = M.astype(np.float64) if on_numpy else M.double().cpu().numpy()
            Ablk = Aw[j0:j1, j0:j1].astype(np.float64) if A64 is None else np.ascontiguousarray(A64[j0:j1, j0:j1])
            delta = recurrence(Ablk, diag[j0:j1], live_all[j0:j1], M)
            dt = delta.astype(Dw.dtype) if on_numpy else torch.from_numpy(delta).to(D.dtype).to(D.device)
            dSJ = dS[j0 - s0 : j1 - s0]
            dSJ[...] = dt @ Vb  # the new atoms' changes: delta · V
            DJ += dSJ
        if D_low is not None:
            D_low[s0:s1] = torch.as_tensor(Dw[s0:s1]).to(D_low.dtype)


def _rounded_residual(B, A, D, D_low: torch.Tensor, diag: np.ndarray, s0: int, s1: int):
    """B_S − A_S·D with the off-diagonal part of A_S and D rounded to D_low's type (one product), and
    the diagonal term A_kk·d_k in D's own type. That term is most of A_S·D and near convergence nearly
    cancels B_S, so rounding it would put noise of 2⁻⁹ of each atom into each update; the off-diagonal
    part (co-used atoms) is much smaller, and so is its rounding error. Arrays or tensors, like the sweep's."""
    As = torch.as_tensor(A[s0:s1])
    A_off = As.to(D_low.dtype)
    A_off[:, s0:s1].diagonal().zero_()
    Dt = torch.as_tensor(D)
    with gemm(A_off.shape[0] * A_off.shape[1] * Dt.shape[1]):
        R = torch.as_tensor(B[s0:s1]) - (A_off @ D_low).to(Dt.dtype)
    R -= torch.as_tensor(diag[s0:s1], dtype=Dt.dtype, device=Dt.device)[:, None] * Dt[s0:s1]
    return R.numpy() if isinstance(D, np.ndarray) else R


@njit(cache=True, nogil=True)
def _block_recurrence(Ablk: np.ndarray, diag: np.ndarray, live: np.ndarray, M: np.ndarray) -> np.ndarray:
    """The atom-by-atom recurrence of one block in the basis V = [D_J; R_J] (2b coefficients per atom):
    delta[i] = (new atom i) − (old atom i), with norms from M = V Vᵀ. Atom i is e_i until its turn."""
    b = Ablk.shape[0]
    w = 2 * b
    delta = np.zeros((b, w))
    u = np.empty(w)
    for i in range(b):
        if not live[i]:
            continue
        for q in range(w):  # r = e_{b+i} − Σ_{k<i} A_ik delta_k
            acc = 0.0
            for k in range(i):
                acc -= Ablk[i, k] * delta[k, q]
            u[q] = acc
        u[b + i] += 1.0
        inv = 1.0 / diag[i]
        for q in range(w):
            u[q] *= inv
        u[i] += 1.0  # u = e_i + (B_i − A_i D)/A_ii in the basis
        nrm2 = 0.0
        for p in range(w):
            acc = 0.0
            for q in range(w):
                acc += M[p, q] * u[q]
            nrm2 += u[p] * acc
        s = 1.0 / max(np.sqrt(max(nrm2, 0.0)), 1.0)
        for q in range(w):
            delta[i, q] = u[q] * s
        delta[i, i] -= 1.0
    return delta


def _block_recurrence_numpy(Ablk: np.ndarray, diag: np.ndarray, live: np.ndarray, M: np.ndarray) -> np.ndarray:
    """`_block_recurrence` with numpy vector operations (the path without numba)."""
    b = Ablk.shape[0]
    delta = np.zeros((b, 2 * b))
    for i in np.flatnonzero(live):
        r = -(Ablk[i, :i] @ delta[:i]) if i else np.zeros(2 * b)
        r[b + i] += 1.0
        u = r / diag[i]
        u[i] += 1.0
        nrm2 = float(u @ (M @ u))
        u *= 1.0 / max(np.sqrt(max(nrm2, 0.0)), 1.0)
        u[i] -= 1.0
        delta[i] = u
    return delta


def update_dictionary_reference(D: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor) -> None:
    """The plain atom-by-atom loop (slow; the reference for tests)."""
    for k in range(D.shape[0]):
        if A[k, k] <= DEAD_THRESHOLD:
            continue
        d = D[k] + (Bt[k] - A[k] @ D) / A[k, k]
        D[k] = d / max(float(torch.linalg.vector_norm(d)), 1.0)


@njit(cache=True, nogil=True)
def _any_pair_above(G: np.ndarray, threshold: float) -> bool:
    """Whether two live atoms (G_kk > 1e-12) have |cos| > threshold: G_ij² > threshold² G_ii G_jj."""
    K = G.shape[0]
    t2 = threshold * threshold
    for i in range(K):
        gii = G[i, i]
        if gii <= 1e-12:
            continue
        for j in range(i + 1, K):
            gij = G[i, j]
            if gij * gij > t2 * gii * G[j, j] and G[j, j] > 1e-12:
                return True
    return False


def duplicate_atoms(G: torch.Tensor, usage: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """Indices of atoms to resample because another atom has |cos| > threshold with them.

    Of each such pair the less used atom (smaller A_kk) goes; each atom is dropped at most once.
    """
    if HAVE_NUMBA and G.device.type == "cpu" and not _any_pair_above(G.numpy(), threshold):
        return torch.zeros(0, dtype=torch.long)  # the usual case, in one pass over the upper triangle
    norms = G.diagonal().clamp_min(1e-24).sqrt()
    cos = (G / norms[:, None] / norms[None, :]).abs()
    cos.fill_diagonal_(0)
    alive = G.diagonal() > 1e-12
    cos = cos * alive[:, None] * alive[None, :]
    if not bool((cos > threshold).any()):
        return torch.zeros(0, dtype=torch.long, device=G.device)
    ii, jj = torch.nonzero(torch.triu(cos > threshold, diagonal=1), as_tuple=True)
    drop: list[int] = []
    dropped: set[int] = set()
    u = usage.tolist()
    for i, j in zip(ii.tolist(), jj.tolist()):
        if i in dropped or j in dropped:
            continue
        k = i if u[i] < u[j] or (u[i] == u[j] and i > j) else j
        drop.append(k)
        dropped.add(k)
    return torch.tensor(sorted(drop), dtype=torch.long, device=G.device)


def resample_atoms(
    state: OnlineState, atoms: torch.Tensor, X: torch.Tensor, residual: torch.Tensor, used_rows: set[int] | None = None
) -> list[int]:
    """Replace `atoms` by the worst-reconstructed rows of X (largest residual), one row per atom.

    The atoms' statistics (row/column of A, row of Bt) are reset to zero. Rows already used (passed
    in `used_rows`) are skipped. Returns the atoms actually replaced (fewer when rows run out).
    """
    if atoms.numel() == 0:
        return []
    used = used_rows if used_rows is not None else set()
    order = torch.argsort(residual, descending=True, stable=True).tolist()
    rows = [r for r in order if r not in used and float(residual[r]) > 0][: atoms.numel()]
    done = atoms[: len(rows)]
    if not rows:
        return []
    x = X[rows]
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
    state.D[done] = x.to(state.D.dtype)
    state.A[done, :] = 0
    state.A[:, done] = 0
    state.Bt[done] = 0
    used.update(rows)
    return done.tolist()


def init_dictionary_from_rows(rows: torch.Tensor, n_atoms: int, seed: int) -> torch.Tensor:
    """K unit atoms from data rows; random unit vectors (seeded) when there are fewer rows than K."""
    P = rows.shape[1]
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    keep = norms.squeeze(1) > 0
    rows = rows[keep] / norms[keep]
    if rows.shape[0] >= n_atoms:
        return rows[:n_atoms].clone()
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(n_atoms - rows.shape[0], P, generator=g, dtype=torch.float64).to(rows.dtype).to(rows.device)
    extra = extra / torch.linalg.vector_norm(extra, dim=1, keepdim=True)
    return torch.cat([rows, extra], 0)


def init_dictionary_svd(rows: torch.Tensor, n_atoms: int, seed: int) -> torch.Tensor:
    """Top right singular vectors of a sample of rows (unit atoms), completed with data rows.

    Exact through the eigendecomposition (float64) of the smaller Gram matrix, rows·rowsᵀ (m × m) or
    rowsᵀ·rows (P × P), when that is at most 4096 wide; a randomized SVD with oversampling otherwise.
    """
    m, P = rows.shape
    q = min(n_atoms, m, P)
    if min(m, P) <= 4096:
        small_rows = m <= P
        Gm = (rows @ rows.T if small_rows else rows.T @ rows).to(torch.float64)
        lam, U = torch.linalg.eigh(Gm)
        lam, U = lam.flip(0)[:q], U.flip(1)[:, :q]
        keep = lam > lam[0].clamp_min(0) * 1e-10 if lam.numel() else lam.bool()
        lam, U = lam[keep], U[:, keep]
        V = ((U / lam.sqrt()).T.to(rows.dtype) @ rows) if small_rows else U.T.to(rows.dtype)  # q × P
    else:
        torch.manual_seed(seed)
        _, S, Vt = torch.svd_lowrank(rows, q=min(q + 20, m, P), niter=6)
        V = Vt.T[:q][S[:q] > S.max() * 1e-6]
    atoms = V / torch.linalg.vector_norm(V, dim=1, keepdim=True).clamp_min(1e-12)
    if atoms.shape[0] < n_atoms:
        atoms = torch.cat([atoms, init_dictionary_from_rows(rows, n_atoms - atoms.shape[0], seed)], 0)
    return atoms[:n_atoms].contiguous()


@dataclass
class StepResult:
    """What one online step did (for logs and tests)."""

    batch_cost: float
    beta: float
    n_rows: int
    dead_resampled: list[int] = field(default_factory=list)
    dup_resampled: list[int] = field(default_factory=list)


def online_step(
    state: OnlineState,
    X: torch.Tensor,
    C: torch.Tensor,
    rec: torch.Tensor,
    l1: torch.Tensor,
    *,
    block: int = 16,
    dup_threshold: float | None = 0.99,
    forget_exponent: float = 1.0,
    precision: torch.dtype | None = None,
) -> tuple[StepResult, torch.Tensor]:
    """Update statistics and dictionary from one coded batch; returns (result, new Gram matrix).

    X: the batch rows (normalised), C: their codes against `state.D`, rec/l1: per-row ½‖x − cD‖² and
    α‖c‖₁. Order: statistics (forgetting weights, `update_stats`), dead atoms (A_kk ≤ 1e-6) replaced by the worst
    reconstructed rows, one BCD sweep, then atoms duplicating another (|cos| > dup_threshold) replaced.
    `precision`: the sweep's large products (`update_dictionary`); the Gram matrix is always exact.
    """
    n = X.shape[0]
    cost = float((rec.sum() + l1.sum()) / n)
    beta = update_stats(state, X, C, forget_exponent)
    used: set[int] = set()
    dead = torch.nonzero(state.A.diagonal() <= DEAD_THRESHOLD).squeeze(1)
    dead_done = resample_atoms(state, dead, X, rec, used)
    update_dictionary(state.D, state.A, state.Bt, block=block, precision=precision)
    G = gram(state.D)
    dup_done: list[int] = []
    if dup_threshold is not None:
        dups = duplicate_atoms(G, state.A.diagonal(), dup_threshold)
        dup_done = resample_atoms(state, dups, X, rec, used)
        if dup_done:  # rare; recomputed in full so that G is always gram(D) (exact resume from D)
            G = gram(state.D)
    state.step += 1
    state.n_dead_resampled += len(dead_done)
    state.n_dup_resampled += len(dup_done)
    return StepResult(cost, beta, n, dead_done, dup_done), G


def mutual_coherence(D: torch.Tensor | np.ndarray) -> dict[str, float]:
    """max and p99 of |cos| between distinct (nonzero) atoms."""
    D = torch.as_tensor(D, dtype=torch.float64)
    norms = torch.linalg.vector_norm(D, dim=1)
    Dn = D[norms > 0] / norms[norms > 0, None]
    k = Dn.shape[0]
    if k < 2:
        return {"max": 0.0, "p99": 0.0}
    cos = (Dn @ Dn.T).abs()
    iu = torch.triu_indices(k, k, offset=1)
    vals = cos[iu[0], iu[1]]
    return {"max": float(vals.max()), "p99": float(torch.quantile(vals.float(), 0.99)) if vals.numel() < 16_000_000 else float(np.percentile(vals.numpy(), 99))}
