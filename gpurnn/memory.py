"""What a model holds in memory, buffer by buffer: ``model.memory_report()``.

Rows are (group, name, bytes): the parameters, their gradients, and for each
[T, B] shape a layer keeps buffers for (its workspace, see gpurnn.stack), every
buffer kind summed over layers and directions. Arrays that share storage (the
parameter views of one flat buffer, the input projection, saved gates and gate
gradients, the layers' input gradients in ``d_out``'s, outputs in the states',
the stride-0 view of the saved gates) count once, under the first name met. On the CUDA
backend the process-wide cuBLAS workspaces and CuPy's pool follow, and each
workspace's captured graphs are counted (their own memory is the driver's and
not visible from here).
"""

from dataclasses import dataclass, field

import numpy as np

WORKSPACE_BUFFERS = ("x", "ids", "onehot", "lengths", "h0", "c0", "h_n", "c_n", "d_out", "d_hn", "d_cn",
                     "dx", "dh0", "dc0", "ones")
WORKSPACE_LISTS = ("out", "masks", "d_in")
DIRECTION_BUFFERS = ("gx", "gx_ring", "span_lengths", "span_starts", "gates", "dgates", "gh", "w_hh_t", "w_ih_t",
                     "h", "c", "c_step", "step_gates", "dh", "dc", "table", "dtable",
                     "sync", "h_cell", "h_cell_step", "y_cell", "hp", "dproj",
                     "dh_cell")  # the owners of shared storage first (see gpurnn.sequence)


def _storage(a):
    """(identity, bytes) of the allocation an array views."""
    if not isinstance(a, np.ndarray):  # a CuPy array: its memory block (a NumPy bfloat16 array has no .data)
        mem = a.data.mem
        return ("cupy", id(mem)), mem.size
    root = a
    while getattr(root, "base", None) is not None:  # views, and as_strided's wrapper, down to the owner
        root = root.base
    return ("numpy", id(root)), root.nbytes if isinstance(root, np.ndarray) else a.nbytes


@dataclass
class MemoryReport:
    rows: list = field(default_factory=list)  # (group, name, bytes)
    notes: list = field(default_factory=list)
    _seen: set = field(default_factory=set)

    def add(self, group, name, arrays):
        """Count the storages of ``arrays`` not counted yet under (group, name)."""
        total = 0
        for a in arrays:
            if a is None:
                continue
            key, nbytes = _storage(a)
            if key not in self._seen:
                self._seen.add(key)
                total += nbytes
        if total:
            self.rows.append((group, name, total))

    @property
    def total(self):
        return sum(nbytes for group, _, nbytes in self.rows if group != "process")

    def __str__(self):
        lines = [f"{'group':<30}{'buffer':<24}{'MiB':>10}"]
        lines += [f"{group:<30}{name:<24}{nbytes / 2**20:>10.3f}" for group, name, nbytes in self.rows]
        lines.append(f"{'model total':<54}{self.total / 2**20:>10.3f}")
        return "\n".join(lines + self.notes)


def report(model):
    """The MemoryReport of a layer (gpurnn.RNN/LSTM/GRU) or a model (CharLM, SequenceRegressor)."""
    rep = MemoryReport()
    rep.add("parameters", "all", model.params.values())
    rep.add("gradients", "all", model.grads.values())
    layers = [model] if hasattr(model, "_workspaces") else [p for p in getattr(model, "_parts", {}).values()
                                                             if hasattr(p, "_workspaces")]
    graphs = 0
    for layer in layers:
        for ws in layer._workspaces.values():
            group = f"workspace T={ws.T} B={ws.B}"
            for name in WORKSPACE_BUFFERS:
                rep.add(group, name, [getattr(ws, name)])
            for name in DIRECTION_BUFFERS:
                rep.add(group, name, [getattr(d, name) for d in ws.dirs])
            for name in WORKSPACE_LISTS:  # after the states: outputs may be views of them
                rep.add(group, name, getattr(ws, name))
            graphs += sum(1 for g in ws.graphs.values() if g != "eager")
    ops = layers[0]._ops if layers else None
    if ops is not None and getattr(ops, "name", "") == "cuda":
        for k, buf in enumerate(ops._workspaces.values()):
            rep.add("process", f"cuBLAS workspace {k}", [buf])
        pool = ops.xp.get_default_memory_pool()
        rep.rows.append(("process", "CuPy pool in use", pool.used_bytes()))
        rep.notes.append(f"{graphs} CUDA graph(s) captured over these workspaces (their memory is the driver's)")
    return rep
