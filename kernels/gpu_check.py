"""The one GPU check: the whole test suite on the GPU, time to first forward, ceilings, the benchmark matrix.

    PYTHONPATH=. python kernels/gpu_check.py [--out DIR] [--quick] [--stages suite,first_forward,...] [--budget S] [--lab]

Stages (``--stages`` runs a subset, in this order; default all but lab):
  suite          the whole pytest suite with GPURNN_BACKEND=cuda, notebooks included
                 (the ``gpu``-marked tests among it: parity with NumPy and cuDNN, graph
                 replay = eager, poisoned buffers overwritten, determinism); target 0 failed;
  first_forward  a fresh process's time from ``import gpurnn`` to its first forward on
                 the GPU, twice (the second run reads numba's on-disk kernel cache);
  ceilings       copy bandwidth and fp32/TF32 GEMM ceilings;
  benchmarks     BENCHMARKS.md's matrix (configs A-E x LSTM/GRU/RNN x fwd, fwd+bwd x
                 fp32, TF32) against cuDNN in this process, plus A bidirectional, a
                 batch of one and the streaming row, each shape running the recurrence
                 algorithm gpurnn chose for it; the geometric mean of the ratios;
  algorithms     the same rows in fp32 with each algorithm forced (graph, fused,
                 persistent), to see what each wins and where;
  training       ``bench_train.py``: a CharLM training step's tokens/s against torch,
                 with the time of each phase on both sides;
  torch          ``bench_torch.py``: a torch model's training step with torch.nn.LSTM/GRU
                 against gpurnn.torch.LSTM/GRU (config A and 2x512);
  memory         ``bench_memory.py``: device memory of a training step and an eval forward,
                 gpurnn against torch, each from a fresh process (LSTM rows A-E and long,
                 GRU B and C);
  half           float16 and bfloat16: the benchmark matrix's fp16 and bf16 modes (a gpurnn
                 half model against cuDNN under torch.autocast fp16 / bf16) and the memory
                 of B, C and E in both beside fp32 (the memory stage's figures where it
                 ran; target: at most 0.55x our own fp32);
  nccl           ``bench_distributed.py --nccl``: the NCCL all-reduce's cost per GPU training
                 step (a world of one);
  sanitizer      compute-sanitizer's memcheck, racecheck, initcheck and synccheck over
                 ``sanitize.py`` (every cell and option, each algorithm forced): 0 errors;
  workspaces     (only when named) the extra streams' cuBLAS workspace size
                 (GPURNN_CUBLAS_WORKSPACE_MIB 32, 4, 0) against the LSTM's training memory
                 and fp32 time at C and E, whose side streams and lanes hold most of them
                 (E: five 32 MiB workspaces beside the handle's own), to choose the default;
  lab            (only when named, or with --lab) ``gemm_lab.py``: GEMM layouts and a
                 forward's time split, its printout kept in the JSON.
Writes ``kernels/results/<date>-<gpu>.json`` (and a copy and the suite's log under
--out) after every stage, and prints the table last, then the open issues' targets
met, missed or not measured (``targets.py``; also saved in the JSON). Each stage is guarded so one
failure still reports the rest. A device call runs 10 minutes at most and a session
has about 15 minutes of device time, so give each call a ``--budget`` (no stage starts
past it; the suite's and the sanitizer's timeouts are cut to what is left) that leaves
room for the stage it may still be running, e.g.

    --stages suite,benchmarks,torch,memory --budget 420         (first call, timeout_s 600)
    --stages sanitizer,half,nccl,training,algorithms,workspaces --budget B  (second: B = what is left less 2 min)

and afterwards ``python kernels/targets.py <first call's JSON> <second's>`` to read the
targets off both calls' stages together. The nccl stage (and the suite's NCCL test) needs
mpi4py with an MPI library: the H200 image has mpi4py but no MPI, and no network, so carry
MPICH's wheel (``pip download --no-deps mpich -d .whl``, ``.whl`` in the call's carry) and
start the command with ``python3 -m pip install -q --no-index --no-deps --prefix /tmp/mpi
.whl/mpich-*.whl && export LD_LIBRARY_PATH=/tmp/mpi/lib;`` (its libmpi where mpi4py looks).

The stages' times on an H100 at 061083c: suite 147 s (-n 4; the suite has grown
since), first_forward, ceilings, benchmarks and training about 100 s together; the
rest have not been timed.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

FIRST_FORWARD = """
import time
t0 = time.perf_counter()
import numpy as np, cupy, gpurnn
t1 = time.perf_counter()
m = gpurnn.LSTM(512, 512, seed=0, backend="cuda")
out, _ = m(np.ones((100, 64, 512), np.float32))
cupy.cuda.get_current_stream().synchronize()
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def stage(report, name, fn):
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception:
        report[name] = {"error": traceback.format_exc()}
        print(f"[{name}] FAILED\n{report[name]['error']}", flush=True)
    print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)


def capped(timeout, left):
    """A subprocess timeout that ends within the budget: timeout, cut to the seconds left (None: no budget)."""
    return timeout if left is None else max(1, min(timeout, int(left)))


def finished(result):
    """Whether a stage's result holds figures (it did not fail and was not skipped)."""
    return not (isinstance(result, dict) and ({"error", "skipped"} & set(result)))


def run_stages(report, names, run, budget, save, start=None):
    """Run the named stages in order, saving the report after each (a device call
    killed at its time limit still leaves every finished stage on disk). budget:
    None, or the seconds this run may take: a stage is not started past it (it is
    recorded as skipped), and ``run[name]`` is called with the seconds left, which
    the suite and the sanitizer take as their timeout. start: the perf_counter()
    the budget counts from (default: now)."""
    t0 = time.perf_counter() if start is None else start
    for name in names:
        left = None if budget is None else budget - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            report[name] = {"skipped": f"--budget {budget:g} s spent before this stage began"}
            print(f"[{name}] skipped: budget spent", flush=True)
        else:
            stage(report, name, lambda: run[name](left))
        save(report)


def memory(quick):
    """bench_memory's LSTM rows (A and D with --quick, else all), and the GRU's B and C."""
    import bench_memory

    if quick:
        return bench_memory.main(["--rows", "A", "D"])
    return bench_memory.main([]) + bench_memory.main(["--cells", "gru", "--rows", "B", "C"])


def half_memory(report, rows):
    """The LSTM's float16 and bfloat16 memory on ``rows``, each beside our own fp32 figure:
    the memory stage's where it measured those rows, else measured here too."""
    import bench_memory

    measured = report.get("memory") if isinstance(report.get("memory"), list) else []
    have = {(r["row"], r["pass_"]) for r in measured
            if r["cell"] == "lstm" and r.get("precision", "fp32") == "fp32" and "error" not in r}
    fp32 = [] if {(row, p) for row in rows for p in ("train", "eval")} <= have else ["fp32"]
    return bench_memory.main(["--precisions", *fp32, "fp16", "bf16", "--rows", *rows], fp32_rows=measured)


def suite(timeout, out_dir):
    """The whole suite on the CUDA backend; its log goes to out_dir/suite.log."""
    import importlib.util

    env = dict(os.environ, GPURNN_BACKEND="cuda", PYTHONPATH=ROOT)
    # the 20 slowest tests go into the log: where the suite's device time goes, for planning the next call
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider", "-rfEs", "--durations=20"]
    if importlib.util.find_spec("xdist"):  # the GPU machines have pytest-xdist: the CPU-bound tests in parallel
        cmd += ["-n", str(max(2, min(8, (os.cpu_count() or 4) // 2)))]
    else:
        cmd += ["-o", "addopts="]  # pyproject's "-n 2" needs pytest-xdist
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        log, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode(errors="replace") + f"\n[suite] timed out after {timeout} s\n"
        returncode = "timeout"
    if out_dir:
        with open(os.path.join(out_dir, "suite.log"), "w") as f:
            f.write(log)
    tail = log.strip().splitlines()
    print("\n".join(tail[-40:]), flush=True)
    summary = next((line for line in reversed(tail) if re.search(r"\d+ (passed|failed|error)", line)), "")
    failed = [line.split()[1] for line in tail if line.startswith(("FAILED ", "ERROR "))]
    return dict(returncode=returncode, summary=summary.strip("= "), failed=failed,
                seconds=round(time.perf_counter() - t0, 1))


SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")


def sanitizer(timeout, out_dir, left=None):
    """Each compute-sanitizer tool over kernels/sanitize.py: its error summary and exit
    status, and, should a tool time out before its summary, how many of the script's
    configurations it finished and how many lines of error reports it printed by then. left: None,
    or the seconds all four tools may take, shared out afresh before each tool."""
    tool_path = shutil.which("compute-sanitizer")
    if tool_path is None:
        raise RuntimeError("compute-sanitizer is not on the PATH")
    env = dict(os.environ, GPURNN_BACKEND="cuda", PYTHONPATH=ROOT)
    deadline = None if left is None else time.perf_counter() + left
    results = {}
    for k, tool in enumerate(SANITIZER_TOOLS):
        cmd = [tool_path, "--tool", tool, "--report-api-errors", "no", "--error-exitcode", "99",
               sys.executable, os.path.join(HERE, "sanitize.py")]
        t0 = time.perf_counter()
        tool_timeout = capped(timeout, None if deadline is None else (deadline - t0) / (len(SANITIZER_TOOLS) - k))
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=tool_timeout)
            log, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            log, returncode = (exc.stdout or b"").decode(errors="replace"), "timeout"
        if out_dir:
            with open(os.path.join(out_dir, f"sanitizer-{tool}.log"), "w") as f:
                f.write(log)
        results[tool] = dict(returncode=returncode, seconds=round(time.perf_counter() - t0, 1),
                             tail=log.strip().splitlines()[-5:], **sanitizer_counts(log))
        print(f"[sanitizer] {tool}: exit {returncode}, {'; '.join(results[tool]['summary'])} "
              f"({results[tool]['configs_done']} configurations done, {results[tool]['report_lines']} error report lines)",
              flush=True)
    return results


def sanitizer_counts(log):
    """What a compute-sanitizer log says, complete or cut off: its SUMMARY lines, the
    sanitize.py configurations that finished, and the lines of error reports printed."""
    lines = log.splitlines()
    return dict(summary=[line.strip("= ").strip() for line in lines if "SUMMARY" in line],
                configs_done=sum(line.endswith(" ok") for line in lines),
                report_lines=sum(line.startswith("========= ") and "SUMMARY" not in line
                            and any(word in line for word in ("Invalid", "Race", "Uninitialized", "Barrier",
                                                              "Error", "error", "hazard"))
                            for line in lines))


def first_forward():
    env = dict(os.environ, GPURNN_BACKEND="cuda", PYTHONPATH=ROOT)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", FIRST_FORWARD], env=env, capture_output=True, text=True,
                             timeout=300, check=True).stdout.split()
        runs.append(dict(import_s=float(out[0]), import_to_first_forward_s=float(out[1])))
    return runs


WORKSPACE_MIB = (32, 4, 0)


def workspaces(sizes=WORKSPACE_MIB, rows=("C", "E"), backend="cuda"):
    """For each workspace size, in processes of its own: bench_memory's gpurnn side of an
    LSTM training step (torch's figure is the memory stage's) and bench_gpu's fp32 LSTM
    rows (time against cuDNN); the tests run the memory side on the simulator."""
    import tempfile

    import bench_memory

    results = []
    for mib in sizes:
        extra = {"GPURNN_CUBLAS_WORKSPACE_MIB": str(mib)}
        for name in rows:
            T, B, H, L = bench_memory.ROWS[name]
            held = bench_memory.measure("gpurnn", "lstm", T, B, H, L, True, backend=backend, extra_env=extra)
            results.append(dict(workspace_MiB=mib, row=name, pass_="train", gpurnn_MiB=held / 2**20))
        if backend != "cuda":
            continue
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "rows.json")
            done = subprocess.run([sys.executable, os.path.join(HERE, "bench_gpu.py"), "--configs", *rows, "--cells",
                                   "lstm", "--modes", "fp32", "--json", path], capture_output=True, text=True,
                                  timeout=600, env=dict(os.environ, **extra, PYTHONPATH=ROOT))
            if done.returncode:
                raise RuntimeError(f"bench_gpu at {mib} MiB: {done.stderr.strip()[-1500:]}")
            timed = json.load(open(path))
        results += [dict(workspace_MiB=mib, row=r["config"], pass_=r["pass_"], ratio=r["ratio"]) for r in timed]
    return results


def gemm_lab():
    import contextlib
    import io

    import gemm_lab as lab

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        lab.main()
    print(printed.getvalue(), flush=True)
    return printed.getvalue().splitlines()


def versions():
    import cupy
    import numba
    import numpy
    import torch

    try:
        from importlib.metadata import version
        numba_cuda = version("numba-cuda")
    except Exception:
        numba_cuda = "?"
    from gpurnn import cli

    return dict(device=torch.cuda.get_device_name(), python=platform.python_version(), torch=torch.__version__,
                cudnn=torch.backends.cudnn.version(), cupy=cupy.__version__, numba=numba.__version__,
                numba_cuda=numba_cuda, numpy=numpy.__version__,
                commit=os.environ.get("GPURNN_COMMIT", "unknown"),
                # what the nccl and sanitizer stages need, seen before they run (gpurnn info's lines)
                mpi=cli.mpi_line(), nccl=cli.nccl_line(), compute_sanitizer=shutil.which("compute-sanitizer"))


STAGES = ("suite", "first_forward", "ceilings", "benchmarks", "algorithms", "training", "torch", "memory", "half",
          "nccl", "sanitizer", "workspaces", "lab")
NAMED_ONLY = ("workspaces", "lab")  # labs: run only when named


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also write the JSON and the suite's log here")
    ap.add_argument("--quick", action="store_true", help="benchmarks: configs A and D, LSTM, fp32 only")
    ap.add_argument("--stages", default=",".join(s for s in STAGES if s not in NAMED_ONLY),
                    help=f"comma-separated subset of {', '.join(STAGES)} (default: all but {' and '.join(NAMED_ONLY)})")
    ap.add_argument("--suite-timeout", type=int, default=300, help="seconds the suite stage may take")
    ap.add_argument("--sanitizer-timeout", type=int, default=240, help="seconds each sanitizer tool may take")
    ap.add_argument("--lab", action="store_true", help="also run gemm_lab.py")
    ap.add_argument("--budget", type=float, help="seconds this run may take (a device call's limit less a margin): "
                                                 "no stage starts past it, and the suite's and sanitizer's timeouts "
                                                 "are cut to what is left; the JSON is saved after every stage")
    args = ap.parse_args()
    start = time.perf_counter()
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()] + (["lab"] if args.lab else [])
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        ap.error(f"--stages: unknown {unknown}; expected a subset of {', '.join(STAGES)}")
    import bench_distributed
    import bench_gpu
    import bench_memory
    import bench_torch
    import bench_train
    import targets

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "stages": [s for s in STAGES if s in chosen]}
    bench_args = ["--configs", "A", "D", "--cells", "lstm", "--modes", "fp32"] if args.quick else []

    run = {"suite": lambda left: suite(capped(args.suite_timeout, left), args.out),
           "first_forward": lambda left: first_forward(),
           "ceilings": lambda left: bench_gpu.ceilings(),
           "benchmarks": lambda left: bench_gpu.main(bench_args),
           "algorithms": lambda left: bench_gpu.main((bench_args or ["--modes", "fp32"])
                                                     + ["--algorithms", "graph", "fused", "persistent"]),
           "training": lambda left: bench_train.main(["--device", "cuda", "--steps", "10" if args.quick else "20"]),
           "torch": lambda left: bench_torch.main(["--device", "cuda", "--steps", "10" if args.quick else "20"]),
           "memory": lambda left: memory(args.quick),
           "half": lambda left: dict(benchmarks=bench_gpu.main((bench_args or []) + ["--modes", "fp16", "bf16"]),
                                     memory=half_memory(report, ["A"] if args.quick else ["B", "C", "E"])),
           "nccl": lambda left: bench_distributed.main(["--nccl", "--steps", "20" if args.quick else "40"]),
           "sanitizer": lambda left: sanitizer(args.sanitizer_timeout, args.out, left),
           "workspaces": lambda left: workspaces(),
           "lab": lambda left: gemm_lab()}
    stage(report, "versions", versions)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", report["versions"].get("device", "gpu")).strip("-").lower()
    name = f"{report['date'][:10]}-{gpu}.json"
    paths = [os.path.join(HERE, "results", name)] + ([os.path.join(args.out, name)] if args.out else [])

    def save(report):
        for path in paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".part", "w") as f:  # renamed whole: a kill mid-write keeps the last full report
                json.dump(report, f, indent=1)
            os.replace(path + ".part", path)

    save(report)
    run_stages(report, report["stages"], run, args.budget, save, start)

    print("\n==== gpurnn GPU check ====")
    v = report["versions"]
    if finished(v):
        print(f"{v['device']}  torch {v['torch']} cuDNN {v['cudnn']}  CuPy {v['cupy']}  "
              f"numba-cuda {v['numba_cuda']}  NumPy {v['numpy']}  commit {v['commit'][:10]}")
        print(f"{v['mpi']}; {v['nccl']}; compute-sanitizer: {v['compute_sanitizer'] or 'not on PATH'}")
    t = report.get("suite")
    if t is not None:
        print("whole suite on CUDA:", t.get("summary") or t.get("skipped") or t.get("error", "")[-300:],
              f"({t.get('seconds')} s)" if "seconds" in t else "")
        for name in t.get("failed", []):
            print("  FAILED", name)
    ff = report.get("first_forward")
    if isinstance(ff, list):
        print("import -> first forward (s):", ", ".join(f"{r['import_to_first_forward_s']:.2f}" for r in ff),
              "(second run uses the kernel cache)")
    c = report.get("ceilings")
    if isinstance(c, dict) and finished(c):
        print(f"ceilings: copy {c['copy_TBps']:.2f} TB/s, fp32 GEMM {c['fp32_gemm_TFLOPs']:.1f} TFLOP/s, "
              f"TF32 GEMM {c['tf32_gemm_TFLOPs']:.1f} TFLOP/s")
    rows = report.get("benchmarks")
    if isinstance(rows, list):
        print(bench_gpu.table(rows))
    rows = report.get("algorithms")
    if isinstance(rows, list):
        print("each algorithm forced:")
        print(bench_gpu.table(rows))
    memory_rows = report.get("memory")
    if isinstance(memory_rows, list):
        print("device memory, each side from a fresh process (drop in free memory):")
        print(bench_memory.table(memory_rows))
    half = report.get("half")
    if isinstance(half, dict) and finished(half):
        print("float16 and bfloat16 against cuDNN under torch.autocast(float16 / bfloat16):")
        print(bench_gpu.table(half["benchmarks"]))
        print(bench_memory.table(half["memory"]))
    nccl = report.get("nccl")
    if isinstance(nccl, dict) and finished(nccl):
        print(f"NCCL all-reduce in the GPU CharLM step (world of one): {nccl['allreduce_ms']:.2f} ms a step "
              f"({nccl['local_ms']:.2f} -> {nccl['nccl_ms']:.2f} ms)")
    for r in report.get("workspaces") if isinstance(report.get("workspaces"), list) else []:
        print(f"cuBLAS workspace {r['workspace_MiB']} MiB, LSTM {r['row']} {r['pass_']}: "
              + (f"{r['gpurnn_MiB']:.0f} MiB" if "gpurnn_MiB" in r else
                 f"time ratio to cuDNN {r['ratio']:.2f}" if r["ratio"] is not None else "n/a"))
    checks = report.get("sanitizer")
    if isinstance(checks, dict) and finished(checks):
        for tool, r in checks.items():
            print(f"compute-sanitizer {tool}: exit {r['returncode']}; {'; '.join(r['summary'])} "
                  f"({r['configs_done']} configurations done, {r['report_lines']} error report lines)")
    training = report.get("training")
    for r in training if isinstance(training, list) else []:
        print(f"CharLM training step, {r['size']} (LSTM {r['layers']}x{r['H']}, T={r['T']}, B={r['B']}): "
              f"tokens/s ratio {r['ratio']:.2f}; phases (ms) "
              + "; ".join(f"{side}: " + ", ".join(f"{k} {v:.2f}" for k, v in p.items())
                          for side, p in r["phases_ms"].items()))
    torch_rows = report.get("torch")
    for r in torch_rows if isinstance(torch_rows, list) else []:
        pools = r.get("pools_MiB")
        print(f"torch model with gpurnn.torch.{r['cell'].upper()}, {r['size']} ({r['layers']}x{r['H']}, T={r['T']}, "
              f"B={r['B']}): tokens/s ratio {r['ratio']:.2f} against torch.nn"
              + (f"; idle MiB (held - used): CuPy {pools['cupy_held'] - pools['cupy_used']:.0f}, "
                 f"torch {pools['torch_held'] - pools['torch_used']:.0f}" if pools else ""))
    stage(report, "targets", lambda: targets.check(report, targets.load_baseline()))
    save(report)
    if isinstance(report["targets"], list):
        print("the issues' targets (kernels/targets.py):")
        print(targets.table(report["targets"]))
    skipped = [name for name in report["stages"] if "skipped" in (report.get(name) or {})]
    if skipped:
        print(f"skipped (--budget {args.budget:g} s spent): {', '.join(skipped)}; run them in another call")
    print("written:", ", ".join(paths))


if __name__ == "__main__":
    main()
