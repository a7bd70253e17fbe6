"""The fused CUDA kernels (npgpt/kernels_*.cu) against the plain ops they replace.

Each case runs on two devices: "emulated" compiles kernels.source() with g++ against the CUDA
emulator of emulated_cuda.py (every machine with a C++ compiler, so CI runs every kernel),
and "cuda" on a real GPU through CuPy (skipped without one). The reference is the plain
op in float64 on the CPU; the kernels compute in float32, so results agree to float32
rounding (relative 1e-5 of each array's scale).
"""
import inspect

import numpy as np
import pytest

import stand_in_gpu
from npgpt import (GPT, AdamW, GPTConfig, clip_grad_norm, fused_attention, kernels,
                   ops)
from npgpt.arrays import Workspace
from npgpt.mixed import MixedPrecision
from npgpt.backend import gpu_available, to_numpy
from npgpt.params import FlatDict, gpt2_param_shapes

rng = np.random.default_rng(0)


@pytest.fixture(params=["emulated", "cuda"])
def xp(request, monkeypatch):
    """The array module whose float32 arrays run the fused kernels."""
    if request.param == "emulated":
        return stand_in_gpu.install(monkeypatch, fused=True)
    if not gpu_available():
        pytest.skip("no CuPy-visible NVIDIA GPU here")
    import cupy
    monkeypatch.setenv("NPGPT_FUSED", "1")
    return cupy


def f32(xp, a, dtype=np.float32):
    """a (float64, NumPy) as a float32 (or `dtype`) array on xp's device."""
    return xp.asarray(np.asarray(a, dtype=dtype))


# a float16 kernel computes in float32 and rounds each result once: 2^-11 of its size
REL = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-3}


def assert_matches(got, want, dtype=np.float32):
    """got (device, `dtype`) equals want (float64) to dtype's rounding of want's scale."""
    got = to_numpy(got)
    assert got.dtype == dtype
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=0,
                               atol=REL[np.dtype(dtype)] * scale)


def as64(a):
    """The float64 values of a float32 array (the plain op's exact input)."""
    return to_numpy(a).astype(np.float64)


@pytest.mark.parametrize("shape", [(3, 5, 33), (2, 7, 100), (1, 1, 7), (4, 3, 384),
                                   (3, 40, 33)])  # (120 rows: 4 chunks of column sums)
def test_layernorm(xp, shape):
    C = shape[-1]
    x, w, b = f32(xp, rng.standard_normal(shape) * 3 + 1), f32(xp, rng.standard_normal(C)), \
        f32(xp, rng.standard_normal(C))
    dout = f32(xp, rng.standard_normal(shape))
    out, cache = kernels.layernorm_forward(x, w, b)
    ref, ref_cache = ops.layernorm_forward(as64(x), as64(w), as64(b))
    assert_matches(out, ref)
    assert_matches(cache.xhat, ref_cache.xhat)
    assert cache.rstd.shape == ref_cache.rstd.shape == shape[:-1] + (1,)
    assert_matches(cache.rstd, ref_cache.rstd)
    for got, want in zip(kernels.layernorm_backward(dout, cache),
                         ops.layernorm_backward(as64(dout), ref_cache)):
        assert got.shape == want.shape
        assert_matches(got, want)
    res = f32(xp, rng.standard_normal(shape))  # a skip connection's gradient, added to dx
    dx, _, _ = kernels.layernorm_backward(dout, cache, residual=res)
    assert_matches(dx, ops.layernorm_backward(as64(dout), ref_cache, residual=as64(res))[0])
    # into=: dw and db added into a layer's gradient arrays (by the column sums' last
    # launch), as the plain op adds them; the same arrays come back
    grads = [rng.standard_normal(C) for _ in "wb"]
    into = tuple(f32(xp, g) for g in grads)
    got = kernels.layernorm_backward(dout, cache, into=into)
    want = ops.layernorm_backward(as64(dout), ref_cache,
                                  into=tuple(g.copy() for g in grads))
    assert got[1] is into[0] and got[2] is into[1]
    for g, w_ in zip(got[1:], want[1:]):
        assert_matches(g, w_)


def tree_of_column_sums(a, chunk):
    """kernels.column_sums's order in NumPy float32: each chunk's rows added in row order,
    level after level."""
    while True:
        parts = np.zeros((-(-a.shape[0] // chunk), a.shape[1]), dtype=np.float32)
        for r in range(a.shape[0]):
            parts[r // chunk] += a[r]
        if parts.shape[0] == 1:
            return parts[0]
        a = parts


@pytest.mark.parametrize("shape", [(1, 7), (33, 5), (1000, 37), (4, 3, 384), (2, 4096, 3)])
def test_column_sums(xp, monkeypatch, shape):
    monkeypatch.setattr(kernels, "MAX_BLOCKS", 3)  # the stride loop
    a = f32(xp, rng.standard_normal(shape) * 3 + 1)
    got = kernels.column_sums(a)
    a2 = to_numpy(a).reshape(-1, shape[-1])
    assert_matches(got, a2.astype(np.float64).sum(axis=0))
    # the same bits as the tree it documents: an order fixed by the shape alone
    np.testing.assert_array_equal(to_numpy(got), tree_of_column_sums(a2, kernels.COLUMN_CHUNK))


@pytest.mark.parametrize("rows", [1, 33, 1000])  # one level, two, three
def test_column_sums_split_into_two_gradients(xp, rows):
    """out=(lo, hi): the last level adds the first lo.size sums into lo, the rest into hi,
    the same bits as one (C,) result added in two parts."""
    a = f32(xp, rng.standard_normal((rows, 10)))
    lo, hi = f32(xp, rng.standard_normal(4)), f32(xp, rng.standard_normal(6))
    want = np.concatenate([to_numpy(lo), to_numpy(hi)]) + to_numpy(kernels.column_sums(a))
    got = kernels.column_sums(a, out=(lo, hi), add=True)
    assert got[0] is lo and got[1] is hi
    np.testing.assert_array_equal(np.concatenate([to_numpy(lo), to_numpy(hi)]), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_embedding_backward_sums_each_tokens_rows_in_position_order(xp, monkeypatch, dtype):
    monkeypatch.setattr(kernels, "MAX_BLOCKS", 2)  # 11 x 40 threads > 2 blocks: the stride
    idx = rng.integers(0, 9, (5, 23))
    idx[idx > 5] = 3                  # token 3 is most of the batch; 6-8 never occur
    wte, wpe = rng.standard_normal((11, 40)), rng.standard_normal((30, 40))
    dout = f32(xp, rng.standard_normal((5, 23, 40)), dtype)
    _, cache = ops.embedding_forward(xp.asarray(idx), f32(xp, wte, dtype), f32(xp, wpe, dtype))
    dwte, dwpe = kernels.embedding_backward(dout, cache)
    want = ops.embedding_backward(as64(dout), ops.embedding_forward(idx, wte, wpe)[1])
    assert_matches(dwte, want[0])     # float32 (a float16 model's gradients too)
    assert_matches(dwpe, want[1])
    assert np.all(to_numpy(dwte)[6:] == 0.0)
    # the order it documents: each token's rows one after another, by position
    rows = to_numpy(dout).reshape(-1, 40)
    for v in range(6):
        acc = np.zeros(40, np.float32)
        for r in np.flatnonzero(idx.reshape(-1) == v):
            acc += rows[r]
        np.testing.assert_array_equal(to_numpy(dwte)[v], acc)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_add_bias_and_linear_forward(xp, monkeypatch, dtype):
    monkeypatch.setattr(kernels, "COLUMN_THREADS", 32)  # 70 columns: 3 blocks, the last
    monkeypatch.setattr(kernels, "ROW_STRIDE", 4)       # partly idle; 2*9 rows in 4 strides
    out = f32(xp, rng.standard_normal((2, 9, 70)), dtype)
    b = f32(xp, rng.standard_normal(70), dtype)
    want = to_numpy(out) + to_numpy(b)  # (float16: NumPy's add rounds the exact sum once)
    got = kernels.add_bias(out, b)
    assert got is out
    np.testing.assert_array_equal(to_numpy(out), want)
    x = f32(xp, rng.standard_normal((2, 9, 12)), dtype)
    w = f32(xp, rng.standard_normal((12, 70)), dtype)
    y, _ = kernels.linear_forward(x, w, b)
    assert_matches(y, ops.linear_forward(as64(x), as64(w), as64(b))[0], dtype)


def test_linear_backward(xp):
    x, w, b = (f32(xp, rng.standard_normal(s)) for s in ((3, 70, 12), (12, 20), (20,)))
    dout = f32(xp, rng.standard_normal((3, 70, 20)))
    _, cache = ops.linear_forward(x, w, b)
    _, ref_cache = ops.linear_forward(as64(x), as64(w), as64(b))
    for got, want in zip(kernels.linear_backward(dout, cache),
                         ops.linear_backward(as64(dout), ref_cache)):
        assert got.shape == want.shape
        assert_matches(got, want)


def test_gelu(xp, monkeypatch):
    monkeypatch.setattr(kernels, "MAX_BLOCKS", 2)  # 1001 elements > 2 blocks: the stride loop
    x = f32(xp, np.concatenate([rng.standard_normal(990) * 3, [-12, -6, -1e-3, 0, 1e-3, 6, 12,
                                                                 40, -40, 3.5, -3.5]]))
    dout = f32(xp, rng.standard_normal(x.shape))
    out, cache = kernels.gelu_forward(x)
    ref, ref_cache = ops.gelu_forward(as64(x))
    assert_matches(out, ref)
    assert_matches(kernels.gelu_backward(dout, cache)[0],
                   ops.gelu_backward(as64(dout), ref_cache)[0])


@pytest.mark.parametrize("T", [1, 5, 37, 70])
def test_causal_softmax_masks_the_future_exactly(xp, T):
    s = rng.standard_normal((2, 3, T, T)) * 4
    s[0, 0, -1, 0] = -1000.0   # a huge negative score: weight 0, row still normalised
    s[1, 2, -1, -1] = 1000.0   # a huge positive one: weight 1, no overflow
    att = fused_attention.causal_softmax(f32(xp, s))
    ref = ops.causal_softmax(s.astype(np.float32).astype(np.float64))
    assert_matches(att, ref)
    got = to_numpy(att)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert np.all(got[..., future] == 0.0)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
    assert np.isfinite(got).all()


def poisoned(xp, call):
    """A Workspace whose arrays, made by one call(ws), are then all NaN: a kernel or
    product that reads memory it did not write first turns the next call's results NaN."""
    ws = Workspace()
    call(ws)
    for a in ws.arrays.values():
        a[...] = xp.nan
    return ws


@pytest.mark.parametrize("tile", [None, 16, 8])  # T = 35: 1, 3 and 5 tiles (the last of 3)
@pytest.mark.parametrize("dropout", [False, True])
def test_attention(xp, dropout, tile):
    B, T, nh, hs = 2, 35, 3, 8
    qkv = f32(xp, rng.standard_normal((B, T, 3 * nh * hs)))
    dy = f32(xp, rng.standard_normal((B, T, nh * hs)))
    mask = None
    if dropout:
        mask = (rng.random((B, nh, T, T)) >= 0.2) / 0.8
    dev_mask = None if mask is None else f32(xp, mask)
    # the blocks above the diagonal that the tiles' products skip hold NaN: never read
    forward, backward = (fused_attention.attention_forward,
                         fused_attention.attention_backward)
    fwd = poisoned(xp, lambda w: forward(qkv, nh, dev_mask, w, tile=tile))
    y, cache = forward(qkv, nh, dev_mask, fwd, tile=tile)
    ref, ref_cache = ops.attention_forward(as64(qkv), nh, mask)
    assert_matches(y, ref)
    bwd = poisoned(xp, lambda w: backward(dy, cache, w, tile=tile))
    (dqkv,) = backward(dy, cache, bwd, tile=tile)
    (ref_dqkv,) = ops.attention_backward(as64(dy), ref_cache)
    assert_matches(dqkv, ref_dqkv)


def test_attention_tiles_in_plain_float32_only(monkeypatch):
    """Query tiles where the GPU's time counts (plain float32), whole rows where the step
    waits for the host (TF32, float16)."""
    T = 4 * fused_attention.GPU_TILE
    monkeypatch.delenv("CUPY_TF32", raising=False)
    assert len(fused_attention._tiles(T, np.dtype(np.float32), "auto")) == 4
    assert fused_attention._tiles(T, np.dtype(np.float16), "auto") == [(0, T)]
    assert fused_attention._tiles(T, np.dtype(np.float32), None) == [(0, T)]
    monkeypatch.setenv("CUPY_TF32", "1")
    assert fused_attention._tiles(T, np.dtype(np.float32), "auto") == [(0, T)]


def test_softmax_backward_gives_masked_entries_exactly_zero(xp):
    T = 9
    att = fused_attention.causal_softmax(f32(xp, rng.standard_normal((1, 2, T, T))))
    ds = f32(xp, rng.standard_normal((1, 2, T, T)))
    rowdot = f32(xp, rng.standard_normal((1, T, 2, 1))).transpose(0, 2, 1, 3)
    got = to_numpy(fused_attention.causal_softmax_backward(ds, att, rowdot, None))
    assert np.all(got[..., np.triu(np.ones((T, T), dtype=bool), k=1)] == 0.0)


@pytest.mark.parametrize("V, tdtype", [(70, np.int64), (5, np.int32), (65, np.uint16)])
def test_cross_entropy(xp, V, tdtype):
    logits = rng.standard_normal((3, 11, V)) * 2
    logits[0, 0, 1] = -1000.0            # stability: a very unlikely token
    logits[0, 1, 2] = 1000.0             # and a certain one
    targets = rng.integers(0, V, (3, 11))
    targets[0, :2] = [1, 2]
    if tdtype != np.uint16:
        targets[1, 3:6] = -1             # ignored positions
    loss, cache = kernels.cross_entropy_forward(f32(xp, logits), xp.asarray(targets.astype(tdtype)))
    ref, ref_cache = ops.cross_entropy_forward(logits.astype(np.float32).astype(np.float64),
                                               targets)
    assert loss.shape == () and to_numpy(loss).dtype == np.float32
    assert float(to_numpy(loss)) == pytest.approx(float(ref), rel=1e-5)
    (dlogits,) = kernels.cross_entropy_backward(1.0, cache)
    (ref_d,) = ops.cross_entropy_backward(1.0, ref_cache)
    assert_matches(dlogits, ref_d)
    if tdtype != np.uint16:
        assert np.all(to_numpy(dlogits)[1, 3:6] == 0.0)


# ----------------------------------------------------------------------------
# the float16 versions (a float16 model's activations): float32 math, results rounded once;
# the reference is the plain op in float64 on the same float16 values


F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def test_layernorm_float16(xp):
    shape, C = (4, 9, 100), 100
    x, w, b = (f32(xp, a, F16) for a in (rng.standard_normal(shape) * 3 + 1,
                                         rng.standard_normal(C), rng.standard_normal(C)))
    dout = f32(xp, rng.standard_normal(shape), F16)
    out, cache = kernels.layernorm_forward(x, w, b)
    ref, ref_cache = ops.layernorm_forward(as64(x), as64(w), as64(b))
    assert_matches(out, ref, F16)
    assert_matches(cache.xhat, ref_cache.xhat, F16)
    assert_matches(cache.rstd, ref_cache.rstd, F32)   # the statistics stay float32
    # the backward from the float16 cache it is given
    dx, dw, db = kernels.layernorm_backward(dout, cache)
    want = ops.layernorm_backward(as64(dout), ops.LayerNormCache(
        as64(cache.xhat), as64(cache.rstd), as64(w)))
    assert_matches(dx, want[0], F16)
    assert_matches(db, want[2], F32)                   # column sums: float32, exact terms
    assert_matches(dw, want[1], F32)                   # (dout * xhat: exact in float32)


def test_column_sums_of_float16_rows_are_float32(xp):
    a = f32(xp, rng.standard_normal((1000, 37)) * 100, F16)
    got = kernels.column_sums(a)
    assert to_numpy(got).dtype == F32
    # the same tree, float32 sums of the float16 terms
    np.testing.assert_array_equal(to_numpy(got), tree_of_column_sums(to_numpy(a),
                                                                      kernels.COLUMN_CHUNK))


def test_gelu_float16_does_not_overflow_where_float16_math_would(xp):
    # x^2 passes float16's 65504 at |x| = 256: the kernel's float32 math does not mind
    x = f32(xp, np.concatenate([rng.standard_normal(500) * 3, [-300, -40, 0, 40, 300]]), F16)
    dout = f32(xp, rng.standard_normal(x.shape), F16)
    out, cache = kernels.gelu_forward(x)
    ref, ref_cache = ops.gelu_forward(as64(x))
    assert_matches(out, ref, F16)
    (dx,) = kernels.gelu_backward(dout, cache)
    assert_matches(dx, ops.gelu_backward(as64(dout), ref_cache)[0], F16)
    assert np.isfinite(to_numpy(dx)).all()


@pytest.mark.parametrize("dropout", [False, True])
def test_causal_softmax_and_its_backward_float16(xp, dropout):
    B, nh, T = 2, 3, 37
    s = rng.standard_normal((B, nh, T, T)) * 4
    s[0, 0, -1, 0] = -1000.0
    att = fused_attention.causal_softmax(f32(xp, s, F16))
    ref = ops.causal_softmax(as64(f32(np, s, F16)))
    assert_matches(att, ref, F16)
    assert np.all(to_numpy(att)[..., np.triu(np.ones((T, T), dtype=bool), k=1)] == 0.0)
    da = rng.standard_normal((B, nh, T, T))
    mask = (rng.random((B, nh, T, T)) >= 0.2) / 0.8 if dropout else None
    rowdot = rng.standard_normal((B, T, nh, 1))  # float32, (B,T,nh,1) as attention keeps it
    got = fused_attention.causal_softmax_backward(
        f32(xp, da, F16), att, f32(xp, rowdot).transpose(0, 2, 1, 3),
        None if mask is None else f32(xp, mask, F16))
    want = ops.causal_softmax_backward(as64(f32(np, da, F16)), as64(att),
                                       rowdot.astype(np.float32).transpose(0, 2, 1, 3),
                                       None if mask is None else as64(f32(np, mask, F16)))
    assert_matches(got, want, F16)


def test_cross_entropy_float16(xp):
    V = 70
    logits = rng.standard_normal((3, 11, V)) * 2
    logits[0, 0, 1], logits[0, 1, 2] = -1000.0, 1000.0
    targets = rng.integers(0, V, (3, 11))
    targets[1, 3:6] = -1
    z = f32(xp, logits, F16)
    loss, cache = kernels.cross_entropy_forward(z, xp.asarray(targets))
    ref, ref_cache = ops.cross_entropy_forward(as64(z), targets)
    assert to_numpy(loss).dtype == F32  # the log-sum-exps and their mean: float32
    assert float(to_numpy(loss)) == pytest.approx(float(ref), rel=1e-5)
    (dlogits,) = kernels.cross_entropy_backward(4.0, cache)  # dloss: a loss scale
    assert_matches(dlogits, ops.cross_entropy_backward(4.0, ref_cache)[0], F16)
    assert np.all(to_numpy(dlogits)[1, 3:6] == 0.0)


@pytest.mark.parametrize("skippable", [False, True])
def test_adamw_kernel_matches_the_plain_update(xp, skippable):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    fused = GPT(cfg, seed=1, device="gpu")
    plain = GPT(cfg, seed=1)
    opt_fused, opt_plain = AdamW(fused.params, lr=1e-2), AdamW(plain.params, lr=1e-2)
    assert opt_fused.fused and not opt_plain.fused
    # the decay mask: 1 on every matrix, 0 on every vector (biases, LayerNorm)
    mask = FlatDict(to_numpy(opt_fused.fused["*"]), gpt2_param_shapes(cfg))
    for name, part in mask.items():
        assert np.all(part == (1 if part.ndim >= 2 else 0)), name
    # a skippable step (mixed precision) takes the kernel that reads its coefficients on
    # the device; its second step is skipped and must change nothing
    skips = [False, True, False] if skippable else [None] * 3
    for step, skip in enumerate(skips):
        g = rng.standard_normal(plain.grads.flat.shape).astype(np.float32) * 0.01
        plain.grads.flat[...] = g
        fused.grads.flat[...] = xp.asarray(g)
        before = to_numpy(fused.params.flat).copy()
        opt_plain.step(plain.grads, lr=1e-2 / (step + 1),
                       skip=None if skip is None else np.asarray(skip))
        opt_fused.step(fused.grads, lr=1e-2 / (step + 1),
                       skip=None if skip is None else xp.asarray(skip))
        if skip:
            np.testing.assert_array_equal(to_numpy(fused.params.flat), before)
    np.testing.assert_allclose(to_numpy(fused.params.flat), plain.params.flat, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_numpy(opt_fused.v["*"]), opt_plain.v["*"], rtol=1e-5, atol=1e-12)


def test_fused_clipping_and_mixed_step_match_the_plain_array_code(xp):
    """fused_optim's three-launch clip_grad_norm and five-launch mixed-precision step
    against optim.py's and mixed.py's array code on the CPU, from the same gradients:
    clipped and unclipped steps, a skipped one (an inf), and the scale's growth."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)
    g = rng.standard_normal(GPT(cfg).grads.flat.shape).astype(np.float32)
    fused, plain = GPT(cfg, seed=1, device="gpu"), GPT(cfg, seed=1)
    fused.grads.flat[...] = xp.asarray(g)
    plain.grads.flat[...] = g
    norms = [clip_grad_norm(m.grads, 1.0) for m in (fused, plain)]
    assert float(to_numpy(norms[0])) == pytest.approx(float(norms[1]), rel=1e-5)
    np.testing.assert_allclose(to_numpy(fused.grads.flat), plain.grads.flat, rtol=1e-5)
    mps = [MixedPrecision(GPT(cfg, seed=1, device=d), growth_interval=2) for d in ("gpu", "cpu")]
    opts = [AdamW(mp.params, lr=1e-2) for mp in mps]
    assert opts[0].fused and not opts[1].fused
    for step, (bad, clip) in enumerate([(False, 1.0), (True, 1.0), (False, 0.0), (False, 50.0)]):
        scaled = g * (step + 1) * 2.0 ** 16
        if bad:
            scaled[3] = np.inf
        skips = []
        for mp, opt, on in zip(mps, opts, (xp, np)):
            mp.model.grads.flat[...] = on.asarray(scaled)
            skips.append(bool(to_numpy(mp.step(opt, lr=1e-2 / (step + 1), grad_clip=clip))))
        assert skips == [bad, bad]
        assert mps[0].state() == mps[1].state() and opts[0].state()["t"] == opts[1].state()["t"]
        np.testing.assert_allclose(to_numpy(mps[0].params.flat), mps[1].params.flat,
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(to_numpy(opts[0].v["*"]), opts[1].v["*"], rtol=1e-4,
                                   atol=1e-12)
        np.testing.assert_array_equal(to_numpy(mps[0].model.params.flat),
                                      to_numpy(mps[0].params.flat).astype(np.float16))
    assert mps[0].state() == {"loss_scale": 2.0 ** 16, "scale_good_steps": 0, "skipped_steps": 1}


CFG = GPTConfig(vocab_size=37, block_size=40, n_layer=2, n_head=2, n_embd=64, dropout=0.1)


@pytest.mark.parametrize("gpu_tile", [None, 16])  # attention on whole rows, or 3 tiles
def test_the_fused_model_has_the_float64_models_gradients(xp, monkeypatch, gpu_tile):
    """Through the whole model (T = 36 > 32 lanes, C = 64): the fused float32 gradients
    equal the float64 model's (which test_model gradient-checks) to float32 rounding."""
    monkeypatch.setattr(fused_attention, "GPU_TILE", gpu_tile)
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    fused = GPT(CFG, seed=2, device="gpu")
    assert fused.ops is not ops and fused.ops.layernorm_forward is kernels.layernorm_forward
    exact = GPT(CFG, seed=2, dtype="float64")
    exact.params.flat[...] = to_numpy(fused.params.flat)
    losses = [m.forward(idx[:, :-1], idx[:, 1:])[1] for m in (fused, exact)]
    assert float(to_numpy(losses[0])) == pytest.approx(float(losses[1]), rel=1e-5)
    grads = FlatDict(to_numpy(fused.backward().flat), gpt2_param_shapes(CFG))
    for name, want in exact.backward().items():  # each tensor against its own scale
        np.testing.assert_allclose(grads[name], want, rtol=0, atol=1e-4 * np.abs(want).max(),
                                   err_msg=name)


@pytest.mark.parametrize("gpu_tile", [None, 16])  # T = 36: whole rows, or 3 query tiles
def test_a_fused_step_sends_every_product_to_cublas_once(monkeypatch, gpu_tile):
    """On a GPU each call costs host time, and the step waits for the host: every product
    of a fused training step is one cuBLAS call (none falls back to CuPy's matmul), and
    attention's batched products too, on its contiguous heads (a strided view of qkv
    would take a call per head), one per query tile."""
    fake = stand_in_gpu.install(monkeypatch, fused=True)
    monkeypatch.setattr(fused_attention, "GPU_TILE", gpu_tile)

    def no_matmul(*args, **kwargs):
        raise AssertionError("a product fell back to xp.matmul (~60 us of host time on CuPy)")

    monkeypatch.setattr(fake, "matmul", no_matmul, raising=False)
    model = GPT(CFG, seed=2, device="gpu")
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    tiles = 1 if gpu_tile is None else 3
    calls = fake.cuda.cublas.calls
    model.forward(idx[:, :-1], idx[:, 1:], train=True)
    # per block: c_attn, c_proj, c_fc, mlp's c_proj, and attention's att = q k^T, y = a v
    # per tile; then the tied head
    forward = CFG.n_layer * (4 + 2 * tiles) + 1
    assert len(calls) == forward
    model.backward()
    # per block: two products per linear layer, four per tile for attention; the head's two
    assert len(calls) == forward + CFG.n_layer * (4 * 2 + 4 * tiles) + 2


def test_fused_and_plain_gpu_models_agree_with_dropout(xp, monkeypatch):
    """With dropout on, fused and plain models on the GPU draw the same masks (the model's
    own stream), so their gradients agree to float32 rounding. (AdamW is compared from the
    same gradients above: Adam turns last-bit differences of near-zero gradients into
    whole steps.)"""
    idx = rng.integers(0, CFG.vocab_size, (3, 37))
    monkeypatch.setenv("NPGPT_FUSED", "0")
    plain = GPT(CFG, seed=3, device="gpu")
    monkeypatch.setenv("NPGPT_FUSED", "1")
    fused = GPT(CFG, seed=3, device="gpu")
    assert plain.ops is ops and fused.ops is not ops
    for _ in range(2):  # the second pass draws new masks
        losses = [float(to_numpy(m.forward(idx[:, :-1], idx[:, 1:], train=True)[1]))
                  for m in (plain, fused)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        plain.backward(accumulate=True), fused.backward(accumulate=True)
        for name, want in plain.grads.items():
            want = to_numpy(want)
            np.testing.assert_allclose(to_numpy(fused.grads[name]), want, rtol=0,
                                       atol=1e-4 * np.abs(want).max(), err_msg=name)


def test_fused_ops_replace_the_plain_ones_signature_for_signature(monkeypatch):
    monkeypatch.setenv("NPGPT_FUSED", "1")
    fake = stand_in_gpu.FakeCuPy()
    table = kernels.fused_ops(fake, "float32")
    def called_with(fn):  # what the layers pass: (name, default) of each positional
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
                if p.kind is not inspect.Parameter.KEYWORD_ONLY]

    for name, fn in {**kernels.FUSED, **fused_attention.FUSED}.items():
        assert getattr(table, name) is fn
        assert called_with(fn) == called_with(getattr(ops, name)), name
    assert table.embedding_forward is ops.embedding_forward  # (no kernel: a gather)
    # the plain code wherever the kernels do not apply
    assert kernels.fused_ops(fake, "float16").layernorm_forward is kernels.layernorm_forward
    assert kernels.fused_ops(np, "float32") is ops
    assert kernels.fused_ops(fake, "float64") is ops
    monkeypatch.setenv("NPGPT_FUSED", "0")
    assert kernels.fused_ops(fake, "float32") is ops
