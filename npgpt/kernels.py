"""Fused CUDA kernels (kernels_*.cu) behind the same signatures as the ops they replace.

On a GPU the plain array code of ops.py makes one pass over memory per NumPy-style
expression: LayerNorm's forward is about ten, a softmax four. Each kernel here does the
same math in one pass (its formula is written above it in the .cu file, and
tests/test_kernels.py checks it against the plain op). `fused_ops(xp, dtype)` hands a
model either ops.py itself or a namespace where these functions (and attention's, in
fused_attention.py, which launches through the launchers here) stand in for the plain
ones, signature for signature; the model chooses once, when its parameters are
allocated, and float64 models and CPU models always get the plain code. A float16 model
(mixed.py) gets the same functions: each launches the `_f16` version of its kernel when
its arrays are float16 (the math in float, each result rounded to float16 once, the row
statistics and column sums float32 as ops.sum_dtype says).

Status: every kernel passed its tests on an NVIDIA H200 (benchmarks/RESULTS.md, the third
run; column_sums_split, which adds LayerNorm's gradients into the layer's, came later),
and runs in tests/emulated_cuda.py's emulator (g++ on the CPU) on every machine. They are
the GPU's default; NPGPT_FUSED=0 turns them off (the plain CuPy array code of ops.py).

The kernels are compiled by `xp.RawModule` of the arrays' own module (CuPy, or the test
suite's stand-in), once per module. Arguments go to a kernel as raw bytes, so every
scalar is a NumPy scalar of the kernel's C type (np.int32 for int, np.int64 for long
long, np.float32 for float): a Python int would arrive as 64 bits.
"""
import functools
import math
import os
import types
from collections import namedtuple
from pathlib import Path

import numpy as np

from . import ops
from .arrays import FRESH, sum_dtype
from .backend import get_xp

# the CUDA source, by concern: the shared helpers first (storage types, warp sums)
SOURCES = tuple(Path(__file__).with_name(f"kernels_{part}.cu")
                for part in ("common", "layers", "attention", "loss"))
WARPS = 4            # row kernels: warps (rows) per block of 128 threads
THREADS = 256        # flat kernels: threads per block
MAX_BLOCKS = 1 << 16  # flat kernels loop over the rest (grid-stride)
COLUMN_THREADS = 128  # column kernels: columns per block
ROW_STRIDE = 512     # column kernels: blocks along the rows (each takes every 512th row)
COLUMN_CHUNK = 32    # column_sums: rows per partial sum (8192 rows: 3 launches)
# the kernel a launch runs, by the dtype of its first array: the `name` for float32
# arrays, `name_f16` for float16 ones (the optimizer's, on float32 master weights and
# gradients, and nll_mean, on float32 losses, have only the first)
SUFFIX = {np.dtype(np.float32): "", np.dtype(np.float16): "_f16"}
FLOAT32_ONLY = {"adamw", "adamw_skippable", "nll_mean", "sum_squares", "clip_scalars",
                "mixed_scalars", "scale_grads",  # (the optimizer's: fused_optim.py)
                "column_sums_split"}  # (a column-sum tree's last level: float32 rows)


def requested():
    """Whether the fused kernels are wanted on the GPU: yes, unless NPGPT_FUSED=0."""
    return os.environ.get("NPGPT_FUSED", "1") != "0"


def applies(xp, dtype):
    """Whether arrays of `dtype` on `xp` use the fused kernels: a GPU, float32 or float16,
    not turned off."""
    return xp is not np and np.dtype(dtype) in SUFFIX and requested()


def fused_ops(xp, dtype):
    """The op functions a model on `xp` with parameters of `dtype` calls: this module's
    fused ones where they apply, else ops.py's."""
    if not applies(xp, dtype):
        return ops
    from . import fused_attention  # (which launches through this module's launchers)
    names = {n: getattr(ops, n) for n in dir(ops) if not n.startswith("_")}
    return types.SimpleNamespace(**{**names, **FUSED, **fused_attention.FUSED})


def source():
    """The kernels_*.cu files as the one CUDA program that RawModule compiles."""
    return "\n".join(path.read_text() for path in SOURCES)


@functools.lru_cache(maxsize=4)
def _module(xp):
    return xp.RawModule(code=source(), options=("--std=c++17",))


@functools.lru_cache(maxsize=64)
def _kernel(xp, name):
    """The compiled kernel `name` (looked up once, not at every launch)."""
    return _module(xp).get_function(name)


def _typed(name, xp, first):
    """The compiled kernel `name` in the version for `first`'s dtype (see SUFFIX)."""
    return _kernel(xp, name + SUFFIX[first.dtype])


def _rows(name, xp, rows, *args):
    """Launch a row kernel: one warp per row."""
    _typed(name, xp, args[0])((max(1, math.ceil(rows / WARPS)),), (32 * WARPS,), args)


def _flat(name, xp, n, *args):
    """Launch a flat kernel: one thread per element, at most MAX_BLOCKS blocks."""
    _typed(name, xp, args[0])((max(1, min(math.ceil(n / THREADS), MAX_BLOCKS)),),
                              (THREADS,), args)


def _warp(name, xp, *args):
    """Launch a kernel of one warp (a small job done in one fixed order)."""
    _typed(name, xp, args[0])((1,), (32,), args)


def _columns(name, xp, rows, C, *args):
    """Launch a column kernel: one thread per column, ROW_STRIDE blocks down the rows."""
    _typed(name, xp, args[0])((math.ceil(C / COLUMN_THREADS), max(1, min(rows, ROW_STRIDE))),
                              (COLUMN_THREADS,), args)


def _contiguous(a):
    return get_xp(a).ascontiguousarray(a)


# ----------------------------------------------------------------------------
# column sums (the gradients of biases and LayerNorm weights)


def column_sums(a, out=None, *, add=False):
    """arrays.column_sums as a tree of kernel launches: (C,) column sums of a (..., C).
    Each launch sums chunks of COLUMN_CHUNK rows, in row order, into a new matrix of one
    row per chunk, until one row is left (8192 rows: 256, 8, 1). The sums are float32
    for float16 rows too (sum_dtype). out: a contiguous float32 (C,) array the last level
    writes, or adds to (add=True: out += the sums, as a layer adds its gradient); or, for
    float32 rows, two of them, (C1,) and (C - C1,): the first C1 sums and the rest."""
    xp = get_xp(a)
    a2 = _contiguous(a.reshape(-1, a.shape[-1]))  # (N, C)
    N, C = a2.shape
    acc = sum_dtype(a2.dtype)
    while True:
        chunks = math.ceil(N / COLUMN_CHUNK)
        last = chunks == 1 and out is not None
        if last and isinstance(out, tuple):  # float32 rows here (the tree's later levels)
            part, part2 = out
            _flat("column_sums_split", xp, C, a2, part, part2, np.int32(part.size),
                  np.int64(N), np.int32(C), np.int32(COLUMN_CHUNK), np.int32(add))
            return out
        part = out.reshape(1, C) if last else xp.empty((chunks, C), dtype=acc)  # (chunks, C)
        _flat("column_sums", xp, part.size, a2, part, np.int64(N), np.int32(C),
              np.int32(COLUMN_CHUNK), np.int32(last and add))
        if chunks == 1:
            return out if last else part.reshape(C)
        a2, N = part, chunks


# ----------------------------------------------------------------------------
# embedding


def embedding_backward(dout, cache, ws=FRESH):
    """ops.embedding_backward: dwte by one kernel over the rows sorted by token (in place
    of the plain GPU code's log2(N) passes of a segmented scan), dwpe as there."""
    idx, wte_shape, wpe_shape = cache
    xp, dout = get_xp(dout), _contiguous(dout)
    T, C = dout.shape[1:]
    V, N = wte_shape[0], idx.size
    acc = sum_dtype(dout.dtype)
    ids = idx.reshape(-1).astype(xp.int64)             # (N,)
    order = xp.argsort(ids * N + xp.arange(N))         # rows by (token, position)
    starts = xp.searchsorted(ids[order], xp.arange(V + 1))  # (V+1,) token v's first row
    dwte = ws("dwte", wte_shape, dout, acc)
    _flat("token_sums", xp, V * C, dout, order.astype(xp.int64, copy=False),
          starts.astype(xp.int64, copy=False), dwte, np.int64(V), np.int32(C))
    dwpe = ws("dwpe", wpe_shape, dout, acc)
    dwpe[T:] = 0
    column_sums(dout.reshape(-1, T * C), out=dwpe[:T].reshape(T * C))  # sum over the batch
    return dwte, dwpe


# ----------------------------------------------------------------------------
# linear: the products stay cuBLAS's; the bias and its gradient by kernels


def add_bias(out, b):
    """out += b, in place: b (C,) added to every row of out (..., C), contiguous."""
    C = out.shape[-1]
    _columns("add_bias", get_xp(out), out.size // C, C, out, _contiguous(b),
             np.int64(out.size // C), np.int32(C))
    return out


linear_forward = functools.partial(ops.linear_forward, add_bias=add_bias)
linear_backward = functools.partial(ops.linear_backward, column_sums=column_sums)


# ----------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=1e-5, ws=FRESH):
    """ops.layernorm_forward in one kernel: the same (out, (xhat, rstd, w))."""
    xp, x = get_xp(x), _contiguous(x)
    C = x.shape[-1]
    rows = x.size // C
    out, xhat = ws("out", x.shape, x), ws("xhat", x.shape, x)
    rstd = ws("rstd", x.shape[:-1] + (1,), x, sum_dtype(x.dtype))  # float32 for float16
    _rows("layernorm_forward", xp, rows, x, _contiguous(w), _contiguous(b), out, xhat, rstd,
          np.int32(rows), np.int32(C), np.float32(eps))
    return out, ops.LayerNormCache(xhat, rstd, w)


def layernorm_backward(dout, cache, ws=FRESH, *, residual=None, into=None):
    """ops.layernorm_backward: dx (plus residual) in one kernel; db and dw as the two halves
    of one column_sums tree, whose first level (layernorm_param_grads) sums dout and
    dout * xhat, and whose last level adds them into `into`'s (dw, db) when given."""
    xhat, rstd, w = cache
    xp, dout = get_xp(dout), _contiguous(dout)
    C = xhat.shape[-1]
    rows = xhat.size // C
    dx = ws("dx", xhat.shape, dout)
    res = dout if residual is None else _contiguous(residual)  # (unread without one)
    _rows("layernorm_backward", xp, rows, dout, xhat, rstd, _contiguous(w), res,
          np.int32(residual is not None), dx, np.int32(rows), np.int32(C))
    chunks = math.ceil(rows / COLUMN_CHUNK)
    part = xp.empty((chunks, 2 * C), dtype=sum_dtype(dout.dtype))  # (chunks, [db | dw])
    _flat("layernorm_param_grads", xp, chunks * C, dout, xhat, part, np.int64(rows),
          np.int32(C), np.int32(COLUMN_CHUNK))
    if into is not None:
        dw, db = into
        column_sums(part, out=(db, dw), add=True)  # db += part's first half, dw += the rest
        return dx, dw, db
    sums = column_sums(part) if chunks > 1 else part.reshape(2 * C)  # (2C,)
    return dx, sums[C:], sums[:C]


# ----------------------------------------------------------------------------
# GELU


def gelu_forward(x, ws=FRESH):
    """ops.gelu_forward in one kernel (the same cache: x and out)."""
    xp, x = get_xp(x), _contiguous(x)
    out = ws("out", x.shape, x)
    _flat("gelu_forward", xp, x.size, x, out, np.int64(x.size))
    return out, ops.GeluCache(x, out)


def gelu_backward(dout, cache, ws=FRESH):
    """ops.gelu_backward in one kernel (recomputes tanh from x)."""
    x, _ = cache
    xp, dout = get_xp(dout), _contiguous(dout)
    dx = ws("dx", x.shape, dout)
    _flat("gelu_backward", xp, x.size, dout, x, dx, np.int64(x.size))
    return (dx,)


# ----------------------------------------------------------------------------
# softmax cross-entropy


FusedCrossEntropyCache = namedtuple("FusedCrossEntropyCache", "probs t count ignore_index shape")


def cross_entropy_forward(logits, targets, ignore_index=-1, ws=FRESH):
    """ops.cross_entropy_forward: probabilities and each row's loss in one kernel."""
    xp, logits = get_xp(logits), _contiguous(logits)
    V = logits.shape[-1]
    rows = logits.size // V
    t = xp.asarray(targets.reshape(-1), dtype=xp.int64)  # (N,) as the kernel's long long
    acc = sum_dtype(logits.dtype)  # the losses and their sum: float32 for float16 logits
    probs = ws("probs", (rows, V), logits)
    nll = ws("nll", (rows,), logits, acc)
    _rows("cross_entropy_forward", xp, rows, logits, t, probs, nll, np.int32(rows),
          np.int32(V), np.int64(ignore_index))
    mean = xp.empty(2, dtype=xp.float32)  # [loss, count]: a new array (the caller's loss)
    _warp("nll_mean", xp, nll, t, mean, np.int32(rows), np.int64(ignore_index))
    loss, count = mean[0, ...], mean[1, ...]  # 0-d arrays (NumPy would make mean[0] a scalar)
    return loss, FusedCrossEntropyCache(probs, t, count, ignore_index, logits.shape)


def cross_entropy_backward(dloss, cache, ws=FRESH):
    """ops.cross_entropy_backward in one kernel."""
    probs, t, count, ignore_index, shape = cache
    xp = get_xp(probs)
    scale = xp.asarray(dloss / count, dtype=count.dtype).reshape(1)  # stays on the device
    dlogits = ws("dlogits", probs.shape, probs)
    rows = probs.shape[0]
    _rows("cross_entropy_backward", xp, rows, probs, t, scale, dlogits, np.int32(rows),
          np.int32(probs.shape[1]), np.int64(ignore_index))
    return (dlogits.reshape(shape),)


FUSED = {"embedding_backward": embedding_backward,
         "linear_forward": linear_forward, "linear_backward": linear_backward,
         "layernorm_forward": layernorm_forward, "layernorm_backward": layernorm_backward,
         "gelu_forward": gelu_forward, "gelu_backward": gelu_backward,
         "cross_entropy_forward": cross_entropy_forward,
         "cross_entropy_backward": cross_entropy_backward}
