"""ga-ray: Gradient Atoms on Ray."""

import os as _os

__version__ = "0.1.0"

# After each multi-threaded call OpenBLAS (numpy's BLAS, which runs the dictionary learner's large
# products on CPU: `ga_ray.atoms.threads.matmul`) keeps its idle threads spinning for 2^28 cycles, about
# 0.1 s, before they sleep: between the learner's products, which come every few milliseconds, a core
# then never rests (measured on 2 cores, the planted-atom benchmark's fit: 16.0 s of CPU for 8.0 s of
# wall time; with 2^4, 13.2 s for 8.5 s). OpenBLAS reads this when numpy loads it, so it is set here,
# before any ga_ray module imports numpy; Ray workers started by this process inherit it. A user's own
# setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# The same for torch's OpenMP threads (libgomp), which run the learner's bfloat16 products
# (`ga_ray.atoms.precision`): after each parallel product they spin, by default, while the driver's
# single-threaded work goes on between products (measured on 2 cores, the planted-atom benchmark's fit
# with bfloat16 products: 5.6 s of CPU for 3.1 s of wall time; with 0 spins, 4.2-4.6 s for 3.0-3.3 s;
# the gradients benchmark's figures did not move). libgomp reads this when torch loads it.
_os.environ.setdefault("GOMP_SPINCOUNT", "0")
