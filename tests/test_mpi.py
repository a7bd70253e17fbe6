"""Data-parallel training over MPI: train.py under mpiexec equals one process with the
summed batch; a failing rank ends the job; Ctrl-C saves; resume on the same or another N.

The tests that launch mpiexec need the extra (pip install -e ".[mpi]") and are skipped
without it. Subprocess timeouts are hang guards, not speed limits.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npgpt import load
from npgpt import distributed
from npgpt.errors import NpgptError

from conftest import HANG_GUARD_S, ROOT, steps_logged, wait_for

TINY = ["--preset", "tiny", "--dropout", "0", "--eval-iters", "2", "--log-interval", "1"]
# one BLAS thread per rank: the machine's cores are shared with the other rank
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for _name in distributed.LAUNCH_SIZE_VARS:  # the single-process runs here are not MPI ranks
    ENV.pop(_name, None)


def find_mpiexec():
    """The mpiexec beside this Python (where the mpich wheel puts it), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = find_mpiexec()
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and mpiexec: pip install -e \".[mpi]\"")


def train(*args, cwd, ranks=None, mpmd=None, check=True):
    """Run train.py alone, on `ranks` MPI ranks, or as an MPMD job of (n, args) parts."""
    script = [sys.executable, str(ROOT / "train.py")]
    if mpmd:
        cmd = [MPIEXEC]
        for i, (n, part_args) in enumerate(mpmd):
            cmd += ([":"] if i else []) + ["-n", str(n), *script, *part_args]
    elif ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *script, *args]
    else:
        cmd = [*script, *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=ENV,
                          timeout=HANG_GUARD_S)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def log_records(folder):
    return [json.loads(line) for line in (folder / "out" / "log.jsonl").read_text().splitlines()]


def test_launch_size_is_read_from_the_launchers_environment():
    assert distributed.launch_size({}) == 1
    assert distributed.launch_size({"PMI_SIZE": "4"}) == 4  # MPICH / Intel MPI (Hydra)
    assert distributed.launch_size({"OMPI_COMM_WORLD_SIZE": "8"}) == 8  # Open MPI
    assert distributed.world().size == 1


def test_ranks_on_one_host_share_its_cores():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {"MPI_LOCALNRANKS": "2"}  # Hydra: two ranks on this host
    script.share_cores_between_ranks(env)
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "64", "OPENBLAS_NUM_THREADS": "3"}  # the user's choice
    script.share_cores_between_ranks(env)
    assert "OMP_NUM_THREADS" not in env
    env = {}  # no launcher: NumPy's own default
    script.share_cores_between_ranks(env)
    assert env == {}


def test_a_launch_without_mpi4py_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` fail
    with pytest.raises(NpgptError, match=r"mpi4py is not installed.*\[mpi\]"):
        distributed.world()


def test_single_process_training_never_imports_mpi4py(tmp_path, corpus):
    code = ("import sys, train\n"
            f"assert train.main({[*TINY, '--max-iters', '2', '--data', str(corpus)]!r}) == 0\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr


@needs_mpi
def test_two_ranks_equal_one_process_with_the_summed_batch(tmp_path, corpus):
    args = [*TINY, "--max-iters", "20", "--eval-interval", "10", "--data", str(corpus)]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    train(*args, "--batch-size", "8", cwd=tmp_path / "one")
    proc = train(*args, "--batch-size", "4", cwd=tmp_path / "two", ranks=2)
    assert "2 MPI ranks, global batch 2 x 4 x 1 = 8 sequences" in proc.stdout
    assert proc.stdout.count("done: iteration 20") == 1, "only rank 0 prints"
    a, _ = load(tmp_path / "one" / "out" / "ckpt.npz")
    b, extra = load(tmp_path / "two" / "out" / "ckpt.npz")
    assert extra["iter"] == 20 and extra["world_size"] == 2
    # the same rows and the same updates: only the all-reduce's summation order differs
    p, q = a.params.flat, b.params.flat
    assert np.linalg.norm(q - p) <= 1e-5 * np.linalg.norm(p)
    assert np.abs(q - p).max() <= 1e-5 * np.abs(p).max()
    one, two = log_records(tmp_path / "one"), log_records(tmp_path / "two")
    assert [r["iter"] for r in one] == [r["iter"] for r in two]
    for r, s in zip(one, two):
        for key in ("loss", "train_loss", "val_loss"):
            if key in r:
                assert s[key] == pytest.approx(r[key], rel=1e-5)
    assert all("allreduce_ms" in r for r in two if "loss" in r)


@needs_mpi
def test_a_failing_rank_ends_the_job_with_its_message(tmp_path, corpus):
    args = [*TINY, "--max-iters", "20"]
    proc = train(cwd=tmp_path, check=False, mpmd=[(1, [*args, "--data", str(corpus)]),
                                                   (1, [*args, "--data", "BAD.txt"])])
    assert proc.returncode != 0
    assert "BAD.txt: no such file" in proc.stderr, proc.stderr
    assert "rank 1 of 2 failed" in proc.stderr, proc.stderr


@needs_mpi
def test_ranks_with_different_flags_stop_at_start(tmp_path, corpus):
    args = [*TINY, "--max-iters", "20", "--data", str(corpus)]
    proc = train(cwd=tmp_path, check=False, mpmd=[(1, args), (1, [*args, "--lr", "0.002"])])
    assert proc.returncode != 0
    assert "disagree at start: --lr: rank 0 has 0.001, rank 1 has 0.002" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "out" / "ckpt.npz").exists()


@needs_mpi
def test_ctrl_c_saves_and_resume_is_bit_identical_then_on_another_n(tmp_path, corpus):
    # long enough that mpiexec, starved of CPU by the two ranks, passes Ctrl-C on in time
    args = [*TINY, "--dropout", "0.1", "--max-iters", "1000", "--eval-interval", "50",
            "--batch-size", "4", "--data", str(corpus)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train(*args, cwd=tmp_path / "a", ranks=2)
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, str(ROOT / "train.py"), *args],
                            cwd=tmp_path / "b", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        wait_for(lambda: steps_logged(tmp_path / "b", 60) or proc.poll() is not None, "steps")
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: mpiexec passes it to every rank
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out.count("checkpoint saved") == 1, out
    _, extra = load(tmp_path / "b" / "out" / "ckpt.npz")
    assert 50 <= extra["iter"] < 1000, "the run must be interrupted mid-way for this test"
    # rank 0's dropout stream; rank 1's is the same key plus its rank, at the same pass
    assert extra["dropout_rng"]["calls"] == extra["iter"]
    train(*args, "--resume", cwd=tmp_path / "b", ranks=2)
    a, _ = load(tmp_path / "a" / "out" / "ckpt.npz")
    b, _ = load(tmp_path / "b" / "out" / "ckpt.npz")
    np.testing.assert_array_equal(a.params.flat, b.params.flat)
    # the same checkpoint continued by one process: same state, a different batch split
    proc = train(*args, "--resume", "--max-iters", "1010", cwd=tmp_path / "b")
    assert "the batch split changed" in proc.stdout, proc.stdout
    _, extra = load(tmp_path / "b" / "out" / "ckpt.npz")
    assert extra["iter"] == 1010 and extra["world_size"] == 1


@needs_mpi
def test_ranks_times_workers_equal_one_process_with_the_global_batch(tmp_path, corpus):
    """2 ranks x 2 worker threads at batch 4 each = one process, one worker, batch 8
    (float64, so that only the sums' grouping differs)."""
    args = [*TINY, "--max-iters", "20", "--eval-interval", "10", "--dtype", "float64",
            "--data", str(corpus)]
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    train(*args, "--batch-size", "8", "--workers", "1", cwd=tmp_path / "one")
    proc = train(*args, "--batch-size", "4", "--workers", "2", cwd=tmp_path / "four", ranks=2)
    assert "2 worker threads per rank" in proc.stdout, proc.stdout
    a, _ = load(tmp_path / "one" / "out" / "ckpt.npz")
    b, extra = load(tmp_path / "four" / "out" / "ckpt.npz")
    assert extra["iter"] == 20 and extra["world_size"] == 2 and extra["workers"] == 2
    p, q = a.params.flat, b.params.flat
    assert np.abs(q - p).max() <= 1e-9 * np.abs(p).max()
