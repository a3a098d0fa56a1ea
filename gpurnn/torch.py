"""gpurnn's RNN, LSTM and GRU as ``torch.nn.Module``s: a drop-in for torch.nn.RNN/LSTM/GRU.

    from gpurnn.torch import LSTM                      # instead of torch.nn.LSTM
    lstm = LSTM(input_size, hidden_size, num_layers=2, batch_first=True, bidirectional=True)
    out, (h_n, c_n) = lstm(x, (h0, c0))                # x: a tensor or a PackedSequence, as torch's

Imported only when asked for (torch is an optional dependency, the extra
``gpurnn[torch]``). The constructor, forward, return values, parameter names,
shapes and ``state_dict`` are torch's, so state dicts load both ways. Parameters
are ``nn.Parameter``s whose storage *is* the gpurnn layer's flat parameter
buffer (CPU tensors: NumPy memory shared; CUDA tensors: DLPack), so torch's
optimizers update the weights gpurnn reads, in place, and DDP, ``clip_grad_norm_``
and ``.to()`` work. CPU tensors run the NumPy backend, CUDA tensors the CUDA
backend; ``.to(device)`` moves the model and re-points the parameters.

Autograd: one ``torch.autograd.Function`` per call. Its backward runs gpurnn's
BPTT and hands torch gradients torch owns (copies, never views of gpurnn's
buffers). gpurnn keeps the activations of a layer's latest training forward; a
backward of an older forward (or a second backward of one, as gradcheck does)
first recomputes that forward, with the dropout masks it drew. The masks come from
torch's generator (one draw a call seeds them), so torch.manual_seed repeats them and
torch.utils.checkpoint's recompute draws the same. With no gradient
needed and the module in eval mode, the forward keeps no activations at all.

Under torch.autocast a float32 module runs in autocast's float16 or bfloat16, as
cuDNN's RNNs do: a half twin of the gpurnn layer holds the parameters rounded
(refreshed each call), outputs come in half, gradients are widened into the
float32 parameters. Where the backend cannot run that type (bfloat16 on CUDA with a
CuPy that has no bfloat16 arrays), or for a float64 module, half inputs are cast to
the module's dtype instead (said once). ``.half()`` / ``.bfloat16()`` make a module
that holds its parameters in half. On CUDA the call runs on torch's
current stream (CuPy's current stream is set to it), so no host synchronization
orders the two; CuPy's memory pool and torch's caching allocator each keep their
own memory. A weight that a parametrization computes (weight_norm, spectral_norm,
torch.nn.utils.parametrize) is copied into a buffer of the layer's own at each call.

Differences from torch: a parametrization is evaluated
once a call (torch.nn's modules evaluate it twice); no second-order gradients (a
double backward, e.g. a gradient penalty, is refused with torch's error); no torch.func
transforms (grad, vmap: refused, naming them), no TorchScript (torch.jit.script,
torch.jit.trace) or torch.export (refused, saying so);
under ``torch.compile`` the call is a graph break (dynamo does not trace into gpurnn's kernels).
"""

import contextlib
import copy
import warnings

import numpy as np

try:
    import torch
except ImportError as exc:  # the optional dependency, named as the extra that brings it
    raise ImportError(f"gpurnn.torch needs PyTorch ({exc}): pip install 'gpurnn[torch]'") from exc
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from gpurnn import flat, layers, precision
from gpurnn.backend import Backend, NumpyOps, get_backend

__all__ = ["RNN", "LSTM", "GRU"]
_HALF = {torch.float16: "float16", torch.bfloat16: "bfloat16"}  # what autocast may ask for
_HELD = {torch.float32: "float32", torch.float64: "float64", **_HALF}  # what a module's parameters may be


class _TorchBlasOps(NumpyOps):
    """The NumPy backend with its matrix products on torch's BLAS, for CPU tensors: in
    a torch program NumPy's OpenBLAS would be a second thread pool, spinning on the
    cores torch's OpenMP pool works on, each stalling the other (2 cores: AdamW's step
    right after a backward of ours 4 -> 63 ms, our GEMMs slower too). Half products
    stay NumPy's (float32 sums rounded once, the reference's contract)."""

    @staticmethod
    def gemm(a, b, out, trans_a=False, trans_b=False, beta=0.0):
        if precision.is_half(out.dtype):
            return NumpyOps.gemm(a, b, out, trans_a, trans_b, beta)
        a, b, out = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)  # views, no copies
        a = a.T if trans_a else a
        b = b.T if trans_b else b
        if beta:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)

    @staticmethod
    def recurrent_operand(w_hh, w_hh_t, batch, steps):
        """W_hh as stored, transposed in the GEMM: where OpenBLAS runs h @ W^T faster
        from a contiguous W^T, torch's MKL does not (2 cores, [128, 256] @ W^T of
        [1024, 256] in a training forward: 430-480 us a step against 510-790; the whole
        step of bench_torch's model 1-2% faster, which the copy no longer costs either)."""
        return w_hh, True


_CPU_BACKEND = Backend("numpy", np, "gpurnn.torch on CPU tensors: the NumPy backend, its matrix products on "
                                    "torch's BLAS", _TorchBlasOps())


def _to_array(t, backend):
    """A tensor as the backend's array, sharing memory (NumPy for CPU, CuPy through DLPack for CUDA).
    bfloat16 crosses as its int16 bits: NumPy has no bfloat16, and not every CuPy takes it
    through DLPack; the bits are ml_dtypes' bfloat16."""
    t = t.detach().contiguous()
    bits = t.dtype == torch.bfloat16
    if bits:
        t = t.view(torch.int16)
    a = backend.xp.from_dlpack(t) if backend.name == "cuda" else t.numpy()
    return a.view(precision.bfloat16()) if bits else a


def _to_arrays(tensors, backend):
    """_to_array of each tensor; None stays None."""
    return [None if t is None else _to_array(t, backend) for t in tensors]


def _to_tensor(a, device):
    """A backend array as a tensor, sharing memory (bfloat16 as _to_array carries it)."""
    bits = a.dtype.name == "bfloat16"
    if bits:
        a = a.view(np.int16)
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a).to(device)
    return t.view(torch.bfloat16) if bits else t


class _Run(torch.autograd.Function):
    """out, h_n[, c_n] = the gpurnn layer on x (time-major or as the layer's layout), with
    gradients for x, h0, c0 and every parameter. ``layer`` is the module's own, or under
    autocast its half twin (holding the parameters rounded): its gradients are widened
    to the parameters' dtype."""

    @staticmethod
    def forward(ctx, module, layer, x, h0, c0, lengths, *params):
        arrays = _to_arrays((x, h0, c0), layer.backend)
        # saved so torch's version counters refuse a backward after an in-place change of any of
        # them (an optimizer step before the backward, a reused input buffer), as torch.nn's does
        ctx.save_for_backward(x, h0, c0, *params)
        ctx.module, ctx.layer, ctx.lengths = module, layer, lengths
        ctx.rng_state = layer._rng.bit_generator.state  # to redraw the same dropout masks on a recompute
        ctx.needs = (x.requires_grad, h0 is not None and h0.requires_grad, c0 is not None and c0.requires_grad)
        ctx.dropout = module.training  # in eval mode the forward has no dropout, and neither has its recompute
        out, h_n, c_n = _training_forward(layer, arrays, lengths, ctx.dropout)
        ctx.cache = layer._cache
        device = x.device
        results = [_to_tensor(out, device), _to_tensor(h_n, device)]
        if c_n is not None:
            results.append(_to_tensor(c_n, device))
        return tuple(results)

    @staticmethod
    @torch.autograd.function.once_differentiable  # BPTT by hand has no graph: a double backward is refused
    def backward(ctx, d_out, d_hn, d_cn=None):
        with _on_torch_stream(ctx.layer.backend):  # the autograd engine's stream, as the forward's
            return _Run._backward(ctx, d_out, d_hn, d_cn)

    @staticmethod
    def _backward(ctx, d_out, d_hn, d_cn):
        module = ctx.module
        layer = ctx.layer
        x, h0, c0 = ctx.saved_tensors[:3]  # (torch checks here that none changed since the forward)
        if layer._cache is not ctx.cache or layer._cache_used:  # another forward since, or a second backward
            layer._rng.bit_generator.state = ctx.rng_state  # this forward's masks again
            arrays = _to_arrays((x, h0, c0), layer.backend)
            _training_forward(layer, arrays, ctx.lengths, ctx.dropout)
        layer.zero_grad()
        grads = _to_arrays((d_out, d_hn, d_cn), layer.backend)
        layer.train(True)
        dx, dh0, dc0 = layer._backward(grads[0], grads[1], grads[2] if layer._cell == "lstm" else None)
        device = d_out.device
        owned = lambda a: _to_tensor(a.copy(), device)  # noqa: E731  torch keeps them: never a view of ours
        inputs = [owned(dx) if ctx.needs[0] else None, owned(dh0) if ctx.needs[1] else None,
                  owned(dc0) if ctx.needs[2] and dc0 is not None else None]
        params = [_to_tensor(layer.grads[name].astype(module._layer.dtype), device)  # a copy, widened
                  for name in module._names]
        return (None, None, *inputs, None, *params)


def _training_forward(layer, arrays, lengths, dropout):
    """The layer's forward keeping its activations for a backward; without dropout
    when the module is in eval mode (a gradient through an eval-mode model)."""
    rate = layer.dropout
    layer.train(True)
    layer.dropout = rate if dropout else 0.0
    try:
        return layer._forward(*arrays, lengths)
    finally:
        layer.dropout = rate


class _Base(torch.nn.Module):
    _layer_class = None

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, **extra):
        super().__init__()
        if proj_size and self._layer_class is not layers.LSTM:  # torch's words
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if proj_size:
            extra["proj_size"] = proj_size
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _HELD:
            raise TypeError(f"dtype: expected torch.float32, float64, float16 or bfloat16, got {dtype}")
        self._config = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, bias=bias,
                            batch_first=batch_first, dropout=dropout, bidirectional=bidirectional, **extra)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, dropout, bidirectional
        self.proj_size = proj_size
        self._said_autocast = False
        self._build(torch.device("cpu") if device is None else torch.device(device), dtype, values=None,
                    register=True)  # the gpurnn layer checks the arguments
        if dropout and num_layers == 1:  # torch's warning, word for word (filters written for it match)
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                          stacklevel=3 if isinstance(self, RNN) else 2)  # at the caller (RNN adds a frame)
        self.reset_parameters()

    # ------------------------------------------------------------ parameters
    def _new_layer(self, device, dtype):
        """A gpurnn layer for (device, dtype) whose parameters (and gradients) are views of one buffer."""
        backend = get_backend("cuda") if device.type == "cuda" else _CPU_BACKEND
        # seed 0: the layer's own draws go unused (the weights are torch's, and the dropout
        # masks are drawn from torch's generator at each call: see _call)
        layer = self._layer_class(**self._config, dtype=_HELD[dtype], seed=0, backend=backend)
        _, views = flat.pack(layer.params)
        _, grad_views = flat.pack(layer.grads)
        for name in layer.params:
            layer._rebind(name, views[name], grad_views[name])
        return layer

    def _build(self, device, dtype, values, register=False):
        """A new gpurnn layer on (device, dtype) and the nn.Parameters as views of its
        parameter buffer (the same Parameter objects when they exist: an optimizer may
        hold them; registered when ``register``); values: the parameters to copy in, or
        None. A weight a parametrization computes has no Parameter of its name: see _sync."""
        layer = self._new_layer(device, dtype)
        self._layer, self._device, self._dtype = layer, device, dtype
        self._half_layers = {}  # autocast's twins, by torch dtype
        self._names = list(layer.params)
        for name in self._names:
            tensor = _to_tensor(layer.params[name], device)
            existing = self._parameters.get(name)
            if values is not None and name in values:
                tensor.copy_(values[name])
            if register:
                self.register_parameter(name, torch.nn.Parameter(tensor))
            elif existing is not None:
                existing.data = tensor
                existing.grad = None
        self._bound = None  # the next call binds the layer to the weights

    def _sync(self):
        """The weights of this call, by name, with the gpurnn layer bound to them. A
        Parameter's storage is the layer's (zero-copy; bound again, graphs recaptured,
        when something replaced it: a deepcopy, torch.load, ``p.data = ...``). A weight a
        parametrization computes (``torch.nn.utils.parametrizations.weight_norm``,
        ``spectral_norm``, ``torch.nn.utils.parametrize``, the older ``weight_norm``)
        is a new tensor each call: it is copied into a buffer of the layer's own, and
        its gradient flows back through the parametrization."""
        layer = self._layer
        weights = [getattr(self, name) for name in self._names]
        pointers = [_has_storage(n, self._parameters[n]) if n in self._parameters else None for n in self._names]
        for name, w in zip(self._names, weights):
            if not isinstance(w, torch.Tensor) or w.device != self._device or w.dtype != self._dtype \
                    or tuple(w.shape) != tuple(layer.params[name].shape):
                got = f"{w.dtype} {tuple(w.shape)} on {w.device}" if isinstance(w, torch.Tensor) else type(w).__name__
                raise RuntimeError(f"{name}: expected a {self._dtype} tensor of shape {tuple(layer.params[name].shape)} "
                                   f"on {self._device}, got {got}; move the module with .to() instead")
        if pointers != self._bound:
            was = self._bound or [0] * len(pointers)  # after _build the layer views its own flat buffer
            for name, w, pointer, before in zip(self._names, weights, pointers, was):
                if pointer is not None:
                    if not w.is_contiguous():
                        raise RuntimeError(f"{name}: expected a contiguous parameter, got strides {w.stride()}")
                    layer._rebind(name, _to_array(w.data, layer.backend), layer.grads[name])
                elif before is not None:  # newly computed: give it storage no Parameter views
                    layer._rebind(name, layer.backend.xp.empty_like(layer.params[name]), layer.grads[name])
            self._bound = pointers
        for name, w, pointer in zip(self._names, weights, pointers):
            if pointer is None:
                layer.params[name][...] = _to_array(w, layer.backend)
        return weights

    def __getstate__(self):
        """Pickling (torch.save, copy.deepcopy) keeps the Parameters, not the gpurnn layer."""
        state = self.__dict__.copy()
        state.pop("_layer", None)
        state["_half_layers"] = {}
        state["_bound"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._layer = self._new_layer(self._device, self._dtype)  # bound to the Parameters at the first call

    def __deepcopy__(self, memo):
        """copy.deepcopy by the pickling state (a parametrized module's class, which torch
        swaps in, refuses pickling but copies through this)."""
        replica = self.__new__(type(self))
        memo[id(self)] = replica
        replica.__setstate__(copy.deepcopy(_Base.__getstate__(self), memo))
        return replica

    def reset_parameters(self):
        """U(-1/sqrt(H), 1/sqrt(H)) from torch's generator, as torch.nn.LSTM."""
        bound = 1.0 / np.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def clear_cache(self):
        """Drop the per-shape workspaces (and CUDA graphs) kept for recent input shapes
        (at most gpurnn.layers.MAX_WORKSPACES of them; calls of a new shape evict the oldest)."""
        self._layer.clear_cache()
        self._half_layers.clear()

    def flatten_parameters(self):
        """A no-op: gpurnn's parameters are always one contiguous buffer."""

    # torch.nn.RNNBase's views of the parameters, which code written for torch reads
    # (e.g. ``for names in rnn._all_weights`` to initialise the biases)
    @property
    def _all_weights(self):
        """The parameters' names, a list per layer and direction, in torch's order."""
        cfg = self._layer._cfg
        return [[n for n in cfg.layer_param_names(layer, d) if n in self._names]
                for layer in range(cfg.L) for d in range(cfg.D)]

    @property
    def all_weights(self):
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    @property
    def _flat_weights_names(self):
        return list(self._names)

    @property
    def _flat_weights(self):
        return [getattr(self, n) for n in self._names]

    @property
    def mode(self):
        """torch's name of the recurrence: "LSTM", "GRU", "RNN_TANH", "RNN_RELU" (and
        RNN_SIGMOID, RNN_LEAKY_RELU, RNN_ELU for gpurnn's other nonlinearities)."""
        cell = self._layer._cell
        return f"RNN_{self._config['nonlinearity'].upper()}" if cell == "rnn" else cell.upper()

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.cpu()``, ``.double()``...: a gpurnn layer on the new
        device and dtype, the same Parameter objects viewing its buffer (submodules, a
        parametrization's, as torch moves them)."""
        probe = fn(torch.zeros(1, dtype=self._dtype, device=self._device))
        if probe.dtype not in _HELD:
            raise TypeError(f"dtype: gpurnn runs float32, float64, float16 and bfloat16, not {probe.dtype}")
        if recurse:
            for child in self.children():
                child._apply(fn)
        moved = (probe.device, probe.dtype) != (self._device, self._dtype)
        for name, p in self._parameters.items():
            if p is not None and not (moved and name in self._names):  # the layer's own move below
                p.data = fn(p.data)  # as torch's default: optimizers keep the object (share_memory_: in place,
                if p.grad is not None:  # and the next call binds the layer to the shared storage)
                    p.grad = fn(p.grad)
        for name, b in self._buffers.items():
            if b is not None:
                self._buffers[name] = fn(b)
        if moved:
            values = {name: p.detach().to(probe.device, probe.dtype) for name, p in self._parameters.items()}
            self._build(probe.device, probe.dtype, values)
        return self

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}"
        for key, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                             ("bidirectional", False), ("proj_size", 0)):
            if self._config.get(key, default) != default:
                text += f", {key}={self._config[key]}"
        return text + f", gpurnn backend={self._layer.backend.name}"

    # ------------------------------------------------------------ forward
    def _check(self, name, t, dtype, allow_none=True):
        if t is None:
            if allow_none:
                return None
            raise ValueError(f"{name}: expected a tensor, got None")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != self._device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found {name} tensor at "
                               f"{t.device} and parameter tensor at {self._device}")
        if t.dtype != dtype:
            raise RuntimeError(f"{name} must have the type {dtype}, got type {t.dtype}")
        _has_storage(name, t)
        return t

    def _autocast(self, *tensors):
        """(tensors, the dtype the call runs in). Under torch.autocast a float32 module runs
        in autocast's float16 or bfloat16 where gpurnn runs it on this backend (a half twin
        of the layer; outputs in half, gradients widened into the float32 parameters), as
        cuDNN's RNNs do; elsewhere half inputs are cast to the module's dtype, said once.
        Never a dtype error."""
        if not torch.is_autocast_enabled(self._device.type):
            return tensors, self._dtype
        wanted = torch.get_autocast_dtype(self._device.type)
        reason = None
        if self._dtype == torch.float32 and wanted in _HALF:
            try:
                self._layer._ops.check_dtype(_HALF[wanted])
                return [None if t is None else t.to(wanted) for t in tensors], wanted
            except TypeError as exc:
                reason = str(exc)
        cast = [t.to(self._dtype) if t is not None and t.dtype in _HALF else t for t in tensors]
        if any(a is not b for a, b in zip(cast, tensors)) and not self._said_autocast:
            warnings.warn(f"gpurnn.torch.{type(self).__name__}: under autocast it runs in {self._dtype}"
                          + (f" ({reason})" if reason else ""), stacklevel=4)
            self._said_autocast = True
        return cast, self._dtype

    def _half_layer(self, dtype):
        """Autocast's twin of the layer in dtype, holding the parameters rounded (copied on
        every call: optimizers update the float32 ones in place)."""
        twin = self._half_layers.get(dtype)
        if twin is None:
            twin = self._half_layers[dtype] = self._new_layer(self._device, dtype)
        for name in self._names:
            twin.params[name][...] = self._layer.params[name]  # rounded once
        return twin

    def __prepare_scriptable__(self):
        """Called by torch.jit.script on every module it scripts, before scripting."""
        _refuse_torchscript(self, "torch.jit.script")

    def _run(self, x, h0, c0):
        if torch.jit.is_tracing():
            _refuse_torchscript(self, "torch.jit.trace (or torch.onnx.export, which traces)")
        packed = isinstance(x, PackedSequence)
        lengths = None
        if packed:
            sorted_indices, unsorted_indices = x.sorted_indices, x.unsorted_indices
            x, lengths = pad_packed_sequence(x, batch_first=self.batch_first)  # batch in the user's order
            lengths = lengths.numpy()
        (x, h0, c0), dtype = self._autocast(x, h0, c0)
        x = self._check("input", x, dtype, allow_none=False)
        h0, c0 = self._check("hx", h0, dtype), self._check("hx", c0, dtype)
        with _on_torch_stream(self._layer.backend), torch.autocast(self._device.type, enabled=False):
            out, state = self._call(x, h0, c0, lengths, dtype)
        if packed:
            out = _repack(out, lengths, self.batch_first, sorted_indices, unsorted_indices)
        return out, state

    def _call(self, x, h0, c0, lengths, dtype):
        params = self._sync()
        layer = self._layer if dtype == self._dtype else self._half_layer(dtype)
        if self.training and layer.dropout and layer.num_layers > 1:
            # the masks from torch's generator, as torch.nn's dropout: torch.manual_seed repeats
            # them, and torch.utils.checkpoint's recompute (which restores it) draws the same
            layer._rng = np.random.default_rng(int(torch.randint(2**62, (1,))))
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)
                                            or any(t is not None and t.requires_grad for t in (h0, c0)))
        if grad:
            results = _Run.apply(self, layer, x, h0, c0, lengths, *params)
        else:  # nothing to differentiate: in eval mode, gpurnn's inference path (keeps no activations)
            layer.train(self.training)
            arrays = _to_arrays((x, h0, c0), layer.backend)
            out, h_n, c_n = layer._forward(*arrays, lengths)
            results = tuple(_to_tensor(a, self._device) for a in (out, h_n, c_n) if a is not None)
        return results[0], results[1:]


def _has_storage(name, t):
    """t's data pointer; a tensor without one is torch.func's (grad, vmap, jacrev...) or
    torch.export's (a FakeTensor): neither can reach into the NumPy or CuPy arrays gpurnn
    computes with."""
    try:
        return t.data_ptr()
    except RuntimeError:
        if "Fake" in type(t).__name__:
            raise RuntimeError(f"{name}: expected a tensor with storage, got a {type(t).__name__} without it "
                               f"(torch.export, or another trace on fake tensors); gpurnn.torch modules cannot "
                               f"be exported: their forward runs gpurnn's kernels outside torch. Export the model "
                               f"without this module, or run it eagerly") from None
        raise RuntimeError(f"{name}: expected a tensor with storage, got a {type(t).__name__} without it "
                           f"(a torch.func transform: grad, vmap, jacrev...?); gpurnn.torch modules do not run "
                           f"under torch.func transforms: use torch.autograd.grad") from None


def _refuse_torchscript(module, how):
    """TorchScript (torch.jit.trace, torch.jit.script, torch.onnx's TorchScript exporter)
    records torch operations; gpurnn's kernels are none of them."""
    raise RuntimeError(f"gpurnn.torch.{type(module).__name__}: {how} cannot compile it to TorchScript: its "
                       f"forward runs gpurnn's kernels outside torch. Keep the module eager (torch.compile runs "
                       f"it as a graph break), or use torch.nn.{type(module).__name__} where TorchScript is needed")


def _on_torch_stream(backend):
    """On the CUDA backend: CuPy's current stream is torch's for the call, so gpurnn's
    work (which orders itself after and before CuPy's current stream) is ordered with
    torch's, with no host synchronization."""
    if backend.name != "cuda":
        return contextlib.nullcontext()
    return backend.xp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)


def _repack(out, lengths, batch_first, sorted_indices, unsorted_indices):
    """The padded output as a PackedSequence in the input's own batch order."""
    order = torch.argsort(torch.as_tensor(-lengths), stable=True) if sorted_indices is None else sorted_indices
    out = out.index_select(0 if batch_first else 1, order.to(out.device))
    packed = pack_padded_sequence(out, torch.as_tensor(lengths)[order.cpu()], batch_first=batch_first,
                                  enforce_sorted=True)
    return PackedSequence(packed.data, packed.batch_sizes, sorted_indices, unsorted_indices)


class RNN(_Base):
    """torch.nn.RNN's interface over gpurnn.RNN; ``nonlinearity`` also takes sigmoid,
    leaky_relu and elu."""

    _layer_class = layers.RNN

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype, nonlinearity=nonlinearity)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        out, (h_n,) = self._run(input, hx, None)
        return out, h_n


class GRU(_Base):
    """torch.nn.GRU's interface over gpurnn.GRU."""

    _layer_class = layers.GRU

    def forward(self, input, hx=None):
        out, (h_n,) = self._run(input, hx, None)
        return out, h_n


class LSTM(_Base):
    """torch.nn.LSTM's interface over gpurnn.LSTM (hx = (h0, c0))."""

    _layer_class = layers.LSTM

    def forward(self, input, hx=None):
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"hx: expected a tuple (h0, c0) or None, got {type(hx).__name__}")
        h0, c0 = (None, None) if hx is None else hx
        if (h0 is None) != (c0 is None):
            raise ValueError("hx: expected both h0 and c0, or neither")
        out, (h_n, c_n) = self._run(input, h0, c0)
        return out, (h_n, c_n)
