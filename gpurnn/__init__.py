"""gpurnn: RNN, LSTM and GRU with hand-written backpropagation through time.

The NumPy backend is the reference; the CUDA backend (numba.cuda kernels and
cuBLAS through CuPy) mirrors it. ``get_backend()`` says which one runs and why.
"""

from gpurnn import amp, data, diagnostics, optim, plot, precision
from gpurnn.backend import (get_backend, set_cpu_kernels, set_math_mode, set_rnn_algorithm, to_host,
                            use_deterministic_algorithms)
from gpurnn.layers import GRU, LSTM, RNN
from gpurnn.model import CharLM, SequenceRegressor
from gpurnn.nn import Embedding, Linear, MSELoss, SoftmaxCrossEntropy

__all__ = ["RNN", "LSTM", "GRU", "Embedding", "Linear", "SoftmaxCrossEntropy", "MSELoss", "CharLM",
           "SequenceRegressor", "amp", "data", "optim", "precision", "diagnostics", "plot", "get_backend",
           "set_cpu_kernels", "set_math_mode", "set_rnn_algorithm", "to_host", "use_deterministic_algorithms"]
__version__ = "0.1.0"
