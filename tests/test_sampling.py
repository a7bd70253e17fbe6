"""Sampling: greedy determinism, top-k / top-p exclusions, KV cache == recomputation."""
import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.sampling import next_token_probs, sample_next

CFG = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16)


def test_greedy_is_deterministic_and_is_the_argmax():
    m = GPT(CFG, seed=2)
    idx = np.array([[1, 5, 7]])
    a = m.generate(idx, 20, temperature=0)
    assert np.array_equal(a, m.generate(idx, 20, temperature=0, seed=99))
    # each greedy token is the argmax of the full forward over its context
    for t in range(3, 15):
        logits, _ = m.forward(a[:, max(0, t - CFG.block_size):t])
        assert a[0, t] == logits[0, -1].argmax()


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed():
    m = GPT(CFG, seed=2)
    idx = np.array([[1, 5, 7], [2, 2, 2]])
    a = m.generate(idx, 30, seed=1)
    assert np.array_equal(a, m.generate(idx, 30, seed=1))
    assert not np.array_equal(a, m.generate(idx, 30, seed=2))
    assert a.shape == (2, 33) and np.array_equal(a[:, :3], idx)


def test_top_k_never_picks_excluded_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50))
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    for _ in range(300):
        ids = sample_next(logits, rng, temperature=2.0, top_k=3)
        assert all(ids[b] in top3[b] for b in range(4))
    probs = next_token_probs(logits, 1.0, top_k=3)
    assert np.all((probs > 0).sum(-1) == 3)


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    probs = next_token_probs(logits, 1.0, top_p=0.75)  # 0.5 + 0.3 >= 0.75: two tokens
    np.testing.assert_allclose(probs, [[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]])
    probs = next_token_probs(logits, 1.0, top_p=0.1)   # the top token always stays
    np.testing.assert_allclose(probs, [[1.0, 0.0, 0.0, 0.0]])
    rng = np.random.default_rng(1)
    seen = {int(sample_next(logits, rng, top_p=0.75)[0]) for _ in range(300)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    rng = np.random.default_rng(3)
    counts = np.bincount([int(sample_next(logits, rng)[0]) for _ in range(4000)], minlength=3)
    np.testing.assert_allclose(counts / 4000, [0.7, 0.2, 0.1], atol=0.03)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(seed=4),
                                dict(temperature=0.7, top_k=5, seed=5),
                                dict(top_p=0.8, seed=6)])
def test_kv_cache_gives_the_same_tokens_as_recomputation(kw):
    m = GPT(CFG, seed=3)
    idx = np.array([[3, 1, 4, 1], [5, 9, 2, 6]])
    # 30 new tokens: past block_size (12), so the sliding window is exercised too
    cached = m.generate(idx, 30, use_cache=True, **kw)
    np.testing.assert_array_equal(cached, m.generate(idx, 30, use_cache=False, **kw))


def test_cached_logits_equal_full_forward_logits():
    m = GPT(CFG, seed=4, dtype="float64")
    from npgpt.decode import KVCache
    idx = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 10))
    cache = KVCache(m, 2)
    first = m._forward_logits(idx[:, :4], cache)
    np.testing.assert_allclose(first, m.forward(idx[:, :4])[0][:, -1], rtol=1e-12)
    for t in range(4, 10):
        step = m._forward_logits(idx[:, t:t + 1], cache)
        np.testing.assert_allclose(step, m.forward(idx[:, :t + 1])[0][:, -1], rtol=1e-10)


def test_bad_sampling_arguments():
    m = GPT(CFG)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(np.array([[1]]), 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(np.array([[1]]), 2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(np.array([[1]]), 2, top_p=1.5)
    with pytest.raises(ValueError, match="prompt"):
        m.generate(np.zeros((1, 0), dtype=int), 2)


def _logit_rows(rng, n, V):
    """Rows of many kinds: peaked and flat, heavy ties, -inf entries, float32 input."""
    rows = [rng.standard_normal((n, V)) * rng.uniform(0.1, 8.0, (n, 1))]
    rows.append(np.round(rng.standard_normal((n, V)) * 2))          # many exact ties
    flat = np.zeros((2, V)); flat[1, ::3] = 1.0                        # all equal / 2 levels
    rows.append(flat)
    masked = rng.standard_normal((n, V)); masked[:, ::2] = -np.inf    # half the tokens banned
    rows.append(masked)
    rows.append(rng.standard_normal((n, V)).astype(np.float32).astype(np.float64) * 4)
    return np.concatenate(rows)


@pytest.mark.parametrize("V", [7, 50, 5000])
def test_the_fast_selection_is_the_textbook_one_bit_for_bit(V):
    """sampling.py's candidate-set top-k, top-p and CDF against reference.py's full
    partition, argsort and cumulative sum: the same probabilities to the bit and the
    same tokens for the same generator, on many rows (the narrow candidate sets, the
    wider ones and the whole-row fallback are all reached)."""
    from npgpt import reference

    rng = np.random.default_rng(V)
    logits = _logit_rows(rng, 12, V)
    for kw in [dict(), dict(temperature=0.7), dict(top_k=1), dict(top_k=5),
               dict(top_k=V - 1), dict(top_p=0.5), dict(top_p=0.999999),
               dict(top_p=1e-9), dict(temperature=1.5, top_k=40, top_p=0.9),
               dict(temperature=0.3, top_p=0.95)]:
        fast = next_token_probs(logits, **{"temperature": 1.0, **kw})
        slow = reference.next_token_probs(logits, **{"temperature": 1.0, **kw})
        assert fast.dtype == np.float64
        np.testing.assert_array_equal(fast, slow, err_msg=str(kw))
        a, b = np.random.default_rng(1), np.random.default_rng(1)
        for _ in range(3):
            np.testing.assert_array_equal(sample_next(logits, a, **kw),
                                          reference.sample_next(logits, b, **kw),
                                          err_msg=str(kw))


def test_the_nucleus_falls_back_to_the_whole_row_when_the_candidates_hold_too_little():
    from npgpt.sampling import PROB_RATIOS, nucleus

    # one likely token and a long flat tail far below every candidate threshold:
    # the top-p set needs tail tokens, so the whole row is sorted
    V = 100_000
    row = np.full(V, PROB_RATIOS[-1] / 4)
    row[123] = 1.0
    row /= row.sum()
    keep = nucleus(row, 0.999)  # the top token holds 0.9985
    assert keep[123] and keep.sum() > 1000
    order = np.argsort(-row, kind="stable")
    before = np.cumsum(row[order]) - row[order]
    expected = np.zeros(V, dtype=bool)
    expected[order] = before < 0.999
    np.testing.assert_array_equal(keep, expected)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.8, top_k=5),
                                dict(temperature=1.3, top_p=0.9)])
def test_a_batch_of_seeded_rows_is_the_same_samples_drawn_one_by_one(kw):
    """seeds=: row b of one batched pass draws what it draws alone with seed=seeds[b]
    (float64, so the batched and single products agree to the last bits that matter),
    past block_size too."""
    m = GPT(CFG, seed=5, dtype="float64")
    prompt = np.array([[3, 1, 4]])
    seeds = [[7, i] for i in range(4)]
    batch = m.generate(np.repeat(prompt, 4, axis=0), 15, seeds=seeds, **kw)
    for i, s in enumerate(seeds):
        np.testing.assert_array_equal(batch[i], m.generate(prompt, 15, seed=s, **kw)[0])
    assert len({tuple(row) for row in batch}) > 1  # the rows do differ
    with pytest.raises(ValueError, match="one seed per row"):
        m.generate(np.repeat(prompt, 4, axis=0), 3, seeds=seeds[:3])


def test_a_row_that_samples_the_stop_token_is_finished_and_padded():
    m = GPT(CFG, seed=6)
    prompt = np.array([[1, 2], [1, 2], [3, 4]])
    free = m.generate(prompt, 25, seeds=[0, 1, 2])
    stop = int(free[0, 5])  # row 0's fourth new token
    out = m.generate(prompt, 25, seeds=[0, 1, 2], stop_token=stop)
    for row_free, row in zip(free, out):
        hits = np.flatnonzero(row_free[2:] == stop)
        end = 2 + (hits[0] + 1 if len(hits) else 25)  # through the first stop token
        np.testing.assert_array_equal(row[:end], row_free[:end])
        assert np.all(row[end:] == stop)
    # the stream ends as soon as every row has stopped
    alone = m.generate(prompt[:1], 25, seeds=[0], stop_token=stop)
    first = 2 + np.flatnonzero(free[0, 2:] == stop)[0]
    np.testing.assert_array_equal(alone[0], free[0, :first + 1])


def test_kth_largest_is_the_partitions_on_every_kind_of_row():
    """The sampled threshold, its lowered retry and the whole-row fallback all give
    np.partition's k-th largest: flat, peaked and tied rows, and a row whose largest
    values sit exactly at the sampled positions (so too few pass either threshold)."""
    from npgpt.sampling import SAMPLE_SIZE, kth_largest

    rng = np.random.default_rng(0)
    V = 50_000
    stride = V // SAMPLE_SIZE
    rigged = rng.standard_normal(V)
    rigged[::stride] += 100.0  # only sampled entries pass a threshold taken from the sample
    rows = [rng.standard_normal(V) * 0.01, rng.standard_normal(V) * 10,
            np.round(rng.standard_normal(V)), rigged, rng.standard_normal(300)]
    for row in rows:
        for k in (1, 2, 40, 100, 299):
            assert kth_largest(row, k) == np.partition(row, -k)[-k]
