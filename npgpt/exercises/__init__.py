"""Exercises: write a backward pass by hand, and have it graded with a diagnosis.

    from npgpt import reference
    from npgpt.exercises import grade

    def linear_backward(dout, cache):
        x, w = cache            # what reference.linear_forward cached
        ...                     # your code
        return dx, dw, db

    grade("linear", linear_backward)   # True when every gradient is right

How grading works. grade(name, fn) runs reference.py's forward of that name on a few
small float64 cases, chosen so that the usual mistakes show: T = 1, B = 1 and B > 1 with
different rows, odd widths, token ids that repeat in the batch, targets equal to
ignore_index, attention with and without a dropout mask. For each case it calls your
function with (dout, cache): dout a random upstream gradient, cache a copy of what the
forward returned (changing it in place harms nothing). Each gradient you return is
compared with
    1. central differences of the forward (npgpt.gradcheck.numerical_grad, every entry:
       the cases are small), relative error at most 1e-6, and
    2. reference.py's backward, relative error at most 1e-8.
grade prints one line per gradient and returns True only when all are right:

    dx      ok  (max rel error 1e-11 over 4 cases)
    dw      WRONG: dw is 1/(B*T) times the right one (1/6, 1/6, 1/4 in the failing cases):
            did you average over the B*T positions? a gradient summed over ...
    db      ok  (max rel error 2e-11 over 4 cases)

A WRONG line says, where it can tell: the wrong shape or dtype, or not an array; NaN or
inf; a constant factor (-1: the wrong sign; 1/2, 2, ...) or one that follows a size of
the case (1/B, sqrt(hs), n/N, ...) with its likely cause; the parts that are right and
the parts that are wrong (token ids that repeat, positions whose target is
ignore_index, the q / k / v parts of dqkv, ...); the cases that are right and the cases
that are wrong ("right for T = 1, wrong for T > 1", "right without the attention-dropout
mask, wrong with it"). A function that returns None or NotImplemented, or raises
NotImplementedError, is reported as "<name>: not written yet"; an exception in your code
as its type, message and line; the wrong number of gradients with the order expected.
When your gradient equals one of the wrong backward passes learners often write
(mistakes.py: a missing term of the LayerNorm or softmax derivative, a forgotten mask,
repeated token ids overwritten, ...), the line names that mistake.

The package: cases.py holds the inputs of every exercise, diagnosis.py the checks behind
a WRONG line, mistakes.py the known mistakes; adamw.py and gpt.py the last two exercises.

The exercises (name: the function grade expects; the cache is reference.py's):

    "linear"         linear_backward(dout, cache) -> (dx, dw, db)       cache (x, w)
    "layernorm"      layernorm_backward(dout, cache) -> (dx, dw, db)    cache (xhat, std, w)
    "gelu"           gelu_backward(dout, cache) -> (dx,)                cache x
    "attention"      attention_backward(dy, cache) -> (dqkv,)
                     cache (q, k, v, att, a, att_mask): causal multi-head self-attention,
                     softmax included; att_mask None, or a dropout keep-mask of 0 and 1/(1-p)
    "cross_entropy"  cross_entropy_backward(dloss, cache) -> (dlogits,)
                     cache (logp, t, rows, logits.shape): rows = the positions whose target
                     is not ignore_index; dloss a float (not always 1)
    "embedding"      embedding_backward(dout, cache) -> (dwte, dwpe)
                     cache (idx, wte.shape, wpe.shape)
    "adamw"          adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v)
                     see npgpt/exercises/adamw.py
    "gpt"            gpt_backward(cache) -> {name: gradient}
                     cache from npgpt.reference_gpt.gpt_forward; see npgpt/exercises/gpt.py
"""
import copy
import functools

import numpy as np

from ..gradcheck import numerical_grad, rel_error
from . import diagnosis
from .cases import EXERCISES
from .mistakes import MISTAKES

NAMES = tuple(EXERCISES) + ("adamw", "gpt")
NUMERIC_TOL = 1e-6  # against central differences (their own error is ~1e-10 here)
SEED = 0


def grade(name, backward):
    """Grade the learner's `backward` for exercise `name` (see the module docstring):
    print one line per gradient (or one line for a function not written yet, one that
    raised, or one that returned the wrong number of things); True when all are right."""
    if name not in NAMES:
        raise ValueError(f"unknown exercise {name!r}; the exercises are: {', '.join(NAMES)}")
    if not callable(backward):
        raise TypeError(f"grade({name!r}, backward): backward must be your function, "
                        f"got {type(backward).__name__}")
    if name == "adamw":
        from .adamw import grade_adamw
        return grade_adamw(backward)
    if name == "gpt":
        from .gpt import grade_gpt
        return grade_gpt(backward)
    return _grade_op(name, backward)


def freeze(obj):
    """Make every array in obj (nested tuples, lists, dicts) read-only: the prepared
    cases are shared by every grade() call and must never change."""
    if isinstance(obj, np.ndarray):
        obj.flags.writeable = False
    elif isinstance(obj, dict):
        freeze(list(obj.values()))
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            freeze(item)
    return obj


def _numeric(forward, case):
    """Central differences of L = sum(out * dout) (so dL/dinput is what backward(dout)
    returns) for every input of case.wrt, perturbing copies of the inputs."""
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in case.args]

    def loss():
        return np.sum(forward(*args)[0] * case.dout)
    return [numerical_grad(loss, args[i]) for i in case.wrt]


@functools.cache
def prepared(name):
    """(cases, caches, expected, numeric, mistakes) of an op exercise, built once per
    process: per case the forward's cache, reference.py's gradients, central differences;
    and [(text, [gradients per case])] of every known mistake (mistakes.py)."""
    ex = EXERCISES[name]
    cases = ex.build(np.random.default_rng(SEED))
    caches, expected, numeric = [], [], []
    for case in cases:
        _, cache = ex.forward(*case.args)
        caches.append(freeze(cache))
        expected.append(freeze(ex.backward(case.dout, copy.deepcopy(cache))))
        numeric.append(freeze(_numeric(ex.forward, case)))
        freeze(case.args)
    mistakes = [(text, [wrong(c.dout, copy.deepcopy(cache)) for c, cache in zip(cases, caches)])
                for text, wrong in MISTAKES[name]]
    return cases, caches, expected, numeric, mistakes


def _grade_op(name, backward):
    ex = EXERCISES[name]
    cases, caches, expected, numeric, mistakes = prepared(name)
    signature = f"reference.{name}_backward does"
    outs, line = diagnosis.call_learner(
        backward, [(c.label, (c.dout, cache)) for c, cache in zip(cases, caches)], name,
        f"the tuple ({', '.join(ex.grads)}{',' * (len(ex.grads) == 1)})")
    if line is None:
        line = next(filter(None, (diagnosis.check_tuple(out, ex.grads, signature, c.label)
                                  for out, c in zip(outs, cases))), None)
    if line is not None:
        print(line if line.startswith(name) else f"{name}: your {name}_backward {line}")
        return False
    all_ok = True
    for gi, gname in enumerate(ex.grads):
        gots = [out[gi] for out in outs]
        exps = [e[gi] for e in expected]
        forms = [(diagnosis.check_form(g, e, ex.inputs[gi]), c)
                 for g, e, c in zip(gots, exps, cases)]
        form, case = next(((f, c) for f, c in forms if f), (None, None))
        if form:  # not an array, the wrong shape or dtype, NaN: say so, in which case
            where = f" (in the case {case.label})" if "shape" in form else ""
            print(diagnosis.verdict(gname, False, f"{gname} {form}{where}"))
            all_ok = False
            continue
        errors = [(rel_error(g, e), rel_error(g, n[gi]))
                  for g, e, n in zip(gots, exps, numeric)]
        oks = [e <= diagnosis.TOL and n <= NUMERIC_TOL for e, n in errors]
        if all(oks):
            worst = max(n for _, n in errors)
            print(diagnosis.verdict(gname, True,
                                    f"max rel error {worst:.0e} over {len(cases)} cases"))
        else:
            print(diagnosis.verdict(gname, False, diagnosis.diagnose(
                gname, cases, gots, exps, oks, gi, ex.hints, mistakes)))
            all_ok = False
    return all_ok
