"""The "gpt" exercise: the backward pass of the whole GPT, graded against GPT.backward.

    def gpt_backward(cache):
        '''{name: d loss / d params[name]} for every parameter (dloss = 1), from the cache
        of npgpt.reference_gpt.gpt_forward(params, idx, targets, n_head): the caches of
        the reference.py ops, {"embedding", "blocks": [{"ln_1", "c_attn", "attn",
        "attn_c_proj", "ln_2", "c_fc", "gelu", "mlp_c_proj"}, ...], "ln_f", "head", "loss"}.'''

Call the reference.py backward ops in reverse order; two rules do the rest: a residual
add x = x + f(x) passes its gradient through unchanged AND through f; wte is used twice
(the embedding and the tied output head), so its gradient is the sum of both.

How it is graded: a small float64 GPT (V = 11, block_size = 8, 2 layers, 2 heads, C = 8)
whose every weight, bias and LayerNorm weight is set to random non-zero values (a
forgotten bias or residual path shows), on three batches (B = 2, T = 7 with ignored
targets and repeated ids; B = 1, T = 1; B = 3, T = 8). Your gradients are compared with
GPT.backward's (model.py, itself checked against central differences), tensor by tensor
in backward order (reference_gpt.backward_order: the order backprop reaches them),
relative error <= 1e-8. The report names the first wrong tensor, with the diagnosis of
the op exercises (shape, factor, sign, ...) and where the mistake must lie: every tensor
before it is right.
"""
import functools

import numpy as np

from .. import reference as ref
from .. import reference_gpt
from ..gradcheck import rel_error
from ..model import GPT, GPTConfig
from . import diagnosis
from .cases import Case, size_traits

CONFIG = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.0)
BATCHES = (  # (idx, targets): -1 targets are ignored
    ([[3, 1, 7, 3, 3, 0, 10], [7, 0, 5, 7, 2, 9, 1]],
     [[1, 7, -1, 3, 0, 10, 4], [0, 5, 7, -1, 9, 1, -1]]),
    ([[6]], [[2]]),
    (np.arange(24).reshape(3, 8) % 11, (np.arange(24).reshape(3, 8) * 7 + 1) % 11),
)
WTE, WPE = reference_gpt.WTE, reference_gpt.WPE
HINTS = {"1/n": "did you divide by n twice? cross_entropy_backward's dlogits already "
                "holds the mean's 1/n",
         "n": "the loss is a mean over the n targets not ignored: dlogits carries 1/n"}


def _perturbed_model():
    """A float64 GPT with every parameter random and non-zero (biases included)."""
    model = GPT(CONFIG, seed=0, dtype="float64")
    rng = np.random.default_rng(2)
    for name, p in model.params.items():
        noise = rng.standard_normal(p.shape)
        if name.endswith(".bias"):
            p[...] = 0.2 * noise
        elif p.ndim == 1:  # a LayerNorm weight
            p[...] = 1.0 + 0.3 * noise
        else:
            p[...] = 0.3 * noise
    return model


@functools.cache
def prepared():
    """(cases, caches, expected, mistakes), built once per process: per batch the
    reference_gpt cache and GPT.backward's gradients; wte's two known mistakes."""
    from . import freeze
    model = _perturbed_model()
    params = {n: p.copy() for n, p in model.params.items()}
    cases, caches, expected, head_only, emb_only = [], [], [], [], []
    for idx, targets in BATCHES:
        idx, targets = np.array(idx), np.array(targets)
        B, T = idx.shape
        traits, q = size_traits(B, T)
        n = int((targets != -1).sum())
        traits += ("with ignored targets" if n < B * T else "without ignored targets",)
        model.forward(idx, targets)
        grads = {name: g.copy() for name, g in model.backward().items()}
        _, cache = reference_gpt.gpt_forward(params, idx, targets, CONFIG.n_head)
        cases.append(Case(f"B = {B}, T = {T}, {B * T - n} targets ignored", traits, (), (),
                          1.0, dict(q, n=n, **{"n/N": n / (B * T)})))
        caches.append(freeze(cache))
        expected.append(freeze(grads))
        (dlogits,) = ref.cross_entropy_backward(1.0, cache["loss"])
        dwte_head = ref.head_backward(dlogits, cache["head"])[1]
        head_only.append((dwte_head,))
        emb_only.append((grads[WTE] - dwte_head,))
    mistakes = [("wte has only the output head's gradient: wte is also the token embedding, "
                 "add the embedding's (np.add.at of dx into the rows of idx)", head_only),
                ("wte has only the embedding's gradient: wte is also the output head "
                 "(logits = x @ wte.T), add the head's dlogits^T @ x", emb_only)]
    return cases, caches, expected, mistakes


def _where(name, previous):
    """Where the mistake must lie when `previous` (in backward order) is right and
    `name` is the first wrong tensor."""
    if previous is None:
        return ("it is the first tensor backprop reaches: check the loss and the head "
                "(dlogits, dx = dlogits @ wte) and ln_f's backward")
    if name == WTE:
        return "wte is used twice: its gradient is the output head's plus the embedding's"
    if name.endswith(".bias") and previous == name[:-len("bias")] + "weight":
        return "its weight is right, so the bias itself: the sum of dout over every position"
    if name.endswith("attn.c_proj.weight"):
        return ("between ln_2 and it lies the residual x = x + mlp(ln_2(x)): the gradient "
                "reaching attn.c_proj is dx passed straight through PLUS ln_2's dx")
    if previous.endswith("ln_1.bias"):
        return ("between ln_1 and it lies the residual x = x + attn(ln_1(x)): the gradient "
                "flowing on is dx passed straight through PLUS ln_1's dx")
    return f"{previous} is right, so the mistake lies between it and {name}"


def grade_gpt(fn):
    cases, caches, expected, mistakes = prepared()
    order = reference_gpt.backward_order(CONFIG.n_layer)
    outs, line = diagnosis.call_learner(fn, [(c.label, (cache,)) for c, cache in
                                             zip(cases, caches)], "gpt", "{name: gradient}")
    if line is None:
        bad = next((out for out in outs if not isinstance(out, dict)), None)
        missing = [n for n in order if any(n not in out for out in outs)] if bad is None else []
        if bad is not None:
            line = (f"gpt: your gpt_backward returned a {type(bad).__name__}: return a dict "
                    "{name: gradient} with every name of params")
        elif missing:
            line = (f"gpt: {len(missing)} of {len(order)} gradients missing: "
                    + ", ".join(missing) + " (return one for every name of params)")
    if line is not None:
        print(line)
        return False
    extra = sorted(str(k) for k in {k for out in outs for k in out} - set(order))
    if extra:
        print(f"note: keys that are not parameter names (ignored): {', '.join(extra)}")
    wrong = []
    for name in order:
        gots, exps = [out[name] for out in outs], [e[name] for e in expected]
        form = next(filter(None, (diagnosis.check_form(g, e, name)
                                  for g, e in zip(gots, exps))), None)
        oks = [not form and rel_error(g, e) <= diagnosis.TOL for g, e in zip(gots, exps)]
        if not all(oks):
            wrong.append((name, form, gots, exps, oks))
    if not wrong:
        worst = max(rel_error(out[n], e[n]) for out, e in zip(outs, expected) for n in order)
        print(f"all {len(order)} gradients ok  (max rel error {worst:.0e} over {len(cases)} "
              "batches, against GPT.backward)")
        return True
    name, form, gots, exps, oks = wrong[0]
    i = order.index(name)
    if i:
        print(f"{i} gradients right in backward order, {order[0]} ... {order[i - 1]}")
    if form:
        text = f"it {form}"
    else:
        text = diagnosis.diagnose("it", cases, gots, exps, oks, 0, HINTS,
                                  mistakes if name == WTE else ())
        if not text.startswith("wte has only"):  # a known mistake of wte says where
            text += "; " + _where(name, order[i - 1] if i else None)
    print(f"{name}  WRONG: {text}")
    if len(wrong) > 1:
        print(f"and {len(wrong) - 1} more wrong after it in backward order (a wrong gradient "
              "flowing back spoils the tensors behind it: fix the first one first)")
    return False
