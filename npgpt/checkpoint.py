"""Weights and checkpoints as `.npz`: every parameter at the top level under its
Hugging Face GPT-2 name, the config (and any other non-array data) as JSON text.

    np.load("out/ckpt.npz")["transformer.wte.weight"]   # works, no npgpt needed

Files are always read with allow_pickle=False (a pickled object array is refused,
never unpickled), and written to a temporary file in the same folder that is then
atomically renamed over the target, so a crash mid-save leaves the old file intact.
"""
import json
import os
import tempfile
import zipfile

import numpy as np

from .backend import to_numpy
from .errors import CheckpointError, WriteError
from .model import GPT, GPTConfig

FORMAT = "npgpt-1"
_FORMAT_KEY, _CONFIG_KEY, _META_KEY = "__npgpt_format__", "__config__", "__meta__"


def _is_array(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def save(path, model, params=None, **extra):
    """Write the model's parameters, its config and `extra` to `path` atomically.
    params: {name: array} to write instead of model.params (a mixed-precision run's float32
    master weights, see mixed.py); the file records their dtype.

    Each array in `extra` is stored under its keyword (it must not clash with a parameter
    name); everything else must be JSON-serialisable and is stored in one JSON text."""
    arrays = {_FORMAT_KEY: np.array(FORMAT), _CONFIG_KEY: np.array(model.config.to_json())}
    params = model.params if params is None else params
    meta = {"dtype": str(next(iter(params.values())).dtype)}
    for name, p in params.items():
        arrays[name] = to_numpy(p)
    for key, value in extra.items():
        if key in arrays or key.startswith("__"):
            raise ValueError(f"extra key {key!r} clashes with a reserved or parameter name")
        if _is_array(value):
            arrays[key] = to_numpy(value)
        else:
            meta[key] = value
    arrays[_META_KEY] = np.array(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write(path, write, elsewhere="another --out-dir"):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over
    `path`: readers see the old file or the complete new one, never a partial one. The
    file gets the mode a plain open() would (0666 less the umask: 0644 under 022), not
    the temporary file's 0600. A failed write (a full disk, a read-only folder) removes
    the temporary file, leaves `path` as it was and raises a WriteError naming it (and
    `elsewhere`, where else to write)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise WriteError(path, e, elsewhere) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp):
    if tmp is not None and os.path.exists(tmp):
        os.unlink(tmp)


def current_umask():
    """The process's umask, read without changing it where Linux shows it (changing it,
    even for a moment, would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_npz(path):
    """{key: NumPy array} of an npgpt `.npz`, or a CheckpointError saying what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file; train a model first (python train.py) "
                              "or pass the path of an existing checkpoint")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder; pass an npgpt checkpoint file such as "
                              "out/ckpt.npz (a Hugging Face GPT-2 folder is read by "
                              "from_pretrained / generate.py --model, and needs no export)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if _FORMAT_KEY not in keys or _CONFIG_KEY not in keys:
                raise CheckpointError(f"{path}: not an npgpt checkpoint (no {_FORMAT_KEY} or "
                                      f"{_CONFIG_KEY} entry); it holds {keys[:5]}...")
            return {k: npz[k] for k in keys}
    except CheckpointError:
        raise
    except ValueError as e:
        if not zipfile.is_zipfile(path):  # np.load takes any other file for a pickle
            raise CheckpointError(f"{path}: not an .npz file (npgpt checkpoints are zip "
                                  "archives written by npgpt.save or train.py)") from None
        if "pickle" in str(e).lower():
            raise CheckpointError(f"{path}: holds pickled Python objects, which npgpt never "
                                  "loads (they can run arbitrary code); it is not an npgpt "
                                  "checkpoint") from None
        raise CheckpointError(f"{path}: unreadable ({e}); the file is corrupt or not an .npz "
                              "written by npgpt") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated ({type(e).__name__}: {e}); "
                              "restore it from a backup or retrain") from None


def load(path, device="cpu", dtype=None):
    """(model, extra) from a file written by `save`. `extra` holds the keyword data
    given to save (arrays as NumPy arrays). The model's parameters are copied to
    `device`, in the saved dtype unless `dtype` is given."""
    data = read_npz(path)
    try:
        config = GPTConfig.from_json(str(data.pop(_CONFIG_KEY)))
        meta = json.loads(str(data.pop(_META_KEY)))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{os.fspath(path)}: its config or metadata is invalid ({e})") from None
    fmt = str(data.pop(_FORMAT_KEY))
    if fmt != FORMAT:
        raise CheckpointError(f"{os.fspath(path)}: format {fmt!r}, this npgpt reads {FORMAT!r}")
    model = GPT(config, dtype=dtype or meta.pop("dtype"), device=device, init=False)
    meta.pop("dtype", None)
    state = {n: data.pop(n) for n in list(data) if n in model.params}
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"{os.fspath(path)}: parameters do not match its config: {e}") from None
    meta.update(data)  # the remaining arrays are extras
    return model, meta
