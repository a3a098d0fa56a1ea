"""NumPy backend vs torch.nn.LSTM on the CPU, in one process (BENCHMARKS.md, configs A and D).

    python kernels/bench_cpu.py [--configs A D] [--repeats 5] [--json PATH]

Times forward (eval mode, no cache, on a model that has never trained, as one
deployed for inference: a shape that has trained keeps its training layout) and
forward+backward (train mode, random d_out, all weight gradients) for both, median of --repeats runs after one
warm-up, same thread count (torch.set_num_threads = the cores NumPy's BLAS
sees), float32. Checks that outputs and gradients agree before timing.
Prints a ratio table (gpurnn time / torch time; below 1 means gpurnn is faster).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gpurnn  # noqa: E402

CONFIGS = {"A": (100, 64, 512, 1), "B": (100, 256, 1024, 1), "C": (1000, 32, 256, 1),
           "D": (50, 8, 128, 1), "E": (100, 64, 512, 3)}


def median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bench(name, repeats):
    import torch

    T, B, H, L = CONFIGS[name]
    rng = np.random.default_rng(0)
    model = gpurnn.LSTM(H, H, num_layers=L, seed=0)
    inference = gpurnn.LSTM(H, H, num_layers=L, seed=0).eval()  # the same weights, never trained
    peer = torch.nn.LSTM(H, H, num_layers=L)
    peer.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    d_out = rng.standard_normal((T, B, H)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    dt = torch.from_numpy(d_out)

    def ours_fwd():
        return inference(x)

    def ours_train():
        model.train()
        model(x)
        return model.backward(d_out)

    def peer_fwd():
        with torch.no_grad():
            return peer(xt)

    def peer_train():
        xt.grad = None
        peer.zero_grad()
        out, _ = peer(xt)
        out.backward(dt)

    # correctness on the same weights before timing
    model.zero_grad()
    out, _ = ours_fwd()
    dx, _ = ours_train()
    peer_train()
    errs = {"out": rel(out, peer_fwd()[0].numpy()), "dx": rel(dx, xt.grad.numpy()),
            "dW": max(rel(model.grads[k], p.grad.numpy()) for k, p in peer.named_parameters())}
    assert max(errs.values()) < 1e-4, errs

    rows = []
    for mode, ours, theirs in (("fwd", ours_fwd, peer_fwd), ("fwd+bwd", ours_train, peer_train)):
        o, t = median_ms(ours, repeats), median_ms(theirs, repeats)
        rows.append(dict(config=name, T=T, B=B, H=H, layers=L, cell="lstm", mode=mode,
                         gpurnn_ms=o[0], gpurnn_min_ms=o[1], gpurnn_max_ms=o[2],
                         peer_ms=t[0], peer_min_ms=t[1], peer_max_ms=t[2], ratio=o[0] / t[0], rel_err=errs))
    return rows


def main():
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["A", "D"], choices=sorted(CONFIGS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    rows = [r for name in args.configs for r in bench(name, args.repeats)]
    meta = dict(device=platform.processor() or platform.machine(), threads=os.cpu_count(),
                numpy=np.__version__, torch=torch.__version__, dtype="float32", peer="torch.nn.LSTM (CPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"CPU, {meta['threads']} threads, numpy {meta['numpy']}, torch {meta['torch']}, float32")
    print(f"{'config':<7}{'mode':<9}{'gpurnn ms':>11}{'torch ms':>11}{'ratio':>8}")
    for r in rows:
        print(f"{r['config']:<7}{r['mode']:<9}{r['gpurnn_ms']:>11.2f}{r['peer_ms']:>11.2f}{r['ratio']:>8.2f}")


if __name__ == "__main__":
    main()
