"""The benchmark scripts the GPU check runs work end to end (on the CPU here):
a broken script would waste a session's few minutes of GPU time."""

import os
import sys

import pytest

from helpers import _have_ml_dtypes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))


def test_bench_train_reports_both_sides_and_every_phase(tmp_path):
    pytest.importorskip("torch")
    import bench_train

    rows = bench_train.main(["--steps", "1", "--sizes", "default", "--json", str(tmp_path / "train.json")])
    assert [r["size"] for r in rows] == ["train default"]  # config A runs the same code, 4x slower
    for r in rows:
        assert r["fold_embedding"] and r["ratio"] > 0
        assert abs(r["first_loss"][0] - r["first_loss"][1]) < 1e-4 * r["first_loss"][1]
        assert set(r["phases_ms"]["gpurnn"]) == set(r["phases_ms"]["torch"]) == {
            "forward", "backward", "clip", "optimizer", "zero_grad"}
    assert (tmp_path / "train.json").stat().st_size > 0


def test_gpu_check_stages_are_named_and_checked():
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "gpu_check.py")
    done = subprocess.run([sys.executable, script, "--stages", "suite,warp"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown ['warp']" in done.stderr
    helped = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    assert ("suite, first_forward, ceilings, benchmarks, algorithms, training, torch, memory, half, nccl, sanitizer, "
            "workspaces, lab (default: all but workspaces and lab)"
            in " ".join(helped.stdout.split()))


def test_workspaces_stage_runs_each_size_in_processes_of_its_own(monkeypatch):
    """The workspaces lab hands each cuBLAS workspace size to the processes that measure
    it (a typo would only show on a lent GPU): bench_memory's runs, recorded here."""
    import types

    import bench_memory
    import gpu_check

    sizes = []

    def run(cmd, env, **kw):
        sizes.append((env["GPURNN_CUBLAS_WORKSPACE_MIB"], cmd[5:9]))  # the row's T, B, H, layers
        return types.SimpleNamespace(returncode=0, stdout="3145728\n", stderr="")

    monkeypatch.setattr(bench_memory.subprocess, "run", run)
    results = gpu_check.workspaces(sizes=(32, 4, 0), rows=("C", "E"), backend="cudasim")
    assert [(r["workspace_MiB"], r["row"], r["gpurnn_MiB"]) for r in results] == [
        (mib, row, 3.0) for mib in (32, 4, 0) for row in ("C", "E")]
    C, E = (list(map(str, bench_memory.ROWS[row])) for row in ("C", "E"))
    assert sizes == [(str(mib), shape) for mib in (32, 4, 0) for shape in (C, C, E, E)]  # each measured after a warm-up run


def test_gpu_check_saves_after_each_stage_and_starts_none_past_its_budget():
    """A device call killed at its limit must leave every finished stage saved, and a
    budget must keep the last stages from starting when they cannot finish."""
    import time

    import gpu_check

    saved, lefts = [], []

    def fake(result, seconds=0.0):
        def run(left):
            lefts.append(left)
            time.sleep(seconds)
            return result
        return run

    def broken(left):
        raise RuntimeError("no GPU here")

    run = {"suite": fake("ok", 0.3), "benchmarks": broken, "torch": fake([1], 0.3), "sanitizer": fake("late")}
    report = {}
    gpu_check.run_stages(report, list(run), run, 0.5, lambda r: saved.append(dict(r)))
    assert report["suite"] == "ok" and "no GPU here" in report["benchmarks"]["error"] and report["torch"] == [1]
    assert set(report["sanitizer"]) == {"skipped"}  # the stages before spent the budget
    assert [list(s) for s in saved] == [["suite"], ["suite", "benchmarks"], ["suite", "benchmarks", "torch"],
                                        ["suite", "benchmarks", "torch", "sanitizer"]]
    assert len(lefts) == 2 and 0.4 < lefts[0] <= 0.5 and 0 < lefts[1] < 0.2  # each stage is told the seconds left

    report = {}
    gpu_check.run_stages(report, ["torch"], run, None, lambda r: None)
    assert report == {"torch": [1]} and lefts[-1] is None  # no budget, no limit


def test_half_memory_reuses_the_memory_stages_fp32_rows(monkeypatch):
    """The half stage measures fp32 again only where the memory stage has not (each row
    costs three fresh processes of device time), and compares half with those figures."""
    import bench_memory
    import gpu_check

    calls = []
    monkeypatch.setattr(bench_memory, "main", lambda argv, fp32_rows=(): calls.append((argv, fp32_rows)) or [])
    measured = [dict(cell="lstm", row=row, pass_=p, precision="fp32", gpurnn_MiB=1.0)
                for row in ("B", "C", "E") for p in ("train", "eval")]
    gpu_check.half_memory({"memory": measured}, ["B", "C", "E"])
    gpu_check.half_memory({"memory": measured[:-1]}, ["B", "C", "E"])  # E's eval row missing
    gpu_check.half_memory({"memory": {"error": "no GPU"}}, ["A"])
    assert [argv[1:4] for argv, _ in calls] == [["fp16", "bf16", "--rows"], ["fp32", "fp16", "bf16"],
                                                ["fp32", "fp16", "bf16"]]
    assert calls[0][1] == measured and calls[2][1] == []

    monkeypatch.undo()  # the real main, with measure faked
    monkeypatch.setattr(bench_memory, "measure", lambda side, *a, **k: (300 if side == "gpurnn" else 400) << 20)
    rows = bench_memory.main(["--precisions", "fp16", "--rows", "C"],
                             fp32_rows=[dict(cell="lstm", row="C", pass_=p, precision="fp32", gpurnn_MiB=600.0)
                                        for p in ("train", "eval")])
    assert [r["of_our_fp32"] for r in rows] == [0.5, 0.5] and [r["ratio"] for r in rows] == [0.75, 0.75]


def test_sanitizer_logs_are_read_whole_or_cut_off():
    import gpu_check

    clean = ("========= COMPUTE-SANITIZER\nrnn D=1 L=1 graph float32 ok\nrnn D=1 L=1 fused float32 ok\n"
             "0 failures\n========= ERROR SUMMARY: 0 errors\n")
    assert gpu_check.sanitizer_counts(clean) == dict(summary=["ERROR SUMMARY: 0 errors"], configs_done=2,
                                                     report_lines=0)
    cut = ("========= COMPUTE-SANITIZER\nrnn D=1 L=1 graph float32 ok\n"
           "========= Invalid __global__ write of size 4 bytes\n=========     at lstm_step+0x1f0\n"
           "========= Error: Race reported between Write access at x and Read access at y\n")
    assert gpu_check.sanitizer_counts(cut) == dict(summary=[], configs_done=1, report_lines=2)


def test_sanitizer_script_runs_every_algorithm_under_the_simulator():
    """The script compute-sanitizer runs on the GPU: here under numba's simulator, one
    cell (the LSTM: its eval runs one cell state) and tiny sizes (each algorithm forced, train
    and eval, padded and full sequences, dropout)."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "sanitize.py")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPURNN_RNN_ALGO")}
    dtypes = ["float32", "bfloat16"] if _have_ml_dtypes else ["float32", "float16"]  # float16: tests/test_half.py
    done = subprocess.run([sys.executable, script, "--backend", "cudasim", "--size", "3", "2", "3", "--cells", "lstm",
                           "--repeats", "1", "--dtypes", *dtypes],
                          capture_output=True, text=True, env=dict(env, GPURNN_BACKEND="cudasim"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failures" and sum(line.endswith(" ok") for line in lines) == 24  # 4 configs x 6 runs
    assert sum(line.endswith(f"{dtypes[1]} ok") for line in lines) == 12


def test_sanitizer_script_runs_the_projected_lstm_under_the_simulator():
    """The projected LSTM (graph only: 4 configs x 2 runs) in the script compute-sanitizer runs."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "sanitize.py")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPURNN_RNN_ALGO")}
    done = subprocess.run([sys.executable, script, "--backend", "cudasim", "--size", "3", "2", "4", "--cells",
                           "lstm_projected", "--repeats", "1", "--dtypes", "float32", "float16"],
                          capture_output=True, text=True, env=dict(env, GPURNN_BACKEND="cudasim"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "0 failures" and sum(line.endswith(" ok") for line in lines) == 8


def test_benchmark_table_reports_algorithms_and_rows_that_cannot_run():
    import bench_gpu

    row = dict(cell="lstm", config="D", mode="fp32", pass_="fwd", gpurnn_ms=0.1, peer_ms=0.2, ratio=0.5,
               rel_err={"out": 1e-6, "dW": 1e-6}, algorithm="auto", chosen={"inference": "persistent"})
    na = dict(cell="lstm", config="B", mode="fp32", pass_="fwd", ratio=None, algorithm="persistent",
              not_applicable="persistent lstm forward: too big")
    slow = dict(row, ratio=2.0, algorithm="fused", chosen={"inference": "fused"})
    text = bench_gpu.table([row, na, slow])
    assert "auto (persistent)" in text and "n/a: persistent lstm forward: too big" in text
    assert "auto fp32: geometric mean of the ratios 0.50; 0 of 1 rows above 1.0" in text
    assert "fused fp32: geometric mean of the ratios 2.00; 1 of 1 rows above 1.0" in text
    assert "persistent fp32: geometric mean of the ratios nan; 0 of 0 rows above 1.0" in text


def test_bench_torch_compares_the_same_model_on_both_sides():
    pytest.importorskip("torch")
    import bench_torch

    rows = bench_torch.main(["--steps", "1", "--cells", "gru", "lstm_projected"])
    assert [(r["cell"], r["size"]) for r in rows] == [("gru", "train default"), ("lstm_projected", "train default")]
    for row in rows:
        assert row["ratio"] > 0 and abs(row["first_loss"]["torch"] - row["first_loss"]["gpurnn"]) < 1e-4


def test_memory_table_has_both_sides_and_the_ratio():
    import bench_memory

    full = dict(cell="lstm", row="C", precision="fp32", pass_="train", gpurnn_MiB=728.0, torch_MiB=451.0,
                ratio=728 / 451)
    half = dict(full, precision="fp16", gpurnn_MiB=380.0, torch_MiB=300.0, ratio=380 / 300, of_our_fp32=380 / 728)
    refused = dict(cell="lstm", row="C", precision="bf16", pass_="train", error="torch lstm: bfloat16 not supported")
    text = bench_memory.table([full, half, refused])
    assert text.splitlines()[1].split() == ["lstm", "C", "fp32", "train", "728.0", "451.0", "1.61"]
    assert text.splitlines()[2].split() == ["lstm", "C", "fp16", "train", "380.0", "300.0", "1.27", "0.52"]
    assert text.splitlines()[3].endswith("n/a: torch lstm: bfloat16 not supported")


STAND_IN_CUPY = """
import tracemalloc
from types import SimpleNamespace

import numpy as np

tracemalloc.start()  # the device's free memory: what this process has not allocated
DEVICE = 1 << 40
asarray, ones_like = np.asarray, np.ones_like
ones = lambda shape: SimpleNamespace(sum=lambda: SimpleNamespace(get=lambda: 1.0))
cuda = SimpleNamespace(runtime=SimpleNamespace(
    deviceSynchronize=lambda: None, memGetInfo=lambda: (DEVICE - tracemalloc.get_traced_memory()[0], DEVICE)))
"""


def test_memory_measure_runs_gpurnns_side(tmp_path, monkeypatch):
    """The measuring script's gpurnn side runs end to end (a typo there would only show on
    a lent GPU): on the simulator, with a stand-in for CuPy whose free memory is what the
    process has not allocated (host memory here, the simulator's compiled kernels
    included), a training step takes more than an eval forward, and each at least the
    input it was given."""
    pytest.importorskip("numba_cuda")
    import bench_memory

    (tmp_path / "cupy.py").write_text(STAND_IN_CUPY)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    T, B, H = 6, 4, 16
    train, evaluate = (bench_memory.measure("gpurnn", "gru", T, B, H, 1, mode, backend="cudasim")
                       for mode in (True, False))
    assert train > evaluate >= T * B * H * 4


def test_bench_torch_reads_both_memory_pools(monkeypatch):
    """The GPU rows' pool figures (what decides issue 12's allocator switch), with the two
    libraries' counters faked: a typo here would only show on a lent GPU."""
    import types

    torch = pytest.importorskip("torch")
    import bench_torch

    pool = types.SimpleNamespace(total_bytes=lambda: 3 << 20, used_bytes=lambda: 1 << 20)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(get_default_memory_pool=lambda: pool))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 8 << 20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 5 << 20)
    assert bench_torch.pools() == dict(cupy_held=3.0, cupy_used=1.0, torch_held=8.0, torch_used=5.0)


def test_targets_read_off_the_061083c_report_as_the_issues_quote_it():
    """Issue 10 quotes the H100 run at 061083c: 15 of 72 rows above 1.0, geometric means
    fp32 0.95 and TF32 0.62, D and RNN C above their targets. Read off its committed JSON,
    the targets must say the same; the stages that run did not exist then are not measured."""
    import targets

    baseline = targets.load_baseline()
    results = {r["target"]: r for r in targets.check(baseline, baseline)}
    matrix = results["no fp32/TF32 row of the matrix above 1.0 (batch-1 and streaming rows included)"]
    assert matrix["status"] == "missed" and len(matrix["above"]) == 15
    assert "worst 23.69 (rnn D fp32 fwd) of 72 rows" in matrix["detail"] and "gru B tf32 fwd" in matrix["above"]
    assert matrix["detail"].endswith("geometric mean fp32 0.95, tf32 0.62")
    assert results["LSTM and GRU D fwd+bwd <= 0.9"]["detail"].endswith("lstm D tf32 fwd+bwd 0.93")
    assert results["relative error vs cuDNN below 1e-4 in every fp32 row"]["status"] == "met"
    assert results["no row slower (ratio to cuDNN) than at 061083c by more than noise"]["status"] == "met"
    assert [r["status"] for r in results.values()].count("not measured") == 7
    assert results["the whole suite on CUDA: 0 failed"]["detail"] == "the suite stage did not run"


def test_targets_met_missed_and_unmeasured():
    """A report that meets every target, then one row, memory figure or tool at a time
    that misses, and stages that failed or were skipped."""
    import copy

    import targets

    baseline = targets.load_baseline()
    bench = [dict(r, ratio=min(r["ratio"], 0.35)) for r in baseline["benchmarks"]]
    bench += [dict(r, config=c, ratio=0.9) for r in baseline["benchmarks"][:4] for c in ("b1", "stream")]
    memory = [dict(cell="lstm", row=row, precision="fp32", pass_=p, ratio=0.9) for row in ("B", "C", "E", "long")
              for p in ("train", "eval")]
    half_bench = [dict(r, mode=m, ratio=0.7) for r in baseline["benchmarks"] if r["mode"] == "fp32" for m in ("fp16", "bf16")]
    half_memory = [dict(cell="lstm", row=row, precision=m, pass_="train", of_our_fp32=0.52)
                   for row in ("B", "C", "E") for m in ("fp16", "bf16")]
    clean = dict(returncode=0, summary=["ERROR SUMMARY: 0 errors"], report_lines=0)
    report = dict(suite=dict(returncode=0, summary="900 passed", failed=[]), benchmarks=bench, memory=memory,
                  half=dict(benchmarks=half_bench, memory=half_memory),
                  torch=[dict(cell="lstm", size="A", ratio=1.5), dict(cell="lstm", size="train default", ratio=1.6),
                         dict(cell="gru", size="A", ratio=1.2)],
                  sanitizer={tool: dict(clean) for tool in ("memcheck", "racecheck", "initcheck", "synccheck")})
    results = targets.check(report, baseline)
    assert {r["status"] for r in results} == {"met"}, targets.table(results)
    assert targets.table(results).endswith(f"{len(results)} met, 0 missed, 0 not measured")

    def status(changed, target):
        return next(r for r in targets.check(changed, baseline) if r["target"].startswith(target))

    worse = copy.deepcopy(report)
    worse["benchmarks"][0]["ratio"] = 1.02  # lstm A fp32 fwd
    assert status(worse, "no fp32/TF32 row")["status"] == "missed"
    assert status(worse, "no row slower")["detail"].endswith("lstm A fp32 fwd 0.47 -> 1.02")
    worse["memory"][2]["ratio"] = 1.05  # C train
    assert "above: lstm C train 1.05" in status(worse, "training memory")["detail"]
    worse["half"]["memory"][0]["of_our_fp32"] = 0.6
    assert status(worse, "fp16 and bf16 memory")["status"] == "missed"
    worse["torch"][1]["ratio"] = 1.3
    assert status(worse, "gpurnn.torch.LSTM")["status"] == "missed"
    worse["sanitizer"]["racecheck"] = dict(returncode=99, summary=["RACECHECK SUMMARY: 2 hazards"], report_lines=4)
    assert status(worse, "compute-sanitizer")["status"] == "missed"
    worse["suite"] = dict(returncode=1, summary="1 failed, 899 passed", failed=["tests/test_gpu.py::test_x"])
    assert status(worse, "the whole suite")["detail"] == "1 failed, 899 passed; failed: tests/test_gpu.py::test_x"

    some = dict(report, benchmarks=[r for r in report["benchmarks"] if r["config"] != "stream"])
    assert status(some, "no fp32/TF32 row")["status"] == "not measured"  # below 1.0, but a row never ran
    assert status(some, "no fp32/TF32 row")["detail"].endswith("; no rows of stream")
    some = dict(report, torch=report["torch"][:1])
    assert status(some, "gpurnn.torch.LSTM")["detail"].endswith("; no rows of train default")
    some = dict(report, memory=[r for r in report["memory"] if r["row"] != "long"])
    assert status(some, "training memory")["detail"].endswith("; no rows of long")

    gone = dict(report, memory={"error": "Traceback ..."}, half={"skipped": "--budget 420 s spent"})
    del gone["torch"]
    assert status(gone, "training memory")["detail"] == "the memory stage failed"
    assert status(gone, "fp16 and bf16 time")["detail"] == "the half stage was skipped (budget spent)"
    assert status(gone, "gpurnn.torch.LSTM")["detail"] == "the torch stage did not run"


def test_targets_read_a_sessions_reports_as_one(tmp_path, capsys):
    """Two device calls, each with some stages: the later call's figures win, a stage that
    failed in one call and ran in the other counts as measured."""
    import json

    import targets

    first = dict(suite={"skipped": "budget"}, torch=[dict(cell="lstm", size=size, ratio=1.5)
                                                     for size in ("A", "train default")])
    second = dict(suite=dict(returncode=0, summary="900 passed", failed=[]), torch={"error": "Traceback"})
    paths = []
    for k, report in enumerate((first, second)):
        paths.append(tmp_path / f"{k}.json")
        paths[-1].write_text(json.dumps(report))
    results = {r["target"][:20]: r["status"] for r in targets.main([str(p) for p in paths])}
    assert results["the whole suite on C"] == "met" and results["gpurnn.torch.LSTM's "] == "met"
    assert "2 met, 0 missed, 12 not measured" in capsys.readouterr().out


def test_gpu_check_versions_say_what_the_later_stages_need(monkeypatch):
    """The versions stage, which runs first, also names the MPI library, NCCL and
    compute-sanitizer (what the nccl and sanitizer stages need): with a stand-in for the
    GPU's names, since a typo here would only show on a lent GPU."""
    torch = pytest.importorskip("torch")
    import gpu_check
    from helpers import cupy_without_nccl

    cupy_without_nccl(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    v = gpu_check.versions()
    assert v["device"] == "NVIDIA H200" and v["cupy"] == "14.2.0" and v["compute_sanitizer"] is None
    assert v["mpi"].startswith("mpi4py: ") and v["nccl"].startswith("NCCL: CuPy cannot load NCCL")
