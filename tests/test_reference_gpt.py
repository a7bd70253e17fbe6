"""reference_gpt.py, the whole GPT in textbook NumPy: the same loss and gradients as
GPT.forward / GPT.backward, its gradients by central differences, and its dtypes.

Every weight is perturbed away from GPT-2's initialisation (biases 0, LayerNorm weights
1): there a forgotten bias or LayerNorm scale would change nothing."""
import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.gradcheck import numerical_grad, rel_error
from npgpt.reference_gpt import backward_order, gpt_backward, gpt_forward

CFG = GPTConfig(vocab_size=11, block_size=7, n_layer=2, n_head=2, n_embd=8)
B, T = 3, 6  # T < block_size: the last row of wpe is unused (its gradient is 0)


def perturbed_model(dtype="float64"):
    model = GPT(CFG, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    for w in model.params.values():  # every weight, bias and LayerNorm parameter
        w += (0.3 * rng.standard_normal(w.shape)).astype(dtype)
    return model


def batch(ignore=False):
    rng = np.random.default_rng(2)
    idx = rng.integers(0, CFG.vocab_size, (B, T))
    targets = rng.integers(0, CFG.vocab_size, (B, T))
    if ignore:
        targets[0, 1:4] = -1   # three ignored positions ...
        targets[2, -1] = -1    # ... and the last of another row
    return idx, targets


@pytest.mark.parametrize("ignore", [False, True], ids=["all_targets", "ignore_index"])
def test_reference_gpt_equals_model(ignore):
    model = perturbed_model()
    idx, targets = batch(ignore)
    loss, cache = gpt_forward(model.params, idx, targets, CFG.n_head)
    grads = gpt_backward(cache)
    _, want_loss = model.forward(idx, targets)
    want = model.backward()
    assert abs(float(loss) - float(want_loss)) <= 1e-12 * abs(float(want_loss))
    assert list(grads) == backward_order(CFG.n_layer)
    assert sorted(grads) == sorted(model.params)
    for name in backward_order(CFG.n_layer):
        assert grads[name].shape == want[name].shape, name
        err = rel_error(grads[name], want[name])
        assert err <= 1e-10, f"{name}: relative error {err:.1e} against GPT.backward"
    assert np.all(grads["transformer.wpe.weight"][T:] == 0.0)


def test_backward_order_names_every_parameter_once():
    for n_layer in (1, 3):
        config = GPTConfig(vocab_size=5, block_size=4, n_layer=n_layer, n_head=1, n_embd=4)
        order = backward_order(n_layer)
        assert sorted(order) == sorted(GPT(config).params) and len(set(order)) == len(order)
    assert backward_order(2)[2:4] == ["transformer.h.1.mlp.c_proj.weight",
                                      "transformer.h.1.mlp.c_proj.bias"]


def test_reference_gpt_names_a_wrong_head_count():
    with pytest.raises(ValueError, match="n_head"):
        gpt_forward(perturbed_model().params, *batch(), n_head=3)


# the tied wte (both of its paths), a position table, and one bias or LayerNorm
# parameter from each kind of layer of both blocks
CHECKED = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
           "transformer.h.1.mlp.c_fc.bias", "transformer.h.1.ln_2.bias",
           "transformer.h.0.attn.c_proj.bias", "transformer.h.0.attn.c_attn.bias",
           "transformer.h.0.ln_1.weight"]


def test_reference_gpt_gradients_by_central_differences():
    params = {name: w.copy() for name, w in perturbed_model().params.items()}
    idx, targets = batch(ignore=True)
    grads = gpt_backward(gpt_forward(params, idx, targets, CFG.n_head)[1])
    for name in CHECKED:
        numeric = numerical_grad(lambda: gpt_forward(params, idx, targets, CFG.n_head)[0],
                                 params[name])
        err = rel_error(numeric, grads[name])
        assert err <= 1e-7, f"{name}: relative error {err:.1e} against central differences"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_reference_gpt_keeps_dtype(dtype):
    model = perturbed_model(dtype)
    idx, targets = batch(ignore=True)
    loss, cache = gpt_forward(model.params, idx, targets, CFG.n_head)
    grads = gpt_backward(cache)
    assert np.asarray(loss).dtype == dtype
    for name, grad in grads.items():
        assert grad.dtype == dtype, f"{name}: gradient is {grad.dtype}"
    if dtype == "float32":  # the same gradients, to float32's rounding
        model.forward(idx, targets)
        want = model.backward()
        for name, grad in grads.items():
            assert rel_error(grad, want[name]) <= 1e-5, name
