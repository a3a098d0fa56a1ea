"""The all-options script that compute-sanitizer runs (gpu_check's ``sanitizer`` stage).

    compute-sanitizer --tool memcheck python kernels/sanitize.py

Every cell (and the LSTM with a projection of H // 2, torch's proj_size, which runs
"graph" only) x {one direction, two} x {1 layer, 2 layers with dropout}, T=9, B=3,
I=H=33, each recurrence algorithm forced once (graph, fused, persistent), in float32,
float16 and bfloat16 (``--dtypes``): an eval forward (first, so an LSTM's runs with one
cell state at time stride 0) and a train-mode forward and backward, each three times
(eager, captured, replayed). Two directions run padded sequences (lengths 9, 4, 1); one
direction full ones, whose layer outputs are their states (gpurnn.stack).
Every result must be finite and agree with the float32 graph algorithm's (within
``AGREE`` of the largest value: about 10 units of the type's rounding); exits 1
otherwise, so a kernel that reads or writes out of bounds shows up here even where
the sanitizer's report does not.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

DTYPES = ("float32", "float16", "bfloat16")
CELLS = ("rnn", "lstm", "gru", "lstm_projected")
AGREE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 8e-2}


def run_all(T=9, B=3, H=33, cells=CELLS, backend="cuda", repeats=3, dtypes=DTYPES):
    import gpurnn
    from gpurnn import precision, to_host

    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    padded = np.array([T, min(4, T), 1], np.int32)[:B]
    failures = []
    for cell in cells:
        projection = {"proj_size": H // 2} if cell == "lstm_projected" else {}
        algorithms = ("graph",) if projection else ("graph", "fused", "persistent")
        for bidirectional in (False, True):
            lengths = padded if bidirectional else None
            for layers, dropout in ((1, 0.0), (2, 0.3)):
                D = 2 if bidirectional else 1
                d_out = rng.standard_normal((T, B, D * projection.get("proj_size", H))).astype(np.float32)
                reference = None
                runs = [("graph", "float32")] + [(a, d) for d in dtypes for a in algorithms
                                                 if (a, d) != ("graph", "float32")]  # the reference first
                for algorithm, dtype in ((a, precision.dtype("dtypes", d)) for a, d in runs):
                    gpurnn.set_rnn_algorithm(algorithm)
                    try:
                        model = {"rnn": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU,
                                 "lstm_projected": gpurnn.LSTM}[cell](
                            H, H, num_layers=layers, dropout=dropout, bidirectional=bidirectional, seed=1,
                            backend=backend, dtype=dtype, **projection)
                        results = []
                        for _ in range(repeats):  # eager, captured, replayed
                            model.eval()
                            inference, _ = model(x.astype(dtype), lengths=lengths)
                            model.train()
                            model._rng = np.random.default_rng(7)  # the same dropout masks for every algorithm
                            model.zero_grad()
                            out, _ = model(x.astype(dtype), lengths=lengths)
                            dx = model.backward(d_out.astype(dtype))[0]
                            results = [to_host(a).astype(np.float32)
                                       for a in (out, dx, inference, *model.grads.values())]
                    finally:
                        gpurnn.set_rnn_algorithm(None)
                    label = f"{cell} D={D} L={layers} {algorithm} {dtype}"
                    if not all(np.isfinite(r).all() for r in results):
                        failures.append(f"{label}: non-finite results")
                    elif reference is None:
                        reference = results
                    elif max(np.abs(a - b).max() / (np.abs(b).max() + 1e-6)
                             for a, b in zip(results, reference)) > AGREE[dtype.name]:
                        failures.append(f"{label}: differs from graph")
                    print(label, "ok" if not failures or not failures[-1].startswith(label) else failures[-1],
                          flush=True)
    return failures


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", nargs=3, type=int, default=(9, 3, 33), metavar=("T", "B", "H"))
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS,
                    help="lstm_projected: an LSTM with proj_size H // 2")
    ap.add_argument("--backend", default="cuda", choices=["cuda", "cudasim"],
                    help="cudasim: the same script under numba's simulator (CI)")
    ap.add_argument("--repeats", type=int, default=3, help="calls of each pass: eager, captured, replayed, ...")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES,
                    help="besides the float32 graph run every other is checked against")
    args = ap.parse_args()
    failed = run_all(*args.size, cells=args.cells, backend=args.backend, repeats=args.repeats,
                     dtypes=tuple(args.dtypes))
    print(f"{len(failed)} failures" + "".join(f"\n  {f}" for f in failed))
    sys.exit(1 if failed else 0)
