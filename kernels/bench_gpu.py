"""gpurnn's CUDA backend against torch.nn.LSTM/GRU/RNN (cuDNN), same process, same card.

    python kernels/bench_gpu.py [--configs A B C D E Ab] [--cells lstm gru rnn] [--modes fp32 tf32]
                                [--repeats 20] [--json PATH]

BENCHMARKS.md's protocol: CUDA events on the caller's stream around each call
(gpurnn orders its own stream after and before it), 3 warm-ups (kernel
compilation, graph capture and cuBLAS set-up stay out), median of --repeats,
min and max kept. Forward = eval mode / torch.no_grad; forward+backward =
train-mode forward, backward from a random d_out, all weight gradients.
Before timing, each row checks outputs and gradients against cuDNN on the
same weights (relative error). Prints a ratio table (gpurnn / cuDNN). Beyond
BENCHMARKS.md's A-E, "Ab" is config A bidirectional.
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CONFIGS = {"A": (100, 64, 512, 1), "B": (100, 256, 1024, 1), "C": (1000, 32, 256, 1),
           "D": (50, 8, 128, 1), "E": (100, 64, 512, 3)}
BIDIRECTIONAL = {"Ab": "A"}  # beyond BENCHMARKS.md's matrix: A with both directions (run concurrently)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


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
    gpurnn.set_math_mode(mode)


def bench_row(cell, name, mode, repeats):
    import cupy
    import torch

    import gpurnn

    set_mode(mode)
    bidirectional = name in BIDIRECTIONAL
    T, B, H, L = CONFIGS[BIDIRECTIONAL.get(name, name)]
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(0)
    ours = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU, "rnn": gpurnn.RNN}[cell](
        H, H, num_layers=L, bidirectional=bidirectional, seed=0, backend="cuda")
    peer = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](
        H, H, num_layers=L, bidirectional=bidirectional).cuda()
    peer.load_state_dict({k: torch.from_numpy(v.get()) for k, v in ours.state_dict().items()})
    x_host = rng.standard_normal((T, B, H)).astype(np.float32)
    d_host = rng.standard_normal((T, B, D * H)).astype(np.float32)
    x, d_out = cupy.asarray(x_host), cupy.asarray(d_host)
    xt = torch.from_numpy(x_host).cuda().requires_grad_(True)
    dt = torch.from_numpy(d_host).cuda()

    def ours_fwd():
        return ours(x)

    def ours_train():
        ours(x)
        return ours.backward(d_out)

    def peer_fwd():
        with torch.no_grad():
            return peer(xt)

    def peer_train():
        out, _ = peer(xt)
        out.backward(dt)

    # correctness on the same weights, before timing
    ours.train()
    ours.zero_grad()
    out = ours(x)[0]
    dx = ours.backward(d_out)[0]
    xt.grad = None
    peer.zero_grad()
    t_out, _ = peer(xt)
    t_out.backward(dt)
    errors = {"out": rel(out.get(), t_out.detach().cpu().numpy()), "dx": rel(dx.get(), xt.grad.cpu().numpy()),
              "dW": max(rel(ours.grads[k].get(), p.grad.cpu().numpy()) for k, p in peer.named_parameters())}

    rows = []
    for what, ours_fn, peer_fn in (("fwd", ours_fwd, peer_fwd), ("fwd+bwd", ours_train, peer_train)):
        ours.train(what == "fwd+bwd")
        o = time_ms(ours_fn, repeats)
        p = time_ms(peer_fn, repeats)
        rows.append(dict(cell=cell, config=name, T=T, B=B, H=H, layers=L, bidirectional=bidirectional,
                         mode=mode, pass_=what, gpurnn_ms=o[0], gpurnn_min_ms=o[1], gpurnn_max_ms=o[2],
                         peer_ms=p[0], peer_min_ms=p[1], peer_max_ms=p[2], ratio=o[0] / p[0],
                         rel_err=errors))
    set_mode("fp32")
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
    lines = [f"{'cell':<5}{'cfg':<4}{'mode':<6}{'pass':<9}{'gpurnn ms':>10}{'cuDNN ms':>10}{'ratio':>7}"
             f"{'err out':>9}{'err dW':>9}"]
    for r in rows:
        lines.append(f"{r['cell']:<5}{r['config']:<4}{r['mode']:<6}{r['pass_']:<9}{r['gpurnn_ms']:>10.3f}"
                     f"{r['peer_ms']:>10.3f}{r['ratio']:>7.2f}{r['rel_err']['out']:>9.1e}{r['rel_err']['dW']:>9.1e}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=[*CONFIGS, *BIDIRECTIONAL], choices=[*CONFIGS, *BIDIRECTIONAL])
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru", "rnn"], choices=["lstm", "gru", "rnn"])
    ap.add_argument("--modes", nargs="+", default=["fp32", "tf32"], choices=["fp32", "tf32"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = [r for mode in args.modes for cell in args.cells for name in args.configs
            for r in bench_row(cell, name, mode, args.repeats)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
