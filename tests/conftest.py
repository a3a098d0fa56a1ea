import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

# numba reads NUMBA_ENABLE_CUDASIM once, when numba.cuda is first imported, and a
# process cannot switch afterwards. Unless a real GPU is asked for (GPURNN_BACKEND=cuda,
# as gpu_check's suite stage runs), fix the simulator before any test imports numba.cuda,
# so the cudasim tests run in whatever order, or pytest-xdist worker, they come.
if os.environ.get("GPURNN_BACKEND", "").strip().lower() != "cuda":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
