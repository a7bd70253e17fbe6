"""Sampling's step: GPT-2's forward over one new position per row, against the keys and
values of every position before it (the KV cache).

    x (B,C)      = wte[idx] + wpe[pos]
    each block:  x += attn.c_proj(attention(q of ln_1(x), the cached keys and values))
                 x += mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
    logits (B,V) = ln_f(x) @ wte.T

Training runs the layers (layers.py): each keeps what its backward needs and calls an op
written for (B,T) blocks of any size, in memory a workspace hands out. Sampling one token
runs the same math on one row per sequence. There every weight is read once per token
(495 MB for GPT-2 124M: memory bandwidth bounds the step), and NumPy's fixed cost per
call is as large as the arithmetic of the small ops (a row of 768 numbers). Routing that
row through layers, workspaces and caches for a backward cost GPT-2 124M 6-8% of its
decoding speed (issue 25), so KVCache.step writes a block's forward for one position as
one flat run of array calls on the model's parameter views, into buffers allocated once.
Each line computes what the op named in its comment computes (ops.py and attention.py;
the textbook versions are in reference.py), and tests/test_decode.py checks the step's
logits against the layers' forward. The prompt itself (many positions at once: matrix
products) goes through the layers, which write its keys and values into this cache.
"""
import math

from .arrays import Workspace, matmul, row_sums
from .backend import get_xp
from .linear import head_forward
from .ops import _GELU_A, _GELU_K

BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


class KVCache:
    """Keys and values of every layer for the first `pos` positions of B sequences, and
    `step`, the forward of the next position. `model`: a float32 or float64 GPT for
    `step` (a float16 model's steps go through its layers, where the float16 rules
    live: float32 sums and float32 element-wise math on the CPU)."""

    def __init__(self, model, B):
        c, P = model.config, model.params
        xp, dt, C, nh = model.xp, model.dtype, c.n_embd, c.n_head
        shape = (B, nh, c.block_size, C // nh)  # (B,nh,block_size,hs)
        self.k = [xp.zeros(shape, dtype=dt) for _ in range(c.n_layer)]
        self.v = [xp.zeros(shape, dtype=dt) for _ in range(c.n_layer)]
        self.pos = 0
        self.blocks = [tuple(P[f"transformer.h.{i}.{n}"] for n in BLOCK_PARAMS)
                       for i in range(c.n_layer)]
        self.wte, self.wpe = P["transformer.wte.weight"], P["transformer.wpe.weight"]
        self.ln_f = P["transformer.ln_f.weight"], P["transformer.ln_f.bias"]
        self.eps, self.nh, self.scale = model.ln_f.eps, nh, 1.0 / math.sqrt(C // nh)
        # the step's buffers, written in place on every call (B rows each)
        self.x, self.xn = xp.empty((B, C), dtype=dt), xp.empty((B, C), dtype=dt)
        self.qkv, self.proj = xp.empty((B, 3 * C), dtype=dt), xp.empty((B, C), dtype=dt)
        self.sq = xp.empty((B, C), dtype=dt)
        self.h, self.g = xp.empty((B, 4 * C), dtype=dt), xp.empty((B, 4 * C), dtype=dt)
        # LayerNorm's row means, as products with (1/C, ..., 1/C) on the CPU (row_sums)
        self.sums, self.mean_of = Workspace(reuse=True), xp.full(C, 1.0 / C, dtype=dt)

    def layernorm(self, w, b):
        """xn = layernorm_forward(x, w, b): (x - mean) / sqrt(var + eps) * w + b, row
        by row"""
        xn, xp = self.xn, get_xp(self.xn)
        mean = row_sums(self.x, self.sums, "mean", self.mean_of)       # (B,1)
        xp.subtract(self.x, mean, out=xn)                              # x - mean
        sq = xp.multiply(xn, xn, out=self.sq)
        var = row_sums(sq, self.sums, "var", self.mean_of)  # (B,1) biased, as PyTorch's
        var += self.eps
        xn /= xp.sqrt(var, out=var)                                    # xhat
        xn *= w
        xn += b
        return xn

    def attention(self, i):
        """y (B,C) = attention_with_cache(qkv, nh, k[i], v[i], pos) for one new position:
        its query against the keys and values of positions 0..pos (its own included)."""
        B, pos, end, xp = self.x.shape[0], self.pos, self.pos + 1, get_xp(self.x)
        # (B,3C) -> (B,3,nh,1,hs) -> 3 x (B,nh,1,hs)
        q, k, v = self.qkv.reshape(B, 3, self.nh, 1, -1).transpose(1, 0, 2, 3, 4)
        self.k[i][:, :, pos:end] = k
        self.v[i][:, :, pos:end] = v
        att = matmul(q * self.scale, self.k[i][:, :, :end].transpose(0, 1, 3, 2))
        att -= att.max(axis=-1, keepdims=True)   # (B,nh,1,end): causal_softmax (one row
        xp.exp(att, out=att)                      # per sequence: nothing in its future)
        att /= att.sum(axis=-1, keepdims=True)
        return matmul(att, self.v[i][:, :, :end]).reshape(B, -1)  # (B,nh,1,hs) -> (B,C)

    def gelu(self):
        """g = gelu_forward(h): 0.5 h (1 + tanh(k (h + a h^3)))"""
        h, g, xp = self.h, self.g, get_xp(self.h)
        xp.multiply(h, h, out=g)                  # h^2
        g *= _GELU_K * _GELU_A
        g += _GELU_K
        g *= h                                    # u = h (k + k a h^2)
        xp.tanh(g, out=g)
        g += 1.0
        g *= h
        g *= 0.5
        return g

    def step(self, idx):
        """Logits (B,V) of the position after the cached ones, whose tokens are idx (B,)
        (an integer array on the model's device); its keys and values join the cache."""
        if self.pos >= self.wpe.shape[0]:
            raise ValueError(f"the KV cache is full ({self.pos} positions, the block size)")
        xp, x, proj = get_xp(self.x), self.x, self.proj
        xp.take(self.wte, idx, axis=0, out=x)                        # embedding_forward
        x += self.wpe[self.pos]
        for i, (w1, b1, wa, ba, wp, bp, w2, b2, wf, bf, wm, bm) in enumerate(self.blocks):
            matmul(self.layernorm(w1, b1), wa, out=self.qkv)        # linear_forward
            self.qkv += ba
            x += matmul(self.attention(i), wp, out=proj)            # residual += c_proj
            x += bp
            matmul(self.layernorm(w2, b2), wf, out=self.h)          # linear_forward
            self.h += bf
            x += matmul(self.gelu(), wm, out=proj)                  # residual += c_proj
            x += bm
        self.pos += 1
        logits, _ = head_forward(self.layernorm(*self.ln_f), self.wte)  # (B,V), a new array
        return logits
