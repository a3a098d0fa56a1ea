"""Bad input: a TypeError or ValueError that names the argument, what was expected and what came."""

import numpy as np
import pytest

import gpurnn
from helpers import back, make, run

F32 = np.float32


def raises(exc, *words):
    """pytest.raises whose message must contain every word."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)
            if handled:
                msg = str(self.info.value)
                for w in words:
                    assert w in msg, f"{w!r} not in {msg!r}"
            return handled
    return Check()


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(input_size=0), ValueError, ["input_size", "positive", "0"]),
    (dict(input_size=-3), ValueError, ["input_size", "-3"]),
    (dict(input_size=2.5), TypeError, ["input_size", "2.5"]),
    (dict(input_size=True), TypeError, ["input_size"]),
    (dict(hidden_size=0), ValueError, ["hidden_size", "0"]),
    (dict(hidden_size="4"), TypeError, ["hidden_size", "'4'"]),
    (dict(num_layers=0), ValueError, ["num_layers", "0"]),
    (dict(num_layers=1.0), TypeError, ["num_layers"]),
    (dict(dropout=1.0), ValueError, ["dropout", "[0, 1)", "1.0"]),
    (dict(dropout=-0.1), ValueError, ["dropout", "-0.1"]),
    (dict(dropout="0.5"), TypeError, ["dropout"]),
    (dict(dtype="int32"), ValueError, ["dtype", "int32"]),
    (dict(dtype="banana"), TypeError, ["dtype", "banana"]),
    (dict(bidirectional="yes"), TypeError, ["bidirectional", "'yes'"]),
    (dict(batch_first=1), TypeError, ["batch_first"]),
    (dict(bias=None), TypeError, ["bias"]),
    (dict(seed=1.5), TypeError, ["seed", "1.5"]),
])
@pytest.mark.parametrize("cls", [gpurnn.RNN, gpurnn.LSTM, gpurnn.GRU])
def test_constructor_arguments(cls, kwargs, exc, words):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with raises(exc, *words):
        cls(**args)


@pytest.mark.parametrize("proj_size, exc, words", [
    (4, ValueError, ["proj_size", "below hidden_size (4)", "4"]),
    (-1, ValueError, ["proj_size", "non-negative", "-1"]),
    (1.5, TypeError, ["proj_size", "1.5"]),
    (True, TypeError, ["proj_size", "True"]),
])
def test_lstm_projection_size(proj_size, exc, words):
    with raises(exc, *words):
        gpurnn.LSTM(3, 4, proj_size=proj_size)


@pytest.mark.parametrize("batch_first, shape", [(False, (0, 2, 3)), (True, (2, 0, 3)), (True, (0, 3))])
def test_no_time_steps_are_named_in_the_callers_layout(batch_first, shape):
    model = gpurnn.GRU(3, 4, batch_first=batch_first)
    with raises(ValueError, "x", "at least one time step", str(shape)):
        model(np.zeros(shape, F32))


def test_unknown_nonlinearity():
    with raises(ValueError, "nonlinearity", "'softplus'", "tanh"):
        gpurnn.RNN(3, 4, nonlinearity="softplus")


CELLS = ["rnn", "lstm", "gru"]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("x, exc, words", [
    (np.ones(5, F32), ValueError, ["x", "3-D", "2-D", "unbatched", "(5,)"]),
    (np.ones((5, 2), F32), ValueError, ["x", "[*, 3]", "unbatched", "(5, 2)"]),
    (np.ones((5, 2, 3, 1), F32), ValueError, ["x", "(5, 2, 3, 1)"]),
    (np.ones((5, 2, 7), F32), ValueError, ["x", "[*, *, 3]", "(5, 2, 7)"]),
    (np.ones((5, 2, 3), np.float64), TypeError, ["x", "float32", "float64"]),
    (np.ones((5, 2, 3), np.int64), TypeError, ["x", "float32", "int64"]),
    (np.ones((0, 2, 3), F32), ValueError, ["x", "(0, 2, 3)"]),
    ("hello", TypeError, ["x"]),
])
def test_bad_x(cell, x, exc, words):
    m = make(cell, 3, 4)
    with raises(exc, *words):
        run(m, x)


@pytest.mark.parametrize("cell", CELLS)
def test_bad_initial_states(cell):
    m = make(cell, 3, 4, num_layers=2)
    x = np.ones((5, 2, 3), F32)
    with raises(ValueError, "h0", "[2, 2, 4]", "(1, 2, 4)"):
        run(m, x, h0=np.ones((1, 2, 4), F32), c0=np.ones((2, 2, 4), F32))
    with raises(ValueError, "h0", "(2, 4)"):
        run(m, x, h0=np.ones((2, 4), F32), c0=np.ones((2, 2, 4), F32))
    with raises(TypeError, "h0", "float64"):
        run(m, x, h0=np.ones((2, 2, 4)), c0=np.ones((2, 2, 4), F32))
    if cell == "lstm":
        with raises(ValueError, "c0", "(2, 3, 4)"):
            run(m, x, h0=np.ones((2, 2, 4), F32), c0=np.ones((2, 3, 4), F32))
        with raises(TypeError, "hx", "pair"):
            m(x, np.ones((2, 2, 4), F32))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("lengths, exc, words", [
    (np.array([5, 0]), ValueError, ["lengths", "[1, 5]", "0"]),
    (np.array([6, 1]), ValueError, ["lengths", "[1, 5]", "6"]),
    (np.array([-1, 2]), ValueError, ["lengths", "-1"]),
    (np.array([5]), ValueError, ["lengths", "[2]", "(1,)"]),
    (np.array([5, 2, 1]), ValueError, ["lengths", "[2]", "(3,)"]),
    (np.array([[5, 2]]), ValueError, ["lengths", "(1, 2)"]),
    (np.array([5.0, 2.0]), TypeError, ["lengths", "integer", "float64"]),
    (np.array([True, True]), TypeError, ["lengths", "integer", "bool"]),
    ((5, 0), ValueError, ["lengths", "[1, 5]", "0"]),
    ("ab", TypeError, ["lengths", "integer", "<U2"]),
    ({"a": 1}, TypeError, ["lengths", "integer", "object"]),
])
def test_bad_lengths(cell, lengths, exc, words):
    m = make(cell, 3, 4)
    with raises(exc, *words):
        run(m, np.ones((5, 2, 3), F32), lengths=lengths)


@pytest.mark.parametrize("cell", CELLS)
def test_lengths_as_a_list_or_tuple(cell):
    m = make(cell, 3, 4, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(F32)
    expected = run(m, x, lengths=np.array([5, 3]))[0]
    for lengths in ([5, 3], (5, 3)):
        np.testing.assert_array_equal(run(m, x, lengths=lengths)[0], expected)


@pytest.mark.parametrize("cell", CELLS)
def test_bad_backward_arguments(cell):
    m = make(cell, 3, 4, bidirectional=True)
    run(m, np.ones((5, 2, 3), F32))
    with raises(ValueError, "d_out", "[5, 2, 8]", "(5, 2, 4)"):
        back(m, np.ones((5, 2, 4), F32))
    with raises(ValueError, "d_out", "(2, 5, 8)"):
        back(m, np.ones((2, 5, 8), F32))
    with raises(TypeError, "d_out", "float32", "float64"):
        back(m, np.ones((5, 2, 8)))
    with raises(ValueError, "d_hn", "[2, 2, 4]", "(1, 2, 4)"):
        back(m, np.ones((5, 2, 8), F32), np.ones((1, 2, 4), F32), np.ones((2, 2, 4), F32))
    if cell == "lstm":
        with raises(ValueError, "d_cn", "(2, 2, 5)"):
            back(m, np.ones((5, 2, 8), F32), np.ones((2, 2, 4), F32), np.ones((2, 2, 5), F32))
    # the failed calls did not consume the cache
    dx, _, _ = back(m, np.ones((5, 2, 8), F32))
    assert dx.shape == (5, 2, 3)


def test_bad_state_dicts():
    m = gpurnn.LSTM(3, 4)
    good = m.state_dict()
    missing = dict(good)
    del missing["bias_hh_l0"]
    with raises(ValueError, "state_dict", "missing", "bias_hh_l0"):
        m.load_state_dict(missing)
    extra = dict(good, weight_ih_l1=np.ones((16, 4), F32))
    with raises(ValueError, "state_dict", "unexpected", "weight_ih_l1"):
        m.load_state_dict(extra)
    shaped = dict(good, weight_hh_l0=np.ones((16, 3), F32))
    with raises(ValueError, "weight_hh_l0", "(16, 4)", "(16, 3)"):
        m.load_state_dict(shaped)
    ints = dict(good, bias_ih_l0=np.ones(16, np.int64))
    with raises(TypeError, "bias_ih_l0", "int64"):
        m.load_state_dict(ints)
    with raises(TypeError, "state_dict", "list"):
        m.load_state_dict([1, 2])
    after = m.state_dict()  # nothing was half-loaded
    assert all(np.array_equal(after[k], good[k]) for k in good)


def test_models_optimizers_and_losses_name_their_bad_arguments():
    """The composite models, optimizers, clipping and loss scaling refuse a wrong argument by
    name before anything deeper trips over it."""
    for kw, exc, words in [(dict(hidden_size="abc"), TypeError, ["hidden_size", "'abc'"]),
                           (dict(embedding_dim=0), ValueError, ["embedding_dim", "0"]),
                           (dict(seed=-1), ValueError, ["seed", "non-negative", "-1"]),
                           (dict(seed=2.5), TypeError, ["seed", "2.5"]),
                           (dict(cell=np.zeros(2)), ValueError, ["cell", "lstm"]),
                           (dict(backend=np.zeros(2)), ValueError, ["backend", "numpy"]),
                           (dict(cell="gru", nonlinearity="relu"), ValueError, ["nonlinearity", "'relu'", "'gru'"]),
                           (dict(cell="rnn", proj_size=4), ValueError, ["proj_size", "4", "'rnn'"]),
                           (dict(proj_size=8), ValueError, ["proj_size", "below hidden_size (8)", "8"]),
                           (dict(proj_size=-1), ValueError, ["proj_size", "-1"])]:
        with raises(exc, *words):
            gpurnn.CharLM(**{"vocab_size": 10, "hidden_size": 8, **kw})
    with raises(ValueError, "nonlinearity", "'relu'", "'lstm'"):  # fixed activations: said, not ignored
        gpurnn.SequenceRegressor(2, 8, cell="lstm", nonlinearity="relu")
    with raises(ValueError, "seed", "-1"):
        gpurnn.GRU(3, 4, seed=-1)
    lm = gpurnn.CharLM(10, 8, seed=0)
    ids = np.zeros((4, 3), np.int64)
    with raises(ValueError, "inputs", "[T, B]", "(4,)"):
        lm(ids[:, 0], ids)
    lm(ids, ids)
    with raises(TypeError, "loss_scale", "[1, 2]"):
        lm.backward(loss_scale=[1, 2])
    with raises(ValueError, "loss_scale", "positive", "0"):
        lm.backward(loss_scale=0)
    with raises(TypeError, "params", "dict of arrays", "NoneType"):
        gpurnn.optim.Adam(None, lm.grads)
    with raises(ValueError, "betas", "('a', 1)"):
        gpurnn.optim.Adam(lm.params, lm.grads, betas=("a", 1))
    with raises(TypeError, "grads", "dict of arrays", "list"):
        gpurnn.optim.global_norm([1, 2])
    with raises(TypeError, "grads", "dict of arrays", "dict"):
        gpurnn.optim.clip_grad_norm({}, 1.0)
    master = gpurnn.amp.MasterWeights(gpurnn.CharLM(10, 8, dtype="float16"))
    with raises(TypeError, "loss_scale", "'x'"):
        master.take_grads("x")
