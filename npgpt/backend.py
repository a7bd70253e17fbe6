"""The one place where npgpt chooses between NumPy (CPU) and CuPy (GPU).

Ops never import an array module themselves: they ask `get_xp(array)` for the
module that owns their input (as Chainer's `cupy.get_array_module` does), so the
same code runs on either device. The device is chosen once, when a model's
parameters are allocated (`array_module(device)`); everything computed from
them stays there.
"""
import os

import numpy as np

from .errors import NpgptError

try:  # CuPy is an optional extra: `pip install -e ".[gpu]"`
    import cupy as _cupy
except ImportError:  # pragma: no cover - depends on the machine
    _cupy = None

DEVICES = ("cpu", "gpu", "auto")


def get_xp(*arrays):
    """The array module (numpy or cupy) that owns `arrays`: cupy if any of them is a CuPy
    array. (cupy.get_array_module says the same and more, about sparse matrices npgpt does
    not use, at 1.5 us a call: a GPU step asks 400 times, and its host's time is the
    step's.)"""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def gpu_available():
    """True when CuPy is installed and sees a usable GPU and driver.

    `import cupy` succeeds on a machine without a driver; only
    `cupy.is_available()` says whether an allocation will work.
    """
    return _cupy is not None and bool(_cupy.is_available())


def gpu_missing_reason():
    """Why --device gpu cannot be used here (None when it can)."""
    if _cupy is None:
        return "CuPy is not installed"
    return None if gpu_available() else "CuPy sees no usable GPU/driver"


def auto_device_note(requested, resolved):
    """The line to print when --device auto falls back to the CPU, else None."""
    if requested == "auto" and resolved == "cpu":
        return f"device auto: {gpu_missing_reason()}, so npgpt runs on the CPU"
    return None


def resolve_device(device):
    """Turn 'cpu' | 'gpu' | 'auto' into 'cpu' or 'gpu', or raise a clear error."""
    if device not in DEVICES:
        raise NpgptError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    if device == "gpu" and not gpu_available():
        why = gpu_missing_reason()
        raise NpgptError(f"--device gpu was asked for but {why}; "
                         "install the GPU extra (pip install -e \".[gpu]\") on a machine "
                         "with an NVIDIA GPU, or use --device cpu")
    return device


def enable_tf32():
    """Let CuPy run float32 matrix products in TF32 on GPUs that have it (compute
    capability 8.0+, such as the A100 and H100): inputs rounded to 10 mantissa bits,
    float32 sums, several times the float32 rate. CuPy reads CUPY_TF32 at its first float32
    matrix product, so call this before any; its batched products (the attention's q k^T
    and att v) stay float32 either way."""
    os.environ["CUPY_TF32"] = "1"


def array_module(device):
    """numpy for 'cpu', cupy for 'gpu' (call resolve_device first)."""
    return _cupy if device == "gpu" else np


def device_of(array):
    """'gpu' for a CuPy array, 'cpu' otherwise."""
    return "cpu" if get_xp(array) is np else "gpu"


def to_numpy(array):
    """A NumPy array of a CuPy array (a copy), or of anything np.asarray takes."""
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        return _cupy.asnumpy(array)
    return np.asarray(array)


CUPY_RNG_STATES = 1 << 16  # parallel Philox streams in a CuPy generator (4 MB of state)


class RandomStream:
    """The model's dropout randomness, the same design on NumPy and on CuPy.

    Training forward pass number n draws every dropout mask it needs from a new
    counter-based generator (Philox) keyed by SeedSequence(key + [n]). The whole state is
    therefore (key, n): a few integers that a checkpoint stores as JSON, where CuPy's
    generators expose no state to save. A resumed run draws exactly the masks an
    uninterrupted one would, on either device (the bits differ between NumPy and CuPy).

    A worker that holds rows [start, stop) of a batch of `total` rows sets
    rows = (start, stop, total): it then draws every mask for the whole batch and keeps
    its rows, so the masks do not depend on how the batch is split (parallel.py).
    """

    def __init__(self, xp, key):
        self.xp, self.key, self.calls, self._gen = xp, [int(k) for k in key], 0, None
        self.rows = None

    def next_pass(self):
        """Start the next training forward pass's masks."""
        self.calls += 1
        self._gen = None

    def random(self, shape, dtype):
        """Uniform [0, 1) floats for the current pass (it continues between calls)."""
        if self._gen is None:
            seed = np.random.SeedSequence(self.key + [self.calls])
            if self.xp is np:
                self._gen = np.random.Generator(np.random.Philox(seed))
            else:  # a fixed number of Philox states, so the bits do not depend on the
                # GPU's SM count (CuPy reduces the seed to 32 bits)
                self._gen = self.xp.random.Generator(
                    self.xp.random.Philox4x3210(seed, size=CUPY_RNG_STATES))
        if self.rows is None:
            return self._gen.random(shape, dtype=dtype)
        start, stop, total = self.rows  # shape[0]: this worker's rows of the batch
        return self._gen.random((total,) + tuple(shape[1:]), dtype=dtype)[start:stop]

    def state(self):
        return {"key": self.key, "calls": self.calls}

    def set_state(self, state):
        self.key, self.calls, self._gen = [int(k) for k in state["key"]], int(state["calls"]), None
