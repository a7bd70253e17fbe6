"""The math of a GPT: pure forward/backward pairs, each backward derived by hand.

Glossary (used in every shape comment in npgpt):
    B  batch size             T  sequence length (<= block_size)
    C  embedding width        V  vocabulary size
    nh number of heads        hs head size = C // nh

Every `*_forward(...)` returns `(out, cache)`; the matching `*_backward(dout, cache)`
returns the gradient of the loss with respect to each input, in the order of the
forward's arguments. The functions are pure (no state, no parameter updates), which
is what the gradient checks in tests/ perturb, and they take their array module from
their inputs, so they run unchanged on NumPy or CuPy. Scalars are Python floats:
a NumPy float64 scalar would silently promote float32 arrays to float64.
"""
import math

from .backend import get_xp

# ----------------------------------------------------------------------------
# embeddings


def embedding_forward(idx, wte, wpe):
    """out[b, t] = wte[idx[b, t]] + wpe[t].   idx (B,T) int, wte (V,C), wpe (block_size,C)."""
    T = idx.shape[1]
    out = wte[idx] + wpe[:T]  # (B,T,C): gather rows, broadcast positions over B
    return out, (idx, wte.shape, wpe.shape)


def embedding_backward(dout, cache):
    """Gather forward, scatter-add backward.

    forward:  out[b,t] = wte[idx[b,t]] + wpe[t]
    dwte[v] = sum over (b,t) with idx[b,t] == v of dout[b,t]   (a token repeated in the
              batch receives the sum of its gradients: `add.at` accumulates duplicates,
              where plain fancy-index assignment would keep only one)
    dwpe[t] = sum over b of dout[b,t]   (rows >= T were not used: zero)
    """
    idx, wte_shape, wpe_shape = cache
    xp = get_xp(dout)
    C = dout.shape[-1]
    dwte = xp.zeros(wte_shape, dtype=dout.dtype)
    xp.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))  # (B*T,) ids, (B*T,C) rows
    dwpe = xp.zeros(wpe_shape, dtype=dout.dtype)
    dwpe[: idx.shape[1]] = dout.sum(axis=0)
    return dwte, dwpe


# ----------------------------------------------------------------------------
# linear


def linear_forward(x, w, b):
    """out = x @ w + b.   x (..., Cin), w (Cin, Cout), b (Cout,) -> (..., Cout)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin): one matrix product for all positions
    out = x2 @ w
    out += b
    return out.reshape(*x.shape[:-1], w.shape[1]), (x, w)  # (..., Cout)


def linear_backward(dout, cache):
    """forward: out = x @ w + b
    dx = dout @ w.T          (each x[n, i] meets w[i, :] in every output of row n)
    dw = x.T @ dout          (summed over all positions n)
    db = sum_n dout[n]       (b is broadcast over positions)
    """
    x, w = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, Cout)
    x2 = x.reshape(-1, x.shape[-1])           # (N, Cin)
    dx = (dout2 @ w.T).reshape(x.shape)       # (..., Cin)
    dw = x2.T @ dout2
    db = dout2.sum(axis=0)
    return dx, dw, db


# ----------------------------------------------------------------------------
# output head tied to the token embedding


def head_forward(x, wte):
    """logits = x @ wte.T.   x (..., C), wte (V, C) -> (..., V)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, C)
    return (x2 @ wte.T).reshape(*x.shape[:-1], wte.shape[0]), (x, wte)  # (..., V)


def head_backward(dout, cache):
    """forward: logits = x @ wte.T
    dx   = dlogits @ wte
    dwte = dlogits.T @ x     (added by the layer into the embedding's gradient)
    """
    x, wte = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, V)
    dx = (dout2 @ wte).reshape(x.shape)       # (..., C)
    dwte = dout2.T @ x.reshape(-1, x.shape[-1])
    return dx, dwte


# ----------------------------------------------------------------------------
# LayerNorm


def layernorm_forward(x, w, b, eps=1e-5):
    """out = (x - mean) / sqrt(var + eps) * w + b, statistics over the last axis (C)."""
    mean = x.mean(axis=-1, keepdims=True)       # (..., 1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # biased variance, as PyTorch
    rstd = 1.0 / (var + eps) ** 0.5           # (..., 1)
    xhat = xc * rstd
    out = xhat * w + b
    return out, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """forward: xhat = (x - mean) * rstd;  out = xhat * w + b
    db    = sum over positions of dout
    dw    = sum over positions of dout * xhat
    dxhat = dout * w
    dx    = rstd * (dxhat - mean_C(dxhat) - xhat * mean_C(dxhat * xhat))
            (differentiating through mean and rstd, which depend on every x in the row:
             d mean/dx = 1/C removes the mean of dxhat; d rstd/dx = -rstd^2 xhat/C removes
             the component of dxhat along xhat)
    """
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dout2 = dout.reshape(-1, C)  # (N, C)
    xhat2 = xhat.reshape(-1, C)  # (N, C)
    db = dout2.sum(axis=0)
    dw = (dout2 * xhat2).sum(axis=0)
    dxhat = dout * w
    dx = dxhat - dxhat.mean(axis=-1, keepdims=True)
    dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx, dw, db


# ----------------------------------------------------------------------------
# GELU (tanh approximation, as GPT-2)

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """out = 0.5 x (1 + tanh(k (x + a x^3))),  k = sqrt(2/pi), a = 0.044715."""
    t = x * x                    # x^2
    t *= _GELU_A * x             # a x^3
    t += x
    t *= _GELU_K                 # u = k (x + a x^3)
    get_xp(x).tanh(t, out=t)     # t = tanh(u)
    out = t + 1.0
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    """forward: u = k (x + a x^3);  t = tanh(u);  out = 0.5 x (1 + t)
    dout/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx,   du/dx = k (1 + 3 a x^2)
    """
    x, t = cache
    dudx = x * x
    dudx *= 3.0 * _GELU_A
    dudx += 1.0
    dudx *= _GELU_K                       # du/dx
    local = 1.0 - t * t                   # dt/du = 1 - t^2
    local *= dudx
    local *= 0.5 * x                      # 0.5 x (1 - t^2) du/dx
    local += 0.5 * (1.0 + t)              # + 0.5 (1 + t)
    local *= dout
    return (local,)


# ----------------------------------------------------------------------------
# dropout


def dropout_forward(x, mask):
    """Inverted dropout with a given mask: out = x * mask, where mask holds 0 for a
    dropped unit and 1/(1-p) for a kept one (so the expectation of out is x).
    The mask is drawn by the layer from the model's generator; the op is pure."""
    return x * mask, mask


def dropout_backward(dout, mask):
    """forward: out = x * mask   ->   dx = dout * mask."""
    return (dout * mask,)


def dropout_mask(shape, p, rng, dtype):
    """A keep-mask for inverted dropout: 1/(1-p) with probability 1-p, else 0."""
    keep = rng.random(shape, dtype=dtype) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------
# causal multi-head self-attention (the part between c_attn and c_proj)


def causal_mask_bias(T, dtype, xp):
    """(T,T) additive mask: 0 where key position <= query position, -inf above."""
    future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
    return xp.where(future, -math.inf, 0.0).astype(dtype)


def attention_forward(qkv, n_head, att_mask=None):
    """Scaled dot-product causal self-attention over all (batch, head) pairs at once.

    qkv (B,T,3C) is the fused projection [q | k | v]; returns y (B,T,C).
    att_mask, if given, is a dropout keep-mask of shape (B,nh,T,T) applied to the
    attention weights (as nanoGPT's attn_dropout).
        att = softmax(q k^T / sqrt(hs) + causal)     (B,nh,T,T)
        y   = att v                                  (B,nh,T,hs) -> merged to (B,T,C)
    """
    xp = get_xp(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    # split and view as heads: (B,T,C) -> (B,T,nh,hs) -> (B,nh,T,hs); no copy
    q = qkv[:, :, :C].reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    k = qkv[:, :, C:2 * C].reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    v = qkv[:, :, 2 * C:].reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    scale = 1.0 / math.sqrt(hs)
    att = q @ k.transpose(0, 1, 3, 2)          # (B,nh,T,hs) @ (B,nh,hs,T) -> (B,nh,T,T)
    att *= scale
    att += causal_mask_bias(T, att.dtype, xp)  # -inf above the diagonal
    att -= att.max(axis=-1, keepdims=True)     # stable softmax: the max of each row is 0
    xp.exp(att, out=att)                       # exp(-inf) = 0: masked weights are exactly 0
    att /= att.sum(axis=-1, keepdims=True)
    att_used = att if att_mask is None else att * att_mask
    y = att_used @ v                                   # (B,nh,T,T) @ (B,nh,T,hs) -> (B,nh,T,hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)       # (B,nh,T,hs) -> (B,T,nh,hs) -> (B,T,C)
    return y, (q, k, v, att, att_used, att_mask, scale)


def attention_backward(dy, cache):
    """forward (per batch and head):
        s   = q k^T * scale + causal      (1)
        att = softmax(s)  row-wise        (2)
        a   = att * att_mask              (3)  (a = att without dropout)
        y   = a v                         (4)
    backward, each line inverting the forward line with the same number:
        (4) da = dy v^T ;  dv = a^T dy
        (3) datt = da * att_mask
        (2) ds = att * (datt - sum_j(datt * att))   (softmax Jacobian; att = 0 on masked
            entries, so their gradient is exactly 0)
        (1) dq = ds k * scale ;  dk = ds^T q * scale
    Returns dqkv (B,T,3C).
    """
    q, k, v, att, att_used, att_mask, scale = cache
    xp = get_xp(dy)
    B, nh, T, hs = q.shape
    C = nh * hs
    dy = dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)   # (B,T,C) -> (B,nh,T,hs)
    dqkv = xp.empty((B, T, 3 * C), dtype=dy.dtype)
    # views of dqkv as heads, written in place: (B,T,C) slices -> (B,nh,T,hs)
    dq = dqkv[:, :, :C].reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
    dk = dqkv[:, :, C:2 * C].reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
    dv = dqkv[:, :, 2 * C:].reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
    dv[...] = att_used.transpose(0, 1, 3, 2) @ dy       # (4) dv = a^T dy
    datt = dy @ v.transpose(0, 1, 3, 2)                 # (4) da = dy v^T      (B,nh,T,T)
    if att_mask is not None:
        datt *= att_mask                                # (3)
    ds = datt                                           # (2), in place
    ds -= (datt * att).sum(axis=-1, keepdims=True)
    ds *= att
    ds *= scale                                         # (1) scale folded in once
    dq[...] = ds @ k                                    # (1) dq = ds k
    dk[...] = ds.transpose(0, 1, 3, 2) @ q              # (1) dk = ds^T q
    return (dqkv,)


# ----------------------------------------------------------------------------
# softmax cross-entropy


def cross_entropy_forward(logits, targets, ignore_index=-1):
    """Mean over positions whose target is not ignore_index of -log softmax(logits)[target].

    logits (..., V), targets (...) int. Stable: log-sum-exp after subtracting each row's max.
    Returns a 0-d array (the loss) and the cache; no host synchronisation happens here.
    """
    xp = get_xp(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)                   # (N, V)
    t = targets.reshape(-1)                     # (N,)
    valid = t != ignore_index
    t_safe = xp.where(valid, t, 0)
    z = z - z.max(axis=-1, keepdims=True)       # shift: every row's max is 0
    probs = xp.exp(z)
    sumexp = probs.sum(axis=-1, keepdims=True)  # (N, 1), >= 1
    probs /= sumexp
    rows = xp.arange(z.shape[0])
    nll = xp.log(sumexp[:, 0]) - z[rows, t_safe]  # log-sum-exp minus the target logit
    count = valid.sum().astype(logits.dtype)    # positions that carry a target
    loss = (nll * valid).sum() / count
    return loss, (probs, t_safe, valid, count, logits.shape)


def cross_entropy_backward(dloss, cache):
    """forward: loss = (1/n) sum_valid [ logsumexp(z_i) - z_i[t_i] ]
    dlogits_i = dloss/n * (softmax(z_i) - onehot(t_i)) for valid rows, 0 for ignored rows."""
    probs, t_safe, valid, count, shape = cache
    xp = get_xp(probs)
    dlogits = probs.copy()
    dlogits[xp.arange(dlogits.shape[0]), t_safe] -= 1.0
    dlogits *= (valid * (dloss / count))[:, None].astype(dlogits.dtype)
    return (dlogits.reshape(shape),)


# ----------------------------------------------------------------------------
# inference: attention against a key/value cache (no backward: used only to sample)


def attention_with_cache(qkv, n_head, k_cache, v_cache, pos):
    """Causal attention of Tn new positions (pos .. pos+Tn-1) against every key so far.

    qkv (B,Tn,3C) for the new positions; k_cache, v_cache (B,nh,block_size,hs) hold the
    keys/values of positions < pos and receive the new ones. Returns y (B,Tn,C), equal
    to attention_forward over the whole sequence restricted to the new rows.
    """
    xp = get_xp(qkv)
    B, Tn, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    end = pos + Tn
    # (B,Tn,C) -> (B,Tn,nh,hs) -> (B,nh,Tn,hs)
    q = qkv[:, :, :C].reshape(B, Tn, n_head, hs).transpose(0, 2, 1, 3)
    k_cache[:, :, pos:end] = qkv[:, :, C:2 * C].reshape(B, Tn, n_head, hs).transpose(0, 2, 1, 3)
    v_cache[:, :, pos:end] = qkv[:, :, 2 * C:].reshape(B, Tn, n_head, hs).transpose(0, 2, 1, 3)
    att = q @ k_cache[:, :, :end].transpose(0, 1, 3, 2)  # (B,nh,Tn,end)
    att *= 1.0 / math.sqrt(hs)
    att += causal_mask_bias(end, att.dtype, xp)[pos:end]  # new row i sees keys <= pos + i
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ v_cache[:, :, :end]                 # (B,nh,Tn,hs)
    return y.transpose(0, 2, 1, 3).reshape(B, Tn, C)  # (B,nh,Tn,hs) -> (B,Tn,C)
