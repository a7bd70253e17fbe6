"""Thin layer classes over the ops in ops.py.

A layer holds views of its parameters and of their gradients (from the model's flat
buffers), keeps the cache of its last forward, and in backward *adds* its parameter
gradients into the gradient views with `+=` (a Linear hands its views to the op, which
adds into them: on a GPU the product and the column sums add in place themselves).
Because of that, the tied output head simply adds into the token-embedding gradient, and
gradient accumulation over micro-batches needs no extra code.

Memory (see arrays.Workspace). By default (GPT(reuse_memory=False)) every Workspace is a
fresh one: each call returns new arrays and leaves its inputs alone, so a learner can keep
and compare any layer's output. The training path (GPT(reuse_memory=True), which the
Trainer and the benchmarks set) reuses memory instead: a layer writes its forward
results, which its backward needs, into a Workspace of its own, and its backward
temporaries into a `scratch` Workspace that the blocks share: a backward result is dead
once the next layer's backward has read it, so the memory of a step's backward does not
grow with depth. Sharing follows the order of Block.backward: every Linear uses
scratch["linear"] (each dx is read before the next Linear's backward), attention and GELU
use scratch["core"] (their backwards are never in flight together), each LayerNorm role
its own (ln_2's dx is the residual gradient that must outlive the attention branch). The
residual branches' outputs are read right away into the residual stream, so both c_proj
layers of every block write their forward results into scratch["residual"], and each
block adds them into the stream in place (with no dropout active, the product adds
itself into the stream: residual_branch).

The layers with a fused GPU kernel (LayerNorm, attention, the MLP's GELU, the linear
layers' bias and its gradient, the embedding's gradient) call their op through
`self.ops`: npgpt.ops itself, or kernels.fused_ops's table, which the model chooses once
(see kernels.py and fused_attention.py); the others call npgpt.ops directly.
"""
from . import ops
from .arrays import Workspace


class Linear:
    """y = x @ W + b, W of shape (in, out) as Hugging Face GPT-2's Conv1D."""

    def __init__(self, params, grads, name, scratch=None, ws=None, ops=ops):
        self.w, self.b = params[name + ".weight"], params[name + ".bias"]
        self.dw, self.db = grads[name + ".weight"], grads[name + ".bias"]
        self.scratch = scratch or Workspace()
        self.ws = ws or self.scratch.new()
        self.ops = ops

    def forward(self, x, into=None):
        """x @ W + b, or into += x @ W + b (in place, returned) when `into` is given."""
        out, self.cache = self.ops.linear_forward(x, self.w, self.b, self.ws, into=into)
        return out

    def backward(self, dout):
        # the op adds dW and db into our gradient views (self.dw += dW, self.db += db)
        dx, _, _ = self.ops.linear_backward(dout, self.cache, self.scratch,
                                            into=(self.dw, self.db))
        return dx


class LayerNorm:
    def __init__(self, params, grads, name, eps=1e-5, scratch=None, ops=ops):
        self.w, self.b = params[name + ".weight"], params[name + ".bias"]
        self.dw, self.db = grads[name + ".weight"], grads[name + ".bias"]
        self.eps, self.ops = eps, ops
        self.scratch = scratch or Workspace()
        self.ws = self.scratch.new()

    def forward(self, x):
        out, self.cache = self.ops.layernorm_forward(x, self.w, self.b, self.eps, self.ws)
        return out

    def backward(self, dout, residual=None):
        """dx (plus `residual`, the gradient a skip connection carries around this layer)."""
        # the op adds dw and db into our gradient views (self.dw += dw, self.db += db)
        dx, _, _ = self.ops.layernorm_backward(dout, self.cache, self.scratch,
                                               residual=residual, into=(self.dw, self.db))
        return dx


class Dropout:
    """Inverted dropout; active only when train=True and p > 0. Masks come from `rng`
    (the model's generator), so a run with the same seed drops the same units."""

    def __init__(self, p, rng):
        self.p, self.rng, self.mask = p, rng, None

    def active(self, train):
        return train and self.p > 0.0

    def forward(self, x, train):
        self.mask = None
        if not self.active(train):
            return x
        self.mask = ops.dropout_mask(x.shape, self.p, self.rng, x.dtype)
        out, _ = ops.dropout_forward(x, self.mask)
        return out

    def backward(self, dout):
        if self.mask is None:
            return dout
        (dx,) = ops.dropout_backward(dout, self.mask)
        return dx


def residual_branch(linear, dropout, y, train, residual):
    """dropout(linear(y)) (a block branch's last steps), added into `residual` in place
    and returned when one is given. With no dropout active, the product adds itself into
    the residual (into=: on a GPU one cuBLAS call adds, with no pass of its own)."""
    if residual is None or dropout.active(train):
        out = dropout.forward(linear.forward(y), train)
        if residual is None:
            return out
        residual += out
        return residual
    dropout.mask = None  # (inactive: its backward passes the gradient through)
    return linear.forward(y, into=residual)


class CausalSelfAttention:
    """qkv = c_attn(x) (C -> 3C); y = attention(qkv); out = dropout(c_proj(y))."""

    def __init__(self, params, grads, name, n_head, dropout, rng, scratch, ops=ops):
        self.c_attn = Linear(params, grads, name + ".c_attn", scratch["linear"], ops=ops)
        self.c_proj = Linear(params, grads, name + ".c_proj", scratch["linear"],
                             scratch["residual"], ops)
        self.resid_dropout = Dropout(dropout, rng)
        self.n_head, self.p, self.rng, self.ops = n_head, dropout, rng, ops
        self.ws, self.scratch = scratch["core"].new(), scratch["core"]

    def forward(self, x, train, kv=None, residual=None):
        """The branch's output, or residual += it (in place, returned) when given."""
        qkv = self.c_attn.forward(x)  # (B,T,3C)
        if kv is not None:  # sampling with a KV cache: kv = (k_cache, v_cache, pos)
            y = ops.attention_with_cache(qkv, self.n_head, *kv)
            return residual_branch(self.c_proj, self.resid_dropout, y, False, residual)
        att_mask = None
        if train and self.p > 0.0:
            B, T, _ = x.shape
            att_mask = ops.dropout_mask((B, self.n_head, T, T), self.p, self.rng, x.dtype)
        y, self.cache = self.ops.attention_forward(qkv, self.n_head, att_mask, self.ws)
        return residual_branch(self.c_proj, self.resid_dropout, y, train, residual)

    def backward(self, dout):
        dy = self.c_proj.backward(self.resid_dropout.backward(dout))
        (dqkv,) = self.ops.attention_backward(dy, self.cache, self.scratch)
        return self.c_attn.backward(dqkv)


class MLP:
    """out = dropout(c_proj(gelu(c_fc(x)))), C -> 4C -> C."""

    def __init__(self, params, grads, name, dropout, rng, scratch, ops=ops):
        self.c_fc = Linear(params, grads, name + ".c_fc", scratch["linear"], ops=ops)
        self.c_proj = Linear(params, grads, name + ".c_proj", scratch["linear"],
                             scratch["residual"], ops)
        self.dropout = Dropout(dropout, rng)
        self.ops, self.ws, self.scratch = ops, scratch["core"].new(), scratch["core"]

    def forward(self, x, train, residual=None):
        """The branch's output, or residual += it (in place, returned) when given."""
        h, self.gelu_cache = self.ops.gelu_forward(self.c_fc.forward(x), self.ws)  # (B,T,4C)
        return residual_branch(self.c_proj, self.dropout, h, train, residual)

    def backward(self, dout):
        dh = self.c_proj.backward(self.dropout.backward(dout))
        (dh,) = self.ops.gelu_backward(dh, self.gelu_cache, self.scratch)
        return self.c_fc.backward(dh)


class Block:
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    scratch: {role: Workspace} shared by all blocks (e.g. a defaultdict(Workspace)).
    ops: the op functions to call (npgpt.ops, or kernels.fused_ops's on a GPU)."""

    def __init__(self, params, grads, name, config, rng, scratch, ops=ops):
        self.ln_1 = LayerNorm(params, grads, name + ".ln_1", scratch=scratch["ln_1"], ops=ops)
        self.attn = CausalSelfAttention(params, grads, name + ".attn", config.n_head,
                                        config.dropout, rng, scratch, ops)
        self.ln_2 = LayerNorm(params, grads, name + ".ln_2", scratch=scratch["ln_2"], ops=ops)
        self.mlp = MLP(params, grads, name + ".mlp", config.dropout, rng, scratch, ops)
        self.in_place = scratch["residual"].reuse  # the training path's memory reuse

    def forward(self, x, train, kv=None):
        """x + attn(ln_1(x)), then + mlp(ln_2(.)): added into x in place when the model
        reuses memory (the training path), else into a new array (x stays the caller's)."""
        if not self.in_place:
            x = x + self.attn.forward(self.ln_1.forward(x), train, kv)
            return x + self.mlp.forward(self.ln_2.forward(x), train)
        x = self.attn.forward(self.ln_1.forward(x), train, kv, residual=x)  # x += attn(..)
        return self.mlp.forward(self.ln_2.forward(x), train, residual=x)     # x += mlp(..)

    def backward(self, dout):
        # the residual passes dout straight through and adds each branch's input gradient
        # (the LayerNorm's backward adds it: dx = ln_2's dx + dout, in one pass on a GPU)
        dx = self.ln_2.backward(self.mlp.backward(dout), residual=dout)
        return self.ln_1.backward(self.attn.backward(dx), residual=dx)


class Embedding:
    """Token + position embedding: x[b,t] = wte[idx[b,t]] + wpe[t]. `ws` is shared with
    the tied head: both build a (V, C) gradient of wte in turn, in the same memory (for
    GPT-2, 154 MB once instead of twice)."""

    def __init__(self, params, grads, ws, ops=ops):
        self.wte, self.wpe = params["transformer.wte.weight"], params["transformer.wpe.weight"]
        self.dwte, self.dwpe = grads["transformer.wte.weight"], grads["transformer.wpe.weight"]
        self.ws, self.ops = ws, ops

    def forward(self, idx, pos=0):
        """pos: position of idx[:, 0] (non-zero when continuing from a KV cache)."""
        out, self.cache = ops.embedding_forward(idx, self.wte, self.wpe[pos:], self.ws)
        return out

    def backward(self, dout):
        dwte, dwpe = self.ops.embedding_backward(dout, self.cache, self.ws)
        self.dwte += dwte
        self.dwpe += dwpe


class TiedHead:
    """logits = x @ wte.T, sharing the token embedding; its gradient adds into dwte.
    The logits are a new array each time (the model returns them to the caller)."""

    def __init__(self, params, grads, ws):
        self.wte, self.dwte = params["transformer.wte.weight"], grads["transformer.wte.weight"]
        self.ws = ws  # the embedding's (see Embedding)

    def forward(self, x):
        out, self.cache = ops.head_forward(x, self.wte)
        return out

    def backward(self, dout):
        dx, dwte = ops.head_backward(dout, self.cache, self.ws)
        self.dwte += dwte
        return dx
