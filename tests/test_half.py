"""float16 and bfloat16 models: stored in half, computed in float32, rounded once.

The NumPy backend is the reference (gpurnn.precision): a half model lies within
precision.TOLERANCES of the same model in float32, each step equals the float32
spec rounded once, and the CUDA kernels (in the simulator) equal the reference.
Training keeps float32 master weights (gpurnn.amp) and, for fp16, a loss scaler.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import gpurnn
from gpurnn import amp, cells, optim, precision
from gpurnn.backend import NumpyOps
from gpurnn.data import adding_problem

from helpers import BFLOAT16, MODELS as CELLS, backend_or_skip, blocks_run_together, forced_algorithm, needs_ml_dtypes

HALF = ("float16", BFLOAT16)


def cudasim_backend():
    return backend_or_skip("cudasim", "cudasim unavailable in this process")


def _relative(a, ref):
    """Largest difference over the largest reference magnitude (how TOLERANCES are stated)."""
    a, ref = np.asarray(a).astype(np.float64), np.asarray(ref).astype(np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def _pair(cell, dtype, backend="numpy", seed=0, **kwargs):
    """The same layer in float32 and in dtype (the half one holding the float32 weights rounded)."""
    full = CELLS[cell](6, 16, seed=seed, backend="numpy", **kwargs)
    half = CELLS[cell](6, 16, seed=seed, backend=backend, dtype=dtype, **kwargs)
    half.load_state_dict(full.state_dict())
    full.load_state_dict({k: v.astype(half.dtype).astype(np.float32) for k, v in full.state_dict().items()})
    return full, half


PROJECTED = {"lstm proj_size=5": {"proj_size": 5}}  # an LSTM with torch's projection


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "lstm proj_size=5"])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_half_model_within_tolerance_of_float32(dtype, cell, layers, bidirectional):
    full, half = _pair(cell.split()[0], dtype, num_layers=layers, bidirectional=bidirectional,
                       **PROJECTED.get(cell, {}))
    rng = np.random.default_rng(1)
    T, B, D = 30, 5, 2 if bidirectional else 1
    x = rng.standard_normal((T, B, 6)).astype(half.dtype)  # representable in both: only the math differs
    d_out = rng.standard_normal((T, B, D * (half.proj_size or 16))).astype(half.dtype)
    lengths = np.array([30, 17, 30, 4, 1])
    out_full, _ = full(x.astype(np.float32), lengths=lengths)
    out_half, _ = half(x, lengths=lengths)
    assert out_half.dtype == half.dtype
    dx_full = full.backward(d_out.astype(np.float32))[0]
    dx_half = half.backward(d_out)[0]
    tol = precision.TOLERANCES[dtype]
    assert _relative(out_half, out_full) < tol["output"]
    assert _relative(dx_half, dx_full) < tol["gradient"]
    for name in full.grads:
        assert half.grads[name].dtype == half.dtype
        assert _relative(half.grads[name], full.grads[name]) < tol["gradient"], name


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("step", [cells.lstm_forward, cells.lstm_backward, cells.gru_forward, cells.gru_backward,
                                  cells.project_forward, cells.project_backward])
def test_a_half_step_is_the_float32_step_rounded_once(dtype, step):
    """Half buffers in, the float32 spec on them, results rounded once: nothing else."""
    rng = np.random.default_rng(2)
    half_type = precision.dtype("dtype", dtype)
    T, B, H = 3, 4, 5
    G = 4 if step.__name__.startswith("lstm") else 3
    shapes = dict(gx=(T, B, G * H), gh=(B, G * H), b_ih=(G * H,), b_hh=(G * H,), h=(T + 1, B, H),
                  c=(T + 1, B, H), gates=(T, B, 4 * H), y=(T, B, H), dy=(T, B, H), dh=(B, H), dc=(B, H),
                  dgates=(T, B, 4 * H), hp=(B, H), dproj=(T, B, H))
    names = step.__code__.co_varnames[2:step.__code__.co_argcount]
    half_args, wide_args = [], []
    for name in names:
        if name == "lengths":
            value = np.array([3, 1, 2, 3])
            half_args.append(value)
            wide_args.append(value)
            continue
        value = rng.uniform(0.05, 0.95, shapes[name]).astype(half_type)  # saved gates look like activations
        half_args.append(value)
        wide_args.append(value.astype(np.float32))
    t = 1
    NumpyOps.__dict__[step.__name__].__func__(t, 0, *half_args)
    step(t, 0, *wide_args)
    for name, h, w in zip(names, half_args, wide_args):
        if name != "lengths":
            np.testing.assert_array_equal(h, w.astype(half_type), err_msg=name)


@pytest.mark.parametrize("dtype", HALF)
def test_half_gemm_sums_in_float32_and_rounds_once(dtype):
    rng = np.random.default_rng(3)
    half_type = precision.dtype("dtype", dtype)
    a = rng.standard_normal((7, 300)).astype(half_type)
    b = rng.standard_normal((300, 5)).astype(half_type)
    out = rng.standard_normal((7, 5)).astype(half_type)
    expected = (a.astype(np.float32) @ b.astype(np.float32) + out.astype(np.float32)).astype(half_type)
    NumpyOps.gemm(a, b, out, beta=1.0)
    np.testing.assert_array_equal(out, expected)


def _same(a, b, what=""):
    """Equal element by element (widened: NumPy compares no bfloat16; widening is exact)."""
    np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32), err_msg=what)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru", "lstm proj_size=3"])
def test_half_kernels_equal_the_numpy_reference(cell, dtype):
    """The CUDA step kernels on half buffers (simulator; bfloat16 as uint16 bits) against
    the NumPy half reference, bit for bit."""
    sim = cudasim_backend()
    projection = {"proj_size": 3} if "proj_size" in cell else {}
    cell = cell.split()[0]
    ref = CELLS[cell](3, 5, num_layers=2, bidirectional=True, seed=4, backend="numpy", dtype=dtype, **projection)
    model = CELLS[cell](3, 5, num_layers=2, bidirectional=True, seed=4, backend=sim, dtype=dtype, **projection)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 2, 3)).astype(ref.dtype)
    d_out = rng.standard_normal((4, 2, 2 * (ref.proj_size or 5))).astype(ref.dtype)
    lengths = np.array([4, 2])
    out_ref, state_ref = ref(x, lengths=lengths)
    out, state = model(x, lengths=lengths)
    assert model.algorithms == {"forward": "graph"} and out.dtype == ref.dtype
    _same(out, out_ref)
    _same(ref.backward(d_out)[0], model.backward(d_out)[0])
    for name in ref.grads:
        _same(model.grads[name], ref.grads[name], name)


@pytest.mark.parametrize("dtype", HALF)
def test_half_charlm_on_the_simulator_equals_numpy(dtype):
    """The embedding folded into the first layer (gather_rows, one_hot on half) and the head."""
    sim = cudasim_backend()
    ids = np.random.default_rng(6).integers(0, 7, (5, 3))
    losses = []
    for backend in ("numpy", sim):
        lm = gpurnn.CharLM(7, 8, cell="gru", embedding_dim=8, dtype=dtype, seed=7, backend=backend)
        loss, _ = lm(ids[:-1], ids[1:])
        lm.backward(loss_scale=1024.0)
        losses.append((float(loss), np.array(gpurnn.to_host(lm.grads["rnn.weight_ih_l0"]))))
    assert losses[0][0] == losses[1][0]
    _same(losses[0][1], losses[1][1])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("algorithm, blocks", [("fused", "one after another"), ("persistent", "one"),
                                               ("persistent", "many at once")])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_half_fused_and_persistent_kernels_match_the_reference(monkeypatch, algorithm, blocks, cell, dtype):
    """Their dot products sum in float32 in their own order (not the GEMM's): within one
    half rounding of the NumPy half reference, element by element. A persistent launch
    also as a GPU runs it, many blocks at once, each with its slice of the half W_hh."""
    sim = cudasim_backend()
    if blocks == "many at once":
        blocks_run_together(monkeypatch)
        monkeypatch.setattr(sim.ops, "sm_count", 32)
        monkeypatch.setattr(sim.ops, "_resident_blocks", lambda *launch: 1000)  # a GPU's, not the simulator's 1
        for phase in ("forward", "backward"):
            assert sim.ops.persistent_plan(cell, phase, np.dtype(dtype), 3, 6, 1)[2] > 2  # the case tested
    ref = CELLS[cell](3, 6, bidirectional=True, seed=8, backend="numpy", dtype=dtype)
    model = CELLS[cell](3, 6, bidirectional=True, seed=8, backend=sim, dtype=dtype)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((5, 3, 3)).astype(ref.dtype)
    d_out = rng.standard_normal((5, 3, 12)).astype(ref.dtype)
    lengths = np.array([5, 2, 4])
    with forced_algorithm(algorithm):
        got = [model(x, lengths=lengths)[0], model.backward(d_out)[0]]
    assert model.algorithms == {"forward": algorithm, "backward": algorithm}
    expect = [ref(x, lengths=lengths)[0], ref.backward(d_out)[0]]
    for a, b in zip(got + [model.grads[k] for k in ref.grads], expect + [ref.grads[k] for k in ref.grads]):
        assert a.dtype == ref.dtype
        assert _relative(a, b) < precision.TOLERANCES[ref.dtype.name]["output"]


@pytest.mark.parametrize("dtype", HALF)
def test_half_fused_steps_with_split_dot_products(monkeypatch, dtype):
    """Threads that share an element's dot products (fused.split_of, as at small shapes on
    a GPU) add their float32 sums in shared memory of float32 beside the half rows."""
    from gpurnn.cuda import fused

    sim = cudasim_backend()
    monkeypatch.setattr(sim.ops, "sm_count", 64)  # a unit a block, threads to spare
    assert fused.block_shape("lstm", "forward", 2, 32, 1, 2)[0] > 1
    ref = CELLS["lstm"](3, 32, bidirectional=True, seed=8, backend="numpy", dtype=dtype)
    model = CELLS["lstm"](3, 32, bidirectional=True, seed=8, backend=sim, dtype=dtype)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 2, 3)).astype(ref.dtype)
    d_out = rng.standard_normal((3, 2, 64)).astype(ref.dtype)
    lengths = np.array([3, 2])
    with forced_algorithm("fused"):
        got = [model(x, lengths=lengths)[0], model.backward(d_out)[0]]
    expect = [ref(x, lengths=lengths)[0], ref.backward(d_out)[0]]
    for a, b in zip(got + [model.grads[k] for k in ref.grads], expect + [ref.grads[k] for k in ref.grads]):
        assert _relative(a, b) < precision.TOLERANCES[ref.dtype.name]["output"]


@needs_ml_dtypes
def test_bfloat16_conversions_round_as_ml_dtypes():
    """The kernels' bfloat16 store (LLVM IR, run here through a CPU intrinsic) and the
    simulator's both round as ml_dtypes does, bit for bit: ties to even, subnormals,
    overflow to infinity, NaN kept quiet with its sign; the load is exact."""
    cudasim_backend()  # numba.cuda in simulator mode before anything imports it
    from numba import njit, types
    from numba.extending import intrinsic

    from gpurnn.cuda import kernels

    @intrinsic
    def to_bits(typingctx, v):
        return types.uint16(v), lambda context, builder, sig, args: kernels.bfloat16_bits(builder, args[0])

    @intrinsic
    def from_bits(typingctx, v):
        return types.float32(v), lambda context, builder, sig, args: kernels.bfloat16_value(builder, args[0])

    @njit
    def convert(x, bits, back):
        for i in range(x.size):
            bits[i] = to_bits(x[i])
            back[i] = from_bits(bits[i])

    rng = np.random.default_rng(12)
    special = [0, 1 << 31, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7F7FFFFF,
               0xFF7FFFFF, 1, 0x8000, 0x18000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x007FFFFF]
    x = np.concatenate([rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32),
                        np.array(special, np.uint32)]).view(np.float32)
    bits, back = np.empty(x.size, np.uint16), np.empty(x.size, np.float32)
    convert(x, bits, back)
    with np.errstate(invalid="ignore"):  # NaN into bfloat16
        expect = x.astype(precision.bfloat16()).view(np.uint16)
    np.testing.assert_array_equal(bits, expect)
    np.testing.assert_array_equal(back.view(np.uint32), expect.astype(np.uint32) << 16)
    like = np.empty(0, np.uint16)  # the simulator's twins: the same rounding in Python integers
    for value, want in zip(x[-len(special):], expect[-len(special):]):
        assert kernels.narrow(value, like) == want, hex(int(np.float32(value).view(np.uint32)))
        assert kernels.wide(want).view(np.uint32) == np.uint32(want) << 16
    sample = rng.choice(x.size, 2000, replace=False)
    assert [int(kernels.narrow(v, like)) for v in x[sample]] == expect[sample].tolist()


@needs_ml_dtypes
def test_bfloat16_needs_cupys_bfloat16_on_a_gpu():
    """A CuPy without bfloat16 arrays: a TypeError naming what is missing, before anything runs."""
    cudasim_backend()  # numba.cuda in simulator mode before anything imports it
    from gpurnn.cuda import ops as cuda_ops

    class NoBfloat16:  # the part of an older CuPy that check_dtype touches
        __version__ = "13.6.0"

        @staticmethod
        def ones(shape, dtype):
            raise TypeError(f"Unsupported type {dtype}")

    ops = cuda_ops.CudaOps.__new__(cuda_ops.CudaOps)
    ops.simulate, ops.xp, ops._bfloat16_missing = False, np, None  # NumPy with ml_dtypes: what the probe asks for
    ops.check_dtype(precision.bfloat16())
    ops.xp, ops._bfloat16_missing = NoBfloat16, None
    ops.check_dtype("float16")
    with pytest.raises(TypeError, match=r"dtype: bfloat16 on the CUDA backend needs CuPy's bfloat16 arrays "
                                        r"\(CuPy >= 14 with ml_dtypes installed\); this CuPy 13.6.0 has none "
                                        r"\(TypeError: Unsupported type bfloat16\)"):
        ops.check_dtype("bfloat16")  # by name, as gpurnn.torch and --precision bf16 ask


def test_master_weights_and_loss_scaler():
    model = gpurnn.SequenceRegressor(2, 8, seed=0, dtype="float16", backend="numpy")
    master = amp.MasterWeights(model)
    for name, p in master.params.items():
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p, model.params[name].astype(np.float32))
    scaler = amp.LossScaler(init_scale=1024.0, growth_interval=2)
    opt = optim.SGD(master.params, master.grads, lr=0.1)
    x, y = adding_problem(4, 5, 0)

    def step(inject_inf=False):
        model(x.astype(np.float16), y)
        with np.errstate(over="ignore", invalid="ignore"):
            model.backward(loss_scale=scaler.scale)
        if inject_inf:
            model.grads["head.bias"][0] = np.inf
        master.take_grads(scaler.scale)
        norm = optim.global_norm(master.grads)
        if math.isfinite(norm):
            opt.step()
            master.publish()
        scaler.update(found_inf=not math.isfinite(norm))
        model.zero_grad()

    before = {n: p.copy() for n, p in master.params.items()}
    step(inject_inf=True)  # skipped: nothing moves, the scale halves
    assert scaler.scale == 512.0 and scaler.skipped == 1
    for name, p in master.params.items():
        np.testing.assert_array_equal(p, before[name])
    step()
    step()  # two good steps in a row: the scale doubles again
    assert scaler.scale == 1024.0 and scaler.skipped == 1
    assert any(not np.array_equal(p, before[n]) for n, p in master.params.items())
    for name, p in master.params.items():  # the model holds the master weights rounded
        np.testing.assert_array_equal(model.params[name], p.astype(np.float16))


def test_unscaled_gradients_match_an_unscaled_backward():
    model = gpurnn.SequenceRegressor(2, 8, seed=0, dtype="float16", backend="numpy")
    master = amp.MasterWeights(model)
    x, y = adding_problem(4, 5, 0)
    grads = []
    for scale in (1.0, 256.0):
        model(x.astype(np.float16), y)
        model.backward(loss_scale=scale)
        master.take_grads(scale)
        grads.append(master.grad_buffer.copy())
        model.zero_grad()
    assert _relative(grads[1], grads[0]) < precision.TOLERANCES["float16"]["gradient"]


def test_master_weights_refuse_a_full_precision_model():
    with pytest.raises(TypeError, match="model: expected a float16 or bfloat16 model, got dtype float32"):
        amp.MasterWeights(gpurnn.SequenceRegressor(2, 4, backend="numpy"))
    with pytest.raises(ValueError, match=r"backoff_factor: expected a number in \(0, 1\), got 1.5"):
        amp.LossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_factor: expected a number >= 1, got 0.5"):
        amp.LossScaler(growth_factor=0.5)
    with pytest.raises(ValueError, match="init_scale: expected a positive finite number, got inf"):
        amp.LossScaler(init_scale=float("inf"))
    with pytest.raises(TypeError, match="init_scale: expected a number, got '1024'"):
        amp.LossScaler(init_scale="1024")
    assert amp.LossScaler(init_scale=np.float32(8)).scale == 8.0  # NumPy scalars are numbers too


@pytest.mark.parametrize("dtype", HALF)
def test_adding_problem_trains_in_half_like_float32(dtype):
    """400 Adam steps of the adding problem (T=10): the half run learns it as float32 does
    (predicting the mean gives MSE ~0.167; float32 ends near 0.006)."""
    finals = {}
    for kind in ("float32", dtype):
        model = gpurnn.SequenceRegressor(2, 32, seed=0, dtype=kind, backend="numpy")
        master = amp.MasterWeights(model) if kind != "float32" else None
        params, grads = (master.params, master.grads) if master else (model.params, model.grads)
        opt = optim.Adam(params, grads, lr=1e-2)
        scaler = amp.LossScaler() if kind == "float16" else None
        losses = []
        for step in range(400):
            x, y = adding_problem(64, 10, step)
            loss, _ = model(x.astype(model.rnn.dtype), y)
            scale = scaler.scale if scaler else 1.0
            with np.errstate(over="ignore", invalid="ignore"):  # fp16 overflow at a high scale is expected
                model.backward(loss_scale=scale)
                if master:
                    master.take_grads(scale)
                norm = optim.global_norm(grads)
            if math.isfinite(norm):
                optim.clip_grad_norm(grads, 5.0, norm)
                opt.step()
                if master:
                    master.publish()
            if scaler:
                scaler.update(found_inf=not math.isfinite(norm))
            model.zero_grad()
            losses.append(loss)
        finals[kind] = float(np.mean(losses[-50:]))
    assert finals["float32"] < 0.03, finals
    assert finals[dtype] < 1.5 * finals["float32"], finals


def test_half_memory_is_half_of_float32():
    """Every float buffer a model holds (parameters, gradients, workspaces) is half the bytes."""
    totals = {}
    for dtype in ("float32", "float16"):
        model = gpurnn.CharLM(20, 32, num_layers=2, dtype=dtype, seed=0, backend="numpy")
        ids = np.random.default_rng(0).integers(0, 20, (17, 8))
        model(ids[:-1], ids[1:])
        model.backward()
        totals[dtype] = model.memory_report().total
    assert totals["float16"] <= 0.55 * totals["float32"], totals


def _train(out, precision_flag, steps, resume=False):
    cmd = [sys.executable, "-m", "gpurnn", "train", "--task", "charlm", "--text", out + ".txt", "--hidden", "16",
           "--seq-len", "16", "--batch", "4", "--steps", str(steps), "--val-every", "5", "--save-every", "5",
           "--backend", "numpy", "--no-progress", "--out", out, "--precision", precision_flag]
    done = subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True,
                          env={**os.environ, "GPURNN_BACKEND": "numpy"})
    assert done.returncode == 0, done.stderr
    with open(os.path.join(out, "metrics.csv")) as f:
        return [line.split(",")[1] for line in f.read().splitlines()[1:]]


@pytest.mark.parametrize("flag", ["fp16", pytest.param("bf16", marks=needs_ml_dtypes)])
def test_cli_half_training_resumes_exactly(tmp_path, flag):
    text = "the quick brown fox jumps over the lazy dog; " * 40
    for run in ("whole", "split"):
        (tmp_path / f"{run}.txt").write_text(text)
    whole = _train(str(tmp_path / "whole"), flag, 10)
    _train(str(tmp_path / "split"), flag, 5)
    split = _train(str(tmp_path / "split"), flag, 10, resume=True)
    assert split == whole  # master weights, optimizer and loss scale all came back
    with np.load(tmp_path / "whole" / "checkpoint.npz") as z:
        assert z["param/rnn.weight_hh_l0"].dtype == np.float32  # the master copy is what is saved
        record = json.loads(z["record"].tobytes().decode())
    assert record["config"]["precision"] == flag
    assert ("loss_scaler" in record) == (flag == "fp16")


@needs_ml_dtypes
def test_cli_bfloat16_training_on_the_simulator_equals_numpy(tmp_path, capsys, monkeypatch):
    """`gpurnn train --precision bf16` through the CUDA code path (kernels on uint16 bits,
    master weights, checkpoint) gives the NumPy reference's losses, bit for bit."""
    from gpurnn import cli

    cudasim_backend()
    losses = {}
    for backend in ("numpy", "cudasim"):
        monkeypatch.setenv("GPURNN_BACKEND", backend)  # --backend auto: the simulator is asked for by environment
        out = tmp_path / backend
        args = ["train", "--task", "adding", "--precision", "bf16", "--hidden", "8", "--batch", "4", "--steps", "3",
                "--seq-len", "6", "--val-every", "3", "--no-progress", "--out", str(out)]
        assert cli.main(args) == 0, capsys.readouterr().err
        assert f"on {backend} (" in capsys.readouterr().err
        losses[backend] = [row.split(",")[1::3] for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert len(losses["numpy"]) == 3 and losses["cudasim"] == losses["numpy"]
