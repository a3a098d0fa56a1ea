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
carried unchanged, the output is 0 and the saved gates and gate gradients are 0
(here: computed for every row, then the finished rows are overwritten; the
CUDA kernels branch per element instead). That gives
PyTorch's packed-sequence semantics: the forward direction's final state is
the state at each sequence's last valid step, and the reverse direction starts
from h0 at each sequence's own last step.

Forward functions take the hoisted input projection ``gx = x W_ih^T`` and this
step's recurrent projection ``gh = h_prev @ W_hh^T``, both without bias, and add
``b_ih`` and ``b_hh`` themselves: the GRU needs ``U_n h + b_hn`` alone, and adding
b_ih here, one [B, G*H] step at a time, spares a whole extra pass over gx. Sums
are grouped as torch's, (x W_ih^T + b_ih) + (h W_hh^T + b_hh), so float32 results
round alike.

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


def sigmoid(x, out=None):
    """Logistic function as 0.5 tanh(x/2) + 0.5: never overflows, any |x|."""
    out = np.multiply(x, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


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


def _blocks(a, n):
    """The n gate blocks [B, H] of a [B, n*H] array, as views."""
    H = a.shape[-1] // n
    return [a[:, k * H:(k + 1) * H] for k in range(n)]


# --------------------------------------------------------------------------- RNN
def rnn_forward(t, reverse, gx, gh, b_ih, b_hh, h, y, lengths, nonlinearity):
    """h_t = phi(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

    gx: [T, B, H]   gh: [B, H]   b_ih, b_hh: [H]   h: [T+1, B, H] (writes one state)
    y: [T, B, H] (writes y[t])   lengths: [B]
    """
    prev, nxt = _steps(t, reverse)
    h[nxt] = activate(nonlinearity, (gx[t] + b_ih) + (gh + b_hh))
    y[t] = h[nxt]
    done = t >= lengths
    if done.any():  # padded steps carry the state and output 0
        h[nxt, done] = h[prev, done]
        y[t, done] = 0


def rnn_backward(t, reverse, h, dy, dh, dgates, lengths, nonlinearity):
    """h: [T+1, B, H]  dy: [T, B, H]  dh: [B, H] (in/out)  dgates: [T, B, H] (writes dgates[t])."""
    prev, nxt = _steps(t, reverse)
    done = t >= lengths
    dh_carried = dh[done]
    dh_total = dh + dy[t]  # output at t plus what flows back from t+1
    np.multiply(dh_total, activate_grad(nonlinearity, h[nxt]), out=dgates[t])  # backprop through phi
    dh[...] = 0  # h_{t-1} reaches h_t only through W_hh
    if done.any():
        dgates[t, done] = 0
        dh[done] = dh_carried


# -------------------------------------------------------------------------- LSTM
def lstm_forward(t, reverse, gx, gh, b_ih, b_hh, h, c, gates, y, lengths):
    """i, f, o = sigmoid(.), g = tanh(.), c_t = f c_{t-1} + i g, h_t = o tanh(c_t).

    gx: [T, B, 4H] (blocks i, f, g, o)   gh: [B, 4H]   b_ih, b_hh: [4H]
    h, c: [T+1, B, H]   gates: [T, B, 4H] activated i, f, g, o (writes gates[t])
    y: [T, B, H]   lengths: [B]
    """
    prev, nxt = _steps(t, reverse)
    H = h.shape[-1]
    act = gates[t]
    np.add(gx[t], b_ih, out=act)
    act += gh + b_hh  # pre-activations (x W_ih^T + b_ih) + (h W_hh^T + b_hh), turned into activations in place
    i, f, g, o = _blocks(act, 4)
    sigmoid(act[:, :2 * H], out=act[:, :2 * H])  # i and f are adjacent
    np.tanh(g, out=g)
    sigmoid(o, out=o)
    done = t >= lengths
    c_carried = c[prev, done]  # read before c_new is written: an inference forward's c is one block
    c_new, h_new = c[nxt], h[nxt]
    np.multiply(f, c[prev], out=c_new)
    c_new += i * g
    np.tanh(c_new, out=h_new)
    h_new *= o
    y[t] = h_new
    if done.any():  # padded steps carry the state and output 0
        c[nxt, done] = c_carried
        h[nxt, done] = h[prev, done]
        y[t, done] = 0
        gates[t, done] = 0


def lstm_backward(t, reverse, c, gates, dy, dh, dc, dgates, lengths):
    """c: [T+1, B, H]  gates: [T, B, 4H]  dy: [T, B, H]
    dh, dc: [B, H] (in: grads of h_t, c_t; out: direct grads of h_{t-1}, c_{t-1})
    dgates: [T, B, 4H] (writes dgates[t]; may be gates' own storage, see gpurnn.sequence:
            every gate is read before its gradient is written over it)
    """
    prev, nxt = _steps(t, reverse)
    done = t >= lengths
    any_done = done.any()
    if any_done:
        dh_carried, dc_carried = dh[done], dc[done]
    H = c.shape[-1]
    i, f, g, o = _blocks(gates[t], 4)
    di, df, dg, do = _blocks(dgates[t], 4)
    tanh_c = np.tanh(c[nxt])
    dh_total = dh + dy[t]
    dc_total = dh_total * o
    dc_total *= 1 - tanh_c * tanh_c  # backprop through tanh(c_t)
    dc_total += dc
    i_f = gates[t][:, :2 * H]  # derivatives of the activations: s' = s (1 - s), tanh' = 1 - g^2
    dsig_if, dsig_o, dtanh_g = i_f * (1 - i_f), o * (1 - o), 1 - g * g
    dc_g = dc_total * g  # g is written over next
    np.multiply(dc_total, f, out=dc)
    np.multiply(dc_total, i, out=dg)  # gradients of the pre-activations: d(activation) times its derivative
    dg *= dtanh_g
    np.multiply(dc_g, dsig_if[:, :H], out=di)
    np.multiply(dc_total, c[prev], out=df)
    df *= dsig_if[:, H:]
    np.multiply(dh_total, tanh_c, out=do)
    do *= dsig_o
    dh[...] = 0  # h_{t-1} reaches the gates only through W_hh
    if any_done:
        dgates[t, done] = 0
        dh[done], dc[done] = dh_carried, dc_carried


# ------------------------------------------------------------- LSTM projection
def project_forward(t, reverse, hp, h, y, lengths):
    """The state and output of an LSTM with a projection (torch's proj_size):
    h_t = hp = (o * tanh(c_t)) W_hr^T, computed by the driver's GEMM.

    hp: [B, P]   h: [T+1, B, P] (writes one state)   y: [T, B, P] (writes y[t])   lengths: [B]
    """
    prev, nxt = _steps(t, reverse)
    h[nxt] = hp
    y[t] = hp
    done = t >= lengths
    if done.any():  # padded steps carry the state and output 0
        h[nxt, done] = h[prev, done]
        y[t, done] = 0


def project_backward(t, reverse, dy, dh, dproj, lengths):
    """dy: [T, B, P]   dh: [B, P] (in: grad of h_t; out: its direct part in h_{t-1}, the
    driver then adds dgates_t W_hh)   dproj: [T, B, P] (writes dproj[t], grad of step t's projection)
    """
    done = t >= lengths
    np.add(dh, dy[t], out=dproj[t])  # output at t plus what flows back from t+1
    dh[~done] = 0  # h_{t-1} reaches h_t only through the cell, that is, through W_hh
    dproj[t, done] = 0  # padded steps: the gradient passes through untouched


# --------------------------------------------------------------------------- GRU
def gru_forward(t, reverse, gx, gh, b_ih, b_hh, h, gates, y, lengths):
    """r, z = sigmoid(.), n = tanh(W_n x + b_in + r (U_n h + b_hn)),
    h_t = (1 - z) n + z h_{t-1}.

    gx: [T, B, 3H] (blocks r, z, n; may be the first 3H columns of gates' own rows,
        gpurnn.sequence: each is read before its gate is written over it)
    gh: [B, 3H]   b_ih, b_hh: [3H]   h: [T+1, B, H]
    gates: [T, B, 4H] saved r, z, n and hn = U_n h + b_hn (writes gates[t])
    y: [T, B, H]   lengths: [B]
    """
    prev, nxt = _steps(t, reverse)
    H = h.shape[-1]
    act = gates[t]
    rz, n, hn = act[:, :2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
    np.add(gx[t], b_ih, out=act[:, :3 * H])  # x W_ih^T + b_ih, in gx's own place when they share
    rz += gh[:, :2 * H] + b_hh[:2 * H]  # ... + (h W_hh^T + b_hh)
    sigmoid(rz, out=rz)
    r, z = rz[:, :H], rz[:, H:]
    np.add(gh[:, 2 * H:], b_hh[2 * H:], out=hn)  # U_n h + b_hn, kept apart: r scales it
    n += r * hn
    np.tanh(n, out=n)
    h_new = h[nxt]
    np.subtract(h[prev], n, out=h_new)
    h_new *= z
    h_new += n  # (1 - z) n + z h_prev = n + z (h_prev - n)
    y[t] = h_new
    done = t >= lengths
    if done.any():  # padded steps carry the state and output 0
        h[nxt, done] = h[prev, done]
        y[t, done] = 0
        gates[t, done] = 0


def gru_backward(t, reverse, h, gates, dy, dh, dgates, lengths):
    """h: [T+1, B, H]  gates: [T, B, 4H] (r, z, n, hn)  dy: [T, B, H]  dh: [B, H] (in/out)
    dgates: [T, B, 4H] (writes dgates[t]) the pre-activation gradients dr, dz, dn r, dn:
            the recurrent projection's gradient is its first 3H columns, the input
            projection's its r, z and last blocks (U_n h is scaled by r, W_n x is not).
            dgates may be gates' own storage (gpurnn.sequence): the gates are read first
    """
    prev, nxt = _steps(t, reverse)
    H = dh.shape[-1]
    done = t >= lengths
    dh_carried = dh[done]
    r, z, n, hn = _blocks(gates[t], 4)
    dh_total = dh + dy[t]
    dn = dh_total * (1 - z) * (1 - n * n)  # backprop through tanh
    dz = dh_total * (h[prev] - n) * (z * (1 - z))
    dr = dn * hn * (r * (1 - r))
    dn_r = dn * r  # U_n h reaches n scaled by r
    np.multiply(dh_total, z, out=dh)  # the z h_{t-1} path skips W_hh
    for k, grad in enumerate((dr, dz, dn_r, dn)):  # every gate is read: the gradients may take their place
        dgates[t, :, k * H:(k + 1) * H] = grad
    if done.any():
        dgates[t, done] = 0
        dh[done] = dh_carried
