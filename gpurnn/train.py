"""The training job behind ``gpurnn train``: tasks, the loop, checkpoints, metrics.

A run lives in one directory:
    checkpoint.npz   parameters, optimizer state, carried recurrent state, and a JSON
                     record (config, step, vocabulary, RNG states, loss history);
                     written to a temporary file and renamed, so it is never half-written
    best.npz         the same, at the step with the lowest held-out loss so far
    metrics.csv      step, loss, gradient norm, tokens/s, held-out loss and metric
                     (filled at the steps that were evaluated; rewritten whole at each save)
    loss.png         the training and held-out loss curves
Resuming restores all of it, so an interrupted and resumed run computes the same
losses as an uninterrupted one.

Held-out data (``val_fraction`` > 0): charlm trains on all but the last fraction
of the text and walks that last part in eval mode (no dropout), the state carried
from chunk to chunk, reporting loss and bits per character; the adding and copy
tasks draw VAL_BATCHES batches from seeds training never uses and report MSE and
per-symbol accuracy of the copied symbols.
"""

import contextlib
import csv
import io
import json
import math
import os
import signal
import time
import zipfile

import numpy as np

from gpurnn import amp, backend as backend_module, distributed, flat, optim, precision
from gpurnn.backend import to_host
from gpurnn.data import CharCorpus, adding_problem, copy_task
from gpurnn.model import CharLM, SequenceRegressor

TASKS = ("charlm", "adding", "copy")
COPY_SYMBOLS, COPY_LENGTH = 8, 10
VAL_BATCHES = 4  # held-out batches of the adding and copy tasks
VAL_METRIC = {"charlm": "bpc", "adding": "mse", "copy": "accuracy"}
METRICS_HEADER = ["step", "loss", "grad_norm", "tokens_per_s", "val_loss"]
MODEL_DTYPES = {"fp32": "float32", "tf32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --precision
# settings added after the checkpoint format: what a checkpoint made before each had (and
# what a caller's cfg without one means: train fills them in)
LATER_SETTINGS = {"precision": "fp32", "dropout": 0.0, "proj_size": 0}
SMALLEST_LOSS_SCALE = 2.0 ** -24  # fp16's smallest subnormal: below it, scaling cannot be what overflows


class TrainingError(RuntimeError):
    """A problem the user can act on; the message is the whole story."""


class Diverged(TrainingError):
    """The loss became NaN or infinite."""


def defaults(task, backend_name):
    """Sizes that show learning in about 3 minutes on 2 CPU cores; larger on a GPU."""
    gpu = backend_name == "cuda"
    if task == "charlm":
        return dict(hidden=512 if gpu else 256, layers=2 if gpu else 1, seq_len=128 if gpu else 64,
                    batch=64 if gpu else 128, steps=3000 if gpu else 800, lr=2e-3)
    if task == "adding":
        return dict(hidden=64 if gpu else 32, layers=1, seq_len=100 if gpu else 20, batch=64, steps=1500, lr=1e-2)
    return dict(hidden=128 if gpu else 64, layers=1, seq_len=20, batch=64, steps=1500 if gpu else 800, lr=1e-2)


def projection_problem(cell, proj_size, hidden):
    """What is wrong with ``--proj-size`` for this model by torch's rules, or None."""
    if proj_size and cell != "lstm":
        return f"--proj-size {proj_size}: only the lstm cell has a projection, not {cell}"
    if proj_size >= hidden:  # a projection narrows the state
        return f"--proj-size {proj_size}: expected a size below --hidden ({hidden})"
    return None


class Task:
    """The model, its data and one training step's loss, for one of TASKS."""

    def __init__(self, cfg, backend, vocab=None, world=None):
        self.cfg = cfg
        self.name = cfg["task"]
        self.world = world or distributed.World(backend.name)
        if cfg["batch"] % self.world.size:
            raise TrainingError(f"--batch {cfg['batch']}: the global batch must split evenly over "
                                f"{self.world.size} ranks")
        share = cfg["batch"] // self.world.size
        self.shard = slice(self.world.rank * share, (self.world.rank + 1) * share)  # this rank's sequences
        self.dtype = MODEL_DTYPES[cfg["precision"]]
        try:
            backend.ops.check_dtype(self.dtype)
        except TypeError as exc:  # bfloat16 on a GPU whose CuPy has no bfloat16 arrays
            raise TrainingError(f"--precision {cfg['precision']}: {exc}") from None
        dropout = cfg["dropout"]
        if dropout and cfg["layers"] < 2:  # torch.nn.LSTM only warns; a flag that does nothing should not pass
            raise TrainingError(f"--dropout {dropout}: dropout acts between stacked layers, and this model has "
                                f"{cfg['layers']} (give --layers 2 or more, or no --dropout)")
        if cfg["cell"] != "rnn" and cfg["nonlinearity"] != "tanh":
            raise TrainingError(f"--nonlinearity {cfg['nonlinearity']}: only the rnn cell has one, and this "
                                f"model's cell is {cfg['cell']}")
        problem = projection_problem(cfg["cell"], cfg["proj_size"], cfg["hidden"])
        if problem:
            raise TrainingError(problem)
        common = dict(num_layers=cfg["layers"], cell=cfg["cell"], nonlinearity=cfg["nonlinearity"],
                      dropout=dropout, seed=cfg["seed"], backend=backend, dtype=self.dtype,
                      proj_size=cfg["proj_size"])
        if self.name == "charlm":
            whole = CharCorpus.from_file(cfg["text"]) if cfg["text"] else CharCorpus.python_stdlib()
            if vocab is not None and whole.vocab != vocab:  # resuming: it must be the same text
                raise TrainingError(f"{whole.source} changed since the checkpoint (different vocabulary)")
            self.corpus, self.held_out = whole.split(cfg["val_fraction"])
            self.corpus.chunks_per_epoch(cfg["seq_len"], cfg["batch"])  # fails early if the text is too short
            self.model = CharLM(len(self.corpus.vocab), cfg["hidden"], **common)
        elif self.name == "copy":
            self.model = CharLM(COPY_SYMBOLS + 2, cfg["hidden"], ignore_index=-1, **common)
        else:
            self.model = SequenceRegressor(2, cfg["hidden"], 1, **common)

    @property
    def vocab(self):
        return self.corpus.vocab if self.name == "charlm" else None

    def tokens_per_step(self):
        return self.cfg["seq_len"] * self.cfg["batch"]

    def loss(self, step, state):
        """Forward this rank's shard of one global batch (the cache stays for backward);
        returns (loss, state to carry)."""
        cfg, shard = self.cfg, self.shard
        if self.name == "charlm":
            x, y, new_epoch = self.corpus.batch_at(step, cfg["seq_len"], cfg["batch"])
            return self.model.forward(x[:, shard], y[:, shard], None if new_epoch else state)  # reset each epoch
        seed = (cfg["seed"] or 0) * 1_000_003 + step
        if self.name == "copy":
            x, y = copy_task(cfg["batch"], cfg["seq_len"], seed, COPY_SYMBOLS, COPY_LENGTH)
            return self.model.forward(x[:, shard], y[:, shard])[0], None
        x, y = adding_problem(cfg["batch"], cfg["seq_len"], seed)
        return self.model.forward(self._inputs(x)[:, shard], y[shard])[0], None

    def _inputs(self, x):
        """The adding problem's float32 inputs in the model's dtype."""
        return x if self.dtype == "float32" else x.astype(self.model.rnn.dtype)

    def validate(self):
        """(held-out loss, held-out metric: bpc, MSE or accuracy), or None without held-out data."""
        cfg = self.cfg
        if not cfg["val_fraction"]:
            return None
        if self.name == "charlm":
            state, total, chunks = None, 0.0, 0
            for x, y in self.held_out.held_out_batches(cfg["seq_len"], cfg["batch"]):
                loss, _, state = self.model.evaluate(x, y, state)
                total, chunks = total + float(loss), chunks + 1  # equal chunks: their mean is the token mean
            loss = total / chunks
            return loss, loss / math.log(2)
        losses, right, counted = [], 0, 0
        for k in range(VAL_BATCHES):
            seed = [cfg["seed"] or 0, 1, k]  # a seed sequence, never one of training's integer seeds
            if self.name == "copy":
                x, y = copy_task(cfg["batch"], cfg["seq_len"], seed, COPY_SYMBOLS, COPY_LENGTH)
                loss, logits, _ = self.model.evaluate(x, y)
                asked = y >= 0
                right += int((to_host(logits).argmax(-1) == y)[asked].sum())
                counted += int(asked.sum())
            else:
                x, y = adding_problem(cfg["batch"], cfg["seq_len"], seed)
                loss = float(((to_host(self.model.predict(self._inputs(x))).astype(np.float32) - y) ** 2).mean())
            losses.append(float(loss))
        loss = sum(losses) / len(losses)
        return loss, (right / counted if self.name == "copy" else loss)


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(out_dir, task, opt, step, state, history, rng_state, best_val=None, prime=None,
                    name="checkpoint.npz", rngs=None, scaler=None):
    """state: the carried state of the whole global batch; rngs: each rank's dropout RNG state
    (several ranks; rng_state is rank 0's). The parameters saved are the optimizer's:
    the float32 master weights of a half model (gpurnn.amp), so a resumed run goes on
    from exactly where it stopped; scaler: fp16's loss scaler, whose state is saved too."""
    record = dict(format=1, config=task.cfg, step=step, vocab=task.vocab, history=history, rng=rng_state,
                  optimizer=dict(name=task.cfg["optim"], lr=task.cfg["lr"]), best_val=best_val, prime=prime)
    if rngs is not None:
        record["rngs"] = rngs
    if scaler is not None:
        record["loss_scaler"] = scaler.state_dict()
    arrays = {f"param/{k}": to_host(v) for k, v in opt.params.items()}
    arrays.update({f"optim/{k}": np.asarray(v) for k, v in opt.state_dict().items()})
    for i, s in enumerate(state if isinstance(state, tuple) else (() if state is None else (state,))):
        arrays[f"state/{i}"] = precision.widen(to_host(s))  # npz cannot hold bfloat16; float32 holds it exactly
    arrays["record"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
    path = os.path.join(out_dir, name)
    replace_atomically(path, lambda f: np.savez(f, **arrays))
    return path


def replace_atomically(path, write):
    """Fill ``path``.tmp with ``write(binary file)``, flush it to disk and rename it
    over ``path``: a reader (a resumed run after a crash, say) sees the old file or
    the new one, whole. If writing fails (a full disk), the temporary goes and the
    old file stays; the TrainingError says so."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = "the previous one is intact" if os.path.exists(path) else "there was none before"
        raise TrainingError(f"{path}: could not be written ({exc.strerror or exc}); {kept}") from None


def load_checkpoint(out_dir, name="checkpoint.npz"):
    """(record dict, arrays dict) or a TrainingError that says what is wrong."""
    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        raise TrainingError(f"{path}: no checkpoint there")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        record = json.loads(arrays.pop("record").tobytes().decode())
        if record.get("format") != 1:
            raise ValueError(f"unknown format {record.get('format')!r}")
        record["config"] = {**LATER_SETTINGS, **record["config"]}
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path}: cannot read the checkpoint, it is corrupt or truncated "
                            f"({type(exc).__name__}: {exc})") from None
    return record, arrays


def restore(task, opt, record, arrays, master=None, scaler=None):
    """Put parameters (into the master weights of a half model), optimizer state, the
    loss scaler's state and the carried state back; returns the state."""
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    if scaler is not None and "loss_scaler" in record:
        scaler.load_state_dict(record["loss_scaler"])
    try:
        (master or task.model).load_state_dict(params)
        opt.load_state_dict({k[len("optim/"):]: v for k, v in arrays.items() if k.startswith("optim/")})
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"the checkpoint does not fit its model: {exc}") from None
    xp = task.model.backend.xp
    dtype = task.model.rnn.dtype
    state = [xp.asarray(arrays[f"state/{i}"].astype(dtype)) for i in range(2) if f"state/{i}" in arrays]
    return tuple(state) if len(state) == 2 else (state[0] if state else None)


# ------------------------------------------------------------------- metrics
def write_metrics(out_dir, history, task_name):
    text = io.StringIO(newline="")
    w = csv.writer(text, lineterminator="\n")
    w.writerow(METRICS_HEADER + [f"val_{VAL_METRIC[task_name]}"])
    w.writerows([["" if v is None else v for v in row] for row in history])  # empty: not evaluated
    replace_atomically(os.path.join(out_dir, "metrics.csv"), lambda f: f.write(text.getvalue().encode()))


def plot_loss(out_dir, history, title):
    from matplotlib.figure import Figure  # not pyplot: no display, no global backend switch

    from gpurnn import plot

    ax = Figure(figsize=(7, 4)).subplots()
    curves = {"training loss": history}
    held_out = [[row[0], row[4]] for row in history if row[4] is not None]
    if held_out:
        curves["held-out loss"] = held_out
    plot.save(plot.training_curves(curves, ax=ax, title=title), os.path.join(out_dir, "loss.png"))


# ---------------------------------------------------------------------- loop
def sample(model, corpus_vocab, prime, length, temperature, seed=0):
    """Feed ``prime`` through the LM, then draw ``length`` characters one at a time."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise TrainingError(f"--temperature: expected a positive number, got {temperature}")
    index = {ch: i for i, ch in enumerate(corpus_vocab)}
    unknown = sorted(set(prime) - set(index))
    if unknown:
        raise TrainingError(f"--prime: characters not in the model's vocabulary: {''.join(unknown)!r}")
    rng = np.random.default_rng(seed)
    ids = [index[ch] for ch in prime] or [index.get("\n", 0)]
    with np.errstate(over="ignore", invalid="ignore"):  # diverged weights are reported below
        return prime + "".join(_draw(model, corpus_vocab, ids, length, temperature, rng))


def _draw(model, vocab, ids, length, temperature, rng):
    logits, state = model.predict(np.array(ids, np.int32)[:, None])
    for _ in range(length):
        z = to_host(logits[-1, 0]).astype(np.float64) / temperature
        if not np.all(np.isfinite(z)):
            raise TrainingError("the model's outputs are not finite: its weights have diverged")
        p = np.exp(z - z.max())
        nxt = int(rng.choice(len(p), p=p / p.sum()))
        yield vocab[nxt]
        logits, state = model.predict(np.array([[nxt]], np.int32), state)


def banner(cfg, backend, out_dir, world):
    """One line: the task, the model, where it runs and where its files go."""
    ranks = f", {world.size} ranks of a global batch of {cfg['batch']}" if world.size > 1 else ""
    dropout = f" (dropout {cfg['dropout']:g} between layers)" if cfg["dropout"] else ""
    projection = f" projected to {cfg['proj_size']}" if cfg["proj_size"] else ""
    return (f"gpurnn train: {cfg['task']} with a {cfg['layers']}-layer {cfg['cell']} of {cfg['hidden']} units"
            f"{projection}{dropout} on {backend.name} ({backend.reason}){ranks}; output in {out_dir}")


def train(cfg, backend, out_dir, resume, explicit=(), progress=True, log=print, world=None):
    """Run (or continue) a training job; returns (history, task, prime): history rows
    [step, loss, grad norm, tokens/s, held-out loss or None, held-out metric or None];
    prime (charlm) a prompt drawn from the training text, kept in the checkpoint.
    ``explicit``: the settings the user gave; on resume they must match the checkpoint's.

    ``world`` (gpurnn.distributed; None: one process): each rank trains on its shard of
    every global batch, all start from rank 0's parameters, gradients (with the loss)
    are averaged in one collective per step before clipping and the optimizer, so the
    ranks stay identical; rank 0 alone writes files and logs."""
    world = world or distributed.World(backend.name)
    root = world.is_root
    log = log if root else (lambda message: None)
    cfg = {**LATER_SETTINGS, **cfg}
    record = arrays = None
    if resume:
        record, arrays = load_checkpoint(out_dir)
        saved = record["config"]
        clash = [f"--{k.replace('_', '-')} {cfg[k]} (checkpoint: {saved.get(k)})"
                 for k in sorted(explicit) if k in cfg and k != "steps" and saved.get(k, cfg[k]) != cfg[k]]
        if clash:
            raise TrainingError(f"--resume: the checkpoint in {out_dir} was made with other settings: "
                                + ", ".join(clash))
        cfg = {**cfg, **saved, "steps": cfg["steps"]}  # the checkpoint's settings, those it predates filled in
    log(banner(cfg, backend, out_dir, world))  # the model that trains: on --resume, the checkpoint's
    task = Task(cfg, backend, vocab=record["vocab"] if record else None, world=world)
    if root:
        os.makedirs(out_dir, exist_ok=True)  # only once the data and the model are known to work
    model = task.model
    mode = cfg["precision"]
    # half models: the optimizer updates float32 master weights; fp16 also scales the loss
    master = amp.MasterWeights(model) if mode in ("fp16", "bf16") else None
    scaler = amp.LossScaler() if mode == "fp16" else None
    params, grads = (master.params, master.grads) if master else (model.params, model.grads)
    opt = optim.OPTIMIZERS[cfg["optim"]](params, grads, lr=cfg["lr"])
    state, history, step, best_val = None, [], 0, None
    prime = task.corpus.prime(cfg["seed"]) if task.name == "charlm" else None
    rng = model.rnn._rng.bit_generator
    if world.size > 1:  # each rank its own dropout masks
        rng.state = np.random.default_rng([cfg["seed"] or 0, world.rank]).bit_generator.state
    if record:
        state = _shard_state(restore(task, opt, record, arrays, master, scaler), task.shard)
        history = [list(h) + [None] * (6 - len(h)) for h in record["history"]]  # older runs had no held-out columns
        step, best_val = record["step"], record.get("best_val")
        rngs = record.get("rngs") or [record["rng"]]
        if len(rngs) == world.size:
            rng.state = rngs[world.rank]
        elif world.size == 1:
            rng.state = record["rng"]
        else:  # another number of ranks than the checkpoint's: fresh masks per rank
            rng.state = np.random.default_rng([cfg["seed"] or 0, world.rank, step]).bit_generator.state
    world.broadcast(flat.buffer_of(params))  # every rank starts from rank 0's parameters
    if master:
        master.publish()
    title = f"{cfg['task']} / {cfg['cell']}, hidden {cfg['hidden']}"
    if step >= cfg["steps"]:
        if root:  # a kill between the last checkpoint and its metrics left these a step behind it
            write_metrics(out_dir, history, task.name)
            plot_loss(out_dir, history, title)
        log(f"already at step {step} of {cfg['steps']}: nothing to do")
        return history, task, prime
    if record:
        log(f"resuming from step {step} of {cfg['steps']}")

    def save(name="checkpoint.npz"):
        """Rank 0 writes; every rank hands in its carried state and RNG (one collective)."""
        gathered = world.gather((_host_state(state), rng.state))
        if root:
            states, rngs = zip(*gathered)
            save_checkpoint(out_dir, task, opt, step, _join_states(states), history, rngs[0], best_val, prime,
                            name=name, rngs=list(rngs) if world.size > 1 else None, scaler=scaler)

    asked = {"stop": False}  # set by Ctrl-C at any moment; acted on only as agreed in a step's all-reduce
    previous = signal.signal(signal.SIGINT, lambda *_: asked.update(stop=True))  # finish the step, then save
    stopping = False
    bar = None
    if progress and root:
        from tqdm import tqdm

        bar = tqdm(total=cfg["steps"], initial=step, unit="step", dynamic_ncols=True)
    good_step = step
    metric = VAL_METRIC[task.name]
    last_val = next((r for r in reversed(history) if r[4] is not None), None)  # the progress bar shows it
    grad_buffer = flat.buffer_of(grads)
    previous_mode = backend_module.math_mode()
    backend_module.set_math_mode("tf32" if mode == "tf32" else "fp32")  # half GEMMs accumulate in fp32
    try:
        while step < cfg["steps"] and not stopping:
            t0 = time.perf_counter()
            with np.errstate(over="ignore", invalid="ignore"):  # divergence is checked for just below
                loss, new_state = task.loss(step, state)
                loss_scale = scaler.scale if scaler else 1.0
                model.backward(loss_scale=loss_scale)
                if master:
                    master.take_grads(loss_scale)  # widened to float32 and unscaled
                if world.size > 1:  # the step's one collective: gradients, loss and any rank's Ctrl-C
                    loss, votes = world.allreduce_mean(grad_buffer, [float(loss), float(asked["stop"])])
                    stopping = votes > 0  # every rank alike, whenever its own signal came
                else:
                    stopping = asked["stop"]
                norm = optim.global_norm(grads)  # the step's one wait for the GPU
                loss = float(loss)
            overflowed = scaler is not None and math.isfinite(loss) and not math.isfinite(norm)
            if overflowed:  # fp16: the scaled gradients overflowed; skip this step at a lower scale
                scaler.update(found_inf=True)
                if scaler.scale < SMALLEST_LOSS_SCALE:
                    raise Diverged(f"the gradients overflow fp16 at every loss scale (down to {scaler.scale:g}) "
                                   f"at step {step + 1}; the last good checkpoint (step {good_step}) is kept in "
                                   f"{out_dir}. Try --precision bf16 or fp32, --clip-norm 1.0 or a lower --lr")
            elif not (math.isfinite(loss) and math.isfinite(norm)):
                what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {norm}"
                raise Diverged(
                    f"{what} at step {step + 1}; the last good checkpoint (step {good_step}) "
                    f"is kept in {out_dir}. Try --clip-norm 1.0 or a lower --lr")
            else:
                if cfg["clip_norm"]:
                    optim.clip_grad_norm(grads, cfg["clip_norm"], norm)
                elif cfg["clip_value"]:
                    optim.clip_grad_value(grads, cfg["clip_value"], norm)
                opt.step()
                if master:
                    master.publish()  # the updated float32 weights, rounded once into the model
                if scaler:
                    scaler.update(found_inf=False)
            model.zero_grad()
            state = new_state
            step += 1
            tokens_s = task.tokens_per_step() / (time.perf_counter() - t0)  # the global batch's tokens
            row = [step, loss, norm, tokens_s, None, None]
            history.append(row)
            saving = step % cfg["save_every"] == 0 or step == cfg["steps"] or stopping
            if step % cfg["val_every"] == 0 or step == cfg["steps"]:
                with np.errstate(over="ignore", invalid="ignore"):
                    row[4:] = task.validate() or (None, None)  # every rank alike: none waits for another
                if row[4] is not None:
                    last_val = row
                    if best_val is None or row[4] < best_val:
                        best_val = row[4]
                        save("best.npz")
            if bar is not None:
                bar.update(1)
                shown = dict(loss=f"{loss:.4f}", tok_s=f"{tokens_s:,.0f}")
                if last_val is not None:
                    shown.update(val=f"{last_val[4]:.4f}", **{f"val_{metric}": f"{last_val[5]:.4f}"})
                bar.set_postfix(**shown)
            if saving:
                save()
                if root:
                    write_metrics(out_dir, history, task.name)
                good_step = step
    finally:
        backend_module.set_math_mode(previous_mode)
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    if stopping:
        log(f"interrupted: saved step {step} in {out_dir} (continue with --resume)")
    if root:
        plot_loss(out_dir, history, title)
    return history, task, prime


def _host_state(state):
    """The carried state as NumPy arrays (a tuple for the LSTM), or None."""
    return None if state is None else to_host(state if isinstance(state, tuple) else (state,))


def _join_states(states):
    """The global batch's carried state from the ranks' shards (their batch axis is 1), in rank order."""
    if states[0] is None:
        return None
    joined = tuple(np.concatenate(parts, axis=1) for parts in zip(*states))
    return joined if len(joined) == 2 else joined[0]


def _shard_state(state, shard):
    """This rank's part of a checkpoint's carried state."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s[:, shard] for s in state)
    return state[:, shard]
