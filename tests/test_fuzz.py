"""Generated configurations of the whole API against torch in float64, and a
fuzzer of bad input.

``test_api_matches_torch`` draws FUZZ_EXAMPLES configurations (cells, every
nonlinearity, layers, directions, batch_first, bias, lengths, h0 given or not,
unbatched input, dropout in eval mode) on the suite's backend;
``test_api_matches_torch_on_the_simulator`` SIM_EXAMPLES smaller ones on the CUDA
code path under numba's simulator. torch.nn.RNN knows only tanh and relu: the
other nonlinearities are checked against the same recurrence written in torch ops.

``test_bad_input_is_refused_by_name`` feeds one wrong argument at a time: a
ValueError or TypeError naming it, and the model unchanged (the next good call
gives the bits a fresh model gives). Arguments that are odd but valid
(non-contiguous, read-only, lists) must work, and NaN/inf data computes what
torch computes.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import back, backend_or_skip, forced_algorithm, host, make, run

torch = pytest.importorskip("torch")

FUZZ_EXAMPLES, SIM_EXAMPLES, BAD_INPUT_EXAMPLES = 500, 50, 300
NONLINEARITIES = ["tanh", "relu", "sigmoid", "leaky_relu", "elu"]
TORCH_PHI = {"sigmoid": torch.sigmoid, "leaky_relu": torch.nn.functional.leaky_relu,
             "elu": torch.nn.functional.elu, "tanh": torch.tanh, "relu": torch.relu}


@st.composite
def configs(draw, small=False):
    cell = draw(st.sampled_from(["rnn", "lstm", "gru"]))
    layers = draw(st.integers(1, 2 if small else 3))
    unbatched = draw(st.booleans())
    return dict(
        cell=cell, nonlinearity=draw(st.sampled_from(NONLINEARITIES)) if cell == "rnn" else "tanh",
        num_layers=layers, bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
        bias=draw(st.booleans()), unbatched=unbatched,
        use_lengths=not unbatched and draw(st.booleans()), h0=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.4])) if layers > 1 else 0.0,  # > 0: compared in eval mode
        T=draw(st.integers(1, 4 if small else 7)), B=draw(st.integers(1, 3 if small else 4)),
        I=draw(st.integers(1, 4 if small else 6)), H=draw(st.integers(1, 5 if small else 7)),
        seed=draw(st.integers(0, 2**16)))


class ManualRNN(torch.nn.Module):
    """torch.nn.RNN's recurrence with any nonlinearity, in torch ops (float64, time-major,
    packed-sequence semantics through masks)."""

    def __init__(self, model, phi):
        super().__init__()
        self.m, self.phi = model, phi
        for k, v in host(model.state_dict()).items():
            self.register_parameter(k, torch.nn.Parameter(torch.from_numpy(v.copy())))

    def forward(self, x, h0, lengths):
        m = self.m
        T, B, D, H = x.shape[0], x.shape[1], 2 if m.bidirectional else 1, m.hidden_size
        mask = (torch.arange(T)[:, None] < torch.as_tensor(lengths)[None, :]).unsqueeze(-1)
        h0 = torch.zeros(m.num_layers * D, B, H, dtype=x.dtype) if h0 is None else h0
        inp, finals = x, []
        for layer in range(m.num_layers):
            outs = []
            for d in range(D):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(self, f"weight_ih_{sfx}"), getattr(self, f"weight_hh_{sfx}")
                b_ih = getattr(self, f"bias_ih_{sfx}", None)
                b_hh = getattr(self, f"bias_hh_{sfx}", None)
                h, ys = h0[layer * D + d], [None] * T
                for t in (reversed(range(T)) if d else range(T)):
                    a = (inp[t] @ w_ih.T + (0 if b_ih is None else b_ih)) + (h @ w_hh.T + (0 if b_hh is None else b_hh))
                    h = torch.where(mask[t], self.phi(a), h)  # past a sequence's end the state is carried
                    ys[t] = torch.where(mask[t], h, torch.zeros_like(h))
                outs.append(torch.stack(ys))
                finals.append(h)
            inp = torch.cat(outs, -1)
        return inp, torch.stack(finals)


def torch_results(c, model, x, h0, c0, lengths, d_out, d_hn, d_cn, backward):
    """torch's out, h_n, c_n (and with ``backward`` dx, dh0, dc0, parameter grads) as NumPy."""
    cell, T = c["cell"], x.shape[1 if c["batch_first"] and not c["unbatched"] else 0]
    leaf = lambda a: None if a is None else torch.tensor(a, requires_grad=backward)  # noqa: E731
    xt, h0t, c0t = leaf(x), leaf(h0), leaf(c0)
    if cell == "rnn" and c["nonlinearity"] not in ("tanh", "relu"):
        tm = ManualRNN(model, TORCH_PHI[c["nonlinearity"]])
        xin = xt[:, None] if c["unbatched"] else (xt.transpose(0, 1) if c["batch_first"] else xt)
        hin = None if h0t is None else (h0t[:, None] if c["unbatched"] else h0t)
        B = xin.shape[1]
        out, hn = tm(xin, hin, np.full(B, T) if lengths is None else lengths)
        out = out[:, 0] if c["unbatched"] else (out.transpose(0, 1) if c["batch_first"] else out)
        hn, cn = (hn[:, 0] if c["unbatched"] else hn), None
    else:
        cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
        kw = dict(nonlinearity=c["nonlinearity"]) if cell == "rnn" else {}
        tm = cls(model.input_size, model.hidden_size, c["num_layers"], bias=c["bias"], batch_first=c["batch_first"],
                 dropout=c["dropout"], bidirectional=c["bidirectional"], **kw).double()
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in host(model.state_dict()).items()})
        tm.train(backward)
        inp = xt
        if lengths is not None:
            inp = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.as_tensor(lengths), batch_first=c["batch_first"],
                                                          enforce_sorted=False)
        hx = None if h0t is None else ((h0t, c0t) if cell == "lstm" else h0t)
        out, hn = tm(inp, hx)
        if lengths is not None:
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=c["batch_first"], total_length=T)
        hn, cn = hn if cell == "lstm" else (hn, None)
    got = [out, hn, cn]
    if backward:
        loss = (out * torch.from_numpy(d_out)).sum() + (hn * torch.from_numpy(d_hn)).sum()
        if cn is not None:
            loss = loss + (cn * torch.from_numpy(d_cn)).sum()
        loss.backward()
        got += [xt.grad, None if h0t is None else h0t.grad, None if c0t is None else c0t.grad,
                {k: p.grad for k, p in tm.named_parameters()}]
    as_np = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
    return [({k: as_np(v) for k, v in g.items()} if isinstance(g, dict) else as_np(g)) for g in got]


def close(a, b, tol):
    """Equal NaN and inf positions; finite values within tol, relatively (or absolutely near zero)."""
    a, b = np.asarray(host(a), np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)) or not np.array_equal(a[np.isinf(a)],
                                                                                                   b[np.isinf(a)]):
        return False
    fa, fb = a[np.isfinite(a)], b[np.isfinite(b)]
    if fa.shape != fb.shape:
        return False
    scale = np.linalg.norm(fb)
    return np.linalg.norm(fa - fb) <= tol * max(scale, 1.0)


def draw_inputs(c, rng):
    T, B, I, H = c["T"], c["B"], c["I"], c["H"]
    D = 2 if c["bidirectional"] else 1
    LD = c["num_layers"] * D
    seq = (lambda k: (T, k)) if c["unbatched"] else (lambda k: (B, T, k) if c["batch_first"] else (T, B, k))
    state = (LD, H) if c["unbatched"] else (LD, B, H)
    x = rng.standard_normal(seq(I))
    h0, c0 = (rng.standard_normal(state) * 0.5 for _ in range(2))
    lengths = rng.integers(1, T + 1, B) if c["use_lengths"] else None
    d_out, d_hn, d_cn = rng.standard_normal(seq(D * H)), rng.standard_normal(state), rng.standard_normal(state)
    if lengths is not None:  # torch's padded outputs are constants: their gradient is dropped
        mask = (np.arange(T)[:, None] < lengths[None, :])
        d_out *= (mask.T if c["batch_first"] else mask)[..., None]
    if not c["h0"]:
        h0 = c0 = None
    return x, h0, c0, lengths, d_out, d_hn, d_cn


def check_against_torch(c, backend=None):
    rng = np.random.default_rng(c["seed"])
    model = make(c["cell"], c["I"], c["H"], nonlinearity=c["nonlinearity"], num_layers=c["num_layers"],
                 bidirectional=c["bidirectional"], batch_first=c["batch_first"], bias=c["bias"],
                 dropout=c["dropout"], dtype="float64", seed=c["seed"], backend=backend)
    x, h0, c0, lengths, d_out, d_hn, d_cn = draw_inputs(c, rng)
    training = c["dropout"] == 0  # with dropout: the eval-mode forward, which torch's matches
    model.train(training)
    ours = list(run(model, x, h0, c0, lengths))
    if training:
        ours += list(back(model, d_out, d_hn, d_cn)) + [model.grads]
    ref = torch_results(c, model, x, h0, c0, lengths, d_out, d_hn, d_cn, training)
    names = ["out", "h_n", "c_n", "dx", "dh0", "dc0", "grads"]
    for name, a, b in zip(names, ours, ref):
        if name == "grads":
            assert set(a) == set(b)
            for k in b:
                assert close(a[k], b[k], 1e-10), (k, c)
        elif b is not None:  # dh0/dc0 without an h0: torch has no leaf to report
            assert close(a, b, 1e-12 if name in ("out", "h_n", "c_n") else 1e-10), (name, c)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_api_matches_torch(c):
    check_against_torch(c)


@pytest.fixture(scope="module")
def sim():
    return backend_or_skip("cudasim", "cudasim unavailable in this process")


@settings(max_examples=SIM_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(configs(small=True))
def test_api_matches_torch_on_the_simulator(sim, c):
    check_against_torch(c, backend="cudasim")


@pytest.mark.parametrize("algorithm", ["fused", "persistent"])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(c=configs(small=True))
def test_fused_and_persistent_steps_match_torch_on_the_simulator(sim, algorithm, c):
    """The recurrences that compute their own recurrent product (gpurnn.cuda.fused),
    forced, over the same random configurations."""
    with forced_algorithm(algorithm):
        check_against_torch(c, backend="cudasim")


# ------------------------------------------------------------------ bad input
def bad_inputs(c, rng):
    """(argument name, what to change: {argument: value}) for one wrong argument at a time."""
    T, B, I, H = c["T"], c["B"], c["I"], c["H"]
    LD = c["num_layers"] * (2 if c["bidirectional"] else 1)
    DH = H * (2 if c["bidirectional"] else 1)
    seq = (lambda k: (B, T, k)) if c["batch_first"] else (lambda k: (T, B, k))
    r = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    cases = [
        ("x", {"x": r(T * B * I)}), ("x", {"x": r(1, *seq(I))}), ("x", {"x": r(*seq(I + 1))}),
        ("x", {"x": r(*seq(I)).astype(np.float32)}), ("x", {"x": rng.integers(0, 3, seq(I))}),
        ("x", {"x": r(*seq(I)) + 1j}), ("x", {"x": r(*seq(I)) > 0}), ("x", {"x": "not an array"}),
        ("x", {"x": np.zeros((0, B, I) if not c["batch_first"] else (B, 0, I))}),
        ("h0", {"h0": r(LD + 1, B, H)}), ("h0", {"h0": r(LD, B + 1, H)}), ("h0", {"h0": r(LD, B, H + 1)}),
        ("h0", {"h0": r(LD, H)}), ("h0", {"h0": r(LD, B, H).astype(np.float32)}), ("h0", {"h0": object()}),
        ("lengths", {"lengths": np.full(B, T + 1)}), ("lengths", {"lengths": np.zeros(B, int)}),
        ("lengths", {"lengths": -np.ones(B, int)}), ("lengths", {"lengths": np.ones(B + 1, int)}),
        ("lengths", {"lengths": np.ones(B) * 1.5}), ("lengths", {"lengths": np.ones(B, bool)}),
        ("d_out", {"d_out": r(*seq(DH + 1))}), ("d_out", {"d_out": r(*seq(DH)).astype(np.float32)}),
        ("d_hn", {"d_hn": r(LD, B, H + 2)}),
    ]
    if c["cell"] == "lstm":
        cases += [("c0", {"c0": r(LD, B + 2, H)}), ("hx", {"hx_not_a_pair": True}), ("d_cn", {"d_cn": r(LD, B + 1, H)})]
    return cases


def good_call(model, c, args):
    """A forward and backward with ``args`` (bad ones raise); the results and grads as NumPy."""
    if args.get("hx_not_a_pair"):
        return model(args["x"], args["h0"], lengths=args["lengths"])
    out = run(model, args["x"], args["h0"], args["c0"], args["lengths"])
    return out + back(model, args["d_out"], args["d_hn"], args["d_cn"]) + (host(model.grads),)


@settings(max_examples=BAD_INPUT_EXAMPLES, deadline=None)
@given(configs(), st.integers(0, 2**32 - 1))
def test_bad_input_is_refused_by_name(c, pick):
    if c["unbatched"] or c["dropout"]:
        c = dict(c, unbatched=False, use_lengths=True, dropout=0.0)
    rng = np.random.default_rng(pick)
    model_args = dict(nonlinearity=c["nonlinearity"], num_layers=c["num_layers"], bidirectional=c["bidirectional"],
                      batch_first=c["batch_first"], bias=c["bias"], dtype="float64", seed=c["seed"])
    model, fresh = (make(c["cell"], c["I"], c["H"], **model_args) for _ in range(2))
    x, h0, c0, lengths, d_out, d_hn, d_cn = draw_inputs(dict(c, h0=True), rng)
    good = dict(x=x, h0=h0, c0=c0, lengths=lengths, d_out=d_out, d_hn=d_hn, d_cn=d_cn)
    cases = bad_inputs(c, rng)
    name, change = cases[pick % len(cases)]
    with pytest.raises((ValueError, TypeError)) as raised:
        good_call(model, c, dict(good, **change))
    assert str(raised.value).startswith(f"{name}:"), (name, str(raised.value))
    model.zero_grad()  # a bad d_out comes after a good forward: the grads are the only trace, and cleared
    for a, b in zip(good_call(model, c, good), good_call(fresh, c, good)):  # the model is as good as new
        if isinstance(a, dict):
            assert all(a[k].tobytes() == b[k].tobytes() for k in a)
        elif a is not None:
            assert a.tobytes() == b.tobytes()


@settings(max_examples=100, deadline=None)
@given(configs(), st.sampled_from(["non-contiguous", "read-only", "lists"]))
def test_odd_but_valid_arrays_work(c, kind):
    c = dict(c, unbatched=False, h0=True)
    rng = np.random.default_rng(c["seed"])
    x, h0, c0, lengths, d_out, d_hn, d_cn = draw_inputs(c, rng)
    model_args = dict(nonlinearity=c["nonlinearity"], num_layers=c["num_layers"], bidirectional=c["bidirectional"],
                      batch_first=c["batch_first"], bias=c["bias"], dtype="float64", seed=c["seed"])
    expect = run(make(c["cell"], c["I"], c["H"], **model_args), x, h0, c0, lengths)
    if kind == "non-contiguous":  # every other element of arrays twice as large
        spread = lambda a: None if a is None else np.repeat(a, 2, axis=-1)[..., ::2]  # noqa: E731
    elif kind == "read-only":
        def spread(a):
            if a is None:
                return None
            a = a.copy()
            a.setflags(write=False)
            return a
    else:
        spread = lambda a: None if a is None else a.tolist()  # noqa: E731
    odd = [spread(a) for a in (x, h0, c0, lengths)]
    if kind == "non-contiguous":
        assert odd[0].size == 1 or not odd[0].flags.c_contiguous  # (one element is contiguous however strided)
    got = run(make(c["cell"], c["I"], c["H"], **model_args), *odd)
    for a, b in zip(got, expect):
        if b is not None:
            assert a.tobytes() == b.tobytes()


def check_nan_and_inf(c, value, where, backend=None):
    if c["cell"] == "rnn" and c["nonlinearity"] not in ("tanh", "relu"):
        c = dict(c, nonlinearity="tanh")  # torch.nn.RNN's own, whose NaN handling is the reference
    c = dict(c, h0=True, dropout=0.0)
    rng = np.random.default_rng(c["seed"])
    model = make(c["cell"], c["I"], c["H"], nonlinearity=c["nonlinearity"], num_layers=c["num_layers"],
                 bidirectional=c["bidirectional"], batch_first=c["batch_first"], bias=c["bias"],
                 dtype="float64", seed=c["seed"], backend=backend)
    x, h0, c0, lengths, d_out, d_hn, d_cn = draw_inputs(c, rng)
    target = x if where == "x" else h0
    target.reshape(-1)[rng.integers(0, target.size)] = value
    with np.errstate(invalid="ignore", over="ignore"):
        ours = run(model, x, h0, c0, lengths)
    ref = torch_results(c, model, x, h0, c0, lengths, d_out, d_hn, d_cn, backward=False)
    for a, b in zip(ours, ref):
        if b is not None:
            assert close(a, b, 1e-12), (c, value, where)


VALUES, PLACES = st.sampled_from([np.nan, np.inf, -np.inf]), st.sampled_from(["x", "h0"])


@settings(max_examples=60, deadline=None)
@given(configs(), VALUES, PLACES)
def test_nan_and_inf_compute_what_torch_computes(c, value, where):
    check_nan_and_inf(c, value, where)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's threads run outside np.errstate
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs(small=True), VALUES, PLACES)
def test_nan_and_inf_on_the_simulator(sim, c, value, where):
    """The kernels' NaN handling (a relu of NaN is NaN, as torch's) without a GPU."""
    check_nan_and_inf(c, value, where, backend="cudasim")
