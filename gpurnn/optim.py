"""Optimizers and gradient clipping, step for step as torch.optim computes them.

    opt = gpurnn.optim.Adam(model.params, model.grads, lr=1e-3)
    norm = gpurnn.optim.clip_grad_norm(model.grads, max_norm=5.0)
    opt.step(); model.zero_grad()

``params`` and ``grads`` are dicts of arrays with the same keys; parameters
are updated in place (a captured CUDA graph keeps pointing at them). State
round-trips through ``state_dict()`` / ``load_state_dict()`` as NumPy arrays.
When the parameters and the gradients are each views of one buffer (a model's,
gpurnn.flat), the optimizer keeps its state the same way and updates, clips
and measures the buffers whole: one operation, not one per parameter.
"""

import math
import numbers

import numpy as np

from gpurnn import checks, flat
from gpurnn.backend import array_module, ops_for, to_host


class Optimizer:
    _state_names = ()

    def __init__(self, params, grads, lr):
        checks.named_arrays("params", params)
        checks.named_arrays("grads", grads)
        if set(params) != set(grads):
            raise ValueError(f"grads: expected the keys of params, got missing {sorted(set(params) - set(grads))}, "
                             f"unexpected {sorted(set(grads) - set(params))}")
        self.params, self.grads = params, grads
        self.lr = checks.positive_number("lr", lr)
        self.steps = 0
        self._flat = _flat_pair(params, grads)
        if self._flat:  # the state as views of buffers laid out like the parameters'
            buffers = [array_module(self._flat[0]).zeros_like(self._flat[0]) for _ in self._state_names]
            self._flat += tuple(buffers)
            self.state = {s: flat.views_of(b, params) for s, b in zip(self._state_names, buffers)}
        else:
            self.state = {s: {n: array_module(p).zeros_like(p) for n, p in params.items()}
                          for s in self._state_names}

    def step(self):
        self.steps += 1
        ops = ops_for(next(iter(self.params.values())))
        with ops.on_stream():  # the CUDA backend's kernels run in order with the caller's work
            if self._flat:
                self._update(ops, *self._flat)
                return
            for name, p in self.params.items():
                self._update(ops, p, self.grads[name], *(self.state[s][name] for s in self._state_names))

    def state_dict(self):
        return {"steps": self.steps,
                **{f"{s}/{n}": np.array(to_host(a)) for s, d in self.state.items() for n, a in d.items()}}

    def load_state_dict(self, state):
        expected = {f"{s}/{n}" for s in self.state for n in self.params}
        got = {k for k in state if k != "steps"}
        if got != expected or "steps" not in state:
            raise ValueError(f"optimizer state: keys do not match: missing {sorted(expected - got)}, "
                             f"unexpected {sorted(got - expected)}")
        for s, d in self.state.items():
            for n, a in d.items():
                value = state[f"{s}/{n}"]
                if tuple(value.shape) != tuple(a.shape):
                    raise ValueError(f"optimizer state {s}/{n}: expected shape {tuple(a.shape)}, "
                                     f"got {tuple(value.shape)}")
                a[...] = array_module(a).asarray(value)
        self.steps = int(state["steps"])


class SGD(Optimizer):
    """buf = momentum * buf + g (buf = g at the first step); p -= lr * buf."""

    _state_names = ("momentum_buffer",)

    def __init__(self, params, grads, lr, momentum=0.0):
        super().__init__(params, grads, lr)
        self.momentum = checks.positive_number("momentum", momentum, allow_zero=True)

    def _update(self, ops, p, g, buf):
        if self.momentum:
            if self.steps == 1:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            g = buf
        p -= self.lr * g


class Adagrad(Optimizer):
    """sum += g^2; p -= lr * g / (sqrt(sum) + eps)."""

    _state_names = ("sum",)

    def __init__(self, params, grads, lr=1e-2, eps=1e-10):
        super().__init__(params, grads, lr)
        self.eps = checks.positive_number("eps", eps)

    def _update(self, ops, p, g, acc):
        acc += g * g
        p -= self.lr * g / (array_module(acc).sqrt(acc) + self.eps)


class Adam(Optimizer):
    """m, v: running moments of g and g^2, bias-corrected; p -= lr m_hat / (sqrt(v_hat) + eps)."""

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, grads, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
                isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = checks.positive_number("eps", eps)

    def _update(self, ops, p, g, m, v):
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1 ** self.steps)
        bias2_sqrt = math.sqrt(1 - b2 ** self.steps)
        if isinstance(p, np.ndarray):
            adam_update(p, g, m, v, step_size, b1, b2, self.eps, bias2_sqrt)
        else:  # one fused kernel per parameter instead of a dozen array operations
            ops.adam_update(p, g, m, v, step_size, b1, b2, self.eps, bias2_sqrt)


def adam_update(p, g, m, v, step_size, beta1, beta2, eps, bias2_sqrt):
    """One Adam step in place (the spec of the CUDA kernel of the same name):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= step_size m / (sqrt(v) / bias2_sqrt + eps)
    with step_size = lr / (1 - b1^t) and bias2_sqrt = sqrt(1 - b2^t), as torch.optim.Adam."""
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    denom = np.sqrt(v)  # one scratch array, updated in place: a few passes over memory, not a dozen
    denom /= bias2_sqrt
    denom += eps
    np.divide(m, denom, out=denom)
    denom *= step_size
    p -= denom


OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam}


def _flat_pair(params, grads):
    """(parameter buffer, gradient buffer) when both dicts are packed views with
    one layout (gpurnn.flat), else None."""
    same_layout = list(params) == list(grads) and all(params[n].shape == grads[n].shape for n in params)
    p_buf, g_buf = flat.buffer_of(params), flat.buffer_of(grads)
    return (p_buf, g_buf) if same_layout and p_buf is not None and g_buf is not None else None


def _arrays(grads):
    """The arrays to work on: the one buffer packed gradients are views of, or each gradient."""
    buffer = flat.buffer_of(checks.named_arrays("grads", grads))
    return list(grads.values()) if buffer is None else [buffer]


def _sum_of_squares(arrays):
    """Every element of the arrays squared, summed: a NumPy scalar, or a 0-d device array (no sync)."""
    return sum((g * g).sum() for g in arrays)


def global_norm(grads):
    """sqrt of the sum of every gradient element squared, as a float (one device sync on a GPU)."""
    return math.sqrt(float(_sum_of_squares(_arrays(grads))))


def clip_grad_norm(grads, max_norm, norm=None):
    """Scale all gradients by max_norm / (norm + 1e-6) when that is below 1 (as torch).

    norm: their global norm, if the caller has read it already (a training loop
    that checks it for NaN), so it is not computed twice.
    Returns the norm before clipping: a float on the NumPy backend or when given;
    otherwise, on the CUDA backend, a 0-d device array: the norm and the scaling
    stay on the GPU and nothing waits for it (torch returns a tensor likewise).
    """
    max_norm = checks.positive_number("max_norm", max_norm)
    arrays = _arrays(grads)
    if norm is None:
        total = _sum_of_squares(arrays)
        if not isinstance(total, (int, float, np.generic)):  # on the GPU: clip without reading the norm
            xp = array_module(total)
            norm = xp.sqrt(total)
            coef = xp.minimum(max_norm / (norm + 1e-6), 1.0)  # 1: unchanged, exactly
            for g in arrays:
                g *= coef
            return norm
        norm = math.sqrt(float(total))
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for g in arrays:
            g *= coef
    return norm


def clip_grad_value(grads, threshold, norm=None):
    """Clamp every gradient element to [-threshold, threshold]. Returns the norm
    before clipping (``norm`` if given, else computed: one device sync on a GPU)."""
    threshold = checks.positive_number("threshold", threshold)
    arrays = _arrays(grads)
    norm = math.sqrt(float(_sum_of_squares(arrays))) if norm is None else norm
    for g in arrays:
        array_module(g).clip(g, -threshold, threshold, out=g)
    return norm
