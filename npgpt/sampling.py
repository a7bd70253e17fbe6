"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p).

Sampling runs on the host with a NumPy generator, so a given seed picks the same
tokens whichever device computed the logits.
"""
import numpy as np

from .backend import to_numpy


def check_sampling_args(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """(B,V) float64 probabilities after temperature, top-k and top-p filtering.

    Excluded tokens get probability exactly 0. top_p keeps the smallest set of most
    likely tokens whose probability sums to at least top_p (always at least one)."""
    z = np.asarray(logits, dtype=np.float64) / temperature  # (B,V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]  # k-th largest per row
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")      # most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p          # mass of the better tokens
        keep_sorted = before < top_p                             # the first token always stays
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """(B,) next token ids for (B,V) logits (NumPy or CuPy); temperature 0 is greedy."""
    logits = to_numpy(logits)  # the one read from the GPU per token
    if temperature == 0:
        return logits.argmax(axis=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    # inverse-CDF sampling: one uniform draw per row
    u = rng.random((probs.shape[0], 1))
    cdf = np.cumsum(probs, axis=-1)
    ids = (cdf < u * cdf[:, -1:]).sum(axis=-1)
    return np.minimum(ids, probs.shape[-1] - 1)
