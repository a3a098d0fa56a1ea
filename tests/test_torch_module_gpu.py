"""gpurnn.torch on a GPU (marker ``gpu``; skipped without CUDA): parity with cuDNN,
torch's streams, and no host synchronization in a training step.

Run by ``kernels/gpu_check.py``'s suite stage (GPURNN_BACKEND=cuda).
"""

import numpy as np
import pytest

from helpers import backend_or_skip, needs_ml_dtypes

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gt():
    backend_or_skip("cuda", "no CUDA backend")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    torch.backends.cudnn.allow_tf32 = False  # strict fp32 on both sides
    torch.backends.cuda.matmul.allow_tf32 = False
    import gpurnn.torch

    return gpurnn.torch


def pair(gt, cls, *args, **kwargs):
    """(gpurnn.torch module, torch.nn module) on the GPU with the same weights."""
    ours = getattr(gt, cls)(*args, **kwargs).cuda()
    peer = getattr(torch.nn, cls)(*args, **kwargs).cuda()
    peer.load_state_dict(ours.state_dict())
    return ours, peer


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("layers, bidirectional, batch_first, packed",
                         [(1, False, False, False), (2, True, True, False), (2, False, False, True),
                          (1, True, True, True)])
def test_parity_with_cudnn(gt, cls, layers, bidirectional, batch_first, packed):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    ours, peer = pair(gt, cls, 12, 24, layers, batch_first=batch_first, bidirectional=bidirectional)
    T, B = 9, 5
    x = torch.randn((B, T, 12) if batch_first else (T, B, 12), device="cuda")
    lengths = torch.tensor([9, 3, 7, 1, 9])
    results = []
    for m in (ours, peer):
        xi = x.clone().requires_grad_(True)
        inp = pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False) if packed else xi
        out, state = m(inp)
        if packed:
            out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=T)
        h_n = state[0] if cls == "LSTM" else state
        (out.square().sum() + h_n.sum()).backward()
        results.append([out, h_n, xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        assert rel(a, b) < 1e-4


def test_projected_lstm_parity_with_cudnn(gt):
    """proj_size on CUDA tensors, packed and bidirectional, against torch.nn.LSTM's (cuDNN's) projection."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    ours, peer = pair(gt, "LSTM", 12, 24, 2, batch_first=True, bidirectional=True, proj_size=10)
    x = torch.randn(5, 9, 12, device="cuda")
    lengths = torch.tensor([9, 3, 7, 1, 9])
    results = []
    for m in (ours, peer):
        xi = x.clone().requires_grad_(True)
        out, (h_n, c_n) = m(pack_padded_sequence(xi, lengths, batch_first=True, enforce_sorted=False))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=9)
        (out.square().sum() + h_n.sum() + c_n.sum()).backward()
        results.append([out, h_n, c_n, xi.grad] + [p.grad for p in m.parameters()])
    assert results[0][1].shape == (4, 5, 10) and results[0][2].shape == (4, 5, 24)
    for a, b in zip(*results):
        assert rel(a, b) < 1e-4


def test_runs_on_a_non_default_torch_stream(gt):
    """The call is ordered on torch's current stream: work queued before it on a side stream
    is seen, and work queued after it sees its results, with no synchronization between."""
    torch.manual_seed(1)
    ours, _ = pair(gt, "LSTM", 16, 32, 2)
    x = torch.randn(20, 8, 16, device="cuda")
    expected = ours(x)[0].detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device="cuda")
        for _ in range(3):
            big = big @ big / 64  # keep the side stream busy before the input is written
        y = x * 1.0 + big[0, 0] * 0  # the input depends on that work
        out, _ = ours(y)
        total = out.sum()
    side.synchronize()
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.isclose(total, expected.sum(), rtol=1e-5)


def test_training_step_while_torch_works_on_another_stream(gt):
    """Replayed graphs of ours alongside torch's own work: the same parameters after
    five AdamW steps as a quiet run."""

    def train(busy):
        torch.manual_seed(2)
        m = gt.GRU(8, 16, 2).cuda()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        x = torch.randn(15, 4, 8, device="cuda")
        other = torch.cuda.Stream()
        noise = torch.randn(2048, 2048, device="cuda")
        for _ in range(5):
            if busy:
                with torch.cuda.stream(other):
                    noise = noise @ noise / 64
            out, _ = m(x)
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        return [p.detach().clone() for p in m.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


def test_no_host_synchronization_in_a_training_step(gt):
    """After the first calls (which compile, time the algorithms and capture graphs), a
    training step makes torch synchronize nothing (torch's sync debug mode raises if it
    does). CuPy has no such mode: syncs on gpurnn's side are not seen here."""
    torch.manual_seed(3)
    m = gt.LSTM(32, 64, 2, batch_first=True).cuda()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(8, 25, 32, device="cuda")
    target = torch.randn(8, 25, 64, device="cuda")

    def step():
        out, _ = m(x)
        torch.nn.functional.mse_loss(out, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(np.isfinite(p.detach().cpu().numpy()).all() for p in m.parameters())


@pytest.mark.parametrize("half, tol", [("float16", 1e-2), pytest.param("bfloat16", 8e-2, marks=needs_ml_dtypes)])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_autocast_half_parity_with_cudnn(gt, cls, half, tol):
    """Both under torch.autocast(float16 or bfloat16): half outputs, float32 parameter
    gradients, close (bfloat16: where torch's own RNN runs it)."""
    half = getattr(torch, half)
    torch.manual_seed(0)
    ours, peer = pair(gt, cls, 32, 64, num_layers=2)
    x = torch.randn(20, 8, 32, device="cuda")
    x_ours, x_peer = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    outs = []
    for module, inp in ((ours, x_ours), (peer, x_peer)):
        try:
            with torch.autocast("cuda", dtype=half):
                out, _ = module(inp)
            out.float().pow(2).sum().backward()
        except RuntimeError as exc:
            if module is peer and half == torch.bfloat16:
                pytest.skip(f"torch's {cls} does not run bfloat16 under autocast here: {exc}")
            raise
        outs.append(out)
    assert outs[0].dtype == outs[1].dtype == half
    assert rel(outs[0], outs[1]) < tol / 2
    assert rel(x_ours.grad, x_peer.grad) < tol
    for (name, p), q in zip(ours.named_parameters(), peer.parameters()):
        assert p.grad.dtype == torch.float32 and rel(p.grad, q.grad) < tol, name


def test_parametrized_weights_and_an_empty_batch_on_the_gpu(gt):
    """weight_norm's computed weight copied into the layer's own device buffer, trained as
    cuDNN's module over three SGD steps; a batch of no sequences as torch's."""
    torch.manual_seed(5)
    ours, peer = pair(gt, "LSTM", 12, 24, 2)
    x = torch.randn(9, 5, 12, device="cuda")
    losses = []
    for m in (ours, peer):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l1")
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        losses.append([])
        for _ in range(3):
            opt.zero_grad()
            loss = m(x)[0].square().sum()
            loss.backward()
            opt.step()
            losses[-1].append(loss.item())
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    ours.zero_grad()
    empty = torch.zeros(9, 0, 12, device="cuda", requires_grad=True)
    out, (h_n, c_n) = ours(empty)
    out.sum().backward()
    assert out.shape == (9, 0, 24) and h_n.shape == c_n.shape == (2, 0, 24) and empty.grad.shape == empty.shape
    assert all(not p.grad.any() for p in ours.parameters())
