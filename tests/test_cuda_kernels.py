"""The CUDA code path under numba's CUDA simulator: every kernel against its
NumPy spec, whole models against the numpy backend, and launch checks."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gpurnn import cells, sequence
from helpers import backend_or_skip, back, forced_algorithm, make, rel_err, run

CELLS = ["rnn", "lstm", "gru"]


@pytest.fixture(scope="module")
def sim():
    return backend_or_skip("cudasim", "cudasim unavailable in this process")


def step_buffers(cell, T, B, H, rng, dtype=np.float64):
    """Random buffers for one step launch of ``cell`` (names as in cells.py)."""
    G = {"rnn": 1, "lstm": 4, "gru": 3}.get(cell, 1)  # "project": the LSTM projection's steps, H = P
    S = {"rnn": 0, "lstm": 4, "gru": 4}.get(cell, 0)
    r = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    gates = rng.uniform(0.05, 0.95, (T, B, S * H)).astype(dtype)  # activations live in (0, 1)
    return dict(gx=r(T, B, G * H), gh=r(B, G * H), b_ih=r(G * H), b_hh=r(G * H),
                h=r(T + 1, B, H), c=r(T + 1, B, H), gates=gates, y=r(T, B, H), dy=r(T, B, H), dh=r(B, H), dc=r(B, H),
                dgates=r(T, B, max(G, S) * H), hp=r(B, H), dproj=r(T, B, H))


ARGS = {  # argument names of each op, in order, after (t, reverse)
    "rnn_forward": ["gx", "gh", "b_ih", "b_hh", "h", "y", "lengths"],
    "rnn_backward": ["h", "dy", "dh", "dgates", "lengths"],
    "lstm_forward": ["gx", "gh", "b_ih", "b_hh", "h", "c", "gates", "y", "lengths"],
    "lstm_backward": ["c", "gates", "dy", "dh", "dc", "dgates", "lengths"],
    "gru_forward": ["gx", "gh", "b_ih", "b_hh", "h", "gates", "y", "lengths"],
    "gru_backward": ["h", "gates", "dy", "dh", "dgates", "lengths"],
    "project_forward": ["hp", "h", "y", "lengths"],
    "project_backward": ["dy", "dh", "dproj", "lengths"],
}


OPS = [(op, "tanh") for op in sorted(ARGS)] + [  # the nonlinearity only matters to the plain RNN
    (op, n) for op in ("rnn_forward", "rnn_backward") for n in ("relu", "sigmoid", "leaky_relu", "elu")]


@pytest.mark.parametrize("op, nonlinearity", OPS)
@pytest.mark.parametrize("T, B, H", [(1, 3, 33), (4, 3, 33), (3, 2, 1), (2, 5, 130)])
@pytest.mark.parametrize("reverse", [0, 1])
def test_kernel_matches_spec(sim, op, nonlinearity, T, B, H, reverse):
    cell = op.split("_")[0]
    rng = np.random.default_rng(T * 100 + B * 10 + H)
    lengths = rng.integers(1, T + 1, size=B).astype(np.int32)
    lengths[0] = T
    if B > 1:
        lengths[-1] = 1  # at least one padded sequence whenever T > 1
    bufs = step_buffers(cell, T, B, H, rng)
    if cell == "rnn" and op.endswith("backward"):
        bufs["h"] = cells.activate(nonlinearity, bufs["h"])  # saved states are phi outputs
    for t in range(T):
        spec_bufs = {k: v.copy() for k, v in bufs.items()}
        kern_bufs = {k: v.copy() for k, v in bufs.items()}
        extra = [nonlinearity] if cell == "rnn" else []
        getattr(cells, op)(t, reverse, *[lengths if n == "lengths" else spec_bufs[n] for n in ARGS[op]], *extra)
        getattr(sim.ops, op)(t, reverse, *[lengths if n == "lengths" else kern_bufs[n] for n in ARGS[op]], *extra)
        for name in ARGS[op]:
            if name != "lengths":
                np.testing.assert_allclose(kern_bufs[name], spec_bufs[name], rtol=1e-12, atol=1e-13,
                                           err_msg=f"{op} t={t} buffer {name}")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, with_lengths", [
    (1, False, False, False), (2, True, False, True), (2, False, True, True), (1, True, True, False),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_parity_with_numpy_backend(sim, cell, num_layers, bidirectional, batch_first, with_lengths, dtype):
    rng = np.random.default_rng(5)
    T, B, I, H = 5, 3, 4, 33
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, dtype=dtype, seed=3)
    ref = make(cell, I, H, backend="numpy", **kw)
    cud = make(cell, I, H, backend="cudasim", **kw)
    assert cud.backend.name == "cudasim"
    LD = num_layers * (2 if bidirectional else 1)
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    h0, c0, d_hn, d_cn = rng.standard_normal((4, LD, B, H)).astype(dtype)
    lengths = np.array([5, 2, 4]) if with_lengths else None
    tol = 1e-12 if dtype == "float64" else 2e-5
    for repeat in range(2):  # second round: re-used workspace, accumulated grads
        outs = [run(m, x, h0, c0, lengths) for m in (ref, cud)]
        d_out = rng.standard_normal(outs[0][0].shape).astype(dtype)
        grads_in = [back(m, d_out, d_hn, d_cn) for m in (ref, cud)]
        for a, b in zip(outs[1] + grads_in[1], outs[0] + grads_in[0]):
            if b is not None:
                assert a.dtype == b.dtype and rel_err(a, b) < tol
        for k in ref.grads:
            assert rel_err(cud.grads[k], ref.grads[k]) < tol, k


def test_dropout_matches_numpy_backend_with_same_seed(sim):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 3))
    ref = make("lstm", 3, 5, num_layers=3, dropout=0.3, seed=8, dtype="float64", backend="numpy")
    cud = make("lstm", 3, 5, num_layers=3, dropout=0.3, seed=8, dtype="float64", backend="cudasim")
    d = rng.standard_normal((4, 2, 5))
    o1, o2 = run(ref, x)[0], run(cud, x)[0]
    assert rel_err(o2, o1) < 1e-12
    assert rel_err(back(cud, d)[0], back(ref, d)[0]) < 1e-12


@pytest.mark.parametrize("cell", CELLS)
def test_stacked_wavefront_matches_numpy_backend(sim, cell):
    """A unidirectional stack runs as a wavefront over spans of time on the CUDA code
    path (4 spans of 7 steps here: 1, 2, 2, 2), layer by layer on NumPy: the same
    outputs and gradients, with dropout and lengths, over two rounds."""
    rng = np.random.default_rng(14)
    T, B, I, H = 7, 3, 4, 6
    assert len(sequence.time_spans(sim.ops, T, B, 4 * H, reverse=False)) == 4
    kw = dict(num_layers=3, dropout=0.4, dtype="float64", seed=9)
    ref, cud = make(cell, I, H, backend="numpy", **kw), make(cell, I, H, backend="cudasim", **kw)
    lengths = np.array([7, 3, 5])
    for _ in range(2):
        x = rng.standard_normal((T, B, I))
        outs = [run(m, x, lengths=lengths) for m in (ref, cud)]
        d_out = rng.standard_normal((T, B, H))
        grads_in = [back(m, d_out) for m in (ref, cud)]
        for a, b in zip(outs[1] + grads_in[1], outs[0] + grads_in[0]):
            if b is not None:
                assert rel_err(a, b) < 1e-12
    for k in ref.grads:
        assert rel_err(cud.grads[k], ref.grads[k]) < 1e-12, k


@pytest.mark.parametrize("num_layers, bidirectional, dropout", [(3, False, 0.4), (2, True, 0.0)])
def test_projected_lstm_matches_numpy_backend(sim, num_layers, bidirectional, dropout):
    """torch's proj_size on the CUDA code path: a unidirectional stack's wavefront over 4
    spans of time (its eval forward through the ring of input projections), both
    directions, lengths; training forwards (every unprojected output kept for dW_hr)
    and eval forwards (all of them in one block) give the same outputs."""
    rng = np.random.default_rng(15)
    T, B, I, H, P = 7, 3, 4, 6, 2
    D = 2 if bidirectional else 1
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, dropout=dropout, dtype="float64", seed=10,
              proj_size=P)
    ref, cud = make("lstm", I, H, backend="numpy", **kw), make("lstm", I, H, backend="cudasim", **kw)
    lengths = np.array([7, 3, 5])
    h0, c0 = rng.standard_normal((num_layers * D, B, P)), rng.standard_normal((num_layers * D, B, H))
    for _ in range(2):
        x = rng.standard_normal((T, B, I))
        outs = [run(m, x, h0, c0, lengths=lengths) for m in (ref, cud)]
        assert outs[0][0].shape == (T, B, D * P) and outs[0][1].shape == h0.shape and outs[0][2].shape == c0.shape
        d_out = rng.standard_normal((T, B, D * P))
        d_hn, d_cn = rng.standard_normal(h0.shape), rng.standard_normal(c0.shape)
        grads_in = [back(m, d_out, d_hn, d_cn) for m in (ref, cud)]
        for a, b in zip(outs[1] + grads_in[1], outs[0] + grads_in[0]):
            assert rel_err(a, b) < 1e-12
    for k in ref.grads:
        assert rel_err(cud.grads[k], ref.grads[k]) < 1e-12, k
    assert cud.algorithms == {"forward": "graph", "backward": "graph"}
    for m in (ref, cud):
        m.eval()
    if dropout == 0:
        training = outs
        outs = [run(m, x, h0, c0, lengths=lengths) for m in (ref, cud)]
        for a, b in zip(outs[0] + outs[1], training[0] + training[1]):
            assert rel_err(a, b) < 1e-12
    outs = [run(m, x, lengths=lengths) for m in (ref, cud)]
    for a, b in zip(outs[1], outs[0]):
        assert rel_err(a, b) < 1e-12


def test_a_projected_lstm_runs_only_the_graph_algorithm(sim):
    model = make("lstm", 3, 5, proj_size=2, backend="cudasim", dtype="float64")
    with forced_algorithm("fused"), pytest.raises(ValueError, match=r"'fused' .*projected LSTM \(proj_size=2\) "
                                                                     r"runs only 'graph'"):
        model(np.zeros((4, 2, 3)))


def test_launch_with_mismatched_buffers_is_refused(sim):
    rng = np.random.default_rng(0)
    bufs = step_buffers("lstm", 3, 2, 4, rng)
    lengths = np.array([3, 3], np.int32)
    ops = sim.ops
    good = [bufs[n] for n in ARGS["lstm_forward"][:-1]]
    before = {k: v.copy() for k, v in bufs.items()}
    bad_gx = np.zeros((3, 2, 12))
    with pytest.raises(ValueError, match=r"gx must have shape \(3, 2, 16\).*got \(3, 2, 12\)"):
        ops.lstm_forward(0, 0, bad_gx, *good[1:], lengths)
    with pytest.raises(ValueError, match=r"b_ih must have shape \(16,\).*got \(12,\)"):
        ops.lstm_forward(0, 0, *good[:2], np.zeros(12), *good[3:], lengths)
    with pytest.raises(ValueError, match="t must be in"):
        ops.lstm_forward(3, 0, *good, lengths)
    with pytest.raises(ValueError, match="lengths must be int32"):
        ops.lstm_forward(0, 0, *good, lengths.astype(np.int64))
    with pytest.raises(ValueError, match="dtype"):
        ops.lstm_forward(0, 0, *good[:4], bufs["h"].astype(np.float32), *good[5:], lengths)
    with pytest.raises(ValueError, match="gemm: shapes do not chain"):
        ops.gemm(np.ones((2, 3)), np.ones((4, 5)), np.ones((2, 5)))
    huge = np.lib.stride_tricks.as_strided(np.zeros(1), (2, 1 << 16, 1 << 16), (0, 0, 0))  # [T+1, B, H], no memory
    with pytest.raises(ValueError, match=r"B\*H elements must be fewer than 2\*\*32 .*B=65536, H=65536"):
        ops.lstm_forward(0, 0, *good[:4], huge, *good[5:], lengths)  # the kernels number elements in 32 bits
    assert all(np.array_equal(bufs[k], before[k]) for k in bufs)  # nothing was written


def test_cudasim_after_real_numba_cuda_import_is_refused(tmp_path):
    code = ("import os, numba.cuda, gpurnn\n"
            "os.environ['GPURNN_BACKEND'] = 'cudasim'\n"
            "gpurnn.get_backend()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPURNN_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "BackendUnavailable" in out.stderr and "before anything imports numba.cuda" in out.stderr


def test_cuda_request_without_gpu_says_what_is_missing():
    code = "import gpurnn; gpurnn.get_backend('cuda')"
    env = {k: v for k, v in os.environ.items() if k != "GPURNN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode == 0:
        pytest.skip("this machine has a working CUDA backend")
    assert "BackendUnavailable" in out.stderr and ("CuPy" in out.stderr or "GPU" in out.stderr)


def test_auto_falls_back_to_numpy_with_reason():
    code = "import gpurnn; b = gpurnn.get_backend(); print(b.name); print(b.reason)"
    env = dict(os.environ, GPURNN_BACKEND="auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    name, reason = out.stdout.splitlines()[:2]
    assert name in ("numpy", "cuda")
    assert reason.startswith("auto: CUDA backend unavailable (") if name == "numpy" else "CUDA on" in reason


def test_cudasim_env_runs_the_kernels_in_a_fresh_process():
    code = ("import numpy as np, gpurnn\n"
            "m = gpurnn.GRU(3, 4, seed=0)\n"
            "out, h = m(np.ones((2, 1, 3), np.float32))\n"
            "print(gpurnn.get_backend().name, out.shape)\n")
    env = dict(os.environ, GPURNN_BACKEND="cudasim")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cudasim (2, 1, 4)"


@pytest.mark.parametrize("cell", CELLS)
def test_diagnostics_on_the_cuda_code_path(sim, cell):
    from gpurnn import diagnostics

    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 2, 3))
    ref = make(cell, 3, 5, num_layers=2, bidirectional=True, dtype="float64", seed=1, backend="numpy")
    cud = make(cell, 3, 5, num_layers=2, bidirectional=True, dtype="float64", seed=1, backend="cudasim")
    a, b = diagnostics.gradient_flow(ref, x, lengths=[6, 4]), diagnostics.gradient_flow(cud, x, lengths=[6, 4])
    assert rel_err(b.dh, a.dh) < 1e-12 and rel_err(b.jac, a.jac) < 1e-12
    for m in (ref, cud):
        m(x, lengths=[6, 4], record=True)
    for k, v in ref.recorded.items():
        assert rel_err(cud.recorded[k], v) < 1e-12, k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_kernel_matches_spec(sim, dtype):
    from gpurnn.optim import adam_update

    rng = np.random.default_rng(3)
    p, g, m, v = (rng.standard_normal((7, 5)).astype(dtype) for _ in range(4))
    v = np.abs(v)
    spec = [a.copy() for a in (p, g, m, v)]
    kern = [a.copy() for a in (p, g, m, v)]
    args = (0.01 / (1 - 0.9 ** 3), 0.9, 0.999, 1e-8, np.sqrt(1 - 0.999 ** 3))
    adam_update(*spec, *args)
    sim.ops.adam_update(*kern, *args)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for a, b in zip(kern, spec):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="adam_update: p, g, m, v must share shape"):
        sim.ops.adam_update(p, g[:3], m, v, *args)


@pytest.mark.parametrize("backend", ["numpy", "cudasim"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional, batch_first", [(False, False), (True, True)])
def test_embedded_first_layer_matches_explicit_rows(request, backend, cell, bidirectional, batch_first):
    """The embedding folded into the first layer (sequence.Embedded) against the same
    layer fed weight[ids] on the numpy backend: outputs, states, every gradient."""
    if backend == "cudasim":
        request.getfixturevalue("sim")
    rng = np.random.default_rng(11)
    T, B, V, I, H = 4, 3, 5, 6, 7
    kw = dict(num_layers=2, bidirectional=bidirectional, batch_first=batch_first, dtype="float64", seed=2)
    ref, folded = make(cell, I, H, backend="numpy", **kw), make(cell, I, H, backend=backend, **kw)
    weight = rng.standard_normal((V, I))
    ids = rng.integers(0, V, (B, T) if batch_first else (T, B))
    LD = 2 * (2 if bidirectional else 1)
    h0, c0, d_hn, d_cn = rng.standard_normal((4, LD, B, H))
    state, d_state = ((h0, c0), (d_hn, d_cn)) if cell == "lstm" else (h0, d_hn)
    flat = (lambda s: list(s)) if cell == "lstm" else (lambda s: [s])  # noqa: E731
    dweight, dweight_ref = np.zeros_like(weight), np.zeros_like(weight)
    for _ in range(2):  # the second call replays on the same workspace and accumulates
        out_ref, state_ref = ref(weight[ids], state)
        out, state_out = folded._call_embedded(ids, weight, dweight, state)
        for a, b in zip([out] + flat(state_out), [out_ref] + flat(state_ref)):
            assert rel_err(a, b) < 1e-12
        d_out = rng.standard_normal(out.shape)
        dx_ref, dstate_ref = ref.backward(d_out, d_state)
        dx, dstate = folded.backward(d_out, d_state)
        assert dx is None  # the embedding's gradient accumulated instead
        np.add.at(dweight_ref, ids, dx_ref)
        for a, b in zip(flat(dstate), flat(dstate_ref)):
            assert rel_err(a, b) < 1e-12
    assert rel_err(dweight, dweight_ref) < 1e-12
    for name in ref.grads:
        assert rel_err(folded.grads[name], ref.grads[name]) < 1e-12, name


@pytest.mark.parametrize("backend", ["numpy", "cudasim"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])  # the cells that save activations
def test_eval_forward_keeps_no_activations(request, backend, cell):
    """An eval forward gives the training forward's results but writes every step's
    activations into one step's block of its own, leaving the saved ones alone (nothing
    is kept for a backward, as cuDNN's inference; the saved gates live in the input
    projection's rows, which every forward rewrites: the LSTM's whole rows, the first 3H
    columns of the GRU's 4H); a recording eval forward keeps them all."""
    if backend == "cudasim":
        request.getfixturevalue("sim")
    rng = np.random.default_rng(12)
    m = make(cell, 3, 5, num_layers=2, bidirectional=True, dtype="float64", seed=4, backend=backend)
    x, lengths = rng.standard_normal((6, 2, 3)), np.array([6, 4])
    trained = run(m, x, lengths=lengths)
    ws = m._cache[0]
    for d in ws.dirs:
        d.gates[...] = np.nan
    m.eval()
    for _ in range(2):
        for a, b in zip(run(m, x, lengths=lengths), trained):
            if b is not None:
                np.testing.assert_array_equal(a, b)
        assert next(reversed(m._workspaces.values())) is ws  # the same buffers were used
        kept = [d.gates[..., d.gx.shape[2]:] for d in ws.dirs]  # the columns no forward's projection writes
        assert all(np.isnan(k).all() for k in kept) and all(k.size == (cell == "gru") * 6 * 2 * 5 for k in kept)
    m(x, lengths=lengths, record=True)
    assert not any(np.isnan(d.gates).any() for d in ws.dirs)


def test_gather_rows_and_one_hot_kernels_match_spec(sim):
    from gpurnn.backend import NumpyOps

    rng = np.random.default_rng(12)
    table = rng.standard_normal((5, 33))
    ids = rng.integers(0, 5, 7).astype(np.int32)
    out, spec = np.full((7, 33), np.nan), np.empty((7, 33))
    sim.ops.gather_rows(table, ids, out)
    NumpyOps.gather_rows(table, ids, spec)
    assert np.array_equal(out, spec)
    onehot, spec = np.full((7, 5), np.nan), np.empty((7, 5))
    sim.ops.one_hot(ids, onehot)
    NumpyOps.one_hot(ids, spec)
    assert np.array_equal(onehot, spec)
    with pytest.raises(ValueError, match=r"gather_rows: expected table \[V, 33\], ids int32 \[6\]"):
        sim.ops.gather_rows(table, ids, out[:6])
    with pytest.raises(ValueError, match=r"one_hot: expected ids int32 \[7\]"):
        sim.ops.one_hot(ids.astype(np.int64), onehot)


@pytest.mark.parametrize("V", [9, 5])  # unfolded (V > E = 6) and folded embedding
@pytest.mark.parametrize("cell, P", [("gru", 0), ("lstm", 4)])  # and an LSTM projected to P
def test_charlm_step_matches_numpy_backend(sim, V, cell, P):
    import gpurnn

    rng = np.random.default_rng(13)
    x, y = rng.integers(0, V, (5, 3)), rng.integers(0, V, (5, 3))
    models = [gpurnn.CharLM(V, 6, num_layers=2, cell=cell, dtype="float64", seed=1, backend=b, proj_size=P)
              for b in ("numpy", "cudasim")]
    losses = []
    for m in models:
        losses.append(m.forward(x, y)[0])
        m.backward()
    assert abs(losses[1] - losses[0]) < 1e-12 * abs(losses[0])
    for k, g in models[0].grads.items():
        assert rel_err(models[1].grads[k], g) < 1e-12, k


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("V", [5, 300])  # fewer classes than a block's threads, and more
def test_softmax_xent_kernel_matches_spec(sim, dtype, V):
    from gpurnn.nn import softmax_xent

    rng = np.random.default_rng(14)
    N = 3
    logits = (rng.standard_normal((N, V)) * 30).astype(dtype)  # large: the log-sum-exp must be stable
    targets = rng.integers(0, V, N).astype(np.int32)
    weight = np.array([0.5, 0.0, 0.5], dtype)  # the middle row is not counted
    outs = [(np.full(N, np.nan, dtype), np.full((N, V), np.nan, dtype)) for _ in range(2)]
    softmax_xent(logits, targets, weight, *outs[0])
    sim.ops.softmax_xent(logits, targets, weight, *outs[1])
    tol = 1e-12 if dtype == "float64" else 1e-6
    for spec, kern in zip(*outs):
        assert kern.dtype == spec.dtype and rel_err(kern, spec) < tol
    assert not outs[1][1][1].any()  # the uncounted row's gradient is zero
    with pytest.raises(ValueError, match=r"softmax_xent: expected logits and d_logits \[3, %d\]" % V):
        sim.ops.softmax_xent(logits, targets.astype(np.int64), weight, *outs[1])
    bad = np.array([0, V, -1], np.int32)  # the simulator would raise on an out-of-bounds read
    sim.ops.softmax_xent(logits, bad, weight, *outs[1])
    assert np.isfinite(outs[1][0][0]) and np.isnan(outs[1][0][1:]).all()


def test_a_blocks_threads_share_one_static_shared_array_when_they_ask_at_once(sim, monkeypatch):
    """numba's simulator looks a static shared array up and creates it when missing,
    without a lock; gpurnn.backend makes that one step. Here creating one takes 10 ms,
    so without the lock every thread that asked meanwhile would get an array of its own
    (as a persistent kernel's barrier flag sometimes did)."""
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared(0)
    empty = np.empty

    def slow_empty(*args, **kwargs):
        time.sleep(0.01)  # the other threads ask while this one creates it
        return empty(*args, **kwargs)

    monkeypatch.setattr(np, "empty", slow_empty)
    got, together = [], threading.Barrier(8)

    def ask():
        together.wait()
        got.append(shared.array(1, np.int32))  # one source line, as a kernel's

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(a is got[0] for a in got)
