"""Data-parallel scaling: global tokens/s of ``mpiexec -n N gpurnn train`` against one rank.

    python kernels/bench_distributed.py [--ranks 2] [--steps 40] [--repeats 2] [--json PATH]
    python kernels/bench_distributed.py --nccl [--steps 40]      # on a GPU

``--nccl`` measures instead what the NCCL path costs a GPU training step: the
CharLM step at ``gpurnn train``'s GPU default, trained in this process once in a
world of one without communication and once through ``MpiWorld`` (MPI started
without mpiexec: a world of one whose gradients go through an NCCL all-reduce
and whose loss goes through MPI), alternating; the difference of the step
times is the communication's cost per step (NCCL cannot put two ranks on one GPU).

Weak scaling, as data parallelism is used: every rank trains on the same per-rank
batch (``gpurnn train``'s CPU default: a 1x256 LSTM, T=64, 128 sequences a rank),
so N ranks process N times the tokens of one. Each rank gets one BLAS thread
(OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 in its environment),
and so does the one-rank run, so the ratio measures the parallel training and its
all-reduce, not BLAS threading. tokens/s is each run's median over its steps
(``metrics.csv``, rank 0's clock: a step ends after the all-reduce), the first
5 steps dropped; one-rank and N-rank runs alternate --repeats times. The JSON also
records the collectives a step costs: the all-reduces counted by an instrumented
two-step run, per step (1: the flat gradient buffer with the loss, never one per
parameter).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNT_COLLECTIVES = """
import sys
from gpurnn import distributed, train
from gpurnn.backend import get_backend
backend = get_backend("numpy")
world = distributed.init(backend)
calls = []
reduce = world.allreduce_mean
world.allreduce_mean = lambda *a, **k: calls.append(1) or reduce(*a, **k)
cfg = dict(task="charlm", text=sys.argv[2], cell="lstm", nonlinearity="tanh", optim="adam", clip_norm=5.0,
           clip_value=None, seed=0, save_every=1000, val_fraction=0.0, val_every=1000, hidden=32, layers=2,
           seq_len=16, batch=8, steps=int(sys.argv[3]), lr=2e-3)
train.train(cfg, backend, sys.argv[1], False, progress=False, world=world)
if world.rank == 0:
    print(len(calls))
"""


def env():
    one_thread = {k: "1" for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_"))}
    return dict(clean, PYTHONPATH=ROOT, **one_thread)


def tokens_per_s(ranks, per_rank_batch, steps, workdir):
    out = os.path.join(workdir, f"run{ranks}")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gpurnn", "train", "--backend", "numpy", "--batch", str(per_rank_batch * ranks),
           "--steps", str(steps), "--save-every", str(steps), "--val-fraction", "0", "--no-progress",
           "--out", out]
    if ranks > 1:
        cmd = [shutil.which("mpiexec"), "-n", str(ranks), *cmd]
    subprocess.run(cmd, env=env(), check=True, capture_output=True, text=True, timeout=1800)
    rows = open(os.path.join(out, "metrics.csv")).read().splitlines()[1:]
    return statistics.median(float(r.split(",")[3]) for r in rows[5:])


def collectives_per_step(workdir, steps=2):
    text = os.path.join(ROOT, "README.md")
    done = subprocess.run([shutil.which("mpiexec"), "-n", "2", sys.executable, "-c", COUNT_COLLECTIVES,
                           os.path.join(workdir, "count"), text, str(steps)],
                          env=env(), check=True, capture_output=True, text=True, timeout=300)
    return int(done.stdout.split()[-1]) / steps


NCCL_STEP = """
import json, sys
from mpi4py import MPI
from gpurnn import distributed, train
from gpurnn.backend import get_backend
out, mode, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
backend = get_backend(cfg.pop("backend"))
world = distributed.MpiWorld(MPI, backend, 60) if mode == "nccl" else distributed.World(backend.name)
assert mode != "nccl" or backend.name != "cuda" or world._nccl is not None
train.train(cfg, backend, out, False, progress=False, world=world)
"""


# where mpi4py finds no MPI library (the GPU machine has mpi4py but no MPI of its own, and
# no network): carry MPICH's wheel, installed by prefix so its libmpi lands in PREFIX/lib
MPI_HINT = ("\n(no MPI library for mpi4py? carry MPICH's wheel and start the command with: python3 -m pip install "
            "-q --no-index --no-deps --prefix /tmp/mpi .whl/mpich-*.whl && export LD_LIBRARY_PATH=/tmp/mpi/lib; "
            "kernels/NOTES.md, Open)")


def nccl_cost(steps, repeats, workdir, backend="cuda", sizes=None):
    """Median step time (ms) of the CharLM step (gpurnn train's GPU default sizes) without
    and with the world-of-one all-reduce (NCCL on CUDA; MPI on the other backends)."""
    sys.path.insert(0, ROOT)
    from gpurnn.train import defaults

    sizes = dict(defaults("charlm", "cuda"), **(sizes or {}), steps=steps)
    cfg = dict(task="charlm", text=os.path.join(ROOT, "README.md"), cell="lstm", nonlinearity="tanh",
               optim="adam", clip_norm=5.0, clip_value=None, seed=0, save_every=10**6, val_fraction=0.0,
               val_every=10**6, backend=backend, **sizes)
    times = {"local": [], "nccl": []}
    for _ in range(repeats):
        for mode in times:
            out = os.path.join(workdir, mode)
            shutil.rmtree(out, ignore_errors=True)
            done = subprocess.run([sys.executable, "-c", NCCL_STEP, out, mode, json.dumps(cfg)], capture_output=True,
                                  text=True, timeout=600, env=dict(env(), GPURNN_BACKEND=backend))
            if done.returncode:  # the run's own last words, not just its exit status
                raise RuntimeError(f"the {mode} run exited {done.returncode}: {done.stderr.strip()[-1500:]}"
                                   + MPI_HINT * ("mpi4py" in done.stderr))
            rows = open(os.path.join(out, "metrics.csv")).read().splitlines()[1:]
            tokens = statistics.median(float(r.split(",")[3]) for r in rows[min(5, len(rows) - 1):])
            times[mode].append(sizes["batch"] * sizes["seq_len"] / tokens * 1e3)
    local, nccl = min(times["local"]), min(times["nccl"])
    return dict(step_ms=times, local_ms=local, nccl_ms=nccl, allreduce_ms=nccl - local)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nccl", action="store_true", help="the NCCL path's cost per GPU training step instead")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128, help="sequences per rank")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.nccl:
        with tempfile.TemporaryDirectory() as workdir:
            result = nccl_cost(args.steps, args.repeats, workdir)
        print(f"GPU CharLM step: {result['local_ms']:.2f} ms alone, {result['nccl_ms']:.2f} ms through the NCCL "
              f"all-reduce (world of one): {result['allreduce_ms']:.2f} ms a step (best of {args.repeats})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return result
    if shutil.which("mpiexec") is None:
        sys.exit("bench_distributed: no mpiexec; pip install 'gpurnn[mpi]'")
    with tempfile.TemporaryDirectory() as workdir:
        runs = {1: [], args.ranks: []}
        for _ in range(args.repeats):
            for ranks in runs:
                runs[ranks].append(tokens_per_s(ranks, args.batch, args.steps, workdir))
        per_step = collectives_per_step(workdir)
    one, many = max(runs[1]), max(runs[args.ranks])
    result = dict(ranks=args.ranks, per_rank_batch=args.batch, steps=args.steps, cpu_count=os.cpu_count(),
                  tokens_per_s={str(k): v for k, v in runs.items()}, ratio=many / one,
                  allreduces_per_step=per_step)
    print(f"1 rank: {one:,.0f} tokens/s; {args.ranks} ranks: {many:,.0f} tokens/s (global); "
          f"ratio {many / one:.2f} (best of {args.repeats} each, one BLAS thread a rank, {os.cpu_count()} cores); "
          f"all-reduces per step: {per_step:g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
