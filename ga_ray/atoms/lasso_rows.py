"""The lasso coder row by row, compiled (numba): the CPU path of `lasso.lasso_gram`.

Same problem and same answer as the batched torch coder in `lasso.py` (min_c ½cᵀGc − b·c + α‖c‖₁ per
row, KKT to `tol`), by the textbook feature-sign search (Lee, Battle, Raina & Ng 2007): one violator
added at a time, the equality-constrained QP on the support solved by Cholesky, and the paper's
discrete line search (the objective at the QP solution and at every point where a coefficient
crosses zero). Why a second implementation: on CPU the batched coder spends its time in the ~100 small
torch calls of each lock-step iteration (about 1.6 ms per iteration at 256 rows, whatever the sizes),
while a row here costs a few microseconds per support change; rows run in parallel on the threads
torch was given. The torch coder stays the CUDA path and the reference this one is tested
against (and scikit-learn's coordinate descent, for both).

All arithmetic is float64. Supports whose G_SS is singular (duplicate atoms, more atoms than the
rank) take a proximal-point step x = argmin QP(x) + μ/2‖x − c‖² (finite, descends for any μ > 0);
a step that makes no progress is followed by proximal-gradient steps on the whole row (which always
descend); a row that stalls `MAX_STALLS` times, or runs out of iterations, is reported unconverged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ga_ray.atoms.compiled import njit

#: Rows that stall this many times (then get proximal-gradient steps) are given up on and counted
#: (both coders).
MAX_STALLS = 5


@njit(cache=True, nogil=True, inline="always")
def _sign(v: float) -> float:
    return 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)


@njit(cache=True, nogil=True)
def _qp_objective(G, b, S, m, y, alpha):
    """½ yᵀG_SS y − b_S·y + α‖y‖₁ on the support S[:m]."""
    f = 0.0
    for t in range(m):
        jt = S[t]
        acc = 0.0
        for u in range(m):
            acc += G[jt, S[u]] * y[u]
        f += 0.5 * y[t] * acc - b[jt] * y[t] + alpha * abs(y[t])
    return f


@njit(cache=True, nogil=True)
def _solve_support(G, b, S, m, theta, cs, alpha, L, x):
    """x = G_SS⁻¹(b_S − αθ) by Cholesky into L; proximal-point (G_SS + μI) when a pivot is tiny."""
    scale = 0.0
    for t in range(m):
        scale = max(scale, G[S[t], S[t]])
    mu = 0.0
    for _ in range(9):
        ok = True
        for i in range(m):
            for j in range(i + 1):
                s = G[S[i], S[j]] + (mu if i == j else 0.0)
                for k in range(j):
                    s -= L[i, k] * L[j, k]
                if i == j:
                    if not s > 1e-12 * scale:  # pivot below 1e-6 of the scale (squared): singular
                        ok = False
                        break
                    L[i, i] = np.sqrt(s)
                else:
                    L[i, j] = s / L[j, j]
            if not ok:
                break
        if ok:
            break
        mu = 1e-8 * max(scale, 1e-12) if mu == 0.0 else mu * 100.0
    if not ok:
        return False
    for i in range(m):  # forward: L z = rhs (+ μ c for the proximal-point step)
        s = b[S[i]] - alpha * theta[i] + mu * cs[i]
        for k in range(i):
            s -= L[i, k] * x[k]
        x[i] = s / L[i, i]
    for i in range(m - 1, -1, -1):  # backward: Lᵀ x = z
        s = x[i]
        for k in range(i + 1, m):
            s -= L[k, i] * x[k]
        x[i] = s / L[i, i]
    return True


@njit(cache=True, nogil=True)
def _refresh_gradient(G, b, c, g):
    """g = b − cG from scratch (after proximal steps)."""
    K = b.shape[0]
    for k in range(K):
        g[k] = b[k]
    for j in range(K):
        cj = c[j]
        if cj != 0.0:
            for k in range(K):
                g[k] -= cj * G[j, k]


@njit(cache=True, nogil=True)
def _quad(b, c, g):
    """cᵀGc = c·(b − g) with g = b − cG: the row objective's quadratic term without another K × K pass."""
    q = 0.0
    for k in range(b.shape[0]):
        if c[k] != 0.0:
            q += c[k] * (b[k] - g[k])
    return q


@njit(cache=True, nogil=True)
def _buffers(cap):
    """Work arrays for supports of up to `cap` atoms: Cholesky factor, QP solution, current codes on the
    support, signs, best line-search point, trial point."""
    return (np.empty((cap, cap)), np.empty(cap), np.empty(cap), np.empty(cap), np.empty(cap), np.empty(cap))


@njit(cache=True, nogil=True)
def _code_row(G, b, alpha, tol, max_iter, c):
    """Feature-sign search for one row; c (K, float64) holds the warm start and receives the codes.
    Returns (iterations used, negated when the row did not converge; cᵀGc from the search's own gradient)."""
    K = b.shape[0]
    g = np.empty(K)
    _refresh_gradient(G, b, c, g)
    S = np.empty(K, np.int64)
    m = 0
    for j in range(K):
        if c[j] != 0.0:
            S[m] = j
            m += 1
    cap = min(K, 32)
    L, x, cs, theta, y, z = _buffers(cap)
    stalls = 0
    lipschitz = 0.0  # computed at the first stall (rare): an O(K²) pass the usual row never pays
    it = 0
    while it < max_iter:
        it += 1
        nz_ok = True
        for t in range(m):
            j = S[t]
            if abs(g[j] - alpha * _sign(c[j])) > tol:
                nz_ok = False
                break
        if nz_ok:  # add the largest violator among the zero coefficients, or stop
            best = -1
            bv = tol
            for k in range(K):
                if c[k] == 0.0:
                    v = abs(g[k]) - alpha
                    if v > bv:
                        bv = v
                        best = k
            if best < 0:
                return it, _quad(b, c, g)
            S[m] = best
            m += 1
        if m > cap:
            cap = min(K, 2 * m)
            L, x, cs, theta, y, z = _buffers(cap)
        for t in range(m):
            cs[t] = c[S[t]]
            theta[t] = _sign(cs[t]) if cs[t] != 0.0 else _sign(g[S[t]])
        progress = _solve_support(G, b, S, m, theta, cs, alpha, L, x)
        if progress:
            # discrete line search: x itself and every zero crossing between cs and x
            f_best = _qp_objective(G, b, S, m, x, alpha)
            for t in range(m):
                y[t] = x[t]
            for t in range(m):
                if cs[t] * x[t] < 0.0:
                    s = cs[t] / (cs[t] - x[t])
                    for u in range(m):
                        z[u] = cs[u] + s * (x[u] - cs[u])
                    z[t] = 0.0
                    fz = _qp_objective(G, b, S, m, z, alpha)
                    if fz < f_best:
                        f_best = fz
                        for u in range(m):
                            y[u] = z[u]
            f_cur = _qp_objective(G, b, S, m, cs, alpha)
            progress = f_best < f_cur - 1e-14 * (1.0 + abs(f_cur))
        if progress:
            for t in range(m):
                d = y[t] - cs[t]
                if d != 0.0:
                    j = S[t]
                    for k in range(K):
                        g[k] -= d * G[j, k]
                    c[j] = y[t]
            n = 0
            for t in range(m):  # the support keeps the nonzeros
                if c[S[t]] != 0.0:
                    S[n] = S[t]
                    n += 1
            m = n
        else:
            # no descent (float limits, a singular support): proximal-gradient steps on the whole row
            stalls += 1
            if stalls >= MAX_STALLS:
                return -it, _quad(b, c, g)
            if lipschitz == 0.0:  # step size: Gershgorin's bound on G's largest eigenvalue, once per row
                for j in range(K):
                    acc = 0.0
                    for k in range(K):
                        acc += abs(G[j, k])
                    lipschitz = max(lipschitz, acc)
                lipschitz = max(lipschitz, 1e-12)
            for _ in range(20):
                for k in range(K):
                    v = c[k] + g[k] / lipschitz
                    c[k] = _sign(v) * max(abs(v) - alpha / lipschitz, 0.0)
                _refresh_gradient(G, b, c, g)
            m = 0
            for j in range(K):
                if c[j] != 0.0:
                    S[m] = j
                    m += 1
    return -it, _quad(b, c, g)


@njit(cache=True, nogil=True)
def _code_rows(G, B, alpha, tol, max_iter, C, iters, quad):
    for r in range(B.shape[0]):
        iters[r], quad[r] = _code_row(G, B[r], alpha, tol, max_iter, C[r])


_pool: ThreadPoolExecutor | None = None


def code_rows(G, B, alpha: float, tol: float, max_iter: int, C, iters, quad, threads: int = 1) -> None:
    """Code every row of B (n × K, b = x Dᵀ) against the Gram matrix G (K × K) into C (n × K,
    float64, warm start in, codes out); G and B may be float32 or float64 (read and widened, exactly); iters[r] = iterations of row r (negative: unconverged), quad[r] = cᵀGc.

    With threads > 1 the rows are dealt out (r, r + t, ...) to that many Python threads; the kernel
    releases the GIL, so they run in parallel (plain threads, not numba's OpenMP pool: nothing spins
    beside torch's own OpenMP threads, and nothing breaks after a fork)."""
    global _pool
    n = B.shape[0]
    t = max(1, min(threads, n // 32))  # below ~32 rows a thread costs more than it saves
    if t == 1:
        _code_rows(G, B, alpha, tol, max_iter, C, iters, quad)
        return
    if _pool is None or _pool._max_workers < t:
        _pool = ThreadPoolExecutor(max_workers=t, thread_name_prefix="ga-ray-coder")
    # strided slices are views: every thread writes its rows of C, iters and quad in place
    jobs = [_pool.submit(_code_rows, G, B[i::t], alpha, tol, max_iter, C[i::t], iters[i::t], quad[i::t])
            for i in range(t)]
    for j in jobs:
        j.result()
