"""Watching BPTT: gradient flow through time, and a public gradient check.

    flow = gpurnn.diagnostics.gradient_flow(model, x)      # d_out=None: gradient from the last step only
    flow.dh    # [num_layers*D, T]  ||dL/dh_t|| over batch and units, per layer/direction and time t
    flow.dc    # [num_layers*D, T]  ||dL/dc_t|| (LSTM; None otherwise)
    flow.jac   # [num_layers*D, T]  local gain ||dh_t/dh_{t-1}||, estimated along the gradient
    worst = gpurnn.diagnostics.gradcheck(model, x)          # {name: relative error}, float64 models

The norms are taken inside the backward loop (a recorder the driver shows each
step to), not by re-running it. ``jac[k, t]`` is ||J_t^T u|| with
J_t = dh_t/dh_{t-1} (c_{t-1} held fixed for the LSTM) and u the unit vector
along the gradient arriving at h_t: one extra pointwise step and GEMM per step.
It never exceeds the spectral norm of J_t and approaches it as backpropagation
aligns the gradient with J's leading direction (power iteration along the chain).
"""

import dataclasses

import numpy as np

from gpurnn import sequence
from gpurnn.backend import to_host
from gpurnn.layers import LSTM, _RNNBase


@dataclasses.dataclass
class GradientFlow:
    dh: np.ndarray
    dc: object
    jac: np.ndarray
    cell: str
    reverse: np.ndarray  # [num_layers*D] 1 where the row is a reverse direction

    def at_distance(self, row=0):
        """dh of one row ordered by distance from where the gradient enters
        (t = T-1 for a forward direction, t = 0 for a reverse one)."""
        return self.dh[row][::-1] if not self.reverse[row] else self.dh[row]


class _Recorder:
    """Per layer and direction: norms filled step by step during BPTT."""

    def __init__(self, model, layer, direction, T, B):
        xp, cfg = model.backend.xp, model._cfg
        self.ops, self.cfg, self.xp = model.backend.ops, cfg, xp
        self.reverse = direction
        self.w_hh = model._params[cfg.param_names(layer, direction)[1]]
        self.w_hr = model._params[cfg.projection_name(layer, direction)] if cfg.P else None
        self.dh, self.dc, self.jac = np.zeros(T), np.zeros(T), np.zeros(T)
        width = max(sequence.GATE_BLOCKS[cfg.cell], sequence.SAVED_BLOCKS[cfg.cell]) * cfg.H
        self.probe = dict(dh=xp.empty((B, cfg.H_out), model.dtype), dc=xp.zeros((B, cfg.H), model.dtype),
                          dgates=xp.empty((T, B, width), model.dtype))
        if cfg.P:  # the projection's step buffers (see gpurnn.sequence.Direction)
            self.probe.update(dproj=xp.empty((T, B, cfg.P), model.dtype), dh_cell=xp.zeros((B, cfg.H), model.dtype),
                              y_cell=xp.empty((T, B, cfg.H), model.dtype))
        self.zeros = xp.zeros((T, B, cfg.H_out), model.dtype)
        self.lengths = None

    def observe(self, t, ws, dy):
        xp, cfg = self.xp, self.cfg
        g = ws.dh + dy[t]  # dL/dh_t: what flowed back from t+1 plus the output's own gradient at t
        norm = float(xp.linalg.norm(g))
        self.dh[t] = norm
        if cfg.cell == "lstm":  # dL/dc_t, as the step will compute it
            H, nxt = cfg.H, t + 1 - self.reverse
            o, tanh_c = ws.gates[t, :, 3 * H:], xp.tanh(ws.c[nxt])
            g_cell = g if self.w_hr is None else g @ self.w_hr  # through the projection to o * tanh(c_t)
            self.dc[t] = float(xp.linalg.norm(ws.dc + g_cell * o * (1 - tanh_c * tanh_c)))
        # local gain: one backward step of the unit vector u = g / |g| alone (no c path, no output)
        probe = dataclasses.replace(ws, **self.probe)
        probe.dh[...] = g / norm if norm > 0 else 1 / np.sqrt(g.size)
        if probe.dc is not None:
            probe.dc[...] = 0
        if self.w_hr is not None:
            probe.dh_cell[...] = 0
        sequence.backward_step(self.ops, cfg.cell, cfg.nonlinearity, t, self.reverse, probe, self.zeros,
                               self.w_hh, self.lengths, self.w_hr)
        self.jac[t] = float(xp.linalg.norm(probe.dh))


def gradient_flow(model, x, d_out=None, lengths=None):
    """Forward and backward through ``model`` (an RNN, LSTM or GRU), recording
    gradient norms per layer, direction and timestep. The model's own gradients
    are left as they were. With ``d_out=None`` the loss is the sum of the last
    valid output of each sequence (the long-range case)."""
    if not isinstance(model, _RNNBase):
        raise TypeError(f"model: expected gpurnn.RNN, LSTM or GRU, got {type(model).__name__}")
    if x is None:
        raise ValueError("x: gradient_flow needs an input sequence [T, B, I], got None")
    was_training = model.training
    saved = {n: g.copy() for n, g in model.grads.items()}
    xp = model.backend.xp
    try:
        model.train()
        out = (model(x, lengths=lengths)[0])
        T, B = (out.shape[1], out.shape[0]) if model.batch_first else (out.shape[0], out.shape[1])
        if d_out is None:
            last = np.full(B, T - 1) if lengths is None else np.asarray(lengths) - 1
            d_tm = xp.zeros((T, B, out.shape[-1]), model.dtype)
            d_tm[xp.asarray(last), xp.arange(B)] = 1
            d_out = d_tm.transpose(1, 0, 2) if model.batch_first else d_tm
        cfg = model._cfg
        recorders = [_Recorder(model, k // cfg.D, k % cfg.D, T, B) for k in range(cfg.L * cfg.D)]
        ws = model._cache[0]
        for r in recorders:
            r.lengths = ws.lengths
        model._backward(d_out, None, None, recorders=recorders)
    finally:
        for n, g in model.grads.items():
            g[...] = saved[n]
        model.train(was_training)
    return GradientFlow(dh=np.stack([r.dh for r in recorders]),
                        dc=np.stack([r.dc for r in recorders]) if isinstance(model, LSTM) else None,
                        jac=np.stack([r.jac for r in recorders]), cell=cfg.cell,
                        reverse=np.array([r.reverse for r in recorders]))


def gradcheck(model, x, h0=None, lengths=None, eps=1e-6, seed=0):
    """Central differences against BPTT for every parameter, ``x`` and the initial state.

    ``h0`` as the model takes it: for the LSTM an array (c0 = 0) or ``(h0, c0)``.
    Loss: sum(out * R) + sum(h_n * Rh) (+ sum(c_n * Rc) for the LSTM) with fixed
    random R, Rh, Rc. Needs a float64 model, on any backend (on the GPU each
    difference is one forward: slow, for small models). Returns
    {name: ||analytic - numeric|| / max(||analytic||, ||numeric||)} over "x", "h0"
    (and "c0"), and the parameters.
    """
    if not isinstance(model, _RNNBase):
        raise TypeError(f"model: expected gpurnn.RNN, LSTM or GRU, got {type(model).__name__}")
    if model.dtype != np.float64:
        raise TypeError(f"model: gradcheck needs a float64 model (dtype='float64'), got {model.dtype}")
    lstm = isinstance(model, LSTM)
    if lstm and isinstance(h0, (tuple, list)):
        if len(h0) != 2:
            raise ValueError(f"h0: expected an array or (h0, c0) for an LSTM, got a tuple of {len(h0)}")
        h0, c0 = h0
    else:
        c0 = None
    x = np.array(to_host(x), dtype=np.float64)
    rng = np.random.default_rng(seed)
    out, states = _run(model, x, (h0, c0) if lstm else (h0,), lengths)
    R, Rs = rng.standard_normal(out.shape), [rng.standard_normal(s.shape) for s in states]
    # the initial state as arrays the differences can perturb: zeros where none was given
    start = [np.zeros(s.shape) if s0 is None else np.array(to_host(s0), dtype=np.float64)
             for s, s0 in zip(states, (h0, c0))]
    saved = {n: g.copy() for n, g in model.grads.items()}
    was_training = model.training
    model.train()
    try:
        model.zero_grad()
        _run(model, x, start, lengths)
        dx, dstart = model.backward(R, tuple(Rs) if lstm else Rs[0])
        dstart = dstart if lstm else (dstart,)
        names = ("h0", "c0")[:len(start)]
        analytic = {"x": to_host(dx), **{n: to_host(d) for n, d in zip(names, dstart)},
                    **{n: to_host(g) for n, g in model.grads.items()}}

        def loss():
            o, s = _run(model, x, start, lengths)
            return float((o * R).sum() + sum((a * r).sum() for a, r in zip(s, Rs)))

        targets = {"x": x, **dict(zip(names, start)), **model.params}
        worst = {}
        for name, a in targets.items():
            num = numeric_gradient(loss, a, eps)
            scale = max(np.linalg.norm(analytic[name]), np.linalg.norm(num))
            worst[name] = float(np.linalg.norm(analytic[name] - num) / scale) if scale else 0.0
    finally:
        for n, g in model.grads.items():
            g[...] = saved[n]
        model.train(was_training)
    return worst


def numeric_gradient(f, a, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of
    the array a (NumPy, or a device array), perturbed in place and restored;
    returns a NumPy array."""
    g = np.zeros(a.shape, np.float64)
    for i in np.ndindex(a.shape):
        old = float(a[i])
        a[i] = old + eps
        up = float(f())
        a[i] = old - eps
        g[i] = (up - float(f())) / (2 * eps)
        a[i] = old
    return g


def _run(model, x, initial, lengths):
    """(out, final states) of a forward from ``initial`` ((h0,), or (h0, c0) for the LSTM;
    None for zeros), on the host: (h_n,), or (h_n, c_n)."""
    if isinstance(model, LSTM):
        out, states = model(x, initial, lengths=lengths)
    else:
        out, h_n = model(x, initial[0], lengths=lengths)
        states = (h_n,)
    return to_host(out), tuple(to_host(s) for s in states)


def set_forget_bias(lstm, value=1.0):
    """Set every LSTM forget-gate bias (bias_ih, f block) to ``value`` and bias_hh's to 0,
    the usual remedy that keeps c_t's gradient path open from the start."""
    if not isinstance(lstm, LSTM):
        raise TypeError(f"lstm: expected gpurnn.LSTM, got {type(lstm).__name__}")
    if not lstm.bias:
        raise ValueError("lstm: the model has no biases (bias=False)")
    H = lstm.hidden_size
    for name, p in lstm.params.items():
        if name.startswith("bias_ih"):
            p[H:2 * H] = value
        elif name.startswith("bias_hh"):
            p[H:2 * H] = 0
    return lstm


def spectral_radius(w):
    """Largest |eigenvalue| of a square matrix (NumPy or CuPy)."""
    return float(np.max(np.abs(np.linalg.eigvals(to_host(w)))))
