"""Per-timestep pointwise math of the three cells, in NumPy: the specification.

Every function here has a numba.cuda twin in ``gpurnn.cuda.kernels`` with the
same name, the same arguments in the same order, and the same in-place
behaviour; a CUDA kernel is correct when it agrees with its twin.

Dimension letters (used in every shape comment of the package):
    T time steps, B batch, I input size, H hidden size,
    G gate blocks (RNN 1, LSTM 4, GRU 3), L layers, D directions (1 or 2).

One call handles timestep ``t`` of one layer and one direction. The state
buffers are indexed by time for both directions:

    forward  (reverse=0): reads state t,   writes state t+1   (h[0] = h0)
    reverse  (reverse=1): reads state t+1, writes state t     (h[T] = h0)

``lengths`` (``[B]``) masks padded steps: where ``t >= lengths[b]`` the state is
carried unchanged, the output is 0 and the saved gates are 0. That gives
PyTorch's packed-sequence semantics: the forward direction's final state is
the state at each sequence's last valid step, and the reverse direction starts
from h0 at each sequence's own last step.

Forward functions take the hoisted input projection ``gx`` (bias_ih already
added) and this step's recurrent projection ``gh = h_prev @ W_hh^T`` (no bias);
they add ``b_hh`` themselves because the GRU needs ``U_n h + b_hn`` alone.

Backward functions take ``dh`` (``[B, H]``), the gradient carried into the
state this step wrote, and overwrite it with the *direct* part of the gradient
of the state it read; the driver then adds ``dgates @ W_hh`` to it. They write
the pre-activation gradients ``dgates[t]`` that the weight-gradient GEMMs use.
Derivatives are taken from saved outputs (``1 - tanh^2``, ``s (1 - s)``).
"""

import numpy as np

NONLINEARITIES = ("tanh", "relu", "sigmoid", "leaky_relu", "elu")
LEAKY_RELU_SLOPE = 0.01  # torch.nn.LeakyReLU's default
ELU_ALPHA = 1.0  # torch.nn.ELU's default


def sigmoid(x):
    """Logistic function without overflow: exp only ever sees -|x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def activate(nonlinearity, a):
    """phi(a) for the plain RNN."""
    if nonlinearity == "tanh":
        return np.tanh(a)
    if nonlinearity == "sigmoid":
        return sigmoid(a)
    if nonlinearity == "relu":
        return np.maximum(a, 0)
    if nonlinearity == "leaky_relu":
        return np.where(a > 0, a, a * LEAKY_RELU_SLOPE)
    if nonlinearity == "elu":
        return np.where(a > 0, a, ELU_ALPHA * np.expm1(np.minimum(a, 0)))
    raise ValueError(f"nonlinearity: expected one of {NONLINEARITIES}, got {nonlinearity!r}")


def activate_grad(nonlinearity, h):
    """phi'(a) written from the output h = phi(a), so a need not be saved."""
    if nonlinearity == "tanh":
        return 1 - h * h
    if nonlinearity == "sigmoid":
        return h * (1 - h)
    if nonlinearity == "relu":
        return (h > 0).astype(h.dtype)
    if nonlinearity == "leaky_relu":
        return np.where(h > 0, 1, LEAKY_RELU_SLOPE).astype(h.dtype)
    if nonlinearity == "elu":
        return np.where(h > 0, 1, h + ELU_ALPHA).astype(h.dtype)  # alpha e^a = h + alpha
    raise ValueError(f"nonlinearity: expected one of {NONLINEARITIES}, got {nonlinearity!r}")


def _steps(t, reverse):
    """(state index read, state index written) for timestep t."""
    return t + reverse, t + 1 - reverse


def _valid(t, lengths):
    """[B, 1] boolean: which sequences are still running at timestep t."""
    return (t < lengths)[:, None]


# --------------------------------------------------------------------------- RNN
def rnn_forward(t, reverse, gx, gh, b_hh, h, y, lengths, nonlinearity):
    """h_t = phi(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

    gx: [T, B, H]   gh: [B, H]   b_hh: [H]   h: [T+1, B, H] (writes one state)
    y: [T, B, H] (writes y[t])   lengths: [B]
    """
    prev, nxt = _steps(t, reverse)
    valid = _valid(t, lengths)
    h_new = activate(nonlinearity, gx[t] + gh + b_hh)
    h[nxt] = np.where(valid, h_new, h[prev])  # padded steps carry the state
    y[t] = np.where(valid, h_new, 0)


def rnn_backward(t, reverse, h, dy, dh, dgates, lengths, nonlinearity):
    """h: [T+1, B, H]  dy: [T, B, H]  dh: [B, H] (in/out)  dgates: [T, B, H] (writes dgates[t])."""
    prev, nxt = _steps(t, reverse)
    valid = _valid(t, lengths)
    dh_total = dh + dy[t]  # output at t plus what flows back from t+1
    da = dh_total * activate_grad(nonlinearity, h[nxt])  # backprop through phi
    dgates[t] = np.where(valid, da, 0)
    dh[...] = np.where(valid, 0, dh)  # h_{t-1} reaches h_t only through W_hh


# -------------------------------------------------------------------------- LSTM
def lstm_forward(t, reverse, gx, gh, b_hh, h, c, gates, y, lengths):
    """i, f, o = sigmoid(.), g = tanh(.), c_t = f c_{t-1} + i g, h_t = o tanh(c_t).

    gx: [T, B, 4H] (blocks i, f, g, o)   gh: [B, 4H]   b_hh: [4H]
    h, c: [T+1, B, H]   gates: [T, B, 4H] activated i, f, g, o (writes gates[t])
    y: [T, B, H]   lengths: [B]
    """
    prev, nxt = _steps(t, reverse)
    valid = _valid(t, lengths)
    H = h.shape[-1]
    a = gx[t] + gh + b_hh
    i = sigmoid(a[:, 0 * H:1 * H])
    f = sigmoid(a[:, 1 * H:2 * H])
    g = np.tanh(a[:, 2 * H:3 * H])
    o = sigmoid(a[:, 3 * H:4 * H])
    c_new = f * c[prev] + i * g
    h_new = o * np.tanh(c_new)
    c[nxt] = np.where(valid, c_new, c[prev])
    h[nxt] = np.where(valid, h_new, h[prev])
    y[t] = np.where(valid, h_new, 0)
    gates[t] = np.where(valid, np.concatenate([i, f, g, o], axis=1), 0)


def lstm_backward(t, reverse, c, gates, dy, dh, dc, dgates, lengths):
    """c: [T+1, B, H]  gates: [T, B, 4H]  dy: [T, B, H]
    dh, dc: [B, H] (in: grads of h_t, c_t; out: direct grads of h_{t-1}, c_{t-1})
    dgates: [T, B, 4H] (writes dgates[t])
    """
    prev, nxt = _steps(t, reverse)
    valid = _valid(t, lengths)
    H = c.shape[-1]
    i, f, g, o = (gates[t, :, k * H:(k + 1) * H] for k in range(4))
    tanh_c = np.tanh(c[nxt])
    dh_total = dh + dy[t]
    dc_total = dc + dh_total * o * (1 - tanh_c * tanh_c)  # backprop through tanh(c_t)
    di = dc_total * g * i * (1 - i)
    df = dc_total * c[prev] * f * (1 - f)
    dg = dc_total * i * (1 - g * g)
    do = dh_total * tanh_c * o * (1 - o)
    dgates[t] = np.where(valid, np.concatenate([di, df, dg, do], axis=1), 0)
    dc[...] = np.where(valid, dc_total * f, dc)
    dh[...] = np.where(valid, 0, dh)


# --------------------------------------------------------------------------- GRU
def gru_forward(t, reverse, gx, gh, b_hh, h, gates, y, lengths):
    """r, z = sigmoid(.), n = tanh(W_n x + b_in + r (U_n h + b_hn)),
    h_t = (1 - z) n + z h_{t-1}.

    gx: [T, B, 3H] (blocks r, z, n)   gh: [B, 3H]   b_hh: [3H]   h: [T+1, B, H]
    gates: [T, B, 4H] saved r, z, n and hn = U_n h + b_hn (writes gates[t])
    y: [T, B, H]   lengths: [B]
    """
    prev, nxt = _steps(t, reverse)
    valid = _valid(t, lengths)
    H = h.shape[-1]
    gx_t = gx[t]
    a_h = gh + b_hh
    r = sigmoid(gx_t[:, 0 * H:1 * H] + a_h[:, 0 * H:1 * H])
    z = sigmoid(gx_t[:, 1 * H:2 * H] + a_h[:, 1 * H:2 * H])
    hn = a_h[:, 2 * H:3 * H]
    n = np.tanh(gx_t[:, 2 * H:3 * H] + r * hn)
    h_new = (1 - z) * n + z * h[prev]
    h[nxt] = np.where(valid, h_new, h[prev])
    y[t] = np.where(valid, h_new, 0)
    gates[t] = np.where(valid, np.concatenate([r, z, n, hn], axis=1), 0)


def gru_backward(t, reverse, h, gates, dy, dh, dgx, dgh, lengths):
    """h: [T+1, B, H]  gates: [T, B, 4H]  dy: [T, B, H]  dh: [B, H] (in/out)
    dgx: [T, B, 3H] grads of the input projection (writes dgx[t])
    dgh: [T, B, 3H] grads of the recurrent projection (writes dgh[t]); they differ
         in the n block, where U_n h is scaled by r
    """
    prev, nxt = _steps(t, reverse)
    valid = _valid(t, lengths)
    H = h.shape[-1]
    r, z, n, hn = (gates[t, :, k * H:(k + 1) * H] for k in range(4))
    dh_total = dh + dy[t]
    dn = dh_total * (1 - z) * (1 - n * n)  # backprop through tanh
    dz = dh_total * (h[prev] - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dgx[t] = np.where(valid, np.concatenate([dr, dz, dn], axis=1), 0)
    dgh[t] = np.where(valid, np.concatenate([dr, dz, dn * r], axis=1), 0)
    dh[...] = np.where(valid, dh_total * z, dh)  # the z h_{t-1} path skips W_hh
