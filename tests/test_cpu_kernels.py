"""The NumPy backend's fused float32 steps (gpurnn.cpu_kernels) against the spec (gpurnn.cells).

Every step, forward and backward, every cell and nonlinearity, both directions,
ragged lengths, with the buffers sharing storage as gpurnn.sequence lays them out
and kept apart: what the step writes must equal the spec's to float32 rounding
(the fused tanh is a rational approximation), padded rows exactly.
"""

import numpy as np
import pytest

import gpurnn
from gpurnn import backend, cells
from gpurnn.sequence import GATE_BLOCKS

pytest.importorskip("numba")
from gpurnn import cpu_kernels  # noqa: E402

from helpers import make, rel_err  # noqa: E402

T, B, I, H = 4, 5, 3, 7
LENGTHS = np.array([4, 2, 1, 4, 3])


def test_tanh_is_within_five_ulps_of_float64():
    x = np.concatenate([np.linspace(-10, 10, 200_001), np.geomspace(1e-8, 10, 20_001),
                        -np.geomspace(1e-8, 10, 20_001), [0.0]]).astype(np.float32)
    out, y = np.empty((1, x.size), np.float32), np.empty((1, x.size), np.float32)
    zeros = np.zeros((1, x.size), np.float32)
    cpu_kernels._rnn_forward(cpu_kernels.TANH, x[None], zeros, zeros[0], zeros[0], zeros, out, y, np.ones(1, bool))
    exact = np.tanh(x.astype(np.float64))
    ulps = np.abs(out[0] - exact) / np.spacing(np.abs(exact).astype(np.float32))
    assert ulps.max() <= 5 and out[0][-1] == 0
    assert np.isnan(_tanh(np.float32(np.nan)))
    assert 1 - 3e-7 < _tanh(np.float32(np.inf)) <= 1 and _tanh(np.float32(-np.inf)) == -_tanh(np.float32(np.inf))


def _tanh(v):
    out, y = np.empty((1, 1), np.float32), np.empty((1, 1), np.float32)
    zero = np.zeros((1, 1), np.float32)
    cpu_kernels._rnn_forward(cpu_kernels.TANH, np.full((1, 1), v, np.float32), zero, zero[0], zero[0], zero, out, y,
                             np.ones(1, bool))
    return out[0, 0]


def _buffers(cell, rng, shared, name):
    """A direction's buffers as gpurnn.sequence lays them out (shared: the gates in the
    input projection's storage, the GRU's projection the first 3H columns of its 4H
    rows, and the gate gradients in the gates'), filled with values a step may meet:
    pre-activations before a forward step, activations in (0, 1) before a backward one."""
    G = GATE_BLOCKS[cell]
    f = np.float32
    gx = rng.standard_normal((T, B, G * H)) * 2 if name == "forward" else rng.random((T, B, G * H))
    buf = dict(gx=gx.astype(f), gh=rng.standard_normal((B, G * H)).astype(f),
               b_ih=rng.standard_normal(G * H).astype(f), b_hh=rng.standard_normal(G * H).astype(f),
               h=rng.standard_normal((T + 1, B, H)).astype(f), c=rng.standard_normal((T + 1, B, H)).astype(f),
               y=rng.standard_normal((T, B, H)).astype(f), dy=rng.standard_normal((T, B, H)).astype(f),
               dh=rng.standard_normal((B, H)).astype(f), dc=rng.standard_normal((B, H)).astype(f))
    if cell == "lstm":
        buf["gates"] = buf["gx"] if shared else rng.random((T, B, 4 * H)).astype(f)
        buf["dgates"] = buf["gates"] if shared else np.zeros((T, B, 4 * H), f)
    elif cell == "gru":
        buf["gates"] = rng.random((T, B, 4 * H)).astype(f)
        if shared:
            buf["gates"][:, :, :3 * H] = buf["gx"]
            buf["gx"] = buf["gates"][:, :, :3 * H]
        buf["dgates"] = buf["gates"] if shared else np.zeros((T, B, 4 * H), f)
    else:
        buf["dgates"] = np.zeros((T, B, H), f)
    return buf


def _step(module, cell, name, t, reverse, buf, lengths, nonlinearity):
    b = buf
    if cell == "rnn":
        args = ((b["gx"], b["gh"], b["b_ih"], b["b_hh"], b["h"], b["y"], lengths, nonlinearity) if name == "forward"
                else (b["h"], b["dy"], b["dh"], b["dgates"], lengths, nonlinearity))
    elif cell == "lstm":
        args = ((b["gx"], b["gh"], b["b_ih"], b["b_hh"], b["h"], b["c"], b["gates"], b["y"], lengths)
                if name == "forward" else (b["c"], b["gates"], b["dy"], b["dh"], b["dc"], b["dgates"], lengths))
    else:
        args = ((b["gx"], b["gh"], b["b_ih"], b["b_hh"], b["h"], b["gates"], b["y"], lengths) if name == "forward"
                else (b["h"], b["gates"], b["dy"], b["dh"], b["dgates"], lengths))
    getattr(module, f"{cell}_{name}")(t, reverse, *args)


CASES = [("lstm", "tanh"), ("gru", "tanh")] + [("rnn", n) for n in cells.NONLINEARITIES]


@pytest.mark.parametrize("cell, nonlinearity", CASES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "apart"])
@pytest.mark.parametrize("reverse", [0, 1])
def test_every_step_matches_the_spec(cell, nonlinearity, shared, reverse):
    rng = np.random.default_rng([CASES.index((cell, nonlinearity)), shared, reverse])
    for name in ("forward", "backward"):
        for t in range(T):
            spec = _buffers(cell, rng, shared, name)
            fused = {k: v.copy() for k, v in spec.items()}
            _relink(fused, cell, shared)
            _step(cells, cell, name, t, reverse, spec, LENGTHS, nonlinearity)
            _step(cpu_kernels, cell, name, t, reverse, fused, LENGTHS, nonlinearity)
            padded = t >= LENGTHS
            for k in spec:
                np.testing.assert_allclose(fused[k], spec[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} t={t} {k}")
                if spec[k].ndim == 3 and spec[k].shape[0] == T:  # per-step buffers: padded rows exactly
                    assert np.array_equal(fused[k][t, padded], spec[k][t, padded]), (name, t, k)
            assert np.array_equal(fused["dh"][padded], spec["dh"][padded])


def _relink(buf, cell, shared):
    """Copies of a shared layout share storage again, as the originals do."""
    if not shared:
        return
    if cell == "lstm":
        buf["gates"] = buf["dgates"] = buf["gx"]
    elif cell == "gru":
        buf["gx"], buf["dgates"] = buf["gates"][:, :, :3 * H], buf["gates"]


def test_a_nan_reaches_the_state_as_through_the_spec():
    buf = _buffers("lstm", np.random.default_rng(0), True, "forward")
    buf["gx"][0, 2, 5] = np.nan
    _step(cpu_kernels, "lstm", "forward", 0, 0, buf, np.full(B, T), "tanh")
    assert np.isnan(buf["h"][1, 2]).any() and np.isfinite(buf["h"][1, [0, 1, 3, 4]]).all()


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_a_model_with_fused_steps_matches_the_spec(cell):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4, I)).astype(np.float32)
    lengths = np.array([6, 3, 1, 5])
    results = {}
    for fused in (True, False):
        backend.set_cpu_kernels(fused)
        try:
            model = make(cell, I, H, num_layers=2, bidirectional=True, seed=1, backend="numpy")
            out, _ = model(x, lengths=lengths)
            dx = model.backward(np.ones_like(out))[0]
            model.eval()  # the eval layout: one cell state and one gates block at time stride 0
            results[fused] = [out, dx, *model.grads.values(), *host_outputs(model(x, lengths=lengths)),
                              *host_outputs(model(x))]
        finally:
            backend.set_cpu_kernels(None)
    for a, b in zip(results[True], results[False]):
        assert rel_err(a, b) < 1e-5


def host_outputs(result):
    """out, h_n (and c_n) of a call, flat."""
    out, state = result
    return [out, *(state if isinstance(state, tuple) else (state,))]


def test_float64_and_half_run_the_spec():
    x = np.random.default_rng(0).standard_normal((5, 2, I))
    for dtype in ("float64", "float16"):
        outs = []
        for fused in (True, False):
            backend.set_cpu_kernels(fused)
            try:
                outs.append(gpurnn.GRU(I, H, seed=0, dtype=dtype, backend="numpy")(x.astype(dtype))[0])
            finally:
                backend.set_cpu_kernels(None)
        assert np.array_equal(outs[0], outs[1]), dtype  # the same code, bit for bit


def test_the_switch(monkeypatch):
    assert backend.cpu_kernels()  # numba is here: on by default
    monkeypatch.setenv("GPURNN_CPU_KERNELS", "0")
    assert not backend.cpu_kernels()
    backend.set_cpu_kernels(True)  # the call outranks the environment
    try:
        assert backend.cpu_kernels()
    finally:
        backend.set_cpu_kernels(None)
    monkeypatch.setenv("GPURNN_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="GPURNN_CPU_KERNELS: expected 1, 0 or auto, got 'yes'"):
        backend.cpu_kernels()
    with pytest.raises(TypeError, match="mode: expected True, False or None, got 'on'"):
        backend.set_cpu_kernels("on")


def test_every_step_gets_c_contiguous_arrays(monkeypatch):
    """numba compiles a strided view (layout "A") into a row loop that does not vectorize
    (a bidirectional layer's backward step ran 2.5x slower): whatever a model's layout
    (directions, lengths, projections, eval's one state block, batch_first, dropout), the
    compiled steps must be handed C-contiguous arrays only."""
    import numba

    seen = {}

    def spy(name, kernel):
        def call(*args):
            seen.setdefault(name, set()).update(
                numba.typeof(a).layout for a in args if isinstance(a, np.ndarray) and a.ndim)
            return kernel(*args)
        return call

    for name in ("_rnn_forward", "_rnn_backward", "_lstm_forward", "_lstm_backward", "_gru_forward", "_gru_backward"):
        monkeypatch.setattr(cpu_kernels, name, spy(name, getattr(cpu_kernels, name)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, I)).astype(np.float32)
    options = [dict(bidirectional=True), dict(num_layers=2, dropout=0.3, batch_first=True), dict(proj_size=4)]
    for cell in ("rnn", "lstm", "gru"):
        for kw in options[:2] + (options[2:] if cell == "lstm" else []):
            model = make(cell, I, H, seed=0, backend="numpy", **kw)
            inputs = x.transpose(1, 0, 2).copy() if kw.get("batch_first") else x
            for lengths in (None, np.array([5, 2, 4])):
                out, _ = model(inputs, lengths=lengths)
                model.backward(np.ones_like(out))
                model.eval()
                model(inputs, lengths=lengths)
                model.train()
    assert set(seen) == {"_rnn_forward", "_rnn_backward", "_lstm_forward", "_lstm_backward", "_gru_forward",
                         "_gru_backward"}
    assert all(layouts == {"C"} for layouts in seen.values()), seen


@pytest.mark.parametrize("shape", [(1, 5), (33, 7), (4 * 130, 130), (16, 16), (3 * 40, 20)])
def test_blocked_transpose_is_the_transpose(shape):
    a = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = np.full(shape[::-1], np.nan, np.float32)
    backend.transpose_into(out, a)
    assert np.array_equal(out, a.T)


def test_recurrent_operand_copies_w_hh_t_only_where_it_pays():
    """A contiguous W_hh^T speeds up OpenBLAS's step GEMM from 8 rows and 8 steps up; below
    (sampling: one row, one step) its copy would cost more than the GEMMs."""
    w_hh = np.random.default_rng(0).standard_normal((4 * 9, 9)).astype(np.float32)
    w_hh_t = np.zeros((9, 4 * 9), np.float32)
    ops = backend.NumpyOps()
    for batch, steps in ((1, 1), (1, 100), (7, 100), (64, 7)):
        w, trans = ops.recurrent_operand(w_hh, w_hh_t, batch, steps)
        assert w is w_hh and trans and not w_hh_t.any()
    w, trans = ops.recurrent_operand(w_hh, w_hh_t, 8, 8)
    assert w is w_hh_t and not trans and np.array_equal(w_hh_t, w_hh.T)
