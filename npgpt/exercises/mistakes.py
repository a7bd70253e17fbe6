"""Wrong backward passes that learners really write, each with what it gets wrong.

grade() runs every one of an exercise's mistakes on its cases; when a learner's gradient
equals a mistake's in every case, the WRONG line names the mistake. Each function takes
(dout, cache) as reference.py's backward of its exercise and returns its tuple of
gradients (only the gradient the mistake is about differs from the right one).
"""
import math

import numpy as np

from .. import reference as ref
from ..reference import GELU_A, GELU_K, _heads, _merge, _softmax


# ----------------------------------------------------------------------------
# layernorm: dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / std, dxhat = dout w


def _layernorm(dx_of):
    """A layernorm backward with dx = dx_of(dout, xhat, std, w), dw and db right."""
    def backward(dout, cache):
        xhat, std, w = cache
        _, dw, db = ref.layernorm_backward(dout, cache)
        return dx_of(dout, xhat, std, w), dw, db
    return backward


def _mean(a):
    return a.mean(axis=-1, keepdims=True)


LAYERNORM = [
    ("dx misses the -mean(dxhat) term: the mean depends on every x of the row",
     _layernorm(lambda dout, xhat, std, w: (dout * w - xhat * _mean(dout * w * xhat)) / std)),
    ("dx misses the -xhat * mean(dxhat * xhat) term: std depends on every x of the row",
     _layernorm(lambda dout, xhat, std, w: (dout * w - _mean(dout * w)) / std)),
    ("dx treats mean and std as constants (dx = dout * w / std): both depend on x",
     _layernorm(lambda dout, xhat, std, w: dout * w / std)),
    ("dx forgets w: dxhat = dout * w, not dout",
     _layernorm(lambda dout, xhat, std, w: (dout - _mean(dout) - xhat * _mean(dout * xhat)) / std)),
    ("dx is multiplied by std: divide by it (xhat = (x - mean) / std)",
     _layernorm(lambda dout, xhat, std, w: (dout * w - _mean(dout * w)
                                             - xhat * _mean(dout * w * xhat)) * std)),
]


# ----------------------------------------------------------------------------
# gelu: dx = dout (0.5 (1 + t) + 0.5 x (1 - t^2) du/dx)


def _gelu(dudx_of, dtanh=lambda t: 1.0 - t ** 2, outer=True):
    def backward(dout, x):
        t = np.tanh(GELU_K * (x + GELU_A * x ** 3))
        inner = 0.5 * x * dtanh(t) * dudx_of(x) if outer else 0.0
        return (dout * (0.5 * (1.0 + t) + inner),)
    return backward


GELU = [
    ("dx misses the 0.5 x (1 - tanh(u)^2) du/dx term: the product rule on x * (1 + tanh(u))",
     _gelu(None, outer=False)),
    ("du/dx misses its 3 a x^2 term: du/dx = k (1 + 3 a x^2)", _gelu(lambda x: GELU_K + 0.0 * x)),
    ("du/dx misses the factor k = sqrt(2/pi)", _gelu(lambda x: 1.0 + 3.0 * GELU_A * x ** 2)),
    ("the derivative of tanh is 1 - tanh^2, not 1 - tanh",
     _gelu(lambda x: GELU_K * (1.0 + 3.0 * GELU_A * x ** 2), dtanh=lambda t: 1.0 - t)),
]


# ----------------------------------------------------------------------------
# attention: dv = a^T dy; da = dy v^T; datt = da * mask; ds = att (datt - rowsum(datt att))


def _attention(softmax_term=True, mask_of=lambda m: m, dv_weights="a", dk_transposed=True):
    """reference.attention_backward with one line changed."""
    def backward(dy, cache):
        q, k, v, att, a, mask = cache
        hs = q.shape[-1]
        dy = _heads(dy, q.shape[1])                                  # (B,nh,T,hs)
        dv = (a if dv_weights == "a" else att).transpose(0, 1, 3, 2) @ dy
        da = dy @ v.transpose(0, 1, 3, 2)                            # (B,nh,T,T)
        mask = None if mask is None else mask_of(mask)
        datt = da if mask is None else da * mask
        ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) if softmax_term else att * datt
        dq = ds @ k / math.sqrt(hs)
        dk = (ds.transpose(0, 1, 3, 2) if dk_transposed else ds) @ q / math.sqrt(hs)
        return (np.concatenate([_merge(dq), _merge(dk), _merge(dv)], axis=-1),)
    return backward


def _attention_not_causal(dy, cache):
    """reference.attention_backward with the weights recomputed from q and k without the
    causal mask (every key visible to every query)."""
    q, k, v, _, _, mask = cache
    att = _softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]))  # (B,nh,T,T)
    a = att if mask is None else att * mask
    return ref.attention_backward(dy, (q, k, v, att, a, mask))


ATTENTION = [
    ("the softmax backward misses the -sum_j datt_ij att_ij term: ds = att * (datt - "
     "sum_j datt * att), every weight of a row depends on every score of it",
     _attention(softmax_term=False)),
    ("the attention-dropout mask is not applied to da: datt = da * att_mask",
     _attention(mask_of=lambda m: None)),
    ("the mask's kept entries taken as 1, not 1/(1-p): multiply by att_mask itself",
     _attention(mask_of=lambda m: (m != 0).astype(m.dtype))),
    ("dv uses the weights before the dropout mask: dv = a^T dy with a = att * att_mask",
     _attention(dv_weights="att")),
    ("dk = ds q: it is ds^T q (key j collects from every query i of column j)",
     _attention(dk_transposed=False)),
    ("the weights recomputed without the causal mask: a query sees only the keys at or "
     "before it (use the cache's att, whose future entries are 0)", _attention_not_causal),
]


# ----------------------------------------------------------------------------
# cross_entropy: dlogits = dloss (softmax - onehot) / n on the rows with a target, else 0


def _cross_entropy(probs=np.exp, onehot=True):
    def backward(dloss, cache):
        logp, t, rows, shape = cache
        d = np.zeros_like(logp)
        d[rows] = probs(logp[rows])
        if onehot:
            d[rows, t[rows]] -= 1.0
        return (d.reshape(shape) * (dloss / len(rows)),)
    return backward


def _ce_all_rows(dloss, cache):
    logp, t, rows, shape = cache
    d = np.exp(logp)
    d[np.arange(len(t)), t] -= 1.0  # an ignored target of -1 subtracts from the last column
    return (d.reshape(shape) * (dloss / len(t)),)


def _ce_minus_one(dloss, cache):
    logp, t, rows, shape = cache
    return ref.cross_entropy_backward(dloss, (logp, t, np.flatnonzero(t != -1), shape))


CROSS_ENTROPY = [
    ("dlogits misses the - onehot(target): softmax - onehot", _cross_entropy(onehot=False)),
    ("dlogits uses logp where it needs softmax = exp(logp)", _cross_entropy(probs=lambda z: z)),
    ("ignore_index forgotten: every position is in the gradient and the mean is over all "
     "B*T of them; only the cache's rows are in the loss, so divide by their count n",
     _ce_all_rows),
    ("the positions with a target taken as t != -1: ignore_index need not be -1; the "
     "cache's rows lists the positions in the loss", _ce_minus_one),
]


# ----------------------------------------------------------------------------
# embedding: dwte[v] = sum of dout[b,t] over idx[b,t] == v;  dwpe[t] = sum_b dout[b,t]


def _embedding_overwrite(dout, cache):
    idx, wte_shape, wpe_shape = cache
    dwte = np.zeros(wte_shape)
    dwte[idx] += dout  # buffered: a repeated id keeps only one of its rows
    return dwte, ref.embedding_backward(dout, cache)[1]


def _embedding_first_row(dout, cache):
    dwte, dwpe = ref.embedding_backward(dout, cache)
    dwpe[:dout.shape[1]] = dout[0]
    return dwte, dwpe


EMBEDDING = [
    ("dwte[idx] += dout keeps one row per repeated id (NumPy buffers the fancy-index "
     "update): np.add.at(dwte, idx, dout) adds them all", _embedding_overwrite),
    ("dwpe takes only the first batch row: wpe[t] is added to every row b, so dwpe[t] = "
     "sum over b of dout[b, t]", _embedding_first_row),
]

MISTAKES = {"linear": [], "layernorm": LAYERNORM, "gelu": GELU, "attention": ATTENTION,
            "cross_entropy": CROSS_ENTROPY, "embedding": EMBEDDING}
