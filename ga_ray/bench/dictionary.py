"""`ga-ray bench dictionary`: our online dictionary learner vs scikit-learn's MiniBatchDictionaryLearning.

(i) planted-atom data (N = 5,000 unit rows in D = 6,800, 500 planted atoms, 2–3 per row + noise),
(ii) the demo world's real projected gradients when `run_dir=` names a run with `gradients/`:
scikit-learn with the paper's arguments (K, α = 0.1, batch 256, max_iter = 100, lasso_lars,
random_state = 42) against ours on the same rows, in the same process, with the same thread count.
Both final dictionaries are scored by the same exact lasso evaluation on all rows (our coder, KKT to
1e-6): objective (1/N) Σ ½‖x − cD‖² + α‖c‖₁, dead atoms (atoms no row uses), planted-atom recovery
(share of true atoms matched at |cos| > 0.9). Ours is timed three times: with the stage's defaults
(stopping rule and forgetting exponent ρ), with the same stopping rule but scikit-learn's forgetting
weights (ρ = 1: the control for ρ), and with the defaults until its objective first reaches
scikit-learn's (checked every eighth of an epoch, checks not timed). Then (iii) our time for K = 1,000 and N = 50,000, and (iv) the measured cost of one
online step on a grid of K and D, with fitted exponents (how time grows with N, K, D).

The floor of an epoch: its GEMM work at the float32 GEMM rate measured in the same run (the faster of
torch's and numpy's BLAS), the correlations and the statistics (2·N·K·D each: X·Dᵀ for the coder, Σ xᵀc
for B) plus, per step, the Gram D·Dᵀ and the block-coordinate atom update (2·K²·D each); `over_floor` is
our measured seconds per epoch over it, `over_floor_cpu` our CPU seconds per epoch over the same work at one
core's rate (the learner runs products under `threads.GEMM_PARALLEL_MIN` on one thread, which on small D is
most of them). The CPU ceiling: scikit-learn's CPU seconds over the same epochs
of the dense products our learner cannot skip (X·Dᵀ, and per step the Gram matrix as a symmetric rank-k
update and the sweep's B − A·D) at one core's GEMM rate, i.e. the best CPU-time ratio this algorithm could
reach on this CPU, at our default stop and stopping exactly at scikit-learn's objective.

Options: quick, threads (2), run_dir, n_atoms, reps (1), large_n (50000), large_k (1000),
large_epochs (3), skip_large, skip_sklearn.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import torch

from ga_ray.bench.common import machine_info, print_table
from ga_ray.atoms.lasso import gram, lasso_gram, row_objective
from ga_ray.atoms.synthetic import planted_atoms, recovery
from ga_ray.atoms.trainer import FitSettings, learn_dictionary


class _Reached(Exception):
    pass


def exact_scores(X: np.ndarray, D: np.ndarray, alpha: float, tol: float = 1e-6, batch: int = 2048) -> dict[str, float]:
    """The shared judge: exact lasso codes of every row against D; objective, dead atoms, L0."""
    Dt = torch.as_tensor(np.asarray(D, dtype=np.float32))
    G = gram(Dt)
    G64 = G.double()
    total, used, l0 = 0.0, torch.zeros(Dt.shape[0], dtype=torch.bool), 0
    for s in range(0, X.shape[0], batch):
        x = torch.as_tensor(np.asarray(X[s : s + batch], dtype=np.float32))
        b = x @ Dt.T
        C, _ = lasso_gram(G, b, alpha, tol=tol, G64=G64)
        rec, l1 = row_objective(C.double(), G64, b.double(), (x.double() ** 2).sum(1), alpha)
        total += float((rec + l1).sum())
        nz = C != 0
        used |= nz.any(0)
        l0 += int(nz.sum())
    return {"objective": total / X.shape[0], "dead_atoms": int((~used).sum()), "l0_mean": l0 / X.shape[0]}


def _settings(n_atoms: int, alpha: float, n_rows: int, **kw: Any) -> FitSettings:
    """The stage's default settings (one place defines them, the batch included) at this benchmark's K,
    alpha and rows."""
    from dataclasses import replace

    from ga_ray.config import DictionaryConfig
    from ga_ray.atoms.stage import fit_settings

    c = DictionaryConfig().model_copy(update={"n_atoms": n_atoms, "alpha": alpha})
    return replace(fit_settings(c, c.seed, n_rows), **kw)


def _heldout_fraction() -> float:
    """The stage's default share of held-out rows (the bench runs the stage's defaults)."""
    from ga_ray.config import DictionaryConfig

    return DictionaryConfig().heldout_fraction


def _run_sklearn(X: np.ndarray, n_atoms: int, alpha: float, threads: int) -> tuple[float, float, np.ndarray, int]:
    from threadpoolctl import threadpool_limits

    from ga_ray.atoms.sklearn_backend import paper_estimator

    with threadpool_limits(threads):
        est = paper_estimator(n_atoms, alpha, 256, 42)
        t0, c0 = time.perf_counter(), time.process_time()
        est.fit(X)
        return time.perf_counter() - t0, time.process_time() - c0, np.asarray(est.components_, dtype=np.float32), int(est.n_steps_)


def _run_ours(X: np.ndarray, s: FitSettings) -> tuple[float, float, Any]:
    t0, c0 = time.perf_counter(), time.process_time()
    r = learn_dictionary(X, s, heldout_fraction=_heldout_fraction())
    return time.perf_counter() - t0, time.process_time() - c0, r


def _ours_until(X: np.ndarray, s: FitSettings, target: float, alpha: float) -> dict[str, Any]:
    """Our wall time until the exact objective on all rows is ≤ target (checks every eighth of an epoch, untimed)."""
    spe = max(1, math.ceil(X.shape[0] * (1 - _heldout_fraction()) / s.batch_size))
    every = max(1, spe // 8)  # eighth-epoch checks: the reported time overshoots the crossing by < 1/8 epoch
    spent = {"eval": 0.0, "eval_cpu": 0.0, "steps": 0, "objective": None}
    t0, c0 = time.perf_counter(), time.process_time()

    def check(state, res):
        if state.step % every:
            return
        t, c = time.perf_counter(), time.process_time()
        o = exact_scores(X, state.D.cpu().numpy(), alpha)["objective"]
        spent["eval"] += time.perf_counter() - t
        spent["eval_cpu"] += time.process_time() - c
        spent["objective"] = o
        if o <= target:
            spent["steps"] = state.step
            raise _Reached

    reached = True
    try:
        never = {"max_epochs": 60.0, "tol": 0.0, "patience": 10**9}  # only the target stops it
        learn_dictionary(X, FitSettings(**{**s.__dict__, **never}), on_step=check, heldout_fraction=_heldout_fraction())
        reached = False
    except _Reached:
        pass
    return {
        "wall_s": time.perf_counter() - t0 - spent["eval"],
        "cpu_s": time.process_time() - c0 - spent["eval_cpu"],
        "steps": spent["steps"],
        "epochs": spent["steps"] / spe,
        "reached": reached,
        "objective": spent["objective"],
    }


def epoch_floor_s(n_rows: int, dim: int, n_atoms: int, batch: int, rate: float, rate_low: float | None = None) -> float:
    """Seconds of one epoch's GEMM work at `rate` flop/s (see the module docstring for the terms);
    `rate_low`: the rate of the products that ran in bfloat16 (the correlations and the sweep's A·D)."""
    steps = math.ceil(n_rows / batch)
    low = rate_low or rate
    return (2 * 2.0 * n_rows * n_atoms * dim + steps * 2.0 * n_atoms * n_atoms * dim) / low + steps * 2.0 * n_atoms * n_atoms * dim / rate


def dense_products_cpu_s(n_rows: int, dim: int, n_atoms: int, batch: int, rate: float, rate_low: float | None = None) -> float:
    """CPU seconds of one epoch of the dense products our learner cannot skip, as it runs them: X·Dᵀ for
    the coder (2·N·K·D) and the sweep's A·D (2·K²·D per step), at `rate_low` when they ran in bfloat16,
    and the Gram matrix as a symmetric rank-k update (K²·D per step, float32) at `rate`. The statistics'
    sparse products and the sweep's small in-block products are left out, so time at this count is a
    lower bound on any run of the same algorithm."""
    steps = math.ceil(n_rows / batch)
    low = rate_low or rate
    return (2.0 * n_rows * n_atoms * dim + steps * 2.0 * n_atoms * n_atoms * dim) / low + steps * n_atoms * n_atoms * dim / rate


def numpy_gemm_rate(n_rows: int, dim: int, n_atoms: int, threads: int) -> float:
    """numpy's float32 GEMM rate (flop/s) at the correlations' shape on `threads` BLAS threads; on one
    thread, the most a core does (CPU seconds per flop is what the CPU-time ratio counts)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((min(n_rows, 4096), dim), dtype=np.float32)
    b = rng.standard_normal((dim, n_atoms), dtype=np.float32)
    with threadpool_limits(threads, user_api="blas"):
        a @ b  # warm-up
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2.0 * a.shape[0] * dim * n_atoms / statistics.median(times)


def cpu_ceiling(sklearn_cpu_s: float, epochs: float, n_rows: int, dim: int, n_atoms: int, batch: int, rate_one_core: float, rate_low_one_core: float | None = None) -> dict[str, float]:
    """The best CPU-time ratio against scikit-learn our algorithm could reach in `epochs` on this CPU:
    scikit-learn's CPU seconds over `epochs` × one epoch's unavoidable dense products at one core's rates."""
    floor_cpu_s = epochs * dense_products_cpu_s(n_rows, dim, n_atoms, batch, rate_one_core, rate_low_one_core)
    return {"epochs": epochs, "floor_cpu_s": floor_cpu_s, "ratio": sklearn_cpu_s / floor_cpu_s if floor_cpu_s > 0 else float("inf")}


def bf16_gemm_rate(n_rows: int, dim: int, n_atoms: int, threads: int) -> float:
    """torch's bfloat16 GEMM rate (flop/s) at the correlations' shape on `threads` threads."""
    from ga_ray.bench.gpu import gemm_rate

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return gemm_rate(min(n_rows, 4096), dim, n_atoms, torch.device("cpu"), torch.bfloat16)
    finally:
        torch.set_num_threads(old)


def _gemm_rate(n_rows: int, dim: int, n_atoms: int) -> float:
    """The faster of torch's and numpy's float32 GEMM rates at the correlations' shape, all threads (the
    learner runs its large CPU products through numpy's BLAS, which is the faster one on some CPUs)."""
    from ga_ray.bench.gpu import gemm_rate

    torch_rate = gemm_rate(min(n_rows, 4096), dim, n_atoms, torch.device("cpu"))
    return max(torch_rate, numpy_gemm_rate(n_rows, dim, n_atoms, torch.get_num_threads()))


def compare(X: np.ndarray, truth: np.ndarray | None, n_atoms: int, alpha: float, threads: int, reps: int, label: str, skip_sklearn: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"data": label, "n": int(X.shape[0]), "dim": int(X.shape[1]), "n_atoms": n_atoms, "alpha": alpha}
    s = _settings(n_atoms, alpha, X.shape[0])
    # warm-up (threads, MKL, allocator) on a slice, untimed
    learn_dictionary(X[: min(len(X), 4 * s.batch_size)], FitSettings(**{**s.__dict__, "max_epochs": 1.0}), heldout_fraction=_heldout_fraction())
    times, cpus, runs = [], [], []
    for _ in range(reps):
        t, c, r = _run_ours(X, s)
        times.append(t)
        cpus.append(c)
        runs.append(r)
    r = runs[-1]
    ours = exact_scores(X, r.state.D.cpu().numpy(), alpha)
    out["ours"] = {
        "wall_s": statistics.median(times),
        "wall_s_all": times,
        "cpu_s": statistics.median(cpus),
        "steps": r.steps,
        "epochs": round(r.epochs, 3),
        "batch_size": s.batch_size,
        "matmul_precision": r.matmul_precision,
        "stop_reason": r.stop_reason,
        **ours,
        "recovery_0.9": recovery(r.state.D.cpu().numpy(), truth) if truth is not None else None,
    }
    def control(settings: FitSettings) -> dict[str, Any]:
        """Our learner under `settings`: times, steps, the exact objective and recovery."""
        tc, cc, rc = _run_ours(X, settings)
        D = rc.state.D.cpu().numpy()
        return {"wall_s": tc, "cpu_s": cc, "steps": rc.steps, "epochs": round(rc.epochs, 3), **exact_scores(X, D, alpha),
                "recovery_0.9": recovery(D, truth) if truth is not None else None}

    # the control: the same learner and stopping rule with scikit-learn's forgetting weights (ρ = 1)
    out["ours_forget_1"] = control(FitSettings(**{**s.__dict__, "forget_exponent": 1.0}))
    if r.matmul_precision == "bfloat16":
        # the control: the same settings with float32 products (what `matmul_precision: float32` runs)
        out["ours_float32"] = control(FitSettings(**{**s.__dict__, "matmul_precision": "float32"}))
    rate = _gemm_rate(*X.shape, n_atoms)
    rate1 = numpy_gemm_rate(*X.shape, n_atoms, threads=1)
    low = r.matmul_precision == "bfloat16"
    rate_low = bf16_gemm_rate(*X.shape, n_atoms, torch.get_num_threads()) if low else None
    rate_low1 = bf16_gemm_rate(*X.shape, n_atoms, 1) if low else None
    s_per_epoch = statistics.median(t / max(x.epochs, 1e-9) for t, x in zip(times, runs))
    cpu_s_per_epoch = statistics.median(c / max(x.epochs, 1e-9) for c, x in zip(cpus, runs))
    floor = epoch_floor_s(X.shape[0], X.shape[1], n_atoms, s.batch_size, rate, rate_low)
    # the same work in CPU seconds, at one core's rate: products under threads.GEMM_PARALLEL_MIN multiply-adds
    # run on one thread by design, so on small D an epoch's wall time sits near this floor, not the one above
    floor_cpu = epoch_floor_s(X.shape[0], X.shape[1], n_atoms, s.batch_size, rate1, rate_low1)
    out["floor"] = {"gemm_gflops": rate / 1e9, "s_per_epoch": s_per_epoch, "floor_s": floor, "over_floor": s_per_epoch / floor,
                    "gemm_gflops_one_core": rate1 / 1e9, "cpu_s_per_epoch": cpu_s_per_epoch, "floor_cpu_s": floor_cpu,
                    "over_floor_cpu": cpu_s_per_epoch / floor_cpu,
                    "bf16_gemm_gflops": rate_low / 1e9 if low else None, "bf16_gemm_gflops_one_core": rate_low1 / 1e9 if low else None}
    if not skip_sklearn:
        t_sk, c_sk, D_sk, steps_sk = _run_sklearn(X, n_atoms, alpha, threads)
        sk = exact_scores(X, D_sk, alpha)
        out["sklearn"] = {"wall_s": t_sk, "cpu_s": c_sk, "steps": steps_sk, **sk, "recovery_0.9": recovery(D_sk, truth) if truth is not None else None}
        out["ratio_default"] = t_sk / out["ours"]["wall_s"]
        out["cpu_ratio_default"] = c_sk / out["ours"]["cpu_s"]
        out["cpu_ratio_forget_1"] = c_sk / out["ours_forget_1"]["cpu_s"]
        if "ours_float32" in out:
            out["cpu_ratio_float32"] = c_sk / out["ours_float32"]["cpu_s"]
        until = _ours_until(X, s, sk["objective"], alpha)
        out["ours_until_sklearn_objective"] = until
        out["ratio_to_sklearn_objective"] = t_sk / until["wall_s"] if until["reached"] else None
        out["cpu_ratio_to_sklearn_objective"] = c_sk / until["cpu_s"] if until["reached"] else None
        # how far the goal is reachable at all: the same epochs with only the unavoidable GEMM work
        n_train = int(X.shape[0] * (1 - _heldout_fraction()))
        out["ceiling"] = {
            "gemm_gflops_one_core": rate1 / 1e9,
            "bf16_gemm_gflops_one_core": rate_low1 / 1e9 if low else None,
            "default_stop": cpu_ceiling(c_sk, out["ours"]["epochs"], n_train, X.shape[1], n_atoms, s.batch_size, rate1, rate_low1),
            "to_sklearn_objective": cpu_ceiling(c_sk, until["epochs"], n_train, X.shape[1], n_atoms, s.batch_size, rate1, rate_low1) if until["reached"] else None,
        }
    return out


def step_cost_grid(quick: bool) -> dict[str, Any]:
    """Median wall time of one full online step (code + statistics + BCD + Gram) for a grid of K, D."""
    from ga_ray.atoms.lasso import sparse_encode
    from ga_ray.atoms.online import OnlineState, online_step
    from ga_ray.atoms.threads import matmul, small_ops

    ks = [16, 32] if quick else [250, 500, 1000]
    ds = [64, 128] if quick else [1700, 3400, 6800]
    n = 256
    rows = []
    for K in ks:
        for Dm in ds:
            X, T, _ = planted_atoms(max(4 * n, K), Dm, K, seed=1)
            Xt = torch.from_numpy(X)
            st = OnlineState.from_dictionary(torch.from_numpy(X[:K].copy()))
            times = []
            with small_ops():  # the learner's threading (its products through numpy's BLAS on CPU)
                for i in range(4):
                    xb = Xt[(i % 4) * n : (i % 4 + 1) * n]
                    t0 = time.perf_counter()
                    G = gram(st.D)
                    C = sparse_encode(xb, st.D, 0.1, G=G)
                    rec, l1 = row_objective(C, G, matmul(xb, st.D.T), (xb * xb).sum(1), 0.1)
                    online_step(st, xb, C, rec, l1)
                    times.append(time.perf_counter() - t0)
            rows.append({"K": K, "D": Dm, "step_s": statistics.median(times[1:])})
    # fitted exponents: log t = a + p log K + q log D
    A = np.array([[1.0, math.log(r["K"]), math.log(r["D"])] for r in rows])
    y = np.array([math.log(r["step_s"]) for r in rows])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"rows": rows, "exponent_K": float(coef[1]), "exponent_D": float(coef[2]), "batch": n}


def main(quick: bool = False, **opts: Any) -> dict[str, Any]:
    threads = int(opts.get("threads", 2))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    reps = int(opts.get("reps", 1))
    try:
        result: dict[str, Any] = {"machine": machine_info(), "threads": threads}
        if quick:
            N, P, K = 300, 64, 12
        else:
            N, P, K = 5000, 6800, int(opts.get("n_atoms", 500))
        X, T, _ = planted_atoms(N, P, K, seed=0)
        result["planted"] = compare(X, T, K, 0.1, threads, reps, "planted", skip_sklearn=bool(opts.get("skip_sklearn")))

        run_dir = opts.get("run_dir")
        if run_dir:
            from pathlib import Path

            from ga_ray.atoms.sklearn_backend import normalise
            from ga_ray.gradients.io import read_z

            _, Z = read_z(Path(run_dir) / "gradients")
            Xr = normalise(Z)
            Kr = int(opts.get("n_atoms", min(500, max(2, Xr.shape[0] // 10))))
            result["real"] = compare(Xr, None, Kr, 0.1, threads, reps, f"gradients of {run_dir}", skip_sklearn=bool(opts.get("skip_sklearn")))

        if not opts.get("skip_large"):
            n_large = 1000 if quick else int(opts.get("large_n", 50_000))
            k_large = 24 if quick else int(opts.get("large_k", 1000))
            p_large = 64 if quick else 6800
            XL, TL, _ = planted_atoms(n_large, p_large, k_large, seed=2)
            s = _settings(k_large, 0.1, n_large, max_epochs=float(opts.get("large_epochs", 3)))
            t, c, r = _run_ours(XL, s)
            result["large"] = {
                "cpu_s": c,
                "n": n_large,
                "dim": p_large,
                "n_atoms": k_large,
                "wall_s": t,
                "steps": r.steps,
                "epochs": round(r.epochs, 3),
                "s_per_epoch": t / max(r.epochs, 1e-9),
                "stop_reason": r.stop_reason,
                "objective": r.history[-1]["objective"] if r.history else None,
                "objective_kind": r.history[-1].get("objective_kind") if r.history else None,
                "recovery_0.9": recovery(r.state.D.cpu().numpy(), TL),
                "timings": r.timings,
            }
        result["step_cost"] = step_cost_grid(quick)
        _print(result)
        return result
    finally:
        torch.set_num_threads(old_threads)


def _print(res: dict[str, Any]) -> None:
    for key in ("planted", "real"):
        if key not in res:
            continue
        c = res[key]
        rows = []
        if "sklearn" in c:
            s = c["sklearn"]
            rows.append({"method": "scikit-learn (paper args)", "wall_s": s["wall_s"], "ratio": 1.0, "cpu_s": s["cpu_s"], "cpu_ratio": 1.0, "steps": s["steps"], "objective": s["objective"], "dead": s["dead_atoms"], "recovery": s["recovery_0.9"]})
        o = c["ours"]
        rows.append({"method": "ours (default stop)", "wall_s": o["wall_s"], "ratio": c.get("ratio_default"), "cpu_s": o["cpu_s"], "cpu_ratio": c.get("cpu_ratio_default"), "steps": o["steps"], "objective": o["objective"], "dead": o["dead_atoms"], "recovery": o["recovery_0.9"]})
        f1 = c["ours_forget_1"]
        rows.append({"method": "ours, rho = 1 (sklearn's weights)", "wall_s": f1["wall_s"], "ratio": c["sklearn"]["wall_s"] / f1["wall_s"] if "sklearn" in c else None, "cpu_s": f1["cpu_s"], "cpu_ratio": c.get("cpu_ratio_forget_1"), "steps": f1["steps"], "objective": f1["objective"], "dead": f1["dead_atoms"], "recovery": f1["recovery_0.9"]})
        if "ours_float32" in c:
            f32 = c["ours_float32"]
            rows.append({"method": "ours, float32 products", "wall_s": f32["wall_s"], "ratio": c["sklearn"]["wall_s"] / f32["wall_s"] if "sklearn" in c else None, "cpu_s": f32["cpu_s"], "cpu_ratio": c.get("cpu_ratio_float32"), "steps": f32["steps"], "objective": f32["objective"], "dead": f32["dead_atoms"], "recovery": f32["recovery_0.9"]})
        if "ours_until_sklearn_objective" in c:
            u = c["ours_until_sklearn_objective"]
            rows.append({"method": "ours to sklearn's objective", "wall_s": u["wall_s"], "ratio": c.get("ratio_to_sklearn_objective"), "cpu_s": u["cpu_s"], "cpu_ratio": c.get("cpu_ratio_to_sklearn_objective"), "steps": u["steps"], "objective": u["objective"], "dead": "", "recovery": ""})
        print_table(f"dictionary learning, {c['data']}: N={c['n']}, D={c['dim']}, K={c['n_atoms']}, alpha={c['alpha']}; batch: ours {o['batch_size']} "
                    f"(the stage's auto), scikit-learn 256; our products: {o['matmul_precision']} (the stage's auto) (ratio = sklearn time / ours)", rows)
        f = c["floor"]
        print(f"  epoch floor: {f['s_per_epoch']:.2f} s per epoch against {f['floor_s']:.2f} s of GEMM work at {f['gemm_gflops']:.1f} GFLOP/s "
              f"measured now: {f['over_floor']:.1f}x the floor (goal <= 3x); in cpu time {f['cpu_s_per_epoch']:.2f} s against "
              f"{f['floor_cpu_s']:.2f} s at one core's {f['gemm_gflops_one_core']:.0f} GFLOP/s: {f['over_floor_cpu']:.1f}x"
              + (f" (bfloat16 products at {f['bf16_gemm_gflops']:.0f} GFLOP/s, {f['bf16_gemm_gflops_one_core']:.0f} on one core)" if f.get("bf16_gemm_gflops") else ""))
        if c.get("ceiling"):
            g, d, t = c["ceiling"], c["ceiling"]["default_stop"], c["ceiling"]["to_sklearn_objective"]
            line = (f"  cpu ceiling (sklearn's cpu over the epochs' unavoidable GEMM work at one core's {g['gemm_gflops_one_core']:.0f} GFLOP/s): "
                    f"{d['ratio']:.1f}x at our default stop ({d['epochs']:.2f} epochs, {d['floor_cpu_s']:.2f} s)")
            if t:
                line += f", {t['ratio']:.1f}x to sklearn's objective ({t['epochs']:.2f} epochs, {t['floor_cpu_s']:.2f} s)"
            print(line)
    if "large" in res:
        L = res["large"]
        print_table("ours at scale", [{k: L[k] for k in ("n", "dim", "n_atoms", "wall_s", "cpu_s", "steps", "epochs", "s_per_epoch", "objective", "recovery_0.9")}])
    g = res["step_cost"]
    print_table(
        f"one online step (batch {g['batch']}): time ∝ K^{g['exponent_K']:.2f} · D^{g['exponent_D']:.2f}; per epoch × N/batch",
        g["rows"],
    )
    m = res["machine"]
    blas = m.get("numpy_blas", "unknown")
    if m.get("openblas_coretype_env"):
        blas += f", OPENBLAS_CORETYPE={m['openblas_coretype_env']} set by the environment"
    print(f"\nmachine: {m.get('cpu_cores')} cores, gpu {m.get('gpu')}, torch threads {res['threads']}; numpy's BLAS: {blas}")
