"""AdamW and gradient clipping against straightforward reference formulas."""
import math

import numpy as np
import pytest

from npgpt import GPT, AdamW, GPTConfig, clip_grad_norm

CFG = GPTConfig(vocab_size=11, block_size=6, n_layer=1, n_head=2, n_embd=6)


def reference_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    p = p - lr * wd * p - lr * mhat / (np.sqrt(vhat) + eps)
    return p, m, v


@pytest.mark.parametrize("flat", [True, False])
def test_adamw_matches_reference_and_decays_only_matrices(flat):
    rng = np.random.default_rng(0)
    model = GPT(CFG, dtype="float64")
    params = model.params if flat else {n: p.copy() for n, p in model.params.items()}
    start = {n: p.copy() for n, p in params.items()}
    opt = AdamW(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m = {n: 0.0 for n in params}
    v = {n: 0.0 for n in params}
    ref = dict(start)
    for t in range(1, 4):
        grads = model.grads if flat else {n: np.empty_like(p) for n, p in params.items()}
        for n, g in grads.items():
            g[...] = rng.standard_normal(g.shape)
        opt.step(grads)
        for n in params:
            wd = 0.1 if params[n].ndim >= 2 else 0.0
            ref[n], m[n], v[n] = reference_adamw(ref[n], grads[n], m[n], v[n], t, 0.01,
                                                 0.9, 0.95, 1e-8, wd)
    for n in params:
        np.testing.assert_allclose(params[n], ref[n], rtol=1e-12, atol=1e-15)


def test_adamw_with_zero_gradients_decays_matrices_and_leaves_biases():
    model = GPT(CFG, dtype="float64")
    model.params["transformer.h.0.ln_1.bias"][...] = 0.5
    before = {n: p.copy() for n, p in model.params.items()}
    AdamW(model.params, lr=0.1, weight_decay=0.5).step(model.grads, lr=0.2)  # grads are 0
    w = "transformer.h.0.mlp.c_fc.weight"
    np.testing.assert_allclose(model.params[w], before[w] * (1 - 0.2 * 0.5))
    np.testing.assert_array_equal(model.params["transformer.h.0.ln_1.bias"], 0.5)


def test_adamw_rejects_bad_settings():
    with pytest.raises(ValueError):
        AdamW(GPT(CFG).params, betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        AdamW(GPT(CFG).params, lr=-1)


def test_clip_grad_norm_scales_in_place_and_returns_pre_clip_norm():
    model = GPT(CFG, dtype="float64")
    rng = np.random.default_rng(1)
    model.grads.flat[:] = rng.standard_normal(model.grads.flat.shape)
    norm0 = math.sqrt(float(np.sum(model.grads.flat ** 2)))
    view = model.grads["transformer.wte.weight"]
    norm = clip_grad_norm(model.grads, 1.0)
    assert math.isclose(float(norm), norm0, rel_tol=1e-12)
    assert math.isclose(float(np.linalg.norm(model.grads.flat)), 1.0, rel_tol=1e-5)
    assert view.base is not None and np.shares_memory(view, model.grads.flat)
    # below the threshold nothing changes
    before = model.grads.flat.copy()
    clip_grad_norm(model.grads, 10.0)
    np.testing.assert_array_equal(model.grads.flat, before)
    # a plain dict works tensor by tensor
    d = {"a": np.full(3, 2.0), "b": np.full((2, 2), 2.0)}
    assert math.isclose(float(clip_grad_norm(d, 1.0)), math.sqrt(7 * 4.0))
    assert math.isclose(math.sqrt(sum(float(np.sum(x ** 2)) for x in d.values())), 1.0, rel_tol=1e-5)


def test_adamw_refuses_strided_parameters():
    with pytest.raises(ValueError, match="contiguous"):
        AdamW({"w": np.zeros((4, 6))[:, ::2]})


def test_adamw_chunks_give_the_same_update(monkeypatch):
    """The flat buffer is updated CHUNK elements at a time: any chunking, same numbers."""
    from npgpt import optim
    results = []
    for chunk in (optim.CHUNK, 7):
        monkeypatch.setattr(optim, "CHUNK", chunk)
        model = GPT(CFG, dtype="float64")
        opt = AdamW(model.params, lr=0.01, weight_decay=0.1)
        model.grads.flat[:] = np.random.default_rng(0).standard_normal(model.grads.flat.size)
        opt.step(model.grads)
        opt.step(model.grads)
        results.append(model.params.flat.copy())
    np.testing.assert_array_equal(results[0], results[1])
