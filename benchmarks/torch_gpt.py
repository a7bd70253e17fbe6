"""The PyTorch eager reference for the benchmarks: npgpt's architecture in nanoGPT's style.

GPT-2 layout (pre-LayerNorm blocks, fused qkv, tanh-GELU MLP, tied output head),
built from an npgpt model's weights so both start identical. Attention uses
F.scaled_dot_product_attention(is_causal=True) (PyTorch's fastest eager CPU path)
unless manual_attention=True. nn.Linear stores weights as (out, in): npgpt's /
Hugging Face's Conv1D weights (in, out) are transposed on the way in.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, nh, manual_attention):
        super().__init__()
        self.nh, self.manual = nh, manual_attention
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        if self.manual:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, cfg, manual_attention=False):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, manual_attention)
                               for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    @classmethod
    def from_npgpt(cls, model, manual_attention=False):
        """A TorchGPT holding copies of an npgpt GPT's parameters."""
        tm = cls(model.config, manual_attention)
        src = model.state_dict()
        rename = {"attn.c_proj": "attn_proj", "mlp.c_proj": "mlp_proj", "attn.c_attn": "c_attn",
                  "mlp.c_fc": "c_fc", "transformer.": ""}
        with torch.no_grad():
            for name, value in src.items():
                tname = name
                for a, b in rename.items():
                    tname = tname.replace(a, b)
                p = tm.get_parameter(tname)
                t = torch.from_numpy(value.copy())
                p.copy_(t.T if tname.endswith("weight") and p.dim() == 2 and "wte" not in tname
                        and "wpe" not in tname else t)
        return tm

    def adamw(self, lr, betas, eps, weight_decay):
        """torch.optim.AdamW decaying only matrices, as npgpt's AdamW."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": rest, "weight_decay": 0.0}],
                                 lr=lr, betas=betas, eps=eps)
