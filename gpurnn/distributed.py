"""Data-parallel training: the world of processes ``mpiexec`` started, and the
collectives a training step needs.

    world = gpurnn.distributed.init(backend)   # a world of one without mpiexec: no MPI at all
    world.rank, world.size, world.local_rank   # local_rank: the GPU this rank uses
    world.broadcast(flat_params)               # rank 0's values everywhere, in place
    world.allreduce_mean(flat_grads, extra)    # the mean over ranks, in place; extra: a few floats
    world.barrier()

MPI (mpi4py) launches the ranks and reduces NumPy buffers; CuPy buffers go
through NCCL (``cupy.cuda.nccl``), its unique id sent over MPI. A model's
gradients are one flat buffer (gpurnn.flat), so a step costs one collective,
whatever the number of parameters; ``extra`` (the step's loss, a stop flag)
rides in the same collective.

Every collective waits at most ``timeout`` seconds. Beside it each rank posts a
one-integer "arrived" note to every other rank, and answers pings while it
waits, so a rank that waited in vain can say which ranks do not answer (died or
hung) or never came, before it aborts the whole job with a non-zero exit
(MPI_Abort, status EXIT_PEER_LOST). A rank that dies outright is noticed
sooner by the launcher (mpiexec ends the job at once).
"""

import os
import sys
import time

import numpy as np

from gpurnn.backend import load_cupy, load_nccl

EXIT_PEER_LOST = 4
DEFAULT_TIMEOUT = 300.0
_ARRIVED_TAG, _PING_TAG, _PONG_TAG, _GATHER_TAG, _SCATTER_TAG = 7007, 7008, 7009, 7010, 7011
ABORT_GRACE_SECONDS = 1.0
PING_SECONDS = 3.0  # how long a rank that gave up waits for the others to answer "are you there?"
_LAUNCHER_VARS = {  # what MPICH's Hydra and Open MPI's mpiexec set for each rank: (size, rank, local rank)
    "hydra": ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
    "openmpi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
}


class DistributedError(RuntimeError):
    """The world cannot be set up as asked; the message says why and what to do."""


def _launched(which):
    """(size, rank, local rank)[which] as the MPI launcher set it; None without one."""
    for names in _LAUNCHER_VARS.values():
        value = os.environ.get(names[which], "")
        if value.isdigit():
            return int(value)
    return None


def launched_size():
    """The number of ranks an MPI launcher says it started (1 when none did)."""
    return _launched(0) or 1


def launched_rank():
    return _launched(1) or 0


def abort_if_launched(status):
    """Under mpiexec, after an error on this rank: end every rank now (MPI_Abort) rather
    than leave the others waiting for a collective and this one in MPI_Finalize."""
    MPI = sys.modules.get("mpi4py.MPI")
    if launched_size() > 1 and MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
        _abort(MPI.COMM_WORLD, status)  # (imported is not started: with mpi4py.rc.initialize False)


def _abort(comm, status):
    """MPI_Abort, once the launcher has had time to pass on what this rank printed:
    Hydra tears the job down at once and can drop a line still in its pipe (seen: the
    exit status 4 without the message, 1 run in 6)."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_SECONDS)
    comm.Abort(status)


def use_local_gpu():
    """Under an MPI launcher, make this rank's GPU (local rank modulo the GPUs seen) CuPy's
    current device before any CUDA work; a no-op without a launcher, CuPy or a GPU."""
    local = _launched(2)
    if local is None or launched_size() == 1:
        return
    try:
        cupy = load_cupy()
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()
    except Exception:  # no CuPy or no GPU: the NumPy backend runs, nothing to choose
        pass


def one_line(error):
    """An error's message on one line: mpi4py's where it finds no MPI library has a line
    per library it tried."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def init(backend, timeout=DEFAULT_TIMEOUT):
    """The world this process belongs to, for a model on ``backend`` (a gpurnn Backend)."""
    if timeout <= 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout}")
    if launched_size() == 1:
        return World(backend.name)
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(f"started by an MPI launcher with {launched_size()} ranks, but mpi4py does not "
                               "import: pip install 'gpurnn[mpi]'") from None
    except RuntimeError as exc:  # mpi4py's own error where it finds no MPI library to load
        raise DistributedError(f"started by an MPI launcher with {launched_size()} ranks, but mpi4py cannot load "
                               f"an MPI library ({one_line(exc)}): pip install 'gpurnn[mpi]' (MPICH), or an mpi4py "
                               "for the MPI whose mpiexec started it") from None
    return MpiWorld(MPI, backend, timeout)


class World:
    """A world of one process: every collective is a no-op."""

    rank, size, local_rank = 0, 1, 0

    def __init__(self, backend_name):
        self.backend_name = backend_name

    @property
    def is_root(self):
        return self.rank == 0

    def broadcast(self, flat):
        return flat

    def allreduce_mean(self, flat, extra=()):
        """flat (and the floats in extra) averaged over the ranks; returns extra as a NumPy array."""
        return np.asarray(extra, np.float64)

    def gather(self, value):
        """[value of rank 0, value of rank 1, ...] on rank 0, None elsewhere (small picklable values)."""
        return [value]

    def scatter(self, values):
        """values[rank] for each rank, values given on rank 0 (small picklable values)."""
        return values[0]

    def barrier(self):
        pass


class MpiWorld(World):
    def __init__(self, MPI, backend, timeout):
        self.MPI, self.comm, self.timeout = MPI, MPI.COMM_WORLD, float(timeout)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        self.backend_name = backend.name
        self._collectives = 0
        names = self.comm.allgather(backend.name)
        if len(set(names)) > 1:
            odd = [r for r, n in enumerate(names) if n != names[0]]
            raise DistributedError(f"rank {self.rank}: ranks {odd} run the {names[odd[0]]} backend but rank 0 "
                                   f"runs {names[0]}: every rank must use the same backend (--backend)")
        self._nccl = None
        if backend.name == "cuda":
            self._nccl = self._nccl_communicator()

    def _nccl_communicator(self):
        nccl = load_nccl()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        return nccl.NcclCommunicator(self.size, uid, self.rank)

    # ------------------------------------------------------------ collectives
    def broadcast(self, flat):
        if self._nccl is not None:
            self._nccl_call(lambda comm, stream: comm.bcast(flat.data.ptr, flat.size, _nccl_type(flat), 0, stream),
                            "broadcast of the parameters")
        else:
            self._wait([self.comm.Ibcast(flat, root=0)], "broadcast of the parameters")
        return flat

    def allreduce_mean(self, flat, extra=()):
        if not (flat.ndim == 1 and flat.flags.c_contiguous):
            raise ValueError(f"flat: expected a contiguous 1-D buffer, got shape {tuple(flat.shape)}")
        extra = np.asarray(extra, np.float64)
        if self._nccl is not None:
            self._nccl_call(lambda comm, stream: comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size,
                                                                _nccl_type(flat), 0, stream),  # 0: ncclSum
                            "all-reduce of the gradients")
            flat /= self.size
            if extra.size:  # a few floats: over MPI, beside the device buffer
                self._wait([self.comm.Iallreduce(self.MPI.IN_PLACE, extra, op=self.MPI.SUM)], "all-reduce of the loss")
            return extra / self.size
        # flat is a model's contiguous 1-D buffer: reduced in place, or with extra riding at its end
        buf = np.concatenate([flat, extra.astype(flat.dtype)]) if extra.size else flat
        self._wait([self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)], "all-reduce of the gradients")
        buf /= self.size
        if extra.size:
            flat[...] = buf[:flat.size]
        return buf[flat.size:].astype(np.float64)

    def gather(self, value):
        """Point to point, so that it too waits at most the timeout: each rank sends to rank 0."""
        if self.rank != 0:
            self._wait([self.comm.isend(value, dest=0, tag=_GATHER_TAG)], "gather of the carried state")
            return None
        requests = [_PickledReceive(self.comm, peer, _GATHER_TAG) for peer in range(1, self.size)]
        return [value] + self._wait(requests, "gather of the carried state")

    def scatter(self, values):
        if self.rank != 0:
            return self._wait([_PickledReceive(self.comm, 0, _SCATTER_TAG)], "scatter")[0]
        self._wait([self.comm.isend(values[peer], dest=peer, tag=_SCATTER_TAG) for peer in range(1, self.size)],
                   "scatter")
        return values[0]

    def barrier(self):
        self._wait([self.comm.Ibarrier()], "barrier")

    # ------------------------------------------------------------ waiting
    def _wait(self, requests, what):
        """Wait for this rank's part of one collective (non-blocking requests), at most
        self.timeout seconds; returns what each request received (pickled receives), else None."""
        self._collectives += 1
        notes = self._post_arrival()
        deadline = time.monotonic() + self.timeout
        pause, results = 1e-5, [None] * len(requests)
        pending = set(range(len(requests)))
        while pending:
            for k in list(pending):
                done, results[k] = requests[k].test()
                if done:
                    pending.discard(k)
            if not pending:
                break
            if time.monotonic() > deadline:
                self._give_up(what, notes)
            self._answer_pings()
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)  # a short collective costs little; a long one no busy core
        self._collect_arrivals(notes)
        return results

    def _post_arrival(self):
        """Tell every other rank this one reached collective number n; expect theirs."""
        n = np.array([self._collectives], np.int64)
        sends, recvs = [], {}
        for peer in range(self.size):
            if peer != self.rank:
                sends.append(self.comm.Isend(n, dest=peer, tag=_ARRIVED_TAG))
                buf = np.zeros(1, np.int64)
                recvs[peer] = (self.comm.Irecv(buf, source=peer, tag=_ARRIVED_TAG), buf)
        return sends, recvs

    def _collect_arrivals(self, notes):
        sends, recvs = notes
        self.MPI.Request.Waitall(sends + [r for r, _ in recvs.values()])

    def _answer_pings(self):
        """Answer every "are you there?" that a rank which gave up sent us."""
        status = self.MPI.Status()
        while self.comm.Iprobe(source=self.MPI.ANY_SOURCE, tag=_PING_TAG, status=status):
            self.comm.recv(source=status.Get_source(), tag=_PING_TAG)
            self.comm.isend(self.rank, dest=status.Get_source(), tag=_PONG_TAG)

    def _silent_peers(self):
        """The ranks that do not answer a ping within PING_SECONDS: dead, stopped or stuck."""
        pongs = {}
        for peer in range(self.size):
            if peer != self.rank:
                self.comm.isend(self.rank, dest=peer, tag=_PING_TAG)
                pongs[peer] = self.comm.irecv(source=peer, tag=_PONG_TAG)
        deadline = time.monotonic() + PING_SECONDS
        while time.monotonic() < deadline and not all(r.Test() for r in pongs.values()):
            self._answer_pings()
            time.sleep(1e-3)
        return [peer for peer, r in pongs.items() if not r.Test()]

    def _give_up(self, what, notes):
        _, recvs = notes
        silent = self._silent_peers()
        missing = [peer for peer, (req, _) in recvs.items() if not req.Test() and peer not in silent]
        who = []
        if silent:
            who.append(f"rank(s) {', '.join(map(str, silent))} do not answer (died or hung)")
        if missing:
            who.append(f"rank(s) {', '.join(map(str, missing))} answer but never reached it")
        who = "; ".join(who) or "every rank answers and reached it, but it did not complete"
        print(f"gpurnn: error: rank {self.rank}: the {what} did not finish within {self.timeout:g} s: {who}; "
              f"ending every rank (--collective-timeout sets the limit)", file=sys.stderr, flush=True)
        _abort(self.comm, EXIT_PEER_LOST)

    def _nccl_call(self, issue, what):
        """Issue an NCCL collective on the current stream and wait for it, at most self.timeout seconds."""
        cupy = load_cupy()
        stream = cupy.cuda.get_current_stream()
        self._collectives += 1
        notes = self._post_arrival()
        issue(self._nccl, stream.ptr)
        done = cupy.cuda.Event()
        done.record(stream)
        deadline = time.monotonic() + self.timeout
        while not done.done:
            if time.monotonic() > deadline:
                self._nccl.abort()
                self._give_up(what, notes)
            time.sleep(1e-4)
        self._collect_arrivals(notes)


class _PickledReceive:
    """A non-blocking receive of a pickled object of any size (mpi4py's irecv without a
    buffer takes at most 32 KiB): a matched probe until the message is there, then its receive."""

    def __init__(self, comm, source, tag):
        self.comm, self.source, self.tag, self.message = comm, source, tag, None

    def test(self):
        if self.message is None:
            self.message = self.comm.improbe(source=self.source, tag=self.tag)
            if self.message is None:
                return False, None
        return True, self.message.recv()


def _nccl_type(a):
    nccl = load_nccl()
    return {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[np.dtype(a.dtype)]
