import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, and a
# process cannot switch afterwards. Unless a real GPU is asked for (GPURNN_BACKEND=cuda,
# as gpu_check's suite stage runs), fix the simulator before any test imports numba.cuda,
# so the cudasim tests run in whatever order, or pytest-xdist worker, they come.
if os.environ.get("GPURNN_BACKEND", "").strip().lower() != "cuda":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# The suite runs in two pytest-xdist workers on as many cores (CI's machine has two).
# A BLAS or OpenMP pool of its own in each worker, and in the processes tests start,
# oversubscribes them: OpenBLAS's threads spin while they wait, and a test that runs
# beside a BLAS-heavy one took 5-7x its time alone. One thread each.
for _threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")

# The CUDA simulator runs a Python thread per CUDA thread, and its launcher polls them in
# a loop that holds the GIL for a whole switch interval (5 ms by default) each time:
# handing it over sooner runs the simulator's tests about twice as fast.
sys.setswitchinterval(5e-4)
