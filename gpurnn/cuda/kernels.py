"""numba.cuda twins of ``gpurnn.cells``: one kernel per pointwise op.

Each kernel has the name, arguments and in-place behaviour of its NumPy spec
(the RNN ``nonlinearity`` comes as an integer code, ``NONLINEARITY_CODES``).
One thread owns one element ``(b, j)`` of the ``[B, H]`` step: it reads the
gate pre-activations of its unit from every gate block, applies all
activations, updates the state and writes what backward needs, so each step
is one launch. Padded steps (``t >= lengths[b]``) branch per thread: carry the
state, write zeros.

Constants come from ``constants(h)`` in the type the buffers compute in, so
float32 kernels stay in float32 (a bare Python float would promote them to
float64). Half buffers compute in float32: every element read goes through
``wide`` (to float32; float32 and float64 unchanged) and every computed value is
stored through ``narrow(value, buffer)``, which rounds it once into the buffer's
type, as the NumPy reference (gpurnn.precision) does. bfloat16 buffers reach the
kernels as their uint16 bits (numba cannot type bfloat16 arrays, numba-cuda
issue #198, and its simulator has no bfloat16): ``wide`` puts the 16 bits on top
of a float32's, ``narrow`` rounds to nearest even in integer arithmetic, as
ml_dtypes and CUDA's ``__float2bfloat16_rn`` do. No kernel holds integers of its
own in a uint16 buffer, so in the kernels uint16 means bfloat16.
Launch with ``grid(B * H)`` threads; ``cuda.grid(1)`` beyond ``B * H`` returns.
"""

import math

import numpy as np
from llvmlite import ir
from numba import config, float64, int64, types, uint32
from numba.cuda.extending import intrinsic

from gpurnn.backend import load_numba_cuda
from gpurnn.cells import ELU_ALPHA, LEAKY_RELU_SLOPE, NONLINEARITIES

cuda = load_numba_cuda()

NONLINEARITY_CODES = {name: code for code, name in enumerate(NONLINEARITIES)}
TANH, RELU, SIGMOID, LEAKY_RELU, ELU = (NONLINEARITY_CODES[n] for n in NONLINEARITIES)


@cuda.jit(device=True, inline=True)
def sigmoid(x, half):
    return half * math.tanh(half * x) + half  # = 1 / (1 + e^-x), never overflows


_CONSTANTS = (0.0, 1.0, 0.5, LEAKY_RELU_SLOPE, ELU_ALPHA)
_I32 = ir.IntType(32)


def bfloat16_bits(builder, value):
    """LLVM IR: the float32 value rounded to the nearest bfloat16 (ties to even), as
    its 16 bits; a NaN stays a quiet NaN of its sign (ml_dtypes' bits exactly)."""
    bits = builder.bitcast(value, _I32)
    upper = builder.lshr(bits, ir.Constant(_I32, 16))
    odd = builder.and_(upper, ir.Constant(_I32, 1))
    rounded = builder.lshr(builder.add(bits, builder.add(ir.Constant(_I32, 0x7FFF), odd)), ir.Constant(_I32, 16))
    quiet_nan = builder.or_(builder.and_(upper, ir.Constant(_I32, 0x8000)), ir.Constant(_I32, 0x7FC0))
    is_nan = builder.fcmp_unordered("uno", value, value)
    return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))


def bfloat16_value(builder, bits):
    """LLVM IR: the float32 a bfloat16's 16 bits stand for (exact)."""
    return builder.bitcast(builder.shl(builder.zext(bits, _I32), ir.Constant(_I32, 16)), ir.FloatType())


if config.ENABLE_CUDASIM:  # the simulator runs device code as Python on NumPy scalars
    def wide(v):
        """v in the type its math runs in: float32 for a half (bfloat16: its uint16 bits), else v itself."""
        if isinstance(v, np.float16):
            return np.float32(v)
        if isinstance(v, np.uint16):
            return (np.uint32(v) << np.uint32(16)).view(np.float32)
        return v

    def narrow(value, like):
        """value as stored into the array like: bfloat16 bits for a uint16 array (the integer
        rounding of bfloat16_bits), else value itself (NumPy's store rounds into float16)."""
        if like.dtype != np.uint16:
            return value
        value = np.float32(value)
        bits = int(value.view(np.uint32))
        if value != value:
            return np.uint16(bits >> 16 & 0x8000 | 0x7FC0)
        return np.uint16((bits + 0x7FFF + (bits >> 16 & 1)) >> 16)

    def constants(x):
        """(zero, one, half, slope, alpha) in the type the array x computes in."""
        kind = np.float32 if x.dtype in (np.float16, np.uint16) else x.dtype.type  # half: float32
        return tuple(kind(c) for c in _CONSTANTS)

    @cuda.jit(device=True)  # a device function: the simulator hands it the block's shared memory
    def compute_shared(x):
        """The block's dynamic shared memory as an array of the type x computes in."""
        return cuda.shared.array(0, np.dtype(np.float32) if x.dtype in (np.float16, np.uint16) else x.dtype)
else:  # intrinsics: typed per argument type at compile time, and PTX builds with no driver (an overload needs one)
    @intrinsic
    def wide(typingctx, v):
        if v == types.float16:
            return types.float32(v), lambda context, builder, sig, args: context.cast(builder, args[0], v,
                                                                                       types.float32)
        if v == types.uint16:  # bfloat16 bits
            return types.float32(v), lambda context, builder, sig, args: bfloat16_value(builder, args[0])
        return v(v), lambda context, builder, sig, args: args[0]

    @intrinsic
    def narrow(typingctx, value, like):
        kind = like.dtype
        if kind == types.uint16:
            def codegen(context, builder, sig, args):
                return bfloat16_bits(builder, context.cast(builder, args[0], value, types.float32))
            return types.uint16(value, like), codegen
        return kind(value, like), lambda context, builder, sig, args: context.cast(builder, args[0], value, kind)

    @intrinsic
    def constants(typingctx, x):
        kind = types.float32 if x.dtype in (types.float16, types.uint16) else x.dtype  # half: float32

        def codegen(context, builder, sig, args):
            return context.make_tuple(builder, sig.return_type, [context.get_constant(kind, c) for c in _CONSTANTS])
        return types.UniTuple(kind, len(_CONSTANTS))(x), codegen

    @intrinsic
    def compute_shared(typingctx, x):
        """As cuda.shared.array(0, <the type x computes in>), which numba cannot spell for a
        type it reads off an argument; it aliases every other dynamic shared array."""
        kind = types.float32 if x.dtype in (types.float16, types.uint16) else x.dtype

        def codegen(context, builder, sig, args):
            from numba.cuda import cudaimpl
            from numba.cuda.cudadrv import nvvm

            return cudaimpl._generic_array(context, builder, shape=(0,), dtype=kind,
                                           symbol_name=cudaimpl._get_unique_smem_id("_cudapy_smem"),
                                           addrspace=nvvm.ADDRSPACE_SHARED, can_dynsized=True)
        return types.Array(kind, 1, "C")(x), codegen


@cuda.jit(device=True, inline=True)
def activate(nonlinearity, a, k):
    """phi(a); k holds the constants (zero, one, half, slope, alpha) in a's type."""
    zero, one, half, slope, alpha = k
    if nonlinearity == TANH:
        return math.tanh(a)
    if nonlinearity == SIGMOID:
        return sigmoid(a, half)
    if nonlinearity == RELU:
        return zero if a <= zero else a  # NaN passes, as np.maximum and torch.relu (a > 0 would give 0)
    if nonlinearity == LEAKY_RELU:
        return a if a > zero else a * slope
    return a if a > zero else alpha * math.expm1(a)  # ELU


@cuda.jit(device=True, inline=True)
def activate_grad(nonlinearity, h, k):
    """phi'(a) from the output h = phi(a)."""
    zero, one, half, slope, alpha = k
    if nonlinearity == TANH:
        return one - h * h
    if nonlinearity == SIGMOID:
        return h * (one - h)
    if nonlinearity == RELU:
        return one if h > zero else zero
    if nonlinearity == LEAKY_RELU:
        return one if h > zero else slope
    return one if h > zero else h + alpha  # ELU: alpha e^a = h + alpha


@cuda.jit(device=True, inline=True)
def store_gates(gates, t, b, j, H, v0, v1, v2, v3):
    """What backward reads of element (b, j) at step t: gates[t, b, k*H + j] = v_k."""
    gates[t, b, j] = narrow(v0, gates)
    gates[t, b, H + j] = narrow(v1, gates)
    gates[t, b, 2 * H + j] = narrow(v2, gates)
    gates[t, b, 3 * H + j] = narrow(v3, gates)


@cuda.jit(device=True, inline=True)
def row_and_column(i, columns):
    """(i // columns, i % columns) in 32 bits (a step's B*H elements are far fewer than
    2**32): numba divides Python ints in 64 bits, a ~70-instruction routine on a GPU, on the
    path of every step before its first load."""
    row = uint32(uint32(i) // uint32(columns))
    return int64(row), int64(uint32(i) - row * uint32(columns))


# --------------------------------------------------------------------------- RNN
# Each cell's step is a device function of one element (b, j), given the
# recurrent projection of that element (rec: (h_prev W_hh^T)[b, j] per gate
# block) or, backward, the gradient carried into the state it wrote (dh_in).
# The per-step kernels below read those from the step GEMM's output; the fused
# and persistent kernels (gpurnn.cuda.fused) compute them themselves.
@cuda.jit(device=True, inline=True)
def rnn_point_forward(t, reverse, b, j, gx, rec, b_ih, b_hh, h, y, lengths, nonlinearity):
    prev, nxt = t + reverse, t + 1 - reverse
    k = constants(h)
    if t >= lengths[b]:  # padded step: carry the state, output 0
        h[nxt, b, j] = h[prev, b, j]
        y[t, b, j] = narrow(k[0], y)
        return
    h_new = activate(nonlinearity, (wide(gx[t, b, j]) + wide(b_ih[j])) + (rec + wide(b_hh[j])), k)
    h[nxt, b, j] = narrow(h_new, h)
    y[t, b, j] = narrow(h_new, y)


@cuda.jit(device=True, inline=True)
def rnn_point_backward(t, reverse, b, j, dh_in, h, dy, dh, dgates, lengths, nonlinearity):
    nxt = t + 1 - reverse
    k = constants(h)
    if t >= lengths[b]:  # padded step: the gradient passes through untouched
        dgates[t, b, j] = narrow(k[0], dgates)
        dh[b, j] = narrow(dh_in, dh)
        return
    dh_total = dh_in + wide(dy[t, b, j])  # output at t plus what flows back from t+1
    dgates[t, b, j] = narrow(dh_total * activate_grad(nonlinearity, wide(h[nxt, b, j]), k), dgates)
    dh[b, j] = narrow(k[0], dh)  # h_{t-1} reaches h_t only through W_hh


@cuda.jit(cache=True)
def rnn_forward(t, reverse, gx, gh, b_ih, b_hh, h, y, lengths, nonlinearity):
    """gx: [T, B, H]  gh: [B, H]  b_ih, b_hh: [H]  h: [T+1, B, H]  y: [T, B, H]  lengths: [B]"""
    B, H = h.shape[1], h.shape[2]
    idx = cuda.grid(1)
    if idx < B * H:
        b, j = row_and_column(idx, H)
        rnn_point_forward(t, reverse, b, j, gx, wide(gh[b, j]), b_ih, b_hh, h, y, lengths, nonlinearity)


@cuda.jit(cache=True)
def rnn_backward(t, reverse, h, dy, dh, dgates, lengths, nonlinearity):
    """h: [T+1, B, H]  dy: [T, B, H]  dh: [B, H] (in/out)  dgates: [T, B, H]"""
    B, H = h.shape[1], h.shape[2]
    idx = cuda.grid(1)
    if idx < B * H:
        b, j = row_and_column(idx, H)
        rnn_point_backward(t, reverse, b, j, wide(dh[b, j]), h, dy, dh, dgates, lengths, nonlinearity)


# -------------------------------------------------------------------------- LSTM
@cuda.jit(device=True, inline=True)
def lstm_point_forward(t, reverse, b, j, gx, rec_i, rec_f, rec_g, rec_o, b_ih, b_hh, h, c, gates, y, lengths):
    H = h.shape[2]
    prev, nxt = t + reverse, t + 1 - reverse
    zero, one, half, _, _ = constants(h)
    if t >= lengths[b]:  # padded step: carry the state, output 0
        c[nxt, b, j] = c[prev, b, j]
        h[nxt, b, j] = h[prev, b, j]
        y[t, b, j] = narrow(zero, y)
        for k in range(4):
            gates[t, b, k * H + j] = narrow(zero, gates)
        return
    i = sigmoid((wide(gx[t, b, j]) + wide(b_ih[j])) + (rec_i + wide(b_hh[j])), half)
    f = sigmoid((wide(gx[t, b, H + j]) + wide(b_ih[H + j])) + (rec_f + wide(b_hh[H + j])), half)
    g = math.tanh((wide(gx[t, b, 2 * H + j]) + wide(b_ih[2 * H + j])) + (rec_g + wide(b_hh[2 * H + j])))
    o = sigmoid((wide(gx[t, b, 3 * H + j]) + wide(b_ih[3 * H + j])) + (rec_o + wide(b_hh[3 * H + j])), half)
    c_new = f * wide(c[prev, b, j]) + i * g
    h_new = o * math.tanh(c_new)
    c[nxt, b, j] = narrow(c_new, c)
    h[nxt, b, j] = narrow(h_new, h)
    y[t, b, j] = narrow(h_new, y)
    store_gates(gates, t, b, j, H, i, f, g, o)


@cuda.jit(device=True, inline=True)
def lstm_point_backward(t, reverse, b, j, dh_in, c, gates, dy, dh, dc, dgates, lengths):
    H = c.shape[2]
    prev, nxt = t + reverse, t + 1 - reverse
    zero, one, half, _, _ = constants(c)
    if t >= lengths[b]:  # padded step: the gradients pass through untouched
        for k in range(4):
            dgates[t, b, k * H + j] = narrow(zero, dgates)
        dh[b, j] = narrow(dh_in, dh)
        return
    i = wide(gates[t, b, j])
    f = wide(gates[t, b, H + j])
    g = wide(gates[t, b, 2 * H + j])
    o = wide(gates[t, b, 3 * H + j])
    tanh_c = math.tanh(wide(c[nxt, b, j]))
    dh_total = dh_in + wide(dy[t, b, j])
    dc_total = wide(dc[b, j]) + dh_total * o * (one - tanh_c * tanh_c)  # backprop through tanh(c_t)
    dgates[t, b, j] = narrow(dc_total * g * i * (one - i), dgates)
    dgates[t, b, H + j] = narrow(dc_total * wide(c[prev, b, j]) * f * (one - f), dgates)
    dgates[t, b, 2 * H + j] = narrow(dc_total * i * (one - g * g), dgates)
    dgates[t, b, 3 * H + j] = narrow(dh_total * tanh_c * o * (one - o), dgates)
    dc[b, j] = narrow(dc_total * f, dc)
    dh[b, j] = narrow(zero, dh)  # h_{t-1} reaches the gates only through W_hh


@cuda.jit(cache=True)
def lstm_forward(t, reverse, gx, gh, b_ih, b_hh, h, c, gates, y, lengths):
    """gx: [T, B, 4H] (i, f, g, o)  gh: [B, 4H]  b_ih, b_hh: [4H]  h, c: [T+1, B, H]
    gates: [T, B, 4H]  y: [T, B, H]  lengths: [B]"""
    B, H = h.shape[1], h.shape[2]
    idx = cuda.grid(1)
    if idx < B * H:
        b, j = row_and_column(idx, H)
        lstm_point_forward(t, reverse, b, j, gx, wide(gh[b, j]), wide(gh[b, H + j]), wide(gh[b, 2 * H + j]),
                           wide(gh[b, 3 * H + j]), b_ih, b_hh, h, c, gates, y, lengths)


@cuda.jit(cache=True)
def lstm_backward(t, reverse, c, gates, dy, dh, dc, dgates, lengths):
    """c: [T+1, B, H]  gates: [T, B, 4H]  dy: [T, B, H]  dh, dc: [B, H] (in/out)
    dgates: [T, B, 4H]"""
    B, H = c.shape[1], c.shape[2]
    idx = cuda.grid(1)
    if idx < B * H:
        b, j = row_and_column(idx, H)
        lstm_point_backward(t, reverse, b, j, wide(dh[b, j]), c, gates, dy, dh, dc, dgates, lengths)


# ------------------------------------------------------------- LSTM projection
@cuda.jit(cache=True)
def project_forward(t, reverse, hp, h, y, lengths):
    """hp: [B, P] this step's projection  h: [T+1, B, P]  y: [T, B, P]  lengths: [B]"""
    B, P = h.shape[1], h.shape[2]
    idx = cuda.grid(1)
    if idx < B * P:
        b, j = row_and_column(idx, P)
        prev, nxt = t + reverse, t + 1 - reverse
        if t >= lengths[b]:  # padded step: carry the state, output 0
            h[nxt, b, j] = h[prev, b, j]
            y[t, b, j] = narrow(constants(h)[0], y)
            return
        h[nxt, b, j] = hp[b, j]
        y[t, b, j] = hp[b, j]


@cuda.jit(cache=True)
def project_backward(t, reverse, dy, dh, dproj, lengths):
    """dy: [T, B, P]  dh: [B, P] (in/out)  dproj: [T, B, P]  lengths: [B]"""
    B, P = dh.shape[0], dh.shape[1]
    idx = cuda.grid(1)
    if idx < B * P:
        b, j = row_and_column(idx, P)
        zero = constants(dh)[0]
        if t >= lengths[b]:  # padded step: the gradient passes through untouched
            dproj[t, b, j] = narrow(zero, dproj)
            return
        dproj[t, b, j] = narrow(wide(dh[b, j]) + wide(dy[t, b, j]), dproj)  # output at t plus what flows back
        dh[b, j] = narrow(zero, dh)  # h_{t-1} reaches h_t only through the cell, that is, through W_hh


# --------------------------------------------------------------------------- GRU
@cuda.jit(device=True, inline=True)
def gru_point_forward(t, reverse, b, j, gx, rec_r, rec_z, rec_n, b_ih, b_hh, h, gates, y, lengths):
    H = h.shape[2]
    prev, nxt = t + reverse, t + 1 - reverse
    zero, one, half, _, _ = constants(h)
    if t >= lengths[b]:  # padded step: carry the state, output 0
        h[nxt, b, j] = h[prev, b, j]
        y[t, b, j] = narrow(zero, y)
        for k in range(4):
            gates[t, b, k * H + j] = narrow(zero, gates)
        return
    r = sigmoid((wide(gx[t, b, j]) + wide(b_ih[j])) + (rec_r + wide(b_hh[j])), half)
    z = sigmoid((wide(gx[t, b, H + j]) + wide(b_ih[H + j])) + (rec_z + wide(b_hh[H + j])), half)
    hn = rec_n + wide(b_hh[2 * H + j])  # U_n h + b_hn, kept apart: r scales it
    n = math.tanh((wide(gx[t, b, 2 * H + j]) + wide(b_ih[2 * H + j])) + r * hn)
    h_prev = wide(h[prev, b, j])
    h_new = n + z * (h_prev - n)  # (1 - z) n + z h_prev
    h[nxt, b, j] = narrow(h_new, h)
    y[t, b, j] = narrow(h_new, y)
    store_gates(gates, t, b, j, H, r, z, n, hn)


@cuda.jit(device=True, inline=True)
def gru_point_backward(t, reverse, b, j, dh_in, h, gates, dy, dh, dgates, lengths):
    H = h.shape[2]
    prev = t + reverse
    zero, one, half, _, _ = constants(h)
    if t >= lengths[b]:  # padded step: the gradient passes through untouched
        for k in range(4):
            dgates[t, b, k * H + j] = narrow(zero, dgates)
        dh[b, j] = narrow(dh_in, dh)
        return
    r = wide(gates[t, b, j])
    z = wide(gates[t, b, H + j])
    n = wide(gates[t, b, 2 * H + j])
    hn = wide(gates[t, b, 3 * H + j])
    dh_total = dh_in + wide(dy[t, b, j])
    dn = dh_total * (one - z) * (one - n * n)  # backprop through tanh
    dz = dh_total * (wide(h[prev, b, j]) - n) * z * (one - z)
    dr = dn * hn * r * (one - r)
    dgates[t, b, j] = narrow(dr, dgates)
    dgates[t, b, H + j] = narrow(dz, dgates)
    dgates[t, b, 2 * H + j] = narrow(dn * r, dgates)  # U_n h reaches n scaled by r
    dgates[t, b, 3 * H + j] = narrow(dn, dgates)  # W_n x does not
    dh[b, j] = narrow(dh_total * z, dh)  # the z h_{t-1} path skips W_hh


@cuda.jit(cache=True)
def gru_forward(t, reverse, gx, gh, b_ih, b_hh, h, gates, y, lengths):
    """gx: [T, B, 3H] (r, z, n; in training the first 3H columns of gates' rows)  gh: [B, 3H]
    b_ih, b_hh: [3H]  h: [T+1, B, H]  gates: [T, B, 4H] (r, z, n, hn)  y: [T, B, H]  lengths: [B]"""
    B, H = h.shape[1], h.shape[2]
    idx = cuda.grid(1)
    if idx < B * H:
        b, j = row_and_column(idx, H)
        gru_point_forward(t, reverse, b, j, gx, wide(gh[b, j]), wide(gh[b, H + j]), wide(gh[b, 2 * H + j]),
                          b_ih, b_hh, h, gates, y, lengths)


@cuda.jit(cache=True)
def gru_backward(t, reverse, h, gates, dy, dh, dgates, lengths):
    """h: [T+1, B, H]  gates: [T, B, 4H]  dy: [T, B, H]  dh: [B, H] (in/out)
    dgates: [T, B, 4H] (dr, dz, dn r, dn)"""
    B, H = h.shape[1], h.shape[2]
    idx = cuda.grid(1)
    if idx < B * H:
        b, j = row_and_column(idx, H)
        gru_point_backward(t, reverse, b, j, wide(dh[b, j]), h, gates, dy, dh, dgates, lengths)


# ----------------------------------------------------------------- optimizer
@cuda.jit(cache=True)
def adam_update(p, g, m, v, step_size, beta1, beta2, eps, bias2_sqrt):
    """Twin of gpurnn.optim.adam_update. p, g, m, v: [N] (flattened); scalars in p's type."""
    i = cuda.grid(1)
    if i >= p.shape[0]:
        return
    one = p.dtype.type(1)
    gi = g[i]
    mi = beta1 * m[i] + (one - beta1) * gi
    vi = beta2 * v[i] + (one - beta2) * gi * gi
    m[i] = mi
    v[i] = vi
    p[i] -= step_size * mi / (math.sqrt(vi) / bias2_sqrt + eps)


# ----------------------------------------------------------------- embedding
@cuda.jit(device=True, inline=True)
def element_of(out):
    """(row, column) of this thread's element of the 2-D array out, one thread per
    element; row -1 for the threads past its end."""
    i = cuda.grid(1)
    columns = out.shape[1]
    if i >= out.shape[0] * columns:
        return -1, 0
    row = i // columns
    return row, i - row * columns


@cuda.jit(cache=True)
def gather_rows(table, ids, out):
    """Twin of NumpyOps.gather_rows: out[n, k] = table[ids[n], k]; table [V, K], ids [N], out [N, K].
    An id outside [0, V) (the model refuses those before staging) reads nothing and writes 0."""
    n, k = element_of(out)
    if n < 0:
        return
    v = ids[n]
    out[n, k] = table[v, k] if 0 <= v < table.shape[0] else out.dtype.type(0)


@cuda.jit(cache=True)
def one_hot(ids, out):
    """Twin of NumpyOps.one_hot: out[n, v] = 1 where v == ids[n], else 0; ids [N], out [N, V]."""
    n, v = element_of(out)
    if n < 0:
        return
    out[n, v] = narrow(1.0, out) if ids[n] == v else narrow(0.0, out)


# ---------------------------------------------------------------------- loss
ROW_THREADS = 128  # threads per block of the row kernels: one block owns one row


@cuda.jit(device=True, inline=True)
def _block_reduce(buf, value, take_max):
    """max (take_max) or sum of value over the block's ROW_THREADS threads, through
    the float64 shared array buf; every thread gets the result."""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    step = ROW_THREADS // 2
    while step > 0:
        if tid < step:
            buf[tid] = max(buf[tid], buf[tid + step]) if take_max else buf[tid] + buf[tid + step]
        cuda.syncthreads()
        step //= 2
    result = buf[0]
    cuda.syncthreads()  # buf is free again for the next reduction
    return result


@cuda.jit(cache=True)
def softmax_xent(logits, targets, weight, losses, d_logits):
    """Twin of gpurnn.nn.softmax_xent, launched with one block of ROW_THREADS per row.

    logits: [N, V]   targets: [N] int32 in [0, V)   weight: [N]
    losses: [N] = weight (log sum exp - logits[target]) (NaN for a target outside [0, V))
    d_logits: [N, V] = weight (softmax - onehot)
    The row's max and sum of exponentials are reduced in float64.
    """
    n = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    V = logits.shape[1]
    buf = cuda.shared.array(ROW_THREADS, float64)
    top = -math.inf
    for v in range(tid, V, ROW_THREADS):
        top = max(top, float64(logits[n, v]))
    top = _block_reduce(buf, top, True)
    total = 0.0
    for v in range(tid, V, ROW_THREADS):
        total += math.exp(float64(logits[n, v]) - top)  # log-sum-exp without overflow
    log_z = top + math.log(_block_reduce(buf, total, False))
    w = float64(weight[n])
    y = targets[n]
    for v in range(tid, V, ROW_THREADS):
        p = math.exp(float64(logits[n, v]) - log_z)  # softmax
        d_logits[n, v] = w * (p - 1.0) if v == y else w * p  # minus the one-hot target
    if tid == 0:  # a target outside [0, V) (the model refuses those first) reads nothing: NaN
        losses[n] = w * (log_z - float64(logits[n, y])) if 0 <= y < V else math.nan


KERNELS = {"rnn_forward": rnn_forward, "rnn_backward": rnn_backward,
           "lstm_forward": lstm_forward, "lstm_backward": lstm_backward,
           "gru_forward": gru_forward, "gru_backward": gru_backward, "adam_update": adam_update,
           "gather_rows": gather_rows, "one_hot": one_hot, "softmax_xent": softmax_xent,
           "project_forward": project_forward, "project_backward": project_backward}


# what a half model launches (its optimizer steps float32 master weights, and its
# loss widens the logits to float32 first: adam_update and softmax_xent see float32)
HALF_KERNELS = ("rnn_forward", "rnn_backward", "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
                "gather_rows", "one_hot", "project_forward", "project_backward")


def numba_float(dtype):
    """The numba type of the elements the kernels see of a float16, bfloat16 (its bits),
    float32 or float64 array."""
    return {"float16": types.float16, "bfloat16": types.uint16, "float32": types.float32,
            "float64": types.float64}[dtype if isinstance(dtype, str) else np.dtype(dtype).name]


def signatures(name, dtype):
    """{label: numba signature} of the launches on workspace buffers (the RNN steps'
    output and output-gradient views, y and dy, may be strided, as the GRU's input
    projection in training, which lives in gates' rows; an eval forward's gates, and
    its LSTM cell states, have time stride 0; everything else is C-contiguous). Used by
    the PTX report."""
    f = numba_float(dtype)
    i64 = types.int64
    c1, c2, c3 = (types.Array(f, n, "C") for n in (1, 2, 3))
    a3 = types.Array(f, 3, "A")
    lengths = ids = types.Array(types.int32, 1, "C")
    lstm_forward = lambda h, c, gates: (i64, i64, c3, c2, c1, c1, h, c, gates, a3, lengths)  # noqa: E731
    gru_forward = lambda gx, gates: (i64, i64, gx, c2, c1, c1, c3, gates, a3, lengths)  # noqa: E731
    return {
        "rnn_forward": {"rnn_forward": (i64, i64, c3, c2, c1, c1, c3, a3, lengths, i64)},
        "rnn_backward": {"rnn_backward": (i64, i64, c3, a3, c2, c3, lengths, i64)},
        "lstm_forward": {"lstm_forward": lstm_forward(c3, c3, c3), "lstm_forward eval": lstm_forward(c3, a3, a3),
                         "lstm_forward eval projected": lstm_forward(a3, a3, a3)},  # h: one block of h_cell
        "lstm_backward": {"lstm_backward": (i64, i64, c3, c3, a3, c2, c2, c3, lengths)},
        "gru_forward": {"gru_forward": gru_forward(a3, c3), "gru_forward eval": gru_forward(c3, a3)},
        "gru_backward": {"gru_backward": (i64, i64, c3, c3, a3, c2, c3, lengths)},
        "adam_update": {"adam_update": (c1, c1, c1, c1, f, f, f, f, f)},
        "gather_rows": {"gather_rows": (c2, ids, c2)},
        "one_hot": {"one_hot": (ids, c2)},
        "softmax_xent": {"softmax_xent": (c2, ids, c1, c1, c2)},
        "project_forward": {"project_forward": (i64, i64, c2, c3, a3, lengths)},
        "project_backward": {"project_backward": (i64, i64, a3, c2, c3, lengths)},
    }[name]
