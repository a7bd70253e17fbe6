"""The fewest NumPy calls a greedy decode step can make: GPT-2's forward over one new
position (batch 1, with a KV cache) written flat on a GPT's own parameter views, with no
layers, no caches for a backward, no workspaces, no checks and no dtype cases. It is not
part of npgpt: `generate.py --bound` times it beside the model's own greedy loop and the
matrix products alone. What it reaches bounds what a NumPy decoder can reach on the host
(issue 25); tests/test_benchmarks.py checks that it picks the model's tokens.

Each line computes what the npgpt op named in its comment computes. The softmax takes
exp(s) without the row max, as causal_softmax first tries: fine for the random weights
the benchmark runs (the model's op falls back to the row max where exp would overflow).
"""
import math
import time

import numpy as np

from npgpt.ops import _GELU_A, _GELU_K

NAMES = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
         "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
         "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


class FlatDecoder:
    """Greedy decoding of `model` (a CPU GPT) at batch 1, one position per step."""

    def __init__(self, model):
        P, c, dt = model.params, model.config, model.dtype
        self.C, self.nh, self.eps = c.n_embd, c.n_head, model.ln_f.eps  # (1e-5)
        hs = c.n_embd // c.n_head
        self.blocks = [[P[f"transformer.h.{i}.{n}"] for n in NAMES]
                       for i in range(c.n_layer)]
        self.wte, self.wpe = P["transformer.wte.weight"], P["transformer.wpe.weight"]
        self.ln_f = P["transformer.ln_f.weight"], P["transformer.ln_f.bias"]
        self.k = np.zeros((c.n_layer, c.n_head, c.block_size, hs), dt)  # (L,nh,bs,hs)
        self.v = np.zeros_like(self.k)
        self.x, self.xn = np.empty(c.n_embd, dt), np.empty(c.n_embd, dt)   # (C,)
        self.qkv, self.y = np.empty(3 * c.n_embd, dt), np.empty(c.n_embd, dt)
        self.proj, self.h = np.empty(c.n_embd, dt), np.empty(4 * c.n_embd, dt)
        self.ones = np.ones(c.block_size, dt)
        self.scale = 1.0 / math.sqrt(hs)

    def layernorm(self, w, b):
        """xn = layernorm_forward(x, w, b)"""
        xn = np.subtract(self.x, self.x.mean(), out=self.xn)
        xn *= 1.0 / math.sqrt(float(np.dot(xn, xn)) / self.C + self.eps)
        xn *= w
        xn += b
        return xn

    def step(self, token, pos):
        """The greedy token after `token` at position pos; keys and values of positions
        < pos are in the cache."""
        x, end = self.x, pos + 1
        np.add(self.wte[token], self.wpe[pos], out=x)                # embedding_forward
        for i, (w1, b1, wa, ba, wp, bp, w2, b2, wf, bf, wm, bm) in enumerate(self.blocks):
            np.matmul(self.layernorm(w1, b1), wa, out=self.qkv)     # linear_forward
            np.add(self.qkv, ba, out=self.qkv)
            q, k, v = self.qkv.reshape(3, self.nh, -1)              # (3C,) -> 3 x (nh,hs)
            self.k[i, :, pos], self.v[i, :, pos] = k, v              # attention_with_cache
            att = np.matmul((q * self.scale)[:, None, :],            # (nh,1,hs) @
                            self.k[i, :, :end].transpose(0, 2, 1))  # (nh,hs,end)
            np.exp(att, out=att)
            att /= np.matmul(att, self.ones[:end, None])            # (nh,1,end) / (nh,1,1)
            np.matmul(att, self.v[i, :, :end], out=self.y.reshape(self.nh, 1, -1))
            x += np.matmul(self.y, wp, out=self.proj)                # residual += c_proj
            x += bp
            np.matmul(self.layernorm(w2, b2), wf, out=self.h)        # linear_forward
            h = np.add(self.h, bf, out=self.h)
            g = h * h                                                # gelu_forward
            g *= _GELU_K * _GELU_A
            g += _GELU_K
            g *= h
            np.tanh(g, out=g)
            g += 1.0
            g *= h
            g *= 0.5
            x += np.matmul(g, wm, out=self.proj)                     # residual += c_proj
            x += bm
        logits = self.layernorm(*self.ln_f) @ self.wte.T             # head_forward
        return int(np.argmax(logits))

    def greedy(self, prompt, n_new):
        """(the n_new tokens after `prompt` (a list of ints), seconds per token after the
        first); the prompt goes through one position at a time."""
        for pos, token in enumerate(prompt[:-1]):
            self.step(token, pos)
        tokens, t = list(prompt), None
        for n in range(n_new):
            if n == 1:
                t = time.perf_counter()
            tokens.append(self.step(tokens[-1], len(tokens) - 1))
        return tokens[len(prompt):], (time.perf_counter() - t) / (n_new - 1)
