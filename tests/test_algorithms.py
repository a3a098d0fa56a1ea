"""The recurrence algorithms (graph, fused, persistent) and the choice among them.

Under numba's CUDA simulator: the fused step kernels and the persistent
kernels (one block, or many run at once by blocks_run_together: the simulator runs
blocks one after another, where a barrier between two never opens) against the
NumPy spec, through whole models, forward and BPTT, odd shapes, lengths, reverse
directions, every RNN nonlinearity; the bounded barrier giving up instead of hanging; the
algorithm chooser with a fake timing table, its on-disk cache read back in a
second process, and forced algorithms that cannot run a shape.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gpurnn
from gpurnn.cells import NONLINEARITIES
from gpurnn.cuda.algorithms import Choices, fastest
from helpers import back, backend_or_skip, blocks_run_together, forced_algorithm, make, rel_err, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sim():
    return backend_or_skip("cudasim", "cudasim unavailable in this process")


def compare(cell, algorithm, I, H, T, B, lengths=None, seed=0, **kw):
    """A cudasim model forced to ``algorithm`` against the numpy model: outputs, final
    states, every gradient; returns the largest relative error."""
    kw.setdefault("dtype", "float64")
    ref = make(cell, I, H, backend="numpy", seed=seed, **kw)
    sim = make(cell, I, H, backend="cudasim", seed=seed, **kw)
    rng = np.random.default_rng(seed)
    dt = np.dtype(kw["dtype"])
    x = rng.standard_normal((T, B, I)).astype(dt)
    LD = ref.num_layers * (2 if ref.bidirectional else 1)
    h0, c0 = (rng.standard_normal((LD, B, H)).astype(dt) for _ in range(2))
    d_out = rng.standard_normal((T, B, (2 if ref.bidirectional else 1) * H)).astype(dt)
    d_hn, d_cn = (rng.standard_normal((LD, B, H)).astype(dt) for _ in range(2))
    expected = run(ref, x, h0, c0, lengths) + back(ref, d_out, d_hn, d_cn)
    with forced_algorithm(algorithm):
        got = run(sim, x, h0, c0, lengths) + back(sim, d_out, d_hn, d_cn)
        assert sim.algorithms == {"forward": algorithm, "backward": algorithm}
    errors = [rel_err(g, e) for g, e in zip(got, expected) if e is not None]
    errors += [rel_err(sim.grads[n], ref.grads[n]) for n in ref.grads]
    return max(errors)


# ------------------------------------------------------------------------ fused
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("B,H,T", [(1, 1, 1), (3, 33, 3), (1, 130, 2), (3, 1, 4)])
def test_fused_steps_match_numpy_on_odd_shapes(sim, cell, B, H, T):
    assert compare(cell, "fused", 2, H, T, B) < 1e-12


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fused_steps_with_lengths_reverse_and_layers(sim, cell):
    lengths = np.array([4, 1, 3], np.int32)
    assert compare(cell, "fused", 3, 5, 4, 3, lengths, num_layers=2, bidirectional=True) < 1e-12
    assert compare(cell, "fused", 3, 5, 4, 3, lengths, num_layers=3) < 1e-12  # the wavefront's spans


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_fused_rnn_every_nonlinearity(sim, nonlinearity):
    lengths = np.array([3, 2], np.int32)
    assert compare("rnn", "fused", 2, 4, 3, 2, lengths, nonlinearity=nonlinearity, bidirectional=True) < 1e-12


def test_fused_float32(sim):
    assert compare("lstm", "fused", 3, 6, 3, 2, dtype="float32") < 1e-5


@pytest.mark.parametrize("cell, dtype, tolerance", [("rnn", "float64", 1e-12), ("lstm", "float64", 1e-12),
                                                     ("gru", "float64", 1e-12), ("lstm", "float32", 1e-5)])
def test_fused_steps_with_split_dot_products(sim, monkeypatch, cell, dtype, tolerance):
    """With a GPU's many SMs a block holds one unit, and the threads it has to spare share
    each element's dot products (fused.split_of); their sums, added by the first of them,
    must give the NumPy model's results: lengths, both directions."""
    from gpurnn.cuda import fused

    monkeypatch.setattr(sim.ops, "sm_count", 64)
    B, H = 2, 32
    itemsize = np.dtype(dtype).itemsize
    splits = [fused.block_shape(cell, phase, B, H, 1, itemsize)[0] for phase in ("forward", "backward")]
    assert min(splits) > 1, splits  # the case this test is for
    lengths = np.array([3, 2])
    assert compare(cell, "fused", 3, H, 3, B, lengths, bidirectional=True, dtype=dtype) < tolerance


@pytest.mark.parametrize("cell, algorithm", [("rnn", "fused"), ("lstm", "fused"), ("gru", "fused"),
                                             ("lstm", "persistent")])
def test_steps_in_a_gpus_blocks_of_256_threads(sim, monkeypatch, cell, algorithm):
    """On a GPU a block has at least 256 threads (fused.MIN_THREADS; the simulator gives a
    block only the threads its elements need, for speed), so at small shapes most of a block's threads own no element: they must
    still stage their share of the step's rows (persistent: of W_hh's rows forward and
    columns backward too), meet every barrier and write nothing. The GPU's block shapes
    here (fused: on a 132-SM GPU; persistent: the one block the simulator runs at a time),
    with lengths. (The simulator runs a Python thread per GPU thread: one persistent cell.)"""
    from gpurnn.cuda import fused

    monkeypatch.setattr(fused, "MIN_THREADS", fused.MAX_THREADS)
    B, H = 3, 3
    if algorithm == "fused":
        monkeypatch.setattr(sim.ops, "sm_count", 132)
    for phase in ("forward", "backward"):
        if algorithm == "fused":
            units, tile, blocks, threads, _ = sim.ops.fused_plan(cell, phase, "float64", B, H)
        else:
            units, tile, blocks, threads, _ = sim.ops.persistent_plan(cell, phase, np.float64, B, H, 1)
            assert blocks == 1
        assert threads == 256 and units * tile * fused.SPLIT < threads, (phase, units, tile, threads)  # the case tested
    lengths = np.array([2, 1, 2])
    assert compare(cell, algorithm, 2, H, 2, B, lengths) < 1e-12


def stage_kernel():
    """A kernel that fills its shared memory with ``sentinel``, stages rows r0.. of src[t]
    there with fused.stage and copies all of it out (``cuda`` a global: the simulator swaps a
    kernel's global numba.cuda for its own)."""
    global cuda
    from gpurnn.backend import load_numba_cuda
    from gpurnn.cuda import fused

    cuda = load_numba_cuda()

    @cuda.jit
    def stage_and_read(src, t, r0, rows, width, offset, pitch, sentinel, out):
        sm = cuda.shared.array(0, src.dtype)
        for i in range(cuda.threadIdx.x, out.size, cuda.blockDim.x):
            sm[i] = sentinel
        cuda.syncthreads()
        fused.stage(sm, offset, pitch, src, t, r0, rows, width)
        for i in range(cuda.threadIdx.x, out.size, cuda.blockDim.x):
            out[i] = sm[i]
    return stage_and_read


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("rows, width, threads", [(1, 1, 32), (3, 33, 32), (8, 16, 64), (20, 5, 32), (17, 70, 32),
                                                  (9, 32, 32), (2, 100, 64)])
def test_stage_puts_every_element_of_a_step_where_the_tiles_read_it(sim, dtype, rows, width, threads):
    """fused.stage: a batch tile's rows of a step into shared memory, ``pitch`` apart from
    ``offset`` on, each thread holding STAGE_LOADS loads: rows fewer than its loads and not a multiple of
    them, several rows at once (width < threads), several columns a thread (width >
    threads). Nothing else in shared memory is written: the padding and what lies past the
    rows keep what they held."""
    offset, pitch, t, r0, sentinel = 3, width + 3, 1, 2, -7.0
    src = np.arange(3 * (r0 + rows + 1) * (width + 2), dtype=dtype).reshape(3, r0 + rows + 1, width + 2)
    out = np.zeros(offset + rows * pitch + 5, dtype)
    stage_kernel()[1, threads, 0, out.nbytes](src, t, r0, rows, width, offset, pitch, sentinel, out)
    expected = np.full_like(out, sentinel)
    expected[offset:offset + rows * pitch].reshape(rows, pitch)[:, :width] = src[t, r0:r0 + rows, :width]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("cell, dtype, tolerance", [("rnn", "float64", 1e-12), ("lstm", "float64", 1e-12),
                                                     ("gru", "float64", 1e-12), ("gru", "float32", 1e-5)])
def test_fused_steps_with_the_batch_in_tiles(sim, monkeypatch, cell, dtype, tolerance):
    """With SMs to spare for its size, a step's blocks each own a tile of the batch's rows
    (fused.batch_tiles), the last one ragged here (3 rows in tiles of 2): every element's
    state, output and gradient as the NumPy model's; lengths, both directions, two layers."""
    monkeypatch.setattr(sim.ops, "sm_count", 64)
    B, H = 3, 5
    for phase in ("forward", "backward"):
        tile = sim.ops.fused_plan(cell, phase, dtype, B, H)[1]
        assert tile == 2, (phase, tile)  # the case this test is for
    lengths = np.array([3, 1, 2])
    assert compare(cell, "fused", 2, H, 3, B, lengths, num_layers=2, bidirectional=True, dtype=dtype) < tolerance


def test_batch_tiles_balance_staging_against_weight_reads():
    """fused.batch_tiles on an H100's 132 SMs: RNN C's blocks stage 8 of its 32 rows (4
    tiles, blocks of 8 units keep their four threads an element); LSTM D's W_hh is too
    large for more than one tile to pay; LSTM C would lose its split with 4 units a block.
    A tile is never empty, nor more tiles than rows."""
    from gpurnn.cuda import fused

    assert fused.batch_tiles("rnn", "forward", 32, 256, 4, 132) == 4
    assert fused.grid_shape("rnn", "forward", 32, 256, 4, 132, 4) == (8, 8, 128, 256)
    assert fused.block_shape("rnn", "forward", 8, 256, 8, 4)[0] == fused.SPLIT
    assert fused.batch_tiles("rnn", "backward", 32, 256, 4, 132) == 4
    assert fused.batch_tiles("lstm", "forward", 8, 128, 4, 132) == 1
    assert fused.batch_tiles("lstm", "forward", 32, 256, 4, 132) == 1
    for B in (1, 2, 3, 5, 64):
        for cell in ("rnn", "lstm", "gru"):
            tiles = fused.batch_tiles(cell, "forward", B, 7, 4, 1000)
            units, tile, blocks, threads = fused.grid_shape(cell, "forward", B, 7, 4, 1000, tiles)
            assert 1 <= tiles <= B and (-(-B // tile) - 1) * tile < B  # every tile holds a row
            assert blocks == -(-7 // units) * -(-B // tile)


def most_words_in_a_bank(reads):
    """The most different 4-byte words one of the 32 banks is asked for by one warp's loads,
    given as (first byte, bytes) a thread: above 1, the GPU reads them one after another."""
    banks = {}
    for start, size in reads:
        for word in range(start // 4, (start + size - 1) // 4 + 1):
            banks.setdefault(word % 32, set()).add(word)
    return max(len(words) for words in banks.values())


@pytest.mark.parametrize("itemsize", [2, 4, 8])
@pytest.mark.parametrize("width", [1, 3, 33, 128, 130, 256, 512, 1024])
@pytest.mark.parametrize("split", [1, 2, 4, 8])  # fused.SPLIT and others it might become
def test_staged_rows_of_a_warp_read_different_banks(sim, itemsize, width, split):
    """A warp's threads read, in groups of ``split`` (the threads sharing an element), the
    next ``split`` columns of as many different staged rows (float64: a half-warp at a
    time, as the GPU serves 8-byte loads). Rows fused.staged_pitch apart must not put two
    words in one bank (unpadded, 32 float32 rows of H = 256 all sit in one bank)."""
    from gpurnn.cuda import fused

    pitch = fused.staged_pitch(width, itemsize, split)
    assert width <= pitch < width + 64
    threads = 16 if itemsize == 8 else 32
    for k in range(0, min(width, 4 * split), split):
        reads = [((row * pitch + k + lane) * itemsize, itemsize)
                 for row in range(threads // split) for lane in range(split)]
        assert most_words_in_a_bank(reads) == 1, (width, itemsize, split, k)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("B, H, units", [(8, 128, 1), (32, 256, 2), (1, 256, 2), (64, 512, 4), (3, 33, 3)])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_split_threads_read_a_blocks_weights_in_different_banks(sim, monkeypatch, cell, phase, B, H, units,
                                                                itemsize):
    """A persistent block's weights in shared memory: forward [H, units, G], backward
    [G*H, units]. The ``split`` threads of an element read rows k, k+1, ... at once, and a
    warp's groups read the units of their elements: no bank may be asked for two words.
    (The GPU's block shapes: whole warps of at least fused.MIN_THREADS.)"""
    from gpurnn.cuda import fused

    monkeypatch.setattr(fused, "MIN_THREADS", fused.MAX_THREADS)
    monkeypatch.setattr(fused, "WARP", 32)
    G = {"rnn": 1, "lstm": 4, "gru": 3}[cell]
    split, threads = fused.block_shape(cell, phase, B, H, units, itemsize)
    assert split in (1, fused.SPLIT) and threads % 32 == 0 and threads <= fused.MAX_THREADS
    row, unit = (G * units, G) if phase == "forward" else (units, 1)  # elements between rows, units
    warp = 16 if itemsize == 8 else 32
    elements = [e % (B * units) for e in range(warp // split)]  # a warp's groups: consecutive elements
    for g in range(G if phase == "forward" else 1):
        reads = [(((lane * row) + (e % units) * unit + g) * itemsize, itemsize)
                 for e in elements for lane in range(split)]
        assert most_words_in_a_bank(reads) == 1, (split, g)


# ------------------------------------------------------------------- persistent
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_persistent_kernels_match_numpy(sim, cell):
    lengths = np.array([3, 1], np.int32)
    assert compare(cell, "persistent", 2, 4, 3, 2, lengths, bidirectional=True) < 1e-12


def test_persistent_odd_shapes(sim):
    assert compare("gru", "persistent", 1, 1, 1, 1) < 1e-12
    assert compare("rnn", "persistent", 2, 33, 2, 3, nonlinearity="elu", num_layers=2) < 1e-12


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("sms, B, H", [(4, 3, 5), (32, 3, 5)])
def test_persistent_blocks_exchange_states_through_the_barrier(sim, monkeypatch, cell, sms, B, H):
    """A persistent launch as a GPU runs it: many blocks at once (blocks_run_together), each
    with its units' slice of W_hh in shared memory (the ragged last group fewer units), its
    batch tile's rows (the last tile fewer), reading each step the states and gradients the
    other blocks of its tile wrote the step before, after the barrier; a launch per span of
    steps, whose barriers count from zero again. Every output, state and gradient as the
    NumPy model's: lengths, both directions and two layers, and a wavefront of three."""
    blocks_run_together(monkeypatch)
    monkeypatch.setattr(sim.ops, "sm_count", sms)
    monkeypatch.setattr(sim.ops, "_resident_blocks", lambda *launch: 1000)  # a GPU's, not the simulator's 1
    for phase in ("forward", "backward"):
        units, tile = sim.ops.persistent_plan(cell, phase, np.float64, B, H, 1)[:2]
        groups, tiles = -(-H // units), -(-B // tile)
        assert groups > 1 and (units > 1 if sms == 4 else tiles > 1), (phase, units, tile)  # the case tested
    lengths = np.array([3, 1, 2], np.int32)
    assert compare(cell, "persistent", 2, H, 3, B, lengths, num_layers=2, bidirectional=True) < 1e-12
    assert compare(cell, "persistent", 2, H, 4, B, lengths, num_layers=3) < 1e-12


def test_the_gpu_tests_run_on_the_simulator_through_a_plugin(sim):
    """tests/simulated_gpu.py serves the gpu-marked tests' CUDA backend from the simulator,
    a launch's blocks run together: one persistent parity test of three LSTM layers (H = 17
    over the simulator's 4 SMs: 4 blocks a launch) passes through it."""
    test = "tests/test_gpu.py::test_every_algorithm_matches_numpy[float64-lstm-3-False-False-True-1-1-3-17-persistent]"
    env = {k: v for k, v in os.environ.items() if k != "GPURNN_BACKEND"}  # gpu_check's suite stage sets it
    env.update(NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "simulated_gpu", "-p", "no:cacheprovider", "-m", "gpu",
                           "-n", "0", "-q", test], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert "simulated_gpu: persistent launches of up to 4 blocks" in done.stdout


@pytest.mark.parametrize("cell, dtype, tolerance", [("rnn", "float32", 1e-5), ("lstm", "float32", 1e-5),
                                                     ("lstm", "float16", 2e-3)])
def test_persistent_split_dot_products_in_many_blocks(sim, monkeypatch, cell, dtype, tolerance):
    """As on a GPU at LSTM D: blocks of a few units, whose threads to spare share each
    element's dot products (fused.split_of), reading the block's slice of W_hh in shared
    memory ([H, units, G] forward, [G*H, units] backward); many blocks at once. (One block
    never splits: its weight rows are too wide for the banks.) Lengths; float16 against
    the NumPy half reference (its sums in another order: within a half rounding)."""
    from gpurnn.cuda import fused

    blocks_run_together(monkeypatch)
    monkeypatch.setattr(sim.ops, "sm_count", 16)
    monkeypatch.setattr(sim.ops, "_resident_blocks", lambda *launch: 1000)
    B, H = 2, 32
    itemsize = np.dtype(dtype).itemsize
    for phase in ("forward", "backward"):
        units, tile, blocks = sim.ops.persistent_plan(cell, phase, np.dtype(dtype), B, H, 1)[:3]
        assert blocks > 1 and fused.block_shape(cell, phase, tile, H, units, itemsize)[0] == fused.SPLIT  # the case
    assert compare(cell, "persistent", 3, H, 2, B, np.array([2, 1], np.int32), dtype=dtype) < tolerance


def test_persistent_barrier_gives_up_instead_of_hanging(sim, monkeypatch):
    """Two blocks in the simulator, which runs them one after the other: the first
    waits at the barrier for a block that is not running. It must give up after
    SPIN_LIMIT polls, flag the failure and write NaN, not hang."""
    from gpurnn.cuda import fused

    monkeypatch.setattr(fused, "SPIN_LIMIT", 50)
    T, B, H = 3, 1, 2
    rng = np.random.default_rng(0)
    gx, w_hh = rng.standard_normal((T, B, H)), rng.standard_normal((H, H))
    b = np.zeros(H)
    h, y = np.zeros((T + 1, B, H)), np.zeros((T, B, H))
    sync = np.zeros(2, np.int32)
    lengths = np.full(B, T, np.int32)
    sim.ops._launch_grid(fused.rnn_forward_persistent, 2, 32, 0, T, 0, 1, B, gx, w_hh, b, b, h, y, lengths, 0, sync,
                         shared=fused.shared_bytes("rnn", "forward", "persistent", B, H, 1, 8))
    assert sync[0] == 1
    assert np.isnan(y).all() and np.isnan(h[1:]).all()


def test_persistent_tiles_wait_only_on_their_own_blocks(sim, monkeypatch):
    """A persistent step reads only its batch tile's rows, so a block waits at the barrier
    only for its tile's blocks. In the simulator, which runs blocks one after another, two
    tiles of one block each finish their steps on their own (a barrier among all blocks
    would give up), and every state and output equals a one-block launch's; lengths."""
    from gpurnn.cuda import fused

    monkeypatch.setattr(fused, "SPIN_LIMIT", 50)  # a barrier waiting on the other tile gives up soon
    T, B, H = 4, 2, 3
    rng = np.random.default_rng(1)
    gx, w_hh, b_ih, b_hh = (rng.standard_normal(shape) for shape in ((T, B, H), (H, H), H, H))
    lengths = np.array([4, 2], np.int32)

    def launch(tile):
        h, y = np.zeros((T + 1, B, H)), np.zeros((T, B, H))
        h[0] = rng.standard_normal((B, H)) if tile == B else first_state
        sync = np.zeros(1 + B, np.int32)
        sim.ops._launch_grid(fused.rnn_forward_persistent, B // tile, 32, 0, T, 0, H, tile, gx, w_hh, b_ih, b_hh,
                             h, y, lengths, 0, sync,
                             shared=fused.shared_bytes("rnn", "forward", "persistent", tile, H, H, 8))
        assert sync[0] == 0  # no barrier gave up
        return h, y

    first_state = None
    whole_h, whole_y = launch(B)
    first_state = whole_h[0]
    tiled_h, tiled_y = launch(1)
    np.testing.assert_array_equal(tiled_h, whole_h)
    np.testing.assert_array_equal(tiled_y, whole_y)
    assert np.abs(whole_y).sum() > 0


def test_persistent_plan_on_a_gpu_cuts_rnn_c_into_four_tiles(sim, monkeypatch):
    """The plan a GPU of 132 SMs, two blocks resident an SM, gets (the simulator fits one
    block, so its driver query is stood in for): RNN C in 4 tiles of 8 rows, 32 groups of 8
    units, all 128 blocks resident; where they do not all fit, blocks of more units, the
    tiles kept; LSTM C's backward, whose staged dgates rows outgrow shared memory at any
    tiling, says so."""
    from gpurnn.cuda import fused
    from gpurnn.cuda.ops import NotApplicable

    monkeypatch.setattr(sim.ops, "sm_count", 132)
    monkeypatch.setattr(sim.ops, "_resident_blocks", lambda kernel, signature, threads, shared: 264)
    units, tile, blocks, threads, shared = sim.ops.persistent_plan("rnn", "forward", np.float32, 32, 256, 1)
    assert (units, tile, blocks, threads) == (8, 8, 128, 256)  # 64 elements, 4 threads each
    assert shared == fused.shared_bytes("rnn", "forward", "persistent", 8, 256, 8, 4) <= fused.SHARED_LIMIT
    monkeypatch.setattr(sim.ops, "_resident_blocks", lambda kernel, signature, threads, shared: 100)
    units, tile, blocks = sim.ops.persistent_plan("rnn", "forward", np.float32, 32, 256, 1)[:3]
    assert tile == 8 and blocks == 4 * -(-256 // units) <= 100  # still 4 tiles, fewer groups
    with pytest.raises(NotApplicable, match="shared memory"):
        sim.ops.persistent_plan("lstm", "backward", np.float32, 32, 256, 1)


def test_forced_algorithm_that_cannot_run_a_shape_says_why(sim):
    model = make("lstm", 3, 200, backend="cudasim", dtype="float64")
    with forced_algorithm("persistent"), pytest.raises(ValueError, match=r"'persistent' .*cannot run this forward.*KiB"):
        model(np.zeros((2, 2, 3)))
    wide = make("lstm", 3, 1600, backend="cudasim", dtype="float64")  # backward stages a [1, 6400] dgates row: 50 KiB
    wide(np.zeros((1, 1, 3)))
    with forced_algorithm("fused"), pytest.raises(ValueError, match=r"'fused' .*cannot run this backward.*\[1, 6400\]"):
        wide.backward(np.zeros((1, 1, 1600)))
    numpy_model = make("lstm", 3, 4, backend="numpy")
    with forced_algorithm("fused"), pytest.raises(ValueError, match="numpy backend runs only 'graph'"):
        numpy_model(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="name: expected one of"):
        gpurnn.set_rnn_algorithm("cudnn")


def test_fused_steps_cut_the_batch_finer_where_its_rows_outgrow_shared_memory(sim):
    """16 backward dgates rows of 4H = 400 float64 are 50 KiB, past a block's 48: the fused
    backward cuts the batch in tiles of 8 rows instead, and matches the NumPy model."""
    from gpurnn.cuda import fused

    units, tile = sim.ops.fused_plan("lstm", "backward", "float64", 16, 100)[:2]
    assert tile == 8 and fused.shared_bytes("lstm", "backward", "fused", tile, 100, units, 8) <= fused.SHARED_LIMIT
    assert fused.shared_bytes("lstm", "backward", "fused", 16, 100, units, 8) > fused.SHARED_LIMIT
    assert compare("lstm", "fused", 2, 100, 1, 16) < 1e-12


def test_env_forces_the_algorithm_and_rejects_unknown_names(sim, monkeypatch):
    model = make("gru", 2, 3, backend="cudasim", dtype="float64")
    monkeypatch.setenv("GPURNN_RNN_ALGO", "fused")
    model(np.zeros((2, 1, 2)))
    assert model.algorithms == {"forward": "fused"}
    monkeypatch.setenv("GPURNN_RNN_ALGO", "fastest")
    with pytest.raises(ValueError, match="GPURNN_RNN_ALGO: expected one of"):
        model(np.zeros((3, 1, 2)))


# ---------------------------------------------------------------------- chooser
def test_fastest_of_a_timing_table():
    assert fastest({"graph": 3e-3, "fused": 1e-3, "persistent": 2e-3}) == "fused"
    with pytest.raises(ValueError, match="at least one"):
        fastest({})


@pytest.fixture
def timed(sim, tmp_path, monkeypatch):
    """The simulator's ops with a fake timer (a table of seconds) and a cache in tmp_path."""
    ops = sim.ops
    table, calls = {}, []

    def timer(ws, name, fn, algorithm, accumulates):
        calls.append((name, algorithm))
        return table[algorithm], None

    monkeypatch.setattr(ops, "timer", timer)
    monkeypatch.setattr(ops, "choices", Choices("test-device", str(tmp_path / "algorithms.json")))
    return ops, table, calls


def test_chooser_keeps_the_fastest_and_stores_it(timed, tmp_path):
    ops, table, calls = timed
    table.update(graph=3e-3, fused=1e-3, persistent=2e-3)
    model = make("lstm", 2, 3, backend="cudasim", dtype="float64")
    model(np.zeros((2, 1, 2)))
    assert model.algorithms == {"forward": "fused"}
    assert [a for _, a in calls] == ["graph", "fused", "persistent"]
    stored = json.loads((tmp_path / "algorithms.json").read_text())["test-device"]
    (key, entry), = stored.items()
    assert key.startswith("lstm I=2 H=3 L=1 D=1 T=2 B=1 float64") and key.endswith("forward fp32")
    assert entry == {"algorithm": "fused", "times_ms": {"graph": 3.0, "fused": 1.0, "persistent": 2.0}}
    model(np.zeros((2, 1, 2)))  # same shape: chosen once
    assert len(calls) == 3


def test_chooser_leaves_out_what_cannot_run(timed):
    ops, table, calls = timed
    table.update(graph=3e-3, fused=2e-3, persistent=1e-3)
    model = make("lstm", 2, 200, backend="cudasim", dtype="float64")  # W_hh too big for one block
    model(np.zeros((1, 1, 2)))
    assert model.algorithms == {"forward": "fused"}
    assert "persistent" not in [a for _, a in calls]
    assert "KiB" in model.algorithm_notes["persistent"]


def test_chooser_drops_an_algorithm_whose_results_differ(timed, monkeypatch):
    ops, table, calls = timed
    results = {"graph": [np.ones(3)], "fused": [np.full(3, 2.0)], "persistent": [np.ones(3)]}
    monkeypatch.setattr(ops, "timer", lambda ws, name, fn, a, acc: ({"graph": 3, "fused": 1, "persistent": 2}[a],
                                                                     results[a]))
    model = make("rnn", 2, 3, backend="cudasim", dtype="float64")
    with pytest.warns(RuntimeWarning, match="'fused'.*results differ"):
        model(np.zeros((2, 1, 2)))
    assert model.algorithms == {"forward": "persistent"}


def test_chooser_reads_the_disk_cache_in_a_second_process(tmp_path):
    """A first process times (fake table) and stores; a second, whose timer fails if
    called, runs the stored choice."""
    script = (
        "import os, sys, numpy as np\n"
        "os.environ['GPURNN_BACKEND'] = 'cudasim'\n"
        "import gpurnn\n"
        "from gpurnn.cuda.algorithms import Choices\n"
        "ops = gpurnn.get_backend().ops\n"
        "ops.choices = Choices('test-device', sys.argv[1])\n"
        "def timer(ws, name, fn, algorithm, accumulates):\n"
        "    if sys.argv[2] == 'second':\n"
        "        raise AssertionError('timed again')\n"
        "    return {'graph': 2.0, 'fused': 3.0, 'persistent': 1.0}[algorithm], None\n"
        "ops.timer = timer\n"
        "m = gpurnn.GRU(2, 3, dtype='float64', seed=0)\n"
        "out, _ = m(np.ones((2, 2, 2)))\n"
        "print(m.algorithms['forward'], float(out.sum()))\n"
    )
    cache = str(tmp_path / "algorithms.json")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPURNN_RNN_ALGO")}
    outputs = []
    for which in ("first", "second"):
        done = subprocess.run([sys.executable, "-c", script, cache, which], capture_output=True, text=True, env=env,
                              cwd=ROOT)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.split())
    assert outputs[0][0] == outputs[1][0] == "persistent"
    assert outputs[0][1] == outputs[1][1]


@pytest.mark.parametrize("cell, layers, bidirectional", [("gru", 2, False), ("lstm", 1, True)])
def test_timing_a_backward_starts_each_algorithm_from_what_it_overwrites(timed, monkeypatch, cell, layers,
                                                                          bidirectional):
    """A backward writes gradients over the saved gates and the layers' input gradients
    over the staged d_out. A timer runs it many times (as _time_on_gpu: once for the
    results it compares, then repeats), so each timed algorithm must start from the
    forward's gates and the staged d_out again (staged again and the forward rerun, no
    copies kept), and so must the call itself: no algorithm is left out as differing,
    and the gradients equal an untimed run's."""
    ops, table, calls = timed

    def timer(ws, name, fn, algorithm, accumulates):
        saved = [a.copy() for a in accumulates]
        ops.algorithm = algorithm
        try:
            fn()
            results = [None if r is None else r.copy() for r in ws.results(name)]
            results += [a - copy for a, copy in zip(accumulates, saved)]
            fn()
            fn()  # the timed repeats
        finally:
            ops.algorithm = "graph"
            for a, copy in zip(accumulates, saved):
                a[...] = copy
        return {"graph": 3.0, "fused": 2.0, "persistent": 1.0}[algorithm], results

    rng = np.random.default_rng(0)
    D = 2 if bidirectional else 1
    x, d_out = rng.standard_normal((4, 2, 3 * D)), rng.standard_normal((4, 2, 3 * D))
    grads = {}
    for timing in (False, True):
        monkeypatch.setattr(ops, "timer", timer if timing else None)
        model = make(cell, 3 * D, 3, num_layers=layers, bidirectional=bidirectional, backend="cudasim",
                     dtype="float64", seed=1)
        run(model, x)
        grads[timing] = [*back(model, d_out)] + [g.copy() for g in model.grads.values()]
    assert model.algorithms == {"forward": "persistent", "backward": "persistent"}
    ws = model._workspaces[4, 2, False, None, False]
    assert ws.dx is ws.d_out and all(d.dgates is d.gates for d in ws.dirs)
    for timed_grad, plain in zip(grads[True], grads[False]):
        if plain is not None:
            np.testing.assert_allclose(timed_grad, plain, rtol=1e-10, atol=1e-12)


def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path):
    path = tmp_path / "algorithms.json"
    path.write_text("{not json")
    choices = Choices("dev", str(path))
    assert choices.lookup("k") is None
    choices.store("k", "fused", {"fused": 1e-3})
    assert Choices("dev", str(path)).lookup("k") == "fused"
    assert Choices("other", str(path)).lookup("k") is None  # another GPU decides for itself


def test_forcing_another_algorithm_takes_effect_on_a_shape_already_run(sim):
    model = make("rnn", 2, 3, backend="cudasim", dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((3, 2, 2))
    outputs = {}
    for algorithm in ("fused", "persistent", None):
        with forced_algorithm(algorithm):
            outputs[algorithm] = model(x)[0]
            assert model.algorithms == {"forward": algorithm or "graph"}
    np.testing.assert_allclose(outputs["fused"], outputs[None], rtol=1e-12)
    np.testing.assert_allclose(outputs["persistent"], outputs[None], rtol=1e-12)


def test_chooser_leaves_out_an_algorithm_whose_timing_fails(timed, monkeypatch):
    ops, table, calls = timed

    def timer(ws, name, fn, algorithm, accumulates):
        if algorithm == "fused":
            raise RuntimeError("launch failed")
        return {"graph": 3.0, "persistent": 2.0}[algorithm], None

    monkeypatch.setattr(ops, "timer", timer)
    model = make("gru", 2, 3, backend="cudasim", dtype="float64")
    with pytest.warns(RuntimeWarning, match="'fused' left out: timing it failed .*launch failed"):
        model(np.zeros((2, 1, 2)))
    assert model.algorithms == {"forward": "persistent"}
    assert "launch failed" in model.algorithm_notes["fused"]


def test_chooser_runs_graph_when_graph_itself_cannot_be_timed(timed, monkeypatch, tmp_path):
    ops, table, calls = timed

    def timer(ws, name, fn, algorithm, accumulates):
        if algorithm == "graph":
            raise RuntimeError("no events")
        return 1.0, None

    monkeypatch.setattr(ops, "timer", timer)
    model = make("rnn", 2, 3, backend="cudasim", dtype="float64")
    with pytest.warns(RuntimeWarning, match="'graph' left out"):
        model(np.zeros((2, 1, 2)))
    assert model.algorithms == {"forward": "graph"}
    assert not (tmp_path / "algorithms.json").exists()  # nothing stored: the next process tries again
