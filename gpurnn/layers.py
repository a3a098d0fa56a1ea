"""RNN, LSTM and GRU modules with PyTorch's API, shapes and parameter names.

    out, h_n = rnn(x, h0=None, lengths=None)             # GRU the same
    out, (h_n, c_n) = lstm(x, hx=None, lengths=None)     # hx = (h0, c0)
    dx, dh0 = rnn.backward(d_out, d_hn=None)
    dx, (dh0, dc0) = lstm.backward(d_out, d_hx=None)     # d_hx = (d_hn, d_cn)

x: [T, B, I] ([B, T, I] with batch_first)   h0, c0, h_n, c_n: [L*D, B, H]
out: [T, B, D*H] ([B, T, D*H] with batch_first)   lengths: [B], 1 <= l <= T
Unbatched, as torch: x [T, I] with h0, c0 [L*D, H] gives out [T, D*H] and
h_n, c_n [L*D, H]; backward takes and returns the same unbatched shapes.
An LSTM with proj_size=P > 0 (torch's projection) has states h0, h_n [L*D, B, P]
and outputs [T, B, D*P]; its cell states c0, c_n stay [L*D, B, H].

``backward`` consumes the cache of the last training-mode forward and
accumulates parameter gradients into ``m.grads`` (cleared by ``zero_grad``);
an eval-mode forward keeps no activations for it (like cuDNN's inference).
Parameters and gradients are updated in place, never rebound, so a captured
CUDA graph that points at them stays valid.
"""

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from gpurnn import checks, memory, precision, stack
from gpurnn.backend import get_backend, to_host
from gpurnn.cells import NONLINEARITIES

MAX_WORKSPACES = 4  # buffers kept for this many recent [T, B] shapes
RECORD_LIMIT_BYTES = 2 << 30  # record=True refuses to keep more than this
RECORDED = {"rnn": ("a",), "lstm": ("i", "f", "g", "o", "c"), "gru": ("r", "z", "n")}


class _RNNBase:
    _cell = None

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype="float32", seed=None, nonlinearity=None,
                 backend=None, proj_size=0):
        self.input_size = checks.positive_int("input_size", input_size)
        self.hidden_size = checks.positive_int("hidden_size", hidden_size)
        self.proj_size = checks.positive_int("proj_size", proj_size, allow_zero=True)
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"proj_size: expected a size below hidden_size ({self.hidden_size}), as torch's, "
                             f"got {proj_size}")
        self.num_layers = checks.positive_int("num_layers", num_layers)
        self.bias = checks.flag("bias", bias)
        self.batch_first = checks.flag("batch_first", batch_first)
        self.dropout = checks.probability("dropout", dropout)
        self.bidirectional = checks.flag("bidirectional", bidirectional)
        self.dtype = checks.float_dtype("dtype", dtype)
        checks.seed("seed", seed)
        self.nonlinearity = nonlinearity
        self.backend = get_backend(backend)
        self._ops = self.backend.ops
        self._ops.check_dtype(self.dtype)
        self._cfg = stack.Config(self._cell, self.input_size, self.hidden_size, self.num_layers,
                                 self.bidirectional, nonlinearity, self.proj_size)
        self._rng = np.random.default_rng(seed)
        self._params, self._grads = self._init_params()
        public = [n for n in self._params if self.bias or not n.startswith("bias")]
        self.params = {n: self._params[n] for n in public}  # the arrays themselves
        self.grads = {n: self._grads[n] for n in public}
        self.training = True
        self._workspaces = OrderedDict()
        self._cache = None  # (workspace, dropout_on) of the last training forward
        self._cache_used = False
        self._recorded = None

    # ------------------------------------------------------------------ params
    def _init_params(self):
        """U(-1/sqrt(H), 1/sqrt(H)) like torch, in torch's order; zero biases if bias=False."""
        cfg, xp = self._cfg, self.backend.xp
        G = {"rnn": 1, "lstm": 4, "gru": 3}[self._cell]
        k = 1.0 / np.sqrt(cfg.H)
        params, grads = {}, {}
        for layer in range(cfg.L):
            for d in range(cfg.D):
                shapes = ((G * cfg.H, cfg.layer_input_size(layer)), (G * cfg.H, cfg.H_out), (G * cfg.H,),
                          (G * cfg.H,), (cfg.P, cfg.H))  # the last, W_hr, only with a projection
                for name, shape in zip(cfg.layer_param_names(layer, d), shapes):
                    if name.startswith("bias") and not self.bias:
                        value = np.zeros(shape)
                    else:
                        value = self._rng.uniform(-k, k, size=shape)
                    params[name] = xp.asarray(value.astype(self.dtype))
                    grads[name] = xp.zeros(shape, self.dtype)
        return params, grads

    def _rebind(self, name, param, grad):
        """Hold ``param`` and ``grad`` (views of a model's flat buffers) as the
        parameter ``name`` and its gradient from now on; graphs captured over
        the old arrays are dropped."""
        self._params[name] = self.params[name] = param
        self._grads[name] = self.grads[name] = grad
        for ws in self._workspaces.values():
            ws.graphs.clear()

    def parameters(self):
        """(name, array) pairs, in torch's order."""
        return list(self.params.items())

    def state_dict(self):
        """Copies of the parameters, keyed by torch's names."""
        return {n: p.copy() for n, p in self.params.items()}

    def load_state_dict(self, state):
        """Copy arrays (NumPy, or this backend's) into the parameters, in place."""
        checks.state_keys(state, self.params)
        staged = {}
        for name, p in self.params.items():
            a = self._ops.asarray(state[name], f"state_dict[{name!r}]")
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"state_dict[{name!r}]: expected shape {tuple(p.shape)}, got {tuple(a.shape)}")
            if not precision.is_float(a.dtype):
                raise TypeError(f"state_dict[{name!r}]: expected a floating-point array, got dtype {a.dtype}")
            staged[name] = a
        for name, a in staged.items():  # only after every key passed: no half-loaded model
            self.params[name][...] = a

    def zero_grad(self):
        for g in self._grads.values():
            g[...] = 0

    def memory_report(self):
        """The buffers this layer holds and their bytes (gpurnn.memory): print it for a table."""
        return memory.report(self)

    def clear_cache(self):
        """Drop the buffers (and CUDA graphs) kept for recent input shapes, at most
        MAX_WORKSPACES of them (a new shape evicts the oldest), and the last training
        forward's cache: the next call of each shape sets up afresh. On CUDA the memory
        goes back to CuPy's pool (``cupy.get_default_memory_pool().free_all_blocks()``
        returns it to the driver)."""
        self._workspaces.clear()
        self._cache = None

    def train(self, mode=True):
        self.training = checks.flag("mode", mode)
        return self

    def eval(self):
        return self.train(False)

    # ----------------------------------------------------------------- forward
    def _input(self, value, name, shape, layout):
        a = self._ops.asarray(value, name)
        return checks.array(name, a, shape, self.dtype, layout)

    def _workspace(self, T, B, dropout_on, vocab, padded):
        key = (T, B, dropout_on, vocab, padded)
        ws = self._workspaces.pop(key, None)
        if ws is None:
            ws = stack.Workspace(self.backend.xp, self._cfg, T, B, self.dtype, dropout_on, vocab, padded)
            if len(self._workspaces) >= MAX_WORKSPACES:
                evicted = self._workspaces.popitem(last=False)[1]
                if self._cache is not None and self._cache[0] is evicted:
                    self._cache = None
        self._workspaces[key] = ws  # most recent last
        return ws

    @property
    def algorithms(self):
        """Which recurrence algorithm ran each pass of the latest call, e.g.
        {"forward": "persistent", "backward": "fused"} (CUDA: chosen per shape, see
        gpurnn.set_rnn_algorithm); {} before the first call."""
        if not self._workspaces:
            return {}
        return dict(next(reversed(self._workspaces.values())).ran)

    @property
    def algorithm_notes(self):
        """Why algorithms were left out for the latest call's shape: {algorithm: reason}."""
        if not self._workspaces:
            return {}
        return dict(next(reversed(self._workspaces.values())).algorithm_notes)

    @property
    def recorded(self):
        """Per-timestep internals of the last ``model(x, record=True)``: a dict of
        [num_layers*D, T, B, H] arrays (RNN "a" = pre-activation; LSTM "i", "f",
        "g", "o", "c"; GRU "r", "z", "n"); zeros at padded steps."""
        if self._recorded is None:
            raise RuntimeError("recorded: nothing recorded yet; call the model with record=True first")
        return self._recorded

    def _forward(self, x, h0, c0, lengths, record=False, embedding=None):
        """embedding: None, or (weight [V, I], its gradient [V, I]): then x holds
        ids [T, B] ([B, T] with batch_first), already checked to lie in [0, V), and
        the first layer reads those rows of weight, folded into its input
        projection (see gpurnn.sequence); backward accumulates into the gradient."""
        cfg, xp = self._cfg, self.backend.xp
        unbatched = False
        name = "x" if embedding is None else "ids"
        x = self._ops.asarray(x, name)
        given = tuple(x.shape)  # in the caller's layout, for the messages
        if embedding is None:
            layout = "[B, T, I] (batch_first)" if self.batch_first else "[T, B, I]"
            if x.dtype != self.dtype:
                raise TypeError(f"x: expected dtype {self.dtype.name}, got {x.dtype}")
            if x.ndim not in (2, 3):
                raise ValueError(f"x: expected a 3-D array of shape [*, *, {cfg.I}] {layout}, or a 2-D one "
                                 f"[*, {cfg.I}] [T, I] (unbatched), got shape {tuple(x.shape)}")
            unbatched = x.ndim == 2  # torch's unbatched input: one sequence, batch_first does not apply
            if unbatched:
                x = checks.array("x", x, (None, cfg.I), self.dtype, "[T, I] (unbatched)")[:, None]
            else:
                x = checks.array("x", x, (None, None, cfg.I), self.dtype, layout)
        else:
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"ids: expected an integer array of rank 2, got {x.dtype} {tuple(x.shape)}")
            x = x[..., None]  # [T, B, 1]: the shape checks below see one feature
        if self.batch_first and not unbatched:
            x = x.transpose(1, 0, 2)
        T, B = x.shape[0], x.shape[1]
        if T == 0:
            raise ValueError(f"{name}: expected at least one time step, got shape {given}")
        h0 = self._state(h0, "h0", B, unbatched)
        c0 = self._state(c0, "c0", B, unbatched, cell_state=True)
        if lengths is not None:
            lengths = checks.lengths("lengths", to_host(lengths), B, T)
        if B == 0:  # a batch of no sequences (torch takes it): nothing to run
            return self._empty_batch(T, embedding, record)

        if record:
            names = RECORDED[cfg.cell]
            need = len(names) * cfg.L * cfg.D * T * B * cfg.H * self.dtype.itemsize
            if need > RECORD_LIMIT_BYTES:
                raise ValueError(f"record=True would keep {len(names)} arrays of shape "
                                 f"[{cfg.L * cfg.D}, {T}, {B}, {cfg.H}] ({need / 2**30:.1f} GiB), over the "
                                 f"{RECORD_LIMIT_BYTES / 2**30:.0f} GiB limit; record a shorter sequence or a smaller batch")
        dropout_on = self.training and self.dropout > 0 and cfg.L > 1
        masks = [None] * cfg.L
        if dropout_on:
            keep = 1.0 - self.dropout
            for layer in range(1, cfg.L):  # inverted dropout, drawn from the model's seeded RNG
                masks[layer] = ((self._rng.random((T, B, cfg.D * cfg.H_out)) < keep) / keep).astype(self.dtype)

        padded = lengths is not None and bool((lengths < T).any())  # its buffers are laid out otherwise
        ws = self._workspace(T, B, dropout_on, None if embedding is None else embedding[0].shape[0], padded)
        if embedding is not None and (ws.embedding is None
                                      or any(a is not b for a, b in zip(ws.embedding, embedding))):
            ws.graphs.clear()  # graphs point at the embedding arrays they were captured with
            ws.embedding = embedding
        with self._ops.on_stream():
            if embedding is None:
                ws.x[...] = x
            else:
                ws.ids[...] = x[..., 0]
            ws.stage("lengths", None if lengths is None else xp.asarray(lengths), default=T)
            ws.stage("h0", h0)
            if cfg.cell == "lstm":
                ws.stage("c0", c0)
            for layer in range(1, cfg.L if dropout_on else 1):
                ws.masks[layer][...] = xp.asarray(masks[layer])
            keep = self.training or record  # eval keeps nothing for a backward (as cuDNN inference does)
            if keep:
                ws.for_training()  # an inference-only shape never allocates activations or gradients
            else:
                ws.for_inference(self._ops)
            self._ops.run(ws, "forward" if keep else "inference",
                          lambda: stack.forward(self._ops, cfg, self._params, ws, dropout_on, embedding, keep))
            result = (self._time_major_out(ws.out[-1], unbatched), ws.h_n.copy(),
                      ws.c_n.copy() if cfg.cell == "lstm" else None)
            self._recorded = self._record(ws) if record else None
        self._cache = (ws, dropout_on, embedding, unbatched) if self.training else None
        if unbatched:  # drop the batch of one again, as torch does
            result = tuple(None if a is None else (a[:, 0] if a.ndim == 3 else a) for a in result)
        self._cache_used = False
        return result

    def _empty_batch(self, T, embedding, record):
        """The forward of a batch of size 0: outputs and states with no rows, as torch's, and
        a cache whose backward returns gradients with no rows and accumulates nothing."""
        cfg, xp = self._cfg, self.backend.xp
        width = cfg.D * cfg.H_out
        out = xp.empty((0, T, width) if self.batch_first else (T, 0, width), self.dtype)
        self._recorded = ({name: xp.empty((cfg.L * cfg.D, T, 0, cfg.H), self.dtype) for name in RECORDED[cfg.cell]}
                          if record else None)
        self._cache = (_NoRows(T), False, embedding, False) if self.training else None
        self._cache_used = False
        return (out, *self._states_of_no_rows())

    def _states_of_no_rows(self):
        """(h, c) of a batch of size 0: [L*D, 0, H_out] and [L*D, 0, H] (c None but for the LSTM)."""
        cfg, xp = self._cfg, self.backend.xp
        return (xp.empty((cfg.L * cfg.D, 0, cfg.H_out), self.dtype),
                xp.empty((cfg.L * cfg.D, 0, cfg.H), self.dtype) if cfg.cell == "lstm" else None)

    def _state(self, value, name, B, unbatched, cell_state=False):
        """A state argument (h0, c0, d_hn, d_cn) checked as [L*D, B, H], or as
        [L*D, H] beside unbatched input (h0, d_hn: P for H with a projection,
        cell_state False); None stays None."""
        if value is None:
            return None
        cfg = self._cfg
        width, letter = (cfg.H, "H") if cell_state or not cfg.P else (cfg.P, "proj_size")
        if unbatched:
            return self._input(value, name, (cfg.L * cfg.D, width),
                               f"[num_layers*D, {letter}] (unbatched input)")[:, None]
        return self._input(value, name, (cfg.L * cfg.D, B, width), f"[num_layers*D, B, {letter}]")

    def _call_embedded(self, ids, weight, dweight, state=None):
        """The layer on embedding rows: ``self(weight[ids], state)`` without
        materialising weight[ids] (see ``_forward``); backward returns dx None."""
        h0, c0 = _pair("state", state) if self._cell == "lstm" else (state, None)
        out, h_n, c_n = self._forward(ids, h0, c0, None, embedding=(weight, dweight))
        return out, ((h_n, c_n) if self._cell == "lstm" else h_n)

    def _record(self, ws):
        """Copy the per-timestep internals out of the workspace (see ``recorded``)."""
        cfg, xp = self._cfg, self.backend.xp
        T, B, H = ws.T, ws.B, cfg.H
        valid = (xp.arange(T)[:, None] < ws.lengths[None, :])[..., None]  # [T, B, 1]
        out = {name: xp.empty((cfg.L * cfg.D, T, B, H), self.dtype) for name in RECORDED[cfg.cell]}
        for k, d in enumerate(ws.dirs):
            reverse = k % cfg.D
            if cfg.cell == "rnn":  # the pre-activation was not kept: recompute it from the saved states
                _, w_hh, b_ih, b_hh = (self._params[n] for n in cfg.param_names(k // cfg.D, reverse))
                h_prev = (d.h[1:] if reverse else d.h[:-1]).reshape(T * B, H)
                out["a"][k] = (d.gx + b_ih + (h_prev @ w_hh.T).reshape(T, B, H) + b_hh) * valid
                continue
            for j, name in enumerate(RECORDED[cfg.cell][:4]):  # the saved gate blocks (not the LSTM's c)
                out[name][k] = d.gates[:, :, j * H:(j + 1) * H]
            if cfg.cell == "lstm":
                out["c"][k] = (d.c[:-1] if reverse else d.c[1:]) * valid  # the state each step wrote
        return out

    def _time_major_out(self, a, unbatched):
        """A fresh copy of a [T, B, ·] workspace buffer, in the user's layout
        (the workspace is overwritten by the next call)."""
        return (a.transpose(1, 0, 2) if self.batch_first and not unbatched else a).copy(order="C")

    # ---------------------------------------------------------------- backward
    def _backward(self, d_out, d_hn, d_cn, recorders=None):
        if not self.training:
            raise RuntimeError("backward: the model is in eval mode, which keeps no cache; "
                               "call train() and run forward again")
        if self._cache is None:
            raise RuntimeError("backward: no forward pass to differentiate; call the model in train mode first")
        if self._cache_used:
            raise RuntimeError("backward: this forward's cache was already used; run forward again")
        cfg = self._cfg
        ws, dropout_on, embedding, unbatched = self._cache
        T, B = ws.T, ws.B
        DH, H = cfg.D * cfg.H_out, "proj_size" if cfg.P else "H"
        if unbatched:
            d_out = self._input(d_out, "d_out", (T, DH), f"[T, D*{H}] (unbatched)")[:, None]
        elif self.batch_first:
            d_out = self._input(d_out, "d_out", (B, T, DH), f"[B, T, D*{H}] (batch_first)").transpose(1, 0, 2)
        else:
            d_out = self._input(d_out, "d_out", (T, B, DH), f"[T, B, D*{H}]")
        d_hn = self._state(d_hn, "d_hn", B, unbatched)
        d_cn = self._state(d_cn, "d_cn", B, unbatched, cell_state=True)
        if B == 0:  # no sequences: no gradient to accumulate, and none with rows to return
            self._cache_used = True
            xp = self.backend.xp
            dx = None if embedding is not None else xp.empty((T, 0, cfg.I), self.dtype)
            return (None if dx is None else self._time_major_out(dx, False), *self._states_of_no_rows())

        with self._ops.on_stream():
            ws.d_out[...] = d_out
            ws.stage("d_hn", d_hn)
            if cfg.cell == "lstm":
                ws.stage("d_cn", d_cn)
            self._cache_used = True
            accumulates = list(self._grads.values()) + ([] if embedding is None else [embedding[1]])

            def restore():  # what a backward overwrites (the staged d_out, the saved gates), from its sources
                ws.d_out[...] = d_out
                timed, self._ops.algorithm = self._ops.algorithm, ws.ran["forward"]
                try:  # the forward as it ran: the same gates, bit for bit
                    stack.forward(self._ops, cfg, self._params, ws, dropout_on, embedding, keep=True)
                finally:
                    self._ops.algorithm = timed

            self._ops.run(ws, "backward",
                          lambda: stack.backward(self._ops, cfg, self._params, self._grads, ws, dropout_on,
                                                 recorders, embedding),
                          capture=recorders is None, accumulates=accumulates, restore=restore)
            grads = (None if ws.dx is None else self._time_major_out(ws.dx, unbatched), ws.dh0.copy(),
                     ws.dc0.copy() if cfg.cell == "lstm" else None)
        if unbatched:
            grads = tuple(None if g is None else g[:, 0] for g in grads)
        return grads

    def __repr__(self):
        extra = f", nonlinearity={self.nonlinearity!r}" if self._cell == "rnn" else ""
        extra += f", proj_size={self.proj_size}" if self.proj_size else ""
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
                f"{extra}, bidirectional={self.bidirectional}, dtype={self.dtype.name}, "
                f"backend={self.backend.name})")


class RNN(_RNNBase):
    """Elman RNN: h_t = phi(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    phi is ``nonlinearity``: tanh, relu (as torch), sigmoid, leaky_relu (slope
    0.01) or elu (alpha 1). Parameters per layer k: weight_ih_l{k} [H, I],
    weight_hh_l{k} [H, H], bias_ih_l{k} [H], bias_hh_l{k} [H] (+ _reverse).
    """

    _cell = "rnn"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, dtype="float32", seed=None,
                 backend=None):
        checks.choice("nonlinearity", nonlinearity, NONLINEARITIES)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, dtype, seed, nonlinearity, backend)

    def __call__(self, x, h0=None, lengths=None, record=False):
        out, h_n, _ = self._forward(x, h0, None, lengths, record)
        return out, h_n

    def backward(self, d_out, d_hn=None):
        dx, dh0, _ = self._backward(d_out, d_hn, None)
        return dx, dh0


class GRU(RNN):
    """Gated recurrent unit (PyTorch/cuDNN convention, gates r, z, n):

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    The textbook form with z and 1 - z swapped is the same cell with the
    update gate negated (its weights and biases multiplied by -1).
    Parameters: weight_ih_l{k} [3H, I], weight_hh_l{k} [3H, H], biases [3H].
    """

    _cell = "gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype="float32", seed=None, backend=None):
        _RNNBase.__init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                          bidirectional, dtype, seed, backend=backend)


class LSTM(_RNNBase):
    """Long short-term memory (gates i, f, g, o in torch's order):

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)
        f = sigmoid(W_if x + b_if + W_hf h + b_hf)
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        o = sigmoid(W_io x + b_io + W_ho h + b_ho)
        c' = f * c + i * g
        h' = o * tanh(c')

    With ``proj_size`` P > 0 (torch's LSTM with projections): h' = (o * tanh(c')) W_hr^T,
    P wide, is the state and the output.

    Parameters: weight_ih_l{k} [4H, I], weight_hh_l{k} [4H, H] ([4H, P] with a projection),
    biases [4H], and with a projection weight_hr_l{k} [P, H] (+ _reverse).
    Recurrence algorithms: a projected LSTM runs "graph" (a step GEMM, the pointwise
    step, the projection's GEMM and a masked copy per step), as cuDNN runs projections
    with its standard algorithm only.
    """

    _cell = "lstm"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, dtype="float32", seed=None, backend=None, proj_size=0):
        _RNNBase.__init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                          bidirectional, dtype, seed, backend=backend, proj_size=proj_size)

    def __call__(self, x, hx=None, lengths=None, record=False):
        h0, c0 = _pair("hx", hx)
        out, h_n, c_n = self._forward(x, h0, c0, lengths, record)
        return out, (h_n, c_n)

    def backward(self, d_out, d_hx=None):
        d_hn, d_cn = _pair("d_hx", d_hx)
        dx, dh0, dc0 = self._backward(d_out, d_hn, d_cn)
        return dx, (dh0, dc0)


@dataclass
class _NoRows:
    """The cache of a forward over a batch of no sequences: what backward checks d_out against."""

    T: int
    B: int = 0


def _pair(name, value):
    if value is None:
        return None, None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected a pair (h, c) or None, got {type(value).__name__}")
    return value[0], value[1]
