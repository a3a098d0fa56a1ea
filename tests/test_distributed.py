"""Data-parallel training over MPI: gpurnn.distributed in a world of one and of two,
``mpiexec -n 2 gpurnn train`` against one process, resuming on another number of
ranks, and a rank that dies or hangs."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from gpurnn import cli, distributed, train
from gpurnn.backend import BackendUnavailable, get_backend, load_nccl
from helpers import cupy_without_nccl, mpi4py_without_an_mpi_library

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or not shutil.which("mpiexec"), reason="needs the gpurnn[mpi] extra "
                               "(mpi4py and mpich: mpiexec)")
SMALL = ["--text", os.path.join(HERE, "corpus.txt"), "--hidden", "16", "--layers", "2", "--seq-len", "12",
         "--batch", "4", "--val-every", "5", "--no-progress", "--backend", "numpy"]
TOL = 1e-5  # float32: the ranks' mean of two shard gradients rounds unlike one mean over the batch


def env():
    """One BLAS thread per rank (2 ranks on 2 cores), and no launcher variables of ours."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MPI_"))}
    return dict(e, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def gpurnn_train(out, *args, ranks=1, timeout=300, small=SMALL, **popen):
    cmd = [sys.executable, "-m", "gpurnn", "train", "--out", str(out), *small, *args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def metrics(out):
    rows = [r.split(",") for r in open(os.path.join(out, "metrics.csv")).read().splitlines()[1:]]
    return np.array([float(r[1]) for r in rows]), [r[0] for r in rows]


def params(out):
    return train.load_checkpoint(str(out))[1]


def test_a_world_of_one_costs_nothing(monkeypatch):
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # never imported without a launcher
    world = distributed.init(get_backend("numpy"))
    assert (world.rank, world.size, world.local_rank, world.is_root) == (0, 1, 0, True)
    grads = np.arange(3.0)
    assert list(world.allreduce_mean(grads, [2.5, 0.0])) == [2.5, 0.0] and list(grads) == [0, 1, 2]
    assert world.broadcast(grads) is grads and world.gather(7) == [7] and world.scatter([8]) == 8
    world.barrier()
    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds, got 0"):
        distributed.init(get_backend("numpy"), timeout=0)


def test_mpiexec_without_mpi4py_is_one_clear_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert cli.main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err == ("gpurnn: error: rank 1: started by an MPI launcher with 2 ranks, but mpi4py does not import: "
                   "pip install 'gpurnn[mpi]'\n")
    assert not (tmp_path / "run").exists()


def test_a_cupy_without_nccl_is_refused_by_name(monkeypatch):
    """CuPy imports cupy.cuda.nccl even where it cannot load libnccl, with none of NCCL's
    names in it: GPU ranks setting up their communicator say what to install instead
    of failing on a missing attribute."""
    cupy_without_nccl(monkeypatch)

    class Comm:  # mpi4py's COMM_WORLD in a world of one
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 1

        def Split_type(self, kind):
            return self

        def allgather(self, value):
            return [value]

    MPI = types.SimpleNamespace(COMM_WORLD=Comm(), COMM_TYPE_SHARED=0)
    with pytest.raises(BackendUnavailable, match=r"^CuPy cannot load NCCL \(libnccl\), which ranks on GPUs all-reduce "
                                                 r"with: pip install nvidia-nccl-cu12"):
        distributed.MpiWorld(MPI, types.SimpleNamespace(name="cuda"), 60)


def test_an_error_aborts_the_job_only_where_mpi_was_started(monkeypatch):
    """mpi4py.MPI imported with mpi4py.rc.initialize False has not started MPI: an error on
    a rank must not call MPI_Abort then (that crashed the process, seen in a test worker)."""
    monkeypatch.setenv("PMI_SIZE", "2")
    aborted = []
    comm = types.SimpleNamespace(Abort=aborted.append)
    for started, finalized, aborts in ((False, False, []), (True, True, []), (True, False, [3])):
        MPI = types.SimpleNamespace(COMM_WORLD=comm, Is_initialized=lambda: started, Is_finalized=lambda: finalized)
        monkeypatch.setitem(sys.modules, "mpi4py.MPI", MPI)
        monkeypatch.setattr(distributed, "ABORT_GRACE_SECONDS", 0.0)
        distributed.abort_if_launched(3)
        assert aborted == aborts
        aborted.clear()


def test_mpi4py_without_an_mpi_library_is_one_clear_line(monkeypatch, capsys, tmp_path):
    """mpi4py raises RuntimeError, not ImportError, where it finds no libmpi to load (a
    line per library it tried): one line names it, as a missing mpi4py does."""
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    mpi4py_without_an_mpi_library(monkeypatch, tmp_path / "site")
    assert cli.main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 2
    assert capsys.readouterr().err == (
        "gpurnn: error: rank 1: started by an MPI launcher with 2 ranks, but mpi4py cannot load an MPI library "
        "(libmpi.so.12: cannot open shared object file; libmpi.so.40: cannot open shared object file): "
        "pip install 'gpurnn[mpi]' (MPICH), or an mpi4py for the MPI whose mpiexec started it\n")
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_a_world_of_two():
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(HERE, "mpi_world_probe.py")],
                          env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 ok" in done.stdout and "rank 1 ok" in done.stdout  # (their lines may interleave)


@needs_mpi
def test_two_ranks_train_as_one_process_and_resume_on_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = gpurnn_train(one, "--steps", "20", "--save-every", "4")
    assert single.returncode == 0, single.stderr
    done = gpurnn_train(two, "--steps", "12", "--save-every", "4", ranks=2)
    assert done.returncode == 0, done.stderr
    # rank 0 alone reports and writes
    assert done.stdout.count("--- sample ---") == 1 and done.stdout.count("step 12: loss") == 1
    assert done.stderr.count("gpurnn train:") == 1 and "2 ranks of a global batch of 4" in done.stderr
    assert sorted(os.listdir(two)) == ["best.npz", "checkpoint.npz", "loss.png", "metrics.csv"]
    losses_two, steps = metrics(two)
    assert steps == [str(s) for s in range(1, 13)]
    losses_one, _ = metrics(one)
    np.testing.assert_allclose(losses_two, losses_one[:12], rtol=TOL)
    # the 2-rank run, resumed by one process, follows the one-process curve to its end
    resumed = gpurnn_train(two, "--steps", "20", "--save-every", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 12 of 20" in resumed.stderr
    losses_resumed, _ = metrics(two)
    np.testing.assert_allclose(losses_resumed, losses_one, rtol=TOL)
    for name, p in params(one).items():
        if name.startswith("param/"):
            np.testing.assert_allclose(params(two)[name], p, rtol=1e-4, atol=1e-6, err_msg=name)
    # and a 1-process checkpoint goes on with 2 ranks
    again = gpurnn_train(one, "--steps", "24", "--save-every", "4", "--resume", ranks=2)
    assert again.returncode == 0, again.stderr
    assert len(metrics(one)[0]) == 24


@pytest.mark.gpu
@needs_mpi
def test_two_gpus_train_as_one_process(tmp_path):
    """Issue 13 on GPUs: two ranks, each on its own GPU, all-reduce through NCCL and follow
    one process's loss curve on the same global batch. Needs a machine with two GPUs
    (NCCL cannot put two ranks on one; the lent H200 machines have one)."""
    from helpers import backend_or_skip

    gpu = backend_or_skip("cuda", "no CUDA backend")
    if gpu.xp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs: NCCL cannot put two ranks on one")
    assert SMALL[-2:] == ["--backend", "numpy"]
    on_gpus = [*SMALL[:-1], "cuda"]
    one = gpurnn_train(tmp_path / "one", "--steps", "12", small=on_gpus)
    two = gpurnn_train(tmp_path / "two", "--steps", "12", ranks=2, small=on_gpus)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert "2 ranks of a global batch of 4" in two.stderr
    # float32, and each side's GEMMs sum in their own order (cuBLAS picks kernels per shape)
    np.testing.assert_allclose(metrics(tmp_path / "two")[0], metrics(tmp_path / "one")[0], rtol=1e-4)


@needs_mpi
def test_two_ranks_with_dropout_resume_their_masks(tmp_path):
    """Each rank draws its own dropout masks, and the checkpoint keeps every rank's
    random state: a 2-rank run stopped and resumed gives the uninterrupted run's losses.
    On one rank it goes on with masks of its own (another world draws other masks)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    dropout = ["--dropout", "0.3", "--save-every", "3"]
    assert gpurnn_train(whole, "--steps", "8", *dropout, ranks=2).returncode == 0
    first = gpurnn_train(split, "--steps", "3", *dropout, ranks=2)
    assert first.returncode == 0, first.stderr
    resumed = gpurnn_train(split, "--steps", "8", "--resume", *dropout, ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert list(metrics(split)[0]) == list(metrics(whole)[0]) and len(metrics(whole)[0]) == 8
    on_one = gpurnn_train(split, "--steps", "10", "--resume", *dropout)
    assert on_one.returncode == 0, on_one.stderr
    assert np.all(np.isfinite(metrics(split)[0])) and len(metrics(split)[0]) == 10


@needs_mpi
def test_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "gpurnn", "train", "--out", str(tmp_path / "o"),
                           *SMALL, "--batch", "3", "--steps", "2"], env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert re.search(r"gpurnn: error: rank [01]: --batch 3: the global batch must split evenly over 2 ranks",
                     done.stderr), done.stderr  # the first rank to fail ends both


def rank_pids(out_dir, rank):
    """The pids of the training processes of ``rank`` writing to out_dir."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(out_dir).encode() in cmdline and b"gpurnn" in cmdline and f"PMI_RANK={rank}".encode() in environ:
            pids.append(int(pid))
    return pids


@needs_mpi
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_ends_every_rank_and_keeps_the_checkpoint(tmp_path, fault):
    out = tmp_path / "run"
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "gpurnn", "train", "--out", str(out), *SMALL,
                             "--steps", "100000", "--save-every", "3", "--collective-timeout", "5"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.npz").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    victims = rank_pids(out, 1)
    assert victims, "rank 1 not found"
    os.kill(victims[0], signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    lost = time.time()
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        for pid in rank_pids(out, 1) + rank_pids(out, 0):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - lost < 5 + distributed.PING_SECONDS + 15  # the timeout, the pings, the cleanup
    if fault == "hung":
        assert "gpurnn: error: rank 0: the " in stderr and " did not finish within 5 s: rank(s) 1 do not answer " \
               "(died or hung); ending every rank" in stderr, stderr  # the all-reduce, or a save's barrier
    record, arrays = train.load_checkpoint(str(out))  # whole, at a step a multiple of 3
    assert record["step"] % 3 == 0 and "param/rnn.weight_hh_l0" in arrays


@needs_mpi
def test_one_all_reduce_per_step(tmp_path):
    """The flat gradient buffer (with the loss) in one collective, never one per parameter."""
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench_distributed

    assert bench_distributed.collectives_per_step(str(tmp_path), steps=3) == 1


@pytest.mark.gpu
def test_nccl_path_in_a_world_of_one():
    """NCCL cannot put two ranks on one GPU: a world of one through the NCCL path, whose
    mean of one rank's gradients must be those gradients, and whose loss rides over MPI."""
    from helpers import backend_or_skip

    gpu = backend_or_skip("cuda", "no CUDA backend")
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:  # no mpi4py, or no MPI library for it (the H200 image's)
        pytest.skip(f"needs mpi4py with an MPI library: {exc}")
    try:
        load_nccl()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    import cupy

    import gpurnn
    from gpurnn import flat

    world = distributed.MpiWorld(MPI, gpu, 60)
    assert world.size == 1 and world._nccl is not None
    rng = np.random.default_rng(0)
    lm = gpurnn.CharLM(20, 16, num_layers=2, seed=0, backend="cuda")
    lm.forward(rng.integers(0, 20, (12, 4)), rng.integers(0, 20, (12, 4)))
    lm.backward()
    grads = flat.buffer_of(lm.grads)
    before = grads.copy()
    extra = world.allreduce_mean(grads, [2.5, 1.0])
    assert cupy.array_equal(grads, before) and list(extra) == [2.5, 1.0]
    params = flat.buffer_of(lm.params)
    kept = params.copy()
    world.broadcast(params)
    assert cupy.array_equal(params, kept)


@needs_mpi
def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The stop flag rides in the step's all-reduce: all ranks finish that step, rank 0 saves, exit 0."""
    out = tmp_path / "run"
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "gpurnn", "train", "--out", str(out), *SMALL,
                             "--steps", "100000", "--save-every", "1000000"],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not rank_pids(out, 1) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(3)  # some steps in
    os.kill(rank_pids(out, 1)[0], signal.SIGINT)  # only rank 1 is asked to stop
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stderr.count("interrupted: saved step") == 1
    step = int(stderr.split("interrupted: saved step ")[1].split()[0])
    assert train.load_checkpoint(str(out))[0]["step"] == step and len(metrics(out)[0]) == step


@needs_mpi
def test_nccl_cost_benchmark_runs_both_worlds(tmp_path):
    """bench_distributed --nccl, which the GPU check runs: here on NumPy, where the
    world of one started through MpiWorld all-reduces over MPI instead of NCCL."""
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench_distributed

    result = bench_distributed.nccl_cost(3, 1, str(tmp_path), backend="numpy",
                                         sizes=dict(hidden=8, layers=1, seq_len=4, batch=2))
    assert len(result["step_ms"]["local"]) == len(result["step_ms"]["nccl"]) == 1
    assert result["local_ms"] > 0 and result["nccl_ms"] > 0


def test_nccl_cost_benchmark_says_why_a_run_failed(tmp_path, monkeypatch):
    """A run of bench_distributed --nccl that fails shows its own error, and where mpi4py
    finds no MPI library (as on the GPU machine) how to carry one there."""
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    import bench_distributed

    mpi4py_without_an_mpi_library(monkeypatch, tmp_path / "site")
    with_fake = bench_distributed.env()
    monkeypatch.setattr(bench_distributed, "env", lambda: dict(with_fake, PYTHONPATH=f"{tmp_path / 'site'}:{ROOT}"))
    with pytest.raises(RuntimeError) as caught:
        bench_distributed.nccl_cost(3, 1, str(tmp_path), backend="numpy",
                                    sizes=dict(hidden=8, layers=1, seq_len=4, batch=2))
    message = str(caught.value)
    assert message.startswith("the local run exited 1: ") and "libmpi.so.12: cannot open shared object" in message
    assert message.endswith(bench_distributed.MPI_HINT) and "--prefix /tmp/mpi .whl/mpich-*.whl" in message
