"""A tiny LSTM learns the adding problem at T=20 (the trivial answer has MSE ~0.167)."""

import time

import numpy as np
import pytest

import gpurnn
from gpurnn.data import adding_problem
from helpers import host


def test_lstm_solves_the_adding_problem():
    start = time.perf_counter()
    model = gpurnn.SequenceRegressor(2, 16, cell="lstm", seed=0)
    opt = gpurnn.optim.Adam(model.params, model.grads, lr=1e-2)
    for step in range(800):
        x, y = adding_problem(32, 20, seed=step)
        model.forward(x, y)
        model.backward()
        gpurnn.optim.clip_grad_norm(model.grads, 5.0)
        opt.step()
        model.zero_grad()
    x, y = adding_problem(1000, 20, seed=10**6)  # unseen sequences
    mse = float(((host(model.predict(x)) - y) ** 2).mean())
    assert mse < 0.05, mse
    assert time.perf_counter() - start < 60


def test_data_tasks_are_seeded():
    a = adding_problem(4, 10, seed=1)
    b = adding_problem(4, 10, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    x, y = a
    assert x.shape == (10, 4, 2) and y.shape == (4, 1) and np.all(x[:, :, 1].sum(0) == 2)
    corpus = gpurnn.data.CharCorpus("abcab\n")
    assert corpus.vocab == ["\n", "a", "b", "c"] and corpus.decode(corpus.encode("cab\n")) == "cab\n"
    with pytest.raises(gpurnn.data.DataError, match="not in the vocabulary: 'z'"):
        corpus.encode("az")
    inputs, targets = gpurnn.data.copy_task(3, 5, seed=0, symbols=8, length=4)
    assert inputs.shape == targets.shape == (13, 3)
    assert np.array_equal(targets[9:], inputs[:4]) and np.all(targets[:9] == -1)
