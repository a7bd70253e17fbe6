"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p).

Sampling runs on the host with a NumPy generator, so a given seed picks the same
tokens whichever device computed the logits.

reference.next_token_probs / reference.sample_next are the textbook versions (a full
partition for top-k, a full argsort for top-p, a cumulative sum over the whole
vocabulary). These return the same bits, and so the same tokens for a seed, but look
at the whole vocabulary only in cheap element-wise passes: each expensive step (a
partition, a sort, a cumulative sum, a chain of V dependent additions) runs on the few
tokens that can matter. At GPT-2's V = 50257 that takes a token's top-p cost from a
third of a forward pass to about a millisecond.
"""
import numpy as np

from .backend import to_numpy

SAMPLE_SIZE = 1024                      # top-k: about this many logits pick a threshold
PROB_RATIOS = (2.0 ** -12, 2.0 ** -24)  # top-p: candidates are probabilities >= ratio * max


def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def kth_largest(row, k):
    """np.partition(row, -k)[-k] (row 1-D float64), partitioning only the candidates.

    If at least k entries are >= some threshold, the k largest are all among them, so
    their k-th largest is the row's, whatever the threshold. The threshold is read off
    an evenly strided sample of about SAMPLE_SIZE logits, at the rank that leaves a few
    strides' worth more than k above it (~k + 4 * V / SAMPLE_SIZE candidates, peaked or
    flat), and lowered once if too few pass; failing that, the whole row."""
    stride = max(1, len(row) // SAMPLE_SIZE)
    sample = row[::stride]                          # (~SAMPLE_SIZE,)
    j = k // stride + 4                             # expected ~j * stride entries >= it
    for rank in (j, 4 * j):
        if rank >= len(sample):
            break
        threshold = np.partition(sample, -rank)[-rank]   # rank-th largest of the sample
        candidates = row[row >= threshold]
        if len(candidates) >= k:
            return np.partition(candidates, -k)[-k]
    return np.partition(row, -k)[-k]  # a small row, a large k, or NaNs: the whole row


def nucleus(row, top_p):
    """Boolean keep-mask of the top-p set of one row of probabilities (1-D float64):
    in order of probability (ties by index), a token is kept while the mass of the
    tokens before it is < top_p, as reference.next_token_probs computes it.

    The order and the running mass are computed on a candidate set: every token with
    p >= threshold, ties included, taken in index order, so that a stable sort of it
    is the first part of the stable sort of the whole row and its cumulative sum is
    bit for bit the first part of the whole one. Once the candidates hold top_p of
    the mass, every other token has at least top_p before it: it is dropped, and the
    rest of the vocabulary never needs sorting. Otherwise a lower threshold is tried,
    and at the end the whole row (threshold -inf) is sorted."""
    best = row.max()
    for threshold in [best * r for r in PROB_RATIOS] + [-np.inf]:  # -inf: every token
        candidates = np.flatnonzero(row >= threshold)               # index order
        order = candidates[np.argsort(-row[candidates], kind="stable")]
        sorted_p = row[order]                                      # most likely first
        mass = np.cumsum(sorted_p)
        if mass[-1] >= top_p:
            break
    keep = np.zeros(row.shape, dtype=bool)
    keep[order] = (mass - sorted_p) < top_p                        # mass before each token
    return keep


def row_probs(row, temperature=1.0, top_k=None, top_p=None):
    """next_token_probs of one row of logits (V,): float64 (V,) probabilities.

    The rows of a batch go through this one at a time: a row's float64 arrays (400 KB
    each at GPT-2's V = 50257) stay in a core's L2 cache over the ten element-wise
    passes, where those of 8 rows at once (3.2 MB) go to memory on every pass: on a
    2-core AMD EPYC, 8 rows (temperature 0.8, top-k 40, top-p 0.9) took 8.6 ms as one
    (8,V) array, 4.3 ms row by row, and 2.5 ms with exp skipping the -inf entries and
    sample_next's nonzero of a bool array."""
    z = np.asarray(row, dtype=np.float64) / temperature  # (V,)
    if top_k is not None and top_k < z.shape[-1]:
        z = np.where(z < kth_largest(z, top_k), -np.inf, z)
    z = z - z.max()
    probs = np.zeros_like(z)  # exp(-inf) = 0, written without calling exp: NumPy's SIMD exp
    np.exp(z, out=probs, where=z != -np.inf)  # leaves its fast path for -inf (4x slower)
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        probs = np.where(nucleus(probs, top_p), probs, 0.0)
        probs /= probs.sum()
    return probs


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """(B,V) float64 probabilities after temperature, top-k and top-p filtering.

    Excluded tokens get probability exactly 0. top_p keeps the smallest set of most
    likely tokens whose probability sums to at least top_p (always at least one).
    The same bits as reference.next_token_probs."""
    return np.stack([row_probs(row, temperature, top_k, top_p) for row in logits])  # (B,V)


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """(B,) next token ids for (B,V) logits (NumPy or CuPy); temperature 0 is greedy.

    rng: one NumPy Generator for every row, or a list of B of them, one per row (a row
    then draws exactly what it would draw alone: a batch of samples is the samples).
    Inverse-CDF sampling, one uniform draw u per row: the first token whose cumulative
    probability reaches u times the row's total. The cumulative sum runs over the
    tokens with a non-zero probability only (adding the others' exact zeros changes no
    bit), and the crossing is found by bisection. Row by row, as row_probs."""
    logits = to_numpy(logits)  # the one read from the GPU per token
    if temperature == 0:
        return logits.argmax(axis=-1)
    if isinstance(rng, np.random.Generator):
        u = rng.random((logits.shape[0], 1))                   # (B,1)
    else:
        u = np.array([[row_rng.random()] for row_rng in rng])  # (B,1), row b from rng[b]
    ids = np.empty(logits.shape[0], dtype=np.int64)
    for b, logit_row in enumerate(logits):
        row = row_probs(logit_row, temperature, top_k, top_p)  # (V,)
        # the tokens that can be drawn (None: all of them, no index array needed);
        # flatnonzero of a bool array: 15x faster than of the float64 row itself
        drawable = row != 0
        support = None if drawable.all() else np.flatnonzero(drawable)
        cdf = np.cumsum(row if support is None else row[support])
        j = np.searchsorted(cdf, u[b, 0] * cdf[-1], side="left")
        ids[b] = j if support is None else support[j]
    return ids
