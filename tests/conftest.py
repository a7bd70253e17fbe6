"""Shared fixtures and helpers: small corpora, the shared data folder, waiting on a
training subprocess."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 120  # subprocess tests: a hang guard, not a speed assertion


def wait_for(predicate, what):
    """Poll until predicate() is true; fail after HANG_GUARD_S seconds."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def steps_logged(folder, n):
    """Whether folder/out/log.jsonl holds at least n step records."""
    log = folder / "out" / "log.jsonl"
    return log.exists() and log.read_text().count('"loss"') >= n


def interrupt_and_resume(folder, args, how, after_steps=60, env=None):
    """Run `train.py *args` in folder, send it the signal `how` ("sigint", "sigkill", ...)
    once `after_steps` steps are logged, then finish the run with --resume.

    Returns (proc, stdout, stderr, iter): the interrupted process, its output, and the
    iteration of the checkpoint it left. The resumed run's checkpoint is folder/out/ckpt.npz.
    """
    from npgpt import load
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: steps_logged(folder, after_steps) or proc.poll() is not None, "steps")
    proc.send_signal(getattr(signal, how.upper()))
    out, err = proc.communicate()
    _, extra = load(folder / "out" / "ckpt.npz")
    resumed = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--resume"],
                             cwd=folder, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    return proc, out, err, extra["iter"]


def cut_into_blocks(monkeypatch, block_elements):
    """Make every CPU array big enough to be cut into blocks (arrays.blocks) of
    block_elements elements, for this test."""
    from npgpt import arrays
    monkeypatch.setattr(arrays, "WHOLE_ELEMENTS", 0)
    monkeypatch.setattr(arrays, "BLOCK_ELEMENTS", block_elements)


def use_tiles(monkeypatch, tile):
    """Make `tile` the default query tile of attention_forward (the layers use the
    default), for this test."""
    from npgpt import attention
    monkeypatch.setitem(attention.attention_forward.__kwdefaults__, "tile", tile)


def shared_data_dir():
    """$NPGPT_DATA_DIR, else ../shared/data beside the checkout, else None."""
    for candidate in (os.environ.get("NPGPT_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "tinyshakespeare.txt").exists():
            return Path(candidate)
    return None


def write_corpus(folder):
    """folder/corpus.txt: a ~30 kB text with some structure for a tiny model to learn."""
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "shall", "not", "be", "my", "lord", "thou", "art",
             "good", "night", "sweet", "prince", "and", "to", "love"]
    lines = []
    for _ in range(900):
        name = rng.choice(["ROMEO", "JULIET", "HAMLET"])
        lines.append(f"{name}:\n" + " ".join(rng.choice(words, size=6)) + ".\n")
    path = folder / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    """A ~30 kB text file with some structure for a tiny model to learn."""
    return write_corpus(tmp_path)
