"""A stand-in GPU for tests on machines without one.

DeviceArray is a NumPy array that plays a CuPy array: reading its values on the host
(float(), int(), bool(), .item(), formatting, ...) raises HostRead while
`DeviceArray.armed` is set, and .get() copies it to NumPy as CuPy's does. FakeCuPy is
NumPy, except that the arrays it creates are DeviceArrays. install(monkeypatch) makes
npgpt's --device gpu use them, so the code's CuPy branches (`xp is not numpy`) run with
NumPy's arithmetic. What it cannot see: np.asarray() of a subclass is a plain view, where
CuPy would raise. install(monkeypatch, fused=True) also runs npgpt's fused CUDA kernels,
compiled by g++ against the CUDA emulator of emulated_cuda.py. Its `add.at` raises: on a
GPU it adds with atomics, in no fixed order, so a resumed run would differ in the last bits.
Its `cuda.cublas.gemmStridedBatchedEx` and `gemmEx` read and write NumPy memory through
the raw pointers they are handed (DeviceArray.data.ptr), with cuBLAS's column-major
conventions.
"""
import contextlib
import ctypes
import types

import numpy as np
import pytest

import emulated_cuda
import npgpt.arrays
import npgpt.attention
import npgpt.backend
import npgpt.decode
import npgpt.fused_attention
import npgpt.fused_optim
import npgpt.kernels
import npgpt.mixed
import npgpt.model
import npgpt.ops
import npgpt.optim


class HostRead(AssertionError):
    pass


class DeviceArray(np.ndarray):
    """A NumPy array that plays a GPU array: reading its values on the host raises while
    `DeviceArray.armed` is set. Results of operations on it are DeviceArrays too."""
    armed = False

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return super().__array_wrap__(arr, context, False)  # reductions stay 0-d arrays

    def get(self):
        """A NumPy copy, as cupy.ndarray.get()."""
        return np.array(self.view(np.ndarray))

    @property
    def data(self):
        """As cupy.ndarray.data: .ptr is the address of the first element."""
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _host_read(name):
    def read(self, *args, **kwargs):
        if DeviceArray.armed:
            raise HostRead(f"{name}() of a device array: the host would wait for the GPU")
        return getattr(self.view(np.ndarray), name)(*args, **kwargs)
    return read


for _name in ("__float__", "__int__", "__index__", "__bool__", "__complex__", "__format__",
              "item", "tolist", "tobytes"):
    setattr(DeviceArray, _name, _host_read(_name))


class AtomicAdd(AssertionError):
    pass


class _AddWithoutAt:
    """np.add, whose .at (a scatter-add: atomics on a GPU) raises AtomicAdd."""

    def __call__(self, *args, **kwargs):
        return np.add(*args, **kwargs)

    def at(self, *args):
        raise AtomicAdd("add.at on the device: atomics add in no fixed order, so the "
                        "result's last bits vary from run to run")


def _matrices(ptr, dtype, trans, rows, cols, ld, stride, count):
    """The `count` matrices op(X) of shape (rows, cols) that cuBLAS reads at address ptr:
    stored column-major with leading dimension ld, `stride` elements apart; op(X) = X
    for OP_N (element (r, c) at r + c ld), X^T for OP_T (element (r, c) at c + r ld)."""
    item = dtype.itemsize
    step_r, step_c = (1, ld) if trans == 0 else (ld, 1)
    assert trans in (0, 1) and ld >= (rows if trans == 0 else cols), (trans, rows, cols, ld)
    size = (count - 1) * stride + (rows - 1) * step_r + (cols - 1) * step_c + 1  # elements
    memory = np.frombuffer((ctypes.c_char * (size * item)).from_address(ptr), dtype=dtype)
    return np.lib.stride_tricks.as_strided(
        memory, (count, rows, cols), (stride * item, step_r * item, step_c * item))


class EmulatedCublas:
    """cupy_backends.cuda.libs.cublas's gemmStridedBatchedEx and gemmEx, computed by NumPy
    on the memory the pointers address: C = op(A) op(B) (+ C, for beta = 1) per batch,
    float32 sums, rounded to C's type once (float16 or float32 for float16 A and B).
    `calls` records each call's compute type."""
    TYPES = {0: np.dtype(np.float32), 2: np.dtype(np.float16)}  # CUDA_R_32F, CUDA_R_16F

    def __init__(self):
        self.calls = []

    def gemmEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb,
               beta, C, Ctype, ldc, compute, algo):
        """cublasGemmEx: one product, gemmStridedBatchedEx's with a batch of one."""
        self.gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B,
                                  Btype, ldb, 0, beta, C, Ctype, ldc, 0, 1, compute, algo)

    def gemmStridedBatchedEx(self, handle, transa, transb, m, n, k, alpha, A, Atype, lda,
                             strideA, B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC,
                             count, compute, algo):
        assert Atype == Btype and Ctype in (Atype, 0) and compute in (68, 77) and algo == -1
        alpha, beta = (ctypes.c_float.from_address(x).value for x in (alpha, beta))
        assert alpha == 1.0 and beta in (0.0, 1.0)  # C = op(A) op(B), or C += (beta = 1)
        self.calls.append(compute)
        dtype = self.TYPES[Atype]
        a = _matrices(A, dtype, transa, m, k, lda, strideA, count)
        b = _matrices(B, dtype, transb, k, n, ldb, strideB, count)
        c = _matrices(C, self.TYPES[Ctype], 0, m, n, ldc, strideC, count)
        if count == 1:  # one product: the row-major one asked for, C^T = B^T A^T, by
            # NumPy's 2-D matmul (BLAS, whose summation order depends on the operands' order)
            product = np.matmul(b[0].T.astype(np.float32), a[0].T.astype(np.float32)).T[None]
        else:
            product = np.matmul(a.astype(np.float32), b.astype(np.float32))
        c[...] = product + c if beta else product  # (float32 sums, rounded to C's type)


class FakeCuPy:
    """NumPy, except that the arrays it creates are DeviceArrays."""
    ndarray = DeviceArray
    add = _AddWithoutAt()

    def __init__(self):
        self.cuda = types.SimpleNamespace(cublas=EmulatedCublas(), get_cublas_handle=lambda: 0)

    RawModule = emulated_cuda.RawModule  # kernels compiled by g++ (install(fused=True))
    random = types.SimpleNamespace(  # CuPy 14's signatures: Philox4x3210(seed, *, size)
        Generator=np.random.Generator,
        Philox4x3210=lambda seed=None, *, size=-1: np.random.Philox(seed))

    def __getattr__(self, name):
        attr = getattr(np, name)
        # the makers, and vdot and where, which can give NumPy scalars or plain arrays
        # where CuPy gives (0-d) device arrays
        if name in ("empty", "zeros", "ones", "full", "asarray", "array", "arange", "vdot",
                    "ascontiguousarray", "where"):
            return lambda *args, **kwargs: np.asarray(attr(*args, **kwargs)).view(DeviceArray)
        return attr


@contextlib.contextmanager
def no_host_reads():
    DeviceArray.armed = True
    try:
        yield
    finally:
        DeviceArray.armed = False


def install(monkeypatch, fused=False):
    """From here on, models made with device="gpu" live on the stand-in device; with
    fused=True they run npgpt's fused kernels in the CUDA emulator (skips the test where
    there is no C++ compiler)."""
    fake = FakeCuPy()
    if fused:
        missing = emulated_cuda.compiler_missing()
        if missing:
            pytest.skip(f"the fused kernels run in a CUDA emulator built by g++: {missing}")
    monkeypatch.setenv("NPGPT_FUSED", "1" if fused else "0")

    def get_xp(*arrays):
        return fake if any(isinstance(a, DeviceArray) for a in arrays) else np

    for module in (npgpt.arrays, npgpt.attention, npgpt.backend, npgpt.decode,
                   npgpt.fused_attention, npgpt.fused_optim, npgpt.kernels, npgpt.mixed,
                   npgpt.model, npgpt.ops, npgpt.optim):
        monkeypatch.setattr(module, "get_xp", get_xp)
    monkeypatch.setattr(npgpt.backend, "gpu_available", lambda: True)
    monkeypatch.setattr(npgpt.model, "array_module",
                        lambda device: fake if device == "gpu" else np)
    return fake
