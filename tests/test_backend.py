"""Device selection: CPU always works; GPU requests fail clearly where there is none;
and the GPU path matches the NumPy path: on a real GPU (CuPy) where there is one, and
always on the stand-in GPU of stand_in_gpu.py (NumPy arithmetic, CuPy's code paths)."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import stand_in_gpu
from conftest import ROOT, interrupt_and_resume, write_corpus
from npgpt import GPT, AdamW, GPTConfig, clip_grad_norm, load, ops, save
from npgpt.backend import auto_device_note, gpu_available, resolve_device, to_numpy
from npgpt.errors import NpgptError

CFG = GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


@pytest.fixture(params=["stand-in", "stand-in fused", "cuda", "cuda fused"])
def gpu_xp(request, monkeypatch):
    """The array module of device="gpu": the stand-in, or CuPy on a real GPU; "fused" runs
    the fused kernels (on the stand-in, in the CUDA emulator)."""
    fused = request.param.endswith("fused")
    if request.param.startswith("stand-in"):
        return stand_in_gpu.install(monkeypatch, fused=fused)
    if not gpu_available():
        pytest.skip("no CuPy-visible NVIDIA GPU here")
    import cupy
    monkeypatch.setenv("NPGPT_FUSED", "1" if fused else "0")
    return cupy


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


def test_gpu_forward_backward_adamw_generate_match_cpu(gpu_xp):
    idx = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 12))
    cpu, gpu = GPT(CFG, seed=1), GPT(CFG, seed=1, device="gpu")
    assert isinstance(gpu.params.flat, gpu_xp.ndarray) and gpu.device == "gpu"
    assert type(cpu.params.flat) is np.ndarray
    np.testing.assert_array_equal(to_numpy(gpu.params.flat), cpu.params.flat)
    losses = [float(m.forward(idx[:, :-1], idx[:, 1:], train=True)[1]) for m in (cpu, gpu)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    g_cpu, g_gpu = cpu.backward().flat, to_numpy(gpu.backward().flat)
    np.testing.assert_allclose(g_gpu, g_cpu, rtol=1e-4, atol=1e-5 * np.abs(g_cpu).max())
    norms = [float(clip_grad_norm(m.grads, 0.1)) for m in (cpu, gpu)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    # AdamW from the same gradients (Adam's m / sqrt(v) turns a last-bit difference in a
    # near-zero gradient into a whole step, so each device's own would not compare)
    gpu.grads.flat[...] = gpu_xp.asarray(cpu.grads.flat)
    for model in (cpu, gpu):
        opt = AdamW(model.params, lr=1e-2)
        for _ in range(3):
            opt.step(model.grads)
    np.testing.assert_allclose(to_numpy(gpu.params.flat), cpu.params.flat, rtol=1e-5, atol=1e-7)
    a = cpu.generate(idx[:, :4], 10, temperature=0)
    b = to_numpy(gpu.generate(idx[:, :4], 10, temperature=0))
    np.testing.assert_array_equal(a, b)


def test_the_sampling_step_on_a_gpu_gives_the_cpus_logits(gpu_xp):
    """decode.KVCache.step, the one-position step of sampling, with the model on the GPU
    reads nothing back to the host and gives the CPU model's logits, B = 2."""
    from npgpt.decode import KVCache
    idx = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 9))
    caches = [KVCache(m, 2) for m in (GPT(CFG, seed=6), GPT(CFG, seed=6, device="gpu"))]
    for t in range(idx.shape[1]):
        cpu = caches[0].step(idx[:, t])
        with stand_in_gpu.no_host_reads():
            gpu = caches[1].step(gpu_xp.asarray(idx[:, t]))
        assert isinstance(gpu, gpu_xp.ndarray)
        np.testing.assert_allclose(to_numpy(gpu), cpu, rtol=1e-4, atol=1e-5)


def test_checkpoints_move_between_devices(tmp_path, gpu_xp):
    gpu = GPT(CFG, seed=3, device="gpu")
    save(tmp_path / "g.npz", gpu)
    cpu, _ = load(tmp_path / "g.npz", device="cpu")
    np.testing.assert_array_equal(cpu.params.flat, to_numpy(gpu.params.flat))
    back, _ = load(tmp_path / "g.npz", device="gpu")
    assert isinstance(back.params.flat, gpu_xp.ndarray)
    np.testing.assert_array_equal(to_numpy(back.params.flat), cpu.params.flat)


def test_the_gpu_embedding_gradient_needs_no_atomics(monkeypatch):
    """On a GPU, add.at adds with atomics in no fixed order; the GPU branch sorts the rows
    by token and sums each token's rows as a tree. Same sums as add.at (float64), absent
    tokens zero, a token repeated in most positions, N not a power of two."""
    fake = stand_in_gpu.install(monkeypatch)  # its add.at raises
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 9, (5, 23))
    idx[idx > 5] = 3                          # token 3 is most of the batch; 6-8 never occur
    wte, wpe = rng.standard_normal((11, 4)), rng.standard_normal((30, 4))
    dout = rng.standard_normal((5, 23, 4))
    _, cache = ops.embedding_forward(idx, wte, wpe)
    want = ops.embedding_backward(dout, cache)
    with pytest.raises(stand_in_gpu.AtomicAdd):
        fake.add.at(fake.zeros(3), fake.asarray([0, 0]), 1.0)
    _, gpu_cache = ops.embedding_forward(fake.asarray(idx), fake.asarray(wte), fake.asarray(wpe))
    got = ops.embedding_backward(fake.asarray(dout), gpu_cache)
    for g, w in zip(got, want):
        assert type(g) is stand_in_gpu.DeviceArray
        np.testing.assert_allclose(g.view(np.ndarray), w, rtol=1e-12, atol=1e-12)
    assert np.all(got[0][6:].view(np.ndarray) == 0.0)


@pytest.mark.parametrize("fused", ["0", "1"])
@pytest.mark.skipif(not gpu_available(), reason="no CuPy-visible NVIDIA GPU here (test_cli "
                    "runs the same interruption on the CPU)")
def test_a_real_gpu_run_stopped_by_ctrl_c_resumes_bit_identically(tmp_path, fused):
    """python train.py --device gpu, Ctrl-C mid-way, --resume: the same bits as a run that
    was never interrupted (every sum on the GPU in a fixed order, the dropout stream saved)."""
    corpus = write_corpus(tmp_path)
    args = ["--preset", "tiny", "--device", "gpu", "--max-iters", "400", "--eval-interval",
            "100", "--eval-iters", "1", "--log-interval", "1", "--dropout", "0.1",
            "--data", str(corpus)]
    env = {"NPGPT_FUSED": fused}
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    straight = subprocess.run([sys.executable, str(ROOT / "train.py"), *args],
                              cwd=tmp_path / "a", capture_output=True, text=True,
                              env={**os.environ, **env})
    assert straight.returncode == 0, straight.stderr
    proc, out, err, it = interrupt_and_resume(tmp_path / "b", args, "sigint", after_steps=150,
                                              env=env)
    assert 100 <= it < 400, "the run must be interrupted mid-way for this test"
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert f"interrupted by SIGINT at iteration {it}; checkpoint saved" in out, out
    a, b = (load(tmp_path / run / "out" / "ckpt.npz")[0].params.flat for run in ("a", "b"))
    np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("rows", [640, 100, 64])
def test_gpu_column_sums_in_groups_of_rows(monkeypatch, rows):
    """The GPU's column sums (bias and LayerNorm gradients on the plain path) go over
    groups of rows first when the rows divide evenly: the same sums, in float32 for a
    float16 array."""
    from npgpt.arrays import column_sums
    fake = stand_in_gpu.install(monkeypatch)
    a = np.random.default_rng(rows).standard_normal((rows, 7))
    for dtype, rtol in ((np.float32, 1e-6), (np.float16, 1e-3)):
        got = column_sums(fake.asarray(a.astype(dtype)))
        assert got.dtype == np.float32
        np.testing.assert_allclose(to_numpy(got), a.astype(dtype).astype(np.float64).sum(0),
                                   rtol=rtol, atol=rtol * np.abs(a).sum(0).max())
