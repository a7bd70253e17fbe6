"""save/load: exact round trip, atomic writes, clear errors for bad files."""
import os

import numpy as np
import pytest

from npgpt import GPT, CheckpointError, GPTConfig, load, save
from npgpt.checkpoint import atomic_write

CFG = GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=6, dropout=0.1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_exact(tmp_path, dtype):
    m = GPT(CFG, seed=4, dtype=dtype)
    path = tmp_path / "w.npz"
    save(path, m, step=7, note={"a": [1, 2]}, moments=np.arange(5.0))
    m2, extra = load(path)
    assert m2.config == CFG and m2.dtype == np.dtype(dtype)
    for n in m.params:
        np.testing.assert_array_equal(m2.params[n], m.params[n])
    assert extra["step"] == 7 and extra["note"] == {"a": [1, 2]}
    np.testing.assert_array_equal(extra["moments"], np.arange(5.0))
    # parameters are readable without npgpt
    with np.load(path, allow_pickle=False) as f:
        np.testing.assert_array_equal(f["transformer.wte.weight"], m.params["transformer.wte.weight"])
    assert not [p for p in os.listdir(tmp_path) if p != "w.npz"], "no temporary file left"


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "nope.npz")


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "w.npz"
    save(path, GPT(CFG))
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.npz"):
        load(tmp_path / "trunc.npz")
    (tmp_path / "garbage.npz").write_bytes(b"\x00\x01not a zip at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.npz: not an .npz file"):
        load(tmp_path / "garbage.npz")
    with pytest.raises(CheckpointError, match="is a folder"):
        load(tmp_path)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.npz"):
        load(tmp_path / "empty.npz")


def test_foreign_npz_is_refused(tmp_path):
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an npgpt checkpoint"):
        load(tmp_path / "foreign.npz")


class Boom:
    def __reduce__(self):  # would run on unpickling
        return (os.system, ("touch " + PWNED,))


PWNED = ""


def test_pickled_object_arrays_are_never_unpickled(tmp_path):
    global PWNED
    PWNED = str(tmp_path / "pwned")
    m = GPT(CFG)
    arrays = {n: p for n, p in m.params.items()}
    arrays["__npgpt_format__"] = np.array("npgpt-1")
    arrays["__config__"] = np.array(CFG.to_json())
    arrays["__meta__"] = np.array([Boom()], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(CheckpointError, match="pickled"):
        load(tmp_path / "evil.npz")
    assert not os.path.exists(PWNED)


def test_mismatched_shapes_are_refused(tmp_path):
    m = GPT(CFG)
    path = tmp_path / "w.npz"
    save(path, m)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.keys()}
    arrays["transformer.h.1.mlp.c_fc.weight"] = np.zeros((6, 5), dtype=np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CheckpointError, match="c_fc.weight"):
        load(tmp_path / "bad.npz")
    del arrays["transformer.h.1.mlp.c_fc.weight"]
    np.savez(tmp_path / "missing.npz", **arrays)
    with pytest.raises(CheckpointError, match="missing"):
        load(tmp_path / "missing.npz")


def test_a_crash_during_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    save(path, GPT(CFG, seed=1))
    before = path.read_bytes()

    def crash(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_extra_keys_may_not_clash(tmp_path):
    with pytest.raises(ValueError, match="clashes"):
        save(tmp_path / "w.npz", GPT(CFG), **{"transformer.wte.weight": np.zeros(2)})
