"""train.py and generate.py through their real command lines."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from npgpt import load

from conftest import ROOT, interrupt_and_resume, shared_data_dir, write_corpus

TINY = ["--preset", "tiny", "--max-iters", "12", "--eval-interval", "6", "--eval-iters", "2"]


def run(script, *args, cwd, check=True, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_clean_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_train_then_generate_end_to_end(tmp_path, corpus):
    run("train.py", *TINY, "--data", str(corpus), cwd=tmp_path)
    assert (tmp_path / "out" / "ckpt.npz").exists()
    proc = run("generate.py", "--seed", "ROMEO:", "--max-new-tokens", "40", "--rng-seed", "1",
               cwd=tmp_path)
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout) >= len("ROMEO:") + 40
    again = run("generate.py", "--seed", "ROMEO:", "--max-new-tokens", "40", "--rng-seed", "1",
                cwd=tmp_path)
    assert again.stdout == proc.stdout
    greedy = run("generate.py", "--temperature", "0", "--max-new-tokens", "10", "--num-samples", "2",
                 "--top-k", "3", cwd=tmp_path)
    a, b = greedy.stdout.split("-" * 40 + "\n")
    assert a == b


def test_train_on_shakespeare_with_bpe(tmp_path):
    if shared_data_dir() is None:
        pytest.skip("no copy of tinyshakespeare.txt (set NPGPT_DATA_DIR)")
    env = {"NPGPT_DATA_DIR": str(shared_data_dir())}
    run("train.py", "--preset", "tiny", "--max-iters", "4", "--eval-interval", "4",
        "--tokenizer", "bpe", "--vocab-size", "300", cwd=tmp_path, env=env)
    proc = run("generate.py", "--seed", "ROMEO: ✓ unseen", "--max-new-tokens", "5", cwd=tmp_path)
    assert proc.stdout.startswith("ROMEO: ✓ unseen")


def test_help_explains_the_schedule_when_extending(tmp_path):
    out = run("train.py", "--help", cwd=tmp_path).stdout
    assert "--lr-decay-iters" in out and "--max-iters" in out and "--resume" in out
    assert "min-lr" in out


@pytest.mark.parametrize("args,words", [
    (["--data", "missing.txt"], ["missing.txt", "no such file"]),
    (["--n-embd", "30", "--n-head", "4"], ["divisible"]),
    (["--resume"], ["no such file"]),
    (["--device", "gpu"], ["gpu"]),
    (["--tf32"], ["--tf32", "--device gpu"]),
])
def test_train_bad_inputs(tmp_path, corpus, args, words):
    full = [*TINY, "--data", str(corpus), *args] if "--data" not in args else [*TINY, *args]
    assert_clean_error(run("train.py", *full, cwd=tmp_path, check=False), *words)


@pytest.mark.parametrize("content,word", [(b"", "empty"), (b"\x00\x01\x02\x03", "binary"),
                                          (b"\xff\xfe bad", "UTF-8"), (b"tiny", "too short")])
def test_train_bad_files(tmp_path, content, word):
    (tmp_path / "bad.txt").write_bytes(content)
    assert_clean_error(run("train.py", *TINY, "--data", "bad.txt", cwd=tmp_path, check=False), word)


def test_generate_bad_inputs(tmp_path, corpus):
    assert_clean_error(run("generate.py", cwd=tmp_path, check=False), "no such file")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert_clean_error(run("generate.py", "--ckpt", "junk.npz", cwd=tmp_path, check=False), "junk.npz")
    run("train.py", *TINY, "--max-iters", "2", "--data", str(corpus), cwd=tmp_path)
    proc = run("generate.py", "--seed", "ROMEO: Ω€", cwd=tmp_path, check=False)
    assert_clean_error(proc, "'Ω'", "'€'")
    assert_clean_error(run("generate.py", "--top-p", "2", cwd=tmp_path, check=False), "top_p")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(args, parameters) of a 300-iteration run that nothing interrupts."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    args = ["--preset", "tiny", "--max-iters", "300", "--eval-interval", "50", "--eval-iters", "1",
            "--log-interval", "1", "--dropout", "0.1", "--data", str(write_corpus(folder))]
    run("train.py", *args, cwd=folder)
    return args, load(folder / "out" / "ckpt.npz")[0].params.flat


@pytest.mark.parametrize("how", ["sigkill", "sigint", "sigterm", "sighup"])
def test_interrupted_process_resumes_bit_identically(tmp_path, uninterrupted, how):
    """kill -9 keeps the last eval's checkpoint; Ctrl-C, a scheduler's SIGTERM and a closed
    terminal's SIGHUP save one at the current iteration and exit with 128 + the signal."""
    args, straight = uninterrupted
    (tmp_path / "b").mkdir()
    proc, out, err, it = interrupt_and_resume(tmp_path / "b", args, how)
    assert 50 <= it < 300, "the run must be interrupted mid-way for this test"
    if how != "sigkill":
        sent = getattr(signal, how.upper())
        assert proc.returncode == 128 + sent and "Traceback" not in err, err
        assert f"interrupted by {how.upper()} at iteration {it}; checkpoint saved" in out, out
    b, _ = load(tmp_path / "b" / "out" / "ckpt.npz")
    np.testing.assert_array_equal(b.params.flat, straight)
