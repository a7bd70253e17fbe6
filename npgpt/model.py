"""GPTConfig and the GPT model: GPT-2's layout, forward and hand-written backward.

    idx (B,T) -> wte[idx] + wpe[:T] -> dropout
              -> n_layer x [x + attn(ln_1(x)); x + mlp(ln_2(x))]
              -> ln_f -> logits = x @ wte.T (B,T,V) -> cross-entropy with targets
"""
import json
from collections import defaultdict
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import kernels
from .arrays import Workspace, sum_dtype
from .sampling import check_sampling_args, sample_next
from .backend import RandomStream, array_module, get_xp, resolve_device, to_numpy
from .decode import KVCache
from .layers import Block, Dropout, Embedding, LayerNorm, TiedHead
from .params import FlatDict, flat_size, gpt2_param_shapes, init_gpt2

DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int          # V: number of distinct tokens
    block_size: int          # longest context the model sees (rows of wpe)
    n_layer: int             # transformer blocks
    n_head: int              # attention heads per block (nh)
    n_embd: int              # embedding width C; head size hs = C // nh
    dropout: float = 0.0     # dropout probability used in training mode

    def __post_init__(self):
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"GPTConfig.{f} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by "
                             f"n_head ({self.n_head}); try n_head = "
                             f"{_divisors_hint(self.n_embd)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**data)


def _divisors_hint(n):
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)


class GPT:
    """A GPT-2-layout decoder. `params` / `grads`: {Hugging Face name: array view}."""

    def __init__(self, config, seed=0, dtype="float32", device="cpu", init=True,
                 reuse_memory=False):
        """init=False leaves the parameters at zero, for a caller that loads them (it
        skips drawing random weights: ~1.5 s for GPT-2 124M). reuse_memory=True is the
        training path's: layers write into memory they reuse from call to call (faster;
        an array a layer returned is overwritten by its next call); the default gives
        every call new arrays and never changes its inputs (see layers.py)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.config, self.dtype = config, np.dtype(dtype)
        self.device, self._reuse = resolve_device(device), bool(reuse_memory)
        xp = array_module(self.device)
        init_seed, dropout_seed = np.random.SeedSequence(seed).spawn(2)
        shapes = gpt2_param_shapes(config)
        if init:
            flat = xp.asarray(init_gpt2(shapes, config.n_layer, init_seed, self.dtype))
        else:
            flat = xp.zeros(flat_size(shapes), dtype=self.dtype)
        # the model's own dropout randomness: a JSON state, the same on either device
        self._build(FlatDict(flat, shapes),
                    RandomStream(xp, dropout_seed.generate_state(2).tolist()))

    def _build(self, params, rng):
        """Gradients, layers and workspaces around `params` (a FlatDict)."""
        xp, config = get_xp(params.flat), self.config
        self.params, self.rng = params, rng
        # float16 parameters get float32 gradients: the tied head's and the embedding's
        # parts, the workers' and the micro-batches' are added up in float32 (mixed.py)
        self.grads = FlatDict(xp.zeros(params.flat.size, dtype=sum_dtype(self.dtype)),
                              gpt2_param_shapes(config))
        p, g = self.params, self.grads
        self.ops = kernels.fused_ops(xp, self.dtype)  # ops.py, or fused kernels on a GPU
        reuse = self._reuse
        scratch = defaultdict(lambda: Workspace(reuse))  # shared by every block (layers.py)
        vocab_ws = scratch["vocab"]  # the (V, C) scratch of the embedding and the tied head
        self.embedding = Embedding(p, g, vocab_ws, ops=self.ops)
        self.drop = Dropout(config.dropout, self.rng)
        self.blocks = [Block(p, g, f"transformer.h.{i}", config, self.rng, scratch, self.ops)
                       for i in range(config.n_layer)]
        self.ln_f = LayerNorm(p, g, "transformer.ln_f", scratch=scratch["ln_f"], ops=self.ops)
        self.head = TiedHead(p, g, vocab_ws)
        self._loss_ws, self._loss_cache = scratch["loss"], None

    def replica(self):
        """A model that shares this one's parameters (the same buffer: an update of either
        is an update of both) with gradients, activations, workspaces and a dropout stream
        of its own: a data-parallel worker (see parallel.py)."""
        twin = object.__new__(GPT)
        twin.config, twin.dtype, twin.device = self.config, self.dtype, self.device
        twin._reuse = self._reuse
        twin._build(self.params, RandomStream(self.xp, self.rng.key))
        return twin

    @property
    def xp(self):
        return get_xp(self.params.flat)

    @property
    def reuse_memory(self):
        """Whether the layers reuse their memory (see __init__)."""
        return self._reuse

    @reuse_memory.setter
    def reuse_memory(self, reuse):
        """Rebuild the layers for the other memory policy (the gradients restart at zero:
        set it before training, as the Trainer does for a model it loaded)."""
        if bool(reuse) != self._reuse:
            self._reuse = bool(reuse)
            self._build(self.params, self.rng)

    def num_params(self):
        return int(self.params.flat.size)

    # ------------------------------------------------------------------ forward
    def _check_idx(self, ids, name="idx", ignore_index=None):
        """ids as an integer (B,T) array on the model's device.

        Ids given on the host (a list or a NumPy array) are range-checked before they move;
        ids already on the GPU are not: reading them back would make the host wait for the
        device, which a training step must never do (and CuPy's gathers wrap an id out of
        range instead of raising)."""
        xp = self.xp
        on_device = xp is not np and isinstance(ids, xp.ndarray)
        if not on_device:
            ids = to_numpy(ids)  # a list, a NumPy array, or CuPy's for a CPU model
        if ids.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T), got shape {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if not on_device and ids.size:
            V, low = self.config.vocab_size, 0 if ignore_index is None else ignore_index
            lo, hi = int(ids.min()), int(ids.max())
            if lo < low or hi >= V:
                allowed = f"[0, {V})" + ("" if ignore_index is None else f" or {ignore_index}")
                raise ValueError(f"token ids must lie in {allowed}, got {name} ids in [{lo}, {hi}]")
            if ignore_index is not None and not (ids != ignore_index).any():
                raise ValueError(f"every target is ignore_index ({ignore_index}): there is "
                                 "nothing to learn from")
        return xp.asarray(ids)

    def forward(self, idx, targets=None, train=False):
        """logits (B,T,V) and the mean cross-entropy loss over targets != -1, or None.

        As in PyTorch the loss stays on the model's device (a 0-d array or NumPy scalar):
        float(loss) reads it, which on a GPU waits for the device to finish."""
        idx = self._check_idx(idx)
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size "
                             f"{self.config.block_size}; crop the input to the last "
                             f"{self.config.block_size} tokens")
        if targets is not None:
            targets = self._check_idx(targets, "targets", ignore_index=-1)
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape "
                                 f"{tuple(idx.shape)}")
        if train:
            self.rng.next_pass()  # this pass's dropout masks (see backend.RandomStream)
        x = self.drop.forward(self.embedding.forward(idx), train)  # (B,T,C)
        for block in self.blocks:
            x = block.forward(x, train)
        logits = self.head.forward(self.ln_f.forward(x))  # (B,T,V)
        self._loss_cache = None
        if targets is None:
            return logits, None
        loss, self._loss_cache = self.ops.cross_entropy_forward(logits, targets, ws=self._loss_ws)
        return logits, loss

    # ----------------------------------------------------------------- backward
    def zero_grad(self):
        self.grads.flat.fill(0)

    def backward(self, accumulate=False, dloss=1.0):
        """Gradients of the last forward's loss into `self.grads` (returned).

        accumulate=False starts from zero; accumulate=True adds to what is there (for
        gradient accumulation over micro-batches). dloss: the gradient of the objective
        with respect to this loss (a worker's share of a batch weighs its mean loss)."""
        if self._loss_cache is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        if not accumulate:
            self.zero_grad()
        (dlogits,) = self.ops.cross_entropy_backward(dloss, self._loss_cache, self._loss_ws)
        dx = self.ln_f.backward(self.head.backward(dlogits))
        for block in reversed(self.blocks):
            dx = block.backward(dx)
        self.embedding.backward(self.drop.backward(dx))
        self._loss_cache = None  # one backward per forward
        return self.grads

    # ------------------------------------------------------------------ helpers
    def state_dict(self):
        """{name: NumPy array} copies of the parameters (for saving/exporting)."""
        return {name: to_numpy(p) for name, p in self.params.items()}

    def load_state_dict(self, state):
        """Copy arrays (NumPy or CuPy) into the parameters, checking names and shapes."""
        missing = [n for n in self.params if n not in state]
        unexpected = [n for n in state if n not in self.params]
        if missing or unexpected:
            raise ValueError(f"state does not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name, p in self.params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} does not match "
                                 f"the model's {tuple(p.shape)}")
            p[...] = self.xp.asarray(state[name], dtype=p.dtype)

    # --------------------------------------------------------------- generation
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 seed=None, use_cache=True, seeds=None, stop_token=None):
        """(B, T + max_new_tokens) ids: idx followed by sampled continuations.

        temperature 0 is greedy; top_k / top_p restrict sampling to the most likely
        tokens; seed fixes the sampling generator. seeds: one seed per row instead (row
        b samples as it would alone with seed=seeds[b]). stop_token: a row that samples
        it is finished and padded with it (GPT-2's <|endoftext|>, as transformers pads
        with it); the output is shorter when every row has finished. use_cache=False
        recomputes the whole (cropped) context for every token: slower, same tokens."""
        idx = self._check_idx(idx)
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p,
                                        seed, use_cache, seeds, stop_token))
        xp = self.xp
        new = xp.stack(new, axis=1) if new else xp.zeros((idx.shape[0], 0), dtype=idx.dtype)
        return xp.concatenate([idx, new.astype(idx.dtype)], axis=1)

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        seed=None, use_cache=True, seeds=None, stop_token=None):
        """Yield each new token as a (B,) array as soon as it is sampled.

        With the KV cache each token costs one forward over one position. The model sees
        at most block_size tokens (older ones are cropped, as in nanoGPT); once the
        context is longer than that, every position embedding shifts with each new
        token, so the window is recomputed for each token from then on. seeds and
        stop_token: as in generate (a finished row yields stop_token; the stream ends
        when every row has finished)."""
        check_sampling_args(temperature, top_k, top_p)
        idx = self._check_idx(idx)
        if idx.shape[1] == 0:
            raise ValueError("generation needs a prompt of at least one token")
        xp, bs = self.xp, self.config.block_size
        if seeds is None:
            rng = np.random.default_rng(seed)
        elif seed is not None or len(seeds) != idx.shape[0]:
            raise ValueError(f"pass seed or seeds, not both; seeds needs one seed per row "
                             f"({idx.shape[0]}), got {len(seeds)}")
        else:  # a generator per row: a row's draws do not depend on the others
            rng = [np.random.default_rng(s) for s in seeds]
        done = np.zeros(idx.shape[0], dtype=bool)  # rows that sampled stop_token
        context = idx
        cache = None
        for _ in range(max_new_tokens):
            window = context[:, -bs:]
            if not use_cache or context.shape[1] > bs:
                cache = None
                logits = self._forward_logits(window)  # (B,V) at the last position
            elif cache is None:  # prefill the cache with the whole prompt
                cache = KVCache(self, idx.shape[0])
                logits = self._forward_logits(window, cache)
            elif self.dtype == np.float16:  # one position: float16's rules are the layers'
                logits = self._forward_logits(window[:, -1:], cache)
            else:  # one position through the cached keys and values (decode.py)
                logits = cache.step(window[:, -1])
            token = sample_next(logits, rng, temperature, top_k, top_p)  # (B,) on the host
            if stop_token is not None:
                token = np.where(done, stop_token, token)  # a finished row stays finished
                done |= token == stop_token
            token = xp.asarray(token)
            context = xp.concatenate([context, token[:, None].astype(context.dtype)], axis=1)
            yield token
            if done.all():
                return

    def _forward_logits(self, idx, cache=None):
        """Logits (B,V) of the last position; with a cache, idx continues cache.pos."""
        pos = 0 if cache is None else cache.pos
        self._loss_cache = None  # the layers' caches now hold this pass: no backward after it
        x = self.embedding.forward(idx, pos)  # (B,Tn,C)
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else (cache.k[i], cache.v[i], pos)
            x = block.forward(x, False, kv)
        if cache is not None:
            cache.pos += idx.shape[1]
        return self.head.forward(self.ln_f.forward(x[:, -1:]))[:, 0]  # (B,1,V) -> (B,V)

