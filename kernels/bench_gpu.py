"""gpurnn's CUDA backend against torch.nn.LSTM/GRU/RNN (cuDNN), same process, same card.

    python kernels/bench_gpu.py [--configs A B C D E Ab b1 stream] [--cells lstm gru rnn] [--modes fp32 tf32 fp16 bf16]
                                [--algorithms auto graph fused persistent] [--repeats 20] [--json PATH]

BENCHMARKS.md's protocol: CUDA events on the caller's stream around each call
(gpurnn orders its own stream after and before it), 3 warm-ups (kernel
compilation, graph capture and cuBLAS set-up stay out), median of --repeats,
min and max kept. Forward = eval mode / torch.no_grad; forward+backward =
train-mode forward, backward from a random d_out, all weight gradients.
Before timing, each row checks outputs and gradients against cuDNN on the
same weights (relative error). Prints a ratio table (gpurnn / cuDNN) and the
geometric mean of the ratios. Beyond BENCHMARKS.md's A-E: "Ab" is config A
bidirectional, "b1" a batch of one (T=100, B=1, H=256), and "stream" what
``gpurnn sample`` does: 100 calls of one step (H=512, B=1) with the state
carried, eval mode, timed as the 100 calls together.

``--modes``: fp32 (strict float32 GEMMs on both sides), tf32 (TF32 tensor cores on
both), fp16 / bf16 (a gpurnn float16 / bfloat16 model against torch's float32
module under ``torch.autocast("cuda", dtype=torch.float16 / torch.bfloat16)``,
what a torch user runs; errors are against that result; "n/a" where torch's
module refuses the type).

``--algorithms``: "auto" lets gpurnn choose per shape (the default); naming
graph, fused or persistent forces it (gpurnn.set_rnn_algorithm) and adds a row
per algorithm, marked "n/a" where it cannot run the shape. Each row records the
algorithm that ran, and the fused and persistent launches' shapes (``grids``).
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONFIGS = {"A": (100, 64, 512, 1), "B": (100, 256, 1024, 1), "C": (1000, 32, 256, 1),
           "D": (50, 8, 128, 1), "E": (100, 64, 512, 3), "b1": (100, 1, 256, 1)}
BIDIRECTIONAL = {"Ab": "A"}  # beyond BENCHMARKS.md's matrix: A with both directions (run concurrently)
STREAM = {"stream": (100, 1, 512, 1)}  # 100 calls of one step each, the state carried


HALF_MODES = {"fp16": "float16", "bf16": "bfloat16"}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def host(t):
    """A torch tensor on the host as float32 NumPy (NumPy has no torch bfloat16)."""
    return t.detach().float().cpu().numpy()


def weights_of(model):
    """A gpurnn model's state dict as float32 torch tensors, for torch's module."""
    import torch

    return {k: torch.from_numpy(np.asarray(v.get(), np.float32)) for k, v in model.state_dict().items()}


def time_ms(fn, repeats, warmup=3):
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), min(times), max(times)


def set_mode(mode):
    import torch

    import gpurnn

    tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    gpurnn.set_math_mode("tf32" if tf32 else "fp32")  # fp16: half GEMMs accumulate in float32 either way


def half_mode(mode):
    """(gpurnn's dtype, the dtype torch's outputs come in, a factory of torch's autocast
    context: none for fp32 and tf32) for a mode."""
    import contextlib

    import torch

    from gpurnn import precision

    name = HALF_MODES.get(mode, "float32")
    peer = getattr(torch, name)
    autocast = (lambda: torch.autocast("cuda", dtype=peer)) if mode in HALF_MODES else contextlib.nullcontext
    return precision.dtype("mode", name), peer, autocast


def geomean(rows):
    ratios = [r["ratio"] for r in rows if r.get("ratio")]
    return float(np.exp(np.mean(np.log(ratios)))) if ratios else float("nan")


def bench(cell, name, mode, repeats, algorithm="auto"):
    """The rows of one (cell, config, mode) with ``algorithm`` forced (or auto)."""
    import gpurnn
    from gpurnn.cuda.ops import NotApplicable

    gpurnn.set_rnn_algorithm(None if algorithm == "auto" else algorithm)
    try:
        rows = (bench_stream if name in STREAM else bench_row)(cell, name, mode, repeats)
    except NotApplicable as exc:
        T, B, H, L = {**CONFIGS, **STREAM}.get(name) or CONFIGS[BIDIRECTIONAL[name]]
        rows = [dict(cell=cell, config=name, T=T, B=B, H=H, layers=L, mode=mode, pass_=what, ratio=None,
                     algorithm=algorithm, not_applicable=str(exc)) for what in ("fwd", "fwd+bwd")]
    finally:
        gpurnn.set_rnn_algorithm(None)
        set_mode("fp32")
    for r in rows:
        r["algorithm"] = algorithm
    return rows


def bench_stream(cell, name, mode, repeats):
    """100 eval calls of one step, the state carried, against the peer doing the same."""
    import cupy
    import torch

    import gpurnn

    set_mode(mode)
    steps, B, H, L = STREAM[name]
    rng = np.random.default_rng(0)
    dtype, _, autocast = half_mode(mode)
    ours = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU, "rnn": gpurnn.RNN}[cell](H, H, seed=0, backend="cuda",
                                                                         dtype=dtype).eval()
    peer = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](H, H).cuda()
    peer.load_state_dict(weights_of(ours))
    xs_host = rng.standard_normal((steps, 1, B, H)).astype(np.float32)
    xs, xts = cupy.asarray(xs_host.astype(dtype)), torch.from_numpy(xs_host).cuda()

    def ours_stream():
        state = None
        for t in range(steps):
            _, state = ours(xs[t], state)
        return state

    def peer_stream():
        state = None
        with torch.no_grad(), autocast():
            for t in range(steps):
                _, state = peer(xts[t], state)
        return state

    last = lambda s: s[0] if isinstance(s, tuple) else s  # noqa: E731
    error = rel(last(ours_stream()).get(), host(last(peer_stream())))
    o, p = time_ms(ours_stream, repeats), time_ms(peer_stream, repeats)
    row = dict(cell=cell, config=name, T=steps, B=B, H=H, layers=L, bidirectional=False, mode=mode,
               pass_="stream", gpurnn_ms=o[0], gpurnn_min_ms=o[1], gpurnn_max_ms=o[2], peer_ms=p[0],
               peer_min_ms=p[1], peer_max_ms=p[2], ratio=o[0] / p[0], rel_err={"out": error, "dW": 0.0},
               chosen=ours.algorithms)
    return [row]


def bench_row(cell, name, mode, repeats):
    import cupy
    import torch

    import gpurnn

    set_mode(mode)
    bidirectional = name in BIDIRECTIONAL
    T, B, H, L = CONFIGS[BIDIRECTIONAL.get(name, name)]
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(0)
    dtype, peer_dtype, autocast = half_mode(mode)
    ours = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU, "rnn": gpurnn.RNN}[cell](
        H, H, num_layers=L, bidirectional=bidirectional, seed=0, backend="cuda", dtype=dtype)
    peer = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](
        H, H, num_layers=L, bidirectional=bidirectional).cuda()
    peer.load_state_dict(weights_of(ours))
    x_host = rng.standard_normal((T, B, H)).astype(np.float32)
    d_host = rng.standard_normal((T, B, D * H)).astype(np.float32)
    x, d_out = cupy.asarray(x_host.astype(dtype)), cupy.asarray(d_host.astype(dtype))
    xt = torch.from_numpy(x_host).cuda().requires_grad_(True)
    dt = torch.from_numpy(d_host).cuda().to(peer_dtype)

    def ours_fwd():
        return ours(x)

    def ours_train():
        ours(x)
        return ours.backward(d_out)

    def peer_fwd():
        with torch.no_grad(), autocast():
            return peer(xt)

    def peer_train():
        with autocast():
            out, _ = peer(xt)
        out.backward(dt)

    # correctness on the same weights, before timing
    ours.train()
    ours.zero_grad()
    out = ours(x)[0]
    dx = ours.backward(d_out)[0]
    xt.grad = None
    peer.zero_grad()
    try:
        with autocast():
            t_out, _ = peer(xt)
        t_out.backward(dt)
    except RuntimeError as exc:  # e.g. a cuDNN without this half type's RNNs
        from gpurnn.cuda.ops import NotApplicable

        raise NotApplicable(f"torch's {cell} in {mode}: {exc}") from None
    errors = {"out": rel(out.get(), host(t_out)), "dx": rel(dx.get(), host(xt.grad)),
              "dW": max(rel(ours.grads[k].get(), host(p.grad)) for k, p in peer.named_parameters())}

    rows = []
    grids = ours.backend.ops.grids  # the fused and persistent launches' shapes (CudaOps._record_grid)
    for what, ours_fn, peer_fn in (("fwd", ours_fwd, peer_fwd), ("fwd+bwd", ours_train, peer_train)):
        ours.train(what == "fwd+bwd")
        grids.clear()
        o = time_ms(ours_fn, repeats)
        p = time_ms(peer_fn, repeats)
        rows.append(dict(cell=cell, config=name, T=T, B=B, H=H, layers=L, bidirectional=bidirectional,
                         mode=mode, pass_=what, gpurnn_ms=o[0], gpurnn_min_ms=o[1], gpurnn_max_ms=o[2],
                         peer_ms=p[0], peer_min_ms=p[1], peer_max_ms=p[2], ratio=o[0] / p[0],
                         rel_err=errors, chosen=dict(ours.algorithms),
                         grids={phase: dict(g) for (_, phase), g in grids.items()}))
    return rows


def ceilings():
    """Device copy bandwidth (bytes read + written) and fp32 / TF32 GEMM rates."""
    import torch

    a = torch.empty(2**28, device="cuda")  # 1 GiB
    ms = time_ms(lambda: a.clone(), 10)[0]
    copy_tbs = 2 * a.numel() * 4 / (ms * 1e-3) / 1e12
    m = torch.randn(8192, 8192, device="cuda")
    rates = {}
    for mode in ("fp32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        ms = time_ms(lambda: m @ m, 10)[0]
        rates[mode] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return dict(copy_TBps=copy_tbs, fp32_gemm_TFLOPs=rates["fp32"], tf32_gemm_TFLOPs=rates["tf32"])


def table(rows):
    lines = [f"{'cell':<5}{'cfg':<7}{'mode':<6}{'pass':<9}{'algorithm':<22}{'gpurnn ms':>10}{'cuDNN ms':>10}"
             f"{'ratio':>7}{'err out':>9}{'err dW':>9}"]
    for r in rows:
        ran = r.get("chosen", {})
        ran = ran.get("backward" if r["pass_"] == "fwd+bwd" else "inference", "") if ran else ""
        algorithm = r.get("algorithm", "auto") + (f" ({ran})" if ran and r.get("algorithm", "auto") == "auto" else "")
        head = f"{r['cell']:<5}{r['config']:<7}{r['mode']:<6}{r['pass_']:<9}{algorithm:<22}"
        if r.get("ratio") is None:
            lines.append(head + "n/a: " + r.get("not_applicable", "")[:80])
            continue
        lines.append(head + f"{r['gpurnn_ms']:>10.3f}{r['peer_ms']:>10.3f}{r['ratio']:>7.2f}"
                     f"{r['rel_err']['out']:>9.1e}{r['rel_err']['dW']:>9.1e}")
    for algorithm in sorted({r.get("algorithm", "auto") for r in rows}):
        for mode in sorted({r["mode"] for r in rows}):
            some = [r for r in rows if r.get("algorithm", "auto") == algorithm and r["mode"] == mode]
            above = sum(1 for r in some if r.get("ratio") and r["ratio"] > 1.0)
            lines.append(f"{algorithm} {mode}: geometric mean of the ratios {geomean(some):.2f}; "
                         f"{above} of {sum(1 for r in some if r.get('ratio'))} rows above 1.0")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [*CONFIGS, *BIDIRECTIONAL, *STREAM]
    ap.add_argument("--configs", nargs="+", default=names, choices=names)
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=["lstm", "gru", "rnn"])
    ap.add_argument("--modes", nargs="+", default=["fp32", "tf32"], choices=["fp32", "tf32", *HALF_MODES])
    ap.add_argument("--algorithms", nargs="+", default=["auto"], choices=["auto", "graph", "fused", "persistent"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [r for algorithm in args.algorithms for mode in args.modes for cell in args.cells
            for name in args.configs for r in bench(cell, name, mode, args.repeats, algorithm)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
