"""Tokens/s of a CharLM training step: gpurnn against the same model in PyTorch, one process.

    python kernels/bench_train.py [--device cpu|cuda] [--steps 20] [--sizes default A] [--json PATH]

Both sides: embedding -> LSTM -> linear -> cross-entropy, backward, gradient-norm
clipping at 5, an Adam step; the same weights and the same batches, vocabulary 100.
Two sizes: ``gpurnn train``'s defaults for the device (CPU: 1x256, T=64, B=128;
GPU: 2x512, T=128, B=64) and BENCHMARKS.md's config A (1x512, T=100, B=64).
Wall-clock per step (synchronized on the GPU), median of --steps after 3
warm-ups; torch uses all cores, TF32 off. Prints the ratio of tokens/s (above 1:
gpurnn is faster). Then, to see where a step's time goes, the same steps again
with a wait after each phase (forward + loss, backward, clipping, optimizer,
zeroing the gradients): median milliseconds per phase, both sides.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import gpurnn  # noqa: E402
from gpurnn.train import defaults  # noqa: E402

V = 100


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", nargs="+", default=["default", "A"], choices=["default", "A"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    size = defaults("charlm", "cuda" if gpu else "numpy")
    sizes = {"default": ("train default", size["hidden"], size["layers"], size["seq_len"], size["batch"]),
             "A": ("A", 512, 1, 100, 64)}
    rows = [bench(*sizes[name], gpu, args.steps) for name in args.sizes]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        print(f"{r['device']}, {r['size']:<13}: LSTM {r['layers']}x{r['H']}, T={r['T']}, B={r['B']}: "
              f"gpurnn {r['gpurnn_tokens_s']:,.0f} tok/s, torch {r['torch_tokens_s']:,.0f} tok/s, "
              f"ratio {r['ratio']:.2f}")
        for side, phases in r["phases_ms"].items():
            print(f"    {side:<7} ms, waiting after each phase: "
                  + ", ".join(f"{name} {ms:.2f}" for name, ms in phases.items()))
    return rows


def bench(label, H, L, T, B, gpu, steps):
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda" if gpu else "cpu")

    lm = gpurnn.CharLM(V, H, num_layers=L, cell="lstm", seed=0, backend="cuda" if gpu else "numpy")
    opt = gpurnn.optim.Adam(lm.params, lm.grads, lr=2e-3)
    emb, rnn, head = torch.nn.Embedding(V, H), torch.nn.LSTM(H, H, L), torch.nn.Linear(H, V)
    modules = {"embedding": emb.to(dev), "rnn": rnn.to(dev), "head": head.to(dev)}
    sd = lm.state_dict()
    host = (lambda a: a.get()) if gpu else np.asarray
    for prefix, m in modules.items():
        m.load_state_dict({k: torch.from_numpy(host(sd[f"{prefix}.{k}"])) for k in m.state_dict()})
    tparams = [p for m in modules.values() for p in m.parameters()]
    topt = torch.optim.Adam(tparams, lr=2e-3)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, V, (T, B)).astype(np.int32), rng.integers(0, V, (T, B)).astype(np.int32))
               for _ in range(4)]
    tbatches = [(torch.from_numpy(x).long().to(dev), torch.from_numpy(y).long().to(dev)) for x, y in batches]
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    out = {}
    our_phases = {
        "forward": lambda i: out.update(loss=lm.forward(*batches[i % 4])[0]),
        "backward": lambda i: lm.backward(),
        "clip": lambda i: gpurnn.optim.clip_grad_norm(lm.grads, 5.0),
        "optimizer": lambda i: opt.step(),
        "zero_grad": lambda i: lm.zero_grad(),
    }

    def theirs_forward(i):
        x, y = tbatches[i % 4]
        logits = head(rnn(emb(x))[0])
        out.update(tloss=torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1)))

    their_phases = {
        "forward": theirs_forward,
        "zero_grad": lambda i: topt.zero_grad(),
        "backward": lambda i: out["tloss"].backward(),
        "clip": lambda i: torch.nn.utils.clip_grad_norm_(tparams, 5.0),
        "optimizer": lambda i: topt.step(),
    }

    def ours(i):
        for phase in our_phases.values():
            phase(i)
        return float(out["loss"])  # the step's one wait for the GPU, as torch's loss.item()

    def theirs(i):
        for phase in their_phases.values():
            phase(i)
        return out["tloss"].item()

    first = (ours(0), theirs(0))  # same weights, same batch: the same loss
    assert abs(first[0] - first[1]) < 1e-4 * abs(first[1]), first

    def per_step(fn):
        for i in range(3):
            fn(i)
        times = []
        for i in range(steps):
            sync()
            t0 = time.perf_counter()
            fn(i)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def per_phase(phases):
        times = {name: [] for name in phases}
        for i in range(steps):
            for name, phase in phases.items():
                sync()
                t0 = time.perf_counter()
                phase(i)
                sync()
                times[name].append(time.perf_counter() - t0)
        return {name: 1e3 * statistics.median(t) for name, t in times.items()}

    t_ours, t_theirs = per_step(ours), per_step(theirs)
    return dict(size=label, device=torch.cuda.get_device_name() if gpu else f"CPU x{os.cpu_count()}", H=H,
                layers=L, T=T, B=B, V=V, gpurnn_tokens_s=T * B / t_ours, torch_tokens_s=T * B / t_theirs,
                ratio=t_theirs / t_ours, first_loss=first, torch=torch.__version__,
                fold_embedding=lm.fold_embedding,
                phases_ms={"gpurnn": per_phase(our_phases), "torch": per_phase(their_phases)})


if __name__ == "__main__":
    main()
