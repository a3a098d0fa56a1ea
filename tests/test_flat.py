"""Parameters packed into one buffer (gpurnn.flat): found only where they are,
and optimizers and clipping give the same numbers on them as on separate arrays."""

import numpy as np
import pytest

import gpurnn
from gpurnn import flat, optim


def arrays(rng):
    return {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3), "v": rng.standard_normal((2, 2, 2))}


def test_pack_gives_views_of_one_buffer_holding_copies():
    a = arrays(np.random.default_rng(0))
    buffer, views = flat.pack(a)
    assert buffer.shape == (12 + 3 + 8,) and flat.buffer_of(views) is buffer
    for k in a:
        assert views[k].shape == a[k].shape and np.array_equal(views[k], a[k]) and views[k] is not a[k]
    views["b"][...] = 7  # writes reach the buffer
    assert np.array_equal(buffer[12:15], [7, 7, 7])


def test_buffer_of_refuses_arrays_that_are_not_packed_whole_and_in_order():
    a = arrays(np.random.default_rng(1))
    buffer, views = flat.pack(a)
    assert flat.buffer_of(a) is None  # separate arrays
    assert flat.buffer_of({k: views[k] for k in ("b", "w", "v")}) is None  # out of order
    assert flat.buffer_of({k: views[k] for k in ("w", "b")}) is None  # not the whole buffer
    assert flat.buffer_of({"x": buffer[::2]}) is None  # strided
    assert flat.buffer_of({}) is None


@pytest.mark.parametrize("name, kw", [("sgd", dict(lr=0.1, momentum=0.9)), ("adagrad", dict(lr=0.1)),
                                      ("adam", dict(lr=1e-2, betas=(0.8, 0.99)))])
def test_optimizer_on_packed_params_matches_separate_arrays(name, kw):
    rng = np.random.default_rng(2)
    start = arrays(rng)
    separate = {k: v.copy() for k, v in start.items()}
    sep_grads = {k: np.zeros_like(v) for k, v in start.items()}
    _, packed = flat.pack(start)
    _, packed_grads = flat.pack(sep_grads)
    opts = [optim.OPTIMIZERS[name](p, g, **kw) for p, g in ((separate, sep_grads), (packed, packed_grads))]
    assert opts[0]._flat is None and opts[1]._flat is not None
    for _ in range(4):
        for k in start:
            sep_grads[k][...] = packed_grads[k][...] = rng.standard_normal(start[k].shape)
        for opt in opts:
            opt.step()
    for k in start:
        assert np.allclose(packed[k], separate[k], rtol=1e-14, atol=1e-14), k
    states = [opt.state_dict() for opt in opts]
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert np.allclose(states[1][k], states[0][k], rtol=1e-14, atol=1e-14), k
    fresh = optim.OPTIMIZERS[name](packed, packed_grads, **kw)
    fresh.load_state_dict(states[1])  # into the state buffers' views
    assert all(np.array_equal(fresh.state_dict()[k], states[1][k]) for k in states[1])


@pytest.mark.parametrize("clip, limit", [(optim.clip_grad_norm, 1.0), (optim.clip_grad_value, 0.5)])
def test_clipping_packed_grads_matches_separate_arrays(clip, limit):
    separate = arrays(np.random.default_rng(3))
    _, packed = flat.pack(separate)
    norms = [clip(g, limit) for g in (separate, packed)]
    assert abs(norms[1] - norms[0]) < 1e-12 * norms[0]
    for k in separate:
        assert np.allclose(packed[k], separate[k], rtol=1e-14, atol=1e-15), k


def test_models_pack_their_parameters_and_gradients():
    lm = gpurnn.CharLM(7, 5, num_layers=2, dtype="float64", seed=0)
    assert flat.buffer_of(lm.params) is not None and flat.buffer_of(lm.grads) is not None
    assert lm.rnn.params["weight_hh_l1"] is lm.params["rnn.weight_hh_l1"]  # the parts hold the views
    assert lm.head.grads["bias"] is lm.grads["head.bias"]
    rng = np.random.default_rng(4)
    lm.forward(rng.integers(0, 7, (4, 3)), rng.integers(0, 7, (4, 3)))
    lm.backward()
    assert lm.grads["rnn.weight_ih_l0"].any() and lm.grads["embedding.weight"].any()
    lm.zero_grad()
    assert not any(g.any() for g in lm.grads.values())
    reg = gpurnn.SequenceRegressor(2, 4, seed=0)
    assert flat.buffer_of(reg.params) is not None


def test_clipping_with_a_norm_already_read_matches_computing_it():
    grads = arrays(np.random.default_rng(5))
    given = {k: v.copy() for k, v in grads.items()}
    norm = optim.global_norm(grads)
    assert optim.clip_grad_norm(given, 1.0, norm) == norm == optim.clip_grad_norm(grads, 1.0)
    assert all(np.array_equal(given[k], grads[k]) for k in grads)
    assert optim.clip_grad_value(given, 0.1, norm=1.5) == 1.5  # the given norm is what is returned
