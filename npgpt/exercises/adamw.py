"""The "adamw" exercise: one AdamW step of one tensor, graded against npgpt.optim.AdamW.

    def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
        '''One AdamW update of the parameter p (an array) with its gradient g.
        m, v: the moment estimates before this step (zeros before step 1);
        t: this step's number, counting from 1; the rest Python floats.
        Returns (p, m, v) after the step: new arrays, or the same ones updated in place.'''

        m = beta1 m + (1 - beta1) g                  v = beta2 v + (1 - beta2) g^2
        mhat = m / (1 - beta1^t)                     vhat = v / (1 - beta2^t)
        p = p (1 - lr weight_decay) - lr mhat / (sqrt(vhat) + eps)

Weight decay is decoupled (p shrinks by 1 - lr weight_decay, outside m and v) and applies
to matrices only (p.ndim >= 2), as npgpt.optim.AdamW does: the grader passes the same
weight_decay for every tensor, and the step itself must skip it for a vector (a bias or a
LayerNorm weight).

How it is graded: npgpt.optim.AdamW takes STEPS steps of a (4, 3) matrix and a (5,)
vector, with gradients of changing size and a changing lr. Your step is called for each
tensor and step with the reference's state before that step (so one wrong step does not
spoil the later ones) and must return the state after it, relative error <= 1e-10.
eps is 1e-4 here rather than 1e-8, so that where eps goes shows. One line per returned
value (p, m, v); a WRONG line names the mistake when your steps equal one of the known
wrong steps in MISTAKES (no bias correction, t off by one, decay on the vector or none on
the matrix, decay added to the gradient, ...), else the tensor and step where it goes wrong.
"""
import functools

import numpy as np

from ..gradcheck import rel_error
from ..optim import AdamW
from . import diagnosis

STEPS = 5
BETA1, BETA2, EPS, WEIGHT_DECAY = 0.9, 0.95, 1e-4, 0.1
LRS = (0.01, 0.02, 0.015, 0.01, 0.005)     # one per step
GRAD_SCALES = (1.0, 0.1, 3.0, 0.5, 1.0)    # the gradients' size changes from step to step
TOL = 1e-10
OUTPUTS = ("p", "m", "v")
SIGNATURE = "adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay) -> (p, m, v)"
FORMULAS = {"m": "m = beta1 * m + (1 - beta1) * g",
            "v": "v = beta2 * v + (1 - beta2) * g**2",
            "p": "p = p * (1 - lr * weight_decay [matrices only]) "
                 "- lr * mhat / (sqrt(vhat) + eps)"}


def step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay, decay="matrix", coupled=False,
         bias1=True, bias2=True, t_shift=0, eps_in_sqrt=False, decay_lr=True,
         decay_after=False, swap=False, keep_hat=False):
    """The AdamW step with its defaults; each keyword makes one of MISTAKES' wrong steps."""
    if swap:
        beta1, beta2 = beta2, beta1
    decays = decay == "all" or (decay == "matrix" and p.ndim >= 2)
    if coupled and decays:
        g = g + weight_decay * p                 # L2: the decay goes through m and v
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    t = t + t_shift
    mhat = m / (1.0 - beta1 ** t) if bias1 else m
    vhat = v / (1.0 - beta2 ** t) if bias2 else v
    denom = np.sqrt(vhat + eps) if eps_in_sqrt else np.sqrt(vhat) + eps
    shrink = 1.0 - (lr if decay_lr else 1.0) * weight_decay if decays and not coupled else 1.0
    if decay_after:
        p = (p - lr * mhat / denom) * shrink
    else:
        p = p * shrink - lr * mhat / denom
    return (p, mhat, vhat) if keep_hat else (p, m, v)


MISTAKES = [
    (dict(bias1=False, bias2=False), "no bias correction: mhat = m / (1 - beta1**t) and "
     "vhat = v / (1 - beta2**t), t counting from 1"),
    (dict(bias1=False), "m is not bias-corrected: mhat = m / (1 - beta1**t)"),
    (dict(bias2=False), "v is not bias-corrected: vhat = v / (1 - beta2**t)"),
    (dict(t_shift=1), "the bias correction uses t + 1: t is already this step's number "
     "(1 on the first step)"),
    (dict(t_shift=-1), "the bias correction uses t - 1: t is already this step's number "
     "(1 on the first step; 1 - beta**0 = 0)"),
    (dict(decay="all"), "weight decay on the vector: AdamW decays only matrices "
     "(p.ndim >= 2), never biases or LayerNorm weights"),
    (dict(decay="none"), "no weight decay on the matrix: p *= 1 - lr * weight_decay when "
     "p.ndim >= 2"),
    (dict(coupled=True), "the weight decay is added to the gradient (L2, Adam's "
     "weight_decay): AdamW decouples it, p *= 1 - lr * weight_decay outside m and v"),
    (dict(coupled=True, decay="all"), "the weight decay is added to the gradient (L2) and "
     "applied to the vector too: AdamW decouples it (p *= 1 - lr * weight_decay) and "
     "decays matrices only"),
    (dict(decay_lr=False), "the decay is not scaled by lr: p *= 1 - lr * weight_decay"),
    (dict(decay_after=True), "the decay is applied after the Adam update: AdamW (as "
     "PyTorch) shrinks p first, p *= 1 - lr * weight_decay, then subtracts the update"),
    (dict(eps_in_sqrt=True), "eps inside the square root: the denominator is "
     "sqrt(vhat) + eps"),
    (dict(swap=True), "beta1 and beta2 swapped: m uses beta1, v uses beta2"),
    (dict(keep_hat=True), "the bias-corrected mhat and vhat are returned as the new m and v: "
     "keep m and v uncorrected, correct only inside the update"),
]


@functools.cache
def trajectory():
    """[(tensor, t, lr, g, before, after)]: every step of npgpt.optim.AdamW on a matrix
    and a vector, before and after each a (p, m, v) tuple (read-only arrays)."""
    rng = np.random.default_rng(1)
    params = {"matrix": rng.standard_normal((4, 3)), "vector": rng.standard_normal(5)}
    opt = AdamW(params, lr=LRS[0], betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY)
    rows = []
    for t, (lr, scale) in enumerate(zip(LRS, GRAD_SCALES), start=1):
        grads = {n: rng.standard_normal(p.shape) * scale for n, p in params.items()}
        before = {n: (p.copy(), opt.m[n].copy(), opt.v[n].copy()) for n, p in params.items()}
        opt.step(grads, lr=lr)
        for n, p in params.items():
            after = (p.copy(), opt.m[n].copy(), opt.v[n].copy())
            rows.append((n, t, lr, grads[n], before[n], after))
    for row in rows:
        for a in (row[3], *row[4], *row[5]):
            a.flags.writeable = False
    return rows


def _args(row):
    _, t, lr, g, (p, m, v), _ = row
    return (p, g, m, v, t, lr, BETA1, BETA2, EPS, WEIGHT_DECAY)


def _matches(outs, rows, kwargs, tensor):
    """Whether the learner's results equal step(**kwargs)'s for every step of tensor."""
    with np.errstate(all="ignore"):
        for out, row in zip(outs, rows):
            if row[0] == tensor:
                want = step(*_args(row), **kwargs)
                if not all(np.allclose(o, w, rtol=TOL, atol=0.0, equal_nan=True)
                           for o, w in zip(out, want)):
                    return False
    return True


def _explain(outs, rows, tensors):
    """The known mistake each wrong tensor's steps equal, as one sentence, or None."""
    found = {}
    for tensor in tensors:
        text = next((t for kwargs, t in MISTAKES if _matches(outs, rows, kwargs, tensor)), None)
        if text is None:
            return None
        found.setdefault(text, []).append(tensor)
    if len(found) == 1:
        return next(iter(found))
    return "; ".join(f"the {' and '.join(ts)}: {text}" for text, ts in found.items())


def grade_adamw(fn):
    rows = trajectory()
    outs, line = diagnosis.call_learner(
        fn, [(f"the {r[0]}, step {r[1]}", _args(r)) for r in rows], "adamw", "(p, m, v)")
    if line is None:
        line = next(filter(None, (diagnosis.check_tuple(out, OUTPUTS, SIGNATURE,
                                                        f"the {r[0]}, step {r[1]}")
                                  for out, r in zip(outs, rows))), None)
        line = line and f"adamw: your step {line.replace('gradient', 'value')}"
    if line is not None:
        print(line)
        return False
    # form first, then values: errors[o][i] the relative error of output o at row i
    forms = {}
    for o, name in enumerate(OUTPUTS):
        forms[name] = next(filter(None, (diagnosis.check_form(out[o], r[5][o], name)
                                         for out, r in zip(outs, rows))), None)
    errors = {name: [rel_error(out[o], r[5][o]) if not forms[name] else np.inf
                     for out, r in zip(outs, rows)] for o, name in enumerate(OUTPUTS)}
    wrong_tensors = sorted({r[0] for name in OUTPUTS
                            for e, r in zip(errors[name], rows) if not e <= TOL})
    shapes = all(isinstance(x, np.ndarray) and x.shape == w.shape
                 for out, r in zip(outs, rows) for x, w in zip(out, r[5]))
    explained = _explain(outs, rows, wrong_tensors) if shapes else None
    said = False
    for name in OUTPUTS:
        bad = [(e, r) for e, r in zip(errors[name], rows) if not e <= TOL]
        if not bad:
            print(diagnosis.verdict(name, True, f"max rel error {max(errors[name]):.0e} "
                                    f"over {STEPS} steps of a matrix and a vector", 3))
            continue
        if explained:
            text = "the same mistake" if said else explained
            said = True
        elif forms[name]:
            text = f"{name} {forms[name]}"
        else:
            tensors = " and the ".join(sorted({r[0] for _, r in bad}))
            text = (f"{name} is wrong for the {tensors}, first at step {bad[0][1][1]} "
                    f"(relative error up to {max(e for e, _ in bad):.1e}): {FORMULAS[name]}")
        print(diagnosis.verdict(name, False, text, 3))
    return not wrong_tensors
