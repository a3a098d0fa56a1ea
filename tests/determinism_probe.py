"""Run a fixed set of seeded computations and save every result's bytes.

    python tests/determinism_probe.py OUT.npz [--small]

On the backend GPURNN_BACKEND picks: each cell (2 layers, bidirectional, dropout,
lengths) forward and backward in training mode, then an eval forward; a CharLM
with its embedding folded into the first layer and one without (whose gradient
sums repeated rows), 3 Adam steps each. Two processes given the same arguments
must write the same bytes (tests/test_determinism.py).
"""

import sys

import numpy as np

import gpurnn


def results(small):
    T, B, I, H = (4, 3, 3, 5) if small else (12, 5, 8, 16)
    out = {}
    for cell in ("rnn", "lstm", "gru"):
        rng = np.random.default_rng(0)
        cls = {"rnn": gpurnn.RNN, "lstm": gpurnn.LSTM, "gru": gpurnn.GRU}[cell]
        m = cls(I, H, num_layers=2, bidirectional=True, dropout=0.3, seed=1)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        lengths = rng.integers(1, T + 1, B)
        res, state = m(x, lengths=lengths)
        d_out = rng.standard_normal(res.shape).astype(np.float32)
        dx, d_state = m.backward(d_out)
        m.eval()
        res_eval, _ = m(x, lengths=lengths)
        for name, a in [("out", res), ("state", state), ("dx", dx), ("d_state", d_state), ("eval_out", res_eval),
                        *(("grad." + k, g) for k, g in m.grads.items())]:
            for j, part in enumerate(a if isinstance(a, tuple) else (a,)):
                out[f"{cell}.{name}.{j}"] = gpurnn.to_host(part)
    for V in (2 * H, H // 2):  # V > E: embedding then stack (scatter-added gradient); V <= E: folded
        rng = np.random.default_rng(1)
        lm = gpurnn.CharLM(V, H, num_layers=2, dropout=0.2, seed=2)
        opt = gpurnn.optim.Adam(lm.params, lm.grads, lr=1e-2)
        losses, state = [], None
        for _ in range(3):
            x, y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
            loss, state = lm.forward(x, y, state)
            lm.backward()
            gpurnn.optim.clip_grad_norm(lm.grads, 1.0)
            opt.step()
            lm.zero_grad()
            losses.append(float(loss))
        out[f"charlm{V}.losses"] = np.array(losses)
        out.update({f"charlm{V}.{k}": gpurnn.to_host(p) for k, p in lm.params.items()})
    return out


if __name__ == "__main__":
    np.savez(sys.argv[1], **results("--small" in sys.argv))
