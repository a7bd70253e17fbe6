"""The whole model: config validation, shapes and names, float64 gradient checks."""
import math

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.gradcheck import numerical_grad, rel_error

# sizes that are not powers of two, several heads, T < block_size
CFG = GPTConfig(vocab_size=13, block_size=7, n_layer=2, n_head=3, n_embd=9)


def batch(cfg, B=2, T=5, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    idx[1, 3] = idx[0, 0] = idx[1, 0]  # a token id repeated in the batch
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, 1] = -1  # a position without a target
    return idx, targets


def perturb_biases(model, seed=1):
    """Zero biases and unit LayerNorm weights hide some gradient paths: randomise them."""
    rng = np.random.default_rng(seed)
    for name, p in model.params.items():
        if p.ndim == 1:
            p += 0.1 * rng.standard_normal(p.shape)


def test_param_names_and_shapes_are_huggingface_gpt2():
    m = GPT(CFG)
    C, V = CFG.n_embd, CFG.vocab_size
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (CFG.block_size, C),
                "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(CFG.n_layer):
        h = f"transformer.h.{i}."
        expected.update({h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
                         h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
                         h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
                         h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
                         h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
                         h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,)})
    assert {n: p.shape for n, p in m.params.items()} == expected
    assert {n: g.shape for n, g in m.grads.items()} == expected
    assert m.num_params() == sum(math.prod(s) for s in expected.values())


def test_params_are_views_of_one_flat_buffer():
    m = GPT(CFG)
    m.params.flat[:] = 0.5
    assert all(np.all(p == 0.5) for p in m.params.values())
    m.params["transformer.ln_f.bias"][...] = 2.0
    assert m.params.flat[-1] == 2.0


def test_initialisation_follows_gpt2():
    cfg = GPTConfig(vocab_size=300, block_size=64, n_layer=4, n_head=4, n_embd=64)
    p = GPT(cfg, seed=3).params
    assert abs(p["transformer.wte.weight"].std() - 0.02) < 0.001
    assert abs(p["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 0.001
    assert abs(p["transformer.h.1.attn.c_proj.weight"].std() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(p["transformer.h.1.mlp.c_proj.weight"].std() - 0.02 / math.sqrt(8)) < 0.001
    assert np.all(p["transformer.h.0.ln_1.weight"] == 1) and np.all(p["transformer.h.0.ln_1.bias"] == 0)
    assert np.all(p["transformer.h.2.attn.c_attn.bias"] == 0)
    # a seed gives the same model, another seed a different one
    np.testing.assert_array_equal(GPT(cfg, seed=3).params.flat, GPT(cfg, seed=3).params.flat)
    assert not np.array_equal(GPT(cfg, seed=3).params.flat, GPT(cfg, seed=4).params.flat)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=10, n_head=3), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_impossible_configs_are_rejected(kwargs, match):
    base = dict(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **kwargs})


def test_bad_inputs_raise_clear_errors():
    m = GPT(CFG)
    with pytest.raises(ValueError, match="block_size"):
        m.forward(np.zeros((1, CFG.block_size + 1), dtype=int))
    with pytest.raises(ValueError, match="token ids"):
        m.forward(np.full((1, 3), CFG.vocab_size))
    with pytest.raises(ValueError, match="shape"):
        m.forward(np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="integer"):
        m.forward(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="targets shape"):
        m.forward(np.zeros((1, 3), dtype=int), np.zeros((1, 2), dtype=int))
    with pytest.raises(ValueError, match="ignore_index"):
        m.forward(np.zeros((1, 3), dtype=int), np.full((1, 3), -1))
    with pytest.raises(RuntimeError, match="forward"):
        m.backward()
    with pytest.raises(ValueError, match="dtype"):
        GPT(CFG, dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_dtypes_and_shapes(dtype):
    m = GPT(CFG, dtype=dtype)
    idx, targets = batch(CFG)
    logits, loss = m.forward(idx, targets)
    assert logits.shape == (2, 5, CFG.vocab_size) and logits.dtype == np.dtype(dtype)
    # the loss stays an array of the model's dtype (no host read in forward)
    assert np.ndim(loss) == 0 and loss.dtype == np.dtype(dtype)
    assert abs(float(loss) - math.log(CFG.vocab_size)) < 0.1
    grads = m.backward()
    assert all(g.dtype == np.dtype(dtype) for g in grads.values())
    assert m.forward(idx)[1] is None


def whole_model_loss(model, idx, targets, train, rng_state):
    def f():
        if rng_state is not None:
            model.rng.set_state(rng_state)  # the same dropout masks every call
        return model.forward(idx, targets, train=train)[1]
    return f


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_whole_model_gradient_check_every_parameter(dropout):
    cfg = GPTConfig(**{**CFG.__dict__, "dropout": dropout})
    m = GPT(cfg, seed=0, dtype="float64")
    perturb_biases(m)
    idx, targets = batch(cfg)
    state = m.rng.state() if dropout else None
    f = whole_model_loss(m, idx, targets, dropout > 0, state)
    f()
    analytic = {n: g.copy() for n, g in m.backward().items()}
    for name, p in m.params.items():
        numeric = numerical_grad(f, p)
        err = rel_error(numeric, analytic[name])
        assert err <= 1e-6, f"{name}: relative error {err:.2e}"
        assert np.linalg.norm(analytic[name]) > 0 or name == "transformer.wpe.weight"


def test_whole_model_directional_derivative():
    """Along random directions u: (L(p + h u) - L(p - h u)) / 2h == <grad, u>."""
    m = GPT(CFG, seed=5, dtype="float64")
    perturb_biases(m)
    idx, targets = batch(CFG, seed=2)
    m.forward(idx, targets)
    g = m.backward().flat.copy()
    p0 = m.params.flat.copy()
    rng = np.random.default_rng(0)
    for _ in range(5):
        u = rng.standard_normal(p0.shape)
        u /= np.linalg.norm(u)
        h = 1e-5
        m.params.flat[:] = p0 + h * u
        lp = m.forward(idx, targets)[1]
        m.params.flat[:] = p0 - h * u
        lm = m.forward(idx, targets)[1]
        numeric, analytic = (lp - lm) / (2 * h), float(g @ u)
        assert abs(numeric - analytic) <= 1e-6 * (abs(numeric) + abs(analytic)) + 1e-12
    m.params.flat[:] = p0


def test_tied_head_gradient_adds_into_the_embedding():
    m = GPT(CFG, dtype="float64")
    idx, targets = batch(CFG)
    m.forward(idx, targets)
    m.backward()
    total = m.grads["transformer.wte.weight"].copy()
    # the head's share alone: dlogits.T @ ln_f(x)
    head_only = m.head.cache  # (x, wte) of the head's forward
    m.forward(idx, targets)
    from npgpt import ops
    (dlogits,) = ops.cross_entropy_backward(1.0, m._loss_cache)
    _, dwte_head = ops.head_backward(dlogits, head_only)
    assert np.linalg.norm(total - dwte_head) > 0  # the embedding's scatter part is there too
    unused = np.setdiff1d(np.arange(CFG.vocab_size), idx)
    np.testing.assert_allclose(total[unused], dwte_head[unused], rtol=1e-12)


def test_backward_accumulate_adds_and_default_refills():
    m = GPT(CFG, dtype="float64")
    idx, targets = batch(CFG)
    m.forward(idx, targets)
    g1 = m.backward().flat.copy()
    m.forward(idx, targets)
    m.backward(accumulate=True)
    np.testing.assert_allclose(m.grads.flat, 2 * g1, rtol=1e-12)
    m.forward(idx, targets)
    np.testing.assert_array_equal(m.backward().flat, g1)


def test_dropout_only_in_training_and_reproducible():
    cfg = GPTConfig(**{**CFG.__dict__, "dropout": 0.3})
    idx, targets = batch(cfg)
    a, b = GPT(cfg, seed=1), GPT(cfg, seed=1)
    assert a.forward(idx, targets)[1] == a.forward(idx, targets)[1]  # eval: deterministic
    la = [a.forward(idx, targets, train=True)[1] for _ in range(2)]
    lb = [b.forward(idx, targets, train=True)[1] for _ in range(2)]
    assert la == lb and la[0] != la[1]


def test_minus_1000_logit_is_stable_through_the_model():
    m = GPT(CFG, dtype="float32")
    # ln_f's output rows then sum to 1, so token 3's logit is exactly -1000 everywhere
    m.params["transformer.wte.weight"][3] = -1000.0
    m.params["transformer.ln_f.bias"][...] = 1.0 / CFG.n_embd
    idx, targets = batch(CFG)
    targets[:] = 3
    _, loss = m.forward(idx, targets)
    assert math.isfinite(loss) and 990 < loss < 1010
    assert np.all(np.isfinite(m.backward().flat))


def test_init_false_leaves_zeros_for_a_loader():
    m = GPT(CFG, init=False)
    assert m.params.flat.dtype == np.float32 and not m.params.flat.any()


def test_backward_after_generate_is_refused():
    """Sampling overwrites the layers' caches, so a pending backward would be wrong."""
    m = GPT(CFG)
    idx, targets = batch(CFG)
    m.forward(idx, targets)
    m.generate(idx[:, :2], 2)
    with pytest.raises(RuntimeError, match="forward"):
        m.backward()


def test_public_calls_return_the_callers_arrays_unless_memory_is_reused():
    """By default a layer's output is a new array and its input is left alone, so a learner
    can keep and compare activations; reuse_memory=True (the Trainer's setting) computes
    the same numbers in reused memory."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    model = GPT(cfg, seed=1)
    assert not model.reuse_memory
    e1 = model.embedding.forward(idx)
    kept = e1.copy()
    model.embedding.forward(idx[:, ::-1].copy())
    np.testing.assert_array_equal(e1, kept)              # not overwritten by the next call
    a0 = model.blocks[0].attn.forward(e1, False)
    a0_kept = a0.copy()
    model.blocks[1].attn.forward(e1 + 1.0, False)
    np.testing.assert_array_equal(a0, a0_kept)
    out = model.blocks[0].forward(e1, False)
    np.testing.assert_array_equal(e1, kept)              # the block's input is unchanged
    assert out is not e1
    # the same numbers either way, bit for bit
    runs = []
    for reuse in (False, True):
        m = GPT(cfg, seed=1, reuse_memory=reuse)
        loss = m.forward(idx[:, :-1], idx[:, 1:])[1]
        runs.append((float(loss), m.backward().flat.copy()))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    # switching rebuilds the layers for the other policy (the training path's)
    model.reuse_memory = True
    e2 = model.embedding.forward(idx)
    assert model.blocks[0].forward(e2, False) is e2      # added in place


def test_a_warm_training_step_makes_no_new_workspace_views(monkeypatch):
    """Every step asks its workspaces for the same names in the same shapes, some names in
    several (the linear layers share one for their backward): from the second step on,
    each call hands back the view it made before (a new view costs host time: on a GPU
    the step waits for the host)."""
    from npgpt.arrays import Workspace
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg, seed=0, reuse_memory=True)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    seen, new = {}, []
    real = Workspace.__call__

    def recording(ws, name, shape, like, dtype=None):
        view = real(ws, name, shape, like, dtype)
        key = (id(ws), name, shape, like.dtype if dtype is None else dtype)
        if seen.setdefault(key, view) is not view:
            new.append(name)
        seen[key] = view
        return view

    monkeypatch.setattr(Workspace, "__call__", recording)
    for step in range(3):
        new.clear()
        model.forward(idx[:, :-1], idx[:, 1:], train=True)
        model.backward()
    assert seen and not new, f"views made anew in a warm step: {sorted(set(new))}"
