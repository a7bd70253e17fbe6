"""A training step never waits for the GPU: checked here without one.

On a GPU every float(), int(), bool() or .item() of a device array makes the host wait
until the device has finished all queued work, so the CPU can no longer run ahead
queueing kernels. The issue asks for none inside a training step except reading the
loss when it is logged. These tests run real training steps on the stand-in GPU of
stand_in_gpu.py, whose arrays raise on any read back to the host.
"""
import numpy as np
import pytest

from conftest import use_tiles
from npgpt.trainconfig import PRESETS, TrainConfig
from npgpt.training import Trainer
from stand_in_gpu import DeviceArray, HostRead, install, no_host_reads
from test_training import run_until, tiny


@pytest.fixture(params=["plain", "fused"])
def fake_gpu(request, monkeypatch):
    """The stand-in GPU, running the plain array code or the fused kernels (emulated)."""
    return install(monkeypatch, fused=request.param == "fused")


def make_trainer(tmp_path, corpus, **kw):
    cfg = TrainConfig(**{**PRESETS["tiny"], "data": str(corpus), "out_dir": str(tmp_path),
                         "grad_clip": 1.0, "device": "gpu", **kw})
    return Trainer(cfg, progress=False, out=lambda *_: None)


@pytest.mark.parametrize("grad_accum,dtype", [(1, "float32"), (2, "float32"), (2, "float16")])
def test_a_training_step_never_reads_the_device(fake_gpu, tmp_path, corpus, grad_accum, dtype):
    # float16: the loss scale, the overflow check and AdamW's skip stay on the device too
    trainer = make_trainer(tmp_path, corpus, dropout=0.1, grad_accum=grad_accum, dtype=dtype)
    model = trainer.model
    assert type(model.params.flat) is DeviceArray and type(trainer.opt.m["*"]) is DeviceArray
    before = model.params.flat.view(np.ndarray).copy()
    with no_host_reads():
        for _ in range(3):
            loss, lr = trainer.train_step()
    assert trainer.iter == 3 and isinstance(lr, float)
    assert type(loss) is DeviceArray and loss.ndim == 0
    assert not np.array_equal(model.params.flat.view(np.ndarray), before)  # it trained
    if dtype == "float16":
        assert type(trainer.mixed.scale) is DeviceArray and type(trainer.opt.t) is DeviceArray
    assert model.rng.calls == 3 * grad_accum  # the dropout stream's CuPy branch ran
    # the guard is live: the loop's one read, when it logs, is exactly what it catches
    with no_host_reads(), pytest.raises(HostRead, match="__float__"):
        trainer.read_loss(loss)
    assert 2.0 < trainer.read_loss(loss) < 5.0


def test_the_guard_catches_reads_hidden_in_code(monkeypatch):
    fake_gpu = install(monkeypatch)
    x = fake_gpu.ones((2, 3), dtype=np.float32)
    with no_host_reads():
        total = (x * 2).sum()  # still on the "device"
        for read in (float, int, bool, lambda a: a.item(), lambda a: a.tolist(),
                     lambda a: f"{a:.2f}", lambda a: range(a)):
            with pytest.raises(HostRead):
                read(total)
        with pytest.raises(HostRead):
            if x.max() > 1:  # the classic hidden sync: a device comparison in an if
                pass


@pytest.mark.parametrize("fused,dtype", [(False, "float32"), (True, "float32"),
                                         (False, "float16")])
def test_the_gpu_branches_compute_what_the_cpu_ones_do(monkeypatch, tmp_path, corpus, fused,
                                                      dtype):
    # where ops take another path on a GPU (row and column sums as reductions, not BLAS
    # products with a ones vector; the embedding's gradient summed in a fixed order, not
    # by add.at), the stand-in device runs it with NumPy's arithmetic; fused: the kernels
    install(monkeypatch, fused=fused)
    cpu = make_trainer(tmp_path / "cpu", corpus, device="cpu", dtype=dtype)
    gpu = make_trainer(tmp_path / "gpu", corpus, dtype=dtype)
    assert type(cpu.model.params.flat) is np.ndarray
    assert type(gpu.model.params.flat) is DeviceArray
    if dtype == "float16":
        # the paths' float32 sums differ in their last bits, and so, now and then, does the
        # float16 rounding of an activation (5e-4 relative); AdamW turns such a difference
        # in a gradient near 0 into a step of the other sign: compare the gradients
        cpu.train_step(), gpu.train_step()
        g_gpu, g_cpu = gpu.model.grads.flat.view(np.ndarray), cpu.model.grads.flat
        assert np.linalg.norm(g_gpu - g_cpu) < 1e-3 * np.linalg.norm(g_cpu)
        return
    for _ in range(3):
        cpu.train_step(), gpu.train_step()
    np.testing.assert_allclose(gpu.model.params.flat.view(np.ndarray), cpu.model.params.flat,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused,dtype,tile", [(False, "float32", None), (True, "float32", None),
                                              (False, "float16", None), (False, "float32", 8)])
def test_resume_on_the_gpu_is_bit_identical(monkeypatch, tmp_path, corpus, fused, dtype, tile):
    """Ctrl-C or a crash, then --resume, on the GPU's code paths: the same bits as a run
    that was never interrupted. (On a real GPU this needs every sum in a fixed order: the
    stand-in's add.at raises, so the embedding's gradient cannot fall back to atomics.)
    tile 8: the plain path's attention in query tiles of 8 on the context of 32."""
    install(monkeypatch, fused=fused)
    if tile:
        use_tiles(monkeypatch, tile)
    cfg = dict(dropout=0.1, max_iters=8, batch_size=4, eval_iters=1, device="gpu", dtype=dtype)
    straight = Trainer(tiny(tmp_path / "a", corpus, **cfg), progress=False, out=lambda *_: None)
    straight.run()
    interrupted = tiny(tmp_path / "b", corpus, **cfg)
    run_until(interrupted, 7)  # a crash after 7 steps: the last checkpoint is iteration 5
    resumed = Trainer(interrupted, resume=True, progress=False, out=lambda *_: None)
    assert resumed.iter == 5
    resumed.run()
    assert type(resumed.model.params.flat) is DeviceArray
    np.testing.assert_array_equal(resumed.model.params.flat.view(np.ndarray),
                                  straight.model.params.flat.view(np.ndarray))
