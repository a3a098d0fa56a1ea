"""Run under ``mpiexec -n 2``: gpurnn.distributed's collectives on NumPy buffers.
Prints one line per rank, "rank R ok", or raises."""

import sys

import numpy as np

from gpurnn import distributed
from gpurnn.backend import get_backend

world = distributed.init(get_backend("numpy"), timeout=30)
assert (world.size, world.local_rank) == (2, world.rank)
grads = np.full(5, world.rank + 1.0, np.float32)  # rank 0: 1, rank 1: 2
extra = world.allreduce_mean(grads, [10.0 * world.rank, world.rank == 1])
assert np.array_equal(grads, np.full(5, 1.5, np.float32)), grads
assert np.allclose(extra, [5.0, 0.5]), extra
params = np.arange(4.0) * (world.rank + 1)
world.broadcast(params)
assert np.array_equal(params, np.arange(4.0)), params  # rank 0's
gathered = world.gather({"rank": world.rank})
assert gathered == ([{"rank": 0}, {"rank": 1}] if world.rank == 0 else None), gathered
assert world.scatter(["a", "b"] if world.rank == 0 else None) == "ab"[world.rank]
world.barrier()


class Other:  # a rank whose backend differs from rank 0's is refused on every rank
    name = "numpy" if world.rank == 0 else "cuda"


try:
    distributed.MpiWorld(world.MPI, Other(), 30)
except distributed.DistributedError as exc:
    assert "ranks [1] run the cuda backend but rank 0 runs numpy" in str(exc), exc
else:
    sys.exit("a backend mismatch was not refused")
print(f"rank {world.rank} ok", flush=True)
