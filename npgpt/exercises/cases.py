"""The inputs every backward exercise is graded on: a few small float64 cases each, chosen
so that the mistakes learners make show (T = 1, B = 1 and B > 1 with different rows, odd
widths, token ids that repeat, targets equal to ignore_index, an attention-dropout mask
with and without dropped entries, dloss != 1).

Every case is small enough (at most ~150 entries per input) that grade() takes each
gradient entry by central differences, not only along a few random directions.
"""
from dataclasses import dataclass, field

import numpy as np

from .. import reference
from ..ops import dropout_mask
from .diagnosis import SIZE_TRAITS, Group


@dataclass
class Case:
    label: str         # what the case is, as the report names it
    traits: tuple      # phrases completing "right ..." / "wrong ...": ("for T = 1", ...)
    args: tuple        # the forward's arguments
    wrt: tuple         # positions in args of the inputs the gradients are of, in order
    dout: object       # the upstream gradient handed to backward with the cache
    quantities: dict   # sizes of the case that may name a wrong factor: {"B": 2, ...}
    groups: dict = field(default_factory=dict)  # gradient number -> [Group]


@dataclass
class Exercise:
    forward: object    # reference.py's op pair
    backward: object
    grads: tuple       # the names of backward's results, in order
    inputs: tuple      # the names of the inputs they are the gradients of
    build: object      # rng -> [Case]
    hints: dict        # factor expression (diagnosis.factor_text) -> likely cause


def size_traits(B, T):
    """The traits of the batch and sequence sizes, and their quantities."""
    traits = (SIZE_TRAITS[0 if B == 1 else 1], SIZE_TRAITS[2 if T == 1 else 3])
    return traits, {"B": B, "T": T, "B*T": B * T}


# ----------------------------------------------------------------------------
# one builder per exercise: rng -> [Case]


def linear_cases(rng):
    cases = []
    for B, T, Cin, Cout in ((2, 3, 5, 3), (1, 1, 4, 6), (3, 2, 4, 2), (1, 4, 3, 5)):
        traits, q = size_traits(B, T)
        x, w = rng.standard_normal((B, T, Cin)), rng.standard_normal((Cin, Cout))
        b = rng.standard_normal(Cout)
        cases.append(Case(f"B = {B}, T = {T}, {Cin} -> {Cout}", traits, (x, w, b), (0, 1, 2),
                          rng.standard_normal((B, T, Cout)), dict(q, Cin=Cin, Cout=Cout)))
    return cases


def layernorm_cases(rng):
    cases = []
    for B, T, C in ((2, 3, 7), (1, 1, 5), (3, 2, 4), (1, 4, 3)):
        traits, q = size_traits(B, T)
        x = rng.standard_normal((B, T, C)) * 3.0 + 1.0  # rows with a mean far from 0
        w, b = 1.0 + rng.standard_normal(C) * 0.5, rng.standard_normal(C)
        cases.append(Case(f"B = {B}, T = {T}, C = {C}", traits, (x, w, b), (0, 1, 2),
                          rng.standard_normal((B, T, C)), dict(q, C=C)))
    return cases


def gelu_cases(rng):
    cases = []
    for B, T, C in ((2, 3, 5), (1, 1, 3), (3, 2, 7), (1, 4, 2)):
        traits, q = size_traits(B, T)
        x = rng.standard_normal((B, T, C)) * 2.0  # both tails of the tanh
        cases.append(Case(f"B = {B}, T = {T}, C = {C}", traits, (x,), (0,),
                          rng.standard_normal((B, T, C)), dict(q, C=C)))
    return cases


def attention_cases(rng):
    """Without a mask, with a mask that drops nothing (every entry 1/(1-p)), and with a
    mask that drops entries (0): forgetting the mask, or its 1/(1-p), shows in each."""
    cases = []
    for B, T, nh, hs, p, drops in ((2, 4, 2, 3, None, False), (1, 1, 2, 2, None, False),
                                   (1, 5, 1, 4, None, False), (2, 3, 2, 2, 0.2, False),
                                   (2, 4, 2, 3, 0.3, True)):
        traits, q = size_traits(B, T)
        C = nh * hs
        qkv = rng.standard_normal((B, T, 3 * C))
        args, label = (qkv, nh), f"B = {B}, T = {T}, nh = {nh}, hs = {hs}"
        if p is None:
            traits += ("without the attention-dropout mask",)
        else:
            if drops:
                mask = dropout_mask((B, nh, T, T), p, np.random.default_rng(5), np.float64)
                traits += ("with the attention-dropout mask", "where the dropout mask is 0")
                label += f", a dropout mask with zeros (p = {p})"
            else:
                mask = np.full((B, nh, T, T), 1.0 / (1.0 - p))
                traits += ("with the attention-dropout mask", "with a mask that drops nothing")
                label += f", a dropout mask of 1/(1-p) everywhere (p = {p})"
            args += (mask,)
        parts = [Group(k, f"for the {k} part dqkv[..., {a}]", np.s_[..., i * C:(i + 1) * C])
                 for i, (k, a) in enumerate((("q", ":C"), ("k", "C:2C"), ("v", "2C:")))]
        cases.append(Case(label, traits, args, (0,), rng.standard_normal((B, T, C)),
                          dict(q, nh=nh, hs=hs, C=C, **{"1-p": 1.0 - (p or 0.0)}),
                          {0: parts}))
    return cases


def cross_entropy_cases(rng):
    cases = []
    for targets, V, dloss, ignore in (([[1, -1, 3], [0, 4, -1]], 5, 1.0, -1),
                                      ([[2]], 4, 1.0, -1),
                                      ([[5, 0], [-1, 2], [2, 2]], 6, 0.5, -1),
                                      ([[4, 1], [3, 0]], 5, 1.0, 4)):
        targets = np.array(targets)
        B, T = targets.shape
        traits, q = size_traits(B, T)
        ignored = targets == ignore
        n = int((~ignored).sum())
        traits += ("for dloss = 1" if dloss == 1.0 else "for dloss != 1",
                   "with ignore_index = -1" if ignore == -1 else f"with ignore_index = {ignore}")
        logits = rng.standard_normal((B, T, V)) * 2.0
        label = f"B = {B}, T = {T}, V = {V}, {B * T - n} of {B * T} targets ignored " \
                f"(ignore_index = {ignore}), dloss = {dloss}"
        groups = [Group("ignored", "at the positions whose target is ignore_index", ignored,
                        "their gradient must be 0: they are not in the loss (the cache's "
                        "rows lists the positions that are)"),
                  Group("target", "at the positions with a target", ~ignored)]
        cases.append(Case(label, traits, (logits, targets, ignore), (0,), dloss,
                          dict(q, n=n, V=V, dloss=dloss, **{"n/N": n / (B * T)}),
                          {0: groups}))
    return cases


def embedding_cases(rng):
    V, C, block_size = 9, 3, 6
    cases = []
    for idx in ([[3, 1, 7, 3], [7, 0, 5, 7]], [[2]], [[4, 8], [4, 6], [1, 2]],
                [[0, 5, 5, 8, 1, 5]]):
        idx = np.array(idx)
        B, T = idx.shape
        traits, q = size_traits(B, T)
        counts = np.bincount(idx.ravel(), minlength=V)
        repeats = " and ".join(str(i) for i in np.flatnonzero(counts > 1))
        groups = [Group("once", "for token ids that occur once", counts == 1),
                  Group("repeat", f"for token ids that repeat in the batch ({repeats})",
                        counts > 1, "a repeated token's gradient must be added (np.add.at), not "
                        "overwritten (dwte[idx] += dout keeps only one of them)"),
                  Group("absent", "for token ids not in the batch", counts == 0)]
        rows = np.arange(block_size) < T
        positions = [Group("used", "for the positions t < T", rows),
                     Group("unused", "for the rows t >= T of wpe (unused: 0)", ~rows)]
        wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((block_size, C))
        cases.append(Case(f"idx = {idx.tolist()}", traits, (idx, wte, wpe), (1, 2),
                          rng.standard_normal((B, T, C)), q,
                          {0: groups, 1: positions}))
    return cases


# ----------------------------------------------------------------------------
# likely causes of a wrong factor, by exercise (diagnosis.factor_text's expressions)

EXERCISES = {
    "linear": Exercise(reference.linear_forward, reference.linear_backward, ("dx", "dw", "db"),
                       ("x", "w", "b"), linear_cases, {}),
    "layernorm": Exercise(reference.layernorm_forward, reference.layernorm_backward,
                          ("dx", "dw", "db"), ("x", "w", "b"), layernorm_cases,
                          {"C": "a sum over C where the formula has a mean (1/C)?",
                           "1/C": "a mean over C where the formula has a sum?"}),
    "gelu": Exercise(reference.gelu_forward, reference.gelu_backward, ("dx",), ("x",),
                     gelu_cases, {}),
    "attention": Exercise(reference.attention_forward, reference.attention_backward,
                          ("dqkv",), ("qkv",), attention_cases,
                          {"sqrt(hs)": "did you forget the 1/sqrt(hs) scale of the scores?",
                           "1/sqrt(hs)": "did you divide by sqrt(hs) twice?",
                           "hs": "did you multiply by sqrt(hs) where the scores divide?",
                           "1/(1-p)": "the mask multiplies once: datt = da * att_mask",
                           "1-p": "the mask's kept entries are 1/(1-p), not 1: multiply "
                                  "by att_mask itself"}),
    "cross_entropy": Exercise(reference.cross_entropy_forward, reference.cross_entropy_backward,
                              ("dlogits",), ("logits",), cross_entropy_cases,
                              {"n/N": "did you divide by all N = B*T positions? the loss is "
                                      "the mean over the n positions whose target is not "
                                      "ignore_index: divide by n",
                               "1/dloss": "multiply by dloss, the gradient handed to backward",
                               "n": "did you forget the mean's 1/n (n = targets not ignored)?",
                               "1/n": "did you divide by n twice?",
                               "-1": "the gradient is softmax - onehot, not onehot - softmax"}),
    "embedding": Exercise(reference.embedding_forward, reference.embedding_backward,
                          ("dwte", "dwpe"), ("wte", "wpe"), embedding_cases,
                          {"1/B": "dwpe is a sum over the batch, not a mean"}),
}
