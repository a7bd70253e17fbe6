"""npgpt.exercises.grade: the right backward passes pass; wrong ones that learners really
write are rejected, each with a diagnosis that names the kind of mistake."""
import importlib.util
import math

import numpy as np
import pytest

from npgpt import reference as R
from npgpt.exercises import NAMES, grade
from npgpt.reference import _heads, _merge

OPS = ("linear", "layernorm", "gelu", "attention", "cross_entropy", "embedding")


def graded(capsys, name, fn):
    """(grade's verdict, what it printed)."""
    ok = grade(name, fn)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return ok, out


# ----------------------------------------------------------------------------
# right answers pass


@pytest.mark.parametrize("name", OPS)
def test_reference_backward_passes(capsys, name):
    ok, out = graded(capsys, name, getattr(R, name + "_backward"))
    assert ok, out
    assert "WRONG" not in out and out.count(" ok  (max rel error") >= 1


def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """A learner's AdamW step, written from the formula (in place, as many write it)."""
    if p.ndim >= 2:
        p *= 1.0 - lr * weight_decay
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * g ** 2
    mhat, vhat = m / (1.0 - beta1 ** t), v / (1.0 - beta2 ** t)
    p -= lr * mhat / (np.sqrt(vhat) + eps)
    return p, m, v


def test_adamw_step_passes(capsys):
    ok, out = graded(capsys, "adamw", adamw_step)
    assert ok, out
    assert [line.split()[:2] for line in out.splitlines()] == [[o, "ok"] for o in "pmv"]


@pytest.mark.skipif(importlib.util.find_spec("npgpt.reference_gpt") is None,
                    reason="npgpt/reference_gpt.py (helper C's) is not there yet")
def test_reference_gpt_backward_passes(capsys):
    from npgpt import reference_gpt
    ok, out = graded(capsys, "gpt", reference_gpt.gpt_backward)
    assert ok, out
    assert out.startswith("all 28 gradients ok")


def test_a_second_call_gives_the_same_verdict_after_a_learner_that_mutates_its_inputs(capsys):
    def vandal(dout, cache):
        x, w = cache
        grads = R.linear_backward(dout, cache)
        x[...], w[...], dout[...] = 0.0, 0.0, 0.0  # changes the copies it was handed
        return grads
    assert graded(capsys, "linear", vandal)[0]
    assert graded(capsys, "linear", R.linear_backward)[0]


# ----------------------------------------------------------------------------
# the learner's function as a whole


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("unwritten", ["none", "notimplemented", "raise"])
def test_not_written_yet(capsys, name, unwritten):
    def fn(*args):
        if unwritten == "raise":
            raise NotImplementedError
        return None if unwritten == "none" else NotImplemented
    ok, out = graded(capsys, name, fn)
    assert not ok
    assert out == f"{name}: not written yet\n"


def test_an_exception_in_learner_code_is_reported_with_its_message_and_line(capsys):
    def linear_backward(dout, cache):
        x, w = cache
        dx = dout @ w  # should be w.T
        return dx, x, w
    ok, out = graded(capsys, "linear", linear_backward)
    assert not ok and len(out.splitlines()) == 1
    assert "ValueError" in out and "mismatch" in out and "dx = dout @ w" in out


def test_the_wrong_number_of_gradients_says_the_order(capsys):
    ok, out = graded(capsys, "linear", lambda dout, cache: R.linear_backward(dout, cache)[:2])
    assert not ok and "returned 2 gradients, expected 3, in this order: (dx, dw, db)" in out


def test_an_unknown_exercise_lists_the_valid_ones():
    with pytest.raises(ValueError, match="linear, layernorm, .*adamw, gpt"):
        grade("softmax", R.linear_backward)


# ----------------------------------------------------------------------------
# wrong answers learners write, and what the diagnosis must say


def _lin(dx=1.0, dw=1.0, first_row=False, first_position=False, transpose=False,
         dtype=np.float64):
    def backward(dout, cache):
        x, w = cache
        gx, gw, gb = R.linear_backward(dout, cache)
        if first_row:
            gw = x[0].T @ dout[0]
        if first_position:
            gw = x[:, 0].T @ dout[:, 0]
        N = dout.size // dout.shape[-1]
        gw = gw.T if transpose else gw * (1.0 / N if dw == "mean" else dw)
        return tuple(a.astype(dtype) for a in (gx * dx, gw, gb))
    return backward


def _ln(dx_of=None, db_axes=None):
    def backward(dout, cache):
        xhat, std, w = cache
        dx, dw, db = R.layernorm_backward(dout, cache)
        dx = dx if dx_of is None else dx_of(dout, xhat, std, w)
        return dx, dw, db if db_axes is None else dout.sum(axis=db_axes)
    return backward


def _mean(a):
    return a.mean(axis=-1, keepdims=True)


def _gelu(factor=1.0, product_rule=True, dtanh=lambda t: 1.0 - t ** 2, bare=False):
    def backward(dout, x):
        t = np.tanh(R.GELU_K * (x + R.GELU_A * x ** 3))
        dudx = R.GELU_K * (1.0 + 3.0 * R.GELU_A * x ** 2)
        product = 0.5 * x * dtanh(t) * dudx if product_rule else 0.0
        dx = dout * factor * (0.5 * (1.0 + t) + product)
        return dx if bare else (dx,)
    return backward


def _att(scale=True, mask=lambda m: m, softmax_term=True, dv_from_att=False):
    def backward(dy, cache):
        q, k, v, att, a, att_mask = cache
        hs = q.shape[-1]
        s = 1.0 / math.sqrt(hs) if scale else 1.0
        dy = _heads(dy, q.shape[1])
        dv = (att if dv_from_att else a).transpose(0, 1, 3, 2) @ dy
        da = dy @ v.transpose(0, 1, 3, 2)
        m = None if att_mask is None else mask(att_mask)
        datt = da if m is None else da * m
        ds = att * (datt - ((datt * att).sum(axis=-1, keepdims=True) if softmax_term else 0.0))
        dq, dk = ds @ k * s, ds.transpose(0, 1, 3, 2) @ q * s
        return (np.concatenate([_merge(dq), _merge(dk), _merge(dv)], axis=-1),)
    return backward


def _att_not_causal(dy, cache):
    """Recomputes the attention weights from q and k, forgetting the causal mask."""
    q, k, v, _, _, att_mask = cache
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    att = np.exp(s - s.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    a = att if att_mask is None else att * att_mask
    return R.attention_backward(dy, (q, k, v, att, a, att_mask))


def _ce(zero_ignored=True, count="n", use_dloss=True, sign=1.0, rows_from_t=False,
        onehot=True, probs=np.exp):
    def backward(dloss, cache):
        logp, t, rows, shape = cache
        if rows_from_t:
            rows = np.flatnonzero(t != -1)
        d = np.zeros_like(logp)
        r = rows if zero_ignored else np.arange(len(t))
        d[r] = probs(logp[r])
        if onehot:
            d[r, t[r]] -= 1.0
        d *= sign * (dloss if use_dloss else 1.0) / (len(rows) if count == "n" else len(t))
        return (d.reshape(shape),)
    return backward


def _emb(overwrite=False, dwpe="sum"):
    def backward(dout, cache):
        idx, wte_shape, wpe_shape = cache
        T = idx.shape[1]
        dwte = np.zeros(wte_shape)
        if overwrite:
            dwte[idx] += dout
        else:
            np.add.at(dwte, idx, dout)
        if dwpe == "short":
            return dwte, dout.sum(axis=0)
        rows = {"sum": dout.sum(axis=0), "mean": dout.mean(axis=0), "first": dout[0]}[dwpe]
        full = np.zeros(wpe_shape)
        full[:T] = rows
        return dwte, full
    return backward


def _adamw(bias=True, t_shift=0, decay="matrix", coupled=False):
    def step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
        decays = decay == "all" or (decay == "matrix" and p.ndim >= 2)
        if coupled and decays:
            g = g + weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        t = t + t_shift
        mhat, vhat = (m / (1 - beta1 ** t), v / (1 - beta2 ** t)) if bias else (m, v)
        if decays and not coupled:
            p = p * (1.0 - lr * weight_decay)
        return p - lr * mhat / (np.sqrt(vhat) + eps), m, v
    return step


def _gpt(edit):
    def backward(cache):
        from npgpt import reference_gpt
        g = reference_gpt.gpt_backward(cache)
        edit(g, cache)
        return g
    return backward


def _put(g, prefix, grads):
    """An op's (dx, dweight, dbias): stores dweight and dbias in g under prefix, returns dx."""
    dx, g[prefix + "weight"], g[prefix + "bias"] = grads
    return dx


def _gpt_no_mlp_residual(cache):
    """gpt_backward written out, with the MLP residual's pass-through forgotten."""
    from npgpt.reference_gpt import WPE, WTE
    g = {}
    (dlogits,) = R.cross_entropy_backward(1.0, cache["loss"])
    dxf, dwte_head = R.head_backward(dlogits, cache["head"])
    dx = _put(g, "transformer.ln_f.", R.layernorm_backward(dxf, cache["ln_f"]))
    for i in reversed(range(len(cache["blocks"]))):
        h, c = f"transformer.h.{i}.", cache["blocks"][i]
        dm = _put(g, h + "mlp.c_proj.", R.linear_backward(dx, c["mlp_c_proj"]))
        (dm,) = R.gelu_backward(dm, c["gelu"])
        da = _put(g, h + "mlp.c_fc.", R.linear_backward(dm, c["c_fc"]))
        dx = _put(g, h + "ln_2.", R.layernorm_backward(da, c["ln_2"]))  # forgot: dx + this
        dy = _put(g, h + "attn.c_proj.", R.linear_backward(dx, c["attn_c_proj"]))
        (dqkv,) = R.attention_backward(dy, c["attn"])
        da = _put(g, h + "attn.c_attn.", R.linear_backward(dqkv, c["c_attn"]))
        dx = dx + _put(g, h + "ln_1.", R.layernorm_backward(da, c["ln_1"]))
    dwte_emb, g[WPE] = R.embedding_backward(dx, cache["embedding"])
    g[WTE] = dwte_head + dwte_emb
    return g


def _head_only_wte(g, cache):
    (dlogits,) = R.cross_entropy_backward(1.0, cache["loss"])
    g["transformer.wte.weight"] = R.head_backward(dlogits, cache["head"])[1]


def _scale(name, factor):
    def edit(g, cache):
        g[name] = g[name] * factor
    return edit


MUTANTS = {  # id: (exercise, wrong function, phrases the diagnosis must contain)
    "linear: dw averaged": ("linear", _lin(dw="mean"), ["dw ", "1/(B*T)", "average"]),
    "linear: dx sign": ("linear", _lin(dx=-1.0), ["dx ", "sign"]),
    "linear: dw transposed": ("linear", _lin(transpose=True), ["shape", "(5, 3)", "transposed"]),
    "linear: dw of the first batch row": ("linear", _lin(first_row=True),
                                          ["right for B = 1, wrong for B > 1"]),
    "linear: dw of the first position": ("linear", _lin(first_position=True),
                                         ["right for T = 1, wrong for T > 1"]),
    "linear: float32": ("linear", _lin(dtype=np.float32), ["dtype float32"]),
    "layernorm: no mean term": (
        "layernorm", _ln(lambda d, xh, s, w: (d * w - xh * _mean(d * w * xh)) / s),
        ["-mean(dxhat)"]),
    "layernorm: no variance term": (
        "layernorm", _ln(lambda d, xh, s, w: (d * w - _mean(d * w)) / s),
        ["xhat * mean(dxhat * xhat)"]),
    "layernorm: w forgotten": (
        "layernorm", _ln(lambda d, xh, s, w: (d - _mean(d) - xh * _mean(d * xh)) / s),
        ["forgets w"]),
    "layernorm: db over the batch only": ("layernorm", _ln(db_axes=0), ["db ", "shape"]),
    "gelu: half": ("gelu", _gelu(factor=0.5), ["1/2"]),
    "gelu: product rule": ("gelu", _gelu(product_rule=False), ["misses the 0.5 x (1 - tanh(u)^2)"]),
    "gelu: tanh derivative": ("gelu", _gelu(dtanh=lambda t: 1.0 - t), ["1 - tanh^2"]),
    "gelu: bare array": ("gelu", _gelu(bare=True), ["1-tuple (dx,)"]),
    "attention: no 1/sqrt(hs)": ("attention", _att(scale=False),
                                 ["right for the v part", "sqrt(hs) times", "1/sqrt(hs)"]),
    "attention: mask forgotten": ("attention", _att(mask=lambda m: None),
                                  ["right without the attention-dropout mask, wrong with"]),
    "attention: mask as 0/1": ("attention", _att(mask=lambda m: (m != 0) * 1.0), ["1/(1-p)"]),
    "attention: mask as its max": ("attention", _att(mask=lambda m: m.max()),
                                   ["wrong only where the dropout mask is 0"]),
    "attention: softmax row sum": ("attention", _att(softmax_term=False),
                                   ["-sum_j datt_ij att_ij"]),
    "attention: dv before the mask": ("attention", _att(dv_from_att=True),
                                      ["before the dropout mask"]),
    "attention: not causal": ("attention", _att_not_causal,
                              ["recomputed without the causal mask"]),
    "cross_entropy: ignore_index forgotten": ("cross_entropy", _ce(zero_ignored=False, count="N"),
                                              ["ignore_index forgotten"]),
    "cross_entropy: ignored rows kept": ("cross_entropy", _ce(zero_ignored=False),
                                         ["wrong at the positions whose target is ignore_index"]),
    "cross_entropy: mean over N": ("cross_entropy", _ce(count="N"), ["n/N", "divide by n"]),
    "cross_entropy: dloss forgotten": ("cross_entropy", _ce(use_dloss=False),
                                       ["wrong for dloss != 1", "multiply by dloss"]),
    "cross_entropy: sign": ("cross_entropy", _ce(sign=-1.0), ["sign", "softmax - onehot"]),
    "cross_entropy: -1 hard-coded": ("cross_entropy", _ce(rows_from_t=True),
                                     ["wrong with ignore_index = 4"]),
    "cross_entropy: onehot forgotten": ("cross_entropy", _ce(onehot=False), ["onehot"]),
    "cross_entropy: logp for softmax": ("cross_entropy", _ce(probs=lambda z: z), ["exp(logp)"]),
    "embedding: repeated ids overwritten": ("embedding", _emb(overwrite=True),
                                            ["np.add.at", "right for token ids that occur "
                                             "once, wrong for token ids that repeat in the "
                                             "batch (3 and 7)"]),
    "embedding: dwpe (T, C)": ("embedding", _emb(dwpe="short"), ["dwpe ", "shape", "(6, 3)"]),
    "embedding: dwpe mean": ("embedding", _emb(dwpe="mean"), ["1/B", "sum over the batch"]),
    "embedding: dwpe first row": ("embedding", _emb(dwpe="first"), ["first batch row"]),
    "adamw: no bias correction": ("adamw", _adamw(bias=False), ["no bias correction"]),
    "adamw: t + 1": ("adamw", _adamw(t_shift=1), ["t + 1"]),
    "adamw: t - 1": ("adamw", _adamw(t_shift=-1), ["t - 1"]),
    "adamw: decay on the vector": ("adamw", _adamw(decay="all"), ["weight decay on the vector"]),
    "adamw: no decay": ("adamw", _adamw(decay="none"), ["no weight decay on the matrix"]),
    "adamw: L2": ("adamw", _adamw(coupled=True), ["added to the gradient (L2"]),
    "gpt: MLP residual forgotten": ("gpt", _gpt_no_mlp_residual,
                                    ["transformer.h.1.attn.c_proj.weight  WRONG", "residual"]),
    "gpt: wte without the embedding's part": ("gpt", _gpt(_head_only_wte),
                                              ["transformer.wte.weight  WRONG",
                                               "only the output head's"]),
    "gpt: a bias halved": ("gpt", _gpt(_scale("transformer.h.1.mlp.c_fc.bias", 0.5)),
                           ["5 gradients right", "mlp.c_fc.bias  WRONG", "1/2",
                            "its weight is right"]),
    "gpt: a gradient missing": ("gpt", _gpt(lambda g, c: g.pop("transformer.h.0.ln_1.bias")),
                                ["1 of 28 gradients missing: transformer.h.0.ln_1.bias"]),
    "gpt: a wrong shape": ("gpt", _gpt(_scale("transformer.wpe.weight", np.ones((2, 1, 1)))),
                           ["transformer.wpe.weight  WRONG", "shape"]),
}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_a_wrong_answer_is_rejected_with_its_diagnosis(capsys, mutant):
    name, fn, phrases = MUTANTS[mutant]
    if name == "gpt" and importlib.util.find_spec("npgpt.reference_gpt") is None:
        pytest.skip("npgpt/reference_gpt.py (helper C's) is not there yet")
    ok, out = graded(capsys, name, fn)
    assert not ok
    for phrase in phrases:
        assert phrase in out, f"{phrase!r} not in:\n{out}"


def test_every_exercise_has_three_mutants():
    counts = {name: sum(m[0] == name for m in MUTANTS.values()) for name in NAMES}
    assert min(counts.values()) >= 3, counts


def test_a_step_that_updates_in_place_but_returns_nothing_is_told_to_return(capsys):
    def step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
        adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay)
    ok, out = graded(capsys, "adamw", step)
    assert not ok and "returned None: return (p, m, v)" in out and "not written" not in out


def test_the_attention_cases_hold_a_mask_that_drops_entries_and_keeps_others():
    from npgpt.exercises import prepared
    masks = [c.args[2] for c in prepared("attention")[0] if len(c.args) == 3]
    T = masks[-1].shape[-1]
    causal = masks[-1][..., np.tril(np.ones((T, T), dtype=bool))]  # the entries that count
    assert (causal == 0).any() and (causal > 1).any()
    assert (masks[0] > 1).all()  # the other: nothing dropped


def test_extra_keys_of_gpt_are_noted_not_failed(capsys):
    if importlib.util.find_spec("npgpt.reference_gpt") is None:
        pytest.skip("npgpt/reference_gpt.py (helper C's) is not there yet")
    ok, out = graded(capsys, "gpt", _gpt(lambda g, c: g.update({"loss": 1.0, 3: None})))
    assert ok and out.startswith("note: keys that are not parameter names (ignored): 3, loss")


def test_an_exception_in_a_helper_of_the_learner_names_the_helper_line(capsys):
    def helper(x):
        return x.reshape(-1, 7)  # no such width

    def gelu_backward(dout, x):
        return (helper(dout),)
    ok, out = graded(capsys, "gelu", gelu_backward)
    assert not ok and "cannot reshape" in out and "return x.reshape(-1, 7)" in out
