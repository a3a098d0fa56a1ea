"""Which recurrence algorithm runs a shape: timed once, remembered on disk.

As cuDNN's find: the first eager call of a (cell, sizes, T, B, dtype, math mode,
pass) times every algorithm that can run it (``gpurnn.backend.RNN_ALGORITHMS``)
and keeps the fastest. The choice is written to ``algorithms.json`` beside
numba's kernel cache (``NUMBA_CACHE_DIR`` when set, else ``__pycache__`` of
this package when writable, else ``~/.cache/gpurnn``), keyed by the GPU's name
and the software versions, so that another process on the same machine reuses
it without timing again. The file is replaced atomically; a damaged or
unreadable file is ignored (and rewritten), never trusted.
"""

import json
import os
import tempfile

CACHE_NAME = "algorithms.json"


def cache_dir():
    numba_dir = os.environ.get("NUMBA_CACHE_DIR")
    if numba_dir:
        return numba_dir
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    if os.access(here, os.W_OK) or (not os.path.exists(here) and os.access(os.path.dirname(here), os.W_OK)):
        return here
    return os.path.join(os.path.expanduser("~"), ".cache", "gpurnn")


def fastest(times):
    """The algorithm of the smallest time in {algorithm: seconds}; ties keep the first."""
    if not times:
        raise ValueError("times: expected at least one algorithm's time, got none")
    return min(times, key=times.get)


class Choices:
    """The on-disk table {device: {shape key: {"algorithm": name, "times_ms": {...}}}}."""

    def __init__(self, device, path=None):
        self.device = device
        self.path = path or os.path.join(cache_dir(), CACHE_NAME)

    def _read(self):
        try:
            with open(self.path) as f:
                table = json.load(f)
            return table if isinstance(table, dict) else {}
        except (OSError, ValueError):
            return {}

    def lookup(self, key):
        """The algorithm stored for ``key`` on this device, or None."""
        entry = self._read().get(self.device, {}).get(key)
        return entry.get("algorithm") if isinstance(entry, dict) else None

    def store(self, key, algorithm, times):
        """Remember ``algorithm`` for ``key`` (with the times it won by); a cache that
        cannot be written (read-only disk) costs a timing next process, nothing else."""
        table = self._read()
        table.setdefault(self.device, {})[key] = {"algorithm": algorithm,
                                                  "times_ms": {a: round(t * 1e3, 4) for a, t in times.items()}}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".algorithms-")
            with os.fdopen(fd, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def entries(self):
        """This device's stored choices."""
        return dict(self._read().get(self.device, {}))
