"""What is wrong with a learner's gradient: the checks behind every WRONG line of grade().

In the order grade() applies them to one gradient:
    form      not an array, the wrong shape or dtype, NaN / inf          (check_form)
    values    compared case by case with the right gradient               (diagnose):
      groups  some named parts right and others wrong (repeated token ids, ignored
              targets, the q / k / v thirds of dqkv, ...)
      factor  got = s * expected for one number s per failing case, s named as a
              constant (-1, 1/2, 1/32) or as a size of the case (1/B, sqrt(hs), n/N)
      traits  right in some cases and wrong in others ("right for T = 1, wrong for T > 1")
and, for the learner's function as a whole, learner_error (an exception in it).
"""
import copy
import math
import os
import traceback
from fractions import Fraction

import numpy as np

import npgpt

from ..gradcheck import rel_error

TOL = 1e-8          # relative error allowed against the exact (reference) gradient
CLEAN = 1e-6        # relative residual under which got = s * expected counts as exact
POWERS = (1, -1, 0.5, -0.5)  # of a case size, to name a factor (sqrt: 1/sqrt(hs))

_SUM = "a gradient summed over the positions (b, t) is a sum, not a mean"
GENERIC_HINTS = {  # an exercise's own hints (cases.py) come first
    "-1": "the wrong sign: check the order of a subtraction or a minus lost in a derivative",
    "2": "a factor 2 too many (a term counted twice?)",
    "1/2": "half of it: a factor 2 missing (d(x^2)/dx = 2x), or a 0.5 applied twice",
    "1/B": f"did you divide by the batch size B? {_SUM}",
    "1/T": f"did you divide by T? {_SUM}",
    "1/(B*T)": f"did you average over the B*T positions? {_SUM}",
    "B": "B times too big: a sum over the batch taken twice?",
}


# ----------------------------------------------------------------------------
# form: type, shape, dtype, finite values


def check_form(got, expected, input_name):
    """A sentence on what is wrong with the array itself, or None when it is a finite
    float64 array of the expected shape."""
    if got is None:
        return "is None: return an array for every gradient"
    if not isinstance(got, np.ndarray):
        return f"is a {type(got).__name__}, not a NumPy array"
    if got.shape != expected.shape:
        hint = ""
        if got.shape == expected.shape[::-1] and got.ndim > 1:
            hint = ": transposed?"
        elif got.size == expected.size:
            hint = ": the right number of entries in the wrong layout (reshape it)"
        elif got.ndim != expected.ndim:
            hint = (": a gradient has its input's shape (sum over the axes the forward "
                    "broadcast over, no more and no fewer)")
        return (f"has the wrong shape: expected {expected.shape} ({input_name}'s shape), "
                f"got {got.shape}{hint}")
    if got.dtype != np.float64:
        right = (" (its values are right)" if got.dtype.kind in "fiu"
                 and rel_error(got, expected) <= TOL else "")
        return f"has dtype {got.dtype}, expected float64 (the inputs' dtype){right}"
    if not np.all(np.isfinite(got)):
        return "holds NaN or inf: a division by zero or an overflow (exp of a large number?)"
    return None


# ----------------------------------------------------------------------------
# factor: got = s * expected


def _scale(got, exp):
    """The least-squares s of got ~ s * exp and the residual relative to |exp|."""
    ee = float(np.vdot(exp, exp))
    s = float(np.vdot(got, exp)) / ee
    return s, float(np.linalg.norm(got - s * exp)) / math.sqrt(ee)


def _close(a, b):
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def format_factor(s):
    """-1, 1/32, 3/4, 2, sqrt(3), 1/sqrt(2), or 0.8123 when nothing simple fits."""
    sign, a = ("-" if s < 0 else ""), abs(s)
    for root, fmt in ((False, "{}"), (True, "sqrt({})")):
        f = Fraction(a * a if root else a).limit_denominator(64)
        if f.numerator <= 4096 and _close(float(f), a * a if root else a):
            if root and f.denominator == 1 and math.isqrt(f.numerator) ** 2 == f.numerator:
                continue  # a perfect square: the plain fraction says it
            if f.numerator == 1 and f.denominator > 1:
                return sign + "1/" + fmt.format(f.denominator)
            return sign + fmt.format(str(f))
    return f"{s:.4g}"


def _expr(name, power, sign):
    """The text of sign * name**power: B, 1/B, 1/(B*T), N/n, sqrt(hs), 1/(1-p), -B."""
    if power in (0.5, -0.5):
        name = f"sqrt({name})"
    if power < 0:
        if name.count("/") == 1 and "(" not in name:
            top, bottom = name.split("/")
            name = f"{bottom}/{top}"
        else:
            name = "1/" + (f"({name})" if any(op in name for op in "*-+") else name)
    return ("-" if sign < 0 else "") + name


def _named_factors(scales, quantities):
    """Expressions of a case size that equal the scale in every failing case."""
    found = []
    for name in quantities[0]:
        values = [q.get(name) for q in quantities]
        if None in values or any(v <= 0 for v in values) or all(v == 1 for v in values):
            continue
        for power in POWERS:
            for sign in (1, -1):
                if all(_close(s, sign * v ** power) for s, v in zip(scales, values)):
                    found.append(_expr(name, power, sign))
    return found


WRONG_VALUES = "has the wrong values"


def factor_text(parts, hints):
    """(predicate, explained) for the failing parts [(got, expected, quantities)]:
    'is 1/2 of the right one: <hint>', 'should be 0 and is not', or WRONG_VALUES.

    explained is True when got = s * expected exactly, for a constant s or an s that
    follows a size of the case (e.g. 1/B)."""
    if all(not np.any(exp) for _, exp, _ in parts):
        return "should be 0 and is not", True
    if all(not np.any(got) for got, _, _ in parts):
        return "is all zeros: was it ever filled in?", False
    fits = [(_scale(got, exp), q) for got, exp, q in parts if np.any(exp)]
    if any(r > CLEAN for (_, r), _ in fits):
        return WRONG_VALUES, False
    scales = [s for (s, _), _ in fits]
    hints = {**GENERIC_HINTS, **hints}
    named = _named_factors(scales, [q for _, q in fits])
    hinted = [e for e in named if e in hints]  # the names with a likely cause first
    named = hinted + [e for e in named if e not in hints]
    hint = hints[hinted[0]] if hinted else None
    if all(_close(s, scales[0]) for s in scales):
        text = format_factor(scales[0])
        if hinted and hinted[0] != text:  # a constant: named only to give the cause
            text += f" ({hinted[0]} in {'this case' if len(scales) == 1 else 'these cases'})"
        hint = hint or hints.get(text)
        if text == "-1":
            text = "the right one with the wrong sign (-1 times it)"
        elif abs(scales[0]) < 1 and "/" in text:
            text += " of the right one"
        else:
            text += " times the right one"
    elif named:
        text = (named[0] + " times the right one ("
                + ", ".join(format_factor(s) for s in scales[:4]) + " in the failing cases)")
    else:
        return ("is off by a factor that changes from case to case ("
                + ", ".join(format_factor(s) for s in scales[:4]) + ")"), False
    return f"is {text}" + (f": {hint}" if hint else ""), True


# ----------------------------------------------------------------------------
# values: known mistakes, groups, factor, traits

SIZE_TRAITS = ("for B = 1", "for B > 1", "for T = 1", "for T > 1")


class Group:
    """A named part of one gradient (mask: a boolean index into it, None for all of it),
    told apart by diagnose: e.g. the rows of dwte of token ids that repeat."""

    def __init__(self, key, label, mask, hint=None):
        self.key, self.label, self.mask, self.hint = key, label, mask, hint


def _group_ok(got, exp, scale):
    if not np.any(exp):
        return float(np.max(np.abs(got), initial=0.0)) <= 1e-12 * scale
    return rel_error(got, exp) <= TOL


def traits_text(cases, oks, sizes=True):
    """'right for T = 1, wrong for T > 1' from the traits that split right from wrong
    cases (sizes=False: only if a trait other than B's or T's size does), or None."""
    right = [c.traits for c, ok in zip(cases, oks) if ok]
    wrong = [c.traits for c, ok in zip(cases, oks) if not ok]
    if not right:
        return None
    only_right = [t for t in right[0]
                  if all(t in r for r in right) and all(t not in w for w in wrong)]
    only_wrong = [t for t in wrong[0]
                  if all(t in w for w in wrong) and all(t not in r for r in right)]
    if not sizes and all(t in SIZE_TRAITS for t in only_right + only_wrong):
        return None
    if only_wrong and only_right:
        return f"right {' and '.join(only_right)}, wrong {' and '.join(only_wrong)}"
    if only_wrong:
        return f"wrong only {' and '.join(only_wrong)}"
    if not sizes:
        return None
    failing = "; ".join(c.label for c, ok in zip(cases, oks) if not ok)
    return f"right in {sum(oks)} of {len(oks)} cases, wrong in: {failing}"


def known_mistake(gots, mistakes, gi):
    """The description of the first known mistake (name, [gradients per case]) whose
    gradient number gi the learner's equals in every case, or None."""
    for text, grads in mistakes:
        if all(g.shape == m[gi].shape and rel_error(g, m[gi]) <= TOL
               for g, m in zip(gots, grads)):
            return text
    return None


def _wrong_parts(cases, gots, exps, oks, gi):
    """{group key: {"label", "hint", "wrong": [(got, exp, quantities) of failing cases]}}
    over the failing cases (groups that select nothing in a case are skipped there)."""
    parts = {}
    for case, got, exp, ok in zip(cases, gots, exps, oks):
        if ok:
            continue
        scale = float(np.max(np.abs(exp), initial=0.0)) or 1.0
        for grp in case.groups.get(gi) or [Group("all", "", None)]:
            sel = slice(None) if grp.mask is None else grp.mask
            if grp.mask is not None and not np.any(grp.mask):
                continue
            part = parts.setdefault(grp.key, {"label": grp.label, "hint": grp.hint,
                                              "wrong": [], "zero": True})
            part["zero"] &= not np.any(exp[sel])
            if not _group_ok(got[sel], exp[sel], scale):
                if not part["wrong"]:
                    part["label"] = grp.label  # as it reads in the first failing case
                part["wrong"].append((got[sel], exp[sel], case.quantities))
    if not any(p["wrong"] for p in parts.values()):  # each part close, not the whole
        parts = {"all": {"label": "", "hint": None, "zero": False, "wrong": [
            (g, e, c.quantities) for c, g, e, ok in zip(cases, gots, exps, oks) if not ok]}}
    return parts


def diagnose(gname, cases, gots, exps, oks, gi, hints, mistakes=()):
    """The sentence after 'WRONG:' for gradient number gi, whose values are wrong in the
    cases where oks is False (its form already checked). In order: a known mistake it
    equals; the parts right and wrong; an exact factor; the cases right and wrong."""
    parts = _wrong_parts(cases, gots, exps, oks, gi)
    wrong = [k for k, p in parts.items() if p["wrong"]]
    # the parts right, but not those right by being 0 where 0 is expected: no news
    right = [k for k, p in parts.items() if not p["wrong"] and not p["zero"]]
    split = (f"right {' and '.join(parts[k]['label'] for k in right)}, "
             f"wrong {' and '.join(parts[k]['label'] for k in wrong)}") if right else None
    mistake = known_mistake(gots, mistakes, gi)
    if mistake:  # it says what is wrong: add only where
        return "; ".join(filter(None, [mistake, traits_text(cases, oks, sizes=False), split]))
    findings = []
    worst = max(rel_error(g, e) for g, e, ok in zip(gots, exps, oks) if not ok)
    error = f" (relative error up to {worst:.1e})"
    hinted = any(parts[k]["hint"] for k in wrong)
    if right:
        findings.append(split + "".join(f": {parts[k]['hint']}" for k in wrong
                                        if parts[k]["hint"]))
    explained, by_text = True, {}
    for k in wrong:
        text, ok = factor_text(parts[k]["wrong"], hints)
        explained &= ok
        by_text.setdefault(text, []).append(parts[k]["label"])
    for text, labels in by_text.items():
        if text == WRONG_VALUES and right:
            findings[-1] += error  # the split already says where
            continue
        where = "there" if right and len(by_text) == 1 else " and ".join(filter(None, labels))
        text += error if text == WRONG_VALUES else ""
        findings.append(f"{where}, {gname} {text}" if where else f"{gname} {text}")
    trait = traits_text(cases, oks, sizes=not (explained or hinted))
    if trait:
        findings.insert(0, trait)
    return "; ".join(findings)


# ----------------------------------------------------------------------------
# the learner's function as a whole


_LIBRARIES = tuple(os.path.dirname(m.__file__) + os.sep for m in (np, npgpt))


def learner_error(exc):
    """'ValueError: ... (line 7: dx = dout @ w)': the exception and the last line of the
    learner's own code it went through (not NumPy's, not npgpt's), without a traceback."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)[1:]  # [0]: call_learner
              if not f.filename.startswith(_LIBRARIES)]
    if frames:
        line = (frames[-1].line or "").strip()
        text += f" (line {frames[-1].lineno}" + (f": {line})" if line else ")")
    return text


NOT_WRITTEN = "not written yet"


def _changed(before, after):
    """Whether any array in the nested tuples `after` differs from its twin in `before`."""
    if isinstance(before, np.ndarray):
        return not np.array_equal(before, after, equal_nan=True)
    if isinstance(before, (tuple, list)):
        return any(_changed(b, a) for b, a in zip(before, after))
    if isinstance(before, dict):
        return any(_changed(before[k], after[k]) for k in before)
    return False


def call_learner(fn, calls, name, returns):
    """fn(*args) for every (label, args) of calls, on copies of args (changing them in
    place harms nothing). Returns (results, None), or (None, the one line to print) when
    fn is not written yet (returns None or NotImplemented, or raises NotImplementedError)
    or raises. returns: what fn must return, for the message when it returns None
    after changing its arguments in place (written, but without its return)."""
    results = []
    for i, (label, args) in enumerate(calls):
        mine = copy.deepcopy(args)
        try:
            with np.errstate(all="ignore"):  # NaN and inf are reported from the result
                out = fn(*mine)
        except NotImplementedError:
            return None, f"{name}: {NOT_WRITTEN}"
        except Exception as exc:  # the learner's code: any error is theirs to see
            where = f" (in the case {label})" if len(calls) > 1 else ""
            return None, f"{name}: your code raised {learner_error(exc)}{where}"
        if i == 0 and out is None and _changed(args, mine):
            return None, (f"{name}: your function changed its arguments in place and "
                          f"returned None: return {returns}")
        if i == 0 and (out is None or out is NotImplemented):
            return None, f"{name}: {NOT_WRITTEN}"
        results.append(out)
    return results, None


def check_tuple(out, names, signature, label):
    """None when out is a tuple (or list) of len(names) things, else the line to print."""
    order = f"({', '.join(names)}{',' if len(names) == 1 else ''})"
    if isinstance(out, np.ndarray) and len(names) == 1:
        return f"returned a bare array: return the 1-tuple {order}, as {signature}"
    if not isinstance(out, (tuple, list)):
        return (f"returned {'None' if out is None else 'a ' + type(out).__name__} "
                f"(in the case {label}): return the tuple {order}, as {signature}")
    if len(out) != len(names):
        return (f"returned {len(out)} gradient{'s' * (len(out) != 1)}, expected "
                f"{len(names)}, in this order: {order}")
    return None


def verdict(gname, ok, text, width=8):
    """One line of the report: 'dx      ok  (...)' or 'dx      WRONG: ...'."""
    return f"{gname:<{width}}" + (f"ok  ({text})" if ok else f"WRONG: {text}")
