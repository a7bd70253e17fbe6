"""Score a model on a whole text: loss, perplexity, bits per character and per byte.

Sliding windows, as Hugging Face's "Perplexity of fixed-length models" recipe: a window
of block_size tokens moves by `stride`; each window scores only the targets the previous
window did not reach, so every scored token sees at least block_size - stride tokens of
context (all the tokens before it, near the start of the file).

    ids      t0 t1 t2 t3 t4 t5 t6 t7 t8 t9        block_size 4, stride 2
    window 1 t0 t1 t2 t3                          scores t1 t2 t3 (t0 has no context)
    window 2       t2 t3 t4 t5                    scores t4 t5
    window 3             t4 t5 t6 t7              scores t6 t7
    window 4                   t6 t7 t8 t9        scores t8 t9

So the file's first token is never scored; with stride < block_size every other token
is scored exactly once; with stride = block_size the windows do not overlap and each
window's first token has no context in it, so it goes unscored.

    loss = (1/N) sum over the N scored tokens of -ln p(token | the tokens before it)
    perplexity    = exp(loss)
    bits per char = N loss / ln 2 / (characters those N tokens decode to)
    bits per byte = N loss / ln 2 / (UTF-8 bytes those N tokens decode to)

The last two compare models whose tokens differ (char, BPE, GPT-2): a token that holds
part of a multi-byte character counts its bytes, and the character once, in the token
with the character's first byte.

Scoring needs no backward, so `hidden_states` runs GPT.forward's ops and drops each
cache as soon as the op returns (a layer keeps its cache for the backward: n_layer
blocks' activations, several GB for GPT-2 124M at batch 8); attention runs a block of
queries at a time against the keys before them, skipping the masked half of the scores;
and only the scored positions go through the final LayerNorm, the head and the
cross-entropy, a few rows at a time: a full (8, 1024, 50257) float32 logits array would
take 1.6 GB alone.
"""
import math
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from . import ops
from .backend import get_xp
from .errors import NpgptError

LOGIT_ELEMENTS = 1 << 22  # rows of logits per chunk: this many floats (16 MB in float32)
QUERY_BLOCK = 128         # attention: queries per block (causal_attention)
SCORE_ELEMENTS = 1 << 21  # attention: window rows per block so its scores hold this many


@dataclass
class Evaluation:
    """What `evaluate` measured. chars and bytes are None when no tokenizer was given."""
    tokens: int                 # tokens scored
    nats: float                 # their total -ln p, in nats
    chars: int = None           # characters the scored tokens decode to
    bytes: int = None           # UTF-8 bytes the scored tokens decode to
    windows: int = 0            # windows of at most block_size tokens
    stride: int = 0
    block_size: int = 0

    @property
    def loss(self):
        """Mean nats per scored token."""
        return self.nats / self.tokens

    @property
    def perplexity(self):
        return math.exp(self.loss)

    @property
    def bits_per_char(self):
        return None if not self.chars else self.nats / math.log(2) / self.chars

    @property
    def bits_per_byte(self):
        return None if not self.bytes else self.nats / math.log(2) / self.bytes

    def as_dict(self):
        return {**asdict(self), "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_char": self.bits_per_char, "bits_per_byte": self.bits_per_byte}


def windows(n_tokens, block_size, stride):
    """[(begin, end, first)] of Hugging Face's recipe: a window holds ids[begin:end] and
    scores the targets ids[first:end], each predicted from the window's tokens before it.
    first = the previous window's end, or begin + 1 where that is later (a window's own
    first token has nothing before it in the window)."""
    out, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        out.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return out


def check_stride(stride, block_size):
    """stride itself, if 1 <= stride <= block_size, else an NpgptError saying so."""
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or \
            not 1 <= stride <= block_size:
        raise NpgptError(f"the stride must be an integer from 1 to the block size "
                         f"({block_size}), got {stride!r}: a window of block_size tokens moves "
                         "by it, so 0 or less never moves and more would skip tokens")
    return int(stride)


def hidden_states(model, idx):
    """x (B,T,C) that enters ln_f: GPT.forward's ops in its order (Block.forward: x +
    attn(ln_1(x)), then + mlp(ln_2(x))), without dropout, each op's cache dropped as it
    returns. Memory: one block's activations at a time, not the n_layer blocks' that a
    forward keeps for its backward."""
    p, nh, fused = model.params, model.config.n_head, model.ops  # fused: LayerNorm, GELU

    def linear(x, name):
        return ops.linear_forward(x, p[name + ".weight"], p[name + ".bias"])[0]

    def layernorm(x, name):
        return fused.layernorm_forward(x, p[name + ".weight"], p[name + ".bias"])[0]

    x, _ = ops.embedding_forward(idx, p["transformer.wte.weight"], p["transformer.wpe.weight"])
    for i in range(model.config.n_layer):
        h = f"transformer.h.{i}"
        qkv = linear(layernorm(x, h + ".ln_1"), h + ".attn.c_attn")  # (B,T,3C)
        x += linear(causal_attention(qkv, nh), h + ".attn.c_proj")
        del qkv  # (B,T,3C) freed before the MLP's (B,T,4C) arrays exist
        a = fused.gelu_forward(linear(layernorm(x, h + ".ln_2"), h + ".mlp.c_fc"))[0]  # (B,T,4C)
        x += linear(a, h + ".mlp.c_proj")
    return x


def causal_attention(qkv, n_head):
    """attention_forward's y (B,T,C) from qkv (B,T,3C), QUERY_BLOCK queries at a time
    against the keys up to them (ops.attention_with_cache, as sampling's prefill): the
    masked upper triangle of the (T,T) scores is never computed (half the products), and
    a block's scores (rows,nh,QUERY_BLOCK,<=T) stay small (GPT-2: 6 MB, not 400 MB)."""
    xp = get_xp(qkv)
    B, T, C3 = qkv.shape
    Tq, C = min(T, QUERY_BLOCK), C3 // 3
    rows = max(1, SCORE_ELEMENTS // (n_head * Tq * T))  # window rows per block
    y = xp.empty((B, T, C), dtype=qkv.dtype)
    k = xp.empty((min(rows, B), n_head, T, C // n_head), dtype=qkv.dtype)  # (rows,nh,T,hs)
    v = xp.empty_like(k)  # the keys and values so far, filled block by block
    for r in range(0, B, rows):
        n = min(rows, B - r)
        for s in range(0, T, Tq):
            y[r:r + n, s:s + Tq] = ops.attention_with_cache(qkv[r:r + n, s:s + Tq], n_head,
                                                            k[:n], v[:n], s)
    return y


def score_rows(model, x, targets):
    """Total -ln p(targets) in nats (a Python float) of the rows x (N,C) entering ln_f,
    targets (N,): ln_f, the tied head and cross_entropy_forward, a few rows at a time."""
    p, xp = model.params, model.xp
    rows = max(1, LOGIT_ELEMENTS // model.config.vocab_size)
    total = 0.0
    for s in range(0, x.shape[0], rows):
        h, _ = model.ops.layernorm_forward(x[s:s + rows], p["transformer.ln_f.weight"],
                                           p["transformer.ln_f.bias"])
        logits, _ = ops.head_forward(h, p["transformer.wte.weight"])  # (rows, V)
        loss, _ = ops.cross_entropy_forward(logits, xp.asarray(targets[s:s + rows]))
        total += float(loss) * logits.shape[0]  # the mean back to a sum
    return total


def evaluate(model, ids, stride=None, batch_size=8, tokenizer=None, progress=None):
    """An Evaluation of `model` on the token ids `ids` (1-D), with windows of the model's
    block_size moved by `stride` (default half the block size) and scored `batch_size`
    windows at a time. With `tokenizer`, also the characters and bytes the scored tokens
    decode to (bits per char and per byte). progress(n) is called with the number of
    tokens each batch scored."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    T = model.config.block_size
    stride = check_stride(max(1, T // 2) if stride is None else stride, T)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or \
            batch_size < 1:
        raise NpgptError(f"the batch size must be a positive integer, got {batch_size!r}")
    if len(ids) < 2:
        raise NpgptError(f"the text is {len(ids)} token(s) long; scoring needs at least two "
                         "(the first token is never scored: nothing comes before it)")
    if ids.min() < 0 or ids.max() >= model.config.vocab_size:
        raise NpgptError(f"token ids must lie in [0, {model.config.vocab_size}), got ids in "
                         f"[{ids.min()}, {ids.max()}]: the text was encoded for another model")
    spans = windows(len(ids), T, stride)
    scored = np.zeros(len(ids), dtype=bool)  # which tokens were scored (for chars, bytes)
    nats, xp = 0.0, model.xp
    for batch in batches(spans, batch_size):
        idx = xp.asarray(np.stack([ids[b:e] for b, e, _ in batch]))  # (B,L)
        x = hidden_states(model, idx)                                 # (B,L,C)
        # position t predicts token t + 1: the targets ids[first:end] are at first-1-begin..
        x = xp.concatenate([x[i, f - 1 - b:e - 1 - b] for i, (b, e, f) in enumerate(batch)])
        targets = np.concatenate([ids[f:e] for b, e, f in batch])    # (N,) N = rows of x
        nats += score_rows(model, x, targets)
        for b, e, f in batch:
            scored[f:e] = True
        if progress is not None:
            progress(len(targets))
    if not scored.any():  # block_size 1 with stride 1: every window is its own first token
        raise NpgptError("no token was scored: with a block size of 1 no window holds "
                         "context; score a model with a larger block size")
    result = Evaluation(tokens=int(scored.sum()), nats=nats, windows=len(spans),
                        stride=stride, block_size=T)
    if tokenizer is not None:
        result.chars, result.bytes = decoded_size(tokenizer, ids[scored])
    return result


def batches(spans, batch_size):
    """The windows in groups of at most batch_size of equal length (only the last window
    can be shorter than block_size)."""
    batch = []
    for span in spans:
        if batch and (len(batch) == batch_size or
                      span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def decoded_size(tokenizer, ids):
    """(characters, UTF-8 bytes) that the tokens `ids` decode to, token by token: a
    character is counted in the token that holds its first byte (every UTF-8 byte that
    is not a continuation byte 10xxxxxx starts a character)."""
    ids = np.asarray(ids, dtype=np.int64)
    vocab, counts = np.unique(ids, return_counts=True)
    chars = nbytes = 0
    for token, n in zip(vocab.tolist(), counts.tolist()):
        data = token_bytes(tokenizer, token)
        nbytes += n * len(data)
        chars += n * sum(1 for b in data if b & 0xC0 != 0x80)
    return chars, nbytes


def token_bytes(tokenizer, token):
    """The UTF-8 bytes of one token (byte-level BPE tokens may hold part of a character)."""
    if tokenizer.name != "char":  # byte-level BPE: "bpe", "gpt2"
        return tokenizer.decode_bytes([token])
    return tokenizer.decode([token]).encode("utf-8", "surrogatepass")  # "char"


def encode_text(tokenizer, text, skip_unknown=False):
    """(ids as an int64 array, characters dropped). A char tokenizer cannot encode a
    character its corpus lacked: that is an NpgptError saying how many and which, unless
    skip_unknown, which drops them (the text closes up around them). BPE tokenizers
    encode any text."""
    if tokenizer.name != "char":  # byte-level BPE ("bpe", "gpt2") encodes any text
        return np.asarray(tokenizer.encode(text), dtype=np.int64), 0
    unseen = set(text) - set(tokenizer.chars)
    if not unseen:
        return tokenizer.encode_array(text), 0
    counts = Counter(text)
    dropped = sum(counts[c] for c in unseen)
    if not skip_unknown:
        first = sorted(unseen, key=text.index)  # in the order they first appear
        shown = ", ".join(repr(c) for c in first[:10]) + (" ..." if len(first) > 10 else "")
        raise NpgptError(f"the text holds {dropped} character(s), {len(unseen)} distinct, "
                         f"that this char-level model never saw in training: {shown}. Drop "
                         "them with --skip-unknown (skip_unknown=True), or score a model "
                         "with a BPE tokenizer, which encodes any text")
    text = text.translate({ord(c): None for c in unseen})  # the text closes up
    return tokenizer.encode_array(text), dropped
