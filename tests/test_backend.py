"""Device selection: CPU always works; GPU requests fail clearly where there is none;
and, where a GPU is available, the CuPy path matches the NumPy path."""
import numpy as np
import pytest

from npgpt import GPT, AdamW, GPTConfig, clip_grad_norm, load, save
from npgpt.backend import auto_device_note, gpu_available, resolve_device, to_numpy
from npgpt.errors import NpgptError

CFG = GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no CuPy-visible NVIDIA GPU here")


def test_cpu_and_unknown_devices():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(NpgptError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(gpu_available(), reason="a GPU is available here")
def test_without_a_gpu_gpu_fails_clearly_and_auto_falls_back():
    with pytest.raises(NpgptError, match="--device gpu") as e:
        GPT(CFG, device="gpu")
    assert "--device cpu" in str(e.value)
    assert resolve_device("auto") == "cpu"
    assert "runs on the CPU" in auto_device_note("auto", "cpu")
    assert auto_device_note("cpu", "cpu") is None
    assert GPT(CFG, device="auto").device == "cpu"


@needs_gpu
def test_gpu_forward_backward_adamw_match_cpu():
    import cupy
    idx = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 12))
    cpu, gpu = GPT(CFG, seed=1), GPT(CFG, seed=1, device="gpu")
    assert isinstance(gpu.params.flat, cupy.ndarray)
    np.testing.assert_array_equal(to_numpy(gpu.params.flat), cpu.params.flat)
    for model in (cpu, gpu):
        opt = AdamW(model.params, lr=1e-2)
        for _ in range(3):
            _, loss = model.forward(idx[:, :-1], idx[:, 1:], train=True)
            clip_grad_norm(model.backward(), 1.0)
            opt.step(model.grads)
        model.final_loss = loss
    assert abs(cpu.final_loss - gpu.final_loss) < 1e-4
    np.testing.assert_allclose(to_numpy(gpu.params.flat), cpu.params.flat, rtol=1e-4, atol=1e-6)
    a = cpu.generate(idx[:, :4], 10, temperature=0)
    b = to_numpy(gpu.generate(idx[:, :4], 10, temperature=0))
    np.testing.assert_array_equal(a, b)


@needs_gpu
def test_checkpoints_move_between_devices(tmp_path):
    gpu = GPT(CFG, seed=3, device="gpu")
    save(tmp_path / "g.npz", gpu)
    cpu, _ = load(tmp_path / "g.npz", device="cpu")
    np.testing.assert_array_equal(cpu.params.flat, to_numpy(gpu.params.flat))
    back, _ = load(tmp_path / "g.npz", device="gpu")
    np.testing.assert_array_equal(to_numpy(back.params.flat), cpu.params.flat)
