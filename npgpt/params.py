"""One flat parameter buffer and one flat gradient buffer, handed out as named views.

As llm.c's ParameterTensors: every parameter of the model lives in one contiguous
1-D array, and `model.params[name]` is a reshaped view into it (the same for grads).
So AdamW is a few whole-buffer expressions, zeroing the grads is one fill and the
global gradient norm is one dot product. Views must be updated in place
(`p[...] = ...`, `p -= ...`): rebinding a name would detach it from the buffer.
"""
import math

import numpy as np


def gpt2_param_shapes(config):
    """[(name, shape)] in Hugging Face GPT-2's order, names and shapes exactly as HF's."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    shapes = [("transformer.wte.weight", (V, C)),
              ("transformer.wpe.weight", (config.block_size, C))]
    for i in range(L):
        h = f"transformer.h.{i}."
        shapes += [
            (h + "ln_1.weight", (C,)), (h + "ln_1.bias", (C,)),
            (h + "attn.c_attn.weight", (C, 3 * C)), (h + "attn.c_attn.bias", (3 * C,)),
            (h + "attn.c_proj.weight", (C, C)), (h + "attn.c_proj.bias", (C,)),
            (h + "ln_2.weight", (C,)), (h + "ln_2.bias", (C,)),
            (h + "mlp.c_fc.weight", (C, 4 * C)), (h + "mlp.c_fc.bias", (4 * C,)),
            (h + "mlp.c_proj.weight", (4 * C, C)), (h + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    return shapes


def flat_size(shapes):
    """Elements of the one buffer that holds every tensor of `shapes`."""
    return sum(math.prod(shape) for _, shape in shapes)


def init_gpt2(shapes, n_layer, seed, dtype):
    """GPT-2 / nanoGPT initialisation as one flat NumPy array (always drawn on the CPU,
    so a seed gives the same model on every device): matrices N(0, 0.02), the residual
    projections N(0, 0.02/sqrt(2 n_layer)), biases 0, LayerNorm weights 1."""
    rng = np.random.default_rng(seed)
    flat = np.empty(flat_size(shapes), dtype=dtype)
    offset = 0
    for name, shape in shapes:
        part = flat[offset:offset + math.prod(shape)]  # drawn in float64, stored in dtype
        offset += part.size
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            part[:] = 1.0
        elif name.endswith(".bias"):
            part[:] = 0.0
        else:
            std = 0.02
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * n_layer)
            part[:] = rng.normal(0.0, std, size=shape).reshape(-1)
    return flat


class FlatDict(dict):
    """A dict {name: array} whose arrays are consecutive views of one 1-D buffer `flat`.

    `model.params` and `model.grads` are FlatDicts; AdamW and clip_grad_norm use
    `.flat` to work on the whole buffer at once, and fall back to tensor-by-tensor
    work for a plain dict.
    """

    def __init__(self, flat, shapes):
        super().__init__()
        offset = 0
        for name, shape in shapes:
            n = math.prod(shape)
            self[name] = flat[offset:offset + n].reshape(shape)  # (n,) -> shape, a view
            offset += n
        if offset != flat.size:
            raise ValueError(f"flat buffer has {flat.size} elements, shapes need {offset}")
        self.flat = flat
