"""Whole models: embedding -> recurrent stack -> linear -> loss, and a sequence regressor.

    lm = gpurnn.CharLM(vocab_size, hidden_size, num_layers, cell="lstm")
    loss, state = lm.forward(inputs, targets, state)   # inputs, targets: [T, B] int; loss: see below
    lm.backward()                                      # grads accumulate in lm.grads
    logits, state = lm.predict(inputs, state)          # no cache, no loss

``state`` is the recurrent state to start from (None: zeros) and the one the
chunk ended in, detached: truncated BPTT carries it to the next chunk without
back-propagating into it. ``loss`` is a float on the NumPy backend and a 0-d
device array on the CUDA backend (``float(loss)`` waits for the GPU).
"""

import numpy as np

from gpurnn import checks, flat, memory, nn
from gpurnn.layers import GRU, LSTM, RNN

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def _make_rnn(cell, input_size, hidden_size, num_layers, dropout, dtype, seed, backend, nonlinearity, proj_size):
    checks.choice("cell", cell, tuple(CELLS))
    if cell != "rnn" and nonlinearity != "tanh":  # the LSTM's and GRU's activations are fixed: say so, not ignore it
        raise ValueError(f"nonlinearity: only cell='rnn' takes one, got {nonlinearity!r} with cell={cell!r}")
    if cell != "lstm" and proj_size != 0:  # torch.nn.RNN and GRU have no projection either
        raise ValueError(f"proj_size: only cell='lstm' takes one, got proj_size={proj_size!r} with cell={cell!r}")
    kwargs = dict(num_layers=num_layers, dropout=dropout, dtype=dtype, seed=seed, backend=backend)
    if cell == "rnn":
        kwargs["nonlinearity"] = nonlinearity
    if cell == "lstm":
        kwargs["proj_size"] = proj_size
    return CELLS[cell](input_size, hidden_size, **kwargs)


def _seeds(seed, n):
    """n independent integer seeds derived from one (None stays random)."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(checks.seed("seed", seed)).spawn(n)]


class _Composite:
    """Parameters of the parts under prefixed names: embedding.weight, rnn.weight_ih_l0, head.weight, ...

    All parameters are views of one buffer, and all gradients of another
    (gpurnn.flat), so optimizers, gradient norms, clipping and ``zero_grad``
    each work on a single array.
    """

    def _collect(self, parts):
        self.params, self.grads = {}, {}
        for prefix, part in parts.items():
            for name in part.params:
                self.params[f"{prefix}.{name}"] = part.params[name]
                self.grads[f"{prefix}.{name}"] = part.grads[name]
        self._parts = parts
        _, self.params = flat.pack(self.params)
        self._grad_buffer, self.grads = flat.pack(self.grads)
        for key in self.params:
            prefix, name = key.split(".", 1)
            parts[prefix]._rebind(name, self.params[key], self.grads[key])

    def parameters(self):
        return list(self.params.items())

    def zero_grad(self):
        self._grad_buffer[...] = 0

    def memory_report(self):
        """The buffers this model's parameters, gradients and recurrent layers hold (gpurnn.memory)."""
        return memory.report(self)

    def clear_cache(self):
        """Drop the recurrent layers' per-shape buffers and graphs (see gpurnn.RNN.clear_cache)."""
        for part in self._parts.values():
            if hasattr(part, "clear_cache"):
                part.clear_cache()

    def train(self, mode=True):
        self.rnn.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        return {n: p.copy() for n, p in self.params.items()}

    def load_state_dict(self, state):
        checks.state_keys(state, self.params)
        for prefix, part in self._parts.items():
            part.load_state_dict({n: state[f"{prefix}.{n}"] for n in part.params})


class CharLM(_Composite):
    """Embedding [V, E] -> RNN/LSTM/GRU stack -> Linear [H -> V] -> softmax cross-entropy
    (mean over counted positions; ``ignore_index`` targets are not counted). An LSTM with
    ``proj_size`` P > 0 (torch's projection) gives the head P features instead of H.

    fold_embedding: run the embedding inside the first layer's input projection
    (gpurnn.sequence's ``Embedded``; the same function, fewer FLOPs). None: fold
    when V <= E, where the folded backward's one-hot GEMM (2 V N 4H FLOPs for N
    tokens) costs at most a third of the three [N, E] x [E, 4H] GEMMs it replaces.
    """

    def __init__(self, vocab_size, hidden_size, num_layers=1, cell="lstm", embedding_dim=None, dropout=0.0,
                 nonlinearity="tanh", ignore_index=None, dtype="float32", seed=None, backend=None,
                 fold_embedding=None, proj_size=0):
        self.vocab_size = checks.positive_int("vocab_size", vocab_size)
        checks.positive_int("hidden_size", hidden_size)
        embedding_dim = hidden_size if embedding_dim is None else checks.positive_int("embedding_dim", embedding_dim)
        if fold_embedding is not None:
            checks.flag("fold_embedding", fold_embedding)
        self.fold_embedding = vocab_size <= embedding_dim if fold_embedding is None else fold_embedding
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, cell=cell,
                           embedding_dim=embedding_dim, dropout=dropout, nonlinearity=nonlinearity,
                           proj_size=proj_size)
        seeds = _seeds(seed, 3)
        self.rnn = _make_rnn(cell, embedding_dim, hidden_size, num_layers, dropout, dtype, seeds[1], backend,
                             nonlinearity, proj_size)
        self.embedding = nn.Embedding(vocab_size, embedding_dim, dtype, seeds[0], backend)
        self.head = nn.Linear(self.rnn.proj_size or hidden_size, vocab_size, dtype=dtype, seed=seeds[2],
                              backend=backend)
        self.loss_fn = nn.SoftmaxCrossEntropy("mean", ignore_index)
        self.backend = self.rnn.backend
        self._collect({"embedding": self.embedding, "rnn": self.rnn, "head": self.head})

    def _recurrent(self, inputs, state):
        """The stack's output [T, B, H or P] and final state for ids [T, B]."""
        shape = inputs.shape if hasattr(inputs, "shape") else np.shape(inputs)
        if len(shape) != 2:
            raise ValueError(f"inputs: expected ids of shape [T, B], got shape {tuple(shape)}")
        if self.fold_embedding:
            weight, dweight = self.embedding.params["weight"], self.embedding.grads["weight"]
            return self.rnn._call_embedded(self.embedding.check_ids(inputs), weight, dweight, state)
        return self.rnn(self.embedding(inputs), state)

    def predict(self, inputs, state=None):
        """logits [T, B, V] and the final state, in eval mode (no cache)."""
        training = self.rnn.training
        self.rnn.eval()
        try:
            out, state = self._recurrent(inputs, state)
            logits = self.head(out)
        finally:
            self.rnn.train(training)
            self.embedding._cache = self.head._cache = None
        return logits, state

    def evaluate(self, inputs, targets, state=None):
        """(mean cross-entropy, logits [T, B, V], final state) in eval mode: no
        dropout, no cache kept for a backward (a held-out pass)."""
        logits, state = self.predict(inputs, state)
        loss = self.loss_fn(logits, targets)
        self.loss_fn._cache = None  # the gradient it computed alongside is not wanted
        return loss, logits, state

    def forward(self, inputs, targets, state=None):
        """Mean cross-entropy of the next-symbol predictions, and the final state."""
        out, state = self._recurrent(inputs, state)
        loss = self.loss_fn(self.head(out), targets)
        return loss, state

    __call__ = forward

    def backward(self, loss_scale=1.0):
        """Gradients of the last forward's loss (times loss_scale, gpurnn.amp's) into self.grads."""
        d_logits = self.loss_fn.backward(loss_scale)
        d_out = self.head.backward(d_logits)
        dx = self.rnn.backward(d_out)[0]  # the incoming state is a constant: its gradient is dropped
        if not self.fold_embedding:  # folded, the stack's backward accumulated the embedding's gradient
            self.embedding.backward(dx)


class SequenceRegressor(_Composite):
    """inputs [T, B, I] -> recurrent stack -> linear on the last step's output -> MSE against [B, O]
    (an LSTM with ``proj_size`` P > 0 gives the head P features instead of H)."""

    def __init__(self, input_size, hidden_size, output_size=1, num_layers=1, cell="lstm", nonlinearity="tanh",
                 dtype="float32", seed=None, backend=None, dropout=0.0, proj_size=0):
        self.config = dict(input_size=input_size, hidden_size=hidden_size, output_size=output_size,
                           num_layers=num_layers, cell=cell, nonlinearity=nonlinearity, dropout=dropout,
                           proj_size=proj_size)
        seeds = _seeds(seed, 2)
        self.rnn = _make_rnn(cell, input_size, hidden_size, num_layers, dropout, dtype, seeds[0], backend,
                             nonlinearity, proj_size)
        self.head = nn.Linear(self.rnn.proj_size or hidden_size, output_size, dtype=dtype, seed=seeds[1],
                              backend=backend)
        self.loss_fn = nn.MSELoss()
        self.backend = self.rnn.backend
        self._collect({"rnn": self.rnn, "head": self.head})

    def predict(self, x):
        training = self.rnn.training
        self.rnn.eval()
        try:
            out, _ = self.rnn(x)
            return self.head(out[-1])
        finally:
            self.rnn.train(training)
            self.head._cache = None

    def forward(self, x, target, state=None):
        out, state = self.rnn(x, state)
        self._T = out.shape[0]
        return self.loss_fn(self.head(out[-1]), self.backend.ops.asarray(target, "target")), state

    __call__ = forward

    def backward(self, loss_scale=1.0):
        d_last = self.head.backward(self.loss_fn.backward(loss_scale))
        xp = self.backend.xp
        d_out = xp.zeros((self._T,) + tuple(d_last.shape), d_last.dtype)
        d_out[-1] = d_last  # only the last step feeds the head
        self.rnn.backward(d_out)
