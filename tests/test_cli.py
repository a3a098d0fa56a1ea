"""The gpurnn command through subprocess: train, resume, sample, info, and bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gpurnn import cli
from helpers import cupy_without_nccl, mpi4py_without_an_mpi_library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--hidden", "16", "--seq-len", "12", "--batch", "4", "--no-progress", "--backend", "numpy"]


def gpurnn(*args, timeout=120, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "gpurnn", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=kw.get("cwd", ROOT))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("def f(x):\n    return x + 1\n\n" * 40, encoding="utf-8")
    return str(path)


def losses(run_dir):
    rows = open(os.path.join(run_dir, "metrics.csv")).read().splitlines()[1:]
    return [(int(r.split(",")[0]), r.split(",")[1]) for r in rows]


def test_train_writes_metrics_plot_checkpoint_and_sample(tmp_path, text):
    out = tmp_path / "run"
    done = gpurnn("train", "--text", text, "--steps", "15", "--out", str(out), *SMALL)
    assert done.returncode == 0, done.stderr
    assert {"metrics.csv", "loss.png", "checkpoint.npz"} <= set(os.listdir(out))
    assert len(losses(out)) == 15
    assert "--- sample ---" in done.stdout and "best.npz" in done.stdout
    assert open(out / "loss.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    sample = gpurnn("sample", "--checkpoint", str(out), "--prime", "def", "--length", "20", "--backend", "numpy")
    assert sample.returncode == 0 and sample.stdout.startswith("def") and len(sample.stdout.rstrip("\n")) >= 23


@pytest.mark.parametrize("dropout", ["0", "0.3"])  # with dropout, its RNG must be resumed too
def test_resume_gives_the_same_losses_as_one_run(tmp_path, text, dropout):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--text", text, "--layers", "2", "--dropout", dropout, "--save-every", "4", *SMALL]
    assert gpurnn("train", "--steps", "12", "--out", str(whole), *common).returncode == 0
    assert gpurnn("train", "--steps", "6", "--out", str(split), *common).returncode == 0
    resumed = gpurnn("train", "--steps", "12", "--out", str(split), "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(whole) == losses(split) and len(losses(whole)) == 12


def test_resume_with_another_model_shape_is_refused(tmp_path, text):
    out = tmp_path / "run"
    assert gpurnn("train", "--text", text, "--steps", "2", "--out", str(out), *SMALL).returncode == 0
    before = open(out / "checkpoint.npz", "rb").read()
    other = ["--hidden", "32", "--seq-len", "12", "--batch", "4", "--no-progress", "--backend", "numpy"]
    done = gpurnn("train", "--text", text, "--steps", "4", "--out", str(out), "--resume", *other)
    assert done.returncode == 2 and done.stderr.count("\n") == 1  # the error line alone: no model was announced
    assert "--hidden 32 (checkpoint: 16)" in done.stderr and "Traceback" not in done.stderr
    assert open(out / "checkpoint.npz", "rb").read() == before
    # without size flags, the run goes on with the checkpoint's model and announces that one,
    # not the defaults (a 1-layer lstm of 256 units on the CPU)
    resumed = gpurnn("train", "--text", text, "--steps", "3", "--out", str(out), "--resume", "--no-progress",
                     "--backend", "numpy")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.startswith("gpurnn train: charlm with a 1-layer lstm of 16 units on numpy")


def test_dropout_between_layers(tmp_path, text):
    """--dropout changes training (masks between the layers) and is kept in the checkpoint:
    a resume with another value is refused; a checkpoint made with it samples."""
    runs = {}
    for dropout in ("0", "0.5"):
        out = tmp_path / f"d{dropout}"
        done = gpurnn("train", "--text", text, "--layers", "2", "--dropout", dropout, "--steps", "6",
                      "--val-every", "3", "--out", str(out), *SMALL)
        assert done.returncode == 0, done.stderr
        assert ("2-layer lstm of 16 units (dropout 0.5 between layers) on numpy" in done.stderr) == (dropout == "0.5")
        runs[dropout] = out
    plain, dropped = losses(runs["0"]), losses(runs["0.5"])
    assert plain[0] != dropped[0] and all(np.isfinite(float(loss)) for _, loss in dropped)
    refused = gpurnn("train", "--text", text, "--layers", "2", "--dropout", "0.2", "--steps", "8",
                     "--out", str(runs["0.5"]), "--resume", *SMALL)
    one_line_error(refused, "--dropout 0.2 (checkpoint: 0.5)")
    sample = gpurnn("sample", "--checkpoint", str(runs["0.5"]), "--prime", "def", "--length", "20", "--backend", "numpy")
    assert sample.returncode == 0 and sample.stdout.startswith("def"), sample.stderr
    adding = gpurnn("train", "--task", "adding", "--layers", "2", "--dropout", "0.2", "--steps", "3",
                    "--out", str(tmp_path / "adding"), *SMALL)  # the SequenceRegressor's stack takes it too
    assert adding.returncode == 0 and len(losses(tmp_path / "adding")) == 3, adding.stderr
    one_line_error(gpurnn("train", "--text", text, "--layers", "1", "--dropout", "0.2", "--out",
                          str(tmp_path / "one"), *SMALL), "--dropout 0.2", "between stacked layers", "--layers 2")
    one_line_error(gpurnn("train", "--dropout", "1", "--out", str(tmp_path / "o"), *SMALL),
                   "--dropout", "[0, 1)", "1")
    assert not (tmp_path / "one").exists() and not (tmp_path / "o").exists()


def test_projected_lstm(tmp_path, text):
    """--proj-size projects each LSTM layer's state (torch's proj_size) and is kept in the
    checkpoint: a resume with another size is refused, one without flags goes on, and the
    checkpoint samples. A checkpoint from before the flag resumes as the unprojected model
    it holds."""
    out = tmp_path / "p8"
    done = gpurnn("train", "--text", text, "--layers", "2", "--proj-size", "8", "--steps", "4", "--out", str(out),
                  *SMALL)
    assert done.returncode == 0, done.stderr
    assert "2-layer lstm of 16 units projected to 8 on numpy" in done.stderr
    with np.load(out / "checkpoint.npz") as z:
        assert z["param/rnn.weight_hr_l1"].shape == (8, 16) and z["param/head.weight"].shape[1] == 8
    one_line_error(gpurnn("train", "--text", text, "--layers", "2", "--proj-size", "4", "--steps", "6",
                          "--out", str(out), "--resume", *SMALL), "--proj-size 4 (checkpoint: 8)")
    resumed = gpurnn("train", "--text", text, "--steps", "6", "--out", str(out), "--resume", "--no-progress",
                     "--backend", "numpy")
    assert resumed.returncode == 0 and len(losses(out)) == 6, resumed.stderr
    sample = gpurnn("sample", "--checkpoint", str(out), "--prime", "def", "--length", "20", "--backend", "numpy")
    assert sample.returncode == 0 and sample.stdout.startswith("def"), sample.stderr

    old = tmp_path / "old"  # its record rewritten as one from before --proj-size, --dropout and --precision
    assert gpurnn("train", "--text", text, "--steps", "2", "--out", str(old), *SMALL).returncode == 0
    arrays = dict(np.load(old / "checkpoint.npz"))
    record = json.loads(arrays["record"].tobytes())
    for later in ("proj_size", "dropout", "precision"):
        del record["config"][later]
    arrays["record"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
    np.savez(old / "checkpoint.npz", **arrays)
    one_line_error(gpurnn("train", "--text", text, "--proj-size", "4", "--steps", "4", "--out", str(old),
                          "--resume", *SMALL), "--proj-size 4 (checkpoint: 0)")
    resumed = gpurnn("train", "--text", text, "--proj-size", "0", "--steps", "3", "--out", str(old), "--resume",
                     *SMALL)
    assert resumed.returncode == 0 and len(losses(old)) == 3, resumed.stderr
    assert "1-layer lstm of 16 units on numpy" in resumed.stderr

    for flags, words in [(["--cell", "gru", "--proj-size", "4"], ["--proj-size 4", "only the lstm cell", "gru"]),
                         (["--proj-size", "16"], ["--proj-size 16", "below --hidden (16)"]),
                         (["--proj-size", "-1"], ["--proj-size", "non-negative", "-1"])]:
        one_line_error(gpurnn("train", "--text", text, *flags, "--out", str(tmp_path / "bad"), *SMALL), *words)
    assert not (tmp_path / "bad").exists()


def test_tasks_adding_and_copy_train(tmp_path):
    for task in ("adding", "copy"):
        done = gpurnn("train", "--task", task, "--steps", "5", "--out", str(tmp_path / task), *SMALL)
        assert done.returncode == 0, done.stderr
        assert len(losses(tmp_path / task)) == 5


def test_info_and_python_dash_m(tmp_path):
    done = gpurnn("info")
    assert done.returncode == 0 and "backend:" in done.stdout
    env = dict(os.environ, PYTHONPATH=ROOT)
    script = subprocess.run([sys.executable, "-c", "from gpurnn.cli import main; raise SystemExit(main(['info']))"],
                            capture_output=True, text=True, env=env)
    assert script.stdout == done.stdout


def one_line_error(done, *words):
    assert done.returncode != 0
    lines = [l for l in done.stderr.splitlines() if l.startswith("gpurnn: error:") or "error" in l]
    assert lines and "Traceback" not in done.stderr, done.stderr
    for w in words:
        assert w in done.stderr, (w, done.stderr)


def test_bad_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"abc\0def" * 10)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    out = str(tmp_path / "o")
    one_line_error(gpurnn("train", "--text", str(tmp_path / "missing.txt"), "--out", out, *SMALL), "no such file")
    one_line_error(gpurnn("train", "--text", str(empty), "--out", out, *SMALL), "empty")
    one_line_error(gpurnn("train", "--text", str(binary), "--out", out, *SMALL), "binary")
    one_line_error(gpurnn("train", "--text", str(latin), "--out", out, *SMALL), "UTF-8")
    one_line_error(gpurnn("train", "--text", str(short), "--out", out, *SMALL), "--seq-len")
    assert not os.path.exists(out)  # nothing was written for a run that could not start


@pytest.mark.parametrize("args, words", [
    (["--hidden", "0"], ["--hidden", "positive"]), (["--steps", "-3"], ["--steps"]),
    (["--lr", "nan"], ["--lr"]), (["--batch", "two"], ["--batch", "'two'"]),
    (["--seed", "-1"], ["--seed", "non-negative", "-1"]),
    (["--task", "adding", "--seq-len", "1"], ["--seq-len", "adding", "at least 2", "1"]),
    (["--nonlinearity", "relu"], ["--nonlinearity relu", "only the rnn cell", "lstm"]),
    (["--cell", "gru", "--nonlinearity", "elu"], ["--nonlinearity elu", "only the rnn cell", "gru"]),
])
def test_bad_sizes(tmp_path, args, words):
    done = gpurnn("train", "--out", str(tmp_path / "o"), "--no-progress", *args)
    one_line_error(done, *words)
    assert not (tmp_path / "o").exists()


def test_corrupt_truncated_and_wrong_checkpoints(tmp_path, text):
    good = tmp_path / "good"
    assert gpurnn("train", "--text", text, "--steps", "2", "--out", str(good), *SMALL).returncode == 0
    data = open(good / "checkpoint.npz", "rb").read()
    for name, content in (("truncated", data[: len(data) // 2]), ("corrupt", b"not a zip file" * 10)):
        d = tmp_path / name
        d.mkdir()
        (d / "checkpoint.npz").write_bytes(content)
        one_line_error(gpurnn("sample", "--checkpoint", str(d), "--backend", "numpy"), "corrupt or truncated")
        one_line_error(gpurnn("train", "--text", text, "--out", str(d), "--resume", *SMALL), "corrupt or truncated")
        assert (d / "checkpoint.npz").read_bytes() == content  # left as it was
    one_line_error(gpurnn("sample", "--checkpoint", str(tmp_path / "nowhere"), "--backend", "numpy"),
                   "no checkpoint")
    # a checkpoint whose arrays do not fit the model its record describes
    z = dict(np.load(good / "checkpoint.npz"))
    z["param/head.weight"] = np.zeros((3, 3), np.float32)
    bad = tmp_path / "mismatch"
    bad.mkdir()
    np.savez(bad / "checkpoint.npz", **z)
    one_line_error(gpurnn("sample", "--checkpoint", str(bad), "--backend", "numpy"), "does not fit")
    adding = tmp_path / "adding"
    assert gpurnn("train", "--task", "adding", "--steps", "1", "--out", str(adding), *SMALL).returncode == 0
    one_line_error(gpurnn("sample", "--checkpoint", str(adding), "--backend", "numpy"), "charlm")


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text):
    out = tmp_path / "run"
    done = gpurnn("train", "--text", text, "--steps", "30", "--save-every", "1", "--optim", "sgd", "--lr", "1e38",
                  "--clip-value", "1e30", "--out", str(out), *SMALL)
    assert done.returncode == 3, done.stderr
    assert "became" in done.stderr and "--clip-norm" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 2  # the banner, then the one-line error
    kept = losses(out)
    assert kept and all(np.isfinite(float(loss)) for _, loss in kept)


def test_ctrl_c_saves_and_exits_zero(tmp_path, text):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "gpurnn", "train", "--text", text, "--steps", "100000",
                             "--save-every", "1000000", "--out", str(out), *SMALL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not (out / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.5)
        if os.path.exists(out) and time.time() > deadline - 55:
            break
    time.sleep(2)  # some steps in
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "interrupted: saved step" in stderr
    assert (out / "checkpoint.npz").exists() and len(losses(out)) > 0


def test_a_corpus_without_the_code_characters_trains_samples_and_exits_zero(tmp_path):
    """No d, e, f or space in the text: the closing sample's prime comes from the text itself."""
    words = ["abc", "ghij", "klmn", "opq", "rstu", "vwxyz", "0123"]
    rng = np.random.default_rng(0)
    text = tmp_path / "nodef.txt"
    text.write_text("\n".join("".join(rng.choice(words, 4)) for _ in range(200)) + "\n", encoding="utf-8")
    assert not set("def ") & set(text.read_text())
    out = tmp_path / "run"
    done = gpurnn("train", "--text", str(text), "--steps", "6", "--out", str(out), *SMALL)
    assert done.returncode == 0, done.stderr
    sample = done.stdout.split("--- sample ---\n", 1)[1]
    lines = text.read_text().splitlines()
    assert any(line.startswith(sample[:4]) for line in lines) and len(sample.rstrip("\n")) >= 300
    again = gpurnn("sample", "--checkpoint", str(out), "--length", "10", "--backend", "numpy")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(sample[:4])  # the prime kept in the checkpoint
    best = gpurnn("sample", "--checkpoint", str(out), "--best", "--length", "10", "--backend", "numpy")
    assert best.returncode == 0, best.stderr


def held_out(run_dir):
    """{step: (val_loss, val_metric)} of the evaluated steps in metrics.csv, and the header."""
    rows = [r.split(",") for r in open(os.path.join(run_dir, "metrics.csv")).read().splitlines()]
    return {int(r[0]): (float(r[4]), float(r[5])) for r in rows[1:] if r[4]}, rows[0]


def test_held_out_loss_every_n_steps_at_the_end_and_the_best_checkpoint(tmp_path, text):
    out = tmp_path / "run"
    done = gpurnn("train", "--text", text, "--steps", "10", "--val-every", "4", "--val-fraction", "0.1",
                  "--out", str(out), *SMALL)
    assert done.returncode == 0, done.stderr
    evaluated, header = held_out(out)
    assert header == ["step", "loss", "grad_norm", "tokens_per_s", "val_loss", "val_bpc"]
    assert sorted(evaluated) == [4, 8, 10]
    for loss, bpc in evaluated.values():
        assert np.isfinite(loss) and abs(bpc - loss / np.log(2)) < 1e-9
    best_step = min(evaluated, key=lambda s: evaluated[s][0])
    import json
    with np.load(out / "best.npz") as z:
        record = json.loads(z["record"].tobytes().decode())
    assert record["step"] == best_step and abs(record["best_val"] - evaluated[best_step][0]) < 1e-12
    assert "held-out loss" in done.stdout
    off = tmp_path / "off"
    done = gpurnn("train", "--text", text, "--steps", "3", "--val-fraction", "0", "--out", str(off), *SMALL)
    assert done.returncode == 0 and held_out(off)[0] == {} and not (off / "best.npz").exists()


def test_held_out_loss_does_not_change_training(tmp_path, text):
    """Evaluation runs in eval mode on its own data: the training losses are those of a run without it
    (the same training text: the held-out part is cut off in both)."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--text", text, "--steps", "8", "--layers", "2", *SMALL]
    assert gpurnn("train", "--val-every", "2", "--out", str(a), *common).returncode == 0
    assert gpurnn("train", "--val-every", "100", "--out", str(b), *common).returncode == 0
    assert losses(a) == losses(b)


@pytest.mark.parametrize("task, metric", [("adding", "val_mse"), ("copy", "val_accuracy")])
def test_held_out_metrics_of_the_synthetic_tasks(tmp_path, task, metric):
    out = tmp_path / task
    done = gpurnn("train", "--task", task, "--steps", "4", "--val-every", "2", "--out", str(out), *SMALL)
    assert done.returncode == 0, done.stderr
    evaluated, header = held_out(out)
    assert header[-1] == metric and sorted(evaluated) == [2, 4]
    for loss, value in evaluated.values():
        if task == "adding":
            assert value == loss  # the loss is the MSE
        else:
            assert 0 <= value <= 1


def test_the_top_level_help_lists_every_command():
    done = gpurnn("--help")
    assert done.returncode == 0, done.stderr[-2000:]
    for command in ("train", "sample", "diagnose", "profile", "info"):
        assert f"    {command}" in done.stdout
    assert "% of the GEMM ceiling" in done.stdout


def test_every_flag_has_help_and_shows_its_default():
    for command in ("train", "sample", "diagnose", "profile", "info"):
        done = gpurnn(command, "--help")
        assert done.returncode == 0
        flags = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  --")]
        helped = done.stdout.split("options:", 1)[1]
        for flag in flags:
            entry = helped.split(f"  {flag}", 1)[1].split("\n  -", 1)[0]
            words = entry.split(None, 1)[1:] if entry.strip() else []
            assert words and len(" ".join(words).split()) >= 2, (command, flag, entry)
    train = gpurnn("train", "--help").stdout
    assert "default for charlm: 256 on CPU, 512 on a GPU" in " ".join(train.split())
    assert "(default: 0.05)" in train and "(default: adam)" in train


def test_info_says_whether_distributed_training_can_run(monkeypatch, capsys, tmp_path):
    """gpurnn info names mpi4py's MPI library, or why it has none, and whether CuPy loads NCCL."""
    assert cli.main(["info"]) == 0
    mpi = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mpi4py: ")]
    assert len(mpi) == 1 and re.fullmatch(r"mpi4py: (\d+\.\d+\.\d+ \(\S.*\)|not installed \(.*gpurnn\[mpi\].*\))",
                                          mpi[0]), mpi
    mpi4py_without_an_mpi_library(monkeypatch, tmp_path / "site")
    cupy_without_nccl(monkeypatch)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert ("mpi4py: 4.1.2, but it cannot load an MPI library (libmpi.so.12: cannot open shared object file; "
            "libmpi.so.40: cannot open shared object file): pip install 'gpurnn[mpi]'\n") in out
    assert ("NCCL: CuPy cannot load NCCL (libnccl), which ranks on GPUs all-reduce with: pip install "
            "nvidia-nccl-cu12 (nvidia-nccl-cu13 for a CUDA 13 CuPy)\n") in out
