"""The linear layers' op pair (x @ w + b) and the output head tied to the token
embedding. ops.py re-exports every name here (`ops.linear_forward`), with the glossary
(B, T, C, V, nh, hs) and the conventions of every op: `(out, cache)` forwards, pure
functions, the array module taken from the inputs, an optional Workspace `ws`.
"""
import operator
from collections import namedtuple

from .arrays import FRESH, column_sums, matmul, matmul_add

LinearCache = namedtuple("LinearCache", "x w")
HeadCache = namedtuple("HeadCache", "x wte")


def linear_forward(x, w, b, ws=FRESH, *, into=None, add_bias=operator.iadd):
    """out = x @ w + b.   x (..., Cin), w (Cin, Cout), b (Cout,) -> (..., Cout).
    into: None (out is a new array), or an array of out's shape that x @ w + b is added to
    in place and which is returned (a block's residual stream: on a GPU the product adds
    itself in, with no pass of its own).
    add_bias(out, b): out += b in place (kernels.py passes its fused one).
    Textbook version: reference.linear_forward."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin): one matrix product for all positions
    if into is None:
        out = matmul(x2, w, out=ws("out", (x2.shape[0], w.shape[1]), x))
        add_bias(out, b)
        return out.reshape(*x.shape[:-1], w.shape[1]), LinearCache(x, w)  # (..., Cout)
    into2 = into.reshape(x2.shape[0], w.shape[1])  # (N, Cout), a view of `into`
    matmul_add(x2, w, into2, ws, "out")             # into += x @ w
    add_bias(into2, b)                              #      + b
    return into, LinearCache(x, w)


def linear_backward(dout, cache, ws=FRESH, *, into=None, column_sums=column_sums):
    """forward: out = x @ w + b
    dx = dout @ w.T          (each x[n, i] meets w[i, :] in every output of row n)
    dw = x.T @ dout          (summed over all positions n)
    db = sum_n dout[n]       (b is broadcast over positions)
    into: None (dw and db are new arrays), or a layer's (dw, db) gradient arrays, which
    these are added to (+=) and which are returned (on a GPU the product and the column
    sums add in place themselves: no separate pass of additions).
    column_sums: kernels.py passes its fused one. Textbook version: reference.linear_backward.
    """
    x, w = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, Cout)
    x2 = x.reshape(-1, x.shape[-1])           # (N, Cin)
    dx = matmul(dout2, w.T, out=ws("dx", x2.shape, dout)).reshape(x.shape)  # (..., Cin)
    if into is None:
        return dx, matmul(x2.T, dout2, out=ws("dw", w.shape, dout)), column_sums(dout2)
    dw, db = into
    matmul_add(x2.T, dout2, dw, ws, "dw")    # dw += x.T @ dout
    column_sums(dout2, db, add=True)         # db += sum_n dout[n]
    return dx, dw, db


# ----------------------------------------------------------------------------
# output head tied to the token embedding


def head_forward(x, wte):
    """logits = x @ wte.T.   x (..., C), wte (V, C) -> (..., V), always a new array.
    Textbook version: reference.head_forward."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, C)
    return matmul(x2, wte.T).reshape(*x.shape[:-1], wte.shape[0]), HeadCache(x, wte)  # (..., V)


def head_backward(dout, cache, ws=FRESH):
    """forward: logits = x @ wte.T
    dx   = dlogits @ wte
    dwte = dlogits.T @ x     (added by the layer into the embedding's gradient)
    Textbook version: reference.head_backward.
    """
    x, wte = cache
    dout2 = dout.reshape(-1, dout.shape[-1])  # (N, V)
    x2 = x.reshape(-1, x.shape[-1])           # (N, C)
    dx = matmul(dout2, wte, out=ws("dx", x2.shape, dout)).reshape(x.shape)  # (..., C)
    dwte = matmul(dout2.T, x2, out=ws("dwte", wte.shape, dout))
    return dx, dwte
