"""The textbook ops in reference.py: their gradients by central differences, their
agreement with the fast ops in ops.py, and their dtypes."""
import inspect

import numpy as np
import pytest

from npgpt import ops, reference
from npgpt.gradcheck import check_op

TOL = 1e-6
rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


def mask(shape, p=0.25, seed=3):
    return ops.dropout_mask(shape, p, np.random.default_rng(seed), np.float64)


IDX = np.array([[1, 4, 1, 1], [4, 0, 2, 1]])          # token 1 four times, token 4 twice
TARGETS = np.array([[1, -1, 3], [0, 4, -1], [2, 2, -1]])  # three ignored positions


def ce_logits():
    z = randn(3, 3, 5)
    z[0, 0, 1] = -1000.0  # a target's logit: its probability underflows to 0
    z[1, 1, 0] = -1000.0  # a non-target logit
    return z


# name -> (op name, floating-point inputs, function of them giving the forward's arguments)
CASES = {
    "embedding": ("embedding", lambda: [randn(6, 5), randn(7, 5)],
                  lambda wte, wpe: (IDX, wte, wpe)),
    "linear": ("linear", lambda: [randn(2, 3, 5), randn(5, 7), randn(7)], lambda *a: a),
    "head": ("head", lambda: [randn(2, 3, 5), randn(7, 5)], lambda *a: a),
    "layernorm": ("layernorm", lambda: [randn(2, 3, 6) * 3.0 + 1.0, randn(6), randn(6)],
                  lambda *a: a),
    "layernorm_eps": ("layernorm", lambda: [randn(4, 6) * 0.01, randn(6), randn(6)],
                      lambda x, w, b: (x, w, b, 1e-3)),
    "gelu": ("gelu", lambda: [randn(3, 5, 7) * 2.0], lambda *a: a),
    "dropout": ("dropout", lambda: [randn(3, 4, 5), mask((3, 4, 5), 0.3, 1)],
                lambda x, m: (x, m)),
    "attention": ("attention", lambda: [randn(2, 5, 3 * 3 * 4)], lambda x: (x, 3)),
    "attention_one_position": ("attention", lambda: [randn(1, 1, 3 * 5)], lambda x: (x, 1)),
    "attention_dropout": ("attention", lambda: [randn(2, 6, 3 * 3 * 2), mask((2, 3, 6, 6))],
                          lambda x, m: (x, 3, m)),
    "cross_entropy": ("cross_entropy", lambda: [ce_logits()], lambda z: (z, TARGETS)),
    "cross_entropy_ignore_4": ("cross_entropy", lambda: [ce_logits()],
                               lambda z: (z, np.where(TARGETS == -1, 4, TARGETS), 4)),
}


def pair(module, op):
    return getattr(module, op + "_forward"), getattr(module, op + "_backward")


def differentiable(case, inputs):
    """The inputs the gradient is taken of: every float input but a dropout mask."""
    return inputs[:1] if case in ("dropout", "attention_dropout") else inputs


@pytest.mark.parametrize("case", CASES)
def test_reference_gradients_by_central_differences(case):
    op, make, args = CASES[case]
    forward, backward = pair(reference, op)
    inputs = make()
    fixed = inputs[len(differentiable(case, inputs)):]
    errors = check_op(lambda *x: forward(*args(*x, *fixed)), backward,
                      differentiable(case, inputs))
    assert errors
    for i, err in errors.items():
        assert err <= TOL, f"{case} input {i}: relative error {err:.2e} > {TOL}"


def run(module, op, arguments, dout):
    forward, backward = pair(module, op)
    out, cache = forward(*arguments)
    return out, backward(dout, cache)


def assert_agree(got, want, rtol, what):
    """Equal to rtol, entries that cancel to near 0 to a bound relative to the largest
    (float32 rounds the two formulas of attention's row sums differently: 1e-5)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    atol = (1e-13 if want.dtype == np.float64 else 1e-5) * float(np.abs(want).max(initial=0.0))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("case", CASES)
def test_reference_agrees_with_ops(case, dtype, rtol):
    op, make, args = CASES[case]
    arguments = args(*[x.astype(dtype) for x in make()])
    out, _ = pair(reference, op)[0](*arguments)
    dout = np.asarray(randn(*np.shape(out)), dtype=dtype)
    want_out, want_grads = run(ops, op, arguments, dout)
    got_out, got_grads = run(reference, op, arguments, dout)
    assert_agree(got_out, want_out, rtol, f"{case} forward")
    assert len(got_grads) == len(want_grads)
    for i, (got, want) in enumerate(zip(got_grads, want_grads)):
        assert_agree(got, want, rtol, f"{case} gradient {i}")


@pytest.mark.parametrize("case", CASES)
def test_reference_keeps_float32(case):
    op, make, args = CASES[case]
    arguments = args(*[x.astype(np.float32) for x in make()])
    out, cache = pair(reference, op)[0](*arguments)
    assert np.asarray(out).dtype == np.float32, f"{case} forward gave {np.asarray(out).dtype}"
    dout = np.ones(np.shape(out), dtype=np.float32)
    for i, grad in enumerate(pair(reference, op)[1](dout, cache)):
        assert grad.dtype == np.float32, f"{case} gradient {i} is {grad.dtype}"


def test_cross_entropy_reference_details():
    logits = ce_logits()
    loss, cache = reference.cross_entropy_forward(logits, TARGETS)
    (dlogits,) = reference.cross_entropy_backward(1.0, cache)
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    assert np.all(dlogits[TARGETS == -1] == 0.0)                       # ignored rows
    assert abs(dlogits[0, 0, 1] - (0.0 - 1.0) / 6) < 1e-12  # p = 0 at the -1000 target
    assert loss > 1000.0 / 6                                # that row alone costs ~1000


def test_reference_embedding_sums_repeated_tokens():
    _, cache = reference.embedding_forward(IDX, randn(6, 5), randn(7, 5))
    dwte, dwpe = reference.embedding_backward(np.ones((2, 4, 5)), cache)
    assert dwte[1, 0] == 4.0 and dwte[4, 0] == 2.0 and dwte[3, 0] == 0.0
    assert dwpe[0, 0] == 2.0 and np.all(dwpe[4:] == 0.0)


def test_reference_attention_masked_entries_get_zero_gradient():
    B, T, nh, hs = 2, 6, 2, 3
    C = nh * hs
    y, cache = reference.attention_forward(randn(B, T, 3 * C), nh)
    dy = np.zeros_like(y)
    dy[:, 0] = randn(B, C)  # only position 0's output matters
    (dqkv,) = reference.attention_backward(dy, cache)
    assert np.all(dqkv[:, 1:, C:] == 0.0), "later keys and values must get exactly 0"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_with_cache_matches_ops_and_attention_forward(dtype):
    B, T, nh, hs, block_size = 2, 7, 3, 4, 9
    qkv = randn(B, T, 3 * nh * hs).astype(dtype)
    full, _ = reference.attention_forward(qkv, nh)
    caches = {m: [np.zeros((B, nh, block_size, hs), dtype) for _ in "kv"]
              for m in (ops, reference)}
    rows = {m: [] for m in (ops, reference)}
    for pos, end in [(0, 3), (3, 4), (4, 7)]:  # a prompt, one token, then two more at once
        for m in (ops, reference):
            rows[m].append(m.attention_with_cache(qkv[:, pos:end], nh, *caches[m], pos))
    got, want = np.concatenate(rows[reference], axis=1), np.concatenate(rows[ops], axis=1)
    assert got.dtype == dtype
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    assert_agree(got, want, rtol, "reference vs ops")
    assert_agree(got, full, rtol, "cached rows vs attention_forward")
    for c_ref, c_ops in zip(caches[reference], caches[ops]):
        np.testing.assert_array_equal(c_ref, c_ops)


def test_every_fast_op_has_a_reference_with_its_signature():
    forwards = [n for n in dir(ops) if n.endswith("_forward")]
    assert len(forwards) == 8
    names = forwards + [n[:-len("forward")] + "backward" for n in forwards]
    names.append("attention_with_cache")
    for name in names:
        fast = [(p.name, p.default)
                for p in inspect.signature(getattr(ops, name)).parameters.values()
                if p.name != "ws" and p.kind is not inspect.Parameter.KEYWORD_ONLY]
        ref = [(p.name, p.default)
               for p in inspect.signature(getattr(reference, name)).parameters.values()]
        assert ref == fast, name
        assert f"reference.{name}" in getattr(ops, name).__doc__, f"ops.{name} names no reference"

