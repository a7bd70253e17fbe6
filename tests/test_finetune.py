"""Fine-tuning from a Hugging Face GPT-2 folder (train.py --init-from), and back out."""
import json
import subprocess
import sys

import numpy as np
import pytest

from npgpt import load

from test_cli import TINY, assert_clean_error, run

pytest.importorskip("safetensors", reason="the hf extra (safetensors) is not installed")


def export(*args, cwd):
    """python -m npgpt.export CHECKPOINT FOLDER, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "npgpt.export", *args], cwd=cwd,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_train_export_finetune_generate_export(tmp_path, corpus):
    run("train.py", *TINY, "--data", str(corpus), cwd=tmp_path)
    export("out/ckpt.npz", "hf", cwd=tmp_path)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_positions"] == 32
    # fine-tune from the exported folder with a shorter context and dropout
    run("train.py", "--preset", "tiny", "--max-iters", "6", "--eval-interval", "3",
        "--init-from", "hf", "--block-size", "16", "--dropout", "0.1", "--lr", "1e-4",
        "--out-dir", "ft", "--data", str(corpus), cwd=tmp_path)
    base, _ = load(tmp_path / "out" / "ckpt.npz")
    tuned, extra = load(tmp_path / "ft" / "ckpt.npz")
    assert tuned.config.block_size == 16 and tuned.config.dropout == 0.1
    assert tuned.config.n_embd == base.config.n_embd
    delta = np.abs(tuned.params["transformer.h.0.mlp.c_fc.weight"]
                   - base.params["transformer.h.0.mlp.c_fc.weight"]).max()
    assert 0 < delta < 0.01, "starts from the imported weights and moves a little"
    np.testing.assert_allclose(tuned.params["transformer.wpe.weight"],
                               base.params["transformer.wpe.weight"][:16], atol=0.01)
    out = run("generate.py", "--ckpt", "ft/ckpt.npz", "--seed", "ROMEO:", "--max-new-tokens", "8",
              cwd=tmp_path).stdout
    assert out.startswith("ROMEO:")
    out = run("generate.py", "--model", "hf", "--seed", "JULIET:", "--max-new-tokens", "8",
              cwd=tmp_path).stdout
    assert out.startswith("JULIET:")
    export("ft/ckpt.npz", "hf2", cwd=tmp_path)
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["n_positions"] == 16


def test_init_from_refuses_a_longer_context(tmp_path, corpus):
    run("train.py", *TINY, "--max-iters", "1", "--data", str(corpus), cwd=tmp_path)
    export("out/ckpt.npz", "hf", cwd=tmp_path)
    proc = run("train.py", "--preset", "tiny", "--init-from", "hf", "--block-size", "64",
               "--out-dir", "ft", "--data", str(corpus), cwd=tmp_path, check=False)
    assert_clean_error(proc, "n_positions")
    proc = run("train.py", "--preset", "tiny", "--init-from", "missing", "--out-dir", "ft",
               "--data", str(corpus), cwd=tmp_path, check=False)
    assert_clean_error(proc, "missing")
