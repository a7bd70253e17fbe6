"""Faults a real run meets, through the command line where the user meets them: two runs
on one folder, a write that fails (a full disk, a file-size limit), a folder that cannot
be written, the user's umask, a damaged token cache, a log cut by kill -9, a corrupt
tokenizer description. (SIGTERM and SIGHUP: test_cli's interrupted-process test.)"""
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from npgpt import data as datasets
from npgpt import load
from npgpt.errors import NpgptError
from npgpt.tokenizers import build_tokenizer, tokenizer_from_json
from npgpt.training import Trainer

from conftest import HANG_GUARD_S, ROOT, steps_logged, wait_for
from test_cli import assert_clean_error, run
from test_training import tiny

LONG = ["--preset", "tiny", "--max-iters", "100000", "--eval-interval", "50",
        "--eval-iters", "1", "--log-interval", "1"]


def start(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_one_run_per_folder_and_a_killed_runs_lock_is_taken_over(tmp_path, corpus):
    args = [*LONG, "--data", str(corpus)]
    first = start(args, tmp_path)
    try:
        wait_for(lambda: steps_logged(tmp_path, 60) or first.poll() is not None, "steps")
        assert first.poll() is None, first.communicate()
        for extra in ([], ["--resume"]):  # a new run or a resumed one: both refused at once
            proc = run("train.py", *args, *extra, cwd=tmp_path, check=False)
            assert_clean_error(proc, "in use by another training run",
                               f"process {first.pid} on {socket.gethostname()}")
        # reading the checkpoint while the run rewrites it is safe (atomic renames)
        proc = run("generate.py", "--max-new-tokens", "5", "--seed", "ROMEO:", cwd=tmp_path)
        assert proc.stdout.startswith("ROMEO:")
    finally:
        first.kill()  # as kill -9: the lock file stays, the lock dies with the process
        first.communicate()
    assert (tmp_path / "out" / "run.lock").exists()
    _, extra = load(tmp_path / "out" / "ckpt.npz")
    end = extra["iter"] + 5
    proc = run("train.py", *args, "--resume", "--max-iters", str(end), cwd=tmp_path)
    assert f"done: iteration {end}" in proc.stdout


def limited_file_size(limit):
    """preexec_fn: files larger than `limit` bytes cannot be written (EFBIG, as a full
    disk's ENOSPC: a write fails part-way), without the SIGXFSZ that would kill."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_is_one_message_and_the_last_one_survives(tmp_path, corpus):
    args = ["--preset", "tiny", "--eval-interval", "10", "--eval-iters", "1",
            "--data", str(corpus)]
    run("train.py", *args, "--max-iters", "10", cwd=tmp_path)
    before = (tmp_path / "out" / "ckpt.npz").read_bytes()
    assert len(before) > 150_000
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--resume",
                           "--max-iters", "20"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=HANG_GUARD_S, preexec_fn=limited_file_size(150_000))
    # after the progress bar's lines: one error line, no traceback
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.stderr.count("error:") == 1 and last.startswith("error: "), proc.stderr
    for words in ("could not write out/ckpt.npz", "File too large", "ulimit -f",
                  "Nothing was half-written"):
        assert words in last, last
    assert (tmp_path / "out" / "ckpt.npz").read_bytes() == before
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")], "a temporary file was left"
    run("train.py", *args, "--resume", "--max-iters", "20", cwd=tmp_path)
    _, extra = load(tmp_path / "out" / "ckpt.npz")
    assert extra["iter"] == 20


def test_a_folder_that_cannot_be_written_is_reported_before_training(tmp_path, corpus):
    proc = run("train.py", "--preset", "tiny", "--data", str(corpus),
               "--out-dir", str(corpus / "out"), cwd=tmp_path, check=False)  # under a file
    assert_clean_error(proc, f"could not write {corpus / 'out' / 'run.lock'}", "Not a directory")
    assert "iter 0" not in proc.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_folder_is_reported_before_training(tmp_path, corpus):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    proc = run("train.py", "--preset", "tiny", "--data", str(corpus),
               "--out-dir", str(folder), cwd=tmp_path, check=False)
    assert_clean_error(proc, "could not write", "Permission denied", "another --out-dir")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_are_created_with_the_users_umask(tmp_path, corpus, umask, mode):
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--max-iters",
                    "2", "--eval-iters", "1", "--data", str(corpus)], cwd=tmp_path, check=True,
                   capture_output=True, timeout=HANG_GUARD_S, preexec_fn=lambda: os.umask(umask))
    out = tmp_path / "out"
    for name in ("ckpt.npz", "log.jsonl", "loss.png", "data/tokens.bin", "data/tokens.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name


def test_a_damaged_token_cache_is_rebuilt_never_trained_on(tmp_path, corpus):
    tok = build_tokenizer("char", corpus.read_text())
    good = np.array(datasets.prepare_tokens(corpus, tok, tmp_path).tokens)
    cache = tmp_path / "tokens.bin"
    for damage in ("truncate", "replace", "meta"):
        if damage == "truncate":  # cut short, as by a full disk or a copy that stopped
            cache.write_bytes(cache.read_bytes()[:100])
        elif damage == "replace":  # the same size, other tokens
            cache.write_bytes(bytes(reversed(cache.read_bytes())))
        else:
            (tmp_path / "tokens.json").write_text("{not json")
        np.testing.assert_array_equal(datasets.prepare_tokens(corpus, tok, tmp_path).tokens, good)


def test_a_log_cut_by_kill_9_does_not_stop_resume(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_iters=10)
    Trainer(cfg, progress=False, out=lambda *_: None).run()
    log = tmp_path / "out" / "log.jsonl"
    log.write_text(log.read_text() + '{"iter": 11, "lo')  # the last line, half written
    t = Trainer(cfg, resume=True, overrides={"max_iters": 12}, progress=False,
                out=lambda *_: None)
    t.run()
    records = [json.loads(line) for line in log.read_text().splitlines()]  # all whole again
    assert records[-1]["iter"] == 12


def test_a_checkpoints_gpt2_tokenizer_is_validated():
    spec = {"kind": "gpt2", "encoder": {"a": 0, "b": 0}, "merges": []}
    with pytest.raises(NpgptError, match="two tokens share an id"):
        tokenizer_from_json(json.dumps(spec))
    spec["encoder"] = {"a": 0, "b": -1}
    with pytest.raises(NpgptError, match="non-negative integer id"):
        tokenizer_from_json(json.dumps(spec))
