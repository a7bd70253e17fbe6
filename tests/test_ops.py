"""Float64 central-difference gradient checks of every op, in isolation."""
import math

import numpy as np
import pytest

from conftest import cut_into_blocks
from npgpt import arrays, ops
from npgpt.arrays import FRESH, Workspace
from npgpt.gradcheck import check_op, numerical_grad, rel_error

TOL = 1e-6
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def assert_close(errors):
    assert errors, "nothing was checked"
    for i, err in errors.items():
        assert err <= TOL, f"input {i}: relative error {err:.2e} > {TOL}"


def test_linear():
    assert_close(check_op(ops.linear_forward, ops.linear_backward,
                          [randn(2, 3, 5), randn(5, 7), randn(7)]))


def test_layernorm():
    x = randn(2, 3, 6) * 3.0 + 1.0
    assert_close(check_op(ops.layernorm_forward, ops.layernorm_backward,
                          [x, randn(6), randn(6)]))


def test_gelu():
    assert_close(check_op(ops.gelu_forward, ops.gelu_backward, [randn(3, 5, 7) * 2.0]))


@pytest.mark.parametrize("op, shapes", [
    ("layernorm", [(5, 3, 6), (6,), (6,)]), ("gelu", [(5, 3, 7)])])
def test_row_blocks_give_the_whole_arrays_results(monkeypatch, op, shapes):
    """LayerNorm and GELU cut big arrays into blocks of rows (arrays.row_blocks): the same
    results, float64 to 1e-12, as one block of everything."""
    args = [randn(*s) for s in shapes]
    fwd, bwd = getattr(ops, op + "_forward"), getattr(ops, op + "_backward")
    out, cache = fwd(*args)
    dout = randn(*out.shape)
    want = bwd(dout, cache)
    cut_into_blocks(monkeypatch, 2 * shapes[0][-1])  # two rows a block
    assert len(arrays.row_blocks(args[0])) == 8
    got_out, cache = fwd(*args)
    np.testing.assert_allclose(got_out, out, rtol=0, atol=1e-12)
    for g, w in zip(bwd(dout, cache), want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


def test_gelu_matches_definition():
    x = np.linspace(-5, 5, 101)
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(ops.gelu_forward(x.copy())[0], ref, rtol=1e-12)


def test_head():
    assert_close(check_op(ops.head_forward, ops.head_backward, [randn(2, 3, 5), randn(7, 5)]))


def test_embedding_with_repeated_ids():
    idx = np.array([[1, 4, 1, 1], [4, 0, 2, 1]])  # token 1 appears 4 times, token 4 twice
    errors = check_op(lambda wte, wpe: ops.embedding_forward(idx, wte, wpe),
                      ops.embedding_backward, [randn(6, 5), randn(7, 5)])
    assert_close(errors)
    # and the scatter really sums: the row of token 1 gets four contributions
    dout = np.ones((2, 4, 5))
    dwte, dwpe = ops.embedding_backward(dout, ops.embedding_forward(idx, randn(6, 5), randn(7, 5))[1])
    assert dwte[1, 0] == 4.0 and dwte[3, 0] == 0.0
    assert dwpe[0, 0] == 2.0 and dwpe[5, 0] == 0.0


def test_dropout_with_fixed_mask():
    mask = ops.dropout_mask((3, 4, 5), 0.3, np.random.default_rng(1), np.float64)
    assert set(np.unique(mask)) <= {0.0, 1.0 / 0.7}
    errors = check_op(lambda x: ops.dropout_forward(x, mask), ops.dropout_backward, [randn(3, 4, 5)])
    assert_close(errors)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dropout_mask_is_the_keep_draw_scaled(dtype):
    """A seed draws the masks it always drew: kept where a uniform number (float32 at
    least) is >= p, 1/(1-p) there and 0 elsewhere, in the model's dtype."""
    p, shape = 0.37, (4, 50, 50)
    mask = ops.dropout_mask(shape, p, np.random.default_rng(5), dtype)
    draw = np.random.default_rng(5).random(shape, dtype=np.promote_types(dtype, np.float32))
    assert mask.dtype == dtype
    np.testing.assert_array_equal(mask, np.where(draw >= p, dtype(1.0 / (1.0 - p)), dtype(0)))


@pytest.mark.parametrize("B,T,nh,hs", [(2, 5, 3, 4), (3, 7, 2, 3), (1, 1, 1, 5)])
def test_attention(B, T, nh, hs):
    qkv = randn(B, T, 3 * nh * hs)
    assert_close(check_op(lambda x: ops.attention_forward(x, nh), ops.attention_backward, [qkv]))


def test_attention_with_dropout_mask():
    B, T, nh, hs = 2, 6, 3, 2
    mask = ops.dropout_mask((B, nh, T, T), 0.25, np.random.default_rng(3), np.float64)
    assert_close(check_op(lambda x: ops.attention_forward(x, nh, mask), ops.attention_backward,
                          [randn(B, T, 3 * nh * hs)]))


def test_attention_is_causal_and_masked_entries_get_zero_gradient():
    B, T, nh, hs = 2, 6, 2, 3
    qkv = randn(B, T, 3 * nh * hs)
    y, cache = ops.attention_forward(qkv, nh)
    att = cache.att
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert np.all(att[..., future] == 0.0)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-12)
    # changing the last position's q, k, v must not change earlier outputs
    qkv2 = qkv.copy()
    qkv2[:, -1] += 10.0
    y2, _ = ops.attention_forward(qkv2, nh)
    np.testing.assert_array_equal(y[:, :-1], y2[:, :-1])
    # the gradient of the pre-softmax scores is exactly 0 on masked entries:
    # perturbing a future key leaves every earlier query's output gradient at exactly 0
    dy = np.zeros_like(y)
    dy[:, 0] = randn(B, nh * hs)  # only position 0's output matters
    (dqkv,) = ops.attention_backward(dy, cache)
    C = nh * hs
    assert np.all(dqkv[:, 1:, C:2 * C] == 0.0), "keys after position 0 must get exactly 0"
    assert np.all(dqkv[:, 1:, 2 * C:] == 0.0), "values after position 0 must get exactly 0"


def test_attention_matches_loop_reference():
    B, T, nh, hs = 2, 5, 3, 4
    qkv = randn(B, T, 3 * nh * hs)
    y, _ = ops.attention_forward(qkv, nh)
    C = nh * hs
    for b in range(B):
        for h in range(nh):
            q = qkv[b, :, h * hs:(h + 1) * hs]
            k = qkv[b, :, C + h * hs:C + (h + 1) * hs]
            v = qkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            for t in range(T):
                s = q[t] @ k[:t + 1].T / math.sqrt(hs)
                w = np.exp(s - s.max())
                w /= w.sum()
                np.testing.assert_allclose(y[b, t, h * hs:(h + 1) * hs], w @ v[:t + 1], rtol=1e-12)


def test_cross_entropy_with_ignore_index():
    targets = np.array([[1, -1, 3], [0, 4, -1]])
    errors = check_op(lambda z: ops.cross_entropy_forward(z, targets),
                      ops.cross_entropy_backward, [randn(2, 3, 5)])
    assert_close(errors)
    logits = randn(2, 3, 5)
    loss, cache = ops.cross_entropy_forward(logits, targets)
    z = logits.reshape(-1, 5)
    t = targets.reshape(-1)
    nll = [np.log(np.exp(z[i]).sum()) - z[i, t[i]] for i in range(6) if t[i] != -1]
    assert math.isclose(float(loss), np.mean(nll), rel_tol=1e-12)
    (dlogits,) = ops.cross_entropy_backward(1.0, cache)
    assert np.all(dlogits[0, 1] == 0.0) and np.all(dlogits[1, 2] == 0.0)


def test_cross_entropy_is_stable_at_minus_1000_logits():
    logits = np.zeros((1, 2, 4))
    logits[0, 0, 2] = -1000.0  # the target's logit
    logits[0, 1, :] = [-1000.0, 0.0, -1000.0, -1000.0]
    targets = np.array([[2, 1]])
    loss, cache = ops.cross_entropy_forward(logits, targets)
    (dlogits,) = ops.cross_entropy_backward(1.0, cache)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(dlogits))
    expected = (1000.0 + np.log(3.0 + np.exp(-1000.0))) / 2  # row 0 nll; row 1 nll ~ 0
    assert math.isclose(float(loss), expected, rel_tol=1e-12)
    assert math.isclose(dlogits[0, 0, 2], (0.0 - 1.0) / 2, abs_tol=1e-12)
    # float32 too
    loss32, _ = ops.cross_entropy_forward(logits.astype(np.float32), targets)
    assert np.isfinite(float(loss32)) and loss32.dtype == np.float32


@pytest.mark.parametrize("name,forward,shapes", [
    ("linear", ops.linear_forward, [(2, 3, 8), (8, 6), (6,)]),
    ("layernorm", ops.layernorm_forward, [(2, 3, 8), (8,), (8,)]),
    ("gelu", ops.gelu_forward, [(2, 3, 8)]),
    ("attention", lambda x: ops.attention_forward(x, 2), [(2, 4, 12)]),
    ("head", ops.head_forward, [(2, 3, 8), (5, 8)]),
])
def test_float32_stays_float32(name, forward, shapes):
    inputs = [randn(*s).astype(np.float32) for s in shapes]
    out, _ = forward(*inputs)
    assert out.dtype == np.float32, f"{name} forward promoted float32 to {out.dtype}"


def test_float32_backward_dtypes():
    f32 = np.float32
    x, w, b = randn(2, 3, 8).astype(f32), randn(8).astype(f32), randn(8).astype(f32)
    _, cache = ops.layernorm_forward(x, w, b)
    assert all(g.dtype == f32 for g in ops.layernorm_backward(np.ones_like(x), cache))
    _, cache = ops.gelu_forward(x)
    assert ops.gelu_backward(np.ones_like(x), cache)[0].dtype == f32
    qkv = randn(2, 4, 12).astype(f32)
    y, cache = ops.attention_forward(qkv, 2)
    assert ops.attention_backward(np.ones_like(y), cache)[0].dtype == f32
    logits = randn(2, 3, 5).astype(f32)
    loss, cache = ops.cross_entropy_forward(logits, np.array([[0, 1, -1], [2, 3, 4]]))
    assert loss.dtype == f32 and ops.cross_entropy_backward(1.0, cache)[0].dtype == f32


def test_numerical_grad_itself():
    x = randn(3, 4)
    g = numerical_grad(lambda: np.sum(np.sin(x)), x)
    assert rel_error(g, np.cos(x)) < 1e-9


def test_a_workspace_hands_out_its_memory_by_name_and_shape():
    ws, like = Workspace(), np.zeros(1, np.float32)
    a = ws("x", (2, 3), like)
    assert ws("x", (2, 3), like) is a            # the same shape: the same view
    b = ws("x", (3, 2), like)                    # another shape: the same memory
    assert b.shape == (3, 2) and np.shares_memory(a, b)
    assert ws("x", (2, 3), like) is a and ws("x", (3, 2), like) is b  # each shape's view
    c = ws("x", (4, 4), like)                    # larger: new memory, kept from now on
    assert c.shape == (4, 4) and not np.shares_memory(a, c)
    again = ws("x", (2, 3), like)                # a view of the new memory, not a's
    assert again is not a and np.shares_memory(again, c)
    d = ws("x", (2, 3), like, np.dtype(np.float64))  # one array per dtype
    assert d.dtype == np.float64 and not np.shares_memory(d, c)
    assert not np.shares_memory(ws("y", (2, 3), like), c)  # one array per name
    fresh = [FRESH("x", (2, 3), like) for _ in range(2)]   # FRESH: always new
    assert fresh[0].shape == (2, 3) and not np.shares_memory(*fresh)
