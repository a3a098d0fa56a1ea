"""gpurnn.torch: the drop-in nn.Modules against torch.nn.RNN/LSTM/GRU, on CPU tensors
(the NumPy backend): outputs and gradients, gradcheck, training with torch.optim,
state dicts both ways, pickling, DDP over gloo, torch.compile, bad input."""

import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

torch = pytest.importorskip("torch")
import gpurnn.torch as gt  # noqa: E402
from torch.nn.utils import prune  # noqa: E402
from gpurnn import layers  # noqa: E402
from helpers import needs_ml_dtypes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {"rnn": gt.RNN, "lstm": gt.LSTM, "gru": gt.GRU}
THEIRS = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
pack = torch.nn.utils.rnn.pack_padded_sequence


def pair(cell, *args, **kwargs):
    """(gpurnn.torch module, torch.nn module) with the same weights."""
    ours = OURS[cell](*args, **kwargs)
    theirs = THEIRS[cell](*args, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@st.composite
def configs(draw):
    cell = draw(st.sampled_from(sorted(OURS)))
    layers_ = draw(st.integers(1, 3))
    H = draw(st.integers(1, 6))
    mode = draw(st.sampled_from(["tensor", "packed", "packed-sorted", "unbatched"]))
    return dict(cell=cell, num_layers=layers_, bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
                bias=draw(st.booleans()), mode=mode, h0=draw(st.booleans()),
                dropout=draw(st.sampled_from([0.0, 0.3])) if layers_ > 1 else 0.0,
                nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                T=draw(st.integers(1, 6)), B=draw(st.integers(1, 4)), I=draw(st.integers(1, 5)),
                H=H, proj_size=draw(st.integers(0, H - 1)) if cell == "lstm" else 0, seed=draw(st.integers(0, 2**16)))


def run(module, c, x, hx, lengths):
    inp = x
    if c["mode"].startswith("packed"):
        inp = pack(x, lengths, batch_first=c["batch_first"], enforce_sorted=c["mode"] == "packed-sorted")
    out, state = module(inp, hx)
    if c["mode"].startswith("packed"):
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=c["batch_first"],
                                                        total_length=x.shape[1 if c["batch_first"] else 0])
    return out, state


@settings(max_examples=150, deadline=None)
@given(configs())
@example(dict(cell="lstm", num_layers=2, bidirectional=True, batch_first=True, bias=True, mode="packed", h0=True,
              dropout=0.0, nonlinearity="tanh", dtype=torch.float64, T=5, B=3, I=4, H=6, proj_size=2, seed=4))
def test_matches_torch_nn(c):
    """Outputs, final states and the gradients of x, h0 and every parameter."""
    torch.manual_seed(c["seed"])
    kw = dict(num_layers=c["num_layers"], bias=c["bias"], batch_first=c["batch_first"], dropout=c["dropout"],
              bidirectional=c["bidirectional"], dtype=c["dtype"])
    if c["cell"] == "rnn":
        kw["nonlinearity"] = c["nonlinearity"]
    if c["proj_size"]:
        kw["proj_size"] = c["proj_size"]
    ours, theirs = pair(c["cell"], c["I"], c["H"], **kw)
    training = c["dropout"] == 0  # with dropout: compared in eval mode, where neither drops
    for m in (ours, theirs):
        m.train(training)
    T, B, H = c["T"], c["B"], c["H"]
    D = 2 if c["bidirectional"] else 1
    unbatched = c["mode"] == "unbatched"
    shape = (T, c["I"]) if unbatched else ((B, T, c["I"]) if c["batch_first"] else (T, B, c["I"]))
    x = torch.randn(shape, dtype=c["dtype"])
    lengths = torch.randint(1, T + 1, (B,))
    if c["mode"] == "packed-sorted":
        lengths = lengths.sort(descending=True).values
        lengths[0] = T
    widths = [c["proj_size"] or H, H] if c["cell"] == "lstm" else [H]  # h (projected: proj_size wide), c
    states = [torch.randn((c["num_layers"] * D, *([] if unbatched else [B]), width), dtype=c["dtype"])
              for width in widths] if c["h0"] else None
    results = []
    for m in (ours, theirs):
        xi = x.clone().requires_grad_()
        si = None if states is None else [s.clone().requires_grad_() for s in states]
        hx = None if si is None else (tuple(si) if c["cell"] == "lstm" else si[0])
        out, state = run(m, c, xi, hx, lengths)
        finals = list(state) if c["cell"] == "lstm" else [state]
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=c["dtype"]).reshape(out.shape)).sum() \
            + sum((f * f).sum() for f in finals)
        grads = torch.autograd.grad(loss, [xi, *(si or []), *m.parameters()]) if training else []
        results.append([out.detach(), *[f.detach() for f in finals], *grads])
    tol = dict(rtol=1e-4, atol=1e-5) if c["dtype"] == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("proj_size", [0, 2])
def test_gradcheck_through_the_module(proj_size):
    """torch.autograd.gradcheck in float64 over x, h0, c0 and every parameter (the parameters
    handed in through torch.func.functional_call, so gradcheck perturbs its own copies)."""
    torch.manual_seed(0)
    m = gt.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, proj_size=proj_size)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, proj_size or 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]

    def f(x, h0, c0, *params):
        out, (h_n, c_n) = torch.func.functional_call(m, dict(zip(names, params)), (x, (h0, c0)))
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params), eps=1e-6, atol=1e-7)


class TinyLM(torch.nn.Module):
    def __init__(self, rnn_class, V=12, H=16):
        super().__init__()
        self.embedding = torch.nn.Embedding(V, H)
        self.rnn = rnn_class(H, H, 2)
        self.head = torch.nn.Linear(H, V)

    def forward(self, x, state=None):
        out, state = self.rnn(self.embedding(x), state)
        return self.head(out), state


def train_losses(rnn_class, steps=200):
    torch.manual_seed(0)
    model = TinyLM(rnn_class)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, 12, (1, 4), generator=data)
        x = (start + torch.arange(10)[:, None] * torch.tensor([1, 2, 3, 5])) % 12  # counting, in 4 strides
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:-1].reshape(-1, 12), x[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def test_training_with_torch_optim_matches_torch_nn_lstm():
    ours, theirs = train_losses(gt.LSTM), train_losses(torch.nn.LSTM)
    assert ours[-1] < ours[0] - 0.3  # it learns
    np.testing.assert_allclose(ours, theirs, rtol=2e-4)


def test_state_dicts_load_both_ways_and_pickling_keeps_the_link():
    torch.manual_seed(0)
    ours, theirs = gt.GRU(3, 5, 2, bidirectional=True), torch.nn.GRU(3, 5, 2, bidirectional=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(0.5)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x)[0], theirs(x)[0])
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(ours)
    for m in (loaded, twin):
        torch.testing.assert_close(m(x)[0], ours(x)[0])
        with torch.no_grad():
            next(m.parameters()).zero_()  # an in-place update reaches the copy's gpurnn layer, not the original
        assert not torch.equal(m(x)[0], ours(x)[0])


def test_to_moves_and_keeps_the_parameter_objects():
    m = gt.LSTM(3, 4)
    params = list(m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.double()
    assert [id(p) for p in m.parameters()] == [id(p) for p in params] and params[0].dtype == torch.float64
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    m(x)[0].sum().backward()
    before = params[0].detach().clone()
    opt.step()  # the optimizer's Parameter objects are the module's, so the step reaches the layer
    assert not torch.equal(params[0], before)
    assert np.shares_memory(m._layer.params["weight_ih_l0"], params[0].detach().numpy())
    m.half()  # parameters held in float16, still the same Parameter objects
    assert [id(p) for p in m.parameters()] == [id(p) for p in params] and params[0].dtype == torch.float16
    assert np.shares_memory(m._layer.params["weight_ih_l0"], params[0].detach().numpy())
    out, _ = m(torch.randn(5, 2, 3, dtype=torch.float16))
    out.float().sum().backward()
    assert out.dtype == torch.float16 and params[0].grad.dtype == torch.float16
    with pytest.raises(TypeError, match="dtype: gpurnn runs float32, float64, float16 and bfloat16, not "
                                        "torch.complex64"), pytest.warns(UserWarning, match="Complex modules"):
        m.to(torch.complex64)


@needs_ml_dtypes
def test_bfloat16_module_holds_torch_bfloat16_parameters():
    m = gt.LSTM(3, 4)
    params = list(m.parameters())
    m.bfloat16()  # NumPy's bfloat16 (ml_dtypes) and torch's share the bits
    assert [id(p) for p in m.parameters()] == [id(p) for p in params]
    assert m._layer.dtype.name == "bfloat16" and params[0].dtype == torch.bfloat16
    assert np.shares_memory(m._layer.params["weight_ih_l0"], params[0].detach().view(torch.int16).numpy())
    assert m(torch.randn(5, 2, 3, dtype=torch.bfloat16))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("cell", sorted(OURS))
def test_torchs_views_of_the_parameters(cell):
    """all_weights, _all_weights, _flat_weights(_names) and mode as torch.nn's (code
    written for torch reads them, e.g. to initialise the biases)."""
    for kw in (dict(), dict(num_layers=2, bidirectional=True, bias=False), dict(nonlinearity="relu"),
               dict(num_layers=2, bidirectional=True, proj_size=3)):
        if "nonlinearity" in kw and cell != "rnn" or "proj_size" in kw and cell != "lstm":
            continue
        ours, theirs = pair(cell, 3, 4, **kw)
        assert ours.mode == theirs.mode
        assert ours._all_weights == theirs._all_weights
        assert ours._flat_weights_names == theirs._flat_weights_names
        assert [[p.shape for p in w] for w in ours.all_weights] == [[p.shape for p in w] for w in theirs.all_weights]
        params = [id(p) for p in ours.parameters()]  # the Parameters themselves, not copies
        assert [id(p) for w in ours.all_weights for p in w] == [id(p) for p in ours._flat_weights] == params


@pytest.mark.parametrize("cell", sorted(OURS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_batch_of_no_sequences_as_torch(cell, batch_first):
    """B = 0: the shapes torch gives, outputs that take part in autograd, and zero
    gradients for the parameters (torch's), in train and in eval mode."""
    ours, theirs = pair(cell, 3, 4, 2, bidirectional=True, batch_first=batch_first)
    shape = (0, 5, 3) if batch_first else (5, 0, 3)
    results = []
    for m in (ours, theirs):
        x = torch.zeros(shape, requires_grad=True)
        h0 = torch.zeros(4, 0, 4, requires_grad=True)
        out, state = m(x, (h0, h0) if cell == "lstm" else h0)
        finals = list(state) if cell == "lstm" else [state]
        (out.sum() + sum(f.sum() for f in finals)).backward()
        results.append([out.shape, out.requires_grad, [f.shape for f in finals], x.grad.shape, h0.grad.shape,
                        [p.grad for p in m.parameters()]])
        with torch.no_grad():
            results[-1].append(m.eval()(x)[0].shape)
    grads = results[0].pop(5), results[1].pop(5)
    assert results[0] == results[1]
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h)
        assert not g.any()


class _Halved(torch.nn.Module):
    """A parametrization: the weight is half the stored one (evaluations counted)."""

    calls = 0

    def forward(self, w):
        _Halved.calls += 1
        return 0.5 * w


PARAMETRIZE = {
    "weight_norm": lambda m: torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0"),
    "old weight_norm": lambda m: torch.nn.utils.weight_norm(m, "weight_hh_l0"),
    "halved": lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight_ih_l0", _Halved()),
    "pruned": lambda m: prune.l1_unstructured(m, "weight_hh_l0", amount=0.5),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("how", sorted(PARAMETRIZE))
def test_parametrized_weights_train_as_torch_nn(how):
    """A weight computed by a parametrization each call (weight_norm, torch.nn.utils.parametrize, pruning):
    the same losses and gradients as torch.nn's module through three SGD steps; .double() and
    deepcopy keep working."""
    torch.manual_seed(4)
    x = torch.randn(5, 2, 3)
    losses, grads = [], []
    for m in pair("gru", 3, 4, 2):
        PARAMETRIZE[how](m)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        losses.append([])
        for _ in range(3):
            opt.zero_grad()
            loss = m(x)[0].pow(2).sum()
            loss.backward()
            opt.step()
            losses[-1].append(loss.item())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert list(grads[0]) == list(grads[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)
    ours = OURS["gru"](3, 4)
    PARAMETRIZE[how](ours)
    if how == "halved":
        _Halved.calls = 0
        ours(x)
        assert _Halved.calls == 1  # once a call (torch.nn's modules evaluate it twice: README)
    if how not in ("old weight_norm", "pruned"):  # which torch cannot deepcopy (torch.nn's modules neither)
        twin = copy.deepcopy(ours)
        torch.testing.assert_close(twin(x)[0], ours(x)[0], rtol=0, atol=0)
        with torch.no_grad():
            next(p for n, p in twin.named_parameters() if "original" in n).mul_(3)  # weight_norm's g: w scales
        assert not torch.equal(twin(x)[0], ours(x)[0])  # the copy has parameters of its own
    assert ours.double()(x.double())[0].dtype == torch.float64


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_dropout_follows_torchs_generator_so_checkpoint_recomputes_the_same_masks(use_reentrant):
    """The masks come from torch's generator, as torch.nn's dropout: torch.manual_seed repeats
    them, and torch.utils.checkpoint's recompute draws the forward's own masks again (else
    its gradients would belong to other masks than the output it returned)."""
    m = gt.LSTM(4, 5, 3, dropout=0.3)
    x = torch.randn(6, 3, 4)

    def run(checkpointed, seed=7):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(seed)
        f = lambda a: m(a)[0]  # noqa: E731
        out = torch.utils.checkpoint.checkpoint(f, xi, use_reentrant=use_reentrant) if checkpointed else f(xi)
        out.square().sum().backward()
        return [out.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()]

    plain = run(False)
    assert torch.equal(run(False)[0], plain[0]) and not torch.equal(run(False, seed=8)[0], plain[0])
    for a, b in zip(run(True), plain):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change", ["optimizer step", "input in place"])
def test_a_backward_after_an_in_place_change_is_refused_as_torch_nn_does(change):
    """A weight updated (or an input overwritten) between a forward and its backward: torch's
    version-counter error, as torch.nn's module gives, not a gradient of other weights."""
    for m in pair("lstm", 3, 4):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x = torch.randn(5, 2, 3, requires_grad=True) * 1
        out = m(x)[0]
        if change == "optimizer step":
            m(x)[0].sum().backward()
            opt.step()
        else:
            x.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_a_double_backward_is_refused_not_silently_zero():
    """A gradient penalty needs the gradient's own graph, which BPTT by hand does not build."""
    m = gt.GRU(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    out, _ = m(x)
    (dx,) = torch.autograd.grad(out.pow(2).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        (out.sum() + dx.pow(2).sum()).backward()


def test_torch_func_transforms_are_refused_by_name_and_functional_call_works():
    m = gt.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match="input: expected a tensor with storage.*torch.func transform"):
        torch.func.grad(lambda x: m(x)[0].sum())(x)
    with pytest.raises(RuntimeError, match="input: expected a tensor with storage.*torch.func transform"):
        torch.vmap(lambda x: m(x)[0])(x[None])
    params = {n: p.detach() for n, p in m.named_parameters()}
    with pytest.raises(RuntimeError, match="weight_ih_l0: expected a tensor with storage"):
        torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,))[0].sum())(params)
    # functional_call without a transform (MAML's first-order step) runs with the given weights
    doubled = {n: (2 * p).requires_grad_() for n, p in params.items()}
    out, _ = torch.func.functional_call(m, doubled, (x,))
    reference = torch.nn.GRU(3, 4)
    reference.load_state_dict(doubled)
    torch.testing.assert_close(out, reference(x)[0])
    grads = torch.autograd.grad(out.sum(), list(doubled.values()))
    torch.testing.assert_close(grads, torch.autograd.grad(reference(x)[0].sum(), list(reference.parameters())))
    torch.testing.assert_close(m(x)[0], torch.func.functional_call(m, params, (x,))[0])  # its own weights again


def test_torchscript_and_export_are_refused_by_name():
    """torch.nn's modules script, trace and export; gpurnn's kernels are no torch operations,
    so each is refused with an error that says so (not a tracer's sanity check, a scripting
    error about generators, or a guess at a torch.func transform)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = gt.GRU(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match=r"gpurnn.torch.GRU: torch.jit.script cannot compile it to TorchScript.*"
                                           r"torch.nn.GRU where TorchScript is needed"):
        torch.jit.script(Net())
    with pytest.raises(RuntimeError, match=r"gpurnn.torch.LSTM: torch.jit.trace \(or torch.onnx.export, which "
                                           r"traces\) cannot compile it"):
        torch.jit.trace(gt.LSTM(3, 4), (x,), check_trace=False)
    with pytest.raises(RuntimeError, match=r"input: expected a tensor with storage, got a FakeTensor without it "
                                           r"\(torch.export.*cannot be exported"):
        torch.export.export(Net(), (x,))
    assert Net()(x).shape == (5, 2, 2)  # eager, as ever


def test_a_weight_of_the_wrong_kind_is_refused():
    m = gt.LSTM(3, 4)
    del m.weight_hh_l0
    m.weight_hh_l0 = torch.zeros(16, 4, dtype=torch.float64)  # a plain attribute, as the old weight_norm sets
    with pytest.raises(RuntimeError, match=r"weight_hh_l0: expected a torch.float32 tensor of shape \(16, 4\) "
                                           r"on cpu, got torch.float64 \(16, 4\) on cpu"):
        m(torch.randn(5, 2, 3))
    m.weight_hh_l0 = torch.zeros(16, 4)
    assert m(torch.randn(5, 2, 3))[0].shape == (5, 2, 4)


def test_shapes_that_change_keep_a_bounded_cache():
    m = gt.GRU(3, 4)
    for T in range(1, 12):
        m(torch.randn(T, 2, 3))[0].sum().backward()
    assert len(m._layer._workspaces) <= layers.MAX_WORKSPACES
    m.clear_cache()
    assert not m._layer._workspaces


def test_two_backwards_of_one_forward_and_forwards_before_a_backward():
    """gpurnn keeps one forward's activations: older ones are recomputed, with their dropout masks."""
    torch.manual_seed(3)
    ours, theirs = pair("lstm", 3, 4, 2, dropout=0.0)
    x1, x2 = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    a1, a2 = ours(x1)[0], ours(x2)[0]
    b1, b2 = theirs(x1)[0], theirs(x2)[0]
    g_ours = torch.autograd.grad(a1.sum() + 2 * a2.sum(), list(ours.parameters()), retain_graph=True)
    g_theirs = torch.autograd.grad(b1.sum() + 2 * b2.sum(), list(theirs.parameters()))
    for g, h in zip(g_ours, g_theirs):
        torch.testing.assert_close(g, h)
    again = torch.autograd.grad(a1.sum() + 2 * a2.sum(), list(ours.parameters()))
    for g, h in zip(again, g_ours):
        torch.testing.assert_close(g, h)
    dropped = gt.LSTM(3, 4, 2, dropout=0.5)
    out = dropped(x1)[0]
    first = torch.autograd.grad(out.sum(), list(dropped.parameters()), retain_graph=True)
    dropped(x2)[0].sum()  # a newer forward, with other masks
    second = torch.autograd.grad(out.sum(), list(dropped.parameters()))
    for g, h in zip(first, second):
        torch.testing.assert_close(g, h)


@pytest.mark.parametrize("cell", sorted(OURS))
def test_dropout_on_one_layer_warns_as_torch(cell):
    with pytest.warns(UserWarning) as ours:
        OURS[cell](3, 4, dropout=0.5)
    with pytest.warns(UserWarning) as theirs:
        THEIRS[cell](3, 4, dropout=0.5)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert ours[0].filename == __file__  # pointed at the caller


def test_bad_input_is_refused_before_anything_runs():
    m = gt.LSTM(3, 4)
    with pytest.raises(RuntimeError, match="input must have the type torch.float32, got type torch.float64"):
        m(torch.randn(5, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="not at the same device, found input tensor at meta"):
        m(torch.empty(5, 2, 3, device="meta"))
    with pytest.raises(ValueError, match=r"h0: expected shape \[1, 2, 4\]"):
        m(torch.randn(5, 2, 3), (torch.randn(1, 3, 4), torch.randn(1, 3, 4)))
    with pytest.raises(RuntimeError, match="found hx tensor at meta"):
        m(torch.randn(5, 2, 3), (torch.empty(1, 2, 4, device="meta"), torch.randn(1, 2, 4)))
    with pytest.raises(ValueError, match="hx: expected both h0 and c0"):
        m(torch.randn(5, 2, 3), (torch.randn(1, 2, 4), None))
    with pytest.raises(RuntimeError, match="must be sorted in decreasing order"):
        pack(torch.randn(5, 2, 3), torch.tensor([2, 5]), enforce_sorted=True)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
        gt.GRU(3, 4, proj_size=2)
    with pytest.raises(ValueError, match=r"proj_size: expected a size below hidden_size \(4\), as torch's, got 4"):
        gt.LSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match=r"h0: expected shape \[1, 2, 3\] \[num_layers\*D, B, proj_size\]"):
        gt.LSTM(3, 4, proj_size=3)(torch.randn(5, 2, 3), (torch.randn(1, 2, 4), torch.randn(1, 2, 4)))
    with pytest.raises(TypeError, match=r"dropout: expected a number in \[0, 1\), got tensor"):
        gt.LSTM(3, 4, dropout=torch.zeros(2))  # checked before anything reads it


def test_torch_compile_runs_with_a_graph_break_and_matches_eager():
    torch.manual_seed(0)
    model = TinyLM(gt.GRU)
    x = torch.randint(0, 12, (6, 3))
    eager = model(x)[0]
    compiled = torch.compile(model, backend="aot_eager")  # no C++ toolchain needed; inductor behaves alike
    torch.testing.assert_close(compiled(x)[0], eager)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count >= 1  # the gpurnn call itself


DDP_SCRIPT = r"""
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from test_torch_module import TinyLM
import gpurnn.torch as gt
rank, world = int(sys.argv[1]), 2
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=world)
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(TinyLM(gt.LSTM))
opt = torch.optim.SGD(model.parameters(), lr=0.5)
data = torch.Generator().manual_seed(1)
for _ in range(5):
    x = torch.randint(0, 12, (10, 4), generator=data)
    shard = x[:, 2 * rank:2 * rank + 2]
    logits, _ = model(shard)
    loss = torch.nn.functional.cross_entropy(logits[:-1].reshape(-1, 12), shard[1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, sys.argv[2] + f".rank{rank}")
dist.destroy_process_group()
"""


def test_ddp_over_gloo_keeps_the_ranks_identical_and_equal_to_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(r), store, os.path.dirname(__file__)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    states = [torch.load(store + f".rank{r}") for r in range(2)]
    torch.manual_seed(0)
    single = TinyLM(gt.LSTM)
    opt = torch.optim.SGD(single.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randint(0, 12, (10, 4), generator=data)
        halves = [single(x[:, 2 * r:2 * r + 2])[0] for r in range(2)]  # DDP averages the two shards' losses
        loss = sum(torch.nn.functional.cross_entropy(lg[:-1].reshape(-1, 12), x[1:, 2 * r:2 * r + 2].reshape(-1))
                   for r, lg in enumerate(halves)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in single.state_dict().items():
        assert torch.equal(states[0][k], states[1][k]), k
        torch.testing.assert_close(states[0][k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("cls, peer", [(gt.LSTM, torch.nn.LSTM), (gt.GRU, torch.nn.GRU), (gt.RNN, torch.nn.RNN)])
@pytest.mark.parametrize("half", [pytest.param(torch.bfloat16, marks=needs_ml_dtypes), torch.float16])
def test_autocast_runs_in_half_precision(cls, peer, half):
    """Under autocast a float32 module runs its half twin (as cuDNN's RNNs do under
    autocast): half outputs, gradients widened into the float32 parameters, all within
    the half type's tolerance of float32 torch.nn."""
    from gpurnn import precision

    torch.manual_seed(0)
    m = cls(3, 8, num_layers=2, bidirectional=True)
    ref = peer(3, 8, num_layers=2, bidirectional=True)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(6, 2, 3).to(half).float().requires_grad_(True)  # representable in half: only the math differs
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=half):
        out, _ = m(x)
    assert out.dtype == half
    out.float().sum().backward()
    out_ref, _ = ref(x_ref)
    out_ref.sum().backward()
    tol = precision.TOLERANCES[str(half).split(".")[1]]
    relative = lambda a, b: float((a.float() - b).abs().max() / b.abs().max())  # noqa: E731
    assert relative(out.detach(), out_ref.detach()) < tol["output"]
    assert x.grad.dtype == torch.float32 and relative(x.grad, x_ref.grad) < tol["gradient"]
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32 and relative(p.grad, q.grad) < tol["gradient"], name
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.step()  # the float32 weights move; the next autocast call rounds them afresh
    with torch.no_grad(), torch.autocast("cpu", dtype=half):
        again, _ = m(x)
    with torch.no_grad():
        full, _ = m(x)
    assert relative(again, full) < tol["output"]


@needs_ml_dtypes
def test_autocast_casts_where_half_cannot_run_and_says_so_once(monkeypatch):
    """A float64 module runs in float64 under autocast (autocast leaves float64 alone),
    half inputs cast to it; where the backend cannot run autocast's type (bfloat16 on
    CUDA), a float32 module runs in float32 and says why, once."""
    import warnings

    from gpurnn.backend import NumpyOps

    torch.manual_seed(0)
    proj, m = torch.nn.Linear(3, 3), gt.GRU(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = proj(x)
        assert half.dtype == torch.bfloat16
        with pytest.warns(UserWarning, match="under autocast it runs in torch.float64"):
            out, h_n = m(half)
        out.sum().backward()  # the gradient flows back through the cast
    assert out.dtype == torch.float64 and proj.weight.grad is not None
    torch.testing.assert_close(out, m(half.double())[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(proj(x))  # said once

    def refuse(dtype, name="dtype"):  # as the CUDA backend refuses bfloat16
        if np.dtype(dtype).name == "bfloat16":
            raise TypeError(f"{name}: bfloat16 does not run here")

    monkeypatch.setattr(NumpyOps, "check_dtype", staticmethod(refuse))
    m32 = gt.LSTM(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match=r"runs in torch.float32 \(dtype: bfloat16 does not run here\)"):
            out, _ = m32(proj(x))
    assert out.dtype == torch.float32


def test_cpu_modules_multiply_on_torchs_blas():
    """On CPU tensors the matrix products run on torch's BLAS (one thread pool in the
    process, not NumPy's OpenBLAS spinning beside torch's), every operand layout the
    drivers use alike: transposed operands, accumulation, an output with a row stride."""
    from gpurnn.backend import NumpyOps

    ops = gt.LSTM(3, 4)._layer.backend.ops
    assert type(ops).__name__ == "_TorchBlasOps"
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        a, b = rng.standard_normal((6, 5)).astype(dtype), rng.standard_normal((5, 7)).astype(dtype)
        for trans_a, trans_b in [(False, False), (True, False), (False, True), (True, True)]:
            op_a = np.ascontiguousarray(a.T) if trans_a else a
            op_b = np.ascontiguousarray(b.T) if trans_b else b
            for beta in (0.0, 1.0):
                wide = rng.standard_normal((6, 9)).astype(dtype)
                got, want = wide.copy(), wide.copy()
                ops.gemm(op_a, op_b, got[:, :7], trans_a, trans_b, beta)  # rows of 9, 7 used
                NumpyOps.gemm(op_a, op_b, want[:, :7], trans_a, trans_b, beta)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
                assert np.array_equal(got[:, 7:], wide[:, 7:])
    w_hh, w_hh_t = rng.standard_normal((16, 4)).astype(np.float32), np.zeros((4, 16), np.float32)
    w, trans = ops.recurrent_operand(w_hh, w_hh_t, 128, 64)  # MKL: W^T as a view is the faster step GEMM
    assert w is w_hh and trans and not w_hh_t.any()


HOGWILD_SCRIPT = r"""
import torch, torch.multiprocessing as mp
import gpurnn.torch as gt

def step(model, x, done):  # a worker's SGD step, on the weights the processes share
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x)[0].sum().backward()
    opt.step()
    done.put(model.weight_hh_l0.detach().numpy().copy())

if __name__ == "__main__":
    torch.manual_seed(0)
    model, x = gt.LSTM(3, 4), torch.randn(5, 2, 3)
    w0 = model.weight_hh_l0.detach().clone()
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters())
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    worker = ctx.Process(target=step, args=(model, x, done))
    worker.start()
    stepped = torch.from_numpy(done.get(timeout=120))
    worker.join()
    assert worker.exitcode == 0 and not torch.equal(stepped, w0)
    assert torch.equal(model.weight_hh_l0.detach(), stepped)  # the worker's step, seen here
    reference = torch.nn.LSTM(3, 4)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x)[0], reference(x)[0])  # and the forward here runs on it
    print("ok")
"""


def test_share_memory_lets_hogwild_workers_train_one_model(tmp_path):
    """module.share_memory() (torch.multiprocessing's Hogwild): a spawned worker's optimizer
    step lands in the weights this process's forward reads."""
    script = tmp_path / "hogwild.py"
    script.write_text(HOGWILD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
