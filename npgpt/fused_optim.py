"""The optimizer's part of a GPU step in a few kernel launches (kernels_loss.cu): AdamW
over the whole flat float32 buffer, gradient clipping, and mixed precision's unscale,
skip and loss-scale update. On a GPU each CuPy expression of the plain array code is a
launch that costs the host 10-90 us, and a small model's step waits for the host: the
plain float16 step's optimizer part was about 50 launches, two of them reductions. This
is the same math; optim.py and mixed.py hold the plain array code (the reference), and
each function here names the one it stands in for.

The gradients' sum of squares is a tree of two levels, in a fixed order (the same bits
on every run, so a resumed run stays bit-exact): sum_squares adds SQUARES_CHUNK elements
per warp, then one warp adds the parts and works out every scalar of the step.
"""
import math

import numpy as np

from . import kernels
from .backend import get_xp
from .kernels import _flat, _rows, _warp

SQUARES_CHUNK = 2048  # elements per warp in sum_squares (10.7M gradients: 5225 warps)


def applies(flat):
    """Whether a flat buffer (parameters or gradients) takes these kernels: float32 on a
    GPU, the fused kernels not turned off."""
    return (flat is not None and flat.dtype == np.float32
            and kernels.applies(get_xp(flat), flat.dtype))


# ----------------------------------------------------------------------------
# AdamW (optim.AdamW's update of a fused buffer)


def decay_mask(decay_spans, size, xp):
    """A (size,) uint8 array on xp: 1 inside the spans of the flat buffer that weight decay
    applies to (the matrices), 0 elsewhere. Made once; AdamW's one launch reads it."""
    mask = np.zeros(size, dtype=np.uint8)
    for span in decay_spans:
        mask[span] = 1
    return xp.asarray(mask)


def adamw_update(p, g, m, v, decays, lr, betas, eps, weight_decay, bias1, bias2_sqrt):
    """optim.AdamW's update of one flat float32 buffer, in one launch (float32 only:
    FLOAT32_ONLY). decays: decay_mask's array."""
    b1, b2 = (np.float32(b) for b in betas)
    _flat("adamw", get_xp(p), p.size, p, g, m, v, decays, np.int64(p.size),
          np.float32(1.0 - lr * weight_decay), b1, b2, np.float32(eps), np.float32(lr / bias1),
          np.float32(1.0 / bias2_sqrt))


def adamw_skippable_update(p, g, m, v, decays, coef, eps):
    """The same for a step that may be skipped: coef holds optim.AdamW's coefficients
    [decay, c1, c2, unbias2, step], each times keep: a (5,) float32 array on the device,
    or the five numbers (0-d arrays or floats), stacked into one here."""
    xp = get_xp(p)
    if not hasattr(coef, "shape"):
        coef = xp.stack([xp.asarray(c, dtype=xp.float32) for c in coef])  # (5,)
    _flat("adamw_skippable", xp, p.size, p, g, m, v, decays, np.int64(p.size), coef,
          np.float32(eps))


# ----------------------------------------------------------------------------
# the gradients' norm: clipping, and mixed precision's whole step


def _sum_squares(g):
    """(parts,) float32: the sums of g^2 over each SQUARES_CHUNK elements of g."""
    xp, n = get_xp(g), g.size
    parts = xp.empty(math.ceil(n / SQUARES_CHUNK), dtype=xp.float32)
    _rows("sum_squares", xp, parts.size, g, parts, np.int64(n), np.int32(SQUARES_CHUNK))
    return parts


def clip_grad_norm(g, max_norm):
    """optim.clip_grad_norm of one flat float32 gradient buffer g, in three launches:
    scales g in place so that its norm is at most max_norm; returns the pre-clip norm
    (0-d, on the device)."""
    xp, parts = get_xp(g), _sum_squares(g)
    out = xp.empty(4, dtype=xp.float32)  # [norm | scale_grads's three multipliers]
    _warp("clip_scalars", xp, parts, np.int32(parts.size), np.float32(max_norm), out[:1],
          out[1:])
    _flat("scale_grads", xp, g.size, g, out[1:], np.int64(g.size))
    return out[0, ...]  # (0-d: NumPy would make out[0] a scalar)


def mixed_step(mp, opt, lr, grad_clip):
    """mixed.MixedPrecision.step (unscale, clip, AdamW unless skipped, push, update the
    scale) in five launches, for an AdamW whose one flat float32 buffer is fused. The
    scale, the count of good steps, the count of skipped steps and AdamW's step count t
    are 0-d arrays on the device, updated there in place. Returns skip (0-d bool)."""
    g = mp.model.grads.flat
    xp = get_xp(g)
    if not hasattr(opt.t, "dtype"):  # (a Python int before the first step, or on resume)
        opt.t = xp.asarray(opt.t, dtype=xp.int64)
    parts = _sum_squares(g)
    skip = xp.empty((), dtype=xp.uint8)  # the kernel's unsigned char; returned as bool
    mul, coef = xp.empty(3, dtype=xp.float32), xp.empty(5, dtype=xp.float32)
    b1, b2 = opt.betas
    _warp("mixed_scalars", xp, parts, np.int32(parts.size), np.float32(grad_clip),
          np.float64(opt.lr if lr is None else lr), np.float64(b1), np.float64(b2),
          np.float64(opt.weight_decay), np.int64(mp.growth_interval),
          np.float64(mp.growth_factor), np.float64(mp.backoff_factor), mp.scale,
          mp.good_steps, mp.skipped, opt.t, skip, mul, coef)
    _flat("scale_grads", xp, g.size, g, mul, np.int64(g.size))  # unscaled, clipped
    adamw_skippable_update(mp.params.flat, g, opt.m["*"], opt.v["*"], opt.fused["*"], coef,
                           opt.eps)
    mp.push()
    return skip.view(xp.bool_)
