"""Shared test helpers: model construction, random inputs, a torch oracle.

The public-API tests run on whatever backend GPURNN_BACKEND picks (numpy by
default, cuda on a GPU machine): results come back through ``host``, so the
same test body checks every backend.
"""

import contextlib
import os
import sys
import types

import numpy as np
import pytest

import gpurnn
from gpurnn import to_host as host  # any result (array, tuple, dict of arrays) as NumPy

MODELS = {"rnn": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU}

# bfloat16 comes from ml_dtypes, a dependency of an installed gpurnn; a checkout run
# from its folder (the GPU machine's) may lack it, and then its tests skip
try:
    import ml_dtypes  # noqa: F401
    _have_ml_dtypes = True
except ImportError:
    _have_ml_dtypes = False
needs_ml_dtypes = pytest.mark.skipif(not _have_ml_dtypes, reason="bfloat16 needs ml_dtypes (pip install ml_dtypes)")
BFLOAT16 = pytest.param("bfloat16", marks=needs_ml_dtypes)


@contextlib.contextmanager
def forced_algorithm(name):
    """gpurnn.set_rnn_algorithm(name) for the enclosed calls (None: the chooser's), reset after."""
    gpurnn.set_rnn_algorithm(name)
    try:
        yield
    finally:
        gpurnn.set_rnn_algorithm(None)


def blocks_run_together(monkeypatch):
    """Make numba's simulator run each launch's blocks at the same time, as a GPU runs a grid
    whose blocks are all resident, where it runs them one after another: the launch's last
    block starts them all, each block's threads in Python threads of their own, and each
    block gets shared memory of its own (the simulator keeps one a launch). A persistent
    kernel's barrier among blocks opens only so."""
    import threading

    from numba.cuda.simulator import kernel, kernelapi

    one_at_a_time = kernel.BlockManager
    launch = []  # (manager, grid point, arguments) of the launch's blocks so far

    class Together(one_at_a_time):
        def run(self, grid_point, *args):
            launch.append((self, grid_point, args))
            if any(p != last - 1 for p, last in zip(grid_point, self._grid_dim)):
                return  # the simulator calls the blocks in order, so the last one starts them all
            blocks, errors = list(launch), []
            launch.clear()

            def run_block(manager, point, block_args):
                try:
                    one_at_a_time.run(manager, point, *block_args)
                except BaseException as exc:  # raised again in the launching thread
                    errors.append(exc)

            threads = [threading.Thread(target=run_block, args=block, daemon=True) for block in blocks]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]

    lock = threading.Lock()

    def shared(module):
        index = threading.current_thread().blockIdx
        block = (index.x, index.y, index.z)  # the simulator's Dim3 hashes by identity
        with lock:
            of_block = module.__dict__.setdefault("shared_of_block", {})
            if block not in of_block:
                of_block[block] = kernelapi.FakeCUDAShared(module._shared._dynshared_size)
            return of_block[block]

    monkeypatch.setattr(kernel, "BlockManager", Together)
    monkeypatch.setattr(kernelapi.FakeCUDAModule, "shared", property(shared))


def make(cell, *args, nonlinearity="tanh", **kwargs):
    if cell == "rnn":
        kwargs["nonlinearity"] = nonlinearity
    return MODELS[cell](*args, **kwargs)


def rel_err(a, b):
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = np.asarray(host(a), np.float64), np.asarray(host(b), np.float64)
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    return diff / denom if denom else diff


def run(model, x, h0=None, c0=None, lengths=None):
    """Forward with the cell's own state convention: (out, h_n, c_n or None), on the host."""
    if isinstance(model, gpurnn.LSTM):
        hx = None if h0 is None else (h0, c0)
        out, (h_n, c_n) = model(x, hx, lengths=lengths)
        return host((out, h_n, c_n))
    out, h_n = model(x, h0, lengths=lengths)
    return host((out, h_n, None))


def back(model, d_out, d_hn=None, d_cn=None):
    """Backward with the cell's own state convention: (dx, dh0, dc0 or None), on the host."""
    if isinstance(model, gpurnn.LSTM):
        dx, (dh0, dc0) = model.backward(d_out, None if d_hn is None else (d_hn, d_cn))
        return host((dx, dh0, dc0))
    dx, dh0 = model.backward(d_out, d_hn)
    return host((dx, dh0, None))


def torch_reference(cell, model, x, h0, c0, lengths, d_out, d_hn, d_cn, device="cpu"):
    """The same computation in torch (same weights, same dtype, on ``device``);
    returns (out, h_n, c_n, dx, dh0, dc0, grads) as NumPy arrays."""
    import torch

    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    kwargs = dict(num_layers=model.num_layers, bias=model.bias, batch_first=model.batch_first,
                  bidirectional=model.bidirectional)
    if cell == "rnn":
        kwargs["nonlinearity"] = model.nonlinearity
    if getattr(model, "proj_size", 0):
        kwargs["proj_size"] = model.proj_size
    tdtype = torch.float64 if model.dtype == np.float64 else torch.float32
    tm = cls(model.input_size, model.hidden_size, **kwargs).to(tdtype).to(device)
    tm.load_state_dict({k: torch.from_numpy(host(v)) for k, v in model.state_dict().items()})
    leaf = lambda a: torch.tensor(host(a), device=device, requires_grad=True)  # noqa: E731
    xt, h0t = leaf(x), leaf(h0)
    c0t = leaf(c0) if cell == "lstm" else None
    inp = xt
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(host(lengths)),  # lengths on CPU
                                                      batch_first=model.batch_first, enforce_sorted=False)
    out, hn = tm(inp, (h0t, c0t) if cell == "lstm" else h0t)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=model.batch_first,
                                                        total_length=xt.shape[1 if model.batch_first else 0])
    hn, cn = hn if cell == "lstm" else (hn, None)
    const = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    loss = (out * const(d_out)).sum() + (hn * const(d_hn)).sum()
    if cell == "lstm":
        loss = loss + (cn * const(d_cn)).sum()
    loss.backward()
    as_np = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    grads = {k: as_np(p.grad) for k, p in tm.named_parameters()}
    return (as_np(out), as_np(hn), as_np(cn), as_np(xt.grad), as_np(h0t.grad),
            None if c0t is None else as_np(c0t.grad), grads)


def backend_or_skip(name, why):
    """The backend called name, or skip the test (``why: the reason``) where this process cannot run it."""
    from gpurnn import backend as backend_module

    try:
        return backend_module.get_backend(name)
    except (backend_module.BackendUnavailable, ImportError) as exc:
        pytest.skip(f"{why}: {exc}")


def cupy_without_nccl(monkeypatch):
    """Stand in a CuPy that cannot load libnccl: CuPy then still imports cupy.cuda.nccl,
    with ``available`` False and none of NCCL's names in it."""
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = False
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = nccl
    cupy = types.ModuleType("cupy")
    cupy.cuda, cupy.__version__ = cuda, "14.2.0"
    for module in (cupy, cuda, nccl):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def mpi4py_without_an_mpi_library(monkeypatch, folder):
    """Stand in an mpi4py that finds no MPI library: ``from mpi4py import MPI`` raises
    RuntimeError, a line per library tried, as mpi4py's own does (the H200 image's)."""
    package = folder / "mpi4py"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from types import SimpleNamespace\n__version__ = '4.1.2'\n"
                                         "rc = SimpleNamespace(initialize=True)\n")
    (package / "MPI.py").write_text("raise RuntimeError('libmpi.so.12: cannot open shared object file\\n"
                                    "libmpi.so.40: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(folder))  # for this process, and for those it starts:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    for name in ("mpi4py", "mpi4py.MPI"):
        monkeypatch.delitem(sys.modules, name, raising=False)
