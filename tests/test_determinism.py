"""Same seed, same inputs, same backend: the same bits, run to run and process to process.

NumPy (with the same BLAS and thread count) and the simulator are bitwise
deterministic. On the CUDA backend, with ``gpurnn.use_deterministic_algorithms(True)``
results are bitwise the same in every run and process, eager and graph replay
alike; without it, within float32 rounding (``test_gpu_processes_agree``): each
process times its GEMM layouts afresh, and an unfolded embedding's gradient adds
repeated rows with atomics, in any order.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import backend_or_skip, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def probe(tmp_path, name, backend, small=False, **env):
    """The probe's results from a fresh process on ``backend``: {name: array}."""
    path = tmp_path / f"{name}.npz"
    env = dict(os.environ, PYTHONPATH=ROOT, GPURNN_BACKEND=backend, **env)
    done = subprocess.run([sys.executable, os.path.join(HERE, "determinism_probe.py"), str(path)]
                          + (["--small"] if small else []), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same_bits(a, b):
    assert list(a) == list(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
    assert not differ, differ


def test_numpy_backend_is_bitwise_deterministic_across_processes(tmp_path):
    first, second = probe(tmp_path, "a", "numpy"), probe(tmp_path, "b", "numpy")
    assert len(first) > 50
    assert_same_bits(first, second)


def test_simulator_is_bitwise_deterministic_across_processes(tmp_path):
    backend_or_skip("cudasim", "cudasim unavailable in this process")
    assert_same_bits(probe(tmp_path, "a", "cudasim", small=True), probe(tmp_path, "b", "cudasim", small=True))


def test_in_process_repeats_are_bitwise_identical():
    """On every backend; on CUDA with deterministic algorithms, as the unfolded
    embedding's gradient otherwise adds repeated rows atomically, in any order."""
    sys.path.insert(0, HERE)
    import determinism_probe

    import gpurnn

    gpurnn.use_deterministic_algorithms(True)
    try:
        assert_same_bits(determinism_probe.results(small=True), determinism_probe.results(small=True))
    finally:
        gpurnn.use_deterministic_algorithms(False)


def run_train(out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = ["--text", os.path.join(ROOT, "README.md"), "--hidden", "16", "--layers", "2", "--seq-len", "12",
            "--batch", "4", "--steps", "6", "--val-every", "3", "--no-progress", "--backend", "numpy", *extra]
    done = subprocess.run([sys.executable, "-m", "gpurnn", "train", "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def checkpoint(path):
    """The checkpoint's arrays, and its record without the measured tokens/s (a timing)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    record = json.loads(arrays.pop("record").tobytes().decode())
    for row in record["history"]:
        row[3] = None
    return arrays, record


def test_training_runs_are_bitwise_identical(tmp_path):
    """Losses, metrics (but tokens/s), checkpoints and the best checkpoint of two runs."""
    run_train(tmp_path / "a")
    run_train(tmp_path / "b")
    for name in ("checkpoint.npz", "best.npz"):
        (arrays_a, record_a), (arrays_b, record_b) = checkpoint(tmp_path / "a" / name), checkpoint(tmp_path / "b" / name)
        assert_same_bits(arrays_a, arrays_b)
        assert record_a == record_b
    rows = [[r.split(",") for r in open(tmp_path / d / "metrics.csv").read().splitlines()] for d in "ab"]
    assert [r[:3] + r[4:] for r in rows[0]] == [r[:3] + r[4:] for r in rows[1]]


@pytest.mark.gpu
def test_gpu_processes_are_bitwise_identical_with_deterministic_algorithms(tmp_path):
    backend_or_skip("cuda", "no CUDA backend")
    first = probe(tmp_path, "a", "cuda", GPURNN_DETERMINISTIC="1")
    assert_same_bits(first, probe(tmp_path, "b", "cuda", GPURNN_DETERMINISTIC="1"))


@pytest.mark.gpu
def test_gpu_processes_agree(tmp_path):
    """Without deterministic algorithms: each result equal, or within float32 rounding of the other run's."""
    backend_or_skip("cuda", "no CUDA backend")
    first, second = probe(tmp_path, "a", "cuda"), probe(tmp_path, "b", "cuda")
    worst = {k: rel_err(first[k], second[k]) for k in first}
    assert max(worst.values()) < 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.gpu
def test_gpu_deterministic_scatter_add_matches_atomics(tmp_path):
    """The one-hot GEMM sum of repeated rows equals cupyx.scatter_add's up to rounding."""
    gpu = backend_or_skip("cuda", "no CUDA backend")
    import cupy

    import gpurnn

    rng = np.random.default_rng(3)
    indices = cupy.asarray(rng.integers(0, 7, 5000))
    values = cupy.asarray(rng.standard_normal((5000, 9)).astype(np.float32))
    results = []
    for deterministic in (False, True, True):
        gpurnn.use_deterministic_algorithms(deterministic)
        try:
            target = cupy.zeros((7, 9), np.float32)
            gpu.ops.scatter_add(target, indices, values)
            results.append(cupy.asnumpy(target))
        finally:
            gpurnn.use_deterministic_algorithms(False)
    expect = np.zeros((7, 9))
    np.add.at(expect, cupy.asnumpy(indices), cupy.asnumpy(values).astype(np.float64))
    assert rel_err(results[0], expect) < 1e-5 and rel_err(results[1], expect) < 1e-5
    assert results[1].tobytes() == results[2].tobytes()
