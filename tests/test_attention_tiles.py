"""Causal attention computed in query tiles (npgpt/attention.py): the future is never
computed, and the results are today's whole-row op's, in float64 to 1e-12, bit for bit
from one run to the next, on NumPy and on the stand-in GPU."""
import numpy as np
import pytest

import stand_in_gpu
from conftest import cut_into_blocks, use_tiles
from npgpt import GPT, GPTConfig, arrays, attention, ops, reference
from npgpt.arrays import Workspace
from npgpt.attention import query_tiles
from npgpt.backend import to_numpy
from npgpt.gradcheck import check_op

rng = np.random.default_rng(0)


def inputs(B, T, nh, hs, dropout, xp=np):
    qkv = rng.standard_normal((B, T, 3 * nh * hs))
    dy = rng.standard_normal((B, T, nh * hs))
    mask = ops.dropout_mask((B, nh, T, T), 0.3, rng, np.float64) if dropout else None
    return [None if a is None else xp.asarray(a) for a in (qkv, dy, mask)]


def test_query_tiles():
    assert query_tiles(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert query_tiles(10, 16) == [(0, 10)] == query_tiles(10, None)
    assert query_tiles(128, 64) == [(0, 64), (64, 128)]


@pytest.mark.parametrize("B,T,nh,hs,tile", [(2, 256, 2, 8, 64), (2, 37, 3, 4, 8),
                                            (1, 10, 2, 3, 3), (2, 9, 1, 4, 1), (1, 5, 2, 2, 64)])
@pytest.mark.parametrize("dropout", [False, True])
def test_tiles_equal_whole_rows_and_the_textbook_op_in_float64(B, T, nh, hs, tile, dropout):
    qkv, dy, mask = inputs(B, T, nh, hs, dropout)
    y, cache = attention.attention_forward(qkv, nh, mask, tile=tile)
    assert len(cache.tiles) == len(query_tiles(T, tile))
    (dqkv,) = attention.attention_backward(dy, cache)
    whole_y, whole_cache = attention.attention_forward(qkv, nh, mask, tile=None)
    (whole_dqkv,) = attention.attention_backward(dy, whole_cache)
    np.testing.assert_allclose(y, whole_y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dqkv, whole_dqkv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cache.att, whole_cache.att, rtol=0, atol=1e-12)
    ref_y, ref_cache = reference.attention_forward(qkv, nh, mask)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dqkv, reference.attention_backward(dy, ref_cache)[0],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout", [False, True])
def test_tiled_gradient_check(dropout):
    B, T, nh, hs = 2, 7, 2, 3
    qkv, _, mask = inputs(B, T, nh, hs, dropout)
    errors = check_op(lambda x: attention.attention_forward(x, nh, mask, tile=3),
                      attention.attention_backward, [qkv])
    assert errors and max(errors.values()) <= 1e-6, errors


def test_the_future_is_zero_and_gets_exactly_zero_gradient():
    B, T, nh, hs = 2, 12, 2, 3
    qkv, dy, _ = inputs(B, T, nh, hs, False)
    y, cache = attention.attention_forward(qkv, nh, tile=5)
    att = cache.att  # (B,nh,T,T) put together from the tiles
    assert att.shape == (B, nh, T, T)
    assert np.all(att[..., np.triu(np.ones((T, T), dtype=bool), k=1)] == 0.0)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)
    dy[:, 1:] = 0.0  # only position 0's output matters: later keys and values get exactly 0
    (dqkv,) = attention.attention_backward(dy, cache)
    C = nh * hs
    assert np.all(dqkv[:, 1:, C:] == 0.0)


# scores past which exp overflows (or below which a row's exps are no longer normal)
BEYOND_EXP = {np.float16: 15.0, np.float32: 100.0, np.float64: 800.0}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("rows", ["moderate", "overflow", "underflow"])
def test_softmax_without_the_row_max_falls_back_to_it_when_exp_overflows(dtype, rows):
    """causal_softmax first skips the row max (c = 0): its result is the textbook one, and
    scores whose exp overflows, or whose row's exps all underflow, are computed again
    and the row max subtracted."""
    R, first = 6, 4  # queries 4..9 against keys 0..9: the diagonal block is keys 4..9
    s = rng.standard_normal((2, 3, R, first + R)) * 3.0
    if rows != "moderate":  # one row of the second head goes past exp's range
        s[1, 2, 3] += BEYOND_EXP[dtype] * (1 if rows == "overflow" else -1)
    s = s.astype(dtype)
    att, calls = s.copy(), []

    def rescore():
        calls.append(1)
        att[...] = s
        return att

    assert attention.causal_softmax(att, first=first, rescore=rescore) is att
    assert att.dtype == dtype and calls == ([] if rows == "moderate" else [1])
    future = np.triu(np.ones((R, R), dtype=bool), k=1)
    want = s.astype(np.float64)
    want[..., first:][..., future] = -np.inf
    want = np.exp(want - want.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    assert np.all(att[..., first:][..., future] == 0)
    np.testing.assert_allclose(att, want, rtol=0, atol=4 * np.finfo(dtype).eps)
    if rows == "moderate":  # the same numbers as the textbook order, to rounding
        textbook = attention.causal_softmax(s.copy(), first=first)
        np.testing.assert_allclose(att, textbook, rtol=0, atol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("reuse", [False, True])
def test_the_same_inputs_give_the_same_bits(reuse):
    B, T, nh, hs = 3, 100, 2, 16
    qkv, dy, mask = (None if a is None else a.astype(np.float32)
                     for a in inputs(B, T, nh, hs, True))
    ws, scratch = Workspace(reuse), Workspace(reuse)
    runs = []
    for _ in range(3):
        y, cache = attention.attention_forward(qkv, nh, mask, ws)
        (dqkv,) = attention.attention_backward(dy, cache, scratch)
        assert y.dtype == dqkv.dtype == np.float32
        runs.append((y.copy(), dqkv.copy()))
    for y, dqkv in runs[1:]:
        np.testing.assert_array_equal(y, runs[0][0])
        np.testing.assert_array_equal(dqkv, runs[0][1])


@pytest.mark.parametrize("dropout", [False, True])
def test_tiles_on_the_stand_in_gpu(monkeypatch, dropout):
    fake = stand_in_gpu.install(monkeypatch)
    B, T, nh, hs = 2, 70, 2, 4
    qkv, dy, mask = inputs(B, T, nh, hs, dropout)
    y, cache = attention.attention_forward(qkv, nh, mask, tile=16)
    (want,) = attention.attention_backward(dy, cache)
    dev = [None if a is None else fake.asarray(a) for a in (qkv, dy, mask)]
    gy, gcache = attention.attention_forward(dev[0], nh, dev[2], tile=16)
    (got,) = attention.attention_backward(dev[1], gcache)
    assert isinstance(got, stand_in_gpu.DeviceArray)
    assert isinstance(gcache.att, stand_in_gpu.DeviceArray)
    np.testing.assert_allclose(to_numpy(gy), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(to_numpy(got), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_model_with_tiles_equals_one_with_whole_rows(monkeypatch, dropout):
    """A whole model's loss and gradients (float64), with tiles of 3 on a context of 16."""
    cfg = GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16,
                    dropout=dropout)
    idx = rng.integers(0, cfg.vocab_size, (3, 17))
    results = []
    for tile in (None, 3):
        use_tiles(monkeypatch, tile)
        m = GPT(cfg, seed=0, dtype="float64")
        loss = m.forward(idx[:, :-1], idx[:, 1:], train=True)[1]
        assert len(m.blocks[0].attn.cache.tiles) == (1 if tile is None else 6)
        results.append((float(loss), m.backward().flat.copy()))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout", [False, True])
def test_tiles_in_blocks_of_batch_rows_equal_whole_rows(monkeypatch, dropout):
    B, T, nh, hs = 5, 23, 2, 3
    qkv, dy, mask = inputs(B, T, nh, hs, dropout)
    want_y, cache = attention.attention_forward(qkv, nh, mask, tile=None)
    (want,) = attention.attention_backward(dy, cache)
    cut_into_blocks(monkeypatch, 2 * nh * 8 * 23)  # two batch rows per block
    assert len(arrays.blocks(B, nh * 8 * 23, qkv)) == 3
    y, cache = attention.attention_forward(qkv, nh, mask, tile=8)
    (got,) = attention.attention_backward(dy, cache)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
