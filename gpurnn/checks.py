"""Argument checks shared by the public API.

Every failure raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(right kind, wrong value or shape) with a message that names the argument,
what was expected and what came.
"""

import math
import numbers

import numpy as np

from gpurnn import precision


def positive_int(name, value, allow_zero=False):
    """An integer > 0 (>= 0 with allow_zero), as an int."""
    kind = "non-negative" if allow_zero else "positive"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a {kind} integer, got {value!r} ({type(value).__name__})")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a {kind} integer, got {value}")
    return int(value)


def flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def probability(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value}")
    return float(value)


def positive_number(name, value, allow_zero=False):
    """A finite real number > 0 (>= 0 with allow_zero), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} finite number, "
                         f"got {value}")
    return float(value)


def named_arrays(name, value):
    """A non-empty dict of arrays by name (a model's ``params`` or ``grads``)."""
    if not isinstance(value, dict) or not value \
            or not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in value.values()):
        raise TypeError(f"{name}: expected a non-empty dict of arrays by name (a model's params or grads), "
                        f"got {type(value).__name__}")
    return value


def choice(name, value, options):
    """One of the string ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")
    return value


def float_dtype(name, value):
    """One of gpurnn.precision.DTYPES as an np.dtype (half types store, float32 computes)."""
    return precision.dtype(name, value)


def seed(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name}: expected None or a non-negative integer, got {value!r}")
    if value is not None and value < 0:
        raise ValueError(f"{name}: expected None or a non-negative integer, got {value}")
    return value


def array(name, a, shape, dtype, layout=""):
    """Check ``a`` (already an array) against ``shape``: a tuple of ints, or
    None for a free dimension; ``layout`` names the dimensions for the message."""
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {a.dtype}")
    where = f" {layout}" if layout else ""
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if a.ndim != len(shape):
        raise ValueError(f"{name}: expected a {len(shape)}-D array of shape {want}{where}, "
                         f"got shape {tuple(a.shape)}")
    for want_size, got in zip(shape, a.shape):
        if want_size is not None and want_size != got:
            raise ValueError(f"{name}: expected shape {want}{where}, got {tuple(a.shape)}")
    return a


def state_keys(state, expected):
    """A state dict must have exactly the ``expected`` keys."""
    if not hasattr(state, "keys"):
        raise TypeError(f"state_dict: expected a mapping of names to arrays, got {type(state).__name__}")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"state_dict: keys do not match this model: missing {missing}, unexpected {extra}")


def state_shapes(state, expected):
    """A state dict must have exactly the keys of ``expected`` and each array its shape."""
    state_keys(state, expected)
    for name, p in expected.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"state_dict[{name!r}]: expected shape {tuple(p.shape)}, "
                             f"got {tuple(state[name].shape)}")


def lengths(name, host_lengths, B, T):
    """host_lengths: a NumPy array (or a list or tuple of numbers); returns it as int32 [B]
    with 1 <= l <= T."""
    a = np.asarray(host_lengths)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array of shape [{B}], got dtype {a.dtype}")
    if a.shape != (B,):
        raise ValueError(f"{name}: expected shape [{B}] (one length per sequence), got {tuple(a.shape)}")
    if a.size and (a.min() < 1 or a.max() > T):
        raise ValueError(f"{name}: expected every length in [1, {T}] (T={T}), "
                         f"got values from {a.min()} to {a.max()}")
    return a.astype(np.int32)
