"""Storage types and the type their math runs in.

float32 and float64 models compute in their own type. float16 and bfloat16
models store weights, activations and gradients in half and compute in float32:
every GEMM accumulates in float32 and every pointwise step widens what it reads
to float32 and rounds what it writes once (cuDNN's and torch.autocast's
contract). NumPy has float16; bfloat16 comes from ``ml_dtypes``.

``computed_in_float32(step)`` is how the NumPy backend keeps that contract for
the cells' steps (``gpurnn.cells``): it runs the float32 spec on widened copies
of step t's windows of the buffers and rounds the windows the step writes back
once, so the half reference and the half CUDA kernels compute the same thing
and can be compared element by element.
"""

import functools

import numpy as np

DTYPES = ("float32", "float64", "float16", "bfloat16")
HALF = ("float16", "bfloat16")

# How far a half model's results may lie from the same model's float32 results: the
# largest absolute difference over the largest float32 magnitude, for the outputs and
# for every gradient (input, states, each parameter). About 2 and 3 units of the half
# type's rounding (eps: 2^-10 for float16, 2^-7 for bfloat16); the README's table has
# the worst seen per cell, which is about one unit (tests/test_half.py holds them to it).
TOLERANCES = {"float16": {"output": 2e-3, "gradient": 3e-3},
              "bfloat16": {"output": 1.6e-2, "gradient": 2.4e-2}}

# what each cells step writes (the rest it only reads): the windows rounded back
_WRITES = {"rnn_forward": ("h", "y"), "rnn_backward": ("dh", "dgates"),
           "lstm_forward": ("h", "c", "gates", "y"), "lstm_backward": ("dh", "dc", "dgates"),
           "gru_forward": ("h", "gates", "y"), "gru_backward": ("dh", "dgates"),
           "project_forward": ("h", "y"), "project_backward": ("dh", "dproj")}
# arguments indexed by state (T+1 of them) rather than by step (T)
_STATES = ("h", "c")


def dtype(name, value):
    """The np.dtype for one of DTYPES, or an error naming the argument."""
    if isinstance(value, str) and value == "bfloat16" or getattr(value, "__name__", None) == "bfloat16":
        value = bfloat16()
    try:
        result = np.dtype(value)
    except TypeError as exc:
        raise TypeError(f"{name}: expected one of {DTYPES}, got {value!r}") from exc
    if result.name not in DTYPES:
        raise ValueError(f"{name}: expected one of {DTYPES}, got {value!r}")
    return result


def bfloat16():
    """NumPy's bfloat16 dtype (from ml_dtypes), or an ImportError saying how to get it."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("dtype 'bfloat16' needs the ml_dtypes package (NumPy has no bfloat16): "
                          "pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


def is_half(dt):
    """True for float16 and bfloat16 (asked per step and per GEMM: kept cheap)."""
    if not isinstance(dt, np.dtype):
        dt = np.dtype(dt)
    return dt.itemsize == 2 and dt.kind in "fV"  # float16 is kind f, ml_dtypes' bfloat16 kind V


def is_float(dt):
    """True for every floating type a model may hold (bfloat16 is no np.floating subtype)."""
    dt = np.dtype(dt)
    return np.issubdtype(dt, np.floating) or dt.name == "bfloat16"


def compute_dtype(dt):
    """The type the math of a dt model runs in: float32 for half, else dt itself."""
    return np.dtype(np.float32) if is_half(dt) else np.dtype(dt)


def widen(a):
    """a in its compute type: a float32 copy of a half array, else a itself."""
    return a.astype(np.float32) if is_half(a.dtype) else a


def computed_in_float32(step):
    """A NumPy cells step that also runs on half buffers, rounding once.

    float32 and float64 buffers go straight to ``step``. Half buffers: each
    array argument's window at step t (states t and t+1, step t, or the whole
    [B, ·] or bias array) is copied to float32, ``step`` runs on the copies as
    step 0 (with lengths shifted by t, so the padding test is unchanged), and the
    windows it writes are rounded back into the half buffers.
    """
    names = list(step.__code__.co_varnames[2:step.__code__.co_argcount])
    writes = _WRITES[step.__name__]

    @functools.wraps(step)
    def run(t, reverse, *args):
        arrays = dict(zip(names, args))
        if not is_half(args[0].dtype):
            return step(t, reverse, *args)
        windows, wide = {}, {}
        for name, a in arrays.items():
            if name == "lengths":
                wide[name] = a - t
            elif not isinstance(a, np.ndarray):  # the nonlinearity
                wide[name] = a
            else:
                windows[name] = a[t:t + 2] if name in _STATES else (a[t:t + 1] if a.ndim == 3 else a)
                wide[name] = windows[name].astype(np.float32)
        step(0, reverse, *wide.values())
        for name in writes:  # the one rounding to half; of the two states, the step writes the next
            if name in _STATES:  # (the other may be the same memory: an inference forward's cell state)
                windows[name][1 - reverse] = wide[name][1 - reverse]
            else:
                windows[name][...] = wide[name]
    return run
