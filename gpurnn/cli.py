"""The ``gpurnn`` command (also ``python -m gpurnn``): train, sample, diagnose, profile, info.

Usage problems and bad input end with one line on stderr (``gpurnn: error: ...``)
and a non-zero exit code: 2 for bad arguments or data, 3 for a loss that became
NaN/inf, 4 when a rank of a data-parallel run was lost (gpurnn.distributed), 130
for a Ctrl-C before training began. Nothing on disk is touched before the
arguments have been checked. Under mpiexec every rank prefixes its errors with
"rank k: ", and an error on one rank ends them all.
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys

from gpurnn import distributed
from gpurnn.data import DataError
from gpurnn.train import MODEL_DTYPES, TASKS, VAL_BATCHES, projection_problem

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def _int_from(low, words):
    """An argparse type: an integer >= low, ``words`` naming it in the error."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {words}, got {value}")
        return value
    return parse


_positive_int = _int_from(1, "a positive integer")
_non_negative_int = _int_from(0, "a non-negative integer")
_seed = _non_negative_int


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


TRAIN_SIZES = ("hidden", "layers", "seq_len", "batch", "steps", "lr")
NONLINEARITIES = ("tanh", "relu", "sigmoid", "leaky_relu", "elu")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, no usage block: ``gpurnn train: error: argument --hidden: ...``."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _Help(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none (a switch, or a
    size that depends on the task and backend, whose help says so itself)."""

    def _get_help_string(self, action):
        text = action.help or ""
        switch_or_sized = action.default is None or action.default is False  # `in` would take 0 for False
        if switch_or_sized or action.default == argparse.SUPPRESS or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


def _sized(key):
    """The help of a flag whose default depends on the task and the backend."""
    from gpurnn.train import defaults

    per = {task: (defaults(task, "numpy")[key], defaults(task, "cuda")[key]) for task in TASKS}
    cpu, gpu = per["charlm"]
    others = ", ".join(f"{task} {c}" + ("" if c == g else f" / {g}") for task, (c, g) in per.items()
                       if task != "charlm")
    first = f"{cpu} on CPU, {gpu} on a GPU" if cpu != gpu else f"{cpu}"
    return f"(default for charlm: {first}; {others})"


def build_parser():
    ap = _Parser(prog="gpurnn", description="RNN/LSTM/GRU with hand-written BPTT.", formatter_class=_Help)
    sub = ap.add_subparsers(dest="command", required=True)
    parser = lambda name, help: sub.add_parser(name, help=help.replace("%", "%%"), description=help,  # noqa: E731
                                               formatter_class=_Help)  # help is %-formatted, the description not
    backends = dict(choices=("auto", "numpy", "cuda"), default="auto",
                    help="where to run: auto picks cuda when a GPU works, else numpy")

    t = parser("train", "train a model (defaults: a character LM on Python's own stdlib)")
    t.add_argument("--task", choices=TASKS, default="charlm",
                   help="charlm: next-character prediction on --text; adding: the adding problem; "
                        "copy: remember and repeat 10 symbols")
    t.add_argument("--text", help="UTF-8 text file for charlm (default: the Python standard library sources)")
    t.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm", help="the recurrent cell")
    t.add_argument("--nonlinearity", choices=NONLINEARITIES, default="tanh",
                   help="the rnn cell's activation (lstm and gru have fixed ones)")
    t.add_argument("--hidden", type=_positive_int, help=f"hidden units per layer {_sized('hidden')}")
    t.add_argument("--layers", type=_positive_int, help=f"stacked recurrent layers {_sized('layers')}")
    t.add_argument("--proj-size", type=_non_negative_int, default=0,
                   help="lstm: project each layer's state to this many features, below --hidden (torch's "
                        "proj_size; default 0: none)")
    t.add_argument("--dropout", type=_fraction, default=0.0,
                   help="dropout on the outputs of every stacked layer but the last, as torch.nn.LSTM's "
                        "(needs --layers 2 or more); off in held-out evaluation and sampling")
    t.add_argument("--seq-len", type=_positive_int,
                   help=f"time steps per training chunk (truncated BPTT length) {_sized('seq_len')}")
    t.add_argument("--batch", type=_positive_int, help=f"sequences per step {_sized('batch')}")
    t.add_argument("--steps", type=_positive_int,
                   help=f"training steps in all (with --resume: the step to stop at) {_sized('steps')}")
    t.add_argument("--optim", choices=("adam", "sgd", "adagrad"), default="adam", help="the optimizer")
    t.add_argument("--lr", type=_positive_float, help=f"learning rate {_sized('lr')}")
    clip = t.add_mutually_exclusive_group()
    clip.add_argument("--clip-norm", type=_positive_float, default=5.0,
                      help="scale the gradients down to this global norm when above it")
    clip.add_argument("--clip-value", type=_positive_float,
                      help="clamp every gradient element to [-X, X] instead of --clip-norm")
    t.add_argument("--val-fraction", type=_fraction, default=0.05,
                   help="held-out data: charlm the last fraction of the text; adding and copy "
                        f"{VAL_BATCHES} unseen batches whenever it is above 0; 0 turns evaluation off")
    t.add_argument("--val-every", type=_positive_int, default=100,
                   help="evaluate the held-out data every N steps and at the last step; "
                        "the best result is kept in best.npz")
    t.add_argument("--precision", choices=tuple(MODEL_DTYPES), default="fp32",
                   help="fp32; tf32: float32 with TF32 tensor-core GEMMs (CUDA); fp16, bf16: weights and "
                        "activations in half, math in float32, float32 master weights for the optimizer "
                        "(fp16 with dynamic loss scaling)")
    t.add_argument("--backend", **backends)
    t.add_argument("--out", default="runs/latest", help="the run directory (checkpoints, metrics.csv, loss.png)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--seed", type=_seed, default=0, help="seed of the initial weights, dropout and data order")
    t.add_argument("--save-every", type=_positive_int, default=100, help="write the checkpoint every N steps")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--collective-timeout", type=_positive_float, default=distributed.DEFAULT_TIMEOUT,
                   help="under mpiexec: seconds a rank waits for the others at a step's all-reduce before "
                        "ending every rank")

    s = parser("sample", "generate text from a charlm checkpoint")
    s.add_argument("--checkpoint", required=True, help="a run directory written by gpurnn train")
    s.add_argument("--best", action="store_true", help="sample from best.npz (lowest held-out loss) "
                                                       "instead of the latest checkpoint")
    s.add_argument("--prime", help="text to start from (default: the start of a line of the training text, "
                                   "chosen when the run began)")
    s.add_argument("--length", type=_positive_int, default=300, help="characters to generate")
    s.add_argument("--temperature", type=_positive_float, default=0.8,
                   help="divide the logits by this: lower is more conservative")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the random draws")
    s.add_argument("--backend", **backends)

    d = parser("diagnose", "how the gradient decays (or explodes) back through time")
    d.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm", help="the recurrent cell")
    d.add_argument("--nonlinearity", choices=NONLINEARITIES, default="tanh", help="the rnn cell's activation")
    d.add_argument("--seq-len", type=_positive_int, default=100, help="time steps to backpropagate through")
    d.add_argument("--hidden", type=_positive_int, default=32, help="hidden units (also the input size)")
    d.add_argument("--batch", type=_positive_int, default=8, help="sequences in the batch")
    d.add_argument("--init-scale", type=_positive_float, default=1.0,
                   help="multiply the recurrent weights W_hh by this after the standard init")
    d.add_argument("--forget-bias", type=float, help="LSTM: set the forget-gate bias (e.g. 1.0; default: as initialised)")
    d.add_argument("--seed", type=_seed, default=0, help="seed of the weights and the input")
    d.add_argument("--out", default="gradient_flow.png", help="where to write the plot")
    d.add_argument("--backend", **backends)

    p = parser("profile", "where a layer's time goes: per-phase times, the algorithm chosen, % of the GEMM ceiling")
    p.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm", help="the recurrent cell")
    p.add_argument("--nonlinearity", choices=NONLINEARITIES, default="tanh", help="the rnn cell's activation")
    p.add_argument("--hidden", type=_positive_int, default=512, help="hidden units per layer")
    p.add_argument("--input-size", type=_positive_int, help="input features (default: --hidden)")
    p.add_argument("--layers", type=_positive_int, default=1, help="stacked recurrent layers")
    p.add_argument("--proj-size", type=_non_negative_int, default=0,
                   help="lstm: the projection's size, below --hidden (torch's proj_size; default 0: none)")
    p.add_argument("--bidirectional", action="store_true", help="two directions per layer")
    p.add_argument("--seq-len", type=_positive_int, default=100, help="time steps")
    p.add_argument("--batch", type=_positive_int, default=64, help="sequences in the batch")
    p.add_argument("--pass", dest="passes", choices=("fwd", "fwd+bwd"), default="fwd+bwd",
                   help="profile the forward alone (an inference forward) or forward and backward")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                   help="parameter and activation type")
    p.add_argument("--precision", choices=("fp32", "tf32"), default="fp32",
                   help="float32 GEMMs strict or on TF32 tensor cores (CUDA)")
    p.add_argument("--algorithm", choices=("auto", "graph", "fused", "persistent"), default="auto",
                   help="the recurrence algorithm: auto times each at the first call and keeps the fastest")
    p.add_argument("--repeats", type=_positive_int, default=10, help="calls averaged for the total time")
    p.add_argument("--backend", **backends)

    parser("info", "the backend chosen and why, versions, GPU name, recurrence algorithms")
    return ap


def _backend(name):
    from gpurnn.backend import get_backend

    return get_backend(None if name == "auto" else name)


def _nonlinearity(args):
    """The layer's nonlinearity argument: --nonlinearity for an rnn cell; for the others,
    whose activations are fixed, a --nonlinearity other than the default is refused."""
    if args.cell == "rnn":
        return dict(nonlinearity=args.nonlinearity)
    if args.nonlinearity != "tanh":
        raise DataError(f"--nonlinearity {args.nonlinearity}: only the rnn cell has one, not {args.cell}")
    return {}


def cmd_train(args, explicit):
    from gpurnn import train as training

    distributed.use_local_gpu()  # under mpiexec: this rank's GPU, before the CUDA backend starts
    backend = _backend(args.backend)
    world = distributed.init(backend, args.collective_timeout)
    if args.text is not None and args.task != "charlm":
        raise DataError("--text: only the charlm task reads a text file")
    if args.text is not None and not os.path.isfile(args.text):
        raise DataError(f"--text {args.text}: no such file")
    cfg = dict(task=args.task, text=args.text, cell=args.cell, nonlinearity=args.nonlinearity, optim=args.optim,
               clip_norm=None if args.clip_value else args.clip_norm, clip_value=args.clip_value,
               seed=args.seed, save_every=args.save_every, val_fraction=args.val_fraction, val_every=args.val_every,
               precision=args.precision, dropout=args.dropout, proj_size=args.proj_size)
    sizes = training.defaults(args.task, backend.name)
    for key in TRAIN_SIZES:
        cfg[key] = getattr(args, key) if getattr(args, key) is not None else sizes[key]
    if cfg["task"] == "adding" and cfg["seq_len"] < 2:  # one marker in each half of the sequence
        raise DataError(f"--seq-len: the adding task needs at least 2 steps, got {cfg['seq_len']}")
    history, task, prime = training.train(cfg, backend, args.out, args.resume, explicit,
                                          progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr),
                                          world=world)
    if not world.is_root:
        return
    if history:
        first, last = history[0][1], history[-1][1]
        held_out = next((r for r in reversed(history) if r[4] is not None), None)
        metric = training.VAL_METRIC[task.name]
        val = f"; held-out loss {held_out[4]:.4f}, {metric} {held_out[5]:.4f} (step {held_out[0]})" if held_out else ""
        print(f"step {history[-1][0]}: loss {last:.4f} (first step {first:.4f}){val}; "
              f"{os.path.join(args.out, 'metrics.csv')}, loss.png, checkpoint.npz" + (", best.npz" if held_out else ""))
    if task.name == "charlm":
        print("--- sample ---")
        try:
            print(training.sample(task.model, task.vocab, prime, 300, 0.8, seed=args.seed))
        except training.TrainingError as exc:  # the training itself succeeded: its exit status says so
            print(f"gpurnn: warning: no sample: {exc}", file=sys.stderr)


def cmd_sample(args):
    from gpurnn import train as training
    from gpurnn.model import CharLM

    record, arrays = training.load_checkpoint(args.checkpoint, "best.npz" if args.best else "checkpoint.npz")
    cfg = record["config"]
    if cfg["task"] != "charlm" or not record.get("vocab"):
        raise training.TrainingError(f"{args.checkpoint}: a {cfg['task']} checkpoint; sample needs a charlm one")
    model = CharLM(len(record["vocab"]), cfg["hidden"], num_layers=cfg["layers"], cell=cfg["cell"],
                   nonlinearity=cfg["nonlinearity"], proj_size=cfg["proj_size"],
                   backend=_backend(args.backend).name)
    try:
        model.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
    except (ValueError, TypeError) as exc:
        raise training.TrainingError(f"{args.checkpoint}: the checkpoint does not fit its model: {exc}") from None
    prime = args.prime if args.prime is not None else (record.get("prime") or "")
    print(training.sample(model, record["vocab"], prime, args.length, args.temperature, args.seed))


def cmd_diagnose(args):
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from gpurnn import diagnostics, plot
    from gpurnn.model import CELLS

    if not args.out.lower().endswith(".png"):
        raise DataError(f"--out: expected a .png file name, got {args.out!r}")
    if args.forget_bias is not None and args.cell != "lstm":
        raise DataError("--forget-bias: only the lstm cell has a forget gate")
    kwargs = _nonlinearity(args)
    backend = _backend(args.backend)
    model = CELLS[args.cell](args.hidden, args.hidden, seed=args.seed, dtype="float64", backend=backend, **kwargs)
    for name, p in model.params.items():
        if name.startswith("weight_hh"):
            p *= args.init_scale
    if args.forget_bias is not None:
        diagnostics.set_forget_bias(model, args.forget_bias)
    x = np.random.default_rng(args.seed).standard_normal((args.seq_len, args.batch, args.hidden))
    flow = diagnostics.gradient_flow(model, x)
    rel = flow.at_distance(0) / flow.at_distance(0)[0]
    label = args.cell if args.cell != "rnn" else f"rnn ({args.nonlinearity})"
    rho = diagnostics.spectral_radius(model.params["weight_hh_l0"]) if args.cell == "rnn" else None
    print(f"{label}, hidden {args.hidden}, T={args.seq_len}, W_hh x {args.init_scale}"
          + (f", spectral radius of W_hh {rho:.2f}" if rho is not None else ""))
    print("gradient from the last step; ||dL/dh_t|| relative to the last step, by distance:")
    print(f"{'distance':>10}{'norm':>12}")
    last = args.seq_len - 1
    for k in sorted({k for k in (1, 10, 50, 100, 200, 500, 1000) if k < last} | {last}):
        print(f"{k:>10}{rel[k]:>12.3e}")
    print(f"mean local gain ||dh_t/dh_t-1|| along the gradient: {flow.jac[0].mean():.3f}")
    plot.save(plot.gradient_flow({label: flow}), args.out)
    print(f"plot: {args.out}")


def cmd_profile(args):
    from gpurnn import backend as backend_module
    from gpurnn import profile

    backend = _backend(args.backend)
    backend_module.set_math_mode(args.precision)
    backend_module.set_rnn_algorithm(None if args.algorithm == "auto" else args.algorithm)
    kwargs = _nonlinearity(args)
    problem = projection_problem(args.cell, args.proj_size, args.hidden)
    if problem:
        raise DataError(problem)
    result = profile.profile_layer(args.cell, args.hidden, args.layers, args.seq_len, args.batch, args.input_size,
                                   args.bidirectional, args.passes == "fwd+bwd", args.dtype, args.repeats, backend,
                                   proj_size=args.proj_size, **kwargs)
    sizes = (f"T={args.seq_len} B={args.batch} I={args.input_size or args.hidden} H={args.hidden}"
             f"{f' P={args.proj_size}' if args.proj_size else ''} L={args.layers}"
             f"{' bidirectional' if args.bidirectional else ''} {args.dtype} {args.passes}")
    print("\n".join(profile.report(result, args.cell, sizes)))


def cmd_info():
    import numpy

    import gpurnn

    backend = gpurnn.get_backend()
    print(f"gpurnn {gpurnn.__version__}  Python {platform.python_version()}  NumPy {numpy.__version__}")
    print(f"backend: {backend.name} ({backend.reason})")
    for module in ("cupy", "numba", "torch"):
        try:
            mod = __import__(module)
            print(f"{module}: {mod.__version__}")
        except ImportError:
            print(f"{module}: not installed")
    print(mpi_line())
    nccl = nccl_line()
    if nccl:
        print(nccl)
    if backend.name == "cuda":
        props = backend.xp.cuda.runtime.getDeviceProperties(backend.xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"GPU: {name}")
    forced = gpurnn.backend.rnn_algorithm()
    print(f"recurrence algorithm: {forced + ' (forced)' if forced else 'chosen per shape at its first call'}"
          + ("" if backend.name in ("cuda", "cudasim") else "; numpy runs graph only"))
    choices = getattr(backend.ops, "choices", None)
    if choices is not None:
        stored = choices.entries()
        print(f"stored choices: {len(stored)} shape(s) in {choices.path}")
        for shape, entry in sorted(stored.items()):
            print(f"  {shape}: {entry.get('algorithm')}")


# run in a process of its own, so that gpurnn info's caller keeps its MPI as it was (not
# imported, or started: mpi4py starts MPI when it is imported)
_MPI_PROBE = """
import json, mpi4py
mpi4py.rc.initialize = False  # load the library and ask it; start nothing
try:
    from mpi4py import MPI
except RuntimeError as exc:  # mpi4py's error where it finds no MPI library
    print(json.dumps([mpi4py.__version__, None, str(exc)]))
else:
    print(json.dumps([mpi4py.__version__, MPI.Get_library_version(), None]))
"""


def mpi_line():
    """mpi4py's version and the MPI library it loads, which data-parallel training needs."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py: not installed (data-parallel training: pip install 'gpurnn[mpi]')"
    done = subprocess.run([sys.executable, "-c", _MPI_PROBE], capture_output=True, text=True, timeout=120)
    if done.returncode:
        return f"mpi4py: does not import ({(done.stderr.strip().splitlines() or ['no output'])[-1]})"
    version, library, error = json.loads(done.stdout)
    if error is not None:
        return f"mpi4py: {version}, but it cannot load an MPI library ({distributed.one_line(error)}): " \
               "pip install 'gpurnn[mpi]'"
    return f"mpi4py: {version} ({' '.join(library.splitlines()[0].split())})"


def nccl_line():
    """Whether CuPy loads NCCL, which ranks on GPUs all-reduce with; None without CuPy."""
    from gpurnn.backend import BackendUnavailable, load_nccl

    try:
        code = load_nccl().get_version()  # major * 10000 + minor * 100 + patch
    except ImportError:
        return None
    except BackendUnavailable as exc:
        return f"NCCL: {exc}"
    return f"NCCL: {code // 10000}.{code // 100 % 100}.{code % 100}"


def _rank_prefix():
    """"rank k: " under mpiexec (every rank reports its own error), else nothing."""
    rank = distributed.launched_rank()
    return f"rank {rank}: " if distributed.launched_size() > 1 else ""


def main(argv=None):
    from gpurnn.backend import BackendUnavailable
    from gpurnn.train import Diverged, TrainingError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    explicit = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    try:
        if args.command == "train":
            cmd_train(args, explicit)
        elif args.command == "sample":
            cmd_sample(args)
        elif args.command == "diagnose":
            cmd_diagnose(args)
        elif args.command == "profile":
            cmd_profile(args)
        else:
            cmd_info()
    except TrainingError as exc:
        return _fail(exc, EXIT_DIVERGED if isinstance(exc, Diverged) else EXIT_USAGE)
    except (DataError, BackendUnavailable, distributed.DistributedError, ValueError, TypeError, OSError) as exc:
        return _fail(exc, EXIT_USAGE)
    except KeyboardInterrupt:  # before training's own Ctrl-C handling was in place
        return _fail("interrupted", EXIT_INTERRUPTED)
    return 0


def _fail(message, status):
    """The one error line; under mpiexec this rank's error ends every rank."""
    print(f"gpurnn: error: {_rank_prefix()}{message}", file=sys.stderr)
    distributed.abort_if_launched(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
