"""The math of a GPT: pure forward/backward pairs, each backward derived by hand.

Glossary (used in every shape comment in npgpt):
    B  batch size             T  sequence length (<= block_size)
    C  embedding width        V  vocabulary size
    nh number of heads        hs head size = C // nh

Every `*_forward(...)` returns `(out, cache)`; the matching `*_backward(dout, cache)`
returns the gradient of the loss with respect to each differentiable input, in the
order of the forward's arguments (token ids, masks and constants such as eps get none).
`reference.py` holds the same ops as a textbook writes them, without these speed-ups. The
functions are pure (no state, no parameter updates), which is what the gradient checks
in tests/ perturb, and they take their array module from their inputs, so they run
unchanged on NumPy or CuPy. Scalars are Python floats: under NumPy 2's promotion rules
(NEP 50) a NumPy float64 scalar silently promotes float32 arrays to float64 (NumPy 1.x
looked at the scalar's value instead). Most ops take an optional Workspace `ws` (arrays.py)
saying where their results go: the layers pass one so that a training step reuses the
previous step's memory; without one every result is a new array (same arithmetic).
The attention ops live in attention.py and the linear ones in linear.py (imported here,
so ops.attention_forward and ops.linear_forward work).
"""
import math
from collections import namedtuple

import numpy as np

from .arrays import (FRESH, column_sums, matmul, row_blocks, row_sums,  # noqa: F401
                     sum_dtype)  # (ops.matmul: the float16 products of notebook 05)
# causal attention (training's tiled pair and sampling's cached forward) lives in
# attention.py; ops.attention_forward etc. are the same functions
from .attention import (AttentionCache, attention_backward, attention_forward,  # noqa: F401
                        attention_with_cache, causal_mask_bias, causal_softmax,
                        causal_softmax_backward)
from .backend import get_xp
# the linear layers and the tied head live in linear.py; ops.linear_forward etc. are the
# same functions
from .linear import (HeadCache, LinearCache, head_backward, head_forward,  # noqa: F401
                     linear_backward, linear_forward)


# what each forward keeps for its backward, by name (a learner can read cache.xhat)
EmbeddingCache = namedtuple("EmbeddingCache", "idx wte_shape wpe_shape")
LayerNormCache = namedtuple("LayerNormCache", "xhat rstd w")
GeluCache = namedtuple("GeluCache", "x out")
CrossEntropyCache = namedtuple("CrossEntropyCache", "probs t_safe valid count shape")


# ----------------------------------------------------------------------------
# embeddings


def embedding_forward(idx, wte, wpe, ws=FRESH):
    """out[b, t] = wte[idx[b, t]] + wpe[t].   idx (B,T) int, wte (V,C), wpe (block_size,C).
    Textbook version: reference.embedding_forward."""
    T = idx.shape[1]
    out = get_xp(wte).take(wte, idx, axis=0, out=ws("out", idx.shape + wte.shape[1:], wte))
    out += wpe[:T]  # (B,T,C): gathered rows, positions broadcast over B
    return out, EmbeddingCache(idx, wte.shape, wpe.shape)


def embedding_backward(dout, cache, ws=FRESH):
    """Gather forward, scatter-add backward.

    forward:  out[b,t] = wte[idx[b,t]] + wpe[t]
    dwte[v] = sum over (b,t) with idx[b,t] == v of dout[b,t]   (a token repeated in the
              batch receives the sum of its gradients: `add.at` accumulates duplicates,
              where plain fancy-index assignment would keep only one)
    dwpe[t] = sum over b of dout[b,t]   (rows >= T were not used: zero)
    Textbook version: reference.embedding_backward.
    """
    idx, wte_shape, wpe_shape = cache
    xp = get_xp(dout)
    T, C = dout.shape[1:]
    acc = sum_dtype(dout.dtype)  # a token's rows add up in float32 for a float16 model
    dwte = ws("dwte", wte_shape, dout, acc)
    if xp is np:
        dwte.fill(0)
        # add.at (fastest on 1-D indices): one scalar per (position, channel) into dwte[idx*C + c]
        flat = (idx[..., None] * C + np.arange(C)).reshape(-1)  # (B*T*C,)
        np.add.at(dwte.reshape(-1), flat, dout.reshape(-1))
    else:  # a GPU's add.at adds with atomics, in no fixed order: the last bits would vary
        _token_sums_in_fixed_order(idx, dout, dwte)
    dwpe = ws("dwpe", wpe_shape, dout, acc)
    dwpe[T:] = 0
    dout.sum(axis=0, dtype=acc, out=dwpe[:T])
    return dwte, dwpe


def _token_sums_in_fixed_order(idx, dout, dwte):
    """dwte[v] = sum of the rows dout[b,t] whose idx[b,t] == v, added in an order fixed by
    the data alone, so that every run (and a resumed one) gets the same bits.

    1. sort the N = B*T rows by (token, position): each token's rows become one segment
    2. a segmented inclusive scan (Hillis-Steele): for step = 1, 2, 4, ... every row adds
       the row `step` above it when that row holds the same token; after log2(N) passes
       the last row of a segment holds the segment's sum (added as a tree, not a chain)
    3. dwte[v] = the last row of v's segment (searchsorted finds it), 0 for absent tokens
    """
    xp = get_xp(dout)
    V, C = dwte.shape
    ids = idx.reshape(-1).astype(xp.int64)             # (N,)
    N = ids.shape[0]
    order = xp.argsort(ids * N + xp.arange(N))         # distinct keys: one order, any sort
    ids = ids[order]
    s = dout.reshape(-1, C)[order].astype(dwte.dtype, copy=False)  # (N, C) rows by token
    step = 1
    while step < N:
        same = (ids[step:] == ids[:-step])[:, None]   # (N-step, 1): row i-step in i's segment
        s[step:] += xp.where(same, s[:-step], 0.0)    # (the where reads s before the add)
        step *= 2
    vocab = xp.arange(V)
    last = xp.searchsorted(ids, vocab, side="right") - 1  # (V,) last row with id <= v
    present = (last >= 0) & (ids[last] == vocab)
    dwte[...] = xp.where(present[:, None], s[last], 0.0)


# ----------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=1e-5, ws=FRESH):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis (C).
    The passes run over blocks of rows that stay in cache (arrays.row_blocks).
    Textbook version: reference.layernorm_forward."""
    xp, inv_c, acc = get_xp(x), 1.0 / x.shape[-1], sum_dtype(x.dtype)
    xhat, out = ws("xhat", x.shape, x), ws("out", x.shape, x)
    rstd = ws("rstd", x.shape[:-1] + (1,), x, acc)  # (..., 1), float32 for float16
    for xb, xhat_b, out_b, rstd_b in row_blocks(x, xhat, out, rstd):
        mean = row_sums(xb, ws, "mean")
        mean *= inv_c                                       # (rows, 1)
        xp.subtract(xb, mean, out=xhat_b)                   # x - mean, scaled below
        # (x - mean)^2 in out's memory, written below; float16 squares overflow past 256,
        # so theirs are float32, in memory of their own
        sq = out_b if acc == x.dtype else ws("sq", xb.shape, x, acc)
        xp.multiply(xhat_b, xhat_b, out=sq, dtype=acc)
        var = row_sums(sq, ws, "var")
        var *= inv_c                                        # biased variance, as PyTorch
        var += eps
        xp.sqrt(var, out=var)
        xp.divide(1.0, var, out=rstd_b)                     # rstd = 1 / sqrt(var + eps)
        xhat_b *= rstd_b
        xp.multiply(xhat_b, w, out=out_b)
        out_b += b
    return out, LayerNormCache(xhat, rstd, w)


def layernorm_backward(dout, cache, ws=FRESH, *, residual=None, into=None):
    """forward: xhat = (x - mean) * rstd;  out = xhat * w + b
    db    = sum over positions of dout
    dw    = sum over positions of dout * xhat
    dxhat = dout * w
    dx    = rstd * (dxhat - mean_C(dxhat) - xhat * mean_C(dxhat * xhat))
            (differentiating through mean and rstd, which depend on every x in the row:
             d mean/dx = 1/C removes the mean of dxhat; d rstd/dx = -rstd^2 xhat/C removes
             the component of dxhat along xhat, exactly so as eps -> 0, where
             mean_C(xhat^2) = 1)
    residual: None, or an array of dx's shape added to dx (a block's skip connection
    carries the gradient around the LayerNorm; the fused kernel adds it in its own pass).
    into: None (dw and db are new arrays), or the layer's (dw, db) gradient arrays, which
    these are added to (+=) and which are returned (on a GPU the column sums' last launch
    adds them).
    Textbook version: reference.layernorm_backward.
    """
    xhat, rstd, w = cache
    xp, C = get_xp(dout), xhat.shape[-1]
    dx = ws("dx", xhat.shape, dout)
    dw = db = 0.0
    for dout_b, xhat_b, rstd_b, dx_b in row_blocks(dout, xhat, rstd, dx):  # blocks of rows
        tmp = ws("tmp", dout_b.shape, dout)
        db = db + column_sums(dout_b)
        dout_xhat = xp.multiply(dout_b, xhat_b, out=tmp)
        dw = dw + column_sums(dout_xhat)
        proj = row_sums(dout_xhat, ws, "proj", w)           # sum_C dxhat * xhat, dxhat = dout w
        dx_b = xp.multiply(dout_b, w, out=dx_b)             # dxhat
        dx_b -= row_sums(dx_b, ws, "dmean") * (1.0 / C)
        dx_b -= xp.multiply(xhat_b, proj * (1.0 / C), out=tmp)
        dx_b *= rstd_b
    if residual is not None:
        dx += residual
    if into is None:
        return dx, dw, db
    dw_into, db_into = into
    dw_into += dw
    db_into += db
    return dx, dw_into, db_into


# ----------------------------------------------------------------------------
# GELU (tanh approximation, as GPT-2)

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715
# A float16 GELU on the CPU runs the float32 one on float32 copies and rounds its result
# once: NumPy's float16 loops convert every element to float32 and back in each of the
# op's ten passes (10x float32's time), and x^2 overflows float16 past |x| = 256 (the
# backward's (A - 0.5)(1 - t) would then be inf * 0 = NaN). CuPy's float16 kernels on a
# GPU are fast; the overflow stays there, in the plain code (the fused GELU kernel computes
# in float32: docs/mixed_precision.md).


def gelu_forward(x, ws=FRESH):
    """out = 0.5 x (1 + tanh(u)),  u = k (x + a x^3) = x (k + k a x^2),
    k = sqrt(2/pi), a = 0.044715. The cache holds x and out (kept anyway as the next
    layer's input): backward recomputes tanh(u) rather than keep a third such array.
    Textbook version: reference.gelu_forward."""
    xp = get_xp(x)
    if xp is np and x.dtype == np.float16:  # float16 on the CPU: see above
        out = ws("out", x.shape, x)
        out[...] = gelu_forward(x.astype(np.float32))[0]
        return out, GeluCache(x, out)
    out = ws("out", x.shape, x)
    for xb, o in row_blocks(x, out):   # blocks of rows that stay in cache over the passes
        xp.multiply(xb, xb, out=o)     # x^2
        o *= _GELU_K * _GELU_A
        o += _GELU_K
        o *= xb                        # u
        xp.tanh(o, out=o)              # t = tanh(u)
        o += 1.0
        o *= xb
        o *= 0.5
    return out, GeluCache(x, out)


def gelu_backward(dout, cache, ws=FRESH):
    """forward: u = k (x + a x^3);  t = tanh(u);  out = 0.5 x (1 + t)
    dout/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,   du/dx = k (1 + 3 a x^2)
            = 0.5 (1 + t) + A (1 - t),  A = out du/dx      (0.5 x (1 + t) is out)
            = 1 + (A - 0.5) (1 - t)
    Textbook version: reference.gelu_backward.
    """
    (x, out), xp = cache, get_xp(dout)
    if xp is np and x.dtype == np.float16:  # float16 on the CPU: see above
        dx = ws("dx", x.shape, dout)
        dx[...] = gelu_backward(dout.astype(np.float32),
                                GeluCache(x.astype(np.float32), out.astype(np.float32)))[0]
        return (dx,)
    dx = ws("dx", x.shape, dout)
    for xb, ob, dout_b, d in row_blocks(x, out, dout, dx):  # blocks of rows, as forward
        xp.multiply(xb, xb, out=d)                  # x^2
        t = xp.multiply(d, _GELU_K * _GELU_A, out=ws("tmp", d.shape, dout))
        t += _GELU_K
        t *= xb
        xp.tanh(t, out=t)                           # t = tanh(u), as in the forward
        d *= 3.0 * _GELU_K * _GELU_A
        d += _GELU_K                                # du/dx
        d *= ob                                     # A
        d -= 0.5
        d *= xp.subtract(1.0, t, out=t)             # (A - 0.5) (1 - t)
        d += 1.0
        d *= dout_b
    return (dx,)


# ----------------------------------------------------------------------------
# dropout


def dropout_forward(x, mask):
    """Inverted dropout with a given mask: out = x * mask, where mask holds 0 for a
    dropped unit and 1/(1-p) for a kept one (so the expectation of out is x).
    The mask is drawn by the layer from the model's generator; the op is pure.
    Textbook version: reference.dropout_forward."""
    return x * mask, mask


def dropout_backward(dout, mask):
    """forward: out = x * mask   ->   dx = dout * mask.
    Textbook version: reference.dropout_backward."""
    return (dout * mask,)


def dropout_mask(shape, p, rng, dtype):
    """A keep-mask for inverted dropout: 1/(1-p) with probability 1-p, else 0."""
    keep = rng.random(shape, dtype=np.promote_types(dtype, np.float32)) >= p  # (no float16 draws)
    return np.multiply(keep, 1.0 / (1.0 - p), dtype=dtype)  # (one pass: True -> 1/(1-p))


# ----------------------------------------------------------------------------
# softmax cross-entropy


def cross_entropy_forward(logits, targets, ignore_index=-1, ws=FRESH):
    """Mean over positions whose target is not ignore_index of -log softmax(logits)[target].

    logits (..., V), targets (...) int. Stable: log-sum-exp after subtracting each row's max.
    Returns the loss (a 0-d array, or a NumPy scalar on the CPU) and the cache; no host
    synchronisation happens here.
    Textbook version: reference.cross_entropy_forward.
    """
    xp = get_xp(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)                   # (N, V)
    t = targets.reshape(-1)                     # (N,)
    valid = t != ignore_index
    t_safe = xp.where(valid, t, 0)
    probs = xp.subtract(z, z.max(axis=-1, keepdims=True), out=ws("probs", z.shape, logits))
    z_target = probs[xp.arange(z.shape[0]), t_safe]  # (N,) target logits, shifted: max 0
    xp.exp(probs, out=probs)
    sumexp = row_sums(probs, ws, "sumexp")      # (N, 1), >= 1
    probs *= 1.0 / sumexp
    nll = xp.log(sumexp[:, 0]) - z_target       # log-sum-exp minus the target logit
    count = valid.sum().astype(sum_dtype(logits.dtype))  # positions with a target (float16
    # counts exactly only to 2048; the log-sum-exp and the loss are float32 for it too)
    loss = (nll * valid).sum() / count
    return loss, CrossEntropyCache(probs, t_safe, valid, count, logits.shape)


def cross_entropy_backward(dloss, cache, ws=FRESH):
    """forward: loss = (1/n) sum_valid [ logsumexp(z_i) - z_i[t_i] ]
    dlogits_i = dloss/n * (softmax(z_i) - onehot(t_i)) for valid rows, 0 for ignored rows.
    Textbook version: reference.cross_entropy_backward."""
    probs, t_safe, valid, count, shape = cache
    xp = get_xp(probs)
    dlogits = ws("dlogits", probs.shape, probs)
    dlogits[...] = probs
    dlogits[xp.arange(dlogits.shape[0]), t_safe] -= 1.0
    dlogits *= (valid * (dloss / count))[:, None].astype(count.dtype)  # (float16 * float32:
    # the scale dloss/count, ~1e-5 without loss scaling, is below float16's normal range)
    return (dlogits.reshape(shape),)
