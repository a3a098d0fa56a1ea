"""The backend operations of the CUDA code path: kernel launches, GEMMs, graphs.

``CudaOps`` offers the interface of ``gpurnn.backend.NumpyOps`` (the per-cell
steps, ``gemm``, ``gather_rows``, ``one_hot``, ``recurrent_operand``, the side
stream, ``concurrent`` lanes, ``run``, ``asarray``) plus the fused
``adam_update`` and ``softmax_xent``:

- real GPU: CuPy arrays, numba kernels launched on our own CuPy stream with
  pre-wrapped device arrays, GEMMs through cuBLAS (``cublas.py``), input
  projections on a side stream, recurrences that can overlap (the two directions
  of a layer, the layers of a wavefront) in lanes of their own streams, and
  ``run`` running each whole forward/backward eagerly on its first call per
  workspace, capturing it as a CUDA graph right after, and replaying the graph
  from then on;
- simulator (``simulate=True``): NumPy arrays, the same kernels run by numba's
  CUDA simulator, NumPy GEMMs, ``run`` eager.

Every launch checks its buffers' shapes and dtypes against each other first
and raises ``ValueError`` before anything reaches the device.
"""

import contextlib
import warnings

import numpy as np

from gpurnn import precision
from gpurnn.backend import (RNN_ALGORITHMS, NumpyOps, cublas_workspace_bytes, deterministic_algorithms, load_cupy,
                            load_numba_cuda, math_mode, rnn_algorithm, to_host)
from gpurnn.cuda import fused, kernels
from gpurnn.cuda.algorithms import Choices, fastest
from gpurnn.sequence import GATE_BLOCKS

THREADS = 128  # per block: the per-step kernels are tiny and latency-bound
# A fused or persistent step is latency-bound: its hidden units are spread over the SMs
# (blocks ~ SMs / concurrent lanes), each thread computing one element's dot products.
# The simulator runs blocks one after another; it counts SIMULATED_SMS, so that tests
# still cut H among several blocks.
SIMULATED_SMS = 4
# The input projection runs as INPUT_SPANS GEMMs on a side stream, overlapping the
# recurrence, while the per-step GEMM leaves the GPU room: measured on an H200,
# 4 spans took config A's forward from 1.82 to 1.74 ms but B's from 11.5 to 11.7 ms,
# where each step's [256, 4096] GEMM already fills the card. So: one span from
# OVERLAP_MAX_STEP_OUTPUTS outputs per step up. The same spans pace a stacked
# layers' wavefront (gpurnn.stack).
INPUT_SPANS = 4
OVERLAP_MAX_STEP_OUTPUTS = 1 << 20
ONE_HOT_BYTES = 64 << 20  # the deterministic scatter_add's one-hot block, at most


def _as_kernels_see(a):
    """The buffer a kernel is handed: a bfloat16 array as its uint16 bits (see gpurnn.cuda.kernels)."""
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


class _Lane:
    """A stream for one recurrence (its kernels and step GEMMs) and a side stream
    for the input projections that overlap it. ``workspaces``: stream pointer ->
    cuBLAS workspace, for this lane's streams whose GEMMs may run at the same time
    as another stream's on the same handle (cuBLAS asks each such stream for its
    own; torch keeps one per handle and stream likewise), of cublas_workspace_bytes()."""

    def __init__(self, cupy, cuda, own_workspace):
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.side = cupy.cuda.Stream(non_blocking=True)
        self.kernels = cuda.external_stream(self.stream.ptr)  # numba's view of the stream
        streams = (self.stream, self.side) if own_workspace else (self.side,)
        size = cublas_workspace_bytes()
        self.workspaces = {s.ptr: cupy.empty(size, cupy.uint8) for s in streams}


class CudaOps:
    def __init__(self, simulate):
        self.simulate = simulate
        self.cuda = load_numba_cuda()
        self.capture_note = ""
        self.algorithm = "graph"  # the recurrence algorithm of the call being issued (see run)
        self.profiler = None  # a gpurnn.profile.Profiler while profiling: every call then runs eagerly
        self._nvtx = None
        self._lanes_running = 1  # lanes whose work may run at the same time as the current one's
        self._resident = {}  # (kernel, signature, threads, shared bytes) -> blocks resident at once
        self.grids = {}  # (cell, phase) -> the last fused or persistent launch's shape (_record_grid)
        self._wrapped = {}
        self._transpose_faster = {}
        self._bfloat16_missing = None  # asked once on a GPU: "" when CuPy has bfloat16 arrays, else why not
        if simulate:
            self.name, self.xp = "cudasim", np
            self._stream = None
            self._cublas = None
            self.timer = None  # simulated time says nothing: "graph" unless forced (tests may set one)
            self.sm_count = SIMULATED_SMS
            self.choices = Choices("cudasim")
        else:
            from gpurnn.cuda.cublas import Cublas

            cupy = load_cupy()
            self.name, self.xp = "cuda", cupy
            self.timer = self._time_on_gpu  # (ws, name, fn, algorithm, accumulates) -> (seconds, results)
            try:
                from cupy.cuda import nvtx

                nvtx.RangePush("gpurnn")
                nvtx.RangePop()
                self._nvtx = nvtx
            except Exception:  # a CuPy without NVTX: no ranges, nothing else lost
                self._nvtx = None
            self.choices = Choices(_device_key(cupy))
            self.sm_count = cupy.cuda.Device().attributes["MultiProcessorCount"]
            # lane 0 is our stream, whose GEMMs use the handle's own workspace; more
            # lanes are made when work first runs concurrently
            self._lanes = [_Lane(cupy, self.cuda, own_workspace=False)]
            self._lane = self._lanes[0]  # the lane work is being issued to
            self._stream = self._lane.stream
            self._workspaces = dict(self._lane.workspaces)
            try:
                self._cublas = Cublas(cupy)
                self._capture_ok = True
                self.capture_note = "time loops run as CUDA graphs"
            except (OSError, AttributeError) as exc:  # no libcublas symbols to call: CuPy's matmul, eager
                self._cublas = None
                self._capture_ok = False
                self.capture_note = (f"time loops run eagerly: cuBLAS not callable through ctypes ({exc}), "
                                     "so GEMMs go through CuPy, which cannot be captured")
                warnings.warn(f"gpurnn: {self.capture_note}", UserWarning, stacklevel=2)

    # ------------------------------------------------------------- arrays
    def asarray(self, value, name):
        if self.simulate:
            return NumpyOps.asarray(value, name)
        cupy = self.xp
        try:
            if isinstance(value, cupy.ndarray):
                return value
            if hasattr(value, "__cuda_array_interface__"):
                return cupy.asarray(value)  # zero-copy view of another GPU library's array
            if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
                return cupy.from_dlpack(value)
            return cupy.asarray(np.asarray(value))
        except Exception as exc:
            raise TypeError(f"{name}: expected a NumPy or GPU array, got {type(value).__name__} ({exc})") from exc

    @contextlib.contextmanager
    def on_stream(self):
        """Run the enclosed work on our stream, ordered after and before the caller's."""
        if self.simulate:
            yield
            return
        caller = self.xp.cuda.get_current_stream()
        self._stream.wait_event(caller.record())
        with self._stream:
            yield
        caller.wait_event(self._stream.record())

    def input_spans(self, batch, gates_width):
        """Into how many spans of time a layer's work is cut, so that input
        projections overlap the recurrence (and the layers of a stack each other)."""
        return INPUT_SPANS if batch * gates_width < OVERLAP_MAX_STEP_OUTPUTS else 1

    @contextlib.contextmanager
    def side_stream(self, *after):
        """Work that may overlap the current lane's stream: it starts once every
        mark in ``after`` is reached (None: nothing to wait for), and the lane's
        stream ``wait``s for its ``mark``s."""
        if self.simulate:
            yield
            return
        for mark in after:
            if mark is not None:
                self._lane.side.wait_event(mark)
        with self._lane.side:
            yield

    def mark(self):
        return None if self.simulate else self.xp.cuda.get_current_stream().record()

    def wait(self, mark):
        if mark is not None:
            self._lane.stream.wait_event(mark)

    @contextlib.contextmanager
    def concurrent(self, n):
        """``with ops.concurrent(n) as lane:``, then ``with lane(k):`` for k < n, inside
        ``on_stream``: work issued in lane k may run at the same time as the other
        lanes' work. Lane 0 is our stream; the others start where it stands, and it
        waits for all of them on exit. A single lane on the simulator, where GEMMs go
        through CuPy (whose cuBLAS workspace streams would share), or when nested."""
        if self.simulate or self._cublas is None or n == 1 or self._lane is not self._lanes[0]:
            yield lambda k: contextlib.nullcontext()
            return
        home = self._lane
        while len(self._lanes) < n:
            self._lanes.append(_Lane(self.xp, self.cuda, own_workspace=True))
            self._workspaces.update(self._lanes[-1].workspaces)
        lanes = self._lanes[:n]
        fork = home.stream.record()
        for lane in lanes[1:]:
            lane.stream.wait_event(fork)

        @contextlib.contextmanager
        def enter(k):
            self._lane = lanes[k]
            try:
                with lanes[k].stream:
                    yield
            finally:
                self._lane = home

        self._lanes_running = n  # persistent grids of the lanes share the SMs
        try:
            yield enter
        finally:
            self._lanes_running = 1
            for lane in lanes[1:]:
                home.stream.wait_event(lane.stream.record())

    @contextlib.contextmanager
    def annotate(self, label, phase):
        """An NVTX range named ``label`` around the enclosed work (a Nsight Systems timeline
        reads as the model), and, while profiling, CUDA events timing it as ``phase``."""
        nvtx = self._nvtx
        if nvtx is not None:
            nvtx.RangePush(label)
        profiling = self.profiler is not None and not self.simulate
        if profiling:
            stream = self.xp.cuda.get_current_stream()
            start = stream.record()
        try:
            with NumpyOps.annotate(self, label, phase) if self.simulate else contextlib.nullcontext():
                yield
        finally:
            if profiling:
                self.profiler.add_events(phase, start, stream.record())
            if nvtx is not None:
                nvtx.RangePop()

    # ------------------------------------------------------------- GEMMs
    def gemm(self, a, b, out, trans_a=False, trans_b=False, beta=0.0):
        """out = op(a) @ op(b) + beta * out, with beta 0 or 1."""
        M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
        K2, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
        if K != K2 or out.shape != (M, N) or not (a.dtype == b.dtype == out.dtype):
            raise ValueError(f"gemm: shapes do not chain: op(a) {M}x{K}, op(b) {K2}x{N}, out {out.shape}; "
                             f"dtypes {a.dtype}, {b.dtype}, {out.dtype}")
        if self.simulate:
            NumpyOps.gemm(a, b, out, trans_a, trans_b, beta)
            return
        if self._cublas is None:  # CuPy's matmul (cannot be captured)
            a, b = (a.T if trans_a else a), (b.T if trans_b else b)
            if beta:
                out += a @ b
            else:
                self.xp.matmul(a, b, out=out)
            return
        for arr in (a, b, out):
            if arr.strides[1] != arr.itemsize:
                raise ValueError(f"gemm: operands need unit inner stride, got strides {arr.strides}")
        stream = self.xp.cuda.get_current_stream()  # ours, a side stream or another lane's
        self._cublas.gemm(stream.ptr, a, b, out, trans_a, trans_b, beta, math_mode(), self._workspaces.get(stream.ptr))

    def scatter_add(self, target, indices, values):
        """target[indices[k]] += values[k]: atomic adds, whose order (so rounding)
        varies from run to run; with deterministic algorithms, one-hot GEMMs over
        blocks of rows, target += onehot(indices)^T values, always in one order."""
        if self.simulate:
            NumpyOps.scatter_add(target, indices, values)
        elif deterministic_algorithms() or target.dtype.name == "bfloat16":  # cupyx has no bfloat16 (CuPy #9630)
            self._scatter_add_by_gemm(target, indices, values)
        else:
            import cupyx

            cupyx.scatter_add(target, indices, values)

    def _scatter_add_by_gemm(self, target, indices, values):
        cupy = self.xp
        V = target.shape[0]
        rows = max(1, ONE_HOT_BYTES // (V * values.dtype.itemsize))
        ids = cupy.asarray(indices, cupy.int32)
        values = cupy.ascontiguousarray(values)
        with self.on_stream():
            for start in range(0, ids.size, rows):
                block = ids[start:start + rows]
                onehot = cupy.empty((block.size, V), values.dtype)
                self.one_hot(block, onehot)
                self.gemm(onehot, values[start:start + rows], target, trans_a=True, beta=1.0)

    def recurrent_operand(self, w_hh, w_hh_t, batch, steps):
        """(W, trans_b) for the per-step GEMM h_prev [B, H] @ op(W) -> [B, G*H] (``steps``
        a call: NumpyOps' concern; here the copy is one kernel, captured with the steps).

        cuBLAS is faster on a contiguous W_hh^T for some shapes (measured on an
        H200: 5x at B=8, H=128; 8% at B=256, H=1024) and slower for others (5% at
        B=32, H=256), so the first eager call per shape times both and keeps the
        faster. With W_hh^T, its copy is refreshed here on every call (and so
        inside the captured graph): optimizers update W_hh in place.
        """
        return self._weight_operand(w_hh, w_hh_t, batch)

    def input_operand(self, w_ih, w_ih_t, rows):
        """(W, trans_b) for the input projection x [rows, I] @ op(W) -> [rows, G*H]:
        chosen and refreshed as in ``recurrent_operand`` (at config B's step shape
        W^T was 9% faster, and the input GEMM runs at 40 of the card's 51 fp32
        TFLOP/s as stored)."""
        return self._weight_operand(w_ih, w_ih_t, rows)

    def _weight_operand(self, w, w_t, rows):
        if self.simulate or self._cublas is None or deterministic_algorithms():  # no timing: the same in every process
            return w, True
        key = (rows, w.shape, w.dtype.str, math_mode())
        if key not in self._transpose_faster:
            self._transpose_faster[key] = self._time_layouts(w, w_t, rows)
        if not self._transpose_faster[key]:
            return w, True
        w_t[...] = w.T
        return w_t, False

    def _time_layouts(self, w, w_t, rows):
        """Is a [rows, K] @ (W^T as stored) faster than a @ W.T?  Timed on scratch
        buffers (at most 2^14 rows: past that both layouts run as large GEMMs),
        for about 20 ms of GEMMs per layout (3 to 20 calls)."""
        cupy = self.xp
        w_t[...] = w.T
        a = cupy.full((min(rows, 1 << 14), w.shape[1]), 0.5, w.dtype)  # not zeros: they can run faster
        out = cupy.empty((a.shape[0], w.shape[0]), w.dtype)
        calls = int(min(20, max(3, 20e-3 * 40e12 / (2 * a.size * w.shape[0]))))
        stream = cupy.cuda.get_current_stream()  # where self.gemm runs
        elapsed = []
        for operand, trans in ((w, True), (w_t, False)):
            self.gemm(a, operand, out, trans_b=trans)  # warm-up
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(calls):
                self.gemm(a, operand, out, trans_b=trans)
            stop.record(stream)
            stop.synchronize()
            elapsed.append(cupy.cuda.get_elapsed_time(start, stop))
        return elapsed[1] < elapsed[0]

    # ------------------------------------------------------------ kernels
    def _launch(self, kernel, B, H, *args):
        """One thread per element of [B, H], in blocks no wider (in whole warps) than the
        work: a tiny step leaves no idle warps. The simulator, a Python thread per CUDA
        thread, runs exactly one an element."""
        threads = min(THREADS, B * H if self.simulate else max(32, _round_up(B * H, 32)))
        self._launch_grid(kernel, -(-B * H // threads), threads, *args)

    def _launch_grid(self, kernel, blocks, threads, *args, shared=0):
        if self.simulate:
            kernel[blocks, threads, 0, shared](*(self._sim_wrap(a) for a in args))
        else:
            kernel[blocks, threads, self._lane.kernels, shared](*(self._wrap(a) for a in args))

    def _wrap(self, a):
        """A numba view of a CuPy array, made once per buffer (passing CuPy arrays
        directly costs ~50 us per launch)."""
        if not hasattr(a, "__cuda_array_interface__"):
            return a
        a = _as_kernels_see(a)
        desc = a.__cuda_array_interface__
        key = (desc["data"][0], desc["shape"], desc["strides"], desc["typestr"])
        view = self._wrapped.get(key)
        if view is None:
            if len(self._wrapped) > 4096:
                self._wrapped.clear()
            view = self.cuda.from_cuda_array_interface(desc, owner=None, sync=False)
            self._wrapped[key] = view
        return view

    def _sim_wrap(self, a):
        """The simulator copies plain NumPy arguments (and refuses strided views);
        its own device-array wrapper makes the kernel work on the array itself."""
        if not isinstance(a, np.ndarray):
            return a
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(_as_kernels_see(a))

    def adam_update(self, p, g, m, v, step_size, beta1, beta2, eps, bias2_sqrt):
        """The fused twin of gpurnn.optim.adam_update, one launch per parameter."""
        if not (p.shape == g.shape == m.shape == v.shape) or not (p.dtype == g.dtype == m.dtype == v.dtype):
            raise ValueError(f"adam_update: p, g, m, v must share shape and dtype, got {p.shape} {g.shape} "
                             f"{m.shape} {v.shape}, {p.dtype} {g.dtype} {m.dtype} {v.dtype}")
        c = p.dtype.type  # scalars in the parameter's type keep float32 math in float32
        flat = [a.reshape(-1) for a in (p, g, m, v)]
        self._launch(kernels.adam_update, 1, p.size, *flat, c(step_size), c(beta1), c(beta2), c(eps),
                     c(bias2_sqrt))

    def gather_rows(self, table, ids, out):
        """out[n] = table[ids[n]]; table: [V, K], ids: [N] int32, out: [N, K]."""
        N, K = out.shape
        if table.ndim != 2 or table.shape[1] != K or ids.shape != (N,) or ids.dtype != np.int32 \
                or table.dtype != out.dtype:
            raise ValueError(f"gather_rows: expected table [V, {K}], ids int32 [{N}] and out [{N}, {K}] of one "
                             f"dtype, got table {table.dtype} {tuple(table.shape)}, ids {ids.dtype} "
                             f"{tuple(ids.shape)}, out {out.dtype}")
        self._launch(kernels.gather_rows, N, K, table, ids, out)

    def one_hot(self, ids, out):
        """out[n, v] = (ids[n] == v); ids: [N] int32, out: [N, V]."""
        if out.ndim != 2 or ids.shape != (out.shape[0],) or ids.dtype != np.int32:
            raise ValueError(f"one_hot: expected ids int32 [{out.shape[0]}] for out {tuple(out.shape)}, "
                             f"got ids {ids.dtype} {tuple(ids.shape)}")
        self._launch(kernels.one_hot, *out.shape, ids, out)

    def softmax_xent(self, logits, targets, weight, losses, d_logits):
        """The fused twin of gpurnn.nn.softmax_xent: logits, d_logits [N, V];
        targets [N] int32 (checked to lie in [0, V) by the caller); weight, losses [N]."""
        N, V = logits.shape
        if d_logits.shape != (N, V) or targets.shape != (N,) or weight.shape != (N,) or losses.shape != (N,) \
                or targets.dtype != np.int32 or not (logits.dtype == weight.dtype == losses.dtype == d_logits.dtype):
            raise ValueError(f"softmax_xent: expected logits and d_logits [{N}, {V}], targets int32 [{N}], "
                             f"weight and losses [{N}] of the logits' dtype, got d_logits {tuple(d_logits.shape)}, "
                             f"targets {targets.dtype} {tuple(targets.shape)}, weight {weight.dtype} "
                             f"{tuple(weight.shape)}, losses {losses.dtype} {tuple(losses.shape)}")
        self._launch_grid(kernels.softmax_xent, N, kernels.ROW_THREADS, logits, targets, weight, losses, d_logits)

    def rnn_forward(self, t, reverse, gx, gh, b_ih, b_hh, h, y, lengths, nonlinearity):
        T, B, H = _check_step(t, reverse, h, gx=gx, gh=gh, b_ih=b_ih, b_hh=b_hh, y=y, lengths=lengths, G=1)
        self._launch(kernels.rnn_forward, B, H, t, reverse, gx, gh, b_ih, b_hh, h, y, lengths,
                     kernels.NONLINEARITY_CODES[nonlinearity])

    def rnn_backward(self, t, reverse, h, dy, dh, dgates, lengths, nonlinearity):
        T, B, H = _check_step(t, reverse, h, dy=dy, dh=dh, dgates=dgates, lengths=lengths, G=1)
        self._launch(kernels.rnn_backward, B, H, t, reverse, h, dy, dh, dgates, lengths,
                     kernels.NONLINEARITY_CODES[nonlinearity])

    def lstm_forward(self, t, reverse, gx, gh, b_ih, b_hh, h, c, gates, y, lengths):
        T, B, H = _check_step(t, reverse, h, gx=gx, gh=gh, b_ih=b_ih, b_hh=b_hh, c=c, gates=gates, y=y,
                              lengths=lengths, G=4)
        self._launch(kernels.lstm_forward, B, H, t, reverse, gx, gh, b_ih, b_hh, h, c, gates, y, lengths)

    def lstm_backward(self, t, reverse, c, gates, dy, dh, dc, dgates, lengths):
        T, B, H = _check_step(t, reverse, c, gates=gates, dy=dy, dh=dh, dc=dc, dgates=dgates,
                              lengths=lengths, G=4)
        self._launch(kernels.lstm_backward, B, H, t, reverse, c, gates, dy, dh, dc, dgates, lengths)

    def gru_forward(self, t, reverse, gx, gh, b_ih, b_hh, h, gates, y, lengths):
        T, B, H = _check_step(t, reverse, h, gx=gx, gh=gh, b_ih=b_ih, b_hh=b_hh, gates=gates, y=y,
                              lengths=lengths, G=3)
        self._launch(kernels.gru_forward, B, H, t, reverse, gx, gh, b_ih, b_hh, h, gates, y, lengths)

    def project_forward(self, t, reverse, hp, h, y, lengths):
        T, B, P = _check_step(t, reverse, h, hp=hp, y=y, lengths=lengths, G=1)
        self._launch(kernels.project_forward, B, P, t, reverse, hp, h, y, lengths)

    def project_backward(self, t, reverse, dy, dh, dproj, lengths):
        T, B, P = dproj.shape
        _check_step(t, reverse, ((T + 1, B, P), dproj.dtype), dy=dy, dh=dh, dproj=dproj, lengths=lengths, G=1)
        self._launch(kernels.project_backward, B, P, t, reverse, dy, dh, dproj, lengths)

    def gru_backward(self, t, reverse, h, gates, dy, dh, dgates, lengths):
        T, B, H = _check_step(t, reverse, h, gates=gates, dy=dy, dh=dh, dgates=dgates, lengths=lengths, G=3)
        self._launch(kernels.gru_backward, B, H, t, reverse, h, gates, dy, dh, dgates, lengths)

    # ------------------------------------------- fused and persistent recurrences
    def fused_forward(self, cell, nonlinearity, t, reverse, ws, b_ih, b_hh, gates, y, lengths):
        """Forward step t of one direction in one launch (gpurnn.cuda.fused), reading W_hh
        from ws.w_hh_t, which the caller has refreshed (fused_weights); buffers as the step kernels'."""
        T, B, H = self._check_direction(cell, t, reverse, ws, y, lengths, b_ih=b_ih, b_hh=b_hh, gates=gates)
        units, tile, blocks, threads, shared = self.fused_plan(cell, "forward", ws.h.dtype, B, H)
        self._record_grid(cell, "forward", "fused", B, H, units, tile, threads, shared)
        args = {"rnn": (ws.gx, ws.w_hh_t.reshape(-1), b_ih, b_hh, ws.h, y, lengths,
                        kernels.NONLINEARITY_CODES.get(nonlinearity, 0)),
                "lstm": (ws.gx, ws.w_hh_t.reshape(-1), b_ih, b_hh, ws.h, ws.c, gates, y, lengths),
                "gru": (ws.gx, ws.w_hh_t.reshape(-1), b_ih, b_hh, ws.h, gates, y, lengths)}[cell]
        self._launch_grid(fused.FUSED[cell, "forward"], blocks, threads, t, reverse, units, tile, *args,
                          shared=shared)

    def fused_backward(self, cell, nonlinearity, t, has_next, reverse, ws, dy, w_hh, lengths):
        """BPTT step t of one direction in one launch: first the recurrent gradient of the
        step BPTT ran before (when has_next), then the cell's pointwise backward."""
        T, B, H = self._check_direction(cell, t, reverse, ws, dy, lengths, w_hh=w_hh)
        units, tile, blocks, threads, shared = self.fused_plan(cell, "backward", ws.h.dtype, B, H)
        self._record_grid(cell, "backward", "fused", B, H, units, tile, threads, shared)
        t_next = t - 1 if reverse else t + 1
        self._launch_grid(fused.FUSED[cell, "backward"], blocks, threads, t, t_next, bool(has_next), reverse, units,
                          tile, w_hh.reshape(-1), *self._backward_buffers(cell, nonlinearity, ws, dy, lengths),
                          shared=shared)

    def _record_grid(self, cell, phase, algorithm, B, H, units, tile, threads, shared):
        """Keep a launch's shape where ``gpurnn profile`` and the benchmarks read it: ``groups``
        of ``units`` hidden units times ``tiles`` of ``tile`` batch rows, a block each, of
        ``threads`` threads and ``shared`` bytes of dynamic shared memory."""
        groups, tiles = -(-H // units), -(-B // tile)
        self.grids[cell, phase] = dict(algorithm=algorithm, blocks=groups * tiles, groups=groups, units=units,
                                       tiles=tiles, tile=tile, threads=threads, shared=shared)

    def fused_weights(self, w_hh, out):
        """Write W_hh [G*H, H] into out, the workspace's [H, G*H], as the fused forward steps
        read it (fused.unit_major)."""
        fused.unit_major(w_hh, out)

    def fused_plan(self, cell, phase, dtype, B, H):
        """(units per block, rows per batch tile, blocks, threads, shared bytes) of a fused
        step spread over the SMs its lane may use, a block each (fused.grid_shape with
        fused.batch_tiles' tiles), in more tiles where a tile's staged rows would outgrow a
        block's shared memory (LSTM C's backward: 32 dgates rows of 4H are 128 KiB, 8 rows
        32); NotApplicable where even one row's do."""
        itemsize = np.dtype(dtype).itemsize
        sms = self.sm_count // self._lanes_running
        tiles = fused.batch_tiles(cell, phase, B, H, itemsize, sms)
        while True:
            units, tile, blocks, threads = fused.grid_shape(cell, phase, B, H, itemsize, sms, tiles)
            shared = fused.shared_bytes(cell, phase, "fused", tile, H, units, itemsize)
            if shared <= fused.SHARED_LIMIT:
                return units, tile, blocks, threads, shared
            if tile == 1:
                raise NotApplicable(f"fused {cell} {phase} at H={H}, {np.dtype(dtype).name}: a block stages "
                                    f"the step's [{tile}, {H if phase == 'forward' else GATE_BLOCKS[cell] * H}] "
                                    f"rows in {shared >> 10} KiB of shared memory, over the "
                                    f"{fused.SHARED_LIMIT >> 10} KiB a block may use")
            tiles *= 2

    def persistent_forward(self, cell, nonlinearity, span, reverse, ws, w_hh, b_ih, b_hh, gates, y, lengths):
        """Forward steps [start, stop) of one direction in one launch, W_hh on chip."""
        start, stop = span
        T, B, H = self._check_direction(cell, start, reverse, ws, y, lengths, b_ih=b_ih, b_hh=b_hh, gates=gates,
                                        w_hh=w_hh)
        args = {"rnn": (ws.gx, w_hh, b_ih, b_hh, ws.h, y, lengths, kernels.NONLINEARITY_CODES.get(nonlinearity, 0)),
                "lstm": (ws.gx, w_hh, b_ih, b_hh, ws.h, ws.c, gates, y, lengths),
                "gru": (ws.gx, w_hh, b_ih, b_hh, ws.h, gates, y, lengths)}[cell]
        self._launch_persistent(cell, "forward", ws, (start, stop, reverse), args)

    def persistent_backward(self, cell, nonlinearity, span, first, reverse, ws, dy, w_hh, lengths):
        """BPTT steps of the span [start, stop) in one launch; first: the span BPTT starts with."""
        start, stop = span
        T, B, H = self._check_direction(cell, start, reverse, ws, dy, lengths, w_hh=w_hh)
        self._launch_persistent(cell, "backward", ws, (start, stop, bool(first), reverse),
                                (w_hh, *self._backward_buffers(cell, nonlinearity, ws, dy, lengths)))

    def _backward_buffers(self, cell, nonlinearity, ws, dy, lengths):
        return {"rnn": (ws.h, dy, ws.dh, ws.dgates, lengths, kernels.NONLINEARITY_CODES.get(nonlinearity, 0)),
                "lstm": (ws.c, ws.gates, dy, ws.dh, ws.dc, ws.dgates, lengths),
                "gru": (ws.h, ws.gates, dy, ws.dh, ws.dgates, lengths)}[cell]

    def _launch_persistent(self, cell, phase, ws, head, args):
        B, H = ws.h.shape[1], ws.h.shape[2]
        kernel = fused.PERSISTENT[cell, phase]
        signature = None if self.simulate else tuple(  # the launch's own types decide its registers
            kernel.typeof_pyval(self._wrap(a)) for a in (*head, 0, 0, *args, ws.sync))
        units, tile, blocks, threads, shared = self.persistent_plan(cell, phase, ws.h.dtype, B, H,
                                                                    self._lanes_running, kernel, signature)
        self._record_grid(cell, phase, "persistent", B, H, units, tile, threads, shared)
        ws.sync[1:] = 0  # the barriers count this launch's arrivals from zero
        self._launch_grid(kernel, blocks, threads, *head, units, tile, *args, ws.sync, shared=shared)

    def persistent_plan(self, cell, phase, dtype, B, H, lanes, kernel=None, signature=None):
        """(units per block, rows per batch tile, blocks, threads, shared bytes) of a
        persistent launch whose blocks all fit on the GPU at once, with the SMs shared among
        the ``lanes`` that may run at the same time; ``NotApplicable`` saying why when there
        is none. Tries fused.batch_tiles' tiles first, then fewer; for each, a block an SM,
        then fewer blocks of more units."""
        itemsize = np.dtype(dtype).itemsize
        sms = self.sm_count // lanes
        tried, reasons = set(), []
        tiles = fused.batch_tiles(cell, phase, B, H, itemsize, sms)
        while tiles >= 1:
            spread, tile = fused.grid_shape(cell, phase, B, H, itemsize, sms, tiles)[:2]
            for units in range(spread, H + 1):
                blocks = -(-H // units) * -(-B // tile)
                if (blocks, tile) in tried:
                    continue  # the same grid with more shared memory a block
                tried.add((blocks, tile))
                shared = fused.shared_bytes(cell, phase, "persistent", tile, H, units, itemsize)
                if shared > fused.SHARED_LIMIT:
                    reasons.append(f"{blocks} blocks of {units} units of {tile} rows need {shared >> 10} KiB "
                                   f"of shared memory each")
                    continue
                threads = fused.block_shape(cell, phase, tile, H, units, itemsize)[1]
                resident = self._resident_blocks(kernel, signature, threads, shared) // lanes
                if blocks <= resident:
                    return units, tile, blocks, threads, shared
                reasons.append(f"{blocks} blocks of {units} units of {tile} rows, only {resident} fit at once")
            tiles //= 2
        raise NotApplicable(f"persistent {cell} {phase} at B={B}, H={H}, {np.dtype(dtype).name} ({lanes} lane(s) "
                            f"running): no grid fits on the GPU at once within {fused.SHARED_LIMIT >> 10} KiB of "
                            f"shared memory a block, e.g. {reasons[0]}; {reasons[-1]}")

    def check_dtype(self, dtype, name="dtype"):
        """float32, float64, float16 and bfloat16 run here; bfloat16 needs arrays of it from
        CuPy (CuPy 14 with ml_dtypes), else a TypeError saying what is missing."""
        dtype = precision.dtype(name, dtype)  # "bfloat16" by name: NumPy knows it once ml_dtypes is imported
        if dtype.name != "bfloat16" or self.simulate:
            return
        if self._bfloat16_missing is None:
            try:  # what the backend does to half buffers: fill, slice, multiply, add, widen, view the bits
                probe = self.xp.ones(2, dtype)
                probe[1:] = probe[:1] * 3
                probe[1:] += probe[:1]  # the bias gradients' sums
                if probe.astype(np.float32).tolist() != [1.0, 4.0] or probe.view(np.uint16).tolist()[1] != 0x4080:
                    raise ValueError(f"bfloat16 [1, 4] came back as {probe.astype(np.float32).tolist()}")
                self._bfloat16_missing = ""
            except Exception as exc:  # a CuPy without bfloat16 arrays, or without their kernels
                self._bfloat16_missing = f"{type(exc).__name__}: {exc}"
        if self._bfloat16_missing:
            raise TypeError(f"{name}: bfloat16 on the CUDA backend needs CuPy's bfloat16 arrays (CuPy >= 14 with "
                            f"ml_dtypes installed); this CuPy {self.xp.__version__} has none "
                            f"({self._bfloat16_missing}). Use float16 (fp16), or pip install ml_dtypes")

    def _resident_blocks(self, kernel, signature, threads, shared):
        """How many blocks of ``kernel`` (compiled for ``signature``) can be resident at once."""
        if self.simulate:
            return 1  # the simulator runs blocks one after another: a barrier among two would never open
        key = (kernel, signature, threads, shared)
        if key not in self._resident:  # asked once: later launches may be inside a stream capture
            self._resident[key] = kernel.compile(signature).max_cooperative_grid_blocks(threads, shared)
        return self._resident[key]

    def _check_direction(self, cell, t, reverse, ws, y, lengths, **bufs):
        """Check one direction's workspace and the step's other buffers (see _check_step)."""
        G = GATE_BLOCKS[cell]
        extra = {}
        if "w_hh" in bufs:
            H = ws.h.shape[2]
            w = bufs.pop("w_hh")
            if tuple(w.shape) != (G * H, H) or w.dtype != ws.h.dtype:
                raise ValueError(f"kernel launch: w_hh must be {ws.h.dtype} of shape {(G * H, H)}, "
                                 f"got {w.dtype} {tuple(w.shape)}")
        if cell == "lstm":
            extra["c"] = ws.c
        if "gates" in bufs and cell == "rnn":
            bufs.pop("gates")
        return _check_step(t, reverse, ws.h, G=G, lengths=lengths, gx=ws.gx, y=y, **bufs, **extra)

    # ------------------------------------------------------------- graphs
    def run(self, ws, name, fn, capture=True, accumulates=(), restore=None):
        """Run ``fn`` (a whole stack forward or backward over workspace ``ws``).

        The first call per (workspace, name, math mode, determinism, forced
        algorithm) picks the recurrence algorithm (``choose_algorithm``), runs eagerly, which also
        compiles the kernels and sets up cuBLAS, and is then captured into a
        CUDA graph; later calls replay the graph. If capture fails, warn once and
        stay eager. ``capture=False`` (diagnostics, which read norms on the host
        every step) always runs eagerly. ``accumulates``: the arrays ``fn`` adds
        into (gradients), restored after each timed run. ``restore``: None, or a
        function that writes again what ``fn`` reads and then overwrites (a backward's
        staged d_out and saved gates: it stages d_out again and reruns the forward),
        called before each timed algorithm's first run but the first one's, and before
        this call's own: no copies held while timing.
        """
        key = (name, math_mode(), deterministic_algorithms(), rnn_algorithm())
        entry = ws.graphs.get(key)
        capture = capture and self.profiler is None  # a profile times each phase of an eager call
        if entry is not None and entry != "eager" and capture:
            entry.launch(self._stream)
            ws.ran[name] = ws.algorithms[key]
            return
        if key not in ws.algorithms:
            ws.algorithms[key] = self._choose_from_fresh_inputs(ws, name, fn, accumulates, restore)
        self.algorithm = ws.ran[name] = ws.algorithms[key]
        try:
            fn()
            if self.simulate or not capture:
                return
            if entry is None and self._capture_ok:
                ws.graphs[key] = self._capture(fn)
            else:
                ws.graphs[key] = "eager"
        finally:
            self.algorithm = "graph"

    def _choose_from_fresh_inputs(self, ws, name, fn, accumulates, restore):
        """``choose_algorithm``, where each algorithm's first run (the one whose results
        are compared; its capture and replays only time) starts from fresh inputs: the
        first from the call's own, each later one, and then the call itself, from what
        ``restore`` writes again."""
        if restore is None:
            return self.choose_algorithm(ws, name, fn, accumulates)
        started = []  # the algorithms whose first run has begun, in turn

        def from_fresh_inputs():
            if not started or started[-1] != self.algorithm:  # this algorithm's first run
                if started:
                    restore()
                started.append(self.algorithm)
            fn()

        chosen = self.choose_algorithm(ws, name, from_fresh_inputs, accumulates)
        if started:  # an algorithm was timed: the call runs from its inputs as they came
            restore()
        return chosen

    def choose_algorithm(self, ws, name, fn, accumulates=()):
        """The recurrence algorithm for this call's shape: the forced one (checked
        to run it), "graph" with deterministic algorithms or nothing to time with,
        the one stored on disk for this shape, or the fastest of those that run it
        and agree with "graph" (``timer``); why each other one was left out goes
        into ws.algorithm_notes."""
        forced = rnn_algorithm()
        if forced is not None:
            try:
                self.check_algorithm(ws, name, forced)
            except NotApplicable as exc:
                raise NotApplicable(f"rnn algorithm {forced!r} (forced by set_rnn_algorithm or GPURNN_RNN_ALGO) "
                                    f"cannot run this {name}: {exc}") from None
            return forced
        if deterministic_algorithms() or self.timer is None:  # a timing can come out either way
            return "graph"
        candidates = []
        for algorithm in RNN_ALGORITHMS:
            try:
                self.check_algorithm(ws, name, algorithm)
                candidates.append(algorithm)
            except NotApplicable as exc:
                ws.algorithm_notes[algorithm] = str(exc)
        shape = f"{ws.describe()} {name} {math_mode()}"
        stored = self.choices.lookup(shape)
        if stored in candidates or len(candidates) == 1:
            return stored if stored in candidates else candidates[0]
        times, reference = {}, None
        for algorithm in candidates:  # "graph" first: the others are checked against it
            try:
                elapsed, results = self.timer(ws, name, fn, algorithm, accumulates)
            except Exception as exc:  # one algorithm failing must not take the others down
                self._leave_out(ws, algorithm, f"timing it failed at {shape} ({type(exc).__name__}: {exc})")
                continue
            if algorithm == "graph":
                reference = results
            elif not _agree(results, reference):
                self._leave_out(ws, algorithm, f"its results differ from 'graph' at {shape}")
                continue
            times[algorithm] = elapsed
        if "graph" not in times:  # nothing to check the others against: run what always runs, store nothing
            return "graph"
        best = fastest(times)
        self.choices.store(shape, best, times)
        return best

    def _leave_out(self, ws, algorithm, why):
        ws.algorithm_notes[algorithm] = f"rnn algorithm {algorithm!r} left out: {why}"
        warnings.warn(f"gpurnn: {ws.algorithm_notes[algorithm]}", RuntimeWarning, stacklevel=5)

    def check_algorithm(self, ws, name, algorithm):
        """Raise NotApplicable (a ValueError) saying why ``algorithm`` cannot run ws's shape."""
        if algorithm not in RNN_ALGORITHMS:
            raise NotApplicable(f"rnn algorithm: expected one of {RNN_ALGORITHMS}, got {algorithm!r}")
        cfg = ws.cfg
        phase = "backward" if name == "backward" else "forward"
        if cfg.P and algorithm != "graph":
            raise NotApplicable(f"a projected LSTM (proj_size={cfg.P}) runs only 'graph': the fused and "
                                f"persistent kernels hold the square W_hh of an unprojected state")
        if algorithm == "fused":
            self.fused_plan(cfg.cell, phase, ws.h0.dtype, ws.B, cfg.H)
        if algorithm != "persistent":
            return
        kernel = fused.PERSISTENT[cfg.cell, phase]
        one_cell_state = cfg.cell == "lstm" and ws.dirs[0].c is ws.dirs[0].c_step  # at time stride 0: inference only
        signature = fused.signatures(cfg.cell, phase, "persistent", ws.h0.dtype, inference=one_cell_state)
        lanes = 1 if self.simulate else ws.lanes  # the simulator runs one lane at a time
        self.persistent_plan(cfg.cell, phase, ws.h0.dtype, ws.B, cfg.H, lanes, kernel, signature)

    def _time_on_gpu(self, ws, name, fn, algorithm, accumulates):
        """(seconds per call, results) of ``fn`` run with ``algorithm``: once eagerly
        (compiling it), then captured and replayed for about 20 ms of calls."""
        cupy = self.xp
        saved = [a.copy() for a in accumulates]
        self.algorithm = algorithm
        try:
            fn()
            results = [None if r is None else r.copy() for r in ws.results(name)]
            results += [a - copy for a, copy in zip(accumulates, saved)]  # the gradients this call added
            graph = self._try_capture(fn)[0] if self._capture_ok else None  # a failure here is this algorithm's
            once = fn if graph is None else (lambda: graph.launch(self._stream))
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(self._stream)
            once()
            stop.record(self._stream)
            stop.synchronize()
            calls = int(min(20, max(3, 20.0 / max(cupy.cuda.get_elapsed_time(start, stop), 1e-3))))
            start.record(self._stream)
            for _ in range(calls):
                once()
            stop.record(self._stream)
            stop.synchronize()
            elapsed = cupy.cuda.get_elapsed_time(start, stop) * 1e-3 / calls
        finally:
            self.algorithm = "graph"
            for a, copy in zip(accumulates, saved):
                a[...] = copy
        if any(int(d.sync[0]) for d in ws.dirs):  # a persistent barrier gave up: never choose it
            for d in ws.dirs:
                d.sync[...] = 0
            return float("inf"), [self.xp.full(1, np.nan)]
        return elapsed, results

    def _capture(self, fn):
        graph, exc = self._try_capture(fn)
        if exc is None:
            return graph
        self._capture_ok = False  # capture unsupported here: fall back, say why once
        self.capture_note = f"time loops run eagerly: CUDA graph capture failed ({type(exc).__name__}: {exc})"
        warnings.warn(f"gpurnn: {self.capture_note}", UserWarning, stacklevel=4)
        return "eager"

    def _try_capture(self, fn):
        """(graph, None), or (None, the exception) with the stream out of capture again."""
        try:
            self._stream.begin_capture()
            try:
                fn()
            finally:
                graph = self._stream.end_capture()
            return graph, None
        except Exception as exc:
            return None, exc


class NotApplicable(ValueError):
    """An algorithm that cannot run a shape, and why."""


def _agree(results, reference):
    """Do two algorithms' results match, to a tolerance that TF32 GEMMs meet and a
    wrong kernel (NaN, a missed element, a race) does not?"""
    if results is None or reference is None:
        return True
    for a, b in zip(results, reference):
        if a is None or b is None:
            continue
        a, b = to_host(a), to_host(b)
        if a.shape != b.shape or not np.isfinite(a).all():
            return False
        if np.abs(a - b).max(initial=0) > 2e-2 * (np.abs(b).max(initial=0) + 1e-3):
            return False
    return True


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _device_key(cupy):
    """The GPU's name and the software whose speed a stored choice depends on."""
    import numba_cuda

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return (f"{name} | CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()} | CuPy {cupy.__version__} | "
            f"numba-cuda {numba_cuda.__version__}")


def _check_step(t, reverse, state, G, lengths, **bufs):
    """Check every buffer of one step launch against the state buffer's [T+1, B, H]
    (state: the buffer, or for a launch without one, its (shape, dtype))."""
    shape, dtype = state if isinstance(state, tuple) else (state.shape, state.dtype)
    if len(shape) != 3:
        raise ValueError(f"kernel launch: state buffer must be [T+1, B, H], got shape {shape}")
    T, B, H = shape[0] - 1, shape[1], shape[2]
    if B * H >= 2**32:
        raise ValueError(f"kernel launch: a step's B*H elements must be fewer than 2**32 (the step kernels "
                         f"number them in 32 bits), got B={B}, H={H}: {B * H}")
    if not 0 <= t < T or reverse not in (0, 1):
        raise ValueError(f"kernel launch: t must be in [0, {T}) and reverse 0 or 1, got t={t}, reverse={reverse}")
    saved = 4 if G in (3, 4) else 0
    expected = {"gx": (T, B, G * H), "gh": (B, G * H), "b_ih": (G * H,), "b_hh": (G * H,), "c": (T + 1, B, H),
                "gates": (T, B, saved * H), "y": (T, B, H), "dy": (T, B, H), "dh": (B, H), "dc": (B, H),
                "dgates": (T, B, max(saved, G) * H), "hp": (B, H), "dproj": (T, B, H)}
    for name, a in bufs.items():
        if tuple(a.shape) != expected[name]:
            raise ValueError(f"kernel launch: {name} must have shape {expected[name]} for state "
                             f"{tuple(shape)}, got {tuple(a.shape)}")
        if a.dtype != dtype:
            raise ValueError(f"kernel launch: {name} must have dtype {dtype}, got {a.dtype}")
    if tuple(lengths.shape) != (B,) or lengths.dtype != np.int32:
        raise ValueError(f"kernel launch: lengths must be int32 of shape ({B},), got {lengths.dtype} {tuple(lengths.shape)}")
    return T, B, H
