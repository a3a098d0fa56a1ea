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

import os
import sys

import numpy as np

from gpurnn import cells

CHOICES = ("auto", "numpy", "cuda", "cudasim")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says what is missing."""


class Backend:
    def __init__(self, name, xp, reason, ops):
        self.name = name
        self.xp = xp
        self.reason = reason
        self.ops = ops

    def __repr__(self):
        return f"Backend(name={self.name!r}, reason={self.reason!r})"


class NumpyOps:
    """The backend operations on NumPy arrays: the pointwise spec and np.matmul."""

    name = "numpy"
    xp = np

    rnn_forward = staticmethod(cells.rnn_forward)
    rnn_backward = staticmethod(cells.rnn_backward)
    lstm_forward = staticmethod(cells.lstm_forward)
    lstm_backward = staticmethod(cells.lstm_backward)
    gru_forward = staticmethod(cells.gru_forward)
    gru_backward = staticmethod(cells.gru_backward)

    @staticmethod
    def gemm(a, b, out, trans_a=False, trans_b=False, beta=0.0):
        """out = op(a) @ op(b) + beta * out, with beta 0 or 1."""
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        if beta:
            out += a @ b
        else:
            np.matmul(a, b, out=out)

    @staticmethod
    def add_bias(out, bias):
        """out: [N, K] += bias: [K]"""
        out += bias

    @staticmethod
    def run(key, fn):
        """Run a whole forward or backward; the CUDA backend replays graphs here."""
        fn()

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

    @staticmethod
    def to_host(a):
        return np.asarray(a)


_backend = None


def get_backend():
    """The process-wide backend (chosen on first call from GPURNN_BACKEND)."""
    global _backend
    if _backend is None:
        _backend = _choose(os.environ.get("GPURNN_BACKEND", "auto").strip().lower() or "auto")
    return _backend


def _choose(request):
    if request not in CHOICES:
        raise ValueError(f"GPURNN_BACKEND: expected one of {CHOICES}, got {request!r}")
    if request == "numpy":
        return Backend("numpy", np, "GPURNN_BACKEND=numpy", NumpyOps())
    if request == "cudasim":
        return _cudasim_backend()
    try:
        return _cuda_backend()
    except BackendUnavailable as exc:
        if request == "cuda":
            raise
        return Backend("numpy", np, f"auto: CUDA backend unavailable ({exc})", NumpyOps())


def _cuda_backend():
    raise BackendUnavailable("the CUDA backend is not built yet")


def _cudasim_backend():
    raise BackendUnavailable("the CUDA simulator backend is not built yet")
