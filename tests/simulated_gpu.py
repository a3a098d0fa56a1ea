"""A pytest plugin for a machine without a GPU: the ``gpu``-marked tests, with the CUDA
backend they ask for served by numba's simulator, whose launches run all their blocks
together as on a GPU where every block is resident (so a persistent recurrence cuts H
among the simulator's SIMULATED_SMS SMs and its blocks meet at the tile barrier):

    PYTHONPATH=tests python -m pytest -p simulated_gpu -m gpu -k "not 130" tests

It checks the GPU tests' arithmetic before a GPU run spends its minutes on them. What
the simulator cannot do fails rather than skips (kernels/NOTES.md, 2026-11-28: no CUDA
graph is captured, results are NumPy arrays rather than CuPy's, no timer stores a
choice, probes in subprocesses ask for a real GPU), so read the failures' messages, not
their count. Slow: a persistent test of many blocks takes minutes on 2 cores, the
B = H = 130 configurations far longer (hence the -k).
"""

import pytest

import gpurnn.backend as backend_module

_choose = backend_module._choose


widest = {}  # algorithm -> the most blocks one of its launches had, in this process


def _simulator_for_cuda(request):
    backend = _choose("cudasim" if request == "cuda" else request)
    if request == "cuda":  # a GPU's residency, not the simulator's one block at a time
        ops = backend.ops
        ops._resident_blocks = lambda kernel, signature, threads, shared: 1000
        record_grid = ops._record_grid

        def record_widest(cell, phase, algorithm, *shape, **kw):
            record_grid(cell, phase, algorithm, *shape, **kw)
            widest[algorithm] = max(widest.get(algorithm, 0), ops.grids[cell, phase]["blocks"])

        ops._record_grid = record_widest
    return backend


backend_module._choose = _simulator_for_cuda


def pytest_terminal_summary(terminalreporter):
    """The widest launches, so a run shows its blocks met (none under -n: the workers' own)."""
    for algorithm, blocks in sorted(widest.items()):
        terminalreporter.write_line(f"simulated_gpu: {algorithm} launches of up to {blocks} blocks")


@pytest.fixture(autouse=True)
def _blocks_run_together(monkeypatch):
    from helpers import blocks_run_together

    blocks_run_together(monkeypatch)
