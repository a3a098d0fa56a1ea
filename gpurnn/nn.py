"""The pieces around the recurrent stack: embedding, the output map, losses.

Each has ``forward`` (``__call__``) and ``backward``; parameter gradients
accumulate into ``.grads`` (same keys as ``.params``) until ``zero_grad``.
Arrays are the backend's (NumPy, or CuPy on the CUDA backend).

    Embedding:            ids [T, B] int        -> [T, B, E]
    Linear (o = V h + c): x [..., I]            -> [..., O]
    SoftmaxCrossEntropy:  logits [T, B, V], targets [T, B] -> scalar loss
    MSELoss:              pred [B, O], target [B, O]       -> scalar loss
"""

import numpy as np

from gpurnn import checks, precision
from gpurnn.backend import NumpyOps, array_module, get_backend, ops_for, to_host


class _Module:
    def __init__(self, backend):
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.params, self.grads = {}, {}
        self._cache = None

    def _param(self, name, value):
        self.params[name] = self.xp.asarray(value)
        self.grads[name] = self.xp.zeros_like(self.params[name])

    def _rebind(self, name, param, grad):
        """Hold ``param`` and ``grad`` (views of a model's flat buffers) as the
        parameter ``name`` and its gradient from now on."""
        self.params[name], self.grads[name] = param, grad

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def state_dict(self):
        return {n: p.copy() for n, p in self.params.items()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters in place, after checking every key and shape."""
        checks.state_shapes(state, self.params)
        for name, p in self.params.items():
            p[...] = self.backend.ops.asarray(state[name], f"state_dict[{name!r}]")

    def _take_cache(self, who):
        if self._cache is None:
            raise RuntimeError(f"{who}.backward: no forward pass to differentiate (or it was already used)")
        cache, self._cache = self._cache, None
        return cache


class Embedding(_Module):
    """weight: [num_embeddings, dim], initialised N(0, 1) like torch.nn.Embedding."""

    def __init__(self, num_embeddings, embedding_dim, dtype="float32", seed=None, backend=None):
        super().__init__(backend)
        self.num_embeddings = checks.positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = checks.positive_int("embedding_dim", embedding_dim)
        self.dtype = checks.float_dtype("dtype", dtype)
        rng = np.random.default_rng(seed)
        self._param("weight", rng.standard_normal((num_embeddings, embedding_dim)).astype(self.dtype))

    def __call__(self, ids):
        ids = self.check_ids(ids)
        self._cache = ids
        return self.params["weight"][ids]

    def check_ids(self, ids):
        """ids as this backend's array, after checking they are integers in
        [0, num_embeddings) (on the host when they come from it: no device sync)."""
        if not hasattr(ids, "__cuda_array_interface__"):
            ids = NumpyOps.asarray(ids, "ids")
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ids: expected an integer array, got dtype {ids.dtype}")
        lo, hi = _min_max(ids)
        if lo < 0 or hi >= self.num_embeddings:
            raise ValueError(f"ids: expected values in [0, {self.num_embeddings}), got values from {lo} to {hi}")
        return self.backend.ops.asarray(ids, "ids")

    def backward(self, d_out):
        ids = self._take_cache("Embedding")
        d_out = self.backend.ops.asarray(d_out, "d_out")  # host or device, as the forward's input
        # rows used several times receive the sum of their gradients
        self.backend.ops.scatter_add(self.grads["weight"], ids.reshape(-1),
                                     d_out.reshape(-1, self.embedding_dim))


class Linear(_Module):
    """o = x W^T + b. weight: [O, I], bias: [O], U(-1/sqrt(I), 1/sqrt(I)) like torch."""

    def __init__(self, in_features, out_features, bias=True, dtype="float32", seed=None, backend=None):
        super().__init__(backend)
        self.in_features = checks.positive_int("in_features", in_features)
        self.out_features = checks.positive_int("out_features", out_features)
        self.dtype = checks.float_dtype("dtype", dtype)
        rng = np.random.default_rng(seed)
        k = 1.0 / np.sqrt(in_features)
        self._param("weight", rng.uniform(-k, k, (out_features, in_features)).astype(self.dtype))
        if checks.flag("bias", bias):
            self._param("bias", rng.uniform(-k, k, out_features).astype(self.dtype))

    def __call__(self, x):
        x = self.backend.ops.asarray(x, "x")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        self._cache = x
        x2 = x.reshape(-1, self.in_features)  # 2-D: BLAS's fast path, not a batched matmul
        if precision.is_half(self.dtype):  # summed in float32, rounded once (the backend's GEMM)
            out = self.xp.empty((x2.shape[0], self.out_features), self.dtype)
            self.backend.ops.gemm(x2, self.params["weight"], out, trans_b=True)
        else:
            out = x2 @ self.params["weight"].T
        if "bias" in self.params:
            out += self.params["bias"]
        return out.reshape(*x.shape[:-1], self.out_features)

    def backward(self, d_out):
        """d_out: [..., O] -> dx: [..., I]; dW += d_out^T x, db += sum(d_out).
        A half layer takes d_out in float32 too (a loss's gradient) and rounds it once."""
        x = self._take_cache("Linear")
        d_out = self.backend.ops.asarray(d_out, "d_out")
        d2 = d_out.reshape(-1, self.out_features)
        if precision.is_half(self.dtype):
            d2 = d2.astype(self.dtype, copy=False)
            ops, dx = self.backend.ops, self.xp.empty((d2.shape[0], self.in_features), self.dtype)
            ops.gemm(d2, x.reshape(-1, self.in_features), self.grads["weight"], trans_a=True, beta=1.0)
            if "bias" in self.params:
                self.grads["bias"] += d2.sum(axis=0, dtype=np.float32)
            ops.gemm(d2, self.params["weight"], dx)
            return dx.reshape(*d_out.shape[:-1], self.in_features)
        self.grads["weight"] += d2.T @ x.reshape(-1, self.in_features)
        if "bias" in self.params:
            self.grads["bias"] += d2.sum(axis=0)
        return (d2 @ self.params["weight"]).reshape(*d_out.shape[:-1], self.in_features)


class SoftmaxCrossEntropy:
    """Per-timestep softmax + cross-entropy with a stable log-sum-exp.

    reduction "mean" averages over the counted positions, "sum" adds them.
    Positions are not counted where ``targets == ignore_index`` or, with
    ``lengths`` ([B]), where ``t >= lengths[b]``. The loss is a float on the
    NumPy backend and a 0-d device array on the CUDA backend (``float(loss)``
    waits for the GPU), as torch returns a tensor: reading it is the caller's
    choice. The gradient is computed with the loss, in the same pass over the
    logits (``softmax_xent``), and ``backward`` hands it out.
    """

    def __init__(self, reduction="mean", ignore_index=None):
        self.reduction = checks.choice("reduction", reduction, ("mean", "sum"))
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"ignore_index: expected None or an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self._cache = None

    def __call__(self, logits, targets, lengths=None):
        """logits: [T, B, V]; targets: [T, B] ints and lengths: [B], on the host or
        (with GPU logits) on the device. Host targets are checked on the host, so
        the loss needs no device sync."""
        xp = array_module(logits)
        if logits.ndim != 3:
            raise ValueError(f"logits: expected [T, B, V], got shape {tuple(logits.shape)}")
        T, B, V = logits.shape
        wide = precision.compute_dtype(logits.dtype)  # half logits: softmax, loss and gradient in float32
        safe, weight = self._counted(targets, lengths, (T, B, V), xp, wide)
        rows = xp.ascontiguousarray(logits.reshape(-1, V), dtype=wide)
        losses, d_logits = xp.empty(T * B, wide), xp.empty_like(rows)
        if xp is np:
            softmax_xent(rows, safe, weight, losses, d_logits)
        else:  # the fused kernel: one pass over the logits
            ops = ops_for(logits)
            with ops.on_stream():  # ordered after the logits' GEMM and before the loss's sum
                ops.softmax_xent(rows, xp.asarray(safe), weight, losses, d_logits)
        self._cache = d_logits.reshape(T, B, V)
        loss = losses.sum()
        return float(loss) if xp is np else loss

    def _counted(self, targets, lengths, shape, xp, dtype):
        """(targets as int32 [T*B] with 0 where a position is not counted, the
        weight of each position in the loss: 0 where not counted, else 1/count
        for "mean" and 1 for "sum"), after checking the targets."""
        T, B, V = shape
        on_device = hasattr(targets, "__cuda_array_interface__")
        if on_device and xp is np:
            raise TypeError("targets: expected a NumPy array like the logits, got a GPU array; "
                            "move it to the host first")
        tp = xp if on_device else np  # where the targets are checked
        targets = targets if on_device else NumpyOps.asarray(targets, "targets")
        if tuple(targets.shape) != (T, B):
            raise ValueError(f"targets: expected shape ({T}, {B}), got {tuple(targets.shape)}")
        if targets.dtype == np.bool_ or not np.issubdtype(targets.dtype, np.integer):
            raise TypeError(f"targets: expected an integer array, got dtype {targets.dtype}")
        mask = tp.ones((T, B), bool)
        if self.ignore_index is not None:
            mask &= targets != self.ignore_index
        if lengths is not None:
            mask &= tp.arange(T)[:, None] < tp.asarray(to_host(lengths) if tp is np else lengths)[None, :]
        safe = tp.where(mask, targets, 0).astype(np.int32).reshape(-1)
        lo, hi = _min_max(safe)
        if lo < 0 or hi >= V:
            raise ValueError(f"targets: expected class indices in [0, {V}), got values from {lo} to {hi}")
        count = mask.sum()  # a device scalar when the targets are on the device: no sync
        scale = 1 / tp.maximum(count, 1) if self.reduction == "mean" else 1
        return safe, xp.asarray((mask * scale).astype(dtype).reshape(-1))

    def backward(self, loss_scale=1.0):
        """dlogits [T, B, V] = (softmax - onehot) * mask * scale, times loss_scale
        (mixed precision's loss scaling, gpurnn.amp); float32 for half logits."""
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward: no forward pass to differentiate")
        loss_scale = checks.positive_number("loss_scale", loss_scale)
        d_logits, self._cache = self._cache, None
        if loss_scale != 1:
            d_logits *= loss_scale
        return d_logits


def softmax_xent(logits, targets, weight, losses, d_logits):
    """Softmax cross-entropy of each row and its gradient, in one pass (the spec
    of the CUDA kernel of the same name).

    logits: [N, V]   targets: [N] int32 in [0, V)   weight: [N] (0: not counted)
    losses: [N]      writes weight * (log sum exp(logits) - logits[target])
    d_logits: [N, V] writes weight * (softmax(logits) - onehot(target))
    """
    shifted = logits - logits.max(axis=1, keepdims=True)  # log-sum-exp without overflow
    np.exp(shifted, out=d_logits)
    z = d_logits.sum(axis=1)
    rows = np.arange(logits.shape[0])
    losses[...] = weight * (np.log(z) - shifted[rows, targets])
    d_logits /= z[:, None]  # softmax
    d_logits[rows, targets] -= 1  # minus the one-hot target
    d_logits *= weight[:, None]


def _min_max(a):
    """(min, max) of an integer array as Python ints, with one device sync; (0, 0) if empty."""
    if a.size == 0:
        return 0, 0
    xp = array_module(a)
    lo, hi = to_host(xp.stack([a.min(), a.max()]))
    return int(lo), int(hi)


class MSELoss:
    """Mean squared error over every element (torch.nn.MSELoss's default): a float
    on the NumPy backend, a 0-d device array on the CUDA backend (as SoftmaxCrossEntropy).
    Over no elements (a batch of no sequences) it is 0, as SoftmaxCrossEntropy's mean
    over no counted position."""

    def __init__(self):
        self._cache = None

    def __call__(self, pred, target):
        if tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"target: expected shape {tuple(pred.shape)}, got {tuple(target.shape)}")
        diff = precision.widen(pred) - target  # half predictions: the loss in float32
        self._cache = diff
        loss = (diff * diff).sum() / max(diff.size, 1)
        return float(loss) if isinstance(loss, (np.ndarray, np.generic)) else loss

    def backward(self, loss_scale=1.0):
        """2 (pred - target) / size, times loss_scale (see SoftmaxCrossEntropy.backward)."""
        if self._cache is None:
            raise RuntimeError("MSELoss.backward: no forward pass to differentiate")
        loss_scale = checks.positive_number("loss_scale", loss_scale)
        diff, self._cache = self._cache, None
        grad = 2 * diff / max(diff.size, 1)
        return grad * loss_scale if loss_scale != 1 else grad
