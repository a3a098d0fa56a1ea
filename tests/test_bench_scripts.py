"""The benchmark scripts the GPU check runs work end to end (on the CPU here):
a broken script would waste a session's few minutes of GPU time."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))


def test_bench_train_reports_both_sides_and_every_phase(tmp_path):
    pytest.importorskip("torch")
    import bench_train

    rows = bench_train.main(["--steps", "1", "--json", str(tmp_path / "train.json")])
    assert [r["size"] for r in rows] == ["train default", "A"]
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
    assert "suite, first_forward, ceilings, benchmarks, training, torch, lab" in " ".join(helped.stdout.split())


def test_bench_torch_compares_the_same_model_on_both_sides():
    pytest.importorskip("torch")
    import bench_torch

    rows = bench_torch.main(["--steps", "1", "--cells", "gru"])
    assert [(r["cell"], r["size"]) for r in rows] == [("gru", "train default")]
    assert rows[0]["ratio"] > 0 and abs(rows[0]["first_loss"]["torch"] - rows[0]["first_loss"]["gpurnn"]) < 1e-4
