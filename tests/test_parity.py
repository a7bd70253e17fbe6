"""Parity with PyTorch: logits, loss, every gradient and 10 AdamW steps.

The fixture is written by tests/fixtures/make_reference.py (needs torch; see its
docstring); this test needs only NumPy."""
import json
import os

import numpy as np
import pytest

from npgpt import GPT, AdamW, GPTConfig, clip_grad_norm

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "reference.npz")


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE, allow_pickle=False) as f:
        return {k: f[k] for k in f.keys()}


def model_from(ref):
    settings = json.loads(str(ref["settings"]))
    m = GPT(GPTConfig(**settings["config"]), dtype="float32")
    m.load_state_dict({n: ref[n] for n in m.params})
    return m, settings


def rel(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_logits_loss_and_every_gradient_match_pytorch(ref):
    m, _ = model_from(ref)
    logits, loss = m.forward(ref["idx"][0], ref["targets"][0])
    assert rel(logits, ref["logits"]) < 1e-5
    assert abs(loss - float(ref["loss"])) <= 1e-5 * abs(float(ref["loss"]))
    grads = m.backward()
    for name, g in grads.items():
        assert rel(g, ref["grad." + name]) < 1e-5, name


def test_ten_adamw_steps_with_clipping_match_pytorch(ref):
    m, s = model_from(ref)
    opt = AdamW(m.params, lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"],
                weight_decay=s["weight_decay"])
    losses, norms = [], []
    for step in range(s["steps"]):
        _, loss = m.forward(ref["idx"][step], ref["targets"][step])
        grads = m.backward()
        norms.append(float(clip_grad_norm(grads, s["clip"])))
        opt.step(grads)
        losses.append(loss)
    assert max(ref["train_grad_norms"]) > s["clip"], "the fixture must exercise clipping"
    np.testing.assert_allclose(losses, ref["train_losses"], rtol=1e-5)
    np.testing.assert_allclose(norms, ref["train_grad_norms"], rtol=1e-5)
    assert rel(m.params["transformer.wte.weight"], ref["final.transformer.wte.weight"]) < 1e-5
