"""Cross-check against torch.nn.RNN/LSTM/GRU on randomized configurations."""

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from helpers import back, host, make, rel_err, run, torch_reference

torch = pytest.importorskip("torch")


@st.composite
def configs(draw):
    cell = draw(st.sampled_from(["rnn", "lstm", "gru"]))
    H = draw(st.integers(1, 7))
    return dict(
        cell=cell,
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])) if cell == "rnn" else "tanh",
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        use_lengths=draw(st.booleans()),
        T=draw(st.integers(1, 7)),
        B=draw(st.integers(1, 4)),
        I=draw(st.integers(1, 6)),
        H=H,
        proj_size=draw(st.integers(0, H - 1)) if cell == "lstm" else 0,  # torch's LSTM with projections
        seed=draw(st.integers(0, 2**16)),
    )


def agree(a, b, tol):
    """Relative error below tol; or, for a result near zero (rounded like the O(1)
    values it is computed from, so large relative to itself), every element
    within tol of the peer's."""
    return rel_err(a, b) < tol or np.abs(np.asarray(host(a), np.float64) - b).max() < tol


def check_against_torch(c, dtype, fwd_tol, grad_tol):
    rng = np.random.default_rng(c["seed"])
    model = make(c["cell"], c["I"], c["H"], nonlinearity=c["nonlinearity"], num_layers=c["num_layers"],
                 bidirectional=c["bidirectional"], batch_first=c["batch_first"], bias=c["bias"],
                 dtype=dtype, seed=c["seed"], **({"proj_size": c["proj_size"]} if c.get("proj_size") else {}))
    T, B, H = c["T"], c["B"], c["H"]
    H_out = c.get("proj_size") or H  # the width of h and the outputs; c stays H wide
    D = 2 if c["bidirectional"] else 1
    LD = c["num_layers"] * D
    x = rng.standard_normal((B, T, c["I"]) if c["batch_first"] else (T, B, c["I"])).astype(dtype)
    h0 = rng.standard_normal((LD, B, H_out)).astype(dtype)
    c0 = rng.standard_normal((LD, B, H)).astype(dtype)
    lengths = rng.integers(1, T + 1, size=B) if c["use_lengths"] else None
    d_out = rng.standard_normal((B, T, D * H_out) if c["batch_first"] else (T, B, D * H_out)).astype(dtype)
    d_hn = rng.standard_normal((LD, B, H_out)).astype(dtype)
    d_cn = rng.standard_normal((LD, B, H)).astype(dtype)
    if lengths is not None:  # torch's padded outputs are constants: their gradient is dropped
        mask = np.arange(T)[:, None] < lengths[None, :]
        d_out *= (mask.T if c["batch_first"] else mask)[:, :, None]

    out, h_n, c_n = run(model, x, h0, c0, lengths)
    dx, dh0, dc0 = back(model, d_out, d_hn, d_cn)
    t_out, t_hn, t_cn, t_dx, t_dh0, t_dc0, t_grads = torch_reference(
        c["cell"], model, x, h0, c0, lengths, d_out, d_hn, d_cn)

    assert out.dtype == dtype and dx.dtype == dtype
    assert agree(out, t_out, fwd_tol)
    assert agree(h_n, t_hn, fwd_tol)
    assert agree(dx, t_dx, grad_tol)
    assert agree(dh0, t_dh0, grad_tol)
    if c["cell"] == "lstm":
        assert agree(c_n, t_cn, fwd_tol)
        assert agree(dc0, t_dc0, grad_tol)
    assert set(model.grads) == set(t_grads)
    for name, g in t_grads.items():
        assert agree(model.grads[name], g, grad_tol), name


@settings(max_examples=60, deadline=None)
@given(configs())
@example(dict(cell="gru", nonlinearity="tanh", num_layers=1, bidirectional=False, batch_first=False, bias=True,
              use_lengths=False, T=6, B=1, I=6, H=1, seed=1))  # h_n = 0.0062 from O(1) terms: 2e-5 relative
@example(dict(cell="lstm", nonlinearity="tanh", num_layers=2, bidirectional=True, batch_first=True, bias=True,
              use_lengths=True, T=5, B=3, I=4, H=6, proj_size=2, seed=2))  # a projection, padded
def test_matches_torch_float32(c):
    check_against_torch(c, np.float32, 1e-5, 1e-4)


@settings(max_examples=20, deadline=None)
@given(configs())
@example(dict(cell="lstm", nonlinearity="tanh", num_layers=3, bidirectional=True, batch_first=False, bias=False,
              use_lengths=True, T=6, B=4, I=3, H=5, proj_size=3, seed=3))
def test_matches_torch_float64(c):
    check_against_torch(c, np.float64, 1e-12, 1e-10)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "leaky_relu", "elu"])
def test_extra_nonlinearities_match_torch_functions(nonlinearity):
    """torch.nn.RNN has no such option: compare with the cell written in torch ops."""
    rng = np.random.default_rng(0)
    T, B, I, H = 5, 3, 4, 6
    model = make("rnn", I, H, nonlinearity=nonlinearity, dtype="float64", seed=0)
    x = rng.standard_normal((T, B, I))
    out, h_n, _ = run(model, x)
    phi = {"sigmoid": torch.sigmoid, "leaky_relu": torch.nn.functional.leaky_relu,
           "elu": torch.nn.functional.elu}[nonlinearity]
    p = {k: torch.from_numpy(v) for k, v in host(model.params).items()}
    h = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):
        h = phi(torch.from_numpy(x[t]) @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h @ p["weight_hh_l0"].T
                + p["bias_hh_l0"])
        assert rel_err(out[t], h.numpy()) < 1e-12
    assert rel_err(h_n[0], h.numpy()) < 1e-12
