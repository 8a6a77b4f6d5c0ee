"""Exact lasso coder on the Gram matrix (no Ray, no files): the batched torch solver below (CPU or CUDA), and
on CPU by default the same search row by row, compiled (`lasso_rows`; see `lasso_gram(backend=...)`).

Every row x of X is coded against the dictionary D (K × P) by solving scikit-learn's per-row problem

    min_c  ½‖x − c D‖² + α‖c‖₁        (what `sparse_encode(..., algorithm="lasso_cd", alpha=α)` solves)

which only needs the Gram matrix G = D Dᵀ (K × K) and the correlations b = x Dᵀ:
`½‖x‖² − b·c + ½ cᵀGc + α‖c‖₁`.

Solver: a batched *feature-sign search* (Lee, Battle, Raina & Ng 2007) with working sets. All rows
move in lock step; each iteration costs one (rows × K) @ (K × K) product for the gradient plus
small batched Cholesky solves on each row's support (float64, padded to the largest support):

1. g = b − cG. A row whose nonzero coefficients are optimal and whose zero coefficients satisfy
   |g_k| ≤ α + tol is done (KKT to `tol`) and leaves the batch.
2. A row whose nonzero part is optimal adds its largest violators (|g_k| > α + tol) with sign
   θ_k = sign(g_k): p of them, p doubling after each successful step and dropping to 1 after a
   step that made no progress (with a single addition, feature-sign theory guarantees descent).
3. On the support S with signs θ it solves G_SS x = b_S − αθ_S exactly (float64 Cholesky), then
   takes the exact minimiser of the true objective on the segment from c to x (a convex piecewise
   quadratic: breakpoints where a coefficient crosses zero, slopes updated by a cumulative sum).
   Coefficients that reach zero leave the support.

The result satisfies the lasso optimality conditions: nonzero coordinates exactly (to the precision
of the small float64 solves), zero coordinates to `tol` in the working dtype. With float32 inputs the
gradient g is computed in float32; tolerances below ~1e-6 then only mean "as exact as float32 allows".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ga_ray.atoms import lasso_rows
from ga_ray.atoms.compiled import HAVE_NUMBA
from ga_ray.atoms.lasso_rows import MAX_STALLS  # the stall limit of both coders
from ga_ray.atoms.threads import cpu_threads, gemm, matmul, uses_numpy

# Largest (rows × m × m) float64 block built at once (elements); larger batches are split by rows.
_MAX_BLOCK_ELEMS = 24_000_000
# Violators added to a row at its first addition (then doubling up to `max_add`): 2 measured fastest
# on real gradients and planted atoms (fewer lock-step iterations than 4; 1 gains nothing more).
_FIRST_ADD = 2


@dataclass
class CoderInfo:
    """How a coding call went."""

    n_iter: int
    """Lock-step iterations used."""
    n_unconverged: int
    """Rows that hit `max_iter` before satisfying the KKT conditions to `tol`."""
    max_support: int
    """Largest number of nonzero coefficients in a row."""
    quad: torch.Tensor | None = None
    """Per-row cᵀGc (float64) from the coder's own gradient (the row-by-row coder), for `row_objective`."""


def gram(D: torch.Tensor) -> torch.Tensor:
    """G = D Dᵀ, exactly symmetric.

    Inside the learner on CPU (`threads.matmul`) numpy hands `D @ D.T` to BLAS's symmetric rank-k update
    (syrk): half the multiply-adds of a general product, one triangle mirrored. Elsewhere one torch
    product (BLAS runs D·Dᵀ at well over twice the rate of the upper triangle cut into block rows,
    although that does half the work), symmetrised.
    """
    K, P = D.shape
    if uses_numpy(D):
        D = D.contiguous()
        return matmul(D, D.T, macs=K * K * P / 2)  # syrk: symmetric already
    with gemm(K * K * P):
        G = D @ D.T
    return G.add_(G.T.clone()).mul_(0.5)  # (a + a)·½ = a exactly: a no-op when BLAS is symmetric


def soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(x) * (x.abs() - t).clamp_min(0)


def kkt_violation(C: torch.Tensor, G: torch.Tensor, Bx: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-row max violation of the lasso optimality conditions of `½cᵀGc − b·c + α‖c‖₁`.

    With g = b − cG: nonzero c_k needs g_k = α·sign(c_k); zero c_k needs |g_k| ≤ α.
    """
    g = Bx - C @ G
    nz = C != 0
    v_nz = (g - alpha * torch.sign(C)).abs()
    v_z = (g.abs() - alpha).clamp_min(0)
    return torch.where(nz, v_nz, v_z).amax(dim=1)


def sparse_csr(C: torch.Tensor) -> torch.Tensor | None:
    """C as CSR when it is mostly zeros (under 1/16 nonzero) on CPU, where CSR × dense products beat the
    dense GEMM; None otherwise (the callers then multiply densely)."""
    if C.device.type != "cpu" or C.layout != torch.strided or int((C != 0).sum()) * 16 >= C.numel():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return C.to_sparse_csr()


def sparse_times(C: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """C @ M for codes C that are mostly zeros: as CSR × dense on CPU (nnz·K multiply-adds instead of
    rows·K·K; 0.8 -> 0.1 ms at 256 rows, K = 500, 7 nonzeros per row), a dense GEMM otherwise."""
    Cs = sparse_csr(C)
    return (Cs if Cs is not None else C) @ M


def row_objective(
    C: torch.Tensor, G: torch.Tensor, Bx: torch.Tensor, sq_norms: torch.Tensor, alpha: float, quad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (½‖x − cD‖², α‖c‖₁) from the Gram form (no P-sized work). `quad`: the rows' cᵀGc when the
    coder already has it (`CoderInfo.quad`), which saves the c·G product."""
    if quad is None:
        quad = (sparse_times(C, G) * C).sum(1)
    rec = 0.5 * sq_norms - (Bx * C).sum(1) + 0.5 * quad.to(Bx.dtype)
    return rec.clamp_min(0), alpha * C.abs().sum(1)


def lasso_objective(X: torch.Tensor, D: torch.Tensor, C: torch.Tensor, alpha: float) -> float:
    """scikit-learn's objective `(1/N) Σ ½‖x − cD‖² + α‖c‖₁`, computed from the residual directly."""
    R = X - C @ D
    return float((0.5 * (R * R).sum() + alpha * C.abs().sum()) / X.shape[0])


def sparse_encode(
    X: torch.Tensor,
    D: torch.Tensor,
    alpha: float,
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
    G: torch.Tensor | None = None,
    G64: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    return_info: bool = False,
    backend: str = "auto",
):
    """Code the rows of X (N × P) against D (K × P): exact lasso per row (see module docstring)."""
    if G is None:
        G = gram(D)
    Bx = matmul(X, D.T, macs=X.shape[0] * D.shape[0] * D.shape[1])
    C, info = lasso_gram(G, Bx, alpha, tol=tol, max_iter=max_iter, G64=G64, init=init, backend=backend)
    return (C, info) if return_info else C


class _single_thread:
    """Run the coder's many small ops on one CPU thread: intra-op parallelism on (rows × K) tensors
    gains little, and on a shared machine every parallel op waits for its slowest (descheduled) thread."""

    def __init__(self, device: torch.device):
        self.on = device.type == "cpu" and torch.get_num_threads() > 1
        self.n = torch.get_num_threads()

    def __enter__(self):
        if self.on:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.n)


def lasso_gram(
    G: torch.Tensor,
    Bx: torch.Tensor,
    alpha: float,
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
    G64: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    max_add: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, CoderInfo]:
    """Solve min_c ½cᵀGc − Bx·c + α‖c‖₁ for every row of Bx (N × K) at once.

    `backend`: `rows` (the compiled row-by-row coder of `lasso_rows`, CPU only), `batched` (the
    lock-step torch coder below, any device), `auto` (rows on CPU when numba is installed, else batched).

    G: K × K Gram matrix of the dictionary (PSD), Bx = X Dᵀ. `init` warm-starts the codes.
    `G64` is G in float64 for the batched coder (pass it when calling repeatedly with the same G; the
    compiled coder reads G as it is).
    Returns dense codes (N × K, dtype of Bx) and a `CoderInfo`.

    Supports are kept as padded index lists (`sidx`, n × m, padding index K) with float64 values;
    index K addresses an extra zero column of b and a zero row of the padded Gram (G_SS gets an identity
    block on the padded positions), so padding needs no masking in the small solves.
    """
    if backend not in ("auto", "rows", "batched"):
        raise ValueError(f"backend must be 'auto', 'rows' or 'batched' (got {backend!r})")
    if backend == "rows" or (backend == "auto" and Bx.device.type == "cpu" and HAVE_NUMBA):
        if Bx.device.type != "cpu":
            raise ValueError("the 'rows' coder runs on CPU only; use backend='batched' on " + str(Bx.device))
        return _lasso_rows(G, Bx, alpha, tol=tol, max_iter=max_iter, init=init)
    with _single_thread(Bx.device):
        return _lasso_gram(G, Bx, alpha, tol=tol, max_iter=max_iter, G64=G64, init=init, max_add=max_add)


def _lasso_rows(G, Bx, alpha, *, tol, max_iter, init):
    n, K = Bx.shape
    # the kernel reads G and Bx in their own float dtype and computes in float64: widening a float32 on
    # read is exact, so this equals a float64 G bit for bit, without a K × K conversion per call (0.2-0.3
    # ms at K = 500, a few % of a demo step) or twice the memory traffic in the kernel's G row reads
    Gn = np.ascontiguousarray(_float_array(G))
    B = np.ascontiguousarray(_float_array(Bx.detach()))
    C = np.array(init.detach().to(torch.float64).numpy(), copy=True) if init is not None else np.zeros((n, K))
    iters = np.zeros(n, dtype=np.int64)
    quad = np.zeros(n)
    lasso_rows.code_rows(Gn, B, float(alpha), float(tol), int(max_iter), C, iters, quad, threads=cpu_threads())
    info = CoderInfo(n_iter=int(np.abs(iters).max()) if n else 0, n_unconverged=int((iters < 0).sum()),
                     max_support=int((C != 0).sum(1).max()) if n else 0, quad=torch.from_numpy(quad))
    return torch.from_numpy(C).to(Bx.dtype), info


def _float_array(t: torch.Tensor) -> np.ndarray:
    """t as a numpy array in float32 or float64 (the dtypes the compiled kernel is built for)."""
    return t.numpy() if t.dtype in (torch.float32, torch.float64) else t.to(torch.float64).numpy()


def _lasso_gram(G, Bx, alpha, *, tol, max_iter, G64, init, max_add):
    n, K = Bx.shape
    dev, dt, f64 = Bx.device, Bx.dtype, torch.float64
    if G64 is None:
        G64 = G.to(f64)
    w = _Work(G, G64, Bx, alpha, tol, max_add)
    if init is None:
        w.sidx = torch.full((n, 1), K, dtype=torch.long, device=dev)
        w.sval = torch.zeros((n, 1), dtype=f64, device=dev)
        nz_opt = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        w.set_dense(torch.arange(n, device=dev), init.to(f64))
        nz_opt = (init == 0).all(dim=1)
    w.nz_opt = nz_opt
    w.p_add = torch.full((n,), _FIRST_ADD, dtype=torch.long, device=dev)
    w.stalled = torch.zeros(n, dtype=torch.bool, device=dev)
    n_stalls = torch.zeros(n, dtype=torch.long, device=dev)
    lipschitz: float | None = None
    active = torch.arange(n, device=dev)
    n_iter = 0
    while active.numel() and n_iter < max_iter:
        n_iter += 1
        na = active.numel()
        chk_mask = w.nz_opt[active]
        cidx = torch.full((na, 1), K, dtype=torch.long, device=dev)
        csign = torch.zeros((na, 1), dtype=f64, device=dev)
        if bool(chk_mask.any()):
            # rows whose nonzero part is optimal: full gradient, done test, violators to add
            chk = active[chk_mask]
            g = w.grad(chk)
            v = torch.cat([g.abs() - alpha, torch.zeros_like(g[:, :1])], 1)
            v.scatter_(1, w.sidx[chk], float("-inf"))
            v = v[:, :K]
            done = (v.amax(dim=1) <= tol) | (n_stalls[chk] >= MAX_STALLS)
            p = w.p_add[chk]
            pos = chk_mask.nonzero().squeeze(1)
            go = (~done).nonzero().squeeze(1)  # rows with violators to add: only they need the top-k
            kmax = min(int(p[go].max()), K) if go.numel() else 1
            cidx = torch.full((na, kmax), K, dtype=torch.long, device=dev)
            csign = torch.zeros((na, kmax), dtype=f64, device=dev)
            if go.numel():
                vals, top = v[go].topk(kmax, dim=1)
                sel = (vals > tol) & (torch.arange(kmax, device=dev)[None, :] < p[go][:, None])
                top = torch.where(sel, top, torch.full_like(top, K))
                sg = torch.where(sel, torch.sign(g[go].gather(1, top.clamp(max=K - 1))).to(f64), torch.zeros((), dtype=f64, device=dev))
                cidx[pos[go]] = top
                csign[pos[go]] = sg
            keep = torch.ones(na, dtype=torch.bool, device=dev)
            keep[pos[done]] = False
            if not bool(keep.all()):
                active, cidx, csign = active[keep], cidx[keep], csign[keep]
            if active.numel() == 0:
                break
        # rows where feature-sign made no progress (singular supports, float limits): proximal
        # gradient steps, which always descend, move them to a new support; then feature-sign resumes
        st = w.stalled[active]
        if bool(st.any()):
            rows = active[st]
            if lipschitz is None:
                lipschitz = _max_eigenvalue(G64)
            c = w.dense(rows).to(dt)
            b = Bx[rows]
            for _ in range(20):
                c = soft_threshold(c + (b - c @ G) / lipschitz, alpha / lipschitz)
            w.set_dense(rows, c.to(f64))
            w.stalled[rows] = False
            n_stalls[rows] += 1
            w.nz_opt[rows] = False
            w.p_add[rows] = 1
            active_step, cidx, csign = active[~st], cidx[~st], csign[~st]
        else:
            active_step = active
        if active_step.numel() == 0:
            continue
        m_est = w.sidx.shape[1] + cidx.shape[1]
        rows_per = max(1, _MAX_BLOCK_ELEMS // max(1, 4 * m_est * m_est))
        for s in range(0, active_step.numel(), rows_per):
            sl = slice(s, s + rows_per)
            w.fss_step(active_step[sl], cidx[sl], csign[sl])
    n_unconv = int(active.numel()) + int((n_stalls >= MAX_STALLS).sum())
    C = w.dense(torch.arange(n, device=dev)).to(dt)
    max_support = int((w.sidx != K).sum(1).max()) if n else 0
    return C, CoderInfo(n_iter=n_iter, n_unconverged=n_unconv, max_support=max_support)


def _max_eigenvalue(G64: torch.Tensor, iters: int = 50) -> float:
    """Largest eigenvalue of the PSD matrix G (power iteration, a few % above to be safe)."""
    v = torch.ones(G64.shape[0], dtype=G64.dtype, device=G64.device) / G64.shape[0] ** 0.5
    lam = 0.0
    for _ in range(iters):
        u = G64 @ v
        lam = float(u.norm())
        if lam == 0:
            return 1.0
        v = u / lam
    return lam * 1.05


class _Work:
    """Padded supports and per-row flags of one `lasso_gram` call."""

    def __init__(self, G, G64, Bx, alpha, tol, max_add):
        n, K = Bx.shape
        dev, f64 = Bx.device, torch.float64
        self.K, self.alpha, self.tol, self.max_add = K, alpha, tol, max_add
        self.G = G
        self.Ge = torch.cat([G, torch.zeros(1, K, dtype=G.dtype, device=dev)], 0)  # (K+1) × K, row K zero
        self.G64e = torch.zeros(K + 1, K + 1, dtype=f64, device=dev)
        self.G64e[:K, :K] = G64
        self.G64e[K, K] = 1.0
        self.Bx = Bx
        self.Bxe = torch.cat([Bx, torch.zeros(n, 1, dtype=Bx.dtype, device=dev)], 1)
        self.sidx: torch.Tensor
        self.sval: torch.Tensor
        self.nz_opt: torch.Tensor
        self.p_add: torch.Tensor
        self.stalled: torch.Tensor

    # -- support storage ---------------------------------------------------------------------------
    def _ensure_width(self, m: int) -> None:
        W = self.sidx.shape[1]
        if m > W:
            n, dev = self.sidx.shape[0], self.sidx.device
            self.sidx = torch.cat([self.sidx, torch.full((n, m - W), self.K, dtype=torch.long, device=dev)], 1)
            self.sval = torch.cat([self.sval, torch.zeros((n, m - W), dtype=self.sval.dtype, device=dev)], 1)

    def write(self, rows: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> None:
        m = idx.shape[1]
        self._ensure_width(m)
        W = self.sidx.shape[1]
        if m < W:
            pad = W - m
            idx = torch.cat([idx, torch.full((idx.shape[0], pad), self.K, dtype=idx.dtype, device=idx.device)], 1)
            val = torch.cat([val, torch.zeros((val.shape[0], pad), dtype=val.dtype, device=val.device)], 1)
        self.sidx[rows] = idx
        self.sval[rows] = val

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(rows.numel(), self.K + 1, dtype=self.sval.dtype, device=self.sval.device)
        out.scatter_add_(1, self.sidx[rows], self.sval[rows])
        return out[:, : self.K]

    def set_dense(self, rows: torch.Tensor, C: torch.Tensor) -> None:
        nz = C != 0
        cnt = nz.sum(1)
        m = max(int(cnt.max()) if cnt.numel() else 0, 1)
        order = torch.argsort((~nz).to(torch.int8), dim=1, stable=True)[:, :m]
        valid = torch.arange(m, device=C.device)[None, :] < cnt[:, None]
        idx = torch.where(valid, order, torch.full_like(order, self.K))
        val = torch.where(valid, C.gather(1, order), torch.zeros((), dtype=C.dtype, device=C.device))
        if not hasattr(self, "sidx"):
            self.sidx = torch.full((self.Bx.shape[0], m), self.K, dtype=torch.long, device=C.device)
            self.sval = torch.zeros((self.Bx.shape[0], m), dtype=torch.float64, device=C.device)
        self.write(rows, idx, val.to(torch.float64))

    # -- gradient ----------------------------------------------------------------------------------
    def grad(self, rows: torch.Tensor) -> torch.Tensor:
        """g = b − cG for `rows` (working dtype), from the sparse supports."""
        idx = self.sidx[rows]
        val = self.sval[rows].to(self.Bx.dtype)
        cnt = (idx != self.K).sum(1)
        m = max(int(cnt.max()), 1)
        idx, val = idx[:, :m], val[:, :m]
        if m * 4 > self.K:  # wide supports: one dense GEMM
            C = torch.zeros(rows.numel(), self.K + 1, dtype=val.dtype, device=val.device).scatter_add_(1, idx, val)[:, : self.K]
            return self.Bx[rows] - C @ self.G
        # c·G = Σ_j c_j G[j, :], a weighted sum of m rows of G per row: embedding_bag sums them without
        # the dense (rows × K) code matrix or a (rows × m × K) gather (measured 10× the dense GEMM at
        # 256 rows, K = 500, m = 8); the padding index K addresses the zero row of Ge
        cg = torch.nn.functional.embedding_bag(idx, self.Ge, per_sample_weights=val, mode="sum")
        return self.Bx[rows] - cg

    # -- one feature-sign step ---------------------------------------------------------------------
    def fss_step(self, rows: torch.Tensor, cidx: torch.Tensor, csign: torch.Tensor) -> None:
        K, alpha, tol = self.K, self.alpha, self.tol
        dev, f64 = rows.device, torch.float64
        na = rows.numel()
        old_idx = self.sidx[rows]
        old_val = self.sval[rows]
        was_adding = self.nz_opt[rows].clone()
        # candidate support: current nonzeros, then the new violators (sign = sign of the gradient)
        idx = torch.cat([old_idx, cidx], 1)
        val = torch.cat([old_val, torch.zeros_like(csign)], 1)
        theta = torch.cat([torch.sign(old_val), csign], 1)
        new = torch.cat([torch.zeros_like(old_idx, dtype=torch.bool), cidx != K], 1)
        valid = idx != K
        cnt = valid.sum(1)
        m = max(int(cnt.max()), 1)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :m]
        idx, val, theta, new = idx.gather(1, order), val.gather(1, order), theta.gather(1, order), new.gather(1, order)
        valid = idx != K
        vmask = valid.to(f64)
        # G_SS by one flat index_select (about twice as fast as the 2-D advanced-indexing gather). Padded
        # pairs read a zero of the padding row (G64e[K, 0]) and padded diagonal entries G64e[K, K] = 1, so the
        # padded block is the identity: reading G64e[K, K] for every padded pair made it a block of ones,
        # singular for any row with two paddings (then most rows took the slower regularised solve below).
        K1 = K + 1
        flat = torch.where(valid[:, :, None] & valid[:, None, :], idx[:, :, None] * K1 + idx[:, None, :], K * K1)
        flat.diagonal(dim1=1, dim2=2).masked_fill_(~valid, K * K1 + K)
        Gss = self.G64e.view(-1).index_select(0, flat.view(-1)).view(na, m, m)
        rhs = self.Bxe[rows].gather(1, idx).to(f64) - alpha * theta
        cur = val
        eye = torch.eye(m, dtype=f64, device=dev)
        L, info = torch.linalg.cholesky_ex(Gss)
        # singular in float64 although the factorisation ran (duplicate atoms, more atoms than the rank):
        # a pivot below 1e-6 of the matrix's scale, whose solve would be rounding noise
        piv = L.diagonal(dim1=1, dim2=2).abs().amin(1)
        bad = (info != 0) | ~(piv > 1e-6 * Gss.diagonal(dim1=1, dim2=2).amax(1).sqrt())
        x = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1) if not bool(bad.all()) else torch.zeros_like(rhs)
        if bool(bad.any()):
            # singular support: a proximal-point step instead,
            # x = argmin QP(x) + μ/2‖x − c‖², which is finite and descends for any μ > 0
            Gb = Gss[bad]
            mu = 1e-8 * Gb.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
            for _ in range(8):
                Lb, ib = torch.linalg.cholesky_ex(Gb + mu[:, None, None] * eye)
                if bool((ib == 0).all()):
                    break
                mu = mu * 100
            x[bad] = torch.cholesky_solve((rhs[bad] + mu[:, None] * cur[bad]).unsqueeze(-1), Lb).squeeze(-1)
        x = x * vmask
        d = x - cur
        # gradient on the support, exact in float64: g_S = b_S − G_SS c_S (c is zero off the support)
        Gcur = torch.bmm(Gss, cur.unsqueeze(-1)).squeeze(-1)
        gs = (rhs + alpha * theta - Gcur) * vmask
        Gd = torch.bmm(Gss, d.unsqueeze(-1)).squeeze(-1)
        gd = (gs * d).sum(1)
        dGd = (Gd * d).sum(1).clamp_min(0)
        # exact line search of the true objective on [0, 1] (convex, piecewise quadratic)
        cross = (cur * x < 0) & valid
        inf = torch.full_like(d, float("inf"))
        tau = torch.where(cross, (-cur / torch.where(cross, d, torch.ones_like(d))).clamp(0, 1), inf)
        tau_s, perm = tau.sort(dim=1)
        s0 = torch.where(cur != 0, torch.sign(cur), torch.sign(d))  # signs just after t = 0
        slope0 = (s0 * d).sum(1)
        jump = (2 * d.abs() * cross.to(f64)).gather(1, perm)  # slope change passing each breakpoint
        zero1 = torch.zeros(na, 1, dtype=f64, device=dev)
        bp = torch.where(torch.isfinite(tau_s), tau_s, torch.ones_like(tau_s))
        lo = torch.cat([zero1, bp], 1)
        hi = torch.cat([bp, zero1 + 1], 1)
        cslope = alpha * (slope0[:, None] + torch.cat([zero1, jump.cumsum(1)], 1))
        # f'(t) on piece i = −gd + cslope_i + t·dGd; the first piece whose right end has f' ≥ 0 holds t*
        dright = -gd[:, None] + cslope + hi * dGd[:, None]
        posd = dright >= 0
        has = posd.any(1)
        first = torch.where(has, posd.to(torch.int8).argmax(1), torch.full_like(cnt, m))
        lo_f = lo.gather(1, first[:, None]).squeeze(1)
        hi_f = hi.gather(1, first[:, None]).squeeze(1)
        cs_f = cslope.gather(1, first[:, None]).squeeze(1)
        safe = torch.where(dGd > 0, dGd, torch.ones_like(dGd))
        t_stat = torch.where(dGd > 0, (gd - cs_f) / safe, torch.where(gd - cs_f > 0, hi_f, lo_f))
        t = torch.minimum(torch.maximum(t_stat, lo_f), hi_f)
        t = torch.where(has, t, torch.ones_like(t))
        t = torch.where(t > 1 - 1e-9, torch.ones_like(t), t)  # f'(1) ≈ 0 at the QP optimum: full step
        newc = cur + t[:, None] * d
        at_bp = cross & ((tau - t[:, None]).abs() <= 1e-12 * torch.clamp(t[:, None], min=1.0))
        at_bp |= newc.abs() <= 1e-15 * (cur.abs() + x.abs())
        newc = torch.where(at_bp, torch.zeros_like(newc), newc)
        delta = newc - cur  # moderate even when d is huge (singular G_SS): no cancellation in df
        Gdelta = torch.bmm(Gss, delta.unsqueeze(-1)).squeeze(-1)
        df = -(gs * delta).sum(1) + 0.5 * (Gdelta * delta).sum(1) + alpha * (newc.abs().sum(1) - cur.abs().sum(1))
        progress = df < -1e-14 * (1 + cur.abs().sum(1))
        # optimality of the nonzero part, checked on the new point in float64 (not inferred from flags)
        g_new = gs - Gdelta
        r = torch.where(newc != 0, (g_new - alpha * torch.sign(newc)).abs(), torch.zeros_like(g_new)) * vmask
        r0 = torch.where(cur != 0, (gs - alpha * torch.sign(cur)).abs(), torch.zeros_like(gs)) * vmask
        ok = torch.where(progress, r.amax(1) <= tol, r0.amax(1) <= tol)
        # write back (rows without progress keep their codes)
        newc = torch.where(progress[:, None], newc, cur)
        keep = newc != 0
        self.write(rows, torch.where(keep, idx, torch.full_like(idx, K)), torch.where(keep, newc, torch.zeros_like(newc)))
        self.nz_opt[rows] = ok
        pa = self.p_add[rows]
        single = pa == 1
        pa = torch.where(progress & ok & was_adding, torch.clamp(pa * 2, max=self.max_add), pa)
        pa = torch.where(~progress, torch.ones_like(pa), pa)
        self.p_add[rows] = pa
        # no progress adding a single violator, or re-solving: proximal-gradient kick next round
        self.stalled[rows] = self.stalled[rows] | (~progress & ((single & was_adding) | ~was_adding))
