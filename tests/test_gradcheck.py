"""float64 central-difference gradient check of every parameter, x, h0 (and c0)."""

import numpy as np
import pytest

from gpurnn.diagnostics import numeric_gradient
from helpers import back, make, rel_err, run

EPS = 1e-6
TOL = 1e-6


def loss_and_grads(model, x, h0, c0, lengths, R, Rh, Rc):
    """L = sum(out R) + sum(h_n Rh) [+ sum(c_n Rc)], and its analytic gradients."""
    out, h_n, c_n = run(model, x, h0, c0, lengths)
    loss = (out * R).sum() + (h_n * Rh).sum() + (0.0 if c_n is None else (c_n * Rc).sum())
    return loss


def numeric(f, a):
    return numeric_gradient(f, a, EPS)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("num_layers, bidirectional, with_lengths", [
    (1, False, False), (2, False, False), (1, True, False), (2, True, True), (1, False, True),
])
def test_gradcheck(cell, num_layers, bidirectional, with_lengths):
    rng = np.random.default_rng(7)
    T, B, I, H = 4, 3, 3, 4
    model = make(cell, I, H, num_layers=num_layers, bidirectional=bidirectional, dtype="float64", seed=1)
    LD = num_layers * (2 if bidirectional else 1)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((LD, B, H)) * 0.5
    c0 = rng.standard_normal((LD, B, H)) * 0.5
    lengths = np.array([4, 1, 3]) if with_lengths else None
    R = rng.standard_normal((T, B, model._cfg.D * H))
    Rh, Rc = rng.standard_normal((LD, B, H)), rng.standard_normal((LD, B, H))

    loss_and_grads(model, x, h0, c0, lengths, R, Rh, Rc)
    dx, dh0, dc0 = back(model, R, Rh, Rc)
    f = lambda: loss_and_grads(model, x, h0, c0, lengths, R, Rh, Rc)  # noqa: E731

    checked = {"x": (dx, numeric(f, x)), "h0": (dh0, numeric(f, h0))}
    if cell == "lstm":
        checked["c0"] = (dc0, numeric(f, c0))
    for name, p in model.params.items():
        checked[name] = (model.grads[name], numeric(f, p))
    worst = {name: rel_err(analytic, num) for name, (analytic, num) in checked.items()}
    assert max(worst.values()) < TOL, worst
    if with_lengths:  # padded inputs influence nothing
        assert np.all(dx[1:, 1] == 0) and np.all(dx[3:, 2] == 0)


@pytest.mark.parametrize("nonlinearity", ["relu", "sigmoid", "leaky_relu", "elu"])
def test_gradcheck_nonlinearities(nonlinearity):
    rng = np.random.default_rng(3)
    T, B, I, H = 4, 2, 3, 5
    model = make("rnn", I, H, nonlinearity=nonlinearity, dtype="float64", seed=2)
    x = rng.standard_normal((T, B, I))
    h0 = rng.standard_normal((1, B, H))
    R, Rh = rng.standard_normal((T, B, H)), rng.standard_normal((1, B, H))
    loss_and_grads(model, x, h0, None, None, R, Rh, None)
    dx, dh0, _ = back(model, R, Rh)
    f = lambda: loss_and_grads(model, x, h0, None, None, R, Rh, None)  # noqa: E731
    assert rel_err(dx, numeric(f, x)) < TOL
    assert rel_err(dh0, numeric(f, h0)) < TOL
    for name, p in model.params.items():
        assert rel_err(model.grads[name], numeric(f, p)) < TOL, name
