"""AdamW and global-norm gradient clipping, as torch.optim.AdamW and
torch.nn.utils.clip_grad_norm_ compute them.

Handed `model.params` / `model.grads` (FlatDicts), each update is a few expressions
over the flat buffer, taken CHUNK elements at a time so that the temporaries are one
small scratch buffer (not a fifth model-sized array: 0.5 GB for GPT-2 124M); any
other {name: array} dict is updated tensor by tensor with the same expressions.
"""
import math

from . import kernels
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
        # on a GPU, a float32 flat buffer is updated by one fused kernel per stretch
        self.fused = {n: kernels.adamw_runs(self.decay[n], p.size) for n, p in _buffers(params)
                      if n == "*" and kernels.applies(get_xp(p), p.dtype)}
        self.scratch = {}  # per dtype: as long as the longest stretch updated at a time
        for n, p in _buffers(params):
            if n not in self.fused:  # (a kernel needs none)
                size = max(min(p.size, CHUNK), len(self.scratch.get(p.dtype, ())))
                self.scratch[p.dtype] = get_xp(p).empty(size, dtype=p.dtype)

    def step(self, grads, lr=None):
        """One update of every parameter in place; `lr` overrides the default for this step."""
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        bias1 = 1.0 - self.betas[0] ** self.t
        bias2_sqrt = math.sqrt(1.0 - self.betas[1] ** self.t)
        flat = getattr(grads, "flat", None)
        gbufs = {"*": flat} if "*" in self.m else grads
        for n, p in _buffers(self.params):
            if n in self.fused:
                kernels.adamw_update(p, gbufs[n], self.m[n], self.v[n], self.fused[n], lr,
                                     self.betas, self.eps, self.weight_decay, bias1, bias2_sqrt)
                continue
            for span in self.decay[n]:
                p[span] *= 1.0 - lr * self.weight_decay     # decoupled weight decay
            p1, g1, m1, v1 = (a.reshape(-1) for a in (p, gbufs[n], self.m[n], self.v[n]))
            for start in range(0, p1.size, CHUNK):          # views of CHUNK elements
                part = slice(start, start + CHUNK)
                tmp = self.scratch[p.dtype][:p1[part].size]
                self._adam(p1[part], g1[part], m1[part], v1[part], tmp, lr, bias1, bias2_sqrt)

    def _adam(self, p, g, m, v, tmp, lr, bias1, bias2_sqrt):
        """The Adam update of one stretch of parameters, in place (tmp: scratch)."""
        b1, b2 = self.betas
        xp = get_xp(p)
        m *= b1
        m += xp.multiply(g, 1.0 - b1, out=tmp)          # m = b1 m + (1 - b1) g
        v *= b2
        tmp = xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp                                        # v = b2 v + (1 - b2) g^2
        denom = xp.sqrt(v, out=tmp)
        denom *= 1.0 / bias2_sqrt
        denom += self.eps                               # sqrt(v / (1 - b2^t)) + eps
        update = xp.divide(m, denom, out=tmp)
        update *= lr / bias1
        p -= update

    def state(self):
        """The optimizer state as {key: array} plus the step count (for checkpoints)."""
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state(self, t, m, v):
        self.t = int(t)
        for n in self.m:
            self.m[n][...] = get_xp(self.m[n]).asarray(m[n])
            self.v[n][...] = get_xp(self.v[n]).asarray(v[n])


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
    norm = grad_norm(grads)
    xp = get_xp(norm)
    scale = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(norm.dtype)
    for _, g in _buffers(grads):
        g *= scale
    return norm
