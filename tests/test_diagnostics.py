"""Gradient flow, the glass-box mode and the public gradcheck — and what they must show."""

import os
import subprocess
import sys

import numpy as np
import pytest

import gpurnn
from gpurnn import diagnostics
from gpurnn.data import adding_problem
from helpers import host, rel_err, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_chain(cell, model, x, d_out):
    """dL/dh_t, dL/dc_t and ||J_t^T u_t|| from a step-by-step torch loop (1 layer, forward)."""
    torch = pytest.importorskip("torch")
    p = {k: torch.tensor(v) for k, v in host(model.params).items()}
    H = model.hidden_size
    T, B, _ = x.shape
    hs, cs, prevs = [], [], []
    project = (lambda h: h @ p["weight_hr_l0"].T) if "weight_hr_l0" in p else (lambda h: h)  # noqa: E731
    h = torch.zeros(B, model.proj_size or H, dtype=torch.float64, requires_grad=True)
    c = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):
        prevs.append(h)
        a = torch.tensor(x[t]) @ p["weight_ih_l0"].T + p["bias_ih_l0"] + h @ p["weight_hh_l0"].T + p["bias_hh_l0"]
        if cell == "rnn":
            h = torch.tanh(a)
        else:
            i, f, g, o = a.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = project(torch.sigmoid(o) * torch.tanh(c))
            c.retain_grad()
            cs.append(c)
        h.retain_grad()
        hs.append(h)
    (torch.stack(hs) * torch.tensor(d_out)).sum().backward(retain_graph=True)
    dh = np.array([float(hh.grad.norm()) for hh in hs])
    dc = np.array([float(cc.grad.norm()) for cc in cs]) if cs else None
    jac = []
    for t in range(T):  # J_t^T u with u along the gradient at h_t, c_{t-1} held fixed
        u = hs[t].grad / hs[t].grad.norm()
        if cell == "lstm" and t > 0:
            a = torch.tensor(x[t]) @ p["weight_ih_l0"].T + p["bias_ih_l0"] + prevs[t] @ p["weight_hh_l0"].T \
                + p["bias_hh_l0"]
            i, f, g, o = a.chunk(4, 1)
            c_t = torch.sigmoid(f) * cs[t - 1].detach() + torch.sigmoid(i) * torch.tanh(g)
            out_t = project(torch.sigmoid(o) * torch.tanh(c_t))
        else:
            out_t = hs[t]
        (vjp,) = torch.autograd.grad(out_t, prevs[t], u, retain_graph=True)
        jac.append(float(vjp.norm()))
    return dh, dc, np.array(jac)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "lstm proj_size=3"])
def test_gradient_flow_matches_torch_step_by_step(cell):
    rng = np.random.default_rng(0)
    if cell == "rnn":
        model = gpurnn.RNN(3, 5, dtype="float64", seed=1)
    else:
        model = gpurnn.LSTM(3, 5, dtype="float64", seed=1, proj_size=3 if "proj_size" in cell else 0)
    cell = cell.split()[0]
    H_out = model.proj_size or 5
    x = rng.standard_normal((7, 2, 3))
    d_out = np.zeros((7, 2, H_out))
    d_out[-1] = rng.standard_normal((2, H_out))
    d_out[3] = rng.standard_normal((2, H_out))  # a second entry point
    flow = diagnostics.gradient_flow(model, x, d_out)
    dh, dc, jac = torch_chain(cell, model, x, d_out)
    assert flow.dh.shape == (1, 7) and rel_err(flow.dh[0], dh) < 1e-10
    assert rel_err(flow.jac[0], jac) < 1e-10
    if cell == "lstm":
        assert rel_err(flow.dc[0], dc) < 1e-10
    else:
        assert flow.dc is None


def test_gradient_flow_shapes_defaults_and_side_effects():
    rng = np.random.default_rng(1)
    model = gpurnn.GRU(3, 4, num_layers=2, bidirectional=True, dtype="float64", seed=0)
    x = rng.standard_normal((6, 2, 3))
    run(model, x)
    model.backward(np.ones((6, 2, 8)))
    before = {k: g.copy() for k, g in model.grads.items()}
    model.eval()
    flow = diagnostics.gradient_flow(model, x, lengths=np.array([6, 3]))
    assert flow.dh.shape == flow.jac.shape == (4, 6) and flow.dc is None
    assert list(flow.reverse) == [0, 1, 0, 1]
    assert flow.dh[0, 5] > 0 and flow.dh[2, 5] > 0  # top forward: the gradient enters at the last step
    assert all(np.array_equal(model.grads[k], before[k]) for k in before)  # grads untouched
    assert not model.training  # mode restored


def test_vanishing_gradients_order_cells():
    """Standard init, 100 steps, gradient from the last step only (float64, fixed seeds)."""
    T, B, I, H = 100, 8, 8, 32
    x = np.random.default_rng(0).standard_normal((T, B, I))
    models = {
        "sigmoid": gpurnn.RNN(I, H, nonlinearity="sigmoid", dtype="float64", seed=0),
        "tanh": gpurnn.RNN(I, H, dtype="float64", seed=0),
        "lstm": diagnostics.set_forget_bias(gpurnn.LSTM(I, H, dtype="float64", seed=0), 1.0),
        "gru": gpurnn.GRU(I, H, dtype="float64", seed=0),
    }
    far = {}
    for name, m in models.items():
        d = diagnostics.gradient_flow(m, x).at_distance(0)
        far[name] = d[T - 1] / d[0]
    assert far["sigmoid"] < far["tanh"] * 1e-10
    assert far["tanh"] * 1e10 < far["lstm"]
    assert far["tanh"] * 1e3 < far["gru"]


def test_exploding_relu_rnn_and_clipping():
    T, B, H = 60, 4, 16
    m = gpurnn.RNN(H, H, nonlinearity="relu", dtype="float64", seed=0)
    w = m.params["weight_hh_l0"]
    w *= 1.5 / diagnostics.spectral_radius(w)
    assert diagnostics.spectral_radius(w) > 1
    x = np.abs(np.random.default_rng(1).standard_normal((T, B, H)))
    flow = diagnostics.gradient_flow(m, x)
    d = flow.at_distance(0)
    assert d[50] > 1e4 * d[0]  # the gradient grows back through time
    out, _ = m(x)
    d_out = np.zeros_like(out)
    d_out[-1] = 1
    m.backward(d_out)
    norm = gpurnn.optim.global_norm(m.grads)
    assert norm > 1e6
    grads = {k: g.copy() for k, g in m.grads.items()}
    assert gpurnn.optim.clip_grad_norm(grads, 1.0) == norm
    assert gpurnn.optim.global_norm(grads) <= 1.0 + 1e-9
    assert gpurnn.optim.clip_grad_value(m.grads, 0.5) == norm
    assert max(float(np.abs(g).max()) for g in m.grads.values()) <= 0.5


def test_adding_problem_rnn_fails_lstm_gru_solve():
    T, results = 50, {}
    for cell in ("rnn", "lstm", "gru"):
        m = gpurnn.SequenceRegressor(2, 32, cell=cell, seed=0)
        if cell == "lstm":
            diagnostics.set_forget_bias(m.rnn, 1.0)
        opt = gpurnn.optim.Adam(m.params, m.grads, lr=1e-2)
        for step in range(800):
            x, y = adding_problem(32, T, seed=step)
            m.forward(x, y)
            m.backward()
            gpurnn.optim.clip_grad_norm(m.grads, 1.0)
            opt.step()
            m.zero_grad()
        x, y = adding_problem(1000, T, seed=10**6)
        results[cell] = float(((host(m.predict(x)) - y) ** 2).mean())
    assert results["rnn"] > 0.12, results  # the trivial baseline is ~0.167
    assert results["lstm"] < 0.05 and results["gru"] < 0.05, results


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_record_mode(cell):
    rng = np.random.default_rng(2)
    kw = {"nonlinearity": "tanh"} if cell == "rnn" else {}
    m = {"rnn": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU}[cell](3, 4, num_layers=2, bidirectional=True,
                                                                          dtype="float64", seed=0, **kw)
    with pytest.raises(RuntimeError, match="record=True"):
        m.recorded
    x = rng.standard_normal((5, 2, 3))
    out, state = host(m(x, record=True))
    rec = host(m.recorded)
    names = {"rnn": {"a"}, "lstm": {"i", "f", "g", "o", "c"}, "gru": {"r", "z", "n"}}[cell]
    assert set(rec) == names and all(v.shape == (4, 5, 2, 4) for v in rec.values())
    top_fwd = out[:, :, :4]
    if cell == "rnn":
        assert np.allclose(np.tanh(rec["a"][2]), top_fwd)
    elif cell == "lstm":
        assert np.allclose(rec["o"][2] * np.tanh(rec["c"][2]), top_fwd)
        assert np.allclose(rec["c"][:, -1][[0, 2]], state[1][[0, 2]])  # last state of the forward rows
    else:
        h_prev = np.concatenate([np.zeros((1, 2, 4)), top_fwd[:-1]])
        assert np.allclose((1 - rec["z"][2]) * rec["n"][2] + rec["z"][2] * h_prev, top_fwd)
    m(x)  # an ordinary call forgets the recording
    with pytest.raises(RuntimeError):
        m.recorded


def test_record_refuses_what_would_not_fit():
    m = gpurnn.LSTM(1, 4096)
    x = np.zeros((2000, 100, 1), np.float32)
    with pytest.raises(ValueError, match=r"record=True would keep 5 arrays of shape \[1, 2000, 100, 4096\] "
                                         r"\(15\.3 GiB\), over the 2 GiB limit"):
        m(x, record=True)


def test_gradcheck_is_public():
    m = gpurnn.GRU(2, 3, dtype="float64", seed=0)
    worst = diagnostics.gradcheck(m, np.random.default_rng(0).standard_normal((4, 2, 2)), lengths=[4, 2])
    assert set(worst) == {"x", "h0", *m.params} and max(worst.values()) < 1e-6
    projected = gpurnn.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, dtype="float64", seed=0)
    h0 = np.random.default_rng(1).standard_normal((4, 2, 2))  # h0 is proj_size wide (c0: zeros, 3 wide)
    worst = diagnostics.gradcheck(projected, np.random.default_rng(0).standard_normal((4, 2, 2)), h0, lengths=[4, 2])
    assert {"c0", "weight_hr_l0", "weight_hr_l1_reverse"} <= set(worst) and max(worst.values()) < 1e-6
    h0, c0 = np.random.default_rng(2).standard_normal((2, 1, 2, 3))
    lstm = gpurnn.LSTM(2, 3, dtype="float64", seed=0)
    worst = diagnostics.gradcheck(lstm, np.random.default_rng(0).standard_normal((4, 2, 2)), (h0, c0), [4, 2])
    assert set(worst) == {"x", "h0", "c0", *lstm.params} and max(worst.values()) < 1e-6
    with pytest.raises(ValueError, match=r"h0: expected an array or \(h0, c0\) for an LSTM, got a tuple of 3"):
        diagnostics.gradcheck(lstm, np.zeros((4, 2, 2)), (h0, c0, c0))
    with pytest.raises(TypeError, match="float64"):
        diagnostics.gradcheck(gpurnn.GRU(2, 3), np.zeros((4, 2, 2)))


def test_diagnostics_bad_input():
    with pytest.raises(ValueError, match="x: gradient_flow needs an input"):
        diagnostics.gradient_flow(gpurnn.LSTM(2, 3), None)
    with pytest.raises(TypeError, match="model: expected gpurnn.RNN, LSTM or GRU"):
        diagnostics.gradient_flow(object(), np.zeros((2, 1, 2)))
    with pytest.raises(TypeError, match="lstm: expected gpurnn.LSTM"):
        diagnostics.set_forget_bias(gpurnn.GRU(2, 3))


def test_diagnose_command(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = tmp_path / "flow.png"
    done = subprocess.run([sys.executable, "-m", "gpurnn", "diagnose", "--cell", "rnn", "--nonlinearity", "relu",
                           "--init-scale", "3", "--seq-len", "60", "--out", str(out), "--backend", "numpy"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "spectral radius" in done.stdout and "        59" in done.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"
    for args, word in ((["--cell", "lstmx"], "--cell"), (["--nonlinearity", "swish"], "--nonlinearity"),
                       (["--out", str(tmp_path / "x.txt")], "--out"), (["--seq-len", "0"], "--seq-len"),
                       (["--cell", "gru", "--nonlinearity", "relu"], "--nonlinearity relu: only the rnn cell")):
        bad = subprocess.run([sys.executable, "-m", "gpurnn", "diagnose", *args], capture_output=True, text=True,
                             env=env)
        assert bad.returncode == 2 and word in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
