"""Module behaviour: state dicts, init, modes, cache rules, dropout, dtypes, stability."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import gpurnn
from gpurnn.diagnostics import numeric_gradient
from helpers import back, host, make, rel_err, run

CELLS = ["rnn", "lstm", "gru"]


def test_backend_is_numpy_here():
    b = gpurnn.get_backend()
    assert b.name in ("numpy", "cuda", "cudasim")
    assert b.xp is not None and isinstance(b.reason, str) and b.reason


def test_backend_env_choices():
    code = "import gpurnn; b = gpurnn.get_backend(); print(b.name, '|', b.reason)"
    env = dict(os.environ, GPURNN_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("numpy | GPURNN_BACKEND=numpy")
    env["GPURNN_BACKEND"] = "tpu"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "GPURNN_BACKEND" in bad.stderr and "'tpu'" in bad.stderr


@pytest.mark.parametrize("cell", CELLS)
def test_param_names_shapes_and_init(cell):
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    m = make(cell, 5, 8, num_layers=2, bidirectional=True, seed=0)
    expected = {}
    for k in range(2):
        for sfx in ("", "_reverse"):
            inp = 5 if k == 0 else 16
            expected[f"weight_ih_l{k}{sfx}"] = (G * 8, inp)
            expected[f"weight_hh_l{k}{sfx}"] = (G * 8, 8)
            expected[f"bias_ih_l{k}{sfx}"] = (G * 8,)
            expected[f"bias_hh_l{k}{sfx}"] = (G * 8,)
    sd = m.state_dict()
    assert {k: v.shape for k, v in sd.items()} == expected
    assert list(sd) == list(expected)  # torch's order
    bound = 1 / np.sqrt(8)
    for v in sd.values():
        assert v.dtype == np.float32 and np.all(np.abs(v) <= bound) and v.std() > bound / 3
    assert all(np.array_equal(a, b) for a, b in zip(sd.values(), make(cell, 5, 8, num_layers=2,
               bidirectional=True, seed=0).state_dict().values()))
    assert not np.array_equal(sd["weight_hh_l0"], make(cell, 5, 8, num_layers=2, bidirectional=True,
                                                       seed=1).state_dict()["weight_hh_l0"])


def test_bias_false_has_no_bias_params():
    m = gpurnn.LSTM(3, 4, bias=False)
    assert set(m.state_dict()) == {"weight_ih_l0", "weight_hh_l0"}
    assert set(m.grads) == {"weight_ih_l0", "weight_hh_l0"}


def test_state_dict_round_trip_and_copy():
    a, b = gpurnn.GRU(3, 4, seed=1), gpurnn.GRU(3, 4, seed=2)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    assert np.array_equal(a(x)[0], b(x)[0])
    sd = a.state_dict()
    sd["weight_ih_l0"][...] = 0  # a copy: the model is untouched
    assert np.any(a.params["weight_ih_l0"] != 0)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_accumulates_and_zero_grad_clears(cell):
    rng = np.random.default_rng(0)
    m = make(cell, 3, 4, dtype="float64", seed=0)
    x = rng.standard_normal((5, 2, 3))
    d_out = rng.standard_normal((5, 2, 4))
    run(m, x)
    back(m, d_out)
    once = {k: g.copy() for k, g in m.grads.items()}
    run(m, x)
    back(m, d_out)
    for k, g in m.grads.items():
        assert np.allclose(g, 2 * once[k])
    m.zero_grad()
    assert all(not np.any(g) for g in m.grads.values())


@pytest.mark.parametrize("cell", CELLS)
def test_cache_rules(cell):
    m = make(cell, 3, 4, seed=0)
    x = np.zeros((2, 1, 3), np.float32) + 0.5
    d = np.ones((2, 1, 4), np.float32)
    with pytest.raises(RuntimeError, match="no forward"):
        back(m, d)
    run(m, x)
    back(m, d)
    with pytest.raises(RuntimeError, match="already used"):
        back(m, d)
    m.eval()
    run(m, x)
    with pytest.raises(RuntimeError, match="eval mode"):
        back(m, d)
    m.train()
    with pytest.raises(RuntimeError, match="no forward"):  # eval forward kept no cache
        back(m, d)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_first_matches_time_major(cell):
    rng = np.random.default_rng(1)
    tm = make(cell, 3, 4, num_layers=2, bidirectional=True, seed=5)
    bf = make(cell, 3, 4, num_layers=2, bidirectional=True, batch_first=True, seed=5)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    lengths = np.array([6, 3])
    out, h_n, _ = run(tm, x, lengths=lengths)
    out_bf, h_n_bf, _ = run(bf, x.transpose(1, 0, 2), lengths=lengths)
    assert np.array_equal(out.transpose(1, 0, 2), out_bf) and np.array_equal(h_n, h_n_bf)
    d_out = rng.standard_normal(out.shape).astype(np.float32)
    dx, _, _ = back(tm, d_out)
    dx_bf, _, _ = back(bf, d_out.transpose(1, 0, 2))
    assert np.array_equal(dx.transpose(1, 0, 2), dx_bf)


@pytest.mark.parametrize("cell", CELLS)
def test_lengths_semantics(cell):
    """Padded outputs are 0, h_n is the last valid state, and padding changes nothing."""
    rng = np.random.default_rng(2)
    m = make(cell, 3, 4, bidirectional=True, dtype="float64", seed=3)
    x = rng.standard_normal((6, 2, 3))
    out, h_n, _ = run(m, x, lengths=np.array([6, 2]))
    assert np.all(out[2:, 1] == 0)
    short, h_short, _ = run(m, x[:2, 1:2])  # the second sequence alone, unpadded
    assert np.allclose(out[:2, 1:2], short) and np.allclose(h_n[:, 1:2], h_short)


def test_dropout_between_layers_reproducible_and_inverted():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    a = gpurnn.LSTM(5, 6, num_layers=3, dropout=0.5, seed=11)
    b = gpurnn.LSTM(5, 6, num_layers=3, dropout=0.5, seed=11)
    out_a, _ = a(x)
    out_b, _ = b(x)
    assert np.array_equal(out_a, out_b)  # same seed, same masks
    out_a2, _ = a(x)
    assert not np.array_equal(out_a, out_a2)  # fresh masks each forward
    ws = a._cache[0]
    for mask in map(host, ws.masks[1:]):
        assert set(np.unique(mask)) <= {0.0, 2.0} and 0.3 < mask.mean() / 2 < 0.7
    a.eval()
    e1, _ = a(x)
    e2, _ = a(x)
    assert np.array_equal(e1, e2)  # no dropout in eval mode
    nodrop = gpurnn.LSTM(5, 6, num_layers=3, seed=11)
    nodrop.load_state_dict(a.state_dict())
    assert np.allclose(nodrop(x)[0], e1)


def test_dropout_backward_uses_the_forward_mask():
    """Gradcheck through dropout: the mask is frozen by re-using the model's RNG state."""
    rng = np.random.default_rng(4)
    m = gpurnn.GRU(3, 4, num_layers=2, dropout=0.4, dtype="float64", seed=9)
    x = rng.standard_normal((3, 2, 3))
    R = rng.standard_normal((3, 2, 4))
    state = m._rng.bit_generator.state

    def loss():
        m._rng.bit_generator.state = state  # same mask every evaluation
        return (host(m(x)[0]) * R).sum()

    loss()
    dx, _ = m.backward(R)
    assert rel_err(dx, numeric_gradient(loss, x)) < 1e-6


@pytest.mark.parametrize("cell", CELLS)
def test_float32_and_float64_dtypes(cell):
    for dtype in (np.float32, np.float64):
        m = make(cell, 3, 4, dtype=dtype.__name__, seed=0)
        out, h_n, c_n = run(m, np.ones((2, 1, 3), dtype))
        assert out.dtype == dtype and h_n.dtype == dtype
        dx, dh0, _ = back(m, np.ones((2, 1, 4), dtype))
        assert dx.dtype == dtype and all(g.dtype == dtype for g in m.grads.values())


@pytest.mark.parametrize("cell, nonlinearity", [("lstm", "tanh"), ("gru", "tanh")] + [
    ("rnn", n) for n in ["tanh", "sigmoid", "relu", "leaky_relu", "elu"]])
def test_huge_preactivations_stay_finite(cell, nonlinearity):
    """|x| up to 1e4 saturates without overflow warnings (the suite makes them errors)."""
    m = make(cell, 2, 3, nonlinearity=nonlinearity, dtype="float32", seed=0)
    x = np.array([[[1e4, -1e4]], [[-1e4, 1e4]]], np.float32)
    for p in m.params.values():
        p[...] = np.sign(p) * 1.0
    out, h_n, _ = run(m, x)
    dx, _, _ = back(m, np.ones_like(out))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))


def test_outputs_are_fresh_arrays():
    m = gpurnn.RNN(2, 3, seed=0)
    x = np.ones((2, 1, 2), np.float32)
    out1, h1 = m(x)
    keep = out1.copy()
    m(x * 2)
    assert np.array_equal(out1, keep)  # the workspace re-use does not leak into results


@pytest.mark.parametrize("cell", CELLS)
def test_staged_inputs_do_not_leak_between_calls(cell):
    """A call without h0 / lengths / d_hn after one with them sees zeros / full lengths again."""
    rng = np.random.default_rng(6)
    m = make(cell, 3, 4, num_layers=2, dtype="float64", seed=0)
    fresh = make(cell, 3, 4, num_layers=2, dtype="float64", seed=0)
    x = rng.standard_normal((5, 2, 3))
    h0, c0, d_hn, d_cn = rng.standard_normal((4, 2, 2, 4))
    d_out = rng.standard_normal((5, 2, 4))
    run(m, x, h0, c0, lengths=np.array([2, 5]))
    back(m, d_out, d_hn, d_cn)
    out, h_n, _ = run(m, x)
    dx, dh0, _ = back(m, d_out)
    out_f, h_n_f, _ = run(fresh, x)
    dx_f, dh0_f, _ = back(fresh, d_out)
    for a, b in ((out, out_f), (h_n, h_n_f), (dx, dx_f), (dh0, dh0_f)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_as_torch(cell, batch_first):
    """x [T, I] with h0 [L*D, H]: the batch of one's results without the batch axis (batch_first ignored)."""
    rng = np.random.default_rng(8)
    m = make(cell, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, dtype="float64", seed=0)
    x = rng.standard_normal((5, 3))
    h0, c0 = rng.standard_normal((2, 4, 4))
    d_out, (d_hn, d_cn) = rng.standard_normal((5, 8)), rng.standard_normal((2, 4, 4))
    out, h_n, c_n = run(m, x, h0, c0)
    dx, dh0, dc0 = back(m, d_out, d_hn, d_cn)
    batched = x[None] if batch_first else x[:, None]
    out1, h_n1, c_n1 = run(m, batched, h0[:, None], c0[:, None])
    dx1, dh01, dc01 = back(m, d_out[None] if batch_first else d_out[:, None], d_hn[:, None], d_cn[:, None])
    assert out.shape == (5, 8) and h_n.shape == (4, 4) and dx.shape == (5, 3) and dh0.shape == (4, 4)
    np.testing.assert_array_equal(out, out1[0] if batch_first else out1[:, 0])
    np.testing.assert_array_equal(dx, dx1[0] if batch_first else dx1[:, 0])
    np.testing.assert_array_equal(h_n, h_n1[:, 0])
    np.testing.assert_array_equal(dh0, dh01[:, 0])
    if cell == "lstm":
        np.testing.assert_array_equal(c_n, c_n1[:, 0])
        np.testing.assert_array_equal(dc0, dc01[:, 0])
    torch = pytest.importorskip("torch")
    ref = make_torch(cell, m)
    hx = (torch.from_numpy(h0), torch.from_numpy(c0)) if cell == "lstm" else torch.from_numpy(h0)
    t_out, t_h = ref(torch.from_numpy(x), hx)
    assert tuple(t_out.shape) == out.shape and rel_err(out, t_out.detach().numpy()) < 1e-12
    assert rel_err(h_n, (t_h[0] if cell == "lstm" else t_h).detach().numpy()) < 1e-12


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_batch_of_no_sequences_as_torch(cell, batch_first):
    """B = 0, which torch takes: outputs, final states and gradients with no rows, and
    nothing accumulated into the gradients; shapes still checked; T = 0 still refused."""
    rng = np.random.default_rng(9)
    m = make(cell, 3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, dropout=0.5, seed=0)
    run(m, rng.standard_normal((2, 5, 3)).astype(np.float32))
    back(m, np.ones((2, 5, 8), np.float32))
    before = host(m.grads)
    assert all(g.any() for g in before.values())
    x = np.zeros((0, 5, 3) if batch_first else (5, 0, 3), np.float32)
    empty = np.zeros((4, 0, 4), np.float32)
    out, h_n, c_n = run(m, x, empty, empty, lengths=np.zeros(0, np.int64))
    assert out.shape == ((0, 5, 8) if batch_first else (5, 0, 8)) and h_n.shape == (4, 0, 4)
    dx, dh0, dc0 = back(m, np.zeros(out.shape, np.float32), empty, empty)
    assert dx.shape == x.shape and dh0.shape == (4, 0, 4) and dx.dtype == np.float32
    if cell == "lstm":
        assert c_n.shape == dc0.shape == (4, 0, 4)
    for name, g in host(m.grads).items():
        np.testing.assert_array_equal(g, before[name])
    with pytest.raises(RuntimeError, match="already used"):
        back(m, np.zeros(out.shape, np.float32))
    with pytest.raises(ValueError, match=r"h0: expected shape \[4, 0, 4\] \[num_layers\*D, B, H\], got \(4, 2, 4\)"):
        run(m, x, np.zeros((4, 2, 4), np.float32), empty)
    run(m, x)
    with pytest.raises(ValueError, match=r"d_out: expected shape"):
        back(m, np.zeros((5, 0, 4), np.float32))
    m(x, record=True)
    assert all(a.shape == (4, 5, 0, 4) for a in host(m.recorded).values())
    m.eval()
    assert run(m, x)[0].shape == out.shape
    with pytest.raises(RuntimeError, match="eval mode"):
        back(m, np.zeros(out.shape, np.float32))
    with pytest.raises(ValueError, match=r"x: expected at least one time step, got shape \(0, 0, 3\)"):
        run(m, np.zeros((0, 0, 3), np.float32))
    torch = pytest.importorskip("torch")
    t_out, _ = make_torch(cell, m)(torch.zeros(x.shape, dtype=torch.float64))
    assert tuple(t_out.shape) == out.shape


def test_a_batch_of_no_sequences_through_a_projected_lstm():
    """h states proj_size wide, c states hidden_size wide, with no rows."""
    m = gpurnn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, seed=0)
    out, (h_n, c_n) = m(np.zeros((5, 0, 3), np.float32))
    assert out.shape == (5, 0, 4) and h_n.shape == (4, 0, 2) and c_n.shape == (4, 0, 4)
    dx, (dh0, dc0) = m.backward(np.zeros((5, 0, 4), np.float32))
    assert dx.shape == (5, 0, 3) and dh0.shape == (4, 0, 2) and dc0.shape == (4, 0, 4)


def make_torch(cell, model):
    """torch's module with the model's configuration and weights (float64, CPU)."""
    import torch

    cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
    ref = cls(model.input_size, model.hidden_size, model.num_layers, batch_first=model.batch_first,
              bidirectional=model.bidirectional).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in host(model.state_dict()).items()})
    return ref


def test_unbatched_input_with_a_batched_state_is_refused():
    m = gpurnn.GRU(3, 4)
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"h0: expected a 2-D array of shape \[1, 4\] \[num_layers\*D, H\] "
                                         r"\(unbatched input\), got shape \(1, 1, 4\)"):
        m(x, np.zeros((1, 1, 4), np.float32))
    m(x)
    with pytest.raises(ValueError, match=r"d_out: expected a 2-D array of shape \[5, 4\] \[T, D\*H\] \(unbatched\)"):
        m.backward(np.zeros((5, 1, 4), np.float32))


def test_gpurnn_torch_without_torch_names_the_extra(monkeypatch):
    """torch is optional: importing gpurnn.torch without it says which extra brings it."""
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gpurnn.torch", raising=False)
    with pytest.raises(ImportError, match=r"^gpurnn.torch needs PyTorch \(.*\): pip install 'gpurnn\[torch\]'$"):
        importlib.import_module("gpurnn.torch")
