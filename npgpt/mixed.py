"""Mixed precision by hand: a float16 model trained from float32 master weights, with
dynamic loss scaling (train.py --dtype float16; the why of each piece: docs/mixed_precision.md).

    mp = MixedPrecision(GPT(config, dtype="float32"))   # its weights become the masters
    opt = AdamW(mp.params)                              # AdamW updates the float32 masters
    mp.model.forward(x, y, train=True)                  # float16 forward ...
    mp.model.backward(dloss=mp.scale)                   # ... and backward of scale x loss
    mp.step(opt, lr, grad_clip=1.0)                     # the rest, which is:
        skip = mp.unscale_()                            #   grads /= scale; overflowed?
        clip_grad_norm(mp.model.grads, 1.0)
        opt.step(mp.model.grads, lr, skip=skip)         #   nothing changes when skip is True
        mp.push()                                       #   float16 weights = round(masters)
        mp.update(skip)                                 #   halve the scale, or grow it

What is float16 and what is float32:
    float16  the weights the forward and backward use (a rounded copy of the masters), every
             activation kept for the backward, every matrix product's inputs and output
             (ops.matmul: float32 sums inside, as tensor cores do), the activation gradients
    float32  the master weights and AdamW's moments; the parameter gradients (model.grads);
             every sum over many terms: LayerNorm's mean and variance, softmax's row sums,
             the cross-entropy's log-sum-exp and the loss (ops.sum_dtype); the gradient norm;
             the loss scale

The loss scale follows PyTorch's GradScaler defaults: it starts at 2^16; a step whose
gradients hold an inf or NaN is skipped and halves it; 2000 good steps in a row double it.
Nothing here reads a device value on the host: the skip is a 0-d boolean array that
AdamW.step folds into its arithmetic, so a GPU step never waits for the device.
"""
from . import fused_optim
from .backend import get_xp
from .model import GPT
from .optim import clip_grad_norm

MASTER_DTYPE = "float32"


def weights_dtype(dtype):
    """The dtype of the weights AdamW updates for a run in `dtype` (--dtype): the float32
    masters for float16, else dtype itself."""
    return MASTER_DTYPE if dtype == "float16" else dtype


class MixedPrecision:
    """A float16 copy of a float32 model, and the loss scale of its training.

    params: the float32 master weights (the given model's FlatDict, which AdamW updates);
    model:  the float16 GPT whose forward and backward a step runs (its own buffers; its
            gradients, model.grads, are float32)."""

    def __init__(self, master, init_scale=2.0 ** 16, growth_interval=2000,
                 growth_factor=2.0, backoff_factor=0.5):
        if master.dtype != MASTER_DTYPE:
            raise ValueError(f"master weights must be {MASTER_DTYPE}, got {master.dtype}")
        self.params = master.params
        self.model = GPT(master.config, dtype="float16", device=master.device, init=False,
                         reuse_memory=master.reuse_memory)
        self.model.rng.set_state(master.rng.state())  # the same dropout masks as the master's
        xp = self.xp
        self.growth_interval = int(growth_interval)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.scale = xp.asarray(init_scale, dtype=xp.float32)  # 0-d arrays on the device
        self.good_steps = xp.zeros((), dtype=xp.int64)   # steps since the last overflow
        self.skipped = xp.zeros((), dtype=xp.int64)      # steps skipped in the whole run
        self.push()

    @property
    def xp(self):
        return get_xp(self.params.flat)

    def push(self):
        """Copy the master weights into the float16 model, rounded to nearest. The model is
        never updated itself: an AdamW step of 1e-4 relative to a weight is below half of
        float16's spacing (2^-11 relative) and would round back to the same weight."""
        self.model.params.flat[...] = self.params.flat

    def unscale_(self):
        """Divide the model's gradients (scale x the true ones) by the scale, in place, and
        return the 0-d boolean `skip`: some gradient is inf or NaN. Overflowed gradients
        are then set to 0, so that AdamW can multiply them by its keep = 0 (0 * inf is
        NaN). The scale is a power of two, so the division is exact."""
        xp, g = self.xp, self.model.grads.flat
        g *= 1.0 / self.scale
        skip = ~xp.isfinite(xp.sum(g))     # an inf or a NaN anywhere makes the sum one
        xp.copyto(g, xp.zeros((), dtype=g.dtype), where=skip)  # (CuPy's src: an array)
        return skip

    def step(self, opt, lr=None, grad_clip=0.0):
        """The rest of a training step, once model.grads holds scale x the gradient: unscale,
        clip the global norm to grad_clip (0: no clipping), AdamW on the master weights
        (skipped on overflow), copy them into the model, adjust the scale. Returns skip.
        On a GPU, fused_optim.mixed_step does the same in five kernel launches."""
        if "*" in opt.fused and fused_optim.applies(self.model.grads.flat):
            return fused_optim.mixed_step(self, opt, lr, grad_clip)
        skip = self.unscale_()
        if grad_clip > 0:
            clip_grad_norm(self.model.grads, grad_clip)
        opt.step(self.model.grads, lr=lr, skip=skip)
        self.push()
        self.update(skip)
        return skip

    def update(self, skip):
        """After a step: an overflow halves the scale and restarts the count of good steps;
        growth_interval good steps in a row double it."""
        xp = self.xp
        self.skipped = self.skipped + skip
        good = xp.where(skip, 0, self.good_steps + 1)    # 0 after an overflow
        grow = good >= self.growth_interval
        factor = xp.where(skip, self.backoff_factor, xp.where(grow, self.growth_factor, 1.0))
        self.scale = self.scale * factor.astype(xp.float32)
        self.good_steps = xp.where(grow, 0, good)

    def state(self):
        """The scaler's state as JSON numbers (for checkpoints; reads the device)."""
        return {"loss_scale": float(self.scale), "scale_good_steps": int(self.good_steps),
                "skipped_steps": int(self.skipped)}

    def load_state(self, state):
        xp = self.xp
        self.scale = xp.asarray(state["loss_scale"], dtype=xp.float32)
        self.good_steps = xp.asarray(state["scale_good_steps"], dtype=xp.int64)
        self.skipped = xp.asarray(state["skipped_steps"], dtype=xp.int64)
