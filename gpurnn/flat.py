"""Many arrays as views of one contiguous buffer.

A model whose parameters (and gradients) are back-to-back views of one buffer
lets the optimizer, the gradient norm, clipping and zeroing each run as one
operation on the buffer instead of one per array: on the GPU, one launch
instead of one per parameter (an Adam step over a CharLM's seven arrays: one
kernel, not seven).

    buffer, views = pack(arrays)      # arrays: dict name -> array, one dtype
    buffer_of(views)                  # that buffer; None for arrays that are not so packed
    views_of(other_buffer, views)     # views of another buffer with the same layout
"""

import numpy as np

from gpurnn.backend import array_module


def pack(arrays):
    """(buffer, {name: view}) with each view holding a copy of its array, in
    the dict's order. All arrays must share an array module and dtype."""
    first = next(iter(arrays.values()))
    xp = array_module(first)
    buffer = xp.empty(sum(a.size for a in arrays.values()), first.dtype)
    views = views_of(buffer, arrays)
    for name, a in arrays.items():
        views[name][...] = a
    return buffer, views


def views_of(buffer, arrays):
    """{name: view of buffer} with the shapes of ``arrays``, back to back in their order."""
    views, offset = {}, 0
    for name, a in arrays.items():
        views[name] = buffer[offset:offset + a.size].reshape(a.shape)
        offset += a.size
    return views


def buffer_of(arrays):
    """The buffer ``arrays`` are back-to-back views of, in their order and
    covering all of it (as ``pack`` makes them); None otherwise."""
    arrays = list(arrays.values())
    if not arrays:
        return None
    base = arrays[0].base
    if base is None or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    expected = _address(base)
    for a in arrays:
        if a.base is not base or a.dtype != base.dtype or not a.flags.c_contiguous or _address(a) != expected:
            return None
        expected += a.size * a.dtype.itemsize
    return base if expected == _address(base) + base.size * base.dtype.itemsize else None


def _address(a):
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr
