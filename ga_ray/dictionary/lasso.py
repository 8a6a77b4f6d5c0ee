"""Batched exact lasso coder on the Gram matrix (pure torch: no Ray, no files; CPU or CUDA).

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

from dataclasses import dataclass

import torch

# Largest (rows × m × m) float64 block built at once (elements); larger batches are split by rows.
_MAX_BLOCK_ELEMS = 24_000_000
# Rows that stall this many times (then get proximal-gradient kicks) are given up on and counted.
_MAX_STALLS = 5


@dataclass
class CoderInfo:
    """How a coding call went."""

    n_iter: int
    """Lock-step iterations used."""
    n_unconverged: int
    """Rows that hit `max_iter` before satisfying the KKT conditions to `tol`."""
    max_support: int
    """Largest number of nonzero coefficients in a row."""


def gram(D: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """G = D Dᵀ, optionally built from column chunks of D (bounded temporary memory for huge P)."""
    if chunk is None or D.shape[1] <= chunk:
        return D @ D.T
    G = torch.zeros(D.shape[0], D.shape[0], dtype=D.dtype, device=D.device)
    for s in range(0, D.shape[1], chunk):
        Dc = D[:, s : s + chunk]
        G.addmm_(Dc, Dc.T)
    return G


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


def row_objective(
    C: torch.Tensor, G: torch.Tensor, Bx: torch.Tensor, sq_norms: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (½‖x − cD‖², α‖c‖₁) from the Gram form (no P-sized work)."""
    cg = C @ G
    rec = 0.5 * sq_norms - (Bx * C).sum(1) + 0.5 * (cg * C).sum(1)
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
):
    """Code the rows of X (N × P) against D (K × P): exact lasso per row (see module docstring)."""
    if G is None:
        G = gram(D)
    Bx = X @ D.T
    C, info = lasso_gram(G, Bx, alpha, tol=tol, max_iter=max_iter, G64=G64, init=init)
    return (C, info) if return_info else C


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
) -> tuple[torch.Tensor, CoderInfo]:
    """Solve min_c ½cᵀGc − Bx·c + α‖c‖₁ for every row of Bx (N × K) at once.

    G: K × K Gram matrix of the dictionary (PSD), Bx = X Dᵀ. `init` warm-starts the codes.
    `G64` is G in float64 (pass it when calling repeatedly with the same G).
    Returns codes (N × K, dtype of Bx) and a `CoderInfo`.
    """
    n, K = Bx.shape
    dev = Bx.device
    if G64 is None:
        G64 = G.to(torch.float64)
    if init is None:
        C = torch.zeros_like(Bx)
        nz_opt = torch.ones(n, dtype=torch.bool, device=dev)
    else:
        C = init.to(Bx.dtype).clone()
        nz_opt = (C == 0).all(dim=1)
    p_add = torch.full((n,), 4, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)
    stalled = torch.zeros(n, dtype=torch.bool, device=dev)
    n_stalls = torch.zeros(n, dtype=torch.long, device=dev)
    lipschitz: float | None = None
    n_iter = 0
    while active.numel() and n_iter < max_iter:
        n_iter += 1
        # rows whose nonzero part is optimal: full gradient, done test, violators to add
        chk_mask = nz_opt[active]
        vz = torch.full((active.numel(), K), float("-inf"), dtype=Bx.dtype, device=dev)
        gsign = torch.zeros((active.numel(), K), dtype=Bx.dtype, device=dev)
        if bool(chk_mask.any()):
            chk = active[chk_mask]
            g = Bx[chk] - C[chk] @ G
            v = torch.where(C[chk] == 0, g.abs() - alpha, torch.full_like(g, float("-inf")))
            done = (v.amax(dim=1) <= tol) | (n_stalls[chk] >= _MAX_STALLS)
            vz[chk_mask] = v
            gsign[chk_mask] = torch.sign(g)
            keep = torch.ones(active.numel(), dtype=torch.bool, device=dev)
            keep[chk_mask.nonzero().squeeze(1)[done]] = False
            active, vz, gsign = active[keep], vz[keep], gsign[keep]
            if active.numel() == 0:
                break
        # rows where feature-sign made no progress (singular supports, float limits): proximal
        # gradient steps, which always descend, move them to a new support; then feature-sign resumes
        st = stalled[active]
        if bool(st.any()):
            rows = active[st]
            if lipschitz is None:
                lipschitz = _max_eigenvalue(G64)
            _ista(C, rows, G, Bx, alpha, lipschitz, steps=20)
            stalled[rows] = False
            n_stalls[rows] += 1
            nz_opt[rows] = False
            p_add[rows] = 1
        step_rows, vz, gsign = active[~st], vz[~st], gsign[~st]
        if step_rows.numel() == 0:
            continue
        # rows per block so that the (rows × m × m) float64 buffers stay bounded
        nnz = (C[step_rows] != 0).sum(1)
        m_est = int(nnz.max()) + int(p_add[step_rows].max())
        rows_per = max(1, _MAX_BLOCK_ELEMS // max(1, 4 * m_est * m_est))
        for s in range(0, step_rows.numel(), rows_per):
            sl = slice(s, s + rows_per)
            _fss_step(C, step_rows[sl], vz[sl], gsign[sl], Bx, G64, alpha, tol, nz_opt, p_add, stalled, max_add)
    n_unconv = int(active.numel()) + int((n_stalls >= _MAX_STALLS).sum())
    max_support = int((C != 0).sum(1).max()) if n else 0
    return C, CoderInfo(n_iter=n_iter, n_unconverged=n_unconv, max_support=max_support)


def _max_eigenvalue(G64: torch.Tensor, iters: int = 50) -> float:
    """Largest eigenvalue of the PSD matrix G (power iteration, a few % above to be safe)."""
    v = torch.ones(G64.shape[0], dtype=G64.dtype, device=G64.device) / G64.shape[0] ** 0.5
    lam = 0.0
    for _ in range(iters):
        w = G64 @ v
        lam = float(w.norm())
        if lam == 0:
            return 1.0
        v = w / lam
    return lam * 1.05


def _ista(C: torch.Tensor, rows: torch.Tensor, G: torch.Tensor, Bx: torch.Tensor, alpha: float, lip: float, steps: int) -> None:
    """Proximal-gradient steps c ← S_{α/L}(c + (b − cG)/L) for `rows` (monotone descent)."""
    c = C[rows]
    b = Bx[rows]
    for _ in range(steps):
        c = soft_threshold(c + (b - c @ G) / lip, alpha / lip)
    C[rows] = c


def _fss_step(
    C: torch.Tensor,
    rows: torch.Tensor,
    vz: torch.Tensor,
    gsign: torch.Tensor,
    Bx: torch.Tensor,
    G64: torch.Tensor,
    alpha: float,
    tol: float,
    nz_opt: torch.Tensor,
    p_add: torch.Tensor,
    stalled: torch.Tensor,
    max_add: int,
) -> None:
    """One feature-sign step for `rows` (updates C, nz_opt, p_add, stalled in place).

    vz: zero-coordinate KKT violations (|g_k| − α, −inf elsewhere) for rows that may add violators;
    gsign: sign of the full gradient there (the sign a new coordinate enters with).
    """
    Ca = C[rows]
    na, K = Ca.shape
    dev = Ca.device
    f64 = torch.float64
    support = Ca != 0
    theta = torch.sign(Ca)
    # 1. additions for rows whose nonzero part is optimal
    adding = nz_opt[rows]
    if bool(adding.any()):
        p = torch.where(adding, p_add[rows], torch.zeros_like(p_add[rows]))
        kmax = min(int(p.max()), K)
        vals, idx = vz.topk(kmax, dim=1)
        sel = (vals > tol) & (torch.arange(kmax, device=dev)[None, :] < p[:, None])
        new = torch.zeros_like(support)
        new.scatter_(1, idx, sel)
        new &= ~support
        support = support | new
        theta = torch.where(new, gsign, theta)
    else:
        new = torch.zeros_like(support)
    # 2. padded support indices
    cnt = support.sum(1)
    m = int(cnt.max())
    if m == 0:  # only rows re-solving an empty support: they go back to adding violators
        nz_opt[rows] = True
        return
    order = torch.argsort((~support).to(torch.int8), dim=1, stable=True)[:, :m]
    valid = torch.arange(m, device=dev)[None, :] < cnt[:, None]
    idx = torch.where(valid, order, torch.zeros_like(order))
    vmask = valid.to(f64)
    Gss = G64[idx[:, :, None], idx[:, None, :]]
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(m, dtype=f64, device=dev)
    Gss = torch.where(pair, Gss, eye.expand(na, m, m) * (~valid).to(f64)[:, :, None])
    th = theta.gather(1, idx).to(f64) * vmask
    rhs = (Bx[rows].gather(1, idx).to(f64) - alpha * th) * vmask
    cur = Ca.gather(1, idx).to(f64) * vmask
    L, info = torch.linalg.cholesky_ex(Gss)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1) if bool((info == 0).any()) else torch.zeros_like(rhs)
    if bool((info != 0).any()):
        # singular support (more atoms than the rank): a proximal-point step instead,
        # x = argmin QP(x) + μ/2‖x − c‖², which is finite and descends for any μ > 0
        bad = info != 0
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
    # 3. exact line search of the true objective on [0, 1] (convex, piecewise quadratic)
    # gradient on the support, exact in float64: g_S = b_S − G_SS c_S (c is zero off the support)
    gs = (rhs + alpha * th - torch.bmm(Gss, cur.unsqueeze(-1)).squeeze(-1)) * vmask
    gd = (gs * d).sum(1)
    dGd = (torch.bmm(Gss, d.unsqueeze(-1)).squeeze(-1) * d).sum(1).clamp_min(0)
    cross = (cur * x < 0) & valid
    tau = torch.where(cross, (-cur / torch.where(cross, d, torch.ones_like(d))).clamp(0, 1), torch.full_like(d, float("inf")))
    tau_s, perm = tau.sort(dim=1)
    # sign of each coordinate just after t=0: sign(cur) when nonzero, else sign(d)
    s0 = torch.where(cur != 0, torch.sign(cur), torch.sign(d))
    slope0 = (s0 * d).sum(1)  # Σ s_j d_j on the first piece
    jump = (2 * d.abs() * cross.to(f64)).gather(1, perm)  # slope offset when passing each breakpoint
    # piece i spans [lo_i, hi_i]; pieces 0..m (hi of last is 1)
    finite = torch.isfinite(tau_s)
    bp = torch.where(finite, tau_s, torch.ones_like(tau_s))
    lo = torch.cat([torch.zeros(na, 1, dtype=f64, device=dev), bp], 1)
    hi = torch.cat([bp, torch.ones(na, 1, dtype=f64, device=dev)], 1)
    cslope = alpha * (slope0[:, None] + torch.cat([torch.zeros(na, 1, dtype=f64, device=dev), jump.cumsum(1)], 1))
    # f'(t) on piece i = -gd + cslope_i + t·dGd ; first piece whose right-end derivative ≥ 0 holds t*
    dright = -gd[:, None] + cslope + hi * dGd[:, None]
    pos = dright >= 0
    has = pos.any(1)
    first = torch.where(has, pos.to(torch.int8).argmax(1), torch.full_like(cnt, m))
    lo_f = lo.gather(1, first[:, None]).squeeze(1)
    hi_f = hi.gather(1, first[:, None]).squeeze(1)
    cs_f = cslope.gather(1, first[:, None]).squeeze(1)
    safe = torch.where(dGd > 0, dGd, torch.ones_like(dGd))
    t_stat = torch.where(dGd > 0, (gd - cs_f) / safe, torch.where(gd - cs_f > 0, hi_f, lo_f))
    t = torch.minimum(torch.maximum(t_stat, lo_f), hi_f)
    t = torch.where(has, t, torch.ones_like(t))
    t = torch.where(t > 1 - 1e-9, torch.ones_like(t), t)  # f'(1) ≈ 0 at the QP optimum: take the full step
    newc = cur + t[:, None] * d
    at_bp = cross & ((tau - t[:, None]).abs() <= 1e-12 * torch.clamp(t[:, None], min=1.0))
    at_bp |= newc.abs() <= 1e-15 * (cur.abs() + x.abs())
    newc = torch.where(at_bp, torch.zeros_like(newc), newc)
    # objective decrease f(t) - f(0)
    delta = newc - cur  # moderate even when d is huge (singular G_SS): no cancellation in df
    df = -(gs * delta).sum(1) + 0.5 * (torch.bmm(Gss, delta.unsqueeze(-1)).squeeze(-1) * delta).sum(1)
    df = df + alpha * (newc.abs().sum(1) - cur.abs().sum(1))
    progress = df < -1e-14 * (1 + cur.abs().sum(1))
    # optimality of the nonzero part, checked on the new point in float64 (not inferred from flags)
    g_new = gs - torch.bmm(Gss, delta.unsqueeze(-1)).squeeze(-1)
    nzc = newc != 0
    r = torch.where(nzc, (g_new - alpha * torch.sign(newc)).abs(), torch.zeros_like(g_new)) * vmask
    ok = r.amax(1) <= tol
    # write back (rows without progress keep their codes)
    newc = torch.where(progress[:, None], newc, cur)
    row_codes = torch.zeros(na, K, dtype=C.dtype, device=dev)
    row_codes.scatter_add_(1, idx, newc.to(C.dtype) * valid.to(C.dtype))  # padded slots add 0 at index 0
    C[rows] = row_codes
    was_adding = nz_opt[rows].clone()
    nz_opt[rows] = torch.where(progress, ok, nz_opt[rows] | ok)
    pa = p_add[rows]
    single = pa == 1
    pa = torch.where(progress & ok & was_adding, torch.clamp(pa * 2, max=max_add), pa)
    pa = torch.where(~progress, torch.ones_like(pa), pa)
    p_add[rows] = pa
    # a row that cannot progress even adding a single violator is as exact as the precision allows
    stalled[rows] = stalled[rows] | (~progress & single & was_adding)
    # a re-solve without progress (singular support, float limits): proximal-gradient kick next round
    stalled[rows] = stalled[rows] | (~progress & ~was_adding)
