"""Mixed-precision training: a float32 master copy of a half model, and fp16's loss scaler.

    master = gpurnn.amp.MasterWeights(model)         # model: dtype float16 or bfloat16
    opt = gpurnn.optim.Adam(master.params, master.grads, lr=1e-3)
    scaler = gpurnn.amp.LossScaler()                 # fp16; bf16 has float32's range and needs none
    loss, state = model(x, y)
    model.backward(loss_scale=scaler.scale)          # the loss's gradient times the scale
    master.take_grads(scaler.scale)                  # widened and unscaled
    norm = gpurnn.optim.global_norm(master.grads)
    if math.isfinite(norm):                          # else fp16 overflowed: skip the step
        opt.step()                                   # (clip master.grads first, if you clip)
        master.publish()                             # rounded once into the model's half weights
    scaler.update(found_inf=not math.isfinite(norm))
    model.zero_grad()

The optimizer updates float32 weights, so updates far below half's resolution
accumulate instead of rounding away; the model computes with their half copy.
A model's parameters and gradients are each one flat buffer (gpurnn.flat), so
widening, unscaling and publishing are one array operation each.
"""

import numpy as np

from gpurnn import checks, flat, precision
from gpurnn.backend import array_module, to_host


class MasterWeights:
    """params, grads: float32 dicts with the model's names and shapes, each views of one buffer."""

    def __init__(self, model):
        self._params, self._grads = flat.buffer_of(model.params), flat.buffer_of(model.grads)
        if self._params is None or self._grads is None:
            raise TypeError(f"model: expected a model whose parameters are one flat buffer (CharLM, "
                            f"SequenceRegressor), got {type(model).__name__}")
        if not precision.is_half(self._params.dtype):
            raise TypeError(f"model: expected a float16 or bfloat16 model, got dtype {self._params.dtype}: "
                            f"a float32 or float64 model is its own master copy")
        xp = array_module(self._params)
        self.buffer = self._params.astype(np.float32)
        self.grad_buffer = xp.zeros(self.buffer.shape, np.float32)
        self.params = flat.views_of(self.buffer, model.params)
        self.grads = flat.views_of(self.grad_buffer, model.grads)

    def take_grads(self, loss_scale=1.0):
        """grads = the model's half gradients, widened and divided by loss_scale
        (an fp16 overflow shows as inf or NaN in them: check their global norm)."""
        loss_scale = checks.positive_number("loss_scale", loss_scale)
        self.grad_buffer[...] = self._grads
        if loss_scale != 1:
            self.grad_buffer *= 1.0 / loss_scale

    def publish(self):
        """Round the float32 weights once into the model's half weights."""
        self._params[...] = self.buffer

    def state_dict(self):
        return {n: np.array(to_host(p)) for n, p in self.params.items()}

    def load_state_dict(self, state):
        """Float32 (or any float) arrays into the master weights, then into the model."""
        checks.state_shapes(state, self.params)
        xp = array_module(self.buffer)
        for name, p in self.params.items():
            p[...] = xp.asarray(np.asarray(state[name], np.float32))
        self.publish()


class LossScaler:
    """Dynamic loss scaling for fp16, as torch.amp.GradScaler: backward runs on
    loss * scale so small gradients do not flush to zero in fp16; a step whose
    gradients overflowed is skipped and the scale multiplied by backoff_factor;
    after growth_interval good steps in a row it is multiplied by growth_factor."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale = checks.positive_number("init_scale", init_scale)
        self.growth_factor = checks.positive_number("growth_factor", growth_factor)
        if self.growth_factor < 1:
            raise ValueError(f"growth_factor: expected a number >= 1, got {growth_factor}")
        self.backoff_factor = checks.positive_number("backoff_factor", backoff_factor)
        if self.backoff_factor >= 1:
            raise ValueError(f"backoff_factor: expected a number in (0, 1), got {backoff_factor}")
        self.growth_interval = checks.positive_int("growth_interval", growth_interval)
        self.good_steps = 0
        self.skipped = 0

    def update(self, found_inf):
        """After a step: lower the scale on an overflow, raise it after a run of good steps."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self):
        return dict(scale=self.scale, good_steps=self.good_steps, skipped=self.skipped)

    def load_state_dict(self, state):
        self.scale = float(state["scale"])
        self.good_steps, self.skipped = int(state["good_steps"]), int(state["skipped"])
