"""Time-loop drivers: one layer, one direction, forward and BPTT, written once.

The drivers only call backend operations (``ops``): ``gemm``, ``gather_rows`` and
the per-cell pointwise steps of ``gpurnn.cells`` (NumPy) or their numba.cuda
twins. They allocate nothing: every buffer comes in through a ``Direction``
workspace, so the CUDA backend can capture a whole call as one CUDA graph.

Structure (haste's): forward does one GEMM for the input projection of all
T*B rows, then per step only the recurrent GEMM and one fused pointwise step.
Backward does per step only the fused pointwise step and ``dgates @ W_hh``;
dW_ih, dW_hh, the bias gradients and dx are single large GEMMs after the loop.
Where the backend overlaps work (CUDA), time is cut into a few spans: one input
GEMM per span, each overlapping the steps of the spans before, and
``forward_spans`` / ``backward_spans`` hand the spans out one at a time so that
``gpurnn.stack`` can interleave the layers of a stack.

A first layer fed by an embedding (``Embedded``) folds the embedding into its
input projection: x_t = E[id_t] makes x_t W_ih^T a row of the [V, G*H]
table E W_ih^T, so the forward gathers rows instead of running the
[T*B, I] x [I, G*H] GEMM, and backward sums dgx per symbol (one [V, T*B] x
[T*B, G*H] GEMM against the ids' one-hot) before the small weight GEMMs,
instead of the two [T*B]-row GEMMs for dW_ih and dx.
"""

from dataclasses import dataclass, replace

GATE_BLOCKS = {"rnn": 1, "lstm": 4, "gru": 3}
SAVED_BLOCKS = {"rnn": 0, "lstm": 4, "gru": 4}  # GRU keeps r, z, n and U_n h + b_hn
# Buffers whose values are dead by the time the next is written share storage: the
# saved gates are written over the input projection (a step writes gates[t] over gx[t]
# after reading it: each element of both is one thread's, read before written), then
# the gate gradients over the gates (backward writes dgates[t] over gates[t] likewise,
# and never reads gx). The GRU saves 4H a row, r, z, n and U_n h + b_hn, so its gx is
# the first 3H columns of its gates' rows, and its dgates rows are dr, dz, dn r, dn:
# the recurrent projection's gradient (dgh) is their first 3H columns, the input
# projection's (dgx) the r, z and last blocks. False gives each its own buffer (the
# layout tests compare the two).
SHARE_PROJECTION_STORAGE = True
# An inference forward cut into three or more spans writes each span's input projection
# into one of two span-long slots, in turn: a span's projection is dead once its steps
# have read it, and the slot's next writer (span k+2's GEMM, on the side stream) waits
# for span k's steps, so the projection of span k+1 still overlaps the steps of span k.
RING_SLOTS = 2


@dataclass
class Direction:
    """Buffers of one layer and one direction for sequences of shape [T, B, ·].

    (H_out: the state width, H, or P for an LSTM with a projection; see h_cell)
    gx: [T, B, G*H]   input projection x W_ih^T (the step kernels add b_ih); in training
                the first G*H columns of gates' rows (see SHARE_PROJECTION_STORAGE)
    gx_ring: [RING_SLOTS*S, B, G*H] where an inference forward of spans at most S long
                writes its spans' projections, in turn (None: it writes them into gx)
    span_lengths: [spans, B] int32  with gx_ring, lengths - start of each span (in time
                order): steps then count from their span's start, as the slot's rows do
    span_starts: [spans, 1] int32   those starts; ring_spans: the spans, (start, stop) in time order
    gh: [B, G*H]      this step's recurrent projection h_prev W_hh^T (backward: the bias gradient's sum)
    w_hh_t: [H_out, G*H] room for W_hh^T, for backends whose GEMM is faster on it (the fused
            steps keep W_hh there in their own order: CudaOps.fused_weights)
    w_ih_t: [I, G*H]  room for W_ih^T, likewise (None when the input is Embedded)
    h:  [T+1, B, H_out] states; h0 sits in h[0] (forward) or h[T] (reverse)
    c:  [T+1, B, H]   LSTM cell states (None otherwise); until ``for_training``, c_step
    c_step: [T+1, B, H] one [B, H] block seen at every state index (time stride 0), the
                LSTM's cell state for forwards no backward will read: each element is
                read and then written by the one thread that owns it, step after step
    gates: [T, B, S*H] saved activations (None for the plain RNN)
    step_gates: [T, B, S*H] one [B, S*H] block seen at every t (time stride 0), where
                forwards whose activations no backward will read write them
    dgates: [T, B, max(G, S)*H] what BPTT's steps write: the pre-activation gradients, in
                gates' storage (the plain RNN's in gx's); ``dgh`` and ``dgx_blocks`` view them
    dh, dc: [B, H_out], [B, H] gradient carried back through h (and c)
    table: [V, G*H]   E W_ih^T, when the input is Embedded (else None)
    dtable: [V, G*H]  dgx summed per symbol, when the input is Embedded
    sync: [1 + B] int32  the persistent kernels' failure flag and barrier counters (one a batch tile)

    An LSTM with a projection (P > 0, torch's proj_size) has a state h_t = (o * tanh(c_t)) W_hr^T
    of P values; each step the cell writes o * tanh(c_t) into h_cell, one GEMM projects it
    (into hp) and ``project_forward`` makes that the state and the output:
    h_cell: [T+1, B, H]  the cell's unprojected outputs, which backward's dW_hr GEMM reads;
                until ``for_training``, h_cell_step: one [B, H] block seen at every index
                (as c_step, kept for the inference graphs captured over it)
    y_cell: [T, B, H]  one [B, H] block seen at every t: where the cell writes its output (the
                projection's is the layer's); in backward, dproj[t] W_hr, the gradient into it
    hp: [B, P]        this step's projection h_cell W_hr^T
    dproj: [T, B, P]  the gradient of each step's projection (0 at padded steps)
    dh_cell: [B, H]   the cell's carried gradient: 0, since the state reaches the next step
                only through the projection (dh carries the gradient in its place)

    gates, all T+1 cell states and the gradient buffers (dgates, dh, dc, dtable) are
    None until ``for_training``: a direction that only ever runs inference forwards has none.
    gx is None until ``for_training`` or ``for_inference`` (which may give gx_ring instead).
    """

    gx: object
    gh: object
    w_hh_t: object
    w_ih_t: object
    h: object
    c: object
    gates: object
    step_gates: object
    dgates: object
    dh: object
    dc: object
    table: object = None
    dtable: object = None
    c_step: object = None
    sync: object = None
    gx_ring: object = None
    span_lengths: object = None
    span_starts: object = None
    ring_spans: list = None
    cell: str = None
    h_cell: object = None
    h_cell_step: object = None
    y_cell: object = None
    hp: object = None
    dproj: object = None
    dh_cell: object = None

    @classmethod
    def allocate(cls, xp, cell, T, B, I, H, dtype, vocab=None, P=0):
        """What any forward needs but the input projection's room; ``for_inference`` adds
        that, ``for_training`` that and what a backward needs. P: the LSTM's projection size."""
        G, S = GATE_BLOCKS[cell], SAVED_BLOCKS[cell]
        H_out = P or H
        step = xp.empty((1, B, S * H), dtype) if S else None
        c_step = _every_step(xp, xp.empty((1, B, H), dtype), T + 1) if cell == "lstm" else None
        h_cell_step = _every_step(xp, xp.empty((1, B, H), dtype), T + 1) if P else None
        return cls(
            gx=None,
            gh=xp.empty((B, G * H), dtype),
            w_hh_t=xp.empty((H_out, G * H), dtype),
            w_ih_t=None if vocab else xp.empty((I, G * H), dtype),
            h=xp.empty((T + 1, B, H_out), dtype),
            c=c_step,
            gates=None,
            step_gates=None if step is None else _every_step(xp, step, T),
            dgates=None, dh=None, dc=None,
            table=xp.empty((vocab, G * H), dtype) if vocab else None,
            c_step=c_step,
            sync=xp.zeros(1 + B, xp.int32),
            cell=cell,
            h_cell=h_cell_step,
            h_cell_step=h_cell_step,
            y_cell=_every_step(xp, xp.empty((1, B, H), dtype), T) if P else None,
            hp=xp.empty((B, P), dtype) if P else None,
        )

    def for_inference(self, xp, spans):
        """Allocate, once, where an inference forward cut into ``spans`` writes its input
        projections: a ring of RING_SLOTS span-long slots where there are more spans
        than slots (not for an embedded input, projected as one span), else gx. A
        direction a training forward has run keeps using its gx."""
        if self.gx is not None or self.gx_ring is not None:
            return
        T, B, H = self.h.shape[0] - 1, self.h.shape[1], self.hidden_size
        width = GATE_BLOCKS[self.cell] * H
        if len(spans) <= RING_SLOTS or self.table is not None:
            self.gx = xp.empty((T, B, width), self.h.dtype)
            return
        self.ring_spans = sorted(spans)
        rows = max(stop - start for start, stop in spans)
        self.gx_ring = xp.empty((RING_SLOTS * rows, B, width), self.h.dtype)
        self.span_lengths = xp.empty((len(spans), B), xp.int32)
        self.span_starts = xp.array([[start] for start, _ in self.ring_spans], dtype=xp.int32)

    def for_training(self, xp):
        """Allocate, once, the input projection (if ``for_inference`` gave it a ring, it
        keeps that for inference forwards; a GRU's own 3H-wide gx gives way to the first
        3H columns of its gates' rows), the saved activations and the gradient buffers."""
        if self.dh is not None:
            return
        T, B, H = self.h.shape[0] - 1, self.h.shape[1], self.hidden_size
        dtype, G, S = self.h.dtype, GATE_BLOCKS[self.cell], SAVED_BLOCKS[self.cell]
        if self.cell == "lstm":
            self.c = xp.empty((T + 1, B, H), dtype)  # backward reads every cell state
        if self.hp is not None:  # ... and the dW_hr GEMM every unprojected output
            self.h_cell = xp.empty((T + 1, B, H), dtype)
            self.dproj = xp.empty((T, B, self.hp.shape[1]), dtype)
            self.dh_cell = xp.empty((B, H), dtype)
        if S and SHARE_PROJECTION_STORAGE:
            if self.gx is not None and self.gx.shape[2] != S * H:
                self.gx = None  # an inference forward's GRU projection, 3H wide: its place moves into 4H rows
            self.gates = self.gx if self.gx is not None else xp.empty((T, B, S * H), dtype)
            self.gx = self.gates if G == S else self.gates[:, :, :G * H]  # the GRU's: 3H of each 4H row
        else:
            if self.gx is None:
                self.gx = xp.empty((T, B, G * H), dtype)
            self.gates = xp.empty((T, B, S * H), dtype) if S else None
        if SHARE_PROJECTION_STORAGE:
            self.dgates = self.gx if self.gates is None else self.gates
        else:
            self.dgates = xp.empty((T, B, max(G, S) * H), dtype)
        self.dh = xp.empty((B, self.h.shape[2]), dtype)
        self.dc = xp.empty((B, H), dtype) if self.cell == "lstm" else None
        self.dtable = None if self.table is None else xp.empty_like(self.table)

    @property
    def hidden_size(self):
        """H, the cell's width (the states h are H_out wide)."""
        return self.gh.shape[1] // GATE_BLOCKS[self.cell]

    @property
    def dgh(self):
        """[T, B, G*H] the recurrent projection's gradient: dgates, or the first 3H columns
        of the GRU's (dr, dz, dn r), which GEMMs read with its rows' stride."""
        if self.dgates is None or self.cell != "gru":
            return self.dgates
        return self.dgates[:, :, :3 * self.h.shape[2]]

    def dgx_blocks(self):
        """The input projection's gradient as [(columns of dgates [T, B, k*H], the rows of
        W_ih and b_ih they go with)]: dgates whole, or the GRU's r and z blocks and its
        last block, dn (dn r, the recurrent side's, lies between them)."""
        if self.cell != "gru":
            return [(self.dgates, slice(None))]
        H = self.h.shape[2]
        return [(self.dgates[:, :, :2 * H], slice(0, 2 * H)), (self.dgates[:, :, 3 * H:], slice(2 * H, 3 * H))]


def _every_step(xp, block, steps):
    """``block`` [1, ...] seen at each of ``steps`` indices: a view with time stride 0."""
    return xp.lib.stride_tricks.as_strided(block, shape=(steps, *block.shape[1:]), strides=(0, *block.strides[1:]))


@dataclass
class Embedded:
    """A first layer's input given as embedding rows: x[t, b] = weight[ids[t, b]].

    ids: [T, B] int32, each in [0, V)   weight: [V, I]
    dweight: [V, I]   accumulates the gradient of the embedding
    onehot: [T*B, V]  room for the ids' one-hot, written by backward
    """

    ids: object
    weight: object
    dweight: object
    onehot: object


def time_spans(ops, T, B, gates_width, reverse):
    """The spans of time covering [0, T), in processing order, that the backend cuts
    a layer's work into (``ops.input_spans``: one on NumPy, a few on CUDA)."""
    n = max(1, min(ops.input_spans(B, gates_width), T))
    edges = [T * k // n for k in range(n + 1)]
    spans = list(zip(edges[:-1], edges[1:]))
    return spans[::-1] if reverse else spans


def drain(steps):
    """Run a span-by-span generator (``forward_spans``, ``backward_spans``) to its end."""
    for _ in steps:
        pass


def forward(ops, cell, nonlinearity, x, w_ih, w_hh, b_ih, b_hh, lengths, reverse, ws, y, keep=True):
    """Run one direction of one layer over the whole sequence.

    x: [T, B, I], or Embedded   w_ih: [G*H, I]   w_hh: [G*H, H]   b_ih, b_hh: [G*H]
    lengths: [B] int32   reverse: 0 or 1
    ws: Direction with the initial state(s) already in place
    y: [T, B, H] output (a view into the layer output [T, B, D*H])
    keep: save every step's activations in ws.gates for backward; if False (an
          inference forward, as cuDNN's) they all land in one cache-resident block
    """
    drain(forward_spans(ops, cell, nonlinearity, x, w_ih, w_hh, b_ih, b_hh, lengths, reverse, ws, y, keep))


def forward_spans(ops, cell, nonlinearity, x, w_ih, w_hh, b_ih, b_hh, lengths, reverse, ws, y, keep,
                  spans=None, inputs_ready=None, label=None, w_hr=None):
    """``forward`` span of time by span, as a generator, for schedules that
    interleave layers: the first ``next`` sets up; each further one issues one
    span's input projection and time steps and returns a mark of the point where
    that span's outputs are written.

    spans: [(start, stop)] covering [0, T) in processing order (backwards for
           reverse); None: the spans the backend overlaps input projections over
    inputs_ready: None (x is written), or a list whose k-th entry, filled in by the
                  caller before span k's turn, marks where span k's rows of x are written
    label: how the NVTX ranges (and gpurnn.profile) name this layer and direction
    w_hr: [P, H] the LSTM's projection (then w_hh is [G*H, P] and y [T, B, P]), or None

    An inference forward (keep False) over a direction with a gx_ring writes span k's
    projection into slot k % RING_SLOTS, once span k-RING_SLOTS's steps are done, and
    runs the span's steps on a view of the direction whose rows count from its start.
    """
    T, B = ws.h.shape[0] - 1, ws.h.shape[1]
    label = label or f"{cell} {'rev' if reverse else 'fwd'}"
    embedded = isinstance(x, Embedded)
    if spans is None:
        spans = [(0, T)] if embedded else time_spans(ops, T, B, w_ih.shape[0], reverse)
    gates = ws.gates if keep else ws.step_gates
    ring = None if keep else ws.gx_ring
    if ring is not None:
        if sorted(spans) != ws.ring_spans:
            raise RuntimeError(f"inference forward: spans of time {sorted(spans)}, but its workspace's ring of "
                               f"input projections was allocated for {ws.ring_spans}")
        slot_rows = ring.shape[0] // RING_SLOTS
        ws.span_lengths[...] = lengths  # steps in a slot count from their span's start: their lengths too
        ws.span_lengths -= ws.span_starts
    algorithm = ops.algorithm
    if algorithm == "graph":
        w_rec, trans = ops.recurrent_operand(w_hh, ws.w_hh_t, B, T)  # W_hh as is, or W_hh^T when that GEMM is faster
    elif algorithm == "fused":
        ops.fused_weights(w_hh, ws.w_hh_t)  # as the fused steps read it (optimizers update W_hh in place: every call)
    if embedded:
        ops.gemm(x.weight, w_ih, ws.table, trans_b=True)  # every row's input projection is a row of this
    else:
        w_in, trans_in = ops.input_operand(w_ih, ws.w_ih_t, (T // len(spans)) * B)  # as is, or W_ih^T
    set_up = ops.mark()  # the weight copies, the table and the spans' lengths are written
    yield
    steps_done = []  # [k]: where span k's steps are done
    for k, (start, stop) in enumerate(spans):
        if ring is None:
            d, t0, gx_rows, free = ws, 0, ws.gx[start:stop], None
            span_gates, span_y, span_lengths = gates, y, lengths
        else:  # the span's own view of the direction: its rows of every buffer, counted from start
            slot = (k % RING_SLOTS) * slot_rows
            gx_rows = ring[slot:slot + stop - start]
            free = steps_done[k - RING_SLOTS] if k >= RING_SLOTS else None  # the slot's last reader is done
            d = replace(ws, gx=gx_rows, h=ws.h[start:stop + 1], c=None if ws.c is None else ws.c[start:stop + 1],
                        h_cell=None if ws.h_cell is None else ws.h_cell[start:stop + 1],
                        y_cell=None if ws.y_cell is None else ws.y_cell[start:stop])
            t0, span_y, span_lengths = start, y[start:stop], ws.span_lengths[ws.ring_spans.index((start, stop))]
            span_gates = None if gates is None else gates[start:stop]
        # forward pass: the input projection of the span's rows ...
        gx = gx_rows.reshape((stop - start) * B, -1)
        if embedded:
            with ops.annotate(f"{label} input [{start}:{stop})", "input"):
                ops.gather_rows(ws.table, x.ids[start:stop].reshape(-1), gx)
        else:  # ... on the side stream where there is one, overlapping the steps of the spans before
            with ops.side_stream(set_up, None if inputs_ready is None else inputs_ready[k], free):
                with ops.annotate(f"{label} input [{start}:{stop})", "input"):
                    ops.gemm(x[start:stop].reshape((stop - start) * B, -1), w_in, gx, trans_b=trans_in)
                projected = ops.mark()
            ops.wait(projected)
        # ... then its steps: all in one launch (persistent), one launch each (fused),
        # or each a GEMM and a pointwise launch (graph)
        with ops.annotate(f"{label} steps [{start}:{stop}) {algorithm}", "steps"):
            if algorithm == "persistent":
                ops.persistent_forward(cell, nonlinearity, (start - t0, stop - t0), reverse, d, w_hh, b_ih, b_hh,
                                       span_gates, span_y, span_lengths)
            else:
                for t in (range(stop - 1, start - 1, -1) if reverse else range(start, stop)):
                    if algorithm == "fused":
                        ops.fused_forward(cell, nonlinearity, t - t0, reverse, d, b_ih, b_hh, span_gates, span_y,
                                          span_lengths)
                    else:
                        forward_step(ops, cell, nonlinearity, t - t0, reverse, d, w_rec, trans, b_ih, b_hh,
                                     span_gates, span_y, span_lengths, w_hr)
        steps_done.append(ops.mark())
        yield steps_done[-1]


def forward_step(ops, cell, nonlinearity, t, reverse, ws, w_rec, trans, b_ih, b_hh, gates, y, lengths, w_hr=None):
    """One forward step of the "graph" algorithm: the recurrent GEMM, then the fused pointwise
    step (with a projection w_hr, then the projection's GEMM and its step)."""
    ops.gemm(ws.h[t + reverse], w_rec, ws.gh, trans_b=trans)  # only this GEMM is recurrent
    if cell == "rnn":
        ops.rnn_forward(t, reverse, ws.gx, ws.gh, b_ih, b_hh, ws.h, y, lengths, nonlinearity)
    elif w_hr is not None:  # the cell's output o * tanh(c), projected, is the state
        ops.lstm_forward(t, reverse, ws.gx, ws.gh, b_ih, b_hh, ws.h_cell, ws.c, gates, ws.y_cell, lengths)
        ops.gemm(ws.h_cell[t + 1 - reverse], w_hr, ws.hp, trans_b=True)
        ops.project_forward(t, reverse, ws.hp, ws.h, y, lengths)
    elif cell == "lstm":
        ops.lstm_forward(t, reverse, ws.gx, ws.gh, b_ih, b_hh, ws.h, ws.c, gates, y, lengths)
    else:
        ops.gru_forward(t, reverse, ws.gx, ws.gh, b_ih, b_hh, ws.h, gates, y, lengths)


def backward_step(ops, cell, nonlinearity, t, reverse, ws, dy, w_hh, lengths, w_hr=None):
    """One BPTT step: the fused pointwise backward, then dh_prev += dgates_t W_hh (with a
    projection w_hr, first the projection's step and the gradient through W_hr)."""
    if cell == "rnn":
        ops.rnn_backward(t, reverse, ws.h, dy, ws.dh, ws.dgates, lengths, nonlinearity)
    elif w_hr is not None:
        ops.project_backward(t, reverse, dy, ws.dh, ws.dproj, lengths)
        ops.gemm(ws.dproj[t], w_hr, ws.y_cell[t])  # backprop through the projection
        ops.lstm_backward(t, reverse, ws.c, ws.gates, ws.y_cell, ws.dh_cell, ws.dc, ws.dgates, lengths)
    elif cell == "lstm":
        ops.lstm_backward(t, reverse, ws.c, ws.gates, dy, ws.dh, ws.dc, ws.dgates, lengths)
    else:
        ops.gru_backward(t, reverse, ws.h, ws.gates, dy, ws.dh, ws.dgates, lengths)
    ops.gemm(ws.dgh[t], w_hh, ws.dh, beta=1.0)


def backward(ops, cell, nonlinearity, x, w_ih, w_hh, lengths, reverse, ws, dy, ones,
             dw_ih, dw_hh, db_ih, db_hh, recorder=None):
    """BPTT through one direction of one layer, after ``forward`` on the same ws;
    ``backward_input`` then writes this direction's part of the input's gradient.

    dy: [T, B, H]  gradient of this direction's outputs (a view)
    ws.dh (ws.dc): [B, H] in: gradient of the final state; out: of the initial state
    ones: [1, T*B] ones, to sum the bias gradients as a GEMM
    dw_ih: [G*H, I]  dw_hh: [G*H, H]  db_ih, db_hh: [G*H]   accumulate
    x.onehot, when x is Embedded, must hold the ids' one-hot
    recorder: None, or gpurnn.diagnostics' recorder, shown each step before it runs
    """
    drain(backward_spans(ops, cell, nonlinearity, x, w_ih, w_hh, lengths, reverse, ws, dy, ones,
                         dw_ih, dw_hh, db_ih, db_hh, recorder=recorder))


def backward_spans(ops, cell, nonlinearity, x, w_ih, w_hh, lengths, reverse, ws, dy, ones,
                   dw_ih, dw_hh, db_ih, db_hh, spans=None, dy_ready=None, d_in=None, recorder=None, label=None,
                   w_hr=None, dw_hr=None):
    """``backward`` span of time by span, as a generator (see ``forward_spans``):
    each ``next`` issues one span's BPTT steps and returns a mark of where they are
    done; the weight gradients follow the last span.

    spans: [(start, stop)] covering [0, T) in BPTT's order (the forward's reversed);
           None: the whole sequence at once
    dy_ready: None (dy is written), or a list whose k-th entry, filled in by the
              caller before span k's turn, marks where span k's rows of dy are written
    d_in: None, or [T, B, I]: each span then writes its rows of the input's gradient
          (what ``backward_input`` writes for the whole sequence), after its steps
          have read dy's rows (so d_in may be dy's storage)
    w_hr: [P, H] the LSTM's projection, or None   dw_hr: [P, H] its gradient: accumulates
    """
    T, B = ws.gx.shape[:2]
    label = label or f"{cell} {'rev' if reverse else 'fwd'}"
    dgx_blocks = [(dgx.reshape(T * B, -1), gate_rows) for dgx, gate_rows in ws.dgx_blocks()]
    dgh = ws.dgh.reshape(T * B, -1)
    algorithm = "graph" if recorder is not None else ops.algorithm  # a recorder reads dh between GEMM and kernel
    for k, (start, stop) in enumerate(spans or [(0, T)]):
        if dy_ready is not None:
            ops.wait(dy_ready[k])
        # backward pass: steps in the opposite order of the forward
        with ops.annotate(f"{label} backward steps [{start}:{stop}) {algorithm}", "steps"):
            if algorithm == "persistent":
                ops.persistent_backward(cell, nonlinearity, (start, stop), k == 0, reverse, ws, dy, w_hh, lengths)
            else:
                for t in (range(start, stop) if reverse else range(stop - 1, start - 1, -1)):
                    if recorder is not None:
                        recorder.observe(t, ws, dy)
                    if algorithm == "fused":  # the recurrent gradient of the step before, inside this step's launch
                        ops.fused_backward(cell, nonlinearity, t, t != (0 if reverse else T - 1), reverse, ws, dy,
                                           w_hh, lengths)
                    else:
                        backward_step(ops, cell, nonlinearity, t, reverse, ws, dy, w_hh, lengths, w_hr)
        if d_in is not None:
            rows = slice(start * B, stop * B)
            with ops.annotate(f"{label} backward input gradient [{start}:{stop})", "weights"):
                _input_gradient(ops, [(dgx[rows], gate_rows) for dgx, gate_rows in dgx_blocks], w_ih,
                                d_in.reshape(T * B, -1)[rows], accumulate=False)
        yield ops.mark()
    with ops.annotate(f"{label} backward weights", "weights"):
        if algorithm != "graph":  # the last step's dgates reach the initial state through W_hh
            ops.gemm(ws.dgh[T - 1 if reverse else 0], w_hh, ws.dh, beta=1.0)
        # weight gradients: single GEMMs over all T*B rows
        h_prev = ws.h[1:] if reverse else ws.h[:-1]  # the state each step read
        ops.gemm(dgh, h_prev.reshape(T * B, -1), dw_hh, trans_a=True, beta=1.0)
        if w_hr is not None:  # each step's projection read the output its cell wrote
            h_cell = ws.h_cell[:-1] if reverse else ws.h_cell[1:]
            ops.gemm(ws.dproj.reshape(T * B, -1), h_cell.reshape(T * B, -1), dw_hr, trans_a=True, beta=1.0)
        if cell != "gru":  # one gradient for both biases (RNN, LSTM): one pass over it
            db = ws.gh[:1]  # the forward's step scratch, free in backward
            ops.gemm(ones, dgh, db)
            db_ih += db[0]
            db_hh += db[0]
        else:
            ops.gemm(ones, dgh, db_hh.reshape(1, -1), beta=1.0)
            for dgx, gate_rows in dgx_blocks:
                ops.gemm(ones, dgx, db_ih[gate_rows].reshape(1, -1), beta=1.0)
        if isinstance(x, Embedded):
            for dgx, gate_rows in dgx_blocks:  # dgx summed over the rows of each symbol
                ops.gemm(x.onehot, dgx, ws.dtable[:, gate_rows], trans_a=True)
            ops.gemm(ws.dtable, x.weight, dw_ih, trans_a=True, beta=1.0)
        else:
            for dgx, gate_rows in dgx_blocks:
                ops.gemm(dgx, x.reshape(T * B, -1), dw_ih[gate_rows], trans_a=True, beta=1.0)


def backward_input(ops, x, w_ih, ws, dx, accumulate):
    """Write (or, ``accumulate``, add) one direction's part of the input's gradient,
    after its ``backward``. Kept apart so that two directions' BPTT may run at the
    same time while their parts of the shared gradient are written one after the other.

    dx: [T, B, I] the gradient of x (None when x is Embedded: x.dweight accumulates
    instead, from ws.dtable, whatever ``accumulate`` says)
    """
    with ops.annotate("backward input gradient", "weights"):
        if isinstance(x, Embedded):
            ops.gemm(ws.dtable, w_ih, x.dweight, beta=1.0)  # backprop into the embedding rows
        else:
            T, B = ws.gx.shape[:2]
            _input_gradient(ops, [(dgx.reshape(T * B, -1), gate_rows) for dgx, gate_rows in ws.dgx_blocks()],
                            w_ih, dx.reshape(T * B, -1), accumulate)


def _input_gradient(ops, dgx_blocks, w_ih, out, accumulate):
    """Write (or, ``accumulate``, add) out = dgx W_ih, from dgx's blocks as rows [N, k*H]
    with the rows of W_ih each goes with (``Direction.dgx_blocks``): the GRU's two sum."""
    for k, (dgx, gate_rows) in enumerate(dgx_blocks):
        ops.gemm(dgx, w_ih[gate_rows], out, beta=1.0 if accumulate or k else 0.0)
