"""Numerical gradient checks: central differences, compared with a hand-written backward.

Used by the test suite and by notebook 02. Run them in float64: in float32 the
rounding error of a central difference (~1e-7 / h) swamps the comparison.
"""
import numpy as np


def numerical_grad(f, x, h=1e-5):
    """d f() / d x by central differences, perturbing x (a float64 array) in place.

    f takes no arguments and returns a scalar; x is restored afterwards."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)  # views: x must be contiguous
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        f_plus = float(f())
        flat[i] = old - h
        f_minus = float(f())
        flat[i] = old
        gflat[i] = (f_plus - f_minus) / (2.0 * h)
    return grad


def rel_error(a, b):
    """||a - b|| / (||a|| + ||b||): meaningful even where single entries are near zero."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if denom == 0.0 else float(np.linalg.norm(a - b) / denom)


def check_op(forward, backward, inputs, seed=0, h=1e-5):
    """Check an op pair: forward(*inputs) -> (out, cache); backward(dout, cache) -> grads.

    A random upstream gradient dout turns the op into the scalar L = sum(out * dout), so
    dL/dinput = backward(dout). As every op in npgpt.ops, backward returns one gradient
    per floating-point input, in order; integer inputs (token ids, targets) are passed
    through unperturbed. Returns {input index: relative error} for the float inputs."""
    rng = np.random.default_rng(seed)
    out, cache = forward(*inputs)
    dout = rng.standard_normal(np.shape(out))
    analytic = iter(backward(dout, cache))
    errors = {}
    for i, x in enumerate(inputs):
        if not (isinstance(x, np.ndarray) and x.dtype.kind == "f"):
            continue
        numeric = numerical_grad(lambda: np.sum(forward(*inputs)[0] * dout), x, h)
        errors[i] = rel_error(numeric, next(analytic))
    return errors
