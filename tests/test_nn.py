"""Embedding, Linear, the losses and CharLM: float64 gradchecks and torch parity."""

import numpy as np
import pytest

import gpurnn
from gpurnn.diagnostics import numeric_gradient as numeric
from helpers import host, rel_err


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("masking", ["none", "ignore_index", "lengths"])
def test_softmax_cross_entropy_gradcheck(reduction, masking):
    rng = np.random.default_rng(0)
    T, B, V = 4, 3, 5
    logits = rng.standard_normal((T, B, V)) * 3
    targets = rng.integers(0, V, (T, B))
    lengths = np.array([4, 2, 1]) if masking == "lengths" else None
    if masking == "ignore_index":
        targets[1, 0] = targets[3, 2] = -1
    loss_fn = gpurnn.SoftmaxCrossEntropy(reduction, ignore_index=-1 if masking == "ignore_index" else None)
    loss_fn(logits, targets, lengths)
    d = loss_fn.backward()
    num = numeric(lambda: loss_fn(logits, targets, lengths), logits)
    assert rel_err(d, num) < 1e-7
    if masking == "lengths":
        assert np.all(d[2:, 1] == 0) and np.all(d[1:, 2] == 0)


def test_softmax_cross_entropy_is_stable_and_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 2, 4)) * 1e4  # exp would overflow without the shift
    targets = rng.integers(0, 4, (3, 2))
    targets[0, 1] = 7  # ignored below
    loss_fn = gpurnn.SoftmaxCrossEntropy("mean", ignore_index=7)
    loss = loss_fn(logits, targets)
    d = loss_fn.backward()
    lt = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(lt.reshape(-1, 4), torch.tensor(targets).reshape(-1), ignore_index=7)
    ref.backward()
    assert np.isfinite(loss) and abs(loss - ref.item()) < 1e-9 * max(1, abs(ref.item()))
    assert rel_err(d, lt.grad.numpy()) < 1e-12


def test_embedding_and_linear_gradcheck():
    rng = np.random.default_rng(2)
    emb = gpurnn.Embedding(6, 3, dtype="float64", seed=0)
    lin = gpurnn.Linear(3, 4, dtype="float64", seed=1)
    ids = np.array([[0, 5], [5, 2], [0, 0]])  # repeated ids: their gradients add up
    R = rng.standard_normal((3, 2, 4))

    def loss():
        return float((host(lin(emb(ids))) * R).sum())

    loss()
    emb.backward(lin.backward(R))
    for module in (emb, lin):
        for name, p in module.params.items():
            assert rel_err(module.grads[name], numeric(loss, p)) < 1e-8, name


def test_linear_and_embedding_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    lin = gpurnn.Linear(5, 3, dtype="float64", seed=0)
    tl = torch.nn.Linear(5, 3).double()
    tl.load_state_dict({k: torch.from_numpy(host(v)) for k, v in lin.state_dict().items()})
    x = rng.standard_normal((4, 2, 5))
    d = rng.standard_normal((4, 2, 3))
    xt = torch.tensor(x, requires_grad=True)
    (tl(xt) * torch.from_numpy(d)).sum().backward()
    out = lin(x)
    dx = lin.backward(d)
    assert rel_err(out, tl(xt).detach().numpy()) < 1e-12 and rel_err(dx, xt.grad.numpy()) < 1e-12
    assert rel_err(lin.grads["weight"], tl.weight.grad.numpy()) < 1e-12
    assert rel_err(lin.grads["bias"], tl.bias.grad.numpy()) < 1e-12


def test_mse_gradcheck():
    rng = np.random.default_rng(4)
    pred, target = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    loss_fn = gpurnn.MSELoss()
    loss_fn(pred, target)
    assert rel_err(loss_fn.backward(), numeric(lambda: loss_fn(pred, target), pred)) < 1e-8


@pytest.mark.parametrize("fold", [False, True])
def test_models_on_a_batch_of_no_sequences(fold):
    """B = 0: a loss of 0 (the mean over nothing, as the cross-entropy's over no counted
    position) and a backward that accumulates nothing."""
    lm = gpurnn.CharLM(7, 5, cell="gru", seed=3, fold_embedding=fold)
    loss, _ = lm(np.zeros((4, 0), np.int64), np.zeros((4, 0), np.int64))
    lm.backward()
    reg = gpurnn.SequenceRegressor(3, 5, output_size=2, seed=3)
    reg_loss, _ = reg(np.zeros((4, 0, 3), np.float32), np.zeros((0, 2), np.float32))
    reg.backward()
    assert host(loss) == 0 and host(reg_loss) == 0
    for model in (lm, reg):
        assert not any(g.any() for g in host(model.grads).values())
    assert host(gpurnn.MSELoss()(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))) == 0


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_charlm_gradcheck(cell, fold):
    rng = np.random.default_rng(5)
    lm = gpurnn.CharLM(7, 5, num_layers=2, cell=cell, embedding_dim=4, dtype="float64", seed=3, fold_embedding=fold)
    assert lm.fold_embedding is fold
    x, y = rng.integers(0, 7, (4, 3)), rng.integers(0, 7, (4, 3))
    state = None
    loss, state = lm.forward(x, y)
    lm.backward()
    f = lambda: lm.forward(x, y)[0]  # noqa: E731
    for name, p in lm.params.items():
        assert rel_err(lm.grads[name], numeric(f, p)) < 1e-6, name
    # the carried state is detached: a second chunk's gradient ignores the first chunk
    lm.zero_grad()
    lm.forward(x, y, state)
    lm.backward()
    g = lambda: lm.forward(x, y, state)[0]  # noqa: E731
    assert rel_err(lm.grads["head.weight"], numeric(g, lm.params["head.weight"])) < 1e-6


def test_sequence_regressor_with_a_projected_lstm_gradcheck():
    """The head reads the projection's P features of the last step, not H."""
    rng = np.random.default_rng(7)
    reg = gpurnn.SequenceRegressor(2, 5, output_size=2, num_layers=2, proj_size=3, dtype="float64", seed=1)
    assert reg.params["head.weight"].shape == (2, 3) and reg.params["rnn.weight_hr_l1"].shape == (3, 5)
    x, target = rng.standard_normal((4, 3, 2)), rng.standard_normal((3, 2))
    reg.forward(x, target)
    reg.backward()
    f = lambda: reg.forward(x, target)[0]  # noqa: E731
    for name, p in reg.params.items():
        assert rel_err(reg.grads[name], numeric(f, p)) < 1e-6, name


# more symbols than embedding dimensions, and fewer: folded; each with an LSTM projected to P
@pytest.mark.parametrize("V, P", [(9, 0), (7, 0), (9, 5), (7, 3)])
def test_charlm_matches_torch(V, P):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    H = 8
    lm = gpurnn.CharLM(V, H, num_layers=2, cell="lstm", dtype="float64", seed=0, proj_size=P)
    assert lm.fold_embedding == (V <= H) and lm.params["head.weight"].shape == (V, P or H)
    emb, rnn = torch.nn.Embedding(V, H).double(), torch.nn.LSTM(H, H, 2, proj_size=P).double()
    head = torch.nn.Linear(P or H, V).double()
    sd = lm.state_dict()
    for prefix, module in (("embedding", emb), ("rnn", rnn), ("head", head)):
        module.load_state_dict({k: torch.from_numpy(host(sd[f"{prefix}.{k}"])) for k in module.state_dict()})
    x, y = rng.integers(0, V, (6, 3)), rng.integers(0, V, (6, 3))
    loss, _ = lm.forward(x, y)
    lm.backward()
    logits = head(rnn(emb(torch.tensor(x)))[0])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(y).reshape(-1))
    ref.backward()
    assert abs(float(loss) - ref.item()) < 1e-12
    for prefix, module in (("embedding", emb), ("rnn", rnn), ("head", head)):
        for k, p in module.named_parameters():
            assert rel_err(lm.grads[f"{prefix}.{k}"], p.grad.numpy()) < 1e-10, k


def test_embedding_bad_ids():
    emb = gpurnn.Embedding(4, 2)
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 4\), got values from 0 to 4"):
        emb(np.array([[0, 4]]))
    with pytest.raises(TypeError, match="ids: expected an integer array, got dtype float64"):
        emb(np.array([[0.0]]))


@pytest.mark.parametrize("rows", [7, 70_000])  # one-hot GEMM path, sort-and-reduce path
def test_scatter_add_matches_add_at(rows):
    from gpurnn.backend import NumpyOps

    rng = np.random.default_rng(7)
    indices = rng.integers(0, rows, 300)
    indices[:5] = indices[0]  # repeats add up
    values = rng.standard_normal((300, 3))
    target = rng.standard_normal((rows, 3))
    expect = target.copy()
    np.add.at(expect, indices, values)
    NumpyOps.scatter_add(target, indices, values)
    np.testing.assert_allclose(target, expect, rtol=1e-12, atol=1e-12)
