"""``gpurnn profile`` and the NVTX ranges: per-phase times, FLOP counts, labels."""

import os
import subprocess
import sys

import numpy as np
import pytest

from gpurnn import profile
from helpers import backend_or_skip, forced_algorithm, make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_phase_flops_count_every_gemm():
    # one LSTM layer, I=3, H=2, T=5, B=7: G*H = 8
    f = profile.phase_flops("lstm", 3, 2, 1, 1, 5, 7, backward=False)
    assert f == {"input": 2 * 35 * 3 * 8, "steps": 2 * 35 * 2 * 8, "weights": 0}
    f = profile.phase_flops("gru", 3, 2, 2, 2, 5, 7, backward=True)
    # layer 0 reads I=3, layer 1 reads D*H=4; two directions each
    assert f["input"] == 2 * 2 * 35 * 6 * (3 + 4)
    assert f["steps"] == 2 * 2 * 2 * 35 * 2 * 6 * 2
    assert f["weights"] == 2 * 2 * 35 * 6 * ((2 * 3 + 2 + 2) + (2 * 4 + 2 + 2))
    # an LSTM of H=4 projected to P=2, two layers of two directions: G*H = 16, and layer 1
    # reads D*P = 4; each step also projects (H -> P), and backward adds dW_hr's GEMM
    f = profile.phase_flops("lstm", 3, 4, 2, 2, 5, 7, backward=True, P=2)
    assert f["input"] == 2 * 2 * 35 * 16 * (3 + 4)
    assert f["steps"] == 2 * 2 * 2 * 35 * (2 * 16 + 4 * 2) * 2
    assert f["weights"] == 2 * 2 * 35 * ((16 * (2 * 3 + 2 + 2) + 2 * 4) + (16 * (2 * 4 + 2 + 2) + 2 * 4))


def test_profile_layer_times_every_phase():
    result = profile.profile_layer("gru", 16, layers=2, seq_len=6, batch=3, repeats=2, backend="numpy")
    assert result["algorithms"] == {"forward": "graph", "backward": "graph"}
    assert set(result["phases"]) == {"input", "steps", "weights"}
    for phase in result["phases"].values():
        assert phase["seconds"] > 0 and phase["flops"] > 0 and 0 < phase["ceiling_share"]
    assert result["total_s"] > 0 and result["ceiling_flops"] > 0
    inference = profile.profile_layer("lstm", 8, seq_len=4, batch=2, repeats=1, backward=False, backend="numpy")
    assert set(inference["phases"]) == {"input", "steps"} and inference["algorithms"] == {"inference": "graph"}


def test_profile_reports_the_fused_and_persistent_launch_shapes(monkeypatch):
    """What a fused or persistent recurrence launched, as gpurnn profile prints it: blocks of
    units of a batch tile, threads and shared memory a block (the simulator's persistent
    kernels fit one block; its fused steps, given SMs enough, cut the batch in tiles)."""
    sim = backend_or_skip("cudasim", "cudasim unavailable in this process")
    monkeypatch.setattr(sim.ops, "sm_count", 64)
    with forced_algorithm("fused"):
        result = profile.profile_layer("rnn", 5, seq_len=3, batch=3, repeats=1, dtype="float64", backend="cudasim")
    forward = result["grids"]["forward"]
    assert forward["algorithm"] == "fused" and set(result["grids"]) == {"forward", "backward"}
    assert (forward["tiles"], forward["tile"], forward["units"], forward["groups"]) == (2, 2, 1, 5)
    assert forward["blocks"] == 10 and forward["threads"] == 2 and forward["shared"] > 0  # simulator: a thread an element
    lines = profile.report(result, "rnn", "T=3 B=3")
    assert "forward fused launch: 10 blocks (5 of 1 units x 2 batch tiles of 2 rows), 2 threads and" in lines[-2]
    with forced_algorithm("persistent"):
        result = profile.profile_layer("gru", 4, seq_len=2, batch=2, repeats=1, dtype="float64", backend="cudasim")
    assert {p: (g["algorithm"], g["blocks"]) for p, g in result["grids"].items()} == {
        "forward": ("persistent", 1), "backward": ("persistent", 1)}
    numpy_run = profile.profile_layer("gru", 4, seq_len=2, batch=2, repeats=1, backend="numpy")
    assert numpy_run["grids"] == {} and not any("launch:" in ln for ln in profile.report(numpy_run, "gru", ""))


def test_profile_command_prints_the_breakdown():
    done = subprocess.run([sys.executable, "-m", "gpurnn", "profile", "--cell", "rnn", "--nonlinearity", "relu",
                           "--hidden", "16", "--seq-len", "5", "--batch", "2", "--repeats", "1",
                           "--backend", "numpy"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("rnn T=5 B=2 I=16 H=16 L=1 float32 fwd+bwd on numpy (fp32)")
    assert "algorithm: forward graph, backward graph" in lines[0]
    assert [ln.split()[0] for ln in lines[3:6]] == ["input", "steps", "weights"]
    assert all(ln.rstrip().endswith("%") for ln in lines[3:6])


def test_profile_command_takes_an_lstm_projection():
    done = subprocess.run([sys.executable, "-m", "gpurnn", "profile", "--hidden", "16", "--proj-size", "6",
                           "--layers", "2", "--bidirectional", "--seq-len", "5", "--batch", "2", "--repeats", "1",
                           "--backend", "numpy"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("lstm T=5 B=2 I=16 H=16 P=6 L=2 bidirectional float32 fwd+bwd on numpy")
    for cell, size, words in [("gru", "6", "only the lstm cell has a projection, not gru"),
                              ("lstm", "16", "expected a size below --hidden (16)")]:
        refused = subprocess.run([sys.executable, "-m", "gpurnn", "profile", "--cell", cell, "--hidden", "16",
                                  "--proj-size", size, "--backend", "numpy"], capture_output=True, text=True, cwd=ROOT)
        assert refused.returncode == 2 and f"--proj-size {size}: {words}" in refused.stderr


def test_profile_command_refuses_a_forced_algorithm_numpy_cannot_run():
    done = subprocess.run([sys.executable, "-m", "gpurnn", "profile", "--algorithm", "fused", "--hidden", "4",
                           "--backend", "numpy"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "numpy backend runs only 'graph'" in done.stderr


def test_profile_command_refuses_a_nonlinearity_for_a_cell_without_one():
    done = subprocess.run([sys.executable, "-m", "gpurnn", "profile", "--cell", "lstm", "--nonlinearity", "relu",
                           "--backend", "numpy"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "--nonlinearity relu: only the rnn cell has one, not lstm" in done.stderr


class _Nvtx:
    def __init__(self):
        self.events = []

    def RangePush(self, label):  # noqa: N802 (CuPy's name)
        self.events.append(("push", label))

    def RangePop(self):  # noqa: N802
        self.events.append(("pop", None))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_nvtx_ranges_name_layers_directions_and_phases(monkeypatch, bidirectional):
    sim = backend_or_skip("cudasim", "cudasim unavailable in this process")
    nvtx = _Nvtx()
    monkeypatch.setattr(sim.ops, "_nvtx", nvtx)
    model = make("lstm", 3, 4, num_layers=2, bidirectional=bidirectional, backend="cudasim", dtype="float64")
    out, _ = model(np.zeros((3, 2, 3)))
    model.backward(np.ones_like(out))
    depth = 0
    for kind, _ in nvtx.events:  # balanced and never nested: each range closes before the next opens
        depth += 1 if kind == "push" else -1
        assert depth in (0, 1)
    assert depth == 0
    labels = [label for kind, label in nvtx.events if kind == "push"]
    # the simulator cuts time into spans as the GPU does (here one step each)
    assert "lstm l0 fwd input [0:1)" in labels and "lstm l1 fwd steps [2:3) graph" in labels
    assert any(label.startswith("lstm l1 fwd backward steps [") for label in labels)
    assert "lstm l0 fwd backward weights" in labels
    assert ("lstm l1 rev steps [0:1) graph" in labels) == bidirectional
