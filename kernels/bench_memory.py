"""Device memory of a training step and of an eval forward: gpurnn against torch (cuDNN).

    python kernels/bench_memory.py [--rows A B C D E long] [--cells lstm] [--precisions fp32 fp16 bf16] [--json PATH]

Method, the same for both sides: each measurement runs in a fresh process that
first sets up its CUDA context and libraries (a tiny op on each), reads the
device's free memory, builds the model, runs the pass twice, synchronizes and
reads free memory again (gpurnn's processes do not import torch: its import costs
seconds of device time a process). The drop is what that side holds: CuPy's pool and
torch's caching allocator both keep freed blocks for reuse, so after the calls
it is their peak, plus what neither pool shows (cuBLAS/cuDNN workspaces, CUDA
graphs, numba's modules). The weights are included on both sides. A training
step is forward + backward with all weight gradients; an eval forward keeps no
activations. gpurnn's first call of a shape times its recurrence algorithms and
stores the choice on disk (see README); so that the scratch of that timing does
not count, each gpurnn measurement is preceded by an unmeasured process of the
same shape, and the measured one reads the stored choice. Prints MiB per side
and the ratio gpurnn / torch. fp16 / bf16: gpurnn's model in float16 / bfloat16
against torch's fp32 module under ``torch.autocast("cuda", dtype=torch.float16 /
torch.bfloat16)`` (what a torch user runs), and the ratio to gpurnn's own fp32
row of the same shape; a row whose side fails (say torch's RNN refusing bf16)
records the error and goes on.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ROWS = {"A": (100, 64, 512, 1), "B": (100, 256, 1024, 1), "C": (1000, 32, 256, 1), "D": (50, 8, 128, 1),
        "E": (100, 64, 512, 3), "long": (2000, 64, 1024, 2)}

MEASURE = r"""
import sys, numpy as np, cupy
side, cell, T, B, H, L, train = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
half = {"fp16": "float16", "bf16": "bfloat16"}.get(sys.argv[8])
if side == "torch":
    import torch
    torch.ones(1, device="cuda").sum().item()
cupy.ones(1).sum().get()
free = lambda: (cupy.cuda.runtime.deviceSynchronize(), cupy.cuda.runtime.memGetInfo()[0])[1]
before = free()
x = np.random.default_rng(0).standard_normal((T, B, H)).astype(np.float32)
if side == "gpurnn":
    import gpurnn
    from gpurnn import precision
    dtype = precision.dtype("precision", half or "float32")
    x = x.astype(dtype)
    m = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU, "rnn": gpurnn.RNN}[cell](H, H, num_layers=L, dtype=dtype)
    m.train(bool(train))
    xd = cupy.asarray(x)
    for _ in range(2):
        out, _ = m(xd)
        if train:
            m.backward(cupy.ones_like(out))
else:
    m = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](H, H, num_layers=L).cuda()
    xt = torch.from_numpy(x).cuda()
    for _ in range(2):
        with torch.autocast("cuda", dtype=getattr(torch, half or "float16"), enabled=bool(half)):
            if train:
                out, _ = m(xt)
                out.backward(torch.ones_like(out))
            else:
                with torch.no_grad():
                    out, _ = m(xt)
    del xt
del x
print(before - free())
"""


def measure(side, cell, T, B, H, L, train, precision="fp32", backend="cuda", extra_env=None):
    """Bytes one side holds after the passes, from fresh processes (gpurnn on ``backend``;
    the tests run it on the simulator with a stand-in for CuPy); ``extra_env``: more
    environment for those processes (say GPURNN_CUBLAS_WORKSPACE_MIB)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, **(extra_env or {}), PYTHONPATH=path, GPURNN_BACKEND=backend)
    runs = 2 if side == "gpurnn" else 1  # the first stores the algorithm choice: its timing scratch not counted
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", MEASURE, side, cell, str(T), str(B), str(H), str(L),
                               str(int(train)), precision], capture_output=True, text=True, env=env, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{side} {cell} {T}x{B}x{H}x{L}: {done.stderr.strip()[-500:]}")
    return int(done.stdout.split()[-1])


def main(argv=None, fp32_rows=()):
    """The rows measured; ``fp32_rows``: fp32 rows measured before (gpu_check's memory
    stage), which half rows are compared with where this call measures none of its own."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--cells", nargs="+", default=["lstm"], choices=["lstm", "gru", "rnn"])
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    for precision in args.precisions:
        for cell in args.cells:
            for name in args.rows:
                T, B, H, L = ROWS[name]
                for train in (True, False):
                    row = dict(cell=cell, row=name, T=T, B=B, H=H, layers=L, precision=precision,
                               pass_="train" if train else "eval")
                    try:
                        ours, peer = (measure(side, cell, T, B, H, L, train, precision) for side in ("gpurnn", "torch"))
                    except RuntimeError as exc:
                        rows.append(dict(row, error=str(exc)))
                        continue
                    rows.append(dict(row, gpurnn_MiB=ours / 2**20, torch_MiB=peer / 2**20, ratio=ours / max(peer, 1)))
    full = {(r["cell"], r["row"], r["pass_"]): r["gpurnn_MiB"] for r in [*fp32_rows, *rows]
            if r["precision"] == "fp32" and "error" not in r}
    for r in rows:  # half's target: at most 0.55x of our own fp32
        if r["precision"] != "fp32" and "error" not in r and (r["cell"], r["row"], r["pass_"]) in full:
            r["of_our_fp32"] = r["gpurnn_MiB"] / full[r["cell"], r["row"], r["pass_"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))
    return rows


def table(rows):
    lines = [f"{'cell':<5}{'row':<6}{'prec':<6}{'pass':<7}{'gpurnn MiB':>11}{'torch MiB':>11}{'ratio':>7}"
             f"{'of fp32':>9}"]
    for r in rows:
        head = f"{r['cell']:<5}{r['row']:<6}{r.get('precision', 'fp32'):<6}{r['pass_']:<7}"
        if "error" in r:
            lines.append(head + "n/a: " + r["error"][-100:].replace("\n", " "))
            continue
        lines.append(head + f"{r['gpurnn_MiB']:>11.1f}{r['torch_MiB']:>11.1f}{r['ratio']:>7.2f}"
                     + (f"{r['of_our_fp32']:>9.2f}" if "of_our_fp32" in r else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
