"""A PyTorch model's training step with torch.nn.LSTM/GRU against gpurnn.torch.LSTM/GRU, same process.

    python kernels/bench_torch.py [--device cpu|cuda] [--steps 20] [--cells lstm gru lstm_projected] [--json PATH]

The model is what a torch user writes: embedding -> recurrent stack -> linear ->
cross-entropy, AdamW, clip_grad_norm_, one optimizer step; only the recurrent
class differs, with the same weights and batches (vocabulary 100). Sizes: on a
GPU BENCHMARKS.md's config A (1x512, T=100, B=64) and ``gpurnn train``'s GPU
default (2x512, T=128, B=64); on a CPU the CPU default (1x256, T=64, B=128).
``lstm_projected``: an LSTM with torch's projections, proj_size H/2 (the head reads H/2).
Wall clock per step (synchronized on the GPU), the two sides alternating step by
step, median of --steps after 3 warm-ups; TF32 off. Prints tokens/s and their
ratio (above 1: gpurnn.torch is faster).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import gpurnn.torch as gt  # noqa: E402

V = 100
SIZES = {"cpu": [("train default", 1, 256, 64, 128)],
         "cuda": [("A", 1, 512, 100, 64), ("train default", 2, 512, 128, 64)]}


class Model(torch.nn.Module):
    def __init__(self, rnn_class, layers, H, proj_size=0):
        super().__init__()
        self.embedding = torch.nn.Embedding(V, H)
        self.rnn = rnn_class(H, H, layers, **({"proj_size": proj_size} if proj_size else {}))
        self.head = torch.nn.Linear(proj_size or H, V)

    def forward(self, x):
        return self.head(self.rnn(self.embedding(x))[0])


def pools():
    """What CuPy's pool and torch's caching allocator hold and use now, in MiB. Each keeps
    its idle blocks (held - used) from the other: a shared pool (issue 12's allocator
    switch) could save at most the smaller idle figure, so these decide whether one is
    worth building."""
    import cupy

    pool = cupy.get_default_memory_pool()
    mib = 2.0 ** -20
    return dict(cupy_held=pool.total_bytes() * mib, cupy_used=pool.used_bytes() * mib,
                torch_held=torch.cuda.memory_reserved() * mib, torch_used=torch.cuda.memory_allocated() * mib)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru", "lstm_projected"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for cell in args.cells:
        name = cell.split("_")[0].upper()
        classes = {"torch": getattr(torch.nn, name), "gpurnn": getattr(gt, name)}
        for size, layers, H, T, B in SIZES[device.type]:
            models, opts = {}, {}
            proj_size = H // 2 if cell == "lstm_projected" else 0
            for side, cls in classes.items():
                torch.manual_seed(0)  # the same weights on both sides
                models[side] = Model(cls, layers, H, proj_size).to(device)
                opts[side] = torch.optim.AdamW(models[side].parameters(), lr=1e-3)
            data = torch.Generator().manual_seed(1)
            batches = [torch.randint(0, V, (T + 1, B), generator=data).to(device) for _ in range(4)]
            times, losses = {s: [] for s in classes}, {s: [] for s in classes}
            for k in range(args.steps + 3):
                for side in classes:  # alternate: a shared machine's swings hit both
                    x = batches[k % len(batches)]
                    sync()
                    t0 = time.perf_counter()
                    logits = models[side](x[:-1])
                    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[1:].reshape(-1))
                    opts[side].zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(models[side].parameters(), 5.0)
                    opts[side].step()
                    sync()
                    if k >= 3:
                        times[side].append(time.perf_counter() - t0)
                        losses[side].append(loss.item())
            tok = {s: T * B / statistics.median(t) for s, t in times.items()}
            row = dict(cell=cell, size=size, layers=layers, H=H, T=T, B=B, device=str(device),
                       tokens_per_s=tok, ratio=tok["gpurnn"] / tok["torch"],
                       first_loss={s: v[0] for s, v in losses.items()})
            if device.type == "cuda":
                row["pools_MiB"] = pools()
            rows.append(row)
            print(f"{cell} {size} ({layers}x{H}, T={T}, B={B}) on {device}: torch.nn {tok['torch']:,.0f} tok/s, "
                  f"gpurnn.torch {tok['gpurnn']:,.0f} tok/s, ratio {row['ratio']:.2f}"
                  + ("; MiB held/used: CuPy {cupy_held:.0f}/{cupy_used:.0f}, torch {torch_held:.0f}/{torch_used:.0f}"
                     .format(**row["pools_MiB"]) if "pools_MiB" in row else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(threads=torch.get_num_threads(), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
