"""Backend selection: the only module that imports CuPy or numba.cuda.

``get_backend()`` returns the process-wide backend, chosen once from the
environment variable ``GPURNN_BACKEND``:

    auto (default)  cuda when CuPy imports, a GPU is visible and numba.cuda
                    works; numpy otherwise
    numpy           the NumPy reference backend
    cuda            the CUDA backend; an error saying what is missing if it
                    cannot work
    cudasim         the CUDA code path (kernels and drivers) run by numba's
                    CUDA simulator with NumPy matmuls: CI's way to execute
                    every kernel without a GPU

A backend carries ``name``, ``xp`` (the array module), ``reason`` (why it was
chosen) and ``ops`` (the operations the time-loop drivers call).
"""

import contextlib
import functools
import importlib.util
import os
import sys

import numpy as np

from gpurnn import cells
from gpurnn.precision import computed_in_float32, is_half

CHOICES = ("auto", "numpy", "cuda", "cudasim")
MATH_MODES = ("fp32", "tf32")
_math_mode = "fp32"


def set_math_mode(mode):
    """"fp32" (default): strict float32 GEMMs. "tf32": float32 GEMMs on TF32
    tensor cores (CUDA backend; the NumPy backend has no such unit and ignores it)."""
    global _math_mode
    if mode not in MATH_MODES:
        raise ValueError(f"mode: expected one of {MATH_MODES}, got {mode!r}")
    _math_mode = mode


def math_mode():
    return _math_mode


_deterministic = os.environ.get("GPURNN_DETERMINISTIC", "0").strip() not in ("", "0")


def use_deterministic_algorithms(mode=True):
    """True: the CUDA backend makes only choices that give the same bits in every
    process (as torch.use_deterministic_algorithms): each GEMM uses W as stored
    instead of the layout timed fastest at first use (a timing can come out either
    way from one process to the next), and the embedding's gradient sums repeated
    rows with one-hot GEMMs in a fixed order instead of atomic adds. Default False,
    or GPURNN_DETERMINISTIC=1. The NumPy backend and the simulator are always
    deterministic. Graphs are kept per mode, so it can be switched at any time."""
    global _deterministic
    if not isinstance(mode, (bool, np.bool_)):
        raise TypeError(f"mode: expected True or False, got {mode!r}")
    _deterministic = bool(mode)


def deterministic_algorithms():
    return _deterministic


RNN_ALGORITHMS = ("graph", "fused", "persistent")
_rnn_algorithm = None


def set_rnn_algorithm(name=None):
    """Force the recurrence algorithm of every layer (CUDA backend), or None (the
    default) to let each shape use the fastest, timed at its first call:

    "graph"       per step a cuBLAS GEMM and a pointwise kernel, captured as a CUDA graph
    "fused"       per step one kernel that also computes the recurrent product
    "persistent"  one kernel per span of steps, W_hh in shared memory

    The environment variable GPURNN_RNN_ALGO does the same for a whole process. A
    forced algorithm that cannot run a shape raises ValueError saying why; the
    NumPy backend runs "graph" only."""
    global _rnn_algorithm
    if name is not None and name not in RNN_ALGORITHMS:
        raise ValueError(f"name: expected one of {RNN_ALGORITHMS} or None, got {name!r}")
    _rnn_algorithm = name


def rnn_algorithm():
    """The forced algorithm (set_rnn_algorithm, else GPURNN_RNN_ALGO), or None: chosen per shape."""
    if _rnn_algorithm is not None:
        return _rnn_algorithm
    env = os.environ.get("GPURNN_RNN_ALGO", "").strip()
    if env in ("", "auto"):
        return None
    if env not in RNN_ALGORITHMS:
        raise ValueError(f"GPURNN_RNN_ALGO: expected one of {RNN_ALGORITHMS} or auto, got {env!r}")
    return env


def cublas_workspace_bytes():
    """The cuBLAS workspace the CUDA backend gives each stream of its own that runs GEMMs
    beside another's (a bidirectional layer's or a wavefront's lanes, the side streams of
    the input projections): GPURNN_CUBLAS_WORKSPACE_MIB, default 32, what cuBLAS reserves
    by default on Hopper. A smaller one saves memory where several lanes run (a 3-layer
    stack holds five), and may cost small GEMMs speed; 0 runs them with none. Read when
    a lane is made."""
    env = os.environ.get("GPURNN_CUBLAS_WORKSPACE_MIB", "").strip()
    if not env:
        return 32 << 20
    try:
        mib = float(env)
    except ValueError:
        mib = float("nan")
    if not 0 <= mib < 2**20:  # NaN fails too
        raise ValueError(f"GPURNN_CUBLAS_WORKSPACE_MIB: expected a number of MiB, 0 or more, got {env!r}")
    return int(mib * 2**20) // 256 * 256  # whole 256-byte units, as cuBLAS aligns its workspaces


_cpu_kernels = None


def set_cpu_kernels(mode=None):
    """Whether the NumPy backend runs float32 steps as gpurnn.cpu_kernels' fused steps,
    compiled by numba (True), or as the NumPy spec in gpurnn.cells (False); None (the
    default) leaves it to GPURNN_CPU_KERNELS (1 or 0), else on wherever numba is
    installed. The fused steps make a float32 step several times faster and agree with
    the spec to float32 rounding (their tanh is a rational approximation); float64 and
    the half types always run the spec."""
    global _cpu_kernels
    if mode is not None and not isinstance(mode, (bool, np.bool_)):
        raise TypeError(f"mode: expected True, False or None, got {mode!r}")
    if mode and not _have_numba():
        raise ImportError("set_cpu_kernels(True): the fused CPU steps need numba: pip install numba")
    _cpu_kernels = None if mode is None else bool(mode)


def cpu_kernels():
    """True where the NumPy backend runs float32 steps fused (see set_cpu_kernels)."""
    if _cpu_kernels is not None:
        return _cpu_kernels
    env = os.environ.get("GPURNN_CPU_KERNELS", "").strip().lower()
    if env not in ("", "auto", "0", "1"):
        raise ValueError(f"GPURNN_CPU_KERNELS: expected 1, 0 or auto, got {env!r}")
    if env == "0":
        return False
    if env == "1" and not _have_numba():
        raise ImportError("GPURNN_CPU_KERNELS=1: the fused CPU steps need numba: pip install numba")
    return _have_numba()


@functools.lru_cache(maxsize=None)
def _have_numba():
    """Asked before every float32 step: looked up once."""
    return importlib.util.find_spec("numba") is not None


def _pointwise(name):
    """The NumPy backend's step ``name``: gpurnn.cpu_kernels' fused step for float32
    where cpu_kernels() is on, else the spec (half types computed in float32)."""
    spec = computed_in_float32(getattr(cells, name))

    @functools.wraps(spec)
    def step(t, reverse, *args):
        if args[0].dtype == np.float32 and cpu_kernels():
            from gpurnn import cpu_kernels as fused  # imports numba: only once a float32 step runs

            return getattr(fused, name)(t, reverse, *args)
        return spec(t, reverse, *args)
    return staticmethod(step)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


class Backend:
    def __init__(self, name, xp, reason, ops):
        self.name = name
        self.xp = xp
        self._reason = reason
        self.ops = ops

    @property
    def reason(self):
        """Why this backend runs (and, for CUDA, whether its loops run as graphs)."""
        note = getattr(self.ops, "capture_note", "")
        return f"{self._reason}; {note}" if note else self._reason

    def __repr__(self):
        return f"Backend(name={self.name!r}, reason={self.reason!r})"


TRANSPOSE_MIN_BATCH = TRANSPOSE_MIN_STEPS = 8  # where NumpyOps.recurrent_operand's copy pays for itself


def transpose_into(out, a, rows=16):
    """out[...] = a.T, in blocks of ``rows`` rows of a: NumPy's one strided copy walks a
    column of a at a time through memory (a [4096, 1024] float32 W: 29 ms on 2 cores);
    blocks of 16 rows stay in cache (4.8 ms)."""
    for start in range(0, a.shape[0], rows):
        out[:, start:start + rows] = a[start:start + rows].T


class NumpyOps:
    """The backend operations on NumPy arrays: np.matmul, and per step the pointwise
    spec, or for float32 its fused twin (set_cpu_kernels)."""

    name = "numpy"
    xp = np
    algorithm = "graph"  # the only recurrence NumPy runs: a step GEMM and a pointwise step per step
    profiler = None  # a gpurnn.profile.Profiler while profiling

    def annotate(self, label, phase):
        """A named phase of the work (see gpurnn.profile): timed while profiling."""
        if self.profiler is None:
            return contextlib.nullcontext()
        return _wall_clock(self.profiler, phase)

    rnn_forward = _pointwise("rnn_forward")
    rnn_backward = _pointwise("rnn_backward")
    lstm_forward = _pointwise("lstm_forward")
    lstm_backward = _pointwise("lstm_backward")
    gru_forward = _pointwise("gru_forward")
    gru_backward = _pointwise("gru_backward")
    project_forward = staticmethod(computed_in_float32(cells.project_forward))  # no fused twin: a copy and a mask
    project_backward = staticmethod(computed_in_float32(cells.project_backward))

    @staticmethod
    def gemm(a, b, out, trans_a=False, trans_b=False, beta=0.0):
        """out = op(a) @ op(b) + beta * out, with beta 0 or 1. Half operands are
        multiplied and summed in float32 and the result rounded once, as cuBLAS's
        GemmEx with float32 compute."""
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        if is_half(out.dtype):
            product = a.astype(np.float32) @ b.astype(np.float32)
            out[...] = product + out.astype(np.float32) if beta else product
        elif beta:
            out += a @ b
        else:
            np.matmul(a, b, out=out)

    @staticmethod
    def check_dtype(dtype, name="dtype"):
        """Every type of gpurnn.precision.DTYPES runs here (half as its float32 reference)."""

    @staticmethod
    def input_spans(batch, gates_width):
        return 1  # one input-projection GEMM a layer: nothing to overlap on a CPU

    @staticmethod
    def side_stream(*after):
        return contextlib.nullcontext()

    @staticmethod
    def concurrent(n):
        """Lanes of work that may run at the same time on a GPU (``with ops.concurrent(n)
        as lane: with lane(k): ...``); here they run in order."""
        return contextlib.nullcontext(lambda k: contextlib.nullcontext())

    @staticmethod
    def mark():
        """A point in the side stream's work to wait for (None: work is in order)."""
        return None

    @staticmethod
    def wait(mark):
        pass

    @staticmethod
    def recurrent_operand(w_hh, w_hh_t, batch, steps):
        """(W, trans_b) for the per-step GEMM h_prev @ op(W). OpenBLAS runs h @ W^T
        faster from a contiguous copy of W^T (2 cores, B >= 8: ~50 us a step at H=256,
        ~600 at H=1024), refreshed each call since optimizers update W_hh in place. The
        copy costs a few steps' gain (160 us at H=256, 4.8 ms at H=1024), and one row
        gains nothing: W as stored below TRANSPOSE_MIN_BATCH rows or TRANSPOSE_MIN_STEPS
        steps a call (sampling, one step of one row, copied W_hh^T for every character)."""
        if batch < TRANSPOSE_MIN_BATCH or steps < TRANSPOSE_MIN_STEPS:
            return w_hh, True
        transpose_into(w_hh_t, w_hh)
        return w_hh_t, False

    @staticmethod
    def input_operand(w_ih, w_ih_t, rows):
        """(W, trans_b) for the input projection x @ op(W): W as stored. Over all
        T*B rows OpenBLAS gains about 4% from a W^T copy, about what the copy costs."""
        return w_ih, True

    @staticmethod
    def scatter_add(target, indices, values):
        """target[indices[k]] += values[k], repeated indices adding up (as np.add.at,
        which is 3-5x slower). Small tables: a one-hot GEMM; large ones: sort the
        rows by index, then one reduceat per run of equal indices. Half values are
        summed in float32 and rounded once into the target."""
        if is_half(values.dtype):
            values = values.astype(np.float32)
        if indices.size * target.shape[0] <= 1 << 24:
            onehot = np.zeros((indices.size, target.shape[0]), values.dtype)
            onehot[np.arange(indices.size), indices] = 1
            target += onehot.T @ values
            return
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        starts = np.flatnonzero(np.r_[True, sorted_idx[1:] != sorted_idx[:-1]])
        target[sorted_idx[starts]] += np.add.reduceat(values[order], starts, axis=0)

    @staticmethod
    def gather_rows(table, ids, out):
        """out[n] = table[ids[n]]; table: [V, K], ids: [N] int32, out: [N, K]."""
        np.take(table, ids, axis=0, out=out, mode="clip")  # "raise" buffers the whole output first; ids are checked

    @staticmethod
    def one_hot(ids, out):
        """out[n, v] = (ids[n] == v); ids: [N] int32, out: [N, V]."""
        out[...] = 0
        out[np.arange(ids.size), ids] = 1

    @staticmethod
    def run(ws, name, fn, capture=True, accumulates=(), restore=None):
        """Run a whole forward or backward over workspace ws; the CUDA backend
        chooses its algorithm (timing each, with what ``fn`` overwrites written again
        by ``restore`` before each) and captures and replays it as a graph."""
        forced = rnn_algorithm()
        if forced not in (None, "graph"):
            raise ValueError(f"rnn algorithm {forced!r} (set_rnn_algorithm / GPURNN_RNN_ALGO): the numpy backend "
                             f"runs only 'graph' (a step GEMM and a pointwise step per step); use the CUDA backend "
                             f"or set it to None")
        ws.algorithms[name, math_mode(), deterministic_algorithms(), forced] = ws.ran[name] = "graph"
        fn()

    @staticmethod
    def on_stream():
        return contextlib.nullcontext()

    @staticmethod
    def asarray(value, name):
        """The argument as a NumPy array, or a TypeError naming it."""
        if isinstance(value, np.ndarray):
            return value
        if hasattr(value, "__cuda_array_interface__"):
            raise TypeError(f"{name}: expected a NumPy array on the numpy backend, "
                            f"got a GPU array ({type(value).__name__}); move it to the host first")
        try:
            return np.asarray(value)
        except Exception as exc:  # anything np.asarray refuses
            raise TypeError(f"{name}: expected an array, got {type(value).__name__}") from exc



_backends = {}
_NUMPY_OPS = NumpyOps()


@contextlib.contextmanager
def _wall_clock(profiler, phase):
    import time

    start = time.perf_counter()
    try:
        yield
    finally:
        profiler.add(phase, time.perf_counter() - start)


def get_backend(name=None):
    """The backend called ``name`` (numpy, cuda, cudasim), or with None the
    process default chosen on first call from GPURNN_BACKEND (default auto).
    A Backend passed in is returned as it is."""
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get("GPURNN_BACKEND", "auto").strip().lower() or "auto"
        if name not in CHOICES:
            raise ValueError(f"GPURNN_BACKEND: expected one of {CHOICES}, got {name!r}")
    elif not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"backend: expected one of {CHOICES} or a Backend, got {name!r}")
    if name not in _backends:
        _backends[name] = _choose(name)
    return _backends[name]


def _choose(request):
    if request == "numpy":
        return Backend("numpy", np, "GPURNN_BACKEND=numpy" if _env_asked("numpy") else "asked for numpy",
                       NumpyOps())
    if request == "cudasim":
        _require_numba_mode(simulate=True)
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # numba reads it when numba.cuda is first imported
        if "numba" in sys.modules:
            sys.modules["numba"].config.ENABLE_CUDASIM = 1
        from gpurnn.cuda.ops import CudaOps

        return Backend("cudasim", np, "numba CUDA simulator with NumPy matmuls (GPURNN_BACKEND=cudasim)",
                       CudaOps(simulate=True))
    try:
        return _cuda_backend()
    except BackendUnavailable as exc:
        if request == "cuda":
            raise
        return Backend("numpy", np, f"auto: CUDA backend unavailable ({exc})", NumpyOps())


def _env_asked(name):
    return os.environ.get("GPURNN_BACKEND", "").strip().lower() == name


def _cuda_backend():
    try:
        cupy = load_cupy()
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # ImportError, or CUDARuntimeError without a driver
        raise BackendUnavailable(f"CuPy cannot reach a GPU: {type(exc).__name__}: {exc}; "
                                 "install gpurnn[cuda12] or gpurnn[cuda13] on a machine with an NVIDIA GPU") from None
    if n == 0:
        raise BackendUnavailable("CuPy sees no GPU")
    _require_numba_mode(simulate=False)
    try:
        cuda = load_numba_cuda()
        if _simulating():
            raise BackendUnavailable("numba.cuda runs the simulator here (NUMBA_ENABLE_CUDASIM is set)")
        if not cuda.is_available():
            raise BackendUnavailable("numba.cuda sees no usable GPU")
    except ImportError as exc:
        raise BackendUnavailable(f"numba.cuda does not import ({exc}); install numba-cuda") from None
    from gpurnn.cuda.ops import CudaOps

    ops = CudaOps(simulate=False)
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return Backend("cuda", cupy, f"CUDA on {name} (CuPy {cupy.__version__})", ops)


def _require_numba_mode(simulate):
    """numba reads NUMBA_ENABLE_CUDASIM once, at import: the two modes cannot mix."""
    if "numba.cuda" not in sys.modules:
        return
    if _simulating() != simulate:
        have = "the CUDA simulator" if _simulating() else "a real GPU"
        want = "cudasim" if simulate else "cuda"
        raise BackendUnavailable(
            f"backend {want!r}: numba.cuda was already imported for {have} in this process; "
            f"set GPURNN_BACKEND={want} before anything imports numba.cuda")


def load_numba_cuda():
    """numba.cuda, with NumPy >= 2.5's removed np.row_stack aliased back first:
    numba-cuda 0.30.x calls it at its first kernel compile."""
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack
    from numba import config, cuda

    config.CUDA_LOW_OCCUPANCY_WARNINGS = False  # the per-step grids are small by design
    if config.ENABLE_CUDASIM:
        _lock_simulated_shared_arrays()
    return cuda


def _lock_simulated_shared_arrays():
    """numba's simulator runs a Python thread per CUDA thread, and gives the threads of a
    block one static ``cuda.shared.array`` per source line by looking it up and, when
    missing, creating it, without a lock: two threads can each create their own on
    first use. A persistent kernel's barrier flag then goes unseen by the threads that
    read another copy, which leave their steps early (NaN or stale outputs, about one
    test run in three with a 0.5 ms switch interval). Create them under a lock instead."""
    import sys
    import threading

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = kernelapi.FakeCUDAShared
    if getattr(shared, "gpurnn_locked", False):
        return
    unlocked, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory (one buffer), or refused: as numba does
            return unlocked(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        where = (caller.f_code.co_filename, caller.f_lineno)  # numba's key: the line that asks
        with lock:
            found = self._allocations.get(where)
            if found is None:
                found = self._allocations[where] = np.empty(shape, dtype)
        return found

    shared.array = array
    shared.gpurnn_locked = True


def _simulating():
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def ops_for(a):
    """The backend operations that work on array a (NumPy's, or the CUDA backend's)."""
    return _NUMPY_OPS if isinstance(a, (np.ndarray, np.generic)) else get_backend("cuda").ops


def to_host(a):
    """A NumPy view or copy of a NumPy or CuPy array (or of anything np.asarray
    takes, a list of numbers say); a tuple or dict element by element (a model's
    results, its params); None as it is. The one call that brings any backend's
    results to NumPy."""
    if a is None:
        return a
    if isinstance(a, dict):
        return {k: to_host(v) for k, v in a.items()}
    if isinstance(a, tuple):
        return tuple(to_host(v) for v in a)
    return a.get() if hasattr(a, "get") else np.asarray(a)


def array_module(a):
    """numpy for NumPy arrays, cupy for CuPy arrays."""
    return np if isinstance(a, (np.ndarray, np.generic)) else load_cupy()


def load_cupy():
    import cupy

    return cupy


def load_nccl():
    """CuPy's NCCL bindings (gpurnn.distributed's GPU collectives). CuPy imports its
    nccl module even where it cannot load libnccl, with none of its names in it: that
    is refused here, saying what to install, not met later as a missing attribute."""
    from cupy.cuda import nccl

    if not getattr(nccl, "available", True):
        raise BackendUnavailable("CuPy cannot load NCCL (libnccl), which ranks on GPUs all-reduce with: "
                                 "pip install nvidia-nccl-cu12 (nvidia-nccl-cu13 for a CUDA 13 CuPy)")
    return nccl
