"""matplotlib figures: gradient flow, gate activations over time, training curves.

Each function returns the matplotlib Figure (and draws into ``ax`` when given).
"""

import csv

import numpy as np

from gpurnn.backend import to_host


def _axes(ax, figsize=(7, 4)):
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def gradient_flow(flows, ax=None, title="||dL/dh_t|| against distance from the loss"):
    """flows: {label: GradientFlow} (or one GradientFlow). One line per label (its
    first layer/direction), log scale, x = time steps between h_t and the loss."""
    if not isinstance(flows, dict):
        flows = {flows.cell: flows}
    fig, ax = _axes(ax)
    for label, flow in flows.items():
        d = flow.at_distance(0)
        d = d / d[0] if d[0] > 0 else d
        ax.semilogy(np.arange(len(d)), np.where(d > 0, d, np.nan), label=label)
    ax.set_xlabel("distance in time steps")
    ax.set_ylabel("relative gradient norm")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def gates(recorded, names=None, row=0, sample=0, units=(0, 1, 2), ax=None):
    """Activations over time of a few units of one layer/direction and sequence,
    from ``model.recorded`` (a model called with record=True)."""
    names = list(recorded) if names is None else names
    fig, ax = _axes(ax, figsize=(8, 4))
    for name in names:
        values = to_host(recorded[name][row, :, sample])
        for u in units:
            ax.plot(values[:, u], label=f"{name}[{u}]", lw=1)
    ax.set_xlabel("time step")
    ax.set_ylabel("activation")
    ax.set_title("gate activations over time")
    ax.grid(alpha=0.3)
    ax.legend(ncol=len(names), fontsize=8)
    fig.tight_layout()
    return fig


def training_curves(curves, ax=None, ylabel="loss", log=False, title=None):
    """curves: {label: history} where history is a metrics.csv path or a list of
    [step, loss, ...] rows (as ``gpurnn.train`` returns)."""
    fig, ax = _axes(ax)
    for label, history in curves.items():
        if isinstance(history, str):
            with open(history) as f:
                rows = [[float(v) for v in r[:2]] for r in list(csv.reader(f))[1:]]
        else:
            rows = [[float(r[0]), float(r[1])] for r in history]
        steps, losses = zip(*rows) if rows else ((), ())
        ax.plot(steps, losses, label=label, lw=1, marker="o" if len(rows) <= 50 else None, ms=3)  # sparse: dots
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def save(fig, path):
    """Write a figure to ``path`` through a temporary file and a rename, then close it."""
    import os

    import matplotlib.pyplot as plt

    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext or '.png'}"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)  # a no-op for figures made without pyplot
    os.replace(tmp, path)
