"""The array plumbing that the ops in ops.py share: where their results go (Workspace),
which dtype a sum is taken in (sum_dtype: float32 for a float16 model), matrix products
(matmul) and row and column sums. Every function takes its array module from its inputs,
so the same code runs on NumPy or CuPy.
"""
import functools
import math

import numpy as np

from .backend import get_xp
from .gemm import batched_matmul


class Workspace:
    """Memory reused from one call of an op to the next: `ws(name, shape, like)` returns
    an array of `shape` (like's dtype, or `dtype`) in the memory kept under `name` (one
    per dtype), grown as needed. A fresh 8 MB result costs more (the kernel faults in and
    zeroes its pages) than a matrix product written into memory already mapped. What an
    op writes lives until the next use of the same name, so layers choose who shares a
    workspace (layers.py).
    FRESH (reuse=False), the ops' default `ws=`, always allocates (a Workspace you make
    reuses unless told reuse=False). A name asked for in a shape it had before (since its
    memory last grew) gets the same view back: a step asks the same shapes every time,
    and layers that share a workspace ask one name in several (the linear layers'
    backward: (N, C), (N, 4C), ...); making the view anew cost more than the rest of the
    call, 2 us on NumPy and more on CuPy, whose GPU step waits for the host."""

    MAX_VIEWS = 8  # shapes kept per name (sampling without a cache asks a new T each token)

    def __init__(self, reuse=True):
        self.reuse, self.arrays, self.views = reuse, {}, {}

    def __call__(self, name, shape, like, dtype=None):
        key = (name, like.dtype if dtype is None else dtype)  # (a float16 model keeps
        views = self.views.get(key)                           # float32 sums beside)
        view = None if views is None else views.get(shape)
        if view is not None:
            return view
        size, a = math.prod(shape), self.arrays.get(key)
        if a is None or a.size < size:
            a = get_xp(like).empty(size, dtype=key[1])
            if not self.reuse:
                return a.reshape(shape)
            self.arrays[key] = a
            self.views[key] = views = {}  # (the old memory's views go with it)
        if len(views) >= self.MAX_VIEWS:
            views.clear()
        views[shape] = view = a[:size].reshape(shape)
        return view

    def new(self):
        """Another Workspace that reuses its memory exactly when this one does."""
        return Workspace(self.reuse)


FRESH = Workspace(reuse=False)


@functools.lru_cache(maxsize=32)
def ones_vector(n, dtype):
    """A vector of n ones, made once per (n, dtype): row_sums multiplies by it."""
    return np.ones(n, dtype=dtype)


@functools.lru_cache(maxsize=None)
def sum_dtype(dtype):
    """The dtype a sum over many terms is taken in: float32 for float16, else dtype itself.
    float16 has an 11-bit mantissa and a largest value of 65504: a running sum of 2048
    terms of 1.0 stops growing (2048 + 1 rounds back to 2048), and a row of 384 squares
    of 20 overflows. So every reduction of a float16 model (LayerNorm's mean and variance,
    softmax's row sums, the log-sum-exp, the parameter gradients' sums) is float32."""
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


# Element-wise ops on the CPU run their passes over blocks of whole rows of about this
# many elements: a block's arrays (1 MB each in float32) stay in the caches from one pass
# to the next, where a whole (B,T,4C) array of the lecture preset (50 MB) makes every pass
# a trip to memory. Measured on a 2-core AMD EPYC (1 MB L2 per core, 32 MB L3), one
# thread, forward + backward: GELU of (8192, 1536) 68 ms whole, 37 ms in blocks of 64K
# (an older GELU); LayerNorm of (8192, 384) 26 ms, 15 ms. Later, in the lecture step with
# two workers, blocks of 256K against 64K (6 rounds alternating, `train_step.py --profile`):
# GELU 289 -> 254 ms a step, LayerNorm 229 -> 176 ms, the step 6769 -> 6692 ms (faster in
# every round; fewer Python calls per pass). Arrays the L3 holds gain nothing (a block's
# Python calls cost what its cache saves): up to WHOLE_ELEMENTS they stay whole.
BLOCK_ELEMENTS = 1 << 18
WHOLE_ELEMENTS = 1 << 21


def blocks(n, item_elements, like):
    """Slices of range(n) (items of item_elements elements each, e.g. rows) holding about
    BLOCK_ELEMENTS elements each; one slice of everything on a GPU (one kernel launch
    per pass is what it wants) or when the n items hold at most WHOLE_ELEMENTS."""
    if n * item_elements <= WHOLE_ELEMENTS or get_xp(like) is not np:
        return [slice(0, n)]
    step = max(1, BLOCK_ELEMENTS // item_elements)
    return [slice(i, i + step) for i in range(0, n, step)]


def row_blocks(*arrays):
    """Blocks of the same rows of `arrays` (each seen as (rows, its last axis); the same
    number of rows), as tuples of 2-D views, cut by `blocks`; the arrays themselves, in one
    tuple, when they stay whole. Writes into a view land in the array, so outputs must be
    contiguous (Workspace arrays are)."""
    width = arrays[0].shape[-1]
    cuts = blocks(arrays[0].size // width, width, arrays[0])
    if len(cuts) == 1:  # (the common case: no reshapes, no views)
        return [arrays]
    flat = [a.reshape(-1, a.shape[-1]) for a in arrays]  # (rows, last axis) each
    return [tuple(f[b] for f in flat) for b in cuts]


def matmul(a, b, out=None):
    """a @ b (into `out`, else a new array of a's dtype). On a GPU, matrices and stacks
    of them (attention's) go to cuBLAS through gemm.batched_matmul.

    float16 inputs are multiplied with float32 sums and the result rounded to float16
    once, as a GPU's tensor cores do: CuPy's float16 product does that itself. NumPy's
    float16 matmul has no BLAS (100x slower than float32 here), so on the CPU the inputs
    are copied to float32 (exact: every float16 is a float32), multiplied by float32 BLAS
    and the result rounded once: the same numbers, at float32's speed plus two copies."""
    xp = get_xp(a)
    if xp is not np:  # matrices and stacks of them through cuBLAS directly (gemm.py)
        product = batched_matmul(xp, a, b, out)
        return xp.matmul(a, b, out=out) if product is None else product
    if a.dtype != np.float16:
        return xp.matmul(a, b, out=out)
    product = np.matmul(a.astype(np.float32), b.astype(np.float32))
    if out is None:
        return product.astype(np.float16)
    out[...] = product
    return out


def matmul_add(a, b, out, ws, name):
    """out += a @ b (a layer's weight gradient). On a GPU one cuBLAS call that adds itself
    (beta = 1), into float32 for float16 operands with float32 sums; elsewhere the product
    goes to ws's `name` array (a's dtype), then is added. Returns out."""
    xp = get_xp(a)
    if xp is not np and batched_matmul(xp, a, b, out, add=True) is not None:
        return out
    out += matmul(a, b, out=ws(name, out.shape, a))
    return out


def row_sums(a, ws, name, weights=None):
    """(..., 1) row sums of `a`, or of a * weights (weights: a vector over the last axis),
    in sum_dtype. On the CPU one matrix-vector product a @ ones (or a @ weights: BLAS beats
    NumPy's reductions over short rows several times); on a GPU, and for float16, a
    reduction that adds in float32 (with TF32 on, a matrix product would round every term
    to 10 bits)."""
    xp, acc = get_xp(a), sum_dtype(a.dtype)
    out = ws(name, a.shape[:-1] + (1,), a, acc)
    if xp is not np or acc != a.dtype:
        terms = a if weights is None else a * weights
        return terms.sum(axis=-1, keepdims=True, dtype=acc, out=out)
    v = ones_vector(a.shape[-1], a.dtype) if weights is None else weights
    np.matmul(a.reshape(-1, a.shape[-1]), v, out=out.reshape(-1))
    return out


# On a GPU, CuPy's reduction down long columns runs one column per block over strided
# reads: on an H200, (8192, 384) took 122 us and (8192, 1536) 210 us. Summing groups of
# rows first, (COLUMN_GROUPS, N / COLUMN_GROUPS, C) -> (COLUMN_GROUPS, C) -> (C,), gives
# the reduction 64 times the blocks: 75 us for both. (The fused path has a kernel.)
COLUMN_GROUPS = 64


def column_sums(a, out=None, *, add=False):
    """(C,) column sums of a (..., C), over all its rows, in sum_dtype: ones @ a2 by BLAS
    on the CPU, as row_sums; on a GPU a reduction, over groups of rows first.
    out: None (a new array), or a (C,) array of sum_dtype written, or added to (add=True:
    out += the sums, as a layer adds its gradient); then returned."""
    a2 = a.reshape(-1, a.shape[-1])  # (N, C)
    (N, C), acc, xp = a2.shape, sum_dtype(a2.dtype), get_xp(a2)
    if xp is np and acc == a2.dtype:
        sums = np.matmul(ones_vector(N, a2.dtype), a2)
    elif xp is not np and N > COLUMN_GROUPS and N % COLUMN_GROUPS == 0:
        groups = a2.reshape(COLUMN_GROUPS, N // COLUMN_GROUPS, C)  # (groups, rows, C)
        sums = groups.sum(axis=1, dtype=acc).sum(axis=0)
    else:
        sums = a2.sum(axis=0, dtype=acc)
    if out is None:
        return sums
    if add:
        out += sums
    else:
        out[...] = sums
    return out
