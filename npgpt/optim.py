"""AdamW and global-norm gradient clipping, as torch.optim.AdamW and
torch.nn.utils.clip_grad_norm_ compute them.

Handed `model.params` / `model.grads` (FlatDicts), each update is a few expressions
over the flat buffer, taken CHUNK elements at a time so that the temporaries are one
small scratch buffer (not a fifth model-sized array: 0.5 GB for GPT-2 124M); any
other {name: array} dict is updated tensor by tensor with the same expressions.
"""
from . import fused_optim
from .backend import get_xp


CHUNK = 1 << 20  # elements of the flat buffer updated at a time (4 MB of float32 scratch)


def _buffers(params):
    """[(name, array)] to update: the one flat buffer when there is one, else each tensor."""
    flat = getattr(params, "flat", None)
    return [("*", flat)] if flat is not None else list(params.items())


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), applied to 2-D matrices only.

        m = b1 m + (1 - b1) g                      v = b2 v + (1 - b2) g^2
        p = p (1 - lr wd [p is a matrix]) - lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if any(not p.flags.c_contiguous for p in params.values()):
            raise ValueError("AdamW updates parameters in place through flat views: every "
                             "parameter array must be C-contiguous")
        self.params, self.lr, self.betas = params, lr, tuple(betas)
        self.eps, self.weight_decay, self.t = eps, weight_decay, 0
        self.m = {n: get_xp(p).zeros_like(p) for n, p in _buffers(params)}
        self.v = {n: get_xp(p).zeros_like(p) for n, p in _buffers(params)}
        # weight decay applies to matrices (ndim >= 2) only, not to biases / LayerNorm:
        # per buffer, the slices that hold matrices
        self.decay = {}
        for n, p in _buffers(params):
            if n == "*":
                self.decay[n] = _matrix_spans(params)
            else:
                self.decay[n] = [slice(None)] if p.ndim >= 2 else []
        # on a GPU, a float32 flat buffer is updated by one fused kernel launch, which reads
        # where weight decay applies from a mask
        self.fused = {n: fused_optim.decay_mask(self.decay[n], p.size, get_xp(p))
                      for n, p in _buffers(params) if n == "*" and fused_optim.applies(p)}
        self.scratch = {}  # per dtype: as long as the longest stretch updated at a time
        for n, p in _buffers(params):  # (the array code's; a kernel needs none)
            if n in self.fused:
                continue
            size = max(min(p.size, CHUNK), len(self.scratch.get(p.dtype, ())))
            self.scratch[p.dtype] = get_xp(p).empty(size, dtype=p.dtype)

    def step(self, grads, lr=None, skip=None):
        """One update of every parameter in place; `lr` overrides the default for this step.

        skip: None, or a 0-d boolean array on the parameters' device, True when this step
        must change nothing (a mixed-precision step whose gradients overflowed: mixed.py).
        The host never reads it (that would make it wait for the GPU): every coefficient
        of the update is multiplied by keep = 1 - skip, so a skipped step adds exact zeros,
        and the step count t lives on the device, as PyTorch's fused AdamW does with its
        found_inf. The gradients must then be finite (0 * inf is NaN)."""
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        if skip is None:
            self.t += 1
            keep, t = 1.0, self.t
        else:
            xp = get_xp(skip)
            keep = (~skip).astype(xp.int64)  # 0-d on the device: 1 updates, 0 skips
            self.t = self.t + keep
            t = xp.maximum(self.t, 1)        # (t = 0 only while keep = 0)
        bias1 = 1.0 - b1 ** t           # Python floats, or 0-d arrays when t is one
        bias2_sqrt = (1.0 - b2 ** t) ** 0.5
        flat = getattr(grads, "flat", None)
        gbufs = {"*": flat} if "*" in self.m else grads
        for n, p in _buffers(self.params):
            if n in self.fused and skip is None:
                fused_optim.adamw_update(p, gbufs[n], self.m[n], self.v[n], self.fused[n],
                                         lr, self.betas, self.eps, self.weight_decay, bias1,
                                         bias2_sqrt)
                continue
            c = [_scalar(x, p.dtype) for x in (1.0 - keep * lr * self.weight_decay,  # decay
                                               keep * (1.0 - b1), keep * (1.0 - b2),
                                               1.0 / bias2_sqrt, keep * lr / bias1)]
            if n in self.fused:  # the same coefficients, read by the kernel on the device
                fused_optim.adamw_skippable_update(p, gbufs[n], self.m[n], self.v[n],
                                                   self.fused[n], c, self.eps)
                continue
            for span in self.decay[n]:
                p[span] *= c[0]                             # decoupled weight decay
            p1, g1, m1, v1 = (a.reshape(-1) for a in (p, gbufs[n], self.m[n], self.v[n]))
            for start in range(0, p1.size, CHUNK):          # views of CHUNK elements
                part = slice(start, start + CHUNK)
                tmp = self.scratch[p.dtype][:p1[part].size]
                self._adam(p1[part], g1[part], m1[part], v1[part], tmp, *c[1:])

    def _adam(self, p, g, m, v, tmp, c1, c2, unbias2, step):
        """The Adam update of one stretch of parameters, in place (tmp: scratch).
        c1 = 1 - b1, c2 = 1 - b2, unbias2 = 1/sqrt(1 - b2^t), step = lr/(1 - b1^t), each
        times keep (see step), except unbias2."""
        xp = get_xp(p)
        tmp = xp.subtract(g, m, out=tmp)
        tmp *= c1
        m += tmp                # m += (1 - b1)(g - m): b1 m + (1 - b1) g, as torch's lerp_
        tmp = xp.multiply(g, g, out=tmp)
        tmp -= v
        tmp *= c2
        v += tmp                # v += (1 - b2)(g^2 - v): b2 v + (1 - b2) g^2
        denom = xp.sqrt(v, out=tmp)
        denom *= unbias2
        denom += self.eps                               # sqrt(v / (1 - b2^t)) + eps
        update = xp.divide(m, denom, out=tmp)
        update *= step
        p -= update

    def state(self):
        """The optimizer state as {key: array} plus the step count (for checkpoints)."""
        return {"t": int(self.t), "m": self.m, "v": self.v}

    def load_state(self, t, m, v):
        self.t = int(t)
        for n in self.m:
            self.m[n][...] = get_xp(self.m[n]).asarray(m[n])
            self.v[n][...] = get_xp(self.v[n]).asarray(v[n])


def _scalar(x, dtype):
    """x (a Python float, or a 0-d array of a step that may be skipped) in the dtype of
    the parameters: a 0-d float64 array would turn a float32 update into float64 work."""
    return x if type(x) is float else x.astype(dtype)


def _matrix_spans(params):
    """Slices of a FlatDict's flat buffer that hold matrices, neighbours merged."""
    spans, offset = [], 0
    for q in params.values():
        if q.ndim >= 2:
            if spans and spans[-1].stop == offset:
                spans[-1] = slice(spans[-1].start, offset + q.size)
            else:
                spans.append(slice(offset, offset + q.size))
        offset += q.size
    return spans


def grad_norm(grads):
    """Global L2 norm of all gradients, as a 0-d array (no host synchronisation)."""
    bufs = [g for _, g in _buffers(grads)]
    xp = get_xp(bufs[0])
    return xp.sqrt(sum(xp.vdot(g.reshape(-1), g.reshape(-1)) for g in bufs))


def clip_grad_norm(grads, max_norm):
    """Scale every gradient in place so the global norm is at most max_norm.

    As torch's clip_grad_norm_: scale = min(1, max_norm / (norm + 1e-6)). Returns the
    pre-clip global norm as a 0-d array (use float() to read it)."""
    flat = getattr(grads, "flat", None)
    if fused_optim.applies(flat):  # on a GPU: the same in three launches
        return fused_optim.clip_grad_norm(flat, max_norm)
    norm = grad_norm(grads)
    xp = get_xp(norm)
    scale = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(norm.dtype)
    for _, g in _buffers(grads):
        g *= scale
    return norm
