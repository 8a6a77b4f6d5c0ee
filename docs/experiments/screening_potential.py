"""Experiment (not part of the package): how many correlations a safe screening rule could skip.

The coder needs every row's correlations x·d_k with all K atoms (2·N·K·D flop per epoch, 57% of the
products at the stage's batch of 2·K rows). A row visited again one epoch later still has its old
correlations b_k from the dictionary then; with unit rows, |x·d_k(now) − b_k| ≤ ‖d_k(now) − d_k(then)‖.
So an atom the new codes leave inactive is certified inactive without its new correlation when
|b_k − (G c)_k| + drift_k < α, the lasso's KKT bound with room for the drift. This script runs the
learner's own steps (`online_step`, the exact coder) on planted atoms and reports, per epoch, the share
of (row, atom) pairs that bound certifies, with two drift bounds: the exact displacement since the row's
last visit (needs the dictionary of every step of the last epoch) and the sum of the per-step
displacements (needs K numbers per step). It measures the potential only: no screened coder exists.

    PYTHONPATH=. python docs/experiments/screening_potential.py
"""

from __future__ import annotations

import numpy as np
import torch

from ga_ray.atoms.lasso import gram, row_objective, sparse_encode
from ga_ray.atoms.online import OnlineState, online_step
from ga_ray.atoms.threads import matmul, small_ops


def screenable_shares(X: np.ndarray, n_atoms: int, alpha: float, batch: int, epochs: int, seed: int = 0) -> list[dict[str, float]]:
    """Per epoch from the second: the shares of (row, atom) pairs certified inactive by each bound."""
    N = X.shape[0]
    rng = np.random.default_rng(seed)
    Xt = torch.from_numpy(X)
    st = OnlineState.from_dictionary(Xt[:n_atoms].clone())
    b_old = np.zeros((N, n_atoms), np.float32)
    visit = np.full(N, -1)
    snapshots = [st.D.numpy().copy()]  # the dictionary before each step
    summed = [np.zeros(n_atoms)]  # Σ of per-step displacements, per atom
    out = []
    with small_ops():
        G = gram(st.D)
        for epoch in range(epochs):
            perm = rng.permutation(N)
            exact = summ = pairs = 0
            for s in range(0, N, batch):
                ids = perm[s : s + batch]
                xb = Xt[ids].contiguous()
                b = matmul(xb, st.D.T)
                C = sparse_encode(xb, st.D, alpha, G=G)
                seen = visit[ids] >= 0
                if seen.any():
                    Cs = C.numpy()[seen]
                    margin = np.abs(b_old[ids][seen] - Cs @ G.numpy())
                    inactive = Cs == 0
                    now = st.D.numpy()
                    d_exact = np.stack([np.linalg.norm(now - snapshots[v], axis=1) for v in visit[ids][seen]])
                    d_sum = summed[-1][None, :] - np.stack([summed[v] for v in visit[ids][seen]])
                    exact += int(((margin + d_exact < alpha) & inactive).sum())
                    summ += int(((margin + d_sum < alpha) & inactive).sum())
                    pairs += inactive.size
                b_old[ids] = b.numpy()
                visit[ids] = len(snapshots) - 1
                rec, l1 = row_objective(C, G, b, (xb * xb).sum(1), alpha)
                before = st.D.clone()
                _, G = online_step(st, xb, C, rec, l1, forget_exponent=4.0)
                summed.append(summed[-1] + torch.linalg.vector_norm(st.D - before, dim=1).numpy())
                snapshots.append(st.D.numpy().copy())
            if pairs:
                out.append({"epoch": epoch + 1, "exact_drift": exact / pairs, "summed_drift": summ / pairs})
    return out


def main() -> None:
    from ga_ray.atoms.synthetic import planted_atoms

    torch.set_num_threads(2)
    X, _, _ = planted_atoms(5000, 6800, 500, seed=0)
    for r in screenable_shares(X[:4750], 500, 0.1, 1000, 6):
        print(f"epoch {r['epoch']}: certified inactive without a new correlation: {r['exact_drift']:.3f} (exact drift), "
              f"{r['summed_drift']:.3f} (summed drift) of the (row, atom) pairs")


if __name__ == "__main__":
    main()
