"""Recurrent steps that compute their own recurrent product: fused and persistent kernels.

Two algorithms besides the graph of cuBLAS step GEMMs and pointwise kernels
(``gpurnn.cuda.kernels``), for shapes too small to fill the GPU:

- **fused**: one launch per step. A block owns U hidden units of a tile of the
  batch's rows (``batch_tiles``: RNN C's blocks stage 8 rows, not 32); a group of
  ``split`` threads of it (one, or SPLIT where the block has threads to spare:
  split_of) computes, for one element (b, j), the dot products of h_prev[b] with
  the rows of W_hh of unit j (one per gate block), and the group's first thread
  applies the cell's pointwise step to them. Backward, the group first computes the recurrent part of the element's
  gradient, (dgates_{t'} W_hh)[b, j] of the step t' BPTT ran just before, then
  its first thread runs the cell's pointwise backward; the last step's product
  is one GEMM after the loop.
- **persistent**: one launch per span of steps. Each block copies its units'
  rows of W_hh (backward: columns) into shared memory once, then runs the same
  per-step tile as the fused kernel over every step of the span, with a
  barrier among all blocks between steps (each step reads the whole h_prev or
  dgates row that every block wrote).

The per-step tiles (``*_forward_tile``, ``*_backward_tile``) are device
functions shared by both, so the simulator's fused launches test the persistent
body too. (numba's simulator runs a launch's blocks one after another, where a barrier
between two never opens: the tests run a persistent launch's blocks at once with
tests/helpers.blocks_run_together.)

The weights reach a tile flat, a unit's gates side by side:
- forward: w[k * w_cols + (j - w_base) * G + g] = W_hh[g*H + j, k] (fused: all
  of W_hh as [H, H, G] in global memory, written by ``unit_major``, so
  neighbouring threads read neighbouring words; persistent: the block's
  [H, U, G] slice in shared memory);
- backward: w[k * w_cols + (j - w_base)] = W_hh[k, j] for k < G*H (fused: W_hh
  itself; persistent: the block's [G*H, U] columns).

Numerics: each dot product accumulates in the type the buffers compute in
(float32 for half buffers, which are widened as read and staged in half, so
shared memory holds half the bytes): split = 1 in order k = 0..n-1; else thread
l of the group sums k = l, l + SPLIT, ... in order and the first adds the
group's sums in thread order (the same launch gives the same bits every time).
Sums are grouped as the step kernels' (x W_ih^T + b_ih) + (h W_hh^T + b_hh).

Shared memory: the staged operand's rows are padded (``staged_pitch``) so that a
warp's groups, which read ``split`` neighbouring columns of different batch rows
together, read different banks; split_of keeps the split threads' reads of W_hh's
rows or columns on chip in different banks too. After the staged rows, the split
threads' sums (in the compute type). The dot loops index with unsigned integers
(see gate_dots), and ptxas is bounded to 128 registers a thread (RECURRENCE_JIT);
kernels/ptx_report.py counts the loops' machine instructions an FMA.

Latency: a step is a chain of waits on memory, so each is cut to one. The staged operand
comes in with STAGE_LOADS loads in flight a thread (stage), from blocks of at least
MIN_THREADS threads; what the pointwise update reads after the dot products (gx and the
state it updates forward; dy, the saved gates and states backward) is asked into L1
before the staging (``prefetch_step``), so its wait overlaps the staging's. In a persistent
kernel that is after the barrier: the barrier's acquire loads invalidate L1 (SASS
``CCTL.IVALL``), which would drop lines fetched before it.

Barrier (``tile_barrier``): a step reads the rows of its batch tile that the
tile's blocks wrote the step before, so only they wait on each other (GRNN's
barrier; tiles run on independently). After a block barrier, block thread 0 counts
the block's arrival in its tile's counter as a release (``release_add``: an acq_rel
fence, then an add nobody waits on), polls the counter with relaxed loads until all
the tile's blocks have arrived, acquires it once (``acquire``), then a block barrier again:
CUTLASS's inter-block barrier, as the PTX memory model orders it, and lighter than a
``threadfence`` (a sequentially consistent fence) before the add and another after
volatile polls. States written by other blocks are read through L2 (``ld.global.cg``). The host only
launches a persistent grid whose blocks can all be resident at once (see
``CudaOps.persistent_plan``), so the barrier cannot wait on a block that is not
running; should it wait SPIN_LIMIT polls all the same, it sets sync[0], every
block writes NaN into what it had left to write and returns: a visible error,
never a hang.
"""

import math
import time

from numba import int32, uint32, uint64

from gpurnn.backend import _simulating, load_numba_cuda
from gpurnn.cuda.kernels import (compute_shared, constants, gru_point_backward, gru_point_forward,
                                 lstm_point_backward, lstm_point_forward, narrow, numba_float, rnn_point_backward,
                                 rnn_point_forward, wide)
from gpurnn.sequence import GATE_BLOCKS

cuda = load_numba_cuda()

SPIN_LIMIT = 1 << 24  # polls of the barrier counter (~2-4 s) before a block gives up
SHARED_LIMIT = 48 << 10  # bytes of shared memory a block may use (no opt-in to more)
MAX_THREADS = 256
STAGE_LOADS = 8  # loads a thread has in flight while staging a step's operand (stage)
# threads a block has at least, and the multiple its threads come in (block_shape): whole
# warps. The simulator runs each thread as a Python thread, so there a block has just the
# threads its elements need (3x faster simulator tests than whole warps; the GPU's shape
# is tested there too, test_steps_in_a_gpus_blocks_of_256_threads)
MIN_THREADS, WARP = (1, 1) if _simulating() else (MAX_THREADS, 32)
SPLIT = 4  # threads that share an element's dot products where a block has them to spare
assert SPLIT & (SPLIT - 1) == 0, "a power of two: _lane masks by it, staged_pitch rounds by it"
# (threads a block, blocks an SM) ptxas must leave room for, which bounds a thread's
# registers to 128: a launch puts a block on each SM it may use, and two directions of a
# bidirectional layer (lanes of their own) may share the SMs. The simulator takes none.
RECURRENCE_JIT = {} if _simulating() else {"launch_bounds": (MAX_THREADS, 2)}

# --------------------------------------------------------------------- memory
if _simulating():  # the simulator has no cache-hinted loads or sleeps; its blocks see memory as is
    @cuda.jit(device=True)
    def fresh(a, i):
        return a[i]

    @cuda.jit(device=True)
    def acquire(a, i):
        return a[i]

    @cuda.jit(device=True)
    def relaxed(a, i):
        return a[i]

    @cuda.jit(device=True)
    def release_add(a, i, v):
        cuda.atomic.add(a, i, v)

    @cuda.jit(device=True)
    def pause():
        time.sleep(0)  # hand the interpreter to the threads of the blocks being waited for

    @cuda.jit(device=True)
    def prefetch(a, i):
        a[i]  # a hint on the GPU; here it checks the index, which the GPU would not
else:
    # The intrinsic behind cuda.ldcg: that overload compiles through a dispatcher that
    # asks the driver for the GPU's compute capability, so a kernel using it could not be
    # compiled to PTX on a machine without a GPU.
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.cache_hints import ldcg_intrinsic
    from numba.cuda.extending import intrinsic

    @cuda.jit(device=True, inline=True)
    def fresh(a, i):
        return ldcg_intrinsic(a, i)  # through L2: other blocks of this launch may have just written a[i]

    @cuda.jit(device=True, inline=True)
    def pause():
        cuda.nanosleep(32)

    def _pointer(context, builder, array_type, array, index_types, indices):
        """The address of array[indices] (numba's own arithmetic, no bounds check)."""
        array = context.make_array(array_type)(context, builder, array)
        indices = [context.cast(builder, v, t, types.intp) for t, v in zip(index_types, indices)]
        return cgutils.get_item_pointer(context, builder, array_type, array, indices)

    def _asm(builder, result, text, constraints, args):
        """Inline PTX that the compiler keeps in place among the memory accesses around it."""
        asm = ir.InlineAsm(ir.FunctionType(result, [a.type for a in args]), text, constraints + ",~{memory}",
                           side_effect=True)
        return builder.call(asm, args)

    def _int32_counter(a, i):
        return (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.int32
                and isinstance(i, types.Integer))

    @intrinsic
    def prefetch(typingctx, a, i):
        """``prefetch.global.L1`` of a[i] (a tuple of unsigned indices, one an axis): the
        line comes into L1 while the thread goes on; numba has no prefetch of its own."""
        if not (isinstance(a, types.Array) and isinstance(i, types.UniTuple) and i.count == a.ndim
                and isinstance(i.dtype, types.Integer) and not i.dtype.signed):
            return None

        def codegen(context, builder, sig, args):
            count = sig.args[1].count
            indices = cgutils.unpack_tuple(builder, args[1], count=count)
            ptr = _pointer(context, builder, sig.args[0], args[0], [sig.args[1].dtype] * count, indices)
            builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ptr.type]), "prefetch.global.L1 [$0];", "l",
                                      side_effect=True), [ptr])
        return types.void(a, i), codegen

    def _int32_load(order):
        """An intrinsic load(a, i): a[i] of an int32 array, ``ld.global.<order>.gpu``."""
        @intrinsic
        def load(typingctx, a, i):
            if not _int32_counter(a, i):
                return None

            def codegen(context, builder, sig, args):
                ptr = _pointer(context, builder, sig.args[0], args[0], sig.args[1:], args[1:])
                return _asm(builder, ir.IntType(32), f"ld.global.{order}.gpu.b32 $0, [$1];", "=r,l", [ptr])
            return types.int32(a, i), codegen
        return load

    # once an acquire reads what a release_add wrote, what the writer's block wrote before
    # that is visible to this thread (and through a block barrier to its block); in SASS it
    # is a load and then an invalidation of the SM's whole L1 (CCTL.IVALL)
    acquire = _int32_load("acquire")
    relaxed = _int32_load("relaxed")  # a strong load from L2 that orders nothing: to poll on

    @intrinsic
    def release_add(typingctx, a, i, v):
        """a[i] += v on an int32 array as a release (``fence.acq_rel.gpu`` then a relaxed
        ``red``, CUTLASS's inter-block barrier): the block's writes, ordered before it by a
        block barrier, are visible to whoever acquires the new count; nothing waits for
        the result."""
        if not (_int32_counter(a, i) and isinstance(v, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ptr = _pointer(context, builder, sig.args[0], args[0], sig.args[1:2], args[1:2])
            value = context.cast(builder, args[2], sig.args[2], types.int32)
            _asm(builder, ir.VoidType(), "fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.s32 [$0], $1;", "l,r",
                 [ptr, value])
        return types.void(a, i, v), codegen


@cuda.jit(device=True, inline=True)
def tile_barrier(sync, tile_index, blocks, generation):
    """Wait until the ``blocks`` blocks of batch tile ``tile_index`` (_tile_of) have arrived
    here ``generation`` times. sync: [1 + tiles] int32 (failure flag, then each tile's
    arrivals). False if the wait failed (see module doc)."""
    passed = cuda.shared.array(1, int32)
    cuda.syncthreads()  # the block's writes of this step come before thread 0's release
    if cuda.threadIdx.x == 0:
        counter = 1 + tile_index
        release_add(sync, counter, 1)  # arrived: whoever acquires this count sees the block's writes
        target = generation * blocks
        ok = 1
        polls = 0
        # poll with relaxed loads: an acquire invalidates the SM's L1 (SASS CCTL.IVALL), also
        # the lines another block on the SM has just prefetched
        while relaxed(sync, counter) < target:
            if relaxed(sync, 0) != 0 or polls >= SPIN_LIMIT:
                cuda.atomic.max(sync, 0, 1)  # tell the other blocks to stop waiting too
                ok = 0
                break
            polls += 1
            pause()
        if ok:
            acquire(sync, counter)  # all arrived: one acquire of the count makes their writes visible here
        passed[0] = ok
    cuda.syncthreads()  # the tile's writes, acquired by thread 0, are visible to the whole block
    return passed[0] != 0


@cuda.jit(device=True, inline=True)
def _tile_of(units, H):
    """(tile index, blocks a tile) of the calling block: the grid's blocks go over the
    ceil(H / units) groups of ``units`` units first, then over the batch's tiles."""
    groups = uint32(uint32(H + units - 1) // uint32(units))  # 32 bits: see _element
    return int32(uint32(cuda.blockIdx.x) // groups), int32(groups)


@cuda.jit(device=True, inline=True)
def _block_of(units, tile, B, H):
    """The calling block's part of a step, blk = (j0, j1, r0, r1): hidden units [j0, j1) of
    batch rows [r0, r1), its tile (_tile_of) holding ``tile`` rows."""
    tile_index, groups = _tile_of(units, H)
    j0 = (cuda.blockIdx.x - tile_index * groups) * units
    r0 = tile_index * tile
    return j0, min(H, j0 + units), r0, min(B, r0 + tile)


@cuda.jit(device=True, inline=True)
def _element(e, blk):
    """(b, j) of the block's e-th element: its units of one batch row after another. In
    32 bits: a 64-bit division is a slow routine on a GPU (and Python's floor division of
    signed numbers adds sign fixes to it), on the path of every step. (Not through
    kernels.row_and_column, whose int64 results cost the persistent LSTM forward's dot
    loop 0.75 instructions an FMA and some fused builds up to 24 registers.)"""
    j0, j1, r0, r1 = blk
    U = uint32(j1 - j0)
    b = uint32(uint32(e) // U)
    return r0 + b, j0 + uint32(uint32(e) - b * U)


@cuda.jit(device=True, inline=True)
def _next_of_thread(e):
    """The index after ``e`` the calling thread takes, the block's threads taking one each in
    turn from their own (unsigned, in a while loop: range() with a step set at run time
    divides in 64 bits to count its trips)."""
    return uint32(e + uint32(cuda.blockDim.x))


@cuda.jit(device=True, inline=True)
def _elements(blk):
    """How many elements (b, j) the block blk owns."""
    return (blk[1] - blk[0]) * (blk[3] - blk[2])


@cuda.jit(device=True, inline=True)
def prefetch_rows(a, t, b, j, G, H):
    """Ask L1 for a[t, b, g*H + j], g < G (none for G = 0)."""
    for g in range(G):
        prefetch(a, (uint32(t), uint32(b), uint32(g * H + j)))


@cuda.jit(device=True, inline=True)
def prefetch_step(blk, H, a0, t0, G0, a1, t1, G1, a2, t2, G2, a3, t3, G3):
    """prefetch_rows(a_i, t_i, b, j, G_i, H) of the block's elements (b, j), i < 4 (G_i = 0
    for an unused one): what a step's pointwise update reads once its dot products are
    done (forward gx and the state it updates; backward dy and the saved gates and
    states), so that those loads wait on L1, not on memory (DESIGN.md section 5). Issued
    before the step's staging (a persistent kernel's after its barrier, which empties L1),
    in one pass over the elements: each (b, j) costs a division."""
    e, elements = uint32(cuda.threadIdx.x), uint32(_elements(blk))
    while e < elements:
        b, j = _element(e, blk)
        prefetch_rows(a0, t0, b, j, G0, H)
        prefetch_rows(a1, t1, b, j, G1, H)
        prefetch_rows(a2, t2, b, j, G2, H)
        prefetch_rows(a3, t3, b, j, G3, H)
        e = _next_of_thread(e)


@cuda.jit(device=True, inline=True)
def prefetch_rnn_forward(t, blk, gx):
    """prefetch_step of what kernels.rnn_point_forward reads: gx[t] (its state it only writes)."""
    prefetch_step(blk, gx.shape[2], gx, t, 1, gx, t, 0, gx, t, 0, gx, t, 0)


@cuda.jit(device=True, inline=True)
def prefetch_lstm_forward(t, reverse, blk, gx, c):
    """prefetch_step of what kernels.lstm_point_forward reads: gx[t] and c_{t-1}."""
    prefetch_step(blk, c.shape[2], gx, t, 4, c, t + reverse, 1, c, t, 0, c, t, 0)


@cuda.jit(device=True, inline=True)
def prefetch_gru_forward(t, reverse, blk, gx, h):
    """prefetch_step of what kernels.gru_point_forward reads: gx[t] and h_{t-1}."""
    prefetch_step(blk, h.shape[2], gx, t, 3, h, t + reverse, 1, h, t, 0, h, t, 0)


@cuda.jit(device=True, inline=True)
def prefetch_rnn_backward(t, reverse, blk, h, dy):
    """prefetch_step of what kernels.rnn_point_backward reads: dy[t] and h_t."""
    prefetch_step(blk, h.shape[2], dy, t, 1, h, t + 1 - reverse, 1, h, t, 0, h, t, 0)


@cuda.jit(device=True, inline=True)
def prefetch_lstm_backward(t, reverse, blk, c, gates, dy):
    """prefetch_step of what kernels.lstm_point_backward reads: the step's gates, dy[t], c_t
    and c_{t-1}."""
    prefetch_step(blk, c.shape[2], gates, t, 4, dy, t, 1, c, t + 1 - reverse, 1, c, t + reverse, 1)


@cuda.jit(device=True, inline=True)
def prefetch_gru_backward(t, reverse, blk, h, gates, dy):
    """prefetch_step of what kernels.gru_point_backward reads: the step's gates (r, z, n,
    U_n h + b_hn), dy[t] and h_{t-1}."""
    prefetch_step(blk, h.shape[2], gates, t, 4, dy, t, 1, h, t + reverse, 1, h, t, 0)


def split_of(elements, n, spread, itemsize):
    """How many threads share each element's dot products: SPLIT where the block has them
    to spare (elements * SPLIT <= MAX_THREADS), each keeps 8 or more of the n terms, and
    the split threads' weight reads fall in different banks (they read rows k, k+1, ...
    of a block's weights at once, where neighbouring units sit ``spread`` elements apart,
    G*units forward, units backward: SPLIT * spread words, float64 twice that, must stay
    within the 32 banks); else 1. Small shapes leave most of a block idle otherwise: LSTM
    D (8 rows, a unit a block) would run 8 threads through 128 terms each. One split size,
    a constant, keeps the loop's strides constants too: with a stride numba learns only at
    run time its unrolled loop computes every address in 64 bits (twice the instructions)."""
    words = spread * (2 if itemsize == 8 else 1)
    return SPLIT if elements * SPLIT <= MAX_THREADS and n >= 8 * SPLIT and SPLIT * words <= 32 else 1


def staged_pitch(width, itemsize, split):
    """Elements from one staged row to the next: ``width`` or a little more. A warp reads
    its elements' rows at once, ``split`` neighbouring columns of each (the threads that
    share an element), which span u words (4 bytes; u = split/2 for half types, 2*split
    for float64, at least 1). With a row an odd multiple of u words (mod 32 banks), the
    rows' spans fall in different banks; with a pitch that is a multiple of the 32 banks
    (H = 256 float32), RNN C's 16 rows a warp would read one bank 16 times over."""
    per_word = 2 if itemsize == 2 else 1  # elements a word
    words_each = 2 if itemsize == 8 else 1  # words an element
    u = max(1, split * words_each // per_word)
    words = (width * words_each + per_word - 1) // per_word
    words += (u - words) & (2 * u - 1)  # = u mod 2u (2u a power of two, as split is: no division)
    return words * per_word // words_each


split_on_device = cuda.jit(device=True, inline=True)(split_of)
pitch_on_device = cuda.jit(device=True, inline=True)(staged_pitch)


@cuda.jit(device=True, inline=True)
def stage(sm, offset, pitch, src, t, r0, rows, width):
    """sm[offset + b*pitch + k] = src[t, r0 + b, k] for b < rows, k < width, then a block barrier:
    the block's threads load the step's recurrent operand together and every element's
    dot product then reads it from shared memory. A row's columns go to neighbouring
    threads (coalesced), ``lanes`` rows at once; a thread keeps STAGE_LOADS loads in
    flight before it stores any: a load from L2 takes a few hundred cycles, and with one
    at a time (a store waits for its load) staging h_prev was most of a step (DESIGN.md
    section 5: 4.8 us of a persistent LSTM's step at C)."""
    across = uint32(min(cuda.blockDim.x, width))  # threads a row, a column each ...
    lanes = uint32(cuda.blockDim.x) // across  # ... and rows staged at once
    lane = uint32(cuda.threadIdx.x) // across
    k = uint32(cuda.threadIdx.x) % across
    last = uint32(rows - 1)
    held = cuda.local.array(STAGE_LOADS, src.dtype)  # registers: the loops below unroll
    # unsigned indices: numba checks a signed one for a negative value at every load
    while lane < lanes and k < uint32(width):
        b = lane
        while b <= last:
            for m in range(STAGE_LOADS):  # past the rows: the last row's element again, so every load is issued
                r = uint32(b + uint32(m) * lanes)
                held[m] = fresh(src, (uint32(t), uint32(r0 + (r if r < last else last)), uint32(k)))
            for m in range(STAGE_LOADS):
                r = uint32(b + uint32(m) * lanes)
                if r <= last:
                    sm[uint64(offset) + uint32(r * pitch + k)] = held[m]
            b = uint32(b + uint32(STAGE_LOADS) * lanes)
        k = uint32(k + across)
    cuda.syncthreads()


@cuda.jit(device=True, inline=True)
def add_gate_terms(a0, a1, a2, a3, s, w, j, G):
    """a_g + s * w[j + g] for each gate g < G (1, 3 or 4); the sums past G as they are."""
    a0 += s * wide(w[j])
    if G >= 3:
        a1 += s * wide(w[j + uint64(1)])
        a2 += s * wide(w[j + uint64(2)])
    if G == 4:
        a3 += s * wide(w[j + uint64(3)])
    return a0, a1, a2, a3


@cuda.jit(device=True, inline=True)
def gate_dots(sm, at, n, w, w_at, w_step, G):
    """The G sums over k < n of sm[at + k] * w[w_at + k*w_step + g], g < G, in order
    k = 0..n-1 in the type sm computes in (the sums past G stay zero). The loop runs on
    unsigned indices and an unsigned count: numba checks a signed index for a negative
    value at every load, and its range() counts with sign checks; that and its 64-bit
    arithmetic were most of the loop's instructions."""
    a0 = a1 = a2 = a3 = constants(sm)[0]
    i, j, j_step = uint64(at), uint64(w_at), uint64(w_step)
    m, count = uint64(0), uint64(n)
    while m < count:
        a0, a1, a2, a3 = add_gate_terms(a0, a1, a2, a3, wide(sm[i]), w, j, G)
        i += uint64(1)
        j += j_step
        m += uint64(1)
    return a0, a1, a2, a3


@cuda.jit(device=True, inline=True)
def strided_gate_dots(sm, at, n, w, w_at, w_step, G):
    """As gate_dots over every SPLIT-th term: sm[at + m*SPLIT] * w[w_at + m*w_step + g]
    for m*SPLIT < n (n > 0). A constant stride, and a loop on the index itself, which
    LLVM unrolls less deeply than a counted one (the persistent LSTM forward: 128
    registers against 162, before launch bounds)."""
    a0 = a1 = a2 = a3 = constants(sm)[0]
    i, j, j_step = uint64(at), uint64(w_at), uint64(w_step)
    end = i + uint64(n)
    while i < end:
        a0, a1, a2, a3 = add_gate_terms(a0, a1, a2, a3, wide(sm[i]), w, j, G)
        i += uint64(SPLIT)
        j += j_step
    return a0, a1, a2, a3


@cuda.jit(device=True, inline=True)
def element_dots(live, sm, at, n, w, w_at, w_cols, G, split, red, red_at):
    """The G dot products of the calling thread's element over k < n, sm[at + k] against
    w[w_at + k*w_cols + g], shared among the ``split`` neighbouring threads of a group:
    thread ``lane`` of the group sums the terms k = lane, lane + SPLIT, ...
    (strided_gate_dots), then the first adds the group's sums in lane order, through
    red[red_at:] (one block barrier before, one after: every thread of the block must
    call this together). The first lane's result is the element's; ``live`` False: no
    terms (sums of zero)."""
    lane = _lane(split)
    a0 = a1 = a2 = a3 = constants(sm)[0]
    if live and split == 1:
        a0, a1, a2, a3 = gate_dots(sm, at, n, w, w_at, w_cols, G)
    elif live:  # split_of gave SPLIT only for n >= 8 * SPLIT: every lane has terms
        a0, a1, a2, a3 = strided_gate_dots(sm, at + lane, n - lane, w, w_at + lane * w_cols, SPLIT * w_cols, G)
    if split > 1:
        mine = red_at + cuda.threadIdx.x * G  # a group's threads are neighbours: its sums too
        red[mine] = a0
        if G >= 3:
            red[mine + 1] = a1
            red[mine + 2] = a2
        if G == 4:
            red[mine + 3] = a3
        cuda.syncthreads()
        if lane == 0:
            for other in range(mine + G, mine + SPLIT * G, G):
                a0 += red[other]
                if G >= 3:
                    a1 += red[other + 1]
                    a2 += red[other + 2]
                if G == 4:
                    a3 += red[other + 3]
        cuda.syncthreads()  # the block's next elements write red again
    return a0, a1, a2, a3


@cuda.jit(device=True, inline=True)
def scratch_after(sm, used):
    """The compute-type view of dynamic shared memory and the first index in it past
    ``used`` elements of sm: where element_dots adds up the split sums."""
    red = compute_shared(sm)
    return red, (used * sm.itemsize + red.itemsize - 1) // red.itemsize


@cuda.jit(device=True, inline=True)
def tile_setup(sm, hs_off, src, t, staged, r0, rows, width, units, spread):
    """What every tile does first: the split (split_of) and the row pitch, then, when
    ``staged``, src[t]'s rows [r0, r0 + rows) into sm[hs_off:]; returns (split, pitch, red, red_at), the
    last two the split sums' place past the staged rows (scratch_after)."""
    split = split_on_device(rows * units, width, spread, sm.itemsize)
    pitch = pitch_on_device(width, sm.itemsize, split)
    if staged:
        stage(sm, hs_off, pitch, src, t, r0, rows, width)
    red, red_at = scratch_after(sm, hs_off + rows * pitch)
    return split, pitch, red, red_at


@cuda.jit(device=True, inline=True)
def _lane(split):
    """The calling thread's place in its group of ``split`` threads (1 or SPLIT, a power of
    two: a mask, not a division)."""
    return uint32(cuda.threadIdx.x) & uint32(split - 1)


@cuda.jit(device=True, inline=True)
def _groups(n, split):
    """n // split for split 1 or SPLIT: a shift by a constant, not a division."""
    return uint32(uint32(n) // uint32(SPLIT)) if split == SPLIT else uint32(n)


@cuda.jit(device=True, inline=True)
def round_element(first, split, blk):
    """(live, b, j): the element of the calling thread's group in the round that starts
    at element ``first``; live False past the block's elements."""
    e = uint32(first + _groups(cuda.threadIdx.x, split))
    live = e < uint32(_elements(blk))
    b, j = _element(e if live else uint32(0), blk)
    return live, b, j


@cuda.jit(device=True, inline=True)
def next_round(first, split):
    """The first element of the round after the one starting at ``first``: a round gives
    each group of ``split`` threads an element."""
    return uint32(first + _groups(cuda.blockDim.x, split))


# ------------------------------------------------------------------- forward tiles
# Every thread of the block runs the same number of element rounds (element_dots waits at
# block barriers): round r gives group g of ``split`` threads element r*groups + g, if any.
@cuda.jit(device=True, inline=True)
def rnn_forward_tile(t, reverse, blk, units, gx, w, w_cols, w_base, sm, hs_off, b_ih, b_hh, h, y, lengths,
                     nonlinearity):
    """Step t for the block's units [j0, j1) and batch rows [r0, r1), blk (shapes as
    kernels.rnn_forward; a block of ``units`` units); h_prev's rows r0..r1-1 are staged at
    sm[hs_off:], ``staged_pitch`` apart."""
    H = h.shape[2]
    r0, r1 = blk[2], blk[3]
    split, pitch, red, red_at = tile_setup(sm, hs_off, h, t + reverse, True, r0, r1 - r0, H, units, units)
    first = uint32(0)
    while first < uint32(_elements(blk)):  # unsigned, not range(): see _next_of_thread
        live, b, j = round_element(first, split, blk)
        rec = element_dots(live and t < lengths[b], sm, hs_off + (b - r0) * pitch, H, w, j - w_base, w_cols, 1, split,
                           red, red_at)[0]  # a padded row carries its state: no product needed
        if live and _lane(split) == 0:
            rnn_point_forward(t, reverse, b, j, gx, rec, b_ih, b_hh, h, y, lengths, nonlinearity)
        first = next_round(first, split)


@cuda.jit(device=True, inline=True)
def lstm_forward_tile(t, reverse, blk, units, gx, w, w_cols, w_base, sm, hs_off, b_ih, b_hh, h, c, gates, y,
                      lengths):
    """As rnn_forward_tile, shapes as kernels.lstm_forward."""
    H = h.shape[2]
    r0, r1 = blk[2], blk[3]
    split, pitch, red, red_at = tile_setup(sm, hs_off, h, t + reverse, True, r0, r1 - r0, H, units, 4 * units)
    first = uint32(0)
    while first < uint32(_elements(blk)):  # unsigned, not range(): see _next_of_thread
        live, b, j = round_element(first, split, blk)
        rec_i, rec_f, rec_g, rec_o = element_dots(live and t < lengths[b], sm, hs_off + (b - r0) * pitch, H, w,
                                                  (j - w_base) * 4, w_cols, 4, split, red, red_at)
        if live and _lane(split) == 0:
            lstm_point_forward(t, reverse, b, j, gx, rec_i, rec_f, rec_g, rec_o, b_ih, b_hh, h, c, gates, y,
                               lengths)
        first = next_round(first, split)


@cuda.jit(device=True, inline=True)
def gru_forward_tile(t, reverse, blk, units, gx, w, w_cols, w_base, sm, hs_off, b_ih, b_hh, h, gates, y,
                     lengths):
    """As rnn_forward_tile, shapes as kernels.gru_forward."""
    H = h.shape[2]
    r0, r1 = blk[2], blk[3]
    split, pitch, red, red_at = tile_setup(sm, hs_off, h, t + reverse, True, r0, r1 - r0, H, units, 3 * units)
    first = uint32(0)
    while first < uint32(_elements(blk)):  # unsigned, not range(): see _next_of_thread
        live, b, j = round_element(first, split, blk)
        rec_r, rec_z, rec_n, _ = element_dots(live and t < lengths[b], sm, hs_off + (b - r0) * pitch, H, w,
                                              (j - w_base) * 3, w_cols, 3, split, red, red_at)
        if live and _lane(split) == 0:
            gru_point_forward(t, reverse, b, j, gx, rec_r, rec_z, rec_n, b_ih, b_hh, h, gates, y, lengths)
        first = next_round(first, split)


# ------------------------------------------------------------------ backward tiles
@cuda.jit(device=True, inline=True)
def recurrent_grad(live, sm, row, GH, w, col, w_cols, split, red, red_at):
    """(dgates_{t'} W_hh)[b, col]: what the step BPTT ran before (t') sends into this one's
    state, from that step's dgates row of b staged at sm[row:row + G*H] (see element_dots)."""
    return element_dots(live, sm, row, GH, w, col, w_cols, 1, split, red, red_at)[0]


@cuda.jit(device=True, inline=True)
def rnn_backward_tile(t, t_next, has_next, reverse, blk, units, w, w_cols, w_base, sm, hs_off, h, dy, dh,
                      dgates, lengths, nonlinearity):
    """BPTT step t for the block's elements (blk, as rnn_forward_tile): dh[b, j] (+ the
    recurrent gradient from step t_next when has_next, its dgates staged at sm[hs_off:]) is
    the gradient carried in; shapes as kernels.rnn_backward."""
    r0, r1 = blk[2], blk[3]
    GH = dgates.shape[2]
    split, pitch, red, red_at = tile_setup(sm, hs_off, dgates, t_next, has_next, r0, r1 - r0, GH, units, units)
    first = uint32(0)
    while first < uint32(_elements(blk)):  # unsigned, not range(): see _next_of_thread
        live, b, j = round_element(first, split, blk)
        rec = constants(sm)[0]
        if has_next:
            rec = recurrent_grad(live, sm, hs_off + (b - r0) * pitch, GH, w, j - w_base, w_cols, split, red, red_at)
        if live and _lane(split) == 0:
            rnn_point_backward(t, reverse, b, j, wide(dh[b, j]) + rec, h, dy, dh, dgates, lengths, nonlinearity)
        first = next_round(first, split)


@cuda.jit(device=True, inline=True)
def lstm_backward_tile(t, t_next, has_next, reverse, blk, units, w, w_cols, w_base, sm, hs_off, c, gates, dy,
                       dh, dc, dgates, lengths):
    """As rnn_backward_tile, for kernels.lstm_backward's buffers."""
    r0, r1 = blk[2], blk[3]
    GH = dgates.shape[2]
    split, pitch, red, red_at = tile_setup(sm, hs_off, dgates, t_next, has_next, r0, r1 - r0, GH, units, units)
    first = uint32(0)
    while first < uint32(_elements(blk)):  # unsigned, not range(): see _next_of_thread
        live, b, j = round_element(first, split, blk)
        rec = constants(sm)[0]
        if has_next:
            rec = recurrent_grad(live, sm, hs_off + (b - r0) * pitch, GH, w, j - w_base, w_cols, split, red, red_at)
        if live and _lane(split) == 0:
            lstm_point_backward(t, reverse, b, j, wide(dh[b, j]) + rec, c, gates, dy, dh, dc, dgates, lengths)
        first = next_round(first, split)


@cuda.jit(device=True, inline=True)
def gru_backward_tile(t, t_next, has_next, reverse, blk, units, w, w_cols, w_base, sm, hs_off, h, gates, dy,
                      dh, dgates, lengths):
    """As rnn_backward_tile, for kernels.gru_backward's buffers (the product reads the first
    3H columns of dgates, the recurrent projection's gradient)."""
    r0, r1 = blk[2], blk[3]
    GH = 3 * h.shape[2]
    split, pitch, red, red_at = tile_setup(sm, hs_off, dgates, t_next, has_next, r0, r1 - r0, GH, units, units)
    first = uint32(0)
    while first < uint32(_elements(blk)):  # unsigned, not range(): see _next_of_thread
        live, b, j = round_element(first, split, blk)
        rec = constants(sm)[0]
        if has_next:
            rec = recurrent_grad(live, sm, hs_off + (b - r0) * pitch, GH, w, j - w_base, w_cols, split, red, red_at)
        if live and _lane(split) == 0:
            gru_point_backward(t, reverse, b, j, wide(dh[b, j]) + rec, h, gates, dy, dh, dgates, lengths)
        first = next_round(first, split)


# ------------------------------------------------------------ fused step kernels
# Launch with ceil(H / units) * ceil(B / tile) blocks (grid_shape) and, as dynamic shared
# memory, room for the staged operand: ``tile`` rows of staged_pitch(H) elements forward,
# of staged_pitch(G*H) backward (shared_bytes).
# w_t: W_hh as [H, H, G] flat (unit_major); w: W_hh [G*H, H] flat.
@cuda.jit(cache=True, **RECURRENCE_JIT)
def rnn_forward_fused(t, reverse, units, tile, gx, w_t, b_ih, b_hh, h, y, lengths, nonlinearity):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    sm = cuda.shared.array(0, h.dtype)
    prefetch_rnn_forward(t, blk, gx)
    rnn_forward_tile(t, reverse, blk, units, gx, w_t, H, 0, sm, 0, b_ih, b_hh, h, y, lengths,
                     nonlinearity)


@cuda.jit(cache=True, **RECURRENCE_JIT)
def lstm_forward_fused(t, reverse, units, tile, gx, w_t, b_ih, b_hh, h, c, gates, y, lengths):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    sm = cuda.shared.array(0, h.dtype)
    prefetch_lstm_forward(t, reverse, blk, gx, c)
    lstm_forward_tile(t, reverse, blk, units, gx, w_t, 4 * H, 0, sm, 0, b_ih, b_hh, h, c, gates, y,
                      lengths)


@cuda.jit(cache=True, **RECURRENCE_JIT)
def gru_forward_fused(t, reverse, units, tile, gx, w_t, b_ih, b_hh, h, gates, y, lengths):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    sm = cuda.shared.array(0, h.dtype)
    prefetch_gru_forward(t, reverse, blk, gx, h)
    gru_forward_tile(t, reverse, blk, units, gx, w_t, 3 * H, 0, sm, 0, b_ih, b_hh, h, gates, y,
                     lengths)


@cuda.jit(cache=True, **RECURRENCE_JIT)
def rnn_backward_fused(t, t_next, has_next, reverse, units, tile, w, h, dy, dh, dgates, lengths, nonlinearity):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    sm = cuda.shared.array(0, h.dtype)
    prefetch_rnn_backward(t, reverse, blk, h, dy)
    rnn_backward_tile(t, t_next, has_next, reverse, blk, units, w, H, 0, sm, 0, h, dy, dh, dgates,
                      lengths, nonlinearity)


@cuda.jit(cache=True, **RECURRENCE_JIT)
def lstm_backward_fused(t, t_next, has_next, reverse, units, tile, w, c, gates, dy, dh, dc, dgates, lengths):
    H = c.shape[2]
    blk = _block_of(units, tile, c.shape[1], H)
    sm = cuda.shared.array(0, c.dtype)
    prefetch_lstm_backward(t, reverse, blk, c, gates, dy)
    lstm_backward_tile(t, t_next, has_next, reverse, blk, units, w, H, 0, sm, 0, c, gates, dy, dh,
                       dc, dgates, lengths)


@cuda.jit(cache=True, **RECURRENCE_JIT)
def gru_backward_fused(t, t_next, has_next, reverse, units, tile, w, h, gates, dy, dh, dgates, lengths):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    sm = cuda.shared.array(0, h.dtype)
    prefetch_gru_backward(t, reverse, blk, h, gates, dy)
    gru_backward_tile(t, t_next, has_next, reverse, blk, units, w, H, 0, sm, 0, h, gates, dy, dh,
                      dgates, lengths)


# ------------------------------------------------------------ persistent kernels
# Launch with ceil(H / units) * ceil(B / tile) blocks, all co-resident, and as dynamic
# shared memory the block's G*units*H elements of W_hh followed by the staged operand (as the fused
# kernels'); sync (one more than the batch's tiles) must be 0. Steps [start, stop) of a span, in the direction's order
# (forward: backwards in t when reverse; BPTT the other way).
@cuda.jit(device=True, inline=True)
def _stage_rows(sw, w_hh, G, j0, U, units):
    """sw[k * G*units + u*G + g] = W_hh[g*H + j0 + u, k]: the block's rows, transposed, a
    unit's gates side by side."""
    H = w_hh.shape[1]
    e, n, GU = uint32(cuda.threadIdx.x), uint32(G * U * H), uint32(G * U)
    while e < n:  # 32 bits: see _element and _next_of_thread
        k = uint32(e // GU)
        rest = uint32(e - k * GU)
        u = uint32(rest // uint32(G))
        g = uint32(rest - u * uint32(G))
        sw[k * G * units + u * G + g] = w_hh[g * H + j0 + u, k]
        e = _next_of_thread(e)
    cuda.syncthreads()


@cuda.jit(device=True, inline=True)
def _stage_columns(sw, w_hh, j0, U, units):
    """sw[k * units + u] = W_hh[k, j0 + u] for k < G*H: the block's columns."""
    e, n = uint32(cuda.threadIdx.x), uint32(w_hh.shape[0] * U)
    while e < n:  # 32 bits: see _element and _next_of_thread
        k = uint32(e // uint32(U))
        u = uint32(e - k * uint32(U))
        sw[k * units + u] = w_hh[k, j0 + u]
        e = _next_of_thread(e)
    cuda.syncthreads()


@cuda.jit(device=True, inline=True)
def _forward_step_of(start, stop, reverse, s):
    return stop - 1 - s if reverse else start + s


@cuda.jit(device=True, inline=True)
def _backward_steps_of(start, stop, reverse, s):
    """(t, t_next) of BPTT's s-th step of the span: t_next is the step BPTT ran before t."""
    if reverse:
        t = start + s
        return t, t - 1
    t = stop - 1 - s
    return t, t + 1


@cuda.jit(device=True, inline=True)
def _poison_forward(start, stop, reverse, blk, h, y):
    """After a failed barrier: NaN in every output and state of the span this block owns."""
    for t in range(start, stop):
        e = uint32(cuda.threadIdx.x)
        while e < uint32(_elements(blk)):
            b, j = _element(e, blk)
            y[t, b, j] = narrow(math.nan, y)
            h[t + 1 - reverse, b, j] = narrow(math.nan, h)
            e = _next_of_thread(e)


@cuda.jit(device=True, inline=True)
def _poison_backward(blk, dh):
    """After a failed barrier: NaN in the carried gradient this block owns."""
    e = uint32(cuda.threadIdx.x)
    while e < uint32(_elements(blk)):
        b, j = _element(e, blk)
        dh[b, j] = narrow(math.nan, dh)
        e = _next_of_thread(e)


@cuda.jit(**RECURRENCE_JIT)
def rnn_forward_persistent(start, stop, reverse, units, tile, gx, w_hh, b_ih, b_hh, h, y, lengths, nonlinearity, sync):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    j0, j1 = blk[0], blk[1]
    tile_index, groups = _tile_of(units, H)  # whom the barrier waits for
    sw = cuda.shared.array(0, h.dtype)
    _stage_rows(sw, w_hh, 1, j0, j1 - j0, units)
    for s in range(stop - start):
        t = _forward_step_of(start, stop, reverse, s)
        if s > 0 and not tile_barrier(sync, tile_index, groups, s):
            _poison_forward(start, stop, reverse, blk, h, y)
            return
        prefetch_rnn_forward(t, blk, gx)  # after the barrier, whose acquire loads empty L1
        rnn_forward_tile(t, reverse, blk, units, gx, sw, units, j0, sw, units * H, b_ih, b_hh, h, y, lengths,
                         nonlinearity)


@cuda.jit(**RECURRENCE_JIT)
def lstm_forward_persistent(start, stop, reverse, units, tile, gx, w_hh, b_ih, b_hh, h, c, gates, y, lengths, sync):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    j0, j1 = blk[0], blk[1]
    tile_index, groups = _tile_of(units, H)  # whom the barrier waits for
    sw = cuda.shared.array(0, h.dtype)
    _stage_rows(sw, w_hh, 4, j0, j1 - j0, units)
    for s in range(stop - start):
        t = _forward_step_of(start, stop, reverse, s)
        if s > 0 and not tile_barrier(sync, tile_index, groups, s):
            _poison_forward(start, stop, reverse, blk, h, y)
            return
        prefetch_lstm_forward(t, reverse, blk, gx, c)  # after the barrier, whose acquire loads empty L1
        lstm_forward_tile(t, reverse, blk, units, gx, sw, 4 * units, j0, sw, 4 * units * H, b_ih, b_hh, h, c,
                          gates, y, lengths)


@cuda.jit(**RECURRENCE_JIT)
def gru_forward_persistent(start, stop, reverse, units, tile, gx, w_hh, b_ih, b_hh, h, gates, y, lengths, sync):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    j0, j1 = blk[0], blk[1]
    tile_index, groups = _tile_of(units, H)  # whom the barrier waits for
    sw = cuda.shared.array(0, h.dtype)
    _stage_rows(sw, w_hh, 3, j0, j1 - j0, units)
    for s in range(stop - start):
        t = _forward_step_of(start, stop, reverse, s)
        if s > 0 and not tile_barrier(sync, tile_index, groups, s):
            _poison_forward(start, stop, reverse, blk, h, y)
            return
        prefetch_gru_forward(t, reverse, blk, gx, h)  # after the barrier, whose acquire loads empty L1
        gru_forward_tile(t, reverse, blk, units, gx, sw, 3 * units, j0, sw, 3 * units * H, b_ih, b_hh, h, gates, y,
                         lengths)


@cuda.jit(**RECURRENCE_JIT)
def rnn_backward_persistent(start, stop, first, reverse, units, tile, w_hh, h, dy, dh, dgates, lengths, nonlinearity,
                            sync):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    j0, j1 = blk[0], blk[1]
    tile_index, groups = _tile_of(units, H)  # whom the barrier waits for
    sw = cuda.shared.array(0, h.dtype)
    _stage_columns(sw, w_hh, j0, j1 - j0, units)
    for s in range(stop - start):
        t, t_next = _backward_steps_of(start, stop, reverse, s)
        if s > 0 and not tile_barrier(sync, tile_index, groups, s):
            _poison_backward(blk, dh)
            return
        prefetch_rnn_backward(t, reverse, blk, h, dy)  # after the barrier, whose acquire loads empty L1
        rnn_backward_tile(t, t_next, s > 0 or not first, reverse, blk, units, sw, units, j0, sw, units * H, h, dy,
                          dh, dgates, lengths, nonlinearity)


@cuda.jit(**RECURRENCE_JIT)
def lstm_backward_persistent(start, stop, first, reverse, units, tile, w_hh, c, gates, dy, dh, dc, dgates, lengths,
                             sync):
    H = c.shape[2]
    blk = _block_of(units, tile, c.shape[1], H)
    j0, j1 = blk[0], blk[1]
    tile_index, groups = _tile_of(units, H)  # whom the barrier waits for
    sw = cuda.shared.array(0, c.dtype)
    _stage_columns(sw, w_hh, j0, j1 - j0, units)
    for s in range(stop - start):
        t, t_next = _backward_steps_of(start, stop, reverse, s)
        if s > 0 and not tile_barrier(sync, tile_index, groups, s):
            _poison_backward(blk, dh)
            return
        prefetch_lstm_backward(t, reverse, blk, c, gates, dy)  # after the barrier, whose acquire loads empty L1
        lstm_backward_tile(t, t_next, s > 0 or not first, reverse, blk, units, sw, units, j0, sw, 4 * units * H, c,
                           gates, dy, dh, dc, dgates, lengths)


@cuda.jit(**RECURRENCE_JIT)
def gru_backward_persistent(start, stop, first, reverse, units, tile, w_hh, h, gates, dy, dh, dgates, lengths, sync):
    H = h.shape[2]
    blk = _block_of(units, tile, h.shape[1], H)
    j0, j1 = blk[0], blk[1]
    tile_index, groups = _tile_of(units, H)  # whom the barrier waits for
    sw = cuda.shared.array(0, h.dtype)
    _stage_columns(sw, w_hh, j0, j1 - j0, units)
    for s in range(stop - start):
        t, t_next = _backward_steps_of(start, stop, reverse, s)
        if s > 0 and not tile_barrier(sync, tile_index, groups, s):
            _poison_backward(blk, dh)
            return
        prefetch_gru_backward(t, reverse, blk, h, gates, dy)  # after the barrier, whose acquire loads empty L1
        gru_backward_tile(t, t_next, s > 0 or not first, reverse, blk, units, sw, units, j0, sw, 3 * units * H, h,
                          gates, dy, dh, dgates, lengths)


FUSED = {("rnn", "forward"): rnn_forward_fused, ("lstm", "forward"): lstm_forward_fused,
         ("gru", "forward"): gru_forward_fused, ("rnn", "backward"): rnn_backward_fused,
         ("lstm", "backward"): lstm_backward_fused, ("gru", "backward"): gru_backward_fused}
PERSISTENT = {("rnn", "forward"): rnn_forward_persistent, ("lstm", "forward"): lstm_forward_persistent,
              ("gru", "forward"): gru_forward_persistent, ("rnn", "backward"): rnn_backward_persistent,
              ("lstm", "backward"): lstm_backward_persistent, ("gru", "backward"): gru_backward_persistent}


def unit_major(w_hh, out):
    """out (room for H * G*H elements) = W_hh [G*H, H] as [H, H, G], what the fused forward
    steps read: row k holds W_hh[g*H + j, k] at j*G + g, a unit's gates side by side."""
    H = w_hh.shape[1]
    G = w_hh.shape[0] // H
    out.reshape(H, H, G)[...] = w_hh.reshape(G, H, H).transpose(2, 1, 0)


def block_shape(cell, phase, rows, H, units, itemsize):
    """(split, threads) of a block of ``units`` hidden units of ``rows`` batch rows: the
    threads that share an element's dot products (split_of, as the tiles work it out), and
    the threads that makes, in whole warps, but never fewer than MIN_THREADS: staging a
    step's operand needs loads in flight (LSTM D: a block of 32 threads would wait for L2
    four times a step forward and 16 times backward; of 256, once and twice)."""
    G = GATE_BLOCKS[cell]
    n, spread = (H, G * units) if phase == "forward" else (G * H, units)
    split = split_of(rows * units, n, spread, itemsize)
    return split, min(MAX_THREADS, max(MIN_THREADS, -(-rows * units * split // WARP) * WARP))


def grid_shape(cell, phase, B, H, itemsize, blocks, tiles):
    """(units, tile, blocks, threads) of a step spread over about ``blocks`` blocks with the
    batch cut into ``tiles`` tiles: a block owns ``units`` units of ``tile`` rows."""
    tile = -(-B // tiles)
    tiles = -(-B // tile)
    units = -(-H // max(1, blocks // tiles))
    return units, tile, -(-H // units) * tiles, block_shape(cell, phase, tile, H, units, itemsize)[1]


def batch_tiles(cell, phase, B, H, itemsize, blocks):
    """How many tiles to cut the batch into for a step over about ``blocks`` blocks. Each
    block stages its tile's rows of the step's operand, so a step moves blocks/tiles * B
    rows from L2 (RNN C on an H100, one tile: 132 blocks of all 32 rows, 4 MiB a step); and
    each tile reads all of W_hh (the fused steps from L2 every step; the persistent kernels
    hold tiles copies on chip). The two balance at tiles ~ sqrt(blocks * B / (G * H))
    (RNN C: 4, LSTM D: 1), taken as a power of two, and fewer where a block of more units
    would lose the threads that share its dot products (split_of), whose loop would then
    run SPLIT times longer."""
    G = GATE_BLOCKS[cell]
    tiles = 1
    while tiles * 2 <= min(B, math.sqrt(blocks * B / (G * H))):
        tiles *= 2

    def split(n):
        units, tile = grid_shape(cell, phase, B, H, itemsize, blocks, n)[:2]
        return block_shape(cell, phase, tile, H, units, itemsize)[0]
    while tiles > 1 and split(tiles) < split(1):
        tiles //= 2
    return tiles


def shared_bytes(cell, phase, algorithm, rows, H, units, itemsize):
    """Dynamic shared memory of a launch of blocks of ``units`` units of ``rows`` batch rows:
    the staged operand (h_prev rows forward, the previous step's dgates rows backward),
    after the block's W_hh when persistent, then, when threads share an element, their sums
    (G a thread, in the type the buffers compute in)."""
    G = GATE_BLOCKS[cell]
    split, threads = block_shape(cell, phase, rows, H, units, itemsize)
    weights = G * units * H if algorithm == "persistent" else 0
    used = (weights + rows * staged_pitch(H if phase == "forward" else G * H, itemsize, split)) * itemsize
    if split == 1:
        return used
    acc = 4 if itemsize == 2 else itemsize
    return -(-used // acc) * acc + threads * G * acc


def signatures(cell, phase, algorithm, dtype, inference=False):
    """The numba signature of a launch on workspace buffers (as kernels.signatures; y and dy
    may be strided, as the GRU's input projection in training, an eval forward's gates
    have time stride 0, and with ``inference`` the LSTM's cell states too). Used by the
    PTX report."""
    from numba import types

    f = numba_float(dtype)
    i64, flag = types.int64, types.boolean
    c1, c2, c3 = (types.Array(f, n, "C") for n in (1, 2, 3))
    a3 = types.Array(f, 3, "A")
    lengths, sync = types.Array(types.int32, 1, "C"), types.Array(types.int32, 1, "C")
    if phase == "forward":
        head = (i64,) * (4 if algorithm == "fused" else 5)  # t, reverse / start, stop, reverse; units, tile
        w = c1 if algorithm == "fused" else c2
        c = a3 if inference else c3
        gx = c3 if inference or cell != "gru" else a3  # the GRU's training gx: the first 3H columns of gates' rows
        tail = {"rnn": (gx, w, c1, c1, c3, a3, lengths, i64), "lstm": (gx, w, c1, c1, c3, c, a3, a3, lengths),
                "gru": (gx, w, c1, c1, c3, a3, a3, lengths)}[cell]
    else:
        head = (i64, i64, flag, i64, i64, i64)  # t, t_next, has_next, reverse, units, tile / start, stop, first, ...
        w = c1 if algorithm == "fused" else c2
        tail = {"rnn": (w, c3, a3, c2, c3, lengths, i64), "lstm": (w, c3, c3, a3, c2, c2, c3, lengths),
                "gru": (w, c3, c3, a3, c2, c3, lengths)}[cell]
    return head + tail + ((sync,) if algorithm == "persistent" else ())
