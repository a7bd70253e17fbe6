"""Mixed precision (--dtype float16): a float16 model against the float32 one from the same
weights, the float32 places, loss scaling and its skipped steps, training and resume.

Tolerances. float16 keeps 11 significant bits: each rounding is off by at most
u = 2^-11 = 4.9e-4 relative. A forward and backward round every stored tensor once per
op (products are summed in float32 and rounded once: ops.matmul), so an output carries
the sum of a few dozen such errors of random sign: a few u. We accept 8u (4e-3) on the
logits and 20u (1e-2, llm.c's figure for bfloat16, whose u is 8x larger) on each
gradient tensor, measured as ||g16 - g32|| / ||g32||; measured here: 7e-4 and 1.7e-3.
The mean loss averages its positions' errors: 1e-4 (measured 5e-6).
"""
import json

import numpy as np
import pytest

import stand_in_gpu
from npgpt import arrays, load, ops
from npgpt.backend import gpu_available, to_numpy
from npgpt.errors import NpgptError
from npgpt.mixed import MixedPrecision
from npgpt.model import GPT, GPTConfig
from npgpt.optim import AdamW
from npgpt.training import Trainer
from test_parity import rel
from test_training import run_until, tiny

CFG = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def batch(seed, B=8, T=32, V=65):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


@pytest.fixture(params=["cpu", "stand-in", "stand-in-fused", "cuda"])
def device(request, monkeypatch):
    """Where the models live: the CPU, the stand-in GPU (CuPy's code paths on NumPy
    arrays, stand_in_gpu.py; plain, or with the fused kernels' float16 versions in the
    CUDA emulator) or a real GPU (skipped without one; its default: the fused kernels)."""
    if request.param.startswith("stand-in"):
        stand_in_gpu.install(monkeypatch, fused=request.param == "stand-in-fused")
    elif request.param == "cuda" and not gpu_available():
        pytest.skip("no CuPy-visible NVIDIA GPU here")
    return "cpu" if request.param == "cpu" else "gpu"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float16_model_matches_float32_from_the_same_weights(seed, device):
    if device == "gpu" and seed:
        pytest.skip("one seed off the CPU")
    m32 = GPT(CFG, seed=seed, device=device)
    mp = MixedPrecision(GPT(CFG, seed=seed, device=device))
    m16 = mp.model
    x, y = batch(seed)
    logits32, loss32 = m32.forward(x, y, train=True)  # dropout on: the same masks in both
    m32.backward()
    logits16, loss16 = m16.forward(x, y, train=True)
    m16.backward(dloss=mp.scale)
    assert not bool(mp.unscale_())
    assert logits16.dtype == F16 and loss16.dtype == F32
    assert abs(float(loss16) - float(loss32)) / float(loss32) < 1e-4
    logits16, logits32 = to_numpy(logits16), to_numpy(logits32)
    assert np.abs(logits16 - logits32).max() / np.abs(logits32).max() < 4e-3
    assert m16.grads.flat.dtype == F32 and m16.params.flat.dtype == F16
    for name, g32 in m32.grads.items():
        assert rel(to_numpy(m16.grads[name]), to_numpy(g32)) < 1e-2, name
    # what the backward keeps is float16; the statistics beside it are float32
    block = m16.blocks[0]
    assert block.ln_1.cache.xhat.dtype == F16 and block.ln_1.cache.rstd.dtype == F32
    assert block.attn.cache.att.dtype == F16 and block.mlp.gelu_cache.out.dtype == F16
    assert block.attn.cache.att_mask.dtype == F16


def test_layernorm_statistics_survive_values_whose_squares_overflow_float16():
    # a residual stream with entries near 1000: (x - mean)^2 ~ 1e6 > 65504, float16's largest
    rng = np.random.default_rng(0)
    x = (1000.0 * rng.standard_normal((4, 64))).astype(F16)
    w, b = np.ones(64, F16), np.zeros(64, F16)
    out16, cache = ops.layernorm_forward(x, w, b)
    out32, _ = ops.layernorm_forward(x.astype(F32), w.astype(F32), b.astype(F32))
    assert np.isfinite(out16).all() and cache.rstd.dtype == F32
    np.testing.assert_allclose(out16, out32, rtol=0, atol=4e-3)


def test_sums_and_products_of_float16_add_up_in_float32():
    ones = np.ones((3, 4096), F16)
    assert (arrays.row_sums(ones, arrays.FRESH, "s") == 4096).all()  # float16 stops at 2048
    assert (arrays.column_sums(ones.T) == 4096).all() and arrays.column_sums(ones.T).dtype == F32
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((64, 300)).astype(F16), rng.standard_normal((300, 16)).astype(F16))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    product = ops.matmul(a, b)
    assert product.dtype == F16  # one rounding of the float32 sum: within float16's u
    np.testing.assert_allclose(product, exact, rtol=2.0 ** -11, atol=2.0 ** -24 * 300)


def test_cross_entropy_counts_more_positions_than_float16_can():
    # 3001 targets: float16 counts exactly only to 2048 (3001 would round to 3000)
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3001, 17)).astype(F16)
    targets = rng.integers(0, 17, 3001)
    loss16, cache = ops.cross_entropy_forward(logits, targets)
    loss32, _ = ops.cross_entropy_forward(logits.astype(F32), targets)
    assert loss16.dtype == F32 and abs(loss16 - loss32) < 1e-5 * loss32
    (d16,) = ops.cross_entropy_backward(1.0, cache)
    assert np.count_nonzero(d16) > 0.9 * d16.size  # dloss/3001 is below float16's normals:
    # the scale is applied in float32, so the gradients do not flush to zero


def test_loss_scaling_keeps_small_gradients_from_underflowing():
    """Why the scale: the gradient of a mean loss over N positions is p / N for a token of
    probability p; once a model has learned, most p are tiny, and p / 4096 falls below
    float16's smallest number (6e-8) for every p under 2.4e-4. Scaled by 2^16, it does not."""
    rng = np.random.default_rng(3)
    logits = (4.0 * rng.standard_normal((4096, 65))).astype(F16)  # a confident model's
    targets = rng.integers(0, 65, 4096)
    lost = {}
    for scale in (1.0, 2.0 ** 16):
        _, cache = ops.cross_entropy_forward(logits, targets)
        (dlogits,) = ops.cross_entropy_backward(scale, cache)
        lost[scale] = np.mean((dlogits == 0) & (cache.probs != 0))  # flushed to zero here
    assert lost[2.0 ** 16] == 0.0 and lost[1.0] > 0.25  # measured: 0.54 of all entries


def step(mp, opt, x, y):
    """One mixed-precision training step, as the Trainer takes it; returns skip."""
    mp.model.forward(x, y, train=True)
    mp.model.backward(dloss=mp.scale)
    return mp.step(opt, lr=1e-3, grad_clip=1.0)


def test_an_overflowed_step_changes_nothing_and_halves_the_scale(device):
    mp = MixedPrecision(GPT(CFG, seed=0, device=device))
    opt, xp = AdamW(mp.params), mp.xp
    x, y = batch(4)
    assert not bool(step(mp, opt, x, y))
    state = (mp.params.flat, opt.m["*"], opt.v["*"], mp.model.params.flat)
    before = [to_numpy(a).copy() for a in state]  # (on the CPU to_numpy is no copy)
    mp.scale = xp.asarray(2.0 ** 127, dtype=xp.float32)  # x 2^127: float16 (and 32) overflow
    with np.errstate(over="ignore", invalid="ignore"):
        assert bool(step(mp, opt, x, y))
    for a, b in zip(before, state):
        np.testing.assert_array_equal(a, to_numpy(b))
    assert mp.state() == {"loss_scale": 2.0 ** 126, "scale_good_steps": 0, "skipped_steps": 1}
    assert opt.state()["t"] == 1  # the skipped step does not count for bias correction
    mp.scale = xp.asarray(2.0 ** 16, dtype=xp.float32)
    assert not bool(step(mp, opt, x, y)) and opt.state()["t"] == 2
    assert not np.array_equal(to_numpy(mp.params.flat), before[0])


def test_an_injected_inf_or_nan_gradient_is_caught(monkeypatch):
    mp = MixedPrecision(GPT(CFG, seed=0))
    for bad in (np.inf, -np.inf, np.nan):
        mp.model.grads.flat[7] = bad
        assert mp.unscale_()
        assert np.isfinite(mp.model.grads.flat).all() and not mp.model.grads.flat.any()


def test_the_scale_grows_after_growth_interval_good_steps():
    mp = MixedPrecision(GPT(CFG, seed=0), growth_interval=3)
    for expected in (2 ** 16, 2 ** 16, 2 ** 17, 2 ** 17, 2 ** 17, 2 ** 18):
        mp.update(np.False_)
        assert float(mp.scale) == expected
    mp.update(np.True_)
    assert mp.state() == {"loss_scale": 2.0 ** 17, "scale_good_steps": 0, "skipped_steps": 1}


def test_skipping_adamw_equals_the_plain_step_when_nothing_overflows():
    params = GPT(CFG, seed=0).params
    twin = GPT(CFG, seed=0).params
    a, b = AdamW(params), AdamW(twin)
    g = GPT(CFG, seed=5).params  # any numbers as gradients
    for _ in range(3):
        a.step(g, lr=1e-3)
        b.step(g, lr=1e-3, skip=np.False_)
    np.testing.assert_array_equal(params.flat, twin.flat)
    np.testing.assert_array_equal(a.m["*"], b.m["*"])
    assert a.state()["t"] == b.state()["t"] == 3


def test_tiny_preset_in_float16_reaches_float32s_val_loss(tmp_path, corpus):
    results = {}
    for dtype in ("float32", "float16"):
        cfg = tiny(tmp_path / dtype, corpus, dtype=dtype, max_iters=50, eval_interval=25,
                   eval_iters=4)
        results[dtype] = Trainer(cfg, progress=False, out=lambda *_: None).run()["val_loss"]
    assert abs(results["float16"] - results["float32"]) < 0.05
    records = [json.loads(line)
               for line in (tmp_path / "float16" / "out" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["loss_scale"] == 2.0 ** 16 and r["skipped_steps"] == 0 for r in steps)
    model, extra = load(tmp_path / "float16" / "out" / "ckpt.npz")
    assert model.dtype == F32  # the checkpoint holds the float32 master weights
    assert extra["train_config"]["dtype"] == "float16" and extra["loss_scale"] == 2.0 ** 16


def test_float16_resume_after_a_crash_is_bit_identical(tmp_path, corpus, monkeypatch):
    # the scale starts at 2^24 here, so the first steps overflow and are skipped: the
    # resumed run must carry the scale, its count and AdamW's step count on
    monkeypatch.setattr("npgpt.mixed.MixedPrecision.__init__.__defaults__",
                        (2.0 ** 24, 4, 2.0, 0.5))
    cfg = dict(dropout=0.1, max_iters=12, dtype="float16")
    straight = Trainer(tiny(tmp_path / "a", corpus, **cfg), progress=False, out=lambda *_: None)
    straight.run()
    assert 0 < straight.mixed.state()["skipped_steps"] < 12
    interrupted = tiny(tmp_path / "b", corpus, **cfg)
    run_until(interrupted, 8)  # a crash after 8 steps: the last checkpoint is iteration 5
    resumed = Trainer(interrupted, resume=True, progress=False, out=lambda *_: None)
    assert resumed.iter == 5
    resumed.run()
    np.testing.assert_array_equal(resumed.params.flat, straight.params.flat)
    np.testing.assert_array_equal(resumed.model.params.flat, straight.model.params.flat)
    assert resumed.mixed.state() == straight.mixed.state()
    assert resumed.opt.state()["t"] == straight.opt.state()["t"]


def test_a_float16_overflow_in_the_forward_stops_the_run_with_a_float32_hint(tmp_path, corpus):
    t = Trainer(tiny(tmp_path, corpus, dtype="float16", max_iters=20), progress=False,
                out=lambda *_: None)
    step = t.train_step

    def poisoned():  # a master weight whose float16 activation passes 65504
        if t.iter == 7:
            t.params["transformer.ln_f.bias"][0] = 1e5
            t.mixed.push()
        return step()

    t.train_step = poisoned
    with pytest.raises(NpgptError, match=r"became (nan|inf).*--dtype float32"):
        t.run()
    model, extra = load(tmp_path / "out" / "ckpt.npz")
    assert extra["iter"] == 5 and np.isfinite(model.params.flat).all()
