"""Attention's fused GPU ops (kernels_attention.cu), behind ops.attention_forward's and
attention_backward's signatures: kernels.fused_ops puts them in a GPU model's table
beside kernels.py's. They launch through kernels.py's launchers, as fused_optim.py does.

Each head's matrices are made contiguous first (the heads_transpose kernel), so that
every batched product is one cuBLAS launch. The softmax kernels take whole (T,T) rows:
they read the keys at or before each query only and write zeros past it. So the products
may skip the blocks above the diagonal: in query tiles (as attention.py's on the CPU),
each tile's products reach the keys up to its last query only, and the blocks never
computed are never read. Plain float32 uses tiles: its step waits for the GPU (H200: 32.9
ms of kernels in a 34.6 ms step, about 2 ms of them attention's masked half). TF32 and
float16 keep one tile of whole rows: their products take a fraction of the time on
tensor cores, and each tile adds six launches per layer to steps that waited for the
host until recently. Not yet timed on a GPU: gpu_products.py prints whole rows against
tiles in all three (gpu_check.sh's step 2e); GPU_TILE = None gives whole rows.
"""
import math

import numpy as np

from . import ops
from .arrays import FRESH, matmul, sum_dtype
from .attention import query_tiles
from .backend import get_xp
from .gemm import uses_tf32
from .kernels import _contiguous, _rows

GPU_TILE = 64  # query rows per tile in plain float32 (T = 256: 10 of 16 blocks computed)


def _tiles(T, dtype, tile):
    """query_tiles for attention's products; tile "auto": GPU_TILE in plain float32,
    else whole rows (None)."""
    if tile == "auto":
        tile = GPU_TILE if dtype == np.float32 and not uses_tf32(dtype) else None
    return query_tiles(T, tile)


def causal_softmax(att, ws=FRESH, first=0):
    """ops.causal_softmax in one kernel, in place on att (B,nh,T,T), contiguous: whole
    rows only (first = 0)."""
    T = att.shape[-1]
    if first != 0 or att.shape[-2] != T:
        raise ValueError(f"the fused causal softmax takes whole (T,T) rows, got a tile of "
                         f"shape {att.shape} starting at query {first}")
    rows = att.size // T
    _rows("causal_softmax", get_xp(att), rows, att, np.int32(rows), np.int32(T))
    return att


def causal_softmax_backward(ds, att, rowdot, att_mask):
    """ops.causal_softmax_backward in one kernel, in place on ds (B,nh,T,T); rowdot
    (B,nh,T,1) in sum_dtype (float32)."""
    T = att.shape[-1]
    rows = ds.size // T
    mask = att if att_mask is None else _contiguous(att_mask)  # (unread without dropout)
    _rows("causal_softmax_backward", get_xp(ds), rows, ds, att, _contiguous(rowdot), mask,
          np.int32(att_mask is not None), np.int32(rows), np.int32(T))
    return ds


def _to_heads(tokens, heads, scale0=1.0):
    """heads (parts,B,nh,T,hs) = tokens (B,T,parts*C) by heads (part 0 times scale0), as
    the heads_transpose kernel (kernels_attention.cu) lays them out; returns heads."""
    _heads_transpose(tokens, heads, scale0, to_heads=1)
    return heads


def _to_tokens(heads, tokens, scale0=1.0):
    """The way back: tokens (B,T,parts*C) from heads (parts,B,nh,T,hs); returns tokens."""
    _heads_transpose(tokens, heads, scale0, to_heads=0)
    return tokens


def _heads_transpose(tokens, heads, scale0, to_heads):
    parts, B, nh, T, hs = heads.shape
    rows = parts * B * nh * T
    src, dst = (tokens, heads) if to_heads else (heads, tokens)
    _rows("heads_transpose", get_xp(src), rows, src, dst, np.int64(rows), np.int32(B),
          np.int32(T), np.int32(nh), np.int32(hs), np.int32(parts), np.float32(scale0),
          np.int32(to_heads))


def attention_forward(qkv, n_head, att_mask=None, ws=FRESH, *, tile="auto"):
    """ops.attention_forward with the softmax on whole rows, its math and steps (1)-(4)
    (see ops.attention_backward), with q, k and v first copied out of qkv (B,T,3C) into
    one (3,B,nh,T,hs) array, q already times scale: as strided views of qkv each product
    would take nh cuBLAS launches (gemm.py), contiguous it takes one per query tile (tile:
    rows per tile, None for whole rows, "auto" as _tiles). The cache is
    ops.AttentionCache with its y kept per head, (B,nh,T,hs), for the backward."""
    xp, qkv = get_xp(qkv), _contiguous(qkv)
    B, T, C3 = qkv.shape
    nh, hs = n_head, C3 // (3 * n_head)
    scale = 1.0 / math.sqrt(hs)
    heads = ws("heads", (3, B, nh, T, hs), qkv)
    _to_heads(qkv, heads, scale)                       # (B,T,3C) -> (3,B,nh,T,hs)
    qs, k, v = heads                                   # (B,nh,T,hs) each, contiguous
    bounds = _tiles(T, qkv.dtype, tile)
    att = ws("att", (B, nh, T, T), qkv)
    for first, end in bounds:  # queries first..end-1 against keys 0..end-1
        matmul(qs[:, :, first:end], k[:, :, :end].transpose(0, 1, 3, 2),
               out=att[:, :, first:end, :end])                                      # (1)
    causal_softmax(att)                                                              # (2)
    a = att if att_mask is None else xp.multiply(att, att_mask,
                                                 out=ws("att_used", att.shape, qkv))  # (3)
    yh = ws("yh", (B, nh, T, hs), qkv)
    for first, end in bounds:
        matmul(a[:, :, first:end, :end], v[:, :, :end], out=yh[:, :, first:end])     # (4)
    y = _to_tokens(yh[None], ws("y", (B, T, nh * hs), qkv))  # (1,B,nh,T,hs) -> (B,T,C)
    return y, ops.AttentionCache(qs, k, v, [att], [a], att_mask, scale, yh)


def attention_backward(dy, cache, ws=FRESH, *, tile="auto"):
    """ops.attention_backward on the forward's contiguous heads, each line inverting the
    forward line with the same number: dq, dk and dv land in one (3,B,nh,T,hs) array,
    copied into dqkv (B,T,3C) at the end with dq times scale. The products run over the
    tiles of `tile` (as attention_forward; any tiling gives the same sums): a query tile
    writes dq[first:end] from keys 0..end-1; the same rows as a key tile write dk and dv
    [first:end] from queries first..T-1, the only ones that see those keys."""
    qs, k, v, (att,), (a,), att_mask, scale, yh = cache
    xp, (B, nh, T, hs) = get_xp(dy), qs.shape
    bounds = _tiles(T, dy.dtype, tile)
    dyh = _to_heads(_contiguous(dy), ws("dyh", (1,) + yh.shape, dy))[0]  # (B,nh,T,hs)
    dheads = ws("dheads", (3, B, nh, T, hs), dy)
    dq, dk, dv = dheads
    ds = ws("ds", att.shape, dy)
    for first, end in bounds:
        matmul(a[:, :, first:, first:end].transpose(0, 1, 3, 2), dyh[:, :, first:],
               out=dv[:, :, first:end])                                # (4) dv = a^T dy
        matmul(dyh[:, :, first:end], v[:, :, :end].transpose(0, 1, 3, 2),
               out=ds[:, :, first:end, :end])                          # (4) da
    rows = B * nh * T
    rowdot = ws("rowdot", (B, nh, T, 1), dy, sum_dtype(dy.dtype))     # dy_i . y_i
    _rows("row_dots", xp, rows, dyh, yh, rowdot, np.int32(rows), np.int32(hs))
    causal_softmax_backward(ds, att, rowdot, att_mask)                 # (3) and (2)
    for first, end in bounds:
        matmul(ds[:, :, first:end, :end], k[:, :, :end],
               out=dq[:, :, first:end])             # (1) dq = ds k (times scale below)
        matmul(ds[:, :, first:, first:end].transpose(0, 1, 3, 2), qs[:, :, first:],
               out=dk[:, :, first:end])             # (1) dk = ds^T qs
    dqkv = ws("dx", (B, T, 3 * nh * hs), dy)
    return (_to_tokens(dheads, dqkv, scale),)          # (3,B,nh,T,hs) -> (B,T,3C)


FUSED = {"attention_forward": attention_forward, "attention_backward": attention_backward}
