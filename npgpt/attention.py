"""Causal multi-head self-attention, the part of a block between c_attn and c_proj: the
forward/backward pair that training runs, and the KV-cached forward that sampling runs.
ops.py re-exports every name here (`ops.attention_forward`), with the glossary
(B, T, C, V, nh, hs) and the conventions of every op: `(out, cache)` forwards, pure
functions, the array module taken from the inputs, an optional Workspace `ws`.

A causal model never uses the scores above the diagonal of the (T, T) matrix: query i
sees keys 0..i only. attention_forward therefore splits the queries into tiles of
`tile` rows and computes, for the tile of queries first..end-1, only its scores against
keys 0..end-1 (the tile's own keys form the diagonal block, where the future is masked).
At T = 256 with tiles of 64 that is 10 of 16 blocks of the square; the backward works
on the same tiles. With T <= tile there is one tile of whole rows: the square.
Textbook version (whole rows, no tiles): reference.attention_forward.
"""
import functools
import math
from collections import namedtuple

import numpy as np

from .arrays import FRESH, blocks, matmul, row_sums
from .backend import get_xp

# Query rows per tile. Chosen by measurement on a 2-core AMD EPYC (OpenBLAS, one thread,
# forward + backward of the lecture shape B 32, nh 6, T 256, hs 64: whole rows 185 ms,
# tiles of 128 / 64 / 32: 150 / 134 / 156 ms; small, T 128: 7.6 ms, 64 and 32 both 6.4):
# smaller tiles skip more of the future but make BLAS's products narrower.
TILE = 64


class AttentionCache(namedtuple("AttentionCache", "qs k v tiles used att_mask scale y")):
    """What attention_forward keeps for its backward. tiles[i] (B,nh,R,K) holds the
    attention weights of the R queries at positions K-R..K-1 against keys 0..K-1, used[i]
    the same after attention dropout (tiles[i] itself without dropout)."""
    __slots__ = ()

    @property
    def att(self):
        """The (B,nh,T,T) attention weights, 0 above the diagonal: the one tile itself, or
        the tiles put together in a new array (for reading; the backward uses the tiles)."""
        if len(self.tiles) == 1:
            return self.tiles[0]
        B, nh, T, _ = self.qs.shape
        att = get_xp(self.qs).zeros((B, nh, T, T), dtype=self.tiles[0].dtype)
        for tile in self.tiles:
            R, K = tile.shape[-2:]
            att[:, :, K - R:K, :K] = tile
        return att


@functools.lru_cache(maxsize=16)
def causal_mask_bias(T, dtype, xp):
    """(T,T) additive mask: 0 where key position <= query position, -inf above.
    Computed once per (T, dtype): callers must not write into it."""
    future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
    return xp.where(future, -math.inf, 0.0).astype(dtype)


def _split_heads(qkv, n_head):
    """(B,T,3C) -> q, k, v, each a (B,nh,T,hs) view: (B,T,3,nh,hs) -> (3,B,nh,T,hs)."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)


def transposed(a, ws, name):
    """a (b,nh,T,hs) -> a^T (b,nh,hs,T). On the CPU a contiguous copy: OpenBLAS multiplies
    by a matrix read transposed out of a's rows at 55-60% of its rate (the (64, hs) @
    (hs, K) products of attention, one thread, small and lecture shapes: 56-63 against
    83-105 GFLOP/s), and the copy costs a fraction of what it saves. On a GPU the view
    (cuBLAS reads either layout at full rate)."""
    aT = a.transpose(0, 1, 3, 2)  # (b,nh,hs,T) view
    if get_xp(a) is not np:
        return aT
    out = ws(name, aT.shape, a)
    out[...] = aT
    return out


def query_tiles(T, tile):
    """[(first, end)]: the query positions of each tile, `tile` rows each (the last may
    be shorter); one tile of whole rows when tile is None or >= T."""
    step = T if tile is None else tile
    return [(first, min(first + step, T)) for first in range(0, T, step)]


def causal_softmax(att, ws=FRESH, first=0, rescore=None):
    """att (B,nh,R,K): the scores of the R queries at positions first..first+R-1 against
    keys 0..K-1 (K = first + R) -> their causal softmax weights, in place (step (2)
    below). Keys first..K-1 are the diagonal block, where the future is masked; whole
    rows: first = 0, R = K = T. fused_attention.py fuses the four passes into one (whole
    rows).
    A row's softmax does not change when all its scores move by the same c:
        softmax(s) = exp(s - c) / sum_j exp(s_j - c)
    The textbook c is the row max, so that exp cannot overflow. On the CPU, given
    `rescore` (it writes the tile's scores into att again), c = 0 is tried first: that
    saves the row max and its subtraction, which cost as much as the exp on rows of
    64-256 keys. It is kept when every row sum is finite and at least tiny / eps (the
    smallest normal number over the machine epsilon: then the exps too small to be
    normal, which have lost bits, hold less than eps of their row). Otherwise (scores
    past about 88 in float32, 11 in float16, or a row of very negative ones) the scores
    are computed again and the row max subtracted. Both ways, the same inputs give the
    same bits.
    """
    xp, R = get_xp(att), att.shape[-2]
    mask = causal_mask_bias(R, att.dtype, xp) if R > 1 else None  # (one row: no future)
    if mask is not None:
        att[..., first:] += mask                            # -inf above the diagonal
    if rescore is not None and xp is np:
        with np.errstate(over="ignore", under="ignore"):  # (checked below)
            xp.exp(att, out=att)                            # exp(s), c = 0
        sums = row_sums(att, ws, "rowsum")
        info = np.finfo(att.dtype)
        if sums.min() >= info.tiny / info.eps and sums.max() < np.inf:  # (NaN: False)
            att *= 1.0 / sums
            return att
        rescore()                                           # the scores again, and
        if mask is not None:                                # the textbook way below
            att[..., first:] += mask
    att -= xp.max(att, axis=-1, keepdims=True, out=ws("rowmax", att.shape[:-1] + (1,), att))
    xp.exp(att, out=att)                          # stable softmax: every row's max is 0, and
    att *= 1.0 / row_sums(att, ws, "rowsum")      # exp(-inf) = 0: masked weights are exactly 0
    # (float16: the row max is one of the row's numbers, exact; the row sum is float32)
    return att


def causal_softmax_backward(ds, att, rowdot, att_mask):
    """Steps (3) and (2) of attention_backward, in place on one tile: ds holds da
    (B,nh,R,K) and becomes att * (da * att_mask - rowdot); rowdot (B,nh,R,1), att_mask
    the tile's part of the mask or None. fused_attention.py fuses them (whole rows)."""
    if att_mask is not None:
        ds *= att_mask                                       # (3)
    ds -= rowdot                                             # (2)
    ds *= att
    return ds


def attention_forward(qkv, n_head, att_mask=None, ws=FRESH, *, tile=TILE):
    """Scaled dot-product causal self-attention over all (batch, head) pairs at once.

    qkv (B,T,3C) is the fused projection [q | k | v]; returns y (B,T,C).
    att_mask, if given, is a dropout keep-mask of shape (B,nh,T,T) applied to the
    attention weights (as nanoGPT's attn_dropout); a tile reads its block of it.
        att = softmax(q k^T / sqrt(hs) + causal)     (B,nh,T,T)
        y   = (att * att_mask) v                     (B,nh,T,hs) -> merged to (B,T,C)
    computed tile by tile (see the module's docstring): for the queries first..end-1,
        att[first:end, :end] = softmax(qs[first:end] k[:end]^T + causal)
        y[first:end]         = (att * att_mask)[first:end, :end] v[:end]
    (the weights att[first:end, end:] of future keys are 0 and never computed).
    fused_attention.py is the GPU's version (its softmax in one kernel, its products in
    tiles too). Textbook version: reference.attention_forward.
    """
    xp = get_xp(qkv)
    B, T, C3 = qkv.shape
    q, k, v = _split_heads(qkv, n_head)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs = xp.multiply(q, scale, out=ws("qs", q.shape, qkv))  # scaling q: T/hs times cheaper
    bounds = query_tiles(T, tile)
    size = B * n_head * sum((end - first) * end for first, end in bounds)
    att_memory = ws("att", (size,), qkv)  # the tiles one after another, each contiguous
    used_memory = att_memory if att_mask is None else ws("att_used", (size,), qkv)
    y = ws("y", (B, T, C3 // 3), qkv)
    y4 = y.reshape(B, T, n_head, -1).transpose(0, 2, 1, 3)  # (B,T,C) -> (B,nh,T,hs) view
    tiles, used, offset = [], [], 0
    for first, end in bounds:  # each tile's memory, one after another, each contiguous
        shape = (B, n_head, end - first, end)  # queries first..end-1 against keys 0..end-1
        n = math.prod(shape)
        tiles.append(att_memory[offset:offset + n].reshape(shape))
        used.append(used_memory[offset:offset + n].reshape(shape))
        offset += n
    # batch rows whose keys, values and tiles stay in cache from one tile to the next
    for b in blocks(B, size // B, qkv):
        kT = transposed(k[b], ws, "kT")  # (b,nh,hs,T): the keys as columns
        for (first, end), att_tile, used_tile in zip(bounds, tiles, used):
            scores = functools.partial(matmul, qs[b, :, first:end], kT[..., :end],
                                       out=att_tile[b])  # (b,nh,R,K) scores
            att = causal_softmax(scores(), ws, first, rescore=scores)  # -> softmax weights
            a = att if att_mask is None else xp.multiply(
                att, att_mask[b, :, first:end, :end], out=used_tile[b])
            # (b,nh,R,K) @ (b,nh,K,hs) written straight into y's (B,T,nh,hs) layout
            matmul(a, v[b, :, :end], out=y4[b, :, first:end])
    return y, AttentionCache(qs, k, v, tiles, used, att_mask, scale, y)


def attention_backward(dy, cache, ws=FRESH):
    """forward (per batch and head):
        s   = qs k^T + causal             (1)  (qs = q * scale)
        att = softmax(s)  row-wise        (2)
        a   = att * att_mask              (3)  (a = att without dropout)
        y   = a v                         (4)
    backward, each line inverting the forward line with the same number:
        (4) da = dy v^T ;  dv = a^T dy
        (3) datt = da * att_mask
        (2) ds = att * (datt - sum_j(datt * att))   (softmax Jacobian; att = 0 on masked
            entries, so their gradient is exactly 0). The row sums need no (T,T) product:
            sum_j datt_ij att_ij = sum_j da_ij a_ij = sum_j (dy_i . v_j) a_ij = dy_i . y_i
        (1) dq = ds k * scale ;  dk = ds^T qs
    on the forward's tiles: the tile of queries first..end-1 gives dq[first:end] whole
    and adds its share to dv[:end] and dk[:end] (every key j < end is seen by some of its
    queries); the last tile, whose keys are all T, writes dv and dk first.
    Returns dqkv (B,T,3C); causal_softmax_backward does steps (3) and (2) of a tile.
    Textbook version: reference.attention_backward.
    """
    qs, k, v, tiles, used, att_mask, scale, y = cache
    xp, (B, nh, T, hs) = get_xp(dy), qs.shape
    dy4 = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # (B,T,C) -> (B,nh,T,hs)
    dqkv = ws("dx", (B, T, 3 * nh * hs), dy)
    dq, dk, dv = _split_heads(dqkv, nh)  # views of dqkv as heads, written in place
    dy_y = xp.multiply(dy, y, out=ws("dy_y", y.shape, dy)).reshape(B, T, nh, hs)
    rowdot = row_sums(dy_y, ws, "rowdot").transpose(0, 2, 1, 3)  # dy_i . y_i, (B,nh,T,1)
    for b in blocks(B, sum(t.size for t in tiles) // B, dy):  # batch rows, as in the forward
        vT = transposed(v[b], ws, "vT")  # (b,nh,hs,T): the values as columns
        # the last tile (keys 0..T-1) first: it writes dv and dk, the others add to them
        for att_tile, used_tile in zip(reversed(tiles), reversed(used)):
            R, K = att_tile.shape[-2:]
            first = K - R
            att, a, dy_t = att_tile[b], used_tile[b], dy4[b, :, first:K]  # dy_t (b,nh,R,hs)
            if K == T:
                to_dv, to_dk = dv[b], dk[b]
            else:  # an earlier tile's share of dv, then of dk, in one buffer
                to_dv = to_dk = ws("share", dy_t.shape[:2] + (K, hs), dy)
            matmul(a.transpose(0, 1, 3, 2), dy_t, out=to_dv)      # (4) dv = a^T dy
            if K < T:
                dv[b, :, :K] += to_dv
            ds = matmul(dy_t, vT[..., :K], out=ws("tmp", att.shape, dy))  # (4) da (b,nh,R,K)
            mask = None if att_mask is None else att_mask[b, :, first:K, :K]
            causal_softmax_backward(ds, att, rowdot[b, :, first:K], mask)  # (3), (2)
            matmul(ds, k[b, :, :K], out=dq[b, :, first:K])      # (1) dq = ds k * scale
            matmul(ds.transpose(0, 1, 3, 2), qs[b, :, first:K], out=to_dk)  # dk = ds^T qs
            if K < T:
                dk[b, :, :K] += to_dk
    dq *= scale
    return (dqkv,)


# ----------------------------------------------------------------------------
# inference: attention against a key/value cache (no backward: used only to sample)


def attention_with_cache(qkv, n_head, k_cache, v_cache, pos):
    """Causal attention of Tn new positions (pos .. pos+Tn-1) against every key so far:
    qkv (B,Tn,3C); k_cache, v_cache (B,nh,block_size,hs) hold the keys/values of positions
    < pos and receive the new ones. Returns y (B,Tn,C): attention_forward's new rows.
    Textbook version: reference.attention_with_cache."""
    xp = get_xp(qkv)
    B, Tn, C3 = qkv.shape
    end = pos + Tn
    q, k, v = _split_heads(qkv, n_head)  # (B,nh,Tn,hs)
    k_cache[:, :, pos:end] = k
    v_cache[:, :, pos:end] = v
    qs = q * (1.0 / math.sqrt(q.shape[-1]))  # (scaling q: end/hs times cheaper than att)
    att = xp.empty((B, n_head, Tn, end), dtype=qkv.dtype)
    scores = functools.partial(matmul, qs, k_cache[:, :, :end].transpose(0, 1, 3, 2),
                               out=att)                    # (B,nh,Tn,end)
    # new row i sees every older key and the new keys pos .. pos + i (the diagonal block)
    causal_softmax(scores(), first=pos, rescore=scores)
    y = matmul(att, v_cache[:, :, :end])          # (B,nh,Tn,hs)
    return y.transpose(0, 2, 1, 3).reshape(B, Tn, C3 // 3)  # (B,nh,Tn,hs) -> (B,Tn,C)
