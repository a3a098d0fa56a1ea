"""Where a layer's time goes: per-phase times, the algorithm chosen, % of the ceilings.

    gpurnn profile --cell lstm --hidden 512 --seq-len 100 --batch 64 --pass fwd+bwd

Phases, named as the NVTX ranges that a Nsight Systems timeline shows (each
range label reads ``<cell> l<layer> <fwd|rev> <phase> [start:stop)``):

    input    the input projections x W_ih^T (one GEMM per layer, direction and span)
    steps    the recurrence: per-step GEMMs and pointwise kernels ("graph"), one
             fused kernel per step ("fused"), or one launch per span ("persistent")
    weights  after BPTT: the weight- and bias-gradient GEMMs and the input's gradient

``profile_layer`` times the whole call as it normally runs (CUDA: graph
replays), then runs it once more eagerly with a timer around every phase: CUDA
events on the stream each phase runs on (so the input projections, which
overlap the recurrence on a side stream, are timed where they run, and the
phases' sum can exceed the call), or wall-clock time on NumPy. Eager launches
leave gaps that a graph replay does not, so the phases are an upper bound of
their share. The ceilings are measured in the same process: a large GEMM in the
model's dtype and math mode.
"""

import time

import numpy as np

from gpurnn.backend import get_backend, math_mode
from gpurnn.sequence import GATE_BLOCKS

PHASES = ("input", "steps", "weights")


class Profiler:
    """Collects (phase, seconds) while set as ``ops.profiler``; on CUDA the seconds
    come from event pairs read once, after the call."""

    def __init__(self):
        self.times = {p: 0.0 for p in PHASES}
        self._pending = []

    def add(self, phase, seconds):
        self.times[phase] += seconds

    def add_events(self, phase, start, stop):
        self._pending.append((phase, start, stop))

    def collect(self, xp):
        for phase, start, stop in self._pending:
            stop.synchronize()
            self.times[phase] += xp.cuda.get_elapsed_time(start, stop) * 1e-3
        self._pending.clear()
        return dict(self.times)


def phase_flops(cell, I, H, L, D, T, B, backward, P=0):
    """Multiply-adds x 2 of each phase of one call (P: an LSTM's projection size, 0: none)."""
    G = GATE_BLOCKS[cell]
    H_out = P or H  # the state's width
    flops = {p: 0.0 for p in PHASES}
    for layer in range(L):
        inp = I if layer == 0 else D * H_out
        for _ in range(D):
            flops["input"] += 2 * T * B * inp * G * H
            step = 2 * T * B * (H_out * G * H + H * P)  # h_prev W_hh^T, and the projection h_cell W_hr^T
            flops["steps"] += step * (2 if backward else 1)  # backward: dgates W_hh and dproj W_hr per step
            if backward:  # dW_ih, dx, dW_hh, the biases; dW_hr
                flops["weights"] += 2 * T * B * (G * H * (2 * inp + H_out + 2) + P * H)
    return flops


def _synchronize(backend):
    if backend.name == "cuda":
        backend.xp.cuda.get_current_stream().synchronize()


def _per_call(backend, fn, repeats):
    fn()
    _synchronize(backend)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _synchronize(backend)
    return (time.perf_counter() - start) / repeats


def gemm_ceiling(backend, dtype):
    """FLOP/s of a large square GEMM in this process (4096 on CUDA, 1024 on NumPy)."""
    xp = backend.xp
    n = 4096 if backend.name == "cuda" else 1024
    a = xp.full((n, n), 0.5, dtype)
    out = xp.empty((n, n), dtype)
    seconds = _per_call(backend, lambda: backend.ops.gemm(a, a, out), 3)
    return 2 * n ** 3 / seconds


def profile_layer(cell, hidden, layers=1, seq_len=100, batch=64, input_size=None, bidirectional=False,
                  backward=True, dtype="float32", repeats=10, backend=None, seed=0, proj_size=0, **cell_kwargs):
    """Profile one layer stack (an LSTM's projection: ``proj_size``); returns a dict with the total per call, each phase's
    seconds, FLOPs and share of the GEMM ceiling, the algorithms that ran, and the
    CUDA backend's fused and persistent launch shapes (``grids``: per phase, the last
    layer's)."""
    from gpurnn.layers import GRU, LSTM, RNN

    backend = get_backend(backend)
    input_size = input_size or hidden
    if proj_size:
        cell_kwargs["proj_size"] = proj_size  # the LSTM's to check: the others take none
    model = {"rnn": RNN, "lstm": LSTM, "gru": GRU}[cell](input_size, hidden, num_layers=layers,
                                                         bidirectional=bidirectional, dtype=dtype, seed=seed,
                                                         backend=backend, **cell_kwargs)
    xp, ops = backend.xp, backend.ops
    rng = np.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal((seq_len, batch, input_size)).astype(dtype))
    width = (2 if bidirectional else 1) * (proj_size or hidden)
    d_out = xp.asarray(rng.standard_normal((seq_len, batch, width)).astype(dtype))

    model.train(backward)  # a forward alone is an inference forward: no activations kept

    def call():
        model(x)
        if backward:
            model.backward(d_out)

    total = _per_call(backend, call, repeats)
    profiler = Profiler()
    ops.profiler = profiler
    grids = getattr(ops, "grids", {})  # the CUDA backend's fused and persistent launches
    grids.clear()
    try:
        call()
        times = profiler.collect(xp) if backend.name == "cuda" else dict(profiler.times)
    finally:
        ops.profiler = None
    flops = phase_flops(cell, input_size, hidden, layers, 2 if bidirectional else 1, seq_len, batch, backward,
                        proj_size)
    ceiling = gemm_ceiling(backend, np.dtype(dtype))
    return dict(backend=backend.name, math_mode=math_mode(), algorithms=model.algorithms, total_s=total,
                grids={phase: dict(grid) for (_, phase), grid in grids.items()},
                phases={p: dict(seconds=times[p], flops=flops[p],
                                ceiling_share=(flops[p] / times[p] / ceiling) if times[p] else 0.0)
                        for p in PHASES if flops[p]},
                ceiling_flops=ceiling)


def report(result, cell, sizes):
    """The profile as lines of text."""
    algos = ", ".join(f"{k} {v}" for k, v in result["algorithms"].items())
    lines = [f"{cell} {sizes} on {result['backend']} ({result['math_mode']}): {result['total_s'] * 1e3:.3f} ms "
             f"per call; algorithm: {algos}",
             f"GEMM ceiling measured here: {result['ceiling_flops'] / 1e12:.2f} TFLOP/s",
             f"{'phase':<9}{'ms (eager)':>11}{'GFLOP':>9}{'TFLOP/s':>9}{'% ceiling':>11}"]
    for phase, p in result["phases"].items():
        rate = p["flops"] / p["seconds"] / 1e12 if p["seconds"] else 0.0
        lines.append(f"{phase:<9}{p['seconds'] * 1e3:>11.3f}{p['flops'] / 1e9:>9.3f}{rate:>9.3f}"
                     f"{100 * p['ceiling_share']:>10.1f}%")
    lines.append("phases timed in one eager call (CUDA: events on each phase's own stream, so overlapping "
                 "phases can sum past the call)")
    for phase, g in result.get("grids", {}).items():
        lines.append(f"{phase} {g['algorithm']} launch: {g['blocks']} blocks ({g['groups']} of {g['units']} "
                     f"units x {g['tiles']} batch tiles of {g['tile']} rows), {g['threads']} threads and "
                     f"{g['shared'] / 1024:.1f} KiB of shared memory a block")
    return lines
