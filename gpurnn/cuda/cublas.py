"""cuBLAS GEMMs called through ctypes on CuPy's own handle.

CuPy refuses to call cuBLAS while a stream is being captured into a CUDA
graph; cuBLAS itself captures fine. So the GEMMs go straight to the libcublas
CuPy loaded, with its handle, after pointing that handle at our stream (CuPy's
own calls re-point it to theirs).

Setting the stream also resets the handle's workspace to its default pool. A
GEMM that may run at the same time as others on the same handle (the side
stream's) is given a workspace of its own, as cuBLAS asks of concurrent
streams sharing a handle (torch keeps one per handle and stream likewise).
"""

import ctypes
import ctypes.util

_OP_N, _OP_T = 0, 1
_DATA_TYPE = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}  # CUDA_R_32F, _64F, _16F, _16BF
_COMPUTE = {("fp32", "float32"): 68,  # CUBLAS_COMPUTE_32F
            ("tf32", "float32"): 77,  # CUBLAS_COMPUTE_32F_FAST_TF32
            ("fp32", "float64"): 70,  # CUBLAS_COMPUTE_64F
            ("tf32", "float64"): 70,
            ("fp32", "float16"): 68,  # half operands, float32 accumulation, one rounding on store
            ("tf32", "float16"): 68,
            ("fp32", "bfloat16"): 68,
            ("tf32", "bfloat16"): 68}
_GEMM_DEFAULT = -1
_POINTER_MODE_HOST = 0


def _find_libcublas():
    """The libcublas already mapped into this process by CuPy, else the system's."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/libcublas.so" in path:
                return path
    return ctypes.util.find_library("cublas")


class Cublas:
    def __init__(self, cupy):
        self._handle = cupy.cuda.device.get_cublas_handle()  # also makes CuPy load libcublas
        path = _find_libcublas()
        if path is None:
            raise OSError("libcublas not found")
        lib = ctypes.CDLL(path)
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        self._set_stream = lib.cublasSetStream_v2
        self._set_stream.argtypes = [vp, vp]
        self._set_pointer_mode = lib.cublasSetPointerMode_v2
        self._set_pointer_mode.argtypes = [vp, i32]
        self._set_workspace = lib.cublasSetWorkspace_v2
        self._set_workspace.argtypes = [vp, vp, ctypes.c_size_t]
        self._gemm = lib.cublasGemmEx
        self._gemm.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32, vp, vp, i32, i32,
                               i32, i32]
        # host scalars alpha = 1 and beta in {0, 1}, kept alive for captured graphs
        # (float32 scalars for half too: cuBLAS takes alpha and beta in the compute type)
        self._scalars = {"float32": (ctypes.c_float(1), ctypes.c_float(0), ctypes.c_float(1)),
                         "float64": (ctypes.c_double(1), ctypes.c_double(0), ctypes.c_double(1))}
        self._scalars["float16"] = self._scalars["bfloat16"] = self._scalars["float32"]

    def _check(self, status, what):
        if status != 0:
            raise RuntimeError(f"cuBLAS {what} failed with status {status}")

    def gemm(self, stream_ptr, a, b, out, trans_a, trans_b, beta, math_mode, workspace=None):
        """out = op(a) @ op(b) + beta * out on row-major CuPy arrays with unit
        inner stride. cuBLAS is column-major, so it computes out^T = op(b)^T op(a)^T.
        workspace: None (the handle's default pool), or a CuPy uint8 buffer for this call."""
        dtype = out.dtype.name
        M, N = out.shape
        K = a.shape[0] if trans_a else a.shape[1]
        item = out.itemsize
        one, zero, beta_one = self._scalars[dtype]
        data_type = _DATA_TYPE[dtype]
        self._check(self._set_stream(self._handle, stream_ptr), "SetStream")
        if workspace is not None:
            self._check(self._set_workspace(self._handle, workspace.data.ptr, workspace.nbytes), "SetWorkspace")
        self._check(self._set_pointer_mode(self._handle, _POINTER_MODE_HOST), "SetPointerMode")
        status = self._gemm(
            self._handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, N, M, K,
            ctypes.addressof(one), b.data.ptr, data_type, b.strides[0] // item,
            a.data.ptr, data_type, a.strides[0] // item,
            ctypes.addressof(beta_one if beta else zero), out.data.ptr, data_type, out.strides[0] // item,
            _COMPUTE[(math_mode, dtype)], _GEMM_DEFAULT)
        self._check(status, "GemmEx")
