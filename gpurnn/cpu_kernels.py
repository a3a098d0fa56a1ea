"""Fused float32 pointwise steps for the NumPy backend, compiled by numba for the CPU.

Each function here has the name, arguments and in-place behaviour of its spec in
``gpurnn.cells`` (read that module's docstring for the conventions) and groups its
sums as the spec does, but makes one pass over a step's rows instead of one NumPy
pass per operation: a step of the spec makes 15-30 passes over [B, H] blocks, most
of them strided views, and at the sizes people train on a CPU those passes, not
the GEMMs, set the pace (LSTM, B=128, H=256: forward pointwise 0.8 ms a step, fused
0.3; kernels/NOTES.md v13). The NumPy backend runs these for float32 when numba is
installed (``gpurnn.set_cpu_kernels``); float64 and the half types run the spec,
which stays the reference.

Numerically they differ from the spec in two ways: tanh (and the sigmoid written
through it, 0.5 tanh(x/2) + 0.5) is a rational approximation that vectorizes,
within 5 float32 ulps of the exact value (``tanh``) where NumPy calls its own, and
fast math may fuse a multiply and an add. Results agree with the spec to float32
rounding, not bit for bit.

Each kernel takes one step's 2-D row blocks (``gates[t]``, ``c[prev]``, ...) and
hands each unpadded row to a row function. That is what lets LLVM vectorize the
loop over a row's units: not inlined into the loop over rows (there it stays
scalar: 1.0 against 0.3 ms an LSTM step), and with no buffer read through one
argument while written through another (a loop whose written buffer may overlap
another runs scalar). So a buffer the spec reads and overwrites (each gated
cell's gates over its input projection, its gate gradients over its gates;
gpurnn.sequence) is one argument, updated in place; where a layout keeps them
apart, the wrapper first copies the input into the output buffer.
"""

import math

import numba
import numpy as np

from gpurnn.cells import ELU_ALPHA, LEAKY_RELU_SLOPE, NONLINEARITIES, _steps

# numpy's error model: no branch on x / 0; fast math without "no NaNs": a diverging
# model's NaN must reach its loss, as through the spec
_JIT = dict(nogil=True, cache=True, fastmath={"contract", "arcp", "afn", "nsz"}, error_model="numpy")
_NONLINEARITY_CODE = {name: k for k, name in enumerate(NONLINEARITIES)}
TANH, RELU, SIGMOID, LEAKY_RELU, ELU = (_NONLINEARITY_CODE[n] for n in NONLINEARITIES)  # constants in the kernels


@numba.njit(inline="always", **_JIT)
def tanh(x):
    """float32 tanh as a rational function of x on [-7.9, 7.9] (+-1 beyond): no call,
    so the loops around it vectorize. The coefficients are Eigen's (its fast float tanh)."""
    limit = np.float32(7.90531110763549805)
    x = -limit if x < -limit else (limit if x > limit else x)  # comparisons, so NaN stays NaN
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x if abs(x) < np.float32(0.0004) else x * p / q  # below 0.0004 x itself is closer


@numba.njit(inline="always", **_JIT)
def sigmoid(x):
    half = np.float32(0.5)
    return half * tanh(half * x) + half  # as the spec: never overflows


@numba.njit(inline="always", **_JIT)
def activate(code, a):
    """phi(a) for the plain RNN; code is one of TANH ... ELU (cells.NONLINEARITIES' order)."""
    if code == TANH:
        return tanh(a)
    if code == RELU:
        return np.float32(0) if a < 0 else a
    if code == SIGMOID:
        return sigmoid(a)
    if code == LEAKY_RELU:
        return a if a > 0 else a * np.float32(LEAKY_RELU_SLOPE)
    return a if a > 0 else np.float32(ELU_ALPHA) * np.float32(math.expm1(a))  # ELU


@numba.njit(inline="always", **_JIT)
def activate_grad(code, h):
    """phi'(a) from h = phi(a), as cells.activate_grad."""
    one = np.float32(1)
    if code == TANH:
        return one - h * h
    if code == RELU:
        return one if h > 0 else np.float32(0)
    if code == SIGMOID:
        return h * (one - h)
    if code == LEAKY_RELU:
        return one if h > 0 else np.float32(LEAKY_RELU_SLOPE)
    return one if h > 0 else h + np.float32(ELU_ALPHA)  # ELU: alpha e^a = h + alpha


# A bidirectional layer's y[t] and dy[t] are half of each output row: numba types such a
# view as layout "A", and a row loop reading or writing it runs scalar. So the steps read
# dy[t] through np.ascontiguousarray (a copy only of a strided view) and write y[t]
# through _scratch_if_strided.
def _scratch_if_strided(a):
    """a, or a C-contiguous scratch of its shape for a kernel to write (the caller copies
    it into a afterwards)."""
    return a if a.flags.c_contiguous else np.empty(a.shape, a.dtype)


# --------------------------------------------------------------------------- RNN
@numba.njit(**_JIT)
def _rnn_forward_row(code, gx, gh, b_ih, b_hh, h_new, y):
    for j in range(h_new.size):
        h_new[j] = activate(code, (gx[j] + b_ih[j]) + (gh[j] + b_hh[j]))
    for j in range(h_new.size):
        y[j] = h_new[j]


@numba.njit(**_JIT)
def _rnn_forward(code, gx, gh, b_ih, b_hh, h_prev, h_new, y_t, valid):
    for r in range(h_new.shape[0]):
        if valid[r]:
            _rnn_forward_row(code, gx[r], gh[r], b_ih, b_hh, h_new[r], y_t[r])
        else:  # padded steps carry the state and output 0
            _carry(h_prev[r], h_new[r], y_t[r])


@numba.njit(**_JIT)
def _rnn_backward_row(code, h_new, dy, dh, dgates):
    for j in range(dh.size):
        dgates[j] = (dh[j] + dy[j]) * activate_grad(code, h_new[j])  # backprop through phi
        dh[j] = 0  # h_{t-1} reaches h_t only through W_hh


@numba.njit(**_JIT)
def _rnn_backward(code, h_new, dy_t, dh, dgates_t, valid):
    for r in range(dh.shape[0]):
        if valid[r]:
            _rnn_backward_row(code, h_new[r], dy_t[r], dh[r], dgates_t[r])
        else:
            dgates_t[r, :] = 0


def rnn_forward(t, reverse, gx, gh, b_ih, b_hh, h, y, lengths, nonlinearity):
    prev, nxt = _steps(t, reverse)
    y_at_t = y[t]
    y_t = _scratch_if_strided(y_at_t)
    _rnn_forward(_NONLINEARITY_CODE[nonlinearity], gx[t], gh, b_ih, b_hh, h[prev], h[nxt], y_t, t < lengths)
    if y_t is not y_at_t:  # a scratch: the step's output goes to its place in y
        y_at_t[...] = y_t


def rnn_backward(t, reverse, h, dy, dh, dgates, lengths, nonlinearity):
    prev, nxt = _steps(t, reverse)
    _rnn_backward(_NONLINEARITY_CODE[nonlinearity], h[nxt], np.ascontiguousarray(dy[t]), dh, dgates[t], t < lengths)


# -------------------------------------------------------------------------- LSTM
@numba.njit(**_JIT)
def _lstm_forward_row(act, gh, b_ih, b_hh, c_prev, h_new, c_new, y):
    """act: [4H] in: this step's input projection; out: activated i, f, g, o."""
    H = c_new.size
    for j in range(H):
        i = sigmoid((act[j] + b_ih[j]) + (gh[j] + b_hh[j]))
        f = sigmoid((act[H + j] + b_ih[H + j]) + (gh[H + j] + b_hh[H + j]))
        g = tanh((act[2 * H + j] + b_ih[2 * H + j]) + (gh[2 * H + j] + b_hh[2 * H + j]))
        o = sigmoid((act[3 * H + j] + b_ih[3 * H + j]) + (gh[3 * H + j] + b_hh[3 * H + j]))
        act[j], act[H + j], act[2 * H + j], act[3 * H + j] = i, f, g, o
        c = f * c_prev[j] + i * g
        c_new[j] = c
        h_new[j] = tanh(c) * o
    for j in range(H):
        y[j] = h_new[j]


@numba.njit(**_JIT)
def _lstm_forward(act, gh, b_ih, b_hh, h_prev, c_prev, h_new, c_new, y_t, valid):
    for r in range(h_new.shape[0]):
        if valid[r]:
            _lstm_forward_row(act[r], gh[r], b_ih, b_hh, c_prev[r], h_new[r], c_new[r], y_t[r])
        else:
            _carry(h_prev[r], h_new[r], y_t[r])
            c_new[r, :] = c_prev[r, :]
            act[r, :] = 0


@numba.njit(**_JIT)
def _lstm_backward_row(act, c_prev, c_new, dy, dh, dc):
    """act: [4H] in: activated i, f, g, o; out: their pre-activations' gradients."""
    H = dh.size
    one = np.float32(1)
    for j in range(H):
        i, f, g, o = act[j], act[H + j], act[2 * H + j], act[3 * H + j]
        tanh_c = tanh(c_new[j])
        dh_total = dh[j] + dy[j]
        dc_total = dh_total * o * (one - tanh_c * tanh_c) + dc[j]  # backprop through tanh(c_t)
        act[j] = dc_total * g * (i * (one - i))
        act[H + j] = dc_total * c_prev[j] * (f * (one - f))
        act[2 * H + j] = dc_total * i * (one - g * g)
        act[3 * H + j] = dh_total * tanh_c * (o * (one - o))
        dc[j] = dc_total * f
        dh[j] = 0  # h_{t-1} reaches the gates only through W_hh


@numba.njit(**_JIT)
def _lstm_backward(act, c_prev, c_new, dy_t, dh, dc, valid):
    for r in range(dh.shape[0]):
        if valid[r]:
            _lstm_backward_row(act[r], c_prev[r], c_new[r], dy_t[r], dh[r], dc[r])
        else:
            act[r, :] = 0


def lstm_forward(t, reverse, gx, gh, b_ih, b_hh, h, c, gates, y, lengths):
    prev, nxt = _steps(t, reverse)
    if not np.may_share_memory(gates[t], gx[t]):
        gates[t] = gx[t]
    c_prev = c[prev]
    if np.may_share_memory(c_prev, c[nxt]):  # an eval forward's one cell state (time stride 0):
        c_prev = c_prev.copy()  # read from a copy, or the row loop, reading and writing it, runs scalar (5x)
    y_at_t = y[t]
    y_t = _scratch_if_strided(y_at_t)
    _lstm_forward(gates[t], gh, b_ih, b_hh, h[prev], c_prev, h[nxt], c[nxt], y_t, t < lengths)
    if y_t is not y_at_t:  # a scratch: the step's output goes to its place in y
        y_at_t[...] = y_t


def lstm_backward(t, reverse, c, gates, dy, dh, dc, dgates, lengths):
    prev, nxt = _steps(t, reverse)
    if not np.may_share_memory(dgates[t], gates[t]):
        dgates[t] = gates[t]
    _lstm_backward(dgates[t], c[prev], c[nxt], np.ascontiguousarray(dy[t]), dh, dc, t < lengths)


# --------------------------------------------------------------------------- GRU
@numba.njit(**_JIT)
def _gru_forward_row(act, gh, b_ih, b_hh, h_prev, h_new, y):
    """act: [4H] in: its first 3H the input projection; out: r, z, n and hn = U_n h + b_hn."""
    H = h_new.size
    for j in range(H):
        rg = sigmoid((act[j] + b_ih[j]) + (gh[j] + b_hh[j]))
        z = sigmoid((act[H + j] + b_ih[H + j]) + (gh[H + j] + b_hh[H + j]))
        hn = gh[2 * H + j] + b_hh[2 * H + j]
        n = tanh((act[2 * H + j] + b_ih[2 * H + j]) + rg * hn)
        act[j], act[H + j], act[2 * H + j], act[3 * H + j] = rg, z, n, hn
        h_new[j] = (h_prev[j] - n) * z + n  # (1 - z) n + z h_prev
    for j in range(H):
        y[j] = h_new[j]


@numba.njit(**_JIT)
def _gru_forward(act, gh, b_ih, b_hh, h_prev, h_new, y_t, valid):
    for r in range(h_new.shape[0]):
        if valid[r]:
            _gru_forward_row(act[r], gh[r], b_ih, b_hh, h_prev[r], h_new[r], y_t[r])
        else:
            _carry(h_prev[r], h_new[r], y_t[r])
            act[r, :] = 0


@numba.njit(**_JIT)
def _gru_backward_row(act, h_prev, dy, dh):
    """act: [4H] in: r, z, n, hn; out: dr, dz, dn r, dn (the recurrent projection's
    gradient is its first 3H, the input projection's its r, z and last blocks)."""
    H = dh.size
    one = np.float32(1)
    for j in range(H):
        rg, z, n, hn = act[j], act[H + j], act[2 * H + j], act[3 * H + j]
        dh_total = dh[j] + dy[j]
        dn = dh_total * (one - z) * (one - n * n)  # backprop through tanh
        dz = dh_total * (h_prev[j] - n) * (z * (one - z))
        dr = dn * hn * (rg * (one - rg))
        act[j], act[H + j], act[2 * H + j], act[3 * H + j] = dr, dz, dn * rg, dn
        dh[j] = dh_total * z  # the z h_{t-1} path skips W_hh


@numba.njit(**_JIT)
def _gru_backward(act, h_prev, dy_t, dh, valid):
    for r in range(dh.shape[0]):
        if valid[r]:
            _gru_backward_row(act[r], h_prev[r], dy_t[r], dh[r])
        else:
            act[r, :] = 0


@numba.njit(**_JIT)
def _carry(h_prev, h_new, y):
    """A padded step: the state carried, the output 0."""
    h_new[:] = h_prev
    y[:] = 0


def gru_forward(t, reverse, gx, gh, b_ih, b_hh, h, gates, y, lengths):
    prev, nxt = _steps(t, reverse)
    H = h.shape[-1]
    if not np.may_share_memory(gates[t], gx[t]):
        gates[t][:, :3 * H] = gx[t]
    y_at_t = y[t]
    y_t = _scratch_if_strided(y_at_t)
    _gru_forward(gates[t], gh, b_ih, b_hh, h[prev], h[nxt], y_t, t < lengths)
    if y_t is not y_at_t:  # a scratch: the step's output goes to its place in y
        y_at_t[...] = y_t


def gru_backward(t, reverse, h, gates, dy, dh, dgates, lengths):
    prev, nxt = _steps(t, reverse)
    if not np.may_share_memory(dgates[t], gates[t]):
        dgates[t] = gates[t]
    _gru_backward(dgates[t], h[prev], np.ascontiguousarray(dy[t]), dh, t < lengths)
