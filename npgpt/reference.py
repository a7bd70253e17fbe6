"""Textbook versions of the ops in ops.py: the same math, written as it is derived.

ops.py is written for speed (results written into reused buffers, row sums as BLAS
products, rewritten derivatives, attention in tiles of query rows), which hides the
formula under each docstring. Here every op is the formula itself, in plain NumPy: same
function names, same arguments (minus the Workspace `ws` and attention's `tile=`), same
results in the same order.
Only the caches differ: each backward here pairs with the forward here, not with ops'.
tests/test_reference.py checks every pair by central differences and against ops.py.

Glossary (as in ops.py):
    B  batch size             T  sequence length (<= block_size)
    C  embedding width        V  vocabulary size
    nh number of heads        hs head size = C // nh

Every `*_forward(...)` returns `(out, cache)`; every `*_backward(dout, cache)` returns a
tuple with the gradient of each floating-point input, in the forward's argument order.
Scalars are Python floats: a NumPy float64 scalar would promote float32 arrays.
"""
import math

import numpy as np


# ----------------------------------------------------------------------------
# embeddings


def embedding_forward(idx, wte, wpe):
    """out[b, t] = wte[idx[b, t]] + wpe[t].   idx (B,T) int, wte (V,C), wpe (block_size,C).
    ops.embedding_forward gathers with np.take into a reused buffer; same values."""
    T = idx.shape[1]
    out = wte[idx] + wpe[:T]  # (B,T,C) + (T,C): positions broadcast over B
    return out, (idx, wte.shape, wpe.shape)


def embedding_backward(dout, cache):
    """dwte[v] = sum of dout[b,t] over the (b,t) with idx[b,t] == v;  dwpe[t] = sum_b dout[b,t]
    (rows t >= T were not used: zero).

    np.add.at adds every repeated index (dwte[idx] += dout would keep only one of them).
    ops.embedding_backward flattens to 1-D indices idx*C + c, on which add.at is much
    faster, and on a GPU (whose add.at adds with atomics, in no fixed order) sorts the
    rows by token and sums each token's segment in an order fixed by the data."""
    idx, wte_shape, wpe_shape = cache
    T = dout.shape[1]
    dwte = np.zeros(wte_shape, dtype=dout.dtype)
    np.add.at(dwte, idx, dout)  # dwte[idx[b,t]] += dout[b,t], duplicates accumulated
    dwpe = np.zeros(wpe_shape, dtype=dout.dtype)
    dwpe[:T] = dout.sum(axis=0)  # (T,C)
    return dwte, dwpe


# ----------------------------------------------------------------------------
# linear


def linear_forward(x, w, b):
    """out = x @ w + b.   x (..., Cin), w (Cin, Cout), b (Cout,) -> (..., Cout).
    ops.linear_forward: the same product, on x as (N, Cin), into a reused buffer."""
    out = x @ w + b  # (..., Cout)
    return out, (x, w)


def linear_backward(dout, cache):
    """dx = dout @ w.T;  dw = x.T @ dout and db = sum of dout, both over every position.

    ops.linear_backward writes dx and dw into reused buffers and takes db as the BLAS
    product ones @ dout, faster than NumPy's column sum."""
    x, w = cache
    x2 = x.reshape(-1, x.shape[-1])           # (N, Cin), N = all positions
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, Cout)
    dx = dout @ w.T                           # (..., Cin)
    dw = x2.T @ dout2                         # (Cin, Cout)
    db = dout2.sum(axis=0)                    # (Cout,)
    return dx, dw, db


# ----------------------------------------------------------------------------
# output head tied to the token embedding


def head_forward(x, wte):
    """logits = x @ wte.T.   x (..., C), wte (V, C) -> (..., V).
    ops.head_forward: the same product, on x reshaped to (N, C)."""
    return x @ wte.T, (x, wte)


def head_backward(dout, cache):
    """dx = dlogits @ wte;  dwte = dlogits.T @ x summed over every position.
    ops.head_backward: the same products, written into reused buffers."""
    x, wte = cache
    dx = dout @ wte                                                # (..., C)
    dwte = dout.reshape(-1, wte.shape[0]).T @ x.reshape(-1, wte.shape[1])  # (V,N)@(N,C)
    return dx, dwte


# ----------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=1e-5):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis (C),
    var the biased variance (as PyTorch).

    ops.layernorm_forward writes into reused buffers and, on the CPU, takes the row sums
    behind mean and var as a BLAS product with a ones vector, several times faster than
    NumPy's reductions over short rows; it keeps 1/std rather than std."""
    mu = x.mean(axis=-1, keepdims=True)   # (..., 1)
    var = x.var(axis=-1, keepdims=True)   # (..., 1)
    std = np.sqrt(var + eps)
    xhat = (x - mu) / std                 # (..., C)
    out = xhat * w + b
    return out, (xhat, std, w)


def layernorm_backward(dout, cache):
    """dxhat = dout * w
    dx = (dxhat - mean_C(dxhat) - xhat * mean_C(dxhat * xhat)) / std
    (mean and std depend on every x of the row: d mean/dx = 1/C takes out the mean of
    dxhat; d(1/std)/dx takes out the part of dxhat along xhat)
    dw = sum of dout * xhat, db = sum of dout, both over every leading axis.

    ops.layernorm_backward computes the same lines in reused buffers, every sum (the
    row means and the column sums) on the CPU as a BLAS product with a ones vector."""
    xhat, std, w = cache
    C = xhat.shape[-1]
    dxhat = dout * w
    dx = (dxhat - dxhat.mean(axis=-1, keepdims=True)
          - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)) / std
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)  # (N, C) -> (C,)
    db = dout.reshape(-1, C).sum(axis=0)
    return dx, dw, db


# ----------------------------------------------------------------------------
# GELU (tanh approximation, as GPT-2)

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_forward(x):
    """out = 0.5 x (1 + tanh(u)),  u = k (x + a x^3),  k = sqrt(2/pi),  a = 0.044715.

    ops.gelu_forward computes u as x (k + k a x^2) in place in one buffer and caches
    out beside x."""
    out = 0.5 * x * (1.0 + np.tanh(GELU_K * (x + GELU_A * x ** 3)))
    return out, x


def gelu_backward(dout, cache):
    """dout/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,  t = tanh(u),  du/dx = k (1 + 3 a x^2).

    ops.gelu_backward rewrites this as 1 + (A - 0.5)(1 - t), A = out du/dx, which reuses
    the forward's out and takes fewer passes over the array."""
    x = cache
    t = np.tanh(GELU_K * (x + GELU_A * x ** 3))
    dudx = GELU_K * (1.0 + 3.0 * GELU_A * x ** 2)
    dx = dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t ** 2) * dudx)
    return (dx,)


# ----------------------------------------------------------------------------
# dropout


def dropout_forward(x, mask):
    """out = x * mask, mask a keep-mask of 0 (dropped) and 1/(1-p) (kept): inverted
    dropout. ops.dropout_forward is this same line (the cache is the mask)."""
    return x * mask, mask


def dropout_backward(dout, mask):
    """dx = dout * mask. ops.dropout_backward is this same line."""
    return (dout * mask,)


# ----------------------------------------------------------------------------
# causal multi-head self-attention (the part between c_attn and c_proj)


def _heads(x, n_head):
    B, T, C = x.shape  # (B,T,C) -> (B,T,nh,hs) -> (B,nh,T,hs)
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _merge(x):
    B, nh, T, hs = x.shape  # (B,nh,T,hs) -> (B,T,nh,hs) -> (B,T,C)
    return x.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)


def _softmax(s):
    """Row-wise softmax over the last axis, after subtracting each row's max (exp of
    -inf is 0: masked entries get weight exactly 0)."""
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_forward(qkv, n_head, att_mask=None):
    """Causal self-attention. qkv (B,T,3C) = [q | k | v]; returns y (B,T,C).
        att = softmax(q k^T / sqrt(hs), future keys masked)   (B,nh,T,T)
        a   = att * att_mask   (att_mask: a (B,nh,T,T) dropout keep-mask of 0 and 1/(1-p))
        y   = a v                                             (B,nh,T,hs) -> (B,T,C)

    ops.attention_forward computes only the scores at or below the diagonal, in tiles
    of query rows (npgpt/attention.py), scales q rather than the scores, writes every
    result into reused buffers, does the softmax in place (one GPU kernel in
    fused_attention.py) and writes y straight into its (B,T,C) layout."""
    T = qkv.shape[1]
    q, k, v = (_heads(x, n_head) for x in np.split(qkv, 3, axis=-1))  # 3 x (B,nh,T,hs)
    hs = q.shape[-1]
    att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hs)        # (B,nh,T,T) scores
    causal = np.tril(np.ones((T, T), dtype=bool))             # key position <= query's
    att = _softmax(np.where(causal, att, -np.inf))
    a = att if att_mask is None else att * att_mask
    y = _merge(a @ v)                                         # (B,nh,T,hs) -> (B,T,C)
    return y, (q, k, v, att, a, att_mask)


def attention_backward(dy, cache):
    """Each line inverts a forward line, from the last:
        da   = dy v^T ;  dv = a^T dy          (y = a v)
        datt = da * att_mask                  (a = att * att_mask)
        ds   = att * (datt - sum_j datt * att)   (softmax Jacobian, row-wise; att = 0 on
               masked entries, so their gradient is exactly 0)
        dq   = ds k / sqrt(hs) ;  dk = ds^T q / sqrt(hs)
    Returns (dqkv,), dqkv (B,T,3C) = [dq | dk | dv].

    ops.attention_backward takes the row sums sum_j datt_ij att_ij from the identity
    sum_j da_ij a_ij = dy_i . y_i (a pass over (B,T,C) rather than (B,nh,T,T)), does
    the mask and softmax lines as one in-place step (one kernel on a GPU), and writes
    dq, dk, dv straight into their places in dqkv."""
    q, k, v, att, a, att_mask = cache
    hs = q.shape[-1]
    dy = _heads(dy, q.shape[1])                               # (B,nh,T,hs)
    dv = a.transpose(0, 1, 3, 2) @ dy                         # (B,nh,T,hs)
    da = dy @ v.transpose(0, 1, 3, 2)                         # (B,nh,T,T)
    datt = da if att_mask is None else da * att_mask
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dq = ds @ k / math.sqrt(hs)                               # (B,nh,T,hs)
    dk = ds.transpose(0, 1, 3, 2) @ q / math.sqrt(hs)
    dqkv = np.concatenate([_merge(dq), _merge(dk), _merge(dv)], axis=-1)  # (B,T,3C)
    return (dqkv,)


# ----------------------------------------------------------------------------
# softmax cross-entropy


def cross_entropy_forward(logits, targets, ignore_index=-1):
    """loss = mean over the positions whose target is not ignore_index of
    -log softmax(logits)[target].   logits (..., V), targets (...) int.
    Returns the loss (a NumPy scalar of logits' dtype) and the cache.

    ops.cross_entropy_forward computes the softmax probabilities (which its backward
    needs) in a reused buffer, sums each row as a BLAS product with a ones vector, and
    returns the loss as a 0-d array without reading it back from a GPU."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)                                 # (N, V)
    t = targets.reshape(-1)                                   # (N,)
    z = z - z.max(axis=-1, keepdims=True)                     # each row's max is 0
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # log-softmax (N, V)
    rows = np.flatnonzero(t != ignore_index)                  # positions with a target
    loss = -logp[rows, t[rows]].mean()
    return loss, (logp, t, rows, logits.shape)


def cross_entropy_backward(dloss, cache):
    """dlogits_i = dloss * (softmax(z_i) - onehot(t_i)) / n on the n rows with a target,
    0 on ignored rows. ops.cross_entropy_backward: the same, from its forward's probs."""
    logp, t, rows, shape = cache
    dlogits = np.zeros_like(logp)                             # (N, V): 0 on ignored rows
    dlogits[rows] = np.exp(logp[rows])                        # softmax
    dlogits[rows, t[rows]] -= 1.0                             # minus the one-hot target
    dlogits *= dloss / len(rows)
    return (dlogits.reshape(shape),)


# ----------------------------------------------------------------------------
# inference: attention against a key/value cache (no backward: used only to sample)


def attention_with_cache(qkv, n_head, k_cache, v_cache, pos):
    """Attention of Tn new positions pos .. pos+Tn-1 against every key so far.
    qkv (B,Tn,3C); k_cache, v_cache (B,nh,block_size,hs) hold the keys and values of the
    positions < pos and receive the new ones. Returns y (B,Tn,C): attention_forward's
    rows pos .. pos+Tn-1 (without dropout).

    ops.attention_with_cache scales q rather than the scores, adds the causal -inf bias
    to the new keys' columns only, and shares attention_forward's in-place softmax
    (causal_softmax: on the CPU, without the row max when exp cannot overflow). For one
    new position (Tn = 1), sampling's step runs it flat: decode.KVCache.attention."""
    Tn = qkv.shape[1]
    end = pos + Tn
    q, k, v = (_heads(x, n_head) for x in np.split(qkv, 3, axis=-1))  # 3 x (B,nh,Tn,hs)
    k_cache[:, :, pos:end] = k
    v_cache[:, :, pos:end] = v
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # (B,nh,end,hs)
    att = q @ keys.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # (B,nh,Tn,end)
    # new row i is position pos + i: it sees the keys at positions 0 .. pos + i
    causal = np.arange(end)[None, :] <= pos + np.arange(Tn)[:, None]  # (Tn, end)
    att = _softmax(np.where(causal, att, -np.inf))
    return _merge(att @ values)                               # (B,nh,Tn,hs) -> (B,Tn,C)


# ----------------------------------------------------------------------------
# sampling the next token (no backward: used only to generate)


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """(B,V) float64 probabilities after temperature, top-k and top-p filtering.

        p = softmax(logits / temperature), then top-k: 0 below each row's k-th largest
        logit; top-p: keep the most likely tokens, in order, while the mass of those
        before them is < top_p (so at least one), 0 elsewhere, renormalised.

    sampling.next_token_probs returns the same bits without sorting the vocabulary:
    it sorts only the candidates that can hold the nucleus (a full argsort of GPT-2's
    50257 tokens costs more than a third of a forward pass)."""
    z = np.asarray(logits, dtype=np.float64) / temperature  # (B,V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]  # k-th largest per row
        z = np.where(z < kth, -np.inf, z)
    probs = _softmax(z)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")       # most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p          # mass of the better tokens
        keep = np.zeros(probs.shape, dtype=bool)
        np.put_along_axis(keep, order, before < top_p, axis=-1)   # back to vocabulary order
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """(B,) next token ids; temperature 0 is greedy (the argmax).

    Inverse-CDF sampling: one uniform u per row, the token is the first whose
    cumulative probability reaches u times the row's total. sampling.sample_next takes
    that cumulative sum over the tokens left with a non-zero probability only."""
    if temperature == 0:
        return np.asarray(logits).argmax(axis=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    u = rng.random((probs.shape[0], 1))
    cdf = np.cumsum(probs, axis=-1)                              # (B,V)
    ids = (cdf < u * cdf[:, -1:]).sum(axis=-1)
    return np.minimum(ids, probs.shape[-1] - 1)
