"""decode.py: the one-position step that sampling runs against the KV cache, checked
against the layers' forward over the whole context."""
import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.decode import KVCache

CFG = GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=2, n_embd=16)


def model_with_large_weights(dtype, seed=0, scale=0.3):
    """A model whose weights are larger than GPT-2's init, so that every part of the step
    (each bias, LayerNorm's weights, the attention over many keys) moves the logits."""
    m, rng = GPT(CFG, seed=seed, dtype=dtype), np.random.default_rng(seed)
    for p in m.params.values():
        p[...] = scale * rng.standard_normal(p.shape)
    return m


@pytest.mark.parametrize("dtype, rtol, atol", [("float64", 1e-11, 1e-11),
                                               ("float32", 2e-5, 2e-5)])
@pytest.mark.parametrize("B", [1, 3])
def test_each_step_gives_the_full_forwards_last_logits(dtype, rtol, atol, B):
    """Prefill 3 positions through the layers, then step one position at a time up to the
    block size: every step's logits are those of the forward over the whole context."""
    m = model_with_large_weights(dtype)
    idx = np.random.default_rng(1).integers(0, CFG.vocab_size, (B, CFG.block_size))
    cache = KVCache(m, B)
    m._forward_logits(idx[:, :3], cache)
    for t in range(3, CFG.block_size):
        logits = cache.step(idx[:, t])
        assert logits.dtype == m.dtype and logits.shape == (B, CFG.vocab_size)
        assert cache.pos == t + 1
        np.testing.assert_allclose(logits, m.forward(idx[:, :t + 1])[0][:, -1],
                                   rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.step(idx[:, 0])


def test_the_step_starts_from_an_empty_cache_and_returns_a_new_array():
    m = model_with_large_weights("float64", seed=2)
    idx = np.array([[4, 8, 15, 16, 23]])
    cache = KVCache(m, 1)
    steps = [cache.step(idx[:, t]) for t in range(idx.shape[1])]
    assert not any(np.shares_memory(a, b) for a in steps for b in steps if a is not b)
    for t, logits in enumerate(steps):
        np.testing.assert_allclose(logits, m.forward(idx[:, :t + 1])[0][:, -1], rtol=1e-11)


def test_scores_past_exps_range_still_give_the_softmax():
    """Attention scores in the hundreds (exp overflows float32 past 88: without the row
    max the step's logits are NaN here): the step subtracts each row's max, so its
    logits stay finite and equal the forward's."""
    m = model_with_large_weights("float32", seed=3, scale=0.3)
    for i in range(CFG.n_layer):  # queries and keys 30x larger: scores 900x
        m.params[f"transformer.h.{i}.attn.c_attn.weight"][:, :2 * CFG.n_embd] *= 30.0
    idx = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 8))
    cache = KVCache(m, 2)
    m._forward_logits(idx[:, :2], cache)
    for t in range(2, 8):
        logits = cache.step(idx[:, t])
        assert np.isfinite(logits).all()
        np.testing.assert_allclose(logits, m.forward(idx[:, :t + 1])[0][:, -1],
                                   rtol=1e-4, atol=1e-4)


def test_greedy_tokens_with_the_step_equal_recomputation():
    """generate's cached loop (the prefill, then the step) picks the tokens that the
    forward over the whole window picks, past the block size too."""
    m = model_with_large_weights("float64", seed=5)
    idx = np.random.default_rng(6).integers(0, CFG.vocab_size, (2, 4))
    cached = m.generate(idx, 20, temperature=0.0)
    np.testing.assert_array_equal(cached, m.generate(idx, 20, temperature=0.0,
                                                     use_cache=False))
    assert len(set(cached[0, 4:].tolist())) > 2  # (a constant stream would hide a bad step)


def test_a_float16_model_samples_through_its_layers():
    """float16's rules (float32 sums and element-wise math) live in the layers' ops, so a
    float16 model's steps go through them: its cached tokens equal recomputation's."""
    m = GPT(CFG, seed=7, dtype="float16")
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(m.generate(idx, 12, temperature=0.0),
                                  m.generate(idx, 12, temperature=0.0, use_cache=False))
