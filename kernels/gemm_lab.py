"""Lab: where a captured forward spends its time, and which cuBLAS call suits the per-step GEMM.

    PYTHONPATH=. python kernels/gemm_lab.py

For the recurrent GEMM of each BENCHMARKS.md config (LSTM: out[B, 4H] = h[B, H] W_hh[4H, H]^T,
and backward dh[B, H] += dgates[B, 4H] W_hh), and for the input projection of all T*B rows
(row "input": gx[T*B, 4H] = x[T*B, H] W_ih^T), timed as calls captured in one CUDA graph
(100 calls; 10 for the input projection):
  gemmex_tn   cublasGemmEx, CUBLAS_COMPUTE_32F, W as stored (what gpurnn does)
  sgemm_tn    cublasSgemm_v2, same layout
  gemmex_nn   cublasGemmEx on a transposed copy of W (W^T [H, 4H] contiguous)
Then the same step and input GEMMs through torch.mm (strict fp32) with torch's
preferred BLAS set to cuBLAS and to cuBLASLt (its heuristic's first algorithm): does
cublasLt pick a faster kernel for these shapes?
Then, per config and number of input-projection spans (1: one GEMM before the
recurrence; 4: overlapped with it on a side stream), a whole LSTM forward (the
full call, and the graph replay alone), forward+backward, and the pointwise kernel
alone (100 launches captured). Prints microseconds.
"""

import ctypes
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import cupy  # noqa: E402

import gpurnn  # noqa: E402
from gpurnn.cuda import cublas as cublas_module  # noqa: E402

CONFIGS = {"A": (100, 64, 512), "B": (100, 256, 1024), "C": (1000, 32, 256), "D": (50, 8, 128)}


def graph_us(stream, fn, calls=100, repeats=20):
    """Median microseconds per call of fn, captured ``calls`` times in one graph."""
    with stream:
        fn()
        stream.begin_capture()
        for _ in range(calls):
            fn()
        g = stream.end_capture()
        g.launch(stream)
        stream.synchronize()
        times = []
        for _ in range(repeats):
            a, b = cupy.cuda.Event(), cupy.cuda.Event()
            a.record(stream)
            g.launch(stream)
            b.record(stream)
            b.synchronize()
            times.append(cupy.cuda.get_elapsed_time(a, b) * 1e3 / calls)
    return statistics.median(times)


def main():
    backend = gpurnn.get_backend("cuda")
    ops = backend.ops
    lib = ctypes.CDLL(cublas_module._find_libcublas())
    sgemm = lib.cublasSgemm_v2
    vp, i32 = ctypes.c_void_p, ctypes.c_int
    sgemm.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, vp, i32, vp, vp, i32]
    handle = cupy.cuda.device.get_cublas_handle()
    one, zero = ctypes.c_float(1), ctypes.c_float(0)
    stream = ops._stream
    print(f"{'cfg':<4}{'gemm':<9}{'gemmex_tn':>10}{'sgemm_tn':>10}{'gemmex_nn':>10}")
    for name, (T, B, H) in CONFIGS.items():
        rng = np.random.default_rng(0)
        h = cupy.asarray(rng.standard_normal((B, H)).astype(np.float32))
        W = cupy.asarray(rng.standard_normal((4 * H, H)).astype(np.float32))
        Wt = cupy.ascontiguousarray(W.T)
        out = cupy.empty((B, 4 * H), np.float32)
        dg = cupy.asarray(rng.standard_normal((B, 4 * H)).astype(np.float32))
        dh = cupy.zeros((B, H), np.float32)

        def sg_fwd():
            lib.cublasSetStream_v2(vp(handle), vp(stream.ptr))
            sgemm(handle, 1, 0, 4 * H, B, H, ctypes.addressof(one), W.data.ptr, H, h.data.ptr, H,
                  ctypes.addressof(zero), out.data.ptr, 4 * H)

        x = cupy.asarray(rng.standard_normal((T * B, H)).astype(np.float32))
        gx = cupy.empty((T * B, 4 * H), np.float32)
        variants = {
            "fwd": [lambda: ops.gemm(h, W, out, trans_b=True), sg_fwd, lambda: ops.gemm(h, Wt, out)],
            "bwd": [lambda: ops.gemm(dg, W, dh, beta=1.0), None, lambda: ops.gemm(dg, Wt, dh, trans_b=True, beta=1.0)],
            "input": [lambda: ops.gemm(x, W, gx, trans_b=True), None, lambda: ops.gemm(x, Wt, gx)],
        }
        for which, fns in variants.items():
            calls = 10 if which == "input" else 100
            cells = [f"{graph_us(stream, f, calls):10.2f}" if f else f"{'-':>10}" for f in fns]
            print(f"{name:<4}{which:<9}" + "".join(cells), flush=True)

    torch_blas_table()

    print(f"\n{'cfg':<4}{'spans':>6}{'fwd call us':>13}{'fwd replay us':>15}{'fwd+bwd us':>12}{'pointwise us':>14}")
    gpurnn.set_rnn_algorithm("graph")  # the split below is of step GEMMs and pointwise kernels
    for name, (T, B, H) in CONFIGS.items():
        for spans in (1, 4):
            ops.input_spans = lambda batch, width, n=spans: n  # override the size rule for this run
            m = gpurnn.LSTM(H, H, seed=0, backend="cuda")
            x = cupy.asarray(np.random.default_rng(1).standard_normal((T, B, H)).astype(np.float32))
            d = cupy.asarray(np.random.default_rng(2).standard_normal((T, B, H)).astype(np.float32))
            for _ in range(3):
                m(x)
                m.backward(d)
            ws = next(reversed(m._workspaces.values()))
            graph = next(g for key, g in ws.graphs.items() if key[:2] == ("forward", "fp32"))  # (name, math, ...)
            full, replay, train = [], [], []
            for _ in range(20):
                for times, fn in ((full, lambda: m(x)), (train, lambda: (m(x), m.backward(d)))):
                    a, b = cupy.cuda.Event(), cupy.cuda.Event()
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    times.append(cupy.cuda.get_elapsed_time(a, b) * 1e3)
                a, b = cupy.cuda.Event(), cupy.cuda.Event()
                a.record(stream)
                graph.launch(stream)
                b.record(stream)
                b.synchronize()
                replay.append(cupy.cuda.get_elapsed_time(a, b) * 1e3)
            dd = ws.dirs[0]
            b_ih, b_hh = m.params["bias_ih_l0"], m.params["bias_hh_l0"]
            pw = graph_us(stream, lambda: ops.lstm_forward(0, 0, dd.gx, dd.gh, b_ih, b_hh, dd.h, dd.c,
                                                            dd.gates, ws.out[0], ws.lengths))
            med = statistics.median
            print(f"{name:<4}{spans:>6}{med(full):13.1f}{med(replay):15.1f}{med(train):12.1f}{pw:14.2f}", flush=True)
    del ops.input_spans  # back to the size rule
    gpurnn.set_rnn_algorithm(None)


def torch_blas_table(repeats=20):
    """Microseconds per torch.mm of each step and input GEMM, cuBLAS vs cuBLASLt."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"\n{'cfg':<4}{'gemm':<9}{'torch cublas':>14}{'torch cublaslt':>16}")
    for name, (T, B, H) in CONFIGS.items():
        W = torch.randn(4 * H, H, device="cuda")
        for which, rows in (("fwd", B), ("input", T * B)):
            a = torch.randn(rows, H, device="cuda")
            cells = []
            for library in ("cublas", "cublaslt"):
                try:
                    torch.backends.cuda.preferred_blas_library(library)
                    torch.mm(a, W.t())  # warm-up
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(repeats):
                        torch.mm(a, W.t())
                    stop.record()
                    stop.synchronize()
                    cells.append(f"{start.elapsed_time(stop) * 1e3 / repeats:.2f}")
                except Exception as exc:  # a torch without this switch: say so, keep going
                    cells.append(type(exc).__name__)
            print(f"{name:<4}{which:<9}{cells[0]:>14}{cells[1]:>16}", flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
