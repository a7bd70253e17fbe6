"""Matrix products on a GPU, straight through cuBLAS (arrays.matmul calls this).

Attention multiplies stacks of matrices: (B,nh,T,hs) @ (B,nh,hs,T) and the like, where
q, k, v and their gradients are strided views into the fused (B,T,3C) arrays and some
operands are transposed views. CuPy's batched matmul (cupy 14) copies every operand that
is not C-contiguous, writes into a temporary when `out` is a view, and multiplies in
plain float32 even with TF32 on (and float16 by way of float32 copies): on an H200 the
profile of a TF32 lecture step showed its float32 batched products (3.4 ms) and CuPy's
copies (4.2 ms) beside 4.8 ms for all the linear layers' TF32 products.

cublasGemmStridedBatchedEx reads each matrix through a leading dimension and a
transpose flag, so the views go in as they are:
- cuBLAS is column-major. A row-major (m, n) matrix with row stride ld is, to cuBLAS, its
  transpose (n, m) with leading dimension ld. So C = A B (row-major) is asked for as
  C^T = B^T A^T: cuBLAS's first operand is B, its second A, its m and n are our n and m.
- An operand whose last axis has unit stride is row-major (cuBLAS sees its transpose:
  flag N); one whose second-to-last axis has unit stride is a transposed view (flag T).
- The batch axes (B, nh) become one cuBLAS batch where every operand's strides allow
  it; otherwise the largest axis is the batch and a Python loop runs over the others
  (q's view of (B,T,3C): 64 batches of rows, one launch per head; the fused attention of
  kernels.py hands over contiguous heads instead, one launch a product).
- float32: CUBLAS_COMPUTE_32F, or _FAST_TF32 when CUPY_TF32 is set (as CuPy decides for
  its own products; backend.enable_tf32 sets it). float16: float16 in and out, float32
  sums (tensor cores), as arrays.matmul promises.
A single (m, k) @ (k, n) product goes to cublasGemmEx, with the same arguments but the
batch: CuPy's own 2-D matmul spent about 58 us of host time per call in the TF32 lecture
step's profile (75 calls), where this call costs a fraction of that, and the step waits
for the host.
Anything else (float64, broadcast batch shapes, an operand with no unit stride in its
last two axes) goes to xp.matmul. The test suite's stand-in GPU checks this mapping with
an emulated cublasGemmStridedBatchedEx that reads NumPy memory through the same pointers.
"""
import itertools
import os
from collections import namedtuple

import numpy as np

# cuBLAS and CUDA enum values (cublas_api.h, library_types.h): fixed by NVIDIA's ABI
OP_N, OP_T = 0, 1
CUDA_TYPE = {np.dtype(np.float32): 0, np.dtype(np.float16): 2}  # CUDA_R_32F, CUDA_R_16F
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77
GEMM_DEFAULT = -1
ONE, ZERO = np.array(1.0, dtype=np.float32), np.array(0.0, dtype=np.float32)  # alpha, beta
ONE_PTR, ZERO_PTR = ONE.ctypes.data, ZERO.ctypes.data  # (their addresses: the calls' own)


def _layout(a):
    """(transpose flag, leading dimension) of the matrix in a's last two axes as cuBLAS
    reads it (see the module's docstring), or None if neither axis has unit stride."""
    item, (rows, cols) = a.itemsize, a.shape[-2:]
    s_row, s_col = a.strides[-2:]
    if s_col == item or cols == 1:     # row-major: cuBLAS sees the transpose, flag N
        ld = s_row // item if rows > 1 else cols
        return (OP_N, ld) if s_row % item == 0 and ld >= cols else None
    if s_row == item or rows == 1:     # a transposed view: flag T
        ld = s_col // item if cols > 1 else rows
        return (OP_T, ld) if s_col % item == 0 and ld >= rows else None
    return None


def _batch_axes(shape, stride_lists):
    """Merge adjacent batch axes where every operand's strides allow it.
    Returns [(size, [stride of each operand])], in elements."""
    axes = []
    for i, n in enumerate(shape):
        strides = [s[i] for s in stride_lists]
        if axes and all(prev == s * n for prev, s in zip(axes[-1][1], strides)):
            axes[-1] = (axes[-1][0] * n, strides)  # the outer axis steps over this one whole
        else:
            axes.append((n, strides))
    return axes


# The fixed arguments of one product's cuBLAS calls, worked out once per layout (a step
# asks for the same few dozen layouts every time; working them out costs more host time
# than the call): cuBLAS's operands in its order (b's, then a's: see the docstring), the
# batch count and the byte offsets of each call when a Python loop runs over batch axes.
Plan = namedtuple("Plan", "op_b op_a n m k ld_b stride_b ld_a stride_a ld_c stride_c count "
                          "type_ab type_c compute offsets")
_PLANS = {}
MAX_PLANS = 256


def _plan(a, b, out, tf32):
    """The Plan of out = a @ b, or None when cuBLAS cannot take these operands."""
    dtype = a.dtype
    if (dtype not in CUDA_TYPE or b.dtype != dtype or a.ndim < 2 or a.ndim != b.ndim
            or a.shape[:-2] != b.shape[:-2] or 0 in a.shape or 0 in b.shape
            or out.dtype not in (dtype, np.float32)  # (float16 products into float32)
            or out.shape != a.shape[:-1] + b.shape[-1:]):
        return None
    lay_a, lay_b, lay_c = _layout(a), _layout(b), _layout(out)
    if lay_a is None or lay_b is None or lay_c is None or lay_c[0] != OP_N:
        return None
    if any(s % x.itemsize for x in (a, b, out) for s in x.strides[:-2]):
        return None
    axes = _batch_axes(a.shape[:-2], [[s // x.itemsize for s in x.strides[:-2]]
                                      for x in (a, b, out)])
    axes = axes or [(1, [0, 0, 0])]  # one (m, k) @ (k, n) product: a batch of one
    inner = max(range(len(axes)), key=lambda i: axes[i][0])  # cuBLAS's batch: the largest
    count, (stride_a, stride_b, stride_c) = axes[inner]
    others = [axes[i] for i in range(len(axes)) if i != inner]
    offsets = tuple(tuple(x.itemsize * sum(i * strides[j] for i, (_, strides)
                                           in zip(index, others))
                          for j, x in enumerate((a, b, out)))  # bytes, of a, b, out
                    for index in itertools.product(*(range(size) for size, _ in others)))
    m, k = a.shape[-2:]
    return Plan(lay_b[0], lay_a[0], b.shape[-1], m, k, lay_b[1], stride_b, lay_a[1], stride_a,
                lay_c[1], stride_c, count, CUDA_TYPE[dtype], CUDA_TYPE[out.dtype],
                COMPUTE_32F_FAST_TF32 if tf32 else COMPUTE_32F, offsets)


def uses_tf32(dtype):
    """Whether float32 products run on TF32 tensor cores: when CUPY_TF32 is set, as CuPy
    decides for its own products (backend.enable_tf32 sets it)."""
    return dtype == np.float32 and int(os.environ.get("CUPY_TF32", "0")) > 0


def batched_matmul(xp, a, b, out, *, add=False):
    """out = a @ b for (..., m, k) @ (..., k, n) on a GPU through cuBLAS (no batch axes:
    one product), or None when the operands do not fit (the caller then uses xp.matmul).
    out: a (..., m, n) array whose last axis has unit stride (a view is fine), or None
    for a new one; float32 for float16 operands too (float32 sums, rounded once).
    add=True: out += a @ b, by cuBLAS itself (its beta = 1)."""
    if a.dtype not in CUDA_TYPE:
        return None
    if out is None:
        if a.ndim < 2 or b.ndim < 2:
            return None
        out = xp.empty(a.shape[:-1] + b.shape[-1:], dtype=a.dtype)
    tf32 = uses_tf32(a.dtype)
    key = (a.dtype, a.shape, a.strides, b.dtype, b.shape, b.strides, out.dtype, out.shape,
           out.strides, tf32)
    plan = _PLANS.get(key, False)
    if plan is False:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(a, b, out, tf32)
    if plan is None:
        return None
    p, t, beta = plan, plan.type_ab, ONE_PTR if add else ZERO_PTR
    cublas, handle = xp.cuda.cublas, xp.cuda.get_cublas_handle()
    if p.count == 1 and len(p.offsets) == 1:  # one product: cublasGemmEx (CuPy's own call
        cublas.gemmEx(handle, p.op_b, p.op_a, p.n, p.m, p.k, ONE_PTR,  # for a 2-D matmul,
                      b.data.ptr, t, p.ld_b, a.data.ptr, t, p.ld_a,   # whose heuristics may
                      beta, out.data.ptr, p.type_c, p.ld_c, p.compute, GEMM_DEFAULT)  # differ)
        return out
    gemm = cublas.gemmStridedBatchedEx
    for off_a, off_b, off_c in p.offsets:
        # C^T (n, m) = B^T (n, k) A^T (k, m): cuBLAS's A is our b, its B our a
        gemm(handle, p.op_b, p.op_a, p.n, p.m, p.k, ONE_PTR,
             b.data.ptr + off_b, t, p.ld_b, p.stride_b,
             a.data.ptr + off_a, t, p.ld_a, p.stride_a, beta,
             out.data.ptr + off_c, p.type_c, p.ld_c, p.stride_c, p.count, p.compute,
             GEMM_DEFAULT)
    return out
