"""A stand-in GPU for tests on machines without one.

DeviceArray is a NumPy array that plays a CuPy array: reading its values on the host
(float(), int(), bool(), .item(), formatting, ...) raises HostRead while
`DeviceArray.armed` is set, and .get() copies it to NumPy as CuPy's does. FakeCuPy is
NumPy, except that the arrays it creates are DeviceArrays. install(monkeypatch) makes
npgpt's --device gpu use them, so the code's CuPy branches (`xp is not numpy`) run with
NumPy's arithmetic. What it cannot see: np.asarray() of a subclass is a plain view, where
CuPy would raise; and it runs no CUDA kernel.
"""
import contextlib
import types

import numpy as np

import npgpt.backend
import npgpt.model
import npgpt.ops
import npgpt.optim


class HostRead(AssertionError):
    pass


class DeviceArray(np.ndarray):
    """A NumPy array that plays a GPU array: reading its values on the host raises while
    `DeviceArray.armed` is set. Results of operations on it are DeviceArrays too."""
    armed = False

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return super().__array_wrap__(arr, context, False)  # reductions stay 0-d arrays

    def get(self):
        """A NumPy copy, as cupy.ndarray.get()."""
        return np.array(self.view(np.ndarray))


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


def install(monkeypatch):
    """From here on, models made with device="gpu" live on the stand-in device."""
    fake = FakeCuPy()

    def get_xp(*arrays):
        return fake if any(isinstance(a, DeviceArray) for a in arrays) else np

    for module in (npgpt.backend, npgpt.model, npgpt.ops, npgpt.optim):
        monkeypatch.setattr(module, "get_xp", get_xp)
    monkeypatch.setattr(npgpt.backend, "gpu_available", lambda: True)
    monkeypatch.setattr(npgpt.model, "array_module",
                        lambda device: fake if device == "gpu" else np)
    return fake
