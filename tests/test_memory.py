"""Memory: the workspace layout whose buffers share storage, and ``memory_report``.

The input projection gx, the saved gates and the gate gradients dgates share one
buffer, the GRU's gx the first 3H columns of its 4H rows (sequence.SHARE_PROJECTION_STORAGE); the
gradients flowing down a stack (d_out, every layer's input gradient, and dx where
I == D*H) share d_out's (stack.SHARE_GRADIENT_STORAGE); a unidirectional layer's
output is its states, without padded steps or dropout on it
(stack.SHARE_OUTPUT_STORAGE). A layout test runs forward and backward with every
workspace buffer poisoned (NaN) before each call and compares with the unshared
layout, bit for bit, on NumPy and under the CUDA simulator (graph, fused and
persistent steps; bidirectional layers, a wavefront of unidirectional ones,
dropout, padded sequences or none). The report's bytes add up to what NumPy
allocated.
"""

import contextlib
import gc
import tracemalloc

import numpy as np
import pytest

import gpurnn
from gpurnn import sequence, stack
from helpers import back, backend_or_skip, forced_algorithm, host, make, run

H = 5
CASES = [("lstm", 3, 2, True, 0.3), ("gru", H, 3, False, 0.0), ("rnn", 2 * H, 2, True, 0.0),
         ("lstm", H, 3, False, 0.4), ("lstm proj_size=2", 4, 2, True, 0.3)]
# (cell, I, layers, bidirectional, dropout): dx shares where I == D*H_out (H, or the projection's 2)


def make_case(cell, I, **kwargs):
    """The layer of a case: "lstm proj_size=2" is an LSTM with torch's projection."""
    name, *projection = cell.split()
    return make(name, I, H, **kwargs, **{k: int(v) for k, v in (p.split("=") for p in projection)})


def poison(model):
    """NaN into every buffer a call writes before reading (not the staged inputs)."""
    for ws in model._workspaces.values():
        bufs = [ws.h_n, ws.c_n, ws.dx, ws.dh0, ws.dc0, *ws.out, *ws.d_in[1:]]
        for d in ws.dirs:
            bufs += [d.gx, d.gh, d.h, d.c, d.gates, d.dgates, d.dh, d.dc, d.h_cell, d.y_cell, d.hp, d.dproj, d.dh_cell]
        for b in bufs:
            if b is not None:
                b[...] = np.nan


def calls(backend, cell, I, L, bi, dropout, padded, share, monkeypatch):
    monkeypatch.setattr(sequence, "SHARE_PROJECTION_STORAGE", share)
    monkeypatch.setattr(stack, "SHARE_GRADIENT_STORAGE", share)
    monkeypatch.setattr(stack, "SHARE_OUTPUT_STORAGE", share)
    D = 2 if bi else 1
    model = make_case(cell, I, num_layers=L, bidirectional=bi, dropout=dropout, dtype="float64", seed=2,
                      backend=backend)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, I))
    lengths = np.array([4, 1, 3]) if padded else None  # padded steps output 0 but carry the state
    H_out = model.proj_size or H
    d_out = rng.standard_normal((4, 3, D * H_out))
    run(model, x, lengths=lengths)  # a training forward allocates every buffer, which poison then fills
    poison(model)
    model.zero_grad()
    results = list(run(model, x, lengths=lengths)) + list(back(model, d_out))
    results += [host(g).copy() for g in model.grads.values()]
    dirs = [d for ws in model._workspaces.values() for d in ws.dirs]
    gradients_share = all(d.dgates is (d.gx if d.gates is None else d.gates) for d in dirs)
    gates_share = all(d.gates is not None and np.shares_memory(d.gx, d.gates) for d in dirs)
    ws = next(iter(model._workspaces.values()))
    assert all((d_in is ws.d_out) == share for d_in in ws.d_in[1:])
    assert (ws.dx is ws.d_out) == (share and I == D * H_out)
    for layer in range(L):
        output_is_state = share and D == 1 and not padded and (layer == L - 1 or not dropout)
        assert np.shares_memory(ws.out[layer], ws.dirs[layer].h) == output_is_state
    assert gradients_share == share and gates_share == (share and cell != "rnn")
    return results


@pytest.mark.parametrize("backend, forced, cell, I, L, bi, dropout",
                         [(backend, forced, *case) for backend, forced in (("numpy", None), ("cudasim", None))
                          for case in CASES]
                         + [("cudasim", algorithm, *case) for algorithm in ("fused", "persistent")
                            for case in CASES[:2]])  # the cells whose gates share storage
@pytest.mark.parametrize("padded", [True, False])
def test_shared_storage_matches_separate_buffers(backend, forced, cell, I, L, bi, dropout, padded, monkeypatch):
    if backend == "cudasim":
        backend_or_skip("cudasim", "cudasim unavailable in this process")
    with forced_algorithm(forced):
        separate = calls(backend, cell, I, L, bi, dropout, padded, False, monkeypatch)
        shared = calls(backend, cell, I, L, bi, dropout, padded, True, monkeypatch)
    for a, b in zip(shared, separate):
        if b is not None:
            assert np.isfinite(a).all()
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", "cudasim"])
@pytest.mark.parametrize("cell, I, L, bi, dropout", CASES)
def test_a_backward_runs_again_from_what_its_restore_writes(backend, cell, I, L, bi, dropout, monkeypatch):
    """Run every backward twice, as the GPU's algorithm timer does, with every buffer a
    call writes poisoned in between and only the gradients it adds into put back; the
    ``restore`` the backward hands to ops.run (d_out staged again, the forward rerun)
    must bring back all it reads, so the second run gives the first one's results."""
    if backend == "cudasim":
        backend_or_skip("cudasim", "cudasim unavailable in this process")
    model = make_case(cell, I, num_layers=L, bidirectional=bi, dropout=dropout, dtype="float64", seed=2,
                      backend=backend)
    ops, twice = model._ops, []
    run_once = ops.run

    def run_twice(ws, name, fn, capture=True, accumulates=(), restore=None):
        if name != "backward":
            return run_once(ws, name, fn, capture, accumulates, restore)
        before = [a.copy() for a in accumulates]
        run_once(ws, name, fn, capture, accumulates, restore)
        first = [host(r).copy() for r in ws.results(name) if r is not None]
        first += [host(a - b) for a, b in zip(accumulates, before)]
        for a, copy in zip(accumulates, before):
            a[...] = copy
        poison(model)
        ws.d_out[...] = np.nan
        restore()
        run_once(ws, name, fn, capture, accumulates, restore)
        second = [host(r).copy() for r in ws.results(name) if r is not None]
        second += [host(a - b) for a, b in zip(accumulates, before)]
        twice.append((first, second))

    monkeypatch.setattr(ops, "run", run_twice)
    rng = np.random.default_rng(0)
    D = 2 if bi else 1
    for lengths in (np.array([4, 1, 3]), None):
        run(model, rng.standard_normal((4, 3, I)), lengths=lengths)
        back(model, rng.standard_normal((4, 3, D * (model.proj_size or H))))
    assert len(twice) == 2
    for first, second in twice:
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)


def _train_once(x, d_out, lengths, proj_size=0):
    model = gpurnn.LSTM(16, 32, num_layers=2, bidirectional=True, dropout=0.2, seed=0, backend="numpy",
                        proj_size=proj_size)
    results = model(x, lengths=lengths), model.backward(d_out)
    del results
    return model


@pytest.mark.parametrize("proj_size", [0, 8])
def test_report_adds_up_to_what_numpy_allocated(proj_size):
    x = np.ones((20, 8, 16), np.float32)
    d_out = np.ones((20, 8, 2 * (proj_size or 32)), np.float32)
    lengths = np.full(8, 20)
    _train_once(x, d_out, lengths, proj_size)  # imports and caches first: they are not the model's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        model = _train_once(x, d_out, lengths, proj_size)
        gc.collect()
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    report = model.memory_report()
    assert 0.95 * allocated <= report.total <= allocated  # the rest: small Python objects
    rows = {(group, name): nbytes for group, name, nbytes in report.rows}
    G, H, T, B = 4, 32, 20, 8
    assert rows["workspace T=20 B=8", "gx"] == 4 * T * B * G * H * 4  # 2 layers x 2 directions, dgx inside
    assert ("workspace T=20 B=8", "dgx") not in rows
    assert rows["workspace T=20 B=8", "step_gates"] == 4 * B * G * H * 4  # one step's block, seen at every t
    assert rows["parameters", "all"] == sum(p.nbytes for p in model.params.values())
    assert "model total" in str(report)
    if proj_size:  # the unprojected outputs every step's projection read, and their gradients
        assert rows["workspace T=20 B=8", "h_cell"] == 4 * (T + 1) * B * H * 4
        assert rows["workspace T=20 B=8", "dproj"] == 4 * T * B * proj_size * 4


@pytest.mark.parametrize("cell, bound", [("lstm", 10.0), ("gru", 9.0)])
def test_numpy_training_peak_stays_down(cell, bound):
    """Issue 11's NumPy measure: tracemalloc's peak over one training forward+backward
    at T=200, B=32, I=H=256, in units of T*B*H*4 bytes (061083c: LSTM 20.4, GRU 20.3;
    the target 0.7x of 19.4 = 13.6; kernels/NOTES.md v17: LSTM 9.44, GRU 8.32)."""
    T, B, H = 200, 32, 256
    make_layer = {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU}[cell]
    x = np.random.default_rng(0).standard_normal((T, B, H)).astype(np.float32)
    d_out = np.ones((T, B, H), np.float32)
    warm = make_layer(H, H, backend="numpy", seed=1)  # numba compiles the fused steps here, not below
    warm(x[:2])
    warm.backward(d_out[:2])
    model = make_layer(H, H, backend="numpy", seed=0)
    gc.collect()
    tracemalloc.start()
    try:
        model(x)
        model.backward(d_out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / (T * B * H * 4) <= bound


def test_report_counts_a_models_flat_buffers_once():
    lm = gpurnn.CharLM(20, 16, num_layers=2, backend="numpy")
    ids = np.zeros((5, 3), np.int64)
    lm.forward(ids, ids)
    lm.backward()
    report = lm.memory_report()
    rows = {(group, name): nbytes for group, name, nbytes in report.rows}
    assert rows["parameters", "all"] == rows["gradients", "all"] == sum(p.nbytes for p in lm.params.values())
    assert any(group == "workspace T=5 B=3" for group, _, _ in report.rows)


def test_clear_cache_drops_every_shapes_buffers():
    model = gpurnn.GRU(3, 4, backend="numpy")
    for T in (2, 3):
        out, _ = model(np.ones((T, 2, 3), np.float32))
    assert len(model._workspaces) == 2
    with_buffers = model.memory_report().total
    model.clear_cache()
    assert model.memory_report().total < with_buffers and not model._workspaces
    with pytest.raises(RuntimeError, match="no forward pass"):
        model.backward(np.ones_like(out))
    lm = gpurnn.CharLM(5, 4, backend="numpy")
    lm.forward(np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64))
    lm.clear_cache()
    assert not lm.rnn._workspaces


@pytest.mark.parametrize("backend", ["numpy", "cudasim"])
def test_inference_holds_no_training_buffers(backend):
    """An eval-mode model allocates neither saved activations nor gradient buffers; its
    first training forward adds them (the GRU's 3H-wide projection moves into the first
    3H columns of its gates' 4H rows), and the eval forward then leaves the saved gates
    untouched but for those columns, which every forward writes (an eval forward drops
    the training cache, so nothing reads them)."""
    if backend == "cudasim":
        backend_or_skip("cudasim", "cudasim unavailable in this process")
    model = make("gru", 6, 8, num_layers=2, bidirectional=True, backend=backend, dtype="float64", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((10, 4, 6))
    out_eval = host(model(x)[0])
    training_names = {"d_out", "d_hn", "dx", "dh0", "dh", "ones"}  # gates and dgates in gx's rows, d_in in d_out
    names = {name for _, name, _ in model.memory_report().rows}
    assert not names & training_names

    def workspace():
        return sum(n for group, _, n in model.memory_report().rows if group.startswith("workspace"))

    inference_bytes = workspace()
    model.train()
    out_train = host(model(x)[0])
    rows = model.memory_report().rows
    assert training_names <= {name for _, name, _ in rows}
    ws = next(iter(model._workspaces.values()))
    H = 8
    projections = len(ws.dirs) * 10 * 4 * 4 * H * 8  # [T, B, 4H] float64 a direction, gates in their rows
    if ws.dirs[0].gx_ring is None:  # an inference projection of its own (one span) gave way to them
        projections -= len(ws.dirs) * 10 * 4 * 3 * H * 8
    added = sum(n for _, name, n in rows if name in training_names) + projections
    assert workspace() == inference_bytes + added
    assert all(d.gates.shape[2] == 4 * H and np.shares_memory(d.gx, d.gates) for d in ws.dirs)
    for d in ws.dirs:
        d.gates[...] = np.nan
    model.eval()
    np.testing.assert_allclose(host(model(x)[0]), out_eval, rtol=1e-12)
    np.testing.assert_allclose(out_train, out_eval, rtol=1e-12)
    assert all(np.isnan(host(d.gates)[..., 3 * H:]).all() for d in ws.dirs)  # eval wrote its own step block


@pytest.mark.parametrize("backend, forced, dtype", [("numpy", None, "float64"), ("numpy", None, "float16"),
                                                     ("cudasim", None, "float64"), ("cudasim", "fused", "float64"),
                                                     ("cudasim", "persistent", "float64"),
                                                     ("cudasim", None, "bfloat16")])
@pytest.mark.parametrize("lengths", [None, [6, 2, 5]])
def test_lstm_inference_keeps_one_cell_state(backend, forced, dtype, lengths):
    """An inference-only LSTM shape holds one [B, H] cell state per layer and direction,
    seen at every step (each element read, then written, by its one thread); its
    outputs equal a training forward's bit for bit, before and after training added
    the T+1 states backward reads."""
    if backend == "cudasim":
        backend_or_skip("cudasim", "cudasim unavailable in this process")
    model = make("lstm", 4, 5, num_layers=2, bidirectional=True, backend=backend, dtype=dtype, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(model.dtype)
    with forced_algorithm(forced):
        evaluated = [host(a) for a in run(model, x, lengths=lengths)]
        rows = {name: nbytes for _, name, nbytes in model.memory_report().rows}
        assert rows["c"] == 4 * 3 * 5 * model.dtype.itemsize  # 2 layers x 2 directions of [B, H]
        model.train()
        trained = [host(a) for a in run(model, x, lengths=lengths)]
        model.eval()
        again = [host(a) for a in run(model, x, lengths=lengths)]
    ws = next(iter(model._workspaces.values()))
    assert all(d.c.shape == (7, 3, 5) and d.c is not d.c_step for d in ws.dirs)
    for a, b, c in zip(evaluated, trained, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)


RING_CASES = [("lstm", 1, False), ("gru", 2, True), ("rnn", 3, False)]  # (cell, layers, bidirectional)


@pytest.mark.parametrize("backend, forced", [("numpy", None), ("cudasim", None), ("cudasim", "fused"),
                                             ("cudasim", "persistent")])
@pytest.mark.parametrize("cell, L, bi", RING_CASES)
@pytest.mark.parametrize("lengths", [None, [9, 2, 6]])
def test_inference_projects_its_spans_into_a_ring_of_two_slots(backend, forced, cell, L, bi, lengths, monkeypatch):
    """Cut into 4 spans (NumPy too, here), an inference forward writes span k's input
    projection into slot k % 2 of a ring half gx's size (T=9: spans of 2, 2, 2, 3 in
    two 3-row slots) and counts its steps from the span's start; its outputs equal a
    training forward's bit for bit, with the ring poisoned before each call, before
    and after training allocated the full gx (which inference forwards then leave alone)."""
    if backend == "cudasim":
        backend_or_skip("cudasim", "cudasim unavailable in this process")
    model = make(cell, 4, 5, num_layers=L, bidirectional=bi, backend=backend, dtype="float64", seed=0).eval()
    monkeypatch.setattr(model._ops, "input_spans", lambda batch, gates_width: 4)
    x = np.random.default_rng(0).standard_normal((9, 3, 4))

    def infer():
        for d in ws.dirs:
            d.gx_ring[...] = np.nan
        return [host(a).copy() for a in run(model, x, lengths=lengths) if a is not None]

    with forced_algorithm(forced):
        run(model, x[:, :1], lengths=None if lengths is None else lengths[:1])  # another shape's workspace first
        ws = model._workspace(9, 3, False, None, lengths is not None)
        ws.for_inference(model._ops)
        assert all(d.gx is None and d.gx_ring.shape == (6, 3, sequence.GATE_BLOCKS[cell] * 5) for d in ws.dirs)
        evaluated = infer()
        rows = {name: n for group, name, n in model.memory_report().rows if group == "workspace T=9 B=3"}
        G = sequence.GATE_BLOCKS[cell]
        assert rows["gx_ring"] == len(ws.dirs) * 6 * 3 * G * 5 * 8 and "gx" not in rows
        assert rows["span_lengths"] == rows["span_starts"] * 3 == len(ws.dirs) * 4 * 3 * 4  # int32, 4 spans
        model.train()
        trained = [host(a).copy() for a in run(model, x, lengths=lengths) if a is not None]
        model.eval()
        projections = [host(d.gx).copy() for d in ws.dirs]
        again = infer()
    assert all(d.gx.shape == (9, 3, sequence.GATE_BLOCKS[cell] * 5) for d in ws.dirs)
    for d, before in zip(ws.dirs, projections):
        np.testing.assert_array_equal(host(d.gx), before)  # the ring, not gx, took the inference forward
    for a, b, c in zip(evaluated, trained, again):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)


def test_an_inference_forward_refuses_spans_its_ring_was_not_made_for(monkeypatch):
    model = make("gru", 4, 5, backend="numpy", seed=0).eval()
    x = np.zeros((9, 3, 4), np.float32)
    monkeypatch.setattr(model._ops, "input_spans", lambda batch, gates_width: 4)
    model(x)
    monkeypatch.setattr(model._ops, "input_spans", lambda batch, gates_width: 3)
    with pytest.raises(RuntimeError, match=r"spans of time \[\(0, 3\), \(3, 6\), \(6, 9\)\], but its workspace's "
                                           r"ring of input projections was allocated for \[\(0, 2\)"):
        model(x)


def test_a_slot_is_rewritten_only_after_its_last_reader(monkeypatch):
    """The ring's ordering, as the marks a GPU's streams wait on: span k's projection
    (on the side stream) waits for the end of span k-2's steps, the slot's last
    reader, and span k's steps wait for its projection. Marks are numbered in the
    order they are made: the set-up, then per span its projection and its steps' end."""
    model = make("lstm", 4, 5, backend="numpy", seed=0).eval()
    ops = model._ops
    events, marks = [], iter(range(1000))
    monkeypatch.setattr(ops, "input_spans", lambda batch, gates_width: 4)
    monkeypatch.setattr(ops, "mark", lambda: next(marks))
    monkeypatch.setattr(ops, "wait", lambda mark: events.append(("steps wait for", mark)))
    monkeypatch.setattr(ops, "gemm", lambda *args, **kwargs: None)
    monkeypatch.setattr(ops, "lstm_forward", lambda t, *args: events.append(("step", t)))

    @contextlib.contextmanager
    def side_stream(*after):
        events.append(("projection waits for", after))
        yield

    monkeypatch.setattr(ops, "side_stream", side_stream)
    model(np.zeros((8, 2, 4), np.float32))
    side = [after for what, after in events if what == "projection waits for"]
    set_up = side[0][0]
    projected = [set_up + 1 + 2 * k for k in range(4)]
    steps_end = [set_up + 2 + 2 * k for k in range(4)]
    assert [after[2] for after in side] == [None, None, steps_end[0], steps_end[1]]
    assert [m for what, m in events if what == "steps wait for"] == projected
    assert [t for what, t in events if what == "step"] == [0, 1] * 4  # counted from each span's start


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_graphs_over_a_projection_that_gave_way_are_dropped(cell):
    """A shape first run in eval mode in one span projects into a gx of its own; a GRU's
    first training forward moves the projection into its gates' 4H rows (an LSTM's gates
    take gx as it is), freeing it, so graphs captured over it must go (and be captured
    again: test_gpu); the other graphs stay."""
    model = make(cell, 4, 6, num_layers=2, bidirectional=True, backend="numpy", dtype="float64", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((3, 2, 4))
    out_eval = model(x)[0]
    ws = next(iter(model._workspaces.values()))
    before = [d.gx for d in ws.dirs]
    inference, other = ("inference", "fp32", False, None), ("inference", "tf32", False, None)
    ws.graphs.update({inference: "graph", other: "graph"})
    model.train()
    model(x)
    moved = cell == "gru"
    assert all((d.gx is not old) == moved and np.shares_memory(d.gx, d.gates) for d, old in zip(ws.dirs, before))
    assert (inference in ws.graphs) == (other in ws.graphs) == (not moved)
    model.eval()
    np.testing.assert_array_equal(model(x)[0], out_eval)


def test_lstm_gates_live_in_the_projection_buffer():
    model = make("lstm", 6, 8, num_layers=2, backend="numpy", seed=0)
    x = np.random.default_rng(0).standard_normal((10, 4, 6)).astype(np.float32)
    model(x)
    names = {name for _, name, _ in model.memory_report().rows}
    assert "gx" in names and "gates" not in names  # counted once, under gx
    ws = next(iter(model._workspaces.values()))
    assert all(d.gates is d.gx and d.dgates is d.gx for d in ws.dirs)
    model.eval()
    model(x)
    model.train()
    with pytest.raises(RuntimeError, match="no forward pass to differentiate"):
        model.backward(np.ones((10, 4, 8), np.float32))  # an eval forward overwrote them, and says so


def test_cublas_workspace_size_comes_from_the_environment(monkeypatch):
    """GPURNN_CUBLAS_WORKSPACE_MIB sizes the workspaces of the CUDA backend's extra streams
    (default 32 MiB, cuBLAS's own on Hopper); anything but a number of MiB >= 0 is refused by name."""
    from gpurnn.backend import cublas_workspace_bytes

    monkeypatch.delenv("GPURNN_CUBLAS_WORKSPACE_MIB", raising=False)
    assert cublas_workspace_bytes() == 32 << 20
    for value, size in (("4", 4 << 20), (" 0 ", 0), ("0.5", 1 << 19), ("", 32 << 20), ("0.001", 1024)):
        monkeypatch.setenv("GPURNN_CUBLAS_WORKSPACE_MIB", value)
        assert cublas_workspace_bytes() == size
    for value in ("-1", "nan", "inf", "32MiB", "1e9"):
        monkeypatch.setenv("GPURNN_CUBLAS_WORKSPACE_MIB", value)
        with pytest.raises(ValueError, match=f"^GPURNN_CUBLAS_WORKSPACE_MIB: expected a number of MiB, 0 or more, "
                                             f"got '{value}'$"):
            cublas_workspace_bytes()
