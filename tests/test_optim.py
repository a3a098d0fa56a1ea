"""Optimizers and clipping give torch.optim's numbers on the same gradients."""

import numpy as np
import pytest

from gpurnn import optim
from helpers import rel_err

torch = pytest.importorskip("torch")

CASES = [
    ("sgd", dict(lr=0.1), dict(lr=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9)),
    ("adagrad", dict(lr=0.1, eps=1e-10), dict(lr=0.1, eps=1e-10)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8)),
]
TORCH = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}


@pytest.mark.parametrize("name, ours_kw, torch_kw", CASES)
def test_optimizer_matches_torch(name, ours_kw, torch_kw):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = optim.OPTIMIZERS[name](params, grads, **ours_kw)
    topt = TORCH[name](list(tparams.values()), **torch_kw)
    for _ in range(6):
        for k in params:
            g = rng.standard_normal(params[k].shape)
            grads[k][...] = g
            tparams[k].grad = torch.tensor(g)
        opt.step()
        topt.step()
        for k in params:
            assert rel_err(params[k], tparams[k].detach().numpy()) < 1e-12, (name, k)


def test_optimizer_state_round_trip():
    rng = np.random.default_rng(1)
    p1 = {"w": rng.standard_normal(5)}
    p2 = {"w": p1["w"].copy()}
    g = {"w": rng.standard_normal(5)}
    a = optim.Adam(p1, g, lr=0.1)
    a.step()
    b = optim.Adam(p2, g, lr=0.1)
    b.step()
    saved = a.state_dict()
    c = optim.Adam({"w": p1["w"].copy()}, g, lr=0.1)
    c.load_state_dict(saved)
    a.step()
    c.step()
    assert np.array_equal(a.params["w"], c.params["w"])
    with pytest.raises(ValueError, match="optimizer state"):
        c.load_state_dict({"steps": 1})


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    rng = np.random.default_rng(2)
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    ts = [torch.zeros(3, 4, dtype=torch.float64, requires_grad=True), torch.zeros(5, dtype=torch.float64,
                                                                                 requires_grad=True)]
    ts[0].grad, ts[1].grad = torch.tensor(grads["a"]), torch.tensor(grads["b"])
    ref = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    norm = optim.clip_grad_norm(grads, max_norm)
    assert abs(norm - ref.item()) < 1e-12
    assert rel_err(grads["a"], ts[0].grad.numpy()) < 1e-12 and rel_err(grads["b"], ts[1].grad.numpy()) < 1e-12


def test_clip_grad_value_matches_torch():
    rng = np.random.default_rng(3)
    grads = {"a": rng.standard_normal((3, 4)) * 3}
    t = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    t.grad = torch.tensor(grads["a"])
    before = np.sqrt((grads["a"] ** 2).sum())
    torch.nn.utils.clip_grad_value_([t], 1.5)
    assert abs(optim.clip_grad_value(grads, 1.5) - before) < 1e-12
    assert np.array_equal(grads["a"], t.grad.numpy()) and np.abs(grads["a"]).max() == 1.5


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lr=0), ValueError, "lr"), (dict(lr=-1), ValueError, "lr"), (dict(lr="x"), TypeError, "lr"),
    (dict(lr=1, momentum=-0.5), ValueError, "momentum"),
])
def test_bad_optimizer_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        optim.SGD({"w": np.zeros(2)}, {"w": np.zeros(2)}, **kwargs)


def test_clip_arguments():
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm({"w": np.ones(2)}, 0)
    with pytest.raises(ValueError, match="threshold"):
        optim.clip_grad_value({"w": np.ones(2)}, -1)
