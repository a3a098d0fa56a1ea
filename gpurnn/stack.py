"""A stack of layers (and directions) run over one workspace.

``Workspace`` holds every buffer one forward and one backward of a given
``[T, B]`` need; ``forward`` and ``backward`` compute purely from and into
it (and into the model's parameter and gradient arrays), allocating nothing.
The model stages its inputs into the workspace, calls these through
``ops.run`` (where the CUDA backend captures and replays them as graphs) and
copies the results out.

Work that does not depend on each other is issued to ``ops.concurrent`` lanes:
the two directions of a layer, and the layers of a unidirectional stack, which
run as a wavefront over spans of time (layer l on span k while layer l-1 is on
span k+1). On NumPy the lanes run in order and a layer is a single span.
"""

import numpy as np

from gpurnn import sequence
from gpurnn.sequence import GATE_BLOCKS, Direction

# The gradient flowing down the stack lives in one buffer: d_out's. Each layer's BPTT
# reads its output's gradient there before the input-gradient GEMMs write its input's
# gradient over it (a layer's span k of it, in the wavefront), and the layer below reads
# it only after that; x's gradient dx takes the same storage where I == D*H. False gives
# each layer its own buffer (the layout tests compare the two).
SHARE_GRADIENT_STORAGE = True
# A unidirectional layer's output is its states h[1:]: every step writes both, the same
# value by the same thread. Not where a padded step outputs 0 while carrying its state,
# nor where dropout masks the output in place for the layer above (backward reads the
# unmasked states). False gives every layer an output buffer of its own.
SHARE_OUTPUT_STORAGE = True


class Config:
    """What a stack computes: cell, sizes, directions, nonlinearity, and the LSTM's
    projection size P (torch's proj_size; 0: none). Its states and outputs are
    H_out = P (or H) wide: h0, h_n [L*D, B, H_out], out [T, B, D*H_out]; c stays H wide."""

    def __init__(self, cell, input_size, hidden_size, num_layers, bidirectional, nonlinearity, proj_size=0):
        self.cell = cell
        self.I = input_size
        self.H = hidden_size
        self.L = num_layers
        self.D = 2 if bidirectional else 1
        self.nonlinearity = nonlinearity
        self.P = proj_size
        self.H_out = proj_size or hidden_size

    def layer_input_size(self, layer):
        return self.I if layer == 0 else self.D * self.H_out

    def param_names(self, layer, direction):
        """torch's names: weight_ih_l{k}[_reverse], weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}."""
        sfx = f"l{layer}" + ("_reverse" if direction else "")
        return (f"weight_ih_{sfx}", f"weight_hh_{sfx}", f"bias_ih_{sfx}", f"bias_hh_{sfx}")

    def projection_name(self, layer, direction):
        """torch's name of the projection weight W_hr [P, H], weight_hr_l{k}[_reverse]; None without one."""
        return f"weight_hr_l{layer}" + ("_reverse" if direction else "") if self.P else None

    def layer_param_names(self, layer, direction):
        """Every parameter name of a layer's direction, in torch's order (the projection last)."""
        names = self.param_names(layer, direction)
        return names + (self.projection_name(layer, direction),) if self.P else names


class Workspace:
    """All buffers of a [T, B] forward + backward.

    x: [T, B, I]          staged input (None with a vocabulary)   lengths: [B] int32
    ids: [T, B] int32     staged embedding ids, with a vocabulary of V symbols (else None)
    onehot: [T*B, V]      their one-hot, for backward (with a vocabulary)
    (onehot and every buffer from d_out on are None until ``for_training``)
    (H_out is the state and output width, H or the LSTM's projection size: Config)
    h0, c0: [L*D, B, H_out], [L*D, B, H]   staged initial states (c0 for LSTM only)
    masks[l]: [T, B, D*H_out] inverted-dropout mask applied to layer l's input (l >= 1), in
                          place on out[l-1]: nothing reads the unmasked values
    out[l]: [T, B, D*H_out] output of layer l (dirs[l].h[1:] where SHARE_OUTPUT_STORAGE allows)
    h_n, c_n: [L*D, B, H_out], [L*D, B, H] final states
    d_out: [T, B, D*H_out] staged gradient of the top output (backward overwrites it)
    d_hn, d_cn: as h_n, c_n  staged gradients of the final states
    d_in[l]: [T, B, D*H_out] gradient of layer l's input (l >= 1), in d_out's storage
    dx: [T, B, I]         gradient of x (None with a vocabulary), in d_out's storage if
                          I == D*H_out (see SHARE_GRADIENT_STORAGE)   dh0, dc0: as h0, c0
    ones: [1, T*B]        for the bias-gradient GEMMs
    dirs[k]: Direction    per layer and direction, k = l*D + d
    graphs: dict          CUDA graphs captured over these buffers (CUDA backend)
    algorithms: dict      (pass name, math mode, deterministic, forced) -> the recurrence algorithm it runs
    ran: dict             pass name -> the algorithm its latest call ran
    algorithm_notes: dict algorithm -> why it was left out for these shapes
    embedding: tuple      the (weight, gradient) arrays those graphs read, with a vocabulary
    zeroed: set           staged buffers known to hold zeros (and lengths == T), so
                          that calls without them skip re-writing them
    """

    def __init__(self, xp, cfg, T, B, dtype, dropout, vocab=None, padded=False):
        """padded: whether calls on these buffers have steps past a sequence's length."""
        L, D, H, H_out = cfg.L, cfg.D, cfg.H, cfg.H_out
        lstm = cfg.cell == "lstm"
        self.cfg, self.T, self.B = cfg, T, B
        self.dtype, self.vocab, self.dropout, self.padded = dtype, vocab, dropout, padded
        self.x = None if vocab else xp.empty((T, B, cfg.I), dtype)
        self.ids = xp.empty((T, B), xp.int32) if vocab else None
        self.onehot = None  # for_training
        self.lengths = xp.empty((B,), xp.int32)
        self.h0 = xp.empty((L * D, B, H_out), dtype)
        self.c0 = xp.empty((L * D, B, H), dtype) if lstm else None
        self.masks = [None] + [xp.empty((T, B, D * H_out), dtype) if dropout else None for _ in range(1, L)]
        self.dirs = [Direction.allocate(xp, cfg.cell, T, B, cfg.layer_input_size(k // D), H, dtype,
                                        vocab if k < D else None, cfg.P) for k in range(L * D)]
        self.out = [self.dirs[layer].h[1:] if self.output_is_state(layer) else xp.empty((T, B, D * H_out), dtype)
                    for layer in range(L)]
        self.h_n = xp.empty((L * D, B, H_out), dtype)
        self.c_n = xp.empty((L * D, B, H), dtype) if lstm else None
        self.d_out = self.d_hn = self.d_cn = self.dx = self.dh0 = self.dc0 = self.ones = None  # for_training
        self.d_in = [None] * L
        self.xp = xp
        self.graphs = {}
        self.algorithms = {}
        self.ran = {}
        self.algorithm_notes = {}
        self.embedding = None
        self.zeroed = set()

    def for_training(self):
        """Allocate, once, what a training forward saves and a backward works in: an
        inference-only workspace holds none of it."""
        if self.dh0 is not None:
            return
        xp, cfg, T, B, dtype = self.xp, self.cfg, self.T, self.B, self.dtype
        L, D, H, H_out, lstm = cfg.L, cfg.D, cfg.H, cfg.H_out, cfg.cell == "lstm"
        self.onehot = xp.empty((T * B, self.vocab), dtype) if self.vocab else None
        self.d_out = xp.empty((T, B, D * H_out), dtype)
        self.d_hn = xp.empty((L * D, B, H_out), dtype)
        self.d_cn = xp.empty((L * D, B, H), dtype) if lstm else None

        def gradient(width):  # of a layer's input: in d_out's storage where it fits
            if SHARE_GRADIENT_STORAGE and width == D * H_out:
                return self.d_out
            return xp.empty((T, B, width), dtype)

        self.d_in = [None] + [gradient(D * H_out) for _ in range(1, L)]
        self.dx = None if self.vocab else gradient(cfg.I)
        self.dh0 = xp.empty((L * D, B, H_out), dtype)
        self.dc0 = xp.empty((L * D, B, H), dtype) if lstm else None
        self.ones = xp.ones((1, T * B), dtype)
        projections = [d.gx for d in self.dirs]
        for d in self.dirs:
            d.for_training(xp)
        if any(old is not None and old is not d.gx for old, d in zip(projections, self.dirs)):
            for key in [key for key in self.graphs if key[0] == "inference"]:
                del self.graphs[key]  # captured over the projections that gave way (and are freed now)

    def for_inference(self, ops):
        """Allocate, once, where an inference forward writes its input projections (a ring
        of two span-long slots per direction where ``ops`` cuts time into more spans,
        see sequence.RING_SLOTS)."""
        if all(d.gx is not None or d.gx_ring is not None for d in self.dirs):
            return  # every call in eval mode comes here: no spans to work out again
        spans = sequence.time_spans(ops, self.T, self.B, GATE_BLOCKS[self.cfg.cell] * self.cfg.H, reverse=False)
        for d in self.dirs:
            d.for_inference(self.xp, spans)

    def output_is_state(self, layer):
        """Whether layer ``layer``'s output lives in its states (see SHARE_OUTPUT_STORAGE)."""
        masked = self.dropout and layer < self.cfg.L - 1
        return SHARE_OUTPUT_STORAGE and self.cfg.D == 1 and not self.padded and not masked

    @property
    def lanes(self):
        """How many recurrences of this stack may run at once: its directions, or a
        unidirectional stack's layers (the wavefront)."""
        return self.cfg.D if self.cfg.D > 1 else self.cfg.L

    def describe(self):
        """The shape that decides which recurrence algorithm is fastest."""
        cfg = self.cfg
        return (f"{cfg.cell} I={cfg.I} H={cfg.H}{f' P={cfg.P}' if cfg.P else ''} L={cfg.L} D={cfg.D} "
                f"T={self.T} B={self.B} "
                f"{np.dtype(self.dtype).name}"
                f"{f' V={self.vocab}' if self.vocab else ''}{' dropout' if self.dropout else ''}")

    def results(self, name):
        """The arrays a forward (or backward) writes for its caller, to compare algorithms by."""
        if name == "backward":
            return [self.dx, self.dh0, self.dc0]
        return [self.out[-1], self.h_n, self.c_n]

    def stage(self, name, value, default=0):
        """Copy ``value`` into the buffer ``name``; None means ``default``,
        written only if the buffer does not hold it already."""
        buf = getattr(self, name)
        if value is not None:
            buf[...] = value
            self.zeroed.discard(name)
        elif name not in self.zeroed:
            buf[...] = default
            self.zeroed.add(name)

    def layer_input(self, layer, embedding):
        """What layer ``layer`` reads: x (or the embedding rows), else the output below it
        (with dropout already applied in place)."""
        if layer == 0:
            return self.x if embedding is None else sequence.Embedded(self.ids, *embedding, self.onehot)
        return self.out[layer - 1]


def forward(ops, cfg, params, ws, dropout_on, embedding=None, keep=True):
    """Every layer and direction, bottom to top, from ws.x (or ws.ids)/h0/c0 into
    ws.out/h_n/c_n. embedding: None, or (weight [V, I], its gradient [V, I]) when
    the workspace holds ids of its rows. keep: save the activations backward
    (or recording) reads; an inference forward passes False."""
    if cfg.D == 1 and cfg.L > 1:
        _forward_wavefront(ops, cfg, params, ws, dropout_on, embedding, keep)
        return
    for layer in range(cfg.L):
        if layer and dropout_on:
            ws.out[layer - 1] *= ws.masks[layer]  # dropout between layers: the unmasked output is dead
        x = ws.layer_input(layer, embedding)
        with ops.concurrent(cfg.D) as lane:  # the directions share only what they read
            for d in range(cfg.D):
                with lane(d):
                    sequence.drain(_forward_direction(ops, cfg, params, ws, layer, d, x, keep))


def _forward_wavefront(ops, cfg, params, ws, dropout_on, embedding, keep):
    """A unidirectional stack as a wavefront (as cuDNN runs one): time is cut into
    spans, each layer runs in its own lane, and layer l's span k waits only for
    span k of the layer below, so it runs while that layer works on span k+1."""
    spans = sequence.time_spans(ops, ws.T, ws.B, GATE_BLOCKS[cfg.cell] * cfg.H, reverse=False)
    ready = [None] + [[None] * len(spans) for _ in range(1, cfg.L)]  # [l][k]: span k of layer l's input is written
    with ops.concurrent(cfg.L) as lane:
        layers = []
        for layer in range(cfg.L):
            with lane(layer):
                x = ws.layer_input(layer, embedding)
                layers.append(_forward_direction(ops, cfg, params, ws, layer, 0, x, keep, spans, ready[layer]))
                next(layers[layer])  # set up: weight layouts are chosen while the other lanes are idle
        for k, (start, stop) in enumerate(spans):
            for layer in range(cfg.L):
                with lane(layer):
                    next(layers[layer])  # span k of this layer
                    if layer + 1 < cfg.L:
                        if dropout_on:
                            ws.out[layer][start:stop] *= ws.masks[layer + 1][start:stop]
                        ready[layer + 1][k] = ops.mark()
        for layer in range(cfg.L):
            with lane(layer):
                sequence.drain(layers[layer])  # its final state


def _forward_direction(ops, cfg, params, ws, layer, d, x, keep, spans=None, inputs_ready=None):
    """One layer's direction d as a generator (``sequence.forward_spans``): its
    initial state in, its spans of time, its final state out."""
    k, H_out = layer * cfg.D + d, cfg.H_out
    first, last = (0, -1)[d], (-1, 0)[d]  # state index of h0 and of h_n
    w_ih, w_hh, b_ih, b_hh = (params[n] for n in cfg.param_names(layer, d))
    w_hr = params[cfg.projection_name(layer, d)] if cfg.P else None
    wsd = ws.dirs[k]
    wsd.h[first] = ws.h0[k]
    if cfg.cell == "lstm":
        wsd.c[first] = ws.c0[k]
    if cfg.P:  # what a padded step carries (never used: its projection is masked), defined, not stale NaN
        wsd.h_cell[first] = 0
    y = ws.out[layer][:, :, d * H_out:(d + 1) * H_out]
    yield from sequence.forward_spans(ops, cfg.cell, cfg.nonlinearity, x, w_ih, w_hh, b_ih, b_hh, ws.lengths, d,
                                      wsd, y, keep, spans, inputs_ready, label=_label(cfg, layer, d), w_hr=w_hr)
    ws.h_n[k] = wsd.h[last]
    if cfg.cell == "lstm":
        ws.c_n[k] = wsd.c[last]


def backward(ops, cfg, params, grads, ws, dropout_on, recorders=None, embedding=None):
    """BPTT through the stack, top to bottom, from ws.d_out/d_hn/d_cn into
    ws.dx/dh0/dc0; parameter gradients accumulate into ``grads`` (and, with an
    ``embedding`` as in ``forward``, into its gradient instead of ws.dx).
    recorders: None, or one gradient-flow recorder per layer and direction."""
    if embedding is not None:
        ops.one_hot(ws.ids.reshape(-1), ws.onehot)
    if cfg.D == 1 and cfg.L > 1 and recorders is None:
        _backward_wavefront(ops, cfg, params, grads, ws, dropout_on, embedding)
        return
    d_layer_out = ws.d_out
    for layer in reversed(range(cfg.L)):
        x = ws.layer_input(layer, embedding)
        dx = ws.dx if layer == 0 else ws.d_in[layer]
        # the directions' BPTT may run at the same time (not while recorders read
        # each step on the host); their sums into the input's gradient run in turn,
        # after both have read d_layer_out, whose storage dx may be
        with ops.concurrent(cfg.D if recorders is None else 1) as lane:
            for d in range(cfg.D):
                with lane(d):
                    recorder = None if recorders is None else recorders[layer * cfg.D + d]
                    sequence.drain(_backward_direction(ops, cfg, params, grads, ws, layer, d, x, d_layer_out,
                                                       recorder=recorder))
        for d in range(cfg.D):
            sequence.backward_input(ops, x, params[cfg.param_names(layer, d)[0]], ws.dirs[layer * cfg.D + d], dx,
                                    accumulate=d > 0)
        if layer and dropout_on:
            dx *= ws.masks[layer]  # backprop through the same dropout mask
        d_layer_out = dx


def _backward_wavefront(ops, cfg, params, grads, ws, dropout_on, embedding):
    """BPTT through a unidirectional stack as a wavefront (see ``_forward_wavefront``):
    top layer first, spans of time last to first; layer l's span k waits only for
    the gradient the layer above sends into span k of its output."""
    spans = sequence.time_spans(ops, ws.T, ws.B, GATE_BLOCKS[cfg.cell] * cfg.H, reverse=True)
    ready = [[None] * len(spans) for _ in range(cfg.L - 1)] + [None]  # [l][k]: span k of layer l's dy is written
    with ops.concurrent(cfg.L) as lane:
        layers = [None] * cfg.L
        for layer in reversed(range(cfg.L)):
            with lane(layer):
                x = ws.layer_input(layer, embedding)
                d_layer_out = ws.d_out if layer == cfg.L - 1 else ws.d_in[layer + 1]
                layers[layer] = _backward_direction(ops, cfg, params, grads, ws, layer, 0, x, d_layer_out,
                                                    spans, ready[layer], ws.d_in[layer])
        for k, (start, stop) in enumerate(spans):
            for layer in reversed(range(cfg.L)):
                with lane(layer):
                    next(layers[layer])  # span k of this layer
                    if layer:
                        if dropout_on:
                            ws.d_in[layer][start:stop] *= ws.masks[layer][start:stop]  # the same dropout mask
                        ready[layer - 1][k] = ops.mark()
        for layer in range(cfg.L):
            with lane(layer):
                sequence.drain(layers[layer])  # its weight and initial-state gradients
    sequence.backward_input(ops, ws.layer_input(0, embedding), params[cfg.param_names(0, 0)[0]],
                            ws.dirs[0], ws.dx, accumulate=False)


def _backward_direction(ops, cfg, params, grads, ws, layer, d, x, d_layer_out, spans=None, dy_ready=None,
                        d_in=None, recorder=None):
    """BPTT through one layer's direction d as a generator (``sequence.backward_spans``),
    up to its weight gradients and the gradient of its initial state."""
    k, H_out = layer * cfg.D + d, cfg.H_out
    names = cfg.param_names(layer, d)
    w_ih, w_hh = params[names[0]], params[names[1]]
    dw_ih, dw_hh, db_ih, db_hh = (grads[n] for n in names)
    projection = cfg.projection_name(layer, d)
    wsd = ws.dirs[k]
    wsd.dh[...] = ws.d_hn[k]
    if cfg.cell == "lstm":
        wsd.dc[...] = ws.d_cn[k]
    if projection:
        wsd.dh_cell[...] = 0  # and so it stays: the state flows back through the projection, in dh
    dy = d_layer_out[:, :, d * H_out:(d + 1) * H_out]
    yield from sequence.backward_spans(ops, cfg.cell, cfg.nonlinearity, x, w_ih, w_hh, ws.lengths, d, wsd, dy,
                                       ws.ones, dw_ih, dw_hh, db_ih, db_hh, spans, dy_ready, d_in, recorder,
                                       label=_label(cfg, layer, d),
                                       w_hr=params[projection] if projection else None,
                                       dw_hr=grads[projection] if projection else None)
    ws.dh0[k] = wsd.dh
    if cfg.cell == "lstm":
        ws.dc0[k] = wsd.dc


def _label(cfg, layer, d):
    """How NVTX ranges name a layer's direction: "lstm l0 fwd", "gru l1 rev"."""
    return f"{cfg.cell} l{layer} {'rev' if d else 'fwd'}"
