"""A training step never waits for the GPU: checked here without one.

On a GPU every float(), int(), bool() or .item() of a device array makes the host wait
until the device has finished all queued work, so the CPU can no longer run ahead
queueing kernels. The issue asks for none inside a training step except reading the
loss when it is logged. This test runs real training steps on a stand-in "device": NumPy
arrays of a subclass that raises on any read back to the host, handed out by a stand-in
array module, so the CuPy branches of the code (`xp is not numpy`) run too. (One read it
cannot see: np.asarray() of a subclass is a plain view, where CuPy would raise.)
"""
import contextlib
import types

import numpy as np
import pytest

import npgpt.backend
import npgpt.model
import npgpt.ops
import npgpt.optim
from npgpt.trainconfig import PRESETS, TrainConfig
from npgpt.training import Trainer


class HostRead(AssertionError):
    pass


class DeviceArray(np.ndarray):
    """A NumPy array that plays a GPU array: reading its values on the host raises while
    `DeviceArray.armed` is set. Results of operations on it are DeviceArrays too."""
    armed = False

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return super().__array_wrap__(arr, context, False)  # reductions stay 0-d arrays


def _host_read(name):
    def read(self, *args, **kwargs):
        if DeviceArray.armed:
            raise HostRead(f"{name}() of a device array: the host would wait for the GPU")
        return getattr(self.view(np.ndarray), name)(*args, **kwargs)
    return read


for _name in ("__float__", "__int__", "__index__", "__bool__", "__complex__", "__format__",
              "item", "tolist", "tobytes"):
    setattr(DeviceArray, _name, _host_read(_name))


class FakeCuPy:
    """NumPy, except that the arrays it creates are DeviceArrays."""
    ndarray = DeviceArray
    random = types.SimpleNamespace(  # CuPy 14's signatures: Philox4x3210(seed, *, size)
        Generator=np.random.Generator,
        Philox4x3210=lambda seed=None, *, size=-1: np.random.Philox(seed))

    def __getattr__(self, name):
        attr = getattr(np, name)
        # the makers, and vdot, which gives a NumPy scalar where CuPy gives a 0-d array
        if name in ("empty", "zeros", "ones", "full", "asarray", "array", "arange", "vdot"):
            return lambda *args, **kwargs: np.asarray(attr(*args, **kwargs)).view(DeviceArray)
        return attr


@contextlib.contextmanager
def no_host_reads():
    DeviceArray.armed = True
    try:
        yield
    finally:
        DeviceArray.armed = False


def install_fake_gpu(monkeypatch):
    """From here on, new models live on the stand-in device."""
    fake = FakeCuPy()

    def get_xp(*arrays):
        return fake if any(isinstance(a, DeviceArray) for a in arrays) else np

    for module in (npgpt.backend, npgpt.model, npgpt.ops, npgpt.optim):
        monkeypatch.setattr(module, "get_xp", get_xp)
    monkeypatch.setattr(npgpt.model, "array_module", lambda device: fake)
    return fake


@pytest.fixture
def fake_gpu(monkeypatch):
    return install_fake_gpu(monkeypatch)


def make_trainer(tmp_path, corpus, **kw):
    cfg = TrainConfig(**{**PRESETS["tiny"], "data": str(corpus), "out_dir": str(tmp_path),
                         "grad_clip": 1.0, **kw})
    return Trainer(cfg, progress=False, out=lambda *_: None)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_training_step_never_reads_the_device(fake_gpu, tmp_path, corpus, grad_accum):
    trainer = make_trainer(tmp_path, corpus, dropout=0.1, grad_accum=grad_accum)
    model = trainer.model
    assert type(model.params.flat) is DeviceArray and type(trainer.opt.m["*"]) is DeviceArray
    before = model.params.flat.view(np.ndarray).copy()
    with no_host_reads():
        for _ in range(3):
            loss, lr = trainer.train_step()
    assert trainer.iter == 3 and isinstance(lr, float)
    assert type(loss) is DeviceArray and loss.ndim == 0
    assert not np.array_equal(model.params.flat.view(np.ndarray), before)  # it trained
    assert model.rng.calls == 3 * grad_accum  # the dropout stream's CuPy branch ran
    # the guard is live: the loop's one read, when it logs, is exactly what it catches
    with no_host_reads(), pytest.raises(HostRead, match="__float__"):
        trainer.read_loss(loss)
    assert 2.0 < trainer.read_loss(loss) < 5.0


def test_the_guard_catches_reads_hidden_in_code(fake_gpu):
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


def test_the_gpu_branches_compute_what_the_cpu_ones_do(monkeypatch, tmp_path, corpus):
    # where ops take another path on a GPU (row and column sums as reductions, not BLAS
    # products with a ones vector), the stand-in device runs it with NumPy's arithmetic
    cpu = make_trainer(tmp_path / "cpu", corpus)
    install_fake_gpu(monkeypatch)
    gpu = make_trainer(tmp_path / "gpu", corpus)
    assert type(gpu.model.params.flat) is DeviceArray
    for _ in range(3):
        cpu.train_step(), gpu.train_step()
    np.testing.assert_allclose(gpu.model.params.flat.view(np.ndarray), cpu.model.params.flat,
                               rtol=0, atol=1e-5)
