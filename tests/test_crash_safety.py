"""A training run killed at any moment resumes from its last completed save and
computes the losses an uninterrupted run computes; a save that fails (a full
disk) says so and leaves the previous checkpoint whole."""

import errno
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from gpurnn import cli, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
CORPUS_CHARS = 13_000  # the runs' length must not follow README's: the kills are timed against it
ARGS = ["--hidden", "16", "--layers", "2", "--seq-len", "12",
        "--batch", "4", "--steps", str(STEPS), "--save-every", "1", "--no-progress", "--backend", "numpy",
        "--val-every", "5", "--val-fraction", "0.005"]  # a short held-out walk: the kills spread over the run
TRIALS = 12  # kills drawn over the window: ~9 distinct saved steps expected, more than 5 asserted


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first CORPUS_CHARS characters of README.md (repeated if it is shorter), as --text."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text((text * (CORPUS_CHARS // len(text) + 1))[:CORPUS_CHARS], encoding="utf-8")
    return ["--text", str(path)]


def command(out, corpus, *extra):
    return [sys.executable, "-m", "gpurnn", "train", "--out", str(out), *corpus, *ARGS, *extra]


def losses(out):
    """(step, loss, held-out loss) of every row of metrics.csv, as written."""
    rows = [r.split(",") for r in open(os.path.join(out, "metrics.csv")).read().splitlines()[1:]]
    return [(r[0], r[1], r[4]) for r in rows]


def test_sigkill_at_random_moments_then_resume(tmp_path, corpus):
    env = dict(os.environ, PYTHONPATH=ROOT)
    windows, references = [], []
    for k in range(2):  # a fresh checkout's first run is slower (first imports): the kills follow the faster
        reference = tmp_path / f"reference{k}"
        proc = subprocess.Popen(command(reference, corpus), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        while not (reference / "checkpoint.npz").exists() and proc.poll() is None:
            time.sleep(0.005)
        first_save = time.time()
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        # from the first save to the last: the kills must land among the steps, not in the
        # final evaluation and plot after them (longer than all 24 steps once the steps ran fused)
        windows.append(os.stat(reference / "checkpoint.npz").st_mtime - first_save)
        references.append(losses(reference))
    window = min(windows)
    expect = references[0]
    assert len(expect) == STEPS and references[1] == expect

    rng = random.Random(20261127)
    saved_steps = []
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(command(out, corpus), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (out / "checkpoint.npz").exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, window))
        proc.kill()  # SIGKILL: no handler runs, whatever was being written stays as it was
        proc.wait(timeout=60)
        record, _ = train.load_checkpoint(str(out))  # loads, whatever the moment
        saved_steps.append(record["step"])
        resumed = subprocess.run(command(out, corpus, "--resume"), env=env, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, (trial, resumed.stderr)
        if record["step"] < STEPS:
            assert f"resuming from step {record['step']} of {STEPS}" in resumed.stderr, (trial, resumed.stderr)
        assert losses(out) == expect, trial
    assert len(set(saved_steps)) > 5, saved_steps  # the kills landed all over the run


def test_a_full_disk_during_a_save_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys,
                                                                                    corpus):
    out = tmp_path / "run"
    real_savez, calls = np.savez, []

    def savez_on_a_full_disk(file, **arrays):
        calls.append(1)
        if len(calls) < 3:
            return real_savez(file, **arrays)
        file.write(b"PK\x03\x04 half a checkpoint")  # part of it reaches the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train.np, "savez", savez_on_a_full_disk)
    code = cli.main(["train", "--out", str(out), *corpus, *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "checkpoint.npz: could not be written (No space left on device); the previous one is intact" in err
    record, arrays = train.load_checkpoint(str(out))
    assert record["step"] == 2 and "param/rnn.weight_hh_l0" in arrays
    assert not (out / "checkpoint.npz.tmp").exists()
    assert [row[0] for row in losses(out)] == ["1", "2"]
    monkeypatch.setattr(train.np, "savez", real_savez)
    assert cli.main(["train", "--out", str(out), "--resume", *corpus, *ARGS]) == 0  # space again: the run goes on
    assert len(losses(out)) == STEPS


@pytest.mark.parametrize("what", ["metrics.csv", "best.npz"])
def test_other_files_fail_as_cleanly(tmp_path, monkeypatch, capsys, what, corpus):
    out = tmp_path / "run"
    real = train.replace_atomically

    def full_for(path, write):
        if path.endswith(what) and os.path.exists(path):
            return real(path, lambda f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        return real(path, write)

    monkeypatch.setattr(train, "replace_atomically", full_for)
    code = cli.main(["train", "--out", str(out), *corpus, *ARGS])
    assert code == 2 and f"{what}: could not be written (No space left on device)" in capsys.readouterr().err
    assert not (out / f"{what}.tmp").exists()
    train.load_checkpoint(str(out))


def test_a_kill_after_the_last_save_and_before_its_metrics_is_mended_on_resume(tmp_path, corpus, capsys):
    """The last step's checkpoint is written before its metrics.csv: a kill between the two
    leaves the file a row short; resuming a finished run rewrites it from the checkpoint."""
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *corpus, "--hidden", "16", "--seq-len", "12", "--batch", "4", "--steps", "3",
            "--no-progress", "--backend", "numpy"]
    assert cli.main(args) == 0
    whole = losses(out)
    lines = open(out / "metrics.csv").read().splitlines(keepends=True)
    (out / "metrics.csv").write_text("".join(lines[:-1]))  # as the kill left it
    assert cli.main(args + ["--resume"]) == 0
    assert "already at step 3 of 3" in capsys.readouterr().err
    assert losses(out) == whole and len(whole) == 3
